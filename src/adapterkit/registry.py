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

from torch import nn

from .architectures import ArchitectureSpec, get_layers
from .config import BottleneckConfig
from .heads import STORE_ATTRIBUTE, count_labels, head_module_names, is_freshly_initialised, resize_head
from .injection import Site
from .methods.bottleneck import Bottleneck

logger = logging.getLogger(__name__)

SUBLAYERS = ("attention", "feed_forward")
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

    config: BottleneckConfig
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
        self.layers = get_layers(model, spec)
        self.entries: dict[str, AdapterEntry] = {}
        self.active: tuple[str, ...] = ()
        self.sites: dict[tuple[int, str], Site] = {}
        self.head_names = head_module_names(model)
        self.base_heads = {name: getattr(model, name) for name in self.head_names}
        self.base_head_fresh = is_freshly_initialised(self.base_heads)
        self.base_labels = dict(getattr(model.config, "id2label", None) or {})
        self._plan: dict[tuple[int, str], list[tuple[BottleneckConfig, Bottleneck]]] = {}
        self.tokenizer = None

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

    def add(self, name: str, config: BottleneckConfig) -> None:
        """Create adapter ``name``: one module per placed sublayer, plus a copy of the base head."""
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ValueError(f"Invalid adapter name {name!r}: use letters, digits, '_' and '-' only")
        if name in self.entries:
            raise ValueError(f"An adapter named {name!r} already exists; delete_adapter({name!r}) first "
                             "or choose another name")
        hidden_size = self.model.config.hidden_size
        width = config.bottleneck_width(hidden_size)  # raises before anything is built
        out_of_range = [i for i in config.leave_out if i >= len(self.layers)]
        if out_of_range:
            raise ValueError(f"leave_out={list(config.leave_out)} names blocks {out_of_range}, but the model "
                             f"has {len(self.layers)} blocks (0 to {len(self.layers) - 1})")

        reference = next(self.model.base_model.parameters())
        layers = nn.ModuleDict()
        for index in range(len(self.layers)):
            if index in config.leave_out:
                continue
            places = nn.ModuleDict()
            if config.mh_adapter:
                places["attention"] = Bottleneck(hidden_size, config)
            if config.output_adapter:
                places["feed_forward"] = Bottleneck(hidden_size, config)
            layers[str(index)] = places
        head = nn.ModuleDict({n: copy.deepcopy(self.base_heads[n]) for n in self.head_names})
        modules = nn.ModuleDict({"layers": layers, "head": head})
        modules.to(device=reference.device, dtype=reference.dtype)
        modules.requires_grad_(False)
        modules.train(self.model.training)

        self.store[store_key(name)] = modules
        self.entries[name] = AdapterEntry(config=config, head_trained=not self.base_head_fresh)
        self._install_sites()
        logger.info("Added adapter %r (%s, bottleneck %d): %d parameters",
                    name, config.architecture, width, self.count_parameters(name))

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` with its modules, head and any hooks no other adapter needs."""
        self.check_names([name])
        if name in self.active:
            self.set_active([n for n in self.active if n != name])
        del self.store[store_key(name)]
        del self.entries[name]
        if not self.entries:
            del self.model._modules[STORE_ATTRIBUTE]
        self._install_sites()

    def _install_sites(self) -> None:
        """Hook every sublayer that some adapter has a module for, and unhook the rest."""
        needed = set()
        for name in self.entries:
            for index, places in self.store[store_key(name)]["layers"].items():
                needed.update((int(index), sublayer) for sublayer in places)
        for place in set(self.sites) - needed:
            self.sites.pop(place).remove()
        for index, sublayer in sorted(needed - set(self.sites)):
            sublayer_spec = getattr(self.spec, sublayer)
            self.sites[(index, sublayer)] = Site(index, sublayer, self.layers[index], sublayer_spec,
                                                 self.lookup, family=self.family)
        self._rebuild_plan()

    # -- activation ------------------------------------------------------------------------------

    def set_active(self, names: list[str]) -> None:
        """Make ``names`` the adapters that run, in order, and put the last one's head on the model."""
        self.check_names(names)
        self.active = tuple(names)
        self._rebuild_plan()
        self._install_head(names[-1] if names else None)

    def lookup(self, layer_index: int, sublayer: str) -> list[tuple[BottleneckConfig, Bottleneck]]:
        """Return the (config, module) pairs that run at one sublayer in the current forward."""
        return self._plan.get((layer_index, sublayer), [])

    def _rebuild_plan(self) -> None:
        plan: dict[tuple[int, str], list[tuple[BottleneckConfig, Bottleneck]]] = {}
        for name in self.active:
            config = self.entries[name].config
            for index, places in self.store[store_key(name)]["layers"].items():
                for sublayer, module in places.items():
                    plan.setdefault((int(index), sublayer), []).append((config, module))
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
