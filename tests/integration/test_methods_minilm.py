"""Every adapter method trains on the real packaged all-MiniLM-L6-v2: a few steps lower the loss."""

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import adapterkit
from adapterkit.samples import default_model_path, load_sample
from adapterkit.training.data import split_train_test, texts_and_labels

pytestmark = pytest.mark.slow

METHODS = ["houlsby", "pfeiffer", "parallel", "conv", "lora", "ia3", "prefix_tuning", "compacter", "compacter++",
           "mam", "unipelt", "invertible"]
STEPS = 8
# (IA)^3 vectors and the tiny PHM factors move slowly at the rate that suits the other methods, and the
# parallel adapter, which adds four times its output, overshoots at it.
LEARNING_RATES = {"ia3": 3e-2, "compacter": 2e-2, "compacter++": 2e-2, "parallel": 1e-3}


@pytest.fixture(scope="module")
def batch():
    """20 BBC News articles, stratified over the five topics, tokenised to 48 tokens."""
    texts, labels = texts_and_labels(load_sample("bbc-news"))
    _, _, texts, labels = split_train_test(texts, labels, test_size=20 / len(texts), seed=3)
    classes = sorted(set(labels))
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    encoded = tokenizer(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")
    encoded["labels"] = torch.tensor([classes.index(label) for label in labels])
    return dict(encoded)


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=5)


@torch.no_grad()
def evaluation_loss(model, batch):
    model.eval()
    loss = model(**batch).loss.item()
    model.train()
    return loss


@pytest.mark.parametrize("method", METHODS)
def test_method_lowers_loss(base_model, batch, method):
    model = adapterkit.init(copy.deepcopy(base_model))
    torch.manual_seed(1)
    model.add_adapter("topic", method)
    model.train_adapter("topic")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATES.get(method, 5e-3))

    before = evaluation_loss(model, batch)
    model.train()
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    after = evaluation_loss(model, batch)

    base_ids = {id(p) for p in base_model.parameters()}
    assert not [p for p in trainable if id(p) in base_ids]
    assert after < 0.85 * before, (method, before, after)
