"""Epoch time of fit with and without cache_frozen_layers on the packaged MiniLM and BBC News.

The adapter leaves out the lower half of the blocks (k = 3 of 6), so the cached run computes
blocks 0-2 once per example and trains from block 3. Both runs train the same adapter on the same
texts with the same seed, one after the other in this process, and alternate over ``--repeats``.

Run: .venv/bin/python bench/cache_frozen_layers.py [--texts 256] [--epochs 2] [--repeats 2]
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
from adapterkit.samples import default_model_path, load_sample
from adapterkit.training.frozen_cache import FrozenLayerCache
from adapterkit.training.trainer import _collate, _tokenize, resolve_tokenizer

OUTPUT = Path(__file__).parent / "results" / "cache_frozen_layers.json"


def build(num_labels: int) -> torch.nn.Module:
    path = default_model_path()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = adapterkit.init(model)
    model.add_adapter("topic", adapterkit.BottleneckConfig(reduction_factor=16, leave_out=(0, 1, 2)))
    model.train_adapter("topic")
    return model


def timed_fit(texts: list[str], labels: list[str], epochs: int, cached: bool) -> float:
    model = build(len(set(labels)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path())
    start = time.perf_counter()
    model.fit(texts, labels, tokenizer=tokenizer, epochs=epochs, batch_size=16, max_length=128, progress=False,
              patience=None, cache_frozen_layers=cached)
    return time.perf_counter() - start


def timed_cache_build(texts: list[str], labels: list[str]) -> float:
    model = build(len(set(labels)))
    tokenizer = resolve_tokenizer(model, transformers.AutoTokenizer.from_pretrained(default_model_path()))
    encoded = _tokenize(tokenizer, texts, 128)
    start = time.perf_counter()
    cache = FrozenLayerCache(model, encoded, lambda indices: _collate(tokenizer, encoded, indices, torch.device("cpu")),
                             batch_size=32)
    cache.check_first_batch()
    elapsed = time.perf_counter() - start
    cache.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    sample = load_sample("bbc-news").shuffle(seed=0).select(range(args.texts))
    texts, labels = list(sample["text"]), list(sample["label"])
    plain, cached, builds = [], [], []
    for _ in range(args.repeats):
        plain.append(timed_fit(texts, labels, args.epochs, cached=False))
        cached.append(timed_fit(texts, labels, args.epochs, cached=True))
        builds.append(timed_cache_build(texts, labels))
    plain_epoch = statistics.median(plain) / args.epochs
    build_s = statistics.median(builds)
    cached_epoch = (statistics.median(cached) - build_s) / args.epochs
    result = {
        "texts": args.texts, "epochs": args.epochs, "repeats": args.repeats, "threads": args.threads,
        "cached_blocks": "0-2 of 6", "fit_s_uncached": plain, "fit_s_cached": cached, "cache_build_s": builds,
        "epoch_s_uncached": plain_epoch, "epoch_s_cached": cached_epoch,
        "epoch_ratio_cached_to_uncached": cached_epoch / plain_epoch,
        "total_ratio_cached_to_uncached": statistics.median(cached) / statistics.median(plain),
    }
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))


if __name__ == "__main__":
    main()
