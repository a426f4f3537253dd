"""Reading and writing AdapterHub ``adapters`` 1.3.0 checkpoints, checked against the committed reference fixtures.

``tests/fixtures/adapters`` contains checkpoints that ``adapters`` 1.3.0 wrote on transformers 4.57, with
the outputs its models computed (scripts/adapters_fixtures/make_fixtures.py). Here adapterkit loads
each one into the same base model on this transformers version and must reproduce those outputs
within 1e-5, with eager attention as the fixtures used. The other direction writes each adapter
back in the ``adapters`` format and reloads it. The slow test also loads a few written folders with
``adapters`` itself, which needs its own environment.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import adapterkit
from adapterkit import BottleneckConfig, ConfigUnion, IA3Config, InvertibleConfig, LoRAConfig, PrefixTuningConfig
from adapterkit.io import detect_format

FIXTURES = Path(__file__).parent / "fixtures" / "adapters"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
REPOSITORY = Path(__file__).resolve().parents[1]
ADAPTERS_PYTHON = Path("/work/venv-adapters/bin/python")
TOLERANCE = 1e-5

OK_FIXTURES = [entry for entry in MANIFEST["fixtures"] if entry["status"] == "ok" and entry["method"] != "fusion"]
# The transformers class (and options) whose head fits each flexible-head fixture; the head tests load them.
HEAD_MODELS = {
    "bert/head_pooler": ("BertForSequenceClassification", {}),
    "bert/head_tagging": ("BertForTokenClassification", {}),
    "roberta/head_tagging": ("RobertaForTokenClassification", {}),
    "roberta/head_multilabel": ("RobertaForSequenceClassification", {"problem_type": "multi_label_classification"}),
}
READABLE = [entry for entry in OK_FIXTURES if not entry["method"].startswith("head_")]
# One folder per method and family that the slow test loads with adapters itself.
LIVE = ["bert/seq_bn_static_head", "roberta/mam", "gpt2/lora", "llama/ia3", "bart/prefix_tuning",
        "t5/double_seq_bn", "gpt2/seq_bn_inv", "llama/compacter", "t5/prefix_tuning", "t5/prefix_tuning_leave_out",
        "bert/head_tagging"]


def fixture_ids(entries: list[dict]) -> list[str]:
    return [entry["id"] for entry in entries]


def entry_of(fixture_id: str) -> dict:
    return next(entry for entry in MANIFEST["fixtures"] if entry["id"] == fixture_id)


def load_base(entry: dict) -> transformers.PreTrainedModel:
    """Load the fixture's base model as the class whose head the checkpoint fits, wrapped by adapterkit.

    BERT fixtures from adapters' flexible-head model carry a 2-layer head on the [CLS] state, which
    ``BertForSequenceClassification`` computes only after its pooler was replaced, so they load into
    ``BertModel`` without a head. The fixtures of HEAD_MODELS load into the class named there.
    """
    family = entry["family"]
    base = FIXTURES / family / "base"
    options = {"attn_implementation": "eager"}
    if entry["id"] in HEAD_MODELS:
        class_name, head_options = HEAD_MODELS[entry["id"]]
        model = getattr(transformers, class_name).from_pretrained(base, num_labels=3, **head_options, **options)
    elif family == "roberta":
        model = transformers.RobertaForSequenceClassification.from_pretrained(base, num_labels=3, **options)
    elif entry.get("model_class") == "BertForSequenceClassification":
        model = transformers.BertForSequenceClassification.from_pretrained(base, num_labels=3, **options)
    elif family == "bert":
        model = transformers.BertModel.from_pretrained(base, **options)
    else:
        architecture = json.loads((base / "config.json").read_text(encoding="utf-8"))["architectures"][0]
        model = getattr(transformers, architecture).from_pretrained(base, **options)
    return adapterkit.init(model.eval())


def run(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """Run the fixtures' forward call and return the outputs they store (see scripts/adapters_fixtures)."""
    raw = json.loads((FIXTURES / family / "inputs.json").read_text(encoding="utf-8"))
    inputs = {key: torch.tensor(raw[key]) for key in ("input_ids", "attention_mask", "decoder_input_ids") if key in raw}
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True)
    if "decoder_input_ids" in inputs:
        result = {"last_hidden_state": output.decoder_hidden_states[-1],
                  "encoder_last_hidden_state": output.encoder_last_hidden_state}
    else:
        result = {"last_hidden_state": output.hidden_states[-1]}
    logits = getattr(output, "logits", None)
    if logits is not None and logits.dim() == 2:
        result["logits"] = logits
    return result


