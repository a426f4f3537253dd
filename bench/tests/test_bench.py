"""Tests of the benchmark's statistics, report and run order.

They time nothing and import no adapter library, except one smoke run of ``run.py --head-to-head``
in a subprocess, which needs adapterkit and PEFT (the project's test extras). Run with the
project's venv: ``python -m pytest bench/tests -q``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import report  # noqa: E402
import run  # noqa: E402


def test_summarize_single_run_quartiles():
    summary = report.summarize([[5.0, 1.0, 3.0, 2.0, 4.0]])

    assert summary.median == 3.0
    assert summary.q1 == 2.0
    assert summary.q3 == 4.0
    assert (summary.minimum, summary.maximum) == (1.0, 5.0)
    assert summary.rerun_medians == ()
    assert (summary.noise_low, summary.noise_high) == (2.0, 4.0)


def test_summarize_reruns_use_median_of_medians():
    summary = report.summarize([[1.0, 2.0, 3.0], [10.0, 11.0, 12.0]])

    assert summary.median == 6.5  # the medians are 2 and 11
    assert summary.rerun_medians == (2.0, 11.0)
    assert summary.steps == 6
    # Pooled steps 1, 2, 3, 10, 11, 12: inclusive quartiles 2.25 and 10.75, widened by the rerun medians.
    assert summary.noise_low == 2.0
    assert summary.noise_high == 11.0


def test_summarize_without_steps_is_none():
    assert report.summarize([[], []]) is None


def test_ratio_marks_overlap_as_noise():
    fast = report.summarize([[1.0, 1.1, 1.2]])
    slow = report.summarize([[2.0, 2.1, 2.2]])
    close = report.summarize([[1.1, 1.2, 1.3]])  # quartiles 1.15-1.25 touch 1.05-1.15

    assert report.ratio_text(slow, fast) == "1.91"
    assert not report.within_noise(slow, fast)
    assert report.ratio_text(close, fast) == "1.09 (within noise)"
    assert report.ratio_text(None, fast) == "n/a"


def _run(model, library, method, **fields):
    record = {"model": model, "library": library, "method": method, "repeat": 0, "status": "ok", "errors": {}}
    record.update(fields)
    return record


def _document(runs, smoke=True):
    return {
        "created": "2026-01-01T00:00:00+00:00", "command": "python bench/run.py --smoke", "smoke": smoke,
        "elapsed_s": 1.0,
        "settings": {"device": "cpu", "threads": 1, "warmup": 1, "steps": 3, "inference_steps": 3, "seed": 0,
                     "count_only": False},
        "memory_method": "ru_maxrss",
        "machine": {"cpu_model": "test CPU", "logical_cores": 2, "cores_available": 2,
                    "load_average_1_5_15": [0.0, 0.0, 0.0]},
        "versions": {"torch": "x"},
        "workloads": {"llama-128m": {"description": "tiny", "batch_size": 2, "sequence_length": 16,
                                     "task": "causal_lm"}},
        "hyper_parameters": {"lora": {"r": 8}, "ia3": {}},
        "library_methods": {"adapterkit": ["lora", "ia3"], "peft": ["lora"]},
        "runs": runs,
    }


def test_parameter_check_explains_known_difference():
    document = _document([
        _run("llama-128m", "adapterkit", "ia3", trainable_adapter_parameters=640),
        _run("llama-128m", "adapters", "ia3", trainable_adapter_parameters=256),
        _run("llama-128m", "adapterkit", "lora", trainable_adapter_parameters=100),
        _run("llama-128m", "peft", "lora", trainable_adapter_parameters=100),
    ])
    rows = {row[0]: row for row in report.parameter_check_rows(report.group_runs(document), "llama-128m")}

    assert rows["lora"][-1] == "equal"
    assert rows["lora"][2] == "lacks the method"
    assert rows["ia3"][-1].startswith("differs: adapters 1.3.0 puts the feed-forward")


def test_render_smoke_report_ratios_and_errors():
    memory = {"after_setup": {"rss": 100.0}, "after_train": {"peak_rss": 150.0, "gpu_peak_allocated": None}}
    document = _document([
        _run("llama-128m", "baseline", "frozen", train_step_s=[1.0, 1.0, 1.0], inference_s=[0.5, 0.5, 0.5]),
        _run("llama-128m", "adapterkit", "lora", train_step_s=[3.0, 3.0, 3.0], inference_s=[1.0, 1.0, 1.0],
             bare_alternating_inference_s=[0.8, 0.8, 0.8], memory_mib=memory, trainable_parameters=10,
             trainable_head_parameters=0, floor_alternating_train_s=[2.0, 2.0, 2.0],
             train_alternating_s=[2.2, 2.2, 2.2]),
        # PEFT's process ran on a machine twice as fast: its floor in turns took half as long.
        _run("llama-128m", "peft", "lora", train_step_s=[2.0, 2.0, 2.0], inference_s=[1.0, 1.0, 1.0],
             floor_alternating_train_s=[1.0, 1.0, 1.0], train_alternating_s=[1.0, 1.0, 1.0]),
        _run("llama-128m", "adapterkit", "ia3", status="error", errors={"setup": "ValueError: bad"}),
    ])

    text = report.render(document, plot_name="ratios.png")

    assert "**SMOKE RUN.**" in text
    # The raw step ratio 1.50, and 1.10 once each library is divided by the floor timed beside it.
    assert "| lora | peft | 1.50 | 1.10 | 1.00 (within noise) |" in text
    # train / floor, the same in turns, train / full fine-tuning, inference / the floor process's bare
    # model, merged, inference / the bare model timed in turns, merged
    assert "| lora | adapterkit | 3.00 | 1.10 | n/a | 2.00 | n/a | 1.25 | n/a |" in text
    assert "| llama-128m | adapterkit | ia3 | setup | ValueError: bad |" in text
    assert "![training-step ratios](ratios.png)" in text


def test_render_findings_and_heap_ratio():
    heap = {"ak": {"at_rest": 100.0, "peak": 300.0}, "peft": {"at_rest": 100.0, "peak": 400.0}}
    document = _document([
        _run("llama-128m", "adapterkit", "lora", train_step_s=[1.0], train_heap_mib=heap["ak"]),
        _run("llama-128m", "peft", "lora", train_step_s=[1.0], train_heap_mib=heap["peft"]),
    ])

    text = report.render(document, plot_name=None, findings="## Where the targets stand\n\n- all met\n")

    assert text.startswith("# adapterkit benchmark results\n\n## Where the targets stand\n\n- all met\n")
    assert "| lora | adapterkit | 1000.0 [1000.0-1000.0] | - | - | - | - | 300 (200) |" in text
    assert "| lora | peft | 1.00 (within noise) | n/a | n/a | n/a | n/a | 0.75 | n/a |" in text


def test_heap_peak_grows_with_the_batch():
    import measure
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    if measure.heap_in_use_bytes() is None:
        pytest.skip("glibc mallinfo2 is not available here")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, num_labels=2)
    model = BertForSequenceClassification(config)
    parameters = [model.classifier.weight, model.classifier.bias]
    model.bert.requires_grad_(False)

    def peak(rows):
        batch = {"input_ids": torch.randint(0, 100, (rows, 64)), "labels": torch.zeros(rows, dtype=torch.long)}
        reading = measure.heap_peak_of_training_step(model, batch, parameters)
        return reading["peak"] - reading["at_rest"]

    small, large = peak(2), peak(32)
    # The step's activations grow with the rows: 16 times the rows must show as several times the heap.
    assert small > 0
    assert large > 4 * small


def test_alternating_inference_takes_turns():
    import measure
    import torch
    from torch import nn

    calls = []

    class Recorder(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, input_ids):
            calls.append((self.name, self.training, torch.is_inference_mode_enabled()))
            return type("Output", (), {"logits": input_ids.float() * (2 if self.name == "b" else 1)})()

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}
    first, second = Recorder("a"), Recorder("b")
    results = measure.time_inference_alternating([(first, batch), (second, batch)], warmup=1, steps=5,
                                                 device=torch.device("cpu"), rounds=2)

    # Warm-up a, b; round 0 (3 steps) a then b; round 1 (2 steps) reversed: b then a.
    assert [name for name, _, _ in calls] == list("ab" + "aaabbb" + "bbaa")
    assert all(not training and inference for _, training, inference in calls)
    assert [len(durations) for durations, _ in results] == [5, 5]
    assert torch.equal(results[1][1], torch.full((2, 3), 2.0))


def test_alternating_training_takes_turns():
    import measure
    import torch
    from torch import nn

    calls = []

    class Classifier(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, input_ids, labels):
            calls.append((self.name, self.training, torch.is_grad_enabled()))
            # Like the floor's input embeddings, the input needs a gradient even where the weight has none.
            hidden = input_ids.float().requires_grad_(True)
            return type("Output", (), {"loss": (hidden * self.weight).sum()})()

    batch = {"input_ids": torch.ones(2, 3), "labels": torch.zeros(2)}
    frozen, trained = Classifier("floor"), Classifier("adapter")
    frozen.weight.requires_grad_(False)
    frozen.eval()
    before = trained.weight.detach().clone()
    floor, adapter = measure.time_training_alternating([(frozen, []), (trained, [trained.weight])], batch,
                                                       warmup=1, steps=3, device=torch.device("cpu"), rounds=3)

    # Warm-up, then rounds of one step: floor, adapter; adapter, floor; floor, adapter.
    assert [name for name, _, _ in calls] == ["floor", "adapter", "floor", "adapter", "adapter", "floor", "floor",
                                              "adapter"]
    assert all(training and grad for _, training, grad in calls)
    assert (len(floor), len(adapter)) == (3, 3)
    assert not torch.equal(trained.weight, before)


def test_plot_ratios_writes_png(tmp_path):
    document = _document([
        _run("llama-128m", "baseline", "frozen", train_step_s=[1.0, 1.0]),
        _run("llama-128m", "adapterkit", "lora", train_step_s=[3.0, 3.0]),
        _run("llama-128m", "peft", "lora", train_step_s=[2.0, 2.0]),
    ])
    path = tmp_path / "ratios.png"

    assert report.plot_ratios(report.group_runs(document), ["llama-128m"], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_rotates_libraries_and_skips_missing_methods():
    plan = run.plan_configurations(["bert-base"], ["pfeiffer", "lora", "ia3"], ["adapterkit", "adapters", "peft"],
                                   repeats=1, floors=True, routing=True)
    order = [(config["library"], config["method"]) for config in plan]

    assert order == [
        ("baseline", "frozen"),
        ("adapterkit", "pfeiffer"), ("adapters", "pfeiffer"),
        ("adapters", "lora"), ("peft", "lora"), ("adapterkit", "lora"),
        ("peft", "ia3"), ("adapterkit", "ia3"), ("adapters", "ia3"),
        ("baseline", "full_finetune"),
        ("adapterkit", "routing"),
    ]


def test_plan_reverses_odd_repeats():
    plan = run.plan_configurations(["bert-base"], ["lora"], ["adapterkit", "peft"], repeats=2, floors=True,
                                   routing=False)
    order = [(config["repeat"], config["library"], config["method"]) for config in plan]

    # Repeat 1 rotates the libraries by one more place, then runs its whole block reversed.
    assert order == [
        (0, "baseline", "frozen"), (0, "adapterkit", "lora"), (0, "peft", "lora"), (0, "baseline", "full_finetune"),
        (1, "baseline", "full_finetune"), (1, "adapterkit", "lora"), (1, "peft", "lora"), (1, "baseline", "frozen"),
    ]


def test_plan_without_methods_runs_floors():
    arguments = run.parse_arguments(["--methods", "--libraries", "adapterkit"])
    plan = run.plan_configurations(["bert-base"], arguments.methods, arguments.libraries, repeats=1, floors=True,
                                   routing=True)

    assert [(config["library"], config["method"]) for config in plan] == [
        ("baseline", "frozen"), ("baseline", "full_finetune"), ("adapterkit", "routing"),
    ]


def test_plan_head_to_head_per_method():
    plan = run.plan_configurations(["bert-base"], ["lora", "mam"], ["adapterkit", "adapters", "peft"], repeats=2,
                                   floors=True, routing=True, head_to_head=True)
    order = [(config["repeat"], config["library"], config["method"], config["libraries"]) for config in plan]

    # One process per method, its libraries rotated as in the separate plan. Floors and routing do not run.
    assert order == [
        (0, "head_to_head", "lora", ["adapterkit", "adapters", "peft"]),
        (0, "head_to_head", "mam", ["adapters", "adapterkit"]),
        (1, "head_to_head", "mam", ["adapterkit", "adapters"]),
        (1, "head_to_head", "lora", ["adapters", "peft", "adapterkit"]),
    ]


@pytest.mark.parametrize("extra", [["--methods"], ["--count-only"]])
def test_arguments_reject_idle_head_to_head(extra, capsys):
    with pytest.raises(SystemExit):
        run.parse_arguments(["--head-to-head", *extra])

    assert "--head-to-head" in capsys.readouterr().err


def test_render_head_to_head_uses_own_floor():
    document = _document([
        _run("llama-128m", "head_to_head", "lora", libraries=["adapterkit", "peft"],
             floor_alternating_train_s=[2.0, 2.0, 2.0],
             train_alternating_s={"adapterkit": [2.2, 2.2, 2.2], "peft": [2.4, 2.4, 2.4]}),
        # A process on a machine twice as fast: its floor took half as long.
        _run("llama-128m", "head_to_head", "lora", libraries=["peft", "adapterkit"],
             floor_alternating_train_s=[1.0, 1.0, 1.0],
             train_alternating_s={"adapterkit": [1.1, 1.1, 1.1], "peft": [1.2, 1.2, 1.2]}),
        _run("llama-128m", "head_to_head", "ia3", libraries=["adapterkit"], status="partial",
             errors={"setup peft": "ImportError: no peft"}, floor_alternating_train_s=[1.0],
             train_alternating_s={"adapterkit": [1.5]}),
    ])

    text = report.render(document, plot_name=None)

    assert "### Head to head: the libraries in one process" in text
    assert "| lora | 1.100 [1.100-1.100] | - | 1.200 [1.200-1.200] | - | 0.92 | 2 |" in text
    assert "| ia3 | 1.500 [1.500-1.500] | - | - | - | - | 1 |" in text
    assert "| llama-128m | adapterkit | ia3 | setup peft | ImportError: no peft |" in text
    # No separate-process runs: no empty measurement table.
    assert "### Measurements" not in text


def test_head_to_head_smoke_run(tmp_path):
    output = tmp_path / "results.json"
    command = [sys.executable, str(Path(run.__file__)), "--smoke", "--head-to-head", "--models", "llama-128m",
               "--methods", "lora", "--libraries", "adapterkit", "peft", "--threads", "1", "--warmup", "0",
               "--steps", "2", "--output", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]

    (result,) = json.loads(output.read_text())["runs"]
    assert result["status"] == "ok", result.get("errors")
    assert result["libraries"] == ["adapterkit", "peft"]
    assert len(result["floor_alternating_train_s"]) == 2
    assert {name: len(steps) for name, steps in result["train_alternating_s"].items()} == {"adapterkit": 2, "peft": 2}
    assert all(count > 0 for count in result["trainable_parameters"].values())


@pytest.mark.parametrize("extra", [["--no-routing"], ["--libraries", "peft"]])
def test_arguments_reject_empty_plan(extra, capsys):
    with pytest.raises(SystemExit):
        run.parse_arguments(["--methods", "--no-floors", *extra])

    assert "--methods was given no names" in capsys.readouterr().err


@pytest.mark.parametrize("argument", ["--steps", "--threads", "--repeats"])
def test_arguments_reject_zero(argument):
    with pytest.raises(SystemExit):
        run.parse_arguments([argument, "0"])


def test_merge_documents_pools_runs_as_reruns():
    first = _document([_run("llama-128m", "peft", "lora", train_step_s=[1.0, 1.0])])
    second = _document([_run("llama-128m", "peft", "lora", train_step_s=[3.0, 3.0])])

    merged = report.merge_documents([first, second], ["a.json", "b.json"])
    summary = report.group_runs(merged)[("llama-128m", "peft", "lora")].timing("train_step_s")

    assert [part["source"] for part in merged["parts"]] == ["a.json", "b.json"]
    assert summary.rerun_medians == (1.0, 3.0)
    assert summary.median == 2.0


def test_merge_documents_rejects_other_settings():
    first = _document([])
    second = _document([])
    second["settings"] = dict(second["settings"], threads=4)

    with pytest.raises(ValueError, match="b.json differs from a.json in threads"):
        report.merge_documents([first, second], ["a.json", "b.json"])


def test_merge_documents_accepts_commits_with_one_src_tree():
    first, second, third = _document([]), _document([]), _document([])
    first["versions"] = {"torch": "x", "adapterkit_commit": "aaa", "adapterkit_src_tree": "t1",
                         "adapterkit_src_modified": False}
    second["versions"] = dict(first["versions"], adapterkit_commit="bbb")
    third["versions"] = dict(first["versions"], adapterkit_commit="ccc", adapterkit_src_tree="t2")

    merged = report.merge_documents([first, second], ["a.json", "b.json"])

    assert "- adapterkit commit: aaa, bbb" in report.render(merged, plot_name=None)
    with pytest.raises(ValueError, match="c.json differs from a.json in versions"):
        report.merge_documents([first, third], ["a.json", "c.json"])


def _tree_document(created, tree, commit, runs):
    document = _document(runs)
    document["created"] = created
    document["versions"] = {"torch": "x", "adapterkit_commit": commit, "adapterkit_src_tree": tree,
                            "adapterkit_src_modified": False}
    return document


def test_newest_tree_wins_per_configuration():
    older = _tree_document("2026-01-01T00:00:00+00:00", "t1", "aaa", [
        _run("llama-128m", "adapterkit", "lora", train_step_s=[1.0]),
        _run("llama-128m", "adapterkit", "ia3", train_step_s=[5.0]),
    ])
    newer = _tree_document("2026-01-02T00:00:00+00:00", "t2", "bbb", [
        _run("llama-128m", "adapterkit", "lora", train_step_s=[2.0]),
    ])

    # The newer file first on the command line: the order of the files does not decide.
    merged = report.merge_documents([newer, older], ["new.json", "old.json"], newest_tree_wins=True)
    groups = report.group_runs(merged)

    assert groups[("llama-128m", "adapterkit", "lora")].timing("train_step_s").median == 2.0
    assert groups[("llama-128m", "adapterkit", "ia3")].timing("train_step_s").median == 5.0
    assert [(entry["tree"], entry["configurations"]) for entry in merged["src_trees"]] == [
        ("t2", ["llama-128m adapterkit lora"]), ("t1", ["llama-128m adapterkit ia3"])]
    text = report.render(merged, plot_name=None)
    assert "  - newest tree t2 (commit bbb): llama-128m adapterkit lora" in text
    assert "  - older tree t1 (commit aaa): llama-128m adapterkit ia3" in text
    with pytest.raises(ValueError, match="old.json differs from new.json in versions"):
        report.merge_documents([newer, older], ["new.json", "old.json"])


def test_newest_tree_needs_clean_trees():
    first = _tree_document("2026-01-01T00:00:00+00:00", "t1", "aaa", [])
    second = _tree_document("2026-01-02T00:00:00+00:00", "t2", "bbb", [])
    second["versions"]["adapterkit_src_modified"] = True

    with pytest.raises(ValueError, match="b.json has no clean adapterkit src/ tree recorded"):
        report.merge_documents([first, second], ["a.json", "b.json"], newest_tree_wins=True)
    second["versions"]["torch"] = "y"
    with pytest.raises(ValueError, match="b.json differs from a.json in versions"):
        report.merge_documents([first, second], ["a.json", "b.json"], newest_tree_wins=True)
