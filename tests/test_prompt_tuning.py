"""Prompt tuning: the config, the hooks that insert the prompt, generation, and PEFT checkpoints.

The expected outputs come from the bare transformers model, called with ``inputs_embeds`` that
concatenate the prompt and the token embeddings by hand, and from PEFT 0.21 itself.

Known differences from PEFT. The tests check adapterkit's side of each, not PEFT's:

- PEFT 0.21.2's cached ``generate()`` on transformers 5.25 prepends the prompt again at every
  decoding step (it looks for ``past_key_values``, which transformers 5 renamed to ``cache``), so
  its cached and uncached greedy tokens differ. adapterkit matches PEFT's uncached generation.
- PEFT puts the prompt before any left padding and drops the ``position_ids`` it is given.
  adapterkit puts it right before the first attended token and shifts the given position ids, so
  a left-padded row gives the outputs of the row alone. Without left padding both agree.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import transformers

import adapterkit
from adapterkit import ConfigUnion, LoRAConfig, PromptTuningConfig
from adapterkit.formats.peft import read_peft, write_peft
from adapterkit.methods.prompt import PromptTuning, extend_inputs

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

PROMPT_LENGTH = 3
TOLERANCE = 1e-5
# Outputs must move by more than this when a prompt is on, so no test passes with a prompt that does nothing.
MIN_EFFECT = 1e-3
NEW_TOKENS = 5


# -- helpers --------------------------------------------------------------------------------------

def causal_lm(tiny_model, family):
    """Return a tiny causal LM with the ``tiny_model`` config of ``family``, in eval mode."""
    config = tiny_model(family).config
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def seq2seq_lm(tiny_model, family):
    config = tiny_model(family).config
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(config).eval()


@torch.no_grad()
def randomize_prompt(model, name, std=0.5, seed=3):
    """Draw adapter ``name``'s prompt from normal(0, std) and return it, ``(prompt_length, width)``."""
    prompt = model._adapterkit.modules_of(name)["methods"]["0"]["prompt"].prompt
    generator = torch.Generator().manual_seed(seed)
    prompt.copy_(std * torch.randn(prompt.shape, generator=generator))
    return prompt.detach().clone()


def prompted(base, length=PROMPT_LENGTH, name="prompt", seed=3):
    """Return a copy of ``base`` with an active, randomised prompt adapter, and that prompt."""
    model = adapterkit.init(copy.deepcopy(base))
    model.add_adapter(name, PromptTuningConfig(prompt_length=length), set_active=True)
    return model, randomize_prompt(model, name, seed=seed)


def with_prompt(embeddings, input_ids, prompt):
    """Return ``cat(prompt, embeddings(input_ids))`` for every row: ``(batch, length + n, width)``."""
    tokens = embeddings(input_ids)
    return torch.cat([prompt.unsqueeze(0).expand(input_ids.shape[0], -1, -1), tokens], dim=1)


def ones_before(mask, length):
    return torch.cat([torch.ones(mask.shape[0], length, dtype=mask.dtype), mask], dim=1)


@torch.no_grad()
def outputs(model, **inputs):
    output = model(**inputs)
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


@torch.no_grad()
def reference_outputs(base, input_ids, prompt, attention_mask=None, **inputs):
    """Run the bare model on the prompt and tokens concatenated by hand (the encoder's, for seq2seq models)."""
    embeddings = base.get_encoder().get_input_embeddings() if base.config.is_encoder_decoder \
        else base.get_input_embeddings()
    if attention_mask is not None:
        inputs["attention_mask"] = ones_before(attention_mask, prompt.shape[0])
    return outputs(base, inputs_embeds=with_prompt(embeddings, input_ids, prompt), **inputs)


def assert_close(actual, expected, bare):
    """Assert ``actual`` equals ``expected`` and differs from the bare model's output ``bare``.

    Per-token outputs with the prompt have ``prompt_length`` more positions, so only the last ones
    are compared with ``bare``.
    """
    assert actual.shape == expected.shape
    assert (expected[:, -bare.shape[1]:] - bare).abs().max().item() > MIN_EFFECT
    assert (actual - expected).abs().max().item() < TOLERANCE


