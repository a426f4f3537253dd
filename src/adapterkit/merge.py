"""Merge LoRA and (IA)^3 adapters into the frozen projections they adapt, and undo it.

A merged adapter stops running through hooks: its effect lives in the base weights, so inference
costs what the bare model costs. Merging follows the forward pass exactly. At one projection an
adapter's members act in config order on the projection's matrix ``M`` (the weight as
``(out, in)``) and bias ``b``. LoRA adds ``scaling * B A`` to ``M``. (IA)^3 on an output multiplies
the rows of ``M`` and ``b`` by its vector, and (IA)^3 on the feed-forward output projection
(``ff_out``) multiplies the columns of ``M``. The forward applies that input scale before the
projection, so it also scales what every LoRA at that projection reads: the adapter's merged
matrix is ``(M + scaling * B A) diag(scale)``.

Merged adapters act first, in merge order, and the active unmerged ones follow in active order.
A merge or unmerge that would change the model's output is rejected with ``ValueError``. That
happens when LoRA and (IA)^3 of two adapters meet at one projection and the change would reorder
them: an unmerged adapter that runs before the merged one at an output, a merged adapter that
runs after the unmerged one, or an ``ff_out`` input scale that an unmerged LoRA there still reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import IA3Config, LoRAConfig

if TYPE_CHECKING:
    from .registry import AdapterRegistry

logger = logging.getLogger(__name__)

_BOTH = {"lora", "ia3"}


# -- checks ---------------------------------------------------------------------------------------

def _kinds(registry: AdapterRegistry, name: str) -> dict[tuple, set[str]]:
    """Return, for each projection site adapter ``name`` touches, the kinds (``lora``, ``ia3``) of its members there."""
    kinds: dict[tuple, set[str]] = {}
    for key, member, _ in registry.placements_of(name):
        if key[0] == "linear":
            kinds.setdefault(key, set()).add("lora" if isinstance(member, LoRAConfig) else "ia3")
    return kinds


def _describe(key: tuple) -> str:
    _, index, role, number = key
    return f"the {role} projection {number} of block {index}"


def _first_conflict(first: dict[tuple, set[str]], second: dict[tuple, set[str]]) -> tuple | None:
    """Return a site where LoRA and (IA)^3 of the two adapters meet, so their order matters, or None."""
    for key, kinds in first.items():
        if key in second and kinds | second[key] == _BOTH:
            return key
    return None


def _check_methods(registry: AdapterRegistry, name: str) -> None:
    """Raise ``ValueError`` if adapter ``name`` has a member whose effect no weight matrix can hold."""
    config = registry.entries[name].config
    others = [m.architecture for m in config.methods if not isinstance(m, (LoRAConfig, IA3Config))]
    if others:
        raise ValueError(
            f"Adapter {name!r} contains {', '.join(sorted(set(others)))}, which cannot be merged into the base "
            "weights: only LoRA and (IA)^3 change a linear projection. Bottleneck adapters, prefixes and "
            "invertible adapters add computation that no existing weight can absorb"
        )
    if any(isinstance(m, LoRAConfig) and m.use_gating for m in config.methods):
        raise ValueError(f"Adapter {name!r} has a gated LoRA, whose update depends on the input through its gate, "
                         "so no weight matrix can hold it and it cannot be merged")
    # TODO: merge an ff_out (IA)^3 vector that scales the output, as checkpoints from adapters have.
    if any(isinstance(m, IA3Config) and "ff_out" in m.targets and m.ff_out_side == "output" for m in config.methods):
        raise ValueError(f"Adapter {name!r} has an (IA)^3 vector on the output of ff_out (ff_out_side='output'), "
                         "which merging does not support yet; keep the adapter unmerged")


def _check_unmerged_neighbours(registry: AdapterRegistry, name: str, action: str) -> None:
    """Raise ``ValueError`` if moving ``name`` in front of the active unmerged adapters changes the output.

    At an output, the unmerged adapters that run before ``name`` must commute with it. At an
    ``ff_out`` input, an (IA)^3 scale of ``name`` must not be taken away from an unmerged LoRA
    that reads the scaled input, in whatever order the two run.
    """
    mine = _kinds(registry, name)
    position = registry.active.index(name) if name in registry.active else len(registry.active)
    for order, other in enumerate(registry.active):
        if other == name or other in registry.merged:
            continue
        theirs = _kinds(registry, other)
        for key, kinds in mine.items():
            if key not in theirs:
                continue
            if key[2] == "ff_out":
                if "ia3" in kinds and "lora" in theirs[key]:
                    raise ValueError(
                        f"Cannot {action} adapter {name!r}: its (IA)^3 vector scales the input of {_describe(key)}, "
                        f"which the unmerged LoRA of active adapter {other!r} also reads, so the {action} would "
                        f"change the output. Merge {other!r} first, or deactivate it"
                    )
            elif order < position and kinds | theirs[key] == _BOTH:
                raise ValueError(
                    f"Cannot {action} adapter {name!r}: adapter {other!r} runs before it at {_describe(key)} and is not "
                    f"merged, and LoRA and (IA)^3 there do not commute, so the {action} would change the output. "
                    f"Merge {other!r} first, or deactivate it"
                )


def check_mergeable(registry: AdapterRegistry, name: str) -> None:
    """Raise ``ValueError`` if adapter ``name`` cannot be merged exactly, naming the reason.

    An inactive adapter is checked as if it ran before every active one, which is where it runs once merged.
    """
    _check_methods(registry, name)
    zero = [key for key, member, module in registry.placements_of(name)
            if isinstance(member, IA3Config) and bool((module.scale == 0).any())]
    if zero:
        raise ValueError(f"Adapter {name!r} has an (IA)^3 vector with a zero entry at {_describe(zero[0])}; "
                         "merging it would erase that weight row or column for good, so it cannot be unmerged")
    _check_unmerged_neighbours(registry, name, "merge")


def check_unmergeable(registry: AdapterRegistry, name: str) -> None:
    """Raise ``ValueError`` if unmerging active adapter ``name`` would change the output.

    Once unmerged, ``name`` runs after every merged adapter, so it must commute with the adapters
    merged after it, and with the unmerged ones as ``check_mergeable`` requires. An inactive
    adapter stops acting when unmerged, which is the point of unmerging it, so it passes.
    """
    if name not in registry.active:
        return
    mine = _kinds(registry, name)
    later = registry.merged[registry.merged.index(name) + 1:]
    for other in later:
        key = _first_conflict(mine, _kinds(registry, other))
        if key is not None:
            raise ValueError(
                f"Cannot unmerge adapter {name!r}: adapter {other!r}, merged after it, shares {_describe(key)}, and "
                f"LoRA and (IA)^3 there do not commute, so {name!r} would then run after {other!r}. Unmerge "
                f"{other!r} first, or deactivate {name!r}"
            )
    _check_unmerged_neighbours(registry, name, "unmerge")


# -- weight arithmetic ----------------------------------------------------------------------------

def _matrix_view(layer: nn.Module) -> torch.Tensor:
    """Return the weight of ``layer`` as ``(out, in)``: ``nn.Linear`` as is, transformers ``Conv1D`` transposed."""
    return layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight


def _members_by_projection(registry: AdapterRegistry, name: str) -> dict[tuple, list[tuple[object, nn.Module]]]:
    by_projection: dict[tuple, list[tuple[object, nn.Module]]] = {}
    for key, member, module in registry.placements_of(name):
        if key[0] == "linear":
            by_projection.setdefault(key, []).append((member, module))
    return by_projection


@torch.no_grad()
def apply_merge(registry: AdapterRegistry, name: str, sign: int, *, input_scales: bool = True) -> None:
    """Add (``sign=1``) or remove (``sign=-1``) adapter ``name``'s effect on the base projections.

    The arithmetic runs in float64 and is written back in the weights' own dtype.

    Args:
        registry: The model's adapters.
        name: The adapter.
        sign: ``1`` to merge, ``-1`` to undo a merge that was the last one at each projection it touches.
        input_scales: Whether to apply the (IA)^3 scales of ``ff_out`` inputs (weight columns) too.
            ``merge_all_active`` applies them separately, after every adapter's LoRA update.
    """
    layout = registry.layout
    for key, members in _members_by_projection(registry, name).items():
        _, index, role, number = key
        layer = layout.projection(index, role, number)
        stack, _ = layout.blocks[index]
        reference = stack.linear_refs(role)[number]
        matrix = _matrix_view(layer)
        width = matrix.shape[0] // reference.parts
        rows = slice(reference.part * width, (reference.part + 1) * width)
        weight = matrix[rows].double()
        bias = layer.bias[rows].double() if getattr(layer, "bias", None) is not None else None

        # Each operation: ("add", delta (out, in)) or ("scale", vector (out,)) on rows, in forward order.
        operations = []
        input_scale = None
        for member, module in members:
            if isinstance(member, LoRAConfig):
                delta = (module.lora_B.double() @ module.lora_A.double()) * module.scaling
                operations.append(("add", delta))
            elif role == "ff_out":
                if input_scales:
                    scale = module.scale.double()
                    input_scale = scale if input_scale is None else input_scale * scale
            else:
                operations.append(("scale", module.scale.double()))

        if sign > 0:
            for kind, value in operations:
                if kind == "add":
                    weight = weight + value
                else:
                    weight = weight * value[:, None]
                    bias = None if bias is None else bias * value
            if input_scale is not None:
                weight = weight * input_scale[None, :]
        else:
            if input_scale is not None:
                weight = weight / input_scale[None, :]
            for kind, value in reversed(operations):
                if kind == "add":
                    weight = weight - value
                else:
                    weight = weight / value[:, None]
                    bias = None if bias is None else bias / value

        matrix[rows] = weight.to(matrix.dtype)
        if bias is not None:
            layer.bias[rows] = bias.to(layer.bias.dtype)


@torch.no_grad()
def _scale_inputs(registry: AdapterRegistry, name: str) -> None:
    """Multiply the ``ff_out`` weight columns by adapter ``name``'s (IA)^3 input scales."""
    for key, members in _members_by_projection(registry, name).items():
        _, index, role, number = key
        if role != "ff_out":
            continue
        matrix = _matrix_view(registry.layout.projection(index, role, number))
        for member, module in members:
            if isinstance(member, IA3Config):
                matrix.copy_((matrix.double() * module.scale.double()[None, :]).to(matrix.dtype))


