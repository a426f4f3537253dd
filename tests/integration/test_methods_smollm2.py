"""Every adapter method trains on the real SmolLM2-135M-Instruct (Llama), loaded from the packaged GGUF file."""

import copy

import pytest
import torch

import adapterkit
from adapterkit import LoRAConfig
from adapterkit.samples import load_default_causal_lm

pytestmark = pytest.mark.slow

METHODS = ["houlsby", "pfeiffer", "parallel", "conv", "lora", "ia3", "prefix_tuning", "compacter", "compacter++",
           "mam", "unipelt", "invertible"]
# Parallel adapters read the raw residual stream, whose values in SmolLM2 reach the hundreds, and add
# four times their output: they need a smaller step than the other methods.
LEARNING_RATES = {"parallel": 1e-4, "mam": 1e-4}
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Lyon, a city of silk and lights."


@pytest.fixture(scope="module")
def base():
    return load_default_causal_lm()


def chat_prompt(tokenizer, question):
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def training_batch(base):
    """The question and answer as one chat, with the loss on the answer tokens only."""
    _, tokenizer = base
    prompt = chat_prompt(tokenizer, QUESTION)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + ANSWER + "<|im_end|>", add_special_tokens=False)["input_ids"]
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return {"input_ids": torch.tensor([full_ids]), "labels": torch.tensor([labels])}


def train_steps(model, batch, steps, learning_rate):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def answer_loss(model, batch):
    model.eval()
    return model(**batch).loss.item()


@pytest.mark.parametrize("method", METHODS)
def test_method_lowers_loss(base, training_batch, method):
    model = adapterkit.init(copy.deepcopy(base[0]))
    torch.manual_seed(0)
    model.add_adapter("chat", method)
    model.train_adapter("chat")

    before = answer_loss(model, training_batch)
    train_steps(model, training_batch, steps=5, learning_rate=LEARNING_RATES.get(method, 1e-3))
    after = answer_loss(model, training_batch)

    assert after < 0.9 * before, (method, before, after)


def test_lora_changes_generated_answer(base, training_batch):
    model, tokenizer = base
    model = adapterkit.init(copy.deepcopy(model))
    prompt = tokenizer(chat_prompt(tokenizer, QUESTION), return_tensors="pt", add_special_tokens=False)

    def greedy_answer():
        with torch.no_grad():
            output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        return tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)

    before = greedy_answer()
    torch.manual_seed(0)
    model.add_adapter("lyon", LoRAConfig(r=8, alpha=16, targets=("query", "key", "value", "attention_output")))
    model.train_adapter("lyon")
    train_steps(model, training_batch, steps=12, learning_rate=3e-3)
    after = greedy_answer()
    model.set_active_adapters(None)
    bare = greedy_answer()

    assert "Paris" in before
    assert "Lyon" in after, after
    assert bare == before
