"""The (IA)^3 module: a learned vector that rescales activations feature by feature."""

from __future__ import annotations

import numbers

import torch
from torch import nn

IA3_INIT_SCHEMES = ("ones", "bert")


class IA3(nn.Module):
    """Learned per-feature scale of (IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
    Better and Cheaper than In-Context Learning").

    The module only multiplies its input by ``scale``. The caller decides where it sits: on a layer's output
    (the key and value projections) or on a layer's input (the input of the feed-forward output projection,
    after the activation). A scale on a layer's input equals scaling the columns of that layer's weight.

    Args:
        features: Width of the last dimension of the tensors it scales.
        init_weights: ``"ones"`` (identity at the start) or ``"bert"`` (normal with mean 1.0 and std 0.02,
            so the module is not the identity at the start).

    Raises:
        ValueError: If ``features`` is not an int >= 1 or ``init_weights`` is unknown.
    """

    def __init__(self, features: int, init_weights: str = "ones"):
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, numbers.Integral) or features < 1:
            raise ValueError(f"features={features!r} is invalid: expected an int >= 1")
        if init_weights not in IA3_INIT_SCHEMES:
            raise ValueError(f"init_weights={init_weights!r} is invalid: expected one of {', '.join(IA3_INIT_SCHEMES)}")
        self.features = int(features)
        self.scale = nn.Parameter(torch.empty(self.features))
        self.reset_parameters(init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: str = "ones") -> None:
        """Initialise ``scale`` by the scheme ``init_weights`` names (see the class docstring)."""
        if init_weights == "ones":
            nn.init.ones_(self.scale)
        elif init_weights == "bert":
            nn.init.normal_(self.scale, mean=1.0, std=0.02)
        else:
            raise ValueError(f"init_weights={init_weights!r} is invalid: expected one of {', '.join(IA3_INIT_SCHEMES)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute ``x * scale``.

        Args:
            x: ``(..., features)``. ``scale`` is cast to ``x.dtype``.

        Returns:
            ``(..., features)``, in the dtype of ``x``.
        """
        return x * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"features={self.features}"
