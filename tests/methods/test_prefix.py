"""Tests for the PrefixTuning module, against the reparametrisation and gate computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterkit.methods.prefix import PrefixTuning

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, LENGTH, WIDTH = 3, 2, 5, 8, 4, 6


def make_prefix(seed: int = 0, **kwargs) -> PrefixTuning:
    torch.manual_seed(seed)
    options = dict(prefix_length=LENGTH, bottleneck_size=WIDTH)
    options.update(kwargs)
    return PrefixTuning(LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, **options).eval()


def hand_layout(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``(prefix_length, layers * 2 * heads * head_dim)`` into keys and values ``(layers, heads, length, dim)``."""
    keys = torch.empty(LAYERS, KV_HEADS, LENGTH, HEAD_DIM)
    values = torch.empty(LAYERS, KV_HEADS, LENGTH, HEAD_DIM)
    for layer in range(LAYERS):
        for kind, target in enumerate((keys, values)):
            for head in range(KV_HEADS):
                start = ((layer * 2 + kind) * KV_HEADS + head) * HEAD_DIM
                target[layer, head] = output[:, start:start + HEAD_DIM]
    return keys, values


def test_parameter_names_and_shapes():
    prefix = make_prefix()
    shapes = {name: tuple(tensor.shape) for name, tensor in prefix.state_dict().items()}

    assert shapes == {
        "embedding.weight": (LENGTH, HIDDEN),
        "mlp.0.weight": (WIDTH, HIDDEN),
        "mlp.0.bias": (WIDTH,),
        "mlp.2.weight": (LAYERS * 2 * KV_HEADS * HEAD_DIM, WIDTH),
        "mlp.2.bias": (LAYERS * 2 * KV_HEADS * HEAD_DIM,),
    }


def test_flat_parameter_shape():
    prefix = make_prefix(flat=True)

    assert {name: tuple(p.shape) for name, p in prefix.named_parameters()} == {
        "prefix": (LENGTH, LAYERS * 2 * KV_HEADS * HEAD_DIM)}


def test_reparametrisation_matches_hand_computation():
    prefix = make_prefix()
    embedding = prefix.embedding.weight
    first, last = prefix.mlp[0], prefix.mlp[2]
    output = torch.tanh(embedding @ first.weight.T + first.bias) @ last.weight.T + last.bias
    expected_keys, expected_values = hand_layout(output)

    keys, values = prefix()

    assert keys.shape == (LAYERS, KV_HEADS, LENGTH, HEAD_DIM)
    torch.testing.assert_close(keys, expected_keys)
    torch.testing.assert_close(values, expected_values)


@pytest.mark.parametrize("non_linearity, function", [("relu", torch.relu), ("gelu", nn.functional.gelu)])
def test_non_linearity_is_used(non_linearity, function):
    prefix = make_prefix(non_linearity=non_linearity)
    first, last = prefix.mlp[0], prefix.mlp[2]
    output = function(prefix.embedding.weight @ first.weight.T + first.bias) @ last.weight.T + last.bias

    torch.testing.assert_close(prefix()[0], hand_layout(output)[0])


def test_flat_prefix_is_the_parameter():
    prefix = make_prefix(flat=True)
    expected_keys, expected_values = hand_layout(prefix.prefix.detach())

    keys, values = prefix()

    assert torch.equal(keys, expected_keys)
    assert torch.equal(values, expected_values)


def test_flat_takes_trained_mlp_output():
    trained = make_prefix()
    flat = make_prefix(flat=True)
    with torch.no_grad():
        first, last = trained.mlp[0], trained.mlp[2]
        flat.prefix.copy_(torch.tanh(trained.embedding.weight @ first.weight.T + first.bias) @ last.weight.T
                          + last.bias)

    for flat_part, trained_part in zip(flat(), trained()):
        torch.testing.assert_close(flat_part, trained_part)


@pytest.mark.parametrize("flat", [False, True])
def test_layer_prefix_equals_forward_row(flat):
    prefix = make_prefix(flat=flat)
    keys, values = prefix()

    for layer in range(LAYERS):
        layer_keys, layer_values = prefix.layer_prefix(layer)
        assert layer_keys.shape == (KV_HEADS, LENGTH, HEAD_DIM)
        torch.testing.assert_close(layer_keys, keys[layer])
        torch.testing.assert_close(layer_values, values[layer])


