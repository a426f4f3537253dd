"""Parameterised hypercomplex multiplication (PHM) layers, the building block of Compacter adapters.

A PHM layer is a linear map whose weight is a sum of Kronecker products (Karimi Mahabadi et al., 2021,
"Compacter: Efficient Low-Rank Hypercomplex Adapter Layers")::

    W = sum_{i=1..n} A_i kron B_i,    W: (in_features, out_features)

with ``n = phm_dim``, the "rule" matrices ``A_i: (n, n)`` and ``B_i: (in_features / n, out_features / n)``.
Compacter shares one set of rule matrices across all its layers and stores each ``B_i`` as a rank-``r``
product ``s_i t_i^T``.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

PHM_W_INIT_SCHEMES = ("glorot-uniform", "normal")


class PHMRule(nn.Module):
    """The ``n`` rule matrices ``A_i`` of PHM layers, often shared by many ``PHMLinear`` layers.

    Every entry starts from a normal distribution with mean 0 and std ``init_range``, and with
    ``factorized=True`` this holds for both factors.

    Args:
        phm_dim: The number ``n`` of rule matrices, also the size of each, an int >= 1.
        factorized: If True, store the rules as the product of ``rule_left`` (n, n, rank) and ``rule_right``
            (n, rank, n). If False, store ``rule`` (n, n, n) directly.
        rank: Inner size of the factorisation, an int >= 1. Used only with ``factorized=True``.
        init_range: Standard deviation of the initial entries, > 0.
        learn: If False, the parameters have ``requires_grad=False``. They stay in ``state_dict`` either way.

    Raises:
        ValueError: If ``phm_dim``, ``rank`` or ``init_range`` is out of range.
    """

    def __init__(self, phm_dim: int, factorized: bool = False, rank: int = 1, init_range: float = 0.0001,
                 learn: bool = True):
        super().__init__()
        _check_positive_int("phm_dim", phm_dim)
        _check_positive_int("rank", rank)
        _check_init_range(init_range)
        self.phm_dim = int(phm_dim)
        self.factorized = bool(factorized)
        self.rank = int(rank)
        self.init_range = float(init_range)

        n = self.phm_dim
        if self.factorized:
            self.rule_left = nn.Parameter(torch.empty(n, n, self.rank), requires_grad=learn)
            self.rule_right = nn.Parameter(torch.empty(n, self.rank, n), requires_grad=learn)
        else:
            self.rule = nn.Parameter(torch.empty(n, n, n), requires_grad=learn)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every rule entry, or every factor entry, from ``normal(0, init_range)``."""
        for parameter in self.parameters(recurse=False):
            nn.init.normal_(parameter, mean=0.0, std=self.init_range)

    def forward(self) -> torch.Tensor:
        """Return the rule matrices, ``(n, n, n)`` where ``[i]`` is ``A_i``."""
        if self.factorized:
            return torch.bmm(self.rule_left, self.rule_right)
        return self.rule

    def extra_repr(self) -> str:
        return f"phm_dim={self.phm_dim}, factorized={self.factorized}, rank={self.rank}"


