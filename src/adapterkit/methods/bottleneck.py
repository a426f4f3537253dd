"""The bottleneck adapter module: a down projection, a non-linearity and an up projection."""

from __future__ import annotations

import torch
from torch import nn

from ..config import BottleneckConfig
from .conv import SequenceConv
from .phm import PHMLinear, PHMRule

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


def _projection(in_features: int, out_features: int, config: BottleneckConfig, causal: bool,
                shared_rule: PHMRule | None) -> nn.Module:
    if config.projection == "conv":
        return SequenceConv(in_features, out_features, config.kernel_size, causal=causal)
    if config.phm_layer:
        return PHMLinear(in_features, out_features, config.phm_dim, rank=config.phm_rank,
                         factorized_W=config.factorized_phm_W, shared_rule=shared_rule,
                         factorized_rule=config.factorized_phm_rule, init_range=config.phm_init_range,
                         bias=config.phm_bias, w_init=config.hypercomplex_nonlinearity)
    return nn.Linear(in_features, out_features)


def up_projection_added(residual: torch.Tensor, branch: torch.Tensor, up: nn.Linear | PHMLinear,
                        scaling: float) -> torch.Tensor:
    """Return ``residual + scaling * (branch W_up + b_up)`` as one matrix product.

    ``addmm`` adds the residual while it writes the product, so neither the scaling nor the residual
    takes a pass over the ``(batch, seq_len, hidden)`` output, forward or backward. In a narrow
    bottleneck the bias rides along as one more input column of ones, which saves the bias's passes
    too, forward and backward. The product keeps that widened copy of the activations for its
    backward, next to the activations that ReLU keeps for its own, so a wide bottleneck (more than an
    eighth of ``hidden``) adds its bias in place instead, and keeps no copy.

    Args:
        residual: ``(..., hidden)``, what the adapter output is added to.
        branch: ``(..., width)``, the adapter's activations.
        up: The up projection: ``nn.Linear`` or ``PHMLinear``.
        scaling: Factor on the up projection's output.
    """
    # Both layers' weights as (width, hidden): nn.Linear keeps (hidden, width), PHMLinear (width, hidden).
    weight = up.weight.t() if isinstance(up, nn.Linear) else up.weight()
    rows = branch.reshape(-1, branch.shape[-1])
    residual_rows = residual.reshape(-1, residual.shape[-1])
    if up.bias is None:
        output = torch.addmm(residual_rows, rows, weight, alpha=scaling)
    elif (rows.shape[1] + 1) * 8 <= weight.shape[1]:
        if torch.is_grad_enabled():
            output = _OnesColumnProduct.apply(residual_rows, rows, weight, up.bias, scaling)
        else:
            output = _ones_column_product(residual_rows, rows, weight, up.bias, scaling)[0]
    else:
        # addmm does not keep its output for the backward, so the bias may be added to it in place.
        output = torch.addmm(residual_rows, rows, weight, alpha=scaling).add_(up.bias, alpha=scaling)
    return output.view(residual.shape)


