"""Load tiny models with AdapterHub's `adapters` library and run the reference forward pass.

Shared by make_fixtures.py (which writes the fixtures) and check_live.py (which checks a checkpoint
against them). Both run in the separate `adapters` 1.3.0 environment built by setup_env.sh, never in
adapterkit's own environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import adapters
import torch
import transformers

# The keys of inputs.json that are passed to the model's forward call.
FORWARD_KEYS = ("input_ids", "attention_mask", "decoder_input_ids")

# Eager attention materialises the additive mask, so the prefix-tuning keys are always visible to every
# query. With SDPA, transformers 4.57 may pass attention_mask=None and is_causal=True, and then
# torch's top-left causal alignment hides part of the prefix from early queries.
ATTN_IMPLEMENTATION = "eager"

FORWARD_CALL = "model(**inputs, output_hidden_states=True) under torch.no_grad(), model.eval()"


def load_inputs(path: str | Path) -> dict[str, torch.Tensor]:
    """Read inputs.json and return the forward-call tensors, each of shape (batch, seq_len)."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    missing = [key for key in ("input_ids", "attention_mask") if key not in raw]
    if missing:
        raise ValueError(f"{path} is missing {missing}; it needs input_ids and attention_mask lists.")
    return {key: torch.tensor(raw[key], dtype=torch.long) for key in FORWARD_KEYS if key in raw}


def load_model(base_dir: str | Path, model_class: str, num_labels: int | None = None) -> torch.nn.Module:
    """Load the base model in `base_dir` as `model_class` with `adapters` support, in eval mode.

    Args:
        base_dir: A folder written by transformers' `save_pretrained`.
        model_class: "AutoAdapterModel" (or any `*AdapterModel` name) for `adapters`' flexible-head
            classes, or the name of a transformers class (e.g. "GPT2LMHeadModel"), which is then
            wrapped with `adapters.init`.
        num_labels: Number of labels for a transformers `*ForSequenceClassification` or
            `*ForTokenClassification` class.

    Returns:
        The model, with adapters support and no adapter added.
    """
    kwargs = {"attn_implementation": ATTN_IMPLEMENTATION}
    if model_class.endswith("AdapterModel"):
        return adapters.AutoAdapterModel.from_pretrained(base_dir, **kwargs).eval()

    cls = getattr(transformers, model_class, None)
    if cls is None:
        raise ValueError(f"Unknown model class {model_class!r}: pass a transformers class name or AutoAdapterModel.")
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    model = cls.from_pretrained(base_dir, **kwargs)
    adapters.init(model)
    return model.eval()


def run_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the reference forward call and collect the outputs that the fixtures store.

    Returns:
        A dict with some of these float32 tensors:
        - "last_hidden_state": (batch, seq_len, hidden) of the (decoder) stack, after its final norm.
        - "encoder_last_hidden_state": (batch, src_len, hidden), encoder-decoder models only.
        - "logits": (batch, num_labels) for classification heads, (batch, seq_len, num_labels) for tagging
          heads, (batch, seq_len, vocab) for LM heads.
    """
    model.eval()
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True)

    result = {}
    if "decoder_input_ids" in inputs:
        result["last_hidden_state"] = output.decoder_hidden_states[-1]
        result["encoder_last_hidden_state"] = output.encoder_last_hidden_state
    else:
        result["last_hidden_state"] = output.hidden_states[-1]
    logits = getattr(output, "logits", None)
    if logits is not None:
        result["logits"] = logits
    return {key: value.detach().float().contiguous() for key, value in result.items()}


def max_abs_differences(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> dict[str, float]:
    """Return the max absolute difference per key of `expected`; a key absent from `actual` is infinite."""
    differences = {}
    for key, want in expected.items():
        got = actual.get(key)
        if got is None or got.shape != want.shape:
            differences[key] = float("inf")
        else:
            differences[key] = (got - want).abs().max().item()
    return differences
