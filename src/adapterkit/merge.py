"""Merge LoRA and (IA)^3 adapters into the frozen projections they adapt, and undo it.

A merged adapter stops running through hooks: its effect lives in the base weights, so inference
costs what the bare model costs. Merging follows the forward pass exactly. At one projection an
adapter's members act in config order on the projection's matrix ``M`` (the weight as
``(out, in)``) and bias ``b``. LoRA adds ``scaling * B A`` to ``M``. (IA)^3 on an output multiplies
the rows of ``M`` and ``b`` by its vector, and (IA)^3 on the input of the feed-forward output
projection (``ff_out`` with ``ff_out_side="input"``) multiplies the columns of ``M``. The forward applies that input scale before the
projection, so it also scales what every LoRA at that projection reads: the adapter's merged
matrix is ``(M + scaling * B A) diag(scale)``.

A parallel bottleneck adapter with an identity non-linearity adds ``U (D x + d) + u`` to the output
of a feed-forward sublayer ``W2 act(W1 x + b1) + b2`` that reads the same ``x``. For the activations
in ``WIDENING_ACTIVATIONS``, ``act(z) = z g(z)`` with ``g(z) + g(-z) = 1``, so ``act(z) - act(-z) = z``
exactly. Merging therefore appends ``2 r`` units to the sublayer: rows ``[D; -D]`` (bias ``[d; -d]``)
to ``W1`` and columns ``[U, -U]`` to ``W2``, and adds ``u`` to ``b2``. Every block of the stack gets
the same number of units (zero units where the adapter leaves a block out), and the model config's
width field grows with them, so ``save_pretrained`` writes a model that transformers loads alone.
This needs a sublayer whose first projection reads the residual input, as in post-norm blocks (see
``FeedForwardShape``); pre-norm blocks normalise that input first, so nothing exact exists there.

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

from .config import BottleneckConfig, IA3Config, LoRAConfig
from .methods.phm import PHMLinear

if TYPE_CHECKING:
    from .registry import AdapterRegistry

logger = logging.getLogger(__name__)

_BOTH = {"lora", "ia3"}
# Activations with act(z) - act(-z) = z: transformers' names for GELU (exact and tanh forms), ReLU and SiLU.
WIDENING_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python", "gelu_accurate",
                        "quick_gelu", "relu", "silu", "swish")


# -- checks ---------------------------------------------------------------------------------------

def _scales_input(key: tuple, member: object) -> bool:
    """Return whether ``member`` at projection ``key`` is an (IA)^3 vector on the projection's input."""
    return key[2] == "ff_out" and isinstance(member, IA3Config) and member.ff_out_side == "input"


def _kinds(registry: AdapterRegistry, name: str) -> dict[tuple, set[str]]:
    """Return, for each projection site adapter ``name`` touches, the kinds of its members there.

    The kinds are ``lora``, ``ia3`` (a vector on the output) and ``ia3_in`` (a vector on the input).
    """
    kinds: dict[tuple, set[str]] = {}
    for key, member, _ in registry.placements_of(name):
        if key[0] == "linear":
            if isinstance(member, LoRAConfig):
                kind = "lora"
            elif _scales_input(key, member):
                kind = "ia3_in"
            else:
                kind = "ia3"
            kinds.setdefault(key, set()).add(kind)
    return kinds


def _plain(kinds: set[str]) -> set[str]:
    return {"ia3" if kind == "ia3_in" else kind for kind in kinds}


def _describe(key: tuple) -> str:
    _, index, role, number = key
    return f"the {role} projection {number} of block {index}"


def _first_conflict(first: dict[tuple, set[str]], second: dict[tuple, set[str]]) -> tuple | None:
    """Return a site where LoRA and (IA)^3 of the two adapters meet, so their order matters, or None."""
    for key, kinds in first.items():
        if key in second and _plain(kinds | second[key]) == _BOTH:
            return key
    return None


def _check_methods(registry: AdapterRegistry, name: str) -> None:
    """Raise ``ValueError`` if adapter ``name`` has a member whose effect no weight matrix can hold."""
    config = registry.entries[name].config
    others = [m.architecture for m in config.methods if not isinstance(m, (LoRAConfig, IA3Config, BottleneckConfig))]
    if others:
        raise ValueError(
            f"Adapter {name!r} contains {', '.join(sorted(set(others)))}, which cannot be merged into the base "
            "weights: only LoRA, (IA)^3 and parallel bottleneck adapters with an identity non-linearity change "
            "the base weights. Prefixes, prompts and invertible adapters add computation that no weight can absorb"
        )
    for member in config.methods:
        if isinstance(member, BottleneckConfig):
            _check_parallel(registry, name, member)
    if any(isinstance(m, LoRAConfig) and m.use_gating for m in config.methods):
        raise ValueError(f"Adapter {name!r} has a gated LoRA, whose update depends on the input through its gate, "
                         "so no weight matrix can hold it and it cannot be merged")


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
            if "ia3_in" in kinds and "lora" in theirs[key]:
                raise ValueError(
                    f"Cannot {action} adapter {name!r}: its (IA)^3 vector scales the input of {_describe(key)}, "
                    f"which the unmerged LoRA of active adapter {other!r} also reads, so the {action} would "
                    f"change the output. Merge {other!r} first, or deactivate it"
                )
            outputs, their_outputs = kinds - {"ia3_in"}, theirs[key] - {"ia3_in"}
            if order < position and outputs and their_outputs and outputs | their_outputs == _BOTH:
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
    for index in _stack_indices(registry, name):
        _check_no_linear_members(registry, index, name, "unmerge")
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
            elif _scales_input(key, member):
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
    _widen(registry, name, sign)


