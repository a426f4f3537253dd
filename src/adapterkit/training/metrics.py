"""Classification metrics computed with NumPy."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_metrics(true_ids: Any, predicted_ids: Any, num_labels: int) -> dict[str, Any]:
    """Compute accuracy, macro-averaged precision, recall and F1, and the confusion matrix.

    Precision, recall and F1 are computed per class and then averaged with equal weight
    over the classes that occur in ``true_ids`` or ``predicted_ids``. Classes that occur
    in neither are left out of the average, so a test set that lacks a class is not
    penalised for it. A ratio with a zero denominator counts as 0. So a class that is
    never predicted has precision 0, a predicted class with no true examples has
    recall 0, and a class with precision and recall 0 has F1 0. F1 is the mean of the
    per-class F1 scores, not the harmonic mean of the averaged precision and recall.

    Args:
        true_ids: True class ids as a 1-D sequence, NumPy array or tensor of integers.
        predicted_ids: Predicted class ids, with the same length as ``true_ids``.
        num_labels: Number of classes. Every id must be in 0..num_labels-1.

    Returns:
        A dict with the floats ``accuracy``, ``precision``, ``recall`` and ``f1`` in
        [0, 1], and ``confusion_matrix``, a ``num_labels`` x ``num_labels`` list of
        lists of ints whose rows are true classes and whose columns are predicted
        classes.

    Raises:
        TypeError: If ``num_labels`` is not an int or the ids are not integers.
        ValueError: If ``num_labels`` < 1, the ids are not 1-D, empty or of different
            lengths, or an id is out of range.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)):
        raise TypeError(f"num_labels must be an int, got {type(num_labels).__name__}: {num_labels!r}.")
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}.")

    true = _as_id_array(true_ids, "true_ids", num_labels)
    predicted = _as_id_array(predicted_ids, "predicted_ids", num_labels)
    if len(true) != len(predicted):
        raise ValueError(
            f"true_ids has {len(true)} ids but predicted_ids has {len(predicted)}. Pass one prediction per example."
        )
    if len(true) == 0:
        raise ValueError("true_ids and predicted_ids are empty. Pass at least one example.")

    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(confusion, (true, predicted), 1)

    true_positives = np.diag(confusion).astype(np.float64)
    predicted_counts = confusion.sum(axis=0)
    true_counts = confusion.sum(axis=1)
    precision = _safe_divide(true_positives, predicted_counts)
    recall = _safe_divide(true_positives, true_counts)
    f1 = _safe_divide(2 * precision * recall, precision + recall)

    present = (predicted_counts + true_counts) > 0
    return {
        "accuracy": float(true_positives.sum() / len(true)),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "f1": float(f1[present].mean()),
        "confusion_matrix": confusion.tolist(),
    }


def _as_id_array(ids: Any, name: str, num_labels: int) -> np.ndarray:
    # Tensors may live on an accelerator, and NumPy can only read them from the CPU.
    if hasattr(ids, "detach") and hasattr(ids, "cpu"):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}. Pass one class id per example.")
    if array.size == 0:
        return array.astype(np.int64)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must contain integer class ids, got dtype {array.dtype}. Pass ids, not scores.")

    out_of_range = (array < 0) | (array >= num_labels)
    if out_of_range.any():
        position = int(np.flatnonzero(out_of_range)[0])
        raise ValueError(
            f"{name}[{position}] is {int(array[position])}, outside 0..{num_labels - 1}. "
            "Check num_labels and the ids."
        )
    return array.astype(np.int64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    result = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result
