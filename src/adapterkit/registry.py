"""The registry of adapters on one model: their configs, modules, heads, and which ones are active.

Every adapter parameter lives under ``model.adapterkit["adapter_<name>"]``. Freezing, counting,
saving and deleting read that one declaration. Nothing matches substrings of parameter names, so
adapter names that are prefixes of each other cannot collide.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architectures import ArchitectureSpec
from .composition import (Block, RoutedHead, as_block, branch_heads, compile_site, composed_leaves, find_fusions,
                          head_owner, is_plain_stack, leaf_names, parallel_branches, repeat_batch, routing_plan,
                          validate, within_row_leaves)
from .config import MethodConfig
from .fusion import (FusionEntry, anneal_temperatures, check_active_fusions, fusion_key, fusion_layer,
                     trainable_fusions)
from .heads import STORE_ATTRIBUTE, count_labels, head_module_names, is_freshly_initialised, resize_head
from .injection import (EmbeddingSite, FinalSite, LinearSite, PositionShiftSite, PrefixSite, PromptSite, Site,
                        SublayerSite)
from .layout import ModelLayout, build, check_fits, placements
from .merge import unmerge
from .prefix_attention import disable_prefix_attention, enable_prefix_attention

logger = logging.getLogger(__name__)

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
_BASE_HEAD_KEY = "base_head"
# Site kinds whose hooks run every composition plan. Hooks at the other kinds act on whole rows, so
# adapters with modules there run only in Stack, BatchSplit, Parallel and per-row routing.
_COMPOSABLE_KINDS = ("sublayer", "linear")
_ROUTING_KEYWORD = "adapter_names"


@dataclass
class ForwardState:
    """The routing and swapped heads of one forward of the model, kept thread-locally on the registry.

    Attributes:
        routing: The adapter (or ``None``) of each input row, or ``None`` when the active adapters run.
        swapped_heads: The head modules that a ``RoutedHead`` replaced for this forward, to put back.
        prefix_outputs: The prefix-tuning outputs computed in this forward, by module (see
            ``AdapterRegistry.prefix_outputs``), or ``None`` where they are not kept.
    """

    routing: tuple[str | None, ...] | None = None
    swapped_heads: dict[str, nn.Module] | None = None
    prefix_outputs: dict[nn.Module, tuple[bool, torch.Tensor]] | None = None


@dataclass
class AdapterEntry:
    """The registry record of one adapter, apart from its modules.

    Attributes:
        config: The adapter's configuration.
        labels: The label values of its head, in class-id order, or ``None`` if the head still has
            the base model's labels.
        head_trained: Whether the head's weights were trained or loaded, so must not be replaced silently.
    """

    config: MethodConfig
    labels: list[Any] | None = None
    head_trained: bool = False


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """Return the batch size of a model call: the rows of its token ids or input embeddings."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class StatefulCheckpoint:
    """A module's checkpoint function that restores the registry's forward state when it recomputes.

    An object rather than a closure, so that ``copy.deepcopy`` and pickling of the model point the
    copy's wrapper at the copy's registry.

    Args:
        registry: The registry whose thread-local forward state to capture and restore.
        function: The checkpoint function transformers set on the module.
    """

    def __init__(self, registry: AdapterRegistry, function: Any):
        self.registry = registry
        self.function = function

    def __call__(self, run: Any, *args: Any, **kwargs: Any) -> Any:
        registry = self.registry
        current = registry._current_state()
        captured = ForwardState(routing=current.routing if current is not None else None)

        def run_with_state(*run_args: Any, **run_kwargs: Any) -> Any:
            stack = registry._state_stack()
            stack.append(captured)
            try:
                return run(*run_args, **run_kwargs)
            finally:
                stack.pop()

        return self.function(run_with_state, *args, **kwargs)


def store_key(name: str) -> str:
    """Return the module key of adapter ``name``; the prefix keeps names clear of ``nn.ModuleDict`` attributes."""
    return f"adapter_{name}"


