"""Reading and writing Hugging Face PEFT checkpoints, checked against PEFT itself in the same process.

Every comparison builds one tiny random model and gives one copy to PEFT and another to adapterkit.
The adapter is randomised on one side (LoRA B non-zero, (IA)^3 vectors away from 1) and moved
through a checkpoint folder to the other side. PEFT's forward pass is the expected output.

Prefix tuning: PEFT (0.21 on transformers 5) passes the prefix as a KV cache, so the model numbers
the real tokens after the prefix. adapterkit's prefix leaves positions alone, so the comparisons give
the adapterkit model position ids shifted by the prefix length. PEFT's sequence classification
wrappers reject prefix tuning on transformers 5 ("Model does not support past key values"), so the
prefix tests use causal language models and bare encoders.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
import transformers

import adapterkit
from adapterkit import BottleneckConfig, ConfigUnion, IA3Config, LoRAConfig, PrefixTuningConfig
from adapterkit.formats.peft import is_peft_checkpoint, read_peft, write_peft

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOLERANCE = 1e-5
# Outputs must move by more than this when an adapter is on, so a test cannot pass with an adapter that does nothing.
MIN_EFFECT = 1e-3
PREFIX_LENGTH = 3


# -- helpers --------------------------------------------------------------------------------------

@torch.no_grad()
def _outputs(model, input_ids, **kwargs):
    output = model(input_ids=input_ids, **kwargs)
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


@torch.no_grad()
def _randomize_peft(peft_model, markers, mean=0.0, std=0.2, seed=3):
    """Draw every PEFT parameter whose name contains one of ``markers`` from normal(mean, std)."""
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    for name, parameter in peft_model.named_parameters():
        if any(marker in name for marker in markers):
            parameter.copy_(mean + std * torch.randn(parameter.shape, generator=generator))
            changed += 1
    assert changed, f"no parameter of the PEFT model contains {markers}"


@torch.no_grad()
def _randomize_adapter(model, name, mean=0.0, std=0.2, seed=4):
    generator = torch.Generator().manual_seed(seed)
    for parameter in model._adapterkit.modules_of(name).parameters():
        parameter.copy_(mean + std * torch.randn(parameter.shape, generator=generator))


def _peft_reference(base, peft_config, directory, markers, mean=0.0, std=0.2):
    """Build a PEFT model on a copy of ``base``, randomise its adapter and head, save it, and return the model."""
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config)
    _randomize_peft(peft_model, markers, mean=mean, std=std)
    if any("modules_to_save" in name for name, _ in peft_model.named_parameters()):
        _randomize_peft(peft_model, ("modules_to_save",), seed=5)
    peft_model.eval()
    peft_model.save_pretrained(str(directory))
    return peft_model


def _load_with_adapterkit(base, directory):
    """Read the PEFT checkpoint into a copy of ``base`` through read_peft; return the model and checkpoint."""
    model = adapterkit.init(copy.deepcopy(base))
    checkpoint = read_peft(model._adapterkit, directory)
    model.add_adapter("peft", checkpoint.config)
    model._adapterkit.modules_of("peft").load_state_dict(checkpoint.weights)
    model.set_active_adapters("peft")
    return model, checkpoint


def _assert_close(actual, expected, base_output):
    assert (expected - base_output).abs().max().item() > MIN_EFFECT
    assert (actual - expected).abs().max().item() < TOLERANCE


def _body_model(tiny_model, family, model_class):
    """Return a tiny ``model_class`` model (causal LM or bare encoder) with the ``tiny_model`` config of ``family``."""
    config = tiny_model(family).config
    torch.manual_seed(0)
    return model_class.from_config(config).eval()


def _shifted_positions(model, input_ids, offset):
    """Return the position ids that PEFT's prefix cache gives the real tokens (RoBERTa counts from padding_idx + 1)."""
    start = offset
    if model.config.model_type == "roberta":
        start += model.config.pad_token_id + 1
    return torch.arange(start, start + input_ids.shape[1]).expand(input_ids.shape[0], -1)


# -- PEFT -> adapterkit: LoRA ---------------------------------------------------------------------

HEAD_TO_SAVE = {"t5": ["classification_head"], "bart": ["classification_head"]}

LORA_FROM_PEFT = [
    ("bert", dict(target_modules=["query", "value"])),
    # "output.dense" matches both attention.output.dense (attention_output) and output.dense (ff_out).
    ("roberta", dict(target_modules=["key", "output.dense"])),
    ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True)),
    ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])),
    ("t5", dict(target_modules=["q", "wo"])),
    ("bart", dict(target_modules=["q_proj", "fc1"])),
]


@pytest.mark.parametrize("family, options", LORA_FROM_PEFT, ids=[case[0] for case in LORA_FROM_PEFT])
def test_lora_from_peft_matches(family, options, tiny_model, tiny_inputs, tmp_path):
    base = tiny_model(family)
    ids = tiny_inputs(family)
    config = peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", modules_to_save=HEAD_TO_SAVE.get(family),
                             **options)
    peft_model = _peft_reference(base, config, tmp_path, ("lora_",))

    model, checkpoint = _load_with_adapterkit(base, tmp_path)

    assert checkpoint.info["peft_type"] == "LORA"
    assert checkpoint.info["head_keys"], "the randomised head must come from the checkpoint"
    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))


def test_lora_from_peft_maps_roles(tiny_model, tmp_path):
    base = tiny_model("llama")
    _peft_reference(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], task_type="SEQ_CLS"),
                    tmp_path, ("lora_",))

    checkpoint = read_peft(adapterkit.init(copy.deepcopy(base))._adapterkit, tmp_path)

    assert checkpoint.config == LoRAConfig(r=4, alpha=8, targets=("query", "ff_in"))
    # gate_proj plays ff_in too, so it gets a zero LoRA, which the notes report.
    assert torch.count_nonzero(checkpoint.weights["methods.0.layers.0.ff_in.0.lora_B"]) == 0
    assert any("no weights in the checkpoint" in note for note in checkpoint.info["notes"])