@torch.no_grad()
def _scale_inputs(registry: AdapterRegistry, name: str) -> None:
    """Multiply the ``ff_out`` weight columns by adapter ``name``'s (IA)^3 input scales."""
    for key, members in _members_by_projection(registry, name).items():
        _, index, role, number = key
        if role != "ff_out":
            continue
        matrix = _matrix_view(registry.layout.projection(index, role, number))
        for member, module in members:
            if _scales_input(key, member):
                matrix.copy_((matrix.double() * module.scale.double()[None, :]).to(matrix.dtype))


# -- parallel bottleneck adapters: extra feed-forward units ----------------------------------------

def _check_parallel(registry: AdapterRegistry, name: str, member: BottleneckConfig) -> None:
    """Raise ``ValueError`` unless bottleneck member ``member`` of adapter ``name`` can be merged by widening."""
    problems = []
    if not member.parallel:
        problems.append("it runs in series (parallel=False), so it transforms the sublayer output non-linearly")
    if member.non_linearity != "identity":
        problems.append(f"its non-linearity is {member.non_linearity!r}, not 'identity'")
    if member.projection != "linear":
        problems.append("its projections are convolutions over the sequence, which mix positions")
    if member.ln_before or member.ln_after:
        problems.append("it has its own layer norm (ln_before / ln_after)")
    if member.use_gating:
        problems.append("its output is gated by its input (use_gating)")
    if member.mh_adapter or member.cross_adapter or member.before_head:
        problems.append("it sits at an attention sublayer or before the head (mh_adapter, cross_adapter or "
                        "before_head); only feed-forward sublayers can take it")
    if problems:
        raise ValueError(f"Adapter {name!r} has a bottleneck adapter that cannot be merged into the base weights: "
                         f"{'; '.join(problems)}. Only parallel adapters with non_linearity='identity' on the "
                         "feed-forward sublayer merge exactly")
    for index in _stack_indices(registry, name):
        _feed_forward_layers(registry, index, name)
        _check_no_linear_members(registry, index, name, "merge")


def _stack_indices(registry: AdapterRegistry, name: str) -> list[int]:
    """Return the positions in ``layout.spec.stacks`` of the stacks whose feed-forward sublayers ``name`` adapts."""
    layout = registry.layout
    stacks = {id(layout.blocks[key[1]][0]) for key, member, _ in registry.placements_of(name)
              if isinstance(member, BottleneckConfig) and key[0] == "sublayer"}
    return [i for i, stack in enumerate(layout.spec.stacks) if id(stack) in stacks]


def _feed_forward_layers(registry: AdapterRegistry, stack_index: int,
                         name: str) -> list[tuple[int, nn.Linear, nn.Linear]]:
    """Return ``(block, ff_in, ff_out)`` for every block of a stack, raising ``ValueError`` if it cannot widen."""
    layout = registry.layout
    stack = layout.spec.stacks[stack_index]
    shape = stack.feed_forward_shape
    if shape is None:
        raise ValueError(
            f"Adapter {name!r} is a parallel adapter on the {stack.name} feed-forward sublayers of a "
            f"{layout.family!r} model, which normalise the residual input before their first projection, so no "
            "weight can hold the adapter. Keep it unmerged (a model family whose first feed-forward projection "
            "reads the residual input declares a FeedForwardShape in its StackSpec)")
    activation = getattr(registry.model.config, shape.activation, None)
    if activation not in WIDENING_ACTIVATIONS:
        raise ValueError(f"Adapter {name!r} cannot be merged: the {stack.name} feed-forward activation is "
                         f"{shape.activation}={activation!r}, and merging by widening needs one of "
                         f"{', '.join(WIDENING_ACTIVATIONS)}")
    refs = [stack.linear_refs(role) for role in ("ff_in", "ff_out")]
    if any(len(ref) != 1 or ref[0].parts != 1 for ref in refs):
        raise ValueError(f"Adapter {name!r} cannot be merged: the {stack.name} feed-forward sublayer needs one ff_in "
                         "and one ff_out projection, unsliced, to be widened")
    found = []
    for index in layout.indices(stack):
        first, second = layout.projection(index, "ff_in", 0), layout.projection(index, "ff_out", 0)
        if type(first) is not nn.Linear or type(second) is not nn.Linear or first.bias is None or second.bias is None:
            raise ValueError(f"Adapter {name!r} cannot be merged: block {index} needs nn.Linear feed-forward "
                             "projections with biases to be widened")
        found.append((index, first, second))
    return found


