"""FrozenLayerCache: a forward from the cached input of the lowest adapted block equals the full forward."""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit import BottleneckConfig, LoRAConfig
from adapterkit.training.frozen_cache import FrozenLayerCache, lowest_adapted_block
from adapter_helpers import count_forward_calls, word_tokenizer

FAMILIES = ("bert", "roberta", "electra", "deberta-v2", "distilbert", "mpnet", "gpt2", "llama", "qwen2",
            "gemma3_text")
PAD = {"roberta": 1}
# Families that type each block need one type per block of the 4-block models here.
LAYER_TYPES = {"qwen2": ["full_attention"] * 4, "gemma3_text": ["sliding_attention", "full_attention"] * 2}


def examples(family, count=7, seed=0):
    """Return ``count`` token-id lists of lengths 3 to 9 that avoid the family's pad id."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (count,), generator=generator).tolist()
    return [torch.randint(4, 90, (length,), generator=generator).tolist() for length in lengths]


def collate_for(family, encoded):
    """Return a collate function that right-pads with the family's pad id, as fit's tokenizer does."""
    pad = PAD.get(family, 0)

    def collate(indices):
        width = max(len(encoded[i]) for i in indices)
        ids = torch.full((len(indices), width), pad)
        mask = torch.zeros(len(indices), width, dtype=torch.long)
        for row, index in enumerate(indices):
            ids[row, :len(encoded[index])] = torch.tensor(encoded[index])
            mask[row, :len(encoded[index])] = 1
        return {"input_ids": ids, "attention_mask": mask}

    return collate


def build(tiny_model, no_dropout, family, config):
    changes = dict(num_hidden_layers=4, **no_dropout(family))
    if family in LAYER_TYPES:
        changes["layer_types"] = LAYER_TYPES[family]
    model = adapterkit.init(tiny_model(family, **changes))
    model.add_adapter("upper", config)
    with torch.no_grad():
        for parameter in model._adapterkit.modules_of("upper")["methods"].parameters():
            parameter.normal_(std=0.2)
    model.train_adapter("upper")
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_forward_matches_full(tiny_model, no_dropout, family):
    model = build(tiny_model, no_dropout, family, BottleneckConfig(leave_out=(0, 1), mh_adapter=True))
    encoded = examples(family)
    collate = collate_for(family, encoded)
    with FrozenLayerCache(model, encoded, collate, batch_size=3) as cache:
        assert cache.start == 2
        cache.check_first_batch()
        indices = [5, 0, 3]
        batch = collate(indices)
        model.eval()
        full = model(**batch).logits
        with cache.starting_at_cached_block(indices, batch["attention_mask"]):
            cached = model(**batch).logits
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)

        # Gradients of the adapter are the same through the cached forward.
        model.zero_grad()
        full.sum().backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        with cache.starting_at_cached_block(indices, batch["attention_mask"]):
            model(**batch).logits.sum().backward()
        for name, gradient in expected.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, gradient, atol=1e-5, rtol=0)
    # The blocks are back in place after the forward.
    assert len(model._adapterkit.layout.blocks) == 4


def test_memory_mapped_cache_matches(tiny_model, no_dropout, tmp_path):
    model = build(tiny_model, no_dropout, "bert", LoRAConfig(leave_out=(0,)))
    encoded = examples("bert")
    collate = collate_for("bert", encoded)
    in_memory = FrozenLayerCache(model, encoded, collate, batch_size=2)
    with FrozenLayerCache(model, encoded, collate, batch_size=4, directory=tmp_path, memory_limit_bytes=0) as mapped:
        assert (tmp_path / "frozen_layers.f32").is_file()
        assert in_memory.start == mapped.start == 1
        torch.testing.assert_close(torch.from_numpy(mapped.storage[:]), torch.from_numpy(in_memory.storage),
                                   atol=1e-6, rtol=0)


def test_lowest_block_counts_every_active_adapter(tiny_model, no_dropout):
    model = build(tiny_model, no_dropout, "bert", LoRAConfig(leave_out=(0, 1, 2)))
    assert lowest_adapted_block(model) == 3
    model.add_adapter("lower", BottleneckConfig(leave_out=(0, 2, 3)))
    model.set_active_adapters(["upper", "lower"])
    assert lowest_adapted_block(model) == 1


@pytest.mark.parametrize("config, message", [
    (LoRAConfig(), "nothing to cache: an adapter sits in block 0"),
    ("invertible", "changes the model input"),
], ids=["block-0", "invertible"])
def test_cache_rejects_adapters_at_input(tiny_model, no_dropout, config, message):
    model = build(tiny_model, no_dropout, "bert", config)
    encoded = examples("bert")
    with pytest.raises(ValueError, match=message):
        FrozenLayerCache(model, encoded, collate_for("bert", encoded), batch_size=2)


def test_cache_rejects_trainable_lower_blocks(tiny_model, no_dropout):
    model = build(tiny_model, no_dropout, "bert", LoRAConfig(leave_out=(0,)))
    model.bert.encoder.layer[0].output.dense.weight.requires_grad_(True)
    encoded = examples("bert")
    with pytest.raises(ValueError, match=r"parameters there are trainable \(\['output.dense.weight'\]\)"):
        FrozenLayerCache(model, encoded, collate_for("bert", encoded), batch_size=2)


def test_cache_rejects_encoder_decoder(tiny_model):
    model = adapterkit.init(tiny_model("t5"))
    model.add_adapter("upper", LoRAConfig(leave_out=(0,)), set_active=True)
    with pytest.raises(ValueError, match="has 2 stacks"):
        lowest_adapted_block(model)


# -- fit(cache_frozen_layers=True) ------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "movie", "film", "plot", "very", "the", "was"]


def word_data(count, seed):
    generator = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for index in range(count):
        label = ("good", "bad")[index % 2]
        length = int(torch.randint(2, 7, (1,), generator=generator))
        fillers = [WORDS[6 + int(i)] for i in torch.randint(0, 6, (length,), generator=generator)]
        fillers.insert(int(torch.randint(0, length + 1, (1,), generator=generator)), label)
        texts.append(" ".join(fillers))
        labels.append(label)
    return texts, labels


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_fit_with_cache_matches_uncached(tiny_model, no_dropout, family):
    """With the base's dropout off, caching the blocks below the adapters changes nothing but the speed."""
    tokenizer = word_tokenizer(WORDS)
    texts, labels = word_data(24, seed=3)
    validation = word_data(8, seed=4)
    config = BottleneckConfig(leave_out=(0, 1), dropout=0.1)
    results = []
    for cached in (False, True):
        model = build(tiny_model, no_dropout, family, config)
        if family == "gpt2":
            model.config.pad_token_id = 0
        history = model.fit(texts, labels, validation_data=validation[0], validation_labels=validation[1],
                            tokenizer=tokenizer, epochs=2, batch_size=4, learning_rate=1e-2, progress=False,
                            cache_frozen_layers=cached)
        results.append((history.history, model._adapterkit.modules_of("upper").state_dict()))
    (plain_history, plain_state), (cached_history, cached_state) = results
    for key, values in plain_history.items():
        torch.testing.assert_close(torch.tensor(cached_history[key]), torch.tensor(values), atol=1e-5, rtol=0,
                                   msg=key)
    for key, value in plain_state.items():
        torch.testing.assert_close(cached_state[key], value, atol=1e-5, rtol=0, msg=key)
    # The adapter trained at all, so the equality above is not that of two untouched adapters.
    untrained = build(tiny_model, no_dropout, family, config)._adapterkit.modules_of("upper").state_dict()
    assert any(not torch.allclose(plain_state[key], untrained[key]) for key in plain_state)


def test_fit_cache_rejects_adapter_in_block_0(tiny_model, no_dropout):
    model = build(tiny_model, no_dropout, "bert", LoRAConfig())
    calls, handle = count_forward_calls(model)
    with pytest.raises(ValueError, match="nothing to cache"):
        model.fit(*word_data(8, seed=1), tokenizer=word_tokenizer(WORDS), progress=False, cache_frozen_layers=True)
    handle.remove()
    assert calls[0] == 0


def test_fit_cache_rejects_multitask(tiny_model, no_dropout):
    model = build(tiny_model, no_dropout, "bert", LoRAConfig(leave_out=(0,)))
    with pytest.raises(ValueError, match="supports one task per fit"):
        model.fit({"upper": word_data(8, seed=1)}, tokenizer=word_tokenizer(WORDS), progress=False,
                  cache_frozen_layers=True)
