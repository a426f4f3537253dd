"""Turn user data into texts and labels for text classification.

The functions here read tables from files or the offline samples, extract a text and a
label column, map label values to class ids and split the data into train and test sets.
For multi-task training they also read each task's data and choose the task of each step.
"""

from __future__ import annotations

import logging
import math
import operator
import os
from collections.abc import Iterable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from adapterkit.samples import SAMPLE_NAMES, load_sample

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")

# Only empty cells count as missing. With the pandas defaults, texts such as "NA",
# "null" or "None" would also become NaN.
_CSV_NA_OPTIONS: dict[str, Any] = {"keep_default_na": False, "na_values": [""]}

_ACCEPTED_DATA_TYPES = "a list or tuple of str, a datasets.Dataset or a pandas.DataFrame"


# ---------------------------------------------------------------------------
# Reading files and samples
# ---------------------------------------------------------------------------


def read_table(path: str | os.PathLike[str]) -> datasets.Dataset:
    """Read a CSV, TSV, JSON, JSONL or parquet file into a dataset.

    The format follows the file suffix, case-insensitively. CSV and TSV files are read
    as UTF-8 and, if that fails, as Latin-1. Only empty cells become missing values, so
    a text such as "NA" stays a string. JSON may be an array of objects or any other
    layout that :func:`pandas.read_json` reads. JSON and JSONL values keep their JSON
    types, so the string "1" stays a string.

    Args:
        path: Path of the file to read.

    Returns:
        The table as a dataset, without the pandas index.

    Raises:
        TypeError: If ``path`` is not a str or path-like object.
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``path`` is not a file, has an unsupported suffix, is empty or
            cannot be parsed in its format.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}: {path!r}.")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Data file not found: {path}. Check the path.")
    if not path.is_file():
        raise ValueError(f"{path} is not a file. Pass the path of a data file.")

    suffix = path.suffix.lower()
    reader = _TABLE_READERS.get(suffix)
    if reader is None:
        raise ValueError(
            f"Unsupported data file suffix {path.suffix!r} in {path}. "
            f"Use a file ending in one of: {', '.join(SUPPORTED_SUFFIXES)}."
        )
    if path.stat().st_size == 0:
        raise _empty_file_error(path)

    try:
        frame = reader(path)
    except pd.errors.EmptyDataError as exc:
        raise _empty_file_error(path) from exc
    except (ValueError, pa.ArrowException) as exc:
        raise ValueError(f"Failed to parse {path} as {suffix[1:].upper()}: {exc}") from exc

    if len(frame) == 0 or len(frame.columns) == 0:
        raise _empty_file_error(path)

    try:
        dataset = datasets.Dataset.from_pandas(frame, preserve_index=False)
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise ValueError(
            f"Failed to convert {path} to a dataset: {exc}. "
            "Make sure that each column contains values of one type."
        ) from exc
    logger.debug("Read %d rows with columns %s from %s", dataset.num_rows, dataset.column_names, path)
    return dataset


def load_data(
    source: str | os.PathLike[str],
    *,
    text_column: str = "text",
    label_column: str = "label",
) -> datasets.Dataset:
    """Load a sample dataset by name or read a data file.

    A label column is optional, so that unlabelled data can be loaded for prediction.

    Args:
        source: A name from :data:`adapterkit.samples.SAMPLE_NAMES` or the path of a
            file that :func:`read_table` reads.
        text_column: Name of the column that contains the texts. It must exist.
        label_column: Name of the label column. It is only used to log whether the data
            is labelled.

    Returns:
        The dataset with all its columns.

    Raises:
        TypeError: If ``source`` is not a str or path-like object.
        ValueError: If ``source`` is neither a sample name nor an existing file, if
            the file cannot be read, or if ``text_column`` is missing.
        ModuleNotFoundError: If the package that contains a sample is not installed.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a sample name or a file path, got {type(source).__name__}: {source!r}."
        )

    if isinstance(source, str) and source in SAMPLE_NAMES:
        dataset = load_sample(source)
        origin = f"sample {source}"
    elif Path(source).is_file():
        dataset = read_table(source)
        origin = str(source)
    else:
        raise ValueError(
            f"{str(source)!r} is neither an existing file nor a sample name. "
            f"Pass the path of a file ending in one of {', '.join(SUPPORTED_SUFFIXES)}, "
            f"or one of the sample names: {', '.join(SAMPLE_NAMES)}."
        )

    _check_text_column(text_column, dataset.column_names)
    if label_column in dataset.column_names:
        logger.info("Loaded %d rows from %s with label column %r", dataset.num_rows, origin, label_column)
    else:
        logger.info("Loaded %d rows from %s without a label column %r", dataset.num_rows, origin, label_column)
    return dataset