# -- the verbs ------------------------------------------------------------------------------------

def merge(registry: AdapterRegistry, name: str) -> None:
    """Merge adapter ``name`` into the base weights; merging a merged adapter changes nothing.

    Raises:
        ValueError: If the adapter is unknown or cannot be merged without changing the output
            (see ``check_mergeable``).
    """
    registry.check_names([name])
    if name in registry.merged:
        return
    if getattr(registry, "active_block", None) is not None and name in registry.active:
        raise ValueError(f"Adapter {name!r} is part of the active composition {registry.active_block}; merging it "
                         "would apply it to every row and branch. Activate a list of adapters first")
    check_mergeable(registry, name)
    apply_merge(registry, name, +1)
    registry.merged.append(name)
    registry._rebuild_plan()
    logger.info("Merged adapter %r into the base weights", name)


def unmerge(registry: AdapterRegistry, name: str) -> None:
    """Restore the base weights that adapter ``name`` changed; the adapter runs through hooks again.

    Adapters merged after ``name`` that do not commute with it are taken out first and merged back
    afterwards, so the weights never mix orders that do not commute. Each round trip through the
    weights' dtype rounds, so leaving the commuting ones in place keeps the restored weights closer
    to the originals. Unmerging an unmerged adapter changes nothing.

    Raises:
        ValueError: If the adapter is unknown, or active and cannot run unmerged without changing
            the output (see ``check_unmergeable``).
    """
    registry.check_names([name])
    if name not in registry.merged:
        return
    check_unmergeable(registry, name)
    mine = _kinds(registry, name)
    later = registry.merged[registry.merged.index(name) + 1:]
    # Everything from the first later adapter that does not commute with ``name`` must come out.
    first = next((i for i, other in enumerate(later) if _first_conflict(mine, _kinds(registry, other))), len(later))
    moved = later[first:]
    for other in reversed(moved):
        apply_merge(registry, other, -1)
    apply_merge(registry, name, -1)
    for other in moved:
        apply_merge(registry, other, +1)
    registry.merged.remove(name)
    registry._rebuild_plan()
    logger.info("Unmerged adapter %r", name)