def max_differences(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: (actual[key] - value).abs().max().item() for key, value in expected.items() if key in actual}


def copy_fixture(fixture_id: str, target: Path) -> Path:
    folder = target / fixture_id.replace("/", "_")
    shutil.copytree(FIXTURES / fixture_id, folder)
    return folder


def edit_config(folder: Path, change) -> None:
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    change(saved["config"])
    path.write_text(json.dumps(saved), encoding="utf-8")


# -- reading --------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", READABLE, ids=fixture_ids(READABLE))
def test_fixture_outputs_match(entry):
    model = load_base(entry)
    model.load_adapter(FIXTURES / entry["id"])
    actual = run(model, entry["family"])

    expected = load_file(str(FIXTURES / entry["id"] / "expected.safetensors"))
    differences = max_differences(expected, actual)
    assert "last_hidden_state" in differences
    if entry["family"] == "roberta" or entry["id"] == "bert/seq_bn_static_head":
        assert "logits" in differences
    assert max(differences.values()) <= TOLERANCE, differences

    # The adapter must change the outputs, or matching them proves nothing.
    base = load_file(str(FIXTURES / entry["family"] / "base" / "expected.safetensors"))
    assert (actual["last_hidden_state"] - base["last_hidden_state"]).abs().max().item() > 1e-3


@pytest.mark.parametrize("fixture_id", ["t5/prefix_tuning", "t5/prefix_tuning_leave_out", "t5/mam"])
def test_t5_prefix_reads_concatenated_bias(fixture_id):
    """adapters computes T5's relative position bias over prefix and real keys together; zero bias would differ."""
    model = load_base(entry_of(fixture_id))
    name = model.load_adapter(FIXTURES / fixture_id)
    members = model._adapterkit.entries[name].config.methods
    prefix_index, prefix_config = next((i, m) for i, m in enumerate(members) if isinstance(m, PrefixTuningConfig))
    assert prefix_config.position_bias == "concatenated"

    zero_members = [m.replace(position_bias="zero") if i == prefix_index else m for i, m in enumerate(members)]
    model.add_adapter("zero", zero_members[0] if len(zero_members) == 1 else ConfigUnion(*zero_members))
    model._adapterkit.modules_of("zero").load_state_dict(model._adapterkit.modules_of(name).state_dict())
    model.set_active_adapters("zero")
    expected = load_file(str(FIXTURES / fixture_id / "expected.safetensors"))
    assert max(max_differences(expected, run(model, "t5")).values()) > 1e-3


def test_flexible_bert_head_raises():
    model = adapterkit.init(transformers.BertForSequenceClassification.from_pretrained(FIXTURES / "bert" / "base",
                                                                                       num_labels=3).eval())
    with pytest.raises(ValueError, match="flexible head") as error:
        model.load_adapter(FIXTURES / "bert" / "seq_bn")
    assert "'layers': 2" in str(error.value)
    assert "BertForSequenceClassification" in str(error.value)


def test_head_labels_read(tmp_path):
    folder = copy_fixture("roberta/seq_bn", tmp_path)
    path = folder / "head_config.json"
    head = json.loads(path.read_text(encoding="utf-8"))
    head["config"]["label2id"] = {"neutral": 1, "negative": 0, "positive": 2}
    path.write_text(json.dumps(head), encoding="utf-8")
    model = load_base(entry_of("roberta/seq_bn"))

    name = model.load_adapter(folder)

    assert name == "seq_bn"
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model._adapterkit.entries[name].labels == ["negative", "neutral", "positive"]


def test_detect_format_finds_adapters():
    assert detect_format(FIXTURES / "gpt2" / "lora") == "adapters"
    assert detect_format(FIXTURES / "bert" / "fusion" / "fusion") == "adapters"
    assert detect_format(FIXTURES / "bert" / "fusion" / "fuse_a") == "adapters"


def test_load_adapter_rejects_fusion_folder():
    # Fusion folders load with load_adapter_fusion (tests/test_fusion.py).
    model = load_base(entry_of("bert/seq_bn"))
    model.load_adapter(FIXTURES / "bert" / "fusion" / "fuse_a")
    with pytest.raises(ValueError, match="AdapterFusion checkpoint.*load_adapter_fusion"):
        model.load_adapter(FIXTURES / "bert" / "fusion" / "fusion")
    assert [row["name"] for row in model.adapter_summary(as_dict=True)] == ["fuse_a"]


