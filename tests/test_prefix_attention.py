"""Prefix keys and values inside tiny random transformers models of every supported family.

Expected values come from the same model without prefixes, from single unpadded rows, from
generation with and without a KV cache, or from attention computed by hand from the module weights.
"""

from __future__ import annotations

import copy
import inspect
import math
import pickle
import sys

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adapterkit import prefix_attention
from adapterkit.methods.prefix import PrefixTuning
from adapterkit.prefix_attention import (
    IMPLEMENTATION_PREFIX,
    PrefixPair,
    disable_prefix_attention,
    enable_prefix_attention,
    get_prefix_source,
    is_prefix_attention_enabled,
    set_prefix_source,
)

VOCAB_SIZE = 99
PREFIX_LENGTH = 3
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "gemma3")
ENCODERS = ("bert", "roberta", "distilbert", "electra", "mpnet", "deberta-v2")
SEQ2SEQ = ("t5", "bart")
FAMILIES = ENCODERS + DECODERS + SEQ2SEQ
# MPNet and DeBERTa-v2 have only their own attention code, which transformers calls "eager".
HOOKED = ("mpnet", "deberta-v2")
INTERFACE_FAMILIES = tuple(family for family in FAMILIES if family not in HOOKED)
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# Transformers 4.x has no SDPA attention for ELECTRA and T5 and rejects attn_implementation="sdpa".
NO_SDPA = ("electra", "t5") if TRANSFORMERS_MAJOR < 5 else ()
NO_SDPA_REASON = f"transformers {transformers.__version__} has no SDPA attention for this family"


def implementation_case(family: str, implementation: str):
    """Return a ``(family, implementation)`` test case, skipped where the family has no such implementation."""
    return pytest.param(family, implementation,
                        marks=pytest.mark.skipif(implementation == "sdpa" and family in NO_SDPA, reason=NO_SDPA_REASON))


FAMILY_IMPLEMENTATIONS = [implementation_case(family, implementation)
                          for family in FAMILIES for implementation in ("sdpa", "eager")
                          if not (family in HOOKED and implementation == "sdpa")]

# Suffixes of the attention modules' names, as adapterkit's architecture descriptions name them.
ATTENTION_PATHS = {
    "bert": ("attention.self",), "roberta": ("attention.self",), "electra": ("attention.self",),
    "deberta-v2": ("attention.self",), "distilbert": ("attention",), "mpnet": ("attention.attn",),
    "gpt2": ("attn",), "llama": ("self_attn",), "mistral": ("self_attn",), "qwen2": ("self_attn",),
    "gemma3": ("self_attn",), "t5": ("layer.0.SelfAttention", "layer.1.EncDecAttention"),
    "bart": ("self_attn", "encoder_attn"),
}


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """Return a config with hidden size 32, 2 layers, 4 heads, and 2 key/value heads where the family has GQA."""
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  vocab_size=VOCAB_SIZE, max_position_embeddings=64)
    decoder = dict(common, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=98)
    if family == "bert":
        return transformers.BertConfig(**common)
    if family == "roberta":
        return transformers.RobertaConfig(**common, pad_token_id=1)
    if family == "electra":
        return transformers.ElectraConfig(**common, embedding_size=32)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=VOCAB_SIZE,
                                             max_position_embeddings=64)
    if family == "mpnet":
        return transformers.MPNetConfig(**common)
    if family == "deberta-v2":
        # The DeBERTa-v3 settings: shared position projections, both relative terms, log buckets.
        return transformers.DebertaV2Config(**common, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                            position_buckets=8, max_relative_positions=-1, share_att_key=True,
                                            norm_rel_ebd="layer_norm")
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB_SIZE, n_positions=64,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=98)
    if family == "llama":
        return transformers.LlamaConfig(**decoder)
    if family == "mistral":
        return transformers.MistralConfig(**decoder, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**decoder)
    if family == "gemma3":
        # A sliding window shorter than the test sequences, so the sliding layer gets a real window mask.
        return transformers.Gemma3TextConfig(**decoder, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"])
    if family == "t5":
        # d_kv * num_heads = 64 differs from d_model = 32.
        return transformers.T5Config(d_model=32, d_kv=16, num_heads=4, num_layers=2, d_ff=37, vocab_size=VOCAB_SIZE,
                                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=98)
    if family == "bart":
        return transformers.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                       decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                                       vocab_size=VOCAB_SIZE, max_position_embeddings=64, pad_token_id=1,
                                       bos_token_id=0, eos_token_id=98, decoder_start_token_id=2,
                                       forced_eos_token_id=None)
    raise ValueError(f"no tiny config for family {family!r}")


def build_model(family: str, implementation: str | None = None, seed: int = 0,
                config_changes: dict | None = None) -> nn.Module:
    """Return a tiny random model of ``family`` in eval mode: a base encoder, a causal LM or a seq2seq LM.

    ``implementation`` defaults to ``"sdpa"``, or ``"eager"`` where the family has only that.
    ``config_changes`` sets attributes of the config before the model is built.
    """
    if family in HOOKED or (implementation is None and family in NO_SDPA):
        implementation = "eager"
    implementation = implementation or "sdpa"
    torch.manual_seed(seed)
    config = tiny_config(family)
    for name, value in (config_changes or {}).items():
        setattr(config, name, value)
    if family in DECODERS:
        auto = transformers.AutoModelForCausalLM
    elif family in SEQ2SEQ:
        auto = transformers.AutoModelForSeq2SeqLM
    else:
        auto = transformers.AutoModel
    return auto.from_config(config, attn_implementation=implementation).eval()


def attention_modules(model: nn.Module, family: str) -> list[nn.Module]:
    suffixes = ATTENTION_PATHS[family]
    return [module for name, module in model.named_modules()
            if any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)]


