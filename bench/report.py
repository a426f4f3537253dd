"""Turn a results file of ``bench/run.py`` into ``bench/RESULTS.md`` and a plot of the ratios.

    python bench/report.py                              # the newest file in bench/results/
    python bench/report.py bench/results/20261205T001500Z.json --output /tmp/RESULTS.md

Statistics: each configuration's value is the median of its timed steps; with reruns, the median of
the runs' medians. Its spread is the interquartile range of all its timed steps and, with reruns,
the range of the runs' medians. A configuration's noise interval runs from the lower of its first
quartile and lowest rerun median to the higher of its third quartile and highest rerun median. Two
configurations differ "within noise" when their noise intervals overlap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

BASELINE = "baseline"
FROZEN = "frozen"
FULL_FINETUNE = "full_finetune"
ROUTING = "routing"
HEAD_TO_HEAD = "head_to_head"
PEERS = ("adapters", "peft")

# Explanations, per (method, peer), of trainable parameter counts that differ from adapterkit's under the
# same hyper-parameters. Checked against adapters 1.3.0 and PEFT 0.21.2 source and parameter counts.
KNOWN_DIFFERENCES = {
    ("ia3", "adapters"): "adapters 1.3.0 puts the feed-forward (IA)^3 vector on the output of the module it "
                         "calls `intermediate`: BERT's intermediate.dense (FFN width, before the activation), "
                         "but Llama's mlp.down_proj (hidden width). adapterkit and PEFT scale the input of the "
                         "down projection (FFN width, after the activation), so on Llama adapters trains fewer "
                         "parameters.",
    ("prefix_tuning", "peft"): "Under grouped-query attention PEFT 0.21.2 sets the prefix embedding width and the "
                               "MLP input to the key/value width (head size x KV heads); adapterkit and adapters "
                               "use the hidden size, so PEFT's prefix MLP is smaller on Llama.",
}

# Facts that explain checkpoint sizes which differ for the same trained parameters.
CHECKPOINT_NOTES = [
    "PEFT's prefix-tuning checkpoint holds the prefixes the MLP computes (prefix length x layers x 2 x key/value "
    "width), not the MLP, so it is smaller than its trainable parameters; adapterkit and adapters save the MLP.",
    "adapters 1.3.0 `save_adapter` also writes the model's head by default. For the causal LM that is the "
    "output embedding matrix (vocabulary x hidden, tied to the frozen input embeddings), which dominates its "
    "checkpoint; the size with `with_head=False` is shown in brackets.",
    "All three save the classification head with the adapter. adapters 1.3.0 writes PyTorch pickle files "
    "(pytorch_adapter.bin, pytorch_model_head.bin) and two JSON configs, PEFT writes safetensors, a JSON config "
    "and a README.md, adapterkit writes safetensors and one JSON config. These extra files dominate tiny adapters.",
]


@dataclass(frozen=True)
class Summary:
    """The timing of one configuration over its steps and reruns, in seconds."""

    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float
    steps: int
    rerun_medians: tuple[float, ...]

    @property
    def noise_low(self) -> float:
        return min([self.q1, *self.rerun_medians])

    @property
    def noise_high(self) -> float:
        return max([self.q3, *self.rerun_medians])


def summarize(runs: list[list[float]]) -> Summary | None:
    """Summarize the step times of one configuration, one list per rerun; ``None`` if there are none."""
    runs = [run for run in runs if run]
    if not runs:
        return None
    pooled = sorted(value for run in runs for value in run)
    if len(pooled) >= 2:
        q1, _, q3 = statistics.quantiles(pooled, n=4, method="inclusive")
    else:
        q1 = q3 = pooled[0]
    medians = tuple(statistics.median(run) for run in runs)
    return Summary(median=statistics.median(medians), q1=q1, q3=q3, minimum=pooled[0], maximum=pooled[-1],
                   steps=len(pooled), rerun_medians=medians if len(runs) > 1 else ())


def within_noise(first: Summary, second: Summary) -> bool:
    """Return whether the noise intervals of two summaries overlap."""
    return first.noise_low <= second.noise_high and second.noise_low <= first.noise_high


def ratio_text(numerator: Summary | None, denominator: Summary | None) -> str:
    """Format ``numerator / denominator`` of the medians, marked "within noise" when the intervals overlap."""
    if numerator is None or denominator is None or denominator.median == 0:
        return "n/a"
    text = f"{numerator.median / denominator.median:.2f}"
    return f"{text} (within noise)" if within_noise(numerator, denominator) else text


# -- grouping the raw runs ----------------------------------------------------------------------------


class Configuration:
    """All reruns of one (model, library, method)."""

    def __init__(self, model: str, library: str, method: str):
        self.model, self.library, self.method = model, library, method
        self.runs: list[dict] = []

    def timing(self, key: str) -> Summary | None:
        return summarize([run.get(key) or [] for run in self.runs])

    def train_over_floor(self) -> Summary | None:
        """Summarize the training steps timed in turns with the floor, each divided by that run's floor median.

        The floor runs in the same process in turns with the method, so the machine's drift between
        processes cancels out of these quotients, and two libraries' quotients compare directly.
        """
        quotients = []
        for run in self.runs:
            floor, train = run.get("floor_alternating_train_s"), run.get("train_alternating_s")
            if floor and train:
                quotients.append([step / statistics.median(floor) for step in train])
        return summarize(quotients)

    def first(self, key: str, default=None):
        for run in self.runs:
            if run.get(key) is not None:
                return run[key]
        return default

    def peak_memory(self) -> tuple[float | None, float | None, float | None]:
        """Return the highest peak RSS, its increase over the RSS after setup, and the GPU peak, in MiB."""
        peaks, increases, gpu = [], [], []
        for run in self.runs:
            memory = run.get("memory_mib") or {}
            stage = memory.get("after_train") or memory.get("after_inference")
            if not stage:
                continue
            peaks.append(stage["peak_rss"])
            if "after_setup" in memory:
                increases.append(stage["peak_rss"] - memory["after_setup"]["rss"])
            if stage.get("gpu_peak_allocated") is not None:
                gpu.append(stage["gpu_peak_allocated"])
        return (max(peaks) if peaks else None, max(increases) if increases else None, max(gpu) if gpu else None)

    def heap_peak(self) -> tuple[float | None, float | None]:
        """Return the highest live-heap peak of a training step and its increase over the heap at rest, in MiB."""
        readings = [run["train_heap_mib"] for run in self.runs if run.get("train_heap_mib")]
        if not readings:
            return None, None
        return (max(reading["peak"] for reading in readings),
                max(reading["peak"] - reading["at_rest"] for reading in readings))

    def errors(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for run in self.runs:
            for phase, message in (run.get("errors") or {}).items():
                found.setdefault(phase, message)
        return found


def _display_order(document: dict, key: tuple[str, str, str]) -> tuple:
    """Sort key: models in run order; per model the floor, the methods, full fine-tuning, then routing."""
    model, library, method = key
    models = list(dict.fromkeys(run["model"] for run in document["runs"]))
    methods = list(document.get("hyper_parameters", {}))
    libraries = ["adapterkit", *PEERS]
    if library == BASELINE:
        position = (0,) if method == FROZEN else (2,)
    elif method == ROUTING:
        position = (3,)
    else:
        position = (1, methods.index(method) if method in methods else len(methods),
                    libraries.index(library) if library in libraries else len(libraries))
    return (models.index(model), position)


def group_runs(document: dict) -> dict[tuple[str, str, str], Configuration]:
    """Group the runs by (model, library, method), in display order (see ``_display_order``).

    Head-to-head runs are left out: ``head_to_head_rows`` reads them.
    """
    groups: dict[tuple[str, str, str], Configuration] = {}
    for run in document["runs"]:
        if run["library"] == HEAD_TO_HEAD:
            continue
        key = (run["model"], run["library"], run["method"])
        groups.setdefault(key, Configuration(*key)).runs.append(run)
    return {key: groups[key] for key in sorted(groups, key=lambda key: _display_order(document, key))}


# -- formatting ---------------------------------------------------------------------------------------


def _milliseconds(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    text = f"{summary.median * 1e3:.1f} [{summary.q1 * 1e3:.1f}-{summary.q3 * 1e3:.1f}]"
    if summary.rerun_medians:
        text += f" {{{min(summary.rerun_medians) * 1e3:.1f}-{max(summary.rerun_medians) * 1e3:.1f}}}"
    return text


def _mebibytes(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _kibibytes(checkpoint: dict | None, others: dict | None = None) -> str:
    if not checkpoint:
        return "-"
    text = f"{checkpoint['bytes'] / 1024:,.1f}"
    for name, other in (others or {}).items():
        text += f" ({other['bytes'] / 1024:,.1f} {name.replace('_', ' ')})"
    return text


def _status(configuration: Configuration) -> str:
    errors = configuration.errors()
    if not errors:
        return "ok"
    return "; ".join(f"{phase} failed" for phase in errors)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _label(library: str, method: str) -> tuple[str, str]:
    if library == BASELINE:
        return {FROZEN: "floor (frozen) / bare inference", FULL_FINETUNE: "full fine-tuning"}.get(method, method), "-"
    if method == ROUTING:
        return "routing: 8 LoRA adapters loaded, 1 active", library
    return method, library


def measurement_table(groups: dict, model: str, gpu: bool) -> list[str]:
    header = ["method", "library", "train step ms", "inference ms", "merged inference ms", "peak RSS MiB",
              "RSS increase MiB", "step heap peak MiB (over rest)", "trainable (head)", "checkpoint KiB", "status"]
    if gpu:
        header.insert(8, "GPU peak MiB")
    rows = []
    for (group_model, library, method), configuration in groups.items():
        if group_model != model:
            continue
        peak, increase, gpu_peak = configuration.peak_memory()
        heap_peak, heap_increase = configuration.heap_peak()
        method_text, library_text = _label(library, method)
        trainable = configuration.first("trainable_parameters")
        head = configuration.first("trainable_head_parameters")
        row = [method_text, library_text, _milliseconds(configuration.timing("train_step_s")),
               _milliseconds(configuration.timing("inference_s")),
               _milliseconds(configuration.timing("merged_inference_s")), _mebibytes(peak), _mebibytes(increase),
               "-" if heap_peak is None else f"{heap_peak:,.0f} ({heap_increase:,.0f})",
               "-" if trainable is None else f"{trainable:,} ({_count(head)})",
               _kibibytes(configuration.first("checkpoint"), configuration.first("other_checkpoints")),
               _status(configuration)]
        if gpu:
            row.insert(8, _mebibytes(gpu_peak))
        rows.append(row)
    return _table(header, rows)


def attention_lines(groups: dict, model: str) -> list[str]:
    """Return a line naming the attention implementation of each configuration that differs from the most common."""
    found = {key: configuration.first("attention_implementation") for key, configuration in groups.items()
             if key[0] == model and configuration.first("attention_implementation")}
    if not found:
        return []
    values = list(found.values())
    common = max(set(values), key=values.count)
    others = [f"{library} {method} ({value})" for (_, library, method), value in found.items() if value != common]
    return [f"Attention implementation: {common}" + (f", except {', '.join(others)}" if others else "") + ".", ""]


def peer_ratio_rows(groups: dict, model: str) -> list[list[str]]:
    """Return rows of adapterkit / peer for each method both have."""
    rows = []
    for (group_model, library, method), mine in groups.items():
        if group_model != model or library != "adapterkit" or method == ROUTING:
            continue
        for peer in PEERS:
            theirs = groups.get((model, peer, method))
            if theirs is None:
                continue
            my_peak, _, _ = mine.peak_memory()
            their_peak, _, _ = theirs.peak_memory()
            my_heap, _ = mine.heap_peak()
            their_heap, _ = theirs.heap_peak()
            my_size = (mine.first("checkpoint") or {}).get("bytes")
            their_size = (theirs.first("checkpoint") or {}).get("bytes")
            rows.append([method, peer,
                         ratio_text(mine.timing("train_step_s"), theirs.timing("train_step_s")),
                         ratio_text(mine.train_over_floor(), theirs.train_over_floor()),
                         ratio_text(mine.timing("inference_s"), theirs.timing("inference_s")),
                         ratio_text(mine.timing("merged_inference_s"), theirs.timing("merged_inference_s")),
                         f"{my_peak / their_peak:.2f}" if my_peak and their_peak else "n/a",
                         f"{my_heap / their_heap:.2f}" if my_heap and their_heap else "n/a",
                         f"{my_size / their_size:.2f}" if my_size and their_size else "n/a"])
    return rows


def floor_ratio_rows(groups: dict, model: str) -> list[list[str]]:
    """Return rows of each method against the frozen floor, full fine-tuning and bare inference."""
    floor = groups.get((model, BASELINE, FROZEN))
    full = groups.get((model, BASELINE, FULL_FINETUNE))
    floor_train = floor.timing("train_step_s") if floor else None
    bare = floor.timing("inference_s") if floor else None
    full_train = full.timing("train_step_s") if full else None
    rows = []
    for (group_model, library, method), configuration in groups.items():
        if group_model != model or library == BASELINE:
            continue
        train = configuration.timing("train_step_s")
        method_text, _ = _label(library, method)
        # Runs from before the bare model was timed in turns with the adapter lack these two timings.
        over_floor = configuration.train_over_floor()
        rows.append([method_text, library, ratio_text(train, floor_train),
                     "n/a" if over_floor is None else f"{over_floor.median:.2f}", ratio_text(train, full_train),
                     ratio_text(configuration.timing("inference_s"), bare),
                     ratio_text(configuration.timing("merged_inference_s"), bare),
                     ratio_text(configuration.timing("inference_s"),
                                configuration.timing("bare_alternating_inference_s")),
                     ratio_text(configuration.timing("merged_inference_s"),
                                configuration.timing("bare_alternating_merged_inference_s"))])
    if full_train is not None:
        over_floor = full.train_over_floor()
        rows.append(["full fine-tuning", "-", ratio_text(full_train, floor_train),
                     "n/a" if over_floor is None else f"{over_floor.median:.2f}", "1.00", "-", "-", "-", "-"])
    return rows


def parameter_check_rows(groups: dict, model: str) -> list[list[str]]:
    """Compare the trainable adapter parameters (head excluded) of each library per method."""
    rows = []
    methods = []
    for group_model, library, method in groups:
        if group_model == model and library != BASELINE and method != ROUTING and method not in methods:
            methods.append(method)
    for method in methods:
        counts = {library: groups[(model, library, method)].first("trainable_adapter_parameters")
                  for library in ("adapterkit", *PEERS) if (model, library, method) in groups}
        known = [count for count in counts.values() if count is not None]
        reference = counts.get("adapterkit")
        if len(known) < 2:
            verdict = "only one library measured"
        elif len(set(known)) == 1:
            verdict = "equal"
        else:
            reasons = [KNOWN_DIFFERENCES.get((method, library), f"{library}: no explanation recorded")
                       for library, count in counts.items()
                       if count is not None and library != "adapterkit" and count != reference]
            verdict = "differs: " + " ".join(reasons)
        rows.append([method] + [_count(counts.get(library)) if library in counts else "lacks the method"
                                for library in ("adapterkit", *PEERS)] + [verdict])
    return rows


def head_to_head_rows(document: dict, model: str) -> list[list[str]]:
    """Return one row per method of ``model`` with head-to-head runs (``run.py --head-to-head``).

    Each library's steps are divided by the median of the floor timed in turns with them in the same
    process, and pooled over reruns. adapterkit / peer divides the medians of those quotients, so
    each peer is compared with adapterkit within the same processes.
    """
    runs: dict[str, list[dict]] = {}
    for run in document["runs"]:
        if run["library"] == HEAD_TO_HEAD and run["model"] == model and run.get("floor_alternating_train_s"):
            runs.setdefault(run["method"], []).append(run)
    rows = []
    for method, method_runs in runs.items():
        quotients: dict[str, list[list[float]]] = {}
        for run in method_runs:
            floor = statistics.median(run["floor_alternating_train_s"])
            for library, durations in run["train_alternating_s"].items():
                quotients.setdefault(library, []).append([step / floor for step in durations])
        summaries = {library: summarize(values) for library, values in quotients.items()}
        mine = summaries.get("adapterkit")
        rows.append([method, *[_quotient_text(summaries.get(library)) for library in ("adapterkit", *PEERS)],
                     *[ratio_text(mine, summaries[peer]) if peer in summaries else "-" for peer in PEERS],
                     str(len(method_runs))])
    return rows


def _quotient_text(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    return f"{summary.median:.3f} [{summary.q1:.3f}-{summary.q3:.3f}]"


def error_rows(groups: dict, document: dict | None = None) -> list[list[str]]:
    """Return a row per failed phase: of each configuration in ``groups``, and of the head-to-head runs of ``document``."""
    rows = []
    for (model, library, method), configuration in groups.items():
        for phase, message in configuration.errors().items():
            rows.append([model, library, method, phase, message.splitlines()[0][:300]])
    for run in (document or {}).get("runs", []):
        if run["library"] == HEAD_TO_HEAD:
            for phase, message in (run.get("errors") or {}).items():
                rows.append([run["model"], "+".join(run.get("libraries", [])), run["method"], phase,
                             message.splitlines()[0][:300]])
    return rows


def plot_ratios(groups: dict, models: list[str], path: Path) -> bool:
    """Draw adapterkit / peer and method / floor training-time ratios per model into ``path`` (PNG).

    Returns:
        Whether a plot was written; ``False`` when there is no ratio to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for model in models:
        peer_bars = []
        for (group_model, library, method), mine in groups.items():
            if group_model != model or library != "adapterkit" or method == ROUTING:
                continue
            for peer in PEERS:
                theirs = groups.get((model, peer, method))
                if theirs and mine.timing("train_step_s") and theirs.timing("train_step_s"):
                    a, b = mine.timing("train_step_s"), theirs.timing("train_step_s")
                    peer_bars.append((f"{method} / {peer}", a.median / b.median, within_noise(a, b)))
        floor = groups.get((model, BASELINE, FROZEN))
        floor_train = floor.timing("train_step_s") if floor else None
        floor_bars = []
        if floor_train is not None:
            for (group_model, library, method), configuration in groups.items():
                train = configuration.timing("train_step_s")
                if group_model == model and train is not None and method != FROZEN:
                    name = "full fine-tuning" if method == FULL_FINETUNE else f"{method} ({library})"
                    floor_bars.append((name, train.median / floor_train.median, within_noise(train, floor_train)))
        panels.append((model, peer_bars, floor_bars))
    if not any(peer or floor for _, peer, floor in panels):
        return False

    height = max(3.0, 0.28 * max(max(len(peer), len(floor)) for _, peer, floor in panels) + 1.5)
    figure, axes = plt.subplots(len(panels), 2, figsize=(13, height * len(panels)), squeeze=False)
    for row, (model, peer_bars, floor_bars) in enumerate(panels):
        for column, (bars, title) in enumerate(((peer_bars, "training step: adapterkit / peer"),
                                                (floor_bars, "training step: method / frozen floor"))):
            axis = axes[row][column]
            if bars:
                names = [name for name, _, _ in bars]
                values = [value for _, value, _ in bars]
                colours = ["#bbbbbb" if noisy else "#1f77b4" for _, _, noisy in bars]
                axis.barh(range(len(bars)), values, color=colours)
                axis.set_yticks(range(len(bars)), names, fontsize=8)
                axis.invert_yaxis()
            axis.axvline(1.0, color="black", linewidth=0.8)
            axis.set_title(f"{model}: {title} (grey: within noise)", fontsize=9)
            axis.set_xlabel("ratio of median step times")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# Settings that must be equal in results files reported together.
