"""Invertible adapters on the embedding output (MAD-X)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import MethodConfig, check_bools, check_choice, is_number, register_config

BLOCK_TYPES = ("nice", "glow")
INVERTIBLE_NON_LINEARITIES = ("relu", "gelu", "swish", "silu", "tanh")


@register_config
@dataclass(frozen=True)
class InvertibleConfig(MethodConfig):
    """An invertible adapter after the token and position embeddings (Pfeiffer et al., 2020).

    Its inverse runs on the final hidden states before a language-model head that shares its weights
    with the input embeddings, so input and output vocabularies stay aligned.

    Attributes:
        block_type: ``"nice"`` (additive coupling) or ``"glow"`` (affine coupling).
        reduction_factor: Width divisor of the coupling networks.
        non_linearity: Activation inside the coupling networks.
        invert_output: Run the inverse before a tied language-model head. False leaves the final
            hidden states alone, as the ``adapters`` library does on a transformers model class
            (``adapters.init``), whose own LM head skips the inverse.
    """

    block_type: str = "nice"
    reduction_factor: float = 2
    non_linearity: str = "relu"
    invert_output: bool = True

    architecture: ClassVar[str] = "invertible"

    def _find_problems(self) -> list[str]:
        problems = super()._find_problems()
        problems += check_choice("block_type", self.block_type, BLOCK_TYPES)
        if not is_number(self.reduction_factor) or self.reduction_factor <= 0:
            problems.append(f"reduction_factor={self.reduction_factor!r}: expected a number > 0")
        problems += check_choice("non_linearity", self.non_linearity, INVERTIBLE_NON_LINEARITIES)
        problems += check_bools(self, ("invert_output",))
        return problems