def kv_shape(model: nn.Module) -> tuple[int, int]:
    """Return ``(key/value heads, head size)`` read from the config, independently of the code under test."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return kv_heads, head_dim


class FixedPrefix:
    """A picklable prefix source that returns the same key and value at every call."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key = key
        self.value = value
        self.calls = 0

    def __call__(self, module: nn.Module, query: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.calls += 1
        return [(self.key.to(query.dtype), self.value.to(query.dtype))]


class LayerPrefix:
    """A picklable prefix source that reads one layer of a ``PrefixTuning``."""

    def __init__(self, prefix: PrefixTuning, layer: int):
        self.prefix = prefix
        self.layer = layer

    def __call__(self, module: nn.Module, query: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        keys, values = self.prefix.layer_prefix(self.layer)
        return [(keys.unsqueeze(0).to(query.dtype), values.unsqueeze(0).to(query.dtype))]


def attach_prefixes(model: nn.Module, family: str, length: int = PREFIX_LENGTH, seed: int = 5) -> list[FixedPrefix]:
    """Give every attention module of ``model`` a random prefix of ``length`` positions and batch size 1."""
    kv_heads, head_dim = kv_shape(model)
    generator = torch.Generator().manual_seed(seed)
    sources = []
    for module in attention_modules(model, family):
        key = torch.randn(1, kv_heads, length, head_dim, generator=generator)
        value = torch.randn(1, kv_heads, length, head_dim, generator=generator)
        source = FixedPrefix(key, value)
        set_prefix_source(module, source)
        sources.append(source)
    assert sources, f"no attention module found for {family}"
    return sources


def token_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE - 1, (batch, length), generator=generator)


def seq2seq_inputs(batch: int = 2) -> dict:
    return {"input_ids": token_ids(batch, 7), "decoder_input_ids": token_ids(batch, 4, seed=2)}


@torch.no_grad()
def run(model: nn.Module, family: str, **inputs) -> torch.Tensor:
    """Return the model's main output: logits for LMs, the last hidden state for encoders."""
    if not inputs:
        inputs = seq2seq_inputs() if family in SEQ2SEQ else {"input_ids": token_ids()}
    output = model(**inputs)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


# -- output changes, and nothing changes without a source -----------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_changes_output(family):
    model = build_model(family)
    bare = run(model, family)
    enable_prefix_attention(model)
    sources = attach_prefixes(model, family)

    prefixed = run(model, family)

    assert all(source.calls >= 1 for source in sources)
    assert (prefixed - bare).abs().max() > 1e-2


@pytest.mark.parametrize(("family", "implementation"), FAMILY_IMPLEMENTATIONS)
def test_enabled_without_source_is_bitwise_equal(family, implementation):
    model = build_model(family, implementation)
    bare = run(model, family)
    enable_prefix_attention(model)

    assert torch.equal(run(model, family), bare)


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_restores_bitwise(family):
    model = build_model(family)
    configs_before = {id(module.config): module.config._attn_implementation
                      for module in model.modules() if isinstance(getattr(module, "config", None),
                                                                   transformers.PretrainedConfig)}
    bare = run(model, family)
    enable_prefix_attention(model)
    enable_prefix_attention(model)  # a second call changes nothing
    attach_prefixes(model, family)
    assert is_prefix_attention_enabled(model)

    disable_prefix_attention(model)

    assert not is_prefix_attention_enabled(model)
    assert torch.equal(run(model, family), bare)
    configs_after = {id(module.config): module.config._attn_implementation
                     for module in model.modules() if isinstance(getattr(module, "config", None),
                                                                  transformers.PretrainedConfig)}
    assert configs_after == configs_before
    assert not [name for name, module in model.named_modules()
                if module._forward_hooks or module._forward_pre_hooks or "disentangled_attention_bias" in vars(module)]


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="T5 attention in transformers 4.x does not call the "
                    "AttentionInterface, so prefix attention hooks it and leaves its configs as they are")
def test_enable_switches_copied_configs():
    model = build_model("t5")
    enable_prefix_attention(model)

    # T5 copies its config for the encoder and decoder stacks, and the attention modules read those copies.
    for module in attention_modules(model, "t5"):
        assert module.config._attn_implementation == IMPLEMENTATION_PREFIX + "sdpa"
    assert model.config._attn_implementation == IMPLEMENTATION_PREFIX + "sdpa"


def test_source_removed_restores_output():
    model = build_model("llama")
    bare = run(model, "llama")
    enable_prefix_attention(model)
    attach_prefixes(model, "llama")
    for module in attention_modules(model, "llama"):
        set_prefix_source(module, None)

    assert get_prefix_source(attention_modules(model, "llama")[0]) is None
    assert torch.equal(run(model, "llama"), bare)


def test_module_source_is_not_a_submodule():
    model = build_model("llama")
    prefix = PrefixTuning(2, 2, 8, 32, prefix_length=2, bottleneck_size=4)
    names_before = [name for name, _ in model.named_parameters()]
    set_prefix_source(model.model.layers[0].self_attn, LayerPrefix(prefix, 0))
    set_prefix_source(model.model.layers[1].self_attn, prefix)  # an nn.Module as the attribute value

    assert [name for name, _ in model.named_parameters()] == names_before
    assert "adapterkit_prefix_source" not in model.state_dict()


# -- hand-computed attention ---------------------------------------------------------------------


def capture_call(module: nn.Module) -> dict:
    """Record the arguments ``module`` is called with (before other pre-hooks) and its final output."""
    record = {}

    def before(_, args, kwargs):
        record["args"], record["kwargs"] = args, dict(kwargs)

    def after(_, args, kwargs, output):
        record["output"] = output

    record["handles"] = [module.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
                         module.register_forward_hook(after, with_kwargs=True)]
    return record


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def hand_attention(query, keys, values, bias):
    """``softmax(query keys^T + bias) values``, ``(batch, heads, q_len, d)`` to ``(batch, q_len, heads * d)``."""
    probabilities = torch.softmax(query @ keys.transpose(-1, -2) + bias, dim=-1)
    output = probabilities @ values
    return output.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1)


