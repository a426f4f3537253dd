"""Merging LoRA and (IA)^3 adapters into the base weights, unmerging, merge_and_unload and weighted combinations.

Every check compares against values computed without the merge code. Those are the unmerged
model's outputs (adapters run through hooks), a copy of the base state dict taken before any
adapter was added, and updates ``scaling * B A`` computed here from the adapters' own parameters.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

import adapterkit
from adapterkit import BottleneckConfig, ConfigUnion, IA3Config, LoRAConfig

ALL_ROLES = ("query", "key", "value", "attention_output", "ff_in", "ff_out")
FAMILIES = ("bert", "roberta", "gpt2", "llama", "t5", "bart")
SEQ2SEQ = ("t5", "bart")
MODEL_CLASSES = {
    "bert": transformers.AutoModelForSequenceClassification,
    "roberta": transformers.AutoModelForSequenceClassification,
    "gpt2": transformers.AutoModelForCausalLM,
    "llama": transformers.AutoModelForCausalLM,
    "t5": transformers.AutoModelForSeq2SeqLM,
    "bart": transformers.AutoModelForSeq2SeqLM,
}
CONFIGS = {
    "lora-qv": LoRAConfig(r=4, alpha=8),
    "lora-all": LoRAConfig(r=8, alpha=16, targets=ALL_ROLES),
    "lora-ffn-block0": LoRAConfig(r=2, alpha=2, targets=("ff_in", "ff_out"), leave_out=(1,)),
    "ia3-kv-ffout": IA3Config(),
    "ia3-all": IA3Config(targets=ALL_ROLES),
    "union-lora-ia3": ConfigUnion(LoRAConfig(r=4, targets=ALL_ROLES), IA3Config(targets=ALL_ROLES)),
    "union-ia3-lora": ConfigUnion(IA3Config(targets=("key", "ff_out")), LoRAConfig(r=4, targets=ALL_ROLES)),
    "ia3-ffout-output": IA3Config(targets=("value", "ff_out"), ff_out_side="output"),
}
# Three adapters of one method that share projections, for the merge-order tests.
GROUPS = {
    "lora": (LoRAConfig(r=4, targets=ALL_ROLES), LoRAConfig(r=2, alpha=6, targets=("query", "value", "ff_out")),
             LoRAConfig(r=8, targets=("key", "value", "ff_in"))),
    "ia3": (IA3Config(targets=ALL_ROLES), IA3Config(), IA3Config(targets=("query", "ff_in", "ff_out"))),
}
OUTPUT_TOLERANCE = dict(atol=1e-5, rtol=0)
WEIGHT_TOLERANCE = dict(atol=1e-6, rtol=0)


# -- helpers --------------------------------------------------------------------------------------

@pytest.fixture
def build(tiny_model, no_dropout):
    """The function ``build(family, seed=0)``: a tiny float32 model of the task class in ``MODEL_CLASSES``.

    The config comes from the shared tiny classifier of ``family``, without dropout. The llama model
    ties its output embeddings to its input embeddings. Biases start at zero in every family, so
    they are redrawn from normal(0, 0.1): (IA)^3 must scale them too.
    """
    def build_model(family: str, seed: int = 0) -> torch.nn.Module:
        config = tiny_model(family, **no_dropout(family)).config
        if family == "llama":
            config.tie_word_embeddings = True
        torch.manual_seed(seed)
        model = MODEL_CLASSES[family].from_config(config).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(std=0.1)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        return model

    return build_model


def forward(model, family, input_ids):
    """Return the logits and the last hidden state of every stack, flattened into one vector.

    Classifier logits of these tiny models are about 0.01, so the hidden states (about 1) carry
    most of the sensitivity of an output comparison.
    """
    with torch.no_grad():
        if family in SEQ2SEQ:
            output = model(input_ids=input_ids, decoder_input_ids=input_ids, output_hidden_states=True)
            pieces = [output.logits, output.encoder_last_hidden_state, output.decoder_hidden_states[-1]]
        else:
            output = model(input_ids=input_ids, output_hidden_states=True)
            pieces = [output.logits, output.hidden_states[-1]]
    return torch.cat([piece.flatten() for piece in pieces])


@torch.no_grad()
def randomize(model, name, seed):
    """Draw LoRA ``A`` and ``B`` from normal(0, 0.1) and (IA)^3 scales from uniform(0.5, 1.5)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter_name, parameter in model._adapterkit.modules_of(name)["methods"].named_parameters():
        if parameter_name.endswith("scale"):
            parameter.copy_(torch.empty(parameter.shape).uniform_(0.5, 1.5, generator=generator))
        else:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def base_state(model):
    """Return a copy of every base-model tensor in the state dict (adapter modules excluded)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()
            if not key.startswith("adapterkit.")}


def changed_keys(model, base):
    state = model.state_dict()
    return [key for key, value in base.items() if not torch.equal(state[key], value)]


def assert_base_restored(model, base, when=""):
    state = model.state_dict()
    for key, expected in base.items():
        torch.testing.assert_close(state[key], expected, **WEIGHT_TOLERANCE,
                                   msg=lambda m, key=key: f"{key} not restored {when}: {m}")


def lora_updates(model, name):
    """Return ``{(block, role, number): alpha / r * B A}`` in float64 for LoRA adapter ``name``."""
    config = model.adapter_config(name)
    layers = model._adapterkit.modules_of(name)["methods"]["0"]["layers"]
    updates = {}
    for block, roles in layers.items():
        for role, modules in roles.items():
            for number, module in enumerate(modules):
                updates[(int(block), role, number)] = (
                    module.lora_B.double() @ module.lora_A.double() * (config.alpha / config.r))
    return updates


def add_randomized(model, name, config, seed):
    model.add_adapter(name, config)
    randomize(model, name, seed)


def foreign_hooks(module):
    """Return the forward and forward-pre hooks of ``module`` that transformers did not install.

    transformers 5 hooks blocks and attention modules on the first forward with
    ``output_hidden_states=True`` to collect the hidden states; those hooks belong to the plain model.
    """
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [hook for hook in hooks if not getattr(hook, "__module__", "").startswith("transformers.")]


# -- merge, merge twice, unmerge, delete ----------------------------------------------------------

@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_delete(build, tiny_inputs, family, config_name):
    model = build(family)
    base = base_state(model)
    embedding_copy = model.get_input_embeddings().weight.detach().clone()
    if family == "llama":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    input_ids = tiny_inputs(family)
    base_logits = forward(model, family, input_ids)

    adapterkit.init(model)
    add_randomized(model, "a", CONFIGS[config_name], seed=1)
    model.set_active_adapters("a")
    reference = forward(model, family, input_ids)
    assert not torch.allclose(reference, base_logits, atol=1e-3), "the adapter must change the output"

    model.merge_adapter("a")
    assert model.merged_adapters == ["a"]
    assert changed_keys(model, base), "merging changed no base weight"
    torch.testing.assert_close(forward(model, family, input_ids), reference, **OUTPUT_TOLERANCE)
    assert torch.equal(model.get_input_embeddings().weight, embedding_copy), "merging changed the input embeddings"

    merged_once = base_state(model)
    model.merge_adapter("a")
    assert model.merged_adapters == ["a"]
    assert changed_keys(model, merged_once) == []

    model.unmerge_adapter("a")
    assert model.merged_adapters == []
    assert_base_restored(model, base, "after unmerge")
    torch.testing.assert_close(forward(model, family, input_ids), reference, **OUTPUT_TOLERANCE)

    model.merge_adapter("a")
    model.delete_adapter("a")
    assert model.adapter_names == []
    assert_base_restored(model, base, "after deleting the merged adapter")
    torch.testing.assert_close(forward(model, family, input_ids), base_logits, **OUTPUT_TOLERANCE)


def test_merged_weights_follow_formula(build):
    """LoRA adds ``alpha / r * B A`` to the weight (transposed in GPT-2's fused Conv1D), (IA)^3 scales rows or columns."""
    model = build("gpt2")
    base = base_state(model)
    adapterkit.init(model)
    add_randomized(model, "a", ConfigUnion(LoRAConfig(r=4, alpha=2, targets=("value",)),
                                           IA3Config(targets=("key", "ff_out"))), seed=3)
    methods = model._adapterkit.modules_of("a")["methods"]
    lora = methods["0"]["layers"]["1"]["value"][0]
    key_scale = methods["1"]["layers"]["1"]["key"][0].scale
    input_scale = methods["1"]["layers"]["1"]["ff_out"][0].scale
    model.merge_adapter("a")
    state = model.state_dict()

    width = 32
    attention_weight = base["transformer.h.1.attn.c_attn.weight"].double()  # Conv1D: (in, 3 * out)
    expected_value = attention_weight[:, 2 * width:] + (lora.lora_B.double() @ lora.lora_A.double()).T * 0.5
    expected_key = attention_weight[:, width:2 * width] * key_scale.double()
    expected_key_bias = base["transformer.h.1.attn.c_attn.bias"].double()[width:2 * width] * key_scale.double()
    expected_ff_out = base["transformer.h.1.mlp.c_proj.weight"].double() * input_scale.double()[:, None]
    merged_attention = state["transformer.h.1.attn.c_attn.weight"].double()
    torch.testing.assert_close(merged_attention[:, 2 * width:], expected_value, **WEIGHT_TOLERANCE)
    torch.testing.assert_close(merged_attention[:, width:2 * width], expected_key, **WEIGHT_TOLERANCE)
    torch.testing.assert_close(merged_attention[:, :width], attention_weight[:, :width], atol=0, rtol=0)
    torch.testing.assert_close(state["transformer.h.1.attn.c_attn.bias"].double()[width:2 * width],
                               expected_key_bias, **WEIGHT_TOLERANCE)
    torch.testing.assert_close(state["transformer.h.1.mlp.c_proj.weight"].double(), expected_ff_out,
                               **WEIGHT_TOLERANCE)


# -- several adapters: every subset and order of merges -------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.parametrize("group", list(GROUPS))
def test_merge_every_subset_and_order(build, tiny_inputs, family, group):
    model = build(family)
    base = base_state(model)
    adapterkit.init(model)
    names = ["a", "b", "c"]
    for seed, (name, config) in enumerate(zip(names, GROUPS[group])):
        add_randomized(model, name, config, seed=seed)
    model.set_active_adapters(names)
    input_ids = tiny_inputs(family)
    reference = forward(model, family, input_ids)

    for size in (1, 2, 3):
        for merges in itertools.permutations(names, size):
            for unmerges in itertools.permutations(merges):
                # Each sequence starts from the base weights, so rounding does not pile up across sequences.
                model.load_state_dict(base, strict=False)
                for step, name in enumerate(merges):
                    model.merge_adapter(name)
                    torch.testing.assert_close(forward(model, family, input_ids), reference, **OUTPUT_TOLERANCE,
                                               msg=lambda m, done=merges[:step + 1]: f"after merging {done}: {m}")
                assert model.merged_adapters == list(merges)
                for step, name in enumerate(unmerges):
                    model.unmerge_adapter(name)
                    torch.testing.assert_close(
                        forward(model, family, input_ids), reference, **OUTPUT_TOLERANCE,
                        msg=lambda m, done=unmerges[:step + 1]: f"merged {merges}, unmerged {done}: {m}")
                assert model.merged_adapters == []
                assert_base_restored(model, base, f"after merging {merges} and unmerging {unmerges}")


@pytest.mark.parametrize("role", ["value", "ff_out"])
def test_mixed_pair_order_checks(build, tiny_inputs, role):
    """A LoRA and an (IA)^3 adapter at one projection: allowed orders keep the output, the others raise."""
    model = build("bert")
    base = base_state(model)
    adapterkit.init(model)
    add_randomized(model, "l", LoRAConfig(r=4, targets=(role, "query")), seed=1)
    add_randomized(model, "i", IA3Config(targets=(role, "key")), seed=2)
    input_ids = tiny_inputs("bert")
    model.set_active_adapters(["i"])
    only_ia3 = forward(model, "bert", input_ids)
    # At an output the LoRA runs first; the ff_out input scale reaches the LoRA in either order.
    model.set_active_adapters(["l", "i"] if role == "value" else ["i", "l"])
    reference = forward(model, "bert", input_ids)

    if role == "value":
        expected = r"Cannot merge adapter 'i': adapter 'l' runs before it at the value projection 0 of block \d"
    else:
        expected = r"Cannot merge adapter 'i': its \(IA\)\^3 vector scales the input of the ff_out projection.*'l'"
    with pytest.raises(ValueError, match=expected):
        model.merge_adapter("i")
    assert model.merged_adapters == []
    assert changed_keys(model, base) == []

    model.merge_adapter("l")
    model.merge_adapter("i")
    torch.testing.assert_close(forward(model, "bert", input_ids), reference, **OUTPUT_TOLERANCE)
    with pytest.raises(ValueError, match=r"Cannot unmerge adapter 'l': adapter 'i', merged after it"):
        model.unmerge_adapter("l")
    assert model.merged_adapters == ["l", "i"]
    torch.testing.assert_close(forward(model, "bert", input_ids), reference, **OUTPUT_TOLERANCE)

    model.unmerge_adapter("i")
    torch.testing.assert_close(forward(model, "bert", input_ids), reference, **OUTPUT_TOLERANCE)
    model.unmerge_adapter("l")
    assert_base_restored(model, base, "after unmerging both")

    # Deleting a merged adapter never raises: it leaves the model as if it had never been added.
    model.merge_adapter("l")
    model.merge_adapter("i")
    model.delete_adapter("l")
    assert model.merged_adapters == ["i"]
    torch.testing.assert_close(forward(model, "bert", input_ids), only_ia3, **OUTPUT_TOLERANCE)
    model.delete_adapter("i")
    assert_base_restored(model, base, "after deleting both")


def test_ff_out_lora_merges_after_input_scale(build, tiny_inputs):
    """With (IA)^3 first at ff_out, its input scale still reaches the LoRA there, so merging the LoRA is exact."""
    model = build("llama")
    adapterkit.init(model)
    add_randomized(model, "i", IA3Config(targets=("ff_out",)), seed=1)
    add_randomized(model, "l", LoRAConfig(r=4, targets=("ff_out",)), seed=2)
    model.set_active_adapters(["i", "l"])
    input_ids = tiny_inputs("llama")
    reference = forward(model, "llama", input_ids)
    model.merge_adapter("l")
    torch.testing.assert_close(forward(model, "llama", input_ids), reference, **OUTPUT_TOLERANCE)
    model.merge_adapter("i")
    torch.testing.assert_close(forward(model, "llama", input_ids), reference, **OUTPUT_TOLERANCE)


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, reason", [
    (BottleneckConfig(), "has a bottleneck adapter that cannot be merged .*runs in series"),
    ("prefix_tuning", "contains prefix_tuning, which cannot be merged"),
    (ConfigUnion(LoRAConfig(), BottleneckConfig(parallel=True)), "has a bottleneck .*non-linearity is 'relu'"),
    (BottleneckConfig(parallel=True, non_linearity="identity", mh_adapter=True), "has a bottleneck .*attention sublayer"),
    (BottleneckConfig(parallel=True, non_linearity="identity", ln_after=True), "has a bottleneck .*own layer norm"),
    (LoRAConfig(use_gating=True), "has a gated LoRA"),
], ids=["bottleneck", "prefix", "union-with-bottleneck", "parallel-on-attention", "parallel-with-norm", "gated-lora"])
def test_unmergeable_adapter_raises(build, config, reason):
    model = adapterkit.init(build("bert"))
    model.add_adapter("odd", config, set_active=True)
    model.add_adapter("plain", LoRAConfig())
    base = base_state(model)
    with pytest.raises(ValueError, match=f"Adapter 'odd' {reason}"):
        model.merge_adapter("odd")
    model.set_active_adapters(["plain", "odd"])
    with pytest.raises(ValueError, match=f"Adapter 'odd' {reason}"):
        model.merge_and_unload()
    assert model.merged_adapters == []
    assert changed_keys(model, base) == []
    assert hasattr(model, "_adapterkit")