def _ones_column_product(residual: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``residual + scaling * ([rows, 1] @ [weight; bias])`` and the widened rows ``[rows, 1]``."""
    widened = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    output = torch.addmm(residual, widened, torch.cat([weight, bias.unsqueeze(0)], dim=0), alpha=scaling)
    return output, widened


class _OnesColumnProduct(torch.autograd.Function):
    """Autograd function for the ones-column product of ``up_projection_added``.

    Autograd's ``addmm`` would keep the weight with the bias row appended, a copy as large as the
    weight, for every adapter until the backward pass. This function keeps the weight it was given
    instead: the parameter itself, or the PHM product that autograd keeps anyway.
    """

    @staticmethod
    def forward(ctx, residual: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                scaling: float) -> torch.Tensor:
        output, widened = _ones_column_product(residual, rows, weight, bias, scaling)
        ctx.save_for_backward(widened, weight)
        ctx.scaling = scaling
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        widened, weight = ctx.saved_tensors
        grad_residual = grad if ctx.needs_input_grad[0] else None
        grad_rows = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_rows = torch.mm(grad, weight.t()).mul_(ctx.scaling)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # One product gives the weight's gradient and, in its last row, the bias's.
            weight_and_bias = torch.mm(widened.t(), grad).mul_(ctx.scaling)
            grad_weight, grad_bias = weight_and_bias[:-1], weight_and_bias[-1]
        return grad_residual, grad_rows, grad_weight, grad_bias, None


class Bottleneck(nn.Module):
    """One bottleneck adapter at one place in the model.

    The caller decides what the adapter reads and what its output is added to: in series both are
    the sublayer output, in parallel it reads the sublayer input and adds to the sublayer output.

    Args:
        hidden_size: Width of the hidden states the adapter reads and writes.
        config: The adapter configuration.
        causal: Whether convolutional projections may only look at earlier positions (decoders).
        shared_rule: The PHM rule matrices shared by all PHM layers of the adapter, if any.
    """

    def __init__(self, hidden_size: int, config: BottleneckConfig, causal: bool = False,
                 shared_rule: PHMRule | None = None):
        super().__init__()
        width = config.bottleneck_width(hidden_size)
        self.is_conv = config.projection == "conv"
        self.norm_before = nn.LayerNorm(hidden_size) if config.ln_before else None
        self.down_proj = _projection(hidden_size, width, config, causal, shared_rule)
        self.non_linearity = _ACTIVATIONS[config.non_linearity]()
        self.up_proj = _projection(width, hidden_size, config, causal, shared_rule)
        self.dropout = nn.Dropout(config.dropout)
        self.norm_after = nn.LayerNorm(hidden_size) if config.ln_after else None
        self.gate = nn.Linear(hidden_size, 1) if config.use_gating else None

        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden_size))
        else:
            self.scaling = float(config.scaling)
        if not config.phm_layer:
            self.reset_parameters(config.init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: str) -> None:
        """Initialise both projections by the scheme ``init_weights`` names (see ``BottleneckConfig``).

        PHM projections keep the initialisation their own config fields choose.
        """
        down, up = self.down_proj.weight, self.up_proj.weight
        if init_weights == "bert":
            nn.init.normal_(down, std=0.02)
            nn.init.normal_(up, std=0.02)
        elif init_weights in ("houlsby", "near_identity"):
            nn.init.trunc_normal_(down, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.trunc_normal_(up, std=1e-2, a=-2e-2, b=2e-2)
            if init_weights == "near_identity":
                up.mul_(1e-3)
        elif init_weights == "zero_up":
            nn.init.kaiming_uniform_(down, a=5**0.5)
            nn.init.zeros_(up)
        else:
            raise ValueError(f"init_weights={init_weights!r}: expected one of bert, houlsby, near_identity, zero_up")
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.bias)

    def _project(self, projection: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                 state: dict | None, name: str) -> torch.Tensor:
        if not self.is_conv:
            return projection(hidden)
        # Each convolution keeps its own past inputs, under its own key of the site's state.
        return projection(hidden, mask=mask, state=None if state is None else state.setdefault(name, {}))

    def _adds_in_up_projection(self, branch: torch.Tensor, residual: torch.Tensor) -> bool:
        """Return whether ``up_projection_added`` can compute this adapter's output.

        That function needs a plain number as scaling, no output dropout, norm or gate, and one dtype throughout.
        Autocast is excluded because it would turn the residual stream into the lower precision. The
        up projection's forward is not called, so no hook or replaced forward may watch it.
        """
        up = self.up_proj
        if self.is_conv or self.norm_after is not None or self.gate is not None:
            return False
        if not isinstance(self.scaling, float):
            return False
        if self.training and self.dropout.p > 0:
            return False
        if torch.is_autocast_enabled(branch.device.type):
            return False
        if branch.dtype != residual.dtype or residual.shape[:-1] != branch.shape[:-1]:
            return False
        if up._forward_hooks or up._forward_pre_hooks or "forward" in up.__dict__:
            return False
        if not isinstance(up, (nn.Linear, PHMLinear)):
            return False
        return all(parameter.dtype == branch.dtype for parameter in up.parameters())

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor, mask: torch.Tensor | None = None,
                state: dict | None = None) -> torch.Tensor:
        """Compute ``residual + norm_after(scaling * W_up f(W_down x + b_down) + b_up)``.

        Args:
            hidden_states: Adapter input ``x``, ``(batch, seq_len, hidden_size)``.
            residual: Tensor the adapter output is added to, ``(batch, seq_len, hidden_size)``.
            mask: ``(batch, seq_len)`` bool, True for real tokens; convolutions zero the others.
            state: Past inputs of the convolutions between generation steps, or None.

        Returns:
            ``(batch, seq_len, hidden_size)``.
        """
        if self.norm_before is not None:
            hidden_states = self.norm_before(hidden_states)
        branch = self._project(self.down_proj, hidden_states, mask, state, "down")
        branch = self.non_linearity(branch)
        if self._adds_in_up_projection(branch, residual):
            return up_projection_added(residual, branch, self.up_proj, self.scaling)
        branch = self._project(self.up_proj, branch, mask, state, "up")
        if not (isinstance(self.scaling, float) and self.scaling == 1.0):
            branch = branch * self.scaling
        branch = self.dropout(branch)
        if self.norm_after is not None:
            branch = self.norm_after(branch)
        if self.gate is not None:
            # UniPELT averages this gate over the sequence. A gate per position keeps padded batches,
            # cached decoding and causal models exact.
            branch = branch * torch.sigmoid(self.gate(hidden_states))
        return residual + branch