MATCHING_SETTINGS = ("smoke", "device", "threads", "warmup", "steps", "inference_steps", "seed", "count_only")


def _part(document: dict, source: str) -> dict:
    machine = document["machine"]
    return {"source": source, "created": document["created"], "command": document["command"],
            "elapsed_s": document.get("elapsed_s", 0.0), "load_start": machine.get("load_average_1_5_15"),
            "load_end": machine.get("load_average_1_5_15_at_end"),
            "commit": document["versions"].get("adapterkit_commit")}


def _measured_code(versions: dict) -> dict:
    """Return the versions that decide what a run measured.

    Two adapterkit commits with the same ``src/`` tree measure the same code, so where both runs
    recorded the tree, the commit itself is left out of the comparison.
    """
    if versions.get("adapterkit_src_tree") and not versions.get("adapterkit_src_modified"):
        return {key: value for key, value in versions.items() if key != "adapterkit_commit"}
    return versions


_TREE_KEYS = ("adapterkit_commit", "adapterkit_src_tree", "adapterkit_src_modified")


def merge_documents(documents: list[dict], sources: list[str], newest_tree_wins: bool = False) -> dict:
    """Combine results files of the same settings, versions and CPU into one document.

    Runs of the same configuration in different files count as reruns.

    Args:
        documents: The results documents.
        sources: Their file names, for messages and the report.
        newest_tree_wins: Accept files measured at different adapterkit ``src/`` trees. Each
            configuration (model, library, method) then keeps only the runs of the newest tree that
            measured it (the tree of the most recently created file among those that have it), and
            ``merged["src_trees"]`` says which configurations each tree gave.

    Raises:
        ValueError: If a file differs from the first in a setting of ``MATCHING_SETTINGS``, a
            package version or the CPU model, naming the file and what differs; with
            ``newest_tree_wins``, also if a file recorded no clean ``src/`` tree.
    """
    first = documents[0]
    measured = _versions_besides_tree if newest_tree_wins else _measured_code
    for source, other in zip(sources[1:], documents[1:]):
        differing = [key for key in MATCHING_SETTINGS if other["settings"].get(key) != first["settings"].get(key)]
        if measured(other["versions"]) != measured(first["versions"]):
            differing.append("versions")
        if other["machine"]["cpu_model"] != first["machine"]["cpu_model"]:
            differing.append("cpu_model")
        if differing:
            raise ValueError(f"{source} differs from {sources[0]} in {', '.join(differing)}; report it separately")
    merged = dict(first)
    merged["parts"] = [_part(document, source) for document, source in zip(documents, sources)]
    merged["runs"] = [run for document in documents for run in document["runs"]]
    if newest_tree_wins:
        merged["runs"], merged["src_trees"] = _newest_tree_runs(documents, sources)
    merged["workloads"] = {name: workload for document in documents for name, workload in document["workloads"].items()}
    merged["elapsed_s"] = sum(part["elapsed_s"] for part in merged["parts"])
    return merged


