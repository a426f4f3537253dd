"""AdapterFusion (Fuse) and Split on tiny models.

Expected values never come from adapterkit's composition or fusion code. Most come from a bare
model whose sublayer outputs forward hooks replace with a computation by hand. The hooks use plain
torch on the hooked tensors, the adapters' own ``Bottleneck`` modules and the fusion layers' weight
tensors. Others come from single-adapter runs and from the outputs that AdapterHub ``adapters``
1.3.0 computed for the committed fixtures.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from adapter_helpers import randomize_parameters, word_tokenizer
from safetensors.torch import load_file

import adapterkit
from adapterkit import Average, BatchSplit, BottleneckConfig, Fuse, Parallel, Split, Stack
from adapterkit.composition import block_from_dict, block_to_dict
from adapterkit.config import FusionConfig

FAMILIES = ("bert", "roberta", "gpt2", "llama", "t5")
TOLERANCE = 1e-5
FIXTURES = Path(__file__).parent / "fixtures" / "adapters"


# -- building models ----------------------------------------------------------------------------------

def fused_model(tiny_model, family, names=("a", "b"), config="pfeiffer", **changes):
    """Return a tiny classifier with adapters ``names`` whose modules, not heads, are randomised.

    The heads stay copies of the base head, so a bare model with reference hooks has the same head.
    """
    model = adapterkit.init(tiny_model(family, **changes))
    for seed, name in enumerate(names):
        model.add_adapter(name, config)
        randomize_parameters(model._adapterkit.modules_of(name)["methods"], std=0.1, seed=10 + seed)
    return model


def add_random_fusion(model, fuse, config="dynamic", seed=30):
    """Add a fusion over ``fuse`` with randomised layers (its head stays the base head) and return its name."""
    name = model.add_adapter_fusion(fuse, config=config)
    randomize_parameters(model.adapterkit[f"fusion_{name}"]["layers"], std=0.3, seed=seed)
    return name


@torch.no_grad()
def logits_with(model, active, input_ids):
    model.set_active_adapters(active)
    return model(input_ids=input_ids).logits


# -- the hand-built reference ---------------------------------------------------------------------------

def bottleneck_module(model, name, key):
    """Return adapter ``name``'s ``Bottleneck`` at sublayer site ``key``, or ``None``."""
    layers = model._adapterkit.modules_of(name)["methods"]["0"]["layers"]
    index, sublayer = str(key[1]), key[2]
    if index not in layers or sublayer not in layers[index]:
        return None
    return layers[index][sublayer]


def fusion_module(model, fusion, key):
    return model.adapterkit[f"fusion_{fusion}"]["layers"][str(key[1])][key[2]]


def adapter_input(config, h, r, layer_norm):
    """Return ``(input, residual)`` of a series bottleneck adapter, as BottleneckConfig documents them."""
    x = h
    if config.original_ln_before:
        x = h + r
        if layer_norm is not None:
            x = layer_norm(x)
    return x, (h if config.residual_before_ln else x)


def run_adapter(model, name, h, r, layer_norm, key):
    """Return the sublayer output after adapter ``name`` alone (``h`` where it has no module)."""
    module = bottleneck_module(model, name, key)
    if module is None:
        return h
    x, residual = adapter_input(model.adapter_config(name), h, r, layer_norm)
    return residual + module(x, torch.zeros_like(x))


def attention_by_hand(layer, query, values, residual):
    """Compute the dynamic or static fusion: ``residual + sum_j softmax_j(q . k_j) v_j`` with plain torch."""
    q = query @ layer.query.weight.T + layer.query.bias
    keys = [value @ layer.key.weight.T + layer.key.bias for value in values]
    projected = [value @ layer.value.weight.T for value in values] if layer.value is not None else values
    scores = torch.stack([(q * k).sum(dim=-1) for k in keys], dim=-1)
    weights = torch.softmax(scores, dim=-1)
    context = sum(weights[..., j:j + 1] * projected[j] for j in range(len(values)))
    return residual + context


def run_child(model, child, h, r, layer_norm, key):
    """Return the sublayer output after ``child`` (an adapter name or a Stack of names)."""
    names = [child] if isinstance(child, str) else list(child.children)
    for name in names:
        h = run_adapter(model, name, h, r, layer_norm, key)
    return h


def fuse_by_hand(model, fuse, h, r, layer_norm, key):
    """Return the sublayer output after ``fuse``: children run alone, values are their changes to the residual."""
    leaves = [name for child in fuse.children for name in ([child] if isinstance(child, str) else child.children)]
    last = [name for name in leaves if bottleneck_module(model, name, key) is not None][-1]
    x, residual = adapter_input(model.adapter_config(last), h, r, layer_norm)
    values = [run_child(model, child, h, r, layer_norm, key) - residual for child in fuse.children]
    return attention_by_hand(fusion_module(model, fuse.name, key), x, values, residual)


