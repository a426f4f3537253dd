"""Benchmark adapterkit against AdapterHub `adapters` and PEFT: step time, inference time, memory, size.

Run it with the Python of the venv that ``bench/setup_env.sh`` builds:

    /work/venv-bench/bin/python bench/run.py --smoke --methods lora pfeiffer   # a quick check of the pipeline
    /work/venv-bench/bin/python bench/run.py --repeats 2                       # the full benchmark

Each configuration (library, method, model) runs in its own Python process, so peak memory is that
configuration's alone and no library's imports or caches leak into another's timing. The run order
rotates the libraries from one method to the next, and every second repeat runs the model's block in
reverse, so slow drift of the machine (heat, other load) spreads over all libraries alike. Raw results
go to ``bench/results/<timestamp>.json``; ``bench/report.py`` turns them into ``bench/RESULTS.md``.

With ``--head-to-head``, each (method, model) runs in one process instead: every library's model and
the frozen floor take turns at training steps, so the libraries' step times share the process, the
allocator's history and the minutes they ran in. That mode times the training step only.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# The floors and the routing check are run as extra "libraries" next to the three adapter libraries.
BASELINE = "baseline"
FROZEN = "frozen"
FULL_FINETUNE = "full_finetune"
ROUTING = "routing"
# The "library" of a configuration whose process times every library's method (--head-to-head).
HEAD_TO_HEAD = "head_to_head"

logger = logging.getLogger("bench")


# -- the worker: one configuration in this process ---------------------------------------------------


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


class _Recorder:
    """Collects one configuration's measurements and the errors of its phases."""

    def __init__(self, spec: dict):
        self.result = {key: spec[key] for key in ("library", "method", "model", "repeat")}
        if "libraries" in spec:
            self.result["libraries"] = spec["libraries"]
        self.result.update({"status": "ok", "errors": {}, "tracebacks": {}, "memory_mib": {}, "notes": []})

    def fail(self, phase: str, error: BaseException) -> None:
        self.result["errors"][phase] = _error_text(error)
        self.result["tracebacks"][phase] = traceback.format_exc()[-4000:]
        self.result["status"] = "error" if phase == "setup" else "partial"

    def memory(self, stage: str, device) -> None:
        from measure import current_rss_mib, gpu_peak_mib, peak_rss_mib

        self.result["memory_mib"][stage] = {"peak_rss": peak_rss_mib(), "rss": current_rss_mib(),
                                            "gpu_peak_allocated": gpu_peak_mib(device)}


