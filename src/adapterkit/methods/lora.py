"""The LoRA module: a trainable low-rank update ``scaling * B A`` to a frozen linear layer."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn import functional as F

LORA_INIT_SCHEMES = ("lora", "gaussian", "bert")


class LoRA(nn.Module):
    """Low-rank update of one frozen linear layer (Hu et al., 2021, "LoRA"), with optional UniPELT gate.

    The module computes only the update ``delta = scaling * dropout(x) A^T B^T``. The caller adds it to
    the output of the frozen layer, or merges ``delta_weight()`` into that layer's weight.

    The ``adapters`` library stores ``lora_A`` (r, in_features) and ``lora_B`` (out_features, r) under the
    same names and shapes, and PEFT's ``lora_A.weight`` and ``lora_B.weight`` have these shapes too, so
    converting between them needs no transpose.

    NOTE: with ``use_gating=True`` the ``adapters`` library multiplies the update by the gate in place of
    ``scaling``, but this module applies both, so a gated checkpoint converted from there must set
    ``alpha = r`` to give the same output.

    Args:
        in_features: Input width of the wrapped linear layer.
        out_features: Output width of the wrapped linear layer.
        r: Rank of the update, an int >= 1.
        alpha: Scale numerator, > 0. The update is multiplied by ``scaling = alpha / r``.
        dropout: Dropout probability applied to the input of ``lora_A``, in ``[0, 1)``.
        init_weights: ``"lora"`` (A Kaiming-uniform, B zeros), ``"gaussian"`` (A normal with std ``1/r``,
            B zeros) or ``"bert"`` (A and B normal with std 0.02, so the update is not zero at the start).
        use_gating: If True, add the UniPELT gate ``gate = nn.Linear(in_features, 1)``, whose weight starts
            normal with std 0.02. The update at each position is then also multiplied by
            ``sigmoid(gate(x))`` of that position. UniPELT averages the gate over the sequence instead, but a
            per-position gate keeps padded batches, cached decoding and causal models exact.

    Raises:
        ValueError: If an argument is out of the range given above.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 init_weights: str = "lora", use_gating: bool = False):
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        _check_positive_int("r", r)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
            raise ValueError(f"alpha={alpha!r} is invalid: expected a number > 0, for example 8 or 16")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r} is invalid: expected a probability in [0, 1), for example 0.1")
        if init_weights not in LORA_INIT_SCHEMES:
            raise ValueError(f"init_weights={init_weights!r} is invalid: expected one of {', '.join(LORA_INIT_SCHEMES)}")

        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        self.use_gating = bool(use_gating)

        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Linear(in_features, 1) if self.use_gating else None
        self.reset_parameters(init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: str = "lora") -> None:
        """Initialise ``lora_A`` and ``lora_B`` by the scheme ``init_weights`` names (see the class docstring).

        The gate weight, if any, is drawn from ``normal(0, 0.02)`` and its bias keeps the ``nn.Linear`` default.
        """
        if init_weights == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif init_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        elif init_weights == "bert":
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        else:
            raise ValueError(f"init_weights={init_weights!r} is invalid: expected one of {', '.join(LORA_INIT_SCHEMES)}")
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the update ``scaling * dropout(x) A^T B^T``, times the gate if ``use_gating``.

        The parameters are cast to ``x.dtype``, so the result has the dtype of ``x``.

        Args:
            x: Input of the wrapped layer, ``(batch, seq_len, in_features)`` or ``(batch, in_features)``.
                Without gating any shape ``(..., in_features)`` works.

        Returns:
            The update to add to the wrapped layer's output, ``(..., out_features)``.
        """
        lora_A = self.lora_A.to(x.dtype)
        lora_B = self.lora_B.to(x.dtype)
        delta = F.linear(F.linear(self.dropout(x), lora_A), lora_B) * self.scaling
        if self.gate is not None:
            delta = delta * self.gate_values(x)
        return delta

    def add_to(self, output: torch.Tensor, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Compute ``output + forward(x)``, with the scaling and the sum inside one matrix product where possible.

        Args:
            output: The wrapped layer's output, ``(..., out_features)``.
            x: The wrapped layer's input, ``(..., in_features)``.
            inplace: Add into ``output`` itself. Only for a fresh output that nothing else reads,
                outside autograd.

        Returns:
            ``output`` itself when ``inplace`` applies, otherwise a new tensor shaped like ``output``.
        """
        if self.gate is not None or output.dtype != x.dtype or not output.is_contiguous():
            return output + self(x)
        hidden = F.linear(self.dropout(x), self.lora_A.to(x.dtype)).reshape(-1, self.r)
        flat = output.reshape(-1, self.out_features)
        lora_B = self.lora_B.to(x.dtype).T
        if inplace:
            flat.addmm_(hidden, lora_B, alpha=self.scaling)
            return output
        return torch.addmm(flat, hidden, lora_B, alpha=self.scaling).view(output.shape)

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the UniPELT gate ``sigmoid(gate(x))`` of every position, in ``(0, 1)``.

        Args:
            x: ``(batch, seq_len, in_features)``, or ``(batch, in_features)``.

        Returns:
            ``(batch, seq_len, 1)`` or ``(batch, 1)``, so it broadcasts over the update.

        Raises:
            ValueError: If the module has no gate or ``x`` is not 2-D or 3-D.
        """
        if self.gate is None:
            raise ValueError("gate_values needs a gate: build the LoRA module with use_gating=True")
        if x.dim() not in (2, 3):
            raise ValueError(f"the gated LoRA input has shape {tuple(x.shape)}: expected (batch, seq_len, "
                             f"{self.in_features}) or (batch, {self.in_features})")
        return torch.sigmoid(F.linear(x, self.gate.weight.to(x.dtype), self.gate.bias.to(x.dtype)))

    def delta_weight(self) -> torch.Tensor:
        """Compute ``scaling * B A``, the update to add to the wrapped layer's weight when merging.

        The gate depends on the input and is not part of this matrix, so merge a module only if
        ``use_gating`` is False.

        Returns:
            ``(out_features, in_features)``, in the dtype of the parameters.
        """
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, use_gating={self.use_gating}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