def test_lora_from_peft_splits_fused_layer(tiny_model, tmp_path):
    base = tiny_model("gpt2")
    peft_model = _peft_reference(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                       fan_in_fan_out=True, task_type="SEQ_CLS"), tmp_path, ("lora_",))
    layer = peft_model.base_model.model.transformer.h[1].attn.c_attn

    checkpoint = read_peft(adapterkit.init(copy.deepcopy(base))._adapterkit, tmp_path)

    assert checkpoint.config.targets == ("query", "key", "value")
    lora_b = layer.lora_B["default"].weight
    for part, role in enumerate(("query", "key", "value")):
        assert torch.equal(checkpoint.weights[f"methods.0.layers.1.{role}.0.lora_A"], layer.lora_A["default"].weight)
        assert torch.equal(checkpoint.weights[f"methods.0.layers.1.{role}.0.lora_B"], lora_b[32 * part:32 * (part + 1)])
    assert any("fused layer" in note for note in checkpoint.info["notes"])


LORA_PATTERNS = [
    ("bert", dict(target_modules=["query", "value", "intermediate.dense"],
                  rank_pattern={"value": 2, "layer.1.attention.self.query": 6},
                  alpha_pattern={"intermediate.dense": 3})),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, rank_pattern={"c_fc": 5},
                  alpha_pattern={"h.0.attn.c_attn": 1})),
    ("llama", dict(target_modules=["k_proj", "o_proj", "gate_proj"], use_rslora=True, lora_alpha=6)),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1])),
]


@pytest.mark.parametrize("family, options", LORA_PATTERNS, ids=["bert-patterns", "gpt2-patterns", "llama-rslora",
                                                                 "llama-one-layer"])
def test_lora_from_peft_per_module_ranks(family, options, tiny_model, tiny_inputs, tmp_path):
    base = tiny_model(family)
    ids = tiny_inputs(family)
    options = {"r": 4, "lora_alpha": 8, **options}
    peft_model = _peft_reference(base, peft.LoraConfig(task_type="SEQ_CLS", **options), tmp_path, ("lora_",))

    model, checkpoint = _load_with_adapterkit(base, tmp_path)

    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))
    if "layers_to_transform" in options:
        assert checkpoint.config.leave_out == (0,)


def test_lora_from_peft_keeps_module_ranks(tiny_model, tmp_path):
    base = tiny_model("bert")
    _peft_reference(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                          rank_pattern={"value": 2}, task_type="SEQ_CLS"), tmp_path, ("lora_",))

    checkpoint = read_peft(adapterkit.init(copy.deepcopy(base))._adapterkit, tmp_path)

    # No zero padding and no scaling folded into lora_B: value keeps rank 2 and alpha 8 (scaling 4).
    assert checkpoint.config == LoRAConfig(r=4, alpha=8, targets=("query", "value"), rank_pattern={"value": 2})
    assert checkpoint.weights["methods.0.layers.0.value.0.lora_A"].shape == (2, 32)
    assert checkpoint.weights["methods.0.layers.0.query.0.lora_A"].shape == (4, 32)
    assert not any("padded" in note for note in checkpoint.info["notes"])


# -- PEFT -> adapterkit: (IA)^3 -------------------------------------------------------------------

IA3_FROM_PEFT = [
    # Regular expressions, which distinguish the feed-forward output.dense from attention.output.dense.
    ("bert", dict(target_modules=r".*\.(key|value)|.*layer\.\d+\.output\.dense",
                  feedforward_modules=r".*layer\.\d+\.output\.dense")),
    ("roberta", dict(target_modules=["query", "intermediate.dense"], feedforward_modules=[])),
    ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
    ("llama", dict(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"])),
    ("t5", dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])),
    ("bart", dict(target_modules=["k_proj", "out_proj", "fc2"], feedforward_modules=["fc2"])),
]


@pytest.mark.parametrize("family, options", IA3_FROM_PEFT, ids=[case[0] for case in IA3_FROM_PEFT])
def test_ia3_from_peft_matches(family, options, tiny_model, tiny_inputs, tmp_path):
    base = tiny_model(family)
    ids = tiny_inputs(family)
    config = peft.IA3Config(task_type="SEQ_CLS", modules_to_save=HEAD_TO_SAVE.get(family), **options)
    peft_model = _peft_reference(base, config, tmp_path, ("ia3_l",), mean=1.0, std=0.5)

    model, checkpoint = _load_with_adapterkit(base, tmp_path)

    assert checkpoint.info["peft_type"] == "IA3"
    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))


def test_ia3_from_peft_maps_sides(tiny_model, tmp_path):
    base = tiny_model("gpt2")
    _peft_reference(base, peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                         task_type="SEQ_CLS"), tmp_path, ("ia3_l",), mean=1.0)

    checkpoint = read_peft(adapterkit.init(copy.deepcopy(base))._adapterkit, tmp_path)

    assert checkpoint.config == IA3Config(targets=("query", "key", "value", "ff_out"))
    assert checkpoint.weights["methods.0.layers.0.query.0.scale"].shape == (32,)
    assert checkpoint.weights["methods.0.layers.0.ff_out.0.scale"].shape == (128,)


# -- PEFT -> adapterkit: prefix tuning ------------------------------------------------------------

PREFIX_FAMILIES = [
    ("gpt2", transformers.AutoModelForCausalLM, "CAUSAL_LM"),
    ("llama", transformers.AutoModelForCausalLM, "CAUSAL_LM"),
    ("bert", transformers.AutoModel, "FEATURE_EXTRACTION"),
    ("roberta", transformers.AutoModel, "FEATURE_EXTRACTION"),
]