def first_tensor(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def with_first_tensor(output, tensor):
    if isinstance(output, torch.Tensor):
        return tensor
    return (tensor, *output[1:])


@torch.no_grad()
def reference_logits(model, input_ids, compute, **forward_options):
    """Run the bare model with every sublayer site's output replaced by ``compute(key, h, r, layer_norm)``.

    The hooks read the sublayer output and the residual input at the places the architecture
    description names. No adapter is active, so nothing of adapterkit runs.
    """
    model.set_active_adapters(None)
    handles = []
    for key, site in model._adapterkit.sites.items():
        if key[0] != "sublayer":
            continue
        captured = {}

        def capture(module, args, kwargs, site=site, captured=captured):
            reference = site.residual_input
            captured["r"] = args[reference.position] if len(args) > reference.position else kwargs[reference.keyword]

        def replace(module, args, output, key=key, site=site, captured=captured):
            h = first_tensor(output)
            return with_first_tensor(output, compute(key, h, captured["r"], site.layer_norm))

        handles.append(site.residual_module.register_forward_pre_hook(capture, with_kwargs=True))
        handles.append(site.output_module.register_forward_hook(replace))
    try:
        return model(input_ids=input_ids, **forward_options).logits
    finally:
        for handle in handles:
            handle.remove()


# -- running Fuse -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("count", (2, 3))
def test_fusion_matches_hand_reference(tiny_model, tiny_inputs, family, count):
    names = ("a", "b", "c")[:count]
    model = fused_model(tiny_model, family, names)
    fuse = Fuse(*names)
    add_random_fusion(model, fuse)
    input_ids = tiny_inputs(family, batch_size=2)

    fused = logits_with(model, fuse, input_ids)

    expected = reference_logits(model, input_ids, lambda key, h, r, ln: fuse_by_hand(model, fuse, h, r, ln, key))
    torch.testing.assert_close(fused, expected, atol=TOLERANCE, rtol=0)
    # Far above the tolerance, so matching the reference shows that the fusion ran. The random heads give small logits.
    for name in names:
        assert (fused - logits_with(model, [name], input_ids)).abs().max() > 10 * TOLERANCE
    assert (fused - logits_with(model, None, input_ids)).abs().max() > 10 * TOLERANCE


def test_fusion_houlsby_covers_attention_sites(tiny_model, tiny_inputs):
    # Houlsby adapters sit after attention and feed-forward and read the sublayer output before the norm.
    model = fused_model(tiny_model, "bert", config="houlsby")
    fuse = Fuse("a", "b")
    name = add_random_fusion(model, fuse)
    input_ids = tiny_inputs("bert", batch_size=2)

    fused = logits_with(model, fuse, input_ids)

    expected = reference_logits(model, input_ids, lambda key, h, r, ln: fuse_by_hand(model, fuse, h, r, ln, key))
    torch.testing.assert_close(fused, expected, atol=TOLERANCE, rtol=0)
    sublayers = {sublayer for places in model.adapterkit[f"fusion_{name}"]["layers"].values() for sublayer in places}
    assert sublayers == {"attention", "feed_forward"}


def test_fusion_at_one_site_from_captured_tensors(tiny_model, tiny_inputs):
    """The fused output of the only adapted site, computed from tensors captured in single-adapter runs."""
    config = BottleneckConfig(mh_adapter=False, output_adapter=True, original_ln_before=True, leave_out=(0,))
    model = fused_model(tiny_model, "bert", config=config)
    fuse = Fuse("a", "b")
    name = add_random_fusion(model, fuse)
    site = model._adapterkit.sites[("sublayer", 1, "feed_forward")]
    input_ids = tiny_inputs("bert", batch_size=2)
    captured = {}

    def capture_output(module, args, output):
        captured["output"] = first_tensor(output)

    def capture_residual(module, args, kwargs):
        reference = site.residual_input
        captured["residual"] = args[reference.position] if len(args) > reference.position else kwargs[reference.keyword]

    handles = [site.output_module.register_forward_hook(capture_output),
               site.residual_module.register_forward_pre_hook(capture_residual, with_kwargs=True)]
    logits_with(model, None, input_ids)
    h, r = captured["output"], captured["residual"]
    logits_with(model, ["a"], input_ids)
    output_a = captured["output"]
    logits_with(model, ["b"], input_ids)
    output_b = captured["output"]
    fused_logits = logits_with(model, fuse, input_ids)
    fused_output = captured["output"]
    for handle in handles:
        handle.remove()

    layer = model.adapterkit[f"fusion_{name}"]["layers"]["1"]["feed_forward"]
    query = site.layer_norm(h + r)
    values = torch.stack([output_a - h, output_b - h], dim=2)  # (batch, seq, 2, hidden)
    q = torch.einsum("bsh,oh->bso", query, layer.query.weight) + layer.query.bias
    k = torch.einsum("bsjh,oh->bsjo", values, layer.key.weight) + layer.key.bias
    v = torch.einsum("bsjh,oh->bsjo", values, layer.value.weight)
    probabilities = torch.einsum("bsh,bsjh->bsj", q, k).softmax(dim=-1)
    expected_output = h + torch.einsum("bsj,bsjh->bsh", probabilities, v)

    torch.testing.assert_close(fused_output, expected_output, atol=TOLERANCE, rtol=0)
    assert (probabilities - 0.5).abs().max() > 0.05  # the attention does prefer one adapter somewhere
    model.set_active_adapters(None)
    handle = site.output_module.register_forward_hook(lambda m, a, o: expected_output)
    with torch.no_grad():
        expected_logits = model(input_ids=input_ids).logits
    handle.remove()
    torch.testing.assert_close(fused_logits, expected_logits, atol=TOLERANCE, rtol=0)


def test_static_fusion_matches_reference(tiny_model, tiny_inputs):
    model = fused_model(tiny_model, "llama")
    fuse = Fuse("a", "b")
    add_random_fusion(model, fuse, config="static")
    input_ids = tiny_inputs("llama", batch_size=2)
    assert model.adapterkit["fusion_a,b"]["layers"]["0"]["feed_forward"].value is None

    fused = logits_with(model, fuse, input_ids)

    expected = reference_logits(model, input_ids, lambda key, h, r, ln: fuse_by_hand(model, fuse, h, r, ln, key))
    torch.testing.assert_close(fused, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("family", ("bert", "gpt2", "t5"))
def test_stack_after_fuse_matches_reference(tiny_model, tiny_inputs, family):
    model = fused_model(tiny_model, family, ("a", "b", "c"))
    fuse = Fuse("a", "b")
    add_random_fusion(model, fuse)
    input_ids = tiny_inputs(family, batch_size=2)

    stacked = logits_with(model, Stack(fuse, "c"), input_ids)

    def compute(key, h, r, layer_norm):
        fused = fuse_by_hand(model, fuse, h, r, layer_norm, key)
        return run_adapter(model, "c", fused, r, layer_norm, key)

    torch.testing.assert_close(stacked, reference_logits(model, input_ids, compute), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("family", ("bert", "llama", "t5"))
def test_fuse_over_stack_matches_reference(tiny_model, tiny_inputs, family):
    model = fused_model(tiny_model, family, ("a", "b", "c"))
    fuse = Fuse(Stack("a", "b"), "c")
    name = add_random_fusion(model, fuse)
    input_ids = tiny_inputs(family, batch_size=2)
    assert name == "a+b,c"

    fused = logits_with(model, fuse, input_ids)

    expected = reference_logits(model, input_ids, lambda key, h, r, ln: fuse_by_hand(model, fuse, h, r, ln, key))
    torch.testing.assert_close(fused, expected, atol=TOLERANCE, rtol=0)


def test_fusion_with_leave_out_fuses_present_adapters(tiny_model, tiny_inputs):
    # Adapter b has no module in block 0, so block 0's fusion attends over a alone.
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("a", "pfeiffer")
    model.add_adapter("b", BottleneckConfig(original_ln_before=True, leave_out=(0,)))
    for seed, name in enumerate("ab"):
        randomize_parameters(model._adapterkit.modules_of(name)["methods"], std=0.1, seed=10 + seed)
    fuse = Fuse("a", "b")
    add_random_fusion(model, fuse)
    input_ids = tiny_inputs("bert", batch_size=2)

    def compute(key, h, r, layer_norm):
        present = Fuse(*[n for n in "ab" if bottleneck_module(model, n, key) is not None], name="a,b")
        return fuse_by_hand(model, present, h, r, layer_norm, key)

    fused = logits_with(model, fuse, input_ids)

    torch.testing.assert_close(fused, reference_logits(model, input_ids, compute), atol=TOLERANCE, rtol=0)


def test_fusion_uses_its_own_head(tiny_model, tiny_inputs):
    model = fused_model(tiny_model, "bert")
    name = add_random_fusion(model, Fuse("a", "b"))
    head = model.adapterkit[f"fusion_{name}"]["head"]["classifier"]

    model.set_active_adapters(Fuse("a", "b"))
    assert model.classifier is head
    model.set_active_adapters(Stack(Fuse("a", "b"), "a"))
    assert model.classifier is model._adapterkit.modules_of("a")["head"]["classifier"]
    model.set_active_adapters(Stack("a", Fuse("a", "b")))
    assert model.classifier is head


def test_parallel_branch_with_fusion(tiny_model, tiny_inputs):
    # Each branch uses the head of its own last child: the fusion's head for the first one.
    model = fused_model(tiny_model, "bert")
    fuse = Fuse("a", "b")
    name = add_random_fusion(model, fuse)
    randomize_parameters(model.adapterkit[f"fusion_{name}"]["head"], std=0.2, seed=40)
    input_ids = tiny_inputs("bert", batch_size=2)
    alone_fused = logits_with(model, fuse, input_ids)
    alone_b = logits_with(model, ["b"], input_ids)

    parallel = logits_with(model, Parallel(Stack(fuse), "b"), input_ids)

    torch.testing.assert_close(parallel[:2], alone_fused, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(parallel[2:], alone_b, atol=TOLERANCE, rtol=0)


def test_generate_with_fusion_uses_cache_correctly(tiny_inputs):
    # With the KV cache each decoding step reads one new position and must match a full recomputation.
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=1)
    model = adapterkit.init(transformers.GPT2LMHeadModel(config).eval())
    for seed, name in enumerate("ab"):
        model.add_adapter(name, "pfeiffer")
        randomize_parameters(model._adapterkit.modules_of(name)["methods"], std=0.3, seed=10 + seed)
    add_random_fusion(model, Fuse("a", "b"))
    model.set_active_adapters(Fuse("a", "b"))
    input_ids = tiny_inputs("gpt2", batch_size=2, length=5)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)

    cached = model.generate(input_ids=input_ids, use_cache=True, **settings)
    recomputed = model.generate(input_ids=input_ids, use_cache=False, **settings)

    assert cached.tolist() == recomputed.tolist()
    model.set_active_adapters(None)
    assert model.generate(input_ids=input_ids, **settings).tolist() != cached.tolist()


# -- validation ---------------------------------------------------------------------------------------

DISALLOWED = [
    (Parallel(Fuse("a", "b"), "c"), "Fuse cannot be nested inside Parallel"),
    (Average(Fuse("a", "b"), "c"), "Fuse cannot be nested inside Average"),
    (BatchSplit(Fuse("a", "b"), "c", batch_sizes=[1, 1]), "Fuse cannot be nested inside BatchSplit"),
    (Split(Fuse("a", "b"), "c", splits=[3, 4]), "Fuse cannot be nested inside Split"),
    (Fuse(Fuse("a", "b"), "c"), "Fuse cannot be nested inside Fuse"),
    (Fuse(Average("a", "b"), "c"), "Average cannot be nested inside Fuse"),
    (Fuse(Split("a", "b", splits=[3, 4]), "c"), "Split cannot be nested inside Fuse"),
    (Fuse(Parallel("a", "b"), "c"), "Parallel cannot be nested inside Fuse"),
    (Fuse(BatchSplit("a", "b", batch_sizes=[1, 1]), "c"), "BatchSplit cannot be nested inside Fuse"),
]


@pytest.mark.parametrize(("block", "message"), DISALLOWED, ids=[message for _, message in DISALLOWED])
def test_disallowed_nesting_raises_at_activation(tiny_model, block, message):
    model = fused_model(tiny_model, "bert", ("a", "b", "c"))
    model.add_adapter_fusion(Fuse("a", "b"))
    model.set_active_adapters("a")

    with pytest.raises(ValueError, match=message):
        model.set_active_adapters(block)

    assert model.active_adapters == ["a"]


def test_unknown_fusion_raises_at_activation(tiny_model):
    model = fused_model(tiny_model, "bert")
    with pytest.raises(ValueError, match=r"names no fusion of this model.*add_adapter_fusion"):
        model.set_active_adapters(Fuse("a", "b"))
    model.add_adapter_fusion(Fuse("a", "b"), name="mine")
    with pytest.raises(ValueError, match="fusions: 'mine'"):
        model.set_active_adapters(Fuse("b", "a"))


@pytest.mark.parametrize(("method", "part"), [("lora", "lora part (LoRAConfig)"), ("ia3", "ia3 part (IA3Config)"),
                                              ("prefix_tuning", "prefix_tuning part (PrefixTuningConfig)")])
def test_non_bottleneck_child_raises(tiny_model, method, part):
    model = fused_model(tiny_model, "bert")
    model.add_adapter("other", method)

    with pytest.raises(ValueError, match=rf"Adapter 'other' has a {re.escape(part)}"):
        model.add_adapter_fusion(Fuse("a", "other"))
    with pytest.raises(ValueError, match=rf"Adapter 'other' has a {re.escape(part)}"):
        model.set_active_adapters(Stack("a", Fuse("a", "other")))
    assert model.adapter_fusions == {}


def test_mixed_residuals_raise(tiny_model):
    model = fused_model(tiny_model, "bert")
    model.add_adapter("custom", BottleneckConfig(original_ln_before=True, residual_before_ln=False))
    with pytest.raises(ValueError, match="different tensors"):
        model.add_adapter_fusion(Fuse("a", "custom"))


def test_fusion_names(tiny_model):
    model = fused_model(tiny_model, "bert")
    assert model.add_adapter_fusion(["a", "b"]) == "a,b"
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter_fusion("a,b")
    with pytest.raises(ValueError, match="name of an adapter"):
        model.add_adapter_fusion(Fuse("a", "b"), name="a")
    with pytest.raises(ValueError, match="Invalid fusion name"):
        model.add_adapter_fusion(Fuse("a", "b"), name="a.b")
    assert model.add_adapter_fusion(Fuse("b", "a"), name="reversed") == "reversed"
    assert model.adapter_fusions == {"a,b": Fuse("a", "b"), "reversed": Fuse("b", "a", name="reversed")}


def test_delete_fused_adapter_raises(tiny_model, tiny_inputs):
    model = fused_model(tiny_model, "bert")
    input_ids = tiny_inputs("bert", batch_size=2)
    bare = logits_with(model, None, input_ids)
    model.add_adapter_fusion(Fuse("a", "b"), set_active=True)

    with pytest.raises(ValueError, match=r"fused by 'a,b'; delete_adapter_fusion\('a,b'\) first"):
        model.delete_adapter("a")
    model.delete_adapter_fusion(Fuse("a", "b"))

    assert model.active_block is None
    assert "fusion_a,b" not in model.adapterkit
    model.delete_adapter("a")
    model.delete_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, bare, atol=0, rtol=0)


def test_summary_lists_fusion(tiny_model):
    model = fused_model(tiny_model, "bert")
    model.add_adapter_fusion(Fuse("a", "b"), set_active=True)
    rows = {row["name"]: row for row in model.adapter_summary(as_dict=True)}
    layer_parameters = 2 * (32 * 32 + 32) + 32 * 32  # query, key (with biases) and value, per site
    head_parameters = sum(p.numel() for p in model.classifier.parameters())
    assert rows["a,b"]["architecture"] == "fusion"
    assert rows["a,b"]["parameters"] == 2 * layer_parameters + head_parameters
    assert rows["a,b"]["active"] is True


def test_deepcopy_keeps_fusion(tiny_model, tiny_inputs):
    model = fused_model(tiny_model, "bert")
    add_random_fusion(model, Fuse("a", "b"))
    input_ids = tiny_inputs("bert", batch_size=2)
    expected = logits_with(model, Fuse("a", "b"), input_ids)

    copied = copy.deepcopy(model)
    with torch.no_grad():
        model.adapterkit["fusion_a,b"]["layers"]["0"]["feed_forward"].query.weight.zero_()

    with torch.no_grad():
        torch.testing.assert_close(copied(input_ids=input_ids).logits, expected, atol=0, rtol=0)
    assert copied._adapterkit.fusions["a,b"].block == Fuse("a", "b")


def test_block_dict_round_trip():
    block = Stack(Fuse(Stack("a", "b"), "c", name="f"), Split("a", Average("b", "c", weights=[1, 3]), splits=[2, 5]))
    data = block_to_dict(block)
    assert json.loads(json.dumps(data)) == data
    assert block_from_dict(data) == block


# -- training -----------------------------------------------------------------------------------------

def fusion_gradients(model, input_ids, labels):
    model.zero_grad(set_to_none=True)
    model(input_ids=input_ids, labels=labels).loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()
            if parameter.grad is not None}