def _read_delimited(path: Path, separator: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep=separator, encoding="utf-8", **_CSV_NA_OPTIONS)
    except UnicodeDecodeError as exc:
        logger.debug("%s is not valid UTF-8 (%s), so it is read as Latin-1", path, exc)
        return pd.read_csv(path, sep=separator, encoding="latin-1", **_CSV_NA_OPTIONS)


def _read_json(path: Path, lines: bool) -> pd.DataFrame:
    # dtype=False and convert_dates=False keep the JSON types. Otherwise pandas turns
    # the strings "1" and "2" into integers and date-like strings into timestamps.
    return pd.read_json(path, lines=lines, dtype=False, convert_dates=False, encoding="utf-8")


_TABLE_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": lambda path: _read_delimited(path, ","),
    ".tsv": lambda path: _read_delimited(path, "\t"),
    ".json": lambda path: _read_json(path, lines=False),
    ".jsonl": lambda path: _read_json(path, lines=True),
    ".parquet": pd.read_parquet,
}


def _empty_file_error(path: Path) -> ValueError:
    return ValueError(f"Data file {path} is empty: it has no rows. Pass a file with at least one row.")


# ---------------------------------------------------------------------------
# Extracting texts and labels
# ---------------------------------------------------------------------------


def texts_and_labels(
    data: Sequence[str] | datasets.Dataset | pd.DataFrame,
    labels: Sequence[Any] | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    require_labels: bool = False,
) -> tuple[list[str], list[int | str] | None]:
    """Extract the texts and labels for text classification from user data.

    ``data`` may be a list or tuple of texts, a :class:`datasets.Dataset` or a
    :class:`pandas.DataFrame`. Tables provide the texts from ``text_column`` and the
    labels from ``label_column`` if that column exists. An explicit ``labels`` argument
    takes precedence over the label column. Labels must be str or int. NumPy integers
    become Python ints and NumPy strings become Python strings.

    Args:
        data: The texts, or a table that contains them.
        labels: One label per text. If None, labels come from ``label_column``.
        text_column: Name of the text column in a table.
        label_column: Name of the label column in a table.
        require_labels: If True, raise when no labels are found.

    Returns:
        The texts and the labels. The labels are None if none were passed or found.

    Raises:
        TypeError: If ``data`` or ``labels`` has an unsupported type.
        ValueError: If the text column is missing, labels are required but missing,
            the data is empty, the numbers of texts and labels differ, a text is not a
            string, or a label is missing or neither str nor int.
    """
    texts, found_labels = _extract_columns(data, labels, text_column, label_column)

    if found_labels is None and require_labels:
        if isinstance(data, (list, tuple)):
            raise ValueError("Labels are required, but none were passed. Pass labels= with one label per text.")
        raise ValueError(
            f"Labels are required, but the label column {label_column!r} is missing. "
            f"Available columns: {_format_columns(_column_names(data))}. "
            "Pass label_column= with the name of the label column, or labels= with one label per text."
        )

    if not texts:
        raise ValueError("The data is empty: it contains no texts. Pass at least one text.")
    if found_labels is not None and len(found_labels) != len(texts):
        raise ValueError(
            f"Got {len(texts)} texts but {len(found_labels)} labels. Pass exactly one label per text."
        )

    checked_texts = _check_texts(texts)
    checked_labels = None if found_labels is None else _check_labels(found_labels)
    return checked_texts, checked_labels