def test_unknown_config_key_warns(tmp_path, caplog):
    folder = copy_fixture("gpt2/seq_bn", tmp_path)
    edit_config(folder, lambda config: config.update(future_option=3))
    model = load_base(entry_of("gpt2/seq_bn"))

    with caplog.at_level(logging.WARNING, logger="adapterkit"):
        model.load_adapter(folder)

    assert "future_option" in caplog.text
    expected = load_file(str(FIXTURES / "gpt2" / "seq_bn" / "expected.safetensors"))
    assert max(max_differences(expected, run(model, "gpt2")).values()) <= TOLERANCE


UNMAPPABLE = [
    ("gpt2/seq_bn", {"use_gating": True}, "use_gating"),
    ("gpt2/seq_bn", {"original_ln_after": False}, "original_ln_after"),
    ("bert/seq_bn", {"residual_before_ln": "post_add"}, "residual_before_ln"),
    ("gpt2/seq_bn", {"ln_after": True, "adapter_residual_before_ln": True}, "adapter_residual_before_ln"),
    ("gpt2/seq_bn_inv", {"inv_adapter": "glow"}, "glow"),
    ("gpt2/compacter", {"shared_W_phm": True}, "shared_W_phm"),
    ("gpt2/seq_bn", {"reduction_factor": {"0": 8, "1": 16}}, "different bottleneck widths"),
    ("llama/lora", {"use_dora": True}, "use_dora"),
    ("llama/lora", {"vera_d": 0.1}, "VeRA"),
    ("llama/lora", {"attn_matrices": ["q", "o"]}, "attn_matrices"),
    ("llama/prefix_tuning", {"use_gating": True}, "use_gating"),
    ("gpt2/seq_bn", {"architecture": "reft"}, "ReFT"),
]


@pytest.mark.parametrize(("fixture_id", "changes", "message"), UNMAPPABLE,
                         ids=[f"{f}-{'-'.join(c)}" for f, c, _ in UNMAPPABLE])
def test_unmappable_option_raises(tmp_path, fixture_id, changes, message):
    folder = copy_fixture(fixture_id, tmp_path)
    edit_config(folder, lambda config: config.update(changes))
    model = load_base(entry_of(fixture_id))
    with pytest.raises(ValueError, match=message):
        model.load_adapter(folder)


def test_missing_weights_raise(tmp_path):
    folder = copy_fixture("llama/lora", tmp_path)
    state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    del state["model.layers.1.mlp.up_proj.loras.lora.lora_B"]
    torch.save(state, folder / "pytorch_adapter.bin")
    model = load_base(entry_of("llama/lora"))
    with pytest.raises(ValueError, match="mlp.up_proj.loras.lora.lora_B"):
        model.load_adapter(folder)


def test_unexplained_weights_raise(tmp_path):
    folder = copy_fixture("llama/seq_bn", tmp_path)
    state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    state["model.layers.0.self_attn.prefix_gates.seq_bn.weight"] = torch.zeros(1, 32)
    torch.save(state, folder / "pytorch_adapter.bin")
    model = load_base(entry_of("llama/seq_bn"))
    with pytest.raises(ValueError, match="prefix_gates"):
        model.load_adapter(folder)


def test_llama_intermediate_lora_is_down_proj(tmp_path):
    """On Llama, adapters' intermediate_lora wraps mlp.down_proj (adapterkit's ff_out), not up_proj."""
    folder = copy_fixture("llama/lora", tmp_path)
    edit_config(folder, lambda config: config.update(output_lora=False))
    state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    state = {key: value for key, value in state.items() if ".up_proj." not in key}
    torch.save(state, folder / "pytorch_adapter.bin")
    model = load_base(entry_of("llama/lora"))

    name = model.load_adapter(folder)

    assert model._adapterkit.entries[name].config.targets == ("query", "value", "ff_out")
    down = model._adapterkit.modules_of(name)["methods"]["0"]["layers"]["1"]["ff_out"][0]
    assert torch.equal(down.lora_A, state["model.layers.1.mlp.down_proj.loras.lora.lora_A"])