def _set_up_worker(spec: dict):
    """Set the worker's threads and logging, and return its torch device."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.set_num_interop_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    return torch.device(spec["device"])


def run_worker(spec: dict) -> dict:
    """Measure one configuration described by ``spec`` (see ``plan_configurations``) and return the record."""
    if spec["library"] == HEAD_TO_HEAD:
        return run_head_to_head(spec)
    record = _Recorder(spec)
    result = record.result

    import torch

    device = _set_up_worker(spec)
    import adapter_libraries as libs
    import measure
    from workloads import build_model, get_workload, make_batch

    result["torch_threads"] = torch.get_num_threads()
    record.memory("after_import", device)

    workload = get_workload(spec["model"], spec["smoke"])
    model = build_model(workload, spec["smoke"], spec["seed"], device)
    batch = make_batch(workload, model.config.vocab_size, spec["seed"], device)
    result["base_parameters"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    result["attention_implementation"] = getattr(model.config, "_attn_implementation", None)
    record.memory("after_model", device)

    route_per_sample = None
    try:
        # The same seed for every library's adapter init; the values do not change the cost.
        torch.manual_seed(spec["seed"] + 1)
        if spec["library"] == BASELINE and spec["method"] == FROZEN:
            prepared = libs.prepare_frozen(model)
        elif spec["library"] == BASELINE and spec["method"] == FULL_FINETUNE:
            prepared = libs.prepare_full_finetune(model)
        elif spec["method"] == ROUTING:
            prepared, route_per_sample = libs.prepare_routing(model)
        else:
            prepared = libs.PREPARE[spec["library"]](model, spec["method"], workload.family, workload.task)
        prepared.model.to(device)
    except Exception as error:  # noqa: BLE001 - a library that fails here is a result, not a crash
        record.fail("setup", error)
        return result
    result["notes"] += prepared.notes

    parameters = libs.trainable_parameters(prepared.model)
    result["trainable_parameters"] = sum(p.numel() for p in parameters)
    result["trainable_head_parameters"] = libs.count_head_parameters(prepared.model)
    result["trainable_adapter_parameters"] = result["trainable_parameters"] - result["trainable_head_parameters"]
    result["attention_implementation"] = getattr(model.config, "_attn_implementation", None)
    record.memory("after_setup", device)

    if spec["count_only"]:
        _measure_checkpoint(record, prepared)
        return result

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if spec["method"] != ROUTING:
        try:
            result["train_step_s"] = measure.time_training(prepared.model, batch, parameters, spec["warmup"],
                                                           spec["steps"], device)
        except Exception as error:  # noqa: BLE001
            record.fail("train", error)
        record.memory("after_train", device)
        if device.type == "cpu" and "train" not in result["errors"]:
            try:
                result["train_heap_mib"] = measure.heap_peak_of_training_step(prepared.model, batch, parameters)
            except Exception as error:  # noqa: BLE001
                record.fail("train_heap", error)

    # The frozen floor again, as a second copy of the base model in this process, built after the
    # memory readings so they stay the adapter's alone.
    reference = None
    if spec["method"] not in (FROZEN, ROUTING):
        try:
            reference = libs.prepare_frozen(build_model(workload, spec["smoke"], spec["seed"], device)).model
        except Exception as error:  # noqa: BLE001
            record.fail("bare_reference", error)
    if reference is not None and "train" not in result["errors"] and spec["floor_in_turns"]:
        try:
            result["floor_alternating_train_s"], result["train_alternating_s"] = measure.time_training_alternating(
                [(reference, []), (prepared.model, parameters)], batch, spec["warmup"], spec["steps"], device)
        except Exception as error:  # noqa: BLE001
            record.fail("train_in_turns", error)

    if spec["method"] != FULL_FINETUNE:
        _measure_inference(record, prepared, reference, batch, spec, device, route_per_sample)
    _measure_checkpoint(record, prepared)
    return result


def run_head_to_head(spec: dict) -> dict:
    """Time the training step of ``spec["method"]`` in each of ``spec["libraries"]`` and of the floor, taking turns.

    Each library gets its own copy of the base model, built from the same seed, and the frozen floor
    one more. A library that fails to set up is recorded under ``errors`` and the others still run.

    Returns:
        The record, with ``train_alternating_s`` mapping each library that ran to its step durations,
        ``floor_alternating_train_s`` the floor's, and ``trainable_parameters`` per library.
    """
    record = _Recorder(spec)
    result = record.result
    import torch

    device = _set_up_worker(spec)
    import adapter_libraries as libs
    import measure
    from workloads import build_model, get_workload, make_batch

    workload = get_workload(spec["model"], spec["smoke"])
    floor = libs.prepare_frozen(build_model(workload, spec["smoke"], spec["seed"], device)).model
    batch = make_batch(workload, floor.config.vocab_size, spec["seed"], device)
    loops, names = [(floor, [])], []
    result["trainable_parameters"] = {}
    for library in spec["libraries"]:
        try:
            model = build_model(workload, spec["smoke"], spec["seed"], device)
            torch.manual_seed(spec["seed"] + 1)
            prepared = libs.PREPARE[library](model, spec["method"], workload.family, workload.task)
            prepared.model.to(device)
        except Exception as error:  # noqa: BLE001 - a library that fails here is a result, not a crash
            record.fail(f"setup {library}", error)
            result["status"] = "partial"
            continue
        parameters = libs.trainable_parameters(prepared.model)
        result["trainable_parameters"][library] = sum(p.numel() for p in parameters)
        loops.append((prepared.model, parameters))
        names.append(library)
    if not names:
        result["status"] = "error"
        return result
    try:
        durations = measure.time_training_alternating(loops, batch, spec["warmup"], spec["steps"], device)
    except Exception as error:  # noqa: BLE001
        record.fail("train_in_turns", error)
        return result
    result["floor_alternating_train_s"] = durations[0]
    result["train_alternating_s"] = dict(zip(names, durations[1:]))
    record.memory("after_train", device)
    return result


def _measure_inference(record: _Recorder, prepared, reference, batch: dict, spec: dict, device,
                       route_per_sample) -> None:
    """Time the adapter's inference, unmerged and merged; beside each, the bare ``reference`` in turns with it.

    ``reference`` is a second copy of the base model built from the same seed, or ``None``. It is
    timed in rounds alternating with the adapter's loop (``measure.time_inference_alternating``). A
    bare loop timed once before the adapter's, in a process not yet warm, came out 4 to 9% slower
    than the loops after it, which made the adapter look faster than the bare model it extends.
    """
    import measure

    result = record.result

    def time_with_reference(prefix: str):
        if reference is None:
            durations, logits = measure.time_inference(prepared.model, batch, spec["warmup"],
                                                       spec["inference_steps"], device)
        else:
            (bare, _), (durations, logits) = measure.time_inference_alternating(
                [(reference, batch), (prepared.model, batch)], spec["warmup"], spec["inference_steps"], device)
            result[f"bare_alternating_{prefix}s"] = bare
        result[f"{prefix}s"] = durations
        return logits

    try:
        logits = time_with_reference("inference_")
    except Exception as error:  # noqa: BLE001
        record.fail("inference", error)
        return
    record.memory("after_inference", device)

    if prepared.merge is not None:
        try:
            prepared.merge()
            merged_logits = time_with_reference("merged_inference_")
            # The merged model must compute what the unmerged one did; a large value means a broken merge.
            result["merge_max_abs_logit_change"] = float((merged_logits - logits).abs().max())
        except Exception as error:  # noqa: BLE001
            record.fail("merged_inference", error)

    if spec["method"] == ROUTING:
        try:
            # One adapter for the whole batch and a batch routed row by row, timed in turns.
            (result["single_adapter_inference_s"], _), (result["routed_inference_s"], _) = (
                measure.time_inference_alternating([(prepared.model, batch), (prepared.model, route_per_sample(batch))],
                                                   spec["warmup"], spec["inference_steps"], device))
            result["routing"] = {"status": "ok", "adapters": 8}
        except Exception as error:  # noqa: BLE001
            record.fail("routed_inference", error)


def _measure_checkpoint(record: _Recorder, prepared) -> None:
    import measure

    try:
        record.result["checkpoint"] = measure.checkpoint_size(prepared.save)
        for name, save in prepared.other_saves.items():
            record.result.setdefault("other_checkpoints", {})[name] = measure.checkpoint_size(save)
    except Exception as error:  # noqa: BLE001
        record.fail("checkpoint", error)


def worker_main(spec_json: str, result_path: str) -> int:
    """Run one configuration and write its record to ``result_path`` as JSON; return the exit code."""
    spec = json.loads(spec_json)
    sys.path.insert(0, str(BENCH_DIR))
    started = time.perf_counter()
    try:
        result = run_worker(spec)
    except Exception as error:  # noqa: BLE001 - report any failure as data for the orchestrator
        result = {key: spec[key] for key in ("library", "method", "model", "repeat", "libraries") if key in spec}
        result.update({"status": "error", "errors": {"worker": _error_text(error)},
                       "tracebacks": {"worker": traceback.format_exc()[-4000:]}})
    result["process_wall_s"] = time.perf_counter() - started
    Path(result_path).write_text(json.dumps(result))
    return 0


# -- the orchestrator ------------------------------------------------------------------------------


def plan_configurations(models: list[str], methods: list[str], libraries: list[str], repeats: int,
                        floors: bool, routing: bool, head_to_head: bool = False) -> list[dict]:
    """Return the configurations in run order.

    Per model the block is: the frozen floor, then each method with the libraries that have it, the
    libraries rotated by one place per method, then full fine-tuning and the routing check. Odd
    repeats run each block reversed.

    With ``head_to_head``, the block is one configuration per method that a library in ``libraries``
    has, with ``library`` ``HEAD_TO_HEAD`` and ``libraries`` the ones that have it, rotated by one place
    per method. ``floors`` and ``routing`` do not apply: each of these processes times its own floor.
    """
    from adapter_libraries import LIBRARY_METHODS

    order = []
    for repeat in range(repeats):
        for model in models:
            if head_to_head:
                block = []
                for index, method in enumerate(methods):
                    shift = (index + repeat) % len(libraries)
                    having = [library for library in libraries[shift:] + libraries[:shift]
                              if method in LIBRARY_METHODS[library]]
                    if having:
                        block.append({"library": HEAD_TO_HEAD, "method": method, "model": model, "repeat": repeat,
                                      "libraries": having})
                order += block[::-1] if repeat % 2 else block
                continue
            block = []
            if floors:
                block.append((BASELINE, FROZEN))
            for index, method in enumerate(methods):
                shift = (index + repeat) % len(libraries)
                rotated = libraries[shift:] + libraries[:shift]
                block += [(library, method) for library in rotated if method in LIBRARY_METHODS[library]]
            if floors:
                block.append((BASELINE, FULL_FINETUNE))
            if routing and "adapterkit" in libraries:
                block.append(("adapterkit", ROUTING))
            if repeat % 2:
                block.reverse()
            order += [{"library": library, "method": method, "model": model, "repeat": repeat}
                      for library, method in block]
    return order


def machine_description(device: str, threads: int) -> dict:
    """Return the CPU model, core counts, load average and GPU (if any) of this machine."""
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    description = {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "load_average_1_5_15": list(os.getloadavg()),
        "platform": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda"):
        output = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                                capture_output=True, text=True, check=False)
        description["gpu"] = output.stdout.strip() or output.stderr.strip()[-300:]
    return description


def library_versions() -> dict:
    """Return the versions of Python and the measured packages, and adapterkit's git commit."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "adapters", "peft", "adapterkit", "accelerate", "safetensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    git = ["git", "-C", str(REPO_DIR)]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    changes = subprocess.run(git + ["status", "--porcelain", "--", "src"], capture_output=True, text=True,
                             check=False).stdout.strip()
    # The tree hash of src/ is equal across commits that change only the benchmark or the docs, so runs
    # of such commits measure the same adapterkit and can be reported together.
    tree = subprocess.run(git + ["rev-parse", "HEAD:src"], capture_output=True, text=True, check=False).stdout.strip()
    versions["adapterkit_commit"] = commit or None
    versions["adapterkit_src_tree"] = tree or None
    versions["adapterkit_src_modified"] = bool(changes)
    return versions


