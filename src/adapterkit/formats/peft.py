"""Read and write Hugging Face PEFT checkpoints: LoRA, (IA)^3, prefix tuning and prompt tuning.

A PEFT checkpoint is a folder with ``adapter_config.json`` (the PEFT config, with ``peft_type``)
and ``adapter_model.safetensors`` (or the older ``adapter_model.bin``). The weight keys name the
adapted module by its path in the transformers model (checked against PEFT 0.21.2):

- LoRA: ``base_model.model.<module>.lora_A.weight`` ``(r, in_features)`` and ``.lora_B.weight``
  ``(out_features, r)``. The update is ``scaling * B A x`` with ``scaling = alpha / r``, or
  ``alpha / sqrt(r)`` with ``use_rslora``. ``rank_pattern`` and ``alpha_pattern`` set ``r`` and
  ``alpha`` per module. The shapes are the same for transformers ``Conv1D`` layers, where
  ``fan_in_fan_out`` only matters when merging.
- (IA)^3: ``base_model.model.<module>.ia3_l``, ``(out_features, 1)`` to scale the module's output,
  or ``(1, in_features)`` to scale its input, for the modules in ``feedforward_modules``.
- Prefix tuning: ``prompt_embeddings`` ``(num_virtual_tokens, num_layers * 2 * token_dim)``, the
  last dimension laid out as ``(num_layers, 2, heads, head_dim)`` with keys before values. With
  ``prefix_projection=True`` PEFT saves the output of its MLP, not the MLP.
- Prompt tuning: ``prompt_embeddings`` ``(num_transformer_submodules * num_virtual_tokens,
  token_dim)``. Seq2seq checkpoints have two submodules, but PEFT 0.21's prompt tuning prepends
  only the first ``num_virtual_tokens`` rows, to the encoder input.
- Heads in ``modules_to_save``: ``base_model.model.<module>.<parameter>``, or
  ``base_model.<module>.<parameter>`` for prefix and prompt tuning.

adapterkit places LoRA and (IA)^3 by role (``query``, ``ff_out``, ...) on every block that is not
left out. ``read_peft`` maps a PEFT checkpoint onto that form exactly. Per-module LoRA ranks and
``alpha`` values go into ``LoRAConfig.rank_pattern`` and ``alpha_pattern``, so each module keeps
PEFT's rank and scaling. Projections of an adapted role that PEFT left alone get a zero LoRA or an
all-ones (IA)^3 vector. A LoRA on GPT-2's fused ``c_attn`` becomes one LoRA per part (query, key,
value). Each such step is listed in the returned notes. Whatever cannot be mapped exactly raises
``ValueError``.

NOTE: a loaded LoRA has as many trainable parameters as PEFT's except after those two steps: the
zero LoRAs are extra, and each part of a fused layer gets its own copy of ``lora_A``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.auto import modeling_auto

from ..architectures import LinearRef, attention_shape
from ..config import IA3Config, LoRAConfig, MethodConfig, PrefixTuningConfig, PromptTuningConfig
from ..config.base import ROLES
from ..heads import STORE_ATTRIBUTE
from ..io import write_atomically
from ..layout import ModelLayout, linear_shape
from ..methods.prompt import input_embeddings, prompt_target

if TYPE_CHECKING:
    from ..registry import AdapterRegistry

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

SUPPORTED_PEFT_TYPES = ("LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING")
_PROMPT_LEARNING_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING")

# Config keys that describe the checkpoint or only how PEFT initialises or matches modules. The
# weights file lists the adapted modules, so target_modules and its relatives are not needed.
_COMMON_KEYS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "modules_to_save", "target_modules", "exclude_modules", "fan_in_fan_out",
                "layers_to_transform", "layers_pattern"}
_LORA_KEYS = _COMMON_KEYS | {"r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "rank_pattern",
                             "alpha_pattern", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
                             "corda_config", "lora_ga_config", "ensure_weight_tying", "runtime_config"}
_IA3_KEYS = _COMMON_KEYS | {"feedforward_modules", "init_ia3_weights"}
_PROMPT_KEYS = _COMMON_KEYS | {"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                               "num_attention_heads", "num_layers", "prompt_tuning_init",
                               "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"}
_PREFIX_KEYS = _COMMON_KEYS | {"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                               "num_attention_heads", "num_layers", "init_weights", "encoder_hidden_size",
                               "prefix_projection"}

# LoRA options that must keep PEFT's default, and what a non-default value means.
_LORA_DEFAULTS: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA learns a magnitude per output feature, which adapterkit's LoRA has no parameter for"),
    "bias": ("none", "PEFT also trained bias terms of the base model, which adapterkit keeps frozen"),
    "lora_bias": (False, "lora_B has a bias term, which adapterkit's LoRA lacks"),
    "target_parameters": (None, "LoRA on raw parameters (such as MoE experts) has no adapterkit equivalent"),
    "layer_replication": (None, "PEFT duplicated base model layers, which adapterkit does not do"),
    "trainable_token_indices": (None, "trained embedding rows have no adapterkit equivalent"),
    "alora_invocation_tokens": (None, "activated LoRA adapts only the positions after the invocation tokens, "
                                      "adapterkit's LoRA adapts every position"),
    "use_qalora": (False, "QA-LoRA pools the input in groups before lora_A"),
    "megatron_config": (None, "Megatron-parallel LoRA layers are not supported"),
    "use_bdlora": (None, "block-diagonal LoRA is not supported"),
    "arrow_config": (None, "Arrow routing between LoRA experts is not supported"),
    "kasa_config": (None, "the KaSA variant of LoRA is not supported"),
    "velora_config": (None, "the VeLoRA variant of LoRA is not supported"),
    "monteclora_config": (None, "the MonteCLoRA variant of LoRA is not supported"),
}

# init_lora_weights values under which PEFT also changes the base model's weights (PEFT 0.21).
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

# Families whose attention ignores the KV cache that PEFT's prefix tuning passes, so a PEFT prefix
# changes nothing there (measured with PEFT 0.21.2 and transformers 5.25).
_PREFIX_IGNORED_FAMILIES = ("distilbert", "mpnet", "deberta-v2")


class PeftCheckpoint(NamedTuple):
    """A PEFT checkpoint mapped onto adapterkit.

    Attributes:
        config: The adapterkit config to pass to ``add_adapter``.
        weights: Every tensor of the new adapter, keyed as in ``modules_of(name).state_dict()``, so
            ``load_state_dict(weights)`` with ``strict=True`` fills it. Head keys (``head.<module>.``)
            hold the checkpoint's ``modules_to_save`` weights where it has them and the base model's
            head everywhere else.
        info: ``peft_type``, ``task_type``, ``base_model_name_or_path``, ``peft_version``,
            ``head_keys`` (the head keys that came from the checkpoint), ``notes`` (one sentence per
            exact transformation that ``read_peft`` applied) and, for prefix tuning,
            ``position_offset`` (see ``read_peft``).
    """

    config: MethodConfig
    weights: dict[str, torch.Tensor]
    info: dict[str, Any]


@dataclass(frozen=True)
class _Projection:
    """One projection of one block: where adapterkit keeps its module, and the layer it adapts."""

    index: int
    role: str
    number: int
    ref: LinearRef
    layer: nn.Module

    @property
    def key(self) -> str:
        return f"methods.0.layers.{self.index}.{self.role}.{self.number}"

    def rows(self, out_features: int) -> slice:
        """Return the output features of ``out_features`` that belong to this part of the layer."""
        width = out_features // self.ref.parts
        return slice(self.ref.part * width, (self.ref.part + 1) * width)


# -- files ------------------------------------------------------------------------------------------

def is_peft_checkpoint(directory: str | os.PathLike) -> bool:
    """Return whether ``directory`` contains a PEFT ``adapter_config.json`` with a ``peft_type`` and a weights file."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        return False
    if not ((directory / SAFETENSORS_FILE).is_file() or (directory / BIN_FILE).is_file()):
        return False
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "peft_type" in data


