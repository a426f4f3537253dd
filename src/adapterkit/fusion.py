"""AdapterFusion: learned attention over the outputs of several frozen bottleneck adapters.

Pfeiffer et al. (2021), "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
as AdapterHub ``adapters`` 1.3.0 computes it (``methods/modeling.py: BertFusion``), so that its
fusion checkpoints load here and compute the same outputs. At every bottleneck site where a fused
adapter has a module, a ``FusionLayer`` takes

- the query: the input of the last fused adapter there (after the block's layer norm when its
  config has ``original_ln_before``),
- one value per child of the ``Fuse``: what the child adds to the residual at that site (the
  up-projection output of a bottleneck adapter, the summed changes of a ``Stack``),

and returns ``residual + softmax(query . key(values) / T) @ value(values)``. The block then adds
its residual stream and applies its layer norm, as it does after a single adapter.

A fusion has its own copy of the model's head, trained with the fusion, and is stored under
``model.adapterkit["fusion_<name>"]``: ``layers.<block>.<sublayer>`` and ``head``. This module
contains the layer, the registry's fusion records and the verbs behind ``model.add_adapter_fusion``,
``train_adapter_fusion``, ``delete_adapter_fusion``, ``save_adapter_fusion`` and
``load_adapter_fusion``.

Native checkpoint files (``save_fusion``): ``adapterkit_fusion_config.json`` with the format
version, adapterkit version, the ``Fuse`` block, the ``FusionConfig``, the base model and the
head's labels, and ``adapterkit_fusion.safetensors`` with the weights keyed as in the store
(``layers.11.feed_forward.query.weight``, ``head.classifier.weight``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from . import __version__
from .composition import (Block, Fuse, block_from_dict, block_to_dict, find_fusions, head_owner, leaf_names,
                          validate)
from .config import BottleneckConfig, FusionConfig, resolve_fusion_config
from .io import _model_description, check_compatible, write_checkpoint

if TYPE_CHECKING:
    from .registry import AdapterRegistry

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapterkit_fusion_config.json"
WEIGHTS_FILE = "adapterkit_fusion.safetensors"
FORMAT_VERSION = 1

# Fusion names become module keys, which must not contain dots. The default names use "," and "+".
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-,+]+$")
# adapters 1.3.0 starts an annealed temperature at 50 and lowers it by T_start / 1000 per forward, down to 1.
_START_TEMPERATURE = 50.0
_REGULARIZATION_STRENGTH = 0.01


class _PullToIdentity(torch.autograd.Function):
    """Pass a square weight through unchanged and add ``2 * strength * (W - I)`` to its gradient.

    That is the gradient of ``strength * ||W - I||^2``, so every backward pass through the layer
    trains as if that term were part of the loss, without the training loop adding it.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.strength = strength
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        identity = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return grad + 2 * ctx.strength * (weight - identity), None


