"""Read and write checkpoints of AdapterHub's ``adapters`` library (checked against ``adapters`` 1.3.0).

An ``adapters`` checkpoint is the folder that ``model.save_adapter(folder, name)`` writes:

- ``adapter_config.json``: ``{"config": {...}, "hidden_size", "model_class", "model_name",
  "model_type", "name", "version"}``. ``config`` lists every field of the method's config class;
  a bottleneck config has no ``architecture`` key, ``ConfigUnion`` writes
  ``{"architecture": "union", "configs": [...]}``.
- ``pytorch_adapter.bin`` (a pickled state dict) or ``adapter.safetensors``: the model's
  ``state_dict`` entries of the adapter, keyed by their full module path, for example
  ``bert.encoder.layer.0.output.adapters.<name>.adapter_down.0.weight``. Prefix tuning stores its
  pool once at ``<base>.prefix_tuning.prefix_tunings.<name>.<location>.`` and again under every
  attention layer that links to the pool.
- Optionally ``head_config.json`` with ``pytorch_model_head.bin`` or ``model_head.safetensors``:
  a static transformers head (``"config": null``, keys such as ``classifier.weight``) or one of
  ``adapters``' flexible heads (keys ``heads.<name>.<i>.``).
- An AdapterFusion folder (``model.save_adapter_fusion``) has ``adapter_fusion_config.json``:
  ``{"adapter_names", "config": {...}, "name", ...}`` with the ``FusionConfig`` fields, and
  ``pytorch_model_adapter_fusion.bin`` or ``model_adapter_fusion.safetensors`` with keys such as
  ``bert.encoder.layer.0.output.adapter_fusion_layer.<fusion name>.query.weight``, plus the
  fusion's head files. ``read_adapters_fusion`` and ``write_adapters_fusion`` convert them.

``read_adapters`` maps such a folder onto adapterkit's config and weights so that the model
computes what the ``adapters`` model computed, within float rounding. Where a step needs a
transformation (zero LoRA matrices for projections ``adapters`` leaves alone, the (IA)^3 ``alpha``
folded into the vectors), it is listed in the returned notes. Whatever adapterkit cannot reproduce
raises ``ValueError`` naming the part. ``write_adapters`` writes the reverse, which ``adapters``
1.3.0 loads with ``load_adapter``.

The placement of each method per family follows ``adapters`` 1.3.0 (``models/<family>/mixin_*.py``):
``intermediate_lora`` and ``output_lora`` wrap ``intermediate.dense`` and ``output.dense`` on BERT,
but ``mlp.down_proj`` and ``mlp.up_proj`` on Llama. ``selfattn_lora`` also wraps the
cross-attention projections of BART and T5. On T5, ``adapters`` computes the relative position
bias over the prefix and the real keys together, so T5 prefixes read from it get
``PrefixTuningConfig(position_bias="concatenated")``, and only such prefixes are written to it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..architectures import StackSpec, find_base_model
from ..composition import Fuse
from ..config import (BottleneckConfig, ConfigUnion, FusionConfig, IA3Config, InvertibleConfig, LoRAConfig,
                      MethodConfig, PrefixTuningConfig)
from ..heads import map_flexible_head
from ..io import write_atomically
from ..layout import build

if TYPE_CHECKING:
    from ..registry import AdapterRegistry

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "pytorch_adapter.bin"
SAFE_WEIGHTS_FILE = "adapter.safetensors"
HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "pytorch_model_head.bin"
SAFE_HEAD_WEIGHTS_FILE = "model_head.safetensors"
FUSION_CONFIG_FILE = "adapter_fusion_config.json"
FUSION_WEIGHTS_FILES = ("pytorch_model_adapter_fusion.bin", "model_adapter_fusion.safetensors")

# The ``adapters`` version whose layout ``write_adapters`` writes.
WRITTEN_VERSION = "adapters.1.3.0"

# Config fields of ``adapters`` 1.3.0 (configuration/adapter_config.py), by config class.
_BOTTLENECK_KEYS = {
    "architecture", "mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before",
    "original_ln_after", "ln_before", "ln_after", "init_weights", "init_weights_seed", "is_parallel", "scaling",
    "use_gating", "residual_before_ln", "adapter_residual_before_ln", "inv_adapter", "inv_adapter_reduction_factor",
    "cross_adapter", "leave_out", "dropout", "phm_layer", "phm_dim", "factorized_phm_W", "shared_W_phm",
    "shared_phm_rule", "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm",
    "hypercomplex_nonlinearity", "phm_rank", "phm_bias", "stochastic_depth",
}
_LORA_KEYS = {
    "architecture", "selfattn_lora", "intermediate_lora", "output_lora", "leave_out", "r", "alpha", "dropout",
    "attn_matrices", "composition_mode", "init_weights", "init_weights_seed", "use_gating", "use_dora", "vera_d",
    "vera_b", "dtype",
}
_PREFIX_KEYS = {
    "architecture", "encoder_prefix", "cross_prefix", "leave_out", "flat", "prefix_length", "bottleneck_size",
    "non_linearity", "dropout", "use_gating", "shared_gating", "init_weights_seed",
}
_UNSUPPORTED_ARCHITECTURES = {
    "prompt_tuning": "prompt tuning",
    "reft": "ReFT interventions",
    "mtl_lora": "multi-task LoRA (MTL-LoRA)",
}

# ``adapters`` activation names (transformers.activations.get_activation) and adapterkit's equivalents.
_ACTIVATIONS_IN = {
    "relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
    "swish": "swish", "silu": "silu", "tanh": "tanh", "sigmoid": "sigmoid", "leakyrelu": "leakyrelu",
    "linear": "identity",
}
_ACTIVATIONS_OUT = {"identity": "linear"}

# ``adapters`` 1.3.0 sets a LoRA config's alpha to r when the checkpoint comes from a version before
# 1.1.0, whose scaling was faulty (loading.py: AdapterLoader._fix_backward_compat). It also renames
# GELU in configs without a version (utils.py: ACTIVATION_RENAME).
_LORA_SCALING_FIXED = (1, 1, 0)
_OLD_ACTIVATION_NAMES = {"gelu": "gelu_new", "gelu_orig": "gelu"}


class AdaptersCheckpoint(NamedTuple):
    """An ``adapters`` checkpoint mapped onto adapterkit.

    Attributes:
        config: The adapterkit config to pass to ``add_adapter``.
        weights: Every tensor of the new adapter, keyed as in ``modules_of(name).state_dict()``, so
            ``load_state_dict(weights)`` with ``strict=True`` fills it. Head keys hold the checkpoint's
            head where it has one the model can take, and the base model's head everywhere else.
        info: ``name`` (the saved adapter name), ``labels`` (the head's labels in class-id order, or
            ``None``), ``head_keys`` (the head keys that came from the checkpoint), ``model_class``,
            ``model_name``, ``version`` and ``notes`` (one sentence per transformation that
            ``read_adapters`` applied).
    """

    config: MethodConfig
    weights: dict[str, torch.Tensor]
    info: dict[str, Any]


# -- where ``adapters`` puts each module, per family ----------------------------------------------

@dataclass(frozen=True)
class _FamilyNames:
    """Module paths of ``adapters`` 1.3.0 in one family.

    Attributes:
        bottlenecks: Returns, for a stack, the path inside its blocks of each sublayer's
            ``BottleneckLayer`` by adapterkit sublayer name.
        intermediate: adapterkit role and path suffixes (tried in order) of the module that
            ``intermediate_lora`` wraps.
        output: The same for ``output_lora``.
        invertible: Path of the ``invertible_adapters`` dict, relative to the base model.
    """

    bottlenecks: Callable[[StackSpec], dict[str, str]]
    intermediate: tuple[str, tuple[str, ...]]
    output: tuple[str, tuple[str, ...]]
    invertible: str


def _bert_bottlenecks(stack: StackSpec) -> dict[str, str]:
    return {"attention": "attention.output", "feed_forward": "output"}


def _layer_bottlenecks(stack: StackSpec) -> dict[str, str]:
    return {"attention": "attention_adapters", "cross_attention": "cross_attention_adapters",
            "feed_forward": "output_adapters"}


def _t5_bottlenecks(stack: StackSpec) -> dict[str, str]:
    # T5Block.layer holds the self-attention, the cross-attention (decoder only) and the feed-forward layer.
    if stack.name == "decoder":
        return {"attention": "layer.0", "cross_attention": "layer.1", "feed_forward": "layer.2"}
    return {"attention": "layer.0", "feed_forward": "layer.1"}


_BERT_NAMES = _FamilyNames(_bert_bottlenecks, ("ff_in", ("intermediate.dense",)), ("ff_out", ("output.dense",)),
                           "invertible_adapters")
_FAMILIES: dict[str, _FamilyNames] = {
    "bert": _BERT_NAMES,
    "roberta": _BERT_NAMES,
    "gpt2": _FamilyNames(_layer_bottlenecks, ("ff_in", ("mlp.c_fc",)), ("ff_out", ("mlp.c_proj",)),
                         "invertible_adapters"),
    # LlamaDecoderLayerMixin wraps down_proj as "intermediate" and up_proj as "output".
    "llama": _FamilyNames(_layer_bottlenecks, ("ff_out", ("mlp.down_proj",)), ("ff_in", ("mlp.up_proj",)),
                          "invertible_adapters"),
    "bart": _FamilyNames(_layer_bottlenecks, ("ff_in", ("fc1",)), ("ff_out", ("fc2",)), "encoder.invertible_adapters"),
    # A gated T5 feed-forward gets LoRA on wi_1 only.
    "t5": _FamilyNames(_t5_bottlenecks, ("ff_in", ("DenseReluDense.wi", "DenseReluDense.wi_1")),
                       ("ff_out", ("DenseReluDense.wo",)), "encoder.invertible_adapters"),
}

_ATTENTION_ROLES = {"q": "query", "k": "key", "v": "value"}


class _Model:
    """Paths of one adapterkit model as the ``adapters`` library names its modules.

    Args:
        registry: The model's adapter registry.

    Raises:
        ValueError: For a family whose ``adapters`` layout this module does not describe.
    """

    def __init__(self, registry: AdapterRegistry):
        self.registry = registry
        self.layout = registry.layout
        self.family = registry.family
        names = _FAMILIES.get(self.family)
        if names is None:
            raise ValueError(f"adapterkit maps adapters checkpoints of the families {', '.join(sorted(_FAMILIES))}, "
                             f"not {self.family!r}")
        self.names = names
        model = registry.model
        base = find_base_model(model)
        path = next(name for name, module in model.named_modules() if module is base)
        self.base_path = path
        # Keys written by an ``adapters`` model of another class carry that class's base prefix.
        prefixes = [f"{path}." if path else None, f"{getattr(model, 'base_model_prefix', '')}."]
        self.prefixes = [prefix for prefix in prefixes if prefix and prefix != "."]
        self.block_paths = []
        for stack in self.layout.spec.stacks:
            indices = self.layout.indices(stack)
            self.block_paths.extend(f"{stack.layers}.{local}" for local in range(len(indices)))

    def relative(self, key: str) -> str:
        """Return a checkpoint key relative to the base model."""
        for prefix in self.prefixes:
            if key.startswith(prefix):
                return key[len(prefix):]
        return key

    def absolute(self, path: str) -> str:
        """Return the key of ``path`` (relative to the base model) in this model's ``state_dict``."""
        return f"{self.base_path}.{path}" if self.base_path else path

    def stack(self, index: int) -> StackSpec:
        return self.layout.blocks[index][0]

    def bottleneck_path(self, index: int, sublayer: str) -> str:
        """Return the path of the ``BottleneckLayer`` of one sublayer of block ``index``."""
        places = self.names.bottlenecks(self.stack(index))
        if sublayer not in places:
            raise ValueError(f"The adapters library has no {sublayer} bottleneck adapter in {self.family!r} "
                             f"{self.stack(index).name} blocks")
        return f"{self.block_paths[index]}.{places[sublayer]}"

    def ff_projection(self, index: int, location: str) -> tuple[str, int]:
        """Return ``(role, number)`` of the projection that ``<location>_lora`` wraps in block ``index``."""
        role, suffixes = self.names.intermediate if location == "intermediate" else self.names.output
        refs = self.stack(index).linear_refs(role)
        for suffix in suffixes:
            for number, ref in enumerate(refs):
                if ref.path == suffix or ref.path.endswith("." + suffix):
                    return role, number
        raise ValueError(f"The {self.family!r} description has no {role} projection named {' or '.join(suffixes)}, "
                         f"which the adapters library wraps for {location}_lora")

    def prefix_location(self, key: str) -> str:
        """Return the ``adapters`` location key of adapterkit's prefix group ``key``."""
        if len(self.layout.spec.stacks) == 1 or key == "decoder":
            return "self_prefix"
        return {"encoder": "encoder_prefix", "cross": "cross_prefix"}[key]

    def prefix_aliases(self, key: str, blocks: list[int]) -> list[str]:
        """Return the paths of the attention modules of group ``key`` (which read the prefix pool)."""
        paths = []
        for index in blocks:
            stack = self.stack(index)
            module = stack.cross_attention_module if key == "cross" else stack.attention_module
            paths.append(f"{self.block_paths[index]}.{module}")
        return paths

    def attention_paths(self) -> list[str]:
        """Return the paths of every attention module, each of which links to the prefix pool."""
        paths = []
        for index, (stack, _) in enumerate(self.layout.blocks):
            for module in (stack.attention_module, stack.cross_attention_module):
                if module:
                    paths.append(f"{self.block_paths[index]}.{module}")
        return paths


