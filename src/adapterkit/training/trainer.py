"""Keras-like ``fit``, ``evaluate`` and ``predict`` for text classification with adapters."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm

from ..heads import count_labels
from ..io import write_atomically
from .frozen_cache import FrozenLayerCache, check_cacheable
from .data import SAMPLING_STRATEGIES, LabelMap, task_schedule, task_texts_and_labels, texts_and_labels
from .metrics import classification_metrics

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "fit_state.pt"


@dataclass
class History:
    """Per-epoch training metrics, the return value of ``fit``.

    Attributes:
        epochs: Per-epoch dicts with ``epoch``, ``train_loss`` and, with validation data,
            ``val_loss``, ``val_accuracy``, ``val_precision``, ``val_recall`` and ``val_f1``.
            A multi-task ``fit`` records ``epoch``, ``train_loss`` over all tasks and, per task,
            ``<task>/train_loss`` and ``<task>/steps``. With validation data it adds
            ``<task>/val_loss``, ``<task>/val_accuracy``, ``<task>/val_precision``,
            ``<task>/val_recall`` and ``<task>/val_f1`` for each validated task, and ``val_loss``,
            the mean of their validation losses.
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
    """Return the labels of the installed head: its adapter's or fusion's, or the model config's."""
    registry = model._adapterkit
    owner = registry.head_owner
    if owner is not None and registry.head_entry(owner).labels is not None:
        return LabelMap(registry.head_entry(owner).labels)
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
    label_map, update_head = _choose_label_map(model, name, labels, replace_head, validation_labels)
    if update_head:
        model._adapterkit.set_labels(name, list(label_map.labels), new_head=replace_head)
    return label_map


def _choose_label_map(model: nn.Module, name: str, labels: list[Any], replace_head: bool,
                      validation_labels: list[Any] | None = None) -> tuple[LabelMap, bool]:
    """Return the label map for training adapter ``name`` and whether its head must be set to it.

    Changes nothing, so a multi-task ``fit`` can check every task before it resizes any head.

    Raises:
        ValueError: If the data has a single label, a trained head does not fit the labels, or a
            validation label is not in the chosen map.
    """
    registry = model._adapterkit
    entry = registry.head_entry(name)
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
        return label_map, False
    _check_head_resizable(registry, name, list(data_map.labels), replace_head)
    return data_map, True