class FusionLayer(nn.Module):
    """The AdapterFusion attention at one bottleneck site.

    The parameter names (``query``, ``key``, ``value``) are those of ``adapters``' ``BertFusion``.

    Args:
        hidden_size: Width of the hidden states.
        config: The fusion configuration.
        dropout_prob: Dropout on the attention scores.
    """

    def __init__(self, hidden_size: int, config: FusionConfig, dropout_prob: float):
        super().__init__()
        self.config = config
        self.query = nn.Linear(hidden_size, hidden_size) if config.query else None
        self.key = nn.Linear(hidden_size, hidden_size) if config.key else None
        self.value = nn.Linear(hidden_size, hidden_size, bias=False) if config.value else None
        self.dropout = nn.Dropout(dropout_prob)
        if config.temperature:
            # An integer count, because .to(dtype) converts floating buffers and 49.95 rounds to 50 in bfloat16.
            self.register_buffer("temperature_steps", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as ``adapters`` does: projections from normal(0, 0.02) with zero biases, ``value``
        at the identity (off-diagonal entries 1e-6) when ``value_initialized``."""
        for projection in (self.query, self.key, self.value):
            if projection is None:
                continue
            nn.init.normal_(projection.weight, std=0.02)
            if projection.bias is not None:
                nn.init.zeros_(projection.bias)
        if self.value is not None and self.config.value_initialized:
            self.value.weight.fill_(1e-6)
            self.value.weight.fill_diagonal_(1.0)

    def temperature(self) -> float:
        """Return the softmax temperature of the next forward: 1, or the annealed value."""
        if not self.config.temperature:
            return 1.0
        steps = int(self.temperature_steps.item())
        return max(_START_TEMPERATURE - steps * _START_TEMPERATURE / 1000.0, 1.0)

    def anneal(self) -> None:
        """Lower the temperature by one step. The registry calls this once per training forward of the model."""
        if self.config.temperature and self.temperature() > 1.0:
            self.temperature_steps += 1

    def _project_values(self, values: torch.Tensor) -> torch.Tensor:
        weight = self.value.weight
        if self.config.regularization and self.training and weight.requires_grad and torch.is_grad_enabled():
            weight = _PullToIdentity.apply(weight, _REGULARIZATION_STRENGTH)
        return nn.functional.linear(values, weight)

    def forward(self, query: torch.Tensor, values: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Return the fused hidden state.

        Args:
            query: ``(batch, seq_len, hidden)``, the hidden state that attends.
            values: ``(batch, seq_len, children, hidden)``, each child's change to ``residual``.
            residual: ``(batch, seq_len, hidden)``, what the attention output is added to.

        Returns:
            ``(batch, seq_len, hidden)``.
        """
        if self.config.residual_before:
            values = values + residual.unsqueeze(2)
        query = self.query(query) if self.query is not None else query
        keys = self.key(values) if self.key is not None else values
        projected = values
        if self.value is not None and self.config.value_before_softmax:
            projected = self._project_values(values)

        scores = torch.matmul(query.unsqueeze(2), keys.transpose(-2, -1)).squeeze(2)
        # adapters applies its dropout to the scores, before the softmax.
        scores = self.dropout(scores)
        probabilities = torch.softmax(scores / self.temperature(), dim=-1)
        context = torch.matmul(probabilities.unsqueeze(2), projected).squeeze(2)

        if self.value is not None and not self.config.value_before_softmax:
            context = self._project_values(context)
        if not self.config.residual_before:
            context = context + residual
        return context


@dataclass
class FusionEntry:
    """The registry record of one fusion, apart from its modules.

    Attributes:
        block: The ``Fuse`` it fuses, with its name.
        config: The fusion configuration.
        labels: The label values of the fusion's head, in class-id order, or ``None`` if the head
            still has the base model's labels.
        head_trained: Whether the head's weights were trained or loaded.
    """

    block: Fuse
    config: FusionConfig
    labels: list[Any] | None = None
    head_trained: bool = False


def fusion_key(name: str) -> str:
    """Return the store key of fusion ``name``."""
    return f"fusion_{name}"


def as_fuse(fuse: Fuse | Sequence[str | Block] | str) -> Fuse:
    """Return ``fuse`` as a ``Fuse``: a list of children or a comma-separated string of adapter names."""
    if isinstance(fuse, Fuse):
        return fuse
    if isinstance(fuse, str):
        return Fuse(*fuse.split(","))
    if isinstance(fuse, Block):
        raise ValueError(f"{fuse!r} is not a Fuse; pass Fuse(...) with the adapters to fuse")
    return Fuse(*fuse)


def fusion_name(registry: AdapterRegistry, fuse: Fuse | Sequence[str | Block] | str) -> str:
    """Return the name of an existing fusion given as a ``Fuse``, its name, or its adapter names.

    Raises:
        ValueError: If the model has no such fusion, listing the ones it has.
    """
    if isinstance(fuse, str) and fuse in registry.fusions:
        name = fuse
    else:
        name = as_fuse(fuse).name
    if name not in registry.fusions:
        known = ", ".join(map(repr, registry.fusions)) or "none"
        raise ValueError(f"No fusion named {name!r} on this model; fusions: {known}. Add it with "
                         f"model.add_adapter_fusion(Fuse(...)) or load it with model.load_adapter_fusion(folder)")
    return name


# -- checks ----------------------------------------------------------------------------------------

def _residual_source(config: BottleneckConfig) -> str:
    """Return what a bottleneck adapter adds its output to (see ``injection.bottleneck_inputs``)."""
    if config.parallel or not config.original_ln_before or config.residual_before_ln:
        return "the sublayer output"
    return "its own input (the block's norm of output plus residual)"


def check_fused_adapters(registry: AdapterRegistry, block: Fuse) -> None:
    """Raise ``ValueError`` unless every adapter in ``block`` can be fused.

    Fused adapters must be unmerged bottleneck adapters without a before-head module, and all must
    add their output to the same residual, because each child's value is measured against it.
    """
    sources = {}
    for name in dict.fromkeys(leaf_names(block)):
        config = registry.entries[name].config
        for member in config.methods:
            if not isinstance(member, BottleneckConfig):
                raise ValueError(f"Adapter {name!r} has a {member.architecture} part ({type(member).__name__}), but "
                                 f"{block!r} fuses bottleneck adapters only. Remove it from the Fuse, or stack it "
                                 f"outside: Stack({block!r}, {name!r})")
            if member.before_head:
                raise ValueError(f"Adapter {name!r} has a bottleneck adapter before the head (before_head=True), "
                                 f"which {block!r} cannot fuse; fuse adapters without before_head")
            sources.setdefault(_residual_source(member), name)
        if name in registry.merged:
            raise ValueError(f"Adapter {name!r} is merged into the base weights, so {block!r} cannot fuse it; "
                             f"unmerge_adapter({name!r}) first")
    if len(sources) > 1:
        described = "; ".join(f"{name!r} adds to {source}" for source, name in sources.items())
        raise ValueError(f"The adapters of {block!r} add their outputs to different tensors ({described}), so their "
                         "values cannot be compared; fuse adapters whose configs agree on original_ln_before and "
                         "residual_before_ln")


def check_active_fusions(registry: AdapterRegistry, block: Block) -> None:
    """Raise ``ValueError`` unless every ``Fuse`` in ``block`` names a fusion of the model with the same children."""
    for fuse in find_fusions(block):
        check_fused_adapters(registry, fuse)
        entry = registry.fusions.get(fuse.name)
        if entry is None:
            known = ", ".join(f"{name!r} ({record.block!r})" for name, record in registry.fusions.items()) or "none"
            raise ValueError(f"{fuse!r} in {block!r} names no fusion of this model (fusions: {known}); add it with "
                             f"model.add_adapter_fusion({fuse!r}) first")
        if entry.block.children != fuse.children:
            raise ValueError(f"The fusion {fuse.name!r} fuses {entry.block!r}, not {fuse!r}; activate "
                             f"{entry.block!r} or give the new Fuse another name")


# -- modules ---------------------------------------------------------------------------------------

def fusion_sites(registry: AdapterRegistry, block: Fuse) -> list[tuple[int, str]]:
    """Return ``(block index, sublayer)`` of every sublayer site where an adapter of ``block`` has a module."""
    sites = {(key[1], key[2]) for name in dict.fromkeys(leaf_names(block))
             for key, _, _ in registry.placements_of(name) if key[0] == "sublayer"}
    return sorted(sites)


def _dropout_probability(registry: AdapterRegistry, config: FusionConfig) -> float:
    if config.dropout_prob is not None:
        return float(config.dropout_prob)
    # NOTE: as in adapters 1.3.0, only this config field counts. Families that name their attention
    # dropout otherwise (GPT-2's attn_pdrop, T5's dropout_rate) get no fusion dropout.
    return float(getattr(registry.model.config, "attention_probs_dropout_prob", 0.0) or 0.0)


def fusion_layer(registry: AdapterRegistry, fuse: Fuse, key: tuple) -> FusionLayer | None:
    """Return the fusion layer of ``fuse`` at site ``key``, or ``None`` if it has none there."""
    if key[0] != "sublayer":
        return None
    layers = registry.store[fusion_key(fuse.name)]["layers"]
    index = str(key[1])
    if index not in layers or key[2] not in layers[index]:
        return None
    return layers[index][key[2]]


def add_fusion(registry: AdapterRegistry, fuse: Fuse | Sequence[str | Block] | str,
               config: FusionConfig | str | dict | None = None, name: str | None = None) -> str:
    """Create the fusion layers and head of ``fuse``, frozen and inactive, and return the fusion's name.

    Raises:
        ValueError: If the name is taken or invalid, the block nests blocks that ``Fuse`` cannot
            contain, an adapter is unknown or cannot be fused, or no fused adapter has a bottleneck
            module at any sublayer.
    """
    fuse = as_fuse(fuse)
    name = name if name is not None else fuse.name
    # A name equal to the default is not stored, so the block equals Fuse(*children) written without one.
    block = Fuse(*fuse.children, name=None if name == Fuse(*fuse.children).name else name)
    config = resolve_fusion_config(config)
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"Invalid fusion name {name!r}: use letters, digits, '_', '-', ',' and '+' only")
    if name in registry.fusions:
        raise ValueError(f"A fusion named {name!r} already exists; delete_adapter_fusion({name!r}) first or pass "
                         "another name")
    if name in registry.entries:
        raise ValueError(f"The fusion name {name!r} is the name of an adapter; pass another name=")
    validate(block, registry.entries)
    check_fused_adapters(registry, block)
    sites = fusion_sites(registry, block)
    if not sites:
        raise ValueError(f"No adapter of {block!r} has a bottleneck module at a sublayer, so there is nothing to fuse")

    hidden_size = registry.layout.hidden_size
    dropout = _dropout_probability(registry, config)
    layers = nn.ModuleDict()
    for index, sublayer in sites:
        places = layers[str(index)] if str(index) in layers else nn.ModuleDict()
        places[sublayer] = FusionLayer(hidden_size, config, dropout)
        layers[str(index)] = places
    head = nn.ModuleDict({n: copy.deepcopy(registry.base_heads[n]) for n in registry.head_names})
    modules = nn.ModuleDict({"layers": layers, "head": head})
    reference = next(registry.model.base_model.parameters())
    modules.to(device=reference.device, dtype=reference.dtype)
    modules.requires_grad_(False)
    modules.train(registry.model.training)

    registry.store[fusion_key(name)] = modules
    registry.fusions[name] = FusionEntry(block=block, config=config, head_trained=not registry.base_head_fresh)
    logger.info("Added fusion %r over %r at %d sites: %d parameters", name, block, len(sites),
                sum(p.numel() for p in modules.parameters()))
    return name


