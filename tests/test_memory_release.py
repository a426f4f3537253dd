"""No activation or generation cache outlives the forward that made it.

Hooks keep what a block or an attention module was called with until its output arrives. Kept
past that, an attention input would hold memory between training steps and after inference,
and a generation cache would keep every layer's keys and values after ``generate`` returns.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import transformers

import adapterkit

METHODS = ("pfeiffer", "houlsby", "parallel", "conv", "lora", "ia3", "prefix_tuning", "prompt_tuning", "compacter",
           "mam", "unipelt")


def _watch_activations(model: torch.nn.Module, batch_size: int) -> tuple[list[weakref.ref], list]:
    """Hook every module to keep a weak reference to each activation it receives or returns.

    An activation is a floating tensor of 3 dimensions whose first is the batch, not a parameter.
    """
    seen: list[weakref.ref] = []

    def remember(value) -> None:
        if (isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
                and value.is_floating_point() and value.dim() == 3 and value.shape[0] == batch_size):
            seen.append(weakref.ref(value))
        elif isinstance(value, (tuple, list)):
            for item in value:
                remember(item)

    def before(module, args, kwargs):
        remember(args)
        remember(list(kwargs.values()))

    def after(module, args, output):
        remember(output)

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after))
    return seen, handles


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize("method", METHODS)
def test_training_step_keeps_no_activation(tiny_model, tiny_inputs, family, method):
    model = adapterkit.init(tiny_model(family))
    model.add_adapter("a", method)
    model.train_adapter("a")
    ids = tiny_inputs(family, batch_size=3, length=6)
    seen, handles = _watch_activations(model, batch_size=3)

    model(input_ids=ids, labels=torch.tensor([0, 1, 2])).loss.backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    gc.collect()

    alive = [reference() for reference in seen if reference() is not None]
    assert len(seen) > 10
    assert alive == [], f"{len(alive)} activations outlive the step, shapes {[tuple(t.shape) for t in alive][:5]}"


# transformers 5.25 warns that past_key_values is renamed to cache. The old name works in 4.57 and 5.25.
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("method", ["pfeiffer", "conv", "lora", "prefix_tuning"])
def test_cached_forward_keeps_no_cache(method):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64)
    model = adapterkit.init(transformers.GPT2LMHeadModel(config).eval())
    model.add_adapter("a", method)
    model.set_active_adapters("a")
    cache = transformers.DynamicCache(config=config)
    reference = weakref.ref(cache)

    with torch.no_grad():
        output = model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
        model(input_ids=torch.tensor([[8]]), past_key_values=output.past_key_values, use_cache=True)
    del cache, output
    gc.collect()

    assert reference() is None