@pytest.mark.parametrize("flat", [False, True])
def test_layer_prefix_from_outputs(flat):
    prefix = make_prefix(flat=flat)
    outputs = prefix.outputs()
    assert outputs.shape == (LENGTH, LAYERS * 2 * KV_HEADS * HEAD_DIM)

    for layer in range(LAYERS):
        alone = prefix.layer_prefix(layer)
        shared = prefix.layer_prefix(layer, outputs)
        torch.testing.assert_close(shared[0], alone[0])
        torch.testing.assert_close(shared[1], alone[1])


@pytest.mark.parametrize("layer", [-1, LAYERS, 1.0, True])
def test_layer_out_of_range(layer):
    with pytest.raises(IndexError, match=f"layer={layer!r}"):
        make_prefix().layer_prefix(layer)


def test_dropout_only_in_training():
    prefix = make_prefix(dropout=0.5)
    assert torch.equal(prefix()[0], prefix()[0])

    prefix.train()
    torch.manual_seed(1)
    keys = prefix()[0]
    prefix.eval()
    clean = prefix()[0]

    dropped = keys == 0
    assert dropped.any()
    assert not dropped.all()
    torch.testing.assert_close(keys[~dropped], clean[~dropped] * 2)


@pytest.mark.parametrize("flat", [False, True])
def test_gradient_reaches_every_parameter(flat):
    prefix = make_prefix(flat=flat, use_gating=True)
    keys, values = prefix.layer_prefix(1)
    gate = prefix.gate_value(1, torch.randn(2, 3, HIDDEN))

    (keys.square().sum() + (values.unsqueeze(0) * gate).square().sum()).backward()

    grads = {name: p.grad for name, p in prefix.named_parameters()}
    # Only the gate of layer 1 took part.
    assert {name for name, grad in grads.items() if grad is None} == {
        "gates.0.weight", "gates.0.bias", "gates.2.weight", "gates.2.bias"}
    assert all(grad.abs().sum() > 0 for grad in grads.values() if grad is not None)


def test_gate_value_matches_hand_computation():
    prefix = make_prefix(use_gating=True)
    hidden = torch.randn(2, 5, HIDDEN)
    gate = prefix.gates[2]
    expected = torch.sigmoid(hidden @ gate.weight.T + gate.bias).mean(dim=1)

    value = prefix.gate_value(2, hidden)

    assert value.shape == (2, 1, 1, 1)
    torch.testing.assert_close(value.flatten(), expected.flatten())


def test_gate_value_averages_real_tokens_only():
    prefix = make_prefix(use_gating=True)
    hidden = torch.randn(2, 5, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])

    value = prefix.gate_value(0, hidden, attention_mask=mask)

    torch.testing.assert_close(value[1], prefix.gate_value(0, hidden[1:, :2])[0])
    torch.testing.assert_close(value[0], prefix.gate_value(0, hidden[:1])[0])


def test_gate_layout_and_dtype():
    prefix = make_prefix(use_gating=True)

    assert isinstance(prefix.gates, nn.ModuleList) and len(prefix.gates) == LAYERS
    assert all(gate.weight.shape == (1, HIDDEN) for gate in prefix.gates)
    assert prefix.gate_value(0, torch.randn(1, 2, HIDDEN, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_gate_value_without_gates():
    with pytest.raises(ValueError, match="use_gating=True"):
        make_prefix().gate_value(0, torch.randn(1, 2, HIDDEN))


def test_gate_value_wrong_shape():
    with pytest.raises(ValueError, match=f"expected \\(batch, seq_len, {HIDDEN}\\)"):
        make_prefix(use_gating=True).gate_value(0, torch.randn(2, HIDDEN))


@pytest.mark.parametrize("name, value", [
    ("n_layers", 0), ("n_kv_heads", -1), ("head_dim", 2.5), ("hidden_size", True), ("prefix_length", 0),
    ("bottleneck_size", "512"), ("non_linearity", "softplus"), ("dropout", 1.0), ("dropout", -0.1),
    ("flat", 1), ("use_gating", "yes"),
])
def test_invalid_argument_rejected(name, value):
    arguments = dict(n_layers=LAYERS, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=HIDDEN)
    arguments[name] = value

    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        PrefixTuning(**arguments)


def test_outputs_follow_module_dtype():
    prefix = make_prefix().to(torch.bfloat16)

    keys, values = prefix()

    assert keys.dtype == values.dtype == torch.bfloat16
