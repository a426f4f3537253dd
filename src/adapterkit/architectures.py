"""Adapter placement for each model family, as data.

A model has one stack of blocks (encoder-only and decoder-only models) or two (encoder-decoder
models). A block has a self-attention sublayer, a feed-forward sublayer and, in decoders of
encoder-decoder models, a cross-attention sublayer. For each sublayer, bottleneck adapters need
three places, given as module paths relative to one block:

- ``output``: the module whose output is the sublayer output, before the block adds the residual
  stream. Adapters in series transform this output.
- ``residual``: a module whose input is the residual stream that the block adds to the sublayer
  output, with the position and keyword of that input. Parallel adapters read it.
- ``layer_norm``: the layer norm that post-norm blocks (BERT) apply to ``output + residual``;
  ``None`` for pre-norm blocks (GPT-2, Llama), which add the two and normalise later.

LoRA and (IA)^3 need the linear projections of a block by role (``query``, ``key``, ``value``,
``attention_output``, ``ff_in``, ``ff_out``); prefix tuning needs the attention modules; invertible
adapters need the module that outputs the embeddings; an adapter before the head needs the module
that outputs the final hidden states.

Supporting a new family is one ``ArchitectureSpec`` passed to ``register_architecture`` (or to
``adapterkit.init(model, architecture=...)``) and needs no copied ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import transformers
from torch import nn
from transformers import PreTrainedModel

# Some families name their module inputs differently in transformers 4.57 than in 5.
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


@dataclass(frozen=True)
class InputRef:
    """An input of a module: its path in the block, and its position and keyword in ``forward``."""

    module: str
    position: int = 0
    keyword: str = "hidden_states"


@dataclass(frozen=True)
class SublayerSpec:
    """The places of one sublayer (attention or feed-forward) inside a block."""

    output: str
    residual: InputRef
    layer_norm: str | None


@dataclass(frozen=True)
class LinearRef:
    """A linear projection in a block, or one of ``parts`` equal slices of a fused projection's output.

    GPT-2 computes query, key and value with one ``c_attn`` layer of width ``3 * hidden``: its query is
    ``LinearRef("attn.c_attn", part=0, parts=3)``.
    """

    path: str
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class FeedForwardShape:
    """The config fields of a feed-forward sublayer that computes ``ff_out(act(ff_in(x)))``.

    Give it only where ``x``, the input of ``ff_in``, is also the residual input that parallel
    adapters read, as in post-norm blocks (BERT, BART). Merging a parallel adapter with an identity
    non-linearity then adds units to the sublayer (see ``adapterkit.merge``) and updates ``width``.

    Attributes:
        width: Name of the model config field with the sublayer's inner width.
        activation: Name of the model config field that names ``act``.
    """

    width: str
    activation: str


@dataclass(frozen=True)
class StackSpec:
    """Placement inside the blocks of one stack (the encoder or the decoder).

    Attributes:
        layers: Path of the ``nn.ModuleList`` of blocks, relative to ``model.base_model``.
        attention: Places of the self-attention sublayer.
        feed_forward: Places of the feed-forward sublayer.
        cross_attention: Places of the cross-attention sublayer, for decoders of encoder-decoder models.
        projections: For each role, the linear projections that play it (strings or ``LinearRef``).
        attention_module: Path of the self-attention module that calls the attention function.
        cross_attention_module: Path of the cross-attention module, if any.
        causal: Whether each position sees only earlier positions (decoders).
        name: ``"encoder"`` or ``"decoder"``.
        feed_forward_shape: The config fields of the feed-forward sublayer, where its first
            projection reads the residual input; ``None`` otherwise (pre-norm blocks).
    """

    layers: str
    attention: SublayerSpec
    feed_forward: SublayerSpec
    cross_attention: SublayerSpec | None = None
    projections: Mapping[str, tuple[str | LinearRef, ...]] = field(default_factory=dict)
    attention_module: str | None = None
    cross_attention_module: str | None = None
    causal: bool = False
    name: str = "encoder"
    feed_forward_shape: FeedForwardShape | None = None

    def sublayers(self) -> dict[str, SublayerSpec]:
        """Return the sublayers of each block by name: ``attention``, ``cross_attention``, ``feed_forward``."""
        found = {"attention": self.attention, "feed_forward": self.feed_forward}
        if self.cross_attention is not None:
            found["cross_attention"] = self.cross_attention
        return found

    def linear_refs(self, role: str) -> tuple[LinearRef, ...]:
        """Return the projections of ``role`` as ``LinearRef`` objects (empty when the family has none)."""
        return tuple(ref if isinstance(ref, LinearRef) else LinearRef(ref) for ref in self.projections.get(role, ()))


@dataclass(frozen=True)
class ArchitectureSpec:
    """Placement of adapters in one model family.

    Attributes:
        stacks: The stacks of blocks in order (encoder first); block indices run on across stacks.
        embeddings: Path (relative to ``model.base_model``) of the module whose output is the sum of
            token and position embeddings, for invertible adapters.
        final: Path of the module whose output (a tensor, or a model output whose first item is the
            tensor) is the last hidden state that the head reads.
        embeddings_scope: Path of a module that must be running for the ``embeddings`` hook to act, when
            the embedding module is shared: T5's encoder and decoder share one embedding module in
            transformers 4.57, and invertible adapters transform the encoder input only.
        position_ids: How the model numbers positions when it gets no ``position_ids``: ``"arange"``
            (past length onwards) or ``"padding_offset"`` (RoBERTa: real tokens counted from
            ``pad_token_id + 1``, padding at ``pad_token_id``). ``None`` when the family uses relative
            positions or another rule; prefix tuning with ``shift_positions`` needs it.
    """

    stacks: tuple[StackSpec, ...]
    embeddings: str | None = None
    final: str | None = None
    embeddings_scope: str | None = None
    position_ids: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stacks, StackSpec):
            object.__setattr__(self, "stacks", (self.stacks,))
        elif isinstance(self.stacks, list):
            object.__setattr__(self, "stacks", tuple(self.stacks))


# -- the families ---------------------------------------------------------------------------------

def _bert_like_stack(layers: str = "encoder.layer", self_attention: str = "attention.self",
                     query: str = "query", key: str = "key", value: str = "value") -> StackSpec:
    return StackSpec(
        layers=layers,
        attention=SublayerSpec(
            output="attention.output.dropout",
            residual=InputRef("attention.output", 1, "input_tensor"),
            layer_norm="attention.output.LayerNorm",
        ),
        feed_forward=SublayerSpec(
            output="output.dropout",
            residual=InputRef("output", 1, "input_tensor"),
            layer_norm="output.LayerNorm",
        ),
        projections={
            "query": (f"{self_attention}.{query}",),
            "key": (f"{self_attention}.{key}",),
            "value": (f"{self_attention}.{value}",),
            "attention_output": ("attention.output.dense",),
            "ff_in": ("intermediate.dense",),
            "ff_out": ("output.dense",),
        },
        attention_module=self_attention,
        feed_forward_shape=FeedForwardShape("intermediate_size", "hidden_act"),
    )


def _bert_like(config: Any) -> ArchitectureSpec:
    positions = "padding_offset" if getattr(config, "model_type", "") == "roberta" else "arange"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        positions = None
    return ArchitectureSpec(stacks=(_bert_like_stack(),), embeddings="embeddings", final="encoder",
                            position_ids=positions)


def _electra(config: Any) -> ArchitectureSpec:
    # ELECTRA projects embeddings of another width to the hidden size after the embeddings module.
    projected = getattr(config, "embedding_size", config.hidden_size) != config.hidden_size
    return ArchitectureSpec(stacks=(_bert_like_stack(),),
                            embeddings="embeddings_project" if projected else "embeddings", final="encoder",
                            position_ids="arange")


def _deberta_v2(config: Any) -> ArchitectureSpec:
    # DebertaV2Model reads the last block's output from the encoder's tuple of all hidden states, not
    # from its last_hidden_state, so the adapter before the head sits on the last block.
    return ArchitectureSpec(stacks=(_bert_like_stack(query="query_proj", key="key_proj", value="value_proj"),),
                            embeddings="embeddings", final=f"encoder.layer.{config.num_hidden_layers - 1}")


def _distilbert(config: Any) -> ArchitectureSpec:
    stack = StackSpec(
        layers="transformer.layer",
        # The residual is read from the attention module's input. Transformers 5 checkpoints the block's
        # forward, so a hook on the block itself would not run again when the backward pass recomputes it.
        # transformers 4.57 passes that input by keyword as ``query``, version 5 as ``hidden_states``.
        attention=SublayerSpec(output="attention.out_lin",
                               residual=InputRef("attention", 0, "hidden_states" if TRANSFORMERS_MAJOR >= 5 else "query"),
                               layer_norm="sa_layer_norm"),
        feed_forward=SublayerSpec(output="ffn.dropout", residual=InputRef("ffn", 0, "input"),
                                  layer_norm="output_layer_norm"),
        projections={
            "query": ("attention.q_lin",), "key": ("attention.k_lin",), "value": ("attention.v_lin",),
            "attention_output": ("attention.out_lin",), "ff_in": ("ffn.lin1",), "ff_out": ("ffn.lin2",),
        },
        attention_module="attention",
        feed_forward_shape=FeedForwardShape("hidden_dim", "activation"),
    )
    return ArchitectureSpec(stacks=(stack,), embeddings="embeddings", final="transformer")


def _mpnet(config: Any) -> ArchitectureSpec:
    stack = StackSpec(
        layers="encoder.layer",
        attention=SublayerSpec(output="attention.dropout", residual=InputRef("attention", 0, "hidden_states"),
                               layer_norm="attention.LayerNorm"),
        feed_forward=SublayerSpec(output="output.dropout", residual=InputRef("output", 1, "input_tensor"),
                                  layer_norm="output.LayerNorm"),
        projections={
            "query": ("attention.attn.q",), "key": ("attention.attn.k",), "value": ("attention.attn.v",),
            "attention_output": ("attention.attn.o",), "ff_in": ("intermediate.dense",),
            "ff_out": ("output.dense",),
        },
        attention_module="attention.attn",
        feed_forward_shape=FeedForwardShape("intermediate_size", "hidden_act"),
    )
    return ArchitectureSpec(stacks=(stack,), embeddings="embeddings", final="encoder")


def _gpt2(config: Any) -> ArchitectureSpec:
    stack = StackSpec(
        layers="h",
        attention=SublayerSpec(output="attn.resid_dropout", residual=InputRef("ln_1"), layer_norm=None),
        feed_forward=SublayerSpec(output="mlp.dropout", residual=InputRef("ln_2"), layer_norm=None),
        projections={
            "query": (LinearRef("attn.c_attn", 0, 3),),
            "key": (LinearRef("attn.c_attn", 1, 3),),
            "value": (LinearRef("attn.c_attn", 2, 3),),
            "attention_output": ("attn.c_proj",),
            "ff_in": ("mlp.c_fc",),
            "ff_out": ("mlp.c_proj",),
        },
        attention_module="attn",
        causal=True,
        name="decoder",
    )
    return ArchitectureSpec(stacks=(stack,), embeddings="drop", final="ln_f", position_ids="arange")


def _llama_like_stack(layers: str = "layers", sandwich_norms: bool = False) -> StackSpec:
    if sandwich_norms:
        # Gemma 2 and 3 normalise each sublayer's output before the residual add.
        attention = SublayerSpec(output="post_attention_layernorm", residual=InputRef("input_layernorm"),
                                 layer_norm=None)
        feed_forward = SublayerSpec(output="post_feedforward_layernorm", residual=InputRef("pre_feedforward_layernorm"),
                                    layer_norm=None)
    else:
        attention = SublayerSpec(output="self_attn.o_proj", residual=InputRef("input_layernorm"), layer_norm=None)
        feed_forward = SublayerSpec(output="mlp.down_proj", residual=InputRef("post_attention_layernorm"),
                                    layer_norm=None)
    return StackSpec(
        layers=layers,
        attention=attention,
        feed_forward=feed_forward,
        projections={
            "query": ("self_attn.q_proj",), "key": ("self_attn.k_proj",), "value": ("self_attn.v_proj",),
            "attention_output": ("self_attn.o_proj",), "ff_in": ("mlp.gate_proj", "mlp.up_proj"),
            "ff_out": ("mlp.down_proj",),
        },
        attention_module="self_attn",
        causal=True,
        name="decoder",
    )


def _llama_like(config: Any) -> ArchitectureSpec:
    return ArchitectureSpec(stacks=(_llama_like_stack(),), embeddings="embed_tokens", final="norm",
                            position_ids="arange")


def _gemma3_text(config: Any) -> ArchitectureSpec:
    return ArchitectureSpec(stacks=(_llama_like_stack(sandwich_norms=True),), embeddings="embed_tokens",
                            final="norm", position_ids="arange")


def _gemma3(config: Any) -> ArchitectureSpec:
    # The multimodal Gemma 3 model keeps its text decoder under ``language_model``.
    return ArchitectureSpec(stacks=(_llama_like_stack("language_model.layers", sandwich_norms=True),),
                            embeddings="language_model.embed_tokens", final="language_model.norm")


def _t5_stack(stack: str, config: Any) -> StackSpec:
    decoder = stack == "decoder"
    ff_index = 2 if decoder else 1
    ff = f"layer.{ff_index}.DenseReluDense"
    ff_in = (f"{ff}.wi_0", f"{ff}.wi_1") if getattr(config, "is_gated_act", False) else (f"{ff}.wi",)

    def attention_roles(suffix: str) -> tuple[str, ...]:
        paths = [f"layer.0.SelfAttention.{suffix}"]
        if decoder:
            paths.append(f"layer.1.EncDecAttention.{suffix}")
        return tuple(paths)

    return StackSpec(
        layers=f"{stack}.block",
        attention=SublayerSpec(output="layer.0.dropout", residual=InputRef("layer.0.layer_norm"), layer_norm=None),
        feed_forward=SublayerSpec(output=f"layer.{ff_index}.dropout", residual=InputRef(f"layer.{ff_index}.layer_norm"),
                                  layer_norm=None),
        cross_attention=(SublayerSpec(output="layer.1.dropout", residual=InputRef("layer.1.layer_norm"), layer_norm=None)
                         if decoder else None),
        projections={
            "query": attention_roles("q"), "key": attention_roles("k"), "value": attention_roles("v"),
            "attention_output": attention_roles("o"), "ff_in": ff_in, "ff_out": (f"{ff}.wo",),
        },
        attention_module="layer.0.SelfAttention",
        cross_attention_module="layer.1.EncDecAttention" if decoder else None,
        causal=decoder,
        name=stack,
    )


def _t5(config: Any) -> ArchitectureSpec:
    return ArchitectureSpec(stacks=(_t5_stack("encoder", config), _t5_stack("decoder", config)),
                            embeddings="encoder.embed_tokens", final="decoder.final_layer_norm",
                            embeddings_scope="encoder")


def _bart_stack(stack: str) -> StackSpec:
    decoder = stack == "decoder"

    def attention_roles(suffix: str) -> tuple[str, ...]:
        return (f"self_attn.{suffix}", f"encoder_attn.{suffix}") if decoder else (f"self_attn.{suffix}",)

    return StackSpec(
        layers=f"{stack}.layers",
        attention=SublayerSpec(output="self_attn.out_proj", residual=InputRef("self_attn"),
                               layer_norm="self_attn_layer_norm"),
        feed_forward=SublayerSpec(output="fc2", residual=InputRef("fc1", 0, "input"), layer_norm="final_layer_norm"),
        cross_attention=(SublayerSpec(output="encoder_attn.out_proj", residual=InputRef("encoder_attn"),
                                      layer_norm="encoder_attn_layer_norm") if decoder else None),
        projections={
            "query": attention_roles("q_proj"), "key": attention_roles("k_proj"), "value": attention_roles("v_proj"),
            "attention_output": attention_roles("out_proj"), "ff_in": ("fc1",), "ff_out": ("fc2",),
        },
        attention_module="self_attn",
        cross_attention_module="encoder_attn" if decoder else None,
        causal=decoder,
        name=stack,
        feed_forward_shape=FeedForwardShape(f"{stack}_ffn_dim", "activation_function"),
    )


def _bart(config: Any) -> ArchitectureSpec:
    # Both stacks number positions from their cache length on (the decoder's is shifted through its
    # embed_positions module, see injection.PositionShiftSite).
    return ArchitectureSpec(stacks=(_bart_stack("encoder"), _bart_stack("decoder")),
                            embeddings="encoder.layernorm_embedding", final="decoder", position_ids="arange")


# A family maps to a spec, or to a function of the model config that returns one, for families whose
# layout depends on the config (T5's gated feed-forward, ELECTRA's embedding projection).
SpecSource = ArchitectureSpec | Callable[[Any], ArchitectureSpec]

ARCHITECTURES: dict[str, SpecSource] = {
    "bert": _bert_like,
    "roberta": _bert_like,
    "electra": _electra,
    "deberta-v2": _deberta_v2,
    "distilbert": _distilbert,
    "mpnet": _mpnet,
    "gpt2": _gpt2,
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "gemma3_text": _gemma3_text,
    "gemma3": _gemma3,
    "t5": _t5,
    "bart": _bart,
}

_HOW_TO_DESCRIBE = (
    "Describe it with adapterkit.ArchitectureSpec(stacks=(adapterkit.StackSpec(layers=..., attention=..., "
    "feed_forward=..., projections=...),)) and pass it as adapterkit.init(model, architecture=spec), "
    "or register it once with adapterkit.register_architecture(model_type, spec); see docs/architectures.md"
)


def register_architecture(model_type: str, spec: SpecSource) -> None:
    """Make ``spec`` the description used for every model whose ``config.model_type`` is ``model_type``.

    Args:
        model_type: The ``config.model_type`` of the family.
        spec: An ``ArchitectureSpec``, or a function of the model config that returns one.
    """
    if not isinstance(spec, ArchitectureSpec) and not callable(spec):
        raise TypeError(f"spec must be an ArchitectureSpec or a function returning one, not {type(spec).__name__}")
    ARCHITECTURES[model_type] = spec


def find_architecture(model: nn.Module) -> ArchitectureSpec:
    """Return the spec for ``model`` by its ``config.model_type``.

    Raises:
        NotImplementedError: For a family with no spec, listing the known families and how to add one.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    source = ARCHITECTURES.get(model_type)
    if source is None:
        raise NotImplementedError(
            f"adapterkit has no description of model_type={model_type!r}; known families: "
            f"{', '.join(sorted(ARCHITECTURES))}. {_HOW_TO_DESCRIBE}"
        )
    return source if isinstance(source, ArchitectureSpec) else source(config)