def _versions_besides_tree(versions: dict) -> dict:
    return {key: value for key, value in versions.items() if key not in _TREE_KEYS}


def _newest_tree_runs(documents: list[dict], sources: list[str]) -> tuple[list[dict], list[dict]]:
    """Return the runs that ``merge_documents(..., newest_tree_wins=True)`` keeps, and the trees they come from.

    Each tree is ``{"tree", "commits", "configurations"}``, newest first; ``configurations`` lists
    ``"model library method"`` for each configuration that the tree gave.
    """
    for source, document in zip(sources, documents):
        versions = document["versions"]
        if not versions.get("adapterkit_src_tree") or versions.get("adapterkit_src_modified"):
            raise ValueError(f"{source} has no clean adapterkit src/ tree recorded (adapterkit_src_tree is missing "
                             "or src/ had uncommitted changes), so its runs cannot be ordered by tree. Report it "
                             "without --newest-tree-wins, or rerun it from a commit")

    def key(run: dict) -> tuple[str, str, str]:
        return run["model"], run["library"], run["method"]

    def tree(document: dict) -> str:
        return document["versions"]["adapterkit_src_tree"]

    newest_first = sorted(documents, key=lambda document: document["created"], reverse=True)
    chosen: dict[tuple[str, str, str], str] = {}
    for document in newest_first:
        for run in document["runs"]:
            chosen.setdefault(key(run), tree(document))
    trees: dict[str, dict] = {}
    for document in newest_first:
        entry = trees.setdefault(tree(document), {"tree": tree(document), "commits": [], "configurations": []})
        commit = str(document["versions"].get("adapterkit_commit"))
        if commit not in entry["commits"]:
            entry["commits"].append(commit)
        for run in document["runs"]:
            name = " ".join(key(run))
            if chosen[key(run)] == tree(document) and name not in entry["configurations"]:
                entry["configurations"].append(name)
    # In the files' order, as without the option.
    runs = [run for document in documents for run in document["runs"] if chosen[key(run)] == tree(document)]
    return runs, [entry for entry in trees.values() if entry["configurations"]]