@pytest.mark.parametrize("family", ("bert", "t5"))
def test_gradients_reach_only_fusion(tiny_model, tiny_inputs, no_dropout, family):
    model = fused_model(tiny_model, family, **no_dropout(family))
    add_random_fusion(model, Fuse("a", "b"))
    model.train_adapter_fusion(Fuse("a", "b"))
    model.train()

    gradients = fusion_gradients(model, tiny_inputs(family, batch_size=3), torch.tensor([0, 1, 2]))

    # The fusion's head is also the model's head attribute, so compare parameters, not their first names.
    fusion = model.adapterkit["fusion_a,b"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    with_gradient = {id(p) for p in model.parameters() if p.grad is not None}
    assert trainable == {id(p) for p in fusion.parameters()}
    assert with_gradient == trainable
    assert len(gradients) == len(trainable)
    for name, parameter in fusion["layers"].named_parameters():
        assert parameter.grad.abs().max() > 0, name
    assert all(p.grad.abs().max() > 0 for p in fusion["head"].parameters())


def test_train_fusion_can_unfreeze_adapters(tiny_model):
    model = fused_model(tiny_model, "bert")
    model.add_adapter_fusion(Fuse("a", "b"))
    model.train_adapter_fusion(Fuse("a", "b"), unfreeze_adapters=True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = [*model.adapterkit["fusion_a,b"].parameters(),
                *model._adapterkit.modules_of("a")["methods"].parameters(),
                *model._adapterkit.modules_of("b")["methods"].parameters()]
    assert trainable == {id(p) for p in expected}


def test_regularization_pulls_value_to_identity(tiny_model, tiny_inputs, no_dropout):
    models = []
    for config in ("dynamic", FusionConfig(regularization=False)):
        model = fused_model(tiny_model, "bert", **no_dropout("bert"))
        add_random_fusion(model, Fuse("a", "b"), config=config)
        model.train_adapter_fusion(Fuse("a", "b"))
        model.train()
        models.append(model)
    input_ids, labels = tiny_inputs("bert", batch_size=2), torch.tensor([0, 2])

    regularized, plain = (fusion_gradients(model, input_ids, labels) for model in models)

    key = "adapterkit.fusion_a,b.layers.1.feed_forward.value.weight"
    weight = dict(models[0].named_parameters())[key].detach()
    expected = plain[key] + 0.02 * (weight - torch.eye(32))
    torch.testing.assert_close(regularized[key], expected, atol=1e-6, rtol=0)
    other = "adapterkit.fusion_a,b.layers.1.feed_forward.query.weight"
    torch.testing.assert_close(regularized[other], plain[other], atol=0, rtol=0)


def test_temperature_anneals_in_training_only(tiny_model, tiny_inputs, no_dropout):
    model = fused_model(tiny_model, "bert", **no_dropout("bert"))
    add_random_fusion(model, Fuse("a", "b"), config=FusionConfig(temperature=True))
    layer = model.adapterkit["fusion_a,b"]["layers"]["0"]["feed_forward"]
    input_ids = tiny_inputs("bert", batch_size=2)
    first = logits_with(model, Fuse("a", "b"), input_ids)
    torch.testing.assert_close(logits_with(model, Fuse("a", "b"), input_ids), first, atol=0, rtol=0)
    assert layer.temperature() == 50.0

    model.train_adapter_fusion(Fuse("a", "b"))
    model.train()
    for _ in range(3):
        model(input_ids=input_ids, labels=torch.tensor([0, 1])).loss.backward()
    model.eval()

    assert layer.temperature() == pytest.approx(50.0 - 3 * 0.05)
    later = logits_with(model, Fuse("a", "b"), input_ids)
    torch.testing.assert_close(logits_with(model, Fuse("a", "b"), input_ids), later, atol=0, rtol=0)
    assert (later - first).abs().max() > 0


@pytest.mark.parametrize("family", ("bert", "llama"))
@pytest.mark.parametrize("reentrant", (True, False))
def test_fusion_under_checkpointing(tiny_model, tiny_inputs, no_dropout, family, reentrant):
    model = fused_model(tiny_model, family, ("a", "b", "c"), **no_dropout(family))
    add_random_fusion(model, Fuse("a", "b"))
    block = Stack(Fuse("a", "b"), "c")
    model.train_adapter_fusion(block)
    model.train()
    input_ids, labels = tiny_inputs(family, batch_size=3), torch.tensor([0, 1, 2])
    expected = fusion_gradients(model, input_ids, labels)

    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5; 4.57 has only the older name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = fusion_gradients(model, input_ids, labels)

    assert expected and set(checkpointed) == set(expected)
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=TOLERANCE, rtol=0, msg=name)


def fusion_tokenizer():
    """A word-level tokenizer over a few words, see ``adapter_helpers.word_tokenizer``."""
    return word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "movie", "film", "plot", "very"])