def _check_no_linear_members(registry: AdapterRegistry, stack_index: int, name: str, action: str) -> None:
    """Raise ``ValueError`` if some adapter has LoRA or (IA)^3 on the feed-forward projections of the stack."""
    layout = registry.layout
    blocks = set(layout.indices(layout.spec.stacks[stack_index]))
    for other in registry.entries:
        for key, _, _ in registry.placements_of(other):
            if key[0] == "linear" and key[1] in blocks and key[2] in ("ff_in", "ff_out"):
                raise ValueError(
                    f"Cannot {action} adapter {name!r}: it changes the width of the feed-forward projections, and "
                    f"adapter {other!r} has LoRA or (IA)^3 modules on {_describe(key)}, shaped for the current width. "
                    f"Delete {other!r} first, or keep {name!r} unmerged")


def _widened(registry: AdapterRegistry) -> dict[int, list[tuple[str, int]]]:
    """Return, per stack position, the merged parallel adapters and the units each added, in order."""
    return registry.__dict__.setdefault("widened_feed_forward", {})


def _dense(projection: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the weight ``(out, in)`` and bias ``(out,)`` of a bottleneck projection, in float64."""
    if isinstance(projection, PHMLinear):
        weight = projection.weight().T
        bias = projection.bias
    else:
        weight, bias = projection.weight, projection.bias
    weight = weight.double()
    return weight, bias.double() if bias is not None else weight.new_zeros(weight.shape[0])


def _scaled_up(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the up projection's weight ``(hidden, width)`` and bias with the adapter's scaling applied."""
    up, up_bias = _dense(adapter.up_proj)
    scaling = adapter.scaling
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.double()
        if scaling.numel() > 1:
            return up * scaling[:, None], up_bias * scaling
    return up * scaling, up_bias * scaling


def _set_weight(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Replace the parameters of ``layer`` by ``weight`` ``(out, in)`` and ``bias`` ``(out,)`` of a new shape."""
    layer.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(layer.bias.dtype), requires_grad=layer.bias.requires_grad)
    layer.out_features, layer.in_features = weight.shape


@torch.no_grad()
def _widen(registry: AdapterRegistry, name: str, sign: int) -> None:
    """Add (``sign=1``) or remove (``sign=-1``) the feed-forward units of parallel adapter members of ``name``."""
    modules = {key: module for key, member, module in registry.placements_of(name)
               if isinstance(member, BottleneckConfig) and key[0] == "sublayer"}
    if not modules:
        return
    config = registry.model.config
    widened = _widened(registry)
    for stack_index in _stack_indices(registry, name):
        shape = registry.layout.spec.stacks[stack_index].feed_forward_shape
        layers = _feed_forward_layers(registry, stack_index, name)
        entries = widened.setdefault(stack_index, [])
        width = 2 * next(iter(modules.values())).down_proj.out_features
        if sign > 0:
            offset = layers[0][1].out_features
        else:
            position = [entry[0] for entry in entries].index(name)
            offset = layers[0][1].out_features - sum(units for _, units in entries[position:])
        for index, first, second in layers:
            adapter = modules.get(("sublayer", index, "feed_forward"))
            w1, b1 = first.weight.double(), first.bias.double()
            w2, b2 = second.weight.double(), second.bias.double()
            if sign > 0:
                if adapter is None:
                    down = w1.new_zeros(width // 2, w1.shape[1])
                    down_bias = w1.new_zeros(width // 2)
                    up, up_bias = w2.new_zeros(w2.shape[0], width // 2), None
                else:
                    down, down_bias = _dense(adapter.down_proj)
                    up, up_bias = _scaled_up(adapter)
                w1 = torch.cat([w1, down, -down])
                b1 = torch.cat([b1, down_bias, -down_bias])
                w2 = torch.cat([w2, up, -up], dim=1)
            else:
                keep = torch.cat([torch.arange(offset), torch.arange(offset + width, w1.shape[0])])
                w1, b1, w2 = w1[keep], b1[keep], w2[:, keep]
                up_bias = None if adapter is None else -_scaled_up(adapter)[1]
            if up_bias is not None:
                b2 = b2 + up_bias
            _set_weight(first, w1, b1)
            _set_weight(second, w2, b2)
        if sign > 0:
            entries.append((name, width))
        else:
            del entries[position]
        setattr(config, shape.width, layers[0][1].out_features)


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
        rank: Rank of the ``"svd"`` result, an int >= 1; the largest source rank by default, with
            ``rank_pattern`` ranks included. The sum of sources of ranks ``r1`` and ``r2`` has rank at
            most ``r1 + r2``, so that rank reproduces it.

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
        rank = max(config.max_rank for config in configs)
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