def get_submodule(root: nn.Module, path: str, *, family: str = "") -> nn.Module:
    """Return ``root``'s submodule at dotted ``path`` (``""`` is ``root`` itself).

    Raises:
        ValueError: If the path does not exist, naming the path and the children that do.
    """
    try:
        return root.get_submodule(path)
    except AttributeError as error:
        children = ", ".join(name for name, _ in root.named_children())
        raise ValueError(
            f"The architecture description{f' for {family!r}' if family else ''} names module {path!r}, "
            f"which {type(root).__name__} does not have (its children: {children}). "
            f"The installed transformers version may lay the model out differently. {_HOW_TO_DESCRIBE}"
        ) from error


def find_base_model(model: nn.Module) -> nn.Module:
    """Return the body of ``model`` under its head: ``model.base_model``, corrected where it is the whole model.

    In transformers 4.57 Gemma 3's ``ForCausalLM``, ``ForConditionalGeneration`` and multimodal
    ``ForSequenceClassification`` name a ``base_model_prefix`` ("language_model" or "") that is not
    the attribute holding their body, ``model``, so ``base_model`` returns the whole model. Version 5
    sets the prefix to "model".
    """
    base = model.base_model
    if base is model:
        body = getattr(model, "model", None)
        if isinstance(body, PreTrainedModel):
            return body
    return base


def get_layers(model: nn.Module, stack: StackSpec) -> nn.ModuleList:
    """Return the blocks of one stack of ``model``."""
    family = getattr(model.config, "model_type", "")
    base = find_base_model(model)
    layers = get_submodule(base, stack.layers, family=family)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{stack.layers!r} in {type(base).__name__} is a {type(layers).__name__}, "
                         f"not the nn.ModuleList of blocks. {_HOW_TO_DESCRIBE}")
    return layers


def attention_shape(config: Any) -> tuple[int, int]:
    """Return ``(key/value heads, head size)`` of the attention layers that ``config`` describes.

    Reads the names transformers configs use: ``num_key_value_heads`` for grouped-query attention,
    ``head_dim`` or T5's ``d_kv`` for a head size that is not ``hidden_size / heads``.
    """
    text_config = getattr(config, "text_config", None) or config
    heads = next(getattr(text_config, name) for name in ("num_attention_heads", "n_head", "n_heads", "num_heads",
                                                          "encoder_attention_heads")
                 if getattr(text_config, name, None))
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = (getattr(text_config, "head_dim", None) or getattr(text_config, "d_kv", None)
                or text_config.hidden_size // heads)
    return kv_heads, head_dim