def test_zero_ia3_scale_raises(build):
    model = adapterkit.init(build("bert"))
    model.add_adapter("zero", IA3Config(), set_active=True)
    with torch.no_grad():
        model._adapterkit.modules_of("zero")["methods"]["0"]["layers"]["1"]["value"][0].scale[5] = 0.0
    base = base_state(model)
    with pytest.raises(ValueError, match=r"Adapter 'zero' has an \(IA\)\^3 vector with a zero entry at the value "
                                         r"projection 0 of block 1"):
        model.merge_adapter("zero")
    assert changed_keys(model, base) == []


def test_unknown_adapter_raises(build):
    model = adapterkit.init(build("bert"))
    with pytest.raises(ValueError, match="No adapter named 'missing'"):
        model.merge_adapter("missing")
    with pytest.raises(ValueError, match="No adapter named 'missing'"):
        model.unmerge_adapter("missing")


# -- merge_and_unload -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_unload(build, tiny_inputs, tmp_path, family):
    model = build(family)
    base_class = type(model)
    base = base_state(model)
    adapterkit.init(model)
    add_randomized(model, "a", ConfigUnion(LoRAConfig(r=4, targets=ALL_ROLES), IA3Config(targets=ALL_ROLES)), seed=1)
    model.set_active_adapters("a")
    labels = None
    if MODEL_CLASSES[family] is transformers.AutoModelForSequenceClassification:
        labels = ["negative", "neutral", "positive"]
        model._adapterkit.set_labels("a", labels)
        with torch.no_grad():
            for parameter in model._adapterkit.modules_of("a")["head"].parameters():
                parameter.normal_(std=0.5)
        head = {key: value.clone() for key, value in model._adapterkit.modules_of("a")["head"].state_dict().items()}
    input_ids = tiny_inputs(family)
    reference = forward(model, family, input_ids)

    plain = model.merge_and_unload()
    assert type(plain) is base_class
    assert not hasattr(plain, "_adapterkit")
    assert not any(name.startswith("adapterkit") for name, _ in plain.named_parameters())
    hooked = {name: foreign_hooks(module) for name, module in plain.named_modules() if foreign_hooks(module)}
    assert hooked == {}
    assert set(plain.state_dict()) == set(base)
    torch.testing.assert_close(forward(plain, family, input_ids), reference, **OUTPUT_TOLERANCE)
    if labels is not None:
        assert plain.config.id2label == dict(enumerate(labels))
        state = plain.state_dict()
        for key, value in head.items():
            assert torch.equal(state[key], value), f"the adapter's head {key} did not stay"

    plain.save_pretrained(tmp_path)
    reloaded = MODEL_CLASSES[family].from_pretrained(tmp_path).eval()
    assert type(reloaded) is base_class
    torch.testing.assert_close(forward(reloaded, family, input_ids), reference, **OUTPUT_TOLERANCE)
    if labels is not None:
        assert reloaded.config.id2label == dict(enumerate(labels))