def test_fit_trains_fusion(tiny_model, no_dropout):
    model = fused_model(tiny_model, "bert", **no_dropout("bert"))
    model.add_adapter_fusion(Fuse("a", "b"))
    model.train_adapter_fusion(Fuse("a", "b"))
    before = {id(p): p.detach().clone() for p in model.parameters()}
    texts = ["good movie", "bad film", "very good plot", "bad plot", "good film", "very bad movie"]
    labels = ["pos", "neg", "pos", "neg", "pos", "neg"]

    model.fit(texts, labels, tokenizer=fusion_tokenizer(), epochs=2, batch_size=2, learning_rate=1e-2, progress=False)

    # Resizing the head to two labels creates new head parameters, which count as changed.
    changed = {id(p) for p in model.parameters() if id(p) not in before or not torch.equal(p.detach(), before[id(p)])}
    fusion = model.adapterkit["fusion_a,b"]
    assert changed == {id(p) for p in fusion.parameters()}
    entry = model._adapterkit.fusions["a,b"]
    assert entry.labels == ["neg", "pos"]
    assert entry.head_trained
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model._adapterkit.entries["a"].labels is None


def test_fit_trains_fusion_under_stack(tiny_model, no_dropout):
    """Stack(Fuse(a, b), c) uses c's head: fit trains the fusion layers and that head, not c's adapter."""
    model = fused_model(tiny_model, "bert", ("a", "b", "c"), **no_dropout("bert"))
    model.add_adapter_fusion(Fuse("a", "b"))
    model.train_adapter_fusion(Stack(Fuse("a", "b"), "c"))
    before = {id(p): p.detach().clone() for p in model.parameters()}
    texts = ["good movie", "bad film", "very good plot", "bad plot", "good film", "very bad movie"]
    labels = ["pos", "neg", "pos", "neg", "pos", "neg"]

    model.fit(texts, labels, tokenizer=fusion_tokenizer(), epochs=2, batch_size=2, learning_rate=1e-2, progress=False)

    changed = {id(p) for p in model.parameters() if id(p) not in before or not torch.equal(p.detach(), before[id(p)])}
    fusion_layers = {id(p) for name, p in model.adapterkit["fusion_a,b"].named_parameters()
                     if not name.startswith("head.")}
    c_head = {id(p) for p in model._adapterkit.head_modules("c").parameters()}
    assert fusion_layers <= changed
    assert changed == fusion_layers | c_head
    assert model._adapterkit.entries["c"].labels == ["neg", "pos"]