def _load_files(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{CONFIG_FILE} not found in {directory}; pass a folder written by PEFT's "
                                "save_pretrained")
    peft_config = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(peft_config, dict) or "peft_type" not in peft_config:
        raise ValueError(f"{config_path} has no peft_type, so it is not a PEFT adapter config")
    if (directory / SAFETENSORS_FILE).is_file():
        state = load_file(str(directory / SAFETENSORS_FILE))
    elif (directory / BIN_FILE).is_file():
        state = torch.load(directory / BIN_FILE, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"Neither {SAFETENSORS_FILE} nor {BIN_FILE} found in {directory}")
    return peft_config, state


# -- the model's module names ---------------------------------------------------------------------

def _module_names(model: nn.Module) -> dict[str, nn.Module]:
    """Return the model's modules by name, without adapterkit's own modules."""
    return {name: module for name, module in model.named_modules()
            if name != STORE_ATTRIBUTE and not name.startswith(STORE_ATTRIBUTE + ".")}


def _projections_by_name(registry: AdapterRegistry) -> dict[str, list[_Projection]]:
    """Return every projection of every block and role, keyed by the layer's name in the model.

    A fused layer (GPT-2's ``c_attn``) has one entry per part.
    """
    names = {id(module): name for name, module in _module_names(registry.model).items()}
    layout = registry.layout
    found: dict[str, list[_Projection]] = {}
    for index, (stack, _) in enumerate(layout.blocks):
        for role in ROLES:
            for number, ref in enumerate(stack.linear_refs(role)):
                layer = layout.projection(index, role, number)
                name = names.get(id(layer))
                if name is None:
                    raise ValueError(f"The {role} projection {ref.path!r} of block {index} is not a submodule of "
                                     f"the model, so it has no name in a PEFT checkpoint")
                found.setdefault(name, []).append(_Projection(index, role, number, ref, layer))
    return found


def _describe_roles(projections: dict[str, list[_Projection]]) -> str:
    """Return the projections of each role in the first block that has it, e.g. ``query: attention.self.query``."""
    paths: dict[str, str] = {}
    for entries in projections.values():
        for entry in entries:
            paths.setdefault(entry.role, entry.ref.path)
    return "; ".join(f"{role}: {paths[role]}" for role in ROLES if role in paths)


# -- heads (modules_to_save) ----------------------------------------------------------------------