@pytest.mark.parametrize("family, model_class, task", PREFIX_FAMILIES, ids=[case[0] for case in PREFIX_FAMILIES])
def test_prefix_from_peft_matches_shifted(family, model_class, task, tiny_model, tiny_inputs, tmp_path):
    base = _body_model(tiny_model, family, model_class)
    ids = tiny_inputs(family)
    config = peft.PrefixTuningConfig(num_virtual_tokens=PREFIX_LENGTH, task_type=task)
    peft_model = _peft_reference(base, config, tmp_path, ("prompt_encoder",))

    model, checkpoint = _load_with_adapterkit(base, tmp_path)
    offset = checkpoint.info["position_offset"]
    expected = _outputs(peft_model, ids)

    assert offset == PREFIX_LENGTH
    assert checkpoint.config == PrefixTuningConfig(prefix_length=PREFIX_LENGTH, flat=True, shift_positions=True)
    _assert_close(_outputs(model, ids), expected, _outputs(base, ids))
    positions = _shifted_positions(model, ids, offset)
    _assert_close(_outputs(model, ids, position_ids=positions), expected, _outputs(base, ids))
    # Without the shift the outputs differ: an unshifted prefix does not move the positions.
    model.add_adapter("unshifted", checkpoint.config.replace(shift_positions=False))
    model._adapterkit.modules_of("unshifted").load_state_dict(model._adapterkit.modules_of("peft").state_dict())
    model.set_active_adapters("unshifted")
    assert (_outputs(model, ids) - expected).abs().max().item() > MIN_EFFECT


def test_prefix_from_peft_projection(tiny_model, tiny_inputs, tmp_path):
    base = _body_model(tiny_model, "llama", transformers.AutoModelForCausalLM)
    ids = tiny_inputs("llama")
    config = peft.PrefixTuningConfig(num_virtual_tokens=PREFIX_LENGTH, task_type="CAUSAL_LM", prefix_projection=True,
                                     encoder_hidden_size=16)
    peft_model = _peft_reference(base, config, tmp_path, ("prompt_encoder",))

    model, checkpoint = _load_with_adapterkit(base, tmp_path)
    positions = _shifted_positions(model, ids, checkpoint.info["position_offset"])

    _assert_close(_outputs(model, ids, position_ids=positions), _outputs(peft_model, ids), _outputs(base, ids))
    assert any("prefix MLP" in note for note in checkpoint.info["notes"])


def test_prefix_from_peft_reads_head(tiny_model, tmp_path):
    base = tiny_model("bert")
    config = peft.PrefixTuningConfig(num_virtual_tokens=PREFIX_LENGTH, task_type="SEQ_CLS")
    peft_model = _peft_reference(base, config, tmp_path, ("prompt_encoder",))
    saved_head = peft_model.base_model.classifier.modules_to_save["default"]

    checkpoint = read_peft(adapterkit.init(copy.deepcopy(base))._adapterkit, tmp_path)

    assert checkpoint.info["head_keys"] == ["head.classifier.bias", "head.classifier.weight"]
    assert torch.equal(checkpoint.weights["head.classifier.weight"], saved_head.weight)
    assert torch.equal(checkpoint.weights["methods.0.prefix.encoder.prefix"],
                       peft_model.prompt_encoder["default"].embedding.weight)


def test_read_bin_checkpoint(tiny_model, tmp_path):
    base = tiny_model("bert")
    config = peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS")
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    _randomize_peft(peft_model, ("lora_",))
    peft_model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    peft_model.save_pretrained(str(tmp_path / "safetensors"))
    registry = adapterkit.init(copy.deepcopy(base))._adapterkit

    from_bin = read_peft(registry, tmp_path / "bin")
    from_safetensors = read_peft(registry, tmp_path / "safetensors")

    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert from_bin.config == from_safetensors.config
    for key, value in from_safetensors.weights.items():
        assert torch.equal(from_bin.weights[key], value), key


# -- adapterkit -> PEFT ---------------------------------------------------------------------------

def _write_and_load_in_peft(base, config, directory, mean=0.0):
    """Add a randomised adapterkit adapter to a copy of ``base``, write it, and load it with PEFT."""
    model = adapterkit.init(copy.deepcopy(base))
    model.add_adapter("mine", config)
    _randomize_adapter(model, "mine", mean=mean)
    model.set_active_adapters("mine")
    write_peft(model._adapterkit, "mine", directory)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    return model, peft_model


LORA_TO_PEFT = [
    ("bert", LoRAConfig(r=4, alpha=8, targets=("query", "value", "ff_out"))),
    ("roberta", LoRAConfig(r=2, alpha=5, targets=("attention_output", "ff_in"), leave_out=(0,))),
    # Two of c_attn's three parts: one PEFT LoRA of rank 6 with a zero block for the key rows.
    ("gpt2", LoRAConfig(r=3, alpha=6, targets=("query", "value", "ff_out"))),
    ("gpt2", LoRAConfig(r=2, alpha=3, targets=("query", "key", "value", "attention_output"))),
    ("llama", LoRAConfig(r=4, alpha=16, targets=("query", "key", "value", "attention_output", "ff_in", "ff_out"))),
    ("t5", LoRAConfig(r=4, alpha=8, targets=("query", "value", "ff_in"))),
    ("bart", LoRAConfig(r=4, alpha=8, targets=("key", "ff_out"))),
]


@pytest.mark.parametrize("family, config", LORA_TO_PEFT,
                         ids=["bert", "roberta-leave-out", "gpt2-two-parts", "gpt2-attention", "llama", "t5", "bart"])