def heads(x: torch.Tensor, count: int) -> torch.Tensor:
    """``(batch, seq, count * d)`` to ``(batch, count, seq, d)``."""
    return x.view(x.shape[0], x.shape[1], count, -1).transpose(1, 2)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_llama_attention_matches_hand_computation(implementation):
    model = build_model("llama", implementation)
    enable_prefix_attention(model)
    sources = attach_prefixes(model, "llama")
    attention = model.model.layers[1].self_attn
    record = capture_call(attention)
    run(model, "llama")

    hidden = record["kwargs"]["hidden_states"]
    cos, sin = record["kwargs"]["position_embeddings"]
    batch, length, _ = hidden.shape
    query = heads(F.linear(hidden, attention.q_proj.weight), 4)
    key = heads(F.linear(hidden, attention.k_proj.weight), 2)
    value = heads(F.linear(hidden, attention.v_proj.weight), 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query = query * cos + rotate_half(query) * sin
    key = key * cos + rotate_half(key) * sin
    prefix = sources[1]
    keys = torch.cat([prefix.key.expand(batch, -1, -1, -1), key], dim=2).repeat_interleave(2, dim=1)
    values = torch.cat([prefix.value.expand(batch, -1, -1, -1), value], dim=2).repeat_interleave(2, dim=1)
    visible = torch.cat([torch.ones(length, PREFIX_LENGTH, dtype=torch.bool),
                         torch.ones(length, length, dtype=torch.bool).tril()], dim=1)
    bias = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    expected = F.linear(hand_attention(query / math.sqrt(8), keys, values, bias), attention.o_proj.weight)

    torch.testing.assert_close(record["output"][0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_bert_attention_matches_hand_computation(implementation):
    model = build_model("bert", implementation)
    enable_prefix_attention(model)
    sources = attach_prefixes(model, "bert")
    attention = model.encoder.layer[0].attention.self
    record = capture_call(attention)
    padding = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    run(model, "bert", input_ids=token_ids(), attention_mask=padding)

    hidden = record["args"][0] if record["args"] else record["kwargs"]["hidden_states"]
    query = heads(attention.query(hidden), 4)
    keys = torch.cat([sources[0].key.expand(2, -1, -1, -1), heads(attention.key(hidden), 4)], dim=2)
    values = torch.cat([sources[0].value.expand(2, -1, -1, -1), heads(attention.value(hidden), 4)], dim=2)
    visible = torch.cat([torch.ones(2, PREFIX_LENGTH, dtype=torch.bool), padding.bool()], dim=1)
    bias = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[:, None, None, :]
    expected = hand_attention(query / math.sqrt(8), keys, values, bias)

    torch.testing.assert_close(record["output"][0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", [
    pytest.param("sdpa", marks=pytest.mark.skipif("t5" in NO_SDPA, reason=NO_SDPA_REASON)), "eager"])
def test_t5_relative_bias_is_zero_on_prefix(implementation):
    model = build_model("t5", implementation)
    enable_prefix_attention(model)
    sources = attach_prefixes(model, "t5")
    attention = model.encoder.block[0].layer[0].SelfAttention
    record = capture_call(attention)
    padding = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    inputs = seq2seq_inputs()
    run(model, "t5", attention_mask=padding, **inputs)

    hidden = record["args"][0]
    position_bias = attention.compute_bias(7, 7)
    query = heads(attention.q(hidden), 4)
    keys = torch.cat([sources[0].key.expand(2, -1, -1, -1), heads(attention.k(hidden), 4)], dim=2)
    values = torch.cat([sources[0].value.expand(2, -1, -1, -1), heads(attention.v(hidden), 4)], dim=2)
    visible = torch.cat([torch.ones(2, PREFIX_LENGTH, dtype=torch.bool), padding.bool()], dim=1)[:, None, None, :]
    bias = F.pad(position_bias, (PREFIX_LENGTH, 0)).masked_fill(~visible, float("-inf"))
    expected = attention.o(hand_attention(query, keys, values, bias))

    output, returned_bias = record["output"][:2]
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)
    # The next layers reuse the returned bias, which must keep the real key length. Transformers 4.x
    # adds the padding mask into it.
    expected_bias = position_bias
    if TRANSFORMERS_MAJOR < 5:
        expected_bias = position_bias + (1.0 - padding[:, None, None, :].float()) * torch.finfo(torch.float32).min
    torch.testing.assert_close(returned_bias, expected_bias)


def test_mpnet_attention_matches_hand_computation():
    model = build_model("mpnet")
    enable_prefix_attention(model)
    sources = attach_prefixes(model, "mpnet")
    attention = model.encoder.layer[1].attention.attn
    record = capture_call(attention)
    padding = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    run(model, "mpnet", input_ids=token_ids(), attention_mask=padding)

    # Transformers 4.57 passes head_mask before position_bias, so the arguments are read by name.
    call = inspect.signature(attention.forward).bind(*record["args"], **record["kwargs"]).arguments
    hidden, position_bias = call["hidden_states"], call["position_bias"]
    query = heads(attention.q(hidden), 4)
    keys = torch.cat([sources[1].key.expand(2, -1, -1, -1), heads(attention.k(hidden), 4)], dim=2)
    values = torch.cat([sources[1].value.expand(2, -1, -1, -1), heads(attention.v(hidden), 4)], dim=2)
    visible = torch.cat([torch.ones(2, PREFIX_LENGTH, dtype=torch.bool), padding.bool()], dim=1)[:, None, None, :]
    bias = F.pad(position_bias, (PREFIX_LENGTH, 0)).masked_fill(~visible, float("-inf"))
    expected = attention.o(hand_attention(query / math.sqrt(8), keys, values, bias))

    torch.testing.assert_close(record["output"][0], expected, atol=1e-5, rtol=0)
    assert record["output"][0].shape == hidden.shape


def test_deberta_v2_attention_matches_hand_computation():
    model = build_model("deberta-v2")
    enable_prefix_attention(model)
    sources = attach_prefixes(model, "deberta-v2")
    attention = model.encoder.layer[1].attention.self
    record = capture_call(attention)
    padding = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    run(model, "deberta-v2", input_ids=token_ids(), attention_mask=padding)

    hidden = record["args"][0]
    relative_pos, rel_embeddings = record["kwargs"]["relative_pos"], record["kwargs"]["rel_embeddings"]
    batch_heads = (2 * 4, 7, 8)
    query_layer = heads(attention.query_proj(hidden), 4).reshape(batch_heads)
    key_layer = heads(attention.key_proj(hidden), 4).reshape(batch_heads)
    # The relative terms on the real keys, from transformers' own method (the class attribute,
    # not the instance override that the patch installs).
    relative = type(attention).disentangled_attention_bias(attention, query_layer, key_layer, relative_pos,
                                                           rel_embeddings, 3).view(2, 4, 7, 7)
    query = heads(attention.query_proj(hidden), 4)
    keys = torch.cat([sources[1].key.expand(2, -1, -1, -1), heads(attention.key_proj(hidden), 4)], dim=2)
    values = torch.cat([sources[1].value.expand(2, -1, -1, -1), heads(attention.value_proj(hidden), 4)], dim=2)
    visible = torch.cat([torch.ones(2, PREFIX_LENGTH, dtype=torch.bool), padding.bool()], dim=1)[:, None, None, :]
    bias = F.pad(relative, (PREFIX_LENGTH, 0)).masked_fill(~visible, float("-inf"))
    expected = hand_attention(query / math.sqrt(8 * 3), keys, values, bias)

    # DeBERTa masks the padded query rows of row 1 in full, so only its real query rows are compared.
    torch.testing.assert_close(record["output"][0][0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(record["output"][0][1, :4], expected[1, :4], atol=1e-5, rtol=0)


# -- the CPU attention path for training with dropout ---------------------------------------------


@pytest.mark.parametrize("scaling", [None, 0.3])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_cpu_dropout_attention_by_hand(mask_kind, scaling):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 5, 8, generator=generator)
    # Two key/value heads for four query heads: each serves two consecutive query heads.
    key = torch.randn(2, 2, 7, 8, generator=generator)
    value = torch.randn(2, 2, 7, 8, generator=generator)
    attend = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    attend[1, :, :, 5:] = False
    mask = {None: None, "bool": attend, "additive": torch.zeros(2, 1, 5, 7).masked_fill(~attend, -1e9)}[mask_kind]
    dropout = 0.4

    torch.manual_seed(11)
    output = prefix_attention.cpu_dropout_attention(query, key, value, mask, dropout, scaling)
    torch.manual_seed(11)
    keep = torch.rand(2, 4, 5, 7) >= dropout

    scores = query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) * (scaling or 8 ** -0.5)
    if mask_kind is not None:
        scores = scores.masked_fill(~attend, float("-inf"))
    weights = scores.softmax(-1) * keep / (1 - dropout)
    torch.testing.assert_close(output, weights @ value.repeat_interleave(2, dim=1), atol=1e-6, rtol=1e-5)
    # About 40% of the weights are dropped.
    assert 0.25 < 1 - keep.float().mean().item() < 0.55


# Config settings per family: attention dropout of 1e-12, which takes the CPU path in training but
# drops nothing, and no other dropout.
TINY_ATTENTION_DROPOUT = {
    "bert": {"attention_probs_dropout_prob": 1e-12, "hidden_dropout_prob": 0.0},
    "roberta": {"attention_probs_dropout_prob": 1e-12, "hidden_dropout_prob": 0.0},
    "electra": {"attention_probs_dropout_prob": 1e-12, "hidden_dropout_prob": 0.0},
    "distilbert": {"attention_dropout": 1e-12, "dropout": 0.0},
    "gpt2": {"attn_pdrop": 1e-12, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "llama": {"attention_dropout": 1e-12},
    "mistral": {"attention_dropout": 1e-12},
    "qwen2": {"attention_dropout": 1e-12},
    "gemma3": {"attention_dropout": 1e-12},
    "bart": {"attention_dropout": 1e-12, "dropout": 0.0, "activation_dropout": 0.0},
    "t5": {"dropout_rate": 1e-12},
}
# T5 passes its position bias, which the CPU path does not take, and DistilBERT in transformers 4.x
# has a hook patch that always calls SDPA.
CPU_PATH_FAMILIES = {family for family in TINY_ATTENTION_DROPOUT
                     if family != "t5" and not (TRANSFORMERS_MAJOR < 5 and family == "distilbert")}


@pytest.mark.parametrize("family", [
    pytest.param(family, marks=pytest.mark.skipif(family in NO_SDPA, reason=NO_SDPA_REASON))
    for family in TINY_ATTENTION_DROPOUT])
def test_dropout_training_matches_sdpa(family, monkeypatch):
    model = build_model(family, "sdpa", config_changes=TINY_ATTENTION_DROPOUT[family])
    enable_prefix_attention(model)
    sources = attach_prefixes(model, family)
    for source in sources:
        source.key.requires_grad_(True)
        source.value.requires_grad_(True)
    calls = []
    cpu_attention = prefix_attention.cpu_dropout_attention

    def counting_attention(*args):
        calls.append(args[0].shape)
        return cpu_attention(*args)

    monkeypatch.setattr(prefix_attention, "cpu_dropout_attention", counting_attention)
    batch, _, _ = padded_batch(family)

    def output_and_gradients(training: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.train(training)
        for source in sources:
            source.key.grad = source.value.grad = None
        output = model(**batch)
        main = output.logits if hasattr(output, "logits") else output.last_hidden_state
        main.square().sum().backward()
        return main.detach(), [tensor.grad for source in sources for tensor in (source.key, source.value)]

    expected, expected_gradients = output_and_gradients(False)
    assert not calls
    output, gradients = output_and_gradients(True)

    assert bool(calls) == (family in CPU_PATH_FAMILIES)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, atol=1e-5, rtol=1e-4)

    # Without prefixes, training runs the model's own attention.
    calls.clear()
    for module in attention_modules(model, family):
        set_prefix_source(module, None)
    model(**batch)
    assert not calls
    disable_prefix_attention(model)
    assert not [name for name, module in model.named_modules() if "forward" in module.__dict__]


# -- padding, implementations and generation -----------------------------------------------------


def padded_batch(family: str) -> tuple[dict, list[dict], list[slice]]:
    """Return a padded batch, each row's unpadded inputs, and each row's real positions in the batch output."""
    ids = token_ids(2, 7)
    lengths = (7, 4)
    if family in DECODERS:
        # Left padding, with position ids counted from the first real token as generate() does.
        mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        rows = [{"input_ids": ids[i:i + 1, 7 - n:]} for i, n in enumerate(lengths)]
        return batch, rows, [slice(7 - n, 7) for n in lengths]
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    batch = {"input_ids": ids, "attention_mask": mask}
    rows = [{"input_ids": ids[i:i + 1, :n]} for i, n in enumerate(lengths)]
    if family in SEQ2SEQ:
        decoder_ids = token_ids(2, 4, seed=2)
        batch["decoder_input_ids"] = decoder_ids
        for i, row in enumerate(rows):
            row["decoder_input_ids"] = decoder_ids[i:i + 1]
        return batch, rows, [slice(0, 4)] * 2
    return batch, rows, [slice(0, n) for n in lengths]


@pytest.mark.parametrize(("family", "implementation"), FAMILY_IMPLEMENTATIONS)
def test_padded_rows_equal_single_rows(family, implementation):
    model = build_model(family, implementation)
    enable_prefix_attention(model)
    attach_prefixes(model, family)
    batch, rows, positions = padded_batch(family)

    batch_output = run(model, family, **batch)

    for index, (row, real) in enumerate(zip(rows, positions)):
        torch.testing.assert_close(batch_output[index, real], run(model, family, **row)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", [
    pytest.param(family, marks=pytest.mark.skipif(family in NO_SDPA, reason=NO_SDPA_REASON))
    for family in INTERFACE_FAMILIES])
def test_sdpa_and_eager_agree(family):
    outputs = []
    for implementation in ("sdpa", "eager"):
        model = build_model(family, implementation)
        enable_prefix_attention(model)
        attach_prefixes(model, family)
        outputs.append(run(model, family))

    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma3"])
def test_grouped_query_prefix_skips_repeat(family, monkeypatch):
    # transformers' SDPA function copies every key/value head for its query heads when it gets a
    # mask, and the backward pass keeps the copies. Prefixed attention on the CPU calls SDPA with
    # enable_gqa instead.
    sdpa_module = sys.modules[ALL_ATTENTION_FUNCTIONS["sdpa"].__module__]
    repeat_kv = sdpa_module.repeat_kv
    repeats = []

    def counting_repeat_kv(hidden_states: torch.Tensor, groups: int) -> torch.Tensor:
        repeats.append(groups)
        return repeat_kv(hidden_states, groups)

    monkeypatch.setattr(sdpa_module, "repeat_kv", counting_repeat_kv)
    batch, _, _ = padded_batch(family)
    results = []
    for implementation in ("sdpa", "eager"):
        model = build_model(family, implementation)
        assert model.config.num_key_value_heads < model.config.num_attention_heads
        enable_prefix_attention(model)
        sources = attach_prefixes(model, family)
        for source in sources:
            source.key.requires_grad_(True)
            source.value.requires_grad_(True)
        logits = model(**batch).logits
        logits.square().sum().backward()
        results.append((logits, [tensor.grad for source in sources for tensor in (source.key, source.value)]))

    assert repeats == []
    (sdpa_logits, sdpa_grads), (eager_logits, eager_grads) = results
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-5, rtol=1e-4)
    for sdpa_grad, eager_grad in zip(sdpa_grads, eager_grads, strict=True):
        torch.testing.assert_close(sdpa_grad, eager_grad, atol=1e-4, rtol=1e-4)


def test_gpt2_reordered_upcast_attention():
    model = build_model("gpt2", "eager")
    model.config.reorder_and_upcast_attn = True
    for module in attention_modules(model, "gpt2"):
        module.reorder_and_upcast_attn = True
    bare = run(model, "gpt2")
    enable_prefix_attention(model)
    assert torch.equal(run(model, "gpt2"), bare)

    attach_prefixes(model, "gpt2")
    reordered = run(model, "gpt2")
    sdpa_model = build_model("gpt2", "sdpa")
    enable_prefix_attention(sdpa_model)
    attach_prefixes(sdpa_model, "gpt2")

    torch.testing.assert_close(reordered, run(sdpa_model, "gpt2"), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "bert", "distilbert", "mpnet", "deberta-v2"])
