import json
import math
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from transformers import PretrainedConfig

from adapterkit.training.data import (
    SUPPORTED_SUFFIXES,
    LabelMap,
    load_data,
    read_table,
    split_train_test,
    texts_and_labels,
)

ROWS = [
    {"text": "great film", "label": "pos"},
    {"text": "dull plot", "label": "neg"},
    {"text": "NA", "label": "neg"},
]


def write_rows(path: Path) -> Path:
    """Write ROWS in the format given by the suffix of ``path``."""
    frame = pd.DataFrame(ROWS)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    return path


# ---------------------------------------------------------------------------
# read_table
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet", ".CSV"])
def test_read_table_format(tmp_path, suffix):
    path = write_rows(tmp_path / f"rows{suffix}")

    dataset = read_table(path)

    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == ["text", "label"]
    assert dataset["text"][:] == ["great film", "dull plot", "NA"]
    assert dataset["label"][:] == ["pos", "neg", "neg"]


def test_read_table_str_path(tmp_path):
    path = write_rows(tmp_path / "rows.csv")

    assert read_table(str(path)).num_rows == 3


def test_read_table_json_columns(tmp_path):
    path = tmp_path / "columns.json"
    path.write_text(json.dumps({"text": ["a", "b"], "label": [1, 2]}), encoding="utf-8")

    dataset = read_table(path)

    assert dataset["text"][:] == ["a", "b"]
    assert dataset["label"][:] == [1, 2]


def test_read_table_json_keeps_digit_strings(tmp_path):
    path = tmp_path / "digits.json"
    path.write_text(json.dumps([{"text": "a", "label": "1"}, {"text": "b", "label": "2"}]), encoding="utf-8")

    assert read_table(path)["label"][:] == ["1", "2"]