# -- files ------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def is_adapters_checkpoint(directory: str | os.PathLike) -> bool:
    """Return whether ``directory`` contains an ``adapters`` adapter or AdapterFusion checkpoint.

    An adapter folder has an ``adapter_config.json`` with ``config`` and ``model_class`` or
    ``model_name``, and ``pytorch_adapter.bin`` or ``adapter.safetensors``. A fusion folder has
    ``adapter_fusion_config.json`` and its weights file.
    """
    directory = Path(directory)
    if (directory / FUSION_CONFIG_FILE).is_file() and any((directory / f).is_file() for f in FUSION_WEIGHTS_FILES):
        return True
    if not (directory / CONFIG_FILE).is_file():
        return False
    if not ((directory / WEIGHTS_FILE).is_file() or (directory / SAFE_WEIGHTS_FILE).is_file()):
        return False
    try:
        data = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "config" in data and ("model_class" in data or "model_name" in data)


def _load_state(directory: Path, bin_name: str, safe_name: str) -> dict[str, torch.Tensor]:
    """Load a weights file, the safetensors one when both exist; ``.bin`` files only as plain tensors."""
    if (directory / safe_name).is_file():
        return load_file(str(directory / safe_name))
    if (directory / bin_name).is_file():
        return torch.load(directory / bin_name, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"Neither {safe_name} nor {bin_name} found in {directory}")


def _check_not_fusion(directory: Path) -> None:
    if (directory / FUSION_CONFIG_FILE).is_file():
        raise ValueError(
            f"{directory} is an AdapterFusion checkpoint ({FUSION_CONFIG_FILE}), not an adapter. Load the fused "
            "adapters' own folders with load_adapter, then this folder with model.load_adapter_fusion")


# -- reading: configs -----------------------------------------------------------------------------

def _warn_unknown(data: dict[str, Any], known: set[str], kind: str, notes: list[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        message = (f"Ignoring {kind} config keys {unknown}, which adapters 1.3.0 does not have. A newer adapters "
                   "version may have written them")
        logger.warning(message)
        notes.append(message)


def _activation(name: Any, allowed: tuple[str, ...] | None, part: str) -> str:
    mapped = _ACTIVATIONS_IN.get(str(name).lower()) if isinstance(name, str) else None
    if mapped is None or (allowed is not None and mapped not in allowed):
        choices = sorted(n for n, m in _ACTIVATIONS_IN.items() if allowed is None or m in allowed)
        raise ValueError(f"non_linearity={name!r} of the {part} has no adapterkit equivalent. adapterkit reproduces "
                         f"{', '.join(choices)}")
    return mapped


def _leave_out(data: dict[str, Any]) -> tuple[int, ...]:
    value = data.get("leave_out") or []
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"leave_out={value!r}: expected a list of layer indices")
    return tuple(sorted(set(value)))


def _reduction_factor(data: dict[str, Any], layers: list[int]) -> float:
    """Return the one reduction factor of a bottleneck config, resolving a per-layer mapping."""
    value = data.get("reduction_factor")
    if isinstance(value, Mapping):
        values = set()
        for index in layers:
            if str(index) in value:
                values.add(value[str(index)])
            elif "default" in value:
                values.add(value["default"])
            else:
                raise ValueError(f"reduction_factor={value!r} gives no value for layer {index} and no 'default'")
        if len(values) > 1:
            raise ValueError(f"reduction_factor={value!r} gives the layers different bottleneck widths, but "
                             "adapterkit uses one width for every layer of an adapter")
        value = values.pop() if values else value.get("default", 16)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"reduction_factor={value!r}: expected a number > 0")
    return value