def test_lora_to_peft_matches(family, config, tiny_model, tiny_inputs, tmp_path):
    base = tiny_model(family)
    ids = tiny_inputs(family)

    model, peft_model = _write_and_load_in_peft(base, config, tmp_path)

    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_ia3_to_peft_feedforward_names(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("mine", IA3Config(targets=("key", "ff_out")))

    write_peft(model._adapterkit, "mine", tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())

    # "output.dense" alone would also select attention.output.dense.
    assert written["target_modules"] == ["key", "layer.0.output.dense", "layer.1.output.dense"]
    assert written["feedforward_modules"] == ["layer.0.output.dense", "layer.1.output.dense"]


def test_lora_to_peft_fused_layer_config(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("gpt2"))
    model.add_adapter("mine", LoRAConfig(r=3, alpha=6, targets=("query", "value", "ff_out")))

    write_peft(model._adapterkit, "mine", tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())

    assert written["target_modules"] == ["c_attn", "mlp.c_proj"]
    assert written["fan_in_fan_out"] is True
    # Two parts of c_attn: rank 2 * 3 and alpha 2 * 6, so that alpha / r stays 2; mlp.c_proj keeps 3 and 6.
    assert (written["r"], written["lora_alpha"]) == (6, 12)
    mlp_layers = [rf"transformer\.h\.{block}\.mlp\.c_proj" for block in (0, 1)]
    assert written["rank_pattern"] == {name: 3 for name in mlp_layers}
    assert written["alpha_pattern"] == {name: 6 for name in mlp_layers}
    assert written["modules_to_save"] == ["score"]


IA3_TO_PEFT = [
    ("bert", IA3Config(targets=("key", "value", "ff_out"))),
    ("roberta", IA3Config(targets=("query", "attention_output", "ff_in"))),
    ("gpt2", IA3Config(targets=("query", "ff_in", "ff_out"))),
    ("llama", IA3Config(targets=("key", "value", "ff_in", "ff_out"), leave_out=(1,))),
    ("t5", IA3Config(targets=("value", "attention_output", "ff_out"))),
    ("bart", IA3Config(targets=("key", "value", "ff_out"))),
]


@pytest.mark.parametrize("family, config", IA3_TO_PEFT, ids=[case[0] for case in IA3_TO_PEFT])
def test_ia3_to_peft_matches(family, config, tiny_model, tiny_inputs, tmp_path):
    base = tiny_model(family)
    ids = tiny_inputs(family)

    model, peft_model = _write_and_load_in_peft(base, config, tmp_path, mean=1.0)

    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))


PREFIX_TO_PEFT = [
    ("gpt2", transformers.AutoModelForCausalLM, True),
    ("llama", transformers.AutoModelForCausalLM, False),
    ("bert", transformers.AutoModel, True),
    ("roberta", transformers.AutoModel, False),
]


@pytest.mark.parametrize("family, model_class, flat", PREFIX_TO_PEFT,
                         ids=["gpt2-flat", "llama-mlp", "bert-flat", "roberta-mlp"])
def test_prefix_to_peft_matches_shifted(family, model_class, flat, tiny_model, tiny_inputs, tmp_path):
    base = _body_model(tiny_model, family, model_class)
    ids = tiny_inputs(family)
    config = PrefixTuningConfig(prefix_length=PREFIX_LENGTH, bottleneck_size=16, flat=flat, shift_positions=True)

    model, peft_model = _write_and_load_in_peft(base, config, tmp_path)

    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))


def test_prefix_to_peft_rejects_unshifted_positions(tiny_model, tmp_path):
    model = adapterkit.init(_body_model(tiny_model, "gpt2", transformers.AutoModelForCausalLM))
    model.add_adapter("prefix", PrefixTuningConfig(prefix_length=PREFIX_LENGTH))

    with pytest.raises(ValueError, match=r"shift_positions=False.*PrefixTuningConfig\(shift_positions=True\)"):
        model.save_adapter(tmp_path, "prefix", format="peft")
    assert not (tmp_path / "adapter_config.json").exists()


def test_lora_round_trip_keeps_weights(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    config = LoRAConfig(r=4, alpha=8, targets=("query", "value"), leave_out=(1,))
    model.add_adapter("mine", config)
    _randomize_adapter(model, "mine")
    write_peft(model._adapterkit, "mine", tmp_path)

    checkpoint = read_peft(adapterkit.init(tiny_model("bert"))._adapterkit, tmp_path)

    assert checkpoint.config == config
    original = model._adapterkit.modules_of("mine").state_dict()
    assert sorted(checkpoint.weights) == sorted(original)
    for key, value in original.items():
        assert torch.equal(checkpoint.weights[key], value), key


# -- detection and errors -------------------------------------------------------------------------

def test_is_peft_checkpoint(tiny_model, tmp_path):
    base = tiny_model("bert")
    _peft_reference(base, peft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"), tmp_path / "peft", ("lora_",))
    model = adapterkit.init(copy.deepcopy(base))
    model.add_adapter("mine", "lora")
    model.save_adapter(tmp_path / "adapterkit", "mine")

    assert is_peft_checkpoint(tmp_path / "peft")
    assert not is_peft_checkpoint(tmp_path / "adapterkit")
    assert not is_peft_checkpoint(tmp_path / "missing")


def _saved_lora(tiny_model, directory, family="bert", **options):
    base = tiny_model(family)
    options = {"target_modules": ["query"], "task_type": "SEQ_CLS", **options}
    _peft_reference(base, peft.LoraConfig(**options), directory, ("lora_",))
    return base


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("options, message", [
    (dict(use_dora=True), "use_dora=True"),
    (dict(bias="all"), "bias='all'"),
    (dict(target_modules=["query", "pooler.dense"]), "bert.pooler.dense"),
    (dict(target_modules=["word_embeddings"]), "lora_embedding_A"),
    (dict(modules_to_save=["LayerNorm"]), "LayerNorm.weight"),
], ids=["dora", "bias", "pooler", "embeddings", "body-module-to-save"])
def test_read_rejects_unmappable_lora(options, message, tiny_model, tmp_path):
    base = _saved_lora(tiny_model, tmp_path, **options)

    with pytest.raises(ValueError, match=re.escape(message)):
        read_peft(adapterkit.init(base)._adapterkit, tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(init_lora_weights="pissa"), "changes the base model's weights"),
    (dict(new_option=3), "new_option=3"),
    (dict(peft_type="LOHA"), "peft_type='LOHA'"),
], ids=["pissa", "unknown-option", "other-method"])
def test_read_rejects_config_options(changes, message, tiny_model, tmp_path):
    base = _saved_lora(tiny_model, tmp_path)
    _edit_config(tmp_path, **changes)

    with pytest.raises(ValueError, match=message):
        read_peft(adapterkit.init(base)._adapterkit, tmp_path)