class PHMLinear(nn.Module):
    """Linear map ``x W + b`` with the PHM weight ``W = sum_i A_i kron B_i`` of shape (in_features, out_features).

    Parameter count, with ``n = phm_dim`` and ``r = rank``, against ``in * out + out`` for ``nn.Linear``:

    - ``B``: ``r * (in + out)`` with ``factorized_W=True`` (``s``: (n, in/n, r), ``t``: (n, r, out/n)),
      or ``in * out / n`` with ``factorized_W=False`` (``weight_blocks``: (n, in/n, out/n)).
    - bias: ``out`` if ``bias=True``.
    - rule: ``n^3``, or ``2 * n^2 * r`` with ``factorized_rule=True``, only when the layer owns its rule. A
      shared rule is counted once, at the module that owns it.

    For example in = out = 64, n = 4, r = 1 with an owned unfactorised rule has 128 + 64 + 64 = 256
    parameters against 4160 for ``nn.Linear(64, 64)``.

    The layer keeps a shared rule in a plain list, so the rule is not in this layer's ``parameters()`` or
    ``state_dict()``. The caller must register the rule once on a common parent module, whose state dict
    then contains it exactly once. ``copy.deepcopy`` of that parent keeps the copied layers sharing the
    copied rule. A deepcopy of the layer alone gets a private copy of the rule.

    Args:
        in_features: Input width, divisible by ``phm_dim``.
        out_features: Output width, divisible by ``phm_dim``.
        phm_dim: Number ``n`` of Kronecker products in the sum, an int >= 1.
        rank: Rank ``r`` of each ``B_i`` with ``factorized_W=True``, and of an owned factorised rule.
        factorized_W: If True, store ``B_i = s_i t_i`` as ``weight_left`` (s) and ``weight_right`` (t).
            If False, store the ``B_i`` as ``weight_blocks``.
        shared_rule: A ``PHMRule`` with ``phm_dim`` rules to use, or None to own a new one as ``phm_rule``.
        factorized_rule: Whether an owned rule is factorised. Ignored with ``shared_rule``.
        init_range: Standard deviation of an owned rule's entries, and of ``B`` with ``w_init="normal"``.
        bias: If True, add the learned ``bias`` (out_features,), initialised to zeros.
        w_init: ``"glorot-uniform"`` (Xavier-uniform per ``s_i``, ``t_i`` or ``B_i`` matrix) or ``"normal"``
            (normal with mean 0 and std ``init_range``).

    Raises:
        ValueError: If a size does not divide by ``phm_dim``, an argument is out of range, or
            ``shared_rule`` has another ``phm_dim``.
    """

    def __init__(self, in_features: int, out_features: int, phm_dim: int, rank: int = 1,
                 factorized_W: bool = True, shared_rule: PHMRule | None = None, factorized_rule: bool = False,
                 init_range: float = 0.0001, bias: bool = True, w_init: str = "glorot-uniform"):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("phm_dim", phm_dim), ("rank", rank)):
            _check_positive_int(name, value)
        if in_features % phm_dim or out_features % phm_dim:
            raise ValueError(f"in_features={in_features} and out_features={out_features} must both be divisible "
                             f"by phm_dim={phm_dim}: choose a phm_dim that divides both")
        _check_init_range(init_range)
        if w_init not in PHM_W_INIT_SCHEMES:
            raise ValueError(f"w_init={w_init!r} is invalid: expected one of {', '.join(PHM_W_INIT_SCHEMES)}")
        if shared_rule is not None:
            if not isinstance(shared_rule, PHMRule):
                raise ValueError(f"shared_rule has type {type(shared_rule).__name__}: expected a PHMRule or None")
            if shared_rule.phm_dim != phm_dim:
                raise ValueError(f"shared_rule.phm_dim={shared_rule.phm_dim} differs from phm_dim={phm_dim}: "
                                 "build the rule with the layer's phm_dim")

        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.phm_dim = int(phm_dim)
        self.rank = int(rank)
        self.factorized_W = bool(factorized_W)
        self.init_range = float(init_range)
        self.w_init = w_init

        n = self.phm_dim
        in_block, out_block = self.in_features // n, self.out_features // n
        if self.factorized_W:
            self.weight_left = nn.Parameter(torch.empty(n, in_block, self.rank))
            self.weight_right = nn.Parameter(torch.empty(n, self.rank, out_block))
        else:
            self.weight_blocks = nn.Parameter(torch.empty(n, in_block, out_block))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

        # A list is not a Module, Parameter or buffer, so nn.Module does not register the shared rule here.
        self._shared_rule: list[PHMRule] = [shared_rule] if shared_rule is not None else []
        if shared_rule is None:
            self.phm_rule = PHMRule(n, factorized=factorized_rule, rank=self.rank, init_range=self.init_range)
        else:
            self.phm_rule = None
        self.reset_parameters()

    @property
    def rule(self) -> PHMRule:
        """The rule this layer uses: its own ``phm_rule`` or the shared one."""
        if self.phm_rule is not None:
            return self.phm_rule
        return self._shared_rule[0]

    @property
    def shares_rule(self) -> bool:
        """True if the rule comes from ``shared_rule`` and is not registered in this layer."""
        return self.phm_rule is None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise ``B`` by ``w_init`` and the bias to zeros. The rule keeps its values."""
        blocks = (self.weight_left, self.weight_right) if self.factorized_W else (self.weight_blocks,)
        for parameter in blocks:
            if self.w_init == "normal":
                nn.init.normal_(parameter, mean=0.0, std=self.init_range)
            else:
                for matrix in parameter:
                    nn.init.xavier_uniform_(matrix)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def block_matrices(self) -> torch.Tensor:
        """Return the matrices ``B_i``, ``(n, in_features / n, out_features / n)``."""
        if self.factorized_W:
            return torch.bmm(self.weight_left, self.weight_right)
        return self.weight_blocks

    def weight(self) -> torch.Tensor:
        """Compute ``W = sum_i A_i kron B_i``, ``(in_features, out_features)``."""
        rule = self.rule()
        blocks = self.block_matrices()
        n, in_block, out_block = blocks.shape
        # (A_i kron B_i)[a * in_block + p, b * out_block + q] = A_i[a, b] * B_i[p, q], so the sum over i
        # is one einsum whose axes (a, p, b, q) flatten row-major into the two Kronecker indices.
        products = torch.einsum("iab,ipq->apbq", rule.to(blocks.dtype), blocks)
        return products.reshape(n * in_block, n * out_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute ``x W + b``.

        Args:
            x: ``(..., in_features)``. The weight and bias are cast to ``x.dtype``.

        Returns:
            ``(..., out_features)``.
        """
        output = x @ self.weight().to(x.dtype)
        if self.bias is not None:
            output = output + self.bias.to(x.dtype)
        return output

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, phm_dim={self.phm_dim}, "
                f"rank={self.rank}, factorized_W={self.factorized_W}, shares_rule={self.shares_rule}, "
                f"bias={self.bias is not None}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")


def _check_init_range(init_range: object) -> None:
    if isinstance(init_range, bool) or not isinstance(init_range, numbers.Real) or not init_range > 0:
        raise ValueError(f"init_range={init_range!r} is invalid: expected a standard deviation > 0, "
                         "for example 0.0001")
