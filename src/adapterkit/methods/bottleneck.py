"""The bottleneck adapter module: a down projection, a non-linearity and an up projection."""

from __future__ import annotations

import torch
from torch import nn

from ..config import BottleneckConfig

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leakyrelu": nn.LeakyReLU,
    "identity": nn.Identity,
}


class Bottleneck(nn.Module):
    """One bottleneck adapter at one place in the model.

    The caller decides what the adapter reads and what its output is added to: in series both are
    the sublayer output, in parallel it reads the sublayer input and adds to the sublayer output.

    Args:
        hidden_size: Width of the hidden states the adapter reads and writes.
        config: The adapter configuration.
    """

    def __init__(self, hidden_size: int, config: BottleneckConfig):
        super().__init__()
        width = config.bottleneck_width(hidden_size)
        self.norm_before = nn.LayerNorm(hidden_size) if config.ln_before else None
        self.down_proj = nn.Linear(hidden_size, width)
        self.non_linearity = _ACTIVATIONS[config.non_linearity]()
        self.up_proj = nn.Linear(width, hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.norm_after = nn.LayerNorm(hidden_size) if config.ln_after else None

        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden_size))
        else:
            self.scaling = float(config.scaling)
        self.reset_parameters(config.init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: str) -> None:
        """Initialise both projections by the scheme ``init_weights`` names (see ``BottleneckConfig``)."""
        if init_weights == "bert":
            nn.init.normal_(self.down_proj.weight, std=0.02)
            nn.init.normal_(self.up_proj.weight, std=0.02)
        elif init_weights in ("houlsby", "near_identity"):
            nn.init.trunc_normal_(self.down_proj.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.trunc_normal_(self.up_proj.weight, std=1e-2, a=-2e-2, b=2e-2)
            if init_weights == "near_identity":
                self.up_proj.weight.mul_(1e-3)
        elif init_weights == "zero_up":
            nn.init.kaiming_uniform_(self.down_proj.weight, a=5**0.5)
            nn.init.zeros_(self.up_proj.weight)
        else:
            raise ValueError(f"init_weights={init_weights!r}: expected one of bert, houlsby, near_identity, zero_up")
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Compute ``residual + norm_after(scaling * W_up f(W_down x + b_down) + b_up)``.

        Args:
            hidden_states: Adapter input ``x``, ``(batch, seq_len, hidden_size)``.
            residual: Tensor the adapter output is added to, ``(batch, seq_len, hidden_size)``.

        Returns:
            ``(batch, seq_len, hidden_size)``.
        """
        if self.norm_before is not None:
            hidden_states = self.norm_before(hidden_states)
        branch = self.up_proj(self.non_linearity(self.down_proj(hidden_states)))
        branch = self.dropout(branch * self.scaling)
        if self.norm_after is not None:
            branch = self.norm_after(branch)
        return residual + branch
