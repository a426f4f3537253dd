"""Keras-like ``fit``, ``evaluate`` and ``predict`` for text classification with adapters."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import write_atomically
from .data import LabelMap, texts_and_labels
from .metrics import classification_metrics

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "fit_state.pt"


@dataclass
class History:
    """Per-epoch training metrics, the return value of ``fit``.

    Attributes:
        epochs: Per-epoch dicts with ``epoch``, ``train_loss`` and, with validation data,
            ``val_loss``, ``val_accuracy``, ``val_precision``, ``val_recall`` and ``val_f1``.
        best_epoch: The epoch whose weights the model keeps (lowest ``val_loss``), or the last epoch
            without validation data.
        stopped_early: Whether training stopped before ``epochs`` because validation loss stopped improving.
    """

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False

    @property
    def history(self) -> dict[str, list[float]]:
        """The same metrics as lists keyed by name, as Keras's ``History.history``."""
        keys = {key for row in self.epochs for key in row}
        return {key: [row.get(key, math.nan) for row in self.epochs] for key in sorted(keys)}


@dataclass
class Predictions:
    """Predicted labels and class probabilities, the return value of ``predict``.

    Attributes:
        labels: The predicted label of each text, as the label values used in training.
        probabilities: ``(num_texts, num_labels)`` class probabilities, columns in ``label_names`` order.
        label_names: The label of each probability column.
    """

    labels: list[Any]
    probabilities: list[list[float]]
    label_names: list[Any]

    @property
    def confidences(self) -> list[float]:
        """The probability of each predicted label."""
        return [max(row) for row in self.probabilities]

    def __iter__(self):
        return iter(zip(self.labels, self.confidences))

    def __len__(self) -> int:
        return len(self.labels)


# -- tokenizer and batches ---------------------------------------------------------------------


def resolve_tokenizer(model: nn.Module, tokenizer: Any = None) -> Any:
    """Return ``tokenizer``, or load the one saved with the model's weights and remember it.

    Raises:
        ValueError: If the model was not loaded from a folder or hub id and no tokenizer is given.
    """
    registry = model._adapterkit
    if tokenizer is None:
        tokenizer = registry.tokenizer
    if tokenizer is None:
        source = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        if not source:
            raise ValueError("This model was not loaded from a folder or hub id, so adapterkit cannot find its "
                             "tokenizer; pass tokenizer=AutoTokenizer.from_pretrained(...)")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(f"Could not load a tokenizer from {source!r} ({error}); pass tokenizer=...") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a padding nor an end-of-sequence token; set "
                             "tokenizer.pad_token before calling fit")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    registry.tokenizer = tokenizer
    return tokenizer


def _tokenize(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def _batches(encoded: list[list[int]], batch_size: int, order: list[int]) -> list[list[int]]:
    """Split ``order`` into batches, grouping texts of similar length to cut padding.

    Each window of 50 batches is sorted by length and cut into batches. The caller shuffles the
    batch order, so training still gets the batches in random order.
    """
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(encoded[i]))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return batches


