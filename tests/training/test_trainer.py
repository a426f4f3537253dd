"""fit, evaluate and predict on a tiny BERT with a word-level tokenizer built in memory."""

import random

import pytest
import torch
from adapter_helpers import count_forward_calls, word_tokenizer

import adapterkit
from adapterkit.training.trainer import CHECKPOINT_FILE

FILLER_WORDS = ["movie", "film", "plot", "really", "very", "the", "was", "a"]
VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "meh", *FILLER_WORDS]


def make_texts(count, seed, labels=("good", "bad")):
    """Return ``count`` texts of three filler words plus one label word, and that label word for each.

    The label word is the only signal, so the task is separable. Labels alternate, so each is an equal share
    of the data.
    """
    generator = random.Random(seed)
    texts, text_labels = [], []
    for index in range(count):
        label = labels[index % len(labels)]
        words = generator.sample(FILLER_WORDS, 3)
        words.insert(generator.randrange(4), label)
        texts.append(" ".join(words))
        text_labels.append(label)
    return texts, text_labels


@pytest.fixture
def tokenizer():
    """The word-level tokenizer over VOCABULARY."""
    return word_tokenizer(VOCABULARY)


@pytest.fixture
def model(tiny_model):
    """A tiny BERT with a trainable Houlsby adapter ``task`` and a fresh 3-label head.

    An initializer range of 0.2 and no dropout let a frozen random BERT pass the label word on to the
    first token within a few hundred steps. With the default of 0.02, the adapter did not learn the task.
    """
    bert = tiny_model("bert", initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    adapterkit.init(bert)
    bert.add_adapter("task", "houlsby")
    bert.train_adapter("task")
    return bert


FIT_OPTIONS = dict(batch_size=4, learning_rate=2e-2, progress=False)




# -- learning ---------------------------------------------------------------------------------


def test_fit_learns_separable_task(model, tokenizer):
    texts, labels = make_texts(48, seed=0)
    test_texts, test_labels = make_texts(16, seed=1)

    history = model.fit(texts, labels, tokenizer=tokenizer, epochs=8, **FIT_OPTIONS)
    scores = model.evaluate(test_texts, test_labels)

    assert len(history.epochs) == 8
    assert history.epochs[-1]["train_loss"] < 0.5 * history.epochs[0]["train_loss"]
    assert scores["accuracy"] >= 0.8
    assert scores["num_examples"] == 16


def test_fit_changes_only_adapter(model, tokenizer):
    base_state = {key: value.clone() for key, value in model.bert.state_dict().items()}
    adapter_state = {key: value.clone() for key, value in model._adapterkit.modules_of("task").state_dict().items()}
    texts, labels = make_texts(16, seed=0)

    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)

    after = model.bert.state_dict()
    assert not [key for key, value in base_state.items() if not torch.equal(after[key], value)]
    adapter_after = model._adapterkit.modules_of("task")["methods"]["0"]["layers"].state_dict()
    assert not [key for key, value in adapter_after.items() if torch.equal(adapter_state[f"methods.0.layers.{key}"], value)]


def test_fit_keeps_eval_mode(model, tokenizer):
    texts, labels = make_texts(8, seed=0)

    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)

    assert model.training is False


# -- labels -----------------------------------------------------------------------------------


def test_string_labels_round_trip(model, tokenizer):
    texts, labels = make_texts(48, seed=0)

    model.fit(texts, labels, tokenizer=tokenizer, epochs=8, **FIT_OPTIONS)
    predictions = model.predict(["good film", "bad plot", "the movie was good"])

    assert predictions.label_names == ["bad", "good"]
    assert model.config.id2label == {0: "bad", 1: "good"}
    assert model.config.label2id == {"bad": 0, "good": 1}
    assert predictions.labels == ["good", "bad", "good"]
    assert all(isinstance(label, str) for label in predictions.labels)
    assert len(predictions.probabilities[0]) == 2


def test_integer_labels_stay_integers(model, tokenizer):
    texts, words = make_texts(16, seed=0)
    labels = [7 if word == "good" else 3 for word in words]

    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    predictions = model.predict(texts[:4])

    assert predictions.label_names == [3, 7]
    assert all(type(label) is int for label in predictions.labels)
    assert set(predictions.labels) <= {3, 7}


def test_predict_single_string(model, tokenizer):
    texts, labels = make_texts(8, seed=0)
    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)

    predictions = model.predict("good film")

    assert len(predictions) == 1
    assert predictions.confidences[0] == max(predictions.probabilities[0])