def test_attention_weights_include_prefix_columns(family):
    model = build_model(family, "eager")
    enable_prefix_attention(model)
    attach_prefixes(model, family)

    with torch.no_grad():
        attentions = model(input_ids=token_ids(2, 7), output_attentions=True).attentions

    assert len(attentions) == 2
    for weights in attentions:
        assert weights.shape == (2, 4, 7, PREFIX_LENGTH + 7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
        assert weights[..., :PREFIX_LENGTH].min() > 0


def test_multimodal_gemma3_switches_sub_configs():
    text_config = tiny_config("gemma3")
    vision_config = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                    intermediate_size=37, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                       mm_tokens_per_image=4, image_token_index=97, boi_token_index=95,
                                       eoi_token_index=96)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    ids = token_ids(2, 5)
    bare = run(model, "gemma3", input_ids=ids)
    enable_prefix_attention(model)
    language_attention = [module for name, module in model.named_modules()
                          if name.startswith("model.language_model.") and name.endswith(".self_attn")]
    for module in language_attention:
        set_prefix_source(module, FixedPrefix(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)))

    assert model.config.text_config._attn_implementation == IMPLEMENTATION_PREFIX + "sdpa"
    assert model.config.vision_config._attn_implementation == IMPLEMENTATION_PREFIX + "sdpa"
    assert all(module.config._attn_implementation == IMPLEMENTATION_PREFIX + "sdpa" for module in language_attention)
    assert (run(model, "gemma3", input_ids=ids) - bare).abs().max() > 1e-2
    disable_prefix_attention(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert torch.equal(run(model, "gemma3", input_ids=ids), bare)


def test_set_attn_implementation_after_enable():
    model = build_model("llama", "sdpa")
    enable_prefix_attention(model)
    attach_prefixes(model, "llama")
    prefixed = run(model, "llama")
    disable_prefix_attention(model)
    model.set_attn_implementation("eager")
    enable_prefix_attention(model)

    assert model.config._attn_implementation == IMPLEMENTATION_PREFIX + "eager"
    torch.testing.assert_close(run(model, "llama"), prefixed, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("family", "implementation"), [
    implementation_case(family, implementation) for implementation in ("sdpa", "eager")
    for family in ("llama", "mistral", "qwen2", "gpt2", "gemma3", "t5", "bart")])
def test_generate_with_and_without_cache(family, implementation):
    model = build_model(family, implementation)
    enable_prefix_attention(model)
    attach_prefixes(model, family)
    inputs = {"input_ids": token_ids(2, 5), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=model.config.pad_token_id,
                    return_dict_in_generate=True, output_logits=True)

    with torch.no_grad():
        cached_output = model.generate(**inputs, use_cache=True, **settings)
        uncached_output = model.generate(**inputs, use_cache=False, **settings)

    cached = cached_output.sequences
    assert torch.equal(cached, uncached_output.sequences)
    # A tiny random model can repeat one token, so the logits of every step are compared too.
    torch.testing.assert_close(torch.stack(cached_output.logits), torch.stack(uncached_output.logits),
                               atol=1e-5, rtol=1e-4)
    if family in SEQ2SEQ:
        start = torch.full((2, 1), model.config.decoder_start_token_id)
        logits = run(model, family, decoder_input_ids=start, **inputs)
        first = cached[:, 1]
    else:
        logits = run(model, family, **inputs)
        first = cached[:, 5]
    # min_new_tokens stops generate() from choosing the end-of-sequence token, so the plain argmax skips it too.
    next_logits = logits[:, -1].clone()
    next_logits[:, model.config.eos_token_id] = float("-inf")
    assert torch.equal(first, next_logits.argmax(-1))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_bert_decoder_is_causal_with_cache(implementation):
    # A BERT decoder runs with a KV cache, and its SDPA attention gets no mask on unpadded input.
    config = tiny_config("bert")
    config.is_decoder = True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    ids = token_ids(2, 7)
    bare = run(model, "bert", input_ids=ids)
    enable_prefix_attention(model)
    attach_prefixes(model, "bert")
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                    return_dict_in_generate=True, output_logits=True)

    full = run(model, "bert", input_ids=ids)
    head = run(model, "bert", input_ids=ids[:, :4])
    with torch.no_grad():
        cached = model.generate(input_ids=ids, use_cache=True, **settings)
        uncached = model.generate(input_ids=ids, use_cache=False, **settings)

    assert (full - bare).abs().max() > 1e-2
    # Positions 0-3 see neither later tokens nor a shifted causal pattern.
    torch.testing.assert_close(full[:, :4], head, atol=1e-5, rtol=1e-4)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-5, rtol=1e-4)


