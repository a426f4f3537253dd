"""Per-module LoRA ranks and alpha values (``LoRAConfig.rank_pattern`` and ``alpha_pattern``).

Expected ranks, scalings and parameter counts are written out by hand from the key rules in the
``LoRAConfig`` docstring. Model outputs are compared with a copy of the base model whose weights get
``alpha / r * B A`` added here, with ``alpha / r`` taken from those hand-written tables, through
the last hidden state.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import adapterkit
from adapterkit import LoRAConfig
from adapterkit.config import ROLES, MethodConfig, config_from_dict

TOLERANCE = dict(atol=1e-5, rtol=0)

# BERT (hidden 32, intermediate 37, 2 blocks) with ranks and alphas that differ per block and role.
BERT_CONFIG = LoRAConfig(r=4, alpha=8, targets=("query", "value", "ff_in"),
                         rank_pattern={"value": 2, "1.query": 6}, alpha_pattern={"ff_in": 3, "0.value": 1})
# (block, role) -> (rank, alpha) that BERT_CONFIG gives, worked out by hand.
BERT_EXPECTED = {
    (0, "query"): (4, 8), (1, "query"): (6, 8),
    (0, "value"): (2, 1), (1, "value"): (2, 8),
    (0, "ff_in"): (4, 3), (1, "ff_in"): (4, 3),
}
BERT_PATHS = {"query": "attention.self.query", "value": "attention.self.value", "ff_in": "intermediate.dense"}


def _bert(tiny_model, no_dropout):
    return tiny_model("bert", **no_dropout("bert"))


def _add_random(model, name, config, seed=0):
    """Add ``config`` as adapter ``name`` with its LoRA matrices drawn from normal(0, 0.2), and activate it."""
    model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model._adapterkit.modules_of(name)["methods"].parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    model.set_active_adapters(name)


def _module(model, name, block, role, number=0):
    return model._adapterkit.modules_of(name)["methods"]["0"]["layers"][str(block)][role][number]


@torch.no_grad()
def _hidden(model, input_ids):
    """Return the last hidden state, ``(batch, seq_len, 32)``: values near 1, unlike the tiny model's logits."""
    return model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]


# -- the config -----------------------------------------------------------------------------------

LOOKUP_PATTERN = {"value": 2, "1.value": 6, "ff_in.1": 3, "0-1,3.ff_in": 5, "3.ff_in.1": 7}
LOOKUP_CASES = [
    # (block, role, number, expected rank)
    (0, "value", 0, 2),      # role key
    (1, "value", 0, 6),      # a block key outranks the role key
    (0, "query", 0, 8),      # no key: r
    (2, "ff_in", 0, 8),      # "ff_in.1" leaves projection 0 alone
    (2, "ff_in", 1, 3),      # number key
    (0, "ff_in", 1, 5),      # a block key outranks a number key
    (3, "ff_in", 0, 5),      # the range list "0-1,3" contains 3
    (3, "ff_in", 1, 7),      # blocks and number outrank blocks alone
    (2, "value", 0, 2),
]


@pytest.mark.parametrize("block, role, number, expected", LOOKUP_CASES)
def test_rank_for_follows_precedence(block, role, number, expected):
    config = LoRAConfig(r=8, targets=("query", "value", "ff_in"), rank_pattern=LOOKUP_PATTERN)

    assert config.rank_for(block, role, number) == expected


def test_alpha_for_and_scaling_defaults():
    config = LoRAConfig(r=4, alpha=8, targets=("query", "value"), alpha_pattern={"2-3.value": 1.5})

    assert config.alpha_for(2, "value") == 1.5
    assert config.alpha_for(1, "value") == 8
    assert config.alpha_for(2, "query") == 8
    assert config.scaling == 2.0
    assert config.max_rank == 4


def test_max_rank_includes_pattern():
    assert LoRAConfig(r=2, rank_pattern={"value": 6}).max_rank == 6
    assert LoRAConfig(r=8, rank_pattern={"value": 6}).max_rank == 8


