"""Every adapter method on every model family, one test per property.

The properties: gradients reach only the adapter, save and load round trips, half-precision bases,
gradient checkpointing, eval mode, ``copy.deepcopy`` and ``pickle``, and parameter counts. Every
supported pair runs every property test. ``add_adapter`` must reject the other pairs with a clear
error, which ``test_unsupported_pair_rejected`` checks.

Each test builds its models with ``fresh_model``: a deep copy of one tiny model per family (and config
change), built once with seed 0, so two calls give models with equal weights.
"""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

import adapterkit
from adapter_helpers import compute_logits, randomize_parameters
from adapterkit import PRESETS, BottleneckConfig, ConfigUnion, IA3Config, LoRAConfig
from adapterkit.config import ROLES
from adapterkit.methods.ia3 import IA3
from adapterkit.methods.lora import LoRA

ENCODERS = ("bert", "roberta", "electra", "deberta-v2", "distilbert", "mpnet")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "gemma3_text")
ENCODER_DECODERS = ("t5", "bart")
FAMILIES = ENCODERS + DECODERS + ENCODER_DECODERS

METHODS = {
    **PRESETS,
    "series_and_parallel": ConfigUnion(BottleneckConfig(),
                                       BottleneckConfig(parallel=True, mh_adapter=True, output_adapter=False)),
    "lora_all_roles": LoRAConfig(r=4, targets=ROLES),
    "ia3_all_roles": IA3Config(targets=ROLES),
    "before_head": BottleneckConfig(before_head=True),
    "cross_adapter": BottleneckConfig(cross_adapter=True),
    # PHM layers split the hidden size into phm_dim blocks, and 3 does not divide 32.
    "compacter_phm_dim3": PRESETS["compacter"].replace(phm_dim=3),
}
# The copy test runs every preset plus a LoRA whose rank differs from every default.
COPY_METHODS = {**PRESETS, "lora_r87": LoRAConfig(r=87)}

# MPNet's transformers model has no gradient checkpointing (supports_gradient_checkpointing=False).
NO_CHECKPOINTING = ("mpnet",)


def rejection_pattern(method: str, family: str) -> str | None:
    """Return a regex of the error ``add_adapter`` must raise for the pair, or None if it is supported."""
    if method == "compacter_phm_dim3":
        return re.escape("phm_dim=3 must divide both the hidden size (32) and the bottleneck width (3)")
    if method == "cross_adapter" and family not in ENCODER_DECODERS:
        return f"cross_adapter=True, but '{family}' blocks have no cross-attention"
    return None


def supported_pairs(methods: dict, families: tuple[str, ...] = FAMILIES) -> list:
    """Return ``pytest.param(method, family)`` for every pair that ``rejection_pattern`` does not reject."""
    pairs = []
    for family in families:
        for method in methods:
            if rejection_pattern(method, family) is not None:
                continue
            pairs.append(pytest.param(method, family, id=f"{family}-{method}"))
    return pairs


REJECTED_PAIRS = [pytest.param(method, family, id=f"{family}-{method}")
                  for family in FAMILIES for method in METHODS if rejection_pattern(method, family)]

# (in_features, out_features) of every projection that plays each role, in one block of each kind,
# written out from the tiny configs in conftest.py: hidden 32, intermediate 37 (GPT-2: 4 * 32), Llama
# family key/value width 2 heads * 8, T5 attention width 4 heads * d_kv 16 = 64. Decoder blocks of
# T5 and BART list the self-attention projection first, then the cross-attention one.
_BERT_BLOCK = {"query": [(32, 32)], "key": [(32, 32)], "value": [(32, 32)], "attention_output": [(32, 32)],
               "ff_in": [(32, 37)], "ff_out": [(37, 32)]}
_GPT2_BLOCK = {**_BERT_BLOCK, "ff_in": [(32, 128)], "ff_out": [(128, 32)]}
_LLAMA_BLOCK = {"query": [(32, 32)], "key": [(32, 16)], "value": [(32, 16)], "attention_output": [(32, 32)],
                "ff_in": [(32, 37), (32, 37)], "ff_out": [(37, 32)]}
_T5_ENCODER_BLOCK = {"query": [(32, 64)], "key": [(32, 64)], "value": [(32, 64)], "attention_output": [(64, 32)],
                     "ff_in": [(32, 37), (32, 37)], "ff_out": [(37, 32)]}
_T5_DECODER_BLOCK = {**_T5_ENCODER_BLOCK, "query": [(32, 64)] * 2, "key": [(32, 64)] * 2,
                     "value": [(32, 64)] * 2, "attention_output": [(64, 32)] * 2}
