"""Run adapter modules inside a live model through forward hooks.

The model's own ``forward`` runs unchanged. Each ``Site`` hooks one place that an architecture
description names and, at every forward, asks the registry which adapter modules run there:

- ``SublayerSite``: the output of a sublayer (attention, cross-attention or feed-forward) of one
  block, for bottleneck adapters in series and in parallel.
- ``LinearSite``: one linear projection, for LoRA (adds to its output) and (IA)^3 (rescales its
  output, or its input for the feed-forward output projection).
- ``PrefixSite``: one attention module, for prefix tuning, through ``prefix_attention``.
- ``EmbeddingSite`` and ``FinalSite``: the embedding output and the last hidden state, for
  invertible adapters and the adapter before the head.
- ``PromptSite``: the arguments of the model's forward (of the encoder's, in encoder-decoder
  models), for prompt tuning.

Nothing per forward is kept in module globals. What a hook captures during a forward (the residual
stream, the attention mask) is stored thread-locally on the site. The hooks sit on modules inside
the block, so gradient checkpointing runs them again when it recomputes the block, and the
recomputation reads the same values.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .architectures import InputRef, LinearRef, SublayerSpec, get_submodule
from .composition import FusePlan, Select, plan_pairs, row_pairs, run_plan
from .config import BottleneckConfig, IA3Config, LoRAConfig, MethodConfig
from .methods.prompt import (encoder_and_decoder, extend_cross_attention_mask, extend_inputs,
                             extend_routed_cross_attention_mask, extend_routed_inputs, has_token_labels,
                             input_embeddings, prompt_target, row_prompt_lengths)
from .prefix_attention import PrefixPair, set_prefix_source

# A site key, e.g. ("sublayer", 3, "feed_forward"), and the (config, module) pairs that run there.
SiteKey = tuple
Lookup = Callable[[SiteKey], Sequence[tuple[MethodConfig, Any]]]

_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")
# Names of the attention mask argument: T5's attention modules and DistilBERT's in transformers 4.57 take
# ``mask``, and DistilBERT's blocks in 4.57 take ``attn_mask``.
_MASK_KEYWORDS = ("attention_mask", "attn_mask", "mask")
_STATE_ATTRIBUTE = "_adapterkit_conv_state"


def first_tensor(output: Any) -> torch.Tensor:
    """Return the hidden states of a module output: the tensor itself or the first item of a tuple or model output."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def replace_first_tensor(output: Any, hidden: torch.Tensor) -> Any:
    """Return ``output`` with its hidden states (see ``first_tensor``) replaced by ``hidden``."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    key = next(iter(output.keys()))
    output[key] = hidden
    return output


def token_mask(attention_mask: torch.Tensor | None, length: int, causal: bool) -> torch.Tensor | None:
    """Return a ``(batch, length)`` bool mask of real tokens for the last ``length`` positions, or None.

    Blocks receive the 2-D padding mask or a 4-D ``(batch, 1, queries, keys)`` mask, boolean (True
    attends) or additive (0 attends). When the 4-D mask has one row per position, a position is a
    real token when its own query attends to its own key, because padding masks hide padded keys
    from every query. A single row, such as the last query's, would also drop the keys outside a
    sliding window. A mask with one broadcast row is read as it is.

    NOTE: with a broadcast row, a causal stack with right padding or an encoder with left padding
    gets a wrong mask here.
    """
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dim() == 2:
        mask = attention_mask.bool()
    elif attention_mask.dim() == 4:
        attends = attention_mask[:, 0]
        if attends.dtype != torch.bool:
            attends = attends > torch.finfo(attends.dtype).min / 2
        if attends.shape[-2] == length and attends.shape[-1] >= length:
            # The queries are the last ``length`` keys, so each query's own key lies on this diagonal.
            return attends[:, :, -length:].diagonal(dim1=-2, dim2=-1)
        mask = attends[:, -1 if causal else 0, :]
    else:
        return None
    if mask.shape[-1] < length:
        return None
    return mask[:, -length:]


def conv_state_for(cache: Any, owner: nn.Module) -> dict | None:
    """Return the per-generation convolution state of ``owner`` kept on the KV ``cache`` object, or None.

    The state lives on the cache because the cache is what a generation passes from step to step.
    Beam search reorders the cache with ``reorder_cache``. The first time a cache gets a state, its
    ``reorder_cache`` is wrapped so that the convolution states follow the same beams.
    """
    if cache is None:
        return None
    states = getattr(cache, _STATE_ATTRIBUTE, None)
    if states is None:
        states = {}
        try:
            setattr(cache, _STATE_ATTRIBUTE, states)
        except AttributeError:
            return None
        reorder = getattr(cache, "reorder_cache", None)
        if reorder is not None:
            def reorder_with_states(beam_idx: torch.LongTensor, *args: Any, **kwargs: Any) -> Any:
                _select_rows(states, beam_idx)
                return reorder(beam_idx, *args, **kwargs)

            cache.reorder_cache = reorder_with_states
    return states.setdefault(id(owner), {})


def _select_rows(state: dict, beam_idx: torch.LongTensor) -> None:
    """Select batch rows ``beam_idx`` of every tensor in ``state``, in place, at any depth of nested dicts.

    The states nest: one dict per adapter, inside it one per projection (``"down"``, ``"up"``).
    """
    for key, value in state.items():
        if isinstance(value, dict):
            _select_rows(value, beam_idx)
        elif isinstance(value, torch.Tensor):
            state[key] = value.index_select(0, beam_idx.to(value.device))


def positional_names(module: nn.Module) -> tuple[str, ...]:
    """Return the names of the parameters of ``module.forward`` that can be passed by position, in order."""
    parameters = inspect.signature(module.forward).parameters.values()
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _input_of(args: tuple, kwargs: dict, reference: InputRef) -> Any:
    if len(args) > reference.position:
        return args[reference.position]
    return kwargs.get(reference.keyword)


def _weak(value: Any) -> Any:
    """Return a weak reference to ``value`` where Python allows one, else ``value`` itself.

    Sites keep what a block was called with until the block's output arrives. A generation cache
    held strongly would stay in memory after ``generate`` returns, until the next forward.
    """
    if value is None:
        return None
    try:
        return weakref.ref(value)
    except TypeError:  # tuples and tensors of legacy caches
        return value


def _strong(value: Any) -> Any:
    """Undo ``_weak``: return the object a weak reference points to, or ``value`` itself."""
    return value() if isinstance(value, weakref.ref) else value


class Site:
    """Base of the hooks at one place; subclasses register their hooks in ``__init__``."""

    def __init__(self, key: SiteKey, lookup: Lookup):
        self.key = key
        self.lookup = lookup
        self._handles: list[Any] = []
        self._captured = threading.local()

    def remove(self) -> None:
        """Remove every hook of this site from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = threading.local()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_captured"] = None  # thread-local storage cannot be pickled or copied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._captured = threading.local()


