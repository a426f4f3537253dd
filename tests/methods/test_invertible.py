"""Tests of InvertibleAdapter: coupling formulas, invertibility, initial identity, gradients and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adapterkit.methods.invertible import GLOW_LOG_SCALE_LIMIT, InvertibleAdapter

HIDDEN = 32
HALF = HIDDEN // 2
ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def randomized_adapter(block_type: str, non_linearity: str = "relu", reduction_factor: float = 2,
                       std: float = 0.3, seed: int = 0) -> InvertibleAdapter:
    """Return an adapter whose weights are all random and non-zero, unlike the identity it starts as."""
    adapter = InvertibleAdapter(HIDDEN, block_type=block_type, reduction_factor=reduction_factor,
                                non_linearity=non_linearity)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return adapter


def random_hidden(batch: int = 2, length: int = 5, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, HIDDEN, generator=generator)


def mlp_by_hand(mlp, inputs: torch.Tensor, activation) -> torch.Tensor:
    """Compute ``W2 act(W1 inputs + b1) + b2`` from the raw weights of a Linear-act-Linear stack."""
    first, _, last = mlp
    hidden = activation(inputs @ first.weight.detach().T + first.bias.detach())
    return hidden @ last.weight.detach().T + last.bias.detach()


@pytest.mark.parametrize("non_linearity", list(ACTIVATIONS))
def test_nice_forward_matches_formula(non_linearity):
    adapter = randomized_adapter("nice", non_linearity)
    activation = ACTIVATIONS[non_linearity]
    x = random_hidden()
    x1, x2 = x[..., :HALF], x[..., HALF:]

    y1 = x1 + mlp_by_hand(adapter.f, x2, activation)
    y2 = x2 + mlp_by_hand(adapter.g, y1, activation)

    torch.testing.assert_close(adapter(x), torch.cat([y1, y2], dim=-1), rtol=1e-5, atol=1e-5)


def test_glow_forward_matches_formula():
    adapter = randomized_adapter("glow", "tanh")
    x = random_hidden()
    x1, x2 = x[..., :HALF], x[..., HALF:]

    def scale_and_shift(mlp, condition):
        raw = mlp_by_hand(mlp, condition, torch.tanh)
        limit = GLOW_LOG_SCALE_LIMIT
        return torch.exp(limit * torch.tanh(raw[..., :HALF] / limit)), raw[..., HALF:]

    scale, shift = scale_and_shift(adapter.f, x2)
    y1 = x1 * scale + shift
    scale, shift = scale_and_shift(adapter.g, y1)
    y2 = x2 * scale + shift

    torch.testing.assert_close(adapter(x), torch.cat([y1, y2], dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_type", ["nice", "glow"])
@pytest.mark.parametrize("non_linearity", list(ACTIVATIONS))
def test_inverse_undoes_forward(block_type, non_linearity):
    adapter = randomized_adapter(block_type, non_linearity)
    x = random_hidden()

    y = adapter(x)

    # A change well above rounding error, so the inverse checks below test a real transformation.
    assert (y - x).abs().max() > 0.1
    torch.testing.assert_close(adapter.inverse(y), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter(adapter.inverse(x)), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_type", ["nice", "glow"])
def test_inverse_with_large_weights(block_type):
    adapter = randomized_adapter(block_type, std=1.0, seed=3)
    x = random_hidden()

    y = adapter(x)
    error = (adapter.inverse(y) - x).abs().max()

    # Outputs reach a few hundred here, so float32 rounding alone exceeds an absolute 1e-5 and the
    # bound scales with the output magnitude.
    assert y.abs().max() > 100
    assert error <= 1e-5 * y.abs().max()


def test_glow_scale_is_clamped():
    adapter = InvertibleAdapter(HIDDEN, block_type="glow")
    with torch.no_grad():
        adapter.f[2].bias[:HALF] = 1000.0
        adapter.g[2].bias[:HALF] = -1000.0
    x = random_hidden()

    y = adapter(x)

    torch.testing.assert_close(y[..., :HALF], x[..., :HALF] * math.exp(GLOW_LOG_SCALE_LIMIT), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[..., HALF:], x[..., HALF:] * math.exp(-GLOW_LOG_SCALE_LIMIT), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.inverse(y), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_type", ["nice", "glow"])
def test_new_adapter_is_identity(block_type):
    adapter = InvertibleAdapter(HIDDEN, block_type=block_type)
    x = random_hidden()

    assert torch.equal(adapter(x), x)
    assert torch.equal(adapter.inverse(x), x)


@pytest.mark.parametrize("reduction_factor,width", [(2, 8), (4, 4), (1.5, 10), (16, 1), (64, 1)])
def test_mlp_width(reduction_factor, width):
    adapter = InvertibleAdapter(HIDDEN, reduction_factor=reduction_factor)

    assert adapter.width == width
    assert adapter.f[0].weight.shape == (width, HALF)
    assert adapter.g[2].weight.shape == (HALF, width)


def test_glow_mlp_outputs_scale_and_shift():
    adapter = InvertibleAdapter(HIDDEN, block_type="glow", reduction_factor=4)

    assert adapter.f[2].weight.shape == (HIDDEN, 4)
    assert adapter.g[2].weight.shape == (HIDDEN, 4)


@pytest.mark.parametrize("block_type", ["nice", "glow"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradients_reach_every_parameter(block_type, direction):
    adapter = randomized_adapter(block_type, "gelu")
    x = random_hidden().requires_grad_()

    output = adapter(x) if direction == "forward" else adapter.inverse(x)
    output.pow(2).sum().backward()

    assert x.grad.abs().sum() > 0
    for name, parameter in adapter.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("block_type", ["nice", "glow"])
def test_new_adapter_trains_out_of_identity(block_type):
    adapter = InvertibleAdapter(HIDDEN, block_type=block_type)
    x = random_hidden()
    target = random_hidden(seed=5)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1)

    for _ in range(2):
        optimizer.zero_grad()
        (adapter(x) - target).pow(2).mean().backward()
        optimizer.step()

    # In the second step the first layers get a gradient too, because the last layers are no longer zero.
    assert adapter.f[0].weight.grad.abs().sum() > 0
    assert not torch.equal(adapter(x), x)


@pytest.mark.parametrize("block_type", ["nice", "glow"])
def test_bfloat16_round_trip(block_type):
    adapter = randomized_adapter(block_type)
    x = random_hidden()
    expected = adapter(x)

    adapter_bf16 = adapter.to(torch.bfloat16)
    y = adapter_bf16(x.to(torch.bfloat16))

    assert y.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits, so compare whole tensors by relative error.
    assert (y.float() - expected).norm() / expected.norm() < 0.03
    assert (adapter_bf16.inverse(y).float() - x).norm() / x.norm() < 0.05


def test_swish_and_silu_agree():
    x = random_hidden()

    swish = randomized_adapter("nice", "swish")
    silu = randomized_adapter("nice", "silu")

    torch.testing.assert_close(swish(x), silu(x), rtol=0, atol=0)


@pytest.mark.parametrize("hidden_size", [31, 0, 1, -4])
def test_bad_hidden_size_raises(hidden_size):
    with pytest.raises(ValueError, match=f"hidden_size={hidden_size}"):
        InvertibleAdapter(hidden_size)


def test_unknown_block_type_raises():
    with pytest.raises(ValueError, match="block_type='real_nvp' is invalid.*nice, glow"):
        InvertibleAdapter(HIDDEN, block_type="real_nvp")


@pytest.mark.parametrize("reduction_factor", [0, -2, "2"])
def test_bad_reduction_factor_raises(reduction_factor):
    with pytest.raises(ValueError, match=f"reduction_factor={reduction_factor!r}"):
        InvertibleAdapter(HIDDEN, reduction_factor=reduction_factor)


def test_unknown_non_linearity_raises():
    with pytest.raises(ValueError, match="non_linearity='mish'.*relu"):
        InvertibleAdapter(HIDDEN, non_linearity="mish")


@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_wrong_hidden_width_raises(method):
    adapter = InvertibleAdapter(HIDDEN)

    with pytest.raises(ValueError, match=r"\(2, 5, 16\)"):
        getattr(adapter, method)(torch.zeros(2, 5, 16))