class AdapterRegistry:
    """The adapters of one model and the hooks that run them.

    Args:
        model: The transformers model, which must already carry ``config`` and ``base_model``.
        spec: Where the model's blocks and sublayers are.
    """

    def __init__(self, model: nn.Module, spec: ArchitectureSpec):
        self.model = model
        self.spec = spec
        self.family = getattr(model.config, "model_type", "")
        self.layout = ModelLayout(model, spec)
        self.entries: dict[str, AdapterEntry] = {}
        self.active: tuple[str, ...] = ()
        # The active composition block, or None when the active adapters form a plain stack.
        self.active_block: Block | None = None
        # The AdapterFusion records by fusion name (see ``fusion``). Their modules live in the store too.
        self.fusions: dict[str, FusionEntry] = {}
        # The adapter or fusion whose head is on the model, or None for the base head.
        self.head_owner: str | None = None
        self.sites: dict[tuple, Site] = {}
        self.head_names = head_module_names(model)
        self.base_heads = {name: getattr(model, name) for name in self.head_names}
        self.base_head_fresh = is_freshly_initialised(self.base_heads, model)
        self.base_labels = dict(getattr(model.config, "id2label", None) or {})
        self._plan: dict[tuple, list[tuple[MethodConfig, Any]]] = {}
        # Adapters whose effect is merged into the base weights, in merge order; they run through no hook.
        self.merged: list[str] = []
        self.tokenizer = None
        self._input_hooks: list[Any] = []
        self._pairs_by_name: dict[str, dict[tuple, list[tuple[MethodConfig, Any]]]] = {}
        self._local = threading.local()
        self._forward_hooks: list[Any] = []

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_local"] = None  # thread-local storage cannot be pickled or copied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # -- modules -------------------------------------------------------------------------------

    @property
    def store(self) -> nn.ModuleDict:
        """The ``nn.ModuleDict`` on the model that owns every adapter module, created on first use."""
        store = self.model._modules.get(STORE_ATTRIBUTE)
        if store is None:
            store = nn.ModuleDict().train(self.model.training)
            setattr(self.model, STORE_ATTRIBUTE, store)
        return store

    def modules_of(self, name: str) -> nn.ModuleDict:
        """Return the ``nn.ModuleDict`` with the ``layers`` and ``head`` of adapter ``name``."""
        self.check_names([name])
        return self.store[store_key(name)]

    def check_names(self, names: list[str]) -> None:
        """Raise ``ValueError`` naming every entry of ``names`` that is not an adapter of this model."""
        unknown = [n for n in names if n not in self.entries]
        if unknown:
            known = ", ".join(self.entries) or "none"
            raise ValueError(f"No adapter named {', '.join(map(repr, unknown))} on this model; adapters: {known}")

    # -- adding and deleting ---------------------------------------------------------------------

    def add(self, name: str, config: MethodConfig) -> None:
        """Create adapter ``name``: the modules of each method in ``config``, plus a copy of the base head."""
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ValueError(f"Invalid adapter name {name!r}: use letters, digits, '_' and '-' only")
        if name in self.entries:
            raise ValueError(f"An adapter named {name!r} already exists; delete_adapter({name!r}) first "
                             "or choose another name")
        if name in self.fusions:
            raise ValueError(f"{name!r} is the name of a fusion; choose another adapter name")
        check_fits(self.layout, config)  # raises before anything is built

        reference = next(self.model.base_model.parameters())
        methods = nn.ModuleDict({str(i): build(self.layout, member) for i, member in enumerate(config.methods)})
        head = nn.ModuleDict({n: copy.deepcopy(self.base_heads[n]) for n in self.head_names})
        modules = nn.ModuleDict({"methods": methods, "head": head})
        modules.to(device=reference.device, dtype=reference.dtype)
        modules.requires_grad_(False)
        modules.train(self.model.training)

        self.store[store_key(name)] = modules
        self.entries[name] = AdapterEntry(config=config, head_trained=not self.base_head_fresh)
        self._install_sites()
        logger.info("Added adapter %r (%s): %d parameters", name, config.architecture, self.count_parameters(name))

    def placements_of(self, name: str) -> list[tuple[tuple, MethodConfig, Any]]:
        """Return ``(site key, member config, payload)`` for every module of adapter ``name``."""
        methods = self.store[store_key(name)]["methods"]
        found = []
        for index, member in enumerate(self.entries[name].config.methods):
            found.extend((key, member, payload) for key, payload in placements(self.layout, member, methods[str(index)]))
        return found

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` with its modules, head and any hooks no other adapter needs.

        Raises:
            ValueError: If a fusion fuses the adapter; delete the fusion first.
        """
        self.check_names([name])
        fusions = [fusion for fusion, entry in self.fusions.items() if name in leaf_names(entry.block)]
        if fusions:
            raise ValueError(f"Adapter {name!r} is fused by {', '.join(map(repr, fusions))}; "
                             f"delete_adapter_fusion({fusions[0]!r}) first")
        if name in self.active and self.active_block is not None:
            logger.warning("Deleting adapter %r, part of the active block %r; no adapter is active now",
                           name, self.active_block)
            self.set_active([])
        elif name in self.active:
            self.set_active([n for n in self.active if n != name])
        if name in self.merged:
            unmerge(self, name)
        del self.store[store_key(name)]
        del self.entries[name]
        if not self.entries:
            del self.model._modules[STORE_ATTRIBUTE]
        self._install_sites()

    def _install_sites(self) -> None:
        """Hook every place that some adapter has a module for, and unhook the rest."""
        needed = {key for name in self.entries for key, _, _ in self.placements_of(name)}
        for key in set(self.sites) - needed:
            self.sites.pop(key).remove()
        if any(key[0] == "prefix" for key in needed):
            enable_prefix_attention(self.model)
        for key in sorted(needed - set(self.sites), key=repr):
            self.sites[key] = self._new_site(key)
        if not any(key[0] == "prefix" for key in needed):
            disable_prefix_attention(self.model)
        self._update_input_hook()
        self._update_forward_hooks()
        self._rebuild_plan()

    def _new_site(self, key: tuple) -> Site:
        layout = self.layout
        kind = key[0]
        if kind == "sublayer":
            stack, block = layout.blocks[key[1]]
            mask_source = block.get_submodule(stack.attention_module) if stack.attention_module else None
            return SublayerSite(key, block, stack.sublayers()[key[2]], stack.causal, self.lookup, family=self.family,
                                mask_source=mask_source)
        if kind == "linear":
            _, index, role, number = key
            stack, _ = layout.blocks[index]
            return LinearSite(key, layout.projection(index, role, number), stack.linear_refs(role)[number],
                              scale_input=role == "ff_out", lookup=self.lookup)
        if kind == "prefix":
            stack, block = layout.blocks[key[1]]
            path = stack.attention_module if key[2] == "self" else stack.cross_attention_module
            return PrefixSite(key, block.get_submodule(path), stack.causal, self.lookup, self.prefix_outputs)
        if kind == "positions":
            padding_idx = getattr(self.model.config, "pad_token_id", None)
            return PositionShiftSite(key, self.layout.submodule(""), self.spec.position_ids, padding_idx, self.lookup)
        if kind == "embeddings":
            scope = layout.submodule(self.spec.embeddings_scope) if self.spec.embeddings_scope else None
            return EmbeddingSite(key, layout.submodule(self.spec.embeddings), self.lookup, scope=scope)
        if kind == "final":
            return FinalSite(key, layout.submodule(self.spec.final), invert=self._has_tied_lm_head(), lookup=self.lookup)
        if kind == "prompt":
            return PromptSite(key, self.model, self.lookup, causal=self.spec.stacks[0].causal)
        raise ValueError(f"Unknown site kind {kind!r}")

    def _update_forward_hooks(self) -> None:
        """Hook the model's forward while it has adapters, for ``adapter_names`` and ``Parallel`` copies."""
        if self.entries and not self._forward_hooks:
            # The pre-hook runs first, so that no other hook receives the adapter_names argument.
            self._forward_hooks = [
                self.model.register_forward_pre_hook(self._begin_forward, with_kwargs=True, prepend=True),
                self.model.register_forward_hook(self._end_forward, always_call=True),
            ]
        elif not self.entries and self._forward_hooks:
            for hook in self._forward_hooks:
                hook.remove()
            self._forward_hooks = []

    def _has_tied_lm_head(self) -> bool:
        """Return whether the model's output layer shares its weight with the input embeddings."""
        try:
            output, embeddings = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return False
        return output is not None and embeddings is not None and output.weight is embeddings.weight

    def _update_input_hook(self) -> None:
        """Hook the input embeddings while the model has adapters, so that checkpointing keeps their gradients.

        Reentrant ``torch.utils.checkpoint`` computes no parameter gradients inside a checkpointed
        block unless one of the block's inputs requires grad, and frozen embeddings do not.

        Every module that shares the embedding weight is hooked: BART's encoder and decoder each run
        their own copy of the ``shared`` module, which itself never runs. transformers 5 also hooks
        those copies when checkpointing is enabled, but 4.57 does so only for PEFT models.
        """
        if self.entries and not self._input_hooks:
            try:
                embeddings = self.model.get_input_embeddings()
            except (AttributeError, NotImplementedError):
                return
            if embeddings is None:
                return
            weight = getattr(embeddings, "weight", None)
            sharing = [module for module in self.model.modules()
                       if module is embeddings or (weight is not None and getattr(module, "weight", None) is weight)]
            self._input_hooks = [module.register_forward_hook(self._require_input_grad) for module in sharing]
        elif not self.entries and self._input_hooks:
            for hook in self._input_hooks:
                hook.remove()
            self._input_hooks = []

    def _checkpointing(self) -> bool:
        # transformers 5 renamed the property; 4.57 has only the old name.
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            if hasattr(type(self.model), name):
                return bool(getattr(self.model, name))
        return False

    def _require_input_grad(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad):
            return
        if not self.model.training or not self._checkpointing():
            return
        if self.trainable_names() or trainable_fusions(self):
            output.requires_grad_(True)

    def unload(self) -> None:
        """Remove every hook, wrapper and module that adapterkit added, keeping the current weights and head."""
        for site in self.sites.values():
            site.remove()
        self.sites = {}
        disable_prefix_attention(self.model)
        for hook in self._input_hooks:
            hook.remove()
        self._input_hooks = []
        self.model._modules.pop(STORE_ATTRIBUTE, None)
        self.entries = {}
        self.fusions = {}
        self.active = ()
        self.active_block = None
        self.merged = []
        self._plan = {}
        for hook in self._forward_hooks:
            hook.remove()
        self._forward_hooks = []

    # -- activation ------------------------------------------------------------------------------

    def set_active(self, names: Sequence[str] | Block | None) -> None:
        """Make ``names`` the adapters that run and put the last one's head on the model.

        Args:
            names: Adapter names, run in order, or a composition block (see ``composition``).

        Raises:
            ValueError: If an adapter is unknown, a block nests another one that it cannot contain,
                a ``Fuse`` names no fusion of the model or fuses an adapter that is not a
                bottleneck adapter, or a merged adapter sits inside a block other than ``Stack``.
            ValueError: Also if an adapter with prefix tuning, prompt tuning, an invertible adapter
                or a before-head adapter sits inside an ``Average``, ``Split`` or ``Fuse``, which mix
                values within a row at one site, while those methods change a whole row.
        """
        block = as_block(names)
        if block is None or is_plain_stack(block):
            leaves = leaf_names(block) if block is not None else []
            self.check_names(leaves)
            self.active, self.active_block = tuple(leaves), None
        else:
            validate(block, self.entries)
            check_active_fusions(self, block)
            self._check_composable(block)
            self.active, self.active_block = tuple(dict.fromkeys(leaf_names(block))), block
        self._rebuild_plan()
        self._install_head(head_owner(block) if block is not None else None)

    def _check_composable(self, block: Block) -> None:
        for name in dict.fromkeys(composed_leaves(block)):
            if name in self.merged:
                raise ValueError(f"Adapter {name!r} is merged into the base weights, so it acts on every row and "
                                 f"cannot run inside {block!r}; unmerge_adapter({name!r}) first")
        for name in dict.fromkeys(within_row_leaves(block)):
            kinds = sorted({key[0] for key in self._pairs_by_name.get(name, {}) if key[0] not in _COMPOSABLE_KINDS})
            if kinds:
                raise ValueError(
                    f"Adapter {name!r} has modules at {', '.join(kinds)} sites, which act on whole rows, but it "
                    f"sits inside an Average, Split or Fuse in {block!r}. Those blocks cover bottleneck adapters, "
                    "LoRA and (IA)^3; Stack, BatchSplit and Parallel cover every method")

    def lookup(self, key: tuple) -> Any:
        """Return what runs at site ``key`` in the current forward.

        That is a list of (config, module) pairs, run in order, or, under a composition block or
        per-row routing, a plan. Sublayer and linear sites run it with ``composition.run_plan``, and
        the sites of whole-row methods read it per row group with ``composition.row_pairs``.
        """
        state = self._current_state()
        if state is not None and state.routing is not None:
            return routing_plan(state.routing, lambda name: self._pairs_by_name[name].get(key, []))
        return self._plan.get(key, [])

    def _rebuild_plan(self) -> None:
        self._pairs_by_name = {}
        for name in self.entries:
            by_key: dict[tuple, list[tuple[MethodConfig, Any]]] = {}
            for key, member, payload in self.placements_of(name):
                by_key.setdefault(key, []).append((member, payload))
            self._pairs_by_name[name] = by_key
        plan: dict[tuple, Any] = {}
        block = self.active_block
        if block is None:
            for name in self.active:
                if name in self.merged:
                    continue
                for key, pairs in self._pairs_by_name[name].items():
                    plan.setdefault(key, []).extend(pairs)
            self._plan = plan
            return
        keys = {key for name in self.active for key in self._pairs_by_name.get(name, {})}
        for key in keys:
            # Adapters at whole-row sites sit only in Stack, BatchSplit and Parallel (see _check_composable),
            # so their plans contain Chain and RowSplit nodes, which those sites read with row_pairs.
            compiled = compile_site(block, lambda name: [] if name in self.merged
                                    else self._pairs_by_name[name].get(key, []),
                                    lambda fuse: fusion_layer(self, fuse, key))
            if compiled is not None:
                plan[key] = compiled
        self._plan = plan

    # -- per-forward state: routing, Parallel copies, checkpointing ----------------------------------

    def _state_stack(self) -> list[ForwardState]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _current_state(self) -> ForwardState | None:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else None

    def prefix_outputs(self) -> dict[nn.Module, tuple[bool, torch.Tensor]] | None:
        """Return where this forward keeps the outputs of its prefix-tuning modules, or ``None``.

        A ``PrefixTuning`` module's MLP runs once per forward for all its layers, and each attention
        layer takes its columns of the output. Per layer, the backward of a slice of the MLP's last
        weight would fill a zero tensor the size of the whole weight. The dict maps the module to
        whether autograd recorded the output, and the output. Outside a forward of the model, and
        with gradient checkpointing, whose recomputation would run backward through a shared output
        more than once, there is none.
        """
        state = self._current_state()
        return None if state is None else state.prefix_outputs

    def check_routing(self, names: Sequence[str | None], batch_size: int | None) -> tuple[str | None, ...]:
        """Return ``names`` as a tuple after checking them as per-row adapter names.

        Raises:
            ValueError: If a name is unknown, the count differs from ``batch_size``, an adapter is
                merged, or a Parallel block is active.
        """
        if isinstance(names, str):
            raise ValueError(f"adapter_names={names!r} must be a list with one adapter name (or None) per row")
        names = tuple(names)
        unknown = sorted({n for n in names if n is not None and n not in self.entries})
        if unknown:
            known = ", ".join(self.entries) or "none"
            raise ValueError(f"adapter_names lists unknown adapters {', '.join(map(repr, unknown))}; adapters: {known}")
        if batch_size is not None and len(names) != batch_size:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch_size} rows; "
                             "pass one adapter name (or None) per row")
        if self.merged:
            raise ValueError(f"Adapters {self.merged} are merged into the base weights and act on every row; "
                             "unmerge them before routing rows to adapters")
        if self.active_block is not None and parallel_branches(self.active_block) is not None:
            raise ValueError(f"The active block {self.active_block!r} repeats the input per branch, which per-row "
                             "routing cannot combine with; activate a Stack or None first")
        return names

    @contextlib.contextmanager
    def routing(self, names: Sequence[str | None], batch_size: int | None = None) -> Iterator[None]:
        """Send row ``i`` of every forward inside the context through adapter ``names[i]`` alone.

        A forward whose batch has ``f * len(names)`` rows (beam search, ``num_return_sequences``)
        reads rows ``i * f`` to ``i * f + f - 1`` as copies of row ``i``, which is how
        ``generate`` repeats its inputs.
        """
        names = self.check_routing(names, batch_size)
        stack = self._state_stack()
        stack.append(ForwardState(routing=names))
        try:
            yield
        finally:
            stack.pop()

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        names = kwargs.pop(_ROUTING_KEYWORD, None)
        batch_size = _batch_size(args, kwargs)
        current = self._current_state()
        # Pushed before any check can raise, because ``_end_forward`` runs (and pops) even then.
        state = ForwardState(routing=current.routing if current is not None else None)
        self._state_stack().append(state)
        if names is not None:
            state.routing = self.check_routing(names, batch_size)
        routing = state.routing
        if self._checkpointing():
            self._wrap_checkpoint_functions()
        else:
            state.prefix_outputs = {}

        block = self.active_block
        if block is not None and routing is None and self.model.training and torch.is_grad_enabled():
            anneal_temperatures(self, block)
        parallel = parallel_branches(block) if block is not None else None
        heads = branch_heads(block) if block is not None and routing is None else None
        if parallel is not None and routing is None and batch_size is not None:
            copies = len(parallel.children)
            args = tuple(repeat_batch(value, batch_size, copies) for value in args)
            kwargs = {key: repeat_batch(value, batch_size, copies) for key, value in kwargs.items()}
        if heads is not None:
            state.swapped_heads = self._swap_heads(*heads)
        elif names is not None:
            order = list(dict.fromkeys(routing))
            groups = [[i for i, name in enumerate(routing) if name == group] for group in order]
            state.swapped_heads = self._swap_heads(order, groups, len(routing))
        return args, kwargs

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = self._state_stack()
        if not stack:
            return
        state = stack.pop()
        for head_name, head in (state.swapped_heads or {}).items():
            setattr(self.model, head_name, head)

    def _swap_heads(self, names: list[str | None], groups: list[list[int]], base_rows: int) -> dict[str, nn.Module]:
        """Put a ``RoutedHead`` in place of each head module; the head of ``names[k]`` serves rows ``groups[k]``.

        Each name is an adapter, a fusion or ``None`` (the base head).

        NOTE: the swap changes the model object for the length of one forward, so two threads
        running the same model at once can see each other's heads.
        """
        swapped = {}
        for head_name in self.head_names:
            heads = [self.base_heads[head_name] if name is None else self.head_modules(name)[head_name]
                     for name in names]
            swapped[head_name] = getattr(self.model, head_name)
            setattr(self.model, head_name, RoutedHead(heads, groups, base_rows))
        return swapped

    def _wrap_checkpoint_functions(self) -> None:
        """Make every ``_gradient_checkpointing_func`` restore this forward's state when it recomputes.

        transformers' ``gradient_checkpointing_enable`` sets that function on each checkpointed
        module. Non-reentrant checkpointing recomputes during backward, after the forward's state
        has been popped, so the wrapper captures the state when the block first runs.
        """
        for submodule in self.model.modules():
            function = submodule.__dict__.get("_gradient_checkpointing_func")
            if function is None or isinstance(function, StatefulCheckpoint):
                continue
            submodule._gradient_checkpointing_func = self._checkpoint_with_state(function)

    def _checkpoint_with_state(self, function: Any) -> Any:
        return StatefulCheckpoint(self, function)

    def head_modules(self, name: str) -> nn.ModuleDict:
        """Return the head modules of adapter or fusion ``name``."""
        key = fusion_key(name) if name in self.fusions else store_key(name)
        return self.store[key]["head"]

    def head_entry(self, name: str) -> AdapterEntry | FusionEntry:
        """Return the record of adapter or fusion ``name``, which contains its head's labels."""
        if name in self.fusions:
            return self.fusions[name]
        self.check_names([name])
        return self.entries[name]

    def training_head_owner(self) -> str | None:
        """Return the adapter or fusion whose head ``fit`` trains, or ``None`` when nothing is trainable.

        That is the installed head's fusion when it is trainable (after ``train_adapter_fusion``),
        otherwise the last active adapter with trainable parameters.
        """
        if self.head_owner in self.fusions and self.head_owner in trainable_fusions(self):
            return self.head_owner
        fused = self.active_block is not None and bool(find_fusions(self.active_block))
        if fused and self.head_owner is not None:
            if any(p.requires_grad for p in self.head_modules(self.head_owner).parameters()):
                return self.head_owner
        trainable = [name for name in self.active if name in self.trainable_names()]
        return trainable[-1] if trainable else None

    def _install_head(self, name: str | None) -> None:
        """Put the head of adapter or fusion ``name`` (the base head for ``None``) on the model, with its labels."""
        self.head_owner = name
        if name is None:
            heads, labels = self.base_heads, None
        else:
            heads, labels = dict(self.head_modules(name).items()), self.head_entry(name).labels
        if not heads:
            return
        for head_name, module in heads.items():
            setattr(self.model, head_name, module)
        # A base head taken off the model stays registered, so that .to() and state_dict still reach it.
        if name is None:
            store = self.model._modules.get(STORE_ATTRIBUTE)
            if store is not None and _BASE_HEAD_KEY in store:
                del store[_BASE_HEAD_KEY]
        else:
            self.store[_BASE_HEAD_KEY] = nn.ModuleDict(self.base_heads).train(self.model.training)
        config = self.model.config
        if labels is None:
            id2label = dict(self.base_labels) or {i: f"LABEL_{i}" for i in range(count_labels(heads))}
        else:
            id2label = {i: str(label) for i, label in enumerate(labels)}
        config.id2label = id2label
        config.label2id = {label: i for i, label in id2label.items()}
        if hasattr(self.model, "num_labels"):
            self.model.num_labels = len(id2label)

    # -- training state --------------------------------------------------------------------------

    def train(self, names: list[str]) -> None:
        """Freeze every parameter of the model, then unfreeze adapters ``names`` and their heads."""
        self.check_names(names)
        self.model.requires_grad_(False)
        for name in names:
            self.store[store_key(name)].requires_grad_(True)
        self.set_active(names)

    def trainable_names(self) -> list[str]:
        """Return the adapters that have at least one parameter with ``requires_grad``."""
        return [n for n in self.entries
                if any(p.requires_grad for p in self.store[store_key(n)].parameters())]

    def set_labels(self, name: str, labels: list[Any], *, new_head: bool = False) -> None:
        """Give the head of adapter or fusion ``name`` the label values ``labels`` (class id i is ``labels[i]``).

        A head with another number of outputs is replaced when it was never trained, and otherwise
        rejected, so a trained head is only thrown away on request: ``new_head=True`` always starts
        a freshly initialised head.
        """
        entry = self.head_entry(name)
        head = self.head_modules(name)
        if not len(head):
            raise ValueError(f"{type(self.model).__name__} has no classification head to train labels into; "
                             "load the model with a task class such as AutoModelForSequenceClassification")
        current = count_labels(dict(head.items()))
        if new_head:
            entry.head_trained = False
        if current != len(labels) or new_head:
            if entry.head_trained:
                raise ValueError(
                    f"The head of adapter {name!r} was trained for {current} labels, but the data has "
                    f"{len(labels)} ({labels}). Pass replace_head=True to fit to start a new head"
                )
            init_std = getattr(self.model.config, "initializer_range", 0.02)
            resize_head(head, current, len(labels), init_std)
            logger.info("Resized the head of adapter %r from %d to %d labels", name, current, len(labels))
        entry.labels = list(labels)
        if self.head_owner == name:
            self._install_head(name)

    # -- reporting -------------------------------------------------------------------------------

    def count_parameters(self, name: str, trainable_only: bool = False) -> int:
        """Return the number of parameters adapter ``name`` adds, head included."""
        return sum(p.numel() for p in self.modules_of(name).parameters()
                   if p.requires_grad or not trainable_only)

    def summary_rows(self) -> list[dict[str, Any]]:
        """Return one row per adapter: parameters, share of the base model, active and trainable."""
        # The base head counts as base model while it sits in the store behind an active adapter's head.
        owned = [store_key(name) for name in self.entries] + [fusion_key(name) for name in self.fusions]
        adapter_ids = {id(p) for key in owned for p in self.store[key].parameters()}
        base_total = sum(p.numel() for p in self.model.parameters() if id(p) not in adapter_ids)
        rows = []
        for name, entry in self.entries.items():
            modules = self.store[store_key(name)]
            total = sum(p.numel() for p in modules.parameters())
            head = sum(p.numel() for p in modules["head"].parameters())
            rows.append({
                "name": name,
                "architecture": entry.config.architecture,
                "parameters": total,
                "head_parameters": head,
                "trainable": sum(p.numel() for p in modules.parameters() if p.requires_grad),
                "percent_of_base": 100.0 * total / base_total,
                "active": name in self.active,
            })
        active_fusions = {fuse.name for fuse in find_fusions(self.active_block)} if self.active_block else set()
        for name in self.fusions:
            modules = self.store[fusion_key(name)]
            total = sum(p.numel() for p in modules.parameters())
            rows.append({
                "name": name,
                "architecture": "fusion",
                "parameters": total,
                "head_parameters": sum(p.numel() for p in modules["head"].parameters()),
                "trainable": sum(p.numel() for p in modules.parameters() if p.requires_grad),
                "percent_of_base": 100.0 * total / base_total,
                "active": name in active_fusions,
            })
        return rows
