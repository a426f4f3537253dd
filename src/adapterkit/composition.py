"""Composition blocks: how several adapters combine in one forward.

``model.set_active_adapters(block)`` takes a block built from adapter names and these classes:

- ``Stack(a, b)``: ``a`` then ``b`` at every site, in order. A plain list of names is a ``Stack``.
- ``Fuse(a, b)``: AdapterFusion (Pfeiffer et al., 2021). At each bottleneck site, an attention
  layer weighs what each child adds to the hidden state, with the hidden state as the query. The
  fusion layers are created and trained separately from the adapters::

      model.add_adapter_fusion(Fuse("a", "b"), config="dynamic")
      model.train_adapter_fusion(Fuse("a", "b"))  # a and b stay frozen
      model.fit(texts, labels)
      model.save_adapter_fusion("out/fusion", Fuse("a", "b"))

  A child may be a ``Stack`` of adapters, whose output counts as one value, and a ``Fuse`` may sit
  inside a ``Stack``: ``Stack(Fuse("a", "b"), "c")``. Every adapter inside a ``Fuse`` must be a
  bottleneck adapter. The fusion has its own head, which serves a block that ends in the ``Fuse``.
- ``Split(a, b, splits=[3, 4])``: the first 3 positions of the sequence go through ``a``, the next
  4 through ``b``. The splits must add up to the sequence length at every site.
- ``Average(a, b, weights=None)``: every child runs on the same input, and the site output is the
  weighted average of the children's outputs. The weights are normalised to sum to 1 (equal by
  default), so the base output of a LoRA or (IA)^3 projection keeps its scale.
- ``BatchSplit(a, b, batch_sizes=[2, 3])``: the first 2 rows of the batch go through ``a``, the
  next 3 through ``b``. The sizes must add up to the batch size.
- ``Parallel(a, b)``: the model input is repeated once per child, before the first block, and
  branch ``k`` runs on the ``k``-th copy. The outputs come back stacked along the batch dimension:
  rows ``k * batch : (k + 1) * batch`` are branch ``k``'s, and each branch uses the head of its
  last adapter (or the fusion's head when it ends in a ``Fuse``). A ``BatchSplit`` on top does the
  same with its row groups.

Per-row routing (``model(**inputs, adapter_names=[...])``), ``Stack``, ``BatchSplit`` and
``Parallel`` run adapters of every method. Adapters that act on whole rows (prefix and prompt
tuning, invertible and before-head adapters) raise ``ValueError`` at activation inside ``Average``,
``Split`` and ``Fuse``, which mix values within a row.

``ALLOWED`` is the table of which block may contain which. Activating any other nesting raises a
``ValueError`` that names both blocks, before any forward runs.

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
# Maps a tensor of the whole site, ``(batch, seq_len, ...)``, to the part that the current plan
# node runs on: some rows, some positions, or all of it. ``None`` maps to ``None``.
Select = Callable[["torch.Tensor | None"], "torch.Tensor | None"]
# Applies ``pairs`` to ``hidden``, the part of the site's tensor that ``select`` picks.
ApplyPairs = Callable[[Pairs, torch.Tensor, Select], torch.Tensor]


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
    """AdapterFusion over the children: attention over their outputs at every bottleneck site.

    The fusion's weights are added with ``model.add_adapter_fusion(Fuse(...))``; activating a
    ``Fuse`` looks them up by ``name``.

    Args:
        *children: Adapter names or ``Stack`` blocks of them.
        name: The name of the fusion. By default the children joined by ``","``, each ``Stack``
            written as its adapter names joined by ``"+"``: ``Fuse(Stack("a", "b"), "c")`` is
            ``"a+b,c"``. For adapter names alone this is the name ``adapters`` 1.3.0 gives.
    """

    def __init__(self, *children: str | Block, name: str | None = None):
        super().__init__(*children)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"Fuse name={name!r}: expected a non-empty string or None")
        self._name = name

    @property
    def name(self) -> str:
        """The fusion's name: the one given, or the default built from the children."""
        if self._name is not None:
            return self._name
        return ",".join(child if isinstance(child, str) else "+".join(leaf_names(child))
                        for child in self.children)

    def _extra_repr(self) -> str:
        return f", name={self._name!r}" if self._name is not None else ""


