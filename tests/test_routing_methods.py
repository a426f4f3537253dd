"""Per-row routing and row-group blocks for prefix tuning, prompt tuning, invertible and before-head adapters.

Every expected value comes from a run with one adapter active alone (or none) on the same inputs,
never from the routing code under test. Each test also checks that the adapters change the output,
so a routing that ignored them would fail.
"""

import pytest
import torch
import transformers
from adapter_helpers import randomize_parameters

import adapterkit
from adapterkit import (BatchSplit, BottleneckConfig, InvertibleConfig, LoRAConfig, Parallel, PrefixTuningConfig,
                        PromptTuningConfig, Stack)

FAMILIES = ("bert", "gpt2", "llama", "t5")
CAUSAL_FAMILIES = ("gpt2", "llama")
TOLERANCE = 1e-5
ROUTE = ["a", "b", None, "a"]
PAD_ID = 0


def routed_model(model, configs, std=0.3):
    """Return ``model`` with adapterkit and the randomised adapters ``configs`` (name to config), none active."""
    model = adapterkit.init(model)
    for seed, (name, config) in enumerate(configs.items()):
        model.add_adapter(name, config)
        randomize_parameters(model._adapterkit.modules_of(name), std=std, seed=10 + seed)
    return model


def padded_inputs(family, input_ids):
    """Return ``input_ids`` with padding in rows 1 and 3 and its attention mask.

    Causal models and T5 (whose classifier reads the last ``<eos>``) are padded on the left, BERT on the right.
    """
    input_ids = input_ids.clone()
    mask = torch.ones_like(input_ids)
    for row, count in ((1, 2), (3, 3)):
        if family == "bert":
            mask[row, -count:] = 0
            input_ids[row, -count:] = PAD_ID
        else:
            mask[row, :count] = 0
            input_ids[row, :count] = PAD_ID
    return input_ids, mask


@torch.no_grad()
def outputs_alone(model, names, **inputs):
    """Return the logits of each adapter in ``names`` (``None``: no adapter) active alone, by name."""
    expected = {}
    for name in dict.fromkeys(names):
        model.set_active_adapters(name)
        expected[name] = model(**inputs).logits
    model.set_active_adapters(None)
    return expected


def assert_rows_match(routed, expected, names):
    for row, name in enumerate(names):
        torch.testing.assert_close(routed[row], expected[name][row], atol=TOLERANCE, rtol=0,
                                   msg=lambda text, row=row, name=name: f"row {row} ({name}): {text}")


def assert_adapters_differ(expected, names):
    """Check that every two adapters of ``names`` give different outputs, so routing mistakes would show."""
    distinct = list(dict.fromkeys(names))
    for index, first in enumerate(distinct):
        for second in distinct[index + 1:]:
            assert (expected[first] - expected[second]).abs().max() > 1e-3, (first, second)


@torch.no_grad()
def check_routed_rows(model, names, **inputs):
    expected = outputs_alone(model, names, **inputs)
    routed = model(**inputs, adapter_names=names).logits
    assert_adapters_differ(expected, names)
    assert_rows_match(routed, expected, names)


# -- prefix tuning -------------------------------------------------------------------------------------

