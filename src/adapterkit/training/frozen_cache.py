"""Cache the outputs of the frozen blocks below the lowest adapter, for ``fit(cache_frozen_layers=True)``.

When every adapter sits at or above block ``k`` (``leave_out`` covers the blocks below), blocks
``0 .. k-1`` compute the same hidden states for an example in every epoch. ``FrozenLayerCache``
runs them once per example and keeps the input of block ``k`` for each real token. Its forward
then starts at block ``k``. For the length of that forward, the stack's list of blocks is cut to
``k ..``, and the module that outputs the embeddings returns the cached states.

The cached blocks run in eval mode, so the cache equals an uncached run whose base model has
dropout off. Padding positions get zeros. They are masked out of attention, so no real token
reads them. The cache lives in memory, or in a memory-mapped file when it would exceed
``memory_limit_bytes``.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..architectures import find_base_model, get_submodule

# Kinds of adapter sites that sit before the first block, so nothing can be cached below them.
_INPUT_KINDS = ("embeddings", "prompt", "positions")
MEMORY_LIMIT_BYTES = 2 * 1024**3
# Largest difference between the cached and the full forward's logits that the first-batch check accepts.
CHECK_TOLERANCE = 1e-4


class _StopForward(Exception):
    """Raised by the capture hook to end a forward once block ``k`` has its input."""


def lowest_adapted_block(model: nn.Module) -> int:
    """Return the index of the lowest block that an active or merged adapter changes.

    Raises:
        ValueError: If the model has more than one stack, an adapter acts before the first block, or
            no adapter acts at all, naming what to change.
    """
    registry = model._adapterkit
    layout = registry.layout
    if len(layout.spec.stacks) != 1:
        raise ValueError(f"cache_frozen_layers=True supports encoder-only and decoder-only models, but this "
                         f"{layout.family!r} model has {len(layout.spec.stacks)} stacks; train without it")
    lowest = None
    for name in dict.fromkeys([*registry.active, *registry.merged]):
        for key, _, _ in registry.placements_of(name):
            if key[0] in _INPUT_KINDS:
                raise ValueError(f"cache_frozen_layers=True needs every adapter to start at a block, but adapter "
                                 f"{name!r} changes the model input ({key[0]}); train without it")
            block = len(layout) if key[0] == "final" else key[1]
            lowest = block if lowest is None else min(lowest, block)
    if lowest is None:
        raise ValueError("cache_frozen_layers=True found no active adapter; call model.train_adapter(name) first")
    return lowest


def check_cacheable(model: nn.Module) -> int:
    """Return the block from which a cached forward starts, after checking that caching is possible.

    Raises:
        ValueError: If no block below every adapter exists, or such blocks have trainable parameters.
    """
    start = lowest_adapted_block(model)
    if start == 0:
        raise ValueError("cache_frozen_layers=True has nothing to cache: an adapter sits in block 0. Leave out "
                         "the lowest blocks (leave_out=...) or train without it")
    _check_frozen_below(model, start)
    return start


def _check_frozen_below(model: nn.Module, start: int) -> None:
    layout = model._adapterkit.layout
    frozen = [find_base_model(model).get_input_embeddings()] + [block for _, block in layout.blocks[:start]]
    if layout.spec.embeddings is not None:
        frozen.append(layout.submodule(layout.spec.embeddings))
    trainable = [name for module in frozen for name, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"cache_frozen_layers=True caches blocks 0 to {start - 1}, but parameters there are "
                         f"trainable ({trainable[:3]}); freeze them or train without the cache")


class FrozenLayerCache:
    """The inputs of block ``start`` for a fixed list of examples, and a forward that starts there.

    Args:
        model: A model prepared with ``adapterkit.init``, with the adapters to train active.
        encoded: Token ids of each example.
        collate: Builds the model inputs (``input_ids``, ``attention_mask``) of a list of example
            indices, padded as training pads them.
        batch_size: Examples per forward while the cache is built.
        directory: Folder for the memory-mapped file; a temporary folder when ``None``.
        memory_limit_bytes: Above this size the cache goes to a memory-mapped file.

    Raises:
        ValueError: If nothing can be cached (see ``lowest_adapted_block``), or blocks below the
            lowest adapter have trainable parameters.
    """

    def __init__(self, model: nn.Module, encoded: Sequence[Sequence[int]], collate: Callable[[list[int]], dict],
                 batch_size: int, directory: str | Path | None = None,
                 memory_limit_bytes: int = MEMORY_LIMIT_BYTES):
        self.model = model
        self.collate = collate
        self.start = check_cacheable(model)
        layout = model._adapterkit.layout
        self.stack = layout.spec.stacks[0]
        self.embeddings = layout.submodule(layout.spec.embeddings) if layout.spec.embeddings else None
        if self.embeddings is None:
            raise ValueError(f"cache_frozen_layers=True needs the module that outputs the embeddings, which the "
                             f"architecture description of {layout.family!r} does not name")
        self.hidden_size = layout.hidden_size
        lengths = [len(ids) for ids in encoded]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._temporary = None
        self.storage = self._allocate(int(self.offsets[-1]), directory, memory_limit_bytes)
        self._fill(len(encoded), batch_size)

    # -- building -------------------------------------------------------------------------------

    def _allocate(self, tokens: int, directory: str | Path | None, limit: int) -> np.ndarray:
        shape = (max(tokens, 1), self.hidden_size)
        if tokens * self.hidden_size * 4 <= limit:
            return np.zeros(shape, dtype=np.float32)
        if directory is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="adapterkit-cache-")
            directory = self._temporary.name
        path = Path(directory) / "frozen_layers.f32"
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.memmap(path, dtype=np.float32, mode="w+", shape=shape)

    @torch.no_grad()
    def _fill(self, count: int, batch_size: int) -> None:
        block = self.model._adapterkit.layout.blocks[self.start][1]
        captured: dict[str, torch.Tensor] = {}

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        # Sorting by length cuts padding; the order does not change what each example stores.
        order = sorted(range(count), key=lambda i: self.offsets[i + 1] - self.offsets[i])
        was_training = self.model.training
        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        self.model.eval()
        try:
            for begin in range(0, count, batch_size):
                indices = order[begin:begin + batch_size]
                batch = self.collate(indices)
                with contextlib.suppress(_StopForward):
                    self.model(**batch)
                mask = batch["attention_mask"].bool()
                hidden = captured.pop("hidden").float().cpu()
                for row, index in enumerate(indices):
                    tokens = hidden[row][mask[row].cpu()]
                    self.storage[self.offsets[index]:self.offsets[index + 1]] = tokens.numpy()
        finally:
            handle.remove()
            self.model.train(was_training)

    # -- using ----------------------------------------------------------------------------------

    def hidden_states(self, indices: Sequence[int], attention_mask: torch.Tensor) -> torch.Tensor:
        """Return the cached inputs of block ``start``, ``(batch, seq_len, hidden)``, zeros at padding.

        Args:
            indices: Example indices, one per row.
            attention_mask: ``(batch, seq_len)``, 1 at real tokens, as ``collate`` built it.
        """
        mask = attention_mask.bool()
        rows = [torch.from_numpy(np.asarray(self.storage[self.offsets[i]:self.offsets[i + 1]])) for i in indices]
        hidden = torch.zeros(*mask.shape, self.hidden_size, dtype=rows[0].dtype)
        hidden[mask.cpu()] = torch.cat(rows)
        reference = next(self.model.parameters())
        return hidden.to(device=attention_mask.device, dtype=reference.dtype)

    @contextlib.contextmanager
    def starting_at_cached_block(self, indices: Sequence[int], attention_mask: torch.Tensor) -> Iterator[None]:
        """Make a forward of the model on these examples run blocks ``start ..`` only, within the block.

        The forward still takes the examples' ``input_ids`` and ``attention_mask``: the model uses
        them for its masks and positions, and the embeddings it computes are replaced.
        """
        hidden = self.hidden_states(indices, attention_mask)
        if self.model._adapterkit._checkpointing():
            hidden.requires_grad_(True)
        base = find_base_model(self.model)
        parent_path, _, attribute = self.stack.layers.rpartition(".")
        parent = get_submodule(base, parent_path) if parent_path else base
        blocks = getattr(parent, attribute)
        handle = self.embeddings.register_forward_hook(lambda module, args, output: hidden)
        parent._modules[attribute] = nn.ModuleList(list(blocks)[self.start:])
        try:
            yield
        finally:
            parent._modules[attribute] = blocks
            handle.remove()

    @torch.no_grad()
    def check_first_batch(self, tolerance: float = CHECK_TOLERANCE) -> None:
        """Compare the cached forward with the full forward on up to 4 examples, in eval mode.

        Raises:
            ValueError: If the logits differ by more than ``tolerance``: the model family computes
                something from its block positions that a forward from block ``start`` changes.
        """
        indices = list(range(min(4, len(self.offsets) - 1)))
        batch = self.collate(indices)
        was_training = self.model.training
        self.model.eval()
        try:
            full = self.model(**batch).logits
            with self.starting_at_cached_block(indices, batch["attention_mask"]):
                cached = self.model(**batch).logits
        finally:
            self.model.train(was_training)
        difference = float((full - cached).abs().max())
        if not math.isfinite(difference) or difference > tolerance:
            raise ValueError(f"cache_frozen_layers=True gives logits {difference:.3g} away from the full forward on "
                             f"this {self.model.config.model_type!r} model (tolerance {tolerance}), so its blocks "
                             "depend on more than their input; train without it")

    def close(self) -> None:
        """Release the cache and delete its temporary file, if any."""
        self.storage = None
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    def __enter__(self) -> FrozenLayerCache:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