def delete_fusion(registry: AdapterRegistry, fuse: Fuse | Sequence[str | Block] | str) -> None:
    """Remove a fusion's layers and head, after deactivating an active block that contains it."""
    name = fusion_name(registry, fuse)
    block = registry.active_block
    if block is not None and any(f.name == name for f in find_fusions(block)):
        logger.warning("Deleting fusion %r, part of the active block %r; no adapter is active now", name, block)
        registry.set_active([])
    del registry.store[fusion_key(name)]
    del registry.fusions[name]


def train_fusion(registry: AdapterRegistry, block: Block | Sequence[str | Block] | str,
                 unfreeze_adapters: bool = False) -> None:
    """Freeze the model, unfreeze the layers and heads of every fusion in ``block`` and activate ``block``.

    Args:
        registry: The model's adapter registry.
        block: A ``Fuse``, a block that contains one (``Stack(Fuse("a", "b"), "c")``), or the
            adapter names of a ``Fuse``.
        unfreeze_adapters: Also train the fused adapters' modules (not their heads).

    Raises:
        ValueError: If ``block`` contains no ``Fuse`` or names a fusion the model does not have.
    """
    if not isinstance(block, Block):
        block = as_fuse(block)
    fusions = find_fusions(block)
    if not fusions:
        raise ValueError(f"{block!r} contains no Fuse; train_adapter_fusion trains fusion layers, and "
                         "train_adapter trains adapters")
    check_active_fusions(registry, block)
    registry.model.requires_grad_(False)
    for fuse in fusions:
        registry.store[fusion_key(fuse.name)].requires_grad_(True)
        if unfreeze_adapters:
            for name in dict.fromkeys(leaf_names(fuse)):
                registry.modules_of(name)["methods"].requires_grad_(True)
    registry.set_active(block)
    # The head that serves the block trains with the fusions, also when it belongs to an adapter
    # stacked after them, as in Stack(Fuse("a", "b"), "c").
    registry.head_modules(head_owner(block)).requires_grad_(True)


