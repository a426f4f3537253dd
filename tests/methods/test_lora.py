"""Tests for the LoRA method module, against hand-computed matrix products."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from adapterkit.methods.lora import LoRA

IN_FEATURES, OUT_FEATURES = 6, 5


def make_input(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def make_lora(r: int = 4, alpha: float = 8.0, seed: int = 0, **kwargs) -> LoRA:
    torch.manual_seed(seed)
    return LoRA(IN_FEATURES, OUT_FEATURES, r=r, alpha=alpha, init_weights=kwargs.pop("init_weights", "bert"),
                **kwargs).eval()


def test_parameter_names_and_shapes():
    lora = make_lora(r=3)

    assert set(lora.state_dict()) == {"lora_A", "lora_B"}
    assert lora.lora_A.shape == (3, IN_FEATURES)
    assert lora.lora_B.shape == (OUT_FEATURES, 3)
    assert isinstance(lora.lora_A, nn.Parameter)
    assert isinstance(lora.lora_B, nn.Parameter)


def test_delta_matches_hand_computed_product():
    lora = make_lora(r=4, alpha=8.0)
    x = make_input(2, 3, IN_FEATURES)
    A = lora.lora_A.detach()
    B = lora.lora_B.detach()

    expected = torch.zeros(2, 3, OUT_FEATURES)
    for b in range(2):
        for s in range(3):
            for o in range(OUT_FEATURES):
                expected[b, s, o] = 2.0 * sum(B[o, k] * (A[k] * x[b, s]).sum() for k in range(4))

    assert lora.scaling == 2.0
    torch.testing.assert_close(lora(x), expected)


def test_scaling_is_alpha_over_rank():
    lora_alpha_4 = make_lora(r=4, alpha=4.0)
    lora_alpha_16 = make_lora(r=4, alpha=16.0)
    lora_alpha_16.load_state_dict(lora_alpha_4.state_dict())
    x = make_input(2, 3, IN_FEATURES)

    assert lora_alpha_4.scaling == 1.0
    assert lora_alpha_16.scaling == 4.0
    delta_4 = lora_alpha_4(x)
    assert delta_4.abs().max() > 0
    torch.testing.assert_close(lora_alpha_16(x), 4.0 * delta_4)


@pytest.mark.parametrize("init_weights", ["lora", "gaussian"])
def test_zero_B_init_gives_zero_delta(init_weights):
    lora = make_lora(init_weights=init_weights)
    x = make_input(2, 3, IN_FEATURES)

    assert torch.count_nonzero(lora.lora_A) == lora.lora_A.numel()
    assert torch.count_nonzero(lora.lora_B) == 0
    assert torch.equal(lora(x), torch.zeros(2, 3, OUT_FEATURES))
    assert torch.equal(lora.delta_weight(), torch.zeros(OUT_FEATURES, IN_FEATURES))


def test_lora_init_is_kaiming_uniform_bound():
    torch.manual_seed(0)
    lora = LoRA(400, 3, r=8, alpha=8, init_weights="lora")

    # kaiming_uniform_ with a = sqrt(5) draws from U(-b, b) with b = sqrt(6 / ((1 + 5) * fan_in)).
    bound = 1.0 / math.sqrt(400)
    assert lora.lora_A.abs().max() <= bound
    assert lora.lora_A.abs().max() > 0.9 * bound


def test_gaussian_init_std_is_one_over_rank():
    torch.manual_seed(0)
    lora = LoRA(2000, 3, r=4, alpha=8, init_weights="gaussian")

    assert lora.lora_A.std().item() == pytest.approx(0.25, rel=0.05)


def test_bert_init_has_nonzero_delta():
    torch.manual_seed(0)
    lora = LoRA(2000, 3, r=4, alpha=8, init_weights="bert")

    assert lora.lora_A.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(lora.lora_B) == lora.lora_B.numel()
    assert lora.delta_weight().abs().max() > 0


def test_delta_weight_merges_into_linear():
    lora = make_lora(r=2, alpha=3.0)
    x = make_input(2, 3, IN_FEATURES)
    torch.manual_seed(1)
    base = nn.Linear(IN_FEATURES, OUT_FEATURES)

    delta_weight = lora.delta_weight()
    assert delta_weight.shape == (OUT_FEATURES, IN_FEATURES)
    torch.testing.assert_close(x @ delta_weight.T, lora(x))

    merged = nn.Linear(IN_FEATURES, OUT_FEATURES)
    with torch.no_grad():
        merged.weight.copy_(base.weight + delta_weight)
        merged.bias.copy_(base.bias)
    torch.testing.assert_close(merged(x), base(x) + lora(x))


def test_two_dimensional_input():
    lora = make_lora()
    x = make_input(7, IN_FEATURES)

    delta = lora(x)
    assert delta.shape == (7, OUT_FEATURES)
    torch.testing.assert_close(delta, x @ lora.delta_weight().T)


def test_gate_shape_and_range():
    lora = make_lora(use_gating=True)
    x = make_input(3, 4, IN_FEATURES)

    gate = lora.gate_values(x)
    assert gate.shape == (3, 4, 1)
    assert torch.all(gate > 0)
    assert torch.all(gate < 1)


def test_gate_is_sigmoid_per_position():
    lora = make_lora(use_gating=True)
    with torch.no_grad():
        lora.gate.weight.copy_(make_input(1, IN_FEATURES, seed=5))
    x = make_input(3, 4, IN_FEATURES)
    weight = lora.gate.weight.detach()[0]
    bias = lora.gate.bias.detach()[0]

    expected_gate = torch.zeros(3, 4)
    for b in range(3):
        for s in range(4):
            expected_gate[b, s] = torch.sigmoid((x[b, s] * weight).sum() + bias)
    ungated = x @ lora.delta_weight().T

    torch.testing.assert_close(lora.gate_values(x).reshape(3, 4), expected_gate)
    torch.testing.assert_close(lora(x), ungated * expected_gate.reshape(3, 4, 1))


def test_gate_weight_init_std():
    torch.manual_seed(0)
    lora = LoRA(2000, 3, r=4, alpha=8, use_gating=True)

    assert lora.gate.weight.shape == (1, 2000)
    assert lora.gate.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_gate_on_two_dimensional_input():
    lora = make_lora(use_gating=True)
    x = make_input(5, IN_FEATURES)

    gate = lora.gate_values(x)
    assert gate.shape == (5, 1)
    torch.testing.assert_close(gate, torch.sigmoid(lora.gate(x)))
    assert lora(x).shape == (5, OUT_FEATURES)


def test_gate_rejects_one_dimensional_input():
    lora = make_lora(use_gating=True)

    with pytest.raises(ValueError, match=re.escape("(6,)")):
        lora(make_input(IN_FEATURES))


def test_gate_absent_without_gating():
    lora = make_lora()

    assert lora.gate is None
    with pytest.raises(ValueError, match="use_gating=True"):
        lora.gate_values(make_input(2, 3, IN_FEATURES))


def test_dropout_only_in_train_mode():
    lora = make_lora(dropout=0.5)
    x = make_input(4, 8, IN_FEATURES)
    expected = x @ lora.delta_weight().T

    lora.eval()
    torch.testing.assert_close(lora(x), expected)

    lora.train()
    torch.manual_seed(0)
    train_delta = lora(x)
    assert not torch.allclose(train_delta, expected)

    # In train mode the update is (mask * x / (1 - p)) W^T, so dropping nothing leaves it unchanged.
    lora.dropout.p = 0.0
    torch.testing.assert_close(lora(x), expected)


def test_gradients_reach_both_factors():
    lora = make_lora().train()
    x = make_input(2, 3, IN_FEATURES)

    lora(x).sum().backward()

    assert lora.lora_A.grad is not None
    assert lora.lora_B.grad is not None
    assert lora.lora_A.grad.abs().max() > 0
    assert lora.lora_B.grad.abs().max() > 0


@pytest.mark.parametrize(("kwargs", "named_value"), [
    ({"r": 0}, "r=0"),
    ({"r": 2.5}, "r=2.5"),
    ({"r": True}, "r=True"),
    ({"alpha": 0}, "alpha=0"),
    ({"alpha": -1.0}, "alpha=-1.0"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"dropout": -0.1}, "dropout=-0.1"),
    ({"init_weights": "xavier"}, "init_weights='xavier'"),
    ({"in_features": 0}, "in_features=0"),
    ({"out_features": -3}, "out_features=-3"),
])
def test_bad_arguments_raise(kwargs, named_value):
    arguments = {"in_features": 4, "out_features": 4, "r": 2, "alpha": 4.0} | kwargs

    with pytest.raises(ValueError, match=re.escape(named_value)):
        LoRA(**arguments)


@pytest.mark.parametrize("use_gating", [False, True])
def test_bf16_module_gives_bf16_output(use_gating):
    lora = make_lora(use_gating=use_gating)
    x = make_input(2, 3, IN_FEATURES)
    expected = lora(x)

    lora_bf16 = lora.to(torch.bfloat16)
    delta = lora_bf16(x.to(torch.bfloat16))

    assert delta.dtype == torch.bfloat16
    torch.testing.assert_close(delta.float(), expected, rtol=0.05, atol=1e-3)


def test_float32_module_follows_input_dtype():
    lora = make_lora(use_gating=True)
    x = make_input(2, 3, IN_FEATURES)

    delta = lora(x.to(torch.bfloat16))

    assert lora.lora_A.dtype == torch.float32
    assert delta.dtype == torch.bfloat16


@pytest.mark.parametrize("inplace", [False, True])
def test_add_to_equals_sum(inplace):
    torch.manual_seed(0)
    lora = LoRA(16, 12, r=4, alpha=8, init_weights="bert")
    x = torch.randn(3, 5, 16)
    output = torch.randn(3, 5, 12)
    expected = output + (x @ lora.lora_A.T @ lora.lora_B.T) * 2.0

    with torch.no_grad():
        result = lora.add_to(output.clone(), x, inplace=inplace)

    torch.testing.assert_close(result, expected, atol=1e-6, rtol=0)


def test_add_to_keeps_output_unless_inplace():
    lora = LoRA(16, 12, r=4, alpha=4, init_weights="bert")
    x, output = torch.randn(2, 16), torch.randn(2, 12)
    original = output.clone()
    with torch.no_grad():
        lora.add_to(output, x)
    assert torch.equal(output, original)
    with torch.no_grad():
        returned = lora.add_to(output, x, inplace=True)
    assert returned is output
    assert not torch.equal(output, original)


def test_add_to_gradients_match_forward():
    torch.manual_seed(1)
    lora = LoRA(16, 12, r=4, alpha=4, init_weights="bert")
    x, output = torch.randn(3, 16), torch.randn(3, 12)
    (output + lora(x)).pow(2).sum().backward()
    expected = [lora.lora_A.grad.clone(), lora.lora_B.grad.clone()]
    lora.zero_grad()
    lora.add_to(output, x).pow(2).sum().backward()
    torch.testing.assert_close(lora.lora_A.grad, expected[0])
    torch.testing.assert_close(lora.lora_B.grad, expected[1])