def _extract_columns(
    data: Any, labels: Any, text_column: str, label_column: str
) -> tuple[list[Any], list[Any] | None]:
    """Return the raw texts and labels of ``data``, or raise TypeError or ValueError."""
    if labels is not None:
        _check_labels_type(labels)

    if isinstance(data, (list, tuple)):
        texts = list(data)
        found_labels = None
    elif isinstance(data, (datasets.Dataset, pd.DataFrame)):
        columns = _column_names(data)
        _check_text_column(text_column, columns)
        texts = _column_values(data, text_column)
        found_labels = None
        if labels is None and label_column in columns:
            found_labels = _column_values(data, label_column)
    else:
        raise TypeError(f"data must be {_ACCEPTED_DATA_TYPES}, got {type(data).__name__}.")

    if labels is not None:
        found_labels = list(labels)
    return texts, found_labels


def _check_labels_type(labels: Any) -> None:
    # A str, mapping or set is iterable but is not a sequence of labels in text order.
    if isinstance(labels, (str, bytes, Mapping, Set)) or not isinstance(labels, Iterable):
        raise TypeError(
            f"labels must be a sequence such as a list, tuple, numpy array or pandas Series, "
            f"got {type(labels).__name__}. Pass one label per text in the order of the texts."
        )


def _column_names(data: datasets.Dataset | pd.DataFrame) -> list[Any]:
    if isinstance(data, datasets.Dataset):
        return list(data.column_names)
    return list(data.columns)


def _column_values(data: datasets.Dataset | pd.DataFrame, column: str) -> list[Any]:
    if isinstance(data, datasets.Dataset):
        return list(data[column])
    values = data[column]
    if isinstance(values, pd.DataFrame):
        raise ValueError(f"The DataFrame has more than one column named {column!r}. Rename the duplicates.")
    return values.tolist()


def _check_text_column(text_column: str, columns: Sequence[Any]) -> None:
    if text_column not in columns:
        raise ValueError(
            f"Text column {text_column!r} not found. Available columns: {_format_columns(columns)}. "
            "Pass text_column= with the name of the column that contains the texts."
        )


def _format_columns(columns: Iterable[Any]) -> str:
    names = [repr(column) for column in columns]
    return ", ".join(names) if names else "none"


def _check_texts(texts: list[Any]) -> list[str]:
    checked = []
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(
                f"Text at row {row} is {text!r} of type {type(text).__name__}, not a string. "
                "Fill in or drop the rows without text."
            )
        checked.append(str(text))
    return checked


def _check_labels(labels: list[Any]) -> list[int | str]:
    # Missing labels are reported first, because one blank cell turns a pandas column
    # of integers into floats, and the blank row is the one to fix.
    for row, label in enumerate(labels):
        if _is_missing(label):
            raise ValueError(f"Label at row {row} is missing ({label!r}). Fill in or drop the rows without a label.")

    checked = []
    for row, label in enumerate(labels):
        try:
            checked.append(_normalize_label(label))
        except TypeError as exc:
            raise ValueError(f"Label at row {row} is invalid: {exc}") from exc
    return checked


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _normalize_label(value: Any) -> int | str:
    """Return ``value`` as a Python int or str, or raise TypeError."""
    # bool is a subclass of int, but True and False as class names are almost always a
    # mistake in the data, and str(True) would not round-trip through a model config.
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{value!r} is a bool. Use str or int labels, for example 'yes'/'no' or 1/0.")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return str(value)
    raise TypeError(
        f"{value!r} has type {type(value).__name__}, but labels must be str or int. "
        "Convert the labels to str or int."
    )