def test_fresh_head_resized(model, tokenizer):
    texts, labels = make_texts(8, seed=0)
    assert model.classifier.out_features == 3

    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)

    assert model.classifier.out_features == 2
    assert model._adapterkit.modules_of("task")["head"]["classifier"] is model.classifier


def test_trained_head_not_replaced(model, tokenizer):
    texts, labels = make_texts(8, seed=0)
    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    trained_weight = model.classifier.weight.detach().clone()
    other_texts, other_labels = make_texts(9, seed=1, labels=("good", "bad", "meh"))

    with pytest.raises(ValueError, match="replace_head"):
        model.fit(other_texts, other_labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    assert torch.equal(model.classifier.weight, trained_weight)
    assert model.config.id2label == {0: "bad", 1: "good"}


def test_replace_head_starts_new_head(model, tokenizer):
    texts, labels = make_texts(8, seed=0)
    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    other_texts, other_labels = make_texts(9, seed=1, labels=("good", "bad", "meh"))

    model.fit(other_texts, other_labels, tokenizer=tokenizer, epochs=1, replace_head=True, **FIT_OPTIONS)

    assert model.classifier.out_features == 3
    assert model.config.id2label == {0: "bad", 1: "good", 2: "meh"}


def test_replace_head_same_label_count(model, tokenizer):
    texts, labels = make_texts(8, seed=0)
    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    trained_head = model.classifier
    trained_weight = trained_head.weight.detach().clone()
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        torch.equal(module.classifier.weight, trained_weight)), with_kwargs=True)

    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, replace_head=True, **FIT_OPTIONS)
    handle.remove()

    assert model.classifier is not trained_head
    assert seen[0] is False


def test_subset_labels_keep_head(model, tokenizer):
    texts, labels = make_texts(9, seed=0, labels=("good", "bad", "meh"))
    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    two_label_texts, two_labels = make_texts(8, seed=1)

    model.fit(two_label_texts, two_labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)

    assert model.classifier.out_features == 3
    assert model.config.id2label == {0: "bad", 1: "good", 2: "meh"}


def test_single_label_raises(model, tokenizer):
    texts, _ = make_texts(4, seed=0)

    with pytest.raises(ValueError, match="single label"):
        model.fit(texts, ["good"] * 4, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)


def test_evaluate_unseen_label_raises(model, tokenizer):
    texts, labels = make_texts(8, seed=0)
    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    calls, handle = count_forward_calls(model)

    with pytest.raises(ValueError, match="meh"):
        model.evaluate(["meh film", "good film"], ["meh", "good"])
    handle.remove()
    assert calls[0] == 0


def test_validation_unseen_label_raises(model, tokenizer):
    texts, labels = make_texts(8, seed=0)
    calls, handle = count_forward_calls(model)

    with pytest.raises(ValueError, match="meh"):
        model.fit(texts, labels, validation_data=["meh film"], validation_labels=["meh"], tokenizer=tokenizer,
                  epochs=1, **FIT_OPTIONS)
    handle.remove()
    assert calls[0] == 0
    assert model.classifier.out_features == 3
    assert model._adapterkit.entries["task"].labels is None


# -- argument checks --------------------------------------------------------------------------


def test_fit_without_trainable_adapter_raises(tiny_model, tokenizer):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("task")
    texts, labels = make_texts(8, seed=0)

    with pytest.raises(ValueError, match="train_adapter"):
        model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    assert model.classifier.out_features == 3


def test_fit_with_frozen_active_adapter_raises(model, tokenizer):
    model.add_adapter("frozen")
    model.set_active_adapters("frozen")
    texts, labels = make_texts(8, seed=0)

    with pytest.raises(ValueError, match="train_adapter"):
        model.fit(texts, labels, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)


def test_fit_invalid_arguments_all_reported(model, tokenizer):
    texts, labels = make_texts(8, seed=0)

    with pytest.raises(ValueError) as error:
        model.fit(texts, labels, tokenizer=tokenizer, epochs=0, batch_size=0, learning_rate=-1.0, progress=False)
    message = str(error.value)
    assert "epochs=0" in message
    assert "batch_size=0" in message
    assert "learning_rate=-1.0" in message


