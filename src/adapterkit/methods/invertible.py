"""Invertible adapters on the embedding output, as in MAD-X (Pfeiffer et al., 2020).

MAD-X applies ``forward`` to the output of the input embedding and ``inverse`` to the last hidden
states before the tied output embedding. This lets the adapter change the token representation of
a language while the two embeddings stay tied. Each block is a coupling layer that splits the
hidden vector into halves ``x1`` (first ``hidden_size / 2`` units) and ``x2`` (the rest) and changes
each half by a function of the other, which makes the block exactly invertible for any weights.
"""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

BLOCK_TYPES = ("nice", "glow")

GLOW_LOG_SCALE_LIMIT = 2.0
"""Bound on ``|log s|`` in a Glow block, so every scale ``s`` lies in ``(exp(-2), exp(2))``."""


class InvertibleAdapter(nn.Module):
    """An invertible coupling block on ``(batch, seq, hidden_size)`` hidden states.

    Both block types use two small MLPs ``f`` and ``g``, each a ``Linear(hidden_size / 2, width)``,
    the activation ``non_linearity`` and a ``Linear(width, out)``. ``width`` is
    ``max(1, floor(hidden_size / 2 / reduction_factor))``.

    * ``"nice"``, additive coupling as in NICE, ``out = hidden_size / 2``:
      ``y1 = x1 + f(x2)`` and ``y2 = x2 + g(y1)``.
    * ``"glow"``, affine coupling as in Glow, ``out = hidden_size``, read as a raw
      log-scale and a shift ``[a, t]``: ``y1 = x1 * s_f(x2) + t_f(x2)`` and
      ``y2 = x2 * s_g(y1) + t_g(y1)``, with ``s = exp(L * tanh(a / L))`` and
      ``L = GLOW_LOG_SCALE_LIMIT``. The soft clamp keeps every scale away from 0 and infinity, so
      the inverse divides by a bounded number.

    The last layer of ``f`` and ``g`` starts at zero, so a new adapter is the identity map and a
    model with it gives the same outputs as without it until training moves the weights.

    Args:
        hidden_size: Width of the hidden states, an even number of at least 2.
        block_type: ``"nice"`` or ``"glow"``.
        reduction_factor: Ratio of ``hidden_size / 2`` to the MLP width, a positive number.
        non_linearity: Activation between the two layers of each MLP: ``relu``, ``gelu``, ``swish``,
            ``silu`` or ``tanh``.

    Raises:
        ValueError: If an argument is outside the ranges above.
    """

    def __init__(self, hidden_size: int, block_type: str = "nice", reduction_factor: float = 2,
                 non_linearity: str = "relu"):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 2 or hidden_size % 2:
            raise ValueError(
                f"hidden_size={hidden_size!r} is invalid: expected an even integer of at least 2, because a coupling "
                "block splits the hidden vector into two equal halves")
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type={block_type!r} is invalid: expected one of {', '.join(BLOCK_TYPES)}")
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) \
                or not reduction_factor > 0:
            raise ValueError(f"reduction_factor={reduction_factor!r} is invalid: expected a positive number such as 2")
        if non_linearity not in _ACTIVATIONS:
            raise ValueError(f"non_linearity={non_linearity!r} is invalid: expected one of {', '.join(_ACTIVATIONS)}")

        self.hidden_size = hidden_size
        self.block_type = block_type
        half = hidden_size // 2
        self.width = max(1, int(half // reduction_factor))
        out = half if block_type == "nice" else hidden_size
        self.f = self._build_mlp(half, self.width, out, non_linearity)
        self.g = self._build_mlp(half, self.width, out, non_linearity)

    @staticmethod
    def _build_mlp(in_features: int, width: int, out_features: int, non_linearity: str) -> nn.Sequential:
        mlp = nn.Sequential(nn.Linear(in_features, width), _ACTIVATIONS[non_linearity](),
                            nn.Linear(width, out_features))
        nn.init.zeros_(mlp[2].weight)
        nn.init.zeros_(mlp[2].bias)
        return mlp

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, block_type={self.block_type!r}, width={self.width}"

    def _check_shape(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden states have shape {tuple(hidden_states.shape)}: expected (batch, seq, {self.hidden_size})")

    def _scale_and_shift(self, mlp: nn.Sequential, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the Glow scale ``s`` and shift ``t`` that ``mlp`` computes from ``condition``."""
        raw_log_scale, shift = mlp(condition).chunk(2, dim=-1)
        log_scale = GLOW_LOG_SCALE_LIMIT * torch.tanh(raw_log_scale / GLOW_LOG_SCALE_LIMIT)
        return torch.exp(log_scale), shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the coupling block.

        Args:
            x: ``(batch, seq, hidden_size)``; any leading dimensions work.

        Returns:
            ``(batch, seq, hidden_size)``, the same shape and dtype as ``x``.
        """
        self._check_shape(x)
        x1, x2 = x.chunk(2, dim=-1)
        if self.block_type == "nice":
            y1 = x1 + self.f(x2)
            y2 = x2 + self.g(y1)
        else:
            scale, shift = self._scale_and_shift(self.f, x2)
            y1 = x1 * scale + shift
            scale, shift = self._scale_and_shift(self.g, y1)
            y2 = x2 * scale + shift
        return torch.cat([y1, y2], dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo ``forward``: ``inverse(forward(x))`` equals ``x`` up to rounding.

        Args:
            y: ``(batch, seq, hidden_size)``; any leading dimensions work.

        Returns:
            ``(batch, seq, hidden_size)``, the same shape and dtype as ``y``.
        """
        self._check_shape(y)
        y1, y2 = y.chunk(2, dim=-1)
        if self.block_type == "nice":
            x2 = y2 - self.g(y1)
            x1 = y1 - self.f(x2)
        else:
            scale, shift = self._scale_and_shift(self.g, y1)
            x2 = (y2 - shift) / scale
            scale, shift = self._scale_and_shift(self.f, x2)
            x1 = (y1 - shift) / scale
        return torch.cat([x1, x2], dim=-1)