def test_older_lora_version_sets_alpha_to_r(tmp_path):
    """adapters 1.3.0 sets alpha to r for LoRA checkpoints of versions before 1.1.0, whose scaling was faulty."""
    folder = copy_fixture("llama/lora", tmp_path)
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["version"] = "adapters.1.0.1"
    path.write_text(json.dumps(saved), encoding="utf-8")
    model = load_base(entry_of("llama/lora"))

    name = model.load_adapter(folder)

    config = model._adapterkit.entries[name].config
    assert (config.r, config.alpha) == (4, 4)


# -- writing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", READABLE, ids=fixture_ids(READABLE))
def test_written_checkpoint_matches_fixture(entry, tmp_path):
    model = load_base(entry)
    name = model.load_adapter(FIXTURES / entry["id"])
    before = run(model, entry["family"])

    model.save_adapter(tmp_path / "written", name, format="adapters")

    # adapterkit reads its own output back to the same outputs.
    fresh = load_base(entry)
    assert fresh.load_adapter(tmp_path / "written") == name
    after = run(fresh, entry["family"])
    assert max(max_differences(before, after).values()) <= 1e-6

    # The weights carry adapters' keys and values: the fixture's, without the "bert." prefix of
    # BertAdapterModel when the base is a BertModel.
    written = torch.load(tmp_path / "written" / "pytorch_adapter.bin", weights_only=True)
    saved = torch.load(FIXTURES / entry["id"] / "pytorch_adapter.bin", weights_only=True)
    if isinstance(model, transformers.BertModel):
        saved = {key.removeprefix("bert."): value for key, value in saved.items()}
    assert sorted(written) == sorted(saved)
    unequal = [key for key in saved if not torch.equal(written[key], saved[key])]
    assert unequal == []

    # The config equals adapters' own, except that an ejected prefix is now marked flat.
    written_config = json.loads((tmp_path / "written" / "adapter_config.json").read_text(encoding="utf-8"))
    saved_config = json.loads((FIXTURES / entry["id"] / "adapter_config.json").read_text(encoding="utf-8"))
    if entry["method"] == "prefix_tuning_ejected":
        saved_config["config"]["flat"] = True
    assert written_config["config"] == saved_config["config"]
    assert written_config["name"] == saved_config["name"]
    assert written_config["model_class"] == type(model).__name__


def test_written_static_head(tmp_path):
    model = load_base(entry_of("roberta/seq_bn"))
    name = model.load_adapter(FIXTURES / "roberta" / "seq_bn")

    model.save_adapter(tmp_path, name, format="adapters")

    head_config = json.loads((tmp_path / "head_config.json").read_text(encoding="utf-8"))
    assert head_config["config"] is None
    assert head_config["model_class"] == "RobertaForSequenceClassification"
    assert head_config["num_labels"] == 3
    assert head_config["label2id"] == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    head = torch.load(tmp_path / "pytorch_model_head.bin", weights_only=True)
    flexible = torch.load(FIXTURES / "roberta" / "seq_bn" / "pytorch_model_head.bin", weights_only=True)
    assert torch.equal(head["classifier.dense.weight"], flexible["heads.seq_bn.1.weight"])
    assert torch.equal(head["classifier.out_proj.bias"], flexible["heads.seq_bn.4.bias"])


def test_written_safetensors(tmp_path):
    """Prefix tuning shares tensors between keys, which adapters' own safetensors export rejects."""
    from adapterkit.formats.adapters import write_adapters

    model = load_base(entry_of("gpt2/prefix_tuning"))
    name = model.load_adapter(FIXTURES / "gpt2" / "prefix_tuning")
    before = run(model, "gpt2")

    write_adapters(model._adapterkit, name, tmp_path)
    write_adapters(model._adapterkit, name, tmp_path, safetensors=True)

    # The .bin file of the first write is gone, so no reader can pick the stale weights.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    fresh = load_base(entry_of("gpt2/prefix_tuning"))
    fresh.load_adapter(tmp_path)
    assert max(max_differences(before, run(fresh, "gpt2")).values()) <= 1e-6