def test_fit_without_tokenizer_raises(model):
    texts, labels = make_texts(8, seed=0)

    with pytest.raises(ValueError, match="tokenizer="):
        model.fit(texts, labels, epochs=1, **FIT_OPTIONS)


# -- validation and early stopping ------------------------------------------------------------


def test_fit_without_validation_keeps_last_epoch(model, tokenizer):
    texts, labels = make_texts(8, seed=0)

    history = model.fit(texts, labels, tokenizer=tokenizer, epochs=2, **FIT_OPTIONS)

    assert history.best_epoch == 2
    assert history.stopped_early is False
    assert [row["epoch"] for row in history.epochs] == [1, 2]


def test_early_stopping_keeps_best_epoch(model, tokenizer):
    texts, labels = make_texts(48, seed=0)
    validation_texts, validation_words = make_texts(16, seed=1)
    # Validation labels are the opposite of the training rule, so validation loss rises as the model learns.
    flipped = ["bad" if word == "good" else "good" for word in validation_words]

    history = model.fit(texts, labels, validation_data=validation_texts, validation_labels=flipped,
                        tokenizer=tokenizer, epochs=8, patience=2, **FIT_OPTIONS)
    losses = [row["val_loss"] for row in history.epochs]
    scores = model.evaluate(validation_texts, flipped)

    assert history.stopped_early is True
    assert len(history.epochs) < 8
    assert history.best_epoch == losses.index(min(losses)) + 1
    assert len(history.epochs) - history.best_epoch == 2
    assert scores["loss"] == pytest.approx(min(losses), abs=1e-5)


def test_validation_metrics_recorded(model, tokenizer):
    texts, labels = make_texts(8, seed=0)
    validation_texts, validation_labels = make_texts(4, seed=1)

    history = model.fit(texts, labels, validation_data=validation_texts, validation_labels=validation_labels,
                        tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)

    assert sorted(history.epochs[0]) == ["epoch", "train_loss", "val_accuracy", "val_f1", "val_loss",
                                          "val_precision", "val_recall"]
    assert history.history["train_loss"] == [history.epochs[0]["train_loss"]]


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_written(model, tokenizer, tmp_path):
    texts, labels = make_texts(8, seed=0)

    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, checkpoint_dir=tmp_path, **FIT_OPTIONS)

    assert (tmp_path / CHECKPOINT_FILE).is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == [CHECKPOINT_FILE]


def test_checkpoint_resumes(tiny_model, tokenizer, tmp_path):
    texts, labels = make_texts(16, seed=0)
    first = adapterkit.init(tiny_model("bert"))
    first.add_adapter("task", "houlsby")
    first.train_adapter("task")
    saved = first.fit(texts, labels, tokenizer=tokenizer, epochs=2, checkpoint_dir=tmp_path, **FIT_OPTIONS)

    # A new process after a crash rebuilds the same model and calls fit with more epochs.
    second = adapterkit.init(tiny_model("bert"))
    second.add_adapter("task", "houlsby")
    second.train_adapter("task")
    resumed = second.fit(texts, labels, tokenizer=tokenizer, epochs=4, checkpoint_dir=tmp_path, **FIT_OPTIONS)

    assert len(saved.epochs) == 2
    assert len(resumed.epochs) == 4
    assert resumed.epochs[:2] == saved.epochs
    assert [row["epoch"] for row in resumed.epochs] == [1, 2, 3, 4]
    assert len(torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["history"]) == 4


def test_checkpoint_finished_run_does_not_retrain(model, tokenizer, tmp_path):
    texts, labels = make_texts(8, seed=0)
    model.fit(texts, labels, tokenizer=tokenizer, epochs=2, checkpoint_dir=tmp_path, **FIT_OPTIONS)
    calls, handle = count_forward_calls(model)

    history = model.fit(texts, labels, tokenizer=tokenizer, epochs=2, checkpoint_dir=tmp_path, **FIT_OPTIONS)
    handle.remove()

    assert len(history.epochs) == 2
    assert calls[0] == 0


def test_checkpoint_other_data_raises(model, tokenizer, tmp_path):
    texts, labels = make_texts(8, seed=0)
    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, checkpoint_dir=tmp_path, **FIT_OPTIONS)
    other_texts, other_labels = make_texts(8, seed=5)

    with pytest.raises(ValueError, match="another training run"):
        model.fit(other_texts, other_labels, tokenizer=tokenizer, epochs=2, checkpoint_dir=tmp_path, **FIT_OPTIONS)