def test_read_rejects_ia3_on_other_side(tiny_model, tmp_path):
    base = tiny_model("bert")
    config = peft.IA3Config(target_modules=["intermediate.dense"], feedforward_modules=["intermediate.dense"],
                            task_type="SEQ_CLS")
    _peft_reference(base, config, tmp_path, ("ia3_l",), mean=1.0)

    with pytest.raises(ValueError, match=r"intermediate\.dense \(ff_in, PEFT scales its input\)"):
        read_peft(adapterkit.init(base)._adapterkit, tmp_path)


def test_read_rejects_head_of_other_size(tiny_model, tmp_path):
    _saved_lora(tiny_model, tmp_path)

    with pytest.raises(ValueError, match="num_labels"):
        read_peft(adapterkit.init(tiny_model("bert", num_labels=5))._adapterkit, tmp_path)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="DistilBertModel.forward in transformers 4.x rejects the past_key_values PEFT passes")
def test_read_rejects_prefix_peft_ignores(tiny_model, tiny_inputs, tmp_path):
    base = _body_model(tiny_model, "distilbert", transformers.AutoModel)
    ids = tiny_inputs("distilbert")
    # PEFT cannot read DistilBERT's sizes from its config ("dim", "n_heads"), so they are given here.
    config = peft.PrefixTuningConfig(num_virtual_tokens=2, task_type="FEATURE_EXTRACTION", token_dim=32,
                                     num_attention_heads=4, num_layers=2)
    peft_model = _peft_reference(base, config, tmp_path, ("prompt_encoder",))

    # DistilBERT's attention never reads the cache that carries PEFT's prefix.
    assert torch.equal(_outputs(peft_model, ids), _outputs(base, ids))
    with pytest.raises(ValueError, match="no effect on 'distilbert'"):
        read_peft(adapterkit.init(base)._adapterkit, tmp_path)


@pytest.mark.parametrize("family, config, message", [
    ("bert", ConfigUnion(LoRAConfig(), IA3Config()), "combines 2 methods"),
    ("bert", BottleneckConfig(), "PEFT has no format"),
    ("bert", LoRAConfig(use_gating=True), "use_gating=True"),
    ("gpt2", PrefixTuningConfig(prefix_length=2, leave_out=(0,)), "leave_out"),
    ("bart", PrefixTuningConfig(prefix_length=2), "encoder_prefix=True"),
], ids=["union", "bottleneck", "gating", "prefix-leave-out", "prefix-bart"])
def test_write_rejects_unsupported(family, config, message, tiny_model, tmp_path):
    model = adapterkit.init(tiny_model(family))
    model.add_adapter("mine", config)

    with pytest.raises(ValueError, match=message):
        write_peft(model._adapterkit, "mine", tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


# -- through the model verbs ----------------------------------------------------------------------

def test_load_adapter_detects_peft(tiny_model, tiny_inputs, tmp_path):
    base = tiny_model("llama")
    ids = tiny_inputs("llama")
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    peft_model = _peft_reference(base, peft_config, tmp_path, ("lora_",))
    model = adapterkit.init(copy.deepcopy(base))

    name = model.load_adapter(tmp_path)

    assert name == "default"
    assert model.active_adapters == ["default"]
    assert not [p for p in model._adapterkit.modules_of("default").parameters() if p.requires_grad]
    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))


def test_save_adapter_in_peft_format(tiny_model, tiny_inputs, tmp_path):
    base = tiny_model("bert")
    ids = tiny_inputs("bert")
    model = adapterkit.init(copy.deepcopy(base))
    model.add_adapter("mine", IA3Config(targets=("key", "value", "ff_out")), set_active=True)
    _randomize_adapter(model, "mine", mean=1.0)

    model.save_adapter(tmp_path, "mine", format="peft")

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))
    reloaded = adapterkit.init(copy.deepcopy(base))
    reloaded.load_adapter(tmp_path, load_as="again")
    _assert_close(_outputs(reloaded, ids), _outputs(model, ids), _outputs(base, ids))


def test_save_adapter_unknown_format_raises(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("mine", "lora")

    with pytest.raises(ValueError, match="format='onnx'"):
        model.save_adapter(tmp_path, "mine", format="onnx")


def test_load_adapter_unknown_folder_raises(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    (tmp_path / "notes.txt").write_text("not an adapter", encoding="utf-8")

    with pytest.raises(FileNotFoundError, match="contains no adapter checkpoint"):
        model.load_adapter(tmp_path)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_ia3_output_side_of_ff_out_round_trips(family, tiny_model, tiny_inputs, tmp_path):
    """ff_out_side='output' is an ordinary (out, 1) PEFT vector outside feedforward_modules, both ways."""
    base = tiny_model(family)
    ids = tiny_inputs(family)
    config = IA3Config(targets=("value", "ff_out"), ff_out_side="output")

    model, peft_model = _write_and_load_in_peft(base, config, tmp_path, mean=1.0)

    assert json.loads((tmp_path / "adapter_config.json").read_text())["feedforward_modules"] == []
    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))
    checkpoint = read_peft(adapterkit.init(copy.deepcopy(base))._adapterkit, tmp_path)
    # GPT-2's fused c_attn comes back with vectors of ones on the query and key parts.
    assert checkpoint.config.ff_out_side == "output"
    assert {"value", "ff_out"} <= set(checkpoint.config.targets)


def test_read_rejects_ia3_with_both_ff_out_sides(tiny_model, tmp_path):
    base = tiny_model("bert")
    config = peft.IA3Config(target_modules=r".*layer\.\d+\.output\.dense", feedforward_modules=r".*layer\.0\.output\.dense",
                            task_type="SEQ_CLS")
    _peft_reference(base, config, tmp_path, ("ia3_l",), mean=1.0)

    with pytest.raises(ValueError, match=r"scales the input of the ff_out layers .*layer\.0.* and the output of"):
        read_peft(adapterkit.init(base)._adapterkit, tmp_path)