class Split(Block):
    """Send consecutive groups of sequence positions through different children.

    The ``k``-th child runs on positions ``sum(splits[:k])`` to ``sum(splits[:k + 1]) - 1`` of
    every sequence, as ``Split`` does in ``adapters`` 1.3.0.

    Args:
        *children: Adapter names or blocks.
        splits: The number of positions for each child, in order, or one number for every child.
            They must add up to the sequence length at every site the block runs at.
    """

    def __init__(self, *children: str | Block, splits: int | Sequence[int]):
        super().__init__(*children)
        if isinstance(splits, int) and not isinstance(splits, bool):
            sizes = [splits] * len(self.children)
        elif isinstance(splits, Sequence) and not isinstance(splits, str):
            sizes = [int(size) for size in splits]
        else:
            raise ValueError(f"Split splits={splits!r}: expected a number of positions or one number per child")
        if len(sizes) != len(self.children):
            raise ValueError(f"Split got splits={sizes} for {len(self.children)} children; pass one size per child")
        if any(size < 0 for size in sizes):
            raise ValueError(f"Split splits={sizes} must not be negative")
        self.splits = sizes

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


def block_to_dict(block: str | Block) -> Any:
    """Return ``block`` as JSON-ready data: an adapter name, or ``{"type", "children"}`` plus the block's options."""
    if isinstance(block, str):
        return block
    data: dict[str, Any] = {"type": type(block).__name__, "children": [block_to_dict(c) for c in block.children]}
    if isinstance(block, Average):
        data["weights"] = block.weights
    elif isinstance(block, BatchSplit):
        data["batch_sizes"] = block.batch_sizes
    elif isinstance(block, Split):
        data["splits"] = block.splits
    elif isinstance(block, Fuse) and block._name is not None:
        data["name"] = block._name
    return data


def block_from_dict(data: Any) -> str | Block:
    """Build the block that ``block_to_dict`` returned.

    Raises:
        ValueError: For data that describes no block.
    """
    if isinstance(data, str):
        return data
    kinds = {kind.__name__: kind for kind in ALLOWED}
    if not isinstance(data, dict) or data.get("type") not in kinds or not isinstance(data.get("children"), list):
        raise ValueError(f"{data!r} describes no composition block: expected an adapter name or "
                         f"{{'type': one of {sorted(kinds)}, 'children': [...]}}")
    options = {key: value for key, value in data.items() if key not in ("type", "children")}
    return kinds[data["type"]](*[block_from_dict(child) for child in data["children"]], **options)


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


def find_fusions(block: str | Block) -> list[Fuse]:
    """Return every ``Fuse`` in ``block``, outer ones first."""
    return list(_find(block, Fuse))


def head_owner(block: str | Block) -> str:
    """Return the adapter or fusion whose head serves ``block``: that of its last child, recursively.

    A ``Fuse`` owns its own head, so ``Fuse("a", "b")`` and ``Stack("x", Fuse("a", "b"))`` use the
    fusion's head, while ``Stack(Fuse("a", "b"), "c")`` uses the head of ``c``.
    """
    if isinstance(block, str):
        return block
    if isinstance(block, Fuse):
        return block.name
    return head_owner(block.children[-1])


def branch_heads(block: Block) -> tuple[list[str], list[list[int]], int] | None:
    """Return the head of each row group as ``(head owners, groups, base rows)``, see ``RowSplit``.

    A ``Parallel`` or ``BatchSplit`` that is the block itself or the last child of the top
    ``Stack`` gives each child's rows the head of the child's ``head_owner``, because nothing runs
    on all rows after it. Every other block returns ``None``: one head, the block's
    ``head_owner``'s, serves every row.
    """
    last = block.children[-1] if isinstance(block, Stack) else block
    if isinstance(last, Parallel):
        groups, base_rows = [[k] for k in range(len(last.children))], len(last.children)
    elif isinstance(last, BatchSplit):
        groups, base_rows = batch_split_groups(last.batch_sizes), sum(last.batch_sizes)
    else:
        return None
    return [head_owner(child) for child in last.children], groups, base_rows


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


@dataclass
class PositionSplit:
    """Children that each run on their own consecutive positions of the sequence (dimension 1).

    A child that is ``None`` leaves its positions unchanged.
    """

    children: list
    splits: list[int]


@dataclass
class FusePlan:
    """AdapterFusion at one site: attention over the children's outputs.

    Attributes:
        children: The plan of each child, ``None`` for a child without a module at this site.
        layer: The fusion layer (``fusion.FusionLayer``) at this site.
        last: The ``(config, module)`` pair of the last fused adapter with a module here. Its config
            decides what the query and the residual are, as the last adapter does in ``adapters``.
        name: The fusion's name, for error messages.
    """

    children: list
    layer: Any
    last: tuple[Any, Any]
    name: str


SitePlan = Chain | Mix | RowSplit | PositionSplit | FusePlan
# Returns ``(query, residual)`` of a fusion for the part ``hidden`` of the site's tensor, see ``run_plan``.
FusionInputs = Callable[[FusePlan, torch.Tensor, Select], tuple[torch.Tensor, torch.Tensor]]


