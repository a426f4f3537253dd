"""Merge LoRA and (IA)^3 adapters into the frozen projections they adapt, and undo it.

A merged adapter stops running through hooks: its effect lives in the base weights, so inference
costs what the bare model costs. Merging follows the forward pass exactly. At one projection an
adapter's members act in config order on the projection's matrix ``M`` (the weight as
``(out, in)``) and bias ``b``: LoRA adds ``scaling * B A`` to ``M``, (IA)^3 on an output multiplies
the rows of ``M`` and ``b`` by its vector, and (IA)^3 on the feed-forward output projection's input
multiplies the columns of ``M``, which the forward applies before any other member.

A merged adapter acts before every unmerged one. Merging is therefore refused when an active,
unmerged adapter runs before it at a shared projection and the two do not commute (LoRA with
(IA)^3), because the merged model would then compute something else.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import IA3Config, LoRAConfig

if TYPE_CHECKING:
    from .registry import AdapterRegistry

logger = logging.getLogger(__name__)


def _kinds(registry: AdapterRegistry, name: str) -> dict[tuple, set[str]]:
    """Return, for each projection site adapter ``name`` touches, the kinds of its members there."""
    kinds: dict[tuple, set[str]] = {}
    for key, member, _ in registry.placements_of(name):
        if key[0] == "linear":
            kinds.setdefault(key, set()).add("lora" if isinstance(member, LoRAConfig) else "ia3")
    return kinds


def check_mergeable(registry: AdapterRegistry, name: str) -> None:
    """Raise ``ValueError`` if adapter ``name`` cannot be merged exactly, naming the reason."""
    config = registry.entries[name].config
    others = [m.architecture for m in config.methods if not isinstance(m, (LoRAConfig, IA3Config))]
    if others:
        raise ValueError(
            f"Adapter {name!r} contains {', '.join(sorted(set(others)))}, which cannot be merged into the base "
            "weights: only LoRA and (IA)^3 change a linear projection. Bottleneck adapters, prefixes and "
            "invertible adapters add computation that no existing weight can absorb"
        )
    gated = [m for m in config.methods if isinstance(m, LoRAConfig) and m.use_gating]
    if gated:
        raise ValueError(f"Adapter {name!r} has a gated LoRA, whose update depends on the input; it cannot be merged")
    mine = _kinds(registry, name)
    for other in registry.active:
        if other == name:
            break
        if other in registry.merged:
            continue
        for key, kinds in _kinds(registry, other).items():
            if key in mine and kinds | mine[key] == {"lora", "ia3"}:
                raise ValueError(
                    f"Adapter {other!r} runs before {name!r} at {key[2]} projection {key[3]} of block {key[1]}, and "
                    "LoRA and (IA)^3 do not commute, so merging would change the output. Merge "
                    f"{other!r} first, or deactivate it"
                )


def _matrix_view(layer: nn.Module) -> torch.Tensor:
    """Return the weight of ``layer`` as ``(out, in)``: ``nn.Linear`` as is, transformers ``Conv1D`` transposed."""
    return layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight


@torch.no_grad()
def apply_merge(registry: AdapterRegistry, name: str, sign: int) -> None:
    """Add (``sign=1``) or remove (``sign=-1``) adapter ``name``'s effect on the base projections.

    The arithmetic runs in float64 and is written back in the weights' own dtype.
    """
    layout = registry.layout
    by_projection: dict[tuple, list[tuple[object, nn.Module]]] = {}
    for key, member, module in registry.placements_of(name):
        if key[0] == "linear":
            by_projection.setdefault(key, []).append((member, module))

    for key, members in by_projection.items():
        _, index, role, number = key
        layer = layout.projection(index, role, number)
        stack, _ = layout.blocks[index]
        reference = stack.linear_refs(role)[number]
        matrix = _matrix_view(layer)
        width = matrix.shape[0] // reference.parts
        rows = slice(reference.part * width, (reference.part + 1) * width)
        weight = matrix[rows].double()
        bias = layer.bias[rows].double() if getattr(layer, "bias", None) is not None else None
        input_scale = None

        operations = []
        for member, module in members:
            if isinstance(member, LoRAConfig):
                operations.append(("add", module.delta_weight().double()))
            elif role == "ff_out":
                input_scale = module.scale.double() if input_scale is None else input_scale * module.scale.double()
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


def merge(registry: AdapterRegistry, name: str) -> None:
    """Merge adapter ``name`` into the base weights; merging a merged adapter changes nothing."""
    registry.check_names([name])
    if name in registry.merged:
        return
    check_mergeable(registry, name)
    apply_merge(registry, name, +1)
    registry.merged.append(name)
    registry._rebuild_plan()
    logger.info("Merged adapter %r into the base weights", name)


def unmerge(registry: AdapterRegistry, name: str) -> None:
    """Restore the base weights that adapter ``name`` changed; the adapter runs through hooks again.

    Adapters merged after ``name`` are taken out first and merged back afterwards, so the weights
    never mix orders that do not commute.
    """
    registry.check_names([name])
    if name not in registry.merged:
        return
    position = registry.merged.index(name)
    later = registry.merged[position + 1:]
    for other in reversed(later):
        apply_merge(registry, other, -1)
    apply_merge(registry, name, -1)
    for other in later:
        apply_merge(registry, other, +1)
    registry.merged.remove(name)
    registry._rebuild_plan()
    logger.info("Unmerged adapter %r", name)


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
            sources' parameters. ``"svd"`` (LoRA only): each projection's update is the weighted sum
            of the sources' updates ``scaling * B A``, truncated to ``rank`` by a singular value
            decomposition, so the new adapter is the best rank-``rank`` approximation of that sum.
        rank: Rank of the ``"svd"`` result; the largest source rank by default.

    Raises:
        ValueError: For unknown sources, a weight count that does not match, configs that cannot be
            combined this way, or an unknown combination.
    """
    registry.check_names(sources)
    if len(sources) != len(weights) or not sources:
        raise ValueError(f"combine needs one weight per source adapter: got {len(sources)} sources and "
                         f"{len(weights)} weights")
    configs = [registry.entries[source].config for source in sources]
    if combination == "linear":
        if any(config != configs[0] for config in configs[1:]):
            raise ValueError(f"A linear combination needs adapters with one config, but {sources} differ; use "
                             "combination='svd' for LoRA adapters of different ranks")
        registry.add(name, configs[0])
        target = registry.modules_of(name)["methods"]
        states = [registry.modules_of(source)["methods"].state_dict() for source in sources]
        for key, tensor in target.state_dict().items():
            tensor.copy_(sum(weight * state[key].double() for weight, state in zip(weights, states)))
        return
    if combination != "svd":
        raise ValueError(f"combination={combination!r}: expected 'linear' or 'svd'")
    if not all(len(config.methods) == 1 and isinstance(config, LoRAConfig) for config in configs):
        raise ValueError(f"combination='svd' combines LoRA adapters only; {sources} have configs "
                         f"{[config.architecture for config in configs]}")
    if any(config.use_gating for config in configs):
        raise ValueError("combination='svd' cannot combine gated LoRA adapters, whose update depends on the input")
    rank = rank or max(config.r for config in configs)
    targets = tuple(dict.fromkeys(role for config in configs for role in config.targets))
    leave_out = tuple(sorted(set.intersection(*(set(config.leave_out) for config in configs))))
    registry.add(name, LoRAConfig(r=rank, alpha=rank, targets=targets, leave_out=leave_out))
    updates: dict[tuple, torch.Tensor] = {}
    for source, weight in zip(sources, weights):
        for key, _, module in registry.placements_of(source):
            delta = weight * module.delta_weight().double()
            updates[key] = updates[key] + delta if key in updates else delta
    for key, _, module in registry.placements_of(name):
        if key not in updates:
            module.lora_B.zero_()
            continue
        left, singular, right = torch.linalg.svd(updates[key], full_matrices=False)
        root = singular[:rank].sqrt()
        # The new adapter's scaling is alpha / r = 1, so B A must equal the summed update itself.
        module.lora_B.copy_((left[:, :rank] * root).to(module.lora_B.dtype))
        module.lora_A.copy_((root[:, None] * right[:rank]).to(module.lora_A.dtype))
