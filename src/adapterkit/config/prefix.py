"""Prefix tuning: trained keys and values prepended to the keys and values of every attention layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import MethodConfig, check_bools, check_choice, check_probability, is_int, register_config

PREFIX_NON_LINEARITIES = ("tanh", "relu", "gelu", "swish", "silu")
# Modes of T5's relative position bias next to a prefix (see PrefixTuningConfig.position_bias).
PREFIX_POSITION_BIASES = ("zero", "concatenated", "shifted")


@register_config
@dataclass(frozen=True)
class PrefixTuningConfig(MethodConfig):
    """Prefix tuning (Li and Liang, 2021).

    Attributes:
        prefix_length: Number of prefix positions per attention layer.
        bottleneck_size: Hidden width of the MLP that produces the prefixes during training.
        non_linearity: Activation of that MLP.
        dropout: Dropout probability on the prefixes.
        flat: Train the prefixes directly, without the MLP.
        encoder_prefix: Prefix the self-attention of encoder blocks (every block of an encoder-only model).
        cross_prefix: Prefix the cross-attention of decoder blocks in encoder-decoder models.
            Decoder self-attention always gets a prefix.
        use_gating: Scale the prefix values by a learned gate per layer (UniPELT).
        shift_positions: Number the real tokens from ``prefix_length`` instead of 0, as PEFT does by
            passing its prefix as a KV cache. Checkpoints read from PEFT set it, so their outputs match
            PEFT's. Needs a family whose description names its ``position_ids`` rule. In
            encoder-decoder models (BART) only the decoder's positions move, because PEFT passes its
            cache to the decoder only.
        position_bias: The mode of T5's relative position bias next to the prefix. ``"zero"`` gives the
            prefix columns zero bias and the real keys the bias they have without a prefix.
            ``"concatenated"`` computes the bias over the prefix and the real keys as one key
            sequence: key ``j`` of ``[prefix; keys]`` is at position ``j``, and the queries keep
            their positions, so every real key moves ``prefix_length`` positions away from the
            queries. That is what AdapterHub's ``adapters`` 1.3.0 computes, and reading its T5
            checkpoints sets it. As there, the first block of a stack computes the bias and later
            blocks reuse it, and from the first block whose prefix length differs from the first
            block's (see ``leave_out``) on, every block of that stack gets zero relative bias.
            ``"shifted"`` computes the bias that a KV cache holding the prefix gives, as PEFT's prefix
            tuning does: the prefix takes key positions ``0`` to ``prefix_length - 1``, and the queries
            and the real keys move ``prefix_length`` positions on. So the real keys keep the bias they
            have without a prefix, and prefix key ``j`` gets the bias of its distance
            ``j - prefix_length - i`` from query ``i``. Only the first block of a T5 stack has the
            relative bias embedding, so that block computes the bias for its prefix length and later
            blocks use its last columns. With ``"shifted"``, a block whose prefix is longer than the
            first block's raises ``NotImplementedError``.
            Models without a relative position bias (BERT, GPT-2, Llama, BART) compute the same in
            all modes. MPNet and DeBERTa-v2 raise ``NotImplementedError`` on ``"concatenated"`` and
            ``"shifted"``.
        leave_out: Indices of blocks that get no prefix.
    """

    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0
    flat: bool = False
    encoder_prefix: bool = True
    cross_prefix: bool = True
    use_gating: bool = False
    shift_positions: bool = False
    position_bias: str = "zero"

    architecture: ClassVar[str] = "prefix_tuning"

    def _find_problems(self) -> list[str]:
        problems = super()._find_problems()
        for name in ("prefix_length", "bottleneck_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.append(f"{name}={value!r}: expected an integer >= 1")
        problems += check_choice("non_linearity", self.non_linearity, PREFIX_NON_LINEARITIES)
        problems += check_choice("position_bias", self.position_bias, PREFIX_POSITION_BIASES)
        problems += check_probability("dropout", self.dropout)
        problems += check_bools(self, ("flat", "encoder_prefix", "cross_prefix", "use_gating", "shift_positions"))
        return problems