PREFIXES = {"a": PrefixTuningConfig(prefix_length=3), "b": PrefixTuningConfig(prefix_length=5)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", (False, True), ids=("unpadded", "padded"))
def test_prefix_rows_match_single_adapters(tiny_model, tiny_inputs, family, padded):
    model = routed_model(tiny_model(family), PREFIXES)
    input_ids = tiny_inputs(family, batch_size=4)
    mask = None
    if padded:
        input_ids, mask = padded_inputs(family, input_ids)
    check_routed_rows(model, ROUTE, input_ids=input_ids, attention_mask=mask)


@pytest.mark.parametrize("family", ("mpnet", "deberta-v2"))
def test_prefix_rows_hook_patch_families(tiny_model, tiny_inputs, family):
    model = routed_model(tiny_model(family), PREFIXES)
    input_ids, mask = padded_inputs("bert", tiny_inputs(family, batch_size=4))
    check_routed_rows(model, ROUTE, input_ids=input_ids, attention_mask=mask)


@pytest.mark.parametrize("family", ("bert", "gpt2"))
def test_prefix_rows_eager_attention(tiny_model, tiny_inputs, family):
    model = routed_model(tiny_model(family, _attn_implementation="eager"), PREFIXES)
    input_ids, mask = padded_inputs(family, tiny_inputs(family, batch_size=4))
    check_routed_rows(model, ROUTE, input_ids=input_ids, attention_mask=mask)
    check_routed_rows(model, ROUTE, input_ids=input_ids)


@pytest.mark.parametrize("family", ("bert", "gpt2"))
def test_gated_prefix_rows(tiny_model, tiny_inputs, family):
    configs = {"a": PrefixTuningConfig(prefix_length=3, use_gating=True),
               "b": PrefixTuningConfig(prefix_length=5, use_gating=True)}
    model = routed_model(tiny_model(family), configs)
    input_ids, mask = padded_inputs(family, tiny_inputs(family, batch_size=4))
    check_routed_rows(model, ROUTE, input_ids=input_ids, attention_mask=mask)


@pytest.mark.parametrize("family", ("bert", "gpt2", "llama"))
def test_shifted_prefix_rows(tiny_model, tiny_inputs, family):
    configs = {"a": PrefixTuningConfig(prefix_length=3, shift_positions=True),
               "b": PrefixTuningConfig(prefix_length=5, shift_positions=True)}
    model = routed_model(tiny_model(family), configs)
    check_routed_rows(model, ROUTE, input_ids=tiny_inputs(family, batch_size=4))


def test_concatenated_bias_needs_equal_lengths(tiny_model, tiny_inputs):
    configs = {"a": PrefixTuningConfig(prefix_length=3, position_bias="concatenated"),
               "b": PrefixTuningConfig(prefix_length=5, position_bias="concatenated"),
               "c": PrefixTuningConfig(prefix_length=3, position_bias="concatenated")}
    model = routed_model(tiny_model("t5"), configs)
    input_ids = tiny_inputs("t5", batch_size=2)
    check_routed_rows(model, ["a", "c"], input_ids=input_ids)
    with pytest.raises(NotImplementedError, match=r"prefix lengths \[3, 5\]"):
        model(input_ids=input_ids, adapter_names=["a", "b"])


def test_prefix_batch_split_and_parallel(tiny_model, tiny_inputs):
    model = routed_model(tiny_model("gpt2"), PREFIXES)
    input_ids, mask = padded_inputs("gpt2", tiny_inputs("gpt2", batch_size=4))
    expected = outputs_alone(model, ["a", "b"], input_ids=input_ids, attention_mask=mask)
    model.set_active_adapters(["a", "b"])
    with torch.no_grad():
        stacked = model(input_ids=input_ids, attention_mask=mask).logits

        model.set_active_adapters(BatchSplit("a", Stack("a", "b"), "b", batch_sizes=[1, 2, 1]))
        split = model(input_ids=input_ids, attention_mask=mask).logits
        model.set_active_adapters(Parallel("a", "b"))
        parallel = model(input_ids=input_ids, attention_mask=mask).logits

    torch.testing.assert_close(split[:1], expected["a"][:1], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(split[1:3], stacked[1:3], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(split[3:], expected["b"][3:], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(parallel[:4], expected["a"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(parallel[4:], expected["b"], atol=TOLERANCE, rtol=0)
    assert (stacked - expected["b"]).abs().max() > 1e-3


# -- prompt tuning -------------------------------------------------------------------------------------

PROMPTS = {"a": PromptTuningConfig(prompt_length=3), "b": PromptTuningConfig(prompt_length=5)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", (False, True), ids=("unpadded", "padded"))
def test_prompt_rows_match_single_adapters(tiny_model, tiny_inputs, family, padded):
    model = routed_model(tiny_model(family), PROMPTS)
    input_ids = tiny_inputs(family, batch_size=4)
    mask = None
    if padded:
        input_ids, mask = padded_inputs(family, input_ids)
    check_routed_rows(model, ROUTE, input_ids=input_ids, attention_mask=mask)


def test_prompt_batch_split(tiny_model, tiny_inputs):
    model = routed_model(tiny_model("bert"), PROMPTS)
    input_ids, mask = padded_inputs("bert", tiny_inputs("bert", batch_size=4))
    expected = outputs_alone(model, ["a", "b"], input_ids=input_ids, attention_mask=mask)
    model.set_active_adapters(["a", "b"])
    with torch.no_grad():
        stacked = model(input_ids=input_ids, attention_mask=mask).logits
        model.set_active_adapters(BatchSplit("b", Stack("a", "b"), batch_sizes=[2, 2]))
        split = model(input_ids=input_ids, attention_mask=mask).logits

    torch.testing.assert_close(split[:2], expected["b"][:2], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(split[2:], stacked[2:], atol=TOLERANCE, rtol=0)
    assert (stacked - expected["b"]).abs().max() > 1e-3


# -- invertible and before-head adapters ---------------------------------------------------------------

INVERTIBLES = {"a": InvertibleConfig(), "b": InvertibleConfig(block_type="glow")}
BEFORE_HEAD = BottleneckConfig(mh_adapter=False, output_adapter=False, before_head=True, reduction_factor=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_invertible_rows_match_single_adapters(tiny_model, tiny_inputs, family):
    model = routed_model(tiny_model(family), INVERTIBLES)
    input_ids = tiny_inputs(family, batch_size=4)
    check_routed_rows(model, ROUTE, input_ids=input_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_before_head_rows_match_single_adapters(tiny_model, tiny_inputs, family):
    model = routed_model(tiny_model(family), {"a": BEFORE_HEAD, "b": BEFORE_HEAD})
    check_routed_rows(model, ROUTE, input_ids=tiny_inputs(family, batch_size=4))


def language_model(family):
    """Return a tiny causal LM (gpt2, llama) or seq2seq LM (t5) whose output embeddings are tied to the input ones."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64,
                                         pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=1, initializer_range=0.1)
        return transformers.AutoModelForCausalLM.from_config(config).eval()
    config = transformers.T5Config(d_model=32, d_kv=16, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                                   vocab_size=99, feed_forward_proj="gated-gelu", pad_token_id=PAD_ID, eos_token_id=1,
                                   decoder_start_token_id=PAD_ID)
    return transformers.AutoModelForSeq2SeqLM.from_config(config).eval()


def test_stacked_invertibles_invert_in_reverse_order(tiny_inputs):
    configs = {"a": InvertibleConfig(), "b": InvertibleConfig(block_type="glow"), "head": BEFORE_HEAD}
    model = routed_model(language_model("gpt2"), configs)
    input_ids = tiny_inputs("gpt2", batch_size=3)
    expected = outputs_alone(model, ["b", None], input_ids=input_ids)
    model.set_active_adapters(["a", "b", "head"])
    with torch.no_grad():
        stacked = model(input_ids=input_ids).logits

        model.set_active_adapters(BatchSplit(Stack("a", "b", "head"), "b", batch_sizes=[2, 1]))
        split = model(input_ids=input_ids).logits
        routed = model(input_ids=input_ids, adapter_names=["b", None, "b"]).logits

    torch.testing.assert_close(split[:2], stacked[:2], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(split[2:], expected["b"][2:], atol=TOLERANCE, rtol=0)
    assert_rows_match(routed, expected, ["b", None, "b"])
    assert (stacked - expected["b"]).abs().max() > 1e-3


# -- a mix of methods ----------------------------------------------------------------------------------

MIXED = {"lora": LoRAConfig(r=4), "prefix": PrefixTuningConfig(prefix_length=4), "pfeiffer": "pfeiffer",
         "invertible": InvertibleConfig(), "unipelt": "unipelt", "prompt": PromptTuningConfig(prompt_length=2)}


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_methods_in_one_batch(tiny_model, tiny_inputs, family):
    model = routed_model(tiny_model(family), MIXED, std=0.2)
    names = ["lora", "prefix", None, "pfeiffer", "invertible", "unipelt", "prompt"]
    input_ids = tiny_inputs(family, batch_size=len(names))
    check_routed_rows(model, names, input_ids=input_ids)


# -- generation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ("gpt2", "t5"))
@pytest.mark.parametrize("num_beams", (1, 2))
@pytest.mark.parametrize("configs", (PREFIXES, PROMPTS), ids=("prefix", "prompt"))
def test_generate_with_routed_adapters(tiny_inputs, family, num_beams, configs):
    model = routed_model(language_model(family), configs)
    input_ids, mask = padded_inputs("gpt2", tiny_inputs("gpt2", batch_size=4, length=6))
    settings = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=PAD_ID, eos_token_id=None)
    expected = []
    with torch.no_grad():
        for row, name in enumerate(ROUTE):
            model.set_active_adapters(name)
            alone = model.generate(input_ids=input_ids[row:row + 1], attention_mask=mask[row:row + 1], **settings)
            expected.append(alone[0].tolist())
        model.set_active_adapters(None)
        routed = model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=ROUTE, **settings)

    for row in range(len(ROUTE)):
        assert routed[row].tolist() == expected[row], f"row {row} ({ROUTE[row]})"
    assert len({tuple(tokens) for tokens in expected[:3]}) > 1


# -- errors --------------------------------------------------------------------------------------------

def test_unknown_names_still_raise(tiny_model, tiny_inputs):
    model = routed_model(tiny_model("bert"), PREFIXES)
    with pytest.raises(ValueError) as error:
        model(input_ids=tiny_inputs("bert", batch_size=3), adapter_names=["a", "nope", None])
    assert "'nope'" in str(error.value)