def test_t5_compacter_rule_written_and_required(tmp_path):
    """adapters 1.3.0 drops T5's shared Compacter rule; adapterkit writes it and refuses a folder without it."""
    entry = entry_of("t5/seq_bn")
    model = load_base(entry)
    model.add_adapter("compacter", BottleneckConfig(mh_adapter=True, output_adapter=True, reduction_factor=4,
                                                    non_linearity="gelu", original_ln_before=False, phm_layer=True))
    with torch.no_grad():
        for parameter in model._adapterkit.modules_of("compacter")["methods"].parameters():
            parameter.normal_(std=0.2)
    model.set_active_adapters("compacter")
    before = run(model, "t5")
    model.save_adapter(tmp_path, "compacter", format="adapters")

    fresh = load_base(entry)
    fresh.load_adapter(tmp_path)
    assert max(max_differences(before, run(fresh, "t5")).values()) <= 1e-6

    state = torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True)
    del state["shared_parameters.compacter.phm_rule"]
    torch.save(state, tmp_path / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match="shared Compacter rule"):
        load_base(entry).load_adapter(tmp_path)


UNWRITABLE = [
    ("gpt2/seq_bn", "conv", "projection='conv'"),
    ("bert/seq_bn", IA3Config(), "ff_out_side"),
    ("bert/seq_bn", LoRAConfig(targets=("attention_output",)), "attention_output"),
    ("llama/seq_bn", BottleneckConfig(before_head=True), "before_head"),
    ("llama/seq_bn", ConfigUnion(BottleneckConfig(), InvertibleConfig(block_type="glow")), "glow"),
]


@pytest.mark.parametrize(("fixture_id", "config", "message"), UNWRITABLE, ids=[m for _, _, m in UNWRITABLE])
def test_unwritable_adapter_raises(tmp_path, fixture_id, config, message):
    model = load_base(entry_of(fixture_id))
    model.add_adapter("extra", config)
    with pytest.raises(ValueError, match=message):
        model.save_adapter(tmp_path, "extra", format="adapters")
    assert not (tmp_path / "adapter_config.json").exists()


def test_lora_outside_adapters_placement_raises(tmp_path):
    """adapters' output_lora wraps Llama's up_proj only, so a LoRA on gate_proj cannot be written."""
    model = load_base(entry_of("llama/lora"))
    model.add_adapter("gate", LoRAConfig(r=2, targets=("ff_in",), init_weights="bert"))
    with pytest.raises(ValueError, match="mlp.gate_proj"):
        model.save_adapter(tmp_path, "gate", format="adapters")


def test_convert_command_round_trip(tmp_path):
    from adapterkit.cli import main

    source = FIXTURES / "gpt2" / "lora"
    base = FIXTURES / "gpt2" / "base"
    assert main(["--quiet", "convert", str(source), str(tmp_path / "ak"), "--to", "adapterkit",
                 "--model", str(base)]) == 0
    assert main(["--quiet", "convert", str(tmp_path / "ak"), str(tmp_path / "back"), "--to", "adapters",
                 "--model", str(base)]) == 0

    model = load_base(entry_of("gpt2/lora"))
    model.load_adapter(tmp_path / "back")
    expected = load_file(str(source / "expected.safetensors"))
    assert max(max_differences(expected, run(model, "gpt2")).values()) <= TOLERANCE


# -- the adapters library itself ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not ADAPTERS_PYTHON.is_file(),
                    reason="needs the adapters 1.3.0 environment at /work/venv-adapters, which "
                           "scripts/adapters_fixtures/setup_env.sh builds; CI has no such environment")
def test_adapters_library_loads_written_checkpoints(tmp_path):
    failures = []
    for fixture_id in LIVE:
        entry = entry_of(fixture_id)
        model = load_base(entry)
        name = model.load_adapter(FIXTURES / fixture_id)
        folder = tmp_path / fixture_id.replace("/", "_")
        model.save_adapter(folder, name, format="adapters")
        family = entry["family"]
        result = subprocess.run(
            [str(ADAPTERS_PYTHON), str(REPOSITORY / "scripts" / "adapters_fixtures" / "check_live.py"),
             "--adapter", str(folder), "--base", str(FIXTURES / family / "base"),
             "--inputs", str(FIXTURES / family / "inputs.json"),
             "--expected", str(FIXTURES / fixture_id / "expected.safetensors")],
            capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            failures.append(f"{fixture_id}: exit {result.returncode}\n{result.stdout[-800:]}{result.stderr[-800:]}")
    assert failures == [], "\n".join(failures)


# -- the config fields the adapters format needed ------------------------------------------------

def tiny_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=99)
    return adapterkit.init(transformers.LlamaForCausalLM(config).eval())


def capture_output(module: torch.nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda _module, _args, output: store.append(output.detach().clone()))


