"""Prefix tuning: trained keys and values prepended to the keys and values of every attention layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import MethodConfig, check_bools, check_choice, check_probability, is_int, register_config

PREFIX_NON_LINEARITIES = ("tanh", "relu", "gelu", "swish", "silu")


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
            PEFT's. Needs a family whose description names its ``position_ids`` rule.
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

    architecture: ClassVar[str] = "prefix_tuning"

    def _find_problems(self) -> list[str]:
        problems = super()._find_problems()
        for name in ("prefix_length", "bottleneck_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.append(f"{name}={value!r}: expected an integer >= 1")
        problems += check_choice("non_linearity", self.non_linearity, PREFIX_NON_LINEARITIES)
        problems += check_probability("dropout", self.dropout)
        problems += check_bools(self, ("flat", "encoder_prefix", "cross_prefix", "use_gating", "shift_positions"))
        return problems
