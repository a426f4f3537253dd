"""The ``adapterkit`` command: train, evaluate and predict with bottleneck adapters."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("adapterkit.cli")

ADAPTER_FOLDER = "adapter"
CHECKPOINT_FOLDER = "checkpoint"


class UsageError(Exception):
    """Bad command-line input, reported as one line without a traceback."""


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="data file (.csv, .tsv, .json, .jsonl, .parquet) or offline sample "
                             "(bbc-news, tweet-sentiment)")
    parser.add_argument("--text-column", default="text", help="column that contains the texts (default: text)")
    parser.add_argument("--label-column", default="label", help="column that contains the labels (default: label)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens (default: 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per batch (default: 16)")


def _add_split_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--test-size", type=float, default=0.2,
                        help="share of --data held out for testing when no --test-data is given (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of training (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``adapterkit`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="adapterkit", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only, and no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an adapter for text classification")
    train.add_argument("--model", default=None,
                       help="model folder or hub id (default: the packaged all-MiniLM-L6-v2)")
    _add_data_arguments(train)
    _add_split_arguments(train)
    train.add_argument("--test-data", default=None, help="separate test file; --data is then used whole for training")
    train.add_argument("--validation-size", type=float, default=0.1,
                       help="share of the training data used to pick the best epoch and stop early (default: 0.1)")
    train.add_argument("--adapter", default="houlsby",
                       help="adapter preset: houlsby, pfeiffer, parallel, conv, lora, ia3, prefix_tuning, "
                            "prompt_tuning, compacter, compacter++, mam, unipelt or invertible (default: houlsby)")
    train.add_argument("--name", default=None, help="adapter name (default: the preset name)")
    train.add_argument("--epochs", type=int, default=3, help="maximum passes over the training data (default: 3)")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (default: 0.001)")
    train.add_argument("--patience", type=int, default=2,
                       help="stop after this many epochs without a lower validation loss (default: 2)")
    train.add_argument("--output", required=True, type=Path,
                       help="output folder: adapter/, metrics.json, history.json, training_curves.png")
    train.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")

    evaluate = commands.add_parser("evaluate", help="score a trained adapter on labelled data")
    evaluate.add_argument("--adapter", required=True, type=Path, help="adapter folder written by train")
    evaluate.add_argument("--model", default=None, help="model folder or hub id (default: the one the adapter "
                                                        "was trained on)")
    _add_data_arguments(evaluate)
    _add_split_arguments(evaluate)
    evaluate.add_argument("--split", choices=("all", "test"), default="all",
                          help="score all of --data, or only the part train held out with the same --seed and "
                               "--test-size (default: all)")
    evaluate.add_argument("--output", type=Path, default=None, help="also write the metrics to this JSON file")

    predict = commands.add_parser("predict", help="predict labels for texts")
    predict.add_argument("--adapter", required=True, type=Path, help="adapter folder written by train")
    predict.add_argument("--model", default=None, help="model folder or hub id (default: the one the adapter "
                                                       "was trained on)")
    predict.add_argument("--file", type=Path, default=None, help="text file with one text per line")
    predict.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens (default: 128)")
    predict.add_argument("--json", action="store_true", help="print one JSON object per text")
    predict.add_argument("texts", nargs="*", help="texts to classify")
    merge = commands.add_parser("merge", help="merge LoRA, (IA)^3 and parallel adapters into the model and save a plain "
                                              "transformers model")
    merge.add_argument("--adapter", required=True, type=Path, action="append",
                       help="adapter folder written by train or save_adapter; repeat to merge several in order")
    merge.add_argument("--model", default=None, help="model folder or hub id (default: the one the first adapter "
                                                     "was trained on)")
    merge.add_argument("--output", required=True, type=Path,
                       help="folder for the merged model (save_pretrained) and its tokenizer")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")

    convert = commands.add_parser("convert", help="convert an adapter checkpoint between adapterkit, PEFT and "
                                                  "AdapterHub adapters")
    convert.add_argument("source", type=Path, help="adapter folder in any supported format (detected from its files)")
    convert.add_argument("destination", type=Path, help="folder to write")
    convert.add_argument("--to", required=True, choices=("adapterkit", "peft", "adapters"), help="format to write")
    convert.add_argument("--model", default=None, help="model folder or hub id the adapter belongs to (default: the "
                                                       "one the checkpoint names)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination folder")
    return parser


# -- shared steps ------------------------------------------------------------------------------


def _load_texts(args: argparse.Namespace, source: str) -> tuple[list[str], list[Any]]:
    from .training.data import load_data, texts_and_labels

    try:
        data = load_data(source, text_column=args.text_column, label_column=args.label_column)
        return texts_and_labels(data, text_column=args.text_column, label_column=args.label_column,
                                require_labels=True)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        raise UsageError(f"{source}: {error}") from error


def _load_model(model_source: str | None, adapter_dir: Path | None = None, model_class: Any = None):
    """Load the model: ``model_source``, else the adapter's base, else the packaged MiniLM.

    ``model_class`` defaults to ``AutoModelForSequenceClassification``.
    """
    import transformers

    import adapterkit
    from .io import read_description

    if model_source is None and adapter_dir is not None:
        model_source = read_description(adapter_dir).get("base_model", {}).get("name_or_path")
        if model_source and Path(model_source).is_absolute() and not Path(model_source).exists():
            model_source = None  # trained from a local folder that is gone here: use the default model
    if model_source is None:
        from .samples import default_model_path

        model_source = default_model_path()
    transformers.logging.set_verbosity_error()
    try:
        model = (model_class or transformers.AutoModelForSequenceClassification).from_pretrained(model_source)
    except (OSError, ValueError) as error:
        raise UsageError(f"Could not load model {model_source!r}: {error}") from error
    return adapterkit.init(model)


def _write_json(path: Path, data: Any) -> None:
    from .io import write_atomically

    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n",
                                                                  encoding="utf-8"))


def _print_metrics(metrics: dict[str, Any]) -> None:
    print(f"accuracy  {metrics['accuracy']:.4f}")
    print(f"precision {metrics['precision']:.4f}  (macro)")
    print(f"recall    {metrics['recall']:.4f}  (macro)")
    print(f"f1        {metrics['f1']:.4f}  (macro)")
    print("confusion matrix (rows: true, columns: predicted):")
    names = [str(label) for label in metrics["labels"]]
    width = max(len(name) for name in names)
    print(" " * (width + 1) + " ".join(f"{name[:6]:>6}" for name in names))
    for name, row in zip(names, metrics["confusion_matrix"]):
        print(f"{name:>{width}} " + " ".join(f"{count:>6}" for count in row))


# -- commands ----------------------------------------------------------------------------------


def _check_train_arguments(args: argparse.Namespace) -> None:
    from .config import PRESETS

    problems = []
    if args.adapter.lower() not in PRESETS:
        problems.append(f"--adapter {args.adapter!r}: unknown preset; use one of {', '.join(PRESETS)}")
    if args.epochs < 1:
        problems.append(f"--epochs {args.epochs}: use 1 or more")
    if not 0 < args.test_size < 1:
        problems.append(f"--test-size {args.test_size}: use a share between 0 and 1")
    if not 0 <= args.validation_size < 1:
        problems.append(f"--validation-size {args.validation_size}: use a share in [0, 1)")
    if args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: use 1 or more")
    if args.learning_rate <= 0:
        problems.append(f"--learning-rate {args.learning_rate}: use a number > 0")
    if (args.output / ADAPTER_FOLDER).exists() and not args.overwrite:
        problems.append(f"--output {args.output} already holds a trained adapter; pass --overwrite to replace it "
                        "or choose another folder")
    if problems:
        raise UsageError("; ".join(problems))


def run_train(args: argparse.Namespace) -> int:
    """Train, test, save and plot; every input is checked before the output folder is created."""
    from .plots import plot_history
    from .training.data import LabelMap, split_train_test

    _check_train_arguments(args)
    texts, labels = _load_texts(args, args.data)
    if args.test_data:
        train_texts, train_labels = texts, labels
        test_texts, test_labels = _load_texts(args, args.test_data)
    else:
        train_texts, train_labels, test_texts, test_labels = split_train_test(
            texts, labels, test_size=args.test_size, seed=args.seed)
    unseen = sorted(set(test_labels) - set(train_labels), key=str)
    if unseen:
        raise UsageError(f"The test data has labels {unseen} that the training data never shows; "
                         "remove those rows or add training examples for them")
    LabelMap.from_labels(train_labels)  # mixed label types raise here, before the model loads
    validation = None
    if args.validation_size > 0:
        train_texts, train_labels, val_texts, val_labels = split_train_test(
            train_texts, train_labels, test_size=args.validation_size, seed=args.seed)
        validation = (val_texts, val_labels)

    model = _load_model(args.model)
    name = args.name or args.adapter.lower()
    try:
        model.add_adapter(name, config=args.adapter.lower())
    except ValueError as error:
        raise UsageError(str(error)) from error
    model.train_adapter([name])
    logger.info("\n%s", model.adapter_summary())
    logger.info("Training on %d texts, validating on %d, testing on %d", len(train_texts),
                len(validation[0]) if validation else 0, len(test_texts))

    args.output.mkdir(parents=True, exist_ok=True)
    history = model.fit(
        train_texts, train_labels,
        validation_data=validation[0] if validation else None,
        validation_labels=validation[1] if validation else None,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        max_length=args.max_length, patience=args.patience, seed=args.seed,
        checkpoint_dir=args.output / CHECKPOINT_FOLDER, progress=not args.quiet,
    )
    metrics = model.evaluate(test_texts, test_labels, batch_size=args.batch_size * 2, max_length=args.max_length)
    adapter_dir = model.save_adapter(args.output / ADAPTER_FOLDER, name)
    _write_json(args.output / "metrics.json", metrics)
    _write_json(args.output / "history.json", {"epochs": history.epochs, "best_epoch": history.best_epoch,
                                               "stopped_early": history.stopped_early})
    plot_history(history.epochs, args.output / "training_curves.png")
    checkpoint = args.output / CHECKPOINT_FOLDER
    for leftover in checkpoint.glob("*"):
        leftover.unlink()
    checkpoint.rmdir()

    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    print(f"Test metrics on {metrics['num_examples']} held-out texts (best epoch {history.best_epoch}):")
    _print_metrics(metrics)
    print(f"Adapter written to {adapter_dir} ({size / 1e6:.2f} MB)")
    print(f"Training curves written to {args.output / 'training_curves.png'}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Score a saved adapter on labelled data."""
    from .training.data import split_train_test

    texts, labels = _load_texts(args, args.data)
    if args.split == "test":
        _, _, texts, labels = split_train_test(texts, labels, test_size=args.test_size, seed=args.seed)
    model = _load_model(args.model, args.adapter)
    model.load_adapter(args.adapter)
    try:
        metrics = model.evaluate(texts, labels, batch_size=args.batch_size * 2, max_length=args.max_length)
    except ValueError as error:
        raise UsageError(str(error)) from error
    print(f"Metrics on {metrics['num_examples']} texts:")
    _print_metrics(metrics)
    if args.output:
        _write_json(args.output, metrics)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Print the predicted label and its probability for each text."""
    texts = list(args.texts)
    if args.file is not None:
        if not args.file.is_file():
            raise UsageError(f"--file {args.file}: no such file")
        texts += [line.strip() for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UsageError("No texts to classify: pass them as arguments or with --file")
    model = _load_model(args.model, args.adapter)
    model.load_adapter(args.adapter)
    predictions = model.predict(texts, max_length=args.max_length)
    for text, label, confidence in zip(texts, predictions.labels, predictions.confidences):
        if args.json:
            print(json.dumps({"text": text, "label": label, "probability": round(confidence, 4)}))
        else:
            preview = text if len(text) <= 70 else text[:67] + "..."
            print(f"{label}\t{confidence:.3f}\t{preview}")
    return 0


def _checkpoint_base(adapter_dir: Path) -> tuple[str | None, bool]:
    """Return the base model a checkpoint names and whether it carries a classification head."""
    from .io import detect_format, read_description

    source_format = detect_format(adapter_dir)
    if source_format == "peft":
        peft_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        return peft_config.get("base_model_name_or_path"), bool(peft_config.get("modules_to_save"))
    if source_format == "adapters":
        if not (adapter_dir / "adapter_config.json").is_file():  # an AdapterFusion folder
            return None, False
        saved = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        head_path = adapter_dir / "head_config.json"
        head = json.loads(head_path.read_text(encoding="utf-8")) if head_path.is_file() else {}
        # A language-model head saved with the adapter belongs to the base model, not to a classifier.
        classifies = ("SequenceClassification" in str(head.get("model_class"))
                      or (head.get("config") or {}).get("head_type") == "classification")
        return saved.get("model_name"), classifies
    description = read_description(adapter_dir)
    return description.get("base_model", {}).get("name_or_path"), bool(description.get("head", {}).get("modules"))


def _merge_model_class(model_source: str | None, adapter_dir: Path) -> Any:
    """Return the transformers class to load the adapter's model with: the classifier when the adapter
    has a head, else the class the model's config names (a causal or seq2seq LM keeps its LM head)."""
    import transformers

    saved_source, has_head = _checkpoint_base(adapter_dir)
    if has_head:
        return transformers.AutoModelForSequenceClassification
    source = model_source or saved_source
    try:
        architectures = transformers.AutoConfig.from_pretrained(source).architectures or []
    except (OSError, ValueError) as error:
        raise UsageError(f"Could not read the config of model {source!r}: {error}") from error
    if architectures and hasattr(transformers, architectures[0]):
        return getattr(transformers, architectures[0])
    return transformers.AutoModel