def test_merge_and_unload_mixed_adapters(build, tiny_inputs):
    """Three active adapters that one-by-one merges reject in this order: merged together they are exact."""
    model = build("bert")
    adapterkit.init(model)
    add_randomized(model, "l", LoRAConfig(r=4, targets=("key", "ff_out")), seed=1)
    add_randomized(model, "i", IA3Config(targets=("key", "ff_out")), seed=2)
    add_randomized(model, "m", LoRAConfig(r=2, targets=("value", "ff_out")), seed=3)
    model.set_active_adapters(["l", "i", "m"])
    input_ids = tiny_inputs("bert")
    reference = forward(model, "bert", input_ids)
    model.merge_adapter("l")
    with pytest.raises(ValueError, match="Cannot merge adapter 'i'.*'m'"):
        model.merge_adapter("i")

    plain = model.merge_and_unload()
    assert type(plain) is transformers.BertForSequenceClassification
    torch.testing.assert_close(forward(plain, "bert", input_ids), reference, **OUTPUT_TOLERANCE)


# -- add_weighted_adapter -------------------------------------------------------------------------

@pytest.mark.parametrize("config", [LoRAConfig(r=4, targets=ALL_ROLES), IA3Config(targets=ALL_ROLES)],
                         ids=["lora", "ia3"])
