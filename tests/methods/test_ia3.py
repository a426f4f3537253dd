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


def plain_gradients(x: torch.Tensor, scale: torch.Tensor, upstream: torch.Tensor) -> tuple:
    """Return autograd's gradients of ``sum(upstream * x * scale)`` for x and the scale, as float64."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    scale64 = scale.detach().double().requires_grad_(True)
    (x64 * scale64 * upstream.double()).sum().backward()
    return x64.grad, scale64.grad


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), (64, 4)])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_gradients_match_autograd(shape, x_needs_grad, monkeypatch):
    # 16 elements a chunk: the (64, 4) input is summed in 8 chunks (the most), the others in one or two.
    monkeypatch.setattr("adapterkit.methods.ia3._GRADIENT_CHUNK_ELEMENTS", 16)
    torch.manual_seed(0)
    ia3 = IA3(4, init_weights="bert")
    x = make_input(*shape).requires_grad_(x_needs_grad)
    upstream = make_input(*shape, seed=1)

    (ia3(x) * upstream).sum().backward()

    expected_x_grad, expected_scale_grad = plain_gradients(x, ia3.scale, upstream)
    torch.testing.assert_close(ia3.scale.grad, expected_scale_grad.float())
    if x_needs_grad:
        torch.testing.assert_close(x.grad, expected_x_grad.float())
    else:
        assert x.grad is None


def test_gradients_of_transposed_slice(monkeypatch):
    # A slice of a transposed fused output: its leading dimensions cannot be viewed as one, so the
    # chunks run along the first dimension.
    monkeypatch.setattr("adapterkit.methods.ia3._GRADIENT_CHUNK_ELEMENTS", 8)
    torch.manual_seed(0)
    ia3 = IA3(4, init_weights="bert")
    fused = make_input(3, 5, 12).requires_grad_(True)
    piece = fused.transpose(0, 1)[..., 4:8]
    upstream = make_input(5, 3, 4, seed=1)

    (ia3(piece) * upstream).sum().backward()

    expected_piece_grad, expected_scale_grad = plain_gradients(piece.detach().requires_grad_(True), ia3.scale,
                                                                     upstream)
    torch.testing.assert_close(ia3.scale.grad, expected_scale_grad.float())
    torch.testing.assert_close(fused.grad.transpose(0, 1)[..., 4:8], expected_piece_grad.float())
    assert torch.count_nonzero(fused.grad[..., :4]) == 0


def test_bf16_gradient_sums_in_float32(monkeypatch):
    # 1,000 rows of 1.0 in 8 chunks of 125: a bfloat16 running sum of the chunks rounds on the way
    # (996), a float32 one reaches 1,000, which bfloat16 represents exactly.
    monkeypatch.setattr("adapterkit.methods.ia3._GRADIENT_CHUNK_ELEMENTS", 1)
    ia3 = IA3(1).to(torch.bfloat16)
    x = torch.ones(1000, 1, dtype=torch.bfloat16)

    ia3(x).sum().backward()

    assert ia3.scale.grad.dtype == torch.bfloat16
    assert ia3.scale.grad.item() == 1000.0


def test_backward_makes_one_input_sized_tensor(monkeypatch):
    # Autograd's backward of x * scale makes two new tensors the size of x (grad * scale and grad * x)
    # and keeps both alive with the incoming gradient. This one makes only grad * scale, and products
    # of at most an eighth of x for the scale's gradient.
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr("adapterkit.methods.ia3._GRADIENT_CHUNK_ELEMENTS", 2**14)
    ia3 = IA3(256)
    x = make_input(64, 32, 256).requires_grad_(True)
    output = ia3(x)
    upstream = torch.ones_like(output)
    known = {upstream.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}
    new_storages = {}

    class RecordNewStorages(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.untyped_storage().data_ptr() not in known:
                new_storages[result.untyped_storage().data_ptr()] = result.numel()
            return result

    with RecordNewStorages():
        output.backward(upstream)

    sizes = sorted(new_storages.values(), reverse=True)
    assert sizes[0] == x.numel()
    assert sizes[1] <= x.numel() // 8
    torch.testing.assert_close(ia3.scale.grad, x.detach().sum(dim=(0, 1)))