def run_merge(args: argparse.Namespace) -> int:
    """Load the adapters, merge them into the model and save the plain transformers model."""
    import shutil
    import tempfile

    from .io import read_description

    missing = [str(folder) for folder in args.adapter if not folder.is_dir()]
    if missing:
        raise UsageError(f"--adapter {', '.join(missing)}: no such folder")
    for folder in args.adapter:
        read_description(folder)  # raises on a folder that is not an adapter checkpoint
    if args.output.exists() and not args.overwrite:
        raise UsageError(f"--output {args.output} already exists; pass --overwrite to replace it or choose another "
                         "folder")

    model = _load_model(args.model, args.adapter[0], _merge_model_class(args.model, args.adapter[0]))
    names = [model.load_adapter(folder, set_active=False) for folder in args.adapter]
    model.set_active_adapters(names)
    try:
        model = model.merge_and_unload()
    except ValueError as error:
        raise UsageError(str(error)) from error

    # Write into a temporary sibling folder and rename it, so an interrupted merge leaves no half model.
    args.output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.output.name}.", dir=args.output.parent))
    try:
        model.save_pretrained(staging)
        tokenizer = _try_tokenizer(model)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if args.output.exists():
            shutil.rmtree(args.output)
        staging.rename(args.output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"Merged {', '.join(names)} into {type(model).__name__}; saved to {args.output}")
    return 0