@pytest.mark.parametrize("key", ["v", "q", "3.attn", "mlp.0"])
def test_unknown_role_raises_with_roles(key):
    with pytest.raises(ValueError) as error:
        LoRAConfig(rank_pattern={key: 2})
    message = str(error.value)
    assert repr(key) in message
    for role in ROLES:
        assert role in message


@pytest.mark.parametrize("key", ["", "value.", ".value", "1..value", "1-.value", "a.value", "value x", "-1.value"])
def test_malformed_key_raises(key):
    with pytest.raises(ValueError, match="is invalid: expected one of the forms"):
        LoRAConfig(rank_pattern={key: 2})


def test_non_string_key_raises():
    with pytest.raises(ValueError, match="key 3 is invalid"):
        LoRAConfig(alpha_pattern={3: 2.0})


def test_role_outside_targets_raises():
    with pytest.raises(ValueError, match=r"'1\.ff_out' names the role 'ff_out', which is not in targets"):
        LoRAConfig(targets=("query", "value"), rank_pattern={"1.ff_out": 2})


def test_reversed_range_raises():
    with pytest.raises(ValueError, match=r"block range '3-1', whose start exceeds its end. Write 1-3"):
        LoRAConfig(rank_pattern={"3-1.value": 2})


def test_keys_of_left_out_blocks_raise():
    with pytest.raises(ValueError, match=r"'1,3\.value' names only blocks in leave_out"):
        LoRAConfig(leave_out=(1, 3), rank_pattern={"1,3.value": 2})
    # One kept block is enough.
    assert LoRAConfig(leave_out=(1,), rank_pattern={"0-1.value": 2}).rank_for(0, "value") == 2


@pytest.mark.parametrize("pattern", [
    {"0-2.value": 2, "2.value": 4},
    {"value.1": 2, "value.01": 4},
    {"0.value.0": 2, "0,1.value.0": 4},
])
def test_overlapping_keys_of_equal_precedence_raise(pattern):
    first, second = pattern
    with pytest.raises(ValueError, match=rf"keys {first!r} and {second!r} select the same projections"):
        LoRAConfig(rank_pattern=pattern)


def test_keys_of_different_precedence_may_overlap():
    config = LoRAConfig(rank_pattern={"value": 2, "value.0": 3, "0.value": 4, "0.value.0": 5})

    assert config.rank_for(0, "value") == 5
    assert config.rank_for(1, "value") == 3
    assert config.rank_for(1, "value", 1) == 2


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "2", None])
def test_invalid_rank_value_raises(rank):
    with pytest.raises(ValueError, match=r"rank_pattern\['value'\]=.*expected an integer rank >= 1"):
        LoRAConfig(rank_pattern={"value": rank})


@pytest.mark.parametrize("alpha", [0, -2.0, False, "8", None])
def test_invalid_alpha_value_raises(alpha):
    with pytest.raises(ValueError, match=r"alpha_pattern\['value'\]=.*expected a number > 0"):
        LoRAConfig(alpha_pattern={"value": alpha})


@pytest.mark.parametrize("pattern", [[("value", 2)], "value=2", 2])
def test_pattern_that_is_not_a_dict_raises(pattern):
    with pytest.raises(ValueError, match=r"rank_pattern=.*expected a dict"):
        LoRAConfig(rank_pattern=pattern)


def test_every_problem_reported_at_once():
    with pytest.raises(ValueError) as error:
        LoRAConfig(rank_pattern={"v": 2, "value": 0}, alpha_pattern={"x.query": 1})
    message = str(error.value)
    assert "'v'" in message
    assert "rank_pattern['value']=0" in message
    assert "'x.query'" in message


def test_config_copies_the_callers_dict():
    pattern = {"value": 2}
    config = LoRAConfig(rank_pattern=pattern)
    pattern["value"] = 0
    pattern["key"] = 3

    assert config.rank_pattern == {"value": 2}


def test_config_stays_hashable_and_compares_patterns():
    first = LoRAConfig(rank_pattern={"value": 2})
    same = LoRAConfig(rank_pattern={"value": 2})
    other = LoRAConfig(rank_pattern={"value": 3})

    assert first == same
    assert first != other
    assert hash(first) == hash(same)
    assert len({first, same, other}) == 2