def test_prefix_shift_with_padding_matches_peft(tiny_model, tmp_path):
    base = _body_model(tiny_model, "roberta", transformers.AutoModel)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 1]])  # 1 is RoBERTa's pad token here
    mask = ids.ne(1).long()
    config = peft.PrefixTuningConfig(num_virtual_tokens=PREFIX_LENGTH, task_type="FEATURE_EXTRACTION")
    peft_model = _peft_reference(base, config, tmp_path, ("prompt_encoder",))

    model, _ = _load_with_adapterkit(base, tmp_path)

    expected = _outputs(peft_model, ids, attention_mask=mask)
    actual = _outputs(model, ids, attention_mask=mask)
    assert (actual[mask.bool()] - expected[mask.bool()]).abs().max().item() < TOLERANCE


def test_prefix_shift_rejected_without_position_rule(tiny_model):
    model = adapterkit.init(tiny_model("t5"))

    with pytest.raises(ValueError, match="no position_ids rule"):
        model.add_adapter("shifted", PrefixTuningConfig(prefix_length=2, shift_positions=True))


# -- per-module ranks (rank_pattern, alpha_pattern) ---------------------------------------------

def _lora_parameter_count(peft_model):
    return sum(parameter.numel() for name, parameter in peft_model.named_parameters() if "lora_" in name)


def _trainable_count(model, name):
    model.train_adapter(name)
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


LORA_PATTERNS_FROM_PEFT = [
    ("bert", dict(target_modules=["query", "value", "intermediate.dense"],
                  rank_pattern={"value": 2, "layer.1.attention.self.query": 6},
                  alpha_pattern={"intermediate.dense": 3, "layer.0.attention.self.value": 1})),
    # gate_proj and up_proj are both ff_in, so their ranks need projection numbers.
    ("llama", dict(target_modules=["q_proj", "gate_proj", "up_proj"],
                   rank_pattern={"layers.1.mlp.up_proj": 2, "q_proj": 6}, alpha_pattern={"gate_proj": 2})),
    # Decoder blocks have a self-attention and a cross-attention q_proj, both of role query.
    ("bart", dict(target_modules=["q_proj", "fc2"], rank_pattern={"encoder_attn.q_proj": 2, "fc2": 3},
                  alpha_pattern={"decoder.layers.1.self_attn.q_proj": 3})),
    ("t5", dict(target_modules=["q", "wi_0", "wi_1"],
                rank_pattern={"wi_1": 2, "decoder.block.1.layer.1.EncDecAttention.q": 3})),
]


@pytest.mark.parametrize("family, options", LORA_PATTERNS_FROM_PEFT, ids=[case[0] for case in LORA_PATTERNS_FROM_PEFT])
def test_lora_patterns_from_peft_keep_parameter_count(family, options, tiny_model, tiny_inputs, tmp_path):
    base = tiny_model(family)
    ids = tiny_inputs(family)
    config = peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", modules_to_save=HEAD_TO_SAVE.get(family),
                             **options)
    peft_model = _peft_reference(base, config, tmp_path, ("lora_",))

    model, checkpoint = _load_with_adapterkit(base, tmp_path)

    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))
    assert checkpoint.config.rank_pattern, "per-module ranks must land in rank_pattern"
    assert not any("padded" in note or "multiplied" in note for note in checkpoint.info["notes"])
    methods = model._adapterkit.modules_of("peft")["methods"]
    assert sum(parameter.numel() for parameter in methods.parameters()) == _lora_parameter_count(peft_model)
    assert _trainable_count(model, "peft") == peft_model.get_nb_trainable_parameters()[0]


def test_lora_patterns_from_peft_with_rslora(tiny_model, tiny_inputs, tmp_path):
    base = tiny_model("bert")
    ids = tiny_inputs("bert")
    config = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["query", "value"],
                             rank_pattern={"value": 9}, task_type="SEQ_CLS")
    peft_model = _peft_reference(base, config, tmp_path, ("lora_",))

    model, checkpoint = _load_with_adapterkit(base, tmp_path)

    # PEFT scales by lora_alpha / sqrt(r): 6 / 2 for query and 6 / 3 for value, so alpha = scaling * r.
    assert checkpoint.config.rank_pattern == {"value": 9}
    assert _module_of(model, "peft", 0, "query").scaling == pytest.approx(3.0)
    assert _module_of(model, "peft", 0, "value").scaling == pytest.approx(2.0)
    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))


def _module_of(model, name, block, role, number=0):
    return model._adapterkit.modules_of(name)["methods"]["0"]["layers"][str(block)][role][number]


LORA_PATTERNS_TO_PEFT = [
    ("bert", LoRAConfig(r=4, alpha=8, targets=("query", "value", "ff_in"), rank_pattern={"value": 2, "1.query": 6},
                        alpha_pattern={"ff_in": 3, "0.value": 1})),
    ("llama", LoRAConfig(r=4, alpha=8, targets=("key", "ff_in"), rank_pattern={"ff_in.1": 2, "0.key": 5},
                         alpha_pattern={"1.ff_in.0": 2})),
    ("bart", LoRAConfig(r=4, alpha=8, targets=("query", "ff_out"), rank_pattern={"query.1": 2, "2-3.ff_out": 3},
                        leave_out=(1,))),
]


@pytest.mark.parametrize("family, config", LORA_PATTERNS_TO_PEFT, ids=[case[0] for case in LORA_PATTERNS_TO_PEFT])
def test_lora_patterns_to_peft_match(family, config, tiny_model, tiny_inputs, tmp_path):
    base = tiny_model(family)
    ids = tiny_inputs(family)

    model, peft_model = _write_and_load_in_peft(base, config, tmp_path)

    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))
    methods = model._adapterkit.modules_of("mine")["methods"]
    assert sum(parameter.numel() for parameter in methods.parameters()) == _lora_parameter_count(peft_model)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["rank_pattern"], "the per-module ranks must be written as PEFT's rank_pattern"