def merge_all_active(registry: AdapterRegistry) -> None:
    """Merge every active, unmerged adapter at once, so that the output stays the same; for ``merge_and_unload``.

    Merging all of them together is exact even where merging them one by one is rejected: the
    forward computes ``(M + sum of LoRA updates) diag(product of input scales)`` at an ``ff_out``
    projection, so every LoRA update goes in before any input scale.

    NOTE: the weights then hold the ``ff_out`` updates in that grouped order, not in the order of
    ``registry.merged``, so ``unmerge`` is only exact for these adapters where no ``ff_out`` has
    both kinds. Call this only right before ``registry.unload()``.

    Raises:
        ValueError: If an active adapter has a member that cannot be merged; nothing changes then.
    """
    if getattr(registry, "active_block", None) is not None:
        raise ValueError(f"The active composition {registry.active_block} is not a plain stack of adapters, so it "
                         "cannot be merged into one set of weights; activate a list of adapters first")
    pending = [name for name in registry.active if name not in registry.merged]
    for name in pending:
        _check_methods(registry, name)
    for name in pending:
        apply_merge(registry, name, +1, input_scales=False)
    for name in pending:
        _scale_inputs(registry, name)
    registry.merged.extend(pending)
    registry._rebuild_plan()
    if pending:
        logger.info("Merged adapters %s into the base weights", ", ".join(map(repr, pending)))