def _load_text(values: list[float] | None) -> str:
    return "-" if not values else ", ".join(f"{value:.2f}" for value in values)


def _tree_lines(document: dict) -> list[str]:
    trees = document.get("src_trees") or []
    if len(trees) < 2:
        return []
    lines = ["- adapterkit src/ trees: each configuration comes from the newest tree that measured it"]
    for position, entry in enumerate(trees):
        label = "newest" if position == 0 else "older"
        lines.append(f"  - {label} tree {entry['tree'][:12]} (commit {', '.join(c[:12] for c in entry['commits'])}): "
                     + ", ".join(entry["configurations"]))
    return lines


def _settings_lines(document: dict) -> list[str]:
    settings = document["settings"]
    machine = document["machine"]
    versions = document["versions"]
    lines = []
    parts = document.get("parts") or [_part(document, "results file")]
    for part in parts:
        lines += [f"- Run: `{part['command']}`, started {part['created']}, {part['elapsed_s']:.0f} s; load average "
                  f"(1, 5, 15 min) at start {_load_text(part['load_start'])}, at end {_load_text(part['load_end'])}"]
    lines += [
        f"- Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores "
        f"({machine['cores_available']} available to the run), {settings['threads']} torch thread(s) per process, "
        f"device {settings['device']}" + (f" ({machine['gpu']})" if machine.get("gpu") else ""),
        "- Versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()
                                  if name not in _TREE_KEYS),
        "- adapterkit commit: " + ", ".join(dict.fromkeys(str(part["commit"]) for part in parts))
        + (" with uncommitted changes under src/" if versions.get("adapterkit_src_modified") else ""),
    ] + _tree_lines(document) + [
        f"- Steps: {settings['warmup']} warm-up, then {settings['steps']} timed training steps and "
        f"{settings['inference_steps']} timed forward passes per inference loop; seed {settings['seed']}",
        f"- Memory: {document['memory_method']}",
    ]
    return lines


