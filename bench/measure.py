"""Timing loops, memory readings and checkpoint sizes for one benchmark process."""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(model: nn.Module, batch: dict[str, torch.Tensor], parameters: list[nn.Parameter],
                  warmup: int, steps: int, device: torch.device) -> list[float]:
    """Time ``warmup + steps`` training steps and return the last ``steps`` durations in seconds.

    A step is zeroing the gradients, the forward pass with the loss, the backward pass and one AdamW
    step. With no trainable ``parameters`` (the frozen floor) a step is the forward and backward only.
    """
    model.train()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4) if parameters else None
    durations = []
    for _ in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        synchronize(device)
        durations.append(time.perf_counter() - start)
    return durations[warmup:]


def time_inference(model: nn.Module, batch: dict[str, torch.Tensor], warmup: int, steps: int,
                   device: torch.device) -> tuple[list[float], torch.Tensor]:
    """Time ``warmup + steps`` forward passes in eval and inference mode.

    Returns:
        The last ``steps`` durations in seconds, and the logits of the last pass on the CPU, shape
        (batch, labels) or (batch, length, vocabulary).
    """
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    model.eval()
    durations = []
    logits = None
    with torch.inference_mode():
        for _ in range(warmup + steps):
            synchronize(device)
            start = time.perf_counter()
            logits = model(**inputs).logits
            synchronize(device)
            durations.append(time.perf_counter() - start)
    return durations[warmup:], logits.float().cpu()


def peak_rss_mib() -> float:
    """Return the peak resident set size of this process so far, in MiB (``ru_maxrss``, which Linux gives in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Return the resident set size of this process now, in MiB, from ``/proc/self/statm``."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * resource.getpagesize() / 2**20


def gpu_peak_mib(device: torch.device) -> float | None:
    """Return the peak memory that torch allocated on ``device`` since the last reset, in MiB."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def checkpoint_size(save) -> dict[str, object]:
    """Call ``save(folder)`` on a new temporary folder and return the bytes and names of what it wrote."""
    folder = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    try:
        save(folder)
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        return {
            "bytes": sum(path.stat().st_size for path in files),
            "files": [str(path.relative_to(folder)) for path in files],
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