class SublayerSite(Site):
    """Bottleneck adapters at the output of one sublayer of one block.

    Args:
        key: ``("sublayer", block_index, sublayer_name)``.
        block: The block module.
        spec: Where the sublayer's output, residual input and layer norm are inside ``block``.
        causal: Whether the block's stack is causal (decides how padding masks are read).
        lookup: Called at every forward to get the adapters that run here.
        family: Model family, for error messages.
        mask_source: The module whose inputs carry the attention mask and KV cache: the block's
            self-attention module, or the block itself when the description names none.
    """

    def __init__(self, key: SiteKey, block: nn.Module, spec: SublayerSpec, causal: bool, lookup: Lookup,
                 family: str = "", mask_source: nn.Module | None = None):
        super().__init__(key, lookup)
        self.causal = causal
        self.output_module = get_submodule(block, spec.output, family=family)
        self.residual_module = get_submodule(block, spec.residual.module, family=family)
        self.layer_norm = get_submodule(block, spec.layer_norm, family=family) if spec.layer_norm else None
        self.residual_input = spec.residual
        # transformers 5 checkpoints a block by calling its forward directly, so hooks on the block
        # itself do not run again during recomputation. Hooks on modules inside the block do.
        mask_source = block if mask_source is None else mask_source
        # GPT-2, T5 and BART pass the attention mask and cache by position.
        self._block_arguments = positional_names(mask_source)
        self._handles = [
            mask_source.register_forward_pre_hook(self._capture_block_inputs, with_kwargs=True),
            self.residual_module.register_forward_pre_hook(self._capture_residual, with_kwargs=True),
            self.output_module.register_forward_hook(self._replace_output),
        ]

    def _capture_block_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = {**dict(zip(self._block_arguments, args)), **kwargs}
        self._captured.attention_mask = next((inputs[k] for k in _MASK_KEYWORDS if inputs.get(k) is not None), None)
        self._captured.cache = _weak(next((inputs[k] for k in _CACHE_KEYWORDS if inputs.get(k) is not None), None))

    def _capture_residual(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._captured.residual = _input_of(args, kwargs, self.residual_input)

    def _replace_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        residual_stream = getattr(self._captured, "residual", None)
        self._captured.residual = None  # do not keep the activation alive past this forward
        plan = self.lookup(self.key)
        if not plan:
            return None
        # A list of pairs runs as a stack; a composition plan (see ``composition``) mixes or splits rows.
        adapters = plan_pairs(plan)
        needs_residual = any(config.parallel or config.original_ln_before for config, _ in adapters)
        if needs_residual and residual_stream is None:
            raise RuntimeError(
                f"adapterkit found no residual input for the {self.key[2]} sublayer of block {self.key[1]}: "
                "the module the architecture description names for it did not run before the sublayer "
                "output. Check the description's residual entry."
            )
        hidden = first_tensor(output)
        mask = cache = None
        if any(config.projection == "conv" for config, _ in adapters):
            mask = token_mask(getattr(self._captured, "attention_mask", None), hidden.shape[1], self.causal)
            cache = _strong(getattr(self._captured, "cache", None))

        def apply(pairs: list, part_hidden: torch.Tensor, select: Select) -> torch.Tensor:
            part_residual, part_mask = select(residual_stream), select(mask)
            for config, adapter in pairs:
                # NOTE: a convolution state kept across generation steps assumes the same rows reach
                # this adapter at every step, which beam reordering under row routing breaks.
                state = conv_state_for(cache, adapter) if config.projection == "conv" else None
                part_hidden = apply_bottleneck(config, adapter, part_hidden, part_residual, self.layer_norm,
                                               part_mask, state)
            return part_hidden

        def fusion_inputs(fusion: FusePlan, part_hidden: torch.Tensor, select: Select) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
            config = fusion.last[0]
            adapter_input, residual = bottleneck_inputs(config, part_hidden, select(residual_stream), self.layer_norm)
            # adapters 1.3.0 reads the query before the block's layer norm only for series adapters.
            query = part_hidden if fusion.layer.config.query_before_ln and not config.parallel else adapter_input
            return query, residual

        return replace_first_tensor(output, run_plan(plan, hidden, apply, fusion_inputs=fusion_inputs))


def apply_bottleneck(config: BottleneckConfig, adapter: nn.Module, sublayer_output: torch.Tensor,
                     residual_stream: torch.Tensor | None, layer_norm: nn.Module | None,
                     mask: torch.Tensor | None = None, state: dict | None = None) -> torch.Tensor:
    """Return the new sublayer output with one bottleneck adapter applied.

    The block adds ``residual_stream`` to the value returned here and, in post-norm blocks, applies
    ``layer_norm`` afterwards, exactly as it does without adapters.

    Args:
        config: The adapter's configuration.
        adapter: The ``Bottleneck`` module at this site.
        sublayer_output: ``(batch, seq_len, hidden)``, the sublayer output before the residual add.
        residual_stream: ``(batch, seq_len, hidden)``, what the block adds to the sublayer output.
        layer_norm: The block's own norm over ``output + residual``, or ``None`` in pre-norm blocks.
        mask: ``(batch, seq_len)`` bool, True for real tokens, for convolutional projections.
        state: Convolution state carried between generation steps, or None.
    """
    adapter_input, residual = bottleneck_inputs(config, sublayer_output, residual_stream, layer_norm)
    return adapter(adapter_input, residual, mask=mask, state=state)


def bottleneck_inputs(config: BottleneckConfig, sublayer_output: torch.Tensor, residual_stream: torch.Tensor | None,
                      layer_norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(adapter input, residual)`` of a bottleneck adapter: what it reads and what it adds to.

    A parallel adapter reads the residual stream and adds to the sublayer output. A series adapter
    reads the sublayer output, or with ``original_ln_before`` the block's norm of output plus
    residual stream, and adds to the sublayer output (``residual_before_ln``) or to its own input.
    All tensors are ``(batch, seq_len, hidden)``; see ``apply_bottleneck`` for the arguments.
    """
    if config.parallel:
        return residual_stream, sublayer_output
    adapter_input = sublayer_output
    if config.original_ln_before:
        adapter_input = adapter_input + residual_stream
        if layer_norm is not None:
            adapter_input = layer_norm(adapter_input)
    residual = sublayer_output if config.residual_before_ln else adapter_input
    return adapter_input, residual


class LinearSite(Site):
    """LoRA and (IA)^3 on one linear projection, or on one slice of a fused projection's output.

    Args:
        key: ``("linear", block_index, role, index)``.
        layer: The ``nn.Linear`` (or transformers ``Conv1D``) module.
        reference: Which slice of the output belongs to the role.
        scale_input: Whether (IA)^3 rescales this projection's input instead of its output: True
            for ``ff_out`` projections, where each (IA)^3 config's ``ff_out_side`` then decides.
        lookup: Called at every forward to get the adapters that run here.
    """

    def __init__(self, key: SiteKey, layer: nn.Module, reference: LinearRef, scale_input: bool, lookup: Lookup):
        super().__init__(key, lookup)
        self.layer = layer
        self.reference = reference
        self.scale_input = scale_input
        # LoRA and (IA)^3 change the projection's own output, so they run before any other hook on the
        # layer: a bottleneck adapter whose sublayer ends in this layer, or DeBERTa-v2's prefix hook,
        # which lengthens the key and value outputs.
        self._handles = [layer.register_forward_hook(self._add_to_output, prepend=True)]
        if scale_input:
            self._handles.append(layer.register_forward_pre_hook(self._scale_input))

    def _scales_input(self, config: MethodConfig) -> bool:
        return isinstance(config, IA3Config) and self.scale_input and config.ff_out_side == "input"

    def _changes_output(self, config: MethodConfig) -> bool:
        return isinstance(config, LoRAConfig) or (isinstance(config, IA3Config) and not self._scales_input(config))

    def _scale_input(self, module: nn.Module, args: tuple) -> tuple | None:
        plan = self.lookup(self.key)
        if not any(self._scales_input(config) for config, _ in plan_pairs(plan)):
            return None

        def apply(pairs: list, hidden: torch.Tensor, select: Select) -> torch.Tensor:
            for config, vector in pairs:
                if self._scales_input(config):
                    hidden = vector(hidden)
            return hidden

        # NOTE: under Average, the layer receives the average of the children's scaled inputs. That equals
        # the average of their outputs (the weights sum to 1), but a LoRA at this layer then reads the
        # averaged input instead of its own adapter's.
        return (run_plan(plan, args[0], apply), *args[1:])

    def _add_to_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        plan = self.lookup(self.key)
        if not any(self._changes_output(config) for config, _ in plan_pairs(plan)):
            return None
        parts = self.reference.parts
        width = output.shape[-1] // parts
        start = self.reference.part * width
        whole = parts == 1
        piece = output if whole else output[..., start:start + width]
        # Without autograd and composition, nothing but this hook reads the layer's fresh output.
        inplace = whole and isinstance(plan, list) and not torch.is_grad_enabled()

        def apply(pairs: list, part_piece: torch.Tensor, select: Select) -> torch.Tensor:
            part_input = select(args[0])
            for config, adapter in pairs:
                if isinstance(config, LoRAConfig):
                    part_piece = adapter.add_to(part_piece, part_input, inplace=inplace)
                elif isinstance(config, IA3Config) and not self._scales_input(config):
                    part_piece = adapter(part_piece)
            return part_piece

        piece = run_plan(plan, piece, apply)
        if whole:
            return piece
        return torch.cat([output[..., :start], piece, output[..., start + width:]], dim=-1)


def _shared_output(outputs_by_module: dict | None, prefix: nn.Module) -> torch.Tensor | None:
    """Return this forward's output of ``prefix`` for all its layers, computing it at first use.

    Returns ``None`` when the forward keeps no outputs (``outputs_by_module`` is ``None``) or
    ``prefix`` has no MLP. An output recorded with autograd on is not reused with it off, and the
    other way round.
    """
    if outputs_by_module is None or prefix.mlp is None:
        return None
    recording = torch.is_grad_enabled()
    entry = outputs_by_module.get(prefix)
    if entry is None or entry[0] != recording:
        entry = outputs_by_module[prefix] = (recording, prefix.outputs())
    return entry[1]


class PrefixSite(Site):
    """Prefix tuning on one attention module.

    Args:
        key: ``("prefix", block_index, kind)`` with kind ``"self"`` or ``"cross"``.
        attention: The attention module that calls the attention function.
        causal: Whether the block's stack is causal (decides how gated prefixes compute their gate).
        lookup: Called at every forward to get ``(config, (PrefixTuning, row))`` pairs.
        outputs: Called at every forward to get the dict in which that forward keeps each
            ``PrefixTuning``'s output for all layers, or ``None`` to compute each layer's part alone
            (see ``AdapterRegistry.prefix_outputs``).
    """

    # The site reads only the query's batch size, dtype and device, so hook-based prefix attention
    # need not run the query projection a second time to hand it over.
    reads_query = False

    def __init__(self, key: SiteKey, attention: nn.Module, causal: bool, lookup: Lookup,
                 outputs: Callable[[], dict | None] | None = None):
        super().__init__(key, lookup)
        self.attention = attention
        self.causal = causal
        self.outputs = outputs
        set_prefix_source(attention, self)
        # Gated prefixes (UniPELT) compute their gate from the attention input, which sources do not receive.
        # The capture runs first because the MPNet and DeBERTa-v2 prefix pre-hooks call the source.
        self._handles = [attention.register_forward_pre_hook(self._capture_input, with_kwargs=True, prepend=True),
                         attention.register_forward_hook(self._release_input)]

    def remove(self) -> None:
        set_prefix_source(self.attention, None)
        super().remove()

    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # DistilBERT's attention in transformers 4.57 takes its input as ``query``.
        self._captured.hidden_states = args[0] if args else kwargs.get("hidden_states", kwargs.get("query"))
        # T5's attention modules name the mask ``mask``.
        mask = kwargs.get("attention_mask")
        self._captured.attention_mask = kwargs.get("mask") if mask is None else mask

    def _release_input(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Keep no activation alive between forwards: it would hold memory after training and inference.
        self._captured.hidden_states = self._captured.attention_mask = None

    def _gate(self, prefix: nn.Module, row: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Return the UniPELT gate of one layer's prefix values, ``(batch or 1, 1, 1, 1)``.

        Encoders average the gate over the real tokens of the input, as UniPELT does. Prefix values
        are shared by every query, so in causal stacks an input-dependent gate would let a position
        see later tokens. There the prefix module learns one gate logit per layer instead.

        Args:
            prefix: The ``PrefixTuning`` module.
            row: The layer of ``prefix``.
            rows: The batch rows to compute the gate for, ``(n,)``, or ``None`` for every row.
        """
        if prefix.gate_logits is not None:
            return prefix.gate_value(row)
        hidden_states = getattr(self._captured, "hidden_states", None)
        if hidden_states is None:
            raise RuntimeError(f"adapterkit found no input of the attention module of block {self.key[1]} "
                               "to compute the prefix gate from")
        mask = token_mask(getattr(self._captured, "attention_mask", None), hidden_states.shape[1], causal=False)
        if rows is not None:
            hidden_states = hidden_states.index_select(0, rows)
            mask = None if mask is None else mask.index_select(0, rows.to(mask.device))
        return prefix.gate_value(row, hidden_states, attention_mask=mask)

    def __call__(self, module: nn.Module, query: torch.Tensor) -> list[PrefixPair]:
        plan = self.lookup(self.key)
        if plan is None or isinstance(plan, list):
            return self._stacked_prefixes(plan or [], query.dtype)
        return self._routed_prefixes(plan, query)

    def _stacked_prefixes(self, pairs: list, dtype: torch.dtype, rows: torch.Tensor | None = None) -> list[PrefixPair]:
        """Return the prefixes of ``pairs``, each key and value ``(1 or rows, kv_heads, length, dim)``.

        Input-dependent gates are computed on batch ``rows``, or on every row when ``rows`` is ``None``.
        """
        prefixes = []
        outputs_by_module = self.outputs() if self.outputs is not None and pairs else None
        for config, (prefix, row) in pairs:
            keys, values = prefix.layer_prefix(row, _shared_output(outputs_by_module, prefix))
            keys, values = keys.unsqueeze(0).to(dtype), values.unsqueeze(0).to(dtype)
            if prefix.use_gating:
                values = values * self._gate(prefix, row, rows).to(dtype)
            prefixes.append(PrefixPair(keys, values, config.position_bias))
        return prefixes

    def _routed_prefixes(self, plan: Any, query: torch.Tensor) -> list[PrefixPair]:
        """Return one prefix whose row ``i`` is the prefix of the adapters that row ``i`` runs.

        Rows with shorter prefixes are padded at the end to the longest, and ``PrefixPair.mask``
        hides the padded slots, so each row attends to exactly its own adapters' prefix slots.

        Raises:
            ValueError: If the rows' prefixes request different ``position_bias`` modes.
            NotImplementedError: If a prefix with a ``position_bias`` other than ``"zero"`` meets
                rows with another prefix length, because T5's relative bias over such a prefix
                depends on its length.
        """
        batch = query.shape[0]
        groups = []
        modes = set()
        for rows, pairs in row_pairs(plan, batch, query.device):
            prefixes = self._stacked_prefixes(pairs, query.dtype, rows)
            modes.update(pair.position_bias for pair in prefixes)
            length = sum(pair.key.shape[2] for pair in prefixes)
            groups.append((rows, prefixes, length))
        longest = max(length for _, _, length in groups)
        if not longest:
            return []
        if len(modes) > 1:
            raise ValueError(f"Rows routed to prefixes with position_bias {sorted(modes)} share one attention "
                             "call, which computes one position bias. Route together only prefix adapters with "
                             "the same PrefixTuningConfig.position_bias")
        uneven = any(length != longest for _, _, length in groups)
        if uneven and modes != {"zero"}:
            raise NotImplementedError(
                f"Rows routed to position_bias={sorted(modes)[0]!r} prefixes have prefix lengths "
                f"{sorted({length for _, _, length in groups})} in block {self.key[1]}, but T5's relative bias over "
                "the prefix depends on its length. Route rows only to prefix adapters of one prefix_length, or use "
                "PrefixTuningConfig(position_bias='zero')")
        reference = next(pair for _, prefixes, _ in groups for pair in prefixes)
        keys = reference.key.new_zeros(batch, reference.key.shape[1], longest, reference.key.shape[3])
        values = reference.value.new_zeros(batch, reference.value.shape[1], longest, reference.value.shape[3])
        mask = torch.zeros(batch, longest, dtype=torch.bool, device=query.device)
        for rows, prefixes, length in groups:
            if not length:
                continue
            count = rows.shape[0]
            group_keys = torch.cat([pair.key.expand(count, -1, -1, -1) for pair in prefixes], dim=2)
            group_values = torch.cat([pair.value.expand(count, -1, -1, -1) for pair in prefixes], dim=2)
            padding = (0, 0, 0, longest - length)
            keys = keys.index_copy(0, rows, F.pad(group_keys, padding))
            values = values.index_copy(0, rows, F.pad(group_values, padding))
            mask[rows, :length] = True
        return [PrefixPair(keys, values, modes.pop(), None if not uneven else mask)]


class EmbeddingSite(Site):
    """Invertible adapters on the output of the embedding module.

    Args:
        key: ``("embeddings",)``.
        embeddings: The module whose output is the embedding output.
        lookup: Called at every forward to get the adapters that run here.
        scope: When given, the adapters act only while this module's forward runs, for an embedding
            module that other stacks call too.
    """

    def __init__(self, key: SiteKey, embeddings: nn.Module, lookup: Lookup, scope: nn.Module | None = None):
        super().__init__(key, lookup)
        self.scoped = scope is not None
        self._handles = [embeddings.register_forward_hook(self._transform)]
        if scope is not None:
            self._handles += [scope.register_forward_pre_hook(self._enter), scope.register_forward_hook(self._leave)]

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self._captured.depth = getattr(self._captured, "depth", 0) + 1

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._captured.depth = max(getattr(self._captured, "depth", 1) - 1, 0)

    def _transform(self, module: nn.Module, args: tuple, output: Any) -> Any:
        adapters = self.lookup(self.key)
        if not adapters or (self.scoped and not getattr(self._captured, "depth", 0)):
            return None
        def apply(pairs: list, part_hidden: torch.Tensor, select: Select) -> torch.Tensor:
            for _, adapter in pairs:
                part_hidden = adapter(part_hidden)
            return part_hidden

        # A list of pairs runs on every row; a plan of Chain and RowSplit nodes runs each row's own adapters.
        return replace_first_tensor(output, run_plan(adapters, first_tensor(output), apply))


class FinalSite(Site):
    """The adapter before the head, and the inverse of invertible adapters before a tied LM head.

    Args:
        key: ``("final",)``.
        final: The module whose output is the last hidden state.
        invert: Whether to run the inverse of active invertible adapters here (language-model heads
            whose weights are the input embeddings).
        lookup: Called at every forward to get the adapters that run here.
    """

    def __init__(self, key: SiteKey, final: nn.Module, invert: bool, lookup: Lookup):
        super().__init__(key, lookup)
        self.invert = invert
        self._handles = [final.register_forward_hook(self._transform)]

    def _transform(self, module: nn.Module, args: tuple, output: Any) -> Any:
        plan = self.lookup(self.key)
        if not plan:
            return None
        hidden = first_tensor(output)
        if isinstance(plan, list):
            hidden, changed = self._apply(plan, hidden)
            return replace_first_tensor(output, hidden) if changed else None
        # Each row group runs its adapters as one stack, so the inverses of stacked invertible
        # adapters run in the reverse order of the whole stack, not per block of the plan.
        result, changed = hidden, False
        for rows, pairs in row_pairs(plan, hidden.shape[0], hidden.device):
            part, part_changed = self._apply(pairs, hidden.index_select(0, rows))
            if part_changed:
                result = result.index_copy(0, rows, part.to(result.dtype))
                changed = True
        return replace_first_tensor(output, result) if changed else None

    def _apply(self, pairs: list, hidden: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Return ``hidden`` ``(rows, seq_len, hidden)`` after the adapters of ``pairs``, and whether any ran."""
        changed = False
        for config, adapter in pairs:
            if isinstance(config, BottleneckConfig):
                hidden = adapter(hidden, hidden)
                changed = True
        if self.invert:
            for config, adapter in reversed(pairs):
                if not isinstance(config, BottleneckConfig):
                    hidden = adapter.inverse(hidden)
                    changed = True
        return hidden, changed


def arguments_by_name(names: tuple[str, ...], args: tuple, kwargs: dict, module: nn.Module) -> dict[str, Any]:
    """Return the positional ``args`` and the ``kwargs`` of a call of ``module`` as one dict by parameter name."""
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward takes {len(names)} positional arguments, but got "
                        f"{len(args)}; adapterkit cannot tell which input each one is")
    return {**dict(zip(names, args)), **kwargs}


class PositionShiftSite(Site):
    """Number the real tokens after the prefix, for prefix tuning with ``shift_positions``.

    A forward pre-hook on the base model fills in ``position_ids`` when the caller gave none, as the
    model itself would with a KV cache ``shift`` tokens longer (the sum of the active shifted
    prefixes' lengths). Explicit ``position_ids`` are left alone.

    Encoder-decoder base models whose forward takes no ``position_ids`` (BART) get the pre-hook on
    the decoder's ``embed_positions`` module instead, which adds ``shift`` to the positions that
    the decoder computes from its cache length. The encoder's positions stay, because PEFT passes
    its prefix cache to the decoder only.

    Args:
        key: ``("positions",)``.
        base_model: The model's base model, whose forward takes ``position_ids``.
        rule: ``"arange"`` or ``"padding_offset"`` (see ``ArchitectureSpec.position_ids``).
        padding_idx: The pad token id, for ``"padding_offset"``.
        lookup: Called at every forward to get ``(config, prefix_length)`` pairs.
    """

    def __init__(self, key: SiteKey, base_model: nn.Module, rule: str, padding_idx: int | None, lookup: Lookup):
        super().__init__(key, lookup)
        self.rule = rule
        self.padding_idx = padding_idx
        if "position_ids" in inspect.signature(base_model.forward).parameters:
            self._arguments = positional_names(base_model)
            self._handles = [base_model.register_forward_pre_hook(self._shift, with_kwargs=True)]
        else:
            embedding = _decoder_position_embedding(base_model)
            self._arguments = positional_names(embedding)
            self._handles = [embedding.register_forward_pre_hook(self._shift_decoder_positions, with_kwargs=True)]

    def _row_shifts(self, plan: Any, batch: int, device: torch.device) -> int | torch.Tensor:
        """Return the shift of every row: an int for a list of pairs, else ``(batch, 1)`` per row under routing."""
        if plan is None or isinstance(plan, list):
            return sum(length for _, length in plan or [])
        shifts = torch.zeros(batch, 1, dtype=torch.long, device=device)
        for rows, pairs in row_pairs(plan, batch, device):
            shifts[rows] = sum(length for _, length in pairs)
        return shifts

    def _shift_decoder_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self.lookup(self.key)
        if not any(length for _, length in plan_pairs(plan)):
            return None
        inputs = arguments_by_name(self._arguments, args, kwargs, module)
        shift = self._row_shifts(plan, inputs[self._arguments[0]].shape[0], inputs[self._arguments[0]].device)
        if isinstance(shift, torch.Tensor):
            if bool((shift != shift[0]).any()):
                raise NotImplementedError(
                    f"{type(module).__name__} takes one position offset for every row, so rows routed to "
                    "shift_positions prefixes of different lengths (or to none) cannot each get their own shift; "
                    "route rows only to prefix adapters of one prefix_length, or use shift_positions=False")
            shift = int(shift[0])
        # BART's embed_positions(input_ids, cache_length, position_ids=None) (transformers 5) numbers the
        # tokens from the cache length, or takes the positions that the decoder computed from it.
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"] + shift
        else:
            past_name = self._arguments[1]
            inputs[past_name] = inputs.get(past_name, 0) + shift
        return (), inputs

    def _shift(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self.lookup(self.key)
        if not any(length for _, length in plan_pairs(plan)):
            return None
        inputs = arguments_by_name(self._arguments, args, kwargs, module)
        if inputs.get("position_ids") is not None:
            return None
        input_ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            return None
        cache = next((inputs[k] for k in _CACHE_KEYWORDS if inputs.get(k) is not None), None)
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        batch, length = reference.shape[0], reference.shape[1]
        # An int, or (batch, 1) when routed rows have prefixes of different lengths.
        shift = self._row_shifts(plan, batch, reference.device)
        if self.rule == "padding_offset" and input_ids is not None:
            real = input_ids.ne(self.padding_idx).long()
            positions = (torch.cumsum(real, dim=1) + past + shift) * real + self.padding_idx
        else:
            start = past + shift + (self.padding_idx + 1 if self.rule == "padding_offset" else 0)
            positions = (torch.arange(length, device=reference.device) + start).expand(batch, length)
        inputs["position_ids"] = positions
        return (), inputs


def _decoder_position_embedding(base_model: nn.Module) -> nn.Module:
    """Return the ``embed_positions`` module of the decoder of ``base_model``, for ``PositionShiftSite``.

    Raises:
        ValueError: If ``base_model`` has no decoder with an ``embed_positions`` module that takes
            the past length as its second argument.
    """
    decoder = base_model.get_decoder() if getattr(base_model.config, "is_encoder_decoder", False) else None
    embedding = getattr(decoder, "embed_positions", None)
    if not isinstance(embedding, nn.Module) or len(positional_names(embedding)) < 2:
        raise ValueError(f"shift_positions=True, but {type(base_model).__name__}.forward takes no position_ids and "
                         "the model has no decoder embed_positions module that numbers positions from the cache "
                         "length, so adapterkit cannot shift its positions; use shift_positions=False")
    return embedding


class PromptSite(Site):
    """Prompt tuning: the virtual tokens before the input embeddings (see ``methods.prompt``).

    Decoder-only and encoder-only models get a forward pre-hook on the model itself, which also
    extends per-token labels. Encoder-decoder models get one on the encoder, because ``generate()``
    calls the encoder directly, and one on the decoder, which adds the prompt's columns to the
    cross-attention mask.

    Under per-row routing, ``BatchSplit`` and ``Parallel``, each row reads its own prompts, padded
    to one length with masked slots (see ``methods.prompt.extend_routed_inputs``): before the
    prompt in causal models, at the end of the row in encoders.

    Args:
        key: ``("prompt",)``.
        model: The transformers model.
        lookup: Called at every forward to get ``(config, PromptTuning)`` pairs.
        causal: Whether the model's first stack is causal (a decoder-only model).
    """

    def __init__(self, key: SiteKey, model: nn.Module, lookup: Lookup, causal: bool = False):
        super().__init__(key, lookup)
        self.target = prompt_target(model)
        encoder_decoder = self.target is not model
        self.padding_first = causal and not encoder_decoder
        self._target_arguments = positional_names(self.target)
        self._token_labels = not encoder_decoder and has_token_labels(model)
        self._handles = [self.target.register_forward_pre_hook(self._insert_prompt, with_kwargs=True)]
        if encoder_decoder:
            _, decoder = encoder_and_decoder(model)
            self._decoder_arguments = positional_names(decoder)
            self._handles.append(decoder.register_forward_pre_hook(self._extend_cross_mask, with_kwargs=True))

    def _insert_prompt(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self.lookup(self.key)
        if not plan:
            return None
        inputs = arguments_by_name(self._target_arguments, args, kwargs, module)
        if isinstance(plan, list):
            changed = extend_inputs(inputs, [prompt for _, prompt in plan], input_embeddings(module),
                                    token_labels=self._token_labels)
        else:
            groups = self._row_groups(plan, inputs)
            changed = groups is not None and extend_routed_inputs(
                inputs, groups, input_embeddings(module), token_labels=self._token_labels,
                padding_first=self.padding_first, takes_position_ids="position_ids" in self._target_arguments)
        return ((), inputs) if changed else None

    def _extend_cross_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self.lookup(self.key)
        if not plan:
            return None
        inputs = arguments_by_name(self._decoder_arguments, args, kwargs, module)
        if isinstance(plan, list):
            changed = extend_cross_attention_mask(inputs, sum(prompt.prompt_length for _, prompt in plan))
        else:
            states = inputs.get("encoder_hidden_states")
            groups = self._row_groups(plan, {"inputs_embeds": states})
            changed = groups is not None and extend_routed_cross_attention_mask(
                inputs, row_prompt_lengths(groups, states.shape[0], states.device))
        return ((), inputs) if changed else None

    @staticmethod
    def _row_groups(plan: Any, inputs: dict[str, Any]) -> list[tuple[torch.Tensor, list]] | None:
        """Return ``(rows, prompt modules)`` per row group of the batch in ``inputs``, or ``None`` without one."""
        reference = next((inputs[name] for name in ("input_ids", "inputs_embeds")
                          if isinstance(inputs.get(name), torch.Tensor)), None)
        if reference is None:
            return None
        return [(rows, [prompt for _, prompt in pairs])
                for rows, pairs in row_pairs(plan, reference.shape[0], reference.device)]
