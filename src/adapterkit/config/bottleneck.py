"""Bottleneck adapters: series, parallel, convolutional and Compacter (PHM) variants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import MethodConfig, check_bools, check_choice, check_probability, is_int, is_number, register_config

NON_LINEARITIES = ("relu", "gelu", "gelu_new", "swish", "silu", "tanh", "sigmoid", "leakyrelu", "identity")
INIT_WEIGHTS = ("bert", "houlsby", "near_identity", "zero_up")
SCALING_MODES = ("learned", "channel")
PROJECTIONS = ("linear", "conv")
PHM_INITS = ("normal", "uniform")
PHM_W_INITS = ("glorot-uniform", "normal")


@register_config
@dataclass(frozen=True)
class BottleneckConfig(MethodConfig):
    """Configuration of a bottleneck adapter: ``h + W_up f(W_down x + b_down) + b_up``.

    The adapter sits at the output of a transformer sublayer (attention or feed-forward), before
    the residual connection of the block is added.

    Attributes:
        mh_adapter: Insert an adapter after the self-attention sublayer of every block.
        output_adapter: Insert an adapter after the feed-forward sublayer of every block.
        cross_adapter: Insert an adapter after the cross-attention sublayer of decoder blocks in
            encoder-decoder models.
        before_head: Insert one more adapter on the final hidden states, before the output head.
        reduction_factor: Bottleneck width is ``hidden_size // reduction_factor``.
        bottleneck_size: Explicit bottleneck width; overrides ``reduction_factor`` when set.
        non_linearity: Activation between the down and up projections, one of ``NON_LINEARITIES``.
        parallel: Read the sublayer input and add the result to the sublayer output (He et al., 2022),
            instead of transforming the sublayer output in series.
        scaling: Factor on the up-projection output: a number, ``"learned"`` (one scalar parameter)
            or ``"channel"`` (one parameter per hidden unit).
        residual_before_ln: Take the adapter's residual from the sublayer output before the
            block's layer norm (True) or after it (False).
        original_ln_before: Add the block residual and apply the block's own layer norm before the
            adapter (Pfeiffer et al., 2021). The block applies them again after the adapter.
        ln_before: A new layer norm on the adapter input.
        ln_after: A new layer norm on the adapter output.
        init_weights: ``"bert"``: projections from normal(0, 0.02), biases zero. ``"houlsby"``:
            truncated normal(0, 0.01) on both projections (Houlsby et al., 2019, section 3.6).
            ``"near_identity"``: like ``"houlsby"`` with the up-projection drawn 1000 times smaller, so
            a new adapter changes block outputs by well under 1e-4. ``"zero_up"``: the
            up-projection starts at zero, so a new adapter is exactly the identity.
        dropout: Dropout probability on the adapter output.
        projection: ``"linear"`` projections per token, or ``"conv"``: 1-D convolutions over the
            sequence, centred in encoders and causal in decoders.
        kernel_size: Width of the convolutions over the sequence when ``projection="conv"``; must be
            odd in encoders, where the convolution is centred.
        use_gating: Scale the adapter output by a learned gate computed from its input (UniPELT).
        phm_layer: Build both projections as parameterised hypercomplex multiplication layers
            (Compacter, Karimi Mahabadi et al., 2021).
        phm_dim: Number of Kronecker summands ``n``; hidden size and bottleneck width must be
            divisible by it.
        shared_phm_rule: Share the ``n x n`` rule matrices between all PHM layers of the adapter.
        factorized_phm_W: Store each weight block as a product of two rank-``phm_rank`` factors.
        factorized_phm_rule: Store the rule matrices as products of two rank-``phm_rank`` factors.
        phm_rank: Rank of the factorised matrices.
        phm_init_range: Standard deviation (``"normal"``) or bound (``"uniform"``) of the rule init.
        phm_c_init: ``"normal"`` or ``"uniform"`` initialisation of the rule matrices.
        hypercomplex_nonlinearity: Initialisation of the weight blocks: ``"glorot-uniform"`` or ``"normal"``.
        learn_phm: Train the rule matrices (False keeps them fixed at their initial values).
        phm_bias: Give the PHM layers a bias.
        leave_out: Indices of blocks that get no adapter.
    """

    mh_adapter: bool = False
    output_adapter: bool = True
    cross_adapter: bool = False
    before_head: bool = False
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    parallel: bool = False
    scaling: float | str = 1.0
    residual_before_ln: bool = True
    original_ln_before: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    dropout: float = 0.0
    projection: str = "linear"
    kernel_size: int = 3
    use_gating: bool = False
    phm_layer: bool = False
    phm_dim: int = 4
    shared_phm_rule: bool = True
    factorized_phm_W: bool = True
    factorized_phm_rule: bool = False
    phm_rank: int = 1
    phm_init_range: float = 0.0001
    phm_c_init: str = "normal"
    hypercomplex_nonlinearity: str = "glorot-uniform"
    learn_phm: bool = True
    phm_bias: bool = True

    architecture: ClassVar[str] = "bottleneck"

    def __post_init__(self) -> None:
        if isinstance(self.non_linearity, str):
            object.__setattr__(self, "non_linearity", self.non_linearity.lower())
        super().__post_init__()

    def _find_problems(self) -> list[str]:
        problems = super()._find_problems()
        problems += check_bools(self, ("mh_adapter", "output_adapter", "cross_adapter", "before_head", "parallel",
                                       "residual_before_ln", "original_ln_before", "ln_before", "ln_after",
                                       "use_gating", "phm_layer", "shared_phm_rule", "factorized_phm_W",
                                       "factorized_phm_rule", "learn_phm", "phm_bias"))
        if not (self.mh_adapter or self.output_adapter or self.cross_adapter or self.before_head):
            problems.append("mh_adapter, output_adapter, cross_adapter and before_head are all False: the "
                            "adapter would be inserted nowhere; set at least one of them to True")
        if not is_number(self.reduction_factor) or self.reduction_factor <= 0:
            problems.append(f"reduction_factor={self.reduction_factor!r}: expected a number > 0")
        if self.bottleneck_size is not None and (not is_int(self.bottleneck_size) or self.bottleneck_size < 1):
            problems.append(f"bottleneck_size={self.bottleneck_size!r}: expected an integer >= 1, "
                            "or None to use reduction_factor")
        problems += check_choice("non_linearity", self.non_linearity, NON_LINEARITIES)
        if not (is_number(self.scaling) or self.scaling in SCALING_MODES):
            problems.append(f"scaling={self.scaling!r}: expected a number, 'learned' or 'channel'")
        problems += check_choice("init_weights", self.init_weights, INIT_WEIGHTS)
        problems += check_probability("dropout", self.dropout)
        problems += check_choice("projection", self.projection, PROJECTIONS)
        if not is_int(self.kernel_size) or self.kernel_size < 1:
            problems.append(f"kernel_size={self.kernel_size!r}: expected an integer >= 1")
        if self.projection == "conv" and self.phm_layer:
            problems.append("projection='conv' with phm_layer=True: PHM layers are per-token linear maps; "
                            "choose one of them")
        for name in ("phm_dim", "phm_rank"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.append(f"{name}={value!r}: expected an integer >= 1")
        if not is_number(self.phm_init_range) or self.phm_init_range <= 0:
            problems.append(f"phm_init_range={self.phm_init_range!r}: expected a number > 0")
        problems += check_choice("phm_c_init", self.phm_c_init, PHM_INITS)
        problems += check_choice("hypercomplex_nonlinearity", self.hypercomplex_nonlinearity, PHM_W_INITS)
        return problems

    def bottleneck_width(self, hidden_size: int) -> int:
        """Return the bottleneck width for a model of ``hidden_size``.

        With ``phm_layer=True`` and no ``bottleneck_size``, the width is rounded down to a multiple of
        ``phm_dim`` (at least ``phm_dim``), so the presets fit any hidden size divisible by ``phm_dim``.

        Raises:
            ValueError: If ``reduction_factor`` leaves less than one unit.
        """
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        width = int(hidden_size // self.reduction_factor)
        if self.phm_layer and width % self.phm_dim:
            # PHM layers need a width divisible by phm_dim: round down to a multiple, but keep at least one.
            width = max(self.phm_dim, width // self.phm_dim * self.phm_dim)
        if width < 1:
            raise ValueError(
                f"reduction_factor={self.reduction_factor} leaves a bottleneck of {width} units for "
                f"hidden_size={hidden_size}; use a reduction_factor <= {hidden_size} or set bottleneck_size"
            )
        return width


AdapterConfig = BottleneckConfig