def render(document: dict, plot_name: str | None, findings: str = "") -> str:
    """Return the Markdown text of the report for a results document.

    ``findings`` is hand-written Markdown (what the numbers mean, what is being done about them),
    placed right after the title.
    """
    groups = group_runs(document)
    models = list(dict.fromkeys(run["model"] for run in document["runs"]))
    gpu = document["settings"]["device"].startswith("cuda")
    lines = ["# adapterkit benchmark results", ""]
    if findings.strip():
        lines += [findings.strip(), ""]
    if document.get("smoke"):
        lines += ["> **SMOKE RUN.** Tiny models (hidden 64, 2 layers; MiniLM at its real size), batch 2, length 16, "
                  "few steps, on a shared machine. These numbers only show that the pipeline works; they say "
                  "nothing about speed or memory.", ""]
    if document["settings"].get("count_only"):
        lines += ["> **COUNT-ONLY RUN.** Parameters and checkpoint sizes, no timing.", ""]
    lines += _settings_lines(document) + [""]
    lines += ["Each configuration (library, method, model) ran in its own process. Times are the median in ms, "
              "[first-third quartile] over the timed steps, and {lowest-highest median} over reruns when there "
              "were reruns. A ratio is marked \"within noise\" when the two noise intervals overlap (see "
              "bench/report.py). Peak RSS includes Python, torch and the library's imports; \"RSS increase\" is the "
              "peak minus the resident memory after the adapter was added. \"Step heap peak\" is the most memory "
              "live at once during one training step (weights, optimizer state, activations, gradients), with its "
              "increase over the memory live before the step in brackets; unlike the RSS it leaves out freed memory "
              "that malloc keeps for reuse, whose amount depends on the order of earlier allocations. "
              "\"bare\" is the floor process's bare-model inference; \"bare, in turns\" is a copy of the bare model "
              "timed in the adapter's own process, in rounds alternating with the adapter's loop, which the "
              "machine's drift between processes and between loops does not reach. \"floor, in turns\" is the "
              "same for training: a frozen copy of the base model (the floor) trained in rounds alternating with "
              "the method's steps in the method's own process. \"train step / floor in turns\" divides each "
              "library's steps by the floor timed beside them before comparing the libraries, so the drift "
              "between their processes cancels out. \"trainable (head)\" counts trainable parameters, of which "
              "the classification head is in brackets.", ""]

    lines += ["## Workloads and hyper-parameters", ""]
    for name, workload in document["workloads"].items():
        lines.append(f"- `{name}`: {workload['description']}; batch {workload['batch_size']}, "
                     f"length {workload['sequence_length']}, task {workload['task']}")
    for method, values in document["hyper_parameters"].items():
        lines.append(f"- {method}: " + ", ".join(f"{key} {value}" for key, value in values.items()))
    lacking = [f"{library} lacks {', '.join(m for m in document['hyper_parameters'] if m not in methods)}"
               for library, methods in document["library_methods"].items()
               if any(m not in methods for m in document["hyper_parameters"])]
    if lacking:
        lines.append("- Not measured: " + "; ".join(lacking))
    lines.append("")

    for model in models:
        lines += [f"## {model}", ""]
        separate = any(group_model == model for group_model, _, _ in groups)
        if separate:
            lines += ["### Measurements", ""]
            lines += measurement_table(groups, model, gpu) + [""]
        lines += attention_lines(groups, model)
        peer_rows = peer_ratio_rows(groups, model)
        if peer_rows:
            lines += ["### adapterkit / peer", ""]
            lines += _table(["method", "peer", "train step", "train step / floor in turns", "inference",
                             "merged inference", "peak RSS",
                             "step heap peak", "checkpoint size"], peer_rows) + [""]
        floor_rows = floor_ratio_rows(groups, model)
        if floor_rows:
            lines += ["### Against the floor, full fine-tuning and bare inference", ""]
            lines += _table(["method", "library", "train / floor", "train / floor, in turns", "train / full fine-tuning",
                             "inference / bare", "merged inference / bare", "inference / bare, in turns",
                             "merged inference / bare, in turns"], floor_rows) + [""]
        head_rows = head_to_head_rows(document, model)
        if head_rows:
            lines += ["### Head to head: the libraries in one process", "",
                      "Each process (`run.py --head-to-head`) held one copy of the base model per library and "
                      "a frozen floor, which took turns at training steps. Step / floor: each step divided by "
                      "the median floor step of its process, median [first-third quartile]. adapterkit / peer "
                      "divides those medians, so the machine's drift and the allocator's history hit both alike.",
                      ""]
            lines += _table(["method", "adapterkit / floor", "adapters / floor", "peft / floor",
                             "adapterkit / adapters", "adapterkit / peft", "processes"], head_rows) + [""]
        if separate:
            lines += ["### Trainable adapter parameters (head excluded)", ""]
            lines += _table(["method", "adapterkit", "adapters", "peft", "check"],
                            parameter_check_rows(groups, model))
            lines.append("")
        routing = groups.get((model, "adapterkit", ROUTING))
        if routing is not None:
            status = (routing.first("routing") or {}).get("status", "not measured")
            # Older runs timed the single adapter before the routed batch, not in turns with it.
            single = routing.timing("single_adapter_inference_s") or routing.timing("inference_s")
            routed = routing.timing("routed_inference_s")
            throughput = "-" if single is None or routed is None else f"{single.median / routed.median:.2f}"
            lines += [f"Per-sample routing over 8 LoRA adapters: **{status}**. One adapter for the whole batch: "
                      f"{_milliseconds(single)} ms per forward; each row through its own adapter: "
                      f"{_milliseconds(routed)} ms. Throughput of the routed batch / one adapter: **{throughput}** "
                      "(target at least 0.80).", ""]

    lines += ["## Checkpoint sizes", ""] + [f"- {note}" for note in CHECKPOINT_NOTES] + [""]
    errors = error_rows(groups, document)
    if errors:
        lines += ["## Errors", "", "Failures are recorded, not raised; the traceback of each is in the results file.",
                  ""]
        lines += _table(["model", "library", "method", "phase", "error"], errors) + [""]
    if plot_name:
        lines += ["## Ratios", "", f"![training-step ratios]({plot_name})", ""]
    return "\n".join(lines)