def test_generate_left_padded_with_and_without_cache():
    model = build_model("llama")
    enable_prefix_attention(model)
    attach_prefixes(model, "llama")
    mask = torch.tensor([[1] * 6, [0] * 2 + [1] * 4])
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        cached = model.generate(input_ids=token_ids(2, 6), attention_mask=mask, use_cache=True, **settings)
        uncached = model.generate(input_ids=token_ids(2, 6), attention_mask=mask, use_cache=False, **settings)
        alone = model.generate(input_ids=token_ids(2, 6)[1:, 2:], use_cache=True, **settings)

    assert torch.equal(cached, uncached)
    assert torch.equal(cached[1, 6:], alone[0, 4:])


@pytest.mark.parametrize("settings", [{"cache_implementation": "static"}, {"num_beams": 2}],
                         ids=["static-cache", "beam-search"])
def test_generate_variants_match_dynamic_cache(settings):
    # Prefill into an empty static cache gives the sdpa wrapper a None mask with more keys than
    # queries, and beam search expands the batch after the prefix sources were written for batch 1.
    model = build_model("llama")
    enable_prefix_attention(model)
    attach_prefixes(model, "llama")
    inputs = {"input_ids": token_ids(2, 5), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    common = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        reference = model.generate(**inputs, use_cache=False, num_beams=settings.get("num_beams", 1), **common)
        variant = model.generate(**inputs, **settings, **common)

    assert torch.equal(variant, reference)


def test_cache_holds_no_prefix():
    model = build_model("llama")
    enable_prefix_attention(model)
    attach_prefixes(model, "llama")

    with torch.no_grad():
        output = model(input_ids=token_ids(2, 5), use_cache=True)

    assert output.past_key_values.get_seq_length() == 5
    assert output.past_key_values.layers[0].keys.shape[2] == 5


# -- copies, gradients, dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama", "t5", "mpnet", "deberta-v2"])
def test_deepcopy_and_pickle_keep_outputs(family):
    model = build_model(family)
    enable_prefix_attention(model)
    attach_prefixes(model, family)
    prefixed = run(model, family)

    copied = copy.deepcopy(model)
    unpickled = pickle.loads(pickle.dumps(model))

    assert torch.equal(run(copied, family), prefixed)
    assert torch.equal(run(unpickled, family), prefixed)
    assert get_prefix_source(attention_modules(unpickled, family)[0]) is not None
    disable_prefix_attention(copied)
    set_prefix_source(attention_modules(model, family)[0], None)
    assert torch.equal(run(unpickled, family), prefixed)


@pytest.mark.parametrize("family", ["bert", "llama", "t5", "mpnet", "deberta-v2"])
def test_gradient_reaches_prefix_only(family):
    model = build_model(family)
    model.requires_grad_(False)
    enable_prefix_attention(model)
    kv_heads, head_dim = kv_shape(model)
    modules = attention_modules(model, family)
    torch.manual_seed(3)
    prefix = PrefixTuning(len(modules), kv_heads, head_dim, 32, prefix_length=2, bottleneck_size=8)
    for layer, module in enumerate(modules):
        set_prefix_source(module, LayerPrefix(prefix, layer))
    inputs = seq2seq_inputs() if family in SEQ2SEQ else {"input_ids": token_ids()}

    output = model(**inputs)
    main = output.logits if hasattr(output, "logits") else output.last_hidden_state
    main.square().sum().backward()

    assert not [name for name, p in model.named_parameters() if p.grad is not None]
    missing = [name for name, p in prefix.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# The query projection of each family whose attention goes through hook patches: every family here
# on transformers 4.57, MPNet and DeBERTa-v2 on 5.
QUERY_PROJECTIONS = {"bert": "query", "distilbert": "q_lin", "t5": "q", "mpnet": "q", "deberta-v2": "query_proj"}


class RecordingPrefix(FixedPrefix):
    """A ``FixedPrefix`` that keeps a copy of every query it is handed."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__(key, value)
        self.queries = []

    def __call__(self, module: nn.Module, query: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.queries.append(query.clone())
        return super().__call__(module, query)


class ShapeOnlyPrefix(RecordingPrefix):
    """A ``RecordingPrefix`` that declares it reads only the query's shape, dtype and device."""

    reads_query = False


@pytest.mark.parametrize("family", list(QUERY_PROJECTIONS))
def test_shape_only_source_runs_query_once(family):
    model = build_model(family)
    enable_prefix_attention(model)
    reading = attach_prefixes(model, family)
    expected = run(model, family)
    modules = attention_modules(model, family)
    shape_only = [ShapeOnlyPrefix(source.key, source.value) for source in reading]
    for module, source in zip(modules, shape_only):
        set_prefix_source(module, source)
    projected = []
    handles = [getattr(module, QUERY_PROJECTIONS[family]).register_forward_hook(
        lambda linear, args, output: projected.append(output.shape)) for module in modules]
    output = run(model, family)
    for handle in handles:
        handle.remove()

    # One query projection of the batch per attention call: the module's own. DeBERTa-v2 also projects
    # its relative position embeddings (batch 1) with the same layer.
    assert sum(shape[0] == 2 for shape in projected) == len(modules)
    assert torch.equal(output, expected)
    for source in shape_only:
        assert len(source.queries) == 1
        query = source.queries[0]
        assert query.shape[:2] == (2, 4)
        assert query.shape[2] in (4, 7)  # T5 decoder queries have 4 tokens, every encoder query 7
        assert query.dtype == torch.float32


@pytest.mark.parametrize("family", ["mpnet", "deberta-v2"])
def test_prefix_adapter_runs_query_once(family):
    import adapterkit

    model = adapterkit.init(build_model(family))
    model.add_adapter("prefix", adapterkit.PrefixTuningConfig(prefix_length=3, bottleneck_size=8))
    model.set_active_adapters("prefix")
    modules = attention_modules(model, family)
    projected = []
    handles = [getattr(module, QUERY_PROJECTIONS[family]).register_forward_hook(
        lambda linear, args, output: projected.append(output.shape)) for module in modules]
    run(model, family)
    for handle in handles:
        handle.remove()

    assert modules
    assert sum(shape[0] == 2 for shape in projected) == len(modules)


def test_reading_source_gets_real_query():
    model = build_model("mpnet")
    enable_prefix_attention(model)
    fixed = attach_prefixes(model, "mpnet")[1]
    attention = model.encoder.layer[1].attention.attn
    source = RecordingPrefix(fixed.key, fixed.value)
    set_prefix_source(attention, source)
    record = capture_call(attention)
    run(model, "mpnet")

    hidden = inspect.signature(attention.forward).bind(*record["args"], **record["kwargs"]).arguments["hidden_states"]
    assert len(source.queries) == 1
    assert torch.equal(source.queries[0], heads(attention.q(hidden), 4))


@pytest.mark.parametrize("family", ["llama", "bert", "t5", "gpt2", "mpnet", "deberta-v2"])
def test_bfloat16_model_keeps_dtype(family):
    model = build_model(family)
    enable_prefix_attention(model)
    sources = attach_prefixes(model, family)
    reference = run(model, family)
    model.to(torch.bfloat16)
    for source in sources:
        source.key, source.value = source.key.bfloat16(), source.value.bfloat16()
    returned = []

    def spy(module, args, output):
        returned.append(output[0].dtype)

    handles = [module.register_forward_hook(spy) for module in attention_modules(model, family)]
    output = run(model, family)
    for handle in handles:
        handle.remove()

    assert output.dtype == torch.bfloat16
    assert set(returned) == {torch.bfloat16}
    torch.testing.assert_close(output.float(), reference, atol=0.15, rtol=0.1)


# -- errors --------------------------------------------------------------------------------------


def test_flash_implementation_rejected():
    model = build_model("llama")
    model.config._attn_implementation_internal = "flash_attention_2"

    with pytest.raises(ValueError, match="flash_attention_2.*sdpa"):
        enable_prefix_attention(model)
    assert model.config._attn_implementation == "flash_attention_2"


def test_deberta_v1_not_implemented():
    torch.manual_seed(0)
    config = transformers.DebertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=37, vocab_size=VOCAB_SIZE)
    model = transformers.AutoModel.from_config(config)

    with pytest.raises(NotImplementedError, match="'deberta'"):
        enable_prefix_attention(model)


@pytest.mark.parametrize("family", ["llama", "mpnet"])
def test_wrong_prefix_shape_rejected(family):
    model = build_model(family)
    enable_prefix_attention(model)
    kv_heads, head_dim = kv_shape(model)
    module = attention_modules(model, family)[0]
    set_prefix_source(module, FixedPrefix(torch.zeros(1, kv_heads + 1, 2, head_dim),
                                          torch.zeros(1, kv_heads + 1, 2, head_dim)))

    with pytest.raises(ValueError, match=f"expected \\(1 or 2, {kv_heads}, prefix_length, {head_dim}\\)"):
        run(model, family)


def test_non_callable_source_rejected():
    model = build_model("bert")

    with pytest.raises(TypeError, match="not callable"):
        set_prefix_source(model.encoder.layer[0].attention.self, "prefix")


def test_several_prefixes_concatenate_in_order():
    model = build_model("bert")
    enable_prefix_attention(model)
    kv_heads, head_dim = kv_shape(model)
    generator = torch.Generator().manual_seed(4)
    parts = [(torch.randn(1, kv_heads, n, head_dim, generator=generator),
              torch.randn(1, kv_heads, n, head_dim, generator=generator)) for n in (2, 3)]
    modules = attention_modules(model, "bert")

    class TwoPrefixes:
        def __call__(self, module, query):
            return parts

    for module in modules:
        set_prefix_source(module, TwoPrefixes())
    two = run(model, "bert")
    joined = FixedPrefix(torch.cat([parts[0][0], parts[1][0]], dim=2), torch.cat([parts[0][1], parts[1][1]], dim=2))
    for module in modules:
        set_prefix_source(module, joined)

    torch.testing.assert_close(run(model, "bert"), two, atol=1e-6, rtol=0)


# -- T5's relative position bias over a concatenated prefix --------------------------------------


class ConcatenatedPrefix(FixedPrefix):
    """A prefix source whose prefix requests T5's relative bias over prefix and real keys together."""

    def __call__(self, module: nn.Module, query: torch.Tensor) -> list[PrefixPair]:
        self.calls += 1
        return [PrefixPair(self.key.to(query.dtype), self.value.to(query.dtype), "concatenated")]


def attach_concatenated(model: nn.Module, modules: list[nn.Module], seed: int = 5) -> dict[nn.Module, FixedPrefix]:
    kv_heads, head_dim = kv_shape(model)
    generator = torch.Generator().manual_seed(seed)
    sources = {}
    for module in modules:
        source = ConcatenatedPrefix(torch.randn(1, kv_heads, PREFIX_LENGTH, head_dim, generator=generator),
                                    torch.randn(1, kv_heads, PREFIX_LENGTH, head_dim, generator=generator))
        set_prefix_source(module, source)
        sources[module] = source
    return sources


def concatenated_bias(bias_layer: nn.Module, q_len: int, k_len: int, prefix_length: int) -> torch.Tensor:
    """T5's bias with key ``j`` of ``[prefix; keys]`` at position ``j`` and query ``i`` at ``i``: ``(1, heads, q, p + k)``."""
    relative = torch.arange(prefix_length + k_len)[None, :] - torch.arange(q_len)[:, None]
    buckets = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        relative, bidirectional=not bias_layer.is_decoder, num_buckets=bias_layer.relative_attention_num_buckets,
        max_distance=bias_layer.relative_attention_max_distance)
    return bias_layer.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


