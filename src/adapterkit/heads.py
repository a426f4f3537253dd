"""Prediction heads: which modules of a model form its head, and resizing a head to a new label count."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The attribute under which adapterkit stores its modules on the model; never part of the head.
STORE_ATTRIBUTE = "adapterkit"


def head_module_names(model: nn.Module) -> list[str]:
    """Return the names of the model's top-level children that form its task head.

    The head is every direct child outside ``model.base_model`` that owns parameters, except those
    that share a parameter with the base model. A language-model head tied to the input embeddings
    belongs to the frozen base, because copying it per adapter would duplicate the vocabulary matrix.
    """
    base = model.base_model
    if base is model:
        return []
    base_parameters = {id(p) for p in base.parameters()}
    names = []
    for name, child in model.named_children():
        if child is base or name == STORE_ATTRIBUTE:
            continue
        parameters = list(child.parameters())
        if parameters and not any(id(p) in base_parameters for p in parameters):
            names.append(name)
    return names


def is_freshly_initialised(modules: dict[str, nn.Module]) -> bool:
    """Return whether no parameter of ``modules`` was loaded from a checkpoint by ``from_pretrained``.

    NOTE: this reads the ``_is_hf_initialized`` mark that transformers 5 sets on every loaded
    parameter; on versions without it a loaded head also counts as fresh.
    """
    return not any(getattr(p, "_is_hf_initialized", False) for m in modules.values() for p in m.parameters())


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