def newest_results() -> Path:
    """Return the newest results file in bench/results/ (by name, which starts with the UTC time)."""
    files = sorted(RESULTS_DIR.glob("*.json"))
    if not files:
        sys.exit(f"No results file in {RESULTS_DIR}; run bench/run.py first or pass a file")
    return files[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write RESULTS.md and a ratio plot from a bench/run.py results file.")
    parser.add_argument("results", type=Path, nargs="*",
                        help="results JSON files of the same settings, reported together (default: the newest in "
                             "bench/results/)")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "RESULTS.md", help="Markdown file to write")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG file for the ratio plot (default: ratios.png beside --output)")
    parser.add_argument("--findings", type=Path, default=BENCH_DIR / "FINDINGS.md",
                        help="hand-written Markdown put at the top of the report, if the file exists")
    parser.add_argument("--newest-tree-wins", action="store_true",
                        help="accept files measured at different adapterkit src/ trees; each configuration keeps "
                             "only the runs of the newest tree that measured it, and the report lists the trees")
    arguments = parser.parse_args(argv)

    paths = arguments.results or [newest_results()]
    try:
        document = merge_documents([json.loads(path.read_text()) for path in paths], [str(path) for path in paths],
                                   newest_tree_wins=arguments.newest_tree_wins)
    except ValueError as error:
        sys.exit(str(error))
    plot_path = arguments.plot or arguments.output.with_name("ratios.png")
    groups = group_runs(document)
    models = list(dict.fromkeys(run["model"] for run in document["runs"]))
    plotted = plot_ratios(groups, models, plot_path)
    plot_name = None
    if plotted:
        try:
            plot_name = str(plot_path.resolve().relative_to(arguments.output.resolve().parent))
        except ValueError:
            plot_name = str(plot_path.resolve())
    findings = arguments.findings.read_text() if arguments.findings.is_file() else ""
    text = render(document, plot_name, findings)
    text += "\nSource: " + ", ".join(f"`{path}`" for path in paths) + "\n"
    arguments.output.write_text(text)
    print(f"Wrote {arguments.output}" + (f" and {plot_path}" if plotted else " (no timing, so no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
