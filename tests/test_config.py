import json

import pytest

import adapterkit
from adapterkit.config import (PRESETS, AdapterConfig, BottleneckConfig, ConfigUnion, IA3Config,
                               InvertibleConfig, LoRAConfig, MethodConfig, PrefixTuningConfig, config_from_dict,
                               resolve_config)


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
    assert MethodConfig.from_json(config.to_json()) == config
    assert type(config).from_json(config.to_json()) == config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip(name):
    config = PRESETS[name]
    assert config_from_dict(config.to_dict()) == config


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
    with pytest.raises(ValueError, match="inserted nowhere"):
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


def test_every_method_is_a_preset():
    expected = {"houlsby", "pfeiffer", "parallel", "conv", "lora", "ia3", "prefix_tuning", "compacter",
                "compacter++", "mam", "unipelt", "invertible"}
    assert expected <= set(PRESETS)


def test_preset_mam_members():
    members = PRESETS["mam"].methods
    assert [type(m) for m in members] == [PrefixTuningConfig, BottleneckConfig]
    assert members[1].parallel


def test_preset_unipelt_is_gated():
    members = PRESETS["unipelt"].methods
    assert {type(m) for m in members} == {LoRAConfig, PrefixTuningConfig, BottleneckConfig}
    assert all(m.use_gating for m in members)


def test_preset_compacter_placements():
    assert PRESETS["compacter"].phm_layer
    assert PRESETS["compacter"].mh_adapter
    assert PRESETS["compacter++"].phm_layer
    assert not PRESETS["compacter++"].mh_adapter


def test_lora_scaling_uses_alpha():
    assert LoRAConfig(r=4, alpha=16).scaling == 4.0
    assert LoRAConfig(r=87, alpha=87).scaling == 1.0


@pytest.mark.parametrize("config, message", [
    (lambda: LoRAConfig(r=0), "r=0"),
    (lambda: LoRAConfig(alpha=-1), "alpha=-1"),
    (lambda: LoRAConfig(targets=("query", "gate")), "unknown roles \\['gate'\\]"),
    (lambda: LoRAConfig(targets=()), "targets=\\(\\)"),
    (lambda: IA3Config(init_weights="zeros"), "init_weights='zeros'"),
    (lambda: PrefixTuningConfig(prefix_length=0), "prefix_length=0"),
    (lambda: InvertibleConfig(block_type="real-nvp"), "block_type='real-nvp'"),
    (lambda: BottleneckConfig(projection="conv", phm_layer=True), "phm_layer=True"),
    (lambda: BottleneckConfig(kernel_size=0), "kernel_size=0"),
    (lambda: BottleneckConfig(phm_dim=0), "phm_dim=0"),
    (lambda: ConfigUnion(), "at least one member"),
    (lambda: ConfigUnion(PrefixTuningConfig(), PrefixTuningConfig()), "prefix_tuning appears more than once"),
])
def test_method_config_invalid_raises(config, message):
    with pytest.raises(ValueError, match=message):
        config()


def test_union_flattens_nested():
    inner = ConfigUnion(LoRAConfig(), IA3Config())
    union = ConfigUnion(inner, PrefixTuningConfig())
    assert [type(m) for m in union.methods] == [LoRAConfig, IA3Config, PrefixTuningConfig]


def test_union_replace_reaches_members():
    union = ConfigUnion(LoRAConfig(), BottleneckConfig()).replace(leave_out=(1,))
    assert all(m.leave_out == (1,) for m in union.methods)


def test_targets_list_becomes_tuple():
    config = LoRAConfig(targets=["key", "ff_out"], r=87)
    assert config.targets == ("key", "ff_out")
    assert config_from_dict(config.to_dict()).r == 87


def test_unknown_keys_warn_when_asked(caplog):
    data = {"architecture": "lora", "r": 4, "future_option": True}
    with pytest.raises(ValueError, match="future_option"):
        config_from_dict(data)
    config = config_from_dict(data, unknown_keys="warn")
    assert config == LoRAConfig(r=4)
    assert "future_option" in caplog.text


def test_unknown_architecture_tag_raises():
    with pytest.raises(ValueError, match="architecture='adapter-x'"):
        config_from_dict({"architecture": "adapter-x"})
