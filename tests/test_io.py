"""Saving adapters with their heads and loading them into fresh models."""

import json

import pytest
import torch

import adapterkit
from adapter_helpers import compute_logits, randomize_parameters, requires_grad_names
from adapterkit.io import CONFIG_FILE, WEIGHTS_FILE

VOCAB_SIZE = 99  # the vocabulary of the tiny models in conftest.py


@pytest.fixture
def saved_bert(tiny_model, input_ids, tmp_path):
    """Save a ``task`` adapter with random non-zero weights, and return its folder and the model's logits."""
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task", "houlsby")
    model.train_adapter("task")
    randomize_parameters(model._adapterkit.modules_of("task"))
    model.save_adapter(tmp_path / "task", "task")
    return tmp_path / "task", compute_logits(model, input_ids)


def test_round_trip_logits(tiny_model, input_ids, tmp_path, family, preset):
    model = adapterkit.init(tiny_model(family))
    model.add_adapter("task", preset)
    model.train_adapter("task")
    randomize_parameters(model._adapterkit.modules_of("task"))
    expected = compute_logits(model, input_ids)
    model.save_adapter(tmp_path / "task", "task")

    fresh = adapterkit.init(tiny_model(family))
    name = fresh.load_adapter(tmp_path / "task")

    assert name == "task"
    assert fresh.active_adapters == ["task"]
    assert torch.allclose(compute_logits(fresh, input_ids), expected, atol=1e-5)


def test_round_trip_restores_head(tiny_model, input_ids, saved_bert):
    directory, expected = saved_bert
    fresh = adapterkit.init(tiny_model("bert"))
    base_head_weight = fresh.classifier.weight.detach().clone()

    fresh.load_adapter(directory)

    assert not torch.equal(fresh.classifier.weight, base_head_weight)
    assert torch.allclose(compute_logits(fresh, input_ids), expected, atol=1e-5)


def test_saved_files(saved_bert):
    directory, _ = saved_bert
    description = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))

    assert (directory / WEIGHTS_FILE).is_file()
    assert description["name"] == "task"
    assert description["config"] == adapterkit.PRESETS["houlsby"].to_dict()
    assert description["base_model"]["model_type"] == "bert"
    assert description["head"]["modules"] == ["classifier"]


def test_save_leaves_no_temporary_files(saved_bert):
    directory, _ = saved_bert
    assert sorted(path.name for path in directory.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])


def test_save_unknown_raises(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))

    with pytest.raises(ValueError, match="'task'"):
        model.save_adapter(tmp_path / "task", "task")
    assert not (tmp_path / "task").exists()


def test_id2label_survives(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task")
    model._adapterkit.set_labels("task", ["negative", "neutral", "positive"])
    model.save_adapter(tmp_path / "task", "task")

    fresh = adapterkit.init(tiny_model("bert"))
    fresh.load_adapter(tmp_path / "task")

    assert fresh.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert fresh.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}


