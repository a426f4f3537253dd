"""Integration tests on the real packaged all-MiniLM-L6-v2 and the BBC News sample."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import adapterkit
from adapterkit import AdapterConfig
from adapterkit.samples import default_model_path, load_sample
from adapterkit.training.data import split_train_test, texts_and_labels

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bbc_split():
    """About 400 training and 200 test articles, stratified over the five topics."""
    texts, labels = texts_and_labels(load_sample("bbc-news"))
    _, _, texts, labels = split_train_test(texts, labels, test_size=0.27, seed=1)
    return split_train_test(texts, labels, test_size=0.33, seed=0)


def test_readme_example_trains(bbc_split):
    train_data, train_labels, test_texts, test_labels = bbc_split
    MODEL_DIR = default_model_path()
    torch.manual_seed(0)
    # The example from the README, as written there.
    model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR)
    adapterkit.init(model)
    adapter_config = AdapterConfig(mh_adapter=True, output_adapter=True, non_linearity="relu")
    model.add_adapter("sentiment", config=adapter_config)
    model.train_adapter(["sentiment"])
    history = model.fit(train_data, labels=train_labels, epochs=1, batch_size=8, learning_rate=3e-3,
                        max_length=64, progress=False)

    metrics = model.evaluate(test_texts, test_labels, max_length=64)
    majority = max(test_labels.count(label) for label in set(test_labels)) / len(test_labels)
    assert len(history.epochs) == 1
    assert metrics["accuracy"] > majority + 0.3, (metrics["accuracy"], majority)


def test_minilm_save_load_same_logits(bbc_split, tmp_path):
    train_data, train_labels, test_texts, _ = bbc_split
    torch.manual_seed(0)
    model = adapterkit.init(AutoModelForSequenceClassification.from_pretrained(default_model_path()))
    model.add_adapter("topic", config="pfeiffer")
    model.train_adapter("topic")
    model.fit(train_data[::6], train_labels[::6], epochs=1, max_length=32, progress=False)
    before = model.predict(test_texts[::25], max_length=32)
    model.save_adapter(tmp_path / "topic", "topic")

    fresh = adapterkit.init(AutoModelForSequenceClassification.from_pretrained(default_model_path()))
    fresh.load_adapter(tmp_path / "topic")
    after = fresh.predict(test_texts[::25], max_length=32)
    assert after.labels == before.labels
    assert torch.allclose(torch.tensor(after.probabilities), torch.tensor(before.probabilities), atol=1e-5)
    assert fresh.config.id2label == model.config.id2label


def test_minilm_base_weights_frozen(bbc_split):
    train_data, train_labels, _, _ = bbc_split
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path())
    base = {name: p.detach().clone() for name, p in model.bert.named_parameters()}
    adapterkit.init(model)
    model.add_adapter("topic", config="houlsby")
    model.train_adapter("topic")
    model.fit(train_data[::12], train_labels[::12], epochs=1, max_length=32, progress=False)
    changed = [name for name, p in model.bert.named_parameters() if not torch.equal(p, base[name])]
    assert changed == []