# -- weighted combinations ------------------------------------------------------------------------

def _check_sources(registry: AdapterRegistry, name: str, sources: list[str], weights: list[float]) -> None:
    registry.check_names(sources)
    if not sources or len(sources) != len(weights):
        raise ValueError(f"Adapter {name!r} needs one weight per source adapter: got {len(sources)} sources "
                         f"({sources}) and {len(weights)} weights ({weights})")


def _lora_targets(configs: Iterable[LoRAConfig]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(role for config in configs for role in config.targets))


@torch.no_grad()
def combine(registry: AdapterRegistry, name: str, sources: list[str], weights: list[float],
            combination: str = "linear", rank: int | None = None) -> None:
    """Add adapter ``name`` that combines ``sources`` with ``weights``.

    Args:
        name: Name of the new adapter.
        sources: Adapters to combine; for ``"linear"`` they must share one config, so that every
            parameter has one shape.
        weights: One weight per source.
        combination: ``"linear"``: each parameter of the new adapter is the weighted sum of the
            sources' parameters (for LoRA this sums ``A`` and ``B`` separately, which is not the sum
            of the updates ``B A``). ``"svd"`` (LoRA only): each projection's update is the weighted sum
            of the sources' updates ``scaling * B A``, truncated to ``rank`` by a singular value
            decomposition, so the new adapter is the best rank-``rank`` approximation of that sum
            in the Frobenius norm.
        rank: Rank of the ``"svd"`` result, an int >= 1; the largest source rank by default. The sum
            of sources of ranks ``r1`` and ``r2`` has rank at most ``r1 + r2``, so that rank reproduces it.

    Raises:
        ValueError: For unknown sources, a weight count that does not match, configs that cannot be
            combined this way, an invalid rank, or an unknown combination.
    """
    _check_sources(registry, name, sources, weights)
    configs = [registry.entries[source].config for source in sources]
    if combination == "linear":
        if any(config != configs[0] for config in configs[1:]):
            raise ValueError(f"Adapter {name!r}: a linear combination needs sources with one config, but the configs "
                             f"of {sources} differ; use combination='svd' for LoRA adapters of different ranks or "
                             "targets")
        registry.add(name, configs[0])
        target = registry.modules_of(name)["methods"]
        states = [registry.modules_of(source)["methods"].state_dict() for source in sources]
        for key, tensor in target.state_dict().items():
            tensor.copy_(sum(weight * state[key].double() for weight, state in zip(weights, states)))
        return
    if combination != "svd":
        raise ValueError(f"combination={combination!r} is invalid: expected 'linear' or 'svd'")
    if not all(isinstance(config, LoRAConfig) for config in configs):
        raise ValueError(f"Adapter {name!r}: combination='svd' combines LoRA adapters only, but {sources} have "
                         f"configs {[config.architecture for config in configs]}")
    if any(config.use_gating for config in configs):
        raise ValueError(f"Adapter {name!r}: combination='svd' cannot combine gated LoRA adapters, whose update "
                         "depends on the input")
    if rank is None:
        rank = max(config.r for config in configs)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} is invalid: expected an int >= 1, for example the sum of the source ranks")
    leave_out = tuple(sorted(set.intersection(*(set(config.leave_out) for config in configs))))
    # alpha = r makes the new adapter's scaling 1, so its B A must equal the summed update itself.
    registry.add(name, LoRAConfig(r=rank, alpha=rank, targets=_lora_targets(configs), leave_out=leave_out))

    updates: dict[tuple, torch.Tensor] = {}
    for source, weight in zip(sources, weights):
        for key, _, module in registry.placements_of(source):
            delta = weight * (module.lora_B.double() @ module.lora_A.double()) * module.scaling
            updates[key] = updates[key] + delta if key in updates else delta
    for key, _, module in registry.placements_of(name):
        if key not in updates:
            module.lora_B.zero_()
            continue
        left, singular, right = torch.linalg.svd(updates[key], full_matrices=False)
        # A matrix of shape (out, in) has at most min(out, in) singular values; a larger rank gets zero columns.
        effective_rank = min(rank, singular.shape[0])
        root = singular[:effective_rank].sqrt()
        module.lora_B.zero_()
        module.lora_A.zero_()
        module.lora_B[:, :effective_rank] = (left[:, :effective_rank] * root).to(module.lora_B.dtype)
        module.lora_A[:effective_rank] = (root[:, None] * right[:effective_rank]).to(module.lora_A.dtype)