# -- saving and loading -------------------------------------------------------------------------------

def saved_pair(tiny_model, tmp_path, adapter_format, fusion_format, family="bert"):
    """Save randomised adapters and a fusion with labels, load them into a fresh model and return both models."""
    model = fused_model(tiny_model, family)
    name = add_random_fusion(model, Fuse("a", "b"))
    randomize_parameters(model.adapterkit[f"fusion_{name}"]["head"], std=0.2, seed=40)
    model._adapterkit.set_labels(name, ["x", "y", "z"])
    for adapter in ("a", "b"):
        model.save_adapter(tmp_path / adapter, adapter, format=adapter_format)
    model.save_adapter_fusion(tmp_path / "fusion", Fuse("a", "b"), format=fusion_format)

    loaded = adapterkit.init(tiny_model(family))
    for adapter in ("a", "b"):
        loaded.load_adapter(tmp_path / adapter, set_active=False)
    assert loaded.load_adapter_fusion(tmp_path / "fusion") == name
    return model, loaded


@pytest.mark.parametrize(("adapter_format", "fusion_format"), [("adapterkit", "adapterkit"), ("adapters", "adapters")])
def test_save_load_round_trip(tiny_model, tiny_inputs, tmp_path, adapter_format, fusion_format):
    model, loaded = saved_pair(tiny_model, tmp_path, adapter_format, fusion_format)
    input_ids = tiny_inputs("bert", batch_size=2)

    expected = logits_with(model, Fuse("a", "b"), input_ids)
    with torch.no_grad():
        actual = loaded(input_ids=input_ids).logits

    assert loaded.active_block == Fuse("a", "b")
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
    assert loaded.config.id2label == {0: "x", 1: "y", 2: "z"}
    assert not any(p.requires_grad for p in loaded.adapterkit["fusion_a,b"].parameters())