def batch_split_groups(batch_sizes: Sequence[int]) -> list[list[int]]:
    """Return the row numbers of each child of a ``BatchSplit`` with ``batch_sizes``."""
    groups, start = [], 0
    for size in batch_sizes:
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def compile_site(block: str | Block, pairs_of: Callable[[str], Pairs],
                 fusion_layer_of: Callable[[Fuse], Any] | None = None) -> SitePlan | None:
    """Return the plan of ``block`` at one site, or ``None`` when no adapter of it runs there.

    Args:
        block: The active block.
        pairs_of: Returns the ``(config, module)`` pairs of one adapter at this site.
        fusion_layer_of: Returns the fusion layer of a ``Fuse`` at this site, or ``None`` if it has none.

    Raises:
        RuntimeError: If a ``Fuse`` has adapters with modules here but no fusion layer.
    """
    if isinstance(block, str):
        pairs = pairs_of(block)
        return Chain([pairs]) if pairs else None
    children = [compile_site(child, pairs_of, fusion_layer_of) for child in block.children]
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
    if isinstance(block, Split):
        return PositionSplit(children, list(block.splits))
    if isinstance(block, Fuse):
        layer = fusion_layer_of(block) if fusion_layer_of is not None else None
        if layer is None:
            raise RuntimeError(f"The fusion {block.name!r} has adapters at this site but no fusion layer; "
                               "delete and add the fusion again")
        last = next(pairs_of(name)[-1] for name in reversed(leaf_names(block)) if pairs_of(name))
        return FusePlan(children, layer, last, block.name)
    raise TypeError(f"{type(block).__name__} is not a composition block adapterkit can run")


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


