import os
import struct
import subprocess
import sys

import pytest

from adapterkit.plots import plot_history

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FULL_HISTORY = [
    {"epoch": 1, "train_loss": 1.2, "val_loss": 1.0, "val_accuracy": 0.55, "val_f1": 0.5},
    {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9, "val_accuracy": 0.7, "val_f1": 0.66},
    {"epoch": 3, "train_loss": 0.5, "val_loss": 0.85, "val_accuracy": 0.74, "val_f1": 0.71},
]


def png_size(data: bytes) -> tuple[int, int]:
    """Return (width, height) from the IHDR chunk that follows the PNG signature."""
    return struct.unpack(">II", data[16:24])


def test_plot_png_file(tmp_path):
    path = plot_history(FULL_HISTORY, tmp_path / "curves.png")

    data = path.read_bytes()
    assert path == tmp_path / "curves.png"
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_plot_panel_count(tmp_path):
    train_only = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.7}]

    two_panels = plot_history(FULL_HISTORY, tmp_path / "two.png").read_bytes()
    one_panel = plot_history(train_only, tmp_path / "one.png").read_bytes()

    two_width, two_height = png_size(two_panels)
    one_width, one_height = png_size(one_panel)
    assert two_width == 2 * one_width
    assert two_height == one_height


def test_plot_metrics_only(tmp_path):
    metrics_only = [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.6}]
    train_only = [{"epoch": 1, "train_loss": 1.0}]

    metrics_png = plot_history(metrics_only, tmp_path / "metrics.png").read_bytes()
    train_png = plot_history(train_only, tmp_path / "train.png").read_bytes()

    assert metrics_png.startswith(PNG_SIGNATURE)
    assert png_size(metrics_png) == png_size(train_png)


def test_plot_sparse_validation(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 1.0, "val_loss": None},
        {"epoch": 2, "train_loss": 0.7, "val_loss": 0.8, "val_accuracy": 0.6},
    ]

    path = plot_history(history, tmp_path / "sparse.png")

    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_replaces_file(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")

    plot_history(FULL_HISTORY, path)

    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert os.listdir(tmp_path) == ["curves.png"]


def test_plot_creates_folder(tmp_path):
    path = plot_history(FULL_HISTORY, str(tmp_path / "runs" / "a" / "curves.png"))

    assert path.is_file()


def test_plot_keeps_pyplot_unloaded(tmp_path):
    # Run in a fresh interpreter because other tests may already have imported pyplot.
    script = (
        "import sys\n"
        "from adapterkit.plots import plot_history\n"
        f"plot_history([{{'epoch': 1, 'train_loss': 1.0}}], {str(tmp_path / 'curves.png')!r})\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "False"


def test_plot_empty_history(tmp_path):
    with pytest.raises(ValueError, match="history is empty"):
        plot_history([], tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_plot_missing_epoch(tmp_path):
    with pytest.raises(ValueError, match=r"history\[1\] has no 'epoch'"):
        plot_history([{"epoch": 1, "train_loss": 1.0}, {"train_loss": 0.5}], tmp_path / "curves.png")


def test_plot_no_curves(tmp_path):
    with pytest.raises(ValueError, match="train_loss"):
        plot_history([{"epoch": 1, "lr": 0.01}], tmp_path / "curves.png")


def test_plot_wrong_suffix(tmp_path):
    with pytest.raises(ValueError, match="does not end in .png"):
        plot_history(FULL_HISTORY, tmp_path / "curves.jpg")


def test_plot_history_not_list(tmp_path):
    with pytest.raises(TypeError, match="dict"):
        plot_history({"epoch": 1, "train_loss": 1.0}, tmp_path / "curves.png")


def test_plot_value_not_number(tmp_path):
    with pytest.raises(TypeError, match=r"history\[0\]\['train_loss'\].*str"):
        plot_history([{"epoch": 1, "train_loss": "1.0"}], tmp_path / "curves.png")