@pytest.mark.parametrize("family, config", LORA_PATTERNS_TO_PEFT, ids=[case[0] for case in LORA_PATTERNS_TO_PEFT])
def test_lora_patterns_round_trip_through_peft(family, config, tiny_model, tmp_path):
    model = adapterkit.init(tiny_model(family))
    model.add_adapter("mine", config)
    _randomize_adapter(model, "mine")
    write_peft(model._adapterkit, "mine", tmp_path)

    checkpoint = read_peft(adapterkit.init(tiny_model(family))._adapterkit, tmp_path)

    # The patterns read back may be written with other keys, but must give every module its rank and alpha.
    read = checkpoint.config
    assert (read.targets, read.leave_out) == (config.targets, config.leave_out)
    for key, _, module in model._adapterkit.placements_of("mine"):
        _, block, role, number = key
        assert read.rank_for(block, role, number) == module.r, key
        assert read.alpha_for(block, role, number) == module.alpha, key
    for key, value in model._adapterkit.modules_of("mine").state_dict().items():
        assert torch.equal(checkpoint.weights[key], value), key


def test_lora_patterns_on_fused_layer_to_peft(tiny_model, tiny_inputs, tmp_path, caplog):
    base = tiny_model("gpt2")
    ids = tiny_inputs("gpt2")
    # Block 0: query (r 2, alpha 4) and value (r 4, alpha 8) share the scaling 2. Block 1: query has 1 / 2.
    config = LoRAConfig(r=2, alpha=4, targets=("query", "value"), rank_pattern={"value": 4},
                        alpha_pattern={"value": 8, "1.query": 1})

    with caplog.at_level("WARNING", logger="adapterkit.formats.peft"):
        model, peft_model = _write_and_load_in_peft(base, config, tmp_path)

    _assert_close(_outputs(model, ids), _outputs(peft_model, ids), _outputs(base, ids))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    # One PEFT LoRA per c_attn, of rank 2 + 4 and alpha 4 + 8 (block 0) or 1 + 8 (block 1).
    assert written["r"] == 6
    assert written["rank_pattern"] == {}
    alphas = {written["lora_alpha"], *written["alpha_pattern"].values()}
    assert alphas == {12, 9}
    warnings = [record.getMessage() for record in caplog.records if "different scalings" in record.getMessage()]
    assert len(warnings) == 1
    assert "transformer.h.1.attn.c_attn" in warnings[0]


# -- encoder-decoder prefix tuning (PEFT SEQ_2_SEQ_LM) --------------------------------------------

# PEFT 0.21.2 passes an encoder-decoder prefix as the self-attention part of the decoder's cache. So only
# the decoder self-attention attends to it, T5's relative bias numbers the decoder queries and keys after it,
# and BART's decoder numbers its learned positions after it.
SEQ2SEQ_FAMILIES = [("t5", {}), ("bart", {}), ("t5", {"num_layers": 3, "num_decoder_layers": 3})]
SEQ2SEQ_IDS = ["t5", "bart", "t5-3-layers"]


def _seq2seq_model(tiny_model, family, **changes):
    config = tiny_model(family, **changes).config
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(config).eval()


def _peft_prefix_token_dim(config):
    # T5's attention width is num_heads * d_kv (64 here), not d_model, so PEFT needs it given.
    if config.model_type == "t5":
        return config.num_heads * config.d_kv
    return config.d_model


def _seq2seq_inputs():
    """Return encoder ids ``(2, 7)`` with a padded second row, their mask, and decoder ids ``(2, 5)``.

    The ids are in ``[3, 99)``, clear of the pad, bos and eos ids of the tiny T5 and BART configs.
    """
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    decoder_ids = torch.randint(3, 99, (2, 5), generator=generator)
    return ids, mask, decoder_ids


@torch.no_grad()
def _seq2seq_logits(model, ids, mask, decoder_ids, **kwargs):
    return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, **kwargs).logits


def _peft_seq2seq_reference(base, directory):
    config = peft.PrefixTuningConfig(num_virtual_tokens=PREFIX_LENGTH, task_type="SEQ_2_SEQ_LM",
                                     token_dim=_peft_prefix_token_dim(base.config))
    return _peft_reference(base, config, directory, ("prompt_encoder",), std=0.5)


@pytest.mark.parametrize("family, changes", SEQ2SEQ_FAMILIES, ids=SEQ2SEQ_IDS)
def test_prefix_from_peft_seq2seq_matches(family, changes, tiny_model, tmp_path):
    base = _seq2seq_model(tiny_model, family, **changes)
    ids, mask, decoder_ids = _seq2seq_inputs()
    peft_model = _peft_seq2seq_reference(base, tmp_path)
    model = adapterkit.init(copy.deepcopy(base))

    name = model.load_adapter(tmp_path)

    expected = _seq2seq_logits(peft_model, ids, mask, decoder_ids)
    base_logits = _seq2seq_logits(base, ids, mask, decoder_ids)
    _assert_close(_seq2seq_logits(model, ids, mask, decoder_ids), expected, base_logits)
    decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask[0, 3:] = 0
    _assert_close(_seq2seq_logits(model, ids, mask, decoder_ids, decoder_attention_mask=decoder_mask),
                  _seq2seq_logits(peft_model, ids, mask, decoder_ids, decoder_attention_mask=decoder_mask),
                  base_logits)
    assert model._adapterkit.entries[name].config == PrefixTuningConfig(
        prefix_length=PREFIX_LENGTH, flat=True, encoder_prefix=False, cross_prefix=False,
        shift_positions=family == "bart", position_bias="shifted")


@pytest.mark.parametrize("family, changes", SEQ2SEQ_FAMILIES, ids=SEQ2SEQ_IDS)
def test_prefix_from_peft_seq2seq_needs_cache_positions(family, changes, tiny_model, tmp_path):
    base = _seq2seq_model(tiny_model, family, **changes)
    ids, mask, decoder_ids = _seq2seq_inputs()
    peft_model = _peft_seq2seq_reference(base, tmp_path)
    model, checkpoint = _load_with_adapterkit(base, tmp_path)
    # The positions PEFT's cache gives: without them (T5's relative bias over the real keys only, BART's
    # positions from 0) the outputs differ.
    unshifted = checkpoint.config.replace(position_bias="zero", shift_positions=False)
    model.add_adapter("unshifted", unshifted)
    model._adapterkit.modules_of("unshifted").load_state_dict(model._adapterkit.modules_of("peft").state_dict())
    model.set_active_adapters("unshifted")

    difference = _seq2seq_logits(model, ids, mask, decoder_ids) - _seq2seq_logits(peft_model, ids, mask, decoder_ids)

    assert difference.abs().max().item() > MIN_EFFECT