def _try_tokenizer(model: Any) -> Any:
    """Return the tokenizer of the model's folder or hub id, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.config._name_or_path)
    except (OSError, ValueError, TypeError):
        return None


def run_convert(args: argparse.Namespace) -> int:
    """Load a checkpoint in any format into its model and write it in the requested one."""
    import transformers

    import adapterkit
    from .io import detect_format

    if not args.source.is_dir():
        raise UsageError(f"{args.source}: no such folder")
    try:
        source_format = detect_format(args.source)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    if args.destination.exists() and any(args.destination.iterdir()) and not args.overwrite:
        raise UsageError(f"{args.destination} already exists and is not empty; pass --overwrite to replace its files")
    model_source = args.model or _checkpoint_base(args.source)[0]
    if model_source is None:
        raise UsageError(f"{args.source} does not name its base model; pass --model")
    model_class = _merge_model_class(model_source, args.source)
    transformers.logging.set_verbosity_error()
    try:
        model = adapterkit.init(model_class.from_pretrained(model_source))
    except (OSError, ValueError) as error:
        raise UsageError(f"Could not load model {model_source!r}: {error}") from error
    name = model.load_adapter(args.source)
    model.save_adapter(args.destination, name, format=args.to)
    print(f"Converted {args.source} ({source_format}) to {args.destination} ({args.to})")
    return 0


COMMANDS = {"train": run_train, "evaluate": run_evaluate, "predict": run_predict, "merge": run_merge,
            "convert": run_convert}


def main(argv: list[str] | None = None) -> int:
    """Run the ``adapterkit`` command line and return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"adapterkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, NotImplementedError) as error:
        print(f"adapterkit {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
