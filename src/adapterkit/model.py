"""``adapterkit.init(model)``: give a transformers model adapterkit's adapter verbs.

``init`` changes the class of the model object to a subclass that adds the verbs below in front of
the model's own class, so these methods take the place of the PEFT-backed ``add_adapter``,
``load_adapter`` and friends that transformers defines. The object, its weights and its ``forward``
stay the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import fusion, io, merge
from .architectures import ArchitectureSpec, find_architecture
from .composition import Block, Fuse, parallel_branches
from .config import FusionConfig, MethodConfig, resolve_config
from .registry import AdapterRegistry

logger = logging.getLogger(__name__)

_ADAPTER_CLASSES: dict[type, type] = {}


def _as_names(names: str | Sequence[str] | None) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    return list(names)


def _restore_adapter_model(base_class: type) -> nn.Module:
    """Create an empty instance of the adapter class for ``base_class``; pickle fills in its state."""
    cls = adapter_class(base_class)
    return cls.__new__(cls)


class AdapterModelMixin:
    """The adapter verbs that ``adapterkit.init`` adds to a model."""

    _adapterkit: AdapterRegistry

    def __reduce_ex__(self, protocol: int) -> tuple:
        # The subclass is made at run time, so pickle and deepcopy rebuild it from the base class.
        return _restore_adapter_model, (self._adapterkit_base_class,), self.__dict__

    # -- managing adapters -----------------------------------------------------------------------

    def add_adapter(self, name: str, config: MethodConfig | str | dict | None = None, *,
                    set_active: bool = False) -> None:
        """Add a new, frozen adapter called ``name``.

        Args:
            name: Letters, digits, ``_`` and ``-``.
            config: A method config (``BottleneckConfig``, ``LoRAConfig``, ``IA3Config``,
                ``PrefixTuningConfig``, ``PromptTuningConfig``, ``InvertibleConfig`` or a ``ConfigUnion`` of
                them), a preset name
                from ``adapterkit.PRESETS`` (``"lora"``, ``"mam"``, ...), a dict from ``config.to_dict()``,
                or ``None`` for ``"pfeiffer"``.
            set_active: Make it the only active adapter.

        Raises:
            ValueError: If the name is taken or invalid, or the config does not fit this model.
        """
        self._adapterkit.add(name, resolve_config(config))
        if set_active:
            self.set_active_adapters(name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``: its modules, head and hooks; the model computes as before it was added."""
        self._adapterkit.delete(name)

    def train_adapter(self, names: str | Sequence[str]) -> None:
        """Freeze the whole model, then unfreeze adapters ``names`` and their heads, and activate them."""
        names = _as_names(names)
        if not names:
            raise ValueError("train_adapter needs at least one adapter name")
        self._adapterkit.train(names)

    def set_active_adapters(self, names: str | Sequence[str] | Block | None) -> None:
        """Run adapters ``names`` in every forward, in order; ``None`` or ``[]`` runs the bare model.

        ``names`` may also be a composition block such as ``Average("a", "b")``, ``Fuse("a", "b")``
        or ``Parallel("a", "b")``; see ``adapterkit.composition``. A list of names is a ``Stack``.

        Raises:
            ValueError: If an adapter is unknown, the block nests blocks it cannot contain, a
                ``Fuse`` names no fusion added with ``add_adapter_fusion``, or prefix tuning, prompt
                tuning, invertible or before-head adapters sit inside an ``Average``, ``Split`` or
                ``Fuse``, blocks that mix values within a row.
        """
        self._adapterkit.set_active(names if isinstance(names, Block) else _as_names(names))

    # -- AdapterFusion -------------------------------------------------------------------------------

    def add_adapter_fusion(self, fuse: Fuse | Sequence[str | Block] | str,
                           config: FusionConfig | str | dict | None = "dynamic", name: str | None = None, *,
                           set_active: bool = False) -> str:
        """Add frozen AdapterFusion layers over the adapters of ``fuse`` and return the fusion's name.

        Args:
            fuse: ``Fuse("a", "b")``, a list of adapter names (or ``Stack`` blocks), or ``"a,b"``.
                Every adapter must be a bottleneck adapter already on the model.
            config: A ``FusionConfig``, a preset (``"dynamic"``, ``"static"``) or its dict.
            name: The fusion's name; by default ``fuse.name`` (``"a,b"``).
            set_active: Activate the fusion.

        Raises:
            ValueError: If the name is taken, an adapter is unknown or not a bottleneck adapter, or
                the block nests blocks that ``Fuse`` cannot contain.
        """
        added = fusion.add_fusion(self._adapterkit, fuse, config, name)
        if set_active:
            self.set_active_adapters(self._adapterkit.fusions[added].block)
        return added

    def train_adapter_fusion(self, fuse: Block | Sequence[str | Block] | str, *,
                             unfreeze_adapters: bool = False) -> None:
        """Freeze the whole model, unfreeze the fusion layers and the fusion's head, and activate ``fuse``.

        Args:
            fuse: A ``Fuse``, a block that contains fusions (``Stack(Fuse("a", "b"), "c")``), or the
                adapter names of a ``Fuse``. Every fusion in it is trained.
            unfreeze_adapters: Also train the fused adapters (not their heads).
        """
        fusion.train_fusion(self._adapterkit, fuse, unfreeze_adapters)

    def delete_adapter_fusion(self, fuse: Fuse | Sequence[str | Block] | str) -> None:
        """Remove a fusion (given as its ``Fuse``, name or adapter names) with its layers and head."""
        fusion.delete_fusion(self._adapterkit, fuse)

    @property
    def adapter_fusions(self) -> dict[str, Fuse]:
        """Every fusion on the model: its name and its ``Fuse`` block."""
        return {name: entry.block for name, entry in self._adapterkit.fusions.items()}

    def save_adapter_fusion(self, directory: str | os.PathLike, fuse: Fuse | Sequence[str | Block] | str,
                            format: str = "adapterkit") -> Path:
        """Write a fusion's layers, head and labels to ``directory``, without the fused adapters.

        Args:
            directory: The folder to write.
            fuse: The fusion, as its ``Fuse``, name or adapter names.
            format: ``"adapterkit"`` (safetensors and JSON) or ``"adapters"`` (AdapterHub
                ``adapters``: ``adapter_fusion_config.json``, ``pytorch_model_adapter_fusion.bin`` and
                the head's files), for fusions of plain adapter names.
        """
        return fusion.save_fusion_as(self._adapterkit, directory, fuse, format)

    def load_adapter_fusion(self, directory: str | os.PathLike, load_as: str | None = None, *,
                            set_active: bool = True) -> str:
        """Load a fusion, frozen, and return its name. The fused adapters must be loaded first.

        Args:
            directory: A folder written by ``save_adapter_fusion`` or by ``adapters``' ``save_adapter_fusion``.
            load_as: Name to give the fusion; the saved name by default.
            set_active: Activate the fusion, so that the next forward uses it.
        """
        name = fusion.load_fusion(self._adapterkit, directory, load_as)
        if set_active:
            self.set_active_adapters(self._adapterkit.fusions[name].block)
        return name

    @property
    def active_block(self) -> Block | None:
        """The active composition block, or ``None`` when the active adapters form a plain stack."""
        return self._adapterkit.active_block

    def generate(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """Run transformers' ``generate``; ``adapter_names`` sends input row ``i`` through adapter ``adapter_names[i]``.

        ``None`` in ``adapter_names`` runs that row without adapters. Rows can go to adapters of
        any method, prefixes and prompts of different lengths included. Beam search and
        ``num_return_sequences`` repeat each input row ``f`` times in a row, so every forward with
        ``f * len(adapter_names)`` rows reads rows ``i * f`` to ``i * f + f - 1`` as row ``i``.

        Raises:
            ValueError: If an adapter name is unknown or the count differs from the batch size.
            NotImplementedError: If a Parallel block is active, because its repeated rows would
                leave the batch size that ``generate`` expects.
        """
        registry = self._adapterkit
        if registry.active_block is not None and parallel_branches(registry.active_block) is not None:
            raise NotImplementedError(f"generate cannot run with the Parallel block {registry.active_block!r} "
                                      "active; generate once per branch with that branch's adapters active")
        if adapter_names is None:
            return super().generate(*args, **kwargs)
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        batch_size = inputs.shape[0] if inputs is not None else None
        with registry.routing(adapter_names, batch_size):
            return super().generate(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        """The adapters that run in each forward, in order."""
        return list(self._adapterkit.active)

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter on the model, in the order they were added."""
        return list(self._adapterkit.entries)

    def adapter_config(self, name: str) -> MethodConfig:
        """Return the configuration of adapter ``name``."""
        self._adapterkit.check_names([name])
        return self._adapterkit.entries[name].config

    def adapter_summary(self, as_dict: bool = False) -> str | list[dict[str, Any]]:
        """Return a table of each adapter's parameters (total, head, trainable) and status.

        Args:
            as_dict: Return the rows as dicts instead of a formatted table.
        """
        rows = self._adapterkit.summary_rows()
        if as_dict:
            return rows
        header = f"{'name':<20} {'architecture':<12} {'parameters':>11} {'head':>9} {'trainable':>11} {'% base':>7} active"
        lines = [header, "-" * len(header)]
        for row in rows:
            lines.append(f"{row['name']:<20} {row['architecture']:<12} {row['parameters']:>11,} "
                         f"{row['head_parameters']:>9,} {row['trainable']:>11,} {row['percent_of_base']:>7.2f} "
                         f"{'yes' if row['active'] else 'no'}")
        return "\n".join(lines)

    # -- merging -------------------------------------------------------------------------------

    def merge_adapter(self, name: str) -> None:
        """Merge adapter ``name`` into the base weights, so it costs no hooks at inference.

        LoRA and (IA)^3 change the projections they adapt. A parallel bottleneck adapter with
        ``non_linearity="identity"`` on the feed-forward sublayer of a post-norm model (BERT, BART and
        the like) adds ``2 * bottleneck width`` units to every feed-forward layer of its stack and
        updates the config's width field (see ``adapterkit.merge``).

        The merged adapter acts whether or not it is active, before every unmerged adapter, until
        ``unmerge_adapter``. Merging a merged adapter changes nothing. An (IA)^3 vector on the input of
        ``ff_out`` scales that projection's input, so it also scales every LoRA there, in any order.

        Raises:
            ValueError: If the adapter has methods that cannot be merged (series bottleneck adapters,
                prefixes, gated LoRA, parallel adapters on pre-norm models), an (IA)^3 vector has a
                zero entry, or an active adapter at a shared projection does not commute with it.
        """
        merge.merge(self._adapterkit, name)

    def unmerge_adapter(self, name: str) -> None:
        """Take merged adapter ``name`` out of the base weights again; it then runs through hooks when active.

        Raises:
            ValueError: If an active adapter merged later does not commute with it, so taking it out
                alone would change the output; unmerge that adapter first.
        """
        merge.unmerge(self._adapterkit, name)

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the base weights, in merge order."""
        return list(self._adapterkit.merged)

    def merge_and_unload(self) -> nn.Module:
        """Merge every active adapter, remove adapterkit from the model and return the plain transformers model.

        The active adapter's head stays on the model, with its labels in ``config.id2label``. The
        result saves with ``save_pretrained`` and loads with transformers alone.

        Raises:
            ValueError: If an active adapter cannot be merged; nothing changes then.
        """
        registry = self._adapterkit
        merge.merge_all_active(registry)
        registry.unload()
        base_class = self._adapterkit_base_class
        del self._adapterkit
        self.__class__ = base_class
        return self

    def add_weighted_adapter(self, name: str, adapters: Sequence[str], weights: Sequence[float],
                             combination: str = "linear", rank: int | None = None) -> None:
        """Add adapter ``name``, a weighted combination of ``adapters``; see ``adapterkit.merge.combine``."""
        merge.combine(self._adapterkit, name, list(adapters), [float(w) for w in weights], combination, rank)

    # -- saving and loading ----------------------------------------------------------------------

    def save_adapter(self, directory: str | os.PathLike, name: str, format: str = "adapterkit") -> Path:
        """Write adapter ``name`` with its head and labels to ``directory``.

        Args:
            directory: The folder to write.
            name: The adapter.
            format: ``"adapterkit"`` (safetensors and JSON, every method) or ``"peft"`` (PEFT's
                ``adapter_config.json`` and ``adapter_model.safetensors``, for LoRA, (IA)^3, prefix tuning
                and prompt tuning), or ``"adapters"`` (AdapterHub ``adapters``: ``adapter_config.json``,
                ``pytorch_adapter.bin`` and ``head_config.json``).
        """
        return io.save_adapter_as(self._adapterkit, directory, name, format)

    def load_adapter(self, directory: str | os.PathLike, load_as: str | None = None, *,
                     set_active: bool = True) -> str:
        """Load an adapter, frozen, and return its name.

        Args:
            directory: A folder written by ``save_adapter``, by PEFT's ``save_pretrained`` or by
                ``adapters``' ``save_adapter``; the format is detected from its files.
            load_as: Name to give the adapter; the saved name by default (``"default"`` for PEFT).
            set_active: Make it the only active adapter, so that the next forward uses it.
        """
        name = io.load_adapter(self._adapterkit, directory, load_as)
        if set_active:
            self.set_active_adapters(name)
        return name

    # -- training and inference ------------------------------------------------------------------

    def fit(self, train_data: Any, labels: Sequence[Any] | None = None, **kwargs: Any):
        """Train the trainable adapters; see ``adapterkit.training.trainer.fit`` for the arguments.

        ``train_data`` may be a dict from adapter name to that task's data, which trains each
        adapter with its own head (multi-task training, ``sampling="round_robin"`` or
        ``"proportional"``).
        """
        from .training.trainer import fit

        return fit(self, train_data, labels, **kwargs)

    def evaluate(self, data: Any, labels: Sequence[Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Return accuracy, macro precision, recall and F1, and the confusion matrix on ``data``.

        ``adapter="name"`` scores with only that adapter and its head active.
        """
        from .training.trainer import evaluate

        return evaluate(self, data, labels, **kwargs)

    def predict(self, texts: Any, **kwargs: Any):
        """Return the predicted label and class probabilities for each text.

        ``adapter="name"`` predicts with only that adapter and its head active.
        """
        from .training.trainer import predict

        return predict(self, texts, **kwargs)


def adapter_class(base_class: type) -> type:
    """Return the subclass of ``base_class`` with adapterkit's verbs, made once per base class."""
    cls = _ADAPTER_CLASSES.get(base_class)
    if cls is None:
        cls = type(base_class.__name__, (AdapterModelMixin, base_class), {
            "__module__": base_class.__module__,
            "__doc__": base_class.__doc__,
            "_adapterkit_base_class": base_class,
        })
        _ADAPTER_CLASSES[base_class] = cls
    return cls


def init(model: nn.Module, architecture: ArchitectureSpec | None = None) -> nn.Module:
    """Attach adapterkit to a transformers model and return the same object.

    Args:
        model: A model as ``from_pretrained`` returns it.
        architecture: Where the model's blocks and sublayers are; found from ``config.model_type``
            for the families adapterkit lists.

    Raises:
        TypeError: If ``model`` is not a transformers model.
        NotImplementedError: If its family is not listed and no ``architecture`` is given.
    """
    if isinstance(model, AdapterModelMixin):
        return model
    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not hasattr(model, "base_model"):
        raise TypeError(f"adapterkit.init expects a transformers PreTrainedModel, not {type(model).__name__}")
    spec = architecture or find_architecture(model)
    registry = AdapterRegistry(model, spec)
    model.__class__ = adapter_class(type(model))
    model._adapterkit = registry
    return model
