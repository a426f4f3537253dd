"""LoRA and (IA)^3: methods that change the frozen linear projections of a block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import (MethodConfig, check_bools, check_choice, check_probability, check_roles, is_int, is_number,
                   register_config)

LORA_INITS = ("lora", "gaussian", "bert")
IA3_INITS = ("ones", "bert")
FF_OUT_SIDES = ("input", "output")


@register_config
@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """Low-rank adaptation (Hu et al., 2021): each targeted projection ``W`` computes ``W x + s B A x``.

    Attributes:
        r: Rank of ``A`` (r x in) and ``B`` (out x r).
        alpha: Scaling numerator: the update is multiplied by ``s = alpha / r``.
        dropout: Dropout probability on the input of ``A``.
        targets: Roles of the projections to adapt: ``query``, ``key``, ``value``,
            ``attention_output``, ``ff_in`` (every feed-forward input projection, gate included) and
            ``ff_out``. Attention roles cover self- and cross-attention.
        init_weights: ``"lora"``: ``A`` Kaiming-uniform and ``B`` zero, so a new adapter is the identity.
            ``"gaussian"``: ``A`` normal(0, 1/r) and ``B`` zero. ``"bert"``: both normal(0, 0.02).
        use_gating: Scale the update by a learned gate computed from the input (UniPELT).
        leave_out: Indices of blocks that get no LoRA.
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    init_weights: str = "lora"
    use_gating: bool = False

    architecture: ClassVar[str] = "lora"
    tuple_fields: ClassVar[tuple[str, ...]] = ("leave_out", "targets")

    def _find_problems(self) -> list[str]:
        problems = super()._find_problems()
        if not is_int(self.r) or self.r < 1:
            problems.append(f"r={self.r!r}: expected an integer rank >= 1")
        if not is_number(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha={self.alpha!r}: expected a number > 0")
        problems += check_probability("dropout", self.dropout)
        problems += check_roles("targets", self.targets)
        problems += check_choice("init_weights", self.init_weights, LORA_INITS)
        problems += check_bools(self, ("use_gating",))
        return problems

    @property
    def scaling(self) -> float:
        """The factor ``alpha / r`` on the low-rank update."""
        return self.alpha / self.r


@register_config
@dataclass(frozen=True)
class IA3Config(MethodConfig):
    """(IA)^3 (Liu et al., 2022): learned vectors that rescale activations elementwise.

    Attention roles (``query``, ``key``, ``value``, ``attention_output``) and ``ff_in`` scale the
    projection's output. ``ff_out`` scales the input of the feed-forward output projection, which is
    the activation after the non-linearity, as in the paper, unless ``ff_out_side="output"``.

    Attributes:
        targets: Roles to rescale, from ``query``, ``key``, ``value``, ``attention_output``, ``ff_in``
            and ``ff_out``.
        init_weights: ``"ones"`` starts as the identity; ``"bert"`` draws from normal(1, 0.02).
        ff_out_side: ``"input"`` scales the input of the ``ff_out`` projection (a vector of its input
            width). ``"output"`` scales its output (a vector of the hidden size), as the ``adapters``
            library does for a module it wraps as ``intermediate_lora`` or ``output_lora``, which on
            Llama is ``down_proj``.
        leave_out: Indices of blocks that get no (IA)^3 vectors.
    """

    targets: tuple[str, ...] = ("key", "value", "ff_out")
    init_weights: str = "ones"
    ff_out_side: str = "input"

    architecture: ClassVar[str] = "ia3"
    tuple_fields: ClassVar[tuple[str, ...]] = ("leave_out", "targets")

    def _find_problems(self) -> list[str]:
        problems = super()._find_problems()
        problems += check_roles("targets", self.targets)
        problems += check_choice("init_weights", self.init_weights, IA3_INITS)
        problems += check_choice("ff_out_side", self.ff_out_side, FF_OUT_SIDES)
        return problems