def generation_ready(model):
    """Make ``generate()`` produce exactly ``NEW_TOKENS`` tokens: no end-of-sequence id stops it."""
    model.generation_config.eos_token_id = None
    model.generation_config.forced_eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def greedy(model, input_ids, **kwargs):
    """Return the ``(batch, NEW_TOKENS)`` greedy tokens and ``(batch, NEW_TOKENS, vocab)`` logits of ``generate()``."""
    output = model.generate(input_ids=input_ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                            return_dict_in_generate=True, output_logits=True, **kwargs)
    start = 1 if model.config.is_encoder_decoder else input_ids.shape[1]
    return output.sequences[:, start:], torch.stack(output.logits, dim=1)


@torch.no_grad()
def greedy_by_hand(base, input_ids, prompt):
    """Decode greedily with full forward passes of the bare causal LM on ``cat(prompt, tokens)``, no cache."""
    generated = input_ids
    steps = []
    for _ in range(NEW_TOKENS):
        embeds = with_prompt(base.get_input_embeddings(), generated, prompt)
        logits = base(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        steps.append(logits)
        generated = torch.cat([generated, logits.argmax(-1, keepdim=True)], dim=1)
    return generated[:, input_ids.shape[1]:], torch.stack(steps, dim=1)


# -- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(leave_out=(0,)), "leave_out=(0,): prompt tuning adds no module"),
    (dict(prompt_length=0), "prompt_length=0: expected an integer >= 1"),
    (dict(prompt_length=2.5), "prompt_length=2.5"),
    (dict(init="text"), "init='text': expected one of random, vocab"),
], ids=["leave-out", "zero-length", "float-length", "unknown-init"])
def test_config_rejects_invalid(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PromptTuningConfig(**changes)


def test_config_preset_and_round_trip():
    config = PromptTuningConfig(prompt_length=7, init="vocab")

    assert adapterkit.PRESETS["prompt_tuning"] == PromptTuningConfig(prompt_length=20, init="random")
    assert adapterkit.config.config_from_dict(config.to_dict()) == config
    assert config.to_dict()["architecture"] == "prompt_tuning"


# -- the module -----------------------------------------------------------------------------------

def test_module_vocab_init_copies_embedding_rows():
    torch.manual_seed(0)
    embeddings = torch.nn.Embedding(50, 8)
    module = PromptTuning(6, 8)

    module.reset_parameters("vocab", embeddings)

    for row in module.prompt:
        assert (embeddings.weight == row).all(dim=1).any(), "each prompt row is one row of the embedding matrix"


def test_module_random_init_matches_embedding_scale():
    torch.manual_seed(0)
    embeddings = torch.nn.Embedding(2000, 16)
    torch.nn.init.normal_(embeddings.weight, std=0.05)
    module = PromptTuning(200, 16)

    module.reset_parameters("random", embeddings)

    assert module.prompt.std().item() == pytest.approx(0.05, rel=0.1)
    assert abs(module.prompt.mean().item()) < 0.01


def test_module_forward_repeats_prompt_per_row():
    module = PromptTuning(2, 3)
    with torch.no_grad():
        module.prompt.copy_(torch.arange(6.0).reshape(2, 3))

    batch = module(4)

    assert batch.shape == (4, 2, 3)
    assert all(torch.equal(row, module.prompt) for row in batch)


def test_extend_inputs_inserts_after_left_padding():
    module = PromptTuning(2, 1)
    with torch.no_grad():
        module.prompt.copy_(torch.tensor([[-1.0], [-2.0]]))
    tokens = torch.tensor([[[10.0], [11.0], [12.0]], [[20.0], [21.0], [22.0]]])
    inputs = {
        "inputs_embeds": tokens,
        "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]),
        "position_ids": torch.tensor([[0, 1, 2], [0, 0, 1]]),
        "token_type_ids": torch.tensor([[1, 1, 1], [1, 1, 1]]),
        "labels": torch.tensor([[5, 6, 7], [8, 9, 4]]),
        "start_positions": torch.tensor([1, 2]),
    }

    assert extend_inputs(inputs, [module], embeddings=None, token_labels=True)

    # Row 0 has no padding: the prompt comes first. Row 1 has one padded position, which stays in front.
    assert inputs["inputs_embeds"][..., 0].tolist() == [[-1, -2, 10, 11, 12], [20, -1, -2, 21, 22]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    # The prompt takes over the positions from the row's first real token on. The tokens move up by 2.
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4], [2, 0, 1, 2, 3]]
    assert inputs["token_type_ids"].tolist() == [[0, 0, 1, 1, 1], [1, 0, 0, 1, 1]]
    assert inputs["labels"].tolist() == [[-100, -100, 5, 6, 7], [8, -100, -100, 9, 4]]
    assert inputs["start_positions"].tolist() == [3, 4]
    assert inputs["input_ids"] is None