_BART_DECODER_BLOCK = {**_BERT_BLOCK, "query": [(32, 32)] * 2, "key": [(32, 32)] * 2, "value": [(32, 32)] * 2,
                       "attention_output": [(32, 32)] * 2}
BLOCK_PROJECTIONS = {
    **{family: [_BERT_BLOCK] * 2 for family in ENCODERS},
    "gpt2": [_GPT2_BLOCK] * 2,
    **{family: [_LLAMA_BLOCK] * 2 for family in ("llama", "mistral", "qwen2", "gemma3_text")},
    "t5": [_T5_ENCODER_BLOCK] * 2 + [_T5_DECODER_BLOCK] * 2,
    "bart": [_BERT_BLOCK] * 2 + [_BART_DECODER_BLOCK] * 2,
}

_TEMPLATES: dict[tuple, torch.nn.Module] = {}


@pytest.fixture
def fresh_model(tiny_model):
    """The builder ``fresh_model(family, **config_changes)``: a new copy of the seed-0 tiny model, in eval mode."""
    def build(family: str, **config_changes) -> torch.nn.Module:
        key = (family, tuple(sorted(config_changes.items())))
        if key not in _TEMPLATES:
            _TEMPLATES[key] = tiny_model(family, **config_changes)
        return copy.deepcopy(_TEMPLATES[key])

    return build


def adapter_modules(model, name: str = "task") -> torch.nn.ModuleDict:
    return model._adapterkit.modules_of(name)


def total_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def modules_in_training_mode(model) -> list[str]:
    return [name for name, module in model.named_modules() if module.training]


def max_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    return (first.float() - second.float()).abs().max().item()


# -- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "family"), supported_pairs(METHODS))
def test_gradients_reach_adapter_only(method, family, fresh_model, tiny_inputs):
    input_ids = tiny_inputs(family)
    model = fresh_model(family)
    bare = compute_logits(model, input_ids)
    base_parameters = dict(model.named_parameters())
    adapterkit.init(model)
    model.add_adapter("task", METHODS[method])
    model.train_adapter("task")
    randomize_parameters(adapter_modules(model)["methods"])
    parameters = dict(adapter_modules(model).named_parameters())

    logits = model(input_ids=input_ids).logits
    logits.sum().backward()

    assert max_difference(logits.detach(), bare) > 1e-5
    assert not [name for name, p in base_parameters.items() if p.grad is not None]
    assert not [name for name, p in parameters.items() if p.grad is None]
    assert not [name for name, p in parameters.items() if not torch.isfinite(p.grad).all()]
    # A single projection's gradient may be zero: with a 2-unit ReLU bottleneck and random biases,
    # both units can be inactive for every token.
    assert any(p.grad.any() for name, p in parameters.items() if name.startswith("methods."))


# -- saving and loading ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "family"), supported_pairs(METHODS))
def test_save_load_round_trip(method, family, fresh_model, tiny_inputs, tmp_path):
    input_ids = tiny_inputs(family)
    model = adapterkit.init(fresh_model(family))
    model.add_adapter("task", METHODS[method], set_active=True)
    randomize_parameters(adapter_modules(model))
    saved = {key: value.clone() for key, value in adapter_modules(model).state_dict().items()}
    expected = compute_logits(model, input_ids)
    model.save_adapter(tmp_path / "task", "task")

    fresh = adapterkit.init(fresh_model(family))
    bare = compute_logits(fresh, input_ids)
    name = fresh.load_adapter(tmp_path / "task")
    loaded = adapter_modules(fresh, name).state_dict()

    assert name == "task"
    assert fresh.adapter_config(name) == METHODS[method]
    assert sorted(loaded) == sorted(saved)
    assert not [key for key, value in loaded.items() if not torch.equal(value, saved[key])]
    assert not [key for key, value in loaded.items() if not value.any()]
    assert max_difference(expected, bare) > 1e-5
    torch.testing.assert_close(compute_logits(fresh, input_ids), expected, atol=1e-5, rtol=0)


# -- half precision --------------------------------------------------------------------------------


def check_half_precision(model, method: str, input_ids: torch.Tensor, dtype: torch.dtype) -> None:
    """Add, train and run adapter ``method`` on ``model``, whose weights are already ``dtype``."""
    adapterkit.init(model)
    model.add_adapter("task", METHODS[method])
    model.train_adapter("task")
    randomize_parameters(adapter_modules(model)["methods"])
    parameters = dict(adapter_modules(model).named_parameters())

    logits = model(input_ids=input_ids).logits
    logits.float().sum().backward()

    assert not [name for name, p in parameters.items() if p.dtype != dtype]
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()
    assert not [name for name, p in parameters.items() if p.grad is None]
    assert not [name for name, p in parameters.items() if p.grad.dtype != dtype]


