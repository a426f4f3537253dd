"""Composition blocks (Stack, Average, BatchSplit, Parallel) and per-row adapter routing.

Expected values never come from the composition code under test. They come from runs with one
adapter active at a time, from a reference model whose weights carry the averaged LoRA update, or
from a plain forward hook that averages captured sublayer outputs.
"""

import copy
import threading

import pytest
import torch
import transformers
from adapter_helpers import randomize_parameters

import adapterkit
from adapterkit import Average, BatchSplit, BottleneckConfig, Fuse, Parallel, Split, Stack
from adapterkit.composition import ALLOWED, validate

FAMILIES = ("bert", "gpt2", "llama", "t5")
METHODS = ("pfeiffer", "lora", "ia3")
TOLERANCE = 1e-5


def adapter_model(tiny_model, family, method, names=("a", "b"), **changes):
    """Return a tiny classifier with randomised adapters ``names`` (heads included) of ``method``."""
    model = adapterkit.init(tiny_model(family, **changes))
    for seed, name in enumerate(names):
        model.add_adapter(name, method)
        randomize_parameters(model._adapterkit.modules_of(name), std=0.1, seed=10 + seed)
    return model


@torch.no_grad()
def logits_with(model, active, input_ids):
    model.set_active_adapters(active)
    return model(input_ids=input_ids).logits


def block_kinds():
    return [Stack, Average, BatchSplit, Parallel, Fuse, Split]


def make_block(kind, *children):
    if kind is BatchSplit:
        return BatchSplit(*children, batch_sizes=[1] * len(children))
    if kind is Split:
        return Split(*children, splits=[1] * len(children))
    return kind(*children)


# -- validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("outer", block_kinds(), ids=lambda k: k.__name__)
@pytest.mark.parametrize("inner", block_kinds(), ids=lambda k: k.__name__)
def test_nesting_follows_table(outer, inner):
    block = make_block(outer, "a", make_block(inner, "b", "c"))
    if inner in ALLOWED[outer]:
        validate(block, ["a", "b", "c"])
    else:
        with pytest.raises(ValueError) as error:
            validate(block, ["a", "b", "c"])
        assert f"{inner.__name__} cannot be nested inside {outer.__name__}" in str(error.value)


def test_disallowed_nesting_raises_at_activation(tiny_model):
    model = adapter_model(tiny_model, "bert", "pfeiffer")
    with pytest.raises(ValueError, match="Parallel cannot be nested inside Average"):
        model.set_active_adapters(Average("a", Parallel("a", "b")))
    assert model.active_adapters == []


def test_unknown_names_raise_at_activation(tiny_model):
    model = adapter_model(tiny_model, "bert", "pfeiffer")
    with pytest.raises(ValueError) as error:
        model.set_active_adapters(Average("a", Stack("missing", "gone")))
    assert "'gone'" in str(error.value)
    assert "'missing'" in str(error.value)


def test_fuse_needs_added_fusion(tiny_model):
    # Fuse and Split run (tests/test_fusion.py), but a Fuse must name a fusion added with add_adapter_fusion.
    model = adapter_model(tiny_model, "bert", "pfeiffer")
    with pytest.raises(ValueError, match="names no fusion"):
        model.set_active_adapters(Stack("a", Fuse("a", "b")))
    model.set_active_adapters(Stack("a", Split("a", "b", splits=16)))
    assert model.active_block == Stack("a", Split("a", "b", splits=[16, 16]))


def test_two_parallel_blocks_rejected(tiny_model):
    model = adapter_model(tiny_model, "bert", "pfeiffer")
    with pytest.raises(ValueError, match="2 Parallel blocks"):
        model.set_active_adapters(Stack(Parallel("a", "b"), Parallel("a", "b")))


def test_prefix_inside_average_not_implemented(tiny_model):
    model = adapter_model(tiny_model, "bert", "pfeiffer")
    model.add_adapter("p", "prefix_tuning")
    with pytest.raises(ValueError, match="'p' has modules at prefix"):
        model.set_active_adapters(Average("a", "p"))


def test_block_argument_checks():
    with pytest.raises(ValueError, match="one weight per child"):
        Average("a", "b", weights=[1.0])
    with pytest.raises(ValueError, match="one size per child"):
        BatchSplit("a", "b", batch_sizes=[2])
    with pytest.raises(ValueError, match="at least one child"):
        Stack()