def test_read_table_csv_latin1(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncafé au lait,drink\n".encode("latin-1"))

    dataset = read_table(path)

    assert dataset["text"][:] == ["café au lait"]


def test_read_table_csv_blank_cell_missing(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("text,label\nnull,1\n,2\n", encoding="utf-8")

    dataset = read_table(path)

    assert dataset["text"][:] == ["null", None]
    assert dataset["label"][:] == [1, 2]


def test_read_table_missing_file(tmp_path):
    path = tmp_path / "absent.csv"

    with pytest.raises(FileNotFoundError, match="absent.csv"):
        read_table(path)


def test_read_table_directory(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        read_table(tmp_path)


def test_read_table_unknown_suffix(tmp_path):
    path = tmp_path / "rows.xlsx"
    path.write_bytes(b"not a table")

    with pytest.raises(ValueError, match=r"\.xlsx") as info:
        read_table(path)
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in str(info.value)


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_read_table_zero_bytes(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")

    with pytest.raises(ValueError, match="is empty"):
        read_table(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("header.csv", "text,label\n"),
        ("header.tsv", "text\tlabel\n"),
        ("newlines.csv", "\n\n"),
        ("array.json", "[]"),
        ("blank.jsonl", "\n\n"),
    ],
)
def test_read_table_no_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")

    with pytest.raises(ValueError, match="is empty"):
        read_table(path)


def test_read_table_parquet_no_rows(tmp_path):
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(path)

    with pytest.raises(ValueError, match="is empty"):
        read_table(path)


def test_read_table_invalid_json(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{oops\n', encoding="utf-8")

    with pytest.raises(ValueError, match="Failed to parse .*broken.jsonl as JSONL"):
        read_table(path)


def test_read_table_mixed_column(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([{"text": "a", "label": 1}, {"text": "b", "label": "x"}]), encoding="utf-8")

    with pytest.raises(ValueError, match="one type"):
        read_table(path)


def test_read_table_wrong_type():
    with pytest.raises(TypeError, match="int"):
        read_table(3)


# ---------------------------------------------------------------------------
# load_data
# ---------------------------------------------------------------------------


def test_load_data_file(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl")

    dataset = load_data(path)

    assert dataset.num_rows == 3


def test_load_data_sample():
    dataset = load_data("tweet-sentiment")

    assert dataset.column_names == ["text", "label"]


def test_load_data_unknown_source(tmp_path):
    missing = tmp_path / "missing.csv"

    with pytest.raises(ValueError, match="missing.csv") as info:
        load_data(missing)
    message = str(info.value)
    assert "bbc-news" in message
    assert "tweet-sentiment" in message
    assert ".parquet" in message


def test_load_data_missing_text_column(tmp_path):
    path = write_rows(tmp_path / "rows.csv")

    with pytest.raises(ValueError, match="'body'.*'text', 'label'.*text_column="):
        load_data(path, text_column="body")


def test_load_data_unlabelled_file(tmp_path):
    path = tmp_path / "unlabelled.csv"
    path.write_text("text\nhello\n", encoding="utf-8")

    dataset = load_data(path)

    assert dataset.column_names == ["text"]


def test_load_data_wrong_type():
    with pytest.raises(TypeError, match="list"):
        load_data(["a", "b"])


# ---------------------------------------------------------------------------
# texts_and_labels
# ---------------------------------------------------------------------------


def test_texts_list_without_labels():
    texts, labels = texts_and_labels(["a", "b"])

    assert texts == ["a", "b"]
    assert labels is None


def test_texts_tuple_with_labels():
    texts, labels = texts_and_labels(("a", "b"), ["x", "y"])

    assert texts == ["a", "b"]
    assert labels == ["x", "y"]


def test_texts_dataset_label_column():
    dataset = datasets.Dataset.from_dict({"body": ["a", "b"], "tag": [3, 4]})

    texts, labels = texts_and_labels(dataset, text_column="body", label_column="tag")

    assert texts == ["a", "b"]
    assert labels == [3, 4]


def test_texts_dataset_without_labels():
    dataset = datasets.Dataset.from_dict({"text": ["a", "b"]})

    texts, labels = texts_and_labels(dataset)

    assert texts == ["a", "b"]
    assert labels is None


def test_texts_dataframe_numpy_ints():
    frame = pd.DataFrame({"text": ["a", "b"], "label": np.array([0, 1], dtype=np.int64)})

    _, labels = texts_and_labels(frame)

    assert labels == [0, 1]
    assert all(type(label) is int for label in labels)


def test_texts_explicit_labels_win():
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]})

    _, labels = texts_and_labels(frame, np.array([1, 0]))

    assert labels == [1, 0]
    assert all(type(label) is int for label in labels)


def test_texts_series_labels():
    _, labels = texts_and_labels(["a", "b"], pd.Series(["x", "y"]))

    assert labels == ["x", "y"]


def test_texts_missing_text_column():
    frame = pd.DataFrame({"body": ["a"], "label": ["x"]})

    with pytest.raises(ValueError, match="'text'") as info:
        texts_and_labels(frame)
    message = str(info.value)
    assert "'body', 'label'" in message
    assert "text_column=" in message


def test_texts_require_labels_table():
    dataset = datasets.Dataset.from_dict({"text": ["a"], "tag": ["x"]})

    with pytest.raises(ValueError, match="'label'") as info:
        texts_and_labels(dataset, require_labels=True)
    message = str(info.value)
    assert "'text', 'tag'" in message
    assert "label_column=" in message
    assert "labels=" in message


def test_texts_require_labels_list():
    with pytest.raises(ValueError, match="labels="):
        texts_and_labels(["a"], require_labels=True)


def test_texts_length_mismatch():
    with pytest.raises(ValueError, match="3 texts but 2 labels"):
        texts_and_labels(["a", "b", "c"], ["x", "y"])


def test_texts_column_length_mismatch():
    frame = pd.DataFrame({"text": ["a", "b"]})

    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        texts_and_labels(frame, ["x"])


@pytest.mark.parametrize(
    "data",
    [[], (), pd.DataFrame({"text": pd.Series([], dtype=str)}), datasets.Dataset.from_dict({"text": []})],
    ids=["list", "tuple", "dataframe", "dataset"],
)
def test_texts_empty(data):
    with pytest.raises(ValueError, match="empty"):
        texts_and_labels(data)


def test_texts_none_row():
    with pytest.raises(ValueError, match="row 1 is None"):
        texts_and_labels(["a", None, "c"])


def test_texts_nan_row():
    frame = pd.DataFrame({"text": ["a", "b", math.nan]})

    with pytest.raises(ValueError, match="row 2 is nan"):
        texts_and_labels(frame)


@pytest.mark.parametrize("data", [{"text": ["a"]}, 7, "a text"], ids=["dict", "int", "str"])
def test_texts_wrong_data_type(data):
    with pytest.raises(TypeError, match=type(data).__name__) as info:
        texts_and_labels(data)
    assert "datasets.Dataset" in str(info.value)


@pytest.mark.parametrize("labels", ["xy", {"a": 1}, {1, 2}, 5], ids=["str", "dict", "set", "int"])
def test_texts_wrong_labels_type(labels):
    with pytest.raises(TypeError, match="labels must be a sequence"):
        texts_and_labels(["a", "b"], labels)


def test_texts_missing_label_row():
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [1, 2, None]})

    with pytest.raises(ValueError, match="row 2 is missing"):
        texts_and_labels(frame)


@pytest.mark.parametrize(("label", "type_name"), [(1.5, "float"), (True, "bool"), (b"x", "bytes")])
def test_texts_invalid_label(label, type_name):
    with pytest.raises(ValueError, match=f"row 1 .*{type_name}"):
        texts_and_labels(["a", "b"], ["x", label])


# ---------------------------------------------------------------------------
# LabelMap
# ---------------------------------------------------------------------------


def test_label_map_sorts_ints():
    label_map = LabelMap.from_labels([10, 2, 1, 2, np.int64(10)])

    assert label_map.labels == (1, 2, 10)
    assert label_map.num_labels == 3
    assert label_map.label_type == "int"


def test_label_map_sorts_strings():
    label_map = LabelMap.from_labels(["tech", "business", "sports", "business"])

    assert label_map.labels == ("business", "sports", "tech")
    assert label_map.label_type == "str"


def test_label_map_mixed_types():
    with pytest.raises(TypeError, match="mix int and str"):
        LabelMap.from_labels([1, "1"])


def test_label_map_unsupported_type():
    with pytest.raises(TypeError, match="float"):
        LabelMap.from_labels([1.0, 2.0])


def test_label_map_empty():
    with pytest.raises(ValueError, match="empty"):
        LabelMap.from_labels([])


def test_label_map_duplicate():
    with pytest.raises(ValueError, match="'a' appears more than once"):
        LabelMap(["a", "b", "a"])


def test_label_map_encode_decode():
    label_map = LabelMap.from_labels(["neg", "pos", "neutral"])

    ids = label_map.encode(["pos", "neg", "neutral", "pos"])

    assert ids == [2, 0, 1, 2]
    assert label_map.decode(ids) == ["pos", "neg", "neutral", "pos"]


def test_label_map_decode_numpy_ids():
    label_map = LabelMap.from_labels([5, 7])

    assert label_map.decode(np.array([1, 0])) == [7, 5]


def test_label_map_unknown_label():
    label_map = LabelMap.from_labels(["neg", "pos"])

    with pytest.raises(ValueError, match="'maybe' is not in the label map") as info:
        label_map.encode(["pos", "maybe"])
    assert "['neg', 'pos']" in str(info.value)


def test_label_map_str_versus_int():
    label_map = LabelMap.from_labels([1, 2])

    with pytest.raises(ValueError, match="'1' is not in the label map"):
        label_map.encode(["1"])


def test_label_map_decode_out_of_range():
    label_map = LabelMap.from_labels(["a", "b"])

    with pytest.raises(ValueError, match="Class id 2 is out of range"):
        label_map.decode([0, 2])


def test_label_map_decode_float_id():
    label_map = LabelMap.from_labels(["a", "b"])

    with pytest.raises(TypeError, match="float"):
        label_map.decode([1.0])


def test_label_map_config_dicts():
    label_map = LabelMap.from_labels([2, 10])

    assert label_map.id2label == {0: "2", 1: "10"}
    assert label_map.label2id == {"2": 0, "10": 1}


@pytest.mark.parametrize("labels", [[3, 1, 2], ["b", "a"], ["1", "2"]], ids=["int", "str", "digit-str"])
def test_label_map_json_round_trip(labels):
    label_map = LabelMap.from_labels(labels)

    restored = LabelMap.from_dict(json.loads(json.dumps(label_map.to_dict())))

    assert restored == label_map
    assert restored.labels == label_map.labels
    assert [type(label) for label in restored.labels] == [type(label) for label in label_map.labels]


def test_label_map_from_dict_type_mismatch():
    with pytest.raises(ValueError, match="does not match label_type 'int'"):
        LabelMap.from_dict({"labels": ["a"], "label_type": "int"})


def test_label_map_from_dict_missing_key():
    with pytest.raises(ValueError, match="label_type"):
        LabelMap.from_dict({"labels": ["a"]})


def test_label_map_from_dict_wrong_type():
    with pytest.raises(TypeError, match="list"):
        LabelMap.from_dict(["a"])


@pytest.mark.parametrize("labels", [[-1, 0, 7], ["neg", "pos"], ["1", "2"]], ids=["int", "str", "digit-str"])
def test_label_map_config_round_trip(tmp_path, labels):
    label_map = LabelMap.from_labels(labels)
    PretrainedConfig(**label_map.config_kwargs()).save_pretrained(tmp_path)

    config = PretrainedConfig.from_pretrained(tmp_path)
    restored = LabelMap.from_config(config)

    assert config.num_labels == len(labels)
    assert restored.labels == label_map.labels
    assert [type(label) for label in restored.labels] == [type(label) for label in label_map.labels]


def test_label_map_config_without_type():
    config = PretrainedConfig(id2label={0: "neg", 1: "pos"})

    assert LabelMap.from_config(config).labels == ("neg", "pos")


def test_label_map_config_raw_dict_keys():
    config = PretrainedConfig()
    config.id2label = {"1": "b", "0": "a"}

    assert LabelMap.from_config(config).labels == ("a", "b")


def test_label_map_config_gap_in_ids():
    config = PretrainedConfig()
    config.id2label = {0: "a", 2: "b"}

    with pytest.raises(ValueError, match=r"0\.\.n-1"):
        LabelMap.from_config(config)


def test_label_map_config_invalid_int():
    config = PretrainedConfig(id2label={0: "1", 1: "two"}, adapterkit_label_type="int")

    with pytest.raises(ValueError, match="'two', which is not an integer"):
        LabelMap.from_config(config)


def test_label_map_config_wrong_type():
    with pytest.raises(TypeError, match="id2label"):
        LabelMap.from_config({"id2label": {0: "a"}})


# ---------------------------------------------------------------------------
# split_train_test
# ---------------------------------------------------------------------------


def make_classes(sizes: dict[str, int]) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for label, size in sizes.items():
        for index in range(size):
            texts.append(f"{label} {index}")
            labels.append(label)
    return texts, labels


def test_split_stratified_counts():
    texts, labels = make_classes({"a": 50, "b": 30, "c": 20})

    train_texts, train_labels, test_texts, test_labels = split_train_test(texts, labels, test_size=0.2)

    assert Counter(test_labels) == {"a": 10, "b": 6, "c": 4}
    assert Counter(train_labels) == {"a": 40, "b": 24, "c": 16}
    assert len(train_texts) == 80
    assert len(test_texts) == 20


def test_split_partitions_rows():
    texts, labels = make_classes({"a": 7, "b": 5})

    train_texts, train_labels, test_texts, test_labels = split_train_test(texts, labels, test_size=0.3)

    assert sorted(train_texts + test_texts) == sorted(texts)
    assert train_texts == [text for text in texts if text in set(train_texts)]
    assert test_texts == [text for text in texts if text in set(test_texts)]
    for text, label in zip(train_texts + test_texts, train_labels + test_labels):
        assert text.split()[0] == label


def test_split_deterministic():
    texts, labels = make_classes({"a": 40, "b": 40})

    first = split_train_test(texts, labels, seed=3)
    second = split_train_test(texts, labels, seed=3)
    other_seed = split_train_test(texts, labels, seed=4)

    assert first == second
    assert first[2] != other_seed[2]


def test_split_singleton_class_train():
    texts, labels = make_classes({"a": 10, "rare": 1})

    _, train_labels, _, test_labels = split_train_test(texts, labels, test_size=0.5)

    assert "rare" in train_labels
    assert "rare" not in test_labels


def test_split_rounds_half_up():
    texts, labels = make_classes({"a": 5})

    *_, test_labels = split_train_test(texts, labels, test_size=0.5)

    assert len(test_labels) == 3


@pytest.mark.parametrize("test_size", [0, 1, -0.1, 1.5])
def test_split_test_size_range(test_size):
    texts, labels = make_classes({"a": 10})

    with pytest.raises(ValueError, match=f"got {test_size}"):
        split_train_test(texts, labels, test_size=test_size)


def test_split_test_size_type():
    with pytest.raises(TypeError, match="str"):
        split_train_test(["a", "b"], [0, 0], test_size="0.2")


def test_split_empty_test_set():
    with pytest.raises(ValueError, match="test set would be empty"):
        split_train_test(["a", "b", "c"], [0, 1, 2])


def test_split_length_mismatch():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        split_train_test(["a", "b"], [0])


def test_split_empty():
    with pytest.raises(ValueError, match="empty"):
        split_train_test([], [])