# ---------------------------------------------------------------------------
# Label ids
# ---------------------------------------------------------------------------


class LabelMap:
    """Bidirectional mapping between label values and class ids 0..n-1.

    Labels are either all int or all str. The class id of a label is its position in
    :attr:`labels`.

    Args:
        labels: The distinct labels in class id order.

    Raises:
        TypeError: If a label is neither str nor int, or labels of both types are mixed.
        ValueError: If ``labels`` is empty or contains a label twice.
    """

    def __init__(self, labels: Iterable[int | str]) -> None:
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
            raise TypeError(f"labels must be a sequence of str or int, got {type(labels).__name__}.")
        normalized = tuple(_normalize_label(label) for label in labels)
        if not normalized:
            raise ValueError("A LabelMap needs at least one label, got none.")
        _check_single_label_type(normalized)

        ids: dict[int | str, int] = {}
        for class_id, label in enumerate(normalized):
            if label in ids:
                raise ValueError(f"Label {label!r} appears more than once in {list(normalized)!r}. Pass distinct labels.")
            ids[label] = class_id
        self._labels = normalized
        self._ids = ids

    @classmethod
    def from_labels(cls, labels: Iterable[Any]) -> LabelMap:
        """Build a map from observed labels, numbering the distinct values in sorted order.

        Integers sort numerically and strings alphabetically by code point.

        Raises:
            TypeError: If a label is neither str nor int, or labels of both types are mixed.
            ValueError: If ``labels`` is empty.
        """
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
            raise TypeError(f"labels must be a sequence of str or int, got {type(labels).__name__}.")
        distinct = {_normalize_label(label) for label in labels}
        if not distinct:
            raise ValueError("Cannot build a LabelMap from an empty sequence of labels. Pass at least one label.")
        _check_single_label_type(distinct)
        return cls(sorted(distinct))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelMap:
        """Build a map from the output of :meth:`to_dict`, for example after a JSON round trip.

        Raises:
            TypeError: If ``data`` is not a mapping.
            ValueError: If a key is missing or the labels do not match ``label_type``.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping as returned by LabelMap.to_dict(), got {type(data).__name__}.")
        missing = [key for key in ("labels", "label_type") if key not in data]
        if missing:
            raise ValueError(
                f"LabelMap data is missing the keys {missing}. Got keys {sorted(data)}. "
                "Pass the dict returned by LabelMap.to_dict()."
            )
        label_type = data["label_type"]
        if label_type not in ("int", "str"):
            raise ValueError(f"label_type must be 'int' or 'str', got {label_type!r}.")

        labels = data["labels"]
        expected_type = int if label_type == "int" else str
        for label in labels:
            if isinstance(label, bool) or not isinstance(label, expected_type):
                raise ValueError(
                    f"Label {label!r} of type {type(label).__name__} does not match label_type {label_type!r}."
                )
        return cls(labels)

    @classmethod
    def from_config(cls, config: Any) -> LabelMap:
        """Build a map from the ``id2label`` of a transformers model config.

        The ids must be 0..n-1. ``id2label`` stores every label as a string, so the
        labels stay strings unless the config has ``adapterkit_label_type == "int"``, as
        written by :meth:`config_kwargs`. In that case each label is parsed as an int.

        Args:
            config: A :class:`transformers.PretrainedConfig` or any object with an
                ``id2label`` attribute.

        Raises:
            TypeError: If ``config`` has no ``id2label`` mapping.
            ValueError: If the ids are not 0..n-1, the label type is unknown or a label
                of type int is not an integer string.
        """
        id2label = getattr(config, "id2label", None)
        if not isinstance(id2label, Mapping):
            raise TypeError(
                f"config must have an id2label mapping, got {type(config).__name__} "
                f"with id2label={id2label!r}. Pass a transformers PretrainedConfig."
            )
        label_type = getattr(config, "adapterkit_label_type", None) or "str"
        if label_type not in ("int", "str"):
            raise ValueError(f"config.adapterkit_label_type must be 'int' or 'str', got {label_type!r}.")

        # Keys are ints in a loaded PretrainedConfig, but strings in a raw config.json dict.
        try:
            by_id = {int(class_id): label for class_id, label in id2label.items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config.id2label keys must be integer ids, got {list(id2label)!r}.") from exc
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"config.id2label ids must be 0..n-1, got {sorted(by_id)!r}.")

        labels = [by_id[class_id] for class_id in range(len(by_id))]
        if label_type == "int":
            labels = [_parse_int_label(label) for label in labels]
        return cls(labels)

    @property
    def labels(self) -> tuple[int | str, ...]:
        """The labels in class id order."""
        return self._labels

    @property
    def label_type(self) -> str:
        """The type of the labels: "int" or "str"."""
        return "int" if isinstance(self._labels[0], int) else "str"

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self._labels)

    @property
    def id2label(self) -> dict[int, str]:
        """Class id to label as a string, the form that transformers configs store."""
        return {class_id: str(label) for class_id, label in enumerate(self._labels)}

    @property
    def label2id(self) -> dict[str, int]:
        """Label as a string to class id, the form that transformers configs store."""
        return {str(label): class_id for class_id, label in enumerate(self._labels)}

    def encode(self, labels: Iterable[Any]) -> list[int]:
        """Convert labels to class ids.

        Raises:
            TypeError: If a label is neither str nor int.
            ValueError: If a label is not in the map.
        """
        ids = []
        for label in labels:
            class_id = self._ids.get(_normalize_label(label))
            if class_id is None:
                raise ValueError(
                    f"Label {label!r} is not in the label map. Known labels: {list(self._labels)!r}. "
                    "Build the map from labels that include it."
                )
            ids.append(class_id)
        return ids

    def decode(self, ids: Iterable[Any]) -> list[int | str]:
        """Convert class ids to labels.

        Accepts Python ints, NumPy integers and integer tensor elements.

        Raises:
            TypeError: If an id is not an integer.
            ValueError: If an id is outside 0..num_labels-1.
        """
        decoded = []
        for value in ids:
            try:
                class_id = operator.index(value)
            except TypeError as exc:
                raise TypeError(f"Class id {value!r} has type {type(value).__name__}, but ids must be integers.") from exc
            if not 0 <= class_id < len(self._labels):
                raise ValueError(f"Class id {class_id} is out of range. Valid ids are 0..{len(self._labels) - 1}.")
            decoded.append(self._labels[class_id])
        return decoded

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict that :meth:`from_dict` turns back into this map."""
        return {"labels": list(self._labels), "label_type": self.label_type}

    def config_kwargs(self) -> dict[str, Any]:
        """Return the attributes to set on a transformers config for this map.

        The result contains ``num_labels``, ``id2label``, ``label2id`` and
        ``adapterkit_label_type``, which :meth:`from_config` reads back. Pass it as
        keyword arguments to ``AutoConfig.from_pretrained`` or set each attribute,
        because assigning ``id2label`` alone does not update ``label2id``.
        """
        return {
            "num_labels": self.num_labels,
            "id2label": self.id2label,
            "label2id": self.label2id,
            "adapterkit_label_type": self.label_type,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelMap):
            return NotImplemented
        return self._labels == other._labels

    def __hash__(self) -> int:
        return hash(self._labels)

    def __repr__(self) -> str:
        return f"LabelMap({list(self._labels)!r})"


