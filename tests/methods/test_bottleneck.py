"""Tests for the bottleneck module's one-product up projection, against the module's plain path."""

from __future__ import annotations

import copy

import pytest
import torch

from adapterkit.config import BottleneckConfig
from adapterkit.methods.bottleneck import Bottleneck

HIDDEN = 16


def make_adapter(seed: int = 0, **changes) -> Bottleneck:
    torch.manual_seed(seed)
    config = BottleneckConfig(**({"reduction_factor": 4, "non_linearity": "swish"} | changes))
    adapter = Bottleneck(HIDDEN, config)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_(0, 0.5)
    return adapter


def plain_path(adapter: Bottleneck) -> Bottleneck:
    """A copy of ``adapter`` whose up projection carries a hook, so it runs the plain path."""
    copied = copy.deepcopy(adapter)
    copied.up_proj.register_forward_hook(lambda module, args, output: None)
    return copied


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, HIDDEN, generator=generator, requires_grad=True)
    residual = torch.randn(3, 5, HIDDEN, generator=generator, requires_grad=True)
    return hidden, residual


def output_and_gradients(adapter: Bottleneck) -> tuple[torch.Tensor, list[torch.Tensor]]:
    hidden, residual = inputs()
    output = adapter(hidden, residual)
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(2))
    (output * weights).sum().backward()
    gradients = [hidden.grad, residual.grad] + [parameter.grad for parameter in adapter.parameters()]
    return output.detach(), gradients


# Width 4 of 16 is a wide bottleneck, which adds the bias in place. Width 1 (reduction 16) is a narrow
# one, which multiplies the bias by a column of ones.
@pytest.mark.parametrize("changes", [
    {},
    {"scaling": 4.0},
    {"reduction_factor": 16},
    {"reduction_factor": 16, "scaling": 4.0},
    {"scaling": 0.5, "phm_layer": True, "phm_dim": 2},
    {"reduction_factor": 16, "scaling": 0.5, "phm_layer": True, "phm_dim": 1},
    {"phm_layer": True, "phm_dim": 2, "phm_bias": False},
    {"dropout": 0.3},
], ids=["linear", "scaled", "narrow", "narrow-scaled", "phm", "narrow-phm", "phm-no-bias", "dropout-in-eval"])
def test_one_product_matches_plain(changes):
    adapter = make_adapter(**changes)
    if changes.get("dropout"):
        adapter.eval()
    plain = plain_path(adapter)
    hidden, residual = inputs()
    assert adapter._adds_in_up_projection(hidden[..., :4], residual)
    assert not plain._adds_in_up_projection(hidden[..., :4], residual)

    output, gradients = output_and_gradients(adapter)
    expected, expected_gradients = output_and_gradients(plain)

    assert torch.allclose(output, expected, atol=1e-5)
    assert len(gradients) == len(expected_gradients)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        assert torch.allclose(gradient, expected_gradient, atol=1e-4)


@pytest.mark.parametrize(("reduction_factor", "keeps_ones_column"), [(16, True), (4, False)],
                         ids=["narrow", "wide"])
def test_wide_bottleneck_keeps_no_copy(reduction_factor, keeps_ones_column):
    adapter = make_adapter(reduction_factor=reduction_factor, non_linearity="relu")
    width = HIDDEN // reduction_factor
    hidden, residual = inputs()
    saved_shapes = []

    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved_shapes.append(tensor.shape) or tensor,
                                                  lambda tensor: tensor):
        adapter(hidden, residual)

    assert (torch.Size([15, width + 1]) in saved_shapes) == keeps_ones_column
    assert torch.Size([3, 5, width]) in saved_shapes
    # The weight with the bias appended as a row is built for the product but not kept.
    assert torch.Size([width + 1, HIDDEN]) not in saved_shapes


@pytest.mark.parametrize("frozen", ["up_proj.bias", "up_proj.weight", "down_proj.weight"])
def test_narrow_product_with_frozen_parameter(frozen):
    adapter = make_adapter(reduction_factor=16)
    adapter.get_parameter(frozen).requires_grad_(False)
    plain = plain_path(adapter)

    output, gradients = output_and_gradients(adapter)
    expected, expected_gradients = output_and_gradients(plain)

    assert torch.allclose(output, expected, atol=1e-5)
    assert adapter.get_parameter(frozen).grad is None
    for gradient, expected_gradient in zip(gradients, expected_gradients, strict=True):
        assert (gradient is None) == (expected_gradient is None)
        if gradient is not None:
            assert torch.allclose(gradient, expected_gradient, atol=1e-4)


def test_plain_path_by_hand():
    adapter = plain_path(make_adapter(scaling=2.0))
    hidden, residual = inputs()
    with torch.no_grad():
        down = torch.nn.functional.silu(hidden @ adapter.down_proj.weight.T + adapter.down_proj.bias)
        expected = residual + 2.0 * (down @ adapter.up_proj.weight.T + adapter.up_proj.bias)
        assert torch.allclose(adapter(hidden, residual), expected, atol=1e-5)


@pytest.mark.parametrize("changes", [
    {"dropout": 0.3},
    {"scaling": "learned"},
    {"scaling": "channel"},
    {"ln_after": True},
    {"use_gating": True},
    {"projection": "conv"},
], ids=["dropout-in-training", "learned-scaling", "channel-scaling", "norm-after", "gate", "conv"])
def test_plain_path_for_unsupported_configs(changes):
    adapter = make_adapter(**changes)
    hidden, residual = inputs()
    width = adapter.down_proj.out_features if not adapter.is_conv else HIDDEN // 4
    assert not adapter._adds_in_up_projection(hidden[..., :width], residual)


def test_plain_path_autocast_and_dtypes():
    adapter = make_adapter()
    hidden, residual = inputs()
    branch = hidden[..., :4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not adapter._adds_in_up_projection(branch, residual)
        output = adapter(hidden, residual)
    # Autocast computes the branch in bfloat16, and the residual stream keeps its float32.
    assert output.dtype == torch.float32
    assert not adapter._adds_in_up_projection(branch.double(), residual.double())
    assert adapter.double()._adds_in_up_projection(branch.double(), residual.double())


def test_replaced_forward_keeps_plain_path():
    adapter = make_adapter()
    calls = []
    original = adapter.up_proj.forward

    def counting_forward(features):
        calls.append(features.shape)
        return original(features)

    adapter.up_proj.forward = counting_forward
    hidden, residual = inputs()
    adapter(hidden, residual)
    assert calls == [(3, 5, 4)]