def test_dict_and_json_round_trip():
    data = BERT_CONFIG.to_dict()

    assert data["rank_pattern"] == {"value": 2, "1.query": 6}
    assert data["alpha_pattern"] == {"ff_in": 3, "0.value": 1}
    assert MethodConfig.from_dict(data) == BERT_CONFIG
    assert config_from_dict(json.loads(json.dumps(data))) == BERT_CONFIG
    assert LoRAConfig.from_json(BERT_CONFIG.to_json()) == BERT_CONFIG


def test_old_dict_without_patterns_loads():
    old = {"architecture": "lora", "leave_out": [], "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"],
           "init_weights": "lora", "use_gating": False}

    config = config_from_dict(old)

    assert config.rank_pattern == {}
    assert config.alpha_pattern == {}
    assert config == LoRAConfig(r=4, alpha=8)


def test_replace_revalidates_patterns():
    with pytest.raises(ValueError, match="'value', which is not in targets"):
        LoRAConfig(rank_pattern={"value": 2}).replace(targets=("query",))


# -- building modules -----------------------------------------------------------------------------

def test_modules_get_their_own_rank_and_scaling(tiny_model, no_dropout):
    model = adapterkit.init(_bert(tiny_model, no_dropout))
    model.add_adapter("p", BERT_CONFIG)

    for (block, role), (rank, alpha) in BERT_EXPECTED.items():
        module = _module(model, "p", block, role)
        out_features = 37 if role == "ff_in" else 32
        assert module.lora_A.shape == (rank, 32), (block, role)
        assert module.lora_B.shape == (out_features, rank), (block, role)
        assert module.scaling == pytest.approx(alpha / rank), (block, role)


def test_parameter_count_sums_module_ranks(tiny_model, no_dropout):
    model = adapterkit.init(_bert(tiny_model, no_dropout))
    model.add_adapter("p", BERT_CONFIG)

    # query and value: r * 32 + 32 * r; ff_in: r * 32 + 37 * r. Ranks: query 4 + 6, value 2 + 2, ff_in 4 + 4.
    expected = 64 * (4 + 6 + 2 + 2) + 69 * (4 + 4)
    methods = model._adapterkit.modules_of("p")["methods"]
    assert sum(parameter.numel() for parameter in methods.parameters()) == expected


def test_output_matches_hand_merged_weights(tiny_model, no_dropout, tiny_inputs):
    base = _bert(tiny_model, no_dropout)
    reference = copy.deepcopy(base)
    model = adapterkit.init(base)
    _add_random(model, "p", BERT_CONFIG)
    ids = tiny_inputs("bert")
    bare = _hidden(reference, ids)

    with torch.no_grad():
        for (block, role), (rank, alpha) in BERT_EXPECTED.items():
            module = _module(model, "p", block, role)
            layer = reference.bert.encoder.layer[block].get_submodule(BERT_PATHS[role])
            layer.weight += (alpha / rank) * module.lora_B @ module.lora_A

    expected = _hidden(reference, ids)
    assert (expected - bare).abs().max() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(_hidden(model, ids), expected, **TOLERANCE)


def test_rank_two_module_trains_its_own_a(tiny_model, no_dropout, tiny_inputs):
    model = adapterkit.init(_bert(tiny_model, no_dropout)).double()
    _add_random(model, "p", BERT_CONFIG)
    model.train_adapter("p")
    model.eval()
    ids = tiny_inputs("bert")
    labels = torch.tensor([0, 2])
    lora_a = _module(model, "p", 0, "value").lora_A

    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()

    assert lora_a.requires_grad
    assert lora_a.grad.shape == (2, 32)
    # Central differences in float64 check the gradient of a few entries of this rank-2 A.
    step = 1e-6
    for row, column in [(0, 0), (1, 5), (1, 31)]:
        with torch.no_grad():
            lora_a[row, column] += step
            above = model(input_ids=ids, labels=labels).loss.item()
            lora_a[row, column] -= 2 * step
            below = model(input_ids=ids, labels=labels).loss.item()
            lora_a[row, column] += step
        numeric = (above - below) / (2 * step)
        assert lora_a.grad[row, column].item() == pytest.approx(numeric, rel=1e-4, abs=1e-8), (row, column)
    assert lora_a.grad.abs().max() > 0

    before = lora_a.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    assert lora_a.shape == (2, 32)
    assert not torch.equal(lora_a.detach(), before)