def expected_t5_attention(attention: nn.Module, hidden: torch.Tensor, source: FixedPrefix | None,
                          bias: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """T5 attention by hand (no score scaling): ``bias`` covers the prefix columns, ``visible`` the real keys."""
    batch = hidden.shape[0]
    keys, values = heads(attention.k(hidden), 4), heads(attention.v(hidden), 4)
    length = 0
    if source is not None:
        length = source.key.shape[2]
        keys = torch.cat([source.key.expand(batch, -1, -1, -1), keys], dim=2)
        values = torch.cat([source.value.expand(batch, -1, -1, -1), values], dim=2)
    visible = torch.cat([torch.ones(*visible.shape[:-1], length, dtype=torch.bool), visible], dim=-1)
    return attention.o(hand_attention(heads(attention.q(hidden), 4), keys, values, bias.masked_fill(~visible,
                                                                                                      float("-inf"))))


@pytest.mark.parametrize("implementation", [
    pytest.param("sdpa", marks=pytest.mark.skipif("t5" in NO_SDPA, reason=NO_SDPA_REASON)), "eager"])
def test_t5_concatenated_bias_matches_hand_computation(implementation):
    model = build_model("t5", implementation)
    enable_prefix_attention(model)
    modules = attention_modules(model, "t5")
    sources = attach_concatenated(model, modules)
    encoder = [block.layer[0].SelfAttention for block in model.encoder.block]
    decoder = [block.layer[0].SelfAttention for block in model.decoder.block]
    records = {module: capture_call(module) for module in encoder + decoder}
    padding = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    inputs = seq2seq_inputs()
    run(model, "t5", attention_mask=padding, **inputs)

    # Every layer of a stack uses the bias of the stack's first layer, computed over prefix + keys.
    encoder_bias = concatenated_bias(encoder[0], 7, 7, PREFIX_LENGTH)
    for module in encoder:
        hidden = records[module]["args"][0]
        expected = expected_t5_attention(module, hidden, sources[module], encoder_bias, padding.bool()[:, None, None])
        output, returned_bias = records[module]["output"][:2]
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)
        assert returned_bias.shape[-1] == PREFIX_LENGTH + 7
    decoder_bias = concatenated_bias(decoder[0], 4, 4, PREFIX_LENGTH)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    for module in decoder:
        expected = expected_t5_attention(module, records[module]["args"][0], sources[module], decoder_bias, causal)
        torch.testing.assert_close(records[module]["output"][0], expected, atol=1e-5, rtol=0)
    # The shifted bias differs from the one with zero bias on the prefix, or this test would prove nothing.
    zero_bias = F.pad(concatenated_bias(encoder[0], 7, 7, 0), (PREFIX_LENGTH, 0))
    assert (encoder_bias - zero_bias).abs().max() > 1e-2


