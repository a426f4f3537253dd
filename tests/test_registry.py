"""Adapter bookkeeping on a model: names, activation, freezing, summaries, copies and pickling."""

import copy
import pickle

import pytest
import torch
from safetensors.torch import load_file

import adapterkit
from adapter_helpers import compute_logits, randomize_parameters, requires_grad_names
from adapterkit.io import WEIGHTS_FILE


# -- names ------------------------------------------------------------------------------------


def test_init_returns_same_object(tiny_model):
    model = tiny_model("bert")
    assert adapterkit.init(model) is model
    assert adapterkit.init(model) is model


def test_init_rejects_plain_module():
    with pytest.raises(TypeError, match="Linear"):
        adapterkit.init(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("names", [("task", "task_v2"), ("keys", "training", "forward")])
def test_special_names_train(tiny_model, input_ids, names):
    model = adapterkit.init(tiny_model("bert"))
    for name in names:
        model.add_adapter(name, "houlsby")

    model.train_adapter(list(names))
    model(input_ids=input_ids).logits.sum().backward()

    assert model.adapter_names == list(names)
    assert model.active_adapters == list(names)
    assert model.training is False
    assert callable(model.forward)
    for name in names:
        parameters = dict(model._adapterkit.modules_of(name)["methods"]["0"]["layers"].named_parameters())
        assert not [key for key, p in parameters.items() if p.grad is None], name


@pytest.mark.parametrize("names", [("task", "task_v2"), ("keys", "training", "forward")])
def test_special_names_save_own_weights(tiny_model, tmp_path, names):
    model = adapterkit.init(tiny_model("bert"))
    for seed, name in enumerate(names):
        model.add_adapter(name, "houlsby")
        randomize_parameters(model._adapterkit.modules_of(name), seed=seed)

    for name in names:
        model.save_adapter(tmp_path / name, name)

    for name in names:
        saved = load_file(str(tmp_path / name / WEIGHTS_FILE))
        own = model._adapterkit.modules_of(name).state_dict()
        assert sorted(saved) == sorted(own), name
        assert not [key for key in own if not torch.equal(saved[key], own[key])], name
        for other in names:
            if other == name:
                continue
            other_values = model._adapterkit.modules_of(other).state_dict().values()
            shared = [key for key, value in saved.items() for other_value in other_values
                      if value.shape == other_value.shape and torch.equal(value, other_value)]
            assert shared == [], f"the checkpoint of {name} contains weights of {other}"


def test_special_names_delete_one(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task", "pfeiffer")
    model.add_adapter("task_v2", "pfeiffer")
    kept_parameters = [p for p in model._adapterkit.modules_of("task_v2").parameters()]

    model.delete_adapter("task")

    assert model.adapter_names == ["task_v2"]
    assert [p for p in model._adapterkit.modules_of("task_v2").parameters()] == kept_parameters


@pytest.mark.parametrize("name", ["", "has space", "dotted.name", "slash/name", 3])
def test_invalid_name_raises(tiny_model, name):
    model = adapterkit.init(tiny_model("bert"))

    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.add_adapter(name)
    assert model.adapter_names == []


def test_duplicate_name_raises(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task")

    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("task", "houlsby")
    assert model.adapter_config("task") == adapterkit.PRESETS["pfeiffer"]


def test_leave_out_out_of_range_raises(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    config = adapterkit.PRESETS["pfeiffer"].replace(leave_out=(2,))

    with pytest.raises(ValueError, match="leave_out"):
        model.add_adapter("task", config)
    assert model.adapter_names == []


# -- activation and training state --------------------------------------------------------------


def test_add_adapter_is_frozen_and_inactive(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task")

    assert model.active_adapters == []
    assert requires_grad_names(model._adapterkit.modules_of("task")) == []


def test_set_active_unknown_raises(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task")

    with pytest.raises(ValueError, match="'missing'"):
        model.set_active_adapters(["task", "missing"])
    assert model.active_adapters == []


def test_train_adapter_empty_raises(tiny_model):
    model = adapterkit.init(tiny_model("bert"))

    with pytest.raises(ValueError, match="at least one"):
        model.train_adapter([])


def test_train_adapter_freezes_others(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("first")
    model.add_adapter("second")
    model.train_adapter("first")

    model.train_adapter("second")

    assert model._adapterkit.trainable_names() == ["second"]
    assert requires_grad_names(model._adapterkit.modules_of("first")) == []


def test_set_active_none_restores_bare(tiny_model, input_ids):
    model = tiny_model("bert")
    bare = compute_logits(model, input_ids)
    adapterkit.init(model)
    model.add_adapter("task", set_active=True)
    randomize_parameters(model._adapterkit.modules_of("task"))

    model.set_active_adapters(None)

    assert model.active_adapters == []
    assert torch.equal(compute_logits(model, input_ids), bare)


def test_adapter_config_unknown_raises(tiny_model):
    model = adapterkit.init(tiny_model("bert"))

    with pytest.raises(ValueError, match="'task'"):
        model.adapter_config("task")


# -- summary ----------------------------------------------------------------------------------


def test_summary_counts(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task", "houlsby")
    model.train_adapter("task")
    modules = model._adapterkit.modules_of("task")

    (row,) = model.adapter_summary(as_dict=True)

    assert row["name"] == "task"
    assert row["parameters"] == sum(p.numel() for p in modules.parameters())
    assert row["head_parameters"] == sum(p.numel() for p in modules["head"].parameters())
    assert row["trainable"] == row["parameters"]
    assert row["active"] is True


def test_summary_percent_excludes_adapters(tiny_model):
    model = tiny_model("bert")
    bare_count = sum(p.numel() for p in model.parameters())
    adapterkit.init(model)
    model.add_adapter("task", "houlsby")
    model.train_adapter("task")

    (row,) = model.adapter_summary(as_dict=True)

    assert row["percent_of_base"] == pytest.approx(100.0 * row["parameters"] / bare_count)


def test_summary_table_names_adapter(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task")

    assert "task" in model.adapter_summary()


def test_count_parameters_bottleneck(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task", adapterkit.BottleneckConfig(bottleneck_size=4))
    per_site = 32 * 4 + 4 + 4 * 32 + 32
    head = 32 * 3 + 3

    assert model._adapterkit.count_parameters("task") == 2 * per_site + head


# -- copies -----------------------------------------------------------------------------------


def _copy_model(model, copy_method):
    if copy_method == "deepcopy":
        return copy.deepcopy(model)
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("copy_method", ["deepcopy", "pickle"])
def test_copy_keeps_adapters(tiny_model, input_ids, family, copy_method):
    model = adapterkit.init(tiny_model(family))
    model.add_adapter("task", "houlsby")
    model.train_adapter("task")
    randomize_parameters(model._adapterkit.modules_of("task"))
    model.eval()

    copied = _copy_model(model, copy_method)

    assert type(copied) is type(model)
    assert copied.adapter_names == ["task"]
    assert copied.active_adapters == ["task"]
    assert copied.adapter_config("task") == model.adapter_config("task")
    assert torch.equal(compute_logits(copied, input_ids), compute_logits(model, input_ids))


@pytest.mark.parametrize("copy_method", ["deepcopy", "pickle"])
def test_copy_is_independent(tiny_model, input_ids, copy_method):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task", "houlsby")
    model.train_adapter("task")
    randomize_parameters(model._adapterkit.modules_of("task"))
    model.eval()
    original_before = compute_logits(model, input_ids)
    copied = _copy_model(model, copy_method)

    randomize_parameters(copied._adapterkit.modules_of("task")["methods"]["0"]["layers"], seed=7)
    copied_after = compute_logits(copied, input_ids)

    original_ids = {id(p) for p in model.parameters()}
    assert not [name for name, p in copied.named_parameters() if id(p) in original_ids]
    assert torch.equal(compute_logits(model, input_ids), original_before)
    assert not torch.allclose(copied_after, original_before)


@pytest.mark.parametrize("copy_method", ["deepcopy", "pickle"])
def test_copy_can_delete_adapter(tiny_model, input_ids, copy_method):
    model = tiny_model("bert")
    bare = compute_logits(model, input_ids)
    adapterkit.init(model)
    model.add_adapter("task", "houlsby", set_active=True)
    randomize_parameters(model._adapterkit.modules_of("task"))
    copied = _copy_model(model, copy_method)

    copied.delete_adapter("task")

    assert torch.equal(compute_logits(copied, input_ids), bare)
    assert model.adapter_names == ["task"]
