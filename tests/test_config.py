import json

import pytest

import adapterkit
from adapterkit.config import PRESETS, AdapterConfig, BottleneckConfig, resolve_config


def test_adapter_config_alias():
    assert AdapterConfig is BottleneckConfig
    assert adapterkit.AdapterConfig is BottleneckConfig


def test_preset_houlsby():
    config = resolve_config("houlsby")
    assert config.mh_adapter is True
    assert config.output_adapter is True
    assert config.reduction_factor == 16
    assert config.parallel is False


def test_preset_pfeiffer():
    config = resolve_config("pfeiffer")
    assert config.mh_adapter is False
    assert config.output_adapter is True
    assert config.parallel is False


def test_preset_parallel():
    config = resolve_config("parallel")
    assert config.parallel is True
    assert config.scaling != 1.0


def test_preset_name_case_insensitive():
    assert resolve_config("Houlsby") == PRESETS["houlsby"]


def test_default_config_is_pfeiffer():
    assert resolve_config(None) == PRESETS["pfeiffer"]


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="no_such_preset") as error:
        resolve_config("no_such_preset")
    assert "houlsby" in str(error.value)


def test_resolve_config_rejects_other_types():
    with pytest.raises(TypeError):
        resolve_config(16)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    config = PRESETS[name]
    assert BottleneckConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip(name):
    config = PRESETS[name]
    assert BottleneckConfig.from_dict(config.to_dict()) == config


def test_json_round_trip_non_defaults(tmp_path):
    config = BottleneckConfig(mh_adapter=True, bottleneck_size=5, non_linearity="gelu", scaling="channel",
                              ln_before=True, ln_after=True, init_weights="zero_up", dropout=0.25, leave_out=(0, 3))
    path = tmp_path / "config.json"
    path.write_text(config.to_json(), encoding="utf-8")

    assert BottleneckConfig.from_json(path) == config
    assert BottleneckConfig.from_json(str(path)) == config


def test_to_dict_is_json_ready():
    data = BottleneckConfig(leave_out=(1,)).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["architecture"] == "bottleneck"


def test_from_dict_unknown_key_raises():
    data = {**PRESETS["pfeiffer"].to_dict(), "reduction": 8}
    with pytest.raises(ValueError, match="reduction"):
        BottleneckConfig.from_dict(data)


def test_from_dict_other_architecture_raises():
    data = {**PRESETS["pfeiffer"].to_dict(), "architecture": "lora"}
    with pytest.raises(ValueError, match="lora"):
        BottleneckConfig.from_dict(data)


def test_invalid_values_all_reported():
    with pytest.raises(ValueError) as error:
        BottleneckConfig(reduction_factor=-2, non_linearity="softsign", dropout=1.5, init_weights="xavier")
    message = str(error.value)
    assert "reduction_factor=-2" in message
    assert "non_linearity='softsign'" in message
    assert "dropout=1.5" in message
    assert "init_weights='xavier'" in message


def test_unknown_non_linearity_raises():
    with pytest.raises(ValueError, match="non_linearity='softsign'"):
        BottleneckConfig(non_linearity="softsign")


def test_no_placement_raises():
    with pytest.raises(ValueError, match="mh_adapter=False and output_adapter=False"):
        BottleneckConfig(mh_adapter=False, output_adapter=False)


@pytest.mark.parametrize("changes", [
    {"parallel": 1},
    {"bottleneck_size": 0},
    {"bottleneck_size": 2.5},
    {"scaling": "huge"},
    {"leave_out": (-1,)},
    {"reduction_factor": True},
])
def test_invalid_field_raises(changes):
    field_name = next(iter(changes))
    with pytest.raises(ValueError, match=field_name):
        BottleneckConfig(**changes)


def test_replace_validates():
    with pytest.raises(ValueError, match="dropout"):
        PRESETS["pfeiffer"].replace(dropout=-0.1)


def test_leave_out_list_becomes_tuple():
    assert BottleneckConfig(leave_out=[1, 0]).leave_out == (1, 0)


def test_bottleneck_width_from_reduction():
    assert BottleneckConfig(reduction_factor=16).bottleneck_width(32) == 2


def test_bottleneck_size_overrides_reduction():
    assert BottleneckConfig(reduction_factor=16, bottleneck_size=7).bottleneck_width(32) == 7


def test_reduction_too_large_raises_at_add(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    config = BottleneckConfig(reduction_factor=64)

    with pytest.raises(ValueError, match="reduction_factor=64"):
        model.add_adapter("wide", config)
    assert model.adapter_names == []
