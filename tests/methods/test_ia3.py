"""Tests for the (IA)^3 method module."""

from __future__ import annotations

import re

import pytest
import torch

from adapterkit.methods.ia3 import IA3


def make_input(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def test_scale_parameter_shape():
    ia3 = IA3(5)

    assert set(ia3.state_dict()) == {"scale"}
    assert ia3.scale.shape == (5,)


def test_identity_at_init():
    ia3 = IA3(5)
    x = make_input(2, 3, 5)

    assert torch.equal(ia3.scale, torch.ones(5))
    assert torch.equal(ia3(x), x)


def test_forward_scales_last_dimension():
    torch.manual_seed(0)
    ia3 = IA3(4, init_weights="bert")
    x = make_input(2, 3, 4)
    scale = ia3.scale.detach()

    expected = torch.empty(2, 3, 4)
    for feature in range(4):
        expected[..., feature] = x[..., feature] * scale[feature]

    torch.testing.assert_close(ia3(x), expected)


def test_bert_init_is_not_identity():
    torch.manual_seed(0)
    ia3 = IA3(4000, init_weights="bert")

    assert not torch.equal(ia3.scale, torch.ones(4000))
    assert ia3.scale.mean().item() == pytest.approx(1.0, abs=0.002)
    assert ia3.scale.std().item() == pytest.approx(0.02, rel=0.05)


def test_gradient_flows_to_scale():
    ia3 = IA3(4)
    x = make_input(2, 3, 4)

    ia3(x).sum().backward()

    # d/d scale[f] of sum(x * scale) is the sum of x[..., f] over all other dimensions.
    torch.testing.assert_close(ia3.scale.grad, x.sum(dim=(0, 1)))


@pytest.mark.parametrize(("kwargs", "named_value"), [
    ({"features": 0}, "features=0"),
    ({"features": 2.0}, "features=2.0"),
    ({"init_weights": "zeros"}, "init_weights='zeros'"),
])
def test_bad_arguments_raise(kwargs, named_value):
    arguments = {"features": 4} | kwargs

    with pytest.raises(ValueError, match=re.escape(named_value)):
        IA3(**arguments)


def test_bf16_module_gives_bf16_output():
    torch.manual_seed(0)
    ia3 = IA3(4, init_weights="bert").to(torch.bfloat16)
    x = make_input(2, 3, 4).to(torch.bfloat16)

    output = ia3(x)

    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, x * ia3.scale)