@pytest.mark.parametrize("implementation", [
    pytest.param("sdpa", marks=pytest.mark.skipif("t5" in NO_SDPA, reason=NO_SDPA_REASON)), "eager"])
def test_t5_bias_zero_after_prefix_change(implementation):
    # As in adapters 1.3.0: from the first layer whose prefix length differs from the first layer's on,
    # the layers of a stack get zero relative bias. Here encoder layer 0 and decoder layer 1 have no prefix.
    model = build_model("t5", implementation)
    enable_prefix_attention(model)
    encoder = [block.layer[0].SelfAttention for block in model.encoder.block]
    decoder = [block.layer[0].SelfAttention for block in model.decoder.block]
    sources = attach_concatenated(model, [encoder[1], decoder[0]])
    records = {module: capture_call(module) for module in encoder + decoder}
    padding = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    run(model, "t5", attention_mask=padding, **seq2seq_inputs())

    visible = padding.bool()[:, None, None]
    plain = expected_t5_attention(encoder[0], records[encoder[0]]["args"][0], None,
                                  concatenated_bias(encoder[0], 7, 7, 0), visible)
    torch.testing.assert_close(records[encoder[0]]["output"][0], plain, atol=1e-5, rtol=0)
    zeroed = expected_t5_attention(encoder[1], records[encoder[1]]["args"][0], sources[encoder[1]],
                                   torch.zeros(1, 4, 7, PREFIX_LENGTH + 7), visible)
    torch.testing.assert_close(records[encoder[1]]["output"][0], zeroed, atol=1e-5, rtol=0)

    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    first = expected_t5_attention(decoder[0], records[decoder[0]]["args"][0], sources[decoder[0]],
                                  concatenated_bias(decoder[0], 4, 4, PREFIX_LENGTH), causal)
    torch.testing.assert_close(records[decoder[0]]["output"][0], first, atol=1e-5, rtol=0)
    without_prefix = expected_t5_attention(decoder[1], records[decoder[1]]["args"][0], None,
                                           torch.zeros(1, 4, 4, 4), causal)
    torch.testing.assert_close(records[decoder[1]]["output"][0], without_prefix, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", [
    pytest.param("sdpa", marks=pytest.mark.skipif("t5" in NO_SDPA, reason=NO_SDPA_REASON)), "eager"])
