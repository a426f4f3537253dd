"""Prediction heads: the modules that form a model's head, resizing them, and reading ``adapters`` flexible heads."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

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


# -- flexible heads of AdapterHub's adapters library -----------------------------------------------

# adapters 1.3.0 (heads/base.py: PredictionHead.build) builds a flexible head of ``layers`` layers as
# one nn.Sequential: [Dropout, Linear(hidden, hidden), activation] per inner layer, then [Dropout,
# Linear(hidden, labels)]. With an activation, the linear layers of a 2-layer head are at indices 1
# and 4. Classification heads read the pooler output (use_pooler=True) or the first token's hidden
# state, tagging heads every token's hidden state.
_CLASSIFICATION = ("classification", "multilabel_classification")


@dataclass(frozen=True)
class FlexibleHeadMatch:
    """A flexible head of the ``adapters`` library that a transformers head class computes exactly.

    Attributes:
        head_types: The ``head_type`` values of ``head_config.json`` it covers.
        layers: The ``layers`` value.
        use_pooler: The ``use_pooler`` value, or ``None`` for head types without one (tagging).
        targets: The module of the transformers head, as a path from the model, that takes the
            weights of each linear layer index of the flexible head.
        pooler: Path, from the base model, of the pooler's linear layer that the flexible head's
            layer 1 must equal, or ``None``. The pooler is a frozen base weight, so it is compared,
            never overwritten.
        computes: What the transformers head computes, for error messages.
    """

    head_types: tuple[str, ...]
    layers: int
    use_pooler: bool | None
    targets: dict[str, str]
    pooler: str | None = None
    computes: str = ""

    def fits(self, head_config: dict[str, Any]) -> bool:
        """Return whether the ``config`` entry of a ``head_config.json`` describes this head."""
        if head_config.get("head_type") not in self.head_types or head_config.get("layers") != self.layers:
            return False
        if self.use_pooler is not None and bool(head_config.get("use_pooler", False)) != self.use_pooler:
            return False
        # Only inner layers have an activation, and the transformers heads of 2 layers use tanh.
        activation = str(head_config.get("activation_function") or "").lower()
        return self.layers == 1 or activation == "tanh"


FLEXIBLE_HEADS: dict[str, tuple[FlexibleHeadMatch, ...]] = {
    "BertForSequenceClassification": (
        FlexibleHeadMatch(_CLASSIFICATION, 1, True, {"1": "classifier"},
                          computes="classifier(dropout(pooler_output)), a 1-layer head with use_pooler=True"),
        # pooler_output is tanh(pooler.dense(h[:, 0])), so a 2-layer tanh head on h[:, 0] whose first
        # layer equals the pooler's computes the same.
        # NOTE: writing such an adapter back in the adapters format writes only the classifier, as a
        # static head, so adapters computes the same logits only on a base whose pooler contains that layer.
        FlexibleHeadMatch(_CLASSIFICATION, 2, False, {"4": "classifier"}, pooler="pooler.dense",
                          computes="classifier(dropout(tanh(pooler.dense(h[:, 0])))), a 2-layer tanh head on the "
                                   "first token whose first layer is the model's pooler"),
    ),
    "BertForTokenClassification": (
        FlexibleHeadMatch(("tagging",), 1, None, {"1": "classifier"},
                          computes="classifier(dropout(h)) per token, a 1-layer tagging head"),
    ),
    "RobertaForSequenceClassification": (
        FlexibleHeadMatch(_CLASSIFICATION, 2, False, {"1": "classifier.dense", "4": "classifier.out_proj"},
                          computes="out_proj(dropout(tanh(dense(dropout(h[:, 0]))))), a 2-layer tanh head on the "
                                   "first token"),
    ),
    "RobertaForTokenClassification": (
        FlexibleHeadMatch(("tagging",), 1, None, {"1": "classifier"},
                          computes="classifier(dropout(h)) per token, a 1-layer tagging head"),
    ),
}


def map_flexible_head(model: nn.Module, head_config: dict[str, Any], state: dict[str, torch.Tensor],
                      head_name: str | None, notes: list[str]) -> dict[str, torch.Tensor]:
    """Map the weights of an ``adapters`` flexible head onto the head of a transformers model, or raise.

    Args:
        model: The transformers model, e.g. a ``BertForSequenceClassification``.
        head_config: The ``config`` entry of ``head_config.json``.
        state: The head's weights, keyed ``heads.<head_name>.<layer index>.<weight or bias>``.
        head_name: The saved head name (``name`` in ``head_config.json``).
        notes: Receives one sentence per difference that only shows in training.

    Returns:
        The weights keyed as adapterkit's head copies name them, ``head.<module path>.<weight or bias>``.
        A final layer without bias (``"bias": false``) gets a zero bias.

    Raises:
        ValueError: If the model's head class computes something else than the flexible head, naming
            both, or if the head needs the model's pooler to equal its first layer and it does not.
    """
    class_name = type(model).__name__
    described = {key: head_config.get(key)
                 for key in ("head_type", "layers", "activation_function", "use_pooler", "bias")}
    candidates = FLEXIBLE_HEADS.get(class_name, ())
    match = next((candidate for candidate in candidates if candidate.fits(head_config)), None)
    if match is None:
        if candidates:
            reason = f"the head of {class_name} computes " + "; or ".join(c.computes for c in candidates)
        else:
            reason = (f"adapterkit maps flexible heads only onto {', '.join(FLEXIBLE_HEADS)}, and {class_name} is "
                      "none of them")
        raise ValueError(f"The checkpoint's flexible head ({described}) does not fit the head of {class_name}: "
                         f"{reason}. Load the model as a class whose head computes the flexible head, or as "
                         f"{type(find_base_model(model)).__name__} to use the adapter without its head")
    _check_problem_type(model, head_config, described)

    prefix = f"heads.{head_name}." if head_name is not None else "heads."
    mapped = {}
    first_layer = {}
    for key, value in state.items():
        found = re.fullmatch(rf"{re.escape(prefix)}(\d+)\.(weight|bias)", key)
        if found is None:
            raise ValueError(f"The flexible head's weight {key!r} is not named {prefix}<layer>.<weight or bias>")
        index, part = found.groups()
        if match.pooler is not None and index == "1":
            first_layer[part] = value
        elif index in match.targets:
            mapped[f"head.{match.targets[index]}.{part}"] = value
        else:
            raise ValueError(f"The flexible head's weight {key!r} has no place in the head of {class_name}")
    if match.pooler is not None:
        _check_pooler(model, match.pooler, first_layer, described, prefix)
        notes.append(f"The 2-layer flexible head runs through the pooler of {class_name}, which applies no dropout "
                     "before its dense layer, so only training differs from adapters")
    if head_config.get("bias") is False:
        last = match.targets[max(match.targets, key=int)]
        weight = mapped.get(f"head.{last}.weight")
        if weight is not None:
            mapped[f"head.{last}.bias"] = weight.new_zeros(weight.shape[0])
            notes.append(f"The flexible head's last layer has no bias, so {last}.bias is set to zero. It stays "
                         "trainable in adapterkit, so only training differs from adapters")
    dropout = head_config.get("dropout_prob")
    config = getattr(model, "config", None)
    model_dropout = getattr(config, "classifier_dropout", None)
    if model_dropout is None:
        model_dropout = getattr(config, "hidden_dropout_prob", None)
    if dropout is not None and dropout != model_dropout:
        notes.append(f"The flexible head drops out with p={dropout} and the head of {class_name} with "
                     f"p={model_dropout}, so only training differs from adapters")
    return mapped


def _check_problem_type(model: nn.Module, head_config: dict[str, Any], described: dict[str, Any]) -> None:
    """Raise when the model's ``problem_type`` picks another loss than the flexible head trains with."""
    head_type = head_config.get("head_type")
    if head_type not in _CLASSIFICATION:
        return
    problem_type = getattr(getattr(model, "config", None), "problem_type", None)
    multilabel = head_type == "multilabel_classification"
    class_name = type(model).__name__
    if multilabel and problem_type != "multi_label_classification":
        raise ValueError(f"The checkpoint's flexible head ({described}) trains with BCEWithLogitsLoss, but the "
                         f"{class_name} has problem_type={problem_type!r}, which picks another loss. Load it with "
                         "problem_type='multi_label_classification'")
    if not multilabel and problem_type == "multi_label_classification":
        raise ValueError(f"The checkpoint's flexible head ({described}) trains with cross-entropy (or MSE for one "
                         f"label), but the {class_name} has problem_type='multi_label_classification', which trains "
                         "with BCEWithLogitsLoss. Load it without that problem_type")