def test_adapters_format_files(tiny_model, tmp_path):
    saved_pair(tiny_model, tmp_path, "adapters", "adapters")
    description = json.loads((tmp_path / "fusion" / "adapter_fusion_config.json").read_text(encoding="utf-8"))
    weights = torch.load(tmp_path / "fusion" / "pytorch_model_adapter_fusion.bin", weights_only=True)

    assert description["adapter_names"] == ["a", "b"]
    assert description["name"] == "a,b"
    assert description["config"] == FusionConfig().to_dict()
    assert sorted(weights) == sorted(f"bert.encoder.layer.{i}.output.adapter_fusion_layer.a,b.{part}"
                                     for i in (0, 1) for part in ("query.weight", "query.bias", "key.weight",
                                                                  "key.bias", "value.weight"))
    head = json.loads((tmp_path / "fusion" / "head_config.json").read_text(encoding="utf-8"))
    assert head["label2id"] == {"x": 0, "y": 1, "z": 2}


def test_native_round_trip_over_stack(tiny_model, tiny_inputs, tmp_path):
    model = fused_model(tiny_model, "gpt2", ("a", "b", "c"))
    add_random_fusion(model, Fuse(Stack("a", "b"), "c"), config=FusionConfig(temperature=True, residual_before=True))
    input_ids = tiny_inputs("gpt2", batch_size=2)
    model.train_adapter_fusion(Fuse(Stack("a", "b"), "c"))
    model.train()
    model(input_ids=input_ids)
    model.eval()
    expected = logits_with(model, Fuse(Stack("a", "b"), "c"), input_ids)
    for adapter in "abc":
        model.save_adapter(tmp_path / adapter, adapter)
    model.save_adapter_fusion(tmp_path / "fusion", "a+b,c")
    with pytest.raises(ValueError, match="fusions of single adapters only"):
        model.save_adapter_fusion(tmp_path / "other", "a+b,c", format="adapters")

    loaded = adapterkit.init(tiny_model("gpt2"))
    for adapter in "abc":
        loaded.load_adapter(tmp_path / adapter, set_active=False)
    loaded.load_adapter_fusion(tmp_path / "fusion", load_as="again")

    assert loaded.active_block == Fuse(Stack("a", "b"), "c", name="again")
    assert loaded.adapterkit["fusion_again"]["layers"]["0"]["feed_forward"].temperature() == pytest.approx(49.95)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, atol=1e-6, rtol=0)


