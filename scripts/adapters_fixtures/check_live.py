"""Check a checkpoint in `adapters` format against stored outputs, by loading it with `adapters` 1.3.0.

Run with the interpreter of the environment that setup_env.sh builds, for example:

    F=tests/fixtures/adapters
    /work/venv-adapters/bin/python scripts/adapters_fixtures/check_live.py --base $F/bert/base \\
        --adapter OUT/seq_bn --inputs $F/bert/inputs.json --expected $F/bert/seq_bn/expected.safetensors

It loads the base model, loads each --adapter folder (and the --fusion folder) with `load_adapter`
(`load_adapter_fusion`), activates them, runs the forward call of reference.py and compares every
tensor in --expected. When the folders hold both .bin and safetensors weights, each format is loaded
and checked on its own. Exit status: 0 when every max absolute difference is within --atol, 1 when one
is larger or an output is missing, 2 when the checkpoint cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from adapters import ConfigUnion, Fuse, Stack
from adapters.configuration import AdapterConfig
from safetensors.torch import load_file

from reference import load_inputs, load_model, max_abs_differences, run_forward

logger = logging.getLogger("check_live")


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_model_class(adapter_dir: Path, override: str | None) -> str:
    """Return --model-class, else the "model_class" that adapter_config.json records."""
    if override:
        return override
    model_class = read_json(adapter_dir / "adapter_config.json").get("model_class")
    if not model_class:
        raise ValueError(f"{adapter_dir}/adapter_config.json has no model_class; pass --model-class.")
    return model_class


def resolve_num_labels(adapter_dir: Path, model_class: str) -> int | None:
    """Return num_labels for a transformers *ForSequenceClassification or *ForTokenClassification class.

    The value comes from head_config.json.
    """
    if not model_class.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return None
    head_config = adapter_dir / "head_config.json"
    if not head_config.exists():
        raise ValueError(f"{model_class} needs num_labels, but {head_config} is missing.")
    return read_json(head_config)["num_labels"]


def weight_keys(adapter_dir: Path) -> list[str]:
    for name in ("adapter.safetensors", "pytorch_adapter.bin"):
        path = adapter_dir / name
        if path.exists():
            if path.suffix == ".safetensors":
                return list(load_file(str(path)))
            return list(torch.load(path, map_location="cpu", weights_only=True))
    return []


def flat_prefix_override(adapter_dir: Path) -> AdapterConfig | None:
    """Return a flat=True config when the folder contains flat prefix weights under a flat=False config.

    `adapters` 1.3.0 writes such folders after eject_prefix_tuning. Loading them as saved builds the
    reparametrised prefix modules, skips the flat weights without an error and leaves the prefix random.
    """
    saved = read_json(adapter_dir / "adapter_config.json")
    config = AdapterConfig.load(saved["config"])
    has_flat_weights = any(key.endswith(".control_trans") for key in weight_keys(adapter_dir))
    parts = list(config.configs) if config.architecture == "union" else [config]
    if not has_flat_weights or not any(p.architecture == "prefix_tuning" and not p.flat for p in parts):
        return None
    logger.warning("%s contains flat prefix weights under flat: false; loading it with flat=True", adapter_dir)
    flat_parts = [p.replace(flat=True) if p.architecture == "prefix_tuning" else p for p in parts]
    return ConfigUnion(*flat_parts) if config.architecture == "union" else flat_parts[0]


def load_checkpoint(args: argparse.Namespace, use_safetensors: bool) -> torch.nn.Module:
    """Load the base model and the checkpoint folders, and activate the loaded adapters."""
    first = args.adapter[0]
    model_class = resolve_model_class(first, args.model_class)
    model = load_model(args.base, model_class, num_labels=resolve_num_labels(first, model_class))

    names = []
    for adapter_dir in args.adapter:
        override = flat_prefix_override(adapter_dir)
        saved_name = read_json(adapter_dir / "adapter_config.json")["name"]
        if override is not None:
            model.add_adapter(saved_name, config=override)
        loading_info = {}
        names.append(
            model.load_adapter(str(adapter_dir), use_safetensors=use_safetensors, loading_info=loading_info)
        )
        report_loading_info(adapter_dir, loading_info)

    if args.fusion is not None:
        # set_active=True also activates the head saved with the fusion; set_active_adapters(Fuse(...))
        # alone leaves a flexible-head model without an active head.
        model.load_adapter_fusion(str(args.fusion), use_safetensors=use_safetensors, set_active=True)
        model.set_active_adapters(Fuse(*names))
    elif len(names) == 1:
        model.set_active_adapters(names[0])
    else:
        model.set_active_adapters(Stack(*names))
    return model


def report_loading_info(adapter_dir: Path, loading_info: dict) -> None:
    # Prefix-tuning weights have one key per layer that shares the pool, so a file that stores fewer
    # aliases lists the others as missing although the shared tensor was loaded.
    for kind in ("missing_keys", "unexpected_keys"):
        keys = loading_info.get(kind) or []
        if keys:
            logger.warning("%s: %d %s, e.g. %s", adapter_dir, len(keys), kind.replace("_", " "), keys[:3])


def formats_to_check(folders: list[Path]) -> list[bool]:
    """Return the use_safetensors values to check: each weights format that every adapter folder contains."""
    formats = []
    if all((folder / "pytorch_adapter.bin").exists() for folder in folders):
        formats.append(False)
    if all((folder / "adapter.safetensors").exists() for folder in folders):
        formats.append(True)
    return formats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, action="append", required=True, help="adapter folder; repeatable")
    parser.add_argument("--fusion", type=Path, help="AdapterFusion folder that fuses the --adapter folders")
    parser.add_argument("--base", type=Path, required=True, help="base model folder written by save_pretrained")
    parser.add_argument("--inputs", type=Path, required=True, help="inputs.json of the family")
    parser.add_argument("--expected", type=Path, required=True, help="expected.safetensors to compare with")
    parser.add_argument("--model-class", help="class to load the base as (default: model_class of adapter_config.json)")
    parser.add_argument("--atol", type=float, default=1e-5, help="max absolute difference allowed (default: 1e-5)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("adapters").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    formats = formats_to_check(args.adapter)
    if not formats:
        logger.error("No adapter folder format is complete: each needs pytorch_adapter.bin or adapter.safetensors.")
        return 2
    expected = load_file(str(args.expected))
    inputs = load_inputs(args.inputs)

    worst = 0.0
    for use_safetensors in formats:
        label = "safetensors" if use_safetensors else ".bin"
        try:
            model = load_checkpoint(args, use_safetensors)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            logger.error("Loading the %s checkpoint failed: %s: %s", label, type(error).__name__, error)
            return 2
        differences = max_abs_differences(expected, run_forward(model, inputs))
        for key, difference in sorted(differences.items()):
            if difference == float("inf"):
                logger.error("%s %s: output missing or of another shape than expected", label, key)
            else:
                logger.info("%s %s: max abs difference %.3g", label, key, difference)
        worst = max(worst, *differences.values())

    if worst > args.atol:
        print(f"FAILED: max abs difference {worst:.3g} > atol {args.atol:g}")
        return 1
    print(f"OK: max abs difference {worst:.3g} <= atol {args.atol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
