"""Adapters inside live models: gradients, identity initialisation, deletion and the math at one site."""

import pytest
import torch
from torch.nn import functional

import adapterkit
from adapter_helpers import compute_logits, randomize_parameters
from adapterkit import ArchitectureSpec, InputRef, StackSpec, SublayerSpec
from adapterkit.config import PRESETS


def modules_with_hooks(model):
    """Return the names of the submodules of ``model`` that carry any forward hook or pre-hook."""
    names = []
    for name, module in model.named_modules():
        hook_dicts = (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs,
                      module._forward_pre_hooks_with_kwargs)
        if any(len(hooks) for hooks in hook_dicts):
            names.append(name)
    return names


# -- gradients --------------------------------------------------------------------------------


def test_forward_backward_gradients(tiny_model, input_ids, family, preset):
    model = tiny_model(family)
    bare_parameters = dict(model.named_parameters())
    adapterkit.init(model)
    model.add_adapter("task", preset)
    model.train_adapter("task")
    adapter_parameters = dict(model._adapterkit.modules_of("task").named_parameters())

    logits = model(input_ids=input_ids).logits
    logits.sum().backward()

    assert logits.shape == (2, 3)
    assert not [name for name, p in bare_parameters.items() if p.requires_grad]
    assert not [name for name, p in bare_parameters.items() if p.grad is not None]
    assert not [name for name, p in adapter_parameters.items() if not p.requires_grad]
    assert not [name for name, p in adapter_parameters.items() if p.grad is None]


def test_head_copy_installed(tiny_model):
    model = tiny_model("bert")
    base_head = model.classifier
    adapterkit.init(model)
    model.add_adapter("task")
    model.train_adapter("task")

    assert model.classifier is model._adapterkit.modules_of("task")["head"]["classifier"]
    assert model.classifier is not base_head
    assert torch.equal(model.classifier.weight, base_head.weight)


def test_adapter_changes_logits(tiny_model, input_ids, family, preset):
    model = tiny_model(family)
    bare = compute_logits(model, input_ids)
    adapterkit.init(model)
    model.add_adapter("task", preset, set_active=True)
    randomize_parameters(model._adapterkit.modules_of("task")["methods"]["0"]["layers"])

    assert (compute_logits(model, input_ids) - bare).abs().max() > 1e-3


@pytest.mark.parametrize("init_weights", ["zero_up", "near_identity"])
def test_identity_init_keeps_logits(tiny_model, input_ids, family, preset, init_weights):
    model = tiny_model(family)
    bare = compute_logits(model, input_ids)
    adapterkit.init(model)
    model.add_adapter("task", PRESETS[preset].replace(init_weights=init_weights), set_active=True)

    assert model.active_adapters == ["task"]
    assert (compute_logits(model, input_ids) - bare).abs().max() < 1e-4


def test_inactive_adapter_keeps_logits(tiny_model, input_ids):
    model = tiny_model("bert")
    bare = compute_logits(model, input_ids)
    adapterkit.init(model)
    model.add_adapter("task", "houlsby")
    randomize_parameters(model._adapterkit.modules_of("task")["methods"]["0"]["layers"])

    assert torch.equal(compute_logits(model, input_ids), bare)


# -- deletion ---------------------------------------------------------------------------------


def test_delete_leaves_no_trace(tiny_model, input_ids, family, preset):
    model = tiny_model(family)
    bare_logits = compute_logits(model, input_ids)
    bare_count = sum(p.numel() for p in model.parameters())
    bare_module_names = [name for name, _ in model.named_modules()]
    bare_state_keys = list(model.state_dict())
    adapterkit.init(model)
    model.add_adapter("task", preset)
    model.train_adapter("task")
    randomize_parameters(model._adapterkit.modules_of("task"))
    model(input_ids=input_ids).logits.sum().backward()

    model.delete_adapter("task")

    assert model.adapter_names == []
    assert sum(p.numel() for p in model.parameters()) == bare_count
    assert [name for name, _ in model.named_modules()] == bare_module_names
    assert list(model.state_dict()) == bare_state_keys
    assert modules_with_hooks(model) == []
    assert torch.equal(compute_logits(model, input_ids), bare_logits)


def test_delete_inactive_adapter_keeps_active(tiny_model, input_ids):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("first", "houlsby")
    model.add_adapter("second", "pfeiffer")
    randomize_parameters(model._adapterkit.modules_of("first"), seed=3)
    randomize_parameters(model._adapterkit.modules_of("second"), seed=4)
    model.set_active_adapters("second")
    expected = compute_logits(model, input_ids)

    model.delete_adapter("first")

    assert model.adapter_names == ["second"]
    assert model.active_adapters == ["second"]
    assert torch.equal(compute_logits(model, input_ids), expected)