def select_all(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Return ``tensor``: the ``Select`` of a plan node that runs on the whole site."""
    return tensor


def _select_rows(select: Select, index: torch.Tensor) -> Select:
    def select_rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
        part = select(tensor)
        return None if part is None else part.index_select(0, index.to(part.device))

    return select_rows


def _select_positions(select: Select, start: int, stop: int) -> Select:
    def select_positions(tensor: torch.Tensor | None) -> torch.Tensor | None:
        part = select(tensor)
        return None if part is None else part[:, start:stop]

    return select_positions


def run_plan(plan: SitePlan | list | None, hidden: torch.Tensor, apply: ApplyPairs, select: Select = select_all,
             fusion_inputs: FusionInputs | None = None) -> torch.Tensor:
    """Run ``plan`` on ``hidden`` and return the new tensor of the same shape.

    Args:
        plan: A plan from ``compile_site`` or ``routing_plan``, or a ``Pairs`` list.
        hidden: ``(batch, seq_len, ...)``, the part of the site's tensor that ``select`` picks.
        apply: Applies a ``Pairs`` list to a tensor and the ``Select`` of its part.
        select: Maps the site's other tensors (residual stream, mask, layer input) to the part.
        fusion_inputs: Returns the query and the residual of a ``FusePlan``; only sites that run
            bottleneck adapters pass it.

    Raises:
        ValueError: If a ``RowSplit`` does not fit the batch size or a ``PositionSplit`` does not
            add up to the sequence length.
        RuntimeError: For a ``FusePlan`` without ``fusion_inputs``.
    """
    if plan is None:
        return hidden
    if isinstance(plan, list):
        return apply(plan, hidden, select) if plan else hidden
    if isinstance(plan, Chain):
        for part in plan.parts:
            hidden = run_plan(part, hidden, apply, select, fusion_inputs)
        return hidden
    if isinstance(plan, Mix):
        outputs = [run_plan(child, hidden, apply, select, fusion_inputs) for child in plan.children]
        return sum(weight * output for weight, output in zip(plan.weights, outputs))
    if isinstance(plan, FusePlan):
        return _run_fusion(plan, hidden, apply, select, fusion_inputs)
    if isinstance(plan, PositionSplit):
        return _run_position_split(plan, hidden, apply, select, fusion_inputs)
    indices = expand_rows(plan.groups, plan.base_rows, hidden.shape[0], hidden.device,
                          f"{type(plan).__name__} over {len(plan.children)} children")
    result = hidden
    for child, index in zip(plan.children, indices):
        if child is None or index.numel() == 0:
            continue
        output = run_plan(child, hidden.index_select(0, index), apply, _select_rows(select, index), fusion_inputs)
        result = result.index_copy(0, index, output.to(result.dtype))
    return result


def _run_fusion(plan: FusePlan, hidden: torch.Tensor, apply: ApplyPairs, select: Select,
                fusion_inputs: FusionInputs | None) -> torch.Tensor:
    """Return ``residual + attention(query, children's outputs - residual)`` for the part ``hidden``.

    Each child runs on ``hidden`` as it would run alone, and its value is what it adds to the
    fusion's residual. For one bottleneck adapter that is the adapter's up-projection output,
    the value ``adapters`` fuses. A ``Stack`` contributes the sum of its adapters' changes.
    """
    if fusion_inputs is None:
        raise RuntimeError(f"The fusion {plan.name!r} reached a site that cannot run AdapterFusion; it runs only "
                           "at bottleneck sublayer sites")
    query, residual = fusion_inputs(plan, hidden, select)
    values = [run_plan(child, hidden, apply, select, fusion_inputs) - residual
              for child in plan.children if child is not None]
    return plan.layer(query, torch.stack(values, dim=2), residual)


def _run_position_split(plan: PositionSplit, hidden: torch.Tensor, apply: ApplyPairs, select: Select,
                        fusion_inputs: FusionInputs | None) -> torch.Tensor:
    length = hidden.shape[1] if hidden.dim() > 1 else 0
    if sum(plan.splits) != length:
        raise ValueError(f"Split with splits={plan.splits} covers {sum(plan.splits)} positions, but this input has "
                         f"{length}; pass splits that add up to the sequence length (in encoder-decoder models, "
                         "the decoder's length too)")
    pieces, start = [], 0
    for child, size in zip(plan.children, plan.splits):
        piece = hidden[:, start:start + size]
        if child is not None and size:
            piece = run_plan(child, piece, apply, _select_positions(select, start, start + size), fusion_inputs)
        pieces.append(piece.to(hidden.dtype))
        start += size
    return torch.cat(pieces, dim=1)


def row_pairs(plan: SitePlan | list | None, batch_size: int, device: torch.device) -> list[tuple[torch.Tensor, Pairs]]:
    """Return the rows of a batch grouped by the ``(config, module)`` pairs each row runs, in order.

    Sites whose adapters act on whole rows (prefixes, prompts, position shifts, invertible and
    before-head adapters) read a plan of ``Chain`` and ``RowSplit`` nodes this way: a row of a
    ``Stack("a", BatchSplit("b", "c"))`` group runs the pairs of ``a`` then those of ``b``.

    Args:
        plan: A list of pairs, a plan of ``Chain`` and ``RowSplit`` nodes, or ``None``.
        batch_size: The rows of the site's batch, a multiple of each ``RowSplit``'s base rows.
        device: The device of the returned row indices.

    Returns:
        ``(rows, pairs)`` groups that cover every row once. ``rows`` is a 1-D long tensor of row
        numbers in increasing order. ``pairs`` is empty for rows that run no adapter.

    Raises:
        ValueError: If a ``RowSplit`` does not fit the batch size.
        NotImplementedError: For ``Mix``, ``PositionSplit`` and ``FusePlan`` nodes, which mix or
            split values within a row.
    """
    rows = torch.arange(batch_size, device=device)
    groups = _row_pairs(plan, rows)
    return [(torch.sort(group_rows).values, pairs) for group_rows, pairs in groups if group_rows.numel()]


def _row_pairs(plan: SitePlan | list | None, rows: torch.Tensor) -> list[tuple[torch.Tensor, Pairs]]:
    if plan is None:
        return [(rows, [])]
    if isinstance(plan, list):
        return [(rows, list(plan))]
    if isinstance(plan, Chain):
        groups = [(rows, [])]
        for part in plan.parts:
            groups = [(part_rows, pairs + part_pairs) for group_rows, pairs in groups
                      for part_rows, part_pairs in _row_pairs(part, group_rows)]
        return groups
    if isinstance(plan, RowSplit):
        indices = expand_rows(plan.groups, plan.base_rows, rows.shape[0], rows.device,
                              f"{type(plan).__name__} over {len(plan.children)} children")
        covered = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        groups = []
        for child, index in zip(plan.children, indices):
            covered[index] = True
            groups.extend(_row_pairs(child, rows[index]))
        groups.append((rows[~covered], []))
        return groups
    raise NotImplementedError(f"{type(plan).__name__} mixes or splits values within a row, which adapters that act "
                              "on whole rows (prefix tuning, prompt tuning, invertible and before-head adapters) "
                              "cannot run in; use Stack, BatchSplit, Parallel or per-row routing for them")


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

    Those adapters run through the block's plan (``run_plan`` or ``row_pairs``) at every site.
    """
    if isinstance(block, str):
        return []
    if isinstance(block, Stack):
        return [name for child in block.children for name in composed_leaves(child)]
    return leaf_names(block)


def within_row_leaves(block: str | Block) -> list[str]:
    """Return the adapters of ``block`` inside an ``Average``, ``Split`` or ``Fuse``, blocks that mix values within a row.

    Adapters that act on whole rows (prefix and prompt tuning, invertible and before-head adapters)
    cannot sit there. ``Stack``, ``BatchSplit`` and ``Parallel`` only choose which rows run what.
    """
    if isinstance(block, str):
        return []
    if isinstance(block, (Average, Split, Fuse)):
        return leaf_names(block)
    return [name for child in block.children for name in within_row_leaves(child)]