def test_load_resizes_head(tiny_model, input_ids, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task")
    model._adapterkit.set_labels("task", ["no", "yes"])
    model.train_adapter("task")
    randomize_parameters(model._adapterkit.modules_of("task"))
    expected = compute_logits(model, input_ids)
    model.save_adapter(tmp_path / "task", "task")

    fresh = adapterkit.init(tiny_model("bert"))
    fresh.load_adapter(tmp_path / "task")

    assert expected.shape == (2, 2)
    assert torch.allclose(compute_logits(fresh, input_ids), expected, atol=1e-5)
    assert fresh.config.id2label == {0: "no", 1: "yes"}


def test_integer_labels_survive(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task")
    model._adapterkit.set_labels("task", [1, 5])
    model.save_adapter(tmp_path / "task", "task")

    fresh = adapterkit.init(tiny_model("bert"))
    fresh.load_adapter(tmp_path / "task")

    assert fresh._adapterkit.entries["task"].labels == [1, 5]


def test_load_as_renames(tiny_model, input_ids, saved_bert):
    directory, expected = saved_bert
    fresh = adapterkit.init(tiny_model("bert"))

    name = fresh.load_adapter(directory, load_as="renamed")

    assert name == "renamed"
    assert fresh.adapter_names == ["renamed"]
    assert torch.allclose(compute_logits(fresh, input_ids), expected, atol=1e-5)


def test_load_twice_with_load_as(tiny_model, saved_bert):
    directory, _ = saved_bert
    fresh = adapterkit.init(tiny_model("bert"))

    fresh.load_adapter(directory)
    fresh.load_adapter(directory, load_as="copy")

    assert fresh.adapter_names == ["task", "copy"]


def test_load_without_activation(tiny_model, input_ids, saved_bert):
    directory, _ = saved_bert
    fresh = tiny_model("bert")
    bare = compute_logits(fresh, input_ids)
    adapterkit.init(fresh)

    fresh.load_adapter(directory, set_active=False)

    assert fresh.active_adapters == []
    assert torch.equal(compute_logits(fresh, input_ids), bare)


def test_loaded_adapter_frozen(tiny_model, saved_bert):
    directory, _ = saved_bert
    fresh = adapterkit.init(tiny_model("bert"))
    fresh.add_adapter("other", "pfeiffer")

    fresh.load_adapter(directory)

    assert requires_grad_names(fresh._adapterkit.modules_of("task")) == []
    assert requires_grad_names(fresh._adapterkit.modules_of("other")) == []
    assert fresh._adapterkit.trainable_names() == []


def test_load_keeps_trained_adapter_trainable(tiny_model, saved_bert):
    directory, _ = saved_bert
    fresh = adapterkit.init(tiny_model("bert"))
    fresh.add_adapter("other", "pfeiffer")
    fresh.train_adapter("other")

    fresh.load_adapter(directory)

    assert fresh._adapterkit.trainable_names() == ["other"]
    assert requires_grad_names(fresh.bert) == []


def test_load_keeps_eval_mode(tiny_model, input_ids, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task", adapterkit.PRESETS["houlsby"].replace(dropout=0.5))
    randomize_parameters(model._adapterkit.modules_of("task"))
    model.save_adapter(tmp_path / "task", "task")

    fresh = adapterkit.init(tiny_model("bert"))
    fresh.load_adapter(tmp_path / "task")

    assert fresh.training is False
    assert not [name for name, module in fresh.named_modules() if module.training]
    assert torch.equal(compute_logits(fresh, input_ids), compute_logits(fresh, input_ids))


@pytest.mark.parametrize("family, hidden_size", [("bert", 16), ("roberta", 32)])
def test_load_other_model_raises(tiny_model, saved_bert, family, hidden_size):
    directory, _ = saved_bert
    other = adapterkit.init(tiny_model(family, hidden_size=hidden_size))
    other.add_adapter("kept", "pfeiffer")
    module_names = [name for name, _ in other.named_modules()]

    with pytest.raises(ValueError, match="another kind of model"):
        other.load_adapter(directory)
    assert other.adapter_names == ["kept"]
    assert [name for name, _ in other.named_modules()] == module_names


def test_load_other_head_raises(tiny_model, saved_bert):
    directory, _ = saved_bert
    headless = adapterkit.init(tiny_model("bert").bert)

    with pytest.raises(ValueError, match="head modules"):
        headless.load_adapter(directory)
    assert headless.adapter_names == []


def test_load_taken_name_raises(tiny_model, saved_bert):
    directory, _ = saved_bert
    fresh = adapterkit.init(tiny_model("bert"))
    fresh.add_adapter("task", "pfeiffer")
    kept_state = {key: value.clone() for key, value in fresh._adapterkit.modules_of("task").state_dict().items()}

    with pytest.raises(ValueError, match="already exists"):
        fresh.load_adapter(directory)
    assert fresh.adapter_names == ["task"]
    assert fresh.adapter_config("task") == adapterkit.PRESETS["pfeiffer"]
    current = fresh._adapterkit.modules_of("task").state_dict()
    assert not [key for key in kept_state if not torch.equal(current[key], kept_state[key])]


def test_load_missing_folder_raises(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))

    with pytest.raises(FileNotFoundError):
        model.load_adapter(tmp_path / "missing")


def test_load_mismatched_weights_rolls_back(tiny_model, saved_bert):
    directory, _ = saved_bert
    description = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    description["config"]["bottleneck_size"] = 5
    (directory / CONFIG_FILE).write_text(json.dumps(description), encoding="utf-8")
    fresh = tiny_model("bert")
    module_names = [name for name, _ in fresh.named_modules()]
    adapterkit.init(fresh)

    with pytest.raises(ValueError, match="do not match"):
        fresh.load_adapter(directory)
    assert fresh.adapter_names == []
    assert [name for name, _ in fresh.named_modules()] == module_names


def test_load_newer_format_raises(tiny_model, saved_bert):
    directory, _ = saved_bert
    description = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    description["format_version"] = 99
    (directory / CONFIG_FILE).write_text(json.dumps(description), encoding="utf-8")
    fresh = adapterkit.init(tiny_model("bert"))

    with pytest.raises(ValueError, match="Upgrade adapterkit"):
        fresh.load_adapter(directory)


def test_load_after_resized_vocabulary_raises(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    model.resize_token_embeddings(VOCAB_SIZE + 5)
    model.add_adapter("task", "lora")
    model.save_adapter(tmp_path / "task", "task")
    fresh = adapterkit.init(tiny_model("bert"))

    with pytest.raises(ValueError, match=f"resize_token_embeddings\\({VOCAB_SIZE + 5}\\)"):
        fresh.load_adapter(tmp_path / "task")
    assert fresh.adapter_names == []

    fresh.resize_token_embeddings(VOCAB_SIZE + 5)
    assert fresh.load_adapter(tmp_path / "task") == "task"
