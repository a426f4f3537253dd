"""Prediction heads: which modules of a model form its head, and resizing a head to a new label count."""

from __future__ import annotations

import logging

import torch
import transformers
from torch import nn

from .architectures import find_base_model

logger = logging.getLogger(__name__)

# Whether from_pretrained keeps the _is_hf_initialized mark on loaded parameters. transformers 5 keeps it, 4.57 loses it.
_LOADED_PARAMETERS_MARKED = int(transformers.__version__.split(".")[0]) >= 5

# The attribute under which adapterkit stores its modules on the model; never part of the head.
STORE_ATTRIBUTE = "adapterkit"


def head_module_names(model: nn.Module) -> list[str]:
    """Return the names of the model's top-level children that form its task head.

    The head is every direct child outside the body (``find_base_model``) that owns parameters, except those
    that share a parameter with the base model and the output embeddings (the language-model head,
    tied or not). Those belong to the frozen base, because copying them per adapter would duplicate
    the vocabulary matrix.
    """
    base = find_base_model(model)
    if base is model:
        return []
    base_parameters = {id(p) for p in base.parameters()}
    try:
        output_embeddings = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        output_embeddings = None
    names = []
    for name, child in model.named_children():
        if child is base or name == STORE_ATTRIBUTE:
            continue
        if child is output_embeddings:
            # A language-model head is as large as the vocabulary and belongs to the pretrained model.
            continue
        parameters = list(child.parameters())
        if parameters and not any(id(p) in base_parameters for p in parameters):
            names.append(name)
    return names


def is_freshly_initialised(modules: dict[str, nn.Module], model: nn.Module | None = None) -> bool:
    """Return whether no parameter of ``modules`` was loaded from a checkpoint by ``from_pretrained``.

    transformers 5 marks every loaded parameter with ``_is_hf_initialized``. transformers 4.57 sets
    that mark before loading and then replaces the parameters, so the mark is lost. There the head
    counts as loaded when the class of ``model`` is in ``model.config.architectures``, the classes
    that ``save_pretrained`` recorded.

    NOTE: on 4.57 a fresh head also counts as loaded when the config names the model's class, for
    example after ``from_pretrained(..., ignore_mismatched_sizes=True)`` re-initialised it.
    """
    if any(getattr(p, "_is_hf_initialized", False) for m in modules.values() for p in m.parameters()):
        return False
    if _LOADED_PARAMETERS_MARKED or model is None:
        return True
    architectures = getattr(getattr(model, "config", None), "architectures", None) or []
    return type(model).__name__ not in architectures


def count_labels(modules: dict[str, nn.Module]) -> int:
    """Return the output width of the head's last linear layer."""
    last = None
    for module in modules.values():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                last = sub
    if last is None:
        raise ValueError(f"The head modules {sorted(modules)} contain no nn.Linear, so adapterkit cannot "
                         "tell how many labels they predict")
    return last.out_features


@torch.no_grad()
def resize_head(modules: nn.ModuleDict, old_num_labels: int, new_num_labels: int, init_std: float) -> None:
    """Replace, in place, every linear layer of the head that outputs ``old_num_labels`` values.

    The new layers output ``new_num_labels`` values, are drawn from normal(0, ``init_std``) with zero
    bias, and keep the dtype and device of the layers they replace.

    Raises:
        ValueError: If no linear layer of the head outputs ``old_num_labels`` values.
    """
    replaced = 0
    for head_name in list(modules.keys()):
        root = modules[head_name]
        targets = [(name, sub) for name, sub in root.named_modules()
                   if isinstance(sub, nn.Linear) and sub.out_features == old_num_labels]
        for name, old in targets:
            new = nn.Linear(old.in_features, new_num_labels, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            nn.init.normal_(new.weight, std=init_std)
            if new.bias is not None:
                nn.init.zeros_(new.bias)
            new.requires_grad_(old.weight.requires_grad)
            if name == "":
                modules[head_name] = new
            else:
                parent_name, _, attribute = name.rpartition(".")
                setattr(root.get_submodule(parent_name), attribute, new)
            replaced += 1
    if replaced == 0:
        raise ValueError(f"No linear layer of the head outputs {old_num_labels} labels, so it cannot be resized "
                         f"to {new_num_labels}")
