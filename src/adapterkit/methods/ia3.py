"""The (IA)^3 module: a learned vector that rescales activations feature by feature."""

from __future__ import annotations

import numbers

import torch
from torch import nn

IA3_INIT_SCHEMES = ("ones", "bert")

# The backward pass sums the scale's gradient over chunks of about this many elements (or an eighth of
# the input where that is more), so it never keeps a third input-sized tensor (see ``_ScaleFeatures``).
_GRADIENT_CHUNK_ELEMENTS = 2**20


def scale_gradient(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return ``grad * x`` summed over every dimension but the last, without keeping the whole product.

    The rows are multiplied and summed a chunk at a time into a float32 accumulator, so the extra memory
    is one chunk instead of a tensor the size of ``x``, and half-precision inputs are summed in float32.
    Where the leading dimensions cannot be viewed as one (a transposed tensor, for one), the chunks run
    along the first dimension instead, so ``x`` is never copied.

    Args:
        grad: The gradient of ``x * scale``, ``(..., features)``.
        x: The tensor that was scaled, the same shape as ``grad``.

    Returns:
        ``(features,)`` in the dtype of ``x``.
    """
    features = x.shape[-1]
    try:
        x, grad = x.view(-1, features), grad.view(-1, features)
    except RuntimeError:
        if x.dim() == 1:
            x, grad = x[None], grad[None]
    rows = x.shape[0]
    row_elements = max(1, x[:1].numel())
    chunk_rows = max(1, _GRADIENT_CHUNK_ELEMENTS // row_elements, -(-rows // 8))
    leading = tuple(range(x.dim() - 1))
    total = torch.zeros(features, dtype=torch.float32, device=x.device)
    for start in range(0, rows, chunk_rows):
        product = grad[start:start + chunk_rows] * x[start:start + chunk_rows]
        total += product.sum(leading, dtype=torch.float32)
    return total.to(x.dtype)


class _ScaleFeatures(torch.autograd.Function):
    """``x * scale`` whose backward pass needs one input-sized tensor less at its peak than autograd's.

    For ``x * scale``, autograd's backward pass keeps the incoming gradient, ``grad * scale`` and
    ``grad * x`` alive at once, three tensors the size of ``x``, before it sums the last over the rows.
    On the input of the last layer's feed-forward output projection, that is the peak of the whole
    training step. Here the scale's gradient is summed a chunk at a time (``scale_gradient``) before
    ``grad * scale`` is made.
    """

    @staticmethod
    def forward(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * scale

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, scale = inputs
        x_needs_grad, scale_needs_grad = ctx.needs_input_grad
        # Save only what the requested gradients read: x for the scale's, the scale for x's.
        ctx.save_for_backward(x if scale_needs_grad else None, scale if x_needs_grad else None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, scale = ctx.saved_tensors
        x_needs_grad, scale_needs_grad = ctx.needs_input_grad
        scale_grad = scale_gradient(grad, x) if scale_needs_grad else None
        x_grad = grad * scale if x_needs_grad else None
        return x_grad, scale_grad


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
        scale = self.scale.to(x.dtype)
        if torch.is_grad_enabled() and scale.requires_grad and x.dim() >= 1 and x.shape[-1] == self.features:
            return _ScaleFeatures.apply(x, scale)
        return x * scale

    def extra_repr(self) -> str:
        return f"features={self.features}"