def test_ia3_ff_out_side_output_scales_output():
    model = tiny_llama()
    input_ids = torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(1))
    down_proj = model.model.layers[0].mlp.down_proj
    plain, adapted = [], []
    handle = capture_output(down_proj, plain)
    with torch.no_grad():
        model(input_ids=input_ids)
    handle.remove()

    model.add_adapter("scale", IA3Config(targets=("ff_out",), ff_out_side="output"))
    scale = model._adapterkit.modules_of("scale")["methods"]["0"]["layers"]["0"]["ff_out"][0].scale
    with torch.no_grad():
        scale.uniform_(0.5, 1.5)
    model.set_active_adapters("scale")
    handle = capture_output(down_proj, adapted)
    with torch.no_grad():
        model(input_ids=input_ids)
    handle.remove()

    assert scale.shape == (32,)
    torch.testing.assert_close(adapted[0], plain[0] * scale, rtol=0, atol=1e-6)


def test_ia3_ff_out_side_default_scales_input():
    model = tiny_llama()
    model.add_adapter("scale", IA3Config(targets=("ff_out",)))
    scale = model._adapterkit.modules_of("scale")["methods"]["0"]["layers"]["0"]["ff_out"][0].scale
    assert scale.shape == (37,)


def test_ia3_ff_out_side_rejects_unknown_value():
    with pytest.raises(ValueError, match="ff_out_side='middle'"):
        IA3Config(ff_out_side="middle")


def test_invertible_invert_output_false_skips_inverse():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64)
    model = adapterkit.init(transformers.GPT2LMHeadModel(config).eval())
    input_ids = torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(1))
    model.add_adapter("inverted", InvertibleConfig())
    model.add_adapter("not_inverted", InvertibleConfig(invert_output=False))
    inverted = model._adapterkit.modules_of("inverted")["methods"]["0"]["invertible"]
    with torch.no_grad():
        for parameter in inverted.parameters():
            parameter.normal_(std=0.3)
    model._adapterkit.modules_of("not_inverted").load_state_dict(model._adapterkit.modules_of("inverted").state_dict())

    outputs = {}
    for name in ("inverted", "not_inverted"):
        model.set_active_adapters(name)
        with torch.no_grad():
            outputs[name] = model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]

    # With the inverse, the last hidden state is inverse(h); without it, h itself.
    assert (outputs["inverted"] - outputs["not_inverted"]).abs().max().item() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(inverted(outputs["inverted"]), outputs["not_inverted"], rtol=0, atol=1e-5)


# -- T5 prefix tuning and generation ---------------------------------------------------------------

@pytest.mark.parametrize("fixture_id", ["t5/prefix_tuning", "t5/prefix_tuning_leave_out"])
def test_t5_prefix_generation_matches_adapters(fixture_id):
    """Greedy decoding with the KV cache gives the tokens and logits that adapters 1.3.0 generated."""
    model = load_base(entry_of(fixture_id))
    model.load_adapter(FIXTURES / fixture_id)
    raw = json.loads((FIXTURES / "t5" / "inputs.json").read_text(encoding="utf-8"))
    prompt = {"input_ids": torch.tensor(raw["input_ids"]), "attention_mask": torch.tensor(raw["attention_mask"])}
    expected = load_file(str(FIXTURES / fixture_id / "generation.safetensors"))
    steps = expected["logits"].shape[0]
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                    return_dict_in_generate=True)

    with torch.no_grad():
        cached = model.generate(**prompt, use_cache=True, **settings)
        uncached = model.generate(**prompt, use_cache=False, **settings)
        static = model.generate(**prompt, cache_implementation="static", **settings)

    for output in (cached, uncached, static):
        assert torch.equal(output.sequences, expected["sequences"])
        torch.testing.assert_close(torch.stack(output.logits), expected["logits"], atol=TOLERANCE, rtol=0)


def test_t5_zero_bias_prefix_write_raises(tmp_path):
    model = load_base(entry_of("t5/seq_bn"))
    model.add_adapter("prefix", PrefixTuningConfig(prefix_length=3, bottleneck_size=8))
    with pytest.raises(ValueError, match="position_bias='zero'.*position_bias='concatenated'"):
        model.save_adapter(tmp_path, "prefix", format="adapters")
    assert not (tmp_path / "adapter_config.json").exists()