def trainable_fusions(registry: AdapterRegistry) -> list[str]:
    """Return the fusions that have at least one parameter with ``requires_grad``."""
    return [name for name in registry.fusions
            if any(p.requires_grad for p in registry.store[fusion_key(name)].parameters())]


def anneal_temperatures(registry: AdapterRegistry, block: Block) -> None:
    """Lower the temperature of every fusion layer in ``block`` once, at the start of a training forward.

    Annealing here instead of inside the layers keeps the temperature fixed while gradient
    checkpointing recomputes a block during the backward pass.
    """
    for fuse in find_fusions(block):
        entry = registry.fusions.get(fuse.name)
        if entry is None or not entry.config.temperature:
            continue
        for module in registry.store[fusion_key(fuse.name)]["layers"].modules():
            if isinstance(module, FusionLayer):
                module.anneal()


# -- saving and loading ----------------------------------------------------------------------------

def save_fusion(registry: AdapterRegistry, directory: str | os.PathLike, fuse: Fuse | Sequence[str] | str) -> Path:
    """Write a fusion's layers, head and labels into ``directory`` in adapterkit's format, and return the folder."""
    name = fusion_name(registry, fuse)
    entry = registry.fusions[name]
    directory = Path(directory)
    modules = registry.store[fusion_key(name)]
    weights = {key: tensor.detach().contiguous().cpu() for key, tensor in modules.state_dict().items()}
    description = {
        "format": "adapterkit-fusion",
        "format_version": FORMAT_VERSION,
        "adapterkit_version": __version__,
        "name": name,
        "fuse": block_to_dict(entry.block),
        "config": entry.config.to_dict(),
        "base_model": _model_description(registry.model),
        "head": {"modules": list(modules["head"].keys()), "labels": entry.labels},
    }
    write_checkpoint(directory, weights, description, WEIGHTS_FILE, CONFIG_FILE)
    logger.info("Saved fusion %r to %s", name, directory)
    return directory


