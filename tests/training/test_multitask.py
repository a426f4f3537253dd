"""Multi-task fit: task sampling, one head per task, isolation, learning, errors and resuming.

The tiny BERT reads texts built in memory from a word-level tokenizer. Every text contains one
sentiment word (good, bad) and one topic word (sport, music, food), chosen independently, so the
sentiment task and the topic task each depend on a different word.
"""

import random

import datasets
import pytest
import torch
from adapter_helpers import count_forward_calls, word_tokenizer

import adapterkit
from adapterkit.training.data import task_schedule
from adapterkit.training.trainer import CHECKPOINT_FILE

FILLER_WORDS = ["movie", "film", "plot", "really", "very", "the", "was", "a"]
SENTIMENT_WORDS = ("good", "bad")
TOPIC_WORDS = ("sport", "music", "food")
VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SENTIMENT_WORDS, *TOPIC_WORDS, *FILLER_WORDS]


def make_examples(count, seed):
    """Return ``count`` texts with the sentiment word and the topic word of each.

    Each text is one filler word plus one sentiment and one topic word in random order. With
    three filler words, the topic task reached only 0.54 test accuracy after 8 single-task epochs.
    Text ``i`` gets sentiment ``i % 2`` and topic ``(i // 2) % 3``, so every pair of labels is
    an equal share of the data and neither label predicts the other.
    """
    generator = random.Random(seed)
    texts, sentiments, topics = [], [], []
    for index in range(count):
        sentiment = SENTIMENT_WORDS[index % 2]
        topic = TOPIC_WORDS[(index // 2) % 3]
        words = [generator.choice(FILLER_WORDS)]
        words.insert(generator.randrange(len(words) + 1), sentiment)
        words.insert(generator.randrange(len(words) + 1), topic)
        texts.append(" ".join(words))
        sentiments.append(sentiment)
        topics.append(topic)
    return texts, sentiments, topics


def sentiment_data(count, seed):
    texts, sentiments, _ = make_examples(count, seed)
    return texts, sentiments


def topic_data(count, seed):
    texts, _, topics = make_examples(count, seed)
    return texts, topics


@pytest.fixture
def tokenizer():
    """The word-level tokenizer over VOCABULARY."""
    return word_tokenizer(VOCABULARY)


def build_model(tiny_model, **changes):
    """Return a tiny BERT with trainable Houlsby adapters ``sentiment`` and ``topic`` and a 3-label base head."""
    bert = adapterkit.init(tiny_model("bert", **changes))
    bert.add_adapter("sentiment", "houlsby")
    bert.add_adapter("topic", "houlsby")
    bert.train_adapter(["sentiment", "topic"])
    return bert


@pytest.fixture
def model(tiny_model):
    """``build_model`` without dropout and with an initializer range of 0.2.

    As in test_trainer.py, the wider initializer range lets a frozen random BERT pass a single
    word on to the first token within a few hundred steps.
    """
    return build_model(tiny_model, initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


FIT_OPTIONS = dict(batch_size=4, learning_rate=2e-2, progress=False)


def record_training_steps(model):
    """Record the active adapters of every forward in training mode, and return the list and the hook handle."""
    steps = []

    def record(module, args, kwargs):
        if module.training:
            steps.append(tuple(module.active_adapters))

    return steps, model.register_forward_pre_hook(record, with_kwargs=True)




def task_state(model, name):
    """Return a copy of every tensor of adapter ``name``, head included."""
    return {key: value.clone() for key, value in model._adapterkit.modules_of(name).state_dict().items()}


# -- task schedule ----------------------------------------------------------------------------


def test_round_robin_exact_order():
    schedule = task_schedule({"a": 3, "b": 1, "c": 2}, "round_robin")

    assert schedule == ["a", "b", "c", "a", "c", "a"]


def test_round_robin_draws_nothing():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()

    task_schedule({"a": 2, "b": 2}, "round_robin", generator=generator)

    assert torch.equal(generator.get_state(), state)


def test_proportional_counts_follow_sizes():
    sizes = {"a": 100, "b": 300, "c": 600}
    batch_counts = {"a": 1000, "b": 3000, "c": 6000}

    schedule = task_schedule(batch_counts, "proportional", dataset_sizes=sizes,
                             generator=torch.Generator().manual_seed(0))

    assert len(schedule) == 10000
    # The binomial standard deviation of each share is at most 0.005 over 10000 draws.
    assert schedule.count("a") / 10000 == pytest.approx(0.1, abs=0.02)
    assert schedule.count("b") / 10000 == pytest.approx(0.3, abs=0.02)
    assert schedule.count("c") / 10000 == pytest.approx(0.6, abs=0.02)


def test_proportional_same_seed_same_order():
    counts = {"a": 20, "b": 20}

    first = task_schedule(counts, "proportional", generator=torch.Generator().manual_seed(3))
    again = task_schedule(counts, "proportional", generator=torch.Generator().manual_seed(3))
    other = task_schedule(counts, "proportional", generator=torch.Generator().manual_seed(4))

    assert first == again
    assert first != other


@pytest.mark.parametrize("arguments, fragment", [
    (({"a": 1}, "random"), "'random'"),
    (({}, "round_robin"), "batch_counts is empty"),
    (({"a": 0}, "round_robin"), "'a': 0"),
])
def test_schedule_invalid_arguments_raise(arguments, fragment):
    with pytest.raises(ValueError, match=fragment):
        task_schedule(*arguments)


def test_proportional_sizes_other_tasks_raise():
    with pytest.raises(ValueError, match="one size per task"):
        task_schedule({"a": 1, "b": 1}, "proportional", dataset_sizes={"a": 5})


# -- sampling inside fit ----------------------------------------------------------------------


def test_fit_round_robin_step_order(model, tokenizer):
    steps, handle = record_training_steps(model)
    train_data = {"sentiment": sentiment_data(12, seed=0), "topic": topic_data(4, seed=1)}

    history = model.fit(train_data, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    handle.remove()

    # 12 texts make 3 batches of 4, and 4 texts make 1 batch; topic leaves the rotation after one turn.
    assert steps == [("sentiment",), ("topic",), ("sentiment",), ("sentiment",)]
    assert history.epochs[0]["sentiment/steps"] == 3
    assert history.epochs[0]["topic/steps"] == 1


def test_fit_proportional_follows_seed(tiny_model, tokenizer):
    train_data = {"sentiment": sentiment_data(40, seed=0), "topic": topic_data(40, seed=1)}
    orders = []
    for seed in (5, 5, 6):
        model = build_model(tiny_model)
        steps, handle = record_training_steps(model)
        history = model.fit(train_data, tokenizer=tokenizer, epochs=1, sampling="proportional", seed=seed,
                            **FIT_OPTIONS)
        handle.remove()
        orders.append(steps)

        assert len(steps) == 20
        assert history.epochs[0]["sentiment/steps"] == steps.count(("sentiment",))
        assert history.epochs[0]["topic/steps"] == steps.count(("topic",))

    assert orders[0] == orders[1]
    assert orders[0] != orders[2]


def test_fit_proportional_draws_by_size(tiny_model, tokenizer):
    model = build_model(tiny_model)
    # 60 and 12 texts at batch size 4 make 15 + 3 = 18 steps per epoch, over 10 epochs 180 steps.
    train_data = {"sentiment": sentiment_data(60, seed=0), "topic": topic_data(12, seed=1)}
    steps, handle = record_training_steps(model)

    model.fit(train_data, tokenizer=tokenizer, epochs=10, sampling="proportional", **FIT_OPTIONS)
    handle.remove()

    assert len(steps) == 180
    # Expected share 60 / 72 = 0.833, binomial standard deviation 0.028 over 180 draws.
    assert steps.count(("sentiment",)) / 180 == pytest.approx(60 / 72, abs=0.1)


# -- heads and isolation ----------------------------------------------------------------------


def test_each_head_gets_own_labels(model, tokenizer):
    registry = model._adapterkit
    train_data = {"sentiment": sentiment_data(8, seed=0), "topic": topic_data(12, seed=1)}

    model.fit(train_data, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)

    assert registry.modules_of("sentiment")["head"]["classifier"].out_features == 2
    assert registry.modules_of("topic")["head"]["classifier"].out_features == 3
    assert registry.entries["sentiment"].labels == ["bad", "good"]
    assert registry.entries["topic"].labels == ["food", "music", "sport"]
    assert registry.entries["sentiment"].head_trained is True
    assert registry.entries["topic"].head_trained is True


def test_only_task_adapters_change(tiny_model, tokenizer):
    model = adapterkit.init(tiny_model("bert"))
    for name in ("sentiment", "topic", "idle", "frozen"):
        model.add_adapter(name, "houlsby")
    model.train_adapter(["sentiment", "topic", "idle"])
    registry = model._adapterkit
    base = {key: value.clone() for key, value in model.bert.state_dict().items()}
    base_head = {key: value.clone() for key, value in registry.base_heads["classifier"].state_dict().items()}
    untouched = {name: task_state(model, name) for name in ("idle", "frozen")}
    before = {name: task_state(model, name) for name in ("sentiment", "topic")}
    train_data = {"sentiment": sentiment_data(16, seed=0), "topic": topic_data(12, seed=1)}

    model.fit(train_data, tokenizer=tokenizer, epochs=2, **FIT_OPTIONS)

    after = model.bert.state_dict()
    assert [key for key, value in base.items() if not torch.equal(after[key], value)] == []
    head_after = registry.base_heads["classifier"].state_dict()
    assert [key for key, value in base_head.items() if not torch.equal(head_after[key], value)] == []
    for name, state in untouched.items():
        now = task_state(model, name)
        assert [key for key, value in state.items() if not torch.equal(now[key], value)] == [], name
    for name, state in before.items():
        now = task_state(model, name)
        # The sentiment head was resized from 3 to 2 labels, so its new tensors differ in shape and are skipped.
        unchanged = [key for key, value in state.items() if value.shape == now[key].shape and torch.equal(now[key], value)]
        assert unchanged == [], name
    assert model.active_adapters == ["sentiment", "topic", "idle"]
    assert model.training is False


@pytest.mark.parametrize("method", ["lora", "ia3", "compacter"])
def test_tasks_with_other_methods(tiny_model, tokenizer, method):
    model = adapterkit.init(tiny_model("bert"))
    model.add_adapter("sentiment", "pfeiffer")
    model.add_adapter("topic", method)
    model.train_adapter(["sentiment", "topic"])
    before = task_state(model, "topic")

    model.fit({"sentiment": sentiment_data(8, seed=0), "topic": topic_data(12, seed=1)}, tokenizer=tokenizer,
              epochs=1, **FIT_OPTIONS)

    after = task_state(model, "topic")
    assert [key for key, value in before.items() if torch.equal(after[key], value)] == []


# -- learning ---------------------------------------------------------------------------------


def test_two_tasks_learned(model, tokenizer):
    sentiment_texts, sentiment_labels = sentiment_data(48, seed=0)
    topic_texts, topic_labels = topic_data(48, seed=1)
    # The topic task comes as a Dataset, to cover a form other than a (texts, labels) pair.
    train_data = {
        "sentiment": (sentiment_texts, sentiment_labels),
        "topic": datasets.Dataset.from_dict({"text": topic_texts, "label": topic_labels}),
    }
    test_texts, test_sentiments, test_topics = make_examples(24, seed=2)

    history = model.fit(train_data, tokenizer=tokenizer, epochs=10, **FIT_OPTIONS)
    sentiment_scores = model.evaluate(test_texts, test_sentiments, adapter="sentiment")
    topic_scores = model.evaluate(test_texts, test_topics, adapter="topic")

    assert history.epochs[-1]["sentiment/train_loss"] < 0.5 * history.epochs[0]["sentiment/train_loss"]
    assert history.epochs[-1]["topic/train_loss"] < 0.5 * history.epochs[0]["topic/train_loss"]
    # Chance is 0.5 for sentiment and 0.33 for topic.
    assert sentiment_scores["accuracy"] >= 0.8
    assert topic_scores["accuracy"] >= 0.8
    assert topic_scores["labels"] == ["food", "music", "sport"]
    predictions = model.predict(test_texts, adapter="topic")
    assert predictions.label_names == ["food", "music", "sport"]
    correct = sum(predicted == label for predicted, label in zip(predictions.labels, test_topics))
    assert correct / len(test_topics) == topic_scores["accuracy"]


# -- validation and early stopping ------------------------------------------------------------


def test_validation_metrics_per_task(model, tokenizer):
    train_data = {"sentiment": sentiment_data(8, seed=0), "topic": topic_data(12, seed=1)}
    validation_data = {"sentiment": sentiment_data(4, seed=2), "topic": topic_data(6, seed=3)}

    history = model.fit(train_data, validation_data=validation_data, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    row = history.epochs[0]

    for name in ("sentiment", "topic"):
        for metric in ("loss", "accuracy", "precision", "recall", "f1"):
            assert f"{name}/val_{metric}" in row
    assert row["val_loss"] == pytest.approx((row["sentiment/val_loss"] + row["topic/val_loss"]) / 2)
    assert row["train_loss"] == pytest.approx(
        (row["sentiment/train_loss"] * 8 + row["topic/train_loss"] * 12) / 20)


def test_validation_for_some_tasks(model, tokenizer):
    train_data = {"sentiment": sentiment_data(8, seed=0), "topic": topic_data(12, seed=1)}

    history = model.fit(train_data, validation_data={"topic": topic_data(6, seed=3)}, tokenizer=tokenizer,
                        epochs=1, **FIT_OPTIONS)
    row = history.epochs[0]

    assert "sentiment/val_loss" not in row
    assert row["val_loss"] == row["topic/val_loss"]


def test_early_stopping_restores_every_task(model, tokenizer):
    train_data = {"sentiment": sentiment_data(48, seed=0), "topic": topic_data(48, seed=1)}
    validation_texts, sentiments, topics = make_examples(12, seed=2)
    # Validation labels break the training rule, so validation loss rises as the tasks are learned.
    flipped_sentiments = ["bad" if label == "good" else "good" for label in sentiments]
    rotated_topics = [TOPIC_WORDS[(TOPIC_WORDS.index(label) + 1) % 3] for label in topics]
    validation_data = {"sentiment": (validation_texts, flipped_sentiments), "topic": (validation_texts, rotated_topics)}

    history = model.fit(train_data, validation_data=validation_data, tokenizer=tokenizer, epochs=8, patience=2,
                        **FIT_OPTIONS)
    mean_losses = [row["val_loss"] for row in history.epochs]
    best = history.epochs[history.best_epoch - 1]

    assert history.stopped_early is True
    assert history.best_epoch == mean_losses.index(min(mean_losses)) + 1
    assert len(history.epochs) - history.best_epoch == 2
    sentiment_loss = model.evaluate(validation_texts, flipped_sentiments, adapter="sentiment")["loss"]
    topic_loss = model.evaluate(validation_texts, rotated_topics, adapter="topic")["loss"]
    assert sentiment_loss == pytest.approx(best["sentiment/val_loss"], abs=1e-5)
    assert topic_loss == pytest.approx(best["topic/val_loss"], abs=1e-5)


# -- evaluate and predict with adapter= -------------------------------------------------------


def test_evaluate_adapter_restores_active(model, tokenizer):
    train_data = {"sentiment": sentiment_data(8, seed=0), "topic": topic_data(12, seed=1)}
    model.fit(train_data, tokenizer=tokenizer, epochs=1, **FIT_OPTIONS)
    texts, labels = topic_data(6, seed=2)

    scores = model.evaluate(texts, labels, adapter="topic")

    assert scores["num_examples"] == 6
    assert len(scores["confusion_matrix"]) == 3
    assert model.active_adapters == ["sentiment", "topic"]


def test_evaluate_unknown_adapter_raises(model, tokenizer):
    texts, labels = topic_data(6, seed=2)

    with pytest.raises(ValueError, match="'missing'"):
        model.evaluate(texts, labels, adapter="missing", tokenizer=tokenizer)
    assert model.active_adapters == ["sentiment", "topic"]


# -- input checks -----------------------------------------------------------------------------


def invalid_fit_cases():
    """Return (fit arguments, message fragments) pairs that fit must reject before training."""
    sentiment = sentiment_data(8, seed=0)
    topic = topic_data(12, seed=1)
    return [
        (dict(train_data={"sentiment": sentiment, "missing": topic}), ["'missing'", "add_adapter"]),
        (dict(train_data={"sentiment": sentiment, "frozen": topic}), ["'frozen'", "train_adapter"]),
        (dict(train_data={"sentiment": sentiment, "topic": ([], [])}), ["'topic'", "empty"]),
        (dict(train_data={"sentiment": sentiment, "topic": topic}, sampling="random"), ["'random'", "round_robin"]),
        (dict(train_data={}), ["empty dict"]),
        (dict(train_data={"sentiment": sentiment}, labels=sentiment[1]), ["labels=", "(texts, labels)"]),
        (dict(train_data={"sentiment": sentiment[0]}), ["'sentiment'", "without labels"]),
        (dict(train_data={"sentiment": sentiment}, validation_data={"topic": topic}), ["'topic'", "train_data"]),
        (dict(train_data={"sentiment": sentiment}, validation_data=sentiment), ["validation_data", "dict"]),
        (dict(train_data={"sentiment": sentiment, "topic": (topic[0], ["sport"] * 12)}), ["'topic'", "single label"]),
        (dict(train_data={"sentiment": sentiment},
              validation_data={"sentiment": (["meh film"], ["meh"])}), ["'sentiment'", "meh"]),
        (dict(train_data=datasets.DatasetDict({"train": datasets.Dataset.from_dict(
            {"text": sentiment[0], "label": sentiment[1]})})), ["DatasetDict", "train_data['train']"]),
    ]


@pytest.mark.parametrize("case", range(len(invalid_fit_cases())))
def test_invalid_fit_raises_before_training(model, tokenizer, case):
    arguments, fragments = invalid_fit_cases()[case]
    model.add_adapter("frozen", "houlsby")
    registry = model._adapterkit
    calls, handle = count_forward_calls(model)

    with pytest.raises(ValueError) as error:
        model.fit(tokenizer=tokenizer, epochs=1, **FIT_OPTIONS, **arguments)
    handle.remove()

    for fragment in fragments:
        assert fragment in str(error.value)
    assert calls[0] == 0
    # The sentiment task, first in every dict, was valid, but its head must not have been resized either.
    assert registry.modules_of("sentiment")["head"]["classifier"].out_features == 3
    assert registry.entries["sentiment"].labels is None


# -- checkpoints ------------------------------------------------------------------------------


class Interrupted(Exception):
    """Raised by a hook to stop training as a crash would."""


@pytest.mark.parametrize("sampling", ["round_robin", "proportional"])
def test_resume_matches_uninterrupted(tiny_model, tokenizer, tmp_path, sampling):
    # Dropout stays on, so the resumed run must also restore torch's random state.
    train_data = {"sentiment": sentiment_data(12, seed=0), "topic": topic_data(8, seed=1)}
    options = dict(validation_data={"topic": topic_data(6, seed=3)}, tokenizer=tokenizer, epochs=3,
                   sampling=sampling, seed=7, **FIT_OPTIONS)
    steps_per_epoch = 3 + 2

    uninterrupted = build_model(tiny_model)
    expected_history = uninterrupted.fit(train_data, **options)

    crashing = build_model(tiny_model)
    training_steps = [0]

    def crash_in_second_epoch(module, args, kwargs):
        if module.training:
            training_steps[0] += 1
            if training_steps[0] == steps_per_epoch + 2:
                raise Interrupted

    handle = crashing.register_forward_pre_hook(crash_in_second_epoch, with_kwargs=True)
    with pytest.raises(Interrupted):
        crashing.fit(train_data, checkpoint_dir=tmp_path, **options)
    handle.remove()
    assert len(torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["history"]) == 1

    # A new process after the crash rebuilds the same model and calls fit with the same arguments.
    resumed = build_model(tiny_model)
    history = resumed.fit(train_data, checkpoint_dir=tmp_path, **options)

    assert history.epochs == expected_history.epochs
    assert history.best_epoch == expected_history.best_epoch
    for name in ("sentiment", "topic"):
        expected = task_state(uninterrupted, name)
        actual = task_state(resumed, name)
        assert [key for key, value in expected.items() if not torch.equal(actual[key], value)] == [], name


def test_checkpoint_other_sampling_raises(model, tokenizer, tmp_path):
    train_data = {"sentiment": sentiment_data(8, seed=0), "topic": topic_data(12, seed=1)}
    model.fit(train_data, tokenizer=tokenizer, epochs=1, checkpoint_dir=tmp_path, **FIT_OPTIONS)

    with pytest.raises(ValueError, match="another training run"):
        model.fit(train_data, tokenizer=tokenizer, epochs=2, checkpoint_dir=tmp_path, sampling="proportional",
                  **FIT_OPTIONS)


def test_single_task_checkpoint_rejected(model, tokenizer, tmp_path):
    texts, labels = sentiment_data(8, seed=0)
    model.train_adapter("sentiment")
    model.fit(texts, labels, tokenizer=tokenizer, epochs=1, checkpoint_dir=tmp_path, **FIT_OPTIONS)
    model.train_adapter(["sentiment", "topic"])

    with pytest.raises(ValueError, match="another training run"):
        model.fit({"sentiment": (texts, labels), "topic": topic_data(12, seed=1)}, tokenizer=tokenizer, epochs=1,
                  checkpoint_dir=tmp_path, **FIT_OPTIONS)