def test_t5_concatenated_prefix_round_trip(tmp_path):
    """A T5 prefix trained in adapterkit with position_bias='concatenated' writes and reads back unchanged."""
    model = load_base(entry_of("t5/seq_bn"))
    model.add_adapter("prefix", PrefixTuningConfig(prefix_length=3, bottleneck_size=8, position_bias="concatenated"))
    with torch.no_grad():
        for parameter in model._adapterkit.modules_of("prefix")["methods"].parameters():
            parameter.normal_(std=0.3)
    model.set_active_adapters("prefix")
    before = run(model, "t5")

    model.save_adapter(tmp_path / "adapters", "prefix", format="adapters")
    model.save_adapter(tmp_path / "adapterkit", "prefix")

    for folder in ("adapters", "adapterkit"):
        fresh = load_base(entry_of("t5/seq_bn"))
        name = fresh.load_adapter(tmp_path / folder)
        assert fresh._adapterkit.entries[name].config.position_bias == "concatenated"
        assert max(max_differences(before, run(fresh, "t5")).values()) <= 1e-6


# -- flexible heads ------------------------------------------------------------------------------

def run_head_fixture(fixture_id: str) -> tuple[transformers.PreTrainedModel, dict[str, float]]:
    """Load a flexible-head fixture into the class of HEAD_MODELS and return the model and its output differences."""
    entry = entry_of(fixture_id)
    model = load_base(entry)
    model.load_adapter(FIXTURES / fixture_id)
    raw = json.loads((FIXTURES / entry["family"] / "inputs.json").read_text(encoding="utf-8"))
    inputs = {key: torch.tensor(raw[key]) for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True)
    actual = {"last_hidden_state": output.hidden_states[-1], "logits": output.logits}
    expected = load_file(str(FIXTURES / fixture_id / "expected.safetensors"))
    return model, max_differences(expected, actual)


@pytest.mark.parametrize("fixture_id", sorted(HEAD_MODELS))
def test_flexible_head_outputs_match(fixture_id):
    model, differences = run_head_fixture(fixture_id)

    assert sorted(differences) == ["last_hidden_state", "logits"]
    assert max(differences.values()) <= TOLERANCE, differences
    head_config = json.loads((FIXTURES / fixture_id / "head_config.json").read_text(encoding="utf-8"))
    assert model.config.id2label == {i: label for label, i in head_config["config"]["label2id"].items()}


@pytest.mark.parametrize("fixture_id", sorted(HEAD_MODELS))
def test_flexible_head_written_as_static_head(fixture_id, tmp_path):
    model, _ = run_head_fixture(fixture_id)
    name = fixture_id.split("/")[1]
    model.save_adapter(tmp_path, name, format="adapters")

    head_config = json.loads((tmp_path / "head_config.json").read_text(encoding="utf-8"))
    assert head_config["config"] is None
    assert head_config["model_class"] == HEAD_MODELS[fixture_id][0]
    fresh = load_base(entry_of(fixture_id))
    assert fresh.load_adapter(tmp_path) == name
    written = fresh._adapterkit.modules_of(name).state_dict()
    for key, value in model._adapterkit.modules_of(name).state_dict().items():
        assert torch.equal(written[key], value), key


def copy_first_head_layer_into_pooler(model: transformers.BertForSequenceClassification, fixture_id: str) -> None:
    head = torch.load(FIXTURES / fixture_id / "pytorch_model_head.bin", weights_only=True)
    name = fixture_id.split("/")[1]
    with torch.no_grad():
        model.bert.pooler.dense.weight.copy_(head[f"heads.{name}.1.weight"])
        model.bert.pooler.dense.bias.copy_(head[f"heads.{name}.1.bias"])


def test_bert_two_layer_head_through_copied_pooler():
    """A 2-layer tanh head on [CLS] is BERT's pooler + classifier once the pooler contains the head's first layer."""
    model = adapterkit.init(transformers.BertForSequenceClassification.from_pretrained(
        FIXTURES / "bert" / "base", num_labels=3, attn_implementation="eager").eval())
    copy_first_head_layer_into_pooler(model, "bert/seq_bn")
    pooler_before = model.bert.pooler.dense.weight.detach().clone()

    name = model.load_adapter(FIXTURES / "bert" / "seq_bn")
    raw = json.loads((FIXTURES / "bert" / "inputs.json").read_text(encoding="utf-8"))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(raw["input_ids"]),
                       attention_mask=torch.tensor(raw["attention_mask"])).logits

    expected = load_file(str(FIXTURES / "bert" / "seq_bn" / "expected.safetensors"))
    torch.testing.assert_close(logits, expected["logits"], atol=TOLERANCE, rtol=0)
    assert torch.equal(model.bert.pooler.dense.weight, pooler_before)
    head = torch.load(FIXTURES / "bert" / "seq_bn" / "pytorch_model_head.bin", weights_only=True)
    assert torch.equal(model.classifier.weight, head[f"heads.{name}.4.weight"])