def test_extend_inputs_continues_cached_sequence():
    module = PromptTuning(2, 1)
    cache = transformers.DynamicCache()
    cache.update(torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4), 0)
    inputs = {"input_ids": torch.tensor([[7]]), "cache": cache, "attention_mask": torch.tensor([[1, 1, 1, 1, 1]]),
              "position_ids": torch.tensor([[4]])}

    assert extend_inputs(inputs, [module], embeddings=None)

    # The cache contains the prompt already: the token stays, the mask and position make room for the prompt.
    assert inputs["input_ids"].tolist() == [[7]]
    assert "inputs_embeds" not in inputs
    assert inputs["attention_mask"].tolist() == [[1] * 7]
    assert inputs["position_ids"].tolist() == [[6]]


def test_extend_inputs_rejects_4d_mask():
    inputs = {"inputs_embeds": torch.zeros(1, 3, 2), "attention_mask": torch.ones(1, 1, 3, 3)}

    with pytest.raises(ValueError, match=re.escape("attention_mask is (1, 1, 3, 3)")):
        extend_inputs(inputs, [PromptTuning(2, 2)], embeddings=None)


# -- on a model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert", "gpt2", "llama", "gemma3_text"])
def test_prompt_matches_manual_concatenation(family, tiny_model, tiny_inputs):
    base = tiny_model(family)
    ids = tiny_inputs(family)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding: the prompt stays in front
    model, prompt = prompted(base)

    expected = reference_outputs(base, ids, prompt, attention_mask=mask)

    assert_close(outputs(model, input_ids=ids, attention_mask=mask), expected,
                 outputs(base, input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_prompt_goes_to_encoder_only(family, tiny_model, tiny_inputs):
    base = seq2seq_lm(tiny_model, family)
    ids = tiny_inputs(family)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    decoder_ids = ids[:, :4]
    model, prompt = prompted(base)

    expected = reference_outputs(base, ids, prompt, attention_mask=mask, decoder_input_ids=decoder_ids)
    actual = outputs(model, input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)

    assert actual.shape == (2, 4, base.config.vocab_size)
    assert_close(actual, expected, outputs(base, input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids))


def test_prompt_has_embedding_width(tiny_model):
    # ELECTRA's tiny config embeds tokens in 16 dimensions and projects them to the hidden size of 32.
    model = adapterkit.init(tiny_model("electra"))
    model.add_adapter("prompt", PromptTuningConfig(prompt_length=4))

    assert model._adapterkit.modules_of("prompt")["methods"]["0"]["prompt"].prompt.shape == (4, 16)


def test_inactive_or_deleted_prompt_leaves_model_bare(tiny_model, tiny_inputs):
    base = tiny_model("llama")
    ids = tiny_inputs("llama")
    model, _ = prompted(base)
    bare = outputs(base, input_ids=ids)

    model.set_active_adapters(None)
    inactive = outputs(model, input_ids=ids)
    model.delete_adapter("prompt")
    deleted = outputs(model, input_ids=ids)

    assert torch.equal(inactive, bare)
    assert torch.equal(deleted, bare)
    assert not model._adapterkit.sites


def test_two_active_prompts_concatenate(tiny_model, tiny_inputs):
    base = tiny_model("bert")
    ids = tiny_inputs("bert")
    model, first = prompted(base, length=2, name="first", seed=3)
    model.add_adapter("second", PromptTuningConfig(prompt_length=3))
    second = randomize_prompt(model, "second", seed=4)

    model.set_active_adapters(["first", "second"])

    expected = reference_outputs(base, ids, torch.cat([first, second]))
    assert_close(outputs(model, input_ids=ids), expected, outputs(base, input_ids=ids))


def test_union_with_lora(tiny_model, tiny_inputs):
    model = adapterkit.init(tiny_model("gpt2"))
    model.add_adapter("mixed", ConfigUnion(PromptTuningConfig(prompt_length=2), LoRAConfig(r=2)), set_active=True)

    logits = outputs(model, input_ids=tiny_inputs("gpt2"))

    assert logits.shape == (2, 3)
    assert sorted(model._adapterkit.modules_of("mixed")["methods"]["0"].state_dict()) == ["prompt.prompt"]


def test_gradient_reaches_prompt_only(tiny_model, tiny_inputs):
    base = causal_lm(tiny_model, "llama")
    ids = tiny_inputs("llama")
    model, prompt = prompted(base)
    model.train_adapter("prompt")

    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()

    # The labels get -100 for the prompt, so the loss is the bare model's loss on the prompted input.
    with torch.no_grad():
        ignored = torch.full((2, PROMPT_LENGTH), -100)
        expected = base(inputs_embeds=with_prompt(base.get_input_embeddings(), ids, prompt),
                        labels=torch.cat([ignored, ids], dim=1)).loss
    torch.testing.assert_close(loss.detach(), expected, atol=TOLERANCE, rtol=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with_gradient = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trainable == {"adapterkit.adapter_prompt.methods.0.prompt.prompt"}
    assert with_gradient == trainable
    assert model._adapterkit.modules_of("prompt")["methods"]["0"]["prompt"].prompt.grad.abs().sum() > 0


def test_save_load_round_trip(tiny_model, tiny_inputs, tmp_path):
    base = tiny_model("roberta")
    ids = tiny_inputs("roberta")
    model, _ = prompted(base)
    expected = outputs(model, input_ids=ids)

    model.save_adapter(tmp_path, "prompt")
    fresh = adapterkit.init(copy.deepcopy(base))
    fresh.load_adapter(tmp_path)

    assert fresh.adapter_config("prompt") == PromptTuningConfig(prompt_length=PROMPT_LENGTH)
    assert sorted(fresh._adapterkit.modules_of("prompt").state_dict()) == [
        "head.classifier.dense.bias", "head.classifier.dense.weight", "head.classifier.out_proj.bias",
        "head.classifier.out_proj.weight", "methods.0.prompt.prompt"]
    assert_close(outputs(fresh, input_ids=ids), expected, outputs(base, input_ids=ids))


def test_merge_rejected(tiny_model):
    model, _ = prompted(tiny_model("bert"))

    with pytest.raises(ValueError, match="prompt_tuning, which cannot be merged"):
        model.merge_adapter("prompt")


# -- generation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_cached_and_uncached_agree(family, tiny_model, tiny_inputs):
    base = generation_ready(causal_lm(tiny_model, family))
    model, prompt = prompted(base)
    ids = tiny_inputs(family)[:1]

    expected_tokens, expected_logits = greedy_by_hand(base, ids, prompt)
    first_token = outputs(model, input_ids=ids)[:, -1].argmax(-1)

    assert (expected_logits - greedy(base, ids)[1]).abs().max() > MIN_EFFECT
    for use_cache in (True, False):
        tokens, logits = greedy(model, ids, use_cache=use_cache)
        assert tokens.tolist() == expected_tokens.tolist(), f"use_cache={use_cache}"
        assert tokens[0, 0] == first_token[0], f"use_cache={use_cache}"
        torch.testing.assert_close(logits, expected_logits, atol=TOLERANCE, rtol=0)


def test_generate_beam_search_cached_matches_uncached(tiny_model, tiny_inputs):
    model, _ = prompted(generation_ready(causal_lm(tiny_model, "llama")))
    ids = tiny_inputs("llama")[:1]

    beams = dict(num_beams=2, num_return_sequences=2, output_scores=True, max_new_tokens=NEW_TOKENS,
                 do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, use_cache=True, **beams)
        uncached = model.generate(input_ids=ids, use_cache=False, **beams)

    assert cached.sequences.tolist() == uncached.sequences.tolist()
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=TOLERANCE, rtol=0)


# Gemma 3's tiny config has a sliding window of 4, so a prompt placed before the padding would
# fall out of the window sooner than in the row alone.
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_left_padded_row_generates_as_alone(family, tiny_model, tiny_inputs):
    model, _ = prompted(generation_ready(causal_lm(tiny_model, family)))
    ids = tiny_inputs(family)
    batch = ids.clone()
    batch[1, :3] = 0
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    batch_tokens, batch_logits = greedy(model, batch, attention_mask=mask)
    alone_tokens, alone_logits = greedy(model, ids[1:, 3:])

    assert batch_tokens[1].tolist() == alone_tokens[0].tolist()
    torch.testing.assert_close(batch_logits[1], alone_logits[0], atol=TOLERANCE, rtol=0)


# -- PEFT checkpoints -----------------------------------------------------------------------------

def peft_prompt_model(base, task, directory, **options):
    """Build PEFT's prompt tuning on a copy of ``base``, randomise the prompt and head, save it, return the model."""
    config = peft.PromptTuningConfig(num_virtual_tokens=PROMPT_LENGTH, task_type=task, **options)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "prompt_encoder" in name or "modules_to_save" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    peft_model.eval()
    peft_model.save_pretrained(str(directory))
    return peft_model


def base_for(task, family, tiny_model):
    if task == "CAUSAL_LM":
        return causal_lm(tiny_model, family)
    if task == "SEQ_2_SEQ_LM":
        return seq2seq_lm(tiny_model, family)
    return tiny_model(family)


def comparison_inputs(family, task, tiny_inputs):
    ids = tiny_inputs(family)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


PEFT_CASES = [
    ("bert", "SEQ_CLS"),
    ("roberta", "SEQ_CLS"),
    ("gpt2", "SEQ_CLS"),
    ("llama", "SEQ_CLS"),
    ("gpt2", "CAUSAL_LM"),
    ("llama", "CAUSAL_LM"),
    ("t5", "SEQ_2_SEQ_LM"),
]
PEFT_IDS = [f"{family}-{task}" for family, task in PEFT_CASES]


@pytest.mark.parametrize("family, task", PEFT_CASES, ids=PEFT_IDS)
def test_from_peft_matches(family, task, tiny_model, tiny_inputs, tmp_path):
    base = base_for(task, family, tiny_model)
    inputs = comparison_inputs(family, task, tiny_inputs)
    peft_model = peft_prompt_model(base, task, tmp_path)
    model = adapterkit.init(copy.deepcopy(base))

    name = model.load_adapter(tmp_path)

    assert model.adapter_config(name) == PromptTuningConfig(prompt_length=PROMPT_LENGTH)
    assert_close(outputs(model, **inputs), outputs(peft_model, **inputs), outputs(base, **inputs))


@pytest.mark.parametrize("family, task", PEFT_CASES, ids=PEFT_IDS)
def test_to_peft_matches(family, task, tiny_model, tiny_inputs, tmp_path):
    base = base_for(task, family, tiny_model)
    inputs = comparison_inputs(family, task, tiny_inputs)
    model, _ = prompted(base)

    model.save_adapter(tmp_path, "prompt", format="peft")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["peft_type"], written["task_type"]) == ("PROMPT_TUNING", task)
    assert written["num_transformer_submodules"] == 1
    assert_close(outputs(model, **inputs), outputs(peft_model, **inputs), outputs(base, **inputs))


def test_from_peft_seq2seq_keeps_encoder_rows(tiny_model, tmp_path):
    base = seq2seq_lm(tiny_model, "t5")
    peft_model = peft_prompt_model(base, "SEQ_2_SEQ_LM", tmp_path)
    saved = peft_model.prompt_encoder["default"].embedding.weight

    checkpoint = read_peft(adapterkit.init(copy.deepcopy(base))._adapterkit, tmp_path)

    # PEFT's seq2seq config has two submodules, so it saves 2 * 3 rows and reads the first 3.
    assert saved.shape == (2 * PROMPT_LENGTH, 32)
    assert torch.equal(checkpoint.weights["methods.0.prompt.prompt"], saved[:PROMPT_LENGTH])
    assert any("only those are loaded" in note for note in checkpoint.info["notes"])


def test_from_peft_sample_vocab_init(tiny_model, tmp_path):
    base = tiny_model("bert")
    peft_prompt_model(base, "SEQ_CLS", tmp_path, prompt_tuning_init="SAMPLE_VOCAB")

    checkpoint = read_peft(adapterkit.init(copy.deepcopy(base))._adapterkit, tmp_path)

    assert checkpoint.config == PromptTuningConfig(prompt_length=PROMPT_LENGTH, init="vocab")


def test_generate_matches_peft_uncached(tiny_model, tiny_inputs, tmp_path):
    base = generation_ready(causal_lm(tiny_model, "llama"))
    ids = tiny_inputs("llama")
    peft_model = peft_prompt_model(base, "CAUSAL_LM", tmp_path)
    model = adapterkit.init(copy.deepcopy(base))
    model.load_adapter(tmp_path)

    expected_tokens, expected_logits = greedy(peft_model, ids, use_cache=False)
    tokens, logits = greedy(model, ids, use_cache=True)

    assert tokens.tolist() == expected_tokens.tolist()
    torch.testing.assert_close(logits, expected_logits, atol=TOLERANCE, rtol=0)
    assert (logits - greedy(base, ids)[1]).abs().max() > MIN_EFFECT


def test_generate_matches_peft_seq2seq(tiny_model, tiny_inputs, tmp_path):
    base = generation_ready(seq2seq_lm(tiny_model, "t5"))
    ids = tiny_inputs("t5")
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    peft_model = peft_prompt_model(base, "SEQ_2_SEQ_LM", tmp_path)
    model = adapterkit.init(copy.deepcopy(base))
    model.load_adapter(tmp_path)

    expected_tokens, expected_logits = greedy(peft_model, ids, attention_mask=mask)
    tokens, logits = greedy(model, ids, attention_mask=mask)

    assert tokens.tolist() == expected_tokens.tolist()
    torch.testing.assert_close(logits, expected_logits, atol=TOLERANCE, rtol=0)
    assert (logits - greedy(base, ids, attention_mask=mask)[1]).abs().max() > MIN_EFFECT


def test_read_rejects_other_width(tiny_model, tmp_path):
    peft_prompt_model(tiny_model("bert", hidden_size=16), "SEQ_CLS", tmp_path, modules_to_save=[])

    with pytest.raises(ValueError, match=re.escape("prompt_embeddings has shape (3, 16)")):
        read_peft(adapterkit.init(tiny_model("bert"))._adapterkit, tmp_path)


def test_write_rejects_encoder_decoder_classifier(tiny_model, tmp_path):
    model, _ = prompted(tiny_model("t5"))

    with pytest.raises(ValueError, match="SEQ_CLS wrapper cannot run prompt tuning on a T5ForSequenceClassification"):
        write_peft(model._adapterkit, "prompt", tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