def _check_single_label_type(labels: Iterable[int | str]) -> None:
    types = {type(label) for label in labels}
    if len(types) > 1:
        raise TypeError(
            f"Labels mix int and str values: {sorted(map(repr, labels))!r}. "
            "Convert all labels to one type."
        )


def _parse_int_label(label: Any) -> int:
    try:
        return int(str(label).strip())
    except ValueError as exc:
        raise ValueError(
            f"config.id2label contains {label!r}, which is not an integer, "
            "but config.adapterkit_label_type is 'int'."
        ) from exc


# ---------------------------------------------------------------------------
# Train/test split
# ---------------------------------------------------------------------------


def split_train_test(
    texts: Sequence[str],
    labels: Sequence[Any],
    *,
    test_size: float = 0.2,
    seed: int = 0,
) -> tuple[list[str], list[Any], list[str], list[Any]]:
    """Split texts and labels into a train and a test set, stratified by label.

    Each class contributes ``round(n * test_size)`` of its ``n`` examples to the test
    set, with halves rounded up. At least one example of each class stays in train, so
    a class with one example is train-only. Both sets keep the input order. The same
    inputs and seed always give the same split.

    Args:
        texts: The texts.
        labels: One hashable label per text.
        test_size: Fraction of each class to put in the test set, in (0, 1).
        seed: Seed for the random choice of test examples.

    Returns:
        ``(train_texts, train_labels, test_texts, test_labels)``.

    Raises:
        TypeError: If ``test_size`` is not a number or ``seed`` is not an int.
        ValueError: If ``test_size`` is outside (0, 1), the data is empty, the
            numbers of texts and labels differ, or the test set would be empty.
    """
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise TypeError(f"test_size must be a float in (0, 1), got {type(test_size).__name__}: {test_size!r}.")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}. Pass a fraction such as 0.2.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}.")

    texts = list(texts)
    labels = list(labels)
    if len(texts) != len(labels):
        raise ValueError(f"Got {len(texts)} texts but {len(labels)} labels. Pass exactly one label per text.")
    if not texts:
        raise ValueError("Cannot split empty data. Pass at least one text.")

    # Dicts keep insertion order, so classes are visited in order of first appearance
    # and the random draws do not depend on how the labels sort.
    rows_by_label: dict[Any, list[int]] = {}
    for row, label in enumerate(labels):
        rows_by_label.setdefault(label, []).append(row)

    rng = np.random.default_rng(seed)
    test_rows: set[int] = set()
    for rows in rows_by_label.values():
        test_count = min(math.floor(len(rows) * test_size + 0.5), len(rows) - 1)
        chosen = rng.permutation(len(rows))[:test_count]
        test_rows.update(rows[i] for i in chosen)

    if not test_rows:
        raise ValueError(
            f"The test set would be empty: with test_size={test_size}, none of the {len(rows_by_label)} "
            f"classes in {len(texts)} examples contributes a test example. Pass more data or a larger test_size."
        )

    train = [row for row in range(len(texts)) if row not in test_rows]
    test = sorted(test_rows)
    return (
        [texts[row] for row in train],
        [labels[row] for row in train],
        [texts[row] for row in test],
        [labels[row] for row in test],
    )


