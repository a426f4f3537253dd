"""Prompt tuning: trained embeddings of virtual tokens, read by the model before every input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import MethodConfig, check_choice, is_int, register_config

PROMPT_INITS = ("random", "vocab")


@register_config
@dataclass(frozen=True)
class PromptTuningConfig(MethodConfig):
    """Prompt tuning (Lester et al., 2021): ``prompt_length`` trained vectors in the input embedding space.

    They are inserted before the token embeddings of every input sequence (after any left
    padding), so the model reads ``prompt_length`` virtual tokens before the real ones. In
    encoder-decoder models only the encoder input gets them. Per-token outputs, such as a causal
    LM's logits, keep the prompt's positions.

    Attributes:
        prompt_length: Number of virtual tokens.
        init: ``"random"``: normal(0, s), with s the standard deviation of the model's token
            embeddings. ``"vocab"``: the embeddings of tokens drawn uniformly from the vocabulary.
        leave_out: Must stay empty, because the prompt enters before the first block and no block
            has a module of its own.
    """

    prompt_length: int = 20
    init: str = "random"

    architecture: ClassVar[str] = "prompt_tuning"

    def _find_problems(self) -> list[str]:
        problems = super()._find_problems()
        if self.leave_out:
            problems.append(f"leave_out={self.leave_out!r}: prompt tuning adds no module to any block, so there "
                            "is no block to leave out. Use leave_out=()")
        if not is_int(self.prompt_length) or self.prompt_length < 1:
            problems.append(f"prompt_length={self.prompt_length!r}: expected an integer >= 1")
        problems += check_choice("init", self.init, PROMPT_INITS)
        return problems