def test_projection_numbers_select_one_projection(tiny_model):
    model = adapterkit.init(tiny_model("llama"))
    model.add_adapter("p", LoRAConfig(r=4, targets=("ff_in",), rank_pattern={"ff_in.1": 2, "1.ff_in.0": 3}))

    # Llama's ff_in projections are gate_proj (0) and up_proj (1).
    assert _module(model, "p", 0, "ff_in", 0).r == 4
    assert _module(model, "p", 0, "ff_in", 1).r == 2
    assert _module(model, "p", 1, "ff_in", 0).r == 3
    assert _module(model, "p", 1, "ff_in", 1).r == 2


def test_cross_attention_number_in_decoder_blocks(tiny_model):
    model = adapterkit.init(tiny_model("bart"))
    model.add_adapter("p", LoRAConfig(r=4, targets=("query",), rank_pattern={"query.1": 2}))

    # Blocks 0 and 1 are the encoder (one query), 2 and 3 the decoder (self- then cross-attention query).
    layers = model._adapterkit.modules_of("p")["methods"]["0"]["layers"]
    for block in (0, 1):
        assert [module.r for module in layers[str(block)]["query"]] == [4], block
    for block in (2, 3):
        assert [module.r for module in layers[str(block)]["query"]] == [4, 2], block


@pytest.mark.parametrize("family, pattern, message", [
    ("bert", {"5.value": 2}, r"\['5\.value'\] select no projection of this 'bert' model, which has 2 blocks"),
    ("bert", {"value.1": 2}, r"\['value\.1'\] select no projection"),
    ("bert", {"0-1.value.3": 2}, r"\['0-1\.value\.3'\]"),
    ("llama", {"ff_in.2": 2}, r"\['ff_in\.2'\]"),
])
def test_keys_outside_the_model_raise(family, pattern, message, tiny_model):
    model = adapterkit.init(tiny_model(family))
    targets = ("value", "ff_in")

    with pytest.raises(ValueError, match=message):
        model.add_adapter("p", LoRAConfig(targets=targets, alpha_pattern=pattern))
    assert "p" not in model._adapterkit.entries


def test_key_valid_in_some_blocks_is_accepted(tiny_model):
    model = adapterkit.init(tiny_model("bart"))

    model.add_adapter("p", LoRAConfig(targets=("query",), rank_pattern={"0-3.query.1": 2}))

    assert _module(model, "p", 3, "query", 1).r == 2


# -- saving, loading, merging ---------------------------------------------------------------------

def test_native_save_and_load_keep_patterns(tiny_model, no_dropout, tiny_inputs, tmp_path):
    model = adapterkit.init(_bert(tiny_model, no_dropout))
    _add_random(model, "p", BERT_CONFIG)
    ids = tiny_inputs("bert")
    expected = _hidden(model, ids)
    model.save_adapter(tmp_path, "p")

    saved = json.loads((tmp_path / "adapterkit_config.json").read_text())
    loaded = adapterkit.init(_bert(tiny_model, no_dropout))
    name = loaded.load_adapter(tmp_path, load_as="copy")

    assert saved["config"]["rank_pattern"] == {"value": 2, "1.query": 6}
    assert loaded.adapter_config(name) == BERT_CONFIG
    assert _module(loaded, name, 0, "value").lora_A.shape == (2, 32)
    torch.testing.assert_close(_hidden(loaded, ids), expected, **TOLERANCE)