def test_linear_combination_sums_parameters(build, config):
    model = adapterkit.init(build("gpt2"))
    add_randomized(model, "a", config, seed=1)
    add_randomized(model, "b", config, seed=2)
    model.add_weighted_adapter("sum", ["a", "b"], [0.3, -1.2])
    assert model.adapter_config("sum") == config
    first = model._adapterkit.modules_of("a")["methods"].state_dict()
    second = model._adapterkit.modules_of("b")["methods"].state_dict()
    combined = model._adapterkit.modules_of("sum")["methods"].state_dict()
    assert set(combined) == set(first)
    for key, value in combined.items():
        expected = 0.3 * first[key].double() - 1.2 * second[key].double()
        torch.testing.assert_close(value.double(), expected, **WEIGHT_TOLERANCE, msg=lambda m, key=key: f"{key}: {m}")


def test_linear_combination_rejects_bad_sources(build):
    model = adapterkit.init(build("bert"))
    model.add_adapter("a", LoRAConfig(r=4))
    model.add_adapter("b", LoRAConfig(r=8))
    with pytest.raises(ValueError, match=r"Adapter 'sum': a linear combination needs sources with one config, "
                                         r"but the configs of \['a', 'b'\] differ"):
        model.add_weighted_adapter("sum", ["a", "b"], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"needs one weight per source adapter: got 2 sources"):
        model.add_weighted_adapter("sum", ["a", "b"], [0.5])
    with pytest.raises(ValueError, match=r"combination='mean' is invalid"):
        model.add_weighted_adapter("sum", ["a", "b"], [0.5, 0.5], combination="mean")
    assert model.adapter_names == ["a", "b"]