def save_fusion_as(registry: AdapterRegistry, directory: str | os.PathLike, fuse: Fuse | Sequence[str] | str,
                   format: str = "adapterkit") -> Path:
    """Write a fusion as an ``"adapterkit"`` or ``"adapters"`` (AdapterHub) checkpoint and return the folder."""
    if format == "adapterkit":
        return save_fusion(registry, directory, fuse)
    if format == "adapters":
        from .formats.adapters import write_adapters_fusion

        return write_adapters_fusion(registry, fusion_name(registry, fuse), directory)
    raise ValueError(f"format={format!r}: expected 'adapterkit' or 'adapters'")


def is_fusion_checkpoint(directory: str | os.PathLike) -> bool:
    """Return whether ``directory`` contains an adapterkit fusion checkpoint."""
    return (Path(directory) / CONFIG_FILE).is_file()


def _read_description(directory: Path) -> dict[str, Any]:
    for file_name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / file_name).is_file():
            raise FileNotFoundError(f"{file_name} not found in {directory}; pass a folder written by "
                                    "save_adapter_fusion")
    description = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    if description.get("format") != "adapterkit-fusion":
        raise ValueError(f"{directory / CONFIG_FILE} is not an adapterkit fusion checkpoint")
    if description.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} was written in fusion format {description['format_version']} by adapterkit "
                         f"{description.get('adapterkit_version')}; this adapterkit ({__version__}) reads format "
                         f"{FORMAT_VERSION}. Upgrade adapterkit")
    return description


