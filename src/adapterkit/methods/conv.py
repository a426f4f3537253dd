"""A 1-D convolution over the sequence dimension, used as the down or up projection of a bottleneck adapter."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SequenceConv(nn.Module):
    """A 1-D convolution over the sequence dimension of ``(batch, seq, features)`` hidden states.

    With ``kernel_size == 1`` it computes the same function as ``nn.Linear(in_features, out_features)``
    with ``weight[:, :, 0]`` as the matrix. With a larger kernel each output position also reads its
    neighbours along the sequence:

    * ``causal=False`` (encoders) pads ``kernel_size // 2`` zeros on both sides, so output ``t`` reads
      inputs ``t - kernel_size // 2`` to ``t + kernel_size // 2``. The kernel size must be odd.
    * ``causal=True`` (decoders) pads ``kernel_size - 1`` zeros on the left only, so output ``t`` reads
      inputs ``t - kernel_size + 1`` to ``t`` and never a later position.

    Args:
        in_features: Width of the input hidden states.
        out_features: Width of the output hidden states.
        kernel_size: Number of sequence positions each output reads, at least 1.
        causal: Whether the convolution may read only the current and earlier positions.
        bias: Whether to add a learned bias of shape ``(out_features,)``.

    Attributes:
        weight: Kernel in the ``nn.Conv1d`` layout, ``(out_features, in_features, kernel_size)``.
            ``weight[:, :, -1]`` multiplies the current position when ``causal=True``, and
            ``weight[:, :, kernel_size // 2]`` does when ``causal=False``.
        bias: ``(out_features,)``, or ``None`` when ``bias=False``.

    Raises:
        ValueError: If a size is not a positive integer, or if ``causal=False`` and ``kernel_size`` is even.
    """

    STATE_KEY = "previous_inputs"
    """Key under which ``forward`` stores the last ``kernel_size - 1`` inputs in a ``state`` dict."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, causal: bool, bias: bool = True):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
        if not causal and kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size={kernel_size} is even, but a centred (causal=False) convolution needs an odd "
                f"kernel size to pad both sides equally: use kernel_size={kernel_size + 1} or {kernel_size - 1}, "
                "or causal=True")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.causal = bool(causal)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise ``weight`` and ``bias`` as ``nn.Conv1d`` and ``nn.Linear`` do, with fan-in ``in * kernel``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features * self.kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, kernel_size={self.kernel_size}, causal={self.causal}, "
                f"bias={self.bias is not None}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Convolve ``x`` along the sequence dimension.

        Masking: positions where ``mask`` is False are set to zero before the convolution, the same
        value as the convolution's own zero padding. A row padded at either end therefore gives, at
        its real positions, the same outputs as the row alone without padding. Outputs at the padded
        positions are not meaningful. Padding in the middle of a row does change its neighbours.

        Incremental decoding (``causal=True`` only): pass one ``state`` dict per module and per
        generation, starting empty, and feed only the new positions in each call. Before convolving,
        the module prepends the last ``kernel_size - 1`` inputs of earlier calls (zeros on the first
        call) in place of the left zero padding. Afterwards it stores the last ``kernel_size - 1``
        inputs of the concatenation, masked and detached from autograd, under ``STATE_KEY`` as a
        ``(batch, in_features, kernel_size - 1)`` tensor in the dtype of ``x``. Running
        a sequence in one call or in pieces of any length then gives the same outputs. Call
        ``reorder_state`` when beam search reorders the batch.

        Args:
            x: ``(batch, seq, in_features)``.
            mask: Optional ``(batch, seq)`` tensor, bool or integer, True or 1 for real tokens and False
                or 0 for padding. With ``state``, it covers only the new positions in ``x``.
            state: Optional dict that this method reads and updates in place, for ``causal=True`` only.

        Returns:
            ``(batch, seq, out_features)`` in the dtype of ``x``.

        Raises:
            ValueError: If ``x``, ``mask`` or the stored state has the wrong shape, ``mask`` is a
                floating-point tensor, or ``state`` is given with ``causal=False``.
        """
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (batch, seq, {self.in_features})")
        if mask is not None:
            x = self._apply_mask(x, mask)

        # conv1d expects (batch, channels, seq).
        inputs = x.transpose(1, 2)
        if self.causal:
            if state is None:
                inputs = F.pad(inputs, (self.kernel_size - 1, 0))
            else:
                inputs = torch.cat([self._previous_inputs(state, x), inputs], dim=2)
                state[self.STATE_KEY] = inputs[:, :, inputs.shape[2] - (self.kernel_size - 1):].detach()
            padding = 0
        else:
            if state is not None:
                raise ValueError(
                    "state was given, but a centred (causal=False) convolution reads later positions and "
                    "cannot run incrementally: pass state=None, or build the module with causal=True")
            padding = self.kernel_size // 2
        weight = self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv1d(inputs, weight, bias, padding=padding).transpose(1, 2)

    @staticmethod
    def _apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}: expected (batch, seq) = {tuple(x.shape[:2])}")
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(
                f"mask has dtype {mask.dtype}: expected bool or integer (True or 1 for real tokens), "
                "not an additive attention mask")
        # torch.where and not a multiplication, so NaN or inf at padded positions cannot leak through.
        keep = mask.to(device=x.device, dtype=torch.bool).unsqueeze(-1)
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def _previous_inputs(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Return the stored last inputs, ``(batch, in_features, kernel_size - 1)``, zeros if none."""
        expected = (x.shape[0], self.in_features, self.kernel_size - 1)
        previous = state.get(self.STATE_KEY)
        if previous is None:
            return x.new_zeros(expected)
        if tuple(previous.shape) != expected:
            raise ValueError(
                f"state[{self.STATE_KEY!r}] has shape {tuple(previous.shape)}, expected {expected}: pass a new "
                "dict for each module and each generation, and call reorder_state when the batch changes")
        return previous.to(device=x.device, dtype=x.dtype)

    def reorder_state(self, state: dict[str, torch.Tensor], beam_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Select batch rows of the stored inputs in place, as beam search reorders its hypotheses.

        Args:
            state: A dict that ``forward`` has used as ``state``. An empty dict is left empty.
            beam_index: ``(new_batch,)`` integer tensor; new row ``i`` takes old row ``beam_index[i]``.

        Returns:
            ``state`` itself.
        """
        previous = state.get(self.STATE_KEY)
        if previous is not None:
            state[self.STATE_KEY] = previous.index_select(0, beam_index.to(previous.device))
        return state