def _greedy_without_cache(model, ids, mask, start_id, suppressed, steps):
    """Decode ``steps`` tokens greedily, running the whole decoder input at every step (no KV cache)."""
    decoder_ids = torch.full((ids.shape[0], 1), start_id)
    for _ in range(steps):
        logits = _seq2seq_logits(model, ids, mask, decoder_ids)[:, -1].clone()
        logits[:, suppressed] = float("-inf")
        decoder_ids = torch.cat([decoder_ids, logits.argmax(-1, keepdim=True)], dim=1)
    return decoder_ids


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_prefix_from_peft_seq2seq_generate(family, tiny_model, tmp_path):
    base = _seq2seq_model(tiny_model, family)
    ids, mask, _ = _seq2seq_inputs()
    peft_model = _peft_seq2seq_reference(base, tmp_path)
    model = adapterkit.init(copy.deepcopy(base))
    model.load_adapter(tmp_path)
    # The pad (T5's decoder start) and eos ids dominate these random models, so they are suppressed.
    suppressed = [base.config.pad_token_id, base.config.eos_token_id]
    steps = 4

    # NOTE: PeftModel.generate is no reference here. With transformers 5.25, generate passes its own
    # cache, and the model ignores the prefix cache that PEFT 0.21.2 adds as past_key_values.
    expected = _greedy_without_cache(peft_model, ids, mask, base.config.decoder_start_token_id, suppressed, steps)
    output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                            suppress_tokens=suppressed, forced_eos_token_id=None, return_dict_in_generate=True,
                            output_logits=True)

    assert output.sequences.tolist() == expected.tolist()
    # Every cached decoding step gives the logits of PEFT's forward over the whole prefix of the output.
    reference = _seq2seq_logits(peft_model, ids, mask, output.sequences[:, :-1])
    base_logits = _seq2seq_logits(base, ids, mask, output.sequences[:, :-1])
    for step, logits in enumerate(output.logits):
        _assert_close(logits, reference[:, step], base_logits[:, step])


SEQ2SEQ_TO_PEFT = [("t5", True, {}), ("bart", False, {}), ("t5", False, {"num_layers": 3, "num_decoder_layers": 3})]


@pytest.mark.parametrize("family, flat, changes", SEQ2SEQ_TO_PEFT, ids=["t5-flat", "bart-mlp", "t5-3-layers-mlp"])
def test_prefix_to_peft_seq2seq_matches(family, flat, changes, tiny_model, tmp_path):
    base = _seq2seq_model(tiny_model, family, **changes)
    ids, mask, decoder_ids = _seq2seq_inputs()
    config = PrefixTuningConfig(prefix_length=PREFIX_LENGTH, bottleneck_size=16, flat=flat, encoder_prefix=False,
                                cross_prefix=False, position_bias="shifted", shift_positions=family == "bart")
    model = adapterkit.init(copy.deepcopy(base))
    model.add_adapter("mine", config)
    _randomize_adapter(model, "mine", std=0.5)
    model.set_active_adapters("mine")

    model.save_adapter(tmp_path, "mine", format="peft")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["task_type"], written["num_transformer_submodules"]) == ("SEQ_2_SEQ_LM", 2)
    _assert_close(_seq2seq_logits(model, ids, mask, decoder_ids), _seq2seq_logits(peft_model, ids, mask, decoder_ids),
                  _seq2seq_logits(base, ids, mask, decoder_ids))


@pytest.mark.parametrize("family, changes, message", [
    ("t5", {}, r"encoder_prefix=True: .*encoder_prefix=False, cross_prefix=False, position_bias='shifted'\)"),
    ("t5", {"encoder_prefix": False}, r"cross_prefix=True: .*cross_prefix=False"),
    ("t5", {"encoder_prefix": False, "cross_prefix": False}, r"position_bias='zero': .*position_bias='shifted'"),
    ("bart", {"encoder_prefix": False, "cross_prefix": False, "position_bias": "shifted"},
     r"shift_positions=False: .*shift_positions=True\)"),
    ("bart", {"encoder_prefix": False, "cross_prefix": False, "shift_positions": True, "leave_out": (3,)},
     r"decoder blocks \[3\] \(leave_out=\[3\]\)"),
], ids=["t5-encoder", "t5-cross", "t5-bias", "bart-positions", "bart-leave-out"])
def test_prefix_to_peft_seq2seq_rejects(family, changes, message, tiny_model, tmp_path):
    model = adapterkit.init(_seq2seq_model(tiny_model, family))
    model.add_adapter("mine", PrefixTuningConfig(prefix_length=2, **changes))

    with pytest.raises(ValueError, match=message):
        model.save_adapter(tmp_path, "mine", format="peft")
    assert not (tmp_path / "adapter_config.json").exists()


def test_prefix_shifted_bias_needs_first_block(tiny_model):
    # Only the first T5 block has the relative bias embedding, so a later block cannot get a longer prefix.
    model = adapterkit.init(_seq2seq_model(tiny_model, "t5"))
    model.add_adapter("mine", PrefixTuningConfig(prefix_length=2, encoder_prefix=False, cross_prefix=False,
                                                 position_bias="shifted", leave_out=(2,)))
    model.set_active_adapters("mine")
    ids, mask, decoder_ids = _seq2seq_inputs()

    with pytest.raises(NotImplementedError, match="layer 1 of this T5 stack has a prefix of 2 positions"):
        _seq2seq_logits(model, ids, mask, decoder_ids)