def _split_head_weights(registry: AdapterRegistry, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move the keys of the model's head modules out of ``state`` and return them as ``head.`` keys."""
    head = {}
    for key in list(state):
        module = key.split(".", 1)[0]
        if module in registry.head_names and "." in key:
            head[f"head.{key}"] = state.pop(key)
    return head


def _complete_head(registry: AdapterRegistry, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return every head key of a new adapter: the saved tensors, and the base model's head for the rest."""
    full = {}
    for head_name in registry.head_names:
        for key, value in registry.base_heads[head_name].state_dict().items():
            full[f"head.{head_name}.{key}"] = value.detach().clone()
    unknown = sorted(set(saved) - set(full))
    if unknown:
        raise ValueError(f"The checkpoint has head weights {unknown}, which the model's head modules "
                         f"({registry.head_names}) do not have")
    mismatched = [f"{key}: saved {tuple(value.shape)}, model {tuple(full[key].shape)}"
                  for key, value in saved.items() if value.shape != full[key].shape]
    if mismatched:
        raise ValueError(f"The checkpoint's head does not fit the model's head ({'; '.join(mismatched)}). Load the "
                         "model with as many labels as the checkpoint's head predicts (num_labels)")
    full.update(saved)
    return full


# -- reading --------------------------------------------------------------------------------------

def read_peft(registry: AdapterRegistry, directory: str | os.PathLike) -> PeftCheckpoint:
    """Map the PEFT checkpoint in ``directory`` onto adapter config and weights for this model.

    The caller adds the adapter with ``registry.add(name, config)`` and fills it with
    ``registry.modules_of(name).load_state_dict(weights)``; the model then computes what PEFT's
    model computes, within float rounding. The module names in the checkpoint must be those of
    this model, so load it with the task class the checkpoint was trained with.

    Prefix tuning: PEFT passes the prefix as a KV cache of ``num_virtual_tokens`` positions, so the
    model numbers the real tokens from ``num_virtual_tokens`` on. This shifts absolute position
    embeddings (BERT, RoBERTa, GPT-2) and the rotation of queries against the prefix keys (RoPE
    models). The config read here sets ``shift_positions=True``, so adapterkit numbers the real tokens
    the same way when the caller passes no position ids. ``info["position_offset"]`` is that shift.
    Encoder-decoder checkpoints (``num_transformer_submodules=2``) prefix the decoder self-attention
    only, and the config read from them numbers the decoder's tokens the same way (see
    ``_read_encoder_decoder_prefix``).

    Prompt tuning: outputs match PEFT's with two exceptions. In rows with left padding, adapterkit
    puts the prompt after the padding and PEFT before it. And when ``forward`` gets position ids
    other than the model's defaults, PEFT drops them while adapterkit moves them up by the prompt length.

    Args:
        registry: The adapter registry of the model (``model._adapterkit``).
        directory: A folder written by PEFT's ``save_pretrained``.

    Returns:
        ``PeftCheckpoint(config, weights, info)``.

    Raises:
        FileNotFoundError: If the config or weights file is missing.
        ValueError: For any part of the checkpoint that adapterkit cannot reproduce exactly. Examples
            are another PEFT method, DoRA, trained biases, options of other LoRA variants, and a
            module that plays no projection role in this family. So are (IA)^3 on the other side
            of a layer than adapterkit scales, a ``num_transformer_submodules`` that does not fit
            the model, and weights that do not fit the model.
    """
    directory = Path(directory)
    peft_config, state = _load_files(directory)
    peft_type = str(peft_config["peft_type"]).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise ValueError(f"peft_type={peft_config['peft_type']!r} in {directory / CONFIG_FILE} is not supported: "
                         f"adapterkit reads {', '.join(SUPPORTED_PEFT_TYPES)} checkpoints")

    prefix = "base_model." if peft_type in _PROMPT_LEARNING_TYPES else "base_model.model."
    outside = sorted(key for key in state if not key.startswith(prefix) and key != "prompt_embeddings")
    if outside:
        raise ValueError(f"The weights in {directory} have keys outside {prefix!r}: {outside}")
    state = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}
    saved_head = _split_head_weights(registry, state)
    notes: list[str] = []

    if peft_type == "LORA":
        config, weights = _read_lora(registry, peft_config, state, notes)
    elif peft_type == "IA3":
        config, weights = _read_ia3(registry, peft_config, state, notes)
    elif peft_type == "PROMPT_TUNING":
        config, weights = _read_prompt(registry, peft_config, state, notes)
    else:
        config, weights = _read_prefix(registry, peft_config, state, notes)

    weights.update(_complete_head(registry, saved_head))
    info: dict[str, Any] = {
        "peft_type": peft_type,
        "task_type": peft_config.get("task_type"),
        "base_model_name_or_path": peft_config.get("base_model_name_or_path"),
        "peft_version": peft_config.get("peft_version"),
        "head_keys": sorted(saved_head),
        "notes": notes,
    }
    if peft_type == "PREFIX_TUNING":
        info["position_offset"] = config.prefix_length
    return PeftCheckpoint(config, weights, info)


def _check_options(peft_config: dict[str, Any], known: set[str], defaults: dict[str, tuple[Any, str]]) -> None:
    """Raise ``ValueError`` naming every option that changes what the adapter computes beyond adapterkit's method."""
    problems = []
    for key, (default, reason) in defaults.items():
        value = peft_config.get(key, default)
        if value != default and not (default is None and value in ({}, [], "", False)):
            problems.append(f"{key}={value!r}: {reason}")
    for key, value in peft_config.items():
        if key not in known and key not in defaults and value not in (None, False, "", [], {}):
            problems.append(f"{key}={value!r}: an option adapterkit does not know, so it cannot tell whether "
                            "the adapter still computes the same")
    if problems:
        raise ValueError(f"The {peft_config['peft_type']} checkpoint uses options adapterkit cannot reproduce:\n  - "
                         + "\n  - ".join(problems))


def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """Return the value of the first key of ``pattern`` that matches the end of ``module_name``, else ``default``.

    The matching follows PEFT's ``rank_pattern`` and ``alpha_pattern``: a key is a regular
    expression that must match a dotted suffix of the module name.
    """
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _group_keys(state: dict[str, torch.Tensor], suffixes: tuple[str, ...],
                method: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group keys ``<module>.<suffix>`` by module, raising ``ValueError`` for every key without such a suffix."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, value in state.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None:
            unsupported.append(key)
        else:
            grouped.setdefault(key[:-len(suffix) - 1], {})[suffix] = value
    if unsupported:
        raise ValueError(f"The {method} checkpoint has weights adapterkit cannot map: {sorted(unsupported)}. It maps "
                         f"{', '.join(suffixes)} weights and the tensors of the model's head "
                         "(modules_to_save naming a head module)")
    if not grouped:
        raise ValueError(f"The {method} checkpoint contains no {' or '.join(suffixes)} weights")
    return grouped


def _check_mappable(names: list[str], projections: dict[str, list[_Projection]], registry: AdapterRegistry) -> None:
    unknown = sorted(name for name in names if name not in projections)
    if unknown:
        raise ValueError(f"The checkpoint adapts modules that are not projections adapterkit places LoRA or (IA)^3 "
                         f"on in {registry.family!r} models: {unknown}. adapterkit adapts these roles: "
                         f"{_describe_roles(projections)}")


def _targets_and_leave_out(registry: AdapterRegistry,
                           covered: list[_Projection]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    roles = {entry.role for entry in covered}
    blocks = {entry.index for entry in covered}
    targets = tuple(role for role in ROLES if role in roles)
    leave_out = tuple(i for i in range(len(registry.layout)) if i not in blocks)
    return targets, leave_out


def _uncovered(registry: AdapterRegistry, projections: dict[str, list[_Projection]], targets: tuple[str, ...],
               leave_out: tuple[int, ...], covered: list[_Projection]) -> list[tuple[str, _Projection]]:
    """Return ``(layer name, projection)`` for the projections adapterkit builds that the checkpoint lacks."""
    done = {entry.key for entry in covered}
    return [(name, entry) for name, entries in projections.items() for entry in entries
            if entry.role in targets and entry.index not in leave_out and entry.key not in done]


def _note_uncovered(notes: list[str], missing: list[tuple[str, _Projection]], filler: str) -> None:
    if not missing:
        return
    examples = ", ".join(sorted({name for name, _ in missing})[:3])
    notes.append(f"{len(missing)} projections of the adapted roles have no weights in the checkpoint "
                 f"(e.g. {examples}); they get {filler}, which leaves their output unchanged")


def _read_lora(registry: AdapterRegistry, peft_config: dict[str, Any], state: dict[str, torch.Tensor],
               notes: list[str]) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    _check_options(peft_config, _LORA_KEYS, _LORA_DEFAULTS)
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"init_lora_weights={init!r}: this initialisation also changes the base model's weights, "
                         "so the adapter only works on that changed model. Save it from PEFT with "
                         "path_initial_model_for_weight_conversion to convert it to plain LoRA")
    grouped = _group_keys(state, ("lora_A.weight", "lora_B.weight"), "LoRA")
    projections = _projections_by_name(registry)
    _check_mappable(list(grouped), projections, registry)

    use_rslora = bool(peft_config.get("use_rslora", False))
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    default_alpha = peft_config.get("lora_alpha", 8)
    # Per adapterkit module: (projection, A (rank, in), B rows (out_part, rank), rank, alpha). adapterkit
    # scales by alpha / rank, so with use_rslora (PEFT scaling lora_alpha / sqrt(rank)) alpha is
    # lora_alpha * sqrt(rank).
    pieces = []
    for name, tensors in grouped.items():
        if len(tensors) != 2:
            raise ValueError(f"The checkpoint has only {', '.join(tensors)} for {name}; LoRA needs lora_A and lora_B")
        lora_a, lora_b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        in_features, out_features = linear_shape(projections[name][0].layer)
        rank = lora_a.shape[0]
        if tuple(lora_a.shape) != (rank, in_features) or tuple(lora_b.shape) != (out_features, rank):
            raise ValueError(f"The LoRA of {name} has lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)}, "
                             f"but the layer maps {in_features} to {out_features} features: expected "
                             f"({rank}, {in_features}) and ({out_features}, {rank})")
        peft_alpha = _pattern_value(alpha_pattern, name, default_alpha)
        if isinstance(peft_alpha, bool) or not isinstance(peft_alpha, (int, float)) or peft_alpha <= 0:
            raise ValueError(f"The LoRA of {name} has lora_alpha {peft_alpha!r}, but adapterkit's LoRA needs an alpha "
                             "> 0. Set lora_alpha or its alpha_pattern entry to a positive number")
        alpha = peft_alpha * math.sqrt(rank) if use_rslora else peft_alpha
        for entry in projections[name]:
            pieces.append((entry, lora_a, lora_b[entry.rows(out_features)], rank, alpha))
        if len(projections[name]) > 1:
            roles = ", ".join(entry.role for entry in projections[name])
            notes.append(f"The LoRA of the fused layer {name} becomes one LoRA per part ({roles}), each with the "
                         "same lora_A and its rows of lora_B")
    if use_rslora:
        notes.append("use_rslora=True: each module's alpha is lora_alpha * sqrt(r), so that alpha / r equals PEFT's "
                     "scaling lora_alpha / sqrt(r)")

    covered = [piece[0] for piece in pieces]
    targets, leave_out = _targets_and_leave_out(registry, covered)
    ranks = {(entry.index, entry.role, entry.number): rank for entry, _, _, rank, _ in pieces}
    alphas = {(entry.index, entry.role, entry.number): alpha for entry, _, _, _, alpha in pieces}
    rank = _common_value(list(ranks.values()), peft_config.get("r"))
    alpha = _common_value(list(alphas.values()), None if use_rslora else default_alpha)
    config = LoRAConfig(r=rank, alpha=alpha, dropout=float(peft_config.get("lora_dropout", 0.0) or 0.0),
                        targets=targets, leave_out=leave_out, rank_pattern=_compact_pattern(ranks, rank),
                        alpha_pattern=_compact_pattern(alphas, alpha))

    weights: dict[str, torch.Tensor] = {}
    for entry, lora_a, lora_b, _, _ in pieces:
        weights[f"{entry.key}.lora_A"] = lora_a
        weights[f"{entry.key}.lora_B"] = lora_b

    # lora_B = 0 keeps these modules' output at zero. lora_A gets LoRA's usual Kaiming-uniform draw
    # (bound 1 / sqrt(in_features)), from a fixed seed so that reading is deterministic, so that
    # training can move them. Their rank is the one the config gives them.
    missing = _uncovered(registry, projections, targets, leave_out, covered)
    generator = torch.Generator().manual_seed(0)
    for name, entry in missing:
        in_features, out_features = linear_shape(entry.layer)
        bound = 1.0 / math.sqrt(in_features)
        missing_rank = config.rank_for(entry.index, entry.role, entry.number)
        weights[f"{entry.key}.lora_A"] = (torch.rand(missing_rank, in_features, generator=generator) * 2 - 1) * bound
        weights[f"{entry.key}.lora_B"] = torch.zeros(out_features // entry.ref.parts, missing_rank)
    _note_uncovered(notes, missing, "lora_B = 0 and a new lora_A")
    return config, weights


def _common_value(values: list[Any], preferred: Any) -> Any:
    """Return the most frequent of ``values``, or ``preferred`` where it ties for most frequent."""
    counts = Counter(values)
    if preferred is not None and counts.get(preferred, 0) == max(counts.values()):
        return preferred
    return counts.most_common(1)[0][0]


def _block_list(blocks: list[int]) -> str:
    """Return block indices in the pattern key notation, with runs as ranges: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    items = []
    for block in sorted(set(blocks)):
        if items and items[-1][1] == block - 1:
            items[-1][1] = block
        else:
            items.append([block, block])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in items)


def _compact_pattern(values: dict[tuple[int, str, int], Any], default: Any) -> dict[str, Any]:
    """Return a ``LoRAConfig`` pattern that gives each ``(block, role, number)`` of ``values`` its value.

    A role whose most frequent value differs from ``default`` gets a role key. Blocks where the role
    has another value get a ``"<blocks>.<role>"`` key, or ``"<blocks>.<role>.<number>"`` keys where
    the block's projections of the role differ. Those keys outrank the role key, and keys of one
    kind never select a common projection, so the pattern is valid and exact.
    """
    pattern: dict[str, Any] = {}
    groups: dict[tuple[str, int | None, Any], list[int]] = {}
    for role in ROLES:
        by_block: dict[int, dict[int, Any]] = {}
        for (block, key_role, number), value in values.items():
            if key_role == role:
                by_block.setdefault(block, {})[number] = value
        if not by_block:
            continue
        role_value = _common_value([v for numbered in by_block.values() for v in numbered.values()], default)
        if role_value != default:
            pattern[role] = role_value
        for block, numbered in sorted(by_block.items()):
            distinct = set(numbered.values())
            if distinct == {role_value}:
                continue
            if len(distinct) == 1:
                groups.setdefault((role, None, distinct.pop()), []).append(block)
                continue
            for number, value in sorted(numbered.items()):
                if value != role_value:
                    groups.setdefault((role, number, value), []).append(block)
    for (role, number, value), blocks in groups.items():
        pattern[f"{_block_list(blocks)}.{role}" + ("" if number is None else f".{number}")] = value
    return pattern

def _read_ia3(registry: AdapterRegistry, peft_config: dict[str, Any], state: dict[str, torch.Tensor],
              notes: list[str]) -> tuple[IA3Config, dict[str, torch.Tensor]]:
    _check_options(peft_config, _IA3_KEYS, {})
    grouped = _group_keys(state, ("ia3_l",), "(IA)^3")
    projections = _projections_by_name(registry)
    _check_mappable(list(grouped), projections, registry)

    weights: dict[str, torch.Tensor] = {}
    covered: list[_Projection] = []
    wrong_side = []
    ff_out_sides: dict[str, list[str]] = {"input": [], "output": []}
    for name, tensors in grouped.items():
        vector = tensors["ia3_l"]
        in_features, out_features = linear_shape(projections[name][0].layer)
        if tuple(vector.shape) == (out_features, 1):
            scales_input = False
        elif tuple(vector.shape) == (1, in_features):
            scales_input = True
        else:
            raise ValueError(f"The (IA)^3 vector of {name} has shape {tuple(vector.shape)}: expected "
                             f"({out_features}, 1) for its output or (1, {in_features}) for its input")
        for entry in projections[name]:
            if (scales_input and entry.role != "ff_out") or (scales_input and entry.ref.parts > 1):
                wrong_side.append(f"{name} ({entry.role}, PEFT scales its input)")
                continue
            if entry.role == "ff_out":
                ff_out_sides["input" if scales_input else "output"].append(name)
            flat = vector.flatten()
            weights[f"{entry.key}.scale"] = flat if scales_input else flat[entry.rows(out_features)]
            covered.append(entry)
    if wrong_side:
        raise ValueError(f"adapterkit's (IA)^3 scales the input of ff_out projections only and the output of every "
                         f"other role, but the checkpoint scales the input of {wrong_side}. Train the PEFT adapter "
                         "with feedforward_modules naming only ff_out layers")
    if ff_out_sides["input"] and ff_out_sides["output"]:
        raise ValueError(f"The (IA)^3 checkpoint scales the input of the ff_out layers {ff_out_sides['input']} and the "
                         f"output of {ff_out_sides['output']}, but an adapterkit IA3Config scales one side of every "
                         "ff_out layer (ff_out_side). Train the PEFT adapter with all or none of its ff_out layers in "
                         "feedforward_modules")
    ff_out_side = "output" if ff_out_sides["output"] else "input"

    targets, leave_out = _targets_and_leave_out(registry, covered)
    missing = _uncovered(registry, projections, targets, leave_out, covered)
    for name, entry in missing:
        in_features, out_features = linear_shape(entry.layer)
        scales_input = entry.role == "ff_out" and ff_out_side == "input"
        features = in_features if scales_input else out_features // entry.ref.parts
        weights[f"{entry.key}.scale"] = torch.ones(features)
    _note_uncovered(notes, missing, "an (IA)^3 vector of ones")
    return IA3Config(targets=targets, leave_out=leave_out, ff_out_side=ff_out_side), weights


def _check_prompt_embeddings(state: dict[str, torch.Tensor], method: str) -> None:
    """Raise ``ValueError`` unless ``state`` contains ``prompt_embeddings`` and nothing else besides head weights."""
    extra = sorted(key for key in state if key != "prompt_embeddings")
    if extra or "prompt_embeddings" not in state:
        raise ValueError(f"A {method} checkpoint contains prompt_embeddings and head weights only; this one has "
                         f"{extra or 'no prompt_embeddings'}")


def _read_prefix(registry: AdapterRegistry, peft_config: dict[str, Any], state: dict[str, torch.Tensor],
                 notes: list[str]) -> tuple[PrefixTuningConfig, dict[str, torch.Tensor]]:
    _check_options(peft_config, _PREFIX_KEYS, {})
    _check_prompt_embeddings(state, "prefix tuning")
    layout = registry.layout
    submodules = peft_config.get("num_transformer_submodules") or 1
    encoder_decoder = len(layout.spec.stacks) != 1
    if submodules == 2 and encoder_decoder:
        return _read_encoder_decoder_prefix(registry, peft_config, state, notes)
    if submodules != 1 or encoder_decoder:
        raise ValueError(f"num_transformer_submodules={submodules} does not fit this {layout.family!r} model: PEFT "
                         "passes the prefix of an encoder-decoder model with num_transformer_submodules=2 (the "
                         "SEQ_2_SEQ_LM default) and that of a single-stack model with 1. Load the checkpoint into "
                         "the model class it was trained with")

    _check_prefix_family(layout.family)
    prefix = state["prompt_embeddings"]
    kv_heads, head_dim = attention_shape(registry.model.config)
    length = int(peft_config.get("num_virtual_tokens") or prefix.shape[0])
    expected = {"num_layers": len(layout), "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
    wrong = [f"{key}={peft_config.get(key)!r} (this model: {value})" for key, value in expected.items()
             if peft_config.get(key) is not None and peft_config.get(key) != value]
    shape = (length, len(layout) * 2 * kv_heads * head_dim)
    if wrong or tuple(prefix.shape) != shape:
        raise ValueError(f"The prefix does not fit this model: {'; '.join(wrong) or 'sizes match'}, prompt_embeddings "
                         f"{tuple(prefix.shape)}, expected {shape}")

    config = PrefixTuningConfig(prefix_length=length, flat=True, shift_positions=True)
    groups = layout.prefix_stacks(config)
    if len(groups) != 1 or groups[0][2] != list(range(len(layout))):
        raise ValueError(f"adapterkit's {layout.family!r} description does not put one prefix on every block, as PEFT "
                         "does; set the stack's attention_module")
    if peft_config.get("prefix_projection"):
        notes.append("The checkpoint holds the output of PEFT's prefix MLP, not the MLP, so the prefix is loaded flat")
    notes.append(f"PEFT numbers the real tokens from {length} (after the prefix); pass position ids starting at "
                 f"{length} to reproduce its outputs")
    text_config = getattr(registry.model.config, "text_config", None) or registry.model.config
    window = getattr(text_config, "sliding_window", None)
    if window:
        notes.append(f"PEFT's prefix sits in the KV cache, so sliding-window layers stop attending to it more than "
                     f"{window} positions later, while adapterkit's prefix stays visible: outputs match while "
                     f"{length} + the sequence length <= {window}")
    return config, {f"methods.0.prefix.{groups[0][0]}.prefix": prefix}


def _decoder_blocks(layout: ModelLayout) -> list[int]:
    """Return the global indices of the decoder blocks of an encoder-decoder layout (its last, causal stack)."""
    decoder = layout.spec.stacks[-1]
    if not decoder.causal or decoder.cross_attention_module is None:
        raise ValueError(f"adapterkit's {layout.family!r} description has no decoder stack with cross-attention "
                         "last, which PEFT's encoder-decoder prefix tuning needs")
    return layout.indices(decoder)


def _peft_decoder_block(layer: int, num_layers: int) -> int:
    """Return the block of PEFT's ``prompt_embeddings`` whose keys and values decoder layer ``layer`` attends to.

    For ``num_transformer_submodules=2``, PEFT 0.21.2's ``get_prompt`` concatenates the
    ``2 * num_layers`` key and value rows with themselves and cuts the result into groups of four
    (self-attention key and value, cross-attention key and value) per decoder layer. So layer ``i``
    reads row ``4 i mod 2 num_layers``, the key of block ``2 i mod num_layers``, and the value
    after it. The cross-attention pairs are dropped for an empty cache.
    """
    return (2 * layer) % num_layers


def _read_encoder_decoder_prefix(registry: AdapterRegistry, peft_config: dict[str, Any],
                                 state: dict[str, torch.Tensor],
                                 notes: list[str]) -> tuple[PrefixTuningConfig, dict[str, torch.Tensor]]:
    """Map a PEFT prefix of an encoder-decoder model onto a prefix of the decoder self-attention only.

    PEFT 0.21.2 passes the prefix as the self-attention part of an ``EncoderDecoderCache`` with an
    empty cross-attention part, and only the decoder receives that cache. So the encoder and the
    cross-attention see no prefix, and the decoder numbers its real tokens from
    ``num_virtual_tokens`` on. The config read here reproduces that: ``encoder_prefix=False``,
    ``cross_prefix=False``, ``position_bias="shifted"`` (T5's relative bias as next to a cache) and
    ``shift_positions=True`` where the family has a position rule (BART's learned positions).
    """
    layout = registry.layout
    _check_prefix_family(layout.family)
    prefix = state["prompt_embeddings"]
    kv_heads, head_dim = attention_shape(registry.model.config)
    width = 2 * kv_heads * head_dim
    decoder_blocks = _decoder_blocks(layout)
    length = int(peft_config.get("num_virtual_tokens") or prefix.shape[0])
    num_layers = peft_config.get("num_layers")
    if num_layers is None:
        num_layers = prefix.shape[-1] // width
    expected = {"num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
    wrong = [f"{key}={peft_config.get(key)!r} (this model: {value})" for key, value in expected.items()
             if peft_config.get(key) is not None and peft_config.get(key) != value]
    if num_layers < len(decoder_blocks):
        # PEFT's cache then has no entry for the last decoder layers, and its forward fails.
        wrong.append(f"num_layers={num_layers} (this model's decoder has {len(decoder_blocks)} layers)")
    shape = (length, num_layers * width)
    if wrong or tuple(prefix.shape) != shape:
        raise ValueError(f"The prefix does not fit this model: {'; '.join(wrong) or 'sizes match'}, prompt_embeddings "
                         f"{tuple(prefix.shape)}, expected {shape}")

    config = PrefixTuningConfig(prefix_length=length, flat=True, encoder_prefix=False, cross_prefix=False,
                                shift_positions=layout.spec.position_ids is not None, position_bias="shifted")
    groups = layout.prefix_stacks(config)
    if len(groups) != 1 or groups[0][2] != decoder_blocks:
        raise ValueError(f"adapterkit's {layout.family!r} description does not put one prefix on every decoder "
                         "self-attention, as PEFT does; set the decoder stack's attention_module")
    blocks = [_peft_decoder_block(layer, num_layers) for layer in range(len(decoder_blocks))]
    rows = torch.cat([prefix[:, block * width:(block + 1) * width] for block in blocks], dim=1)

    if peft_config.get("prefix_projection"):
        notes.append("The checkpoint holds the output of PEFT's prefix MLP, not the MLP, so the prefix is loaded flat")
    notes.append(f"PEFT passes the prefix to the decoder self-attention only, so the prefix is loaded there "
                 f"(encoder_prefix=False, cross_prefix=False), and decoder layer i reads block 2 i mod {num_layers} "
                 f"of prompt_embeddings: blocks {blocks}")
    unused = sorted(set(range(num_layers)) - set(blocks))
    if unused:
        notes.append(f"PEFT's decoder never reads blocks {unused} of prompt_embeddings, so they are not loaded")
    notes.append(f"The decoder numbers its real tokens from {length} (after the prefix), as PEFT's cache does")
    return config, {f"methods.0.prefix.{groups[0][0]}.prefix": rows}


def _check_prefix_family(family: str) -> None:
    if family in _PREFIX_IGNORED_FAMILIES:
        raise ValueError(f"PEFT's prefix tuning has no effect on {family!r} models: their attention ignores the KV "
                         "cache that PEFT passes the prefix in, so adapterkit's prefix cannot reproduce it")


def _read_prompt(registry: AdapterRegistry, peft_config: dict[str, Any], state: dict[str, torch.Tensor],
                 notes: list[str]) -> tuple[PromptTuningConfig, dict[str, torch.Tensor]]:
    _check_options(peft_config, _PROMPT_KEYS, {})
    _check_prompt_embeddings(state, "prompt tuning")
    prompt = state["prompt_embeddings"]
    width = input_embeddings(prompt_target(registry.model)).weight.shape[1]
    submodules = peft_config.get("num_transformer_submodules") or 1
    length = int(peft_config.get("num_virtual_tokens") or prompt.shape[0] // submodules)
    encoder_decoder = bool(getattr(registry.model.config, "is_encoder_decoder", False))
    if submodules not in (1, 2) or (submodules == 2 and not encoder_decoder):
        raise ValueError(f"num_transformer_submodules={submodules!r} does not fit a {type(registry.model).__name__}: "
                         "expected 1, or 2 for an encoder-decoder model")
    if tuple(prompt.shape) != (submodules * length, width):
        raise ValueError(f"prompt_embeddings has shape {tuple(prompt.shape)}, but num_virtual_tokens={length}, "
                         f"num_transformer_submodules={submodules} and this model's input embeddings of width "
                         f"{width} need ({submodules * length}, {width})")
    if submodules == 2:
        notes.append(f"The checkpoint has {2 * length} prompt rows, for an encoder and a decoder, but PEFT's prompt "
                     f"tuning prepends only the first {length} to the encoder input, so only those are loaded")
        prompt = prompt[:length]
    init = str(peft_config.get("prompt_tuning_init") or "RANDOM").upper()
    config = PromptTuningConfig(prompt_length=length, init="random" if init == "RANDOM" else "vocab")
    return config, {"methods.0.prompt.prompt": prompt}


# -- writing --------------------------------------------------------------------------------------

def write_peft(registry: AdapterRegistry, name: str, directory: str | os.PathLike) -> Path:
    """Write adapter ``name`` as a PEFT checkpoint that ``PeftModel.from_pretrained`` loads onto the base model.

    LoRA parts of a fused layer (GPT-2's ``c_attn``) become one LoRA on the layer. Its ``lora_A``
    stacks the parts' ``A`` matrices and its ``lora_B`` is block-diagonal, so its rank is the sum
    of the parts' ranks. Its ``alpha`` is the sum of theirs, which keeps the scaling ``alpha / r``
    where the parts share it. Otherwise each part's ``lora_B`` absorbs the difference.
    ``rank_pattern`` and ``alpha_pattern`` give each layer its rank and ``alpha``.

    Prefix tuning is written flat: a prefix MLP is saved as its output, as PEFT does. The head, if
    the model has one, is saved through ``modules_to_save``. The weights file is written before the
    config, each through a temporary file.

    NOTE: PEFT 0.21's sequence classification wrapper rejects prefix tuning on transformers 5
    ("Model does not support past key values"), so a prefix written from a
    ``*ForSequenceClassification`` model loads in PEFT but does not run there.

    Args:
        registry: The adapter registry of the model (``model._adapterkit``).
        name: The adapter to write.
        directory: The target folder, created if missing.

    Returns:
        The folder.

    Raises:
        ValueError: If the adapter has no PEFT equivalent: several methods, a method other than
            LoRA, (IA)^3, prefix tuning and prompt tuning, gating, a prefix on only some blocks, or
            a prompt on a model class that PEFT's prompt tuning cannot run. On encoder-decoder
            models, also a prefix on the encoder or the cross-attention, or decoder positions that
            PEFT's cache would number otherwise (``position_bias``, ``shift_positions``).
    """
    registry.check_names([name])
    directory = Path(directory)
    config = registry.entries[name].config
    if len(config.methods) != 1:
        raise ValueError(f"Adapter {name!r} combines {len(config.methods)} methods; a PEFT checkpoint contains one. "
                         "Write each method as its own adapter")
    member = config.methods[0]
    tree = registry.modules_of(name)["methods"]["0"]
    if isinstance(member, LoRAConfig):
        peft_config, weights = _lora_to_peft(registry, member, tree)
    elif isinstance(member, IA3Config):
        peft_config, weights = _ia3_to_peft(registry, tree)
    elif isinstance(member, PrefixTuningConfig):
        peft_config, weights = _prefix_to_peft(registry, member, tree)
    elif isinstance(member, PromptTuningConfig):
        peft_config, weights = _prompt_to_peft(registry, member, tree)
    else:
        raise ValueError(f"Adapter {name!r} is a {member.architecture} adapter, which PEFT has no format for; "
                         "adapterkit writes LoRA, (IA)^3, prefix tuning and prompt tuning adapters as PEFT "
                         "checkpoints")

    prefix = "base_model." if peft_config["peft_type"] in _PROMPT_LEARNING_TYPES else "base_model.model."
    # PEFT saves the prompt_embeddings of prefix and prompt tuning without a module prefix.
    tensors = {key if key == "prompt_embeddings" else f"{prefix}{key}": value for key, value in weights.items()}
    head = registry.modules_of(name)["head"]
    for key, value in head.state_dict().items():
        tensors[f"{prefix}{key}"] = value
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    peft_config.update({
        "task_type": _task_type(registry.model),
        "base_model_name_or_path": getattr(registry.model.config, "_name_or_path", None) or None,
        "modules_to_save": list(head.keys()) or None,
        "inference_mode": True,
    })

    write_atomically(directory / SAFETENSORS_FILE,
                     lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    text = json.dumps(dict(sorted(peft_config.items())), indent=2) + "\n"
    write_atomically(directory / CONFIG_FILE, lambda path: path.write_text(text, encoding="utf-8"))
    logger.info("Wrote adapter %r as a PEFT %s checkpoint to %s", name, peft_config["peft_type"], directory)
    return directory


# PEFT task types by the transformers auto-class mapping whose classes they wrap.
_TASK_MAPPINGS = (("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                  ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                  ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
                  ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                  ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
                  ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"))


def _task_type(model: nn.Module) -> str | None:
    """Return the PEFT task type of the model's class, which picks the ``PeftModel`` subclass on loading.

    Returns ``None`` for a class that no transformers auto class lists for its ``model_type``.
    """
    class_name = type(model).__name__
    model_type = getattr(model.config, "model_type", None)
    for mapping_name, task in _TASK_MAPPINGS:
        names = getattr(modeling_auto, mapping_name, {}).get(model_type)
        if class_name == names or (isinstance(names, (tuple, list)) and class_name in names):
            return task
    return None


def _adapted_layers(registry: AdapterRegistry, tree: nn.ModuleDict) -> dict[str, dict[str, Any]]:
    """Return, per adapted layer name, the layer and its adapterkit modules as ``{(part, role): module}``."""
    names = {id(module): name for name, module in _module_names(registry.model).items()}
    layout = registry.layout
    layers: dict[str, dict[str, Any]] = {}
    for index, roles in tree["layers"].items():
        stack, _ = layout.blocks[int(index)]
        for role, numbered in roles.items():
            for number, module in enumerate(numbered):
                ref = stack.linear_refs(role)[number]
                layer = layout.projection(int(index), role, number)
                entry = layers.setdefault(names[id(layer)], {"layer": layer, "parts": ref.parts, "modules": {}})
                entry["modules"][(ref.part, role)] = module
    if not layers:
        raise ValueError("The adapter leaves out every block, so it has no module to write")
    return layers


def _target_names(model: nn.Module, layer_names: list[str]) -> list[str]:
    """Return the shortest dotted suffix of each of ``layer_names`` that selects no module outside them.

    PEFT's ``target_modules`` list selects a module whose name equals an entry or ends with
    ``"." + entry``, so the returned entries together select exactly ``layer_names``. A suffix never
    starts with a block number: it reads ``layer.0.output.dense``, not ``0.output.dense``.
    """
    all_names = list(_module_names(model))
    chosen_set = set(layer_names)
    found = set()
    for name in layer_names:
        parts = name.split(".")
        for start in range(len(parts) - 1, -1, -1):
            if start > 0 and parts[start].isdigit():
                continue
            entry = ".".join(parts[start:])
            if all(other in chosen_set for other in all_names if other == entry or other.endswith("." + entry)):
                found.add(entry)
                break
    return sorted(found)


def _fuse_parts(name: str, entry: dict[str, Any], modules: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     int, float]:
    """Return ``(lora_A, lora_B, rank, alpha)`` of one PEFT LoRA on a fused layer from the LoRA of each part.

    ``lora_A`` stacks the parts' ``A`` matrices and ``lora_B`` is block-diagonal, so the update of
    each part's output rows is that part's own ``B A``. The rank and ``alpha`` are the sums over the
    parts, which keep each part's scaling ``alpha / r`` where the parts share it. Otherwise each
    part's ``B`` is multiplied by its scaling over the fused scaling, which keeps the output exact.
    """
    _, out_features = linear_shape(entry["layer"])
    width = out_features // entry["parts"]
    rank = sum(module.r for module in modules)
    alpha = sum(module.alpha for module in modules)
    lora_a = torch.cat([module.lora_A for module in modules])
    lora_b = lora_a.new_zeros(out_features, rank)
    column = 0
    folded = False
    for (part, _), module in zip(sorted(entry["modules"]), modules):
        factor = module.scaling / (alpha / rank)
        block = module.lora_B if factor == 1.0 else (module.lora_B.double() * factor).to(module.lora_B.dtype)
        lora_b[part * width:(part + 1) * width, column:column + module.r] = block
        column += module.r
        folded = folded or factor != 1.0
    if folded:
        logger.warning("The LoRA parts of the fused layer %s have different scalings (alpha / r), but PEFT has one "
                       "per layer, so each part's lora_B is multiplied by its scaling over %g. Outputs match, but "
                       "training the checkpoint in PEFT updates those parts at other rates", name, alpha / rank)
    return lora_a, lora_b, rank, alpha


def _lora_to_peft(registry: AdapterRegistry, config: LoRAConfig,
                  tree: nn.ModuleDict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if config.use_gating:
        raise ValueError("PEFT's LoRA has no gate; an adapter with use_gating=True (UniPELT) cannot be written "
                         "in the PEFT format")
    weights: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, float]] = {}
    layers = _adapted_layers(registry, tree)
    for name, entry in layers.items():
        modules = [entry["modules"][key] for key in sorted(entry["modules"])]
        if entry["parts"] == 1:
            weights[f"{name}.lora_A.weight"] = modules[0].lora_A
            weights[f"{name}.lora_B.weight"] = modules[0].lora_B
            shapes[name] = (modules[0].r, modules[0].alpha)
        else:
            lora_a, lora_b, rank, alpha = _fuse_parts(name, entry, modules)
            weights[f"{name}.lora_A.weight"] = lora_a
            weights[f"{name}.lora_B.weight"] = lora_b
            shapes[name] = (rank, alpha)

    rank, alpha = Counter(shapes.values()).most_common(1)[0][0]
    conv1d = [type(entry["layer"]).__name__ == "Conv1D" for entry in layers.values()]
    peft_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_names(registry.model, list(layers)),
        "rank_pattern": {re.escape(name): value[0] for name, value in shapes.items() if value[0] != rank},
        "alpha_pattern": {re.escape(name): value[1] for name, value in shapes.items() if value[1] != alpha},
        "fan_in_fan_out": all(conv1d),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    return peft_config, weights


def _ia3_configs(registry: AdapterRegistry, tree: nn.ModuleDict) -> list[IA3Config]:
    """Return the (IA)^3 member configs of the adapter whose method subtree is ``tree``."""
    for name in registry.entries:
        methods = registry.modules_of(name)["methods"]
        for index, member in enumerate(registry.entries[name].config.methods):
            if methods[str(index)] is tree:
                return [member] if isinstance(member, IA3Config) else []
    return []


def _ia3_to_peft(registry: AdapterRegistry, tree: nn.ModuleDict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    # An ff_out vector on the input is a (1, in) vector of a feed-forward module in PEFT; one on the output is
    # an ordinary (out, 1) vector.
    scales_input = all(config.ff_out_side == "input" for config in _ia3_configs(registry, tree))
    weights: dict[str, torch.Tensor] = {}
    feedforward = []
    layers = _adapted_layers(registry, tree)
    for name, entry in layers.items():
        in_features, out_features = linear_shape(entry["layer"])
        if scales_input and any(role == "ff_out" for _, role in entry["modules"]):
            (module,) = entry["modules"].values()
            weights[f"{name}.ia3_l"] = module.scale.reshape(1, in_features)
            feedforward.append(name)
            continue
        reference = next(iter(entry["modules"].values())).scale
        vector = torch.ones(out_features, dtype=reference.dtype, device=reference.device)
        width = out_features // entry["parts"]
        for (part, _), module in entry["modules"].items():
            vector[part * width:(part + 1) * width] = module.scale
        weights[f"{name}.ia3_l"] = vector.reshape(out_features, 1)

    targets = _target_names(registry.model, list(layers))
    # PEFT treats a targeted module as feed-forward when its name ends with an entry of
    # feedforward_modules (no dot needed), and requires those entries to be target_modules entries.
    chosen = [suffix for suffix in targets
              if all(name in feedforward for name in layers if name == suffix or name.endswith("." + suffix))]
    selected = {name for name in layers if any(name.endswith(suffix) for suffix in chosen)}
    if selected != set(feedforward):
        targets = sorted(layers)
        chosen = sorted(feedforward)
    peft_config = {
        "peft_type": "IA3",
        "target_modules": targets,
        "feedforward_modules": chosen,
        "fan_in_fan_out": all(type(entry["layer"]).__name__ == "Conv1D" for entry in layers.values()),
        "init_ia3_weights": True,
    }
    return peft_config, weights


def _prefix_to_peft(registry: AdapterRegistry, config: PrefixTuningConfig,
                    tree: nn.ModuleDict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    layout = registry.layout
    groups = layout.prefix_stacks(config)
    if len(layout.spec.stacks) != 1:
        return _encoder_decoder_prefix_to_peft(registry, config, tree)
    if len(groups) != 1 or groups[0][2] != list(range(len(layout))):
        raise ValueError(f"PEFT puts a prefix on every block, but this adapter leaves out blocks "
                         f"{list(config.leave_out)}; write an adapter with leave_out=()")
    _check_prefix_family(layout.family)
    if not config.shift_positions:
        raise ValueError("PEFT passes a prefix to the model as cached keys and values, so the model numbers the real "
                         "tokens from prefix_length, but this adapter numbers them from 0 (shift_positions=False) and "
                         "would give other outputs in PEFT. Train it with PrefixTuningConfig(shift_positions=True) to "
                         "share it in the PEFT format, or save it in the adapterkit or adapters format")
    if config.use_gating:
        raise ValueError("PEFT's prefix tuning has no gate; an adapter with use_gating=True (UniPELT) cannot be "
                         "written in the PEFT format")
    if _task_type(registry.model) is None:
        raise ValueError(f"PEFT applies prefix tuning through its task wrappers, and none fits a "
                         f"{type(registry.model).__name__}; use a model class of a transformers auto class "
                         "(such as AutoModelForCausalLM or AutoModel)")
    module = tree["prefix"][groups[0][0]]
    with torch.no_grad():
        prefix = module.prefix if module.flat else module.mlp(module.embedding.weight)
    if not module.flat:
        logger.warning("PEFT stores the prefix MLP's output only, so the checkpoint contains the prefix flat and "
                       "training it further in PEFT trains the prefix directly")
    kv_heads, head_dim = attention_shape(registry.model.config)
    peft_config = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": config.prefix_length,
        "token_dim": kv_heads * head_dim,
        "num_attention_heads": kv_heads,
        "num_layers": len(layout),
        "num_transformer_submodules": 1,
        "encoder_hidden_size": layout.hidden_size,
        "prefix_projection": False,
    }
    return peft_config, {"prompt_embeddings": prefix}


def _encoder_decoder_prefix_to_peft(registry: AdapterRegistry, config: PrefixTuningConfig,
                                    tree: nn.ModuleDict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Write a decoder self-attention prefix as PEFT's ``SEQ_2_SEQ_LM`` prefix (``num_transformer_submodules=2``).

    PEFT's decoder layer ``i`` reads block ``2 i mod num_layers`` of ``prompt_embeddings`` (see
    ``_peft_decoder_block``). With ``num_layers`` twice the decoder's layer count, layer ``i`` reads
    block ``2 i``, so every layer gets its own prefix. The odd blocks, which PEFT never reads, are zeros.
    """
    layout = registry.layout
    model = registry.model
    decoder_blocks = _decoder_blocks(layout)
    fixes = "PrefixTuningConfig(encoder_prefix=False, cross_prefix=False, position_bias='shifted'" + (
        ", shift_positions=True)" if layout.spec.position_ids is not None else ")")
    if config.encoder_prefix or config.cross_prefix:
        field = "encoder_prefix" if config.encoder_prefix else "cross_prefix"
        raise ValueError(f"{field}=True: PEFT's prefix tuning of encoder-decoder models prefixes the decoder "
                         f"self-attention only, so this adapter would give other outputs in PEFT. Train it with "
                         f"{fixes} to share it in the PEFT format, or save it in the adapterkit or adapters format")
    left_out = [index for index in decoder_blocks if index in config.leave_out]
    if left_out:
        raise ValueError(f"PEFT puts a prefix on every decoder block, but this adapter leaves out decoder blocks "
                         f"{left_out} (leave_out={list(config.leave_out)}); write an adapter without them in leave_out")
    relative_bias = any(getattr(module, "has_relative_attention_bias", False) for module in model.modules())
    if relative_bias and config.position_bias != "shifted":
        raise ValueError(f"position_bias={config.position_bias!r}: PEFT passes the prefix as a KV cache, so "
                         f"the relative position bias of {layout.family!r} models numbers the queries and keys after "
                         f"the prefix, which only position_bias='shifted' reproduces. Train it with {fixes}")
    if layout.spec.position_ids is not None and not config.shift_positions:
        raise ValueError(f"shift_positions=False: PEFT passes the prefix as a KV cache, so the decoder numbers the "
                         f"real tokens from prefix_length, but this adapter numbers them from 0. Train it with {fixes}")
    if config.use_gating:
        raise ValueError("PEFT's prefix tuning has no gate; an adapter with use_gating=True (UniPELT) cannot be "
                         "written in the PEFT format")
    _check_prefix_family(layout.family)
    if _task_type(model) != "SEQ_2_SEQ_LM":
        raise ValueError(f"PEFT runs the prefix of an encoder-decoder model through its SEQ_2_SEQ_LM wrapper, which "
                         f"does not fit a {type(model).__name__}; write the prefix from the model's "
                         "ForConditionalGeneration class (AutoModelForSeq2SeqLM)")

    module = tree["prefix"][layout.prefix_stacks(config)[0][0]]
    with torch.no_grad():
        rows = module.prefix if module.flat else module.mlp(module.embedding.weight)
    if not module.flat:
        logger.warning("PEFT stores the prefix MLP's output only, so the checkpoint contains the prefix flat and "
                       "training it further in PEFT trains the prefix directly")
    kv_heads, head_dim = attention_shape(model.config)
    width = 2 * kv_heads * head_dim
    num_layers = 2 * len(decoder_blocks)
    prefix = rows.new_zeros(config.prefix_length, num_layers * width)
    for layer in range(len(decoder_blocks)):
        block = _peft_decoder_block(layer, num_layers)
        prefix[:, block * width:(block + 1) * width] = rows[:, layer * width:(layer + 1) * width]
    peft_config = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": config.prefix_length,
        "token_dim": kv_heads * head_dim,
        "num_attention_heads": kv_heads,
        "num_layers": num_layers,
        "num_transformer_submodules": 2,
        "encoder_hidden_size": layout.hidden_size,
        "prefix_projection": False,
    }
    return peft_config, {"prompt_embeddings": prefix}


# PEFT task types whose wrapper runs prompt tuning on an encoder-decoder model. The sequence
# classification wrapper passes inputs_embeds without input_ids, which T5 and BART classifiers reject
# (NotImplementedError with PEFT 0.21.2 and transformers 5.25), and the other wrappers do the same.
_ENCODER_DECODER_PROMPT_TASKS = ("SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")


def _prompt_to_peft(registry: AdapterRegistry, config: PromptTuningConfig,
                    tree: nn.ModuleDict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    model = registry.model
    task = _task_type(model)
    if task is None:
        raise ValueError(f"PEFT applies prompt tuning through its task wrappers, and none fits a "
                         f"{type(model).__name__}; use a model class of a transformers auto class "
                         "(such as AutoModelForCausalLM or AutoModelForSequenceClassification)")
    if getattr(model.config, "is_encoder_decoder", False) and task not in _ENCODER_DECODER_PROMPT_TASKS:
        raise ValueError(f"PEFT's {task} wrapper cannot run prompt tuning on a {type(model).__name__}: it passes only "
                         "inputs_embeds, which this model rejects. Write the prompt from the model's "
                         "ForConditionalGeneration class or its bare model (AutoModel)")
    prompt = tree["prompt"].prompt
    text_config = getattr(model.config, "text_config", None) or model.config
    peft_config = {
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": config.prompt_length,
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_layers": getattr(text_config, "num_hidden_layers", None) or len(registry.layout),
        "num_attention_heads": getattr(text_config, "num_attention_heads", None),
        "prompt_tuning_init": "SAMPLE_VOCAB" if config.init == "vocab" else "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }
    return peft_config, {"prompt_embeddings": prompt}