def test_delete_active_adapter_restores_head(tiny_model, input_ids):
    model = tiny_model("bert")
    base_head = model.classifier
    bare = compute_logits(model, input_ids)
    adapterkit.init(model)
    model.add_adapter("task", set_active=True)
    randomize_parameters(model._adapterkit.modules_of("task")["head"])

    model.delete_adapter("task")

    assert model.classifier is base_head
    assert torch.equal(compute_logits(model, input_ids), bare)


def test_delete_unknown_raises(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task")

    with pytest.raises(ValueError, match="'other'"):
        model.delete_adapter("other")


# -- series and parallel at one site -----------------------------------------------------------


def _capture_feed_forward_site(block):
    """Record, in a dict, the inputs of one BERT block's feed-forward site and the block's output.

    ``h`` is the feed-forward output after its dropout, before any adapter hook runs. ``residual`` is
    the stream the block adds to it (``BertOutput``'s ``input_tensor``). ``block_output`` is the block's
    hidden states.
    """
    seen = {}

    def keep_h(module, args, output):
        seen["h"] = output.detach().clone()

    def keep_residual(module, args, kwargs):
        seen["residual"] = (args[1] if len(args) > 1 else kwargs["input_tensor"]).detach().clone()

    def keep_block_output(module, args, output):
        seen["block_output"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handles = [
        block.output.dropout.register_forward_hook(keep_h, prepend=True),
        block.output.register_forward_pre_hook(keep_residual, with_kwargs=True),
        block.register_forward_hook(keep_block_output),
    ]
    return seen, handles


def _branch(adapter, x, activation):
    """Compute ``scaling * W_up f(W_down x + b_down) + b_up`` from the adapter's weights."""
    down = functional.linear(x, adapter.down_proj.weight, adapter.down_proj.bias)
    up = functional.linear(activation(down), adapter.up_proj.weight, adapter.up_proj.bias)
    return adapter.scaling * up


@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel"])
def test_block_output_by_hand(tiny_model, input_ids, preset):
    model = adapterkit.init(tiny_model("bert"))
    block = model.bert.encoder.layer[0]
    layer_norm = block.output.LayerNorm
    seen, handles = _capture_feed_forward_site(block)
    model.add_adapter("task", preset, set_active=True)
    randomize_parameters(model._adapterkit.modules_of("task")["methods"]["0"]["layers"])
    adapter = model._adapterkit.modules_of("task")["methods"]["0"]["layers"]["0"]["feed_forward"]

    compute_logits(model, input_ids)
    for handle in handles:
        handle.remove()

    h, residual = seen["h"], seen["residual"]
    with torch.no_grad():
        if preset == "pfeiffer":
            adapted = _branch(adapter, layer_norm(h + residual), functional.relu) + h
        elif preset == "houlsby":
            adapted = _branch(adapter, h, functional.silu) + h
        else:
            adapted = _branch(adapter, residual, functional.relu) + h
        expected = layer_norm(adapted + residual)
        without_adapter = layer_norm(h + residual)
    assert torch.allclose(seen["block_output"], expected, atol=1e-5)
    assert (seen["block_output"] - without_adapter).abs().max() > 1e-3


def test_stacked_adapters_run_in_order(tiny_model, input_ids):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("first", "pfeiffer")
    model.add_adapter("second", "pfeiffer")
    randomize_parameters(model._adapterkit.modules_of("first")["methods"]["0"]["layers"], seed=3)
    randomize_parameters(model._adapterkit.modules_of("second")["methods"]["0"]["layers"], seed=4)

    model.set_active_adapters(["first", "second"])
    forward_order = compute_logits(model, input_ids)
    model.set_active_adapters(["second", "first"])
    reverse_order = compute_logits(model, input_ids)
    model.set_active_adapters(["second"])
    second_only = compute_logits(model, input_ids)

    assert not torch.allclose(forward_order, reverse_order)
    assert not torch.allclose(reverse_order, second_only)


def test_leave_out_skips_block(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task", PRESETS["houlsby"].replace(leave_out=(0,)))

    assert list(model._adapterkit.modules_of("task")["methods"]["0"]["layers"]) == ["1"]
    assert sorted(model._adapterkit.sites) == [("sublayer", 1, "attention"), ("sublayer", 1, "feed_forward")]


# -- modes ------------------------------------------------------------------------------------


def test_eval_mode_kept_after_add(tiny_model, input_ids, family):
    model = adapterkit.init(tiny_model(family))
    model.add_adapter("task", PRESETS["houlsby"].replace(dropout=0.5), set_active=True)
    randomize_parameters(model._adapterkit.modules_of("task")["methods"]["0"]["layers"])

    assert model.training is False
    assert not [name for name, module in model.named_modules() if module.training]
    assert torch.equal(compute_logits(model, input_ids), compute_logits(model, input_ids))


def test_train_mode_applies_adapter_dropout(tiny_model, input_ids):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task", PRESETS["houlsby"].replace(dropout=0.5), set_active=True)
    randomize_parameters(model._adapterkit.modules_of("task")["methods"]["0"]["layers"])

    model.train()
    torch.manual_seed(5)
    first = compute_logits(model, input_ids)
    second = compute_logits(model, input_ids)

    assert not torch.equal(first, second)


# -- families without a built-in description ---------------------------------------------------


GPT_NEOX_SPEC = ArchitectureSpec(stacks=(StackSpec(
    layers="layers",
    attention=SublayerSpec(output="post_attention_dropout", residual=InputRef("input_layernorm"), layer_norm=None),
    feed_forward=SublayerSpec(output="post_mlp_dropout", residual=InputRef("post_attention_layernorm"),
                              layer_norm=None),
),))


def test_unknown_family_raises(tiny_model):
    model = tiny_model("gpt_neox")

    with pytest.raises(NotImplementedError, match="gpt_neox") as error:
        adapterkit.init(model)
    message = str(error.value)
    for family in ("bert", "roberta", "distilbert", "mpnet", "gpt2", "llama"):
        assert family in message
    assert "ArchitectureSpec" in message


@pytest.mark.parametrize("preset", ["houlsby", "parallel"])
def test_user_spec_works(tiny_model, input_ids, preset):
    model = tiny_model("gpt_neox")
    bare_parameters = dict(model.base_model.named_parameters())
    bare = compute_logits(model, input_ids)
    adapterkit.init(model, architecture=GPT_NEOX_SPEC)
    model.add_adapter("task", preset)
    model.train_adapter("task")
    randomize_parameters(model._adapterkit.modules_of("task")["methods"]["0"]["layers"])

    adapted = model(input_ids=input_ids).logits
    adapted.sum().backward()

    assert (adapted.detach() - bare).abs().max() > 1e-3
    assert not [name for name, p in bare_parameters.items() if p.grad is not None]
    assert not [name for name, p in model._adapterkit.modules_of("task")["methods"]["0"]["layers"].named_parameters()
                if p.grad is None]


def test_spec_with_missing_module_raises(tiny_model):
    spec = ArchitectureSpec(stacks=(StackSpec(
        layers="encoder.layer",
        attention=GPT_NEOX_SPEC.stacks[0].attention,
        feed_forward=SublayerSpec(output="no_such.dropout", residual=InputRef("output", 1, "input_tensor"),
                                  layer_norm=None),
    ),))
    model = adapterkit.init(tiny_model("bert"), architecture=spec)

    with pytest.raises(ValueError, match="no_such.dropout"):
        model.add_adapter("task", "pfeiffer")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prefix_mlp_runs_once_per_forward(tiny_model, input_ids, no_dropout, family, monkeypatch):
    from adapterkit import injection
    from adapterkit.methods.prefix import PrefixTuning

    model = adapterkit.init(tiny_model(family, **no_dropout(family)))
    model.add_adapter("p", adapterkit.PrefixTuningConfig(prefix_length=3))
    model.train_adapter("p")
    (prefix,) = [m for m in model._adapterkit.modules_of("p").modules() if isinstance(m, PrefixTuning)]
    assert prefix.n_layers == 2
    calls = []
    prefix.mlp[0].register_forward_hook(lambda module, args, output: calls.append(1))

    def gradients():
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids).logits.square().sum().backward()
        return {name: p.grad.clone() for name, p in prefix.named_parameters()}

    shared = gradients()
    assert len(calls) == 1
    with torch.no_grad():
        model(input_ids=input_ids)
    assert len(calls) == 2
    # Each layer computes its own slice of the MLP's output instead.
    monkeypatch.setattr(injection, "_shared_output", lambda outputs_by_module, module: None)
    alone = gradients()
    assert len(calls) == 4
    assert shared.keys() == alone.keys()
    assert all(grad.abs().sum() > 0 for grad in shared.values())
    for name in shared:
        torch.testing.assert_close(shared[name], alone[name], msg=name)