def _collate(tokenizer: Any, encoded: list[list[int]], indices: list[int], device: torch.device) -> dict:
    batch = tokenizer.pad({"input_ids": [encoded[i] for i in indices]}, return_tensors="pt")
    return {key: value.to(device) for key, value in batch.items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- labels ------------------------------------------------------------------------------------


def _label_map(model: nn.Module) -> LabelMap:
    """Return the labels of the active head: the last active adapter's, or the model config's."""
    registry = model._adapterkit
    if registry.active and registry.entries[registry.active[-1]].labels is not None:
        return LabelMap(registry.entries[registry.active[-1]].labels)
    return LabelMap.from_config(model.config)


def _encode_labels(label_map: LabelMap, labels: list[Any], what: str) -> list[int]:
    known = set(label_map.labels)
    unseen = sorted({label for label in labels if label not in known}, key=str)
    if unseen:
        raise ValueError(f"The {what} labels {unseen} were never seen in training; the model knows "
                         f"{list(label_map.labels)}. Remove those examples or train on data that contains them")
    return label_map.encode(labels)


def _training_labels(model: nn.Module, name: str, labels: list[Any], replace_head: bool,
                     validation_labels: list[Any] | None = None) -> LabelMap:
    """Choose the label map for training adapter ``name`` and fit its head to it.

    Every check, including that ``validation_labels`` are all in the chosen map, raises before the
    head or the adapter's labels change.
    """
    registry = model._adapterkit
    entry = registry.entries[name]
    data_map = LabelMap.from_labels(labels)
    if len(data_map.labels) < 2:
        raise ValueError(f"The training data has a single label {list(data_map.labels)}; classification needs "
                         "at least two")
    keep_known = entry.labels is not None and not replace_head
    label_map = LabelMap(entry.labels) if keep_known else data_map
    if keep_known and not set(data_map.labels) <= set(label_map.labels):
        raise ValueError(f"The head of adapter {name!r} was trained for labels {list(label_map.labels)}, but the "
                         f"data has {list(data_map.labels)}. Pass replace_head=True to start a new head")
    if validation_labels is not None:
        _encode_labels(label_map, validation_labels, "validation")
    if keep_known:
        return label_map
    registry.set_labels(name, list(data_map.labels), new_head=replace_head)
    return data_map


# -- fit ---------------------------------------------------------------------------------------


def _data_fingerprint(texts: list[str], labels: list[Any]) -> str:
    digest = hashlib.sha256()
    for text, label in zip(texts, labels):
        digest.update(text.encode("utf-8", "replace"))
        digest.update(repr(label).encode())
    return digest.hexdigest()


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


def _check_fit_arguments(epochs: int, batch_size: int, learning_rate: float, patience: int | None,
                         max_length: int) -> None:
    problems = []
    if not isinstance(epochs, int) or epochs < 1:
        problems.append(f"epochs={epochs!r}: expected an integer >= 1")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size={batch_size!r}: expected an integer >= 1")
    if not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        problems.append(f"learning_rate={learning_rate!r}: expected a number > 0")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        problems.append(f"patience={patience!r}: expected an integer >= 1, or None to never stop early")
    if not isinstance(max_length, int) or max_length < 2:
        problems.append(f"max_length={max_length!r}: expected an integer >= 2")
    if problems:
        raise ValueError("Invalid fit arguments:\n  - " + "\n  - ".join(problems))


def fit(
    model: nn.Module,
    train_data: Any,
    labels: Sequence[Any] | None = None,
    *,
    validation_data: Any = None,
    validation_labels: Sequence[Any] | None = None,
    epochs: int = 3,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.1,
    tokenizer: Any = None,
    max_length: int = 256,
    text_column: str = "text",
    label_column: str = "label",
    patience: int | None = 2,
    seed: int = 0,
    replace_head: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> History:
    """Train the model's trainable adapters (set by ``train_adapter``) for text classification.

    Args:
        model: A model prepared with ``adapterkit.init`` and ``train_adapter``.
        train_data: A list of texts (with ``labels``), a ``datasets.Dataset`` or a pandas DataFrame.
        labels: One label per text, any str or int values; taken from ``label_column`` when omitted.
        validation_data: Data in the same forms; enables keeping the best epoch and early stopping.
        validation_labels: Labels for a list of validation texts.
        epochs: Maximum number of passes over the training data.
        batch_size: Texts per optimisation step.
        learning_rate: Peak AdamW learning rate, reached after ``warmup_ratio`` of the steps, then
            decayed linearly to zero.
        weight_decay: AdamW weight decay.
        warmup_ratio: Share of the steps with a linearly rising learning rate.
        tokenizer: The model's tokenizer; loaded from the model's folder or hub id when omitted.
        max_length: Texts are truncated to this many tokens.
        text_column: Text column of a Dataset or DataFrame.
        label_column: Label column of a Dataset or DataFrame.
        patience: With validation data, stop after this many epochs without a lower validation
            loss; ``None`` never stops early.
        seed: Seed for shuffling and dropout.
        replace_head: Start a freshly initialised head, even if the current one was trained.
        checkpoint_dir: After every epoch, write the training state here; a later call with the
            same folder and data resumes after the last finished epoch.
        progress: Show a progress bar per epoch.

    Returns:
        The per-epoch metrics; the model keeps the weights of ``History.best_epoch``.

    Raises:
        ValueError: For invalid arguments or data, or when no adapter is trainable; before any training.
    """
    _check_fit_arguments(epochs, batch_size, learning_rate, patience, max_length)
    registry = model._adapterkit
    trainable = [name for name in registry.active if name in registry.trainable_names()]
    if not trainable:
        raise ValueError("No adapter is set to train; call model.train_adapter(name) before fit")
    texts, raw_labels = texts_and_labels(train_data, labels, text_column=text_column, label_column=label_column,
                                         require_labels=True)
    validation = None
    if validation_data is not None:
        validation = texts_and_labels(validation_data, validation_labels, text_column=text_column,
                                      label_column=label_column, require_labels=True)
    tokenizer = resolve_tokenizer(model, tokenizer)
    # Checks above raise before anything changes; from here on the head may be resized.
    label_map = _training_labels(model, trainable[-1], raw_labels, replace_head,
                                 validation[1] if validation is not None else None)
    if validation is not None:
        validation_ids = _encode_labels(label_map, validation[1], "validation")
    label_ids = label_map.encode(raw_labels)

    torch.manual_seed(seed)
    encoded = _tokenize(tokenizer, texts, max_length)
    device = _device(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(texts) / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup_steps = int(total_steps * warmup_ratio)

    def learning_rate_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    history = History()
    best_loss, best_state, epochs_without_improvement = math.inf, None, 0
    fingerprint = _data_fingerprint(texts, raw_labels)
    start_epoch = 1
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if checkpoint_path is not None and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, weights_only=True)
        if saved["fingerprint"] != fingerprint or sorted(saved["trainable"]) != sorted(_trainable_state(model)):
            raise ValueError(f"{checkpoint_path} belongs to another training run (other data or adapters); "
                             "delete it or choose another checkpoint_dir")
        _load_trainable_state(model, saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history.epochs = saved["history"]
        best_loss, epochs_without_improvement = saved["best_loss"], saved["epochs_without_improvement"]
        best_state = saved.get("best_state") or None
        history.best_epoch = saved.get("best_epoch")
        start_epoch = len(history.epochs) + 1
        torch.set_rng_state(saved["rng_state"])
        logger.info("Resuming training from %s after epoch %d", checkpoint_path, start_epoch - 1)

    was_training = model.training
    generator = torch.Generator().manual_seed(seed)
    for _ in range(1, start_epoch):
        torch.randperm(len(texts), generator=generator)  # replay the shuffles of finished epochs
    try:
        for epoch in range(start_epoch, epochs + 1):
            if epochs_without_improvement >= (patience or math.inf):
                break
            model.train()
            order = torch.randperm(len(texts), generator=generator).tolist()
            batches = _batches(encoded, batch_size, order)
            batch_order = torch.randperm(len(batches), generator=generator).tolist()
            total_loss, seen = 0.0, 0
            bar = tqdm(batch_order, desc=f"epoch {epoch}/{epochs}", disable=not progress, unit="batch",
                       dynamic_ncols=True)
            for batch_index in bar:
                indices = batches[batch_index]
                inputs = _collate(tokenizer, encoded, indices, device)
                targets = torch.tensor([label_ids[i] for i in indices], device=device)
                logits = model(**inputs).logits
                loss = nn.functional.cross_entropy(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * len(indices)
                seen += len(indices)
                bar.set_postfix(loss=f"{total_loss / seen:.4f}")
            bar.close()

            row = {"epoch": epoch, "train_loss": total_loss / seen}
            if validation is not None:
                scores = _score(model, tokenizer, validation[0], validation_ids, label_map, batch_size * 2,
                                max_length)
                row.update({f"val_{key}": scores[key] for key in ("loss", "accuracy", "precision", "recall", "f1")})
                if scores["loss"] < best_loss:
                    best_loss, best_state, epochs_without_improvement = scores["loss"], _trainable_state(model), 0
                    history.best_epoch = epoch
                else:
                    epochs_without_improvement += 1
            else:
                history.best_epoch = epoch
            history.epochs.append(row)
            logger.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
            if checkpoint_path is not None:
                state = {
                    "fingerprint": fingerprint, "trainable": _trainable_state(model),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "history": history.epochs, "best_loss": best_loss, "best_state": best_state or {},
                    "best_epoch": history.best_epoch, "epochs_without_improvement": epochs_without_improvement,
                    "rng_state": torch.get_rng_state(),
                }
                write_atomically(checkpoint_path, lambda path: torch.save(state, path))
        if len(history.epochs) < epochs:
            history.stopped_early = True
            logger.info("Stopped early after epoch %d: validation loss did not improve for %d epochs",
                        len(history.epochs), patience)
        if best_state is not None:
            _load_trainable_state(model, best_state)
    finally:
        model.train(was_training)
    registry.entries[trainable[-1]].head_trained = True
    return history


# -- evaluate and predict ----------------------------------------------------------------------


@torch.no_grad()
def _logits(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int, max_length: int) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        encoded = _tokenize(tokenizer, texts, max_length)
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        device = _device(model)
        pieces = []
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            pieces.append((indices, model(**_collate(tokenizer, encoded, indices, device)).logits.float().cpu()))
        outputs = torch.empty(len(texts), pieces[0][1].shape[-1])
        for indices, logits in pieces:
            outputs[indices] = logits
        return outputs
    finally:
        model.train(was_training)


def _score(model: nn.Module, tokenizer: Any, texts: list[str], label_ids: list[int], label_map: LabelMap,
           batch_size: int, max_length: int) -> dict[str, Any]:
    logits = _logits(model, tokenizer, texts, batch_size, max_length)
    targets = torch.tensor(label_ids)
    scores = classification_metrics(targets.tolist(), logits.argmax(-1).tolist(), label_map.num_labels)
    scores["loss"] = nn.functional.cross_entropy(logits, targets).item()
    return scores


def evaluate(model: nn.Module, data: Any, labels: Sequence[Any] | None = None, *, batch_size: int = 32,
             tokenizer: Any = None, max_length: int = 256, text_column: str = "text",
             label_column: str = "label") -> dict[str, Any]:
    """Score the model on labelled data.

    Returns:
        ``accuracy``, macro ``precision``, ``recall`` and ``f1``, ``loss`` (cross-entropy),
        ``confusion_matrix`` (rows are true labels, columns predictions, both in ``labels`` order),
        ``labels`` and ``num_examples``.

    Raises:
        ValueError: If the data has labels the model was not trained on.
    """
    texts, raw_labels = texts_and_labels(data, labels, text_column=text_column, label_column=label_column,
                                         require_labels=True)
    label_map = _label_map(model)
    label_ids = _encode_labels(label_map, raw_labels, "evaluation")
    tokenizer = resolve_tokenizer(model, tokenizer)
    scores = _score(model, tokenizer, texts, label_ids, label_map, batch_size, max_length)
    scores["labels"] = list(label_map.labels)
    scores["num_examples"] = len(texts)
    return scores


def predict(model: nn.Module, texts: Any, *, batch_size: int = 32, tokenizer: Any = None, max_length: int = 256,
            text_column: str = "text") -> Predictions:
    """Return the predicted label and the class probabilities of each text.

    Args:
        texts: One string, a list of strings, or a Dataset or DataFrame with ``text_column``.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts, _ = texts_and_labels(texts, text_column=text_column)
    label_map = _label_map(model)
    tokenizer = resolve_tokenizer(model, tokenizer)
    probabilities = _logits(model, tokenizer, texts, batch_size, max_length).softmax(-1)
    predicted = label_map.decode(probabilities.argmax(-1).tolist())
    return Predictions(labels=predicted, probabilities=probabilities.tolist(), label_names=list(label_map.labels))
