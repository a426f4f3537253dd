"""Timing loops, memory readings and checkpoint sizes for one benchmark process."""

from __future__ import annotations

import ctypes
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


def time_training_alternating(loops: list[tuple[nn.Module, list[nn.Parameter]]], batch: dict[str, torch.Tensor],
                              warmup: int, steps: int, device: torch.device, rounds: int = 4) -> list[list[float]]:
    """Time ``steps`` training steps of each (model, trainable parameters) loop, taking turns in ``rounds`` rounds.

    A step is what ``time_training`` times. Each loop first runs ``warmup`` untimed steps. Then the
    loops take turns as in ``time_inference_alternating``, so the ratio of two loops' times is free of
    the drift between processes and between loops.

    Returns:
        Per loop, in the order given: the ``steps`` durations in seconds.
    """
    optimizers = [torch.optim.AdamW(parameters, lr=1e-4) if parameters else None for _, parameters in loops]
    durations: list[list[float]] = [[] for _ in loops]

    def train(index: int, count: int, keep: bool) -> None:
        model, optimizer = loops[index][0], optimizers[index]
        for _ in range(count):
            synchronize(device)
            start = time.perf_counter()
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            if optimizer is not None:
                optimizer.step()
            synchronize(device)
            if keep:
                durations[index].append(time.perf_counter() - start)

    for model, _ in loops:
        model.train()
    for index in range(len(loops)):
        train(index, warmup, keep=False)
    _take_turns(len(loops), steps, rounds, train)
    return durations


def _take_turns(count: int, steps: int, rounds: int, run) -> None:
    """Call ``run(index, share, keep=True)`` for loops ``0..count-1`` in rounds, so each loop runs ``steps`` in all.

    The first ``steps % rounds`` rounds take one step more, and every second round reverses the order.
    """
    rounds = max(1, min(rounds, steps))
    for number in range(rounds):
        share = steps // rounds + (1 if number < steps % rounds else 0)
        order = range(count) if number % 2 == 0 else reversed(range(count))
        for index in order:
            run(index, share, keep=True)


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


def time_inference_alternating(loops: list[tuple[nn.Module, dict[str, torch.Tensor]]], warmup: int, steps: int,
                               device: torch.device, rounds: int = 4) -> list[tuple[list[float], torch.Tensor]]:
    """Time ``steps`` forward passes of each (model, batch) loop, the loops taking turns in ``rounds`` rounds.

    Each loop first runs ``warmup`` untimed passes. Then every round times a share of the steps of
    each loop in turn, and every second round reverses the order. A slow stretch of the machine or a
    loop's position in the process thus falls on all loops alike. Two loops timed this way give a
    ratio that drift between loops does not reach.

    Returns:
        Per loop, in the order given: the ``steps`` durations in seconds and the logits of its last
        pass on the CPU.
    """
    inputs = [{key: value for key, value in batch.items() if key != "labels"} for _, batch in loops]
    durations: list[list[float]] = [[] for _ in loops]
    logits: list[torch.Tensor | None] = [None for _ in loops]

    def forwards(index: int, count: int, keep: bool) -> None:
        model = loops[index][0]
        for _ in range(count):
            synchronize(device)
            start = time.perf_counter()
            logits[index] = model(**inputs[index]).logits
            synchronize(device)
            if keep:
                durations[index].append(time.perf_counter() - start)

    for model, _ in loops:
        model.eval()
    with torch.inference_mode():
        for index in range(len(loops)):
            forwards(index, warmup, keep=False)
        _take_turns(len(loops), steps, rounds, forwards)
    return [(timings, output.float().cpu()) for timings, output in zip(durations, logits)]


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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_mallinfo2():
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _load_mallinfo2()


def heap_in_use_bytes() -> int | None:
    """Return the bytes allocated by malloc and not yet freed, or ``None`` without glibc 2.33 or newer.

    This counts live allocations only (``uordblks`` over all arenas plus memory-mapped chunks,
    ``hblkhd``). The resident set size also contains freed memory that malloc keeps for reuse, which
    depends on the order of past allocations more than on how much is live.
    """
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def heap_peak_of_training_step(model: nn.Module, batch: dict[str, torch.Tensor],
                               parameters: list[nn.Parameter]) -> dict[str, float] | None:
    """Run one training step (as ``time_training`` does) and return its live-heap peak in MiB.

    The heap in use is read after every aten operation of the forward, the backward and the optimizer
    step, so a peak inside one operation (a temporary it frees before returning) is missed alike for
    every library. Returns ``{"at_rest": ..., "peak": ...}``, where ``at_rest`` is the heap in use
    before the step (weights, optimizer state), or ``None`` where ``heap_in_use_bytes`` is unavailable.
    Call it after at least one step, so the optimizer state exists.
    """
    if heap_in_use_bytes() is None:
        return None
    from torch.utils._python_dispatch import TorchDispatchMode

    peak = 0

    class HeapWatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal peak
            output = func(*args, **(kwargs or {}))
            peak = max(peak, heap_in_use_bytes())
            return output

    model.train()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4) if parameters else None
    if optimizer is not None:
        # Fill AdamW's state first, so that the "at rest" reading includes it, as during a timed step.
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    at_rest = heap_in_use_bytes()
    peak = at_rest
    with HeapWatch():
        loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    del loss
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    return {"at_rest": at_rest / 2**20, "peak": peak / 2**20}