def test_bert_two_layer_head_names_pooler_fix():
    model = adapterkit.init(transformers.BertForSequenceClassification.from_pretrained(
        FIXTURES / "bert" / "base", num_labels=3).eval())
    pooler_before = model.bert.pooler.dense.weight.detach().clone()

    with pytest.raises(ValueError, match="copy heads.seq_bn.1.weight and heads.seq_bn.1.bias into bert.pooler.dense"):
        model.load_adapter(FIXTURES / "bert" / "seq_bn")
    assert torch.equal(model.bert.pooler.dense.weight, pooler_before)
    assert model.adapter_summary(as_dict=True) == []


def edit_head_config(folder: Path, changes: dict) -> None:
    path = folder / "head_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["config"].update(changes)
    path.write_text(json.dumps(saved), encoding="utf-8")


UNMAPPABLE_HEADS = [
    # (fixture, head_config changes, class and options to load, message)
    ("roberta/head_one_layer", {}, ("RobertaForSequenceClassification", {}), "'layers': 1.*2-layer tanh head"),
    ("roberta/head_multilabel", {}, ("RobertaForSequenceClassification", {}),
     "BCEWithLogitsLoss.*problem_type='multi_label_classification'"),
    ("roberta/seq_bn", {}, ("RobertaForSequenceClassification", {"problem_type": "multi_label_classification"}),
     "cross-entropy"),
    ("roberta/seq_bn", {"activation_function": "relu"}, ("RobertaForSequenceClassification", {}), "'relu'"),
    ("bert/seq_bn", {"use_pooler": True}, ("BertForSequenceClassification", {}), "'use_pooler': True"),
    ("bert/head_tagging", {}, ("BertForSequenceClassification", {}), "'tagging'"),
    ("roberta/head_tagging", {"layers": 2}, ("RobertaForTokenClassification", {}), "1-layer tagging head"),
    ("bert/head_pooler", {"head_type": "question_answering"}, ("BertForSequenceClassification", {}),
     "'question_answering'"),
    ("bert/head_tagging", {}, ("BertForMultipleChoice", {}), "maps flexible heads only onto"),
]


@pytest.mark.parametrize(("fixture_id", "changes", "model_class", "message"), UNMAPPABLE_HEADS,
                         ids=[f"{f}-{c[0]}-{'-'.join(changes)}" for f, changes, c, _ in UNMAPPABLE_HEADS])
def test_unmappable_flexible_head_raises(tmp_path, fixture_id, changes, model_class, message):
    folder = copy_fixture(fixture_id, tmp_path)
    edit_head_config(folder, changes)
    class_name, options = model_class
    family = fixture_id.split("/")[0]
    model = adapterkit.init(getattr(transformers, class_name).from_pretrained(FIXTURES / family / "base",
                                                                             num_labels=3, **options).eval())

    with pytest.raises(ValueError, match="flexible head") as error:
        model.load_adapter(folder)
    assert class_name in str(error.value)
    assert error.match(message)
    assert model.adapter_summary(as_dict=True) == []


def test_head_without_bias_gets_zero_bias(tmp_path):
    folder = copy_fixture("roberta/head_tagging", tmp_path)
    edit_head_config(folder, {"bias": False})
    head = torch.load(folder / "pytorch_model_head.bin", weights_only=True)
    bias = head.pop("heads.head_tagging.1.bias")
    torch.save(head, folder / "pytorch_model_head.bin")
    entry = entry_of("roberta/head_tagging")
    model = load_base(entry)

    model.load_adapter(folder)
    raw = json.loads((FIXTURES / "roberta" / "inputs.json").read_text(encoding="utf-8"))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(raw["input_ids"]),
                       attention_mask=torch.tensor(raw["attention_mask"])).logits

    assert torch.equal(model.classifier.bias, torch.zeros(3))
    expected = load_file(str(FIXTURES / "roberta" / "head_tagging" / "expected.safetensors"))["logits"]
    torch.testing.assert_close(logits, expected - bias, atol=TOLERANCE, rtol=0)
