"""Tests for the PHM (Compacter) layers, against explicit sums of ``torch.kron`` products."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from adapterkit.methods.phm import PHMLinear, PHMRule


def make_input(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def explicit_rule(rule: PHMRule) -> torch.Tensor:
    """Build the (n, n, n) rule tensor matrix by matrix from the stored parameters."""
    n = rule.phm_dim
    if not rule.factorized:
        return rule.rule.detach().clone()
    return torch.stack([rule.rule_left[i].detach() @ rule.rule_right[i].detach() for i in range(n)])


def explicit_weight(layer: PHMLinear) -> torch.Tensor:
    """Build W = sum_i A_i kron B_i with one ``torch.kron`` call per term."""
    rule = explicit_rule(layer.rule)
    weight = torch.zeros(layer.in_features, layer.out_features)
    for i in range(layer.phm_dim):
        if layer.factorized_W:
            block = layer.weight_left[i].detach() @ layer.weight_right[i].detach()
        else:
            block = layer.weight_blocks[i].detach()
        weight += torch.kron(rule[i], block)
    return weight


class SharedRulePair(nn.Module):
    """Two PHM layers that share one rule, registered once here."""

    def __init__(self, factorized_rule: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.rule = PHMRule(2, factorized=factorized_rule, init_range=0.5)
        self.down = PHMLinear(8, 4, phm_dim=2, shared_rule=self.rule)
        self.up = PHMLinear(4, 8, phm_dim=2, shared_rule=self.rule)


@pytest.mark.parametrize("factorized_rule", [False, True])
@pytest.mark.parametrize("factorized_W", [False, True])
def test_weight_equals_sum_of_krons(factorized_W, factorized_rule):
    torch.manual_seed(0)
    layer = PHMLinear(6, 9, phm_dim=3, rank=2, factorized_W=factorized_W, factorized_rule=factorized_rule,
                      init_range=0.5)

    weight = layer.weight()

    assert weight.shape == (6, 9)
    torch.testing.assert_close(weight, explicit_weight(layer))


@pytest.mark.parametrize("factorized_W", [False, True])
def test_forward_equals_matmul_plus_bias(factorized_W):
    torch.manual_seed(0)
    layer = PHMLinear(6, 4, phm_dim=2, factorized_W=factorized_W, init_range=0.5)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    x = make_input(2, 3, 6)

    output = layer(x)

    assert output.shape == (2, 3, 4)
    torch.testing.assert_close(output, x @ layer.weight() + layer.bias)
    torch.testing.assert_close(output, x @ explicit_weight(layer) + layer.bias.detach())


def test_forward_two_dimensional_without_bias():
    torch.manual_seed(0)
    layer = PHMLinear(4, 6, phm_dim=2, bias=False, init_range=0.5)
    x = make_input(5, 4)

    assert layer.bias is None
    torch.testing.assert_close(layer(x), x @ explicit_weight(layer))


def test_parameter_shapes():
    factorized = PHMLinear(8, 12, phm_dim=4, rank=3)
    dense_blocks = PHMLinear(8, 12, phm_dim=4, factorized_W=False, factorized_rule=True, rank=2)

    assert factorized.weight_left.shape == (4, 2, 3)
    assert factorized.weight_right.shape == (4, 3, 3)
    assert factorized.phm_rule.rule.shape == (4, 4, 4)
    assert dense_blocks.weight_blocks.shape == (4, 2, 3)
    assert dense_blocks.phm_rule.rule_left.shape == (4, 4, 2)
    assert dense_blocks.phm_rule.rule_right.shape == (4, 2, 4)
    assert dense_blocks.phm_rule().shape == (4, 4, 4)


def test_factorized_rule_is_product_of_factors():
    torch.manual_seed(0)
    rule = PHMRule(3, factorized=True, rank=2, init_range=0.5)

    torch.testing.assert_close(rule(), explicit_rule(rule))
    assert set(rule.state_dict()) == {"rule_left", "rule_right"}


def test_parameter_count_below_dense():
    layer = PHMLinear(64, 64, phm_dim=4)
    dense = nn.Linear(64, 64)

    count = sum(parameter.numel() for parameter in layer.parameters())
    # Rule 4^3 = 64, s and t 1 * (64 + 64) = 128, bias 64.
    assert count == 64 + 128 + 64
    assert count < sum(parameter.numel() for parameter in dense.parameters())


@pytest.mark.parametrize(("in_features", "out_features"), [(30, 64), (64, 30)])
def test_divisibility_error_names_sizes(in_features, out_features):
    with pytest.raises(ValueError) as error:
        PHMLinear(in_features, out_features, phm_dim=4)

    message = str(error.value)
    assert f"in_features={in_features}" in message
    assert f"out_features={out_features}" in message
    assert "phm_dim=4" in message


@pytest.mark.parametrize(("kwargs", "named_value"), [
    ({"phm_dim": 0}, "phm_dim=0"),
    ({"rank": 0}, "rank=0"),
    ({"init_range": 0.0}, "init_range=0.0"),
    ({"w_init": "glorot-normal"}, "w_init='glorot-normal'"),
])
def test_bad_arguments_raise(kwargs, named_value):
    arguments = {"in_features": 8, "out_features": 8, "phm_dim": 2} | kwargs

    with pytest.raises(ValueError, match=re.escape(named_value)):
        PHMLinear(**arguments)


def test_shared_rule_with_other_phm_dim_raises():
    rule = PHMRule(4)

    with pytest.raises(ValueError, match="phm_dim=4"):
        PHMLinear(8, 8, phm_dim=2, shared_rule=rule)


def test_shared_rule_appears_once_in_state_dict():
    pair = SharedRulePair()

    keys = set(pair.state_dict())
    assert {key for key in keys if "rule" in key} == {"rule.rule"}
    assert pair.down.shares_rule
    assert pair.down.rule is pair.rule
    assert pair.up.rule is pair.rule
    assert all("rule" not in key for key in pair.down.state_dict())
    parameter_ids = [id(parameter) for parameter in pair.parameters()]
    assert parameter_ids.count(id(pair.rule.rule)) == 1


@pytest.mark.parametrize("factorized_rule", [False, True])
def test_shared_rule_gets_gradients_from_both_layers(factorized_rule):
    pair = SharedRulePair(factorized_rule=factorized_rule)
    rule_parameters = list(pair.rule.parameters())
    x = make_input(3, 8)

    def rule_gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        return [gradient.clone() for gradient in torch.autograd.grad(loss, rule_parameters)]

    down_gradients = rule_gradients(pair.down(x).square().sum())
    up_gradients = rule_gradients(pair.up(x[:, :4]).square().sum())
    both_gradients = rule_gradients(pair.down(x).square().sum() + pair.up(x[:, :4]).square().sum())

    for down, up, both in zip(down_gradients, up_gradients, both_gradients):
        assert down.abs().max() > 0
        assert up.abs().max() > 0
        torch.testing.assert_close(both, down + up)


def test_deepcopy_keeps_rule_shared():
    pair = SharedRulePair()

    pair_copy = copy.deepcopy(pair)

    assert pair_copy.down.rule is pair_copy.rule
    assert pair_copy.up.rule is pair_copy.rule
    assert pair_copy.rule is not pair.rule
    torch.testing.assert_close(pair_copy.down.weight(), pair.down.weight())

    original_weight = pair.down.weight().detach().clone()
    with torch.no_grad():
        pair_copy.rule.rule.mul_(2.0)
    torch.testing.assert_close(pair_copy.down.weight(), 2.0 * original_weight)
    torch.testing.assert_close(pair_copy.up.weight(), 2.0 * pair.up.weight())
    torch.testing.assert_close(pair.down.weight(), original_weight)


def test_shared_rule_follows_parent_dtype():
    pair = SharedRulePair().to(torch.float64)
    x = make_input(3, 8).to(torch.float64)

    assert pair.down.rule.rule.dtype == torch.float64
    assert pair.down(x).dtype == torch.float64


def test_rule_without_learning_keeps_state():
    rule = PHMRule(2, factorized=True, learn=False)

    assert set(rule.state_dict()) == {"rule_left", "rule_right"}
    assert not any(parameter.requires_grad for parameter in rule.parameters())


def test_rule_init_std():
    torch.manual_seed(0)
    rule = PHMRule(16, init_range=0.1)

    assert rule.rule.std().item() == pytest.approx(0.1, rel=0.05)


def test_glorot_uniform_bound_per_matrix():
    torch.manual_seed(0)
    layer = PHMLinear(128, 64, phm_dim=2, factorized_W=False)

    # Xavier-uniform on one (64, 32) block draws from U(-b, b) with b = sqrt(6 / (64 + 32)).
    bound = math.sqrt(6 / (64 + 32))
    assert layer.weight_blocks.abs().max() <= bound
    assert layer.weight_blocks.abs().max() > 0.9 * bound
    assert torch.equal(layer.bias, torch.zeros(64))


def test_normal_w_init_std():
    torch.manual_seed(0)
    layer = PHMLinear(128, 128, phm_dim=2, rank=8, w_init="normal", init_range=0.05)

    assert layer.weight_left.std().item() == pytest.approx(0.05, rel=0.05)
    assert layer.weight_right.std().item() == pytest.approx(0.05, rel=0.05)


def test_bf16_layer_gives_bf16_output():
    torch.manual_seed(0)
    layer = PHMLinear(8, 4, phm_dim=2, init_range=0.5)
    x = make_input(2, 3, 8)
    expected = layer(x)

    output = layer.to(torch.bfloat16)(x.to(torch.bfloat16))

    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, rtol=0.05, atol=0.02)