def _check_head_resizable(registry: Any, name: str, labels: list[Any], replace_head: bool) -> None:
    """Raise the ``ValueError`` that ``registry.set_labels`` would raise for these labels, changing nothing."""
    head = registry.head_modules(name)
    if not len(head):
        raise ValueError(f"{type(registry.model).__name__} has no classification head to train labels into; "
                         "load the model with a task class such as AutoModelForSequenceClassification")
    current = count_labels(dict(head.items()))
    if registry.head_entry(name).head_trained and not replace_head and current != len(labels):
        raise ValueError(f"The head of adapter {name!r} was trained for {current} labels, but the data has "
                         f"{len(labels)} ({labels}). Pass replace_head=True to fit to start a new head")


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
                         max_length: int, sampling: str = "round_robin") -> None:
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
    if sampling not in SAMPLING_STRATEGIES:
        problems.append(f"sampling={sampling!r}: expected one of {', '.join(map(repr, SAMPLING_STRATEGIES))}")
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
    sampling: str = "round_robin",
    cache_frozen_layers: bool = False,
    progress: bool = True,
) -> History:
    """Train the model's trainable adapters (set by ``train_adapter``) for text classification.

    With one dataset, ``fit`` trains the active trainable adapters with the head of the last one.

    With a dict from adapter name to that task's data, ``fit`` trains several tasks at once, each
    adapter with its own head and label set. Every step is one batch of one task, run with only
    that task's adapter active, because the heads differ in size and per-row routing covers only
    bottleneck adapters, LoRA and (IA)^3. ``sampling`` chooses the task of each step, and an epoch
    has as many steps as all tasks have batches (``data.task_schedule``):

    - ``"round_robin"``: the tasks take turns in dict order. A task whose batches have run out
      leaves the rotation, so each task trains on each of its examples once per epoch.
    - ``"proportional"``: each step draws its task with probability proportional to the task's
      number of examples, from a generator seeded with ``seed``. A task that is drawn more often
      than it has batches starts a new shuffled pass over its data. The rest of a started pass is
      dropped at the end of the epoch.

    A task's parameters change only on its own steps: AdamW skips parameters without gradients.
    Early stopping and the best epoch follow the mean validation loss of the tasks with validation
    data, and restoring the best epoch restores every task. Afterwards the adapters that were
    active before ``fit`` are active again; pass ``adapter=`` to ``evaluate`` and ``predict`` to
    use one task's adapter and head.

    Args:
        model: A model prepared with ``adapterkit.init`` and ``train_adapter``.
        train_data: A list of texts (with ``labels``), a ``datasets.Dataset`` or a pandas DataFrame.
            For multi-task training, a dict from adapter name to that task's data: a
            ``(texts, labels)`` pair, a Dataset or a DataFrame. Each adapter must be trainable
            (``model.train_adapter([...])`` with all of them).
        labels: One label per text, any str or int values; taken from ``label_column`` when omitted.
            Must be None for multi-task training.
        validation_data: Data in the same forms; enables keeping the best epoch and early stopping.
            For multi-task training, a dict from adapter name to validation data, which may
            leave out tasks.
        validation_labels: Labels for a list of validation texts; None for multi-task training.
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
        sampling: ``"round_robin"`` or ``"proportional"``, the task order of multi-task training;
            ignored with one dataset.
        cache_frozen_layers: When every adapter sits at or above block ``k`` (``leave_out`` covers
            the blocks below), run blocks ``0 .. k-1`` once per example before the first epoch,
            keep their outputs (in a temporary memory-mapped file when they exceed 2 GiB) and
            train from block ``k`` on. The cached blocks run without dropout, so the result equals
            an uncached run whose base model has dropout off. Single-task training of
            encoder-only and decoder-only models.
        progress: Show a progress bar per epoch.

    Returns:
        The per-epoch metrics; the model keeps the weights of ``History.best_epoch``.

    Raises:
        ValueError: Before any training, for invalid arguments or data, when no adapter is
            trainable, or when a task names an adapter that does not exist or is not trainable.
    """
    _check_fit_arguments(epochs, batch_size, learning_rate, patience, max_length, sampling)
    if isinstance(train_data, Mapping):
        if cache_frozen_layers:
            raise ValueError("cache_frozen_layers=True supports one task per fit; train the tasks without it, "
                             "or one task at a time")
        return _fit_multitask(
            model, train_data, labels, validation_data=validation_data, validation_labels=validation_labels,
            epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
            warmup_ratio=warmup_ratio, tokenizer=tokenizer, max_length=max_length, text_column=text_column,
            label_column=label_column, patience=patience, seed=seed, replace_head=replace_head,
            checkpoint_dir=checkpoint_dir, sampling=sampling, progress=progress)
    registry = model._adapterkit
    # The fusion's head after train_adapter_fusion, otherwise the last trainable active adapter's.
    head_owner = registry.training_head_owner()
    if head_owner is None:
        raise ValueError("No adapter or fusion is set to train; call model.train_adapter(name) or "
                         "model.train_adapter_fusion(Fuse(...)) before fit")
    if cache_frozen_layers:
        check_cacheable(model)
    texts, raw_labels = texts_and_labels(train_data, labels, text_column=text_column, label_column=label_column,
                                         require_labels=True)
    validation = None
    if validation_data is not None:
        validation = texts_and_labels(validation_data, validation_labels, text_column=text_column,
                                      label_column=label_column, require_labels=True)
    tokenizer = resolve_tokenizer(model, tokenizer)
    # Checks above raise before anything changes; from here on the head may be resized.
    label_map = _training_labels(model, head_owner, raw_labels, replace_head,
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
    scheduler = _linear_schedule(optimizer, steps_per_epoch * epochs, warmup_ratio)
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
        best_loss, epochs_without_improvement, best_state, start_epoch = _restore_progress(
            saved, optimizer, scheduler, history)
        logger.info("Resuming training from %s after epoch %d", checkpoint_path, start_epoch - 1)

    was_training = model.training
    generator = torch.Generator().manual_seed(seed)
    for _ in range(1, start_epoch):
        torch.randperm(len(texts), generator=generator)  # replay the shuffles of finished epochs
    cache = None
    if cache_frozen_layers and start_epoch <= epochs:
        cache = FrozenLayerCache(model, encoded, lambda indices: _collate(tokenizer, encoded, indices, device),
                                 batch_size * 2)
        cache.check_first_batch()
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
                if cache is None:
                    logits = model(**inputs).logits
                else:
                    with cache.starting_at_cached_block(indices, inputs["attention_mask"]):
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
        if cache is not None:
            cache.close()
    registry.head_entry(head_owner).head_trained = True
    return history


# -- multi-task fit ----------------------------------------------------------------------------


@dataclass
class _Task:
    """One task of a multi-task ``fit``: an adapter trained on its own data with its own head.

    Attributes:
        name: The adapter that the task trains.
        texts: The training texts.
        labels: The training labels as given.
        validation: The validation texts and labels, or ``None``.
        label_map: The labels of the adapter's head.
        label_ids: The class id of each training text.
        validation_ids: The class id of each validation text.
        encoded: The token ids of each training text.
    """

    name: str
    texts: list[str]
    labels: list[Any]
    validation: tuple[list[str], list[Any]] | None = None
    label_map: LabelMap | None = None
    label_ids: list[int] = field(default_factory=list)
    validation_ids: list[int] = field(default_factory=list)
    encoded: list[list[int]] = field(default_factory=list)


def _check_task_names(registry: Any, names: list[Any]) -> None:
    """Raise ``ValueError`` unless every name is a trainable, unmerged adapter of the model."""
    unknown = [name for name in names if name not in registry.entries]
    if unknown:
        known = ", ".join(map(repr, registry.entries)) or "none"
        raise ValueError(f"train_data names the adapters {', '.join(map(repr, unknown))}, which this model does "
                         f"not have (adapters: {known}). Add each with model.add_adapter(name, config), then call "
                         "model.train_adapter([...]) with every task's adapter")
    trainable = set(registry.trainable_names())
    frozen = [name for name in names if name not in trainable]
    if frozen:
        raise ValueError(f"The adapters {', '.join(map(repr, frozen))} are not trainable. Call "
                         f"model.train_adapter({names!r}) before fit")
    merged = [name for name in names if name in registry.merged]
    if merged:
        raise ValueError(f"The adapters {', '.join(map(repr, merged))} are merged into the base weights, where "
                         "training cannot reach them. Call model.unmerge_adapter(name) first")


def _collect_tasks(model: nn.Module, train_data: Mapping, labels: Any, validation_data: Any,
                   validation_labels: Any, text_column: str, label_column: str) -> list[_Task]:
    """Read the tasks of a multi-task ``fit``, changing nothing.

    Raises:
        ValueError: If the dict is empty or a DatasetDict, a name is not a trainable adapter,
            ``labels`` or ``validation_labels`` is given, validation data names an adapter
            without training data, or a task's data is empty or invalid.
        TypeError: If a task's data has an unsupported type.
    """
    if isinstance(train_data, datasets.DatasetDict):
        raise ValueError(f"train_data is a DatasetDict with the splits {list(train_data)}. Pass one split, such as "
                         "train_data['train'], or a dict from adapter name to that task's data")
    if not train_data:
        raise ValueError("train_data is an empty dict. Pass a dict from adapter name to that task's data, such as "
                         "{'topic': (texts, labels)}")
    if labels is not None or validation_labels is not None:
        raise ValueError("labels= and validation_labels= must be None when train_data is a dict of tasks. Give "
                         "each task a (texts, labels) pair instead")
    if validation_data is not None and not isinstance(validation_data, Mapping):
        raise ValueError(f"validation_data is a {type(validation_data).__name__}, but train_data is a dict of "
                         "tasks. Pass validation_data as a dict from adapter name to that task's validation data")
    names = list(train_data)
    _check_task_names(model._adapterkit, names)
    validation_data = dict(validation_data or {})
    extra = [name for name in validation_data if name not in train_data]
    if extra:
        raise ValueError(f"validation_data names {', '.join(map(repr, extra))}, which train_data does not. Use "
                         f"the task names of train_data: {names}")

    tasks = []
    for name in names:
        texts, task_labels = task_texts_and_labels(name, train_data[name], text_column=text_column,
                                                   label_column=label_column)
        validation = None
        if validation_data.get(name) is not None:
            validation = task_texts_and_labels(name, validation_data[name], text_column=text_column,
                                               label_column=label_column,
                                               data_description="validation data")
        tasks.append(_Task(name=name, texts=texts, labels=task_labels, validation=validation))
    return tasks


def _prepare_tasks(model: nn.Module, tasks: list[_Task], tokenizer: Any, replace_head: bool,
                   max_length: int) -> None:
    """Check every task's labels, then set each head to its task's labels and tokenize the texts.

    Raises:
        ValueError: Before any head changes, if a task's labels do not fit its head (see
            ``_choose_label_map``).
    """
    plans = []
    for task in tasks:
        validation_labels = task.validation[1] if task.validation is not None else None
        try:
            plans.append(_choose_label_map(model, task.name, task.labels, replace_head, validation_labels))
        except ValueError as error:
            raise ValueError(f"Task {task.name!r}: {error}") from error

    # Every check has passed, so from here on heads may be resized.
    for task, (label_map, update_head) in zip(tasks, plans):
        if update_head:
            model._adapterkit.set_labels(task.name, list(label_map.labels), new_head=replace_head)
        task.label_map = label_map
        task.label_ids = label_map.encode(task.labels)
        if task.validation is not None:
            task.validation_ids = label_map.encode(task.validation[1])
        task.encoded = _tokenize(tokenizer, task.texts, max_length)


def _task_parameters(registry: Any, names: list[str]) -> dict[str, nn.Parameter]:
    """Return the trainable parameters of adapters ``names`` and their heads, keyed ``<adapter>.<path>``.

    Unlike ``model.named_parameters()``, the keys do not depend on which head is on the model.
    """
    return {key: parameter for name in names
            for key, parameter in registry.modules_of(name).named_parameters(prefix=name)
            if parameter.requires_grad}


def _tasks_fingerprint(tasks: list[_Task], sampling: str) -> str:
    digest = hashlib.sha256(sampling.encode())
    for task in tasks:
        digest.update(repr(task.name).encode())
        digest.update(_data_fingerprint(task.texts, task.labels).encode())
    return digest.hexdigest()


def _restore_progress(saved: dict, optimizer: torch.optim.Optimizer, scheduler: Any,
                      history: History) -> tuple[float, int, dict | None, int]:
    """Restore the optimizer, schedule, history and random state of a checkpoint written after an epoch.

    Returns:
        The best validation loss, the epochs since it improved, the best state and the next epoch.
    """
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    history.epochs = saved["history"]
    history.best_epoch = saved.get("best_epoch")
    torch.set_rng_state(saved["rng_state"])
    return (saved["best_loss"], saved["epochs_without_improvement"], saved.get("best_state") or None,
            len(history.epochs) + 1)


def _linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                     warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a schedule that warms up linearly for ``warmup_ratio`` of the steps, then decays to zero."""
    warmup_steps = int(total_steps * warmup_ratio)

    def learning_rate_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)


def _epoch_steps(tasks: list[_Task], batch_size: int, sampling: str,
                 generator: torch.Generator) -> list[tuple[_Task, list[int]]]:
    """Return the task and the example indices of each step of one multi-task epoch.

    Each pass over a task's data is shuffled and batched as in single-task ``fit``. A task gets
    as many passes as its steps need, and the batches left over from its last pass are dropped.
    """
    by_name = {task.name: task for task in tasks}
    schedule = task_schedule({task.name: math.ceil(len(task.texts) / batch_size) for task in tasks}, sampling,
                             dataset_sizes={task.name: len(task.texts) for task in tasks}, generator=generator)
    queues = {}
    for task in tasks:
        needed = schedule.count(task.name)
        batches: list[list[int]] = []
        while len(batches) < needed:
            order = torch.randperm(len(task.texts), generator=generator).tolist()
            pass_batches = _batches(task.encoded, batch_size, order)
            batch_order = torch.randperm(len(pass_batches), generator=generator).tolist()
            batches.extend(pass_batches[index] for index in batch_order)
        queues[task.name] = iter(batches)
    return [(by_name[name], next(queues[name])) for name in schedule]


def _activate(registry: Any, name: str) -> None:
    """Make adapter ``name`` the only active adapter, with its head on the model."""
    if registry.active != (name,) or registry.active_block is not None:
        registry.set_active([name])


@contextlib.contextmanager
def _active_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run the block with only adapter ``name`` active, then restore the adapters active before.

    ``None`` leaves the active adapters as they are.
    """
    if name is None:
        yield
        return
    registry = model._adapterkit
    registry.check_names([name])
    before = registry.active_block if registry.active_block is not None else list(registry.active)
    _activate(registry, name)
    try:
        yield
    finally:
        registry.set_active(before)


def _train_multitask_epoch(model: nn.Module, steps: list[tuple[_Task, list[int]]], optimizer: torch.optim.Optimizer,
                           scheduler: Any, tokenizer: Any, description: str,
                           progress: bool) -> dict[str, tuple[float, int, int]]:
    """Run the steps of one epoch and return each task's summed loss, examples and steps."""
    registry = model._adapterkit
    device = _device(model)
    totals = {task.name: (0.0, 0, 0) for task, _ in steps}
    seen_total, loss_total = 0, 0.0
    bar = tqdm(steps, desc=description, disable=not progress, unit="batch", dynamic_ncols=True)
    for task, indices in bar:
        _activate(registry, task.name)
        inputs = _collate(tokenizer, task.encoded, indices, device)
        targets = torch.tensor([task.label_ids[i] for i in indices], device=device)
        logits = model(**inputs).logits
        loss = nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        batch_loss = loss.item() * len(indices)
        task_loss, task_examples, task_steps = totals[task.name]
        totals[task.name] = (task_loss + batch_loss, task_examples + len(indices), task_steps + 1)
        loss_total += batch_loss
        seen_total += len(indices)
        bar.set_postfix(loss=f"{loss_total / seen_total:.4f}")
    bar.close()
    return totals


def _multitask_row(epoch: int, tasks: list[_Task], totals: dict[str, tuple[float, int, int]]) -> dict[str, float]:
    """Return the History row of one epoch's training losses; a task without steps gets a NaN loss."""
    loss_sum = sum(loss for loss, _, _ in totals.values())
    examples = sum(count for _, count, _ in totals.values())
    row: dict[str, float] = {"epoch": epoch, "train_loss": loss_sum / examples}
    for task in tasks:
        task_loss, task_examples, task_steps = totals.get(task.name, (0.0, 0, 0))
        row[f"{task.name}/train_loss"] = task_loss / task_examples if task_examples else math.nan
        row[f"{task.name}/steps"] = task_steps
    return row


def _validate_tasks(model: nn.Module, tasks: list[_Task], tokenizer: Any, batch_size: int, max_length: int,
                    row: dict[str, float]) -> float:
    """Add each validated task's scores to ``row`` and return the mean of their validation losses."""
    losses = []
    for task in tasks:
        if task.validation is None:
            continue
        _activate(model._adapterkit, task.name)
        scores = _score(model, tokenizer, task.validation[0], task.validation_ids, task.label_map, batch_size,
                        max_length)
        row.update({f"{task.name}/val_{key}": scores[key] for key in ("loss", "accuracy", "precision", "recall", "f1")})
        losses.append(scores["loss"])
    row["val_loss"] = sum(losses) / len(losses)
    return row["val_loss"]


def _fit_multitask(model: nn.Module, train_data: Mapping, labels: Any, *, validation_data: Any,
                   validation_labels: Any, epochs: int, batch_size: int, learning_rate: float, weight_decay: float,
                   warmup_ratio: float, tokenizer: Any, max_length: int, text_column: str, label_column: str,
                   patience: int | None, seed: int, replace_head: bool, checkpoint_dir: str | os.PathLike | None,
                   sampling: str, progress: bool) -> History:
    """Train one adapter and head per task; ``fit`` documents the behaviour and arguments."""
    registry = model._adapterkit
    tasks = _collect_tasks(model, train_data, labels, validation_data, validation_labels, text_column, label_column)
    tokenizer = resolve_tokenizer(model, tokenizer)
    fingerprint = _tasks_fingerprint(tasks, sampling)
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    saved = None
    if checkpoint_path is not None and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, weights_only=True)
        if saved.get("fingerprint") != fingerprint:
            raise ValueError(f"{checkpoint_path} belongs to another training run (other data, adapters or sampling); "
                             "delete it or choose another checkpoint_dir")
    # Seeded before the heads are resized, so that new heads start the same for the same seed.
    torch.manual_seed(seed)
    _prepare_tasks(model, tasks, tokenizer, replace_head, max_length)

    parameters = _task_parameters(registry, [task.name for task in tasks])
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = sum(math.ceil(len(task.texts) / batch_size) for task in tasks)
    scheduler = _linear_schedule(optimizer, steps_per_epoch * epochs, warmup_ratio)
    generator = torch.Generator().manual_seed(seed)
    validated = any(task.validation is not None for task in tasks)

    history = History()
    best_loss, best_state, epochs_without_improvement = math.inf, None, 0
    start_epoch = 1
    if saved is not None:
        if sorted(saved["trainable"]) != sorted(parameters):
            raise ValueError(f"{checkpoint_path} contains the parameters of other adapters or heads; delete it "
                             "or choose another checkpoint_dir")
        _copy_into(parameters, saved["trainable"])
        best_loss, epochs_without_improvement, best_state, start_epoch = _restore_progress(
            saved, optimizer, scheduler, history)
        generator.set_state(saved["sampling_state"])
        logger.info("Resuming multi-task training from %s after epoch %d", checkpoint_path, start_epoch - 1)

    before = registry.active_block if registry.active_block is not None else list(registry.active)
    was_training = model.training
    try:
        for epoch in range(start_epoch, epochs + 1):
            if epochs_without_improvement >= (patience or math.inf):
                break
            model.train()
            steps = _epoch_steps(tasks, batch_size, sampling, generator)
            totals = _train_multitask_epoch(model, steps, optimizer, scheduler, tokenizer,
                                            f"epoch {epoch}/{epochs}", progress)
            row = _multitask_row(epoch, tasks, totals)
            if validated:
                val_loss = _validate_tasks(model, tasks, tokenizer, batch_size * 2, max_length, row)
                if val_loss < best_loss:
                    best_loss, epochs_without_improvement = val_loss, 0
                    best_state = {key: value.detach().clone() for key, value in parameters.items()}
                    history.best_epoch = epoch
                else:
                    epochs_without_improvement += 1
            else:
                history.best_epoch = epoch
            history.epochs.append(row)
            logger.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
            if checkpoint_path is not None:
                state = {
                    "fingerprint": fingerprint,
                    "trainable": {key: value.detach().clone() for key, value in parameters.items()},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "history": history.epochs, "best_loss": best_loss, "best_state": best_state or {},
                    "best_epoch": history.best_epoch, "epochs_without_improvement": epochs_without_improvement,
                    "rng_state": torch.get_rng_state(), "sampling_state": generator.get_state(),
                }
                write_atomically(checkpoint_path, lambda path: torch.save(state, path))
        if len(history.epochs) < epochs:
            history.stopped_early = True
            logger.info("Stopped early after epoch %d: the mean validation loss did not improve for %d epochs",
                        len(history.epochs), patience)
        if best_state is not None:
            _copy_into(parameters, best_state)
    finally:
        registry.set_active(before)
        model.train(was_training)
    for task in tasks:
        registry.entries[task.name].head_trained = True
    return history


