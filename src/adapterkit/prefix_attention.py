"""Prefix keys and values inside transformers attention layers, mostly without copying a model's forward.

Prefix tuning (Li and Liang, 2021) puts trained key/value positions before the real keys and values
of an attention layer. Each attention module gets a *prefix source* (``set_prefix_source``), a
callable that returns the prefix tensors at every forward. ``enable_prefix_attention`` then routes
the model's attention through code that prepends them:

- Families whose attention modules call transformers' ``AttentionInterface``: gpt2, llama, mistral,
  qwen2, gemma3, bart and most others, plus bert, roberta, distilbert, electra and t5 from
  transformers 5 on. Each config's ``_attn_implementation`` is switched to a registered wrapper,
  ``adapterkit_prefix_<previous>``, which runs after the KV-cache update and calls the previous
  implementation. So the cache never stores the prefix, position ids and the caller's attention
  mask keep their lengths, and ``generate()`` runs unchanged with or without a cache.
- Families whose attention modules compute the scores themselves get hook patches on the attention
  module and its key/value projections instead: MPNet and DeBERTa-v2 in every supported
  transformers version, and BERT, RoBERTa, ELECTRA, DistilBERT and T5 in transformers 4.x. The
  configs of these families keep their implementation. With a KV cache (T5 and BERT-style
  decoders), the patch prepends the prefix to what the cache returns, so the cache never stores it.

In training on the CPU with attention dropout, prefixed attention that would call SDPA runs
``cpu_dropout_attention`` instead, which draws the dropout mask at about half SDPA's cost there. On
transformers 4.x, BERT-style SDPA self-attention gets that path through a forward override that
repeats the class's three projections for this one case. Without dropout, prefixed grouped-query
attention on the CPU calls SDPA with ``enable_gqa`` instead of copying key/value heads, as
transformers' SDPA function does whenever it gets a mask.

In every family the prefix columns are always attended (padding and causal masks do not cover
them). By default they get zero position bias (T5's relative bias, MPNet's and DeBERTa-v2's
relative terms). A source can request T5's relative bias over the prefix and the real keys as one
key sequence instead, or the bias of a KV cache that holds the prefix (``PrefixPair.position_bias``,
see ``PrefixTuningConfig.position_bias``).
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import EncoderDecoderCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

# A prefix source: called as ``source(attention_module, query)`` with the query
# ``(batch, heads, q_len, head_dim)``, it returns a list of ``(key, value)`` pairs or ``PrefixPair``s,
# each tensor ``(batch or 1, kv_heads, prefix_length, head_dim)``, to put before the real keys in list order.
# A source that reads only the query's shape, dtype and device sets ``reads_query = False``. Patches
# that compute the query in a pre-hook then pass a stand-in of that shape (see ``source_query``).
PrefixSource = Callable[[nn.Module, torch.Tensor], Sequence[tuple[torch.Tensor, torch.Tensor]]]

# The position_bias modes of a prefix (see PrefixTuningConfig.position_bias). "zero" gives the prefix
# columns zero bias. "concatenated" computes T5's relative bias over the prefix and the real keys as
# one key sequence. "shifted" computes it as for a KV cache that contains the prefix.
POSITION_BIAS_MODES = ("zero", "concatenated", "shifted")


class PrefixPair(NamedTuple):
    """One prefix that a prefix source returns. A plain ``(key, value)`` tuple means ``position_bias="zero"``.

    Attributes:
        key: ``(batch or 1, kv_heads, prefix_length, head_dim)``.
        value: ``(batch or 1, kv_heads, prefix_length, value_dim)``.
        position_bias: One of ``POSITION_BIAS_MODES``. Only attention modules with a relative
            position bias (T5) compute differently in the two modes.
        mask: ``(batch, prefix_length)`` bool, True where a row attends to a prefix slot, or
            ``None`` when every row attends to every slot. Per-row routing pads the prefixes of
            rows with shorter (or no) prefixes to one length and masks the padded slots out.
    """

    key: torch.Tensor
    value: torch.Tensor
    position_bias: str = "zero"
    mask: torch.Tensor | None = None


class CollectedPrefix(NamedTuple):
    """The prefixes of one attention call, concatenated along the prefix positions.

    Attributes:
        key: ``(batch, kv_heads, prefix_length, head_dim)``.
        value: ``(batch, kv_heads, prefix_length, value_dim)``.
        position_bias: The one ``POSITION_BIAS_MODES`` entry that every collected prefix requested.
        mask: ``(batch, prefix_length)`` bool, True where a row attends to a prefix slot, or
            ``None`` when every row attends to every slot (see ``PrefixPair.mask``).
    """

    key: torch.Tensor
    value: torch.Tensor
    position_bias: str
    mask: torch.Tensor | None = None

PREFIX_SOURCE_ATTRIBUTE = "adapterkit_prefix_source"
IMPLEMENTATION_PREFIX = "adapterkit_prefix_"
_PATCH_ATTRIBUTE = "adapterkit_prefix_patch"

# Attention classes that a hook patch supports, by modeling module. A class gets the patch only
# where its modeling module does not import ALL_ATTENTION_FUNCTIONS: MPNet and DeBERTa-v2 in
# transformers 4.57 and 5, the others in 4.x only (transformers 5 moved them onto the interface).
# Each value names a patch kind, and _PATCH_CLASSES at the end of this file maps it to the patch class.
# On the interface, T5Attention gets the smaller patch of _INTERFACE_PATCH_CLASSES for its position bias.
_HOOKED_ATTENTION_CLASSES: dict[str, dict[str, str]] = {
    "transformers.models.mpnet.modeling_mpnet": {"MPNetSelfAttention": "mpnet"},
    "transformers.models.deberta_v2.modeling_deberta_v2": {"DisentangledSelfAttention": "deberta-v2"},
    "transformers.models.bert.modeling_bert": {"BertSelfAttention": "bert", "BertSdpaSelfAttention": "bert"},
    "transformers.models.roberta.modeling_roberta": {"RobertaSelfAttention": "bert",
                                                     "RobertaSdpaSelfAttention": "bert"},
    "transformers.models.electra.modeling_electra": {"ElectraSelfAttention": "bert"},
    "transformers.models.distilbert.modeling_distilbert": {"MultiHeadSelfAttention": "distilbert",
                                                           "DistilBertSdpaAttention": "distilbert"},
    "transformers.models.t5.modeling_t5": {"T5Attention": "t5"},
}


# -- prefix sources ------------------------------------------------------------------------------

def set_prefix_source(attention_module: nn.Module, source: PrefixSource | None) -> None:
    """Set or remove the prefix source of one attention module.

    The source is kept as a plain instance attribute (``adapterkit_prefix_source``), not as a
    submodule, so its parameters do not join the model's ``parameters()`` or ``state_dict()``.
    ``copy.deepcopy`` and ``pickle`` of the model copy it, so it must be picklable for the model to
    stay picklable (a lambda or a local function is not).

    The source takes effect only while ``enable_prefix_attention`` is on for the model.

    Args:
        attention_module: The module that calls the attention function (llama ``self_attn``, gpt2
            ``attn``, bert ``attention.self``, mpnet ``attention.attn``, t5 ``SelfAttention``, ...).
        source: ``source(attention_module, query) -> [(key, value), ...]``, see ``PrefixSource``, or
            ``None`` to remove it. The tensors should have the dtype of ``query``. Other dtypes
            are cast to the dtype of the real keys. A source that reads only the query's shape, dtype
            and device should set ``reads_query = False``, which saves hook-based patches a second
            query projection.

    Raises:
        TypeError: If ``source`` is neither ``None`` nor callable.
    """
    if source is None:
        attention_module.__dict__.pop(PREFIX_SOURCE_ATTRIBUTE, None)
        return
    if not callable(source):
        raise TypeError(f"source={source!r} is not callable: expected source(attention_module, query) "
                        "returning a list of (key, value) pairs, or None")
    # object.__setattr__ keeps an nn.Module source out of the attention module's submodules.
    object.__setattr__(attention_module, PREFIX_SOURCE_ATTRIBUTE, source)


def get_prefix_source(attention_module: nn.Module) -> PrefixSource | None:
    """Return the prefix source of ``attention_module``, or ``None`` if it has none."""
    return attention_module.__dict__.get(PREFIX_SOURCE_ATTRIBUTE)


def source_query(module: nn.Module, projection: nn.Module, query_input: torch.Tensor, heads: int) -> torch.Tensor:
    """Return the query ``(batch, heads, q_len, head_dim)`` to hand to the prefix source of ``module``.

    Hook-based patches call this before the module's forward, which computes the query itself. The
    projection runs here only when the source reads the query's values. Without a source, or for a
    source with ``reads_query = False``, the result is a zero-stride stand-in with the query's shape,
    dtype (the autocast dtype under autocast) and device, so the projection does not run twice.

    Args:
        module: The attention module.
        projection: Its query projection, ``query_input`` -> ``(batch, q_len, heads * head_dim)``.
        query_input: What the module projects to the query, ``(batch, q_len, hidden)``.
        heads: Query heads of the module.
    """
    batch, length, _ = query_input.shape
    source = get_prefix_source(module)
    width = getattr(projection, "out_features", None)
    if (source is not None and getattr(source, "reads_query", True)) or not isinstance(width, int):
        return projection(query_input).view(batch, length, heads, -1).transpose(1, 2)
    device_type = query_input.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query_input.dtype
    return query_input.new_zeros((), dtype=dtype).expand(batch, heads, length, width // heads)


def collect_prefix(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor) -> CollectedPrefix | None:
    """Call the prefix source of ``module`` and concatenate what it returns.

    Args:
        module: The attention module.
        query: ``(batch, heads, q_len, head_dim)``, passed to the source.
        key: The real keys ``(batch, kv_heads, k_len, head_dim)``. The prefixes must match their
            batch (or have batch 1), heads and head size, and are cast to their dtype and device.
        value: The real values ``(batch, kv_heads, k_len, value_dim)``.

    Returns:
        ``CollectedPrefix(key, value, position_bias)``, the tensors ``(batch, kv_heads,
        prefix_length, dim)``, or ``None`` when the module has no source or the source returns no pair.

    Raises:
        ValueError: If a returned tensor has the wrong shape, or the pairs request an unknown
            ``position_bias`` or different ones.
    """
    source = get_prefix_source(module)
    if source is None:
        return None
    pairs = source(module, query)
    if not pairs:
        return None
    keys, values, masks = [], [], []
    modes = set()
    for pair in pairs:
        prefix_key, prefix_value = pair[0], pair[1]
        modes.add(getattr(pair, "position_bias", "zero"))
        _check_prefix_shape(module, "key", prefix_key, key)
        _check_prefix_shape(module, "value", prefix_value, value)
        if prefix_key.shape[2] != prefix_value.shape[2]:
            raise ValueError(f"the prefix source of {type(module).__name__} returned a key of length "
                             f"{prefix_key.shape[2]} and a value of length {prefix_value.shape[2]}: expected "
                             "equal prefix lengths (dimension 2)")
        batch = key.shape[0]
        keys.append(prefix_key.to(device=key.device, dtype=key.dtype).expand(batch, -1, -1, -1))
        values.append(prefix_value.to(device=value.device, dtype=value.dtype).expand(batch, -1, -1, -1))
        masks.append(_prefix_row_mask(module, getattr(pair, "mask", None), batch, prefix_key.shape[2], key.device))
    unknown = sorted(modes - set(POSITION_BIAS_MODES))
    if unknown:
        raise ValueError(f"the prefix source of {type(module).__name__} returned position_bias={unknown[0]!r}: "
                         f"expected one of {', '.join(POSITION_BIAS_MODES)}")
    if len(modes) > 1:
        raise ValueError(f"the prefix source of {type(module).__name__} returned prefixes with position_bias "
                         f"{sorted(modes)}, but one attention layer computes one position bias. Activate only prefix "
                         "adapters with the same PrefixTuningConfig.position_bias together")
    mask = None
    if any(part is not None for part in masks):
        mask = torch.cat([torch.ones(batch, part_key.shape[2], dtype=torch.bool, device=key.device) if part is None
                          else part for part, part_key in zip(masks, keys)], dim=1)
    if len(keys) == 1:
        return CollectedPrefix(keys[0], values[0], modes.pop(), mask)
    return CollectedPrefix(torch.cat(keys, dim=2), torch.cat(values, dim=2), modes.pop(), mask)


def _prefix_row_mask(module: nn.Module, mask: torch.Tensor | None, batch: int, length: int,
                     device: torch.device) -> torch.Tensor | None:
    """Return a prefix's ``(batch, length)`` bool row mask on ``device``, or ``None`` when it has none.

    Raises:
        ValueError: If ``mask`` is not ``(1 or batch, length)``.
    """
    if mask is None:
        return None
    if mask.dim() != 2 or mask.shape[0] not in (1, batch) or mask.shape[1] != length:
        raise ValueError(f"the prefix source of {type(module).__name__} returned a mask of shape "
                         f"{tuple(mask.shape)}: expected (1 or {batch}, {length}), the batch size and prefix length")
    return mask.to(device=device, dtype=torch.bool).expand(batch, length)


def _check_prefix_shape(module: nn.Module, name: str, prefix: torch.Tensor, real: torch.Tensor) -> None:
    batch, heads, _, size = real.shape
    if prefix.dim() == 4 and prefix.shape[0] in (1, batch) and prefix.shape[1] == heads and prefix.shape[3] == size:
        return
    raise ValueError(f"the prefix source of {type(module).__name__} returned a {name} of shape "
                     f"{tuple(prefix.shape)}: expected (1 or {batch}, {heads}, prefix_length, {size}), the batch "
                     "size, key/value heads and head size of this attention layer")


# -- turning the wrapper on and off --------------------------------------------------------------

def prefix_implementation(base_implementation: str) -> str:
    """Register the wrapper around ``base_implementation`` and return its name.

    The name is ``"adapterkit_prefix_" + base_implementation``, so the previous implementation can be
    read back from it. Its attention function is a ``PrefixAttentionFunction``, and its mask function
    is the one of ``base_implementation``, so the model builds the same masks as before.

    Raises:
        ValueError: If ``base_implementation`` is a flash, flex or paged implementation.
    """
    _check_implementation(base_implementation)
    name = IMPLEMENTATION_PREFIX + base_implementation
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, PrefixAttentionFunction(base_implementation))
    if base_implementation in ALL_MASK_ATTENTION_FUNCTIONS and name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_implementation])
    return name


def _check_implementation(implementation: str) -> None:
    if "flash" in implementation or "flex" in implementation or implementation.startswith("paged"):
        raise ValueError(f"prefix attention cannot wrap attn_implementation={implementation!r}: these kernels "
                         "take no dense attention mask, so the prefix columns cannot be added to it. Switch the model "
                         "first, e.g. model.set_attn_implementation('sdpa') or 'eager'")


def enable_prefix_attention(model: nn.Module) -> None:
    """Route the attention of ``model`` through the prefix wrapper. Calling it again changes nothing.

    Switches the configs of submodels whose attention calls the ``AttentionInterface`` (and their
    sub-configs) from implementation ``X`` to ``adapterkit_prefix_X``, and installs hook patches on
    the attention modules of the other supported families (see the module docstring), whose configs
    keep their implementation. A module without a prefix source computes exactly what it computed
    before (bitwise). Configs whose implementation is ``None`` are left as they are.

    ``model.set_attn_implementation`` afterwards replaces the wrapper, and the prefixes stop being
    used until this function is called again.

    Raises:
        ValueError: If a config uses a flash, flex or paged implementation.
        NotImplementedError: If a transformers submodel's attention does not call the
            ``AttentionInterface`` and has no hook patch here (e.g. DeBERTa v1), or uses a setting that
            the hook patch does not support.
    """
    _check_supported(model)
    switched = _model_configs(model, interface_only=True)
    for config in _model_configs(model):
        if config._attn_implementation is not None and not any(config is other for other in switched):
            _check_implementation(config._attn_implementation)
    switches = []
    for config in switched:
        current = config._attn_implementation
        if current is None or current.startswith(IMPLEMENTATION_PREFIX):
            continue
        switches.append((config, prefix_implementation(current)))
    # All names are checked above before any config changes, so a failure leaves the model as it was.
    for config, name in switches:
        config._attn_implementation_internal = name
    for module in model.modules():
        patch_class = _patch_class(module)
        if patch_class is not None and _PATCH_ATTRIBUTE not in module.__dict__:
            object.__setattr__(module, _PATCH_ATTRIBUTE, patch_class(module))


def disable_prefix_attention(model: nn.Module) -> None:
    """Restore the attention implementations that ``enable_prefix_attention`` replaced, and remove its hooks.

    Prefix sources stay on their modules and take effect again after the next
    ``enable_prefix_attention``.
    """
    for config in _model_configs(model):
        current = config._attn_implementation
        if current is not None and current.startswith(IMPLEMENTATION_PREFIX):
            config._attn_implementation_internal = current[len(IMPLEMENTATION_PREFIX):]
    for module in model.modules():
        patch = module.__dict__.pop(_PATCH_ATTRIBUTE, None)
        if patch is not None:
            patch.remove()


def is_prefix_attention_enabled(model: nn.Module) -> bool:
    """Return whether any config or attention module of ``model`` is routed through the prefix wrapper."""
    if any((config._attn_implementation or "").startswith(IMPLEMENTATION_PREFIX) for config in _model_configs(model)):
        return True
    return any(_PATCH_ATTRIBUTE in module.__dict__ for module in model.modules())


def _model_configs(model: nn.Module, interface_only: bool = False) -> list[PretrainedConfig]:
    """Return each distinct config that a module of ``model`` holds, and their sub-configs.

    Some models copy their config for submodels (T5 copies it for the encoder and the decoder
    stacks), so the attention modules can read configs other than ``model.config``.

    Args:
        model: The model to search.
        interface_only: Skip the configs held by modules of a transformers modeling module that does
            not use the ``AttentionInterface``. Transformers 4.x BERT and DistilBERT read
            ``_attn_implementation`` at forward time, so switching theirs would change their masks.
    """
    pending = [module.config for module in model.modules()
               if isinstance(getattr(module, "config", None), PretrainedConfig)
               and (not interface_only or _uses_attention_interface(module))]
    found: dict[int, PretrainedConfig] = {}
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub_config = getattr(config, key, None)
            if isinstance(sub_config, PretrainedConfig):
                pending.append(sub_config)
    return list(found.values())


def _uses_attention_interface(module: nn.Module) -> bool:
    """Return False for a module of a transformers modeling module that does not import ``ALL_ATTENTION_FUNCTIONS``."""
    module_name = type(module).__module__
    if not module_name.startswith("transformers.models."):
        return True
    return hasattr(sys.modules.get(module_name), "ALL_ATTENTION_FUNCTIONS")


def _check_supported(model: nn.Module) -> None:
    for module in model.modules():
        module_name = type(module).__module__
        if _uses_attention_interface(module):
            continue
        if isinstance(module, PreTrainedModel) and module_name not in _HOOKED_ATTENTION_CLASSES:
            family = getattr(module.config, "model_type", module_name)
            raise NotImplementedError(
                f"prefix attention does not support the {family!r} family ({type(module).__name__}) on transformers "
                f"{transformers.__version__}: its attention computes the scores in its own forward instead of calling "
                "transformers' AttentionInterface, and adapterkit has no hook patch for it. Hook patches exist for "
                "mpnet and deberta-v2, and on transformers 4.x for bert, roberta, electra, distilbert and t5. "
                "If transformers >= 5 moved this family onto the AttentionInterface, upgrading transformers fixes this")
        position_type = getattr(module, "position_embedding_type", "absolute")
        if _patch_class(module) is _BertPatch and position_type != "absolute":
            raise NotImplementedError(
                f"prefix attention does not support {type(module).__name__} with position_embedding_type="
                f"{position_type!r} on transformers {transformers.__version__}: its relative position scores would "
                "cover the prefix columns and shift the real ones. Use position_embedding_type='absolute' "
                "(transformers >= 5 supports only that)")


def _patch_class(module: nn.Module) -> type | None:
    """Return the hook patch class for ``module``, or ``None`` if it gets none."""
    kind = _HOOKED_ATTENTION_CLASSES.get(type(module).__module__, {}).get(type(module).__name__)
    if kind is None:
        return None
    if _uses_attention_interface(module):
        return _INTERFACE_PATCH_CLASSES.get(kind)
    return _PATCH_CLASSES[kind]


# -- the wrapper around the AttentionInterface -----------------------------------------------------

class PrefixAttentionFunction:
    """The attention function registered as ``adapterkit_prefix_<base>``.

    An attention module calls it with its query ``(batch, heads, q_len, head_dim)``, its keys and
    values after the cache update ``(batch, kv_heads, k_len, head_dim)`` and its 4-D mask (or
    ``None``). It prepends the module's prefixes to the keys and values, attended columns to the
    mask and zero columns to T5's ``position_bias``, then calls the base implementation. With
    ``position_bias="concatenated"`` or ``"shifted"`` prefixes, T5's bias comes from
    ``_T5BiasPatch.resolve`` instead.

    With ``base_implementation == "sdpa"``, a ``None`` mask on a causal module makes SDPA apply
    ``is_causal``, which is top-left aligned and so equals bottom-right alignment whenever
    ``q_len == k_len``. In transformers 5.25 ``sdpa_mask`` returns ``None`` with more keys than
    queries only on prefill into an empty static cache, where top-left is right. The prefix columns
    would shift that pattern, so this function builds it as an explicit boolean mask. Eager takes
    ``None`` as "attend everywhere" and keeps it.

    NOTE: any other base keeps a ``None`` mask too, so a custom implementation that reads ``None`` as
    causal, as SDPA does, would attend to future positions once a prefix is added.

    Args:
        base_implementation: The implementation to call, e.g. ``"sdpa"`` or ``"eager"``.
    """

    def __init__(self, base_implementation: str):
        self.base_implementation = base_implementation

    def __repr__(self) -> str:
        return f"PrefixAttentionFunction({self.base_implementation!r})"

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention = self._base_function(module)
        prefix = collect_prefix(module, query, key, value)
        bias_patch = module.__dict__.get(_PATCH_ATTRIBUTE)
        if not isinstance(bias_patch, _T5BiasPatch):
            bias_patch = None
        if prefix is None:
            if bias_patch is not None and kwargs.get("position_bias") is not None:
                kwargs["position_bias"] = bias_patch.resolve(query, key, kwargs["position_bias"], 0, "zero")
            return attention(module, query, key, value, attention_mask, **kwargs)

        prefix_key, prefix_value, mode = prefix.key, prefix.value, prefix.position_bias
        length = prefix_key.shape[2]
        if attention_mask is None and self.base_implementation == "sdpa":
            attention_mask = _sdpa_causal_mask(module, query, key, kwargs.get("is_causal"))
            # That mask, or no mask when every key is visible, now gives the causal pattern. An is_causal=True
            # left in kwargs (GPT-2 in transformers 4.57 passes one) would make SDPA apply its top-left
            # pattern on top, or fail next to an explicit mask.
            kwargs["is_causal"] = False
        if attention_mask is None and prefix.mask is not None:
            # Every real key is visible, but some rows must not see some prefix slots. SDPA takes a boolean
            # mask, and eager implementations add the mask to the scores.
            shape = (query.shape[0], 1, query.shape[2], key.shape[2])
            if self.base_implementation == "sdpa":
                attention_mask = torch.ones(shape, dtype=torch.bool, device=query.device)
            else:
                attention_mask = torch.zeros(shape, dtype=query.dtype, device=query.device)
        if attention_mask is not None:
            attend = True if attention_mask.dtype == torch.bool else 0.0
            masked = False if attention_mask.dtype == torch.bool else torch.finfo(attention_mask.dtype).min
            attention_mask = prepend_prefix_columns(attention_mask, length, prefix.mask, attend, masked)
        if kwargs.get("position_bias") is not None:
            if bias_patch is not None:
                kwargs["position_bias"] = bias_patch.resolve(query, key, kwargs["position_bias"], length, mode)
            elif mode != "zero":
                raise NotImplementedError(_concatenated_bias_message(module, mode))
            else:
                kwargs["position_bias"] = prepend_columns(kwargs["position_bias"], length, 0.0)
        key = torch.cat([prefix_key, key], dim=2)
        value = torch.cat([prefix_value, value], dim=2)
        dropout = kwargs.get("dropout", 0.0)
        plain_sdpa = (self.base_implementation == "sdpa"
                      and all(kwargs.get(name) is None for name in _SCORE_CHANGING_ARGUMENTS))
        if plain_sdpa and takes_cpu_dropout_path(query, dropout):
            # The causal pattern of a None mask is in attention_mask now (see above).
            output = cpu_dropout_attention(query, key, value, attention_mask, dropout, kwargs.get("scaling"))
            return output.transpose(1, 2).contiguous(), None
        if plain_sdpa and not kwargs.get("is_causal") and takes_cpu_grouped_path(query, key, attention_mask, dropout):
            # Drop mask columns beyond the keys, such as a static cache's, as transformers' SDPA function does.
            mask = attention_mask[..., :key.shape[-2]]
            output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=kwargs.get("scaling"),
                                                    enable_gqa=True)
            return output.transpose(1, 2).contiguous(), None
        return attention(module, query, key, value, attention_mask, **kwargs)

    def _base_function(self, module: nn.Module) -> Callable:
        if (self.base_implementation == "eager" and getattr(module, "reorder_and_upcast_attn", False)
                and hasattr(module, "_upcast_and_reordered_attn")):
            # GPT-2 with reorder_and_upcast_attn runs this method instead of the eager function.
            return _call_upcast_and_reordered
        # The attention modules pass their own modeling module's eager function as the default,
        # and T5's takes position_bias, so the same default is looked up there.
        default = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        # Mapping.get works on transformers 4.57 and 5, and get_interface exists only in 5.
        function = ALL_ATTENTION_FUNCTIONS.get(self.base_implementation, default)
        if function is None:
            raise RuntimeError(f"{type(module).__module__} defines no eager_attention_forward, so prefix attention "
                               f"cannot run the {self.base_implementation!r} implementation for "
                               f"{type(module).__name__}; use attn_implementation='sdpa'")
        return function


# Arguments of the AttentionInterface that change the scores beyond mask, scaling and dropout.
_SCORE_CHANGING_ARGUMENTS = ("position_bias", "softcap", "s_aux", "sinks", "head_mask")


def takes_cpu_dropout_path(query: torch.Tensor, dropout: float) -> bool:
    """Return whether prefixed attention on ``query`` runs ``cpu_dropout_attention`` instead of SDPA."""
    return 0.0 < dropout < 1.0 and query.device.type == "cpu" and query.dtype == torch.float32


# SDPA takes ``enable_gqa`` from torch 2.5 on.
_SDPA_TAKES_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def takes_cpu_grouped_path(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float) -> bool:
    """Return whether prefixed grouped-query attention calls SDPA with ``enable_gqa`` on the CPU.

    transformers' SDPA function copies each key/value head for its query heads whenever a mask is
    given, and a prefixed causal model gets one for every input longer than one token. SDPA's CPU
    kernel takes the mask and the grouped heads together, so the copies, which the backward pass
    would keep, are not needed.
    """
    return (_SDPA_TAKES_GQA and mask is not None and dropout == 0.0 and query.device.type == "cpu"
            and query.shape[1] != key.shape[1] and query.shape[1] % key.shape[1] == 0)


def cpu_dropout_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                          dropout: float, scaling: float | None = None) -> torch.Tensor:
    """Compute SDPA's attention with dropout, drawing the dropout mask at a lower cost on the CPU.

    With a dropout probability above zero, SDPA on the CPU takes its math path. That path draws the
    dropout mask with ``bernoulli_``, which took about a third of the attention's forward and backward
    time at MiniLM's sizes on one thread, and its softmax checks for fully masked rows. Here the mask
    is a uniform draw compared with the probability, at about half the cost, and each weight is kept
    with probability ``1 - dropout`` as in SDPA. The random numbers differ from SDPA's for the same seed.

    Args:
        query: ``(batch, heads, q_len, head_dim)``.
        key: ``(batch, kv_heads, k_len, head_dim)``. With fewer heads than the query, each key head
            serves ``heads // kv_heads`` consecutive query heads, as in SDPA's ``enable_gqa``.
        value: ``(batch, kv_heads, k_len, head_dim)``.
        mask: ``None``, a boolean mask (True attends) or an additive one, broadcastable to the scores
            ``(batch, heads, q_len, k_len)``.
        dropout: The probability of dropping an attention weight, in (0, 1).
        scaling: The factor of the scores, ``head_dim ** -0.5`` when ``None``.

    Returns:
        ``(batch, heads, q_len, head_dim)``.
    """
    if key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2))
    # In place: the matmul's backward reads its inputs, not its output.
    scores.mul_(query.shape[-1] ** -0.5 if scaling is None else scaling)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(scores.dtype).min)
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    with torch.no_grad():
        keep = torch.rand_like(weights).ge_(dropout).mul_(1.0 / (1.0 - dropout))
    return torch.matmul(weights * keep, value)


def _concatenated_bias_message(module: nn.Module, mode: str = "concatenated") -> str:
    return (f"position_bias={mode!r} is implemented for T5Attention's relative position bias, not for "
            f"{type(module).__name__} ({type(module).__module__}). Use PrefixTuningConfig(position_bias='zero')")


def _call_upcast_and_reordered(module, query, key, value, attention_mask, **kwargs):
    # Transformers 4.57 passes head_mask, and its method takes it as a fifth argument; 5.x has neither.
    if kwargs.get("head_mask") is not None:
        return module._upcast_and_reordered_attn(query, key, value, attention_mask, kwargs["head_mask"])
    return module._upcast_and_reordered_attn(query, key, value, attention_mask)


def _sdpa_causal_mask(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      is_causal: bool | None) -> torch.Tensor | None:
    """Return the boolean ``(1, 1, q_len, k_len)`` mask that SDPA's ``is_causal`` would apply, or ``None``."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    q_len = query.shape[2]
    if not is_causal or q_len == 1:
        return None
    return _top_left_causal_mask(q_len, key.shape[2], query.device)