def test_load_fusion_needs_its_adapters(tiny_model, tmp_path):
    model = fused_model(tiny_model, "bert")
    model.add_adapter_fusion(Fuse("a", "b"))
    model.save_adapter_fusion(tmp_path / "fusion", "a,b")
    loaded = fused_model(tiny_model, "bert", ("a",))
    with pytest.raises(ValueError, match=r"fuses 'b'.*load those adapters first"):
        loaded.load_adapter_fusion(tmp_path / "fusion")
    with pytest.raises(ValueError, match="load_adapter_fusion"):
        loaded.load_adapter(tmp_path / "fusion")
    assert loaded.adapter_fusions == {}


def load_fixture_fusion(fixture_folder):
    model = adapterkit.init(transformers.BertModel.from_pretrained(FIXTURES / "bert" / "base",
                                                                   attn_implementation="eager").eval())
    for adapter in ("fuse_a", "fuse_b"):
        model.load_adapter(fixture_folder / adapter, set_active=False)
    name = model.load_adapter_fusion(fixture_folder / "fusion")
    return model, name


@pytest.mark.parametrize("weights_file", ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin"))
def test_adapters_fixture_outputs(tmp_path, weights_file):
    folder = tmp_path / "fusion_fixture"
    shutil.copytree(FIXTURES / "bert" / "fusion", folder)
    other = {"model_adapter_fusion.safetensors": "pytorch_model_adapter_fusion.bin",
             "pytorch_model_adapter_fusion.bin": "model_adapter_fusion.safetensors"}[weights_file]
    (folder / "fusion" / other).unlink()
    model, name = load_fixture_fusion(folder)
    raw = json.loads((FIXTURES / "bert" / "inputs.json").read_text(encoding="utf-8"))
    inputs = {key: torch.tensor(raw[key]) for key in ("input_ids", "attention_mask")}

    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]

    assert name == "fuse_a,fuse_b"
    assert model.active_block == Fuse("fuse_a", "fuse_b")
    expected = load_file(str(FIXTURES / "bert" / "fusion" / "expected.safetensors"))["last_hidden_state"]
    torch.testing.assert_close(hidden, expected, atol=TOLERANCE, rtol=0)
    base = load_file(str(FIXTURES / "bert" / "base" / "expected.safetensors"))["last_hidden_state"]
    assert (hidden - base).abs().max() > 1e-3
    model.set_active_adapters(["fuse_a"])
    with torch.no_grad():
        alone = model(**inputs, output_hidden_states=True).hidden_states[-1]
    assert (alone - expected).abs().max() > 1e-3


def test_adapters_fixture_rewritten_reads_back(tmp_path):
    model, name = load_fixture_fusion(FIXTURES / "bert" / "fusion")
    model.save_adapter_fusion(tmp_path / "fusion", name, format="adapters")
    written = torch.load(tmp_path / "fusion" / "pytorch_model_adapter_fusion.bin", weights_only=True)
    # The fixture comes from adapters' BertAdapterModel, whose keys start with its base model's name.
    original = {key.removeprefix("bert."): value for key, value in
                load_file(str(FIXTURES / "bert" / "fusion" / "fusion" / "model_adapter_fusion.safetensors")).items()}

    assert sorted(written) == sorted(original)
    for key, value in original.items():
        torch.testing.assert_close(written[key], value, atol=0, rtol=0)
    saved = json.loads((tmp_path / "fusion" / "adapter_fusion_config.json").read_text(encoding="utf-8"))
    fixture = json.loads((FIXTURES / "bert" / "fusion" / "fusion" / "adapter_fusion_config.json").read_text())
    assert saved["config"] == fixture["config"]
    assert saved["adapter_names"] == fixture["adapter_names"]


