"""Training curves drawn to PNG files.

The figures use :class:`matplotlib.figure.Figure` with the Agg canvas directly rather
than :mod:`matplotlib.pyplot`, so drawing them never selects or changes the backend
that the caller's own plots use.
"""

from __future__ import annotations

import logging
import numbers
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_LOSS_KEYS = ("train_loss", "val_loss")
_METRIC_KEYS = ("val_accuracy", "val_f1")
_PANEL_SIZE_INCHES = (6.0, 4.0)
_DPI = 100


def plot_history(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Draw training curves from a per-epoch history and save them as a PNG.

    The left panel shows ``train_loss`` and ``val_loss``, and the right panel shows
    ``val_accuracy`` and ``val_f1``. A panel is left out when no entry has any of
    its keys. A value that is missing or None in an entry is skipped, so validation
    may run on only some epochs. The image is written to a temporary file in the same
    folder and then renamed over ``path``, so readers never see a partial image.
    Missing parent folders are created.

    Args:
        history: One dict per epoch with the key ``epoch`` and any of ``train_loss``,
            ``val_loss``, ``val_accuracy`` and ``val_f1``.
        path: Output file. It must end in ``.png``.

    Returns:
        The path of the written file.

    Raises:
        TypeError: If ``history`` is not a list of dicts, ``path`` is not path-like
            or a value is not a number.
        ValueError: If ``history`` is empty, an entry has no ``epoch``, no entry has
            a loss or metric, or ``path`` does not end in ``.png``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}: {path!r}.")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot_history writes PNG files, but the path {path} does not end in .png. Pass a .png path.")

    series = _collect_series(history)
    has_losses = any(series[key][0] for key in _LOSS_KEYS)
    has_metrics = any(series[key][0] for key in _METRIC_KEYS)
    if not has_losses and not has_metrics:
        keys = ", ".join(_LOSS_KEYS + _METRIC_KEYS)
        raise ValueError(f"No history entry has any of the keys {keys}. Record at least one of them per epoch.")

    panel_count = int(has_losses) + int(has_metrics)
    width, height = _PANEL_SIZE_INCHES
    figure = Figure(figsize=(width * panel_count, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    loss_axes = None
    if has_losses:
        loss_axes = figure.add_subplot(1, panel_count, 1)
        _draw_panel(loss_axes, series, _LOSS_KEYS, title="Loss", y_label="loss")
    if has_metrics:
        metric_axes = figure.add_subplot(1, panel_count, panel_count, sharex=loss_axes)
        _draw_panel(metric_axes, series, _METRIC_KEYS, title="Validation metrics", y_label="score")
        metric_axes.set_ylim(0.0, 1.0)
    figure.tight_layout()

    _save_atomically(figure, path)
    logger.debug("Saved training curves for %d epochs to %s", len(history), path)
    return path


def _collect_series(history: Any) -> dict[str, tuple[list[float], list[float]]]:
    """Return the (epochs, values) of each plotted key, validating ``history``."""
    if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Sequence):
        raise TypeError(f"history must be a list of dicts, one per epoch, got {type(history).__name__}.")
    if not history:
        raise ValueError("history is empty. Pass at least one epoch entry, such as {'epoch': 1, 'train_loss': 0.5}.")

    series: dict[str, tuple[list[float], list[float]]] = {key: ([], []) for key in _LOSS_KEYS + _METRIC_KEYS}
    for index, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise TypeError(f"history[{index}] must be a dict, got {type(entry).__name__}: {entry!r}.")
        if "epoch" not in entry:
            raise ValueError(f"history[{index}] has no 'epoch' key: {dict(entry)!r}. Add the epoch number to each entry.")
        epoch = _as_number(entry["epoch"], f"history[{index}]['epoch']")
        for key, (epochs, values) in series.items():
            value = entry.get(key)
            if value is None:
                continue
            epochs.append(epoch)
            values.append(_as_number(value, f"history[{index}][{key!r}]"))
    return series


def _as_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}.")
    return float(value)


def _draw_panel(
    axes: Any,
    series: dict[str, tuple[list[float], list[float]]],
    keys: tuple[str, ...],
    *,
    title: str,
    y_label: str,
) -> None:
    for key in keys:
        epochs, values = series[key]
        if epochs:
            axes.plot(epochs, values, marker="o", label=key)
    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.set_ylabel(y_label)
    axes.grid(True, alpha=0.3)
    if axes.lines:
        axes.legend()
    # Whole-number epochs get integer ticks.
    if all(epoch.is_integer() for key in keys for epoch in series[key][0]):
        axes.xaxis.get_major_locator().set_params(integer=True)


def _save_atomically(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "xb") applies the umask to the new file. tempfile.mkstemp would create
    # it with mode 0600, so only the owner could read the finished PNG.
    temporary_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary_path, "xb") as handle:
            figure.savefig(handle, format="png")
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