def _copy_into(parameters: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in values.items():
            parameters[key].copy_(value)


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


def evaluate(model: nn.Module, data: Any, labels: Sequence[Any] | None = None, *, adapter: str | None = None,
             batch_size: int = 32, tokenizer: Any = None, max_length: int = 256, text_column: str = "text",
             label_column: str = "label") -> dict[str, Any]:
    """Score the model on labelled data.

    Args:
        adapter: Score with only this adapter and its head active, such as one task of a
            multi-task ``fit``; the active adapters are restored afterwards. ``None`` scores
            the active adapters.

    Returns:
        ``accuracy``, macro ``precision``, ``recall`` and ``f1``, ``loss`` (cross-entropy),
        ``confusion_matrix`` (rows are true labels, columns predictions, both in ``labels`` order),
        ``labels`` and ``num_examples``.

    Raises:
        ValueError: If the data has labels the model was not trained on, or ``adapter`` is unknown.
    """
    texts, raw_labels = texts_and_labels(data, labels, text_column=text_column, label_column=label_column,
                                         require_labels=True)
    with _active_adapter(model, adapter):
        label_map = _label_map(model)
        label_ids = _encode_labels(label_map, raw_labels, "evaluation")
        tokenizer = resolve_tokenizer(model, tokenizer)
        scores = _score(model, tokenizer, texts, label_ids, label_map, batch_size, max_length)
    scores["labels"] = list(label_map.labels)
    scores["num_examples"] = len(texts)
    return scores


def predict(model: nn.Module, texts: Any, *, adapter: str | None = None, batch_size: int = 32, tokenizer: Any = None,
            max_length: int = 256, text_column: str = "text") -> Predictions:
    """Return the predicted label and the class probabilities of each text.

    Args:
        texts: One string, a list of strings, or a Dataset or DataFrame with ``text_column``.
        adapter: Predict with only this adapter and its head active; the active adapters are
            restored afterwards. ``None`` predicts with the active adapters.

    Raises:
        ValueError: If ``adapter`` is unknown.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts, _ = texts_and_labels(texts, text_column=text_column)
    with _active_adapter(model, adapter):
        label_map = _label_map(model)
        tokenizer = resolve_tokenizer(model, tokenizer)
        probabilities = _logits(model, tokenizer, texts, batch_size, max_length).softmax(-1)
    predicted = label_map.decode(probabilities.argmax(-1).tolist())
    return Predictions(labels=predicted, probabilities=probabilities.tolist(), label_names=list(label_map.labels))
