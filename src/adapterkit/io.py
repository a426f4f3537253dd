"""adapterkit's own checkpoint format: one folder with a JSON description and safetensors weights.

Files:
    ``adapterkit_config.json``: format version, adapterkit version, the adapter config, the base
        model it was trained on, and the head's module names and labels.
    ``adapterkit_model.safetensors``: the adapter's weights, head included, keyed by their names
        inside the adapter: ``methods.<i>.`` and the layout of method ``i`` of the config
        (``methods.0.layers.3.feed_forward.down_proj.weight``), and ``head.`` (``head.classifier.weight``).
        Format 1 had one method and no ``methods.0.`` prefix; it loads unchanged.

Every file is written to a temporary name in the target folder and renamed into place, so a crash
never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import config_from_dict

if TYPE_CHECKING:
    from .registry import AdapterRegistry

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapterkit_config.json"
WEIGHTS_FILE = "adapterkit_model.safetensors"
FORMAT_VERSION = 2


def write_atomically(path: Path, write: Any) -> None:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _vocabulary_size(model: torch.nn.Module) -> int | None:
    """Return the number of rows of the input embeddings, which ``resize_token_embeddings`` changes."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(embeddings, "weight", None)
    return None if weight is None else int(weight.shape[0])


def _model_description(model: torch.nn.Module) -> dict[str, Any]:
    config = model.config
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": _vocabulary_size(model),
        "name_or_path": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None),
    }


def save_adapter(registry: AdapterRegistry, directory: str | os.PathLike, name: str) -> Path:
    """Write adapter ``name``, its head and labels into ``directory``, and return the folder."""
    registry.check_names([name])
    directory = Path(directory)
    entry = registry.entries[name]
    modules = registry.modules_of(name)
    weights = {key: tensor.detach().contiguous().cpu() for key, tensor in modules.state_dict().items()}
    description = {
        "format": "adapterkit",
        "format_version": FORMAT_VERSION,
        "adapterkit_version": __version__,
        "name": name,
        "config": entry.config.to_dict(),
        "base_model": _model_description(registry.model),
        "head": {"modules": list(modules["head"].keys()), "labels": entry.labels},
    }
    write_checkpoint(directory, weights, description)
    logger.info("Saved adapter %r to %s", name, directory)
    return directory


def write_checkpoint(directory: Path, weights: dict[str, torch.Tensor], description: dict[str, Any],
                     weights_file: str = WEIGHTS_FILE, config_file: str = CONFIG_FILE) -> None:
    """Write ``weights`` as safetensors and ``description`` as JSON into ``directory``, each file atomically."""
    write_atomically(directory / weights_file, lambda path: save_file(weights, str(path), metadata={"format": "pt"}))
    write_atomically(directory / config_file,
                     lambda path: path.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8"))


def read_description(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check the ``adapterkit_config.json`` of a saved adapter.

    Raises:
        FileNotFoundError: If the folder or either file is missing.
        ValueError: If the description is not an adapterkit checkpoint of a known format version.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"No adapter folder at {directory}")
    for file_name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / file_name).is_file():
            raise FileNotFoundError(f"{file_name} not found in {directory}; pass a folder written by save_adapter")
    description = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    if description.get("format") != "adapterkit":
        raise ValueError(f"{directory / CONFIG_FILE} is not an adapterkit checkpoint")
    if description.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} was written in checkpoint format {description['format_version']} by "
                         f"adapterkit {description.get('adapterkit_version')}; this adapterkit "
                         f"({__version__}) reads format {FORMAT_VERSION}. Upgrade adapterkit")
    return description


def check_compatible(registry: AdapterRegistry, description: dict[str, Any], directory: Path) -> None:
    """Raise ``ValueError`` if the saved adapter was trained on a model of another family or size."""
    saved = description.get("base_model", {})
    current = _model_description(registry.model)
    mismatches = [f"{key}: saved {saved.get(key)!r}, this model {current[key]!r}"
                  for key in ("model_type", "hidden_size", "num_hidden_layers")
                  if saved.get(key) is not None and saved.get(key) != current[key]]
    saved_vocabulary, vocabulary = saved.get("vocab_size"), current["vocab_size"]
    if not mismatches and saved_vocabulary is not None and vocabulary is not None and saved_vocabulary != vocabulary:
        raise ValueError(f"The adapter in {directory} was trained on a model with {saved_vocabulary} token embeddings, "
                         f"but this model has {vocabulary}. Add the same tokens to the tokenizer and call "
                         f"model.resize_token_embeddings({saved_vocabulary}) before load_adapter")
    if mismatches:
        raise ValueError(f"The adapter in {directory} was trained on another kind of model "
                         f"({'; '.join(mismatches)}). Load it into a {saved.get('model_type')} model with "
                         f"hidden size {saved.get('hidden_size')}, such as {saved.get('name_or_path')!r}")


FORMATS = ("adapterkit", "peft", "adapters")