def test_adapters_format_rejects_parallel_adapters(tiny_model, tmp_path):
    model = fused_model(tiny_model, "bert", config="parallel")
    model.add_adapter_fusion(Fuse("a", "b"))
    with pytest.raises(ValueError, match="parallel=True"):
        model.save_adapter_fusion(tmp_path / "fusion", "a,b", format="adapters")


# -- Split --------------------------------------------------------------------------------------------

@torch.no_grad()
def last_hidden(model, active, input_ids):
    """Return the last hidden state of the last stack (the decoder's in encoder-decoder models)."""
    model.set_active_adapters(active)
    output = model(input_ids=input_ids, output_hidden_states=True)
    states = getattr(output, "decoder_hidden_states", None) or output.hidden_states
    return states[-1]


@pytest.mark.parametrize("family", ("bert", "gpt2", "t5"))
def test_split_matches_reference(tiny_model, tiny_inputs, family):
    model = fused_model(tiny_model, family)
    input_ids = tiny_inputs(family, batch_size=2, length=7)

    split = logits_with(model, Split("a", "b", splits=[3, 4]), input_ids)

    def compute(key, h, r, layer_norm):
        first = run_adapter(model, "a", h[:, :3], r[:, :3], layer_norm, key)
        rest = run_adapter(model, "b", h[:, 3:], r[:, 3:], layer_norm, key)
        return torch.cat([first, rest], dim=1)

    torch.testing.assert_close(split, reference_logits(model, input_ids, compute), atol=TOLERANCE, rtol=0)
    # The classifiers read one position, so the hidden states show that both adapters ran.
    hidden = last_hidden(model, Split("a", "b", splits=[3, 4]), input_ids)
    assert (hidden - last_hidden(model, ["a"], input_ids))[:, 3:].abs().max() > 1e-3
    assert (hidden - last_hidden(model, ["b"], input_ids))[:, :3].abs().max() > 1e-3


@pytest.mark.parametrize("method", ("pfeiffer", "lora", "ia3"))
def test_split_whole_sequence_equals_single(tiny_model, tiny_inputs, method):
    # The heads stay base copies, because a Split uses its last child's head.
    model = fused_model(tiny_model, "llama", config=method)
    input_ids = tiny_inputs("llama", batch_size=2, length=7)

    torch.testing.assert_close(logits_with(model, Split("a", "b", splits=[7, 0]), input_ids),
                               logits_with(model, ["a"], input_ids), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(logits_with(model, Split("a", "b", splits=[0, 7]), input_ids),
                               logits_with(model, ["b"], input_ids), atol=TOLERANCE, rtol=0)


def test_split_inside_stack(tiny_model, tiny_inputs):
    model = fused_model(tiny_model, "bert", ("a", "b", "c"))
    input_ids = tiny_inputs("bert", batch_size=2, length=7)

    stacked = logits_with(model, Stack("c", Split("a", "b", splits=[2, 5])), input_ids)

    def compute(key, h, r, layer_norm):
        h = run_adapter(model, "c", h, r, layer_norm, key)
        return torch.cat([run_adapter(model, "a", h[:, :2], r[:, :2], layer_norm, key),
                          run_adapter(model, "b", h[:, 2:], r[:, 2:], layer_norm, key)], dim=1)

    torch.testing.assert_close(stacked, reference_logits(model, input_ids, compute), atol=TOLERANCE, rtol=0)


def test_fusion_inside_split(tiny_model, tiny_inputs):
    model = fused_model(tiny_model, "bert", ("a", "b", "c"))
    fuse = Fuse("a", "b")
    add_random_fusion(model, fuse)
    input_ids = tiny_inputs("bert", batch_size=2, length=7)

    split = logits_with(model, Split(Stack(fuse), "c", splits=[3, 4]), input_ids)

    def compute(key, h, r, layer_norm):
        fused = fuse_by_hand(model, fuse, h[:, :3], r[:, :3], layer_norm, key)
        return torch.cat([fused, run_adapter(model, "c", h[:, 3:], r[:, 3:], layer_norm, key)], dim=1)

    torch.testing.assert_close(split, reference_logits(model, input_ids, compute), atol=TOLERANCE, rtol=0)


def test_split_length_mismatch_raises(tiny_model, tiny_inputs):
    model = fused_model(tiny_model, "bert")
    model.set_active_adapters(Split("a", "b", splits=[3, 3]))
    with pytest.raises(ValueError, match=r"covers 6 positions, but this input has 7"):
        model(input_ids=tiny_inputs("bert", batch_size=2, length=7))


def test_split_arguments():
    assert Split("a", "b", splits=4).splits == [4, 4]
    with pytest.raises(ValueError, match="one size per child"):
        Split("a", "b", splits=[4])
    with pytest.raises(ValueError, match="must not be negative"):
        Split("a", "b", splits=[4, -1])