def test_adapters_format_rejects_patterns(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("p", BERT_CONFIG)

    with pytest.raises(ValueError, match=r"rank_pattern=\{'value': 2, '1\.query': 6\}.*adapters 1\.3\.0 has one r"):
        model.save_adapter(tmp_path, "p", format="adapters")
    assert not (tmp_path / "adapter_config.json").exists()


def test_adapters_format_rejects_alpha_pattern_alone(tiny_model, tmp_path):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("p", LoRAConfig(alpha_pattern={"value": 2}))

    with pytest.raises(ValueError, match=r"alpha_pattern=\{'value': 2\}.*one r and one alpha per adapter"):
        model.save_adapter(tmp_path, "p", format="adapters")


def test_merge_of_patterned_lora_is_exact(tiny_model, no_dropout, tiny_inputs):
    model = adapterkit.init(_bert(tiny_model, no_dropout))
    original = {key: value.clone() for key, value in model.state_dict().items()}
    _add_random(model, "p", BERT_CONFIG)
    ids = tiny_inputs("bert")
    unmerged = _hidden(model, ids)

    model.merge_adapter("p")
    torch.testing.assert_close(_hidden(model, ids), unmerged, **TOLERANCE)

    model.unmerge_adapter("p")
    restored = model.state_dict()
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def _updates(model, name):
    """Return ``alpha / r * B A`` per ``(block, role)`` from the hand-written table of ``BERT_CONFIG``."""
    return {(block, role): (alpha / rank) * (_module(model, name, block, role).lora_B.double()
                                              @ _module(model, name, block, role).lora_A.double())
            for (block, role), (rank, alpha) in BERT_EXPECTED.items()}


def test_svd_copy_of_patterned_lora_is_exact(tiny_model, no_dropout, tiny_inputs):
    model = adapterkit.init(_bert(tiny_model, no_dropout))
    _add_random(model, "p", BERT_CONFIG)
    ids = tiny_inputs("bert")
    expected = _hidden(model, ids)

    model.add_weighted_adapter("copy", ["p"], [1.0], combination="svd")
    model.set_active_adapters("copy")

    # The default rank is the largest one, 6 from the pattern, so no module is truncated.
    assert model.adapter_config("copy").r == 6
    torch.testing.assert_close(_hidden(model, ids), expected, **TOLERANCE)


def test_svd_sum_of_mixed_ranks_is_exact(tiny_model, no_dropout):
    model = adapterkit.init(_bert(tiny_model, no_dropout))
    _add_random(model, "a", BERT_CONFIG, seed=1)
    _add_random(model, "b", BERT_CONFIG, seed=2)
    first, second = _updates(model, "a"), _updates(model, "b")

    # Each update has rank at most 6, so their sum has rank at most 12.
    model.add_weighted_adapter("sum", ["a", "b"], [0.7, -0.4], combination="svd", rank=12)

    for (block, role), expected in ((key, 0.7 * first[key] - 0.4 * second[key]) for key in first):
        module = _module(model, "sum", block, role)
        actual = module.scaling * module.lora_B.double() @ module.lora_A.double()
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=lambda m, key=(block, role): f"{key}: {m}")


def test_linear_combination_keeps_module_shapes(tiny_model, no_dropout):
    model = adapterkit.init(_bert(tiny_model, no_dropout))
    _add_random(model, "a", BERT_CONFIG, seed=1)
    _add_random(model, "b", BERT_CONFIG, seed=2)

    model.add_weighted_adapter("mix", ["a", "b"], [0.25, 0.5])

    for block, role in BERT_EXPECTED:
        mixed, first, second = (_module(model, name, block, role) for name in ("mix", "a", "b"))
        assert mixed.r == first.r
        torch.testing.assert_close(mixed.lora_A, 0.25 * first.lora_A + 0.5 * second.lora_A)
        torch.testing.assert_close(mixed.lora_B, 0.25 * first.lora_B + 0.5 * second.lora_B)


def test_linear_combination_of_other_patterns_raises(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("a", BERT_CONFIG)
    model.add_adapter("b", BERT_CONFIG.replace(rank_pattern={"value": 3}))

    with pytest.raises(ValueError, match="needs sources with one config.*use combination='svd'"):
        model.add_weighted_adapter("mix", ["a", "b"], [0.5, 0.5])
    assert "mix" not in model._adapterkit.entries
