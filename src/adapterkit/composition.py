"""Composition blocks: how several adapters combine in one forward.

``model.set_active_adapters(block)`` takes a block built from adapter names and these classes:

- ``Stack(a, b)``: ``a`` then ``b`` at every site, in order. A plain list of names is a ``Stack``.
- ``Average(a, b, weights=None)``: every child runs on the same input, and the site output is the
  weighted average of the children's outputs. The weights are normalised to sum to 1 (equal by
  default), so the base output of a LoRA or (IA)^3 projection keeps its scale.
- ``BatchSplit(a, b, batch_sizes=[2, 3])``: the first 2 rows of the batch go through ``a``, the
  next 3 through ``b``. The sizes must add up to the batch size.
- ``Parallel(a, b)``: the model input is repeated once per child, before the first block, and
  branch ``k`` runs on the ``k``-th copy. The outputs come back stacked along the batch dimension:
  rows ``k * batch : (k + 1) * batch`` are branch ``k``'s, and each branch uses the head of its
  last adapter. A ``BatchSplit`` on top does the same with its row groups.
- ``Fuse`` and ``Split`` validate their nesting but raise ``NotImplementedError`` when activated,
  because AdapterFusion and Split are not implemented yet.

``compile_site`` turns a block into the ``SitePlan`` that one site runs, and ``run_plan`` runs it
on a tensor through a site-specific function that applies a list of ``(config, module)`` pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The (config, module) pairs of one adapter, or of a stack of adapters, at one site.
Pairs = list[tuple[Any, Any]]
# Applies ``pairs`` to ``hidden``, the rows ``rows`` of the site's batch (``None`` for every row).
ApplyPairs = Callable[[Pairs, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class Block:
    """A composition of adapters. Each subclass defines how its children combine.

    Args:
        *children: Adapter names or other blocks.
    """

    def __init__(self, *children: str | Block):
        if not children:
            raise ValueError(f"{type(self).__name__} needs at least one child: an adapter name or a block")
        self.children = tuple(children)

    def __repr__(self) -> str:
        inner = ", ".join(repr(child) for child in self.children)
        return f"{type(self).__name__}({inner}{self._extra_repr()})"

    def _extra_repr(self) -> str:
        return ""

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


class Stack(Block):
    """Run the children one after another at every site."""


class Average(Block):
    """Run every child on the same input and return the weighted average of their outputs.

    Args:
        *children: Adapter names or blocks.
        weights: One non-negative weight per child, normalised to sum to 1; equal when ``None``.
    """

    def __init__(self, *children: str | Block, weights: Sequence[float] | None = None):
        super().__init__(*children)
        if weights is None:
            weights = [1.0] * len(self.children)
        weights = [float(w) for w in weights]
        if len(weights) != len(self.children):
            raise ValueError(f"Average got {len(weights)} weights {weights} for {len(self.children)} children; "
                             "pass one weight per child")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"Average weights {weights} must be non-negative with a positive sum")
        total = sum(weights)
        self.weights = [w / total for w in weights]

    def _extra_repr(self) -> str:
        return f", weights={self.weights}"


class BatchSplit(Block):
    """Send consecutive groups of batch rows through different children.

    Args:
        *children: Adapter names or blocks.
        batch_sizes: The number of rows for each child, in order; they must add up to the batch size.
    """

    def __init__(self, *children: str | Block, batch_sizes: Sequence[int]):
        super().__init__(*children)
        sizes = [int(size) for size in batch_sizes]
        if len(sizes) != len(self.children):
            raise ValueError(f"BatchSplit got batch_sizes={sizes} for {len(self.children)} children; "
                             "pass one size per child")
        if any(size < 0 for size in sizes):
            raise ValueError(f"BatchSplit batch_sizes={sizes} must not be negative")
        self.batch_sizes = sizes

    def _extra_repr(self) -> str:
        return f", batch_sizes={self.batch_sizes}"


class Parallel(Block):
    """Run each child on its own copy of the input; outputs come back stacked along the batch."""


class Fuse(Block):
    """AdapterFusion over the children. Not implemented yet: activating it raises ``NotImplementedError``."""


class Split(Block):
    """Split the hidden dimension between the children. Not implemented yet: activating it raises.

    Args:
        *children: Adapter names or blocks.
        splits: The hidden size of each child's part, or one size for the first child.
    """

    def __init__(self, *children: str | Block, splits: int | Sequence[int] | None = None):
        super().__init__(*children)
        self.splits = splits

    def _extra_repr(self) -> str:
        return f", splits={self.splits}"


# The child types that each block may contain. ``str`` is an adapter name.
ALLOWED: dict[type, tuple[type, ...]] = {
    Stack: (str, Fuse, Split, Parallel, BatchSplit, Average),
    Fuse: (str, Stack),
    Split: (str, Split, Stack, BatchSplit, Average),
    Parallel: (str, Stack, BatchSplit, Average),
    BatchSplit: (str, Stack, Split, BatchSplit, Average),
    Average: (str, Stack, Split, BatchSplit),
}
NOT_IMPLEMENTED = (Fuse, Split)


def as_block(names: str | Block | Iterable[str | Block] | None) -> Block | None:
    """Return ``names`` as a block: a name or a list becomes a ``Stack``, ``None`` or ``[]`` stays ``None``."""
    if names is None:
        return None
    if isinstance(names, Block):
        return names
    if isinstance(names, str):
        return Stack(names)
    children = list(names)
    return Stack(*children) if children else None


def leaf_names(block: str | Block) -> list[str]:
    """Return the adapter names in ``block``, depth first, in order, with repeats."""
    if isinstance(block, str):
        return [block]
    return [name for child in block.children for name in leaf_names(child)]


def is_plain_stack(block: Block) -> bool:
    """Return whether ``block`` is a ``Stack`` of adapter names only, which runs exactly as a list of names."""
    return type(block) is Stack and all(isinstance(child, str) for child in block.children)


def validate(block: str | Block, known_names: Iterable[str]) -> None:
    """Raise if ``block`` nests blocks in a way ``ALLOWED`` forbids or names unknown adapters.

    Raises:
        ValueError: Naming the outer and inner block of a forbidden nesting, every unknown adapter
            name, or a block with more than one ``Parallel``.
        NotImplementedError: If the block contains ``Fuse`` or ``Split``.
    """
    _check_nesting(block)
    known = set(known_names)
    unknown = sorted({name for name in leaf_names(block) if name not in known})
    if unknown:
        raise ValueError(f"No adapter named {', '.join(map(repr, unknown))} on this model, in {block!r}; "
                         f"adapters: {', '.join(sorted(known)) or 'none'}")
    parallels = list(_find(block, Parallel))
    if len(parallels) > 1:
        raise ValueError(f"{block!r} contains {len(parallels)} Parallel blocks; use at most one, because each "
                         "repeats the whole input")
    unsupported = [type(b).__name__ for b in _find(block, NOT_IMPLEMENTED)]
    if unsupported:
        raise NotImplementedError(f"{', '.join(sorted(set(unsupported)))} in {block!r} cannot run yet: "
                                  "AdapterFusion / Split come later. Use Stack, Average, BatchSplit or Parallel")


def _check_nesting(block: str | Block) -> None:
    if isinstance(block, str):
        return
    if not isinstance(block, Block):
        raise ValueError(f"{block!r} is neither an adapter name nor a composition block")
    allowed = ALLOWED[type(block)]
    for child in block.children:
        if not isinstance(child, (str, Block)):
            raise ValueError(f"{type(block).__name__} child {child!r} is neither an adapter name nor a block")
        if type(child) not in allowed:
            names = ", ".join("adapter names" if t is str else t.__name__ for t in allowed)
            raise ValueError(f"{type(child).__name__} cannot be nested inside {type(block).__name__} "
                             f"(in {block!r}); {type(block).__name__} accepts {names}")
        _check_nesting(child)


def _find(block: str | Block, kinds: type | tuple[type, ...]) -> Iterable[Block]:
    if isinstance(block, str):
        return
    if isinstance(block, kinds):
        yield block
    for child in block.children:
        yield from _find(child, kinds)


def parallel_branches(block: Block) -> Parallel | None:
    """Return the ``Parallel`` of ``block`` if there is one, else ``None``."""
    return next(iter(_find(block, Parallel)), None)


def branch_heads(block: Block) -> tuple[list[str], list[list[int]], int] | None:
    """Return the head of each row group as ``(adapter names, groups, base rows)``, see ``RowSplit``.

    A ``Parallel`` or ``BatchSplit`` that is the block itself or the last child of the top
    ``Stack`` gives each child's rows the head of the child's last adapter, because nothing runs
    on all rows after it. Every other block returns ``None``: one head, the last adapter's, serves
    every row.
    """
    last = block.children[-1] if isinstance(block, Stack) else block
    if isinstance(last, Parallel):
        groups, base_rows = [[k] for k in range(len(last.children))], len(last.children)
    elif isinstance(last, BatchSplit):
        groups, base_rows = batch_split_groups(last.batch_sizes), sum(last.batch_sizes)
    else:
        return None
    return [leaf_names(child)[-1] for child in last.children], groups, base_rows


# -- plans that one site runs -----------------------------------------------------------------------

@dataclass
class Chain:
    """Parts that run one after another: ``Pairs`` lists or nested plans."""

    parts: list


@dataclass
class Mix:
    """A weighted average of children that all see the same input."""

    children: list
    weights: list[float]


@dataclass
class RowSplit:
    """Children that each run on their own rows of the batch.

    ``groups[k]`` contains the row numbers of child ``k`` in a base batch of ``base_rows`` rows. A site
    whose batch has ``f * base_rows`` rows reads each base row ``i`` as rows ``i * f`` to
    ``i * f + f - 1``: that is how generation repeats rows for beams, and how ``Parallel`` lays out
    its copies (one base row per branch). Rows in no group pass through unchanged.
    """

    children: list
    groups: list[list[int]]
    base_rows: int


SitePlan = Chain | Mix | RowSplit


def batch_split_groups(batch_sizes: Sequence[int]) -> list[list[int]]:
    """Return the row numbers of each child of a ``BatchSplit`` with ``batch_sizes``."""
    groups, start = [], 0
    for size in batch_sizes:
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def compile_site(block: str | Block, pairs_of: Callable[[str], Pairs]) -> SitePlan | None:
    """Return the plan of ``block`` at one site, or ``None`` when no adapter of it runs there.

    Args:
        block: The active block.
        pairs_of: Returns the ``(config, module)`` pairs of one adapter at this site.
    """
    if isinstance(block, str):
        pairs = pairs_of(block)
        return Chain([pairs]) if pairs else None
    children = [compile_site(child, pairs_of) for child in block.children]
    if all(child is None for child in children):
        return None
    if isinstance(block, Stack):
        return Chain([child for child in children if child is not None])
    if isinstance(block, Average):
        return Mix(children, block.weights)
    if isinstance(block, BatchSplit):
        return RowSplit(children, batch_split_groups(block.batch_sizes), sum(block.batch_sizes))
    if isinstance(block, Parallel):
        return RowSplit(children, [[k] for k in range(len(children))], len(children))
    raise NotImplementedError(f"{type(block).__name__} cannot run yet: AdapterFusion / Split come later")


def routing_plan(names: Sequence[str | None], pairs_of: Callable[[str], Pairs]) -> RowSplit | None:
    """Return the plan that sends row ``i`` through adapter ``names[i]`` alone (``None``: no adapter)."""
    order = [name for name in dict.fromkeys(names) if name is not None]
    children = [compile_site(name, pairs_of) for name in order]
    if all(child is None for child in children):
        return None
    groups = [[i for i, row_name in enumerate(names) if row_name == name] for name in order]
    return RowSplit(children, groups, len(names))


def expand_rows(groups: list[list[int]], base_rows: int, batch_size: int, device: torch.device,
                context: str) -> list[torch.Tensor]:
    """Return each group's row indices in a batch of ``batch_size`` rows, see ``RowSplit``."""
    if base_rows == 0 or batch_size % base_rows:
        raise ValueError(f"{context} expects a batch size that is a multiple of {base_rows}, but the batch has "
                         f"{batch_size} rows; pass one adapter name (or BatchSplit row) per input row")
    factor = batch_size // base_rows
    offsets = torch.arange(factor, device=device)
    return [(torch.tensor(group, dtype=torch.long, device=device).unsqueeze(1) * factor + offsets).flatten()
            for group in groups]