def test_svd_of_one_source_reproduces_it(build, tiny_inputs):
    model = adapterkit.init(build("llama"))
    add_randomized(model, "a", LoRAConfig(r=8, alpha=4, targets=ALL_ROLES), seed=1)
    model.add_weighted_adapter("copy", ["a"], [1.0], combination="svd")
    assert model.adapter_config("copy").r == 8
    input_ids = tiny_inputs("llama")
    model.set_active_adapters("a")
    reference = forward(model, "llama", input_ids)
    model.set_active_adapters("copy")
    torch.testing.assert_close(forward(model, "llama", input_ids), reference, **OUTPUT_TOLERANCE)


@pytest.mark.parametrize("rank", [12, 40])
def test_svd_of_two_sources_sums_updates(build, rank):
    """Ranks 4 + 8 give an update of rank at most 12, so rank 12 is exact, and rank 40 (above 16 x 32) too."""
    model = adapterkit.init(build("llama"))
    add_randomized(model, "a", LoRAConfig(r=4, alpha=8, targets=("query", "value", "ff_out")), seed=1)
    add_randomized(model, "b", LoRAConfig(r=8, alpha=4, targets=("query", "key", "ff_in")), seed=2)
    model.add_weighted_adapter("sum", ["a", "b"], [0.7, -0.4], combination="svd", rank=rank)
    first, second = lora_updates(model, "a"), lora_updates(model, "b")
    combined = lora_updates(model, "sum")
    assert set(combined) == set(first) | set(second)
    for key, update in combined.items():
        expected = 0.7 * first.get(key, 0.0) - 0.4 * second.get(key, 0.0)
        torch.testing.assert_close(update, expected, atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_svd_lower_rank_is_best_approximation(build):
    model = adapterkit.init(build("bert"))
    add_randomized(model, "a", LoRAConfig(r=4, targets=ALL_ROLES), seed=1)
    add_randomized(model, "b", LoRAConfig(r=8, targets=ALL_ROLES), seed=2)
    model.add_weighted_adapter("low", ["a", "b"], [1.0, 0.5], combination="svd", rank=3)
    first, second = lora_updates(model, "a"), lora_updates(model, "b")
    for key, update in lora_updates(model, "low").items():
        left, singular, right = torch.linalg.svd(first[key] + 0.5 * second[key])
        best = left[:, :3] @ torch.diag(singular[:3]) @ right[:3]
        torch.testing.assert_close(update, best, atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
        assert torch.linalg.matrix_rank(update, atol=1e-6) == 3


def test_svd_rejects_bad_sources(build):
    model = adapterkit.init(build("bert"))
    model.add_adapter("lora", LoRAConfig())
    model.add_adapter("ia3", IA3Config())
    model.add_adapter("gated", LoRAConfig(use_gating=True))
    with pytest.raises(ValueError, match=r"Adapter 'sum': combination='svd' combines LoRA adapters only"):
        model.add_weighted_adapter("sum", ["lora", "ia3"], [1.0, 1.0], combination="svd")
    with pytest.raises(ValueError, match=r"Adapter 'sum': combination='svd' cannot combine gated LoRA"):
        model.add_weighted_adapter("sum", ["lora", "gated"], [1.0, 1.0], combination="svd")
    with pytest.raises(ValueError, match=r"rank=0 is invalid"):
        model.add_weighted_adapter("sum", ["lora"], [1.0], combination="svd", rank=0)
    assert model.adapter_names == ["lora", "ia3", "gated"]


def test_ff_out_output_scale_merges_into_rows(build, tiny_inputs):
    """(IA)^3 on the output of ff_out scales the rows and the bias of ff_out, after a LoRA that runs before it."""
    model = build("bart")
    base = base_state(model)
    input_ids = tiny_inputs("bart")
    adapterkit.init(model)
    add_randomized(model, "a", ConfigUnion(LoRAConfig(r=4, alpha=4, targets=("ff_out",)),
                                           IA3Config(targets=("ff_out",), ff_out_side="output")), seed=5)
    methods = model._adapterkit.modules_of("a")["methods"]
    lora = methods["0"]["layers"]["0"]["ff_out"][0]
    scale = methods["1"]["layers"]["0"]["ff_out"][0].scale.double()
    model.set_active_adapters("a")
    reference = forward(model, "bart", input_ids)

    model.merge_adapter("a")
    state = model.state_dict()
    expected_weight = (base["model.encoder.layers.0.fc2.weight"].double()
                       + lora.lora_B.double() @ lora.lora_A.double()) * scale[:, None]
    expected_bias = base["model.encoder.layers.0.fc2.bias"].double() * scale
    torch.testing.assert_close(state["model.encoder.layers.0.fc2.weight"].double(), expected_weight, **WEIGHT_TOLERANCE)
    torch.testing.assert_close(state["model.encoder.layers.0.fc2.bias"].double(), expected_bias, **WEIGHT_TOLERANCE)
    torch.testing.assert_close(forward(model, "bart", input_ids), reference, **OUTPUT_TOLERANCE)
    model.unmerge_adapter("a")
    assert_base_restored(model, base, "after unmerge")


# -- parallel adapters with an identity non-linearity: widened feed-forward layers ----------------

PARALLEL_FAMILIES = ("bert", "roberta", "electra", "deberta-v2", "distilbert", "mpnet", "bart")
PARALLEL_CONFIGS = {
    "linear": BottleneckConfig(parallel=True, non_linearity="identity", bottleneck_size=4, scaling=2.0,
                               leave_out=(1,)),
    "channel-scaling": BottleneckConfig(parallel=True, non_linearity="identity", bottleneck_size=8, scaling="channel"),
    "compacter": BottleneckConfig(parallel=True, non_linearity="identity", bottleneck_size=8, phm_layer=True,
                                  phm_dim=4, phm_bias=True),
}
WIDTH_FIELDS = {"distilbert": ("hidden_dim",), "bart": ("encoder_ffn_dim", "decoder_ffn_dim")}


@torch.no_grad()
def randomize_bottleneck(model, name, seed):
    """Draw every parameter of adapter ``name`` (but its head) from normal(0, 0.3)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model._adapterkit.modules_of(name)["methods"].parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def build_parallel(tiny_model, no_dropout, family, config, seed=1):
    model = adapterkit.init(tiny_model(family, **no_dropout(family)).eval())
    model.add_adapter("par", config)
    randomize_bottleneck(model, "par", seed)
    model.set_active_adapters("par")
    return model


def widths(model, family):
    return tuple(getattr(model.config, field) for field in WIDTH_FIELDS.get(family, ("intermediate_size",)))


@pytest.mark.parametrize("config_name", list(PARALLEL_CONFIGS))
@pytest.mark.parametrize("family", PARALLEL_FAMILIES)
def test_parallel_identity_merge(tiny_model, no_dropout, tiny_inputs, tmp_path, family, config_name):
    config = PARALLEL_CONFIGS[config_name]
    model = build_parallel(tiny_model, no_dropout, family, config)
    input_ids = tiny_inputs(family)
    base = base_state(model)
    base_widths = widths(model, family)
    model.set_active_adapters(None)
    base_logits = forward(model, family, input_ids)
    model.set_active_adapters("par")
    reference = forward(model, family, input_ids)
    assert not torch.allclose(reference, base_logits, atol=1e-3), "the adapter must change the output"

    model.merge_adapter("par")
    added = 2 * config.bottleneck_size
    assert widths(model, family) == tuple(width + added for width in base_widths)
    torch.testing.assert_close(forward(model, family, input_ids), reference, **OUTPUT_TOLERANCE)
    # A merged adapter acts whether it is active or not.
    model.set_active_adapters(None)
    torch.testing.assert_close(forward(model, family, input_ids), reference, **OUTPUT_TOLERANCE)
    merged_once = base_state(model)
    model.merge_adapter("par")
    assert changed_keys(model, merged_once) == []

    model.unmerge_adapter("par")
    assert widths(model, family) == base_widths
    assert_base_restored(model, base, "after unmerge")
    torch.testing.assert_close(forward(model, family, input_ids), base_logits, **OUTPUT_TOLERANCE)

    model.merge_adapter("par")
    model.delete_adapter("par")
    assert_base_restored(model, base, "after deleting the merged adapter")
    assert widths(model, family) == base_widths


@pytest.mark.parametrize("family", ["bert", "bart"])
def test_parallel_unload_reloads_in_transformers(tiny_model, no_dropout, tiny_inputs, tmp_path, family):
    """Two parallel adapters and a LoRA merge together; the plain model saves and reloads with transformers alone."""
    model = build_parallel(tiny_model, no_dropout, family, PARALLEL_CONFIGS["linear"])
    model.add_adapter("second", PARALLEL_CONFIGS["compacter"])
    randomize_bottleneck(model, "second", seed=2)
    add_randomized(model, "lora", LoRAConfig(r=4, targets=("query", "value")), seed=3)
    model.set_active_adapters(["par", "second", "lora"])
    input_ids = tiny_inputs(family)
    reference = forward(model, family, input_ids)

    plain = model.merge_and_unload()
    assert not hasattr(plain, "_adapterkit")
    torch.testing.assert_close(forward(plain, family, input_ids), reference, **OUTPUT_TOLERANCE)
    plain.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(forward(reloaded, family, input_ids), reference, **OUTPUT_TOLERANCE)


def test_parallel_merges_in_any_order(tiny_model, no_dropout, tiny_inputs):
    """Unmerging the first of two widened adapters removes its own units, not the other's."""
    family = "bert"
    model = build_parallel(tiny_model, no_dropout, family, PARALLEL_CONFIGS["linear"])
    model.add_adapter("second", PARALLEL_CONFIGS["channel-scaling"])
    randomize_bottleneck(model, "second", seed=4)
    input_ids = tiny_inputs(family)
    base = base_state(model)
    base_width = model.config.intermediate_size
    model.set_active_adapters("second")
    second_only = forward(model, family, input_ids)
    model.set_active_adapters(None)

    model.merge_adapter("par")
    model.merge_adapter("second")
    model.unmerge_adapter("par")
    torch.testing.assert_close(forward(model, family, input_ids), second_only, **OUTPUT_TOLERANCE)
    assert model.config.intermediate_size == base_width + 16
    model.unmerge_adapter("second")
    assert_base_restored(model, base, "after both unmerges")


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_parallel_merge_rejects_pre_norm_blocks(tiny_model, family):
    model = adapterkit.init(tiny_model(family))
    model.add_adapter("par", PARALLEL_CONFIGS["linear"], set_active=True)
    base = base_state(model)
    with pytest.raises(ValueError, match="normalise the residual input before their first projection"):
        model.merge_adapter("par")
    assert changed_keys(model, base) == []
    assert model.merged_adapters == []


def test_parallel_merge_rejects_lora_on_feed_forward(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("par", PARALLEL_CONFIGS["linear"])
    model.add_adapter("lora", LoRAConfig(targets=("ff_out",)))
    with pytest.raises(ValueError, match="Cannot merge adapter 'par'.*adapter 'lora' has LoRA or \\(IA\\)\\^3"):
        model.merge_adapter("par")
    model.delete_adapter("lora")
    model.merge_adapter("par")
    # A LoRA added to the widened layer is shaped for the new width, so unmerging raises while it exists.
    model.add_adapter("late", LoRAConfig(targets=("ff_in",)))
    with pytest.raises(ValueError, match="Cannot unmerge adapter 'par'.*adapter 'late'"):
        model.unmerge_adapter("par")
    model.delete_adapter("late")
    model.unmerge_adapter("par")


def test_parallel_merge_rejects_tanh_activation(tiny_model):
    model = adapterkit.init(tiny_model("bert", hidden_act="tanh"))
    model.add_adapter("par", PARALLEL_CONFIGS["linear"])
    with pytest.raises(ValueError, match="activation is hidden_act='tanh'"):
        model.merge_adapter("par")