def test_t5_concatenated_generate_cache_agrees(implementation):
    model = build_model("t5", implementation)
    enable_prefix_attention(model)
    attach_concatenated(model, attention_modules(model, "t5"))
    inputs = {"input_ids": token_ids(2, 5), "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2])}
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                    return_dict_in_generate=True, output_logits=True)

    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **settings)
        uncached = model.generate(**inputs, use_cache=False, **settings)
    start = torch.full((2, 1), model.config.decoder_start_token_id)
    logits = run(model, "t5", decoder_input_ids=start, **inputs)

    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-5, rtol=1e-4)
    next_logits = logits[:, -1].clone()
    next_logits[:, model.config.eos_token_id] = float("-inf")
    assert torch.equal(cached.sequences[:, 1], next_logits.argmax(-1))


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_concatenated_bias_without_relative_bias(family):
    model = build_model(family)
    enable_prefix_attention(model)
    modules = attention_modules(model, family)
    attach_prefixes(model, family)
    zero = run(model, family)
    attach_concatenated(model, modules)

    assert torch.equal(run(model, family), zero)


def test_concatenated_bias_rejected_on_mpnet():
    model = build_model("mpnet")
    enable_prefix_attention(model)
    attach_concatenated(model, attention_modules(model, "mpnet"))

    with pytest.raises(NotImplementedError, match="position_bias='concatenated'.*MPNetSelfAttention"):
        run(model, "mpnet")


@pytest.mark.parametrize(("modes", "message"), [(("zero", "concatenated"), "one position bias"),
                                                (("sideways",), "position_bias='sideways'")])
def test_prefix_position_bias_modes_checked(modes, message):
    model = build_model("t5")
    enable_prefix_attention(model)
    kv_heads, head_dim = kv_shape(model)
    pairs = [PrefixPair(torch.zeros(1, kv_heads, 2, head_dim), torch.zeros(1, kv_heads, 2, head_dim), mode)
             for mode in modes]

    class Pairs:
        def __call__(self, module, query):
            return pairs

    set_prefix_source(model.encoder.block[0].layer[0].SelfAttention, Pairs())
    with pytest.raises(ValueError, match=message):
        run(model, "t5")