def _worker_environment(threads: int) -> dict:
    environment = dict(os.environ)
    environment.update({
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PYTHONWARNINGS": "ignore",
    })
    return environment


def run_configuration(config: dict, settings: dict, timeout_s: float) -> dict:
    """Run one configuration in a new Python process and return its record; failures become records too."""
    spec = dict(config, **settings)
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec),
                   "--result-file", str(result_path)]
        load_before = os.getloadavg()[0]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                       env=_worker_environment(settings["threads"]), check=False)
            stderr_tail, return_code = completed.stderr[-3000:], completed.returncode
        except subprocess.TimeoutExpired as error:
            stderr_tail = (error.stderr or b"")[-3000:]
            stderr_tail = stderr_tail.decode(errors="replace") if isinstance(stderr_tail, bytes) else stderr_tail
            return dict(config, status="error", errors={"worker": f"timed out after {timeout_s:.0f} s"},
                        stderr_tail=stderr_tail)
        if result_path.exists():
            result = json.loads(result_path.read_text())
        else:
            result = dict(config, status="error",
                          errors={"worker": f"the worker exited with code {return_code} and wrote no result"})
            result["stderr_tail"] = stderr_tail
    result["load_average_1min_before"] = load_before
    return result


def _summary_line(result: dict) -> str:
    if result.get("status") == "skipped":
        return "skipped: " + result["errors"]["skipped"]
    parts = []
    floor = result.get("floor_alternating_train_s")
    if result.get("library") == HEAD_TO_HEAD and floor:
        for library, durations in result.get("train_alternating_s", {}).items():
            parts.append(f"{library} {statistics.median(durations) / statistics.median(floor):.3f} of the floor")
        return ", ".join(parts + [f"{phase} failed: {message[:160]}"
                                  for phase, message in result.get("errors", {}).items()])
    for key, label in (("train_step_s", "train"), ("inference_s", "infer"), ("merged_inference_s", "merged")):
        if result.get(key):
            parts.append(f"{label} {statistics.median(result[key]) * 1000:.1f} ms")
    if isinstance(result.get("trainable_parameters"), int):
        parts.append(f"trainable {result['trainable_parameters']:,}")
    for phase, message in result.get("errors", {}).items():
        parts.append(f"{phase} failed: {message[:160]}")
    return ", ".join(parts) or result.get("status", "?")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    from adapter_libraries import LIBRARIES, METHODS
    from workloads import WORKLOAD_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes to check the pipeline: hidden 64, 2 layers, batch 2, length 16, 3 steps")
    parser.add_argument("--models", nargs="+", choices=WORKLOAD_NAMES, default=list(WORKLOAD_NAMES))
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS),
                        help="adapter methods to measure; with no names, only the floors and the routing check run")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--no-floors", action="store_true",
                        help="skip the frozen-model floor, bare inference and full fine-tuning")
    parser.add_argument("--no-routing", action="store_true", help="skip the per-sample routing check")
    parser.add_argument("--head-to-head", action="store_true",
                        help="time each method's training step with every library in one process, taking turns with "
                             "each other and the frozen floor; no inference, memory, checkpoint, full fine-tuning or "
                             "routing measurements")
    parser.add_argument("--no-floor-in-turns", action="store_true",
                        help="skip timing the frozen floor in turns with each method's training steps in its own "
                             "process; that timing doubles the training time of a run")
    parser.add_argument("--device", default="cpu", help="torch device for every configuration: cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads per process (default: the cores this process may use)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base weights and the batch")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before each timed loop (default 3; "
                        "smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20; smoke 3)")
    parser.add_argument("--inference-steps", type=int, default=None,
                        help="timed forward passes per inference loop (default 20; smoke 3)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every configuration this many times, each in a new process, for the rerun spread")
    parser.add_argument("--count-only", action="store_true",
                        help="only count trainable parameters and checkpoint sizes; no timing")
    parser.add_argument("--config-timeout-s", type=float, default=None,
                        help="kill a configuration's process after this many seconds (default 1800; smoke 300)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="start no configuration after this many seconds; the rest are recorded as skipped")
    parser.add_argument("--output", type=Path, default=None,
                        help="results file (default bench/results/<UTC timestamp>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)

    defaults = {"warmup": (1, 3), "steps": (3, 20), "inference_steps": (3, 20), "config_timeout_s": (300, 1800)}
    for name, (smoke_value, full_value) in defaults.items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, smoke_value if arguments.smoke else full_value)
    if arguments.threads is None:
        arguments.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for name in ("threads", "steps", "inference_steps", "repeats"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(arguments, name)}")
    if arguments.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {arguments.warmup}")
    if arguments.head_to_head and not arguments.methods:
        parser.error("--head-to-head times methods, and --methods was given no names; name one, for example "
                     "--methods mam, or drop --head-to-head")
    if arguments.head_to_head and arguments.count_only:
        parser.error("--head-to-head times training steps and --count-only times nothing; drop one of them")
    if not arguments.methods and arguments.no_floors and (arguments.no_routing or "adapterkit" not in arguments.libraries):
        parser.error("--methods was given no names and --no-floors and --no-routing leave nothing else to run; "
                     "name a method, for example --methods lora, or drop --no-floors")
    if not arguments.smoke and arguments.steps < 20 and not arguments.count_only:
        logger.warning("--steps %d is below the 20 timed steps the medians are meant to rest on", arguments.steps)
    return arguments


def check_environment(libraries: list[str], device: str) -> None:
    """Exit with a message when a measured package is missing or the device is unavailable."""
    missing = [name for name in ["transformers", "adapterkit", *libraries] if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"Missing packages in {sys.executable}: {', '.join(missing)}. Build the benchmark venv with "
                 "`bash bench/setup_env.sh` and run this script with its Python (/work/venv-bench/bin/python)")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--device {device} was requested, but torch {torch.__version__} sees no CUDA device; "
                     "install a CUDA build of torch or use --device cpu")


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(BENCH_DIR))
    raw_argv = sys.argv[1:] if argv is None else argv
    arguments = parse_arguments(raw_argv)
    if arguments.worker is not None:
        return worker_main(arguments.worker, arguments.result_file)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_environment(arguments.libraries, arguments.device)

    started_at = datetime.datetime.now(datetime.timezone.utc)
    output = arguments.output or RESULTS_DIR / f"{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {"smoke": arguments.smoke, "seed": arguments.seed, "threads": arguments.threads,
                "device": arguments.device, "warmup": arguments.warmup, "steps": arguments.steps,
                "inference_steps": arguments.inference_steps, "count_only": arguments.count_only,
                "floor_in_turns": not arguments.no_floor_in_turns, "head_to_head": arguments.head_to_head}
    configurations = plan_configurations(arguments.models, arguments.methods, arguments.libraries,
                                         arguments.repeats, floors=not arguments.no_floors,
                                         routing=not arguments.no_routing, head_to_head=arguments.head_to_head)
    from adapter_libraries import HYPER_PARAMETERS, LIBRARY_METHODS
    from workloads import get_workload

    document = {
        "created": started_at.isoformat(timespec="seconds"),
        "command": "python bench/run.py " + " ".join(shlex.quote(argument) for argument in raw_argv),
        "smoke": arguments.smoke,
        "settings": settings,
        "memory_method": "peak resident set size of the configuration's own process (getrusage ru_maxrss), read "
                         "after each phase; on CPU also the live-heap peak of one extra training step after the "
                         "timed ones (glibc mallinfo2, read after every aten operation); on CUDA also "
                         "torch.cuda.max_memory_allocated",
        "machine": machine_description(arguments.device, arguments.threads),
        "versions": library_versions(),
        "workloads": {name: get_workload(name, arguments.smoke).__dict__ for name in arguments.models},
        "hyper_parameters": HYPER_PARAMETERS,
        "library_methods": {name: list(methods) for name, methods in LIBRARY_METHODS.items()},
        "runs": [],
    }
    logger.info("Running %d configurations; results go to %s", len(configurations), output)
    clock = time.perf_counter()
    for number, config in enumerate(configurations, start=1):
        library = "+".join(config["libraries"]) if "libraries" in config else config["library"]
        label = f"[{number}/{len(configurations)}] {config['model']} {library} {config['method']}"
        if arguments.time_budget_s is not None and time.perf_counter() - clock > arguments.time_budget_s:
            result = dict(config, status="skipped",
                          errors={"skipped": f"--time-budget-s {arguments.time_budget_s:g} was spent before this "
                                             "configuration"})
        else:
            result = run_configuration(config, settings, arguments.config_timeout_s)
        document["runs"].append(result)
        document["elapsed_s"] = time.perf_counter() - clock
        output.write_text(json.dumps(document, indent=1))
        logger.info("%s: %s (%.1f s)", label, _summary_line(result), result.get("process_wall_s", 0.0))
    document["machine"]["load_average_1_5_15_at_end"] = list(os.getloadavg())
    output.write_text(json.dumps(document, indent=1))
    logger.info("Wrote %s in %.0f s. Next: python bench/report.py %s", output, document["elapsed_s"], output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