def detect_format(directory: str | os.PathLike) -> str:
    """Return the checkpoint format of the folder: ``"adapterkit"``, ``"peft"`` or ``"adapters"``.

    Raises:
        FileNotFoundError: If the folder is missing or contains none of the formats, naming their files.
    """
    from .formats.adapters import is_adapters_checkpoint
    from .formats.peft import is_peft_checkpoint

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"No adapter folder at {directory}")
    if (directory / CONFIG_FILE).is_file():
        return "adapterkit"
    if is_peft_checkpoint(directory):
        return "peft"
    if is_adapters_checkpoint(directory):
        return "adapters"
    raise FileNotFoundError(f"{directory} contains no adapter checkpoint: expected {CONFIG_FILE} (adapterkit) or "
                            "adapter_config.json with a peft_type (PEFT) or with a config and model_class "
                            "(AdapterHub adapters)")


def save_adapter_as(registry: AdapterRegistry, directory: str | os.PathLike, name: str,
                    format: str = "adapterkit") -> Path:
    """Write adapter ``name`` in one of ``FORMATS`` and return the folder."""
    if format == "adapterkit":
        return save_adapter(registry, directory, name)
    if format == "peft":
        from .formats.peft import write_peft

        registry.check_names([name])
        return write_peft(registry, name, directory)
    if format == "adapters":
        from .formats.adapters import write_adapters

        registry.check_names([name])
        return write_adapters(registry, name, directory)
    raise ValueError(f"format={format!r}: expected one of {', '.join(FORMATS)}")


def load_adapter(registry: AdapterRegistry, directory: str | os.PathLike, load_as: str | None = None) -> str:
    """Add the adapter saved in ``directory`` to the model, frozen, and return its name.

    The folder may contain any format of ``FORMATS``, which ``detect_format`` identifies.

    Raises:
        FileNotFoundError: If the folder or one of its files is missing.
        ValueError: If the adapter does not fit this model, or its name is taken, or the folder
            holds a fusion (see ``fusion.load_fusion``).
    """
    from .fusion import is_fusion_checkpoint

    directory = Path(directory)
    if is_fusion_checkpoint(directory):
        raise ValueError(f"{directory} contains an AdapterFusion, not an adapter; load it with "
                         "model.load_adapter_fusion after loading the fused adapters")
    source_format = detect_format(directory)
    if source_format == "peft":
        return _load_peft(registry, directory, load_as)
    if source_format == "adapters":
        return _load_adapters(registry, directory, load_as)
    description = read_description(directory)
    check_compatible(registry, description, directory)
    name = load_as or description["name"]
    config = config_from_dict(description["config"], unknown_keys="warn")
    weights = load_file(str(directory / WEIGHTS_FILE))
    if description.get("format_version", 1) == 1:
        weights = {key if key.startswith("head.") else f"methods.0.{key}": value for key, value in weights.items()}
    head_modules = description.get("head", {}).get("modules", [])
    if sorted(head_modules) != sorted(registry.head_names):
        raise ValueError(f"The adapter in {directory} has head modules {head_modules}, but this "
                         f"{type(registry.model).__name__} has {registry.head_names}; load the model with "
                         "the same task class it was trained with")

    registry.add(name, config)
    try:
        labels = description.get("head", {}).get("labels")
        if labels is not None:
            entry = registry.entries[name]
            entry.head_trained = False  # the weights below replace the copied head
            registry.set_labels(name, labels)
        modules = registry.modules_of(name)
        try:
            missing, unexpected = modules.load_state_dict(weights, strict=False)
        except RuntimeError as error:  # shape mismatches raise even with strict=False
            raise ValueError(f"The weights in {directory / WEIGHTS_FILE} do not match the adapter config: "
                             f"{error}") from error
        if missing or unexpected:
            raise ValueError(f"The weights in {directory / WEIGHTS_FILE} do not match the adapter config: "
                             f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        modules.requires_grad_(False)
        registry.entries[name].head_trained = True
    except BaseException:
        registry.delete(name)
        raise
    logger.info("Loaded adapter %r from %s", name, directory)
    return name


def _load_peft(registry: AdapterRegistry, directory: Path, load_as: str | None) -> str:
    from .formats.peft import read_peft

    config, weights, info = read_peft(registry, directory)
    name = _add_converted(registry, load_as or "default", config, weights, info, None)
    for note in info.get("notes", []):
        logger.info("Loading PEFT checkpoint %s: %s", directory, note)
    logger.info("Loaded PEFT %s adapter %r from %s", info.get("peft_type"), name, directory)
    return name


def _load_adapters(registry: AdapterRegistry, directory: Path, load_as: str | None) -> str:
    from .formats.adapters import read_adapters

    config, weights, info = read_adapters(registry, directory)
    name = _add_converted(registry, load_as or info["name"], config, weights, info, info.get("labels"))
    for note in info.get("notes", []):
        logger.info("Loading adapters checkpoint %s: %s", directory, note)
    logger.info("Loaded adapters checkpoint %r from %s as %r", info["name"], directory, name)
    return name


def _add_converted(registry: AdapterRegistry, name: str, config: Any, weights: dict[str, torch.Tensor],
                   info: dict[str, Any], labels: list[Any] | None) -> str:
    """Add adapter ``name`` with weights read from another library's checkpoint, frozen; remove it on failure."""
    registry.add(name, config)
    try:
        if labels is not None:
            registry.entries[name].head_trained = False  # the weights below replace the copied head
            registry.set_labels(name, labels)
        registry.modules_of(name).load_state_dict(weights, strict=True)
        registry.modules_of(name).requires_grad_(False)
        registry.entries[name].head_trained = bool(info.get("head_keys")) or registry.entries[name].head_trained
    except BaseException:
        registry.delete(name)
        raise
    return name