def run_plan(plan: SitePlan | list | None, hidden: torch.Tensor, apply: ApplyPairs,
             rows: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``plan`` on ``hidden`` and return the new tensor of the same shape.

    Args:
        plan: A plan from ``compile_site`` or ``routing_plan``, or a ``Pairs`` list.
        hidden: ``(batch, ...)``, the rows ``rows`` of the site's batch.
        apply: Applies a ``Pairs`` list to a tensor and its rows.
        rows: ``(batch,)`` indices of ``hidden``'s rows in the site's batch, or ``None`` for all rows.
    """
    if plan is None:
        return hidden
    if isinstance(plan, list):
        return apply(plan, hidden, rows) if plan else hidden
    if isinstance(plan, Chain):
        for part in plan.parts:
            hidden = run_plan(part, hidden, apply, rows)
        return hidden
    if isinstance(plan, Mix):
        outputs = [run_plan(child, hidden, apply, rows) for child in plan.children]
        return sum(weight * output for weight, output in zip(plan.weights, outputs))
    indices = expand_rows(plan.groups, plan.base_rows, hidden.shape[0], hidden.device,
                          f"{type(plan).__name__} over {len(plan.children)} children")
    result = hidden
    for child, index in zip(plan.children, indices):
        if child is None or index.numel() == 0:
            continue
        child_rows = index if rows is None else rows[index]
        output = run_plan(child, hidden.index_select(0, index), apply, child_rows)
        result = result.index_copy(0, index, output.to(result.dtype))
    return result


def select_rows(tensor: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Return rows ``rows`` of ``tensor`` (all of it for ``None``), or ``None`` for a missing tensor."""
    if tensor is None or rows is None:
        return tensor
    return tensor.index_select(0, rows.to(tensor.device))


def plan_pairs(plan: SitePlan | list | None) -> Pairs:
    """Return every ``(config, module)`` pair that ``plan`` may run, in order."""
    if plan is None:
        return []
    if isinstance(plan, list):
        return plan
    children = plan.parts if isinstance(plan, Chain) else plan.children
    return [pair for child in children for pair in plan_pairs(child)]


# -- per-forward helpers: routed heads and repeated inputs -----------------------------------------

class RoutedHead(torch.nn.Module):
    """A head that sends each group of batch rows through its own head module.

    It takes the place of one head attribute of the model for one forward. The head modules stay
    owned by the adapter store, so they are kept in a plain list and not registered here.

    Args:
        heads: One head module per group.
        groups: The row numbers of each group in a base batch of ``base_rows`` rows (see ``RowSplit``).
        base_rows: The number of rows the groups cover.
    """

    def __init__(self, heads: list[torch.nn.Module], groups: list[list[int]], base_rows: int):
        super().__init__()
        self.heads = list(heads)
        self.groups = groups
        self.base_rows = base_rows

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return the head outputs, ``(batch, ...)``, row ``i`` from the head of its group."""
        indices = expand_rows(self.groups, self.base_rows, hidden.shape[0], hidden.device, "The routed head")
        result = None
        for head, index in zip(self.heads, indices):
            if index.numel() == 0:
                continue
            output = head(hidden.index_select(0, index), *args, **kwargs)
            if result is None:
                result = output.new_zeros((hidden.shape[0], *output.shape[1:]))
            result = result.index_copy(0, index, output)
        return result


def repeat_batch(value: Any, batch_size: int, copies: int) -> Any:
    """Return ``value`` repeated ``copies`` times along dim 0 if it is a tensor with ``batch_size`` rows.

    Copy ``k`` occupies rows ``k * batch_size`` to ``(k + 1) * batch_size - 1``.
    """
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    return value


def composed_leaves(block: str | Block) -> list[str]:
    """Return the adapters of ``block`` that sit inside a block other than ``Stack``.

    Those adapters run through ``run_plan``, which only sublayer and linear-projection sites call.
    """
    if isinstance(block, str):
        return []
    if isinstance(block, Stack):
        return [name for child in block.children for name in composed_leaves(child)]
    return leaf_names(block)