def _top_left_causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Return SDPA's ``is_causal`` pattern as a boolean ``(1, 1, q_len, k_len)`` mask, query ``i`` to keys ``0..i``."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]


def prepend_columns(tensor: torch.Tensor, count: int, fill: float | bool) -> torch.Tensor:
    """Return ``tensor`` with ``count`` columns of ``fill`` before its last dimension's first column."""
    columns = torch.full((*tensor.shape[:-1], count), fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([columns, tensor], dim=-1)


def prepend_prefix_columns(tensor: torch.Tensor, count: int, prefix_mask: torch.Tensor | None,
                           attend: float | bool, masked: float | bool) -> torch.Tensor:
    """Return the attention mask ``tensor`` with ``count`` prefix columns before its keys.

    Args:
        tensor: ``(batch or 1, ..., k_len)``, the mask of the real keys.
        count: The prefix length.
        prefix_mask: ``(batch, count)`` bool, True where a row attends to a prefix slot, or
            ``None`` when every row attends to every slot.
        attend: The mask value of an attended column in ``tensor``'s convention.
        masked: The mask value of a column that is not attended.

    Returns:
        ``(batch, ..., count + k_len)``, or ``tensor``'s batch size when ``prefix_mask`` is ``None``.
    """
    if prefix_mask is None:
        return prepend_columns(tensor, count, attend)
    batch = prefix_mask.shape[0]
    shape = (max(batch, tensor.shape[0]), *tensor.shape[1:-1], count)
    attended = prefix_mask.to(tensor.device).view(batch, *([1] * (tensor.dim() - 2)), count).expand(shape)
    columns = torch.full(shape, masked, dtype=tensor.dtype, device=tensor.device).masked_fill(attended, attend)
    return torch.cat([columns, tensor.expand(*shape[:-1], tensor.shape[-1])], dim=-1)


# -- hook patches for attention modules outside the interface --------------------------------------

class _ForwardArguments:
    """Reads and replaces the arguments of a module's forward call by parameter name.

    Callers pass an argument by position or by keyword, and transformers versions order the
    parameters differently: MPNet's ``position_bias`` is the third parameter in 5.x and the fourth
    in 4.57. So the positions are read once from the signature of the module's forward.
    """

    def __init__(self, module: nn.Module):
        # The signature of the class's function starts with self, which callers do not pass.
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positions = {parameter.name: index for index, parameter in enumerate(parameters)
                          if parameter.kind in positional}

    def get(self, args: Sequence, kwargs: dict, name: str):
        index = self.positions.get(name)
        if index is not None and index < len(args):
            return args[index]
        return kwargs.get(name)

    def set(self, args: list, kwargs: dict, name: str, value) -> None:
        index = self.positions.get(name)
        if index is not None and index < len(args):
            args[index] = value
        else:
            kwargs[name] = value


class _HookPatch:
    """Hooks on one attention module that computes the scores itself. Per-forward state is thread-local."""

    # Whether the patch computes prefixes with position_bias="concatenated". Patches of modules
    # without a relative position bias compute the same in both modes.
    supports_concatenated_bias = True
    # The same for position_bias="shifted".
    supports_shifted_bias = True
    # Whether the patch masks prefix slots per row (``CollectedPrefix.mask``), which per-row routing
    # needs for prefixes of different lengths. The transformers 4.x patches do not.
    supports_row_mask = False

    def __init__(self, module: nn.Module):
        self.module = module
        self._arguments = _ForwardArguments(module)
        self._state = threading.local()
        self._handles = []

    def remove(self) -> None:
        """Remove the hooks and any method override from the module."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._state = threading.local()

    def _begin(self, module: nn.Module, query: torch.Tensor) -> CollectedPrefix | None:
        """Collect the prefix and store its rows, ``(batch, length, heads * head_dim)``, for the projection hooks.

        Raises:
            NotImplementedError: If the prefix requests ``position_bias="concatenated"`` or
                ``"shifted"`` and the patch does not support it.
        """
        self._state.length = 0
        self._state.key_rows = None
        self._state.value_rows = None
        self._state.position_bias = "zero"
        self._state.row_mask = None
        prefix = collect_prefix(module, query, query, query)
        if prefix is None:
            return None
        prefix_key, prefix_value, mode = prefix.key, prefix.value, prefix.position_bias
        if mode == "concatenated" and not self.supports_concatenated_bias:
            raise NotImplementedError(_concatenated_bias_message(module))
        if mode == "shifted" and not self.supports_shifted_bias:
            raise NotImplementedError(_concatenated_bias_message(module, mode))
        if prefix.mask is not None and not self.supports_row_mask:
            raise NotImplementedError(
                f"prefix attention cannot mask prefix slots per row for {type(module).__name__} "
                f"({type(module).__module__}) on transformers {transformers.__version__}, which per-row routing "
                "needs when rows get prefixes of different lengths or none. Route rows to prefix adapters of one "
                "prefix length, give every row an adapter, or upgrade transformers to 5")
        self._state.row_mask = prefix.mask
        self._state.position_bias = mode
        batch, _, length, _ = prefix_key.shape
        self._state.length = length
        self._state.key_rows = prefix_key.transpose(1, 2).reshape(batch, length, -1)
        self._state.value_rows = prefix_value.transpose(1, 2).reshape(batch, length, -1)
        return prefix

    def _take(self, name: str) -> torch.Tensor | None:
        rows = getattr(self._state, name, None)
        setattr(self._state, name, None)
        return rows

    # Projection hooks. The "replace" pair overwrites the zero rows that a pre-hook put before the
    # projection's input, and the "prepend" pair adds rows before the projection's output. Each takes
    # the rows once per forward, so a second call of the same projection passes through.

    def _replace_key_rows(self, linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        rows = self._take("key_rows")
        return None if rows is None else torch.cat([rows, output[:, rows.shape[1]:]], dim=1)

    def _replace_value_rows(self, linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        rows = self._take("value_rows")
        return None if rows is None else torch.cat([rows, output[:, rows.shape[1]:]], dim=1)

    def _prepend_key_rows(self, linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        rows = self._take("key_rows")
        return None if rows is None else torch.cat([rows, output], dim=1)

    def _prepend_value_rows(self, linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        rows = self._take("value_rows")
        return None if rows is None else torch.cat([rows, output], dim=1)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_state"] = None  # thread-local storage cannot be pickled or copied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._state = threading.local()


class _MPNetPatch(_HookPatch):
    """Prefix attention for ``MPNetSelfAttention`` (transformers 4.57 and 5) through hooks.

    MPNet in transformers 5 reshapes its keys with the query's sequence length, so the key projection
    cannot return more rows than the input has. The pre-hook therefore puts ``length`` zero rows
    before the hidden states, and rows and columns of 0 before the mask and the relative position
    bias, so the prefix columns are attended without bias. The key/value projection hooks replace
    those rows with the prefix, and the output hook drops the extra query rows. The real query rows
    get exactly ``softmax(q [P_k; K]^T / sqrt(d) + [0, bias] + [0, mask]) [P_v; V]``.

    NOTE: the padded rows cost ``length`` extra query rows, and a source that reads the query's values
    makes the pre-hook run the query projection once more (``source_query``).
    """

    supports_concatenated_bias = False
    supports_shifted_bias = False
    supports_row_mask = True

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after),
            module.k.register_forward_hook(self._replace_key_rows),
            module.v.register_forward_hook(self._replace_value_rows),
        ]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden_states = self._arguments.get(args, kwargs, "hidden_states")
        batch, length, _ = hidden_states.shape
        query = source_query(module, module.q, hidden_states, module.num_attention_heads)
        if self._begin(module, query) is None:
            return None
        count = self._state.length
        args, kwargs = list(args), dict(kwargs)
        hidden_states = torch.cat([hidden_states.new_zeros(batch, count, hidden_states.shape[-1]), hidden_states], 1)
        self._arguments.set(args, kwargs, "hidden_states", hidden_states)
        for name in ("attention_mask", "position_bias"):
            tensor = self._arguments.get(args, kwargs, name)
            if tensor is not None:
                fill = True if tensor.dtype == torch.bool else 0.0
                row_mask = self._state.row_mask if name == "attention_mask" else None
                self._arguments.set(args, kwargs, name,
                                    _prepend_rows_and_columns(tensor, count, length, fill, row_mask))
        return tuple(args), kwargs

    def _after(self, module: nn.Module, args: tuple, output: tuple) -> tuple | None:
        count = getattr(self._state, "length", 0)
        self._state.length = 0
        if not count:
            return None
        # output is (attention output (batch, rows, hidden),) plus the probabilities
        # (batch, heads, rows, columns) when output_attentions is set.
        trimmed = (output[0][:, count:],)
        if len(output) > 1:
            trimmed += (output[1][:, :, count:],) + tuple(output[2:])
        return trimmed


class _DebertaV2Patch(_HookPatch):
    """Prefix attention for DeBERTa-v2's ``DisentangledSelfAttention`` (transformers 4.57 and 5) through hooks.

    The key/value projection hooks put the prefix rows before the projected keys and values, and the
    pre-hook prepends attended columns to the mask. An instance attribute overrides
    ``disentangled_attention_bias``, so the relative-position terms are computed on the real keys
    only and are zero for the prefix columns. The content score of a prefix column is
    ``q . p_k / sqrt(d * scale_factor)``, scaled like every content score of that module.

    NOTE: a source that reads the query's values makes the pre-hook run the query projection once more
    (``source_query``). adapterkit's own prefix sites read only its shape.
    """

    supports_concatenated_bias = False
    supports_shifted_bias = False
    supports_row_mask = True

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after),
            # With share_att_key the bias computation calls key_proj again on the relative
            # embeddings, and that second call passes through because the rows are taken once.
            module.key_proj.register_forward_hook(self._prepend_key_rows),
            module.value_proj.register_forward_hook(self._prepend_value_rows),
        ]
        module.disentangled_attention_bias = self._relative_attention_bias

    def remove(self) -> None:
        self.module.__dict__.pop("disentangled_attention_bias", None)
        super().remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden_states = self._arguments.get(args, kwargs, "hidden_states")
        query_states = self._arguments.get(args, kwargs, "query_states")
        query_input = hidden_states if query_states is None else query_states
        query = source_query(module, module.query_proj, query_input, module.num_attention_heads)
        if self._begin(module, query) is None:
            return None
        args, kwargs = list(args), dict(kwargs)
        mask = self._arguments.get(args, kwargs, "attention_mask")
        # DeBERTa-v2 attends where mask.bool() is True, so 1 marks the prefix columns as attended.
        self._arguments.set(args, kwargs, "attention_mask",
                            prepend_prefix_columns(mask, self._state.length, self._state.row_mask, 1, 0))
        return tuple(args), kwargs

    def _relative_attention_bias(self, query_layer: torch.Tensor, key_layer: torch.Tensor, relative_pos,
                                 rel_embeddings: torch.Tensor, scale_factor: int):
        count = getattr(self._state, "length", 0)
        if count:
            key_layer = key_layer[:, count:]
        method = type(self.module).disentangled_attention_bias
        score = method(self.module, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor)
        if count and isinstance(score, torch.Tensor):
            score = F.pad(score, (count, 0))
        return score

    def _after(self, module: nn.Module, args: tuple, output: tuple) -> None:
        self._state.length = 0


class _DistilBertPatch(_HookPatch):
    """Prefix attention for DistilBERT's ``MultiHeadSelfAttention`` and SDPA subclass (transformers 4.x) through hooks.

    The eager forward reshapes the mask with the length of its ``key`` input. So the pre-hook puts
    ``length`` zero rows before the ``key`` and ``value`` inputs and attended columns before the
    mask, and the key/value projection hooks replace those rows with the prefix. The ``query``
    input keeps its length, so the output keeps its shape.

    NOTE: a source that reads the query's values makes the pre-hook run the query projection once more
    (``source_query``). adapterkit's own prefix sites read only its shape.
    """

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after),
            module.k_lin.register_forward_hook(self._replace_key_rows),
            module.v_lin.register_forward_hook(self._replace_value_rows),
        ]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        query_input = self._arguments.get(args, kwargs, "query")
        batch, length, _ = query_input.shape
        query = source_query(module, module.q_lin, query_input, module.n_heads)
        if self._begin(module, query) is None:
            return None
        count = self._state.length
        args, kwargs = list(args), dict(kwargs)
        for name in ("key", "value"):
            states = self._arguments.get(args, kwargs, name)
            padded = torch.cat([states.new_zeros(states.shape[0], count, states.shape[-1]), states], dim=1)
            self._arguments.set(args, kwargs, name, padded)
        mask = self._arguments.get(args, kwargs, "mask")
        if mask is not None:
            # The eager forward takes a (batch, k_len) mask with 1 on real tokens, and the SDPA one a
            # 4-D additive or boolean mask.
            if mask.dtype == torch.bool:
                fill = True
            elif mask.dim() == 2:
                fill = 1
            else:
                fill = 0.0
            self._arguments.set(args, kwargs, "mask", prepend_columns(mask, count, fill))
        return tuple(args), kwargs

    def _after(self, module: nn.Module, args: tuple, output: tuple) -> None:
        self._state.length = 0


class _CachedAttentionPatch(_HookPatch):
    """Base of the hook patches for transformers 4.x attention modules that may read and update a KV cache.

    These modules (BERT-style self-attention and T5Attention) view their keys and values with ``-1``
    as the sequence length. Without a cache, the key/value projection hooks put the prefix rows before
    the projected rows. With a cache, the projections' outputs go to the cache unchanged, and for the
    duration of the forward:

    - an instance attribute ``update`` shadows the cache's method and returns the prefix before the
      keys and values that the cache returns;
    - when cross-attention reads its stored keys without calling ``update``, the entry of
      ``cache.layers`` that it reads is swapped for one that contains the prefixed tensors.

    The forward hook undoes both, also when the forward raises, so the cache never stores the prefix.
    Subclasses name the projections and the cross-attention input, and extend the mask.
    """

    query_projection = ""
    key_projection = ""
    value_projection = ""
    cross_attention_input = ""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after, always_call=True),
            getattr(module, self.key_projection).register_forward_hook(self._prepend_key_rows),
            getattr(module, self.value_projection).register_forward_hook(self._prepend_value_rows),
        ]

    def _query(self, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Return the query ``(batch, heads, q_len, head_dim)`` for the source (``source_query``) from ``hidden_states``."""
        raise NotImplementedError

    def _extend_arguments(self, module: nn.Module, args: list, kwargs: dict, query: torch.Tensor,
                          is_cross_attention: bool, layer_cache) -> None:
        """Prepend the attended prefix columns to the mask (and bias) arguments, in place."""
        raise NotImplementedError

    def _trim_output(self, output: tuple, count: int) -> tuple | None:
        """Return the module's output without what the prefix added to it, or ``None`` to keep it."""
        return None

    def _arguments_without_prefix(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Return changed arguments for a forward without a prefix, or ``None`` to keep them."""
        return None

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._undo_cache_changes()
        query = self._query(module, self._arguments.get(args, kwargs, "hidden_states"))
        prefix = self._begin(module, query)
        if prefix is None:
            return self._arguments_without_prefix(module, args, kwargs)
        args, kwargs = list(args), dict(kwargs)
        is_cross_attention = self._arguments.get(args, kwargs, self.cross_attention_input) is not None
        cache = self._arguments.get(args, kwargs, "past_key_values")
        if cache is None:
            # Transformers 4.57 still accepts the deprecated name and renames it inside the forward.
            cache = kwargs.get("past_key_value")
        layer_cache = None
        if cache is not None:
            self._state.key_rows = None
            self._state.value_rows = None
            layer_cache = self._route_through_cache(module, cache, is_cross_attention, prefix)
        self._extend_arguments(module, args, kwargs, query, is_cross_attention, layer_cache)
        return tuple(args), kwargs

    def _route_through_cache(self, module: nn.Module, cache, is_cross_attention: bool, prefix: CollectedPrefix):
        """Make the keys and values that the module reads from ``cache`` start with ``prefix``.

        Returns:
            The cache of the module's layer kind: the self-attention or cross-attention part of an
            ``EncoderDecoderCache``, or ``cache`` itself.
        """
        prefix_key, prefix_value = prefix.key, prefix.value
        index = module.layer_idx
        # The same choice of cache and of the read-only path as the modules' forward.
        layer_cache, reuses_stored = cache, False
        if isinstance(cache, EncoderDecoderCache):
            layer_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
            reuses_stored = is_cross_attention and bool(cache.is_updated.get(index))
        if reuses_stored:
            layers = layer_cache.layers
            stored = layers[index]
            layers[index] = _PrefixedCacheLayer(torch.cat([prefix_key, stored.keys], dim=2),
                                                torch.cat([prefix_value, stored.values], dim=2))
            self._state.undo = lambda: layers.__setitem__(index, stored)
            return layer_cache
        class_update = type(layer_cache).update

        def update(key_states, value_states, layer_idx, cache_kwargs=None):
            keys, values = class_update(layer_cache, key_states, value_states, layer_idx, cache_kwargs)
            return torch.cat([prefix_key, keys], dim=2), torch.cat([prefix_value, values], dim=2)

        layer_cache.update = update
        self._state.undo = lambda: layer_cache.__dict__.pop("update", None)
        return layer_cache

    def _undo_cache_changes(self) -> None:
        undo = getattr(self._state, "undo", None)
        self._state.undo = None
        if undo is not None:
            undo()

    def _after(self, module: nn.Module, args: tuple, output) -> tuple | None:
        # Registered with always_call=True, so it also runs (with output None) when the forward raises.
        count = getattr(self._state, "length", 0)
        self._undo_cache_changes()
        self._state.length = 0
        self._state.key_rows = None
        self._state.value_rows = None
        if not count or output is None:
            return None
        return self._trim_output(output, count)


class _PrefixedCacheLayer:
    """A stand-in for a cache layer: its ``keys`` and ``values`` with the prefix before them.

    Both are ``(batch, heads, prefix + k_len, head_dim)``.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys = keys
        self.values = values


class _BertPatch(_CachedAttentionPatch):
    """Prefix attention for BERT-style self-attention in transformers 4.x through hooks.

    Covers ``BertSelfAttention``, ``BertSdpaSelfAttention`` and their RoBERTa and ELECTRA copies. The
    mask gets attended columns for the prefix. The SDPA class applies SDPA's top-left ``is_causal``
    when a decoder passes no mask, so in that case the pre-hook passes that pattern as an explicit
    mask with the prefix columns before it.

    In training on the CPU with attention dropout, the SDPA class's self-attention without a cache
    runs ``_forward`` in place of the class's forward when a prefix is active: the same projections,
    and ``cpu_dropout_attention`` in place of SDPA. Every other call runs the class's forward.

    NOTE: a source that reads the query's values makes the pre-hook run the query projection once more
    (``source_query``). adapterkit's own prefix sites read only its shape.
    """

    query_projection = "query"
    key_projection = "key"
    value_projection = "value"
    cross_attention_input = "encoder_hidden_states"

    def __init__(self, module: nn.Module):
        super().__init__(module)
        # A forward set on the instance before (accelerate's device hooks set one) is kept, and the
        # module runs SDPA as without the override.
        if type(module).__name__.endswith("SdpaSelfAttention") and "forward" not in module.__dict__:
            module.forward = self._forward

    def remove(self) -> None:
        if getattr(self.module.__dict__.get("forward"), "__self__", None) is self:
            del self.module.__dict__["forward"]
        super().remove()

    def _forward(self, *args, **kwargs):
        module = self.module
        hidden_states = self._arguments.get(args, kwargs, "hidden_states")
        mask = self._arguments.get(args, kwargs, "attention_mask")
        if not self._takes_own_path(args, kwargs, hidden_states, mask):
            return type(module).forward(module, *args, **kwargs)
        batch, length, _ = hidden_states.shape
        shape = (batch, -1, module.num_attention_heads, module.attention_head_size)
        query = module.query(hidden_states).view(shape).transpose(1, 2)
        # The projection hooks put the prefix rows before the keys and values.
        key = module.key(hidden_states).view(shape).transpose(1, 2)
        value = module.value(hidden_states).view(shape).transpose(1, 2)
        output = cpu_dropout_attention(query, key, value, mask, module.dropout_prob)
        return output.transpose(1, 2).reshape(batch, length, module.all_head_size), None

    def _takes_own_path(self, args: tuple, kwargs: dict, hidden_states: torch.Tensor,
                        mask: torch.Tensor | None) -> bool:
        """Return whether ``_forward`` computes this call itself instead of running the class's forward."""
        module = self.module
        # The pre-hook has run: it set the prefix length and gave a decoder's causal pattern as a mask.
        if not getattr(self._state, "length", 0) or not module.training:
            return False
        if not takes_cpu_dropout_path(hidden_states, module.dropout_prob):
            return False
        if mask is None and module.is_decoder and hidden_states.shape[1] > 1:
            return False
        if self._arguments.get(args, kwargs, "output_attentions") or kwargs.get("past_key_value") is not None:
            return False
        others = ("head_mask", "encoder_hidden_states", "past_key_values")
        return all(self._arguments.get(args, kwargs, name) is None for name in others)

    def _query(self, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return source_query(module, module.query, hidden_states, module.num_attention_heads)

    def _extend_arguments(self, module: nn.Module, args: list, kwargs: dict, query: torch.Tensor,
                          is_cross_attention: bool, layer_cache) -> None:
        mask = self._arguments.get(args, kwargs, "attention_mask")
        q_len = query.shape[2]
        # BertSdpaSelfAttention runs eager code with output_attentions or a head_mask. Otherwise it calls SDPA
        # with is_causal=True when a decoder's self-attention gets no mask and more than one query.
        runs_sdpa = (type(module).__name__.endswith("SdpaSelfAttention")
                     and not self._arguments.get(args, kwargs, "output_attentions")
                     and self._arguments.get(args, kwargs, "head_mask") is None)
        if mask is None and runs_sdpa and module.is_decoder and not is_cross_attention and q_len > 1:
            past_length = 0 if layer_cache is None else layer_cache.get_seq_length(module.layer_idx)
            mask = _top_left_causal_mask(q_len, past_length + q_len, query.device)
        if mask is not None:
            fill = True if mask.dtype == torch.bool else 0.0
            self._arguments.set(args, kwargs, "attention_mask", prepend_columns(mask, self._state.length, fill))


class _T5Patch(_CachedAttentionPatch):
    """Prefix attention for ``T5Attention`` in transformers 4.x through hooks.

    The module adds one tensor to its scores: ``position_bias``, which it computes in its first layer
    as relative bias plus mask and returns for the next layers to reuse. The pre-hook prepends zero
    columns to the mask. An instance attribute overrides ``compute_bias``.

    With ``position_bias="zero"`` prefixes, the pre-hook prepends zero columns to a given
    ``position_bias``, and ``compute_bias`` computes the relative bias on the real key length only
    and gives the prefix columns zero bias. The forward hook drops the prefix columns from the
    returned bias, so the next layers get the same bias as without a prefix.

    With ``position_bias="concatenated"`` prefixes, ``compute_bias`` runs over the whole key length,
    prefix included, and the module returns that bias for the next layers, as ``adapters`` 1.3.0
    does. A given bias whose width is not the key length plus this layer's prefix length is dropped,
    so the module computes it again, which gives zero relative bias in every layer but the first.
    A layer without a prefix does the same with a bias that is wider than its keys.

    NOTE: a source that reads the query's values makes the pre-hook run the query projection once more
    (``source_query``). adapterkit's own prefix sites read only its shape.
    """

    query_projection = "q"
    key_projection = "k"
    value_projection = "v"
    cross_attention_input = "key_value_states"
    # NOTE: position_bias="shifted" is implemented on transformers >= 5 only (_T5BiasPatch).
    supports_shifted_bias = False

    def __init__(self, module: nn.Module):
        super().__init__(module)
        module.compute_bias = self._compute_bias

    def remove(self) -> None:
        self.module.__dict__.pop("compute_bias", None)
        super().remove()

    def _query(self, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return source_query(module, module.q, hidden_states, module.n_heads)

    def _extend_arguments(self, module: nn.Module, args: list, kwargs: dict, query: torch.Tensor,
                          is_cross_attention: bool, layer_cache) -> None:
        count = self._state.length
        mask = self._arguments.get(args, kwargs, "mask")
        # The 4.57 stacks always pass a mask as wide as the keys (past keys included).
        real_length = None if mask is None else mask.shape[-1]
        if mask is not None:
            fill = True if mask.dtype == torch.bool else 0.0
            self._arguments.set(args, kwargs, "mask", prepend_columns(mask, count, fill))
        bias = self._arguments.get(args, kwargs, "position_bias")
        if bias is None:
            return
        if self._state.position_bias == "concatenated":
            # NOTE: without a mask the key length is unknown here, and a given bias is kept as it is.
            if real_length is not None and bias.shape[-1] != real_length + count:
                self._arguments.set(args, kwargs, "position_bias", None)
        elif real_length is None or bias.shape[-1] == real_length:
            fill = True if bias.dtype == torch.bool else 0.0
            self._arguments.set(args, kwargs, "position_bias", prepend_columns(bias, count, fill))
        else:
            self._arguments.set(args, kwargs, "position_bias", None)

    def _arguments_without_prefix(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bias = self._arguments.get(args, kwargs, "position_bias")
        mask = self._arguments.get(args, kwargs, "mask")
        if bias is None or mask is None or bias.shape[-1] == mask.shape[-1]:
            return None
        # An earlier layer returned a bias that covers a concatenated prefix, and this layer has none.
        args, kwargs = list(args), dict(kwargs)
        self._arguments.set(args, kwargs, "position_bias", None)
        return tuple(args), kwargs

    def _compute_bias(self, query_length: int, key_length: int, device=None, cache_position=None) -> torch.Tensor:
        count = getattr(self._state, "length", 0)
        method = type(self.module).compute_bias
        if getattr(self._state, "position_bias", "zero") == "concatenated":
            return method(self.module, query_length, key_length, device=device, cache_position=cache_position)
        bias = method(self.module, query_length, key_length - count, device=device, cache_position=cache_position)
        return F.pad(bias, (count, 0)) if count else bias

    def _trim_output(self, output: tuple, count: int) -> tuple | None:
        if self._state.position_bias == "concatenated":
            return None
        # output is (attention output, position bias (batch or 1, heads, q_len, prefix + k_len)) plus the
        # probabilities when output_attentions is set.
        return (output[0], output[1][..., count:]) + tuple(output[2:])


class _T5BiasPatch(_HookPatch):
    """T5's relative position bias for ``T5Attention`` modules that call the ``AttentionInterface`` (transformers 5).

    ``PrefixAttentionFunction`` adds the prefix keys and values and calls ``resolve`` for the bias.
    An instance attribute overrides ``compute_bias`` to record its arguments, so ``resolve`` can
    compute the bias again over the key length plus the prefix length. A forward hook returns the
    bias that ``resolve`` chose to share in place of the module's own, so the next layers reuse it.
    Without ``position_bias="concatenated"`` or ``"shifted"`` prefixes in the stack, the module
    returns its own bias, as without the patch.

    A bias shared in ``"shifted"`` mode carries the attribute ``adapterkit_shifted_prefix_columns``,
    the number of prefix columns before its real-key columns, so later layers can cut it to their
    own prefix length.
    """

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after, always_call=True),
        ]
        module.compute_bias = self._compute_bias

    def remove(self) -> None:
        self.module.__dict__.pop("compute_bias", None)
        super().remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._state.bias_call = None
        self._state.shared = None
        self._state.bias_given = self._arguments.get(args, kwargs, "position_bias") is not None

    def _compute_bias(self, *args, **kwargs) -> torch.Tensor:
        # T5Attention.forward calls compute_bias(query_length, key_length, device=..., <past length>=...).
        self._state.bias_call = (args, kwargs)
        return type(self.module).compute_bias(self.module, *args, **kwargs)

    def resolve(self, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor, length: int,
                mode: str) -> torch.Tensor:
        """Return the position bias of this attention call, ``(1, heads, q_len, length + k_len)``.

        Args:
            query: ``(batch, heads, q_len, head_dim)``.
            key: The real keys ``(batch, heads, k_len, head_dim)``, without the prefix.
            bias: The bias the module passes: computed for ``k_len`` keys in the stack's first
                layer, else the one that the previous layer returned.
            length: The prefix length, 0 without a prefix.
            mode: The prefix's ``position_bias``, ``"zero"`` without a prefix.

        Raises:
            NotImplementedError: In ``"shifted"`` mode, if this layer's prefix is longer than the one
                that the stack's first layer computed the bias for.
        """
        real_length = key.shape[2]
        shifted_columns = getattr(bias, _SHIFTED_COLUMNS_ATTRIBUTE, None)
        if shifted_columns is not None:
            if mode == "shifted":
                return self._cut_shifted(bias, shifted_columns, length)
            # The last real_length columns are the real keys' bias, the same as without a prefix.
            bias = bias[..., shifted_columns:]
        elif mode == "shifted":
            return self._share_shifted(query, bias, real_length, length)
        width = bias.shape[-1]
        if mode == "concatenated" and width == real_length + length:
            # The previous layer shared a bias over a prefix of this length.
            return bias
        if mode != "concatenated" and width == real_length:
            return prepend_columns(bias, length, 0.0) if length else bias
        # As adapters 1.3.0 does when the bias does not fit the scores: the layer with the relative
        # attention bias computes it over all keys, prefix included, and every other layer uses zeros.
        call = getattr(self._state, "bias_call", None)
        if mode == "concatenated" and call is not None:
            args, kwargs = call
            if len(args) >= 2:
                args = (args[0], args[1] + length, *args[2:])
            else:
                kwargs = {**kwargs, "key_length": kwargs["key_length"] + length}
            shared = type(self.module).compute_bias(self.module, *args, **kwargs)
        else:
            shared = bias.new_zeros((1, bias.shape[1], query.shape[2], real_length + length))
        self._state.shared = shared
        return shared

    def _share_shifted(self, query: torch.Tensor, bias: torch.Tensor, real_length: int, length: int) -> torch.Tensor:
        """Compute the ``"shifted"`` bias ``(1, heads, q_len, length + k_len)`` and share it with the next layers.

        The module's own ``compute_bias`` call runs again with ``length`` more keys and the queries
        ``length`` positions later, as with a KV cache that contains the prefix.
        """
        call = getattr(self._state, "bias_call", None)
        if call is not None:
            shared = self._shifted_compute_bias(call, length)
        elif not getattr(self._state, "bias_given", True):
            # A layer without the relative bias embedding computes zeros, with a prefix cache as without.
            shared = bias.new_zeros((1, bias.shape[1], query.shape[2], real_length + length))
        else:
            raise NotImplementedError(self._shifted_length_message(0, length))
        setattr(shared, _SHIFTED_COLUMNS_ATTRIBUTE, length)
        self._state.shared = shared
        return shared

    def _cut_shifted(self, bias: torch.Tensor, shifted_columns: int, length: int) -> torch.Tensor:
        # Prefix column j of a prefix of `length` positions is at distance j - length - i from query i,
        # which is column j + shifted_columns - length of the shared bias.
        if length > shifted_columns:
            raise NotImplementedError(self._shifted_length_message(shifted_columns, length))
        return bias[..., shifted_columns - length:]

    def _shifted_length_message(self, shared_length: int, length: int) -> str:
        return (f"position_bias='shifted': layer {self.module.layer_idx} of this T5 stack has a prefix of {length} "
                f"positions, but the stack's first layer computed the relative bias for {shared_length} prefix "
                "positions, and only that layer has the relative bias embedding. Give the first block of each "
                "prefixed stack the longest prefix (do not list it in leave_out)")

    def _shifted_compute_bias(self, call: tuple[tuple, dict], length: int) -> torch.Tensor:
        """Run the recorded ``compute_bias`` call again with ``length`` more keys and queries ``length`` later."""
        method = type(self.module).compute_bias
        args, kwargs = call
        bound = inspect.signature(method).bind(self.module, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        arguments["key_length"] = arguments["key_length"] + length
        if "past_seen_tokens" in arguments:
            # transformers 5: the queries start at past_seen_tokens.
            arguments["past_seen_tokens"] = arguments["past_seen_tokens"] + length
        elif arguments.get("cache_position") is not None:
            arguments["cache_position"] = arguments["cache_position"] + length
        else:
            device = arguments.get("device") or self.module.relative_attention_bias.weight.device
            arguments["cache_position"] = torch.arange(arguments["query_length"], device=device) + length
        return method(*bound.args, **bound.kwargs)

    def _after(self, module: nn.Module, args: tuple, output) -> tuple | None:
        shared = getattr(self._state, "shared", None)
        self._state.shared = None
        self._state.bias_call = None
        if shared is None or output is None:
            return None
        # output is (attention output, position bias, attention weights or None).
        return (output[0], shared, *output[2:])


_SHIFTED_COLUMNS_ATTRIBUTE = "adapterkit_shifted_prefix_columns"

_PATCH_CLASSES = {"mpnet": _MPNetPatch, "deberta-v2": _DebertaV2Patch, "distilbert": _DistilBertPatch,
                  "bert": _BertPatch, "t5": _T5Patch}
# Patches of attention classes that call the AttentionInterface, by the same kinds.
_INTERFACE_PATCH_CLASSES = {"t5": _T5BiasPatch}


def _prepend_rows_and_columns(tensor: torch.Tensor, count: int, query_length: int, fill: float | bool,
                              row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prepend ``count`` columns of ``fill``, and ``count`` rows unless the row dimension is broadcast (size 1).

    With a ``(batch, count)`` ``row_mask``, the columns of the slots a row does not attend get the
    additive mask's minimum (or False) instead of ``fill``.
    """
    masked = False if tensor.dtype == torch.bool else torch.finfo(tensor.dtype).min
    tensor = prepend_prefix_columns(tensor, count, row_mask, fill, masked)
    if tensor.shape[-2] != query_length:
        return tensor
    rows = torch.full((*tensor.shape[:-2], count, tensor.shape[-1]), fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([rows, tensor], dim=-2)


# The wrappers of the implementations every model uses are registered on import, so a pickled model
# that was switched to them can run once this module is imported.
for _base in ("sdpa", "eager"):
    prefix_implementation(_base)