def _check_pooler(model: nn.Module, path: str, first_layer: dict[str, torch.Tensor], described: dict[str, Any],
                  prefix: str) -> None:
    """Raise unless the pooler layer at ``path`` (from the base model) equals the flexible head's layer 1."""
    base = find_base_model(model)
    try:
        pooler = base.get_submodule(path)
    except AttributeError:
        pooler = None
    class_name = type(model).__name__
    if not isinstance(pooler, nn.Linear):
        raise ValueError(f"The checkpoint's flexible head ({described}) needs the pooler {path} of {class_name}, "
                         "which is missing from this model. Load the model with its pooling layer")
    full_path = next(name for name, module in model.named_modules() if module is pooler)
    missing = sorted({"weight", "bias"} - set(first_layer))
    if missing:
        raise ValueError(f"The flexible head's weights {', '.join(prefix + '1.' + part for part in missing)} are "
                         "missing from the checkpoint")
    same = True
    for part in ("weight", "bias"):
        current = getattr(pooler, part)
        same = same and torch.equal(first_layer[part].to(device=current.device, dtype=current.dtype), current)
    if not same:
        raise ValueError(
            f"The checkpoint's flexible head ({described}) is a 2-layer tanh head on the first token, which "
            f"{class_name} computes only with the head's first layer as its pooler ({full_path}). The pooler is a "
            "frozen base weight that every adapter of this model shares, so adapterkit does not overwrite it. To "
            f"use the head, copy {prefix}1.weight and {prefix}1.bias into {full_path}, which changes the pooler for "
            f"every adapter, and load the adapter again. Or load the model as {type(base).__name__} to use the "
            "adapter without its head")
