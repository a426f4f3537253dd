import numpy as np
import pytest
import torch

from adapterkit.training.metrics import classification_metrics


def test_metrics_hand_computed():
    # Per class, with predicted and true counts from the confusion matrix below:
    #   class 0: 1 of 2 predictions right, 1 of 2 examples found -> P 1/2, R 1/2, F1 1/2
    #   class 1: 2 of 3 predictions right, 2 of 2 examples found -> P 2/3, R 1, F1 4/5
    #   class 2: never predicted, 0 of 1 examples found -> P 0, R 0, F1 0
    metrics = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], num_labels=3)

    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert metrics["recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics["f1"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_metrics_perfect():
    metrics = classification_metrics([0, 1, 2, 1], [0, 1, 2, 1], num_labels=3)

    assert metrics["accuracy"] == 1.0
    assert metrics["precision"] == 1.0
    assert metrics["recall"] == 1.0
    assert metrics["f1"] == 1.0


def test_metrics_absent_class_skipped():
    # Class 2 occurs in neither list, so the averages are over classes 0 and 1:
    #   class 0: P 1/1, R 1/2, F1 2/3.  class 1: P 1/2, R 1/1, F1 2/3.
    metrics = classification_metrics([0, 0, 1], [0, 1, 1], num_labels=3)

    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["recall"] == pytest.approx(3 / 4)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_metrics_predicted_only_class():
    # Class 1 is predicted once but never true: P 0 and R 0 (no true examples).
    # Class 0: P 1/1, R 1/2, F1 2/3.
    metrics = classification_metrics([0, 0], [0, 1], num_labels=2)

    assert metrics["precision"] == pytest.approx(1 / 2)
    assert metrics["recall"] == pytest.approx(1 / 4)
    assert metrics["f1"] == pytest.approx(1 / 3)


def test_metrics_python_types():
    metrics = classification_metrics(np.array([0, 1]), np.array([1, 1]), num_labels=2)

    assert type(metrics["accuracy"]) is float
    assert type(metrics["f1"]) is float
    assert type(metrics["confusion_matrix"][0][0]) is int


def test_metrics_torch_tensors():
    metrics = classification_metrics(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), num_labels=2)

    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["confusion_matrix"] == [[1, 0], [1, 1]]


def test_metrics_length_mismatch():
    with pytest.raises(ValueError, match="3 ids but predicted_ids has 2"):
        classification_metrics([0, 1, 1], [0, 1], num_labels=2)


def test_metrics_empty():
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [], num_labels=2)


@pytest.mark.parametrize(
    ("true_ids", "predicted_ids", "pattern"),
    [
        ([0, 2], [0, 1], r"true_ids\[1\] is 2, outside 0\.\.1"),
        ([0, 1], [-1, 1], r"predicted_ids\[0\] is -1, outside 0\.\.1"),
    ],
)
def test_metrics_id_out_of_range(true_ids, predicted_ids, pattern):
    with pytest.raises(ValueError, match=pattern):
        classification_metrics(true_ids, predicted_ids, num_labels=2)


def test_metrics_float_ids():
    with pytest.raises(TypeError, match="integer class ids"):
        classification_metrics([0.0, 1.0], [0, 1], num_labels=2)


def test_metrics_two_dimensional():
    with pytest.raises(ValueError, match="1-D"):
        classification_metrics([[0, 1]], [[0, 1]], num_labels=2)


@pytest.mark.parametrize(("num_labels", "error"), [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_metrics_invalid_num_labels(num_labels, error):
    with pytest.raises(error, match="num_labels"):
        classification_metrics([0], [0], num_labels=num_labels)
