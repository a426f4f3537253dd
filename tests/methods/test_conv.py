"""Tests of SequenceConv: padding, causality, masks, incremental state, dtypes and argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterkit.methods.conv import SequenceConv

IN_FEATURES = 6
OUT_FEATURES = 5


def make_conv(kernel_size: int, causal: bool, bias: bool = True, seed: int = 0) -> SequenceConv:
    torch.manual_seed(seed)
    conv = SequenceConv(IN_FEATURES, OUT_FEATURES, kernel_size, causal=causal, bias=bias)
    if bias:
        # The default bias is small. A larger one makes a wrong bias term visible in every check.
        with torch.no_grad():
            conv.bias.normal_()
    return conv


def random_inputs(batch: int = 2, length: int = 9, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, IN_FEATURES, generator=generator).to(dtype)


def loop_reference(conv: SequenceConv, x: torch.Tensor, first_offset: int) -> torch.Tensor:
    """Compute ``y[t] = b + sum_j W[:, :, j] @ x[t + first_offset + j]`` with zeros outside the sequence."""
    batch, length, _ = x.shape
    weight = conv.weight.detach().double()
    output = torch.zeros(batch, length, conv.out_features, dtype=torch.float64)
    for t in range(length):
        if conv.bias is not None:
            output[:, t] += conv.bias.detach().double()
        for j in range(conv.kernel_size):
            source = t + first_offset + j
            if 0 <= source < length:
                output[:, t] += x[:, source].double() @ weight[:, :, j].T
    return output.float()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_one_equals_linear(causal, bias):
    conv = make_conv(1, causal=causal, bias=bias)
    x = random_inputs()

    expected = x @ conv.weight[:, :, 0].detach().T
    if bias:
        expected = expected + conv.bias.detach()

    assert conv.weight.shape == (OUT_FEATURES, IN_FEATURES, 1)
    assert (conv.bias is None) == (not bias)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_centred_equals_loop(kernel_size):
    conv = make_conv(kernel_size, causal=False)
    x = random_inputs()

    expected = loop_reference(conv, x, first_offset=-(kernel_size // 2))

    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4])
def test_causal_equals_loop(kernel_size):
    conv = make_conv(kernel_size, causal=True)
    x = random_inputs()

    expected = loop_reference(conv, x, first_offset=-(kernel_size - 1))

    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_centred_matches_torch_conv1d(kernel_size):
    conv = make_conv(kernel_size, causal=False)
    reference = nn.Conv1d(IN_FEATURES, OUT_FEATURES, kernel_size, padding=kernel_size // 2)
    with torch.no_grad():
        reference.weight.copy_(conv.weight)
        reference.bias.copy_(conv.bias)
    x = random_inputs()

    expected = reference(x.transpose(1, 2)).transpose(1, 2)

    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4])
def test_causal_ignores_later_inputs(kernel_size):
    conv = make_conv(kernel_size, causal=True)
    x = random_inputs(length=8)
    output = conv(x)

    for t in (0, 2, 5, 6):
        changed = x.clone()
        changed[:, t + 1:] = random_inputs(length=8, seed=7)[:, t + 1:]
        changed_output = conv(changed)

        torch.testing.assert_close(changed_output[:, :t + 1], output[:, :t + 1], rtol=0, atol=1e-6)
        # The check above could pass for a convolution that ignores its input, so the next output must move.
        assert not torch.allclose(changed_output[:, t + 1], output[:, t + 1])


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_centred_reads_later_inputs(kernel_size):
    conv = make_conv(kernel_size, causal=False)
    x = random_inputs(length=8)
    changed = x.clone()
    changed[:, 4] += 1.0

    difference = (conv(changed) - conv(x)).abs().amax(dim=(0, 2))

    reach = kernel_size // 2
    assert torch.all(difference[4 - reach:4 + reach + 1] > 0)
    assert torch.all(difference[:4 - reach] == 0)
    assert torch.all(difference[4 + reach + 1:] == 0)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_centred_mask_right_padding(kernel_size):
    conv = make_conv(kernel_size, causal=False)
    row = random_inputs(batch=1, length=5)
    padded = torch.cat([row, torch.full((1, 3, IN_FEATURES), float("nan"))], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])

    output = conv(padded, mask=mask)

    torch.testing.assert_close(output[:, :5], conv(row), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4])
def test_causal_mask_left_padding(kernel_size):
    conv = make_conv(kernel_size, causal=True)
    row = random_inputs(batch=1, length=5)
    padded = torch.cat([torch.full((1, 3, IN_FEATURES), 50.0), row], dim=1)
    mask = torch.tensor([[0] * 3 + [1] * 5])

    output = conv(padded, mask=mask)

    torch.testing.assert_close(output[:, 3:], conv(row), rtol=0, atol=1e-6)


def test_mask_batch_of_mixed_lengths():
    conv = make_conv(3, causal=False)
    rows = [random_inputs(batch=1, length=length, seed=length) for length in (7, 4)]
    batch = torch.zeros(2, 7, IN_FEATURES)
    batch[0] = rows[0][0]
    batch[1, :4] = rows[1][0]
    batch[1, 4:] = 9.0
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])

    output = conv(batch, mask=mask)

    torch.testing.assert_close(output[0:1], conv(rows[0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(output[1:2, :4], conv(rows[1]), rtol=0, atol=1e-6)


def run_in_pieces(conv: SequenceConv, x: torch.Tensor, piece_lengths: list[int]) -> torch.Tensor:
    state: dict[str, torch.Tensor] = {}
    outputs = []
    start = 0
    for length in piece_lengths:
        outputs.append(conv(x[:, start:start + length], state=state))
        start += length
    assert start == x.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4])
@pytest.mark.parametrize("piece_lengths", [[1] * 9, [2, 2, 2, 2, 1], [4, 1, 1, 2, 1]], ids=["by1", "by2", "mixed"])
def test_state_matches_full_pass(kernel_size, piece_lengths):
    conv = make_conv(kernel_size, causal=True)
    x = random_inputs(length=9)

    incremental = run_in_pieces(conv, x, piece_lengths)

    torch.testing.assert_close(incremental, conv(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel_size", [2, 4])
def test_state_stores_last_inputs(kernel_size):
    conv = make_conv(kernel_size, causal=True)
    x = random_inputs(length=6)
    state: dict[str, torch.Tensor] = {}

    conv(x, state=state)

    stored = state[SequenceConv.STATE_KEY]
    assert stored.shape == (2, IN_FEATURES, kernel_size - 1)
    torch.testing.assert_close(stored, x[:, 6 - (kernel_size - 1):].transpose(1, 2), rtol=0, atol=0)
    assert not stored.requires_grad


def test_state_after_left_padded_prompt():
    conv = make_conv(3, causal=True)
    row = random_inputs(batch=1, length=6)
    prompt = torch.cat([torch.full((1, 2, IN_FEATURES), 50.0), row[:, :3]], dim=1)
    prompt_mask = torch.tensor([[False, False, True, True, True]])
    state: dict[str, torch.Tensor] = {}

    outputs = [conv(prompt, mask=prompt_mask, state=state)[:, 2:]]
    for t in range(3, 6):
        outputs.append(conv(row[:, t:t + 1], mask=torch.ones(1, 1, dtype=torch.bool), state=state))

    torch.testing.assert_close(torch.cat(outputs, dim=1), conv(row), rtol=0, atol=1e-6)


def test_reorder_state_follows_beams():
    conv = make_conv(3, causal=True)
    prefix = random_inputs(batch=3, length=4, seed=2)
    suffix = random_inputs(batch=3, length=3, seed=3)
    beam_index = torch.tensor([2, 0, 0])
    state: dict[str, torch.Tensor] = {}

    conv(prefix, state=state)
    returned = conv.reorder_state(state, beam_index)
    continued = conv(suffix, state=state)

    expected = conv(torch.cat([prefix[beam_index], suffix], dim=1))[:, 4:]
    assert returned is state
    torch.testing.assert_close(continued, expected, rtol=0, atol=1e-6)


def test_reorder_state_can_grow_batch():
    conv = make_conv(2, causal=True)
    prefix = random_inputs(batch=2, length=3)
    state: dict[str, torch.Tensor] = {}
    conv(prefix, state=state)

    conv.reorder_state(state, torch.tensor([0, 0, 1, 1]))

    assert state[SequenceConv.STATE_KEY].shape == (4, IN_FEATURES, 1)
    torch.testing.assert_close(state[SequenceConv.STATE_KEY][1], prefix[0, -1:].T, rtol=0, atol=0)
    torch.testing.assert_close(state[SequenceConv.STATE_KEY][2], prefix[1, -1:].T, rtol=0, atol=0)


def test_reorder_empty_state():
    conv = make_conv(3, causal=True)

    assert conv.reorder_state({}, torch.tensor([1, 0])) == {}


@pytest.mark.parametrize("causal,kernel_size", [(False, 3), (True, 4)])
def test_bfloat16_module_and_input(causal, kernel_size):
    conv = make_conv(kernel_size, causal=causal)
    x = random_inputs()
    expected = conv(x)

    conv_bf16 = make_conv(kernel_size, causal=causal).to(torch.bfloat16)
    output = conv_bf16(x.to(torch.bfloat16), mask=torch.ones(2, 9, dtype=torch.bool))

    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, rtol=0.05, atol=0.05)


def test_bfloat16_input_float32_weights_with_state():
    conv = make_conv(3, causal=True)
    x = random_inputs(dtype=torch.bfloat16)

    incremental = run_in_pieces(conv, x, [1] * 9)
    full = conv(x)

    assert incremental.dtype == torch.bfloat16
    torch.testing.assert_close(incremental.float(), full.float(), rtol=0.02, atol=0.02)
    torch.testing.assert_close(full.float(), conv(x.float()), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("causal,kernel_size", [(False, 3), (True, 2)])
def test_gradients_reach_weights_and_inputs(causal, kernel_size):
    conv = make_conv(kernel_size, causal=causal)
    x = random_inputs().requires_grad_()

    conv(x, mask=torch.ones(2, 9, dtype=torch.bool)).pow(2).sum().backward()

    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.bias.grad is not None and conv.bias.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    # Every kernel tap reads some real input, so every tap gets a gradient.
    assert torch.all(conv.weight.grad.abs().sum(dim=(0, 1)) > 0)


def test_masked_positions_get_no_input_gradient():
    conv = make_conv(3, causal=False)
    x = random_inputs().requires_grad_()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False

    conv(x, mask=mask).sum().backward()

    assert torch.all(x.grad[1, 6:] == 0)
    assert x.grad[1, :6].abs().sum() > 0


def test_even_centred_kernel_raises():
    with pytest.raises(ValueError, match=r"kernel_size=4 .*kernel_size=5"):
        SequenceConv(4, 4, 4, causal=False)


@pytest.mark.parametrize("name,arguments", [
    ("in_features", (0, 4, 3)),
    ("out_features", (4, -2, 3)),
    ("kernel_size", (4, 4, 0)),
    ("kernel_size", (4, 4, 2.0)),
])
def test_non_positive_sizes_raise(name, arguments):
    bad_value = arguments[("in_features", "out_features", "kernel_size").index(name)]
    with pytest.raises(ValueError, match=f"{name}={bad_value!r}"):
        SequenceConv(*arguments, causal=True)


def test_state_on_centred_conv_raises():
    conv = make_conv(3, causal=False)

    with pytest.raises(ValueError, match="causal=True"):
        conv(random_inputs(), state={})


def test_wrong_input_width_raises():
    conv = make_conv(3, causal=True)

    with pytest.raises(ValueError, match=r"\(2, 9, 4\)"):
        conv(torch.zeros(2, 9, 4))


def test_wrong_mask_shape_raises():
    conv = make_conv(3, causal=True)

    with pytest.raises(ValueError, match=r"mask has shape \(2, 8\)"):
        conv(random_inputs(), mask=torch.ones(2, 8, dtype=torch.bool))


def test_float_mask_raises():
    conv = make_conv(3, causal=True)

    with pytest.raises(ValueError, match="torch.float32"):
        conv(random_inputs(), mask=torch.zeros(2, 9))


def test_state_from_other_batch_raises():
    conv = make_conv(3, causal=True)
    state: dict[str, torch.Tensor] = {}
    conv(random_inputs(batch=2), state=state)

    with pytest.raises(ValueError, match=r"shape \(2, 6, 2\).*reorder_state"):
        conv(random_inputs(batch=3, length=1), state=state)