def _bottleneck_config(data: dict[str, Any], model: _Model,
                       notes: list[str]) -> tuple[BottleneckConfig, InvertibleConfig | None]:
    """Map a ``BnConfig`` dict onto a ``BottleneckConfig`` and, with ``inv_adapter``, an ``InvertibleConfig``."""
    _warn_unknown(data, _BOTTLENECK_KEYS, "bottleneck", notes)
    get = data.get
    missing = [key for key in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity") if key not in data]
    if missing:
        raise ValueError(f"The bottleneck config lacks the required keys {missing}")
    problems = []
    if not get("original_ln_after", True):
        problems.append("original_ln_after=False: the adapter output replaces the sublayer's residual connection "
                        "and layer norm, which adapterkit always keeps")
    residual_before_ln = get("residual_before_ln", True)
    if residual_before_ln not in (True, False) and not get("is_parallel", False):
        problems.append(f"residual_before_ln={residual_before_ln!r}: adapterkit takes the adapter's residual from "
                        "the sublayer output (True) or after the block's layer norm (False) only")
    if get("ln_after", False) and get("adapter_residual_before_ln", False):
        problems.append("adapter_residual_before_ln=True with ln_after=True: adapterkit applies the adapter's "
                        "output layer norm before adding the adapter's residual")
    if get("use_gating", False):
        problems.append("use_gating=True: adapters averages the gate over the sequence, adapterkit gates each "
                        "position, so outputs differ")
    if get("shared_W_phm", False):
        problems.append("shared_W_phm=True: adapterkit's PHM layers each own their weight blocks")
    if get("inv_adapter") not in (None, "nice"):
        problems.append(f"inv_adapter={get('inv_adapter')!r}: adapterkit reproduces only the 'nice' invertible "
                        "adapter (its Glow block computes another coupling)")
    if problems:
        raise ValueError("The bottleneck adapter uses options adapterkit cannot reproduce:\n  - "
                         + "\n  - ".join(problems))
    if (get("stochastic_depth") or 0) > 0:
        notes.append(f"stochastic_depth={get('stochastic_depth')} drops the adapter branch only in training; "
                     "adapterkit has no stochastic depth, so training differs while outputs in eval mode match")

    leave_out = _leave_out(data)
    kept = [i for i in range(len(model.layout)) if i not in leave_out]
    reduction_factor = _reduction_factor(data, kept)
    hidden = model.layout.hidden_size
    # adapters: down_sample = int(hidden_size // reduction_factor), and at least 1.
    width = max(1, int(hidden // reduction_factor))
    init = {"bert": "bert", "houlsby": "houlsby", "mam_adapter": "zero_up"}.get(get("init_weights", "bert"))
    if init is None:
        notes.append(f"init_weights={get('init_weights')!r} only sets initial values, so the adapter is initialised "
                     "with 'bert' before its weights are loaded")
        init = "bert"
    w_init = get("hypercomplex_nonlinearity", "glorot-uniform")
    if w_init not in ("glorot-uniform", "normal"):
        w_init = "glorot-uniform"
    scaling = get("scaling", 1.0)
    config = BottleneckConfig(
        mh_adapter=bool(get("mh_adapter")),
        output_adapter=bool(get("output_adapter")),
        cross_adapter=bool(get("cross_adapter", False)),
        reduction_factor=reduction_factor,
        non_linearity=_activation(get("non_linearity"), None, "bottleneck adapter"),
        parallel=bool(get("is_parallel", False)),
        scaling=float(scaling) if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) else scaling,
        residual_before_ln=bool(residual_before_ln) if residual_before_ln in (True, False) else True,
        original_ln_before=bool(get("original_ln_before", False)),
        ln_before=bool(get("ln_before", False)),
        ln_after=bool(get("ln_after", False)),
        init_weights=init,
        dropout=float(get("dropout", 0.0)),
        phm_layer=bool(get("phm_layer", False)),
        phm_dim=int(get("phm_dim", 4)),
        shared_phm_rule=bool(get("shared_phm_rule", True)),
        factorized_phm_W=bool(get("factorized_phm_W", True)),
        factorized_phm_rule=bool(get("factorized_phm_rule", False)),
        phm_rank=int(get("phm_rank", 1)),
        phm_init_range=float(get("phm_init_range", 0.0001)),
        phm_c_init=get("phm_c_init", "normal"),
        hypercomplex_nonlinearity=w_init,
        learn_phm=bool(get("learn_phm", True)),
        phm_bias=bool(get("phm_bias", True)),
        leave_out=leave_out,
    )
    try:
        same_width = config.bottleneck_width(hidden) == width
    except ValueError:  # adapterkit rejects widths below 1, where adapters rounds up to 1
        same_width = False
    if not same_width:
        config = config.replace(bottleneck_size=width)

    invertible = None
    if get("inv_adapter") == "nice":
        factor = get("inv_adapter_reduction_factor")
        if factor is None:
            raise ValueError("inv_adapter='nice' needs inv_adapter_reduction_factor, which the config lacks")
        invertible = InvertibleConfig(block_type="nice", reduction_factor=factor,
                                      non_linearity=_activation(get("non_linearity"),
                                                                ("relu", "gelu", "swish", "silu", "tanh"),
                                                                "invertible adapter"))
    return config, invertible


def _lora_config(data: dict[str, Any], model: _Model, notes: list[str]) -> LoRAConfig | IA3Config:
    _warn_unknown(data, _LORA_KEYS, "LoRA", notes)
    get = data.get
    mode = get("composition_mode", "add")
    problems = []
    if mode not in ("add", "scale"):
        problems.append(f"composition_mode={mode!r}: expected 'add' (LoRA) or 'scale' ((IA)^3)")
    if get("use_gating", False):
        problems.append("use_gating=True: adapters averages the gate over the sequence and uses it in place of "
                        "alpha / r, which adapterkit's gated LoRA does not reproduce")
    if get("use_dora", False):
        problems.append("use_dora=True: DoRA learns a magnitude per output feature, which adapterkit's LoRA lacks")
    if get("vera_d") is not None or get("vera_b") is not None:
        problems.append("vera_d/vera_b set: VeRA shares frozen random matrices between layers, which adapterkit's "
                        "LoRA does not")
    matrices = list(get("attn_matrices", ["q", "v"]) or [])
    unknown = [m for m in matrices if m not in _ATTENTION_ROLES]
    if unknown:
        problems.append(f"attn_matrices contains {unknown}: adapters wraps only 'q', 'k' and 'v' in {model.family!r}")
    if mode == "scale" and int(get("r", 1)) != 1:
        problems.append(f"r={get('r')} with composition_mode='scale': (IA)^3 vectors have r=1")
    if problems:
        raise ValueError("The LoRA config uses options adapterkit cannot reproduce:\n  - " + "\n  - ".join(problems))

    roles = set()
    wraps_attention = bool(get("selfattn_lora", True) and matrices)
    if wraps_attention:
        roles.update(_ATTENTION_ROLES[m] for m in matrices)
    for location in ("intermediate", "output"):
        if get(f"{location}_lora", False):
            roles.add(model.names.intermediate[0] if location == "intermediate" else model.names.output[0])
    if mode == "scale" and wraps_attention and float(get("alpha", 1)) != 1.0 and _has_fused_attention(model):
        # A fused q/k/v layer multiplies its parts without a vector by alpha too (LoRAMergedLinear.pad).
        roles.update(("query", "key", "value"))
    if not roles:
        raise ValueError("The LoRA config adapts no module: selfattn_lora, intermediate_lora and output_lora are "
                         "all off (or attn_matrices is empty)")
    targets = tuple(role for role in ("query", "key", "value", "attention_output", "ff_in", "ff_out") if role in roles)
    if mode == "scale":
        if float(get("alpha", 1)) != 1.0:
            notes.append(f"alpha={get('alpha')} is folded into the (IA)^3 vectors")
        init = "bert" if get("init_weights") == "bert" else "ones"
        return IA3Config(targets=targets, init_weights=init, leave_out=_leave_out(data),
                         ff_out_side="output" if "ff_out" in targets else "input")
    init = get("init_weights", "lora")
    if init not in ("lora", "bert"):
        notes.append(f"init_weights={init!r} only sets initial values, so the LoRA is initialised with 'lora' before "
                     "its weights are loaded")
        init = "lora"
    return LoRAConfig(r=int(get("r", 8)), alpha=float(get("alpha", 8)), dropout=float(get("dropout", 0.0)),
                      targets=targets, init_weights=init, leave_out=_leave_out(data))


def _has_fused_attention(model: _Model) -> bool:
    return any(ref.parts > 1 for stack in model.layout.spec.stacks for ref in stack.linear_refs("query"))


# Families whose relative position bias adapters 1.3.0 computes over the prefix and the real keys as one
# key sequence (models/t5/modeling_t5.py: T5AttentionWithAdapters.forward calls compute_bias with the
# prefixed key length), which PrefixTuningConfig(position_bias="concatenated") reproduces.
_CONCATENATED_BIAS_FAMILIES = ("t5",)


def _prefix_position_bias(model: _Model) -> str:
    return "concatenated" if model.family in _CONCATENATED_BIAS_FAMILIES else "zero"


def _prefix_config(data: dict[str, Any], model: _Model, notes: list[str]) -> PrefixTuningConfig:
    _warn_unknown(data, _PREFIX_KEYS, "prefix tuning", notes)
    get = data.get
    if get("use_gating", False):
        raise ValueError("The prefix tuning config has use_gating=True: adapters gates each layer's prefix with its "
                         "own linear layer, which adapterkit's gated prefix does not reproduce")
    single_stack = len(model.layout.spec.stacks) == 1
    return PrefixTuningConfig(
        prefix_length=int(get("prefix_length", 30)),
        bottleneck_size=int(get("bottleneck_size", 512)),
        non_linearity=_activation(get("non_linearity", "tanh"), ("tanh", "relu", "gelu", "swish", "silu"),
                                  "prefix MLP"),
        dropout=float(get("dropout", 0.0)),
        flat=bool(get("flat", False)),
        # adapters prefixes the one stack of encoder-only and decoder-only models for any encoder_prefix value.
        encoder_prefix=True if single_stack else bool(get("encoder_prefix", True)),
        cross_prefix=bool(get("cross_prefix", True)),
        position_bias=_prefix_position_bias(model),
        leave_out=_leave_out(data),
    )


def _member_configs(data: Any, model: _Model, notes: list[str]) -> list[MethodConfig]:
    """Map one ``adapters`` config dict (a union included) onto adapterkit method configs."""
    if not isinstance(data, dict):
        raise ValueError(f"The adapter config is {data!r}, not a dict; pass a folder written by adapters' save_adapter")
    architecture = data.get("architecture")
    if architecture in (None, "bottleneck"):
        bottleneck, invertible = _bottleneck_config(data, model, notes)
        return [bottleneck] if invertible is None else [bottleneck, invertible]
    if architecture == "lora":
        return [_lora_config(data, model, notes)]
    if architecture == "prefix_tuning":
        return [_prefix_config(data, model, notes)]
    if architecture == "union":
        members = []
        for member in data.get("configs") or []:
            if isinstance(member, dict) and member.get("architecture") == "union":
                raise ValueError("A union config contains another union, which adapters does not allow")
            members.extend(_member_configs(member, model, notes))
        if not members:
            raise ValueError("The union config has no member configs")
        return members
    if architecture in _UNSUPPORTED_ARCHITECTURES:
        method = _UNSUPPORTED_ARCHITECTURES[architecture]
        raise ValueError(f"architecture={architecture!r}: adapterkit cannot read {method} checkpoints of the adapters "
                         "library")
    raise ValueError(f"architecture={architecture!r} is not an adapters 1.3.0 method")


def _version(text: Any) -> tuple[int, ...] | None:
    match = re.fullmatch(r"adapters\.(\d+)\.(\d+)\.(\d+).*", str(text or ""))
    return tuple(int(part) for part in match.groups()) if match else None


def _apply_compatibility_fixes(saved: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Apply the fixes ``adapters`` 1.3.0 applies when it loads a checkpoint of an older version."""
    config = saved.get("config")
    if not isinstance(config, dict):
        return saved
    config = dict(config)
    if "version" not in saved and config.get("non_linearity") in _OLD_ACTIVATION_NAMES:
        config["non_linearity"] = _OLD_ACTIVATION_NAMES[config["non_linearity"]]
        notes.append(f"The checkpoint has no version, so its non_linearity is read as {config['non_linearity']!r}, "
                     "as adapters does")
    version = _version(saved.get("version"))
    if (version is not None and version < _LORA_SCALING_FIXED and config.get("architecture") == "lora"
            and config.get("r") != config.get("alpha")):
        notes.append(f"The checkpoint comes from {saved['version']}, whose LoRA scaling was faulty, so alpha is set "
                     f"to r={config.get('r')}, as adapters does")
        config["alpha"] = config.get("r")
    return {**saved, "config": config}


# -- reading: weights -----------------------------------------------------------------------------

class _Weights:
    """The checkpoint's tensors by key relative to the base model, recording which ones were read."""

    def __init__(self, state: dict[str, torch.Tensor], model: _Model):
        self.tensors = {model.relative(key): value for key, value in state.items()}
        self.used: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise KeyError(key)
        self.used.add(key)
        return self.tensors[key]

    def has(self, key: str) -> bool:
        return key in self.tensors

    def mark(self, keys: list[str]) -> None:
        self.used.update(keys)

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def _fill(template: dict[str, torch.Tensor], values: dict[str, torch.Tensor], member: str) -> None:
    """Copy ``values`` into ``template`` after checking that every key exists and every shape fits."""
    for key, value in values.items():
        if key not in template:
            raise ValueError(f"The {member} has no parameter {key!r} for the checkpoint's tensor; adapterkit expected "
                             f"{sorted(template)[:6]}...")
        if tuple(value.shape) != tuple(template[key].shape):
            raise ValueError(f"The checkpoint's tensor for {key} of the {member} has shape {tuple(value.shape)}, but "
                             f"the model needs {tuple(template[key].shape)}; load it into the model it was trained on")
        template[key] = value.detach().clone().to(template[key].dtype)


_PHM_NAMES = {"weight_left": "W_left", "weight_right": "W_right", "weight_blocks": "W", "bias": "b",
              "phm_rule.rule": "phm_rule", "phm_rule.rule_left": "phm_rule_left",
              "phm_rule.rule_right": "phm_rule_right"}
_RULE_NAMES = {"rule": "phm_rule", "rule_left": "phm_rule_left", "rule_right": "phm_rule_right"}


def _bottleneck_key_map(config: BottleneckConfig, parameters: list[str]) -> dict[str, str]:
    """Return, for one ``Bottleneck``'s parameters, the matching key inside ``adapters``' ``Adapter``."""
    down = "adapter_down.1" if config.ln_before else "adapter_down.0"
    names = {}
    for name in parameters:
        part, _, rest = name.partition(".")
        if part == "norm_before":
            names[name] = f"adapter_norm_before.{rest}"
        elif part == "norm_after":
            names[name] = f"adapter_norm_after.{rest}"
        elif part in ("down_proj", "up_proj"):
            module = down if part == "down_proj" else "adapter_up"
            names[name] = f"{module}.{_PHM_NAMES.get(rest, rest) if config.phm_layer else rest}"
        elif part in ("scaling", "gate"):
            names[name] = name
        else:
            raise ValueError(f"adapterkit's bottleneck parameter {name!r} has no adapters equivalent")
    return names


def _read_bottleneck(config: BottleneckConfig, tree: nn.ModuleDict, template: dict[str, torch.Tensor],
                     model: _Model, weights: _Weights, name: str) -> None:
    values = {}
    for index, places in tree["layers"].items():
        for sublayer, module in places.items():
            prefix = f"{model.bottleneck_path(int(index), sublayer)}.adapters.{name}."
            parameters = list(module.state_dict())
            for ours, theirs in _bottleneck_key_map(config, parameters).items():
                key = prefix + theirs
                if not weights.has(key):
                    raise ValueError(f"The checkpoint lacks {key}, which the {sublayer} adapter of block {index} needs")
                value = weights.take(key)
                ours_key = f"layers.{index}.{sublayer}.{ours}"
                if ours.startswith(("down_proj.phm_rule.rule_", "up_proj.phm_rule.rule_")):
                    value = _pad_rule(value, template[ours_key].shape)
                values[ours_key] = value
            if config.ln_before:
                # adapters' adapter_down Sequential also lists the input LayerNorm as its entry 0.
                weights.mark([f"{prefix}adapter_down.0.weight", f"{prefix}adapter_down.0.bias"])
    if "phm_rule" in tree:
        for ours in tree["phm_rule"].state_dict():
            key = f"shared_parameters.{name}.{_RULE_NAMES[ours]}"
            if not weights.has(key):
                raise ValueError(f"The checkpoint lacks the shared Compacter rule {key}, so no reader can reproduce "
                                 "its outputs. adapters 1.3.0 neither saves nor loads that rule for T5 models, whose "
                                 "key has no dot before 'shared_parameters'")
            values[f"phm_rule.{ours}"] = _pad_rule(weights.take(key), template[f"phm_rule.{ours}"].shape)
    _fill(template, values, "bottleneck adapter")


def _pad_rule(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Pad a factorised PHM rule of rank 1 (as adapters stores it) with zeros to adapterkit's rank."""
    if tuple(value.shape) == tuple(shape) or value.dim() != 3:
        return value
    padded = value.new_zeros(shape)
    padded[:value.shape[0], :value.shape[1], :value.shape[2]] = value
    return padded


def _attention_modules(model: _Model, index: int) -> dict[str, list[tuple[str, int, Any]]]:
    """Return, per layer path in block ``index``, the adapterkit ``(role, number, ref)`` of its q/k/v parts."""
    found: dict[str, list[tuple[str, int, Any]]] = {}
    for role in ("query", "key", "value"):
        for number, ref in enumerate(model.stack(index).linear_refs(role)):
            found.setdefault(ref.path, []).append((role, number, ref))
    return found


def _read_projections(config: LoRAConfig | IA3Config, data: dict[str, Any], tree: nn.ModuleDict,
                      template: dict[str, torch.Tensor], model: _Model, weights: _Weights, name: str,
                      notes: list[str]) -> None:
    """Fill LoRA matrices or (IA)^3 vectors. Projections that adapters leaves alone get the identity."""
    is_lora = isinstance(config, LoRAConfig)
    alpha = 1.0 if is_lora else float(data.get("alpha", 1))
    matrices = {_ATTENTION_ROLES[m] for m in ("q", "k", "v") if m in (data.get("attn_matrices") or [])}
    # Identity first: zero LoRA updates and all-ones (IA)^3 vectors for what adapters leaves alone.
    filled = {key: torch.zeros_like(value) if is_lora else torch.ones_like(value) for key, value in template.items()}
    assigned = set()
    skipped = []
    for index in tree["layers"]:
        block = int(index)
        block_path = model.block_paths[block]
        wrapped: list[tuple[str, list[tuple[str, int, Any]]]] = []
        if data.get("selfattn_lora", True) and matrices:
            for path, parts in _attention_modules(model, block).items():
                enabled = sorted((p for p in parts if p[0] in matrices), key=lambda p: p[2].part)
                if not enabled:
                    continue
                wrapped.append((path, enabled))
                if not is_lora:
                    # A fused q/k/v layer multiplies its parts without a vector by alpha (LoRAMergedLinear.pad).
                    for role, number, _ in parts:
                        key = f"layers.{index}.{role}.{number}.scale"
                        if role not in matrices and key in filled:
                            filled[key] = torch.full_like(filled[key], alpha)
                            assigned.add(key)
        for location in ("intermediate", "output"):
            if data.get(f"{location}_lora", False):
                role, number = model.ff_projection(block, location)
                wrapped.append((model.stack(block).linear_refs(role)[number].path, [(role, number, None)]))
        for path, parts in wrapped:
            prefix = f"{block_path}.{path}.loras.{name}."
            names = ("lora_A", "lora_B") if is_lora else ("lora_B",)
            missing = [prefix + n for n in names if not weights.has(prefix + n)]
            if missing:
                raise ValueError(f"The checkpoint lacks {', '.join(missing)}, which block {block} needs")
            tensors = {n: weights.take(prefix + n) for n in names}
            for slot, (role, number, _) in enumerate(parts):
                ours = f"layers.{index}.{role}.{number}."
                if ours + ("lora_A" if is_lora else "scale") not in filled:
                    skipped.append(ours)
                    continue
                if is_lora:
                    rank = config.r
                    width = filled[ours + "lora_B"].shape[0]
                    filled[ours + "lora_A"] = _checked(tensors["lora_A"][slot * rank:(slot + 1) * rank],
                                                       filled[ours + "lora_A"], prefix + "lora_A")
                    filled[ours + "lora_B"] = _checked(tensors["lora_B"][slot * width:(slot + 1) * width],
                                                       filled[ours + "lora_B"], prefix + "lora_B")
                    assigned.update((ours + "lora_A", ours + "lora_B"))
                else:
                    width = filled[ours + "scale"].shape[0]
                    vector = tensors["lora_B"].reshape(-1)[slot * width:(slot + 1) * width] * alpha
                    filled[ours + "scale"] = _checked(vector, filled[ours + "scale"], prefix + "lora_B")
                    assigned.add(ours + "scale")
    if skipped:
        raise ValueError(f"adapterkit built no module for {skipped[:3]}, which is a bug in the role mapping")
    untouched = sorted({key.rsplit(".", 1)[0] for key in template if key not in assigned})
    if untouched:
        filler = "a zero LoRA update" if is_lora else "an all-ones (IA)^3 vector"
        notes.append(f"{len(untouched)} projections of the adapted roles are not adapted in the adapters model (such "
                     f"as {untouched[0]}); they get {filler}, which leaves their output unchanged")
    template.update(filled)


def _checked(value: torch.Tensor, reference: torch.Tensor, key: str) -> torch.Tensor:
    if tuple(value.shape) != tuple(reference.shape):
        raise ValueError(f"The checkpoint's {key} gives a part of shape {tuple(value.shape)}, but the model needs "
                         f"{tuple(reference.shape)}; load it into the model it was trained on")
    return value.detach().clone().to(reference.dtype)


def _read_prefix(config: PrefixTuningConfig, tree: nn.ModuleDict, model: _Model, weights: _Weights,
                 name: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Return the prefix tensors by adapterkit key, and whether the checkpoint stores them flat."""
    values = {}
    stored = set()
    for key, _, blocks in model.layout.prefix_stacks(config):
        location = model.prefix_location(key)
        pool = f"prefix_tuning.prefix_tunings.{name}.{location}."
        aliases = [f"{path}.prefix_tuning.pool.prefix_tunings.{name}.{location}."
                   for path in model.prefix_aliases(key, blocks)]
        source = next((p for p in [pool, *aliases] if any(k.startswith(p) for k in weights.tensors)), None)
        if source is None:
            raise ValueError(f"The checkpoint has no prefix for {location} ({pool}*), which the config asks for")
        module = tree["prefix"][key]
        stored_flat = weights.has(source + "control_trans")
        stored.add(stored_flat)
        if stored_flat:
            vector = weights.take(source + "control_trans")
            expected = module.prefix_length * module.n_layers * module.layer_width
            if vector.numel() != expected:
                raise ValueError(f"{source}control_trans has {vector.numel()} values, but {location} needs "
                                 f"prefix_length x layers x 2 x heads x head size = {expected}")
            values[f"prefix.{key}.prefix"] = vector.reshape(module.prefix_length, -1)
        else:
            for ours, theirs in (("embedding.weight", "wte.weight"), ("mlp.0.weight", "control_trans.0.weight"),
                                 ("mlp.0.bias", "control_trans.0.bias"), ("mlp.2.weight", "control_trans.2.weight"),
                                 ("mlp.2.bias", "control_trans.2.bias")):
                if not weights.has(source + theirs):
                    raise ValueError(f"The checkpoint lacks {source}{theirs} of the {location} prefix MLP")
                values[f"prefix.{key}.{ours}"] = weights.take(source + theirs)
        # Every attention layer links to the whole pool, so its alias repeats the tensors of every location.
        alias = re.compile(rf"(.+\.)?prefix_tuning\.(pool\.)?prefix_tunings\.{re.escape(name)}\.{location}\.")
        weights.mark([k for k in weights.tensors if alias.match(k)])
    if len(stored) > 1:
        raise ValueError("The checkpoint stores some prefixes flat and others as an MLP, which no config describes")
    return values, stored == {True}


def _read_invertible(template: dict[str, torch.Tensor], model: _Model, weights: _Weights,
                     name: str) -> dict[str, torch.Tensor]:
    values = {}
    prefix = f"{model.names.invertible}.{name}."
    for ours in template:
        _, net, rest = ours.split(".", 2)
        key = f"{prefix}{net.upper()}.{rest}"
        if not weights.has(key):
            raise ValueError(f"The checkpoint lacks {key} of the invertible adapter")
        values[ours] = weights.take(key)
    return values


def _head(registry: AdapterRegistry, directory: Path,
          notes: list[str]) -> tuple[dict[str, torch.Tensor], list[str] | None, list[str]]:
    """Return every head weight (``head.`` keys), the head's labels and the keys that came from the checkpoint."""
    full = {}
    for head_name in registry.head_names:
        for key, value in registry.base_heads[head_name].state_dict().items():
            full[f"head.{head_name}.{key}"] = value.detach().clone()
    config_path = directory / HEAD_CONFIG_FILE
    if not config_path.is_file():
        return full, None, []
    saved = _read_json(config_path)
    if not registry.head_names:
        message = (f"{type(registry.model).__name__} has no task head, so the head in {directory} is not loaded; "
                   "load the model with the task class the head belongs to to use it")
        logger.warning(message)
        notes.append(message)
        return full, None, []
    state = _load_state(directory, HEAD_WEIGHTS_FILE, SAFE_HEAD_WEIGHTS_FILE)
    head_config = saved.get("config")
    if head_config is None:
        mapped = {f"head.{key}": value for key, value in state.items()}
        label2id = saved.get("label2id")
        num_labels = saved.get("num_labels")
    else:
        mapped = map_flexible_head(registry.model, head_config, state, saved.get("name"), notes)
        label2id = head_config.get("label2id")
        num_labels = head_config.get("num_labels")
    unknown = sorted(set(mapped) - set(full))
    if unknown:
        raise ValueError(f"The head in {directory} has weights {unknown}, which the head of this "
                         f"{type(registry.model).__name__} ({registry.head_names}) does not have; load the model as "
                         f"{saved.get('model_class')} or a class with the same head")
    wrong = [f"{key}: saved {tuple(value.shape)}, model {tuple(full[key].shape)}" for key, value in mapped.items()
             if tuple(value.shape) != tuple(full[key].shape)]
    if wrong:
        raise ValueError(f"The head in {directory} does not fit the model's head ({'; '.join(wrong)}). Load the "
                         f"model with num_labels={num_labels}")
    missing = sorted(set(full) - set(mapped))
    if missing:
        raise ValueError(f"The head in {directory} lacks {missing}, which the model's head needs")
    full.update({key: value.detach().clone().to(full[key].dtype) for key, value in mapped.items()})
    labels = None
    if isinstance(label2id, dict) and label2id:
        ordered = sorted(label2id.items(), key=lambda item: int(item[1]))
        if [int(i) for _, i in ordered] != list(range(len(ordered))):
            raise ValueError(f"label2id={label2id!r} in {config_path} does not number the labels 0 to "
                             f"{len(ordered) - 1}")
        labels = [label for label, _ in ordered]
    return full, labels, sorted(mapped)


def read_adapters(registry: AdapterRegistry, directory: str | os.PathLike) -> AdaptersCheckpoint:
    """Map the ``adapters`` checkpoint in ``directory`` onto adapter config and weights for this model.

    The caller adds the adapter with ``registry.add(name, config)``, gives its head the labels in
    ``info["labels"]`` and fills it with ``registry.modules_of(name).load_state_dict(weights)``.

    Args:
        registry: The adapter registry of the model (``model._adapterkit``).
        directory: A folder written by ``adapters``' ``save_adapter``.

    Returns:
        ``AdaptersCheckpoint(config, weights, info)``.

    Raises:
        FileNotFoundError: If the config or weights file is missing.
        ValueError: For an AdapterFusion folder (see ``read_adapters_fusion``), and for any part
            adapterkit cannot reproduce exactly, naming it. Examples are gated
            methods, DoRA, VeRA, Glow invertible adapters and shared PHM weights. So are a T5
            Compacter without its shared rule, a flexible head that the model's head class cannot
            hold, and weights that do not fit the model.
    """
    directory = Path(directory)
    _check_not_fusion(directory)
    notes: list[str] = []
    saved = _read_saved_config(directory, notes)
    name = saved["name"]
    model = _Model(registry)
    _check_model(saved, model, directory)
    weights = _Weights(_load_state(directory, WEIGHTS_FILE, SAFE_WEIGHTS_FILE), model)
    fusion = [key for key in weights.tensors if ".adapter_fusion_layer." in key]
    if fusion:
        weights.mark(fusion)
        message = (f"Ignoring {len(fusion)} AdapterFusion tensors ({fusion[0]}, ...) in the adapter's weights; "
                   "fusions load with model.load_adapter_fusion from their own folder")
        logger.warning(message)
        notes.append(message)

    members = _checkpoint_members(saved, model, weights, notes)
    weights_out = _read_members(members, _raw_members(saved["config"]), model, weights, name, notes)
    unused = weights.unused()
    if unused:
        raise ValueError(f"The checkpoint has weights that the config does not explain and adapterkit cannot map: "
                         f"{unused[:5]}{' ...' if len(unused) > 5 else ''}")

    head, labels, head_keys = _head(registry, directory, notes)
    weights_out.update(head)
    config = members[0] if len(members) == 1 else ConfigUnion(*members)
    info = {"name": name, "labels": labels, "head_keys": head_keys, "model_class": saved.get("model_class"),
            "model_name": saved.get("model_name"), "version": saved.get("version"), "notes": notes}
    return AdaptersCheckpoint(config, weights_out, info)


def _read_saved_config(directory: Path, notes: list[str]) -> dict[str, Any]:
    """Return ``adapter_config.json`` with the fixes for older versions applied and a checked ``name``."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{CONFIG_FILE} not found in {directory}; pass a folder written by adapters' "
                                "save_adapter")
    saved = _read_json(config_path)
    if not isinstance(saved, dict) or "config" not in saved:
        raise ValueError(f"{config_path} has no 'config' entry, so it is not an adapters checkpoint")
    saved = _apply_compatibility_fixes(saved, notes)
    name = saved.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{config_path} names no adapter ('name'), so its weight keys cannot be found")
    return saved


def _check_model(saved: dict[str, Any], model: _Model, directory: Path) -> None:
    if saved.get("model_type") not in (None, model.family):
        raise ValueError(f"The adapter in {directory} was trained on a {saved.get('model_type')!r} model, but this "
                         f"model is {model.family!r}")
    if saved.get("hidden_size") not in (None, model.layout.hidden_size):
        raise ValueError(f"The adapter in {directory} was trained on a model with hidden size "
                         f"{saved.get('hidden_size')}, but this model has {model.layout.hidden_size}")


def _checkpoint_members(saved: dict[str, Any], model: _Model, weights: _Weights,
                        notes: list[str]) -> list[MethodConfig]:
    """Return the adapterkit method configs of the checkpoint, adjusted to what its weights and class show."""
    members = _member_configs(saved["config"], model, notes)
    if not any(isinstance(m, InvertibleConfig) for m in members):
        return members
    prefix = f"{model.names.invertible}.{saved['name']}."
    if not any(key.startswith(prefix) for key in weights.tensors):
        # adapters drops an invertible adapter that an older task adapter's config names but its weights lack
        # (loading.py: AdapterLoader._fix_legacy_config).
        notes.append("The config names an invertible adapter but the checkpoint has no weights for it, so it is left "
                     "out, as adapters does for task adapters of older versions")
        return [m for m in members if not isinstance(m, InvertibleConfig)]
    model_class = str(saved.get("model_class") or "")
    if model_class.endswith("AdapterModel"):
        return members
    # Only adapters' flexible LM heads run the inverse, and a transformers class's own head skips it.
    notes.append(f"The adapter was saved from {model_class or 'an unnamed class'}, whose LM head does not run the "
                 "invertible adapter's inverse in adapters, so invert_output=False")
    return [m.replace(invert_output=False) if isinstance(m, InvertibleConfig) else m for m in members]


def _read_members(members: list[MethodConfig], raw_members: list[dict[str, Any]], model: _Model, weights: _Weights,
                  name: str, notes: list[str]) -> dict[str, torch.Tensor]:
    """Return every method tensor of the new adapter (``methods.<i>.`` keys), updating ``members`` in place."""
    bottlenecks = [m for m in members if isinstance(m, BottleneckConfig)]
    if sum(b.phm_layer and b.shared_phm_rule for b in bottlenecks) > 1:
        raise ValueError("The union has two Compacter members that share one PHM rule in adapters, but adapterkit "
                         "gives each member its own rule")
    result: dict[str, torch.Tensor] = {}
    for index, member in enumerate(members):
        tree = build(model.layout, member)
        template = dict(tree.state_dict())
        if isinstance(member, BottleneckConfig):
            _read_bottleneck(member, tree, template, model, weights, name)
        elif isinstance(member, (LoRAConfig, IA3Config)):
            data = next(raw for raw in raw_members if raw.get("architecture") == "lora")
            _read_projections(member, data, tree, template, model, weights, name, notes)
        elif isinstance(member, PrefixTuningConfig):
            values, stored_flat = _read_prefix(member, tree, model, weights, name)
            if stored_flat and not member.flat:
                # eject_prefix_tuning leaves flat prefixes under "flat": false (adapters 1.3.0).
                notes.append("The prefix weights are flat (the output of the prefix MLP, as eject_prefix_tuning "
                             "leaves them) although the config says flat=false, so the prefix is loaded flat")
                members[index] = member = member.replace(flat=True)
                template = dict(build(model.layout, member).state_dict())
            _fill(template, values, "prefix")
        elif isinstance(member, InvertibleConfig):
            _fill(template, _read_invertible(template, model, weights, name), "invertible adapter")
        result.update({f"methods.{index}.{key}": value for key, value in template.items()})
    return result


def _raw_members(data: dict[str, Any]) -> list[dict[str, Any]]:
    if data.get("architecture") == "union":
        return [member for member in data.get("configs") or [] if isinstance(member, dict)]
    return [data]


# -- writing --------------------------------------------------------------------------------------

def _activation_out(name: str) -> str:
    return _ACTIVATIONS_OUT.get(name, name)


def _bottleneck_to_adapters(config: BottleneckConfig, invertible: InvertibleConfig | None,
                            model: _Model) -> dict[str, Any]:
    problems = []
    if config.before_head:
        problems.append("before_head=True: adapters has no adapter on the final hidden states")
    if config.projection != "linear":
        problems.append(f"projection={config.projection!r}: adapters' bottleneck adapters are linear")
    if config.use_gating:
        problems.append("use_gating=True: adapters averages its gate over the sequence, adapterkit gates each "
                        "position")
    if config.factorized_phm_rule and config.phm_rank != 1:
        problems.append(f"factorized_phm_rule=True with phm_rank={config.phm_rank}: adapters factorises the rule "
                        "with rank 1")
    if invertible is not None:
        if invertible.block_type != "nice":
            problems.append(f"block_type={invertible.block_type!r}: adapters' Glow block computes another coupling")
        if invertible.non_linearity != config.non_linearity:
            problems.append(f"the invertible adapter's non_linearity={invertible.non_linearity!r} differs from the "
                            f"bottleneck's {config.non_linearity!r}, but adapters uses the bottleneck's for both")
    hidden = model.layout.hidden_size
    width = config.bottleneck_width(hidden)
    factor = config.reduction_factor if int(hidden // config.reduction_factor) == width else hidden / width
    if int(hidden // factor) != width:
        problems.append(f"a bottleneck of {width} units cannot be written as hidden_size // reduction_factor")
    if problems:
        raise ValueError("The bottleneck adapter has no adapters equivalent:\n  - " + "\n  - ".join(problems))
    init = {"bert": "bert", "houlsby": "houlsby", "near_identity": "houlsby", "zero_up": "mam_adapter"}
    return {
        "mh_adapter": config.mh_adapter, "output_adapter": config.output_adapter,
        "cross_adapter": config.cross_adapter, "reduction_factor": factor,
        "non_linearity": _activation_out(config.non_linearity), "original_ln_before": config.original_ln_before,
        "original_ln_after": True, "residual_before_ln": config.residual_before_ln,
        "adapter_residual_before_ln": False, "ln_before": config.ln_before, "ln_after": config.ln_after,
        "init_weights": init[config.init_weights], "init_weights_seed": None, "is_parallel": config.parallel,
        # adapters accepts a float or a mode name, and rejects an int.
        "scaling": config.scaling if isinstance(config.scaling, str) else float(config.scaling),
        "use_gating": False, "dropout": config.dropout, "leave_out": list(config.leave_out),
        "inv_adapter": None if invertible is None else "nice",
        "inv_adapter_reduction_factor": None if invertible is None else invertible.reduction_factor,
        "phm_layer": config.phm_layer, "phm_dim": config.phm_dim, "factorized_phm_W": config.factorized_phm_W,
        "shared_W_phm": False, "shared_phm_rule": config.shared_phm_rule,
        "factorized_phm_rule": config.factorized_phm_rule, "phm_c_init": config.phm_c_init,
        "phm_init_range": config.phm_init_range, "learn_phm": config.learn_phm,
        "hypercomplex_nonlinearity": config.hypercomplex_nonlinearity, "phm_rank": config.phm_rank,
        "phm_bias": config.phm_bias, "stochastic_depth": 0.0,
    }


def _projection_locations(config: LoRAConfig | IA3Config, model: _Model) -> dict[str, Any]:
    """Return the adapters switches (selfattn, attn_matrices, intermediate, output) that place ``config``'s roles."""
    roles = set(config.targets)
    problems = []
    if "attention_output" in roles:
        problems.append("the attention_output role: adapters 1.3.0 wraps no attention output projection")
    locations = {}
    for location, (role, _) in (("intermediate", model.names.intermediate), ("output", model.names.output)):
        locations[location] = role in roles
    for role in ("ff_in", "ff_out"):
        if role in roles and role not in (model.names.intermediate[0], model.names.output[0]):
            problems.append(f"the {role} role: adapters wraps no {role} projection in {model.family!r}")
    if problems:
        raise ValueError(f"The {config.architecture} adapter has no adapters equivalent:\n  - "
                         + "\n  - ".join(problems))
    matrices = [m for m, role in _ATTENTION_ROLES.items() if role in roles]
    return {"selfattn_lora": bool(matrices), "attn_matrices": matrices or ["q", "v"],
            "intermediate_lora": locations["intermediate"], "output_lora": locations["output"]}


def _lora_to_adapters(config: LoRAConfig | IA3Config, model: _Model) -> dict[str, Any]:
    placement = _projection_locations(config, model)
    if isinstance(config, LoRAConfig):
        if config.use_gating:
            raise ValueError("The LoRA adapter has use_gating=True: adapters uses its sequence-averaged gate in place "
                             "of alpha / r, which adapterkit's gated LoRA does not compute")
        patterns = []
        if config.rank_pattern:
            patterns.append(f"rank_pattern={config.rank_pattern}")
        if config.alpha_pattern:
            patterns.append(f"alpha_pattern={config.alpha_pattern}")
        if patterns:
            raise ValueError(f"The LoRA adapter sets per-module values ({', '.join(patterns)}), but adapters 1.3.0 has "
                             "one r and one alpha per adapter. Save it in the adapterkit or PEFT format, or use a "
                             "LoRAConfig without rank_pattern and alpha_pattern")
        return {"architecture": "lora", **placement, "leave_out": list(config.leave_out), "r": config.r,
                "alpha": config.alpha, "dropout": config.dropout, "composition_mode": "add",
                "init_weights": "bert" if config.init_weights == "bert" else "lora", "init_weights_seed": None,
                "use_gating": False, "use_dora": False, "vera_d": None, "vera_b": None, "dtype": None}
    if "ff_out" in config.targets and config.ff_out_side == "input":
        raise ValueError("The (IA)^3 adapter scales the input of the ff_out projection (ff_out_side='input'), but "
                         "adapters' (IA)^3 scales the outputs of the modules it wraps. Remove ff_out from targets or "
                         "use ff_out_side='output'")
    return {"architecture": "lora", **placement, "leave_out": list(config.leave_out), "r": 1, "alpha": 1,
            "dropout": 0.0, "composition_mode": "scale", "init_weights": "ia3", "init_weights_seed": None,
            "use_gating": False, "use_dora": False, "vera_d": None, "vera_b": None, "dtype": None}


def _prefix_to_adapters(config: PrefixTuningConfig, model: _Model) -> dict[str, Any]:
    if config.use_gating:
        raise ValueError("The prefix tuning adapter has use_gating=True: adapters' prefix gate is another linear "
                         "layer per attention layer")
    expected_bias = _prefix_position_bias(model)
    if model.family in _CONCATENATED_BIAS_FAMILIES and config.position_bias != expected_bias:
        raise ValueError(f"The prefix tuning adapter has position_bias={config.position_bias!r}, but adapters 1.3.0 "
                         f"computes the relative position bias of {model.family!r} models over the prefix and the real "
                         f"keys together, so it would give other outputs. Train the prefix with "
                         f"PrefixTuningConfig(position_bias={expected_bias!r}) to write it in the adapters format")
    return {"architecture": "prefix_tuning", "encoder_prefix": config.encoder_prefix,
            "cross_prefix": config.cross_prefix, "leave_out": list(config.leave_out), "flat": config.flat,
            "prefix_length": config.prefix_length, "bottleneck_size": config.bottleneck_size,
            "non_linearity": _activation_out(config.non_linearity), "dropout": config.dropout, "use_gating": False,
            "shared_gating": True, "init_weights_seed": None}


def _config_to_adapters(config: MethodConfig, model: _Model) -> dict[str, Any]:
    members = list(config.methods)
    invertibles = [m for m in members if isinstance(m, InvertibleConfig)]
    bottlenecks = [m for m in members if isinstance(m, BottleneckConfig)]
    if any(m.invert_output for m in invertibles) and model.registry._has_tied_lm_head():
        logger.warning("This model runs the invertible adapter's inverse before its tied LM head. adapters runs the "
                       "inverse only in its flexible LM heads, so with %s and adapters.init the LM logits differ; "
                       "load the checkpoint into an adapters *AdapterModel with an LM head to get them",
                       type(model.registry.model).__name__)
    if invertibles and len(bottlenecks) != 1:
        raise ValueError("adapters keeps an invertible adapter in a bottleneck config (inv_adapter), so the adapter "
                         f"needs exactly one bottleneck member to hold it, not {len(bottlenecks)}")
    written = []
    for member in members:
        if isinstance(member, BottleneckConfig):
            written.append(_bottleneck_to_adapters(member, invertibles[0] if invertibles else None, model))
        elif isinstance(member, (LoRAConfig, IA3Config)):
            written.append(_lora_to_adapters(member, model))
        elif isinstance(member, PrefixTuningConfig):
            written.append(_prefix_to_adapters(member, model))
        elif not isinstance(member, InvertibleConfig):
            raise ValueError(f"adapterkit cannot write {member.architecture} adapters in the adapters format")
    if len(written) == 1:
        return written[0]
    return {"architecture": "union", "configs": written}


def _bottleneck_tensors(config: BottleneckConfig, tree: nn.ModuleDict, model: _Model,
                        name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, places in tree["layers"].items():
        for sublayer, module in places.items():
            prefix = f"{model.bottleneck_path(int(index), sublayer)}.adapters.{name}."
            state = module.state_dict()
            for ours, theirs in _bottleneck_key_map(config, list(state)).items():
                tensors[prefix + theirs] = state[ours]
            if config.ln_before:
                tensors[f"{prefix}adapter_down.0.weight"] = state["norm_before.weight"]
                tensors[f"{prefix}adapter_down.0.bias"] = state["norm_before.bias"]
    if "phm_rule" in tree:
        if model.family == "t5":
            logger.warning("adapters 1.3.0 neither saves nor loads the shared Compacter rule of T5 models, so it "
                           "cannot load this checkpoint as written, although adapterkit reads it")
        for ours, value in tree["phm_rule"].state_dict().items():
            tensors[f"shared_parameters.{name}.{_RULE_NAMES[ours]}"] = value
    return tensors


def _projection_tensors(config: LoRAConfig | IA3Config, tree: nn.ModuleDict, model: _Model, name: str,
                        placement: dict[str, Any]) -> dict[str, torch.Tensor]:
    is_lora = isinstance(config, LoRAConfig)
    tensors = {}
    for index, roles in tree["layers"].items():
        block = int(index)
        block_path = model.block_paths[block]
        written = set()
        if placement["selfattn_lora"]:
            for path, parts in _attention_modules(model, block).items():
                enabled = sorted((p for p in parts if p[0] in roles), key=lambda p: p[2].part)
                if not enabled:
                    continue
                modules = [roles[role][number] for role, number, _ in enabled]
                prefix = f"{block_path}.{path}.loras.{name}."
                if is_lora:
                    tensors[prefix + "lora_A"] = torch.cat([m.lora_A for m in modules])
                    tensors[prefix + "lora_B"] = torch.cat([m.lora_B for m in modules])
                else:
                    tensors[prefix + "lora_B"] = torch.cat([m.scale for m in modules]).reshape(-1, 1)
                written.update((role, number) for role, number, _ in enabled)
        for location in ("intermediate", "output"):
            if placement[f"{location}_lora"]:
                role, number = model.ff_projection(block, location)
                module = roles[role][number]
                prefix = f"{block_path}.{model.stack(block).linear_refs(role)[number].path}.loras.{name}."
                if is_lora:
                    tensors[prefix + "lora_A"] = module.lora_A
                    tensors[prefix + "lora_B"] = module.lora_B
                else:
                    tensors[prefix + "lora_B"] = module.scale.reshape(-1, 1)
                written.add((role, number))
        for role, modules in roles.items():
            for number, module in enumerate(modules):
                if (role, number) in written:
                    continue
                identity = (torch.equal(module.lora_B, torch.zeros_like(module.lora_B)) if is_lora
                            else torch.equal(module.scale, torch.ones_like(module.scale)))
                if not identity:
                    path = model.stack(block).linear_refs(role)[number].path
                    raise ValueError(f"The {role} projection {path} of block {block} has a {config.architecture} "
                                     "module, but the adapters library adapts only "
                                     f"{model.names.intermediate[1][-1]} and {model.names.output[1][-1]} of the "
                                     "feed-forward layer, so the update cannot be written")
    return tensors


def _prefix_tensors(config: PrefixTuningConfig, tree: nn.ModuleDict, model: _Model,
                    name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, _, _ in model.layout.prefix_stacks(config):
        location = model.prefix_location(key)
        module = tree["prefix"][key]
        if module.flat:
            values = {"control_trans": module.prefix.reshape(-1)}
        else:
            values = {"wte.weight": module.embedding.weight, "control_trans.0.weight": module.mlp[0].weight,
                      "control_trans.0.bias": module.mlp[0].bias, "control_trans.2.weight": module.mlp[2].weight,
                      "control_trans.2.bias": module.mlp[2].bias}
        # adapters' state dict lists the pool once and again under every attention module, which links to it.
        prefixes = [f"prefix_tuning.prefix_tunings.{name}.{location}."]
        prefixes += [f"{path}.prefix_tuning.pool.prefix_tunings.{name}.{location}." for path in model.attention_paths()]
        for prefix in prefixes:
            tensors.update({prefix + part: value for part, value in values.items()})
    return tensors


def _invertible_tensors(tree: nn.ModuleDict, model: _Model, name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, value in tree.state_dict().items():
        # invertible.f.0.weight becomes <invertible path>.<name>.F.0.weight
        _, network, rest = key.split(".", 2)
        tensors[f"{model.names.invertible}.{name}.{network.upper()}.{rest}"] = value
    return tensors


def _head_files(registry: AdapterRegistry, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Return the static head's ``head_config.json`` and weights, or ``None`` for a model without a task head.

    ``name`` is an adapter or a fusion.
    """
    head = registry.head_modules(name)
    if not len(head):
        return None
    model = registry.model
    labels = registry.head_entry(name).labels
    if labels is None:
        id2label = getattr(model.config, "id2label", None) or {}
        labels = [id2label[i] for i in sorted(id2label)]
    description = {
        "config": None,
        "hidden_size": getattr(model.config, "hidden_size", None),
        "label2id": {str(label): i for i, label in enumerate(labels)},
        "model_class": type(model).__name__,
        "model_name": getattr(model.config, "_name_or_path", None) or None,
        "model_type": getattr(model.config, "model_type", None),
        "name": None,
        "num_labels": len(labels),
        "version": WRITTEN_VERSION,
    }
    return description, dict(head.state_dict())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, safetensors: bool) -> None:
    if safetensors:
        # safetensors rejects tensors that share memory, as prefix tuning's aliases do.
        unique = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
        write_atomically(path, lambda target: save_file(unique, str(target), metadata={"format": "pt"}))
    else:
        # The same tensor under several keys is stored once, as in adapters' own checkpoints.
        cache: dict[int, torch.Tensor] = {}
        plain = {}
        for key, value in tensors.items():
            if id(value) not in cache:
                cache[id(value)] = value.detach().to("cpu").contiguous().clone()
            plain[key] = cache[id(value)]
        write_atomically(path, lambda target: torch.save(plain, target))


def write_adapters(registry: AdapterRegistry, name: str, directory: str | os.PathLike, *,
                   safetensors: bool = False) -> Path:
    """Write adapter ``name`` as an ``adapters`` checkpoint that ``adapters`` 1.3.0 loads with ``load_adapter``.

    The folder gets ``adapter_config.json`` and the weights, keyed as an ``adapters`` model of the
    same transformers class names them (load it with that class and ``adapters.init``). A model
    with a task head also gets the head as a static head (``head_config.json`` with
    ``"config": null``). Files are written through temporary files, the config last. A weights
    file of the other format left in the folder by an earlier write is deleted, because readers
    would pick it over the new one.

    Args:
        registry: The adapter registry of the model (``model._adapterkit``).
        name: The adapter to write.
        directory: The target folder, created if missing.
        safetensors: Write ``adapter.safetensors`` (and ``model_head.safetensors``) instead of the
            pickled ``pytorch_adapter.bin`` that ``load_adapter`` reads by default.

    Returns:
        The folder.

    Raises:
        ValueError: If a part of the adapter has no ``adapters`` equivalent, naming it. Examples are
            convolutional or gated adapters, an adapter before the head and LoRA on the attention
            output. So are (IA)^3 on the input of the feed-forward output projection, a Glow
            invertible adapter and a T5 prefix without ``position_bias="concatenated"``.
    """
    registry.check_names([name])
    directory = Path(directory)
    model = _Model(registry)
    config = registry.entries[name].config
    adapters_config = _config_to_adapters(config, model)
    written_members = _raw_members(adapters_config)
    methods = registry.modules_of(name)["methods"]
    tensors: dict[str, torch.Tensor] = {}
    position = 0
    for index, member in enumerate(config.methods):
        tree = methods[str(index)]
        if isinstance(member, BottleneckConfig):
            tensors.update(_bottleneck_tensors(member, tree, model, name))
        elif isinstance(member, (LoRAConfig, IA3Config)):
            tensors.update(_projection_tensors(member, tree, model, name, written_members[position]))
        elif isinstance(member, PrefixTuningConfig):
            tensors.update(_prefix_tensors(member, tree, model, name))
        elif isinstance(member, InvertibleConfig):
            tensors.update(_invertible_tensors(tree, model, name))
            continue
        position += 1
    tensors = {model.absolute(key): value for key, value in tensors.items()}

    description = {
        "config": adapters_config,
        "hidden_size": model.layout.hidden_size,
        "model_class": type(registry.model).__name__,
        "model_name": getattr(registry.model.config, "_name_or_path", None) or None,
        "model_type": model.family,
        "name": name,
        "version": WRITTEN_VERSION,
    }
    _write_folder(registry, directory, name, tensors, (WEIGHTS_FILE, SAFE_WEIGHTS_FILE), description, CONFIG_FILE,
                  safetensors)
    logger.info("Wrote adapter %r as an adapters checkpoint to %s", name, directory)
    return directory


def _write_folder(registry: AdapterRegistry, directory: Path, name: str, tensors: dict[str, torch.Tensor],
                  weights_names: tuple[str, str], description: dict[str, Any], config_name: str,
                  safetensors: bool) -> None:
    """Write the weights, the head files of ``name`` and the config of an ``adapters`` folder.

    ``weights_names`` is ``(.bin name, .safetensors name)``: the chosen one is written and the other one
    removed, so a folder never contains two weight files that disagree. The head files follow the same rule.
    """
    bin_name, safe_name = weights_names
    weights_files = (safe_name, bin_name) if safetensors else (bin_name, safe_name)
    _save_tensors(tensors, directory / weights_files[0], safetensors)
    (directory / weights_files[1]).unlink(missing_ok=True)
    head = _head_files(registry, name)
    if head is not None:
        head_description, head_tensors = head
        head_files = (SAFE_HEAD_WEIGHTS_FILE, HEAD_WEIGHTS_FILE) if safetensors else (HEAD_WEIGHTS_FILE,
                                                                                     SAFE_HEAD_WEIGHTS_FILE)
        _save_tensors(head_tensors, directory / head_files[0], safetensors)
        (directory / head_files[1]).unlink(missing_ok=True)
        head_text = json.dumps(head_description, indent=2, sort_keys=True)
        write_atomically(directory / HEAD_CONFIG_FILE, lambda path: path.write_text(head_text, encoding="utf-8"))
    text = json.dumps(description, indent=2, sort_keys=True)
    write_atomically(directory / config_name, lambda path: path.write_text(text, encoding="utf-8"))


# -- AdapterFusion ----------------------------------------------------------------------------------

class AdaptersFusionCheckpoint(NamedTuple):
    """An ``adapters`` AdapterFusion checkpoint mapped onto adapterkit.

    Attributes:
        adapter_names: The fused adapters, in order.
        config: The fusion configuration.
        weights: The fusion layers' parameters keyed as in the fusion's store entry
            (``layers.<block>.<sublayer>.query.weight``) and the head's weights (``head.`` keys, the
            base model's head where the checkpoint has none the model can take).
        info: ``name``, ``labels``, ``head_keys``, ``model_class``, ``model_name``, ``version`` and
            ``notes``, as in ``AdaptersCheckpoint``.
    """

    adapter_names: list[str]
    config: FusionConfig
    weights: dict[str, torch.Tensor]
    info: dict[str, Any]


_FUSION_FILE_KEYS = {"adapter_names", "config", "hidden_size", "model_class", "model_name", "model_type", "name",
                     "version"}


def _fusion_parameters(config: FusionConfig) -> list[str]:
    """Return the parameter names of one fusion layer, which ``adapters``' ``BertFusion`` shares."""
    names = []
    if config.query:
        names += ["query.weight", "query.bias"]
    if config.key:
        names += ["key.weight", "key.bias"]
    if config.value:
        names.append("value.weight")
    return names


def _check_fusable_in_adapters(registry: AdapterRegistry, names: list[str], action: str) -> None:
    """Raise ``ValueError`` if ``adapters`` 1.3.0 would fuse adapters ``names`` into other outputs than adapterkit.

    ``adapters`` fuses each adapter's up-projection output before its gate and output layer norm,
    feeds every adapter the input that the last adapter's config computes, and adds the residual
    stream once more for parallel adapters. adapterkit fuses what each adapter adds to the residual.
    The two agree for series adapters without gate or output layer norm that share their input
    settings.
    """
    settings = {}
    for name in names:
        for member in registry.entries[name].config.methods:
            if not isinstance(member, BottleneckConfig):
                continue
            flags = {"parallel": member.parallel, "use_gating": member.use_gating, "ln_after": member.ln_after}
            problems = [f"{flag}=True" for flag, value in flags.items() if value]
            if problems:
                raise ValueError(f"Cannot {action} a fusion over adapter {name!r} ({', '.join(problems)}) in the "
                                 "adapters format: adapters 1.3.0 fuses the adapter's up-projection output before its gate and "
                                 "output layer norm, and adds the residual stream twice for parallel adapters, so its "
                                 "outputs differ from adapterkit's. Use the adapterkit format")
            settings[name] = (member.original_ln_before, member.residual_before_ln, member.mh_adapter,
                              member.output_adapter, member.cross_adapter)
    if len(set(settings.values())) > 1:
        raise ValueError(f"Cannot {action} this fusion in the adapters format: the fused adapters {names} differ in "
                         "original_ln_before, residual_before_ln, mh_adapter, output_adapter or cross_adapter, which "
                         "adapters 1.3.0 requires to agree (it feeds every fused adapter the last one's input). "
                         "Use the adapterkit format")


def read_adapters_fusion(registry: AdapterRegistry, directory: str | os.PathLike) -> AdaptersFusionCheckpoint:
    """Map the ``adapters`` AdapterFusion checkpoint in ``directory`` onto a fusion of this model's adapters.

    The fused adapters must already be on the model under the names the checkpoint lists.

    Raises:
        FileNotFoundError: If the fusion config or weights file is missing.
        ValueError: If a fused adapter is missing or fuses differently in ``adapters`` (see
            ``_check_fusable_in_adapters``), or the weights do not fit the fusion's sites.
    """
    directory = Path(directory)
    config_path = directory / FUSION_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{FUSION_CONFIG_FILE} not found in {directory}; pass a folder written by adapters' "
                                "save_adapter_fusion")
    notes: list[str] = []
    saved = _read_json(config_path)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ValueError(f"{config_path} has no 'config' entry, so it is not an adapters fusion checkpoint")
    name = saved.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{config_path} names no fusion ('name'), so its weight keys cannot be found")
    adapter_names = saved.get("adapter_names") or name.split(",")
    _warn_unknown(saved["config"], {f for f in FusionConfig.__dataclass_fields__}, "AdapterFusion", notes)
    config = FusionConfig.from_dict(saved["config"], unknown_keys="ignore")
    model = _Model(registry)
    _check_model(saved, model, directory)
    missing = [adapter for adapter in adapter_names if adapter not in registry.entries]
    if missing:
        raise ValueError(f"The fusion in {directory} fuses {missing}, which this model does not have; load those "
                         "adapters first with model.load_adapter")
    _check_fusable_in_adapters(registry, adapter_names, "read")

    from ..fusion import fusion_sites

    weights = _Weights(_load_state(directory, *FUSION_WEIGHTS_FILES), model)
    values = {}
    for index, sublayer in fusion_sites(registry, Fuse(*adapter_names)):
        prefix = f"{model.bottleneck_path(index, sublayer)}.adapter_fusion_layer.{name}."
        for parameter in _fusion_parameters(config):
            if not weights.has(prefix + parameter):
                raise ValueError(f"The checkpoint lacks {prefix + parameter}, which the fusion layer at the {sublayer} "
                                 f"sublayer of block {index} needs")
            values[f"layers.{index}.{sublayer}.{parameter}"] = weights.take(prefix + parameter)
    unused = weights.unused()
    idle = [key for key in unused if f".adapter_fusion_layer.{name}." in key]
    if idle:
        # adapters creates a fusion layer wherever the fused adapters' placement allows one, even where they
        # have no module, and a 'dense' layer when query, key and value are all off. Neither ever runs.
        message = (f"Ignoring {len(idle)} fusion tensors ({idle[0]}, ...) at sites where no fused adapter has a module "
                   "or that the fusion never uses")
        logger.info(message)
        notes.append(message)
    other = sorted(set(unused) - set(idle))
    if other:
        raise ValueError(f"The fusion checkpoint has weights that belong to no fusion layer {name!r}: "
                         f"{other[:5]}{' ...' if len(other) > 5 else ''}")

    head, labels, head_keys = _head(registry, directory, notes)
    values.update(head)
    info = {"name": name, "labels": labels, "head_keys": head_keys, "model_class": saved.get("model_class"),
            "model_name": saved.get("model_name"), "version": saved.get("version"), "notes": notes}
    return AdaptersFusionCheckpoint(list(adapter_names), config, values, info)


def write_adapters_fusion(registry: AdapterRegistry, name: str, directory: str | os.PathLike, *,
                          safetensors: bool = False) -> Path:
    """Write fusion ``name`` as an ``adapters`` checkpoint that ``adapters`` 1.3.0 loads with ``load_adapter_fusion``.

    The folder gets ``adapter_fusion_config.json``, the fusion layers' weights and, for a model
    with a task head, the fusion's head as a static head. Write the fused adapters with
    ``write_adapters`` into their own folders.

    Args:
        registry: The adapter registry of the model.
        name: The fusion to write.
        directory: The target folder, created if missing.
        safetensors: Write ``model_adapter_fusion.safetensors`` instead of ``pytorch_model_adapter_fusion.bin``.

    Returns:
        The folder.

    Raises:
        ValueError: If the fusion has a ``Stack`` child, which ``adapters`` computes differently, or
            its adapters fuse differently there (see ``_check_fusable_in_adapters``).
    """
    from ..fusion import fusion_key

    entry = registry.fusions[name]
    children = list(entry.block.children)
    if not all(isinstance(child, str) for child in children):
        raise ValueError(f"The fusion {name!r} fuses {entry.block!r}; the adapters format stores fusions of single "
                         "adapters only, because adapters 1.3.0 takes only the last adapter's up-projection from a "
                         "Stack inside a Fuse. Save it in the adapterkit format")
    _check_fusable_in_adapters(registry, children, "write")
    directory = Path(directory)
    model = _Model(registry)
    tensors = {}
    for index, places in registry.store[fusion_key(name)]["layers"].items():
        for sublayer, layer in places.items():
            prefix = f"{model.bottleneck_path(int(index), sublayer)}.adapter_fusion_layer.{name}."
            for parameter, value in layer.named_parameters():
                tensors[model.absolute(prefix + parameter)] = value
    if entry.config.temperature:
        logger.warning("The adapters format has no place for the annealed temperature of fusion %r; adapters "
                       "starts it at 50 again when it loads the folder", name)

    description = {
        "adapter_names": children,
        "config": entry.config.to_dict(),
        "hidden_size": model.layout.hidden_size,
        "model_class": type(registry.model).__name__,
        "model_name": getattr(registry.model.config, "_name_or_path", None) or None,
        "model_type": model.family,
        "name": name,
        "version": WRITTEN_VERSION,
    }
    _write_folder(registry, directory, name, tensors, FUSION_WEIGHTS_FILES, description, FUSION_CONFIG_FILE,
                  safetensors)
    logger.info("Wrote fusion %r as an adapters checkpoint to %s", name, directory)
    return directory