def load_fusion(registry: AdapterRegistry, directory: str | os.PathLike, load_as: str | None = None) -> str:
    """Add the fusion saved in ``directory`` (adapterkit or ``adapters`` format), frozen, and return its name.

    The fused adapters must be on the model already, under the names the fusion was saved with.

    Raises:
        FileNotFoundError: If the folder contains no fusion checkpoint or a file of it is missing.
        ValueError: If the fusion does not fit this model or its adapters, or its name is taken.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"No fusion folder at {directory}")
    if is_fusion_checkpoint(directory):
        return _load_native(registry, directory, load_as)
    from .formats.adapters import FUSION_CONFIG_FILE, read_adapters_fusion

    if not (directory / FUSION_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory} contains no fusion checkpoint: expected {CONFIG_FILE} (adapterkit) or "
                                f"{FUSION_CONFIG_FILE} (AdapterHub adapters)")
    checkpoint = read_adapters_fusion(registry, directory)
    name = _add_loaded(registry, directory, Fuse(*checkpoint.adapter_names, name=load_as or checkpoint.info["name"]),
                       checkpoint.config, checkpoint.weights, checkpoint.info.get("labels"),
                       head_loaded=bool(checkpoint.info.get("head_keys")))
    for note in checkpoint.info.get("notes", []):
        logger.info("Loading adapters fusion checkpoint %s: %s", directory, note)
    return name


def _load_native(registry: AdapterRegistry, directory: Path, load_as: str | None) -> str:
    description = _read_description(directory)
    check_compatible(registry, description, directory)
    saved = block_from_dict(description["fuse"])
    if not isinstance(saved, Fuse):
        raise ValueError(f"{directory / CONFIG_FILE} describes {saved!r}, not a Fuse")
    head_modules = description.get("head", {}).get("modules", [])
    if sorted(head_modules) != sorted(registry.head_names):
        raise ValueError(f"The fusion in {directory} has head modules {head_modules}, but this "
                         f"{type(registry.model).__name__} has {registry.head_names}; load the model with the same "
                         "task class it was trained with")
    config = FusionConfig.from_dict(description["config"], unknown_keys="warn")
    weights = load_file(str(directory / WEIGHTS_FILE))
    block = Fuse(*saved.children, name=load_as or description["name"])
    return _add_loaded(registry, directory, block, config, weights, description.get("head", {}).get("labels"),
                       head_loaded=True)


def _add_loaded(registry: AdapterRegistry, directory: Path, block: Fuse, config: FusionConfig,
                weights: dict[str, torch.Tensor], labels: list[Any] | None, head_loaded: bool) -> str:
    """Add fusion ``block`` and fill it with ``weights``, removing it again if anything fails."""
    missing_adapters = [name for name in dict.fromkeys(leaf_names(block)) if name not in registry.entries]
    if missing_adapters:
        raise ValueError(f"The fusion in {directory} fuses {', '.join(map(repr, missing_adapters))}, which this model "
                         "does not have; load those adapters first (model.load_adapter)")
    name = add_fusion(registry, block, config)
    try:
        entry = registry.fusions[name]
        if labels is not None:
            entry.head_trained = False  # the weights below replace the copied head
            registry.set_labels(name, labels)
        modules = registry.store[fusion_key(name)]
        state = modules.state_dict()
        unexpected = sorted(set(weights) - set(state))
        # Buffers such as the annealing step count may be missing from other libraries' checkpoints.
        buffers = {key for key, _ in modules.named_buffers()}
        missing = sorted(set(state) - set(weights) - buffers)
        if missing or unexpected:
            raise ValueError(f"The weights in {directory} do not match the fusion's layers: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}. The fused adapters must have modules at the same sites "
                             "as when the fusion was saved")
        wrong = [f"{key}: saved {tuple(value.shape)}, model {tuple(state[key].shape)}"
                 for key, value in weights.items() if tuple(value.shape) != tuple(state[key].shape)]
        if wrong:
            raise ValueError(f"The weights in {directory} do not fit this model: {'; '.join(wrong[:4])}")
        state.update({key: value.to(state[key].dtype) for key, value in weights.items()})
        modules.load_state_dict(state)
        modules.requires_grad_(False)
        entry.head_trained = head_loaded or entry.head_trained
    except BaseException:
        delete_fusion(registry, name)
        raise
    logger.info("Loaded fusion %r from %s", name, directory)
    return name