@pytest.mark.parametrize(("method", "family"), supported_pairs(METHODS))
def test_bfloat16_base(method, family, fresh_model, tiny_inputs):
    check_half_precision(fresh_model(family).to(torch.bfloat16), method, tiny_inputs(family), torch.bfloat16)


@pytest.mark.parametrize(("method", "family"), supported_pairs(METHODS, ("t5",)))
def test_float16_base(method, family, fresh_model, tiny_inputs):
    check_half_precision(fresh_model(family).to(torch.float16), method, tiny_inputs(family), torch.float16)


# -- gradient checkpointing ------------------------------------------------------------------------


def adapter_gradients(model, input_ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """Run one forward and backward pass; return the adapter's gradients and the forward calls of block layers.

    The calls counted are those of every leaf module inside a checkpointable block. Transformers
    checkpoints a block's ``forward``, so hooks on the block itself run once, but its submodules run
    again when the backward pass recomputes the block.
    """
    parameters = dict(adapter_modules(model).named_parameters())
    for parameter in parameters.values():
        parameter.grad = None
    blocks = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    leaves = [module for block in blocks for module in block.modules() if not list(module.children())]
    calls = []
    handles = [leaf.register_forward_pre_hook(lambda *args: calls.append(1)) for leaf in leaves]
    try:
        model(input_ids=input_ids).logits.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    assert not [name for name, p in parameters.items() if p.grad is None]
    return {name: p.grad.clone() for name, p in parameters.items()}, len(calls)


@pytest.mark.parametrize(("method", "family"),
                         supported_pairs(METHODS, tuple(f for f in FAMILIES if f not in NO_CHECKPOINTING)))
def test_gradient_checkpointing_gradients(method, family, fresh_model, tiny_inputs, no_dropout):
    input_ids = tiny_inputs(family)
    model = adapterkit.init(fresh_model(family, **no_dropout(family)))
    model.add_adapter("task", METHODS[method])
    model.train_adapter("task")
    randomize_parameters(adapter_modules(model)["methods"])
    model.train()

    plain, plain_calls = adapter_gradients(model, input_ids)
    assert not model.is_gradient_checkpointing

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    reentrant, reentrant_calls = adapter_gradients(model, input_ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    non_reentrant, non_reentrant_calls = adapter_gradients(model, input_ids)
    model.add_adapter("second", METHODS[method])
    model.train_adapter("task")

    assert model.is_gradient_checkpointing
    # Reentrant checkpointing runs every block's layers a second time during the backward pass.
    # Non-reentrant checkpointing stops recomputing a block once it has every tensor the backward
    # pass needs, so a block's last layers may run only once.
    assert plain_calls > 0
    assert reentrant_calls == 2 * plain_calls
    assert plain_calls < non_reentrant_calls <= 2 * plain_calls
    torch.testing.assert_close(reentrant, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(non_reentrant, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_two_padded_forwards(family, use_reentrant, fresh_model, tiny_inputs, no_dropout):
    input_ids = tiny_inputs(family)
    full = torch.ones_like(input_ids)
    padded = full.clone()
    # Encoders are right-padded and decoders left-padded, as the convolution's mask reading expects.
    if family in DECODERS:
        padded[0, :3] = 0
    else:
        padded[0, -3:] = 0
    model = adapterkit.init(fresh_model(family, **no_dropout(family)))
    model.add_adapter("task", "conv")
    model.train_adapter("task")
    randomize_parameters(adapter_modules(model)["methods"])
    model.train()
    parameters = dict(adapter_modules(model)["methods"].named_parameters())

    def gradients() -> dict[str, torch.Tensor]:
        for parameter in parameters.values():
            parameter.grad = None
        first = model(input_ids=input_ids, attention_mask=padded).logits
        second = model(input_ids=input_ids, attention_mask=full).logits
        (first.sum() + 2 * second.sum()).backward()
        return {name: p.grad.clone() for name, p in parameters.items()}

    plain = gradients()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})

    torch.testing.assert_close(gradients(), plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", NO_CHECKPOINTING)
def test_gradient_checkpointing_unsupported_family(family, fresh_model):
    model = adapterkit.init(fresh_model(family))
    model.add_adapter("task", "lora")

    # The message reads "activation checkpointing" in transformers 5 and "gradient checkpointing" in 4.57.
    with pytest.raises(ValueError,
                       match="MPNetForSequenceClassification does not support (activation|gradient) checkpointing"):
        model.gradient_checkpointing_enable()


# -- eval mode -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "family"), supported_pairs(METHODS))
def test_eval_mode_kept(method, family, fresh_model, tiny_inputs, tmp_path):
    input_ids = tiny_inputs(family)
    model = adapterkit.init(fresh_model(family))
    model.add_adapter("task", METHODS[method])

    assert not model.training
    assert modules_in_training_mode(model) == []

    model.set_active_adapters("task")
    randomize_parameters(adapter_modules(model)["methods"])
    assert torch.equal(compute_logits(model, input_ids), compute_logits(model, input_ids))

    model.save_adapter(tmp_path / "task", "task")
    model.load_adapter(tmp_path / "task", load_as="loaded")

    assert model.active_adapters == ["loaded"]
    assert not model.training
    assert modules_in_training_mode(model) == []
    assert torch.equal(compute_logits(model, input_ids), compute_logits(model, input_ids))


# -- copies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "family"), supported_pairs(COPY_METHODS))
def test_copies_keep_adapter(method, family, fresh_model, tiny_inputs):
    input_ids = tiny_inputs(family)
    config = COPY_METHODS[method]
    model = adapterkit.init(fresh_model(family))
    model.add_adapter("task", config, set_active=True)
    randomize_parameters(adapter_modules(model)["methods"])
    shapes = {key: value.shape for key, value in adapter_modules(model).state_dict().items()}
    expected = compute_logits(model, input_ids)

    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copied) is type(model)
        assert copied.adapter_config("task") == config
        assert copied.active_adapters == ["task"]
        assert {key: value.shape for key, value in adapter_modules(copied).state_dict().items()} == shapes
        assert torch.equal(compute_logits(copied, input_ids), expected)

        randomize_parameters(adapter_modules(copied)["methods"], seed=3)

        assert max_difference(compute_logits(copied, input_ids), expected) > 1e-5
        assert torch.equal(compute_logits(model, input_ids), expected)


# -- parameter counts ------------------------------------------------------------------------------


def expected_projection_shapes(family: str, member, role: str) -> list[list[int | tuple[int, int]]]:
    """Return, per block, the shape of each LoRA module (in, out) or (IA)^3 vector (features) for ``role``."""
    shapes = []
    for block in BLOCK_PROJECTIONS[family]:
        if isinstance(member, LoRAConfig):
            shapes.append(list(block[role]))
        else:
            # (IA)^3 scales the input of the feed-forward output projection and the output of the others.
            shapes.append([in_features if role == "ff_out" else out_features for in_features, out_features in block[role]])
    return shapes


def expected_method_parameters(family: str, member) -> int:
    """Return the parameters of one LoRA or (IA)^3 member config, computed from ``BLOCK_PROJECTIONS``."""
    total = 0
    for role in member.targets:
        for block_shapes in expected_projection_shapes(family, member, role):
            for shape in block_shapes:
                if isinstance(member, LoRAConfig):
                    in_features, out_features = shape
                    total += member.r * (in_features + out_features)
                    if member.use_gating:
                        total += in_features + 1
                else:
                    total += shape
    return total


@pytest.mark.parametrize(("method", "family"), supported_pairs(METHODS))
def test_parameter_count(method, family, fresh_model):
    config = METHODS[method]
    model = adapterkit.init(fresh_model(family))
    before = total_parameters(model)
    model.add_adapter("task", config)
    added = total_parameters(model) - before

    assert model._adapterkit.count_parameters("task") == added
    model.set_active_adapters("task")
    assert total_parameters(model) == before + added

    for index, member in enumerate(config.methods):
        if not isinstance(member, (LoRAConfig, IA3Config)):
            continue
        module_type = LoRA if isinstance(member, LoRAConfig) else IA3
        tree = adapter_modules(model)["methods"][str(index)]
        blocks = list(tree["layers"].values())
        for role in member.targets:
            found = []
            for block in blocks:
                modules = block[role]
                assert all(isinstance(module, module_type) for module in modules)
                if module_type is LoRA:
                    found.append([(module.in_features, module.out_features) for module in modules])
                else:
                    found.append([module.features for module in modules])
            assert found == expected_projection_shapes(family, member, role), role
        expected_count = sum(len(shapes) for role in member.targets
                             for shapes in expected_projection_shapes(family, member, role))
        assert sum(isinstance(module, module_type) for module in tree.modules()) == expected_count
        assert sum(p.numel() for p in tree.parameters()) == expected_method_parameters(family, member)


# -- unsupported pairs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "family"), REJECTED_PAIRS)
def test_unsupported_pair_rejected(method, family, fresh_model):
    model = adapterkit.init(fresh_model(family))
    before = total_parameters(model)

    with pytest.raises(ValueError, match=rejection_pattern(method, family)):
        model.add_adapter("task", METHODS[method])

    assert model.adapter_names == []
    assert total_parameters(model) == before
