"""The registry of adapters on one model: their configs, modules, heads, and which ones are active.

Every adapter parameter lives under ``model.adapterkit["adapter_<name>"]``. Freezing, counting,
saving and deleting read that one declaration. Nothing matches substrings of parameter names, so
adapter names that are prefixes of each other cannot collide.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architectures import ArchitectureSpec
from .config import MethodConfig
from .heads import STORE_ATTRIBUTE, count_labels, head_module_names, is_freshly_initialised, resize_head
from .injection import (EmbeddingSite, FinalSite, LinearSite, PositionShiftSite, PrefixSite, PromptSite, Site,
                        SublayerSite)
from .layout import ModelLayout, build, check_fits, placements
from .merge import unmerge
from .prefix_attention import disable_prefix_attention, enable_prefix_attention

logger = logging.getLogger(__name__)

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
_BASE_HEAD_KEY = "base_head"


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
        """Remove adapter ``name`` with its modules, head and any hooks no other adapter needs."""
        self.check_names([name])
        if name in self.active:
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
            return PrefixSite(key, block.get_submodule(path), stack.causal, self.lookup)
        if kind == "positions":
            padding_idx = getattr(self.model.config, "pad_token_id", None)
            return PositionShiftSite(key, self.layout.submodule(""), self.spec.position_ids, padding_idx, self.lookup)
        if kind == "embeddings":
            scope = layout.submodule(self.spec.embeddings_scope) if self.spec.embeddings_scope else None
            return EmbeddingSite(key, layout.submodule(self.spec.embeddings), self.lookup, scope=scope)
        if kind == "final":
            return FinalSite(key, layout.submodule(self.spec.final), invert=self._has_tied_lm_head(), lookup=self.lookup)
        if kind == "prompt":
            return PromptSite(key, self.model, self.lookup)
        raise ValueError(f"Unknown site kind {kind!r}")

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
        if self.trainable_names():
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
        self.active = ()
        self.merged = []
        self._plan = {}

    # -- activation ------------------------------------------------------------------------------

    def set_active(self, names: list[str]) -> None:
        """Make ``names`` the adapters that run, in order, and put the last one's head on the model."""
        self.check_names(names)
        self.active = tuple(names)
        self._rebuild_plan()
        self._install_head(names[-1] if names else None)

    def lookup(self, key: tuple) -> list[tuple[MethodConfig, Any]]:
        """Return the (config, module) pairs that run at site ``key`` in the current forward, in order."""
        return self._plan.get(key, [])

    def _rebuild_plan(self) -> None:
        plan: dict[tuple, list[tuple[MethodConfig, Any]]] = {}
        for name in self.active:
            if name in self.merged:
                continue
            for key, member, payload in self.placements_of(name):
                plan.setdefault(key, []).append((member, payload))
        self._plan = plan

    def _install_head(self, name: str | None) -> None:
        """Put the head of adapter ``name`` (the base head for ``None``) on the model, with its labels."""
        if name is None:
            heads, labels = self.base_heads, None
        else:
            heads, labels = dict(self.store[store_key(name)]["head"].items()), self.entries[name].labels
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
        """Give adapter ``name``'s head the label values ``labels`` (class id i is ``labels[i]``).

        A head with another number of outputs is replaced when it was never trained, and otherwise
        rejected, so a trained head is only thrown away on request: ``new_head=True`` always starts
        a freshly initialised head.
        """
        entry = self.entries[name]
        head = self.store[store_key(name)]["head"]
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
        if self.active and self.active[-1] == name:
            self._install_head(name)

    # -- reporting -------------------------------------------------------------------------------

    def count_parameters(self, name: str, trainable_only: bool = False) -> int:
        """Return the number of parameters adapter ``name`` adds, head included."""
        return sum(p.numel() for p in self.modules_of(name).parameters()
                   if p.requires_grad or not trainable_only)

    def summary_rows(self) -> list[dict[str, Any]]:
        """Return one row per adapter: parameters, share of the base model, active and trainable."""
        # The base head counts as base model while it sits in the store behind an active adapter's head.
        adapter_ids = {id(p) for name in self.entries for p in self.store[store_key(name)].parameters()}
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
        return rows