# ---------------------------------------------------------------------------
# Multi-task data and sampling
# ---------------------------------------------------------------------------

SAMPLING_STRATEGIES = ("round_robin", "proportional")


def task_texts_and_labels(
    task: str,
    data: Any,
    *,
    text_column: str = "text",
    label_column: str = "label",
    data_description: str = "training data",
) -> tuple[list[str], list[int | str]]:
    """Extract the texts and labels of one task of a multi-task ``fit``.

    ``data`` is a ``(texts, labels)`` pair, or a :class:`datasets.Dataset` or
    :class:`pandas.DataFrame` with a label column. A 2-tuple whose first item is not a
    string is read as a pair. Any other list or tuple is texts without labels, which
    raises.

    Args:
        task: The adapter name of the task, used in error messages.
        data: The task's data.
        text_column: Name of the text column in a table.
        label_column: Name of the label column in a table.
        data_description: What ``data`` is, such as "training data", used in error messages.

    Returns:
        The texts and the labels.

    Raises:
        TypeError, ValueError: As :func:`texts_and_labels` raises them, with the task
            named in the message.
    """
    labels = None
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], str):
        data, labels = data
    elif isinstance(data, (list, tuple)):
        raise ValueError(
            f"The {data_description} of task {task!r} is a list of texts without labels. "
            "Pass a (texts, labels) pair, or a Dataset or DataFrame with a label column."
        )
    try:
        texts, found_labels = texts_and_labels(
            data, labels, text_column=text_column, label_column=label_column, require_labels=True
        )
    except (TypeError, ValueError) as exc:
        hint = " Pass a (texts, labels) pair, a Dataset or a DataFrame." if isinstance(exc, TypeError) else ""
        raise type(exc)(f"The {data_description} of task {task!r} is invalid: {exc}{hint}") from exc
    return texts, found_labels