# -- Stack, Average, BatchSplit, Parallel -------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_stack_block_equals_list(tiny_model, tiny_inputs, family, method):
    model = adapter_model(tiny_model, family, method)
    input_ids = tiny_inputs(family, batch_size=2)
    expected = logits_with(model, ["a", "b"], input_ids)
    assert not torch.allclose(expected, logits_with(model, ["a"], input_ids), atol=1e-4)
    torch.testing.assert_close(logits_with(model, Stack("a", "b"), input_ids), expected, atol=0, rtol=0)
    # An Average of one child runs through the composition plans and must compute the same.
    nested = logits_with(model, Stack("a", Average("b")), input_ids)
    torch.testing.assert_close(nested, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_batch_split_rows_match_single_adapters(tiny_model, tiny_inputs, family, method):
    model = adapter_model(tiny_model, family, method)
    input_ids = tiny_inputs(family, batch_size=5)
    alone_a = logits_with(model, ["a"], input_ids)
    stacked = logits_with(model, ["a", "b"], input_ids)

    split = logits_with(model, BatchSplit("a", Stack("a", "b"), batch_sizes=[2, 3]), input_ids)

    torch.testing.assert_close(split[:2], alone_a[:2], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(split[2:], stacked[2:], atol=TOLERANCE, rtol=0)
    assert (alone_a - stacked).abs().max() > 1e-3


def test_batch_split_wrong_batch_size(tiny_model, tiny_inputs):
    model = adapter_model(tiny_model, "bert", "pfeiffer")
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[2, 2]))
    with pytest.raises(ValueError, match="multiple of 4"):
        model(input_ids=tiny_inputs("bert", batch_size=3))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_parallel_branches_match_single_adapters(tiny_model, tiny_inputs, family, method):
    model = adapter_model(tiny_model, family, method)
    input_ids = tiny_inputs(family, batch_size=2)
    alone_a = logits_with(model, ["a"], input_ids)
    alone_b = logits_with(model, ["b"], input_ids)

    parallel = logits_with(model, Parallel("a", "b"), input_ids)

    assert parallel.shape[0] == 4
    torch.testing.assert_close(parallel[:2], alone_a, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(parallel[2:], alone_b, atol=TOLERANCE, rtol=0)


def test_parallel_inside_stack(tiny_model, tiny_inputs):
    model = adapter_model(tiny_model, "bert", "pfeiffer", names=("a", "b", "c"))
    input_ids = tiny_inputs("bert", batch_size=2)
    expected_b = logits_with(model, ["a", "b"], input_ids)
    expected_c = logits_with(model, ["a", "c"], input_ids)

    parallel = logits_with(model, Stack("a", Parallel("b", "c")), input_ids)

    torch.testing.assert_close(parallel[:2], expected_b, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(parallel[2:], expected_c, atol=TOLERANCE, rtol=0)


def test_average_lora_equals_merged_weights(tiny_model, tiny_inputs):
    model = adapter_model(tiny_model, "bert", "lora")
    reference = tiny_model("bert")
    weights = [0.25, 0.75]
    layer_names = {id(module): name for name, module in model.named_modules()}
    registry = model._adapterkit
    with torch.no_grad():
        for name, weight in zip(("a", "b"), weights):
            for key, _, lora in registry.placements_of(name):
                layer = reference.get_submodule(layer_names[id(registry.sites[key].layer)])
                layer.weight += weight * lora.delta_weight()
    # The reference keeps the base head, so the average uses it too: adapter b's head is the one installed.
    reference.classifier.load_state_dict(registry.modules_of("b")["head"]["classifier"].state_dict())
    input_ids = tiny_inputs("bert", batch_size=3)

    averaged = logits_with(model, Average("a", "b", weights=[1, 3]), input_ids)

    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
    torch.testing.assert_close(averaged, expected, atol=TOLERANCE, rtol=0)


def test_average_bottleneck_at_one_site(tiny_model, tiny_inputs):
    # Each adapter has one module, on the feed-forward output of block 1, so the inputs there agree.
    config = BottleneckConfig(mh_adapter=False, output_adapter=True, leave_out=(0,))
    model = adapter_model(tiny_model, "bert", config)
    site = model._adapterkit.sites[("sublayer", 1, "feed_forward")]
    input_ids = tiny_inputs("bert", batch_size=2)
    captured = {}

    def capture(module, args, output):
        captured["output"] = output

    handle = site.output_module.register_forward_hook(capture)
    logits_with(model, ["a"], input_ids)
    output_a = captured["output"]
    logits_with(model, ["b"], input_ids)
    output_b = captured["output"]
    handle.remove()

    averaged = logits_with(model, Average("a", "b", weights=[0.3, 0.7]), input_ids)

    model.set_active_adapters(None)
    model._adapterkit._install_head("b")
    handle = site.output_module.register_forward_hook(lambda m, a, o: 0.3 * output_a + 0.7 * output_b)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    handle.remove()
    torch.testing.assert_close(averaged, expected, atol=TOLERANCE, rtol=0)


def test_average_one_weight_equals_single(tiny_model, tiny_inputs):
    model = adapter_model(tiny_model, "llama", "ia3")
    input_ids = tiny_inputs("llama", batch_size=2)
    expected = logits_with(model, ["b"], input_ids)

    averaged = logits_with(model, Average("a", "b", weights=[0, 1]), input_ids)

    torch.testing.assert_close(averaged, expected, atol=TOLERANCE, rtol=0)


# -- per-row routing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_routing_rows_match_single_adapters(tiny_model, tiny_inputs, family, method):
    model = adapter_model(tiny_model, family, method)
    input_ids = tiny_inputs(family, batch_size=4)
    expected = {name: logits_with(model, [name] if name else None, input_ids) for name in ("a", "b", None)}
    model.set_active_adapters(["a", "b"])
    names = ["b", None, "a", "b"]

    with torch.no_grad():
        routed = model(input_ids=input_ids, adapter_names=names).logits

    for row, name in enumerate(names):
        torch.testing.assert_close(routed[row], expected[name][row], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(logits_with(model, ["a", "b"], input_ids),
                               logits_with(model, Stack("a", "b"), input_ids), atol=0, rtol=0)


def test_routing_restores_heads(tiny_model, tiny_inputs):
    model = adapter_model(tiny_model, "bert", "pfeiffer")
    model.set_active_adapters("a")
    head = model.classifier
    with torch.no_grad():
        model(input_ids=tiny_inputs("bert", batch_size=2), adapter_names=["a", "b"])
    assert model.classifier is head


def test_routing_unknown_names(tiny_model, tiny_inputs):
    model = adapter_model(tiny_model, "bert", "pfeiffer")
    with pytest.raises(ValueError) as error:
        model(input_ids=tiny_inputs("bert", batch_size=3), adapter_names=["a", "nope", "zzz"])
    assert "'nope'" in str(error.value)
    assert "'zzz'" in str(error.value)
    with pytest.raises(ValueError, match="3 entries for a batch of 2 rows"):
        model(input_ids=tiny_inputs("bert", batch_size=2), adapter_names=["a", "b", "a"])


def generation_model(family, method):
    """Return a tiny language model (causal, or seq2seq for t5) with randomised adapters a and b."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    elif family == "llama":
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=37, vocab_size=99,
                                          max_position_embeddings=64, pad_token_id=0)
    else:
        config = transformers.T5Config(d_model=32, d_kv=16, d_ff=37, num_layers=2, num_decoder_layers=2,
                                       num_heads=4, vocab_size=99, feed_forward_proj="gated-gelu", pad_token_id=0,
                                       eos_token_id=1, decoder_start_token_id=0)
    auto = transformers.AutoModelForSeq2SeqLM if family == "t5" else transformers.AutoModelForCausalLM
    model = adapterkit.init(auto.from_config(config).eval())
    for seed, name in enumerate(("a", "b")):
        model.add_adapter(name, method)
        randomize_parameters(model._adapterkit.modules_of(name), std=0.3, seed=10 + seed)
    return model


@pytest.mark.parametrize("family", ("gpt2", "llama", "t5"))
@pytest.mark.parametrize("num_beams", (1, 2))
@pytest.mark.parametrize("method", ("pfeiffer", "lora"))
def test_generate_routes_rows(tiny_inputs, family, num_beams, method):
    model = generation_model(family, method)
    input_ids = tiny_inputs("gpt2", batch_size=3, length=5)
    names = ["a", None, "b"]
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=0)
    expected = []
    for row, name in enumerate(names):
        model.set_active_adapters(name)
        expected.append(model.generate(input_ids=input_ids[row:row + 1], **settings)[0])
    model.set_active_adapters(None)

    routed = model.generate(input_ids=input_ids, adapter_names=names, **settings)

    for row in range(3):
        assert routed[row].tolist() == expected[row].tolist()
    assert not (expected[0].tolist() == expected[1].tolist() == expected[2].tolist())


# -- state across checkpointing and threads -----------------------------------------------------------

def routed_gradients(model, input_ids, names, labels):
    model.zero_grad(set_to_none=True)
    output = model(input_ids=input_ids, adapter_names=names, labels=labels)
    output.loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()
            if parameter.grad is not None}


@pytest.mark.parametrize("family", ("bert", "llama"))
@pytest.mark.parametrize("reentrant", (True, False))
def test_routing_survives_checkpointing(tiny_model, tiny_inputs, no_dropout, family, reentrant):
    model = adapter_model(tiny_model, family, "lora", **no_dropout(family))
    model.add_adapter("c", "pfeiffer")
    randomize_parameters(model._adapterkit.modules_of("c"), std=0.1, seed=20)
    model.train_adapter(["a", "b", "c"])
    model.train()
    input_ids = tiny_inputs(family, batch_size=3)
    labels = torch.tensor([0, 1, 2])
    names = ["c", "a", "b"]
    expected = routed_gradients(model, input_ids, names, labels)

    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5; 4.57 has only the older name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = routed_gradients(model, input_ids, names, labels)

    assert set(checkpointed) == set(expected)
    assert any("adapter_c" in name for name in expected)
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=TOLERANCE, rtol=0, msg=name)


def test_two_models_in_two_threads(tiny_model, tiny_inputs):
    models = [adapter_model(tiny_model, "bert", "pfeiffer"), adapter_model(tiny_model, "llama", "lora")]
    inputs = [tiny_inputs("bert", batch_size=3), tiny_inputs("llama", batch_size=3)]
    plans = [["a", "b", None], [None, "b", "a"]]
    expected = []
    for model, input_ids, names in zip(models, inputs, plans):
        with torch.no_grad():
            expected.append(model(input_ids=input_ids, adapter_names=names).logits)
    barrier = threading.Barrier(2)
    failures = []

    def work(index):
        model, input_ids, names = models[index], inputs[index], plans[index]
        barrier.wait()
        for _ in range(20):
            with torch.no_grad():
                logits = model(input_ids=input_ids, adapter_names=names).logits
            if not torch.allclose(logits, expected[index], atol=TOLERANCE, rtol=0):
                failures.append(index)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_deepcopy_keeps_composition(tiny_model, tiny_inputs):
    model = adapter_model(tiny_model, "bert", "pfeiffer")
    model.set_active_adapters(Average("a", "b"))
    input_ids = tiny_inputs("bert", batch_size=2)
    expected = logits_with(model, Average("a", "b"), input_ids)

    copied = copy.deepcopy(model)

    with torch.no_grad():
        torch.testing.assert_close(copied(input_ids=input_ids).logits, expected, atol=0, rtol=0)



def test_delete_adapter_in_active_block(tiny_model, tiny_inputs):
    model = adapter_model(tiny_model, "bert", "pfeiffer")
    input_ids = tiny_inputs("bert", batch_size=2)
    bare = logits_with(model, None, input_ids)
    model.set_active_adapters(Average("a", "b"))

    model.delete_adapter("b")

    assert model.active_adapters == []
    assert model.active_block is None
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, bare, atol=0, rtol=0)


def test_merge_rejects_active_composition(tiny_model):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("a", "lora")
    model.add_adapter("b", "lora")
    model.set_active_adapters(Average("a", "b"))

    with pytest.raises(ValueError, match="composition"):
        model.merge_adapter("a")
    with pytest.raises(ValueError, match="composition"):
        model.merge_and_unload()
    assert model.merged_adapters == []


def test_deepcopy_rebinds_checkpoint_wrappers(tiny_model):
    import copy

    from adapterkit.registry import StatefulCheckpoint

    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("a", "lora")
    model.add_adapter("b", "lora")
    model.train_adapter(["a", "b"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(2, 99, (2, 5))
    model(input_ids=input_ids, adapter_names=["a", "b"]).logits.sum().backward()

    copied = copy.deepcopy(model)
    copied(input_ids=input_ids, adapter_names=["a", "b"]).logits.sum().backward()

    wrappers = [m.__dict__["_gradient_checkpointing_func"] for m in copied.modules()
                if isinstance(m.__dict__.get("_gradient_checkpointing_func"), StatefulCheckpoint)]
    assert wrappers
    assert all(wrapper.registry is copied._adapterkit for wrapper in wrappers)