def task_schedule(
    batch_counts: Mapping[str, int],
    strategy: str,
    *,
    dataset_sizes: Mapping[str, int] | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Return the task of each training step of one multi-task epoch.

    The epoch has ``sum(batch_counts.values())`` steps under both strategies.

    ``"round_robin"``: the tasks take turns, one batch each, in the order of
    ``batch_counts``. A task whose batches have run out leaves the rotation, so every
    task gets exactly its ``batch_counts`` steps, and at the end of the epoch the
    longest task runs alone. For counts ``{"a": 3, "b": 1, "c": 2}`` the order is
    ``a b c a c a``.

    ``"proportional"``: every step draws its task independently, with replacement, with
    probability ``dataset_sizes[task] / sum(dataset_sizes.values())``. A task therefore
    gets its batch count only on average, and can get more or fewer steps.

    Args:
        batch_counts: The number of batches in one pass over each task's data.
        strategy: ``"round_robin"`` or ``"proportional"``.
        dataset_sizes: The weight of each task under ``"proportional"``, usually its
            number of training examples. Defaults to ``batch_counts``.
        generator: The random generator of ``"proportional"``; torch's global generator
            when None. ``"round_robin"`` draws nothing.

    Returns:
        One task name per step.

    Raises:
        ValueError: If ``strategy`` is unknown, ``batch_counts`` is empty or has a count
            below 1, or ``dataset_sizes`` names other tasks or has a size below 1.
    """
    if strategy not in SAMPLING_STRATEGIES:
        raise ValueError(
            f"Unknown sampling strategy {strategy!r}. Use one of: {', '.join(map(repr, SAMPLING_STRATEGIES))}."
        )
    if not batch_counts:
        raise ValueError("batch_counts is empty. Pass the number of batches of at least one task.")
    invalid = {task: count for task, count in batch_counts.items() if not isinstance(count, int) or count < 1}
    if invalid:
        raise ValueError(f"Invalid batch counts {invalid}. Each task needs an integer count >= 1.")
    tasks = list(batch_counts)

    if strategy == "round_robin":
        schedule = []
        for turn in range(max(batch_counts.values())):
            schedule.extend(task for task in tasks if turn < batch_counts[task])
        return schedule

    sizes = batch_counts if dataset_sizes is None else dataset_sizes
    if set(sizes) != set(tasks):
        raise ValueError(
            f"dataset_sizes names the tasks {sorted(sizes)}, but batch_counts names {sorted(tasks)}. "
            "Pass one size per task."
        )
    invalid = {task: size for task, size in sizes.items() if not isinstance(size, int) or size < 1}
    if invalid:
        raise ValueError(f"Invalid dataset sizes {invalid}. Each task needs an integer size >= 1.")
    weights = torch.tensor([float(sizes[task]) for task in tasks], dtype=torch.float64)
    steps = sum(batch_counts.values())
    drawn = torch.multinomial(weights, steps, replacement=True, generator=generator)
    return [tasks[index] for index in drawn.tolist()]
