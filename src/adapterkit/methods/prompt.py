"""Prompt tuning (Lester et al., 2021): trained virtual-token embeddings before the input embeddings.

``PromptTuning`` contains the embeddings. The functions below rewrite the keyword arguments of a
forward call so that the model reads the prompt right before the real tokens of each row.
``injection.PromptSite`` calls them from forward pre-hooks. They follow one contract:

- A forward without a KV cache, or with an empty one, starts a sequence: the token embeddings are
  computed here and the prompt is inserted (``inputs_embeds`` replaces ``input_ids``).
- A forward with a non-empty cache continues a sequence whose prompt is already in the cache, so
  nothing is inserted. This is how ``generate()`` decodes after its first step.
- The prompt goes in front of each row's first attended token. That is position 0 without a mask
  or with right padding, and the position after the padding of a left-padded row, so the prompt
  and the tokens stay adjacent as in the row alone (which matters within a sliding window).
- ``attention_mask``, ``position_ids`` and ``cache_position`` describe the caller's tokens only, at
  every step. The prompt's mask columns (ones) are inserted at the prompt's place. Given position
  ids move up by the prompt length, and the prompt takes over the positions from the row's first
  attended token on. A left-padded row whose position ids count from its first token, as
  ``generate()`` makes them, so gets the positions of the row alone.
- Per-token ``labels`` get ``-100`` (ignored) for the prompt, ``token_type_ids`` get zeros, and
  question-answering ``start_positions`` and ``end_positions`` move up by the prompt length.

Outputs keep the prompt's positions, as in PEFT: per-token logits have ``prompt_length`` more
positions than the input.

NOTE: sequence classifiers that pool the last non-padding token (GPT-2, Llama and relatives) cannot
find it from ``inputs_embeds`` and take the last position instead. So do PEFT 0.21's classifiers,
and the outputs agree with PEFT, but a right-padded row is classified from a padding position.
Pad such batches on the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

PROMPT_INIT_SCHEMES = ("random", "vocab")
IGNORE_INDEX = -100
# Token embeddings sampled to estimate their standard deviation for the "random" initialisation.
SCALE_SAMPLE_SIZE = 1024
CACHE_KEYWORDS = ("cache", "past_key_values")
# Model classes whose ``labels`` have one entry per input token.
TOKEN_LABEL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForTokenClassification")


class PromptTuning(nn.Module):
    """The ``(prompt_length, embedding_dim)`` embeddings of the virtual tokens.

    Args:
        prompt_length: Number of virtual tokens, an int >= 1.
        embedding_dim: Width of the model's input embeddings (which can differ from the hidden
            size, as in ELECTRA).

    Raises:
        ValueError: If a size is not an int >= 1.
    """

    def __init__(self, prompt_length: int, embedding_dim: int):
        super().__init__()
        for name, value in (("prompt_length", prompt_length), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
        self.prompt_length = prompt_length
        self.embedding_dim = embedding_dim
        self.prompt = nn.Parameter(torch.zeros(prompt_length, embedding_dim))

    @torch.no_grad()
    def reset_parameters(self, init: str, embeddings: nn.Module) -> None:
        """Initialise ``prompt`` from the model's input embedding module ``embeddings``.

        ``"vocab"`` copies the embeddings of ``prompt_length`` token ids drawn uniformly from the
        vocabulary. ``"random"`` draws from normal(0, s), with s the standard deviation of the
        embeddings of up to ``SCALE_SAMPLE_SIZE`` drawn tokens. Both read the embedding module's
        output, so for a scaled embedding (Gemma) the prompt has the scale of the model's token
        embeddings, not of the raw weight matrix.
        """
        vocab_size = embeddings.weight.shape[0]
        device = embeddings.weight.device
        if init == "vocab":
            token_ids = torch.randint(0, vocab_size, (self.prompt_length,), device=device)
            self.prompt.copy_(embeddings(token_ids).float())
        elif init == "random":
            token_ids = torch.randint(0, vocab_size, (min(vocab_size, SCALE_SAMPLE_SIZE),), device=device)
            scale = embeddings(token_ids).float().std().item()
            self.prompt.normal_(0.0, scale)
        else:
            raise ValueError(f"init={init!r} is invalid: expected one of {', '.join(PROMPT_INIT_SCHEMES)}")

    def forward(self, batch_size: int) -> torch.Tensor:
        """Return the prompt for every row: ``(batch_size, prompt_length, embedding_dim)``, a view."""
        return self.prompt.unsqueeze(0).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"prompt_length={self.prompt_length}, embedding_dim={self.embedding_dim}"


def input_embeddings(model: nn.Module) -> nn.Module:
    """Return the token embedding module of ``model`` (``get_input_embeddings()``).

    Raises:
        ValueError: If the model has none, or its weight is not a ``(vocabulary, width)`` matrix.
    """
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(model).__name__} has no token embedding matrix (get_input_embeddings() returned "
                         f"{type(embeddings).__name__}), so prompt tuning has no embedding space to work in")
    return embeddings


def encoder_and_decoder(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Return the encoder and decoder stacks of an encoder-decoder model.

    transformers 4.57's T5 and BART classifiers lack ``get_encoder``, but their base model has it.

    Raises:
        ValueError: If neither the model nor its base model has ``get_encoder`` and ``get_decoder``.
    """
    for candidate in (model, getattr(model, "base_model", None)):
        if callable(getattr(candidate, "get_encoder", None)) and callable(getattr(candidate, "get_decoder", None)):
            return candidate.get_encoder(), candidate.get_decoder()
    raise ValueError(f"{type(model).__name__} is an encoder-decoder model without get_encoder and get_decoder, so "
                     "adapterkit cannot find the encoder input that prompt tuning extends")


def prompt_target(model: nn.Module) -> nn.Module:
    """Return the module whose inputs get the prompt: the encoder of an encoder-decoder model, else the model."""
    if getattr(model.config, "is_encoder_decoder", False):
        return encoder_and_decoder(model)[0]
    return model


def has_token_labels(model: nn.Module) -> bool:
    """Return whether ``model``'s ``labels`` argument has one entry per input token (causal LM, MLM, token tags)."""
    return type(model).__name__.endswith(TOKEN_LABEL_SUFFIXES)


def cache_length(cache: Any) -> int:
    """Return the number of positions in a KV cache: a ``transformers.Cache`` or the legacy tuple format."""
    if cache is None:
        return 0
    get_seq_length = getattr(cache, "get_seq_length", None)
    if get_seq_length is not None:
        return int(get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def _prompt_embeddings(modules: Sequence[PromptTuning], batch_size: int, like: torch.Tensor) -> torch.Tensor:
    """Return the prompts of ``modules`` side by side: ``(batch_size, total_length, width)``, on ``like``'s device
    and in its dtype."""
    return torch.cat([module(batch_size).to(device=like.device, dtype=like.dtype) for module in modules], dim=1)


def _validate_mask(mask: Any, name: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"Prompt tuning adds its virtual tokens to 2-D (batch, sequence) attention masks, but {name} "
                         f"is {shape}. Pass a 2-D mask. In generate(), use a dynamic cache, because static caches "
                         "make transformers build 4-D masks")


def _leading_padding(mask: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """Return the ``(batch,)`` number of masked positions before each row's first attended one (0 without a mask)."""
    if mask is None:
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    return (mask.cumsum(dim=-1) == 0).sum(dim=-1)


def _insertion_index(offsets: torch.Tensor, prompt_length: int, total_length: int) -> torch.Tensor:
    """Return the ``(batch, total_length)`` gather index that moves a leading prompt to each row's offset.

    The source of the gather is ``cat([prompt, sequence])``: index ``s < prompt_length`` is prompt
    position ``s``, index ``s >= prompt_length`` is sequence position ``s - prompt_length``. Target
    position ``j`` of a row with offset ``k`` takes sequence position ``j`` for ``j < k``, prompt
    position ``j - k`` for ``k <= j < k + prompt_length``, and sequence position
    ``j - prompt_length`` after that.
    """
    target = torch.arange(total_length, device=offsets.device).unsqueeze(0)
    start = offsets.unsqueeze(1)
    inside = target - start
    after_prompt = torch.where(target < start + prompt_length, inside, target)
    return torch.where(target < start, target + prompt_length, after_prompt)


def _move_prompt(source: torch.Tensor, offsets: torch.Tensor, prompt_length: int, sequence_dim: int) -> torch.Tensor:
    """Reorder ``source`` (the prompt's entries first along ``sequence_dim``) so the prompt sits at each row's offset.

    ``sequence_dim`` is 1 for batch-first tensors ``(batch, n, ...)`` and -1 for position ids
    ``(..., batch, n)``.
    """
    if not bool(offsets.any()):
        return source
    index = _insertion_index(offsets, prompt_length, source.shape[sequence_dim])
    if sequence_dim == 1:
        index = index.reshape(*index.shape, *([1] * (source.dim() - 2))).expand_as(source)
        return source.gather(1, index)
    return source.gather(-1, index.expand(source.shape))


def _insert_mask(mask: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
    ones = torch.ones(mask.shape[0], length, dtype=mask.dtype, device=mask.device)
    return _move_prompt(torch.cat([ones, mask], dim=1), offsets, length, sequence_dim=1)


def _insert_positions(positions: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
    """Return position ids ``(..., batch or 1, n)`` moved up by ``length``, with the prompt's own at each offset."""
    batch_size = offsets.shape[0]
    if positions.shape[-2] != batch_size:
        positions = positions.expand(*positions.shape[:-2], batch_size, positions.shape[-1])
    first_token = offsets.clamp(max=positions.shape[-1] - 1).unsqueeze(1).expand(*positions.shape[:-1], 1)
    start = positions.gather(-1, first_token)
    prompt_positions = start + torch.arange(length, device=positions.device, dtype=positions.dtype)
    return _move_prompt(torch.cat([prompt_positions, positions + length], dim=-1), offsets, length, sequence_dim=-1)


def extend_inputs(inputs: dict[str, Any], modules: Sequence[PromptTuning], embeddings: nn.Module,
                  token_labels: bool = False) -> bool:
    """Rewrite the forward arguments ``inputs`` in place so that the model reads the prompts before the tokens.

    Follows the contract in the module docstring. Inputs other than those named there are left alone.

    Args:
        inputs: The forward's arguments by name: ``input_ids`` ``(batch, n)`` or ``inputs_embeds``
            ``(batch, n, width)``, and optionally ``attention_mask`` ``(batch, cached + n)``,
            ``position_ids`` ``(..., batch, n)``, ``cache_position`` ``(n,)``, ``token_type_ids``
            ``(batch, n)``, ``labels``, ``start_positions``, ``end_positions`` and a cache.
        modules: The active prompts, in the order they are inserted.
        embeddings: The module that embeds ``input_ids``.
        token_labels: Whether ``labels`` has one entry per token, so the prompt needs ignored labels.

    Returns:
        Whether ``inputs`` changed. Without ``input_ids`` and ``inputs_embeds`` nothing changes.

    Raises:
        ValueError: If the attention mask is not 2-D.
    """
    input_ids = inputs.get("input_ids")
    inputs_embeds = inputs.get("inputs_embeds")
    if input_ids is None and inputs_embeds is None:
        return False
    length = sum(module.prompt_length for module in modules)
    cache = next((inputs[key] for key in CACHE_KEYWORDS if inputs.get(key) is not None), None)
    starts_sequence = cache_length(cache) == 0
    mask = inputs.get("attention_mask")
    if mask is not None:
        _validate_mask(mask, "attention_mask")
    reference = input_ids if input_ids is not None else inputs_embeds
    offsets = _leading_padding(mask, reference.shape[0], reference.device)

    if starts_sequence:
        if inputs_embeds is None:
            inputs_embeds = embeddings(input_ids)
        prompts = _prompt_embeddings(modules, inputs_embeds.shape[0], inputs_embeds)
        inputs["inputs_embeds"] = _move_prompt(torch.cat([prompts, inputs_embeds], dim=1), offsets, length, 1)
        inputs["input_ids"] = None
        _insert_token_inputs(inputs, offsets, length, sequence_length=inputs_embeds.shape[1],
                             token_labels=token_labels)
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = _insert_positions(inputs["position_ids"], offsets, length)
    elif inputs.get("position_ids") is not None:
        inputs["position_ids"] = inputs["position_ids"] + length

    if mask is not None:
        inputs["attention_mask"] = _insert_mask(mask, offsets, length)
    _shift_cache_position(inputs, length, starts_sequence)
    return True


def _shift_cache_position(inputs: dict[str, Any], length: int, starts_sequence: bool) -> None:
    """Move ``cache_position`` past a prompt block of ``length`` slots, and index the block on the first step.

    The indices point into the KV cache (transformers 4.57) and every row shares them, so the prompt goes first.
    """
    cache_position = inputs.get("cache_position")
    if cache_position is None:
        return
    shifted = cache_position + length
    if starts_sequence:
        prompt_indices = cache_position[:1] + torch.arange(length, device=cache_position.device,
                                                           dtype=cache_position.dtype)
        shifted = torch.cat([prompt_indices, shifted])
    inputs["cache_position"] = shifted


def _insert_token_inputs(inputs: dict[str, Any], offsets: torch.Tensor, length: int, sequence_length: int,
                         token_labels: bool) -> None:
    """Give the prompt zeros in ``token_type_ids`` and ignored ``labels``, and shift question-answering spans."""
    token_type_ids = inputs.get("token_type_ids")
    if token_type_ids is not None:
        zeros = token_type_ids.new_zeros(token_type_ids.shape[0], length)
        inputs["token_type_ids"] = _move_prompt(torch.cat([zeros, token_type_ids], dim=1), offsets, length, 1)
    labels = inputs.get("labels")
    if token_labels and labels is not None and labels.dim() >= 2 and labels.shape[1] == sequence_length:
        ignored = labels.new_full((labels.shape[0], length, *labels.shape[2:]), IGNORE_INDEX)
        inputs["labels"] = _move_prompt(torch.cat([ignored, labels], dim=1), offsets, length, 1)
    for name in ("start_positions", "end_positions"):
        if inputs.get(name) is not None:
            inputs[name] = inputs[name] + length


def extend_cross_attention_mask(inputs: dict[str, Any], length: int) -> bool:
    """Insert ``length`` ones into a decoder's 2-D ``encoder_attention_mask`` where the encoder got the prompt.

    The encoder output has the prompt when ``encoder_hidden_states`` is ``length`` positions longer
    than the mask. An encoder output made without the prompt leaves the mask unchanged.

    Returns:
        Whether ``inputs`` changed.
    """
    mask = inputs.get("encoder_attention_mask")
    states = inputs.get("encoder_hidden_states")
    if not isinstance(mask, torch.Tensor) or not isinstance(states, torch.Tensor) or mask.dim() != 2:
        return False
    if mask.shape[-1] + length != states.shape[1]:
        return False
    offsets = _leading_padding(mask, mask.shape[0], mask.device)
    inputs["encoder_attention_mask"] = _insert_mask(mask, offsets, length)
    return True


# -- per-row routing -----------------------------------------------------------------------------------
#
# Under per-row routing (and BatchSplit or Parallel), each row reads the prompts of its own adapters,
# whose total length differs between rows (a row with no adapter has none). Every row gets a block
# of ``longest`` slots instead: its prompt plus ``longest - length`` padding slots that the attention
# mask hides. Where the padding slots go keeps each row's output equal to the row alone:
#
# - Causal models (``padding_first=True``) put them before the prompt, as more left padding. Their
#   classifiers read the last position, and causal attention lets no earlier position see later
#   ones. Without given position ids, the model would count the padding slots, so the rows get
#   position ids that skip them.
# - Encoders (``padding_first=False``) put them at the end of the row, after the caller's tokens and
#   padding. Their classifiers read position 0 (BERT) or the decoder (T5), and the positions of the
#   prompt and the tokens stay those of the row alone, also under T5's relative position bias.


def row_prompt_lengths(groups: Sequence[tuple[torch.Tensor, Sequence[PromptTuning]]], batch_size: int,
                       device: torch.device) -> torch.Tensor:
    """Return the ``(batch_size,)`` total prompt length of each row, from ``(rows, modules)`` groups."""
    lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
    for rows, modules in groups:
        lengths[rows.to(device)] = sum(module.prompt_length for module in modules)
    return lengths


def _block_mask(lengths: torch.Tensor, longest: int, padding_first: bool) -> torch.Tensor:
    """Return the ``(batch, longest)`` bool mask of each row's prompt slots in its block."""
    slots = torch.arange(longest, device=lengths.device).unsqueeze(0)
    if padding_first:
        return slots >= (longest - lengths).unsqueeze(1)
    return slots < lengths.unsqueeze(1)


def _rotate_padding_to_end(source: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                           sequence_dim: int) -> torch.Tensor:
    """Move the ``counts[i]`` positions from ``starts[i]`` on to the end of row ``i``, keeping the order of the rest.

    ``sequence_dim`` is 1 for batch-first tensors ``(batch, n, ...)`` and -1 for position ids
    ``(..., batch, n)``.
    """
    if not bool(counts.any()):
        return source
    total = source.shape[sequence_dim]
    target = torch.arange(total, device=source.device).unsqueeze(0)
    starts, counts = starts.unsqueeze(1), counts.unsqueeze(1)
    moved_start = total - counts
    index = torch.where(target < starts, target,
                        torch.where(target < moved_start, target + counts, starts + target - moved_start))
    if sequence_dim == 1:
        index = index.reshape(*index.shape, *([1] * (source.dim() - 2))).expand_as(source)
        return source.gather(1, index)
    return source.gather(-1, index.expand(source.shape))


def _arrange_block(source: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, longest: int,
                   padding_first: bool, sequence_dim: int) -> torch.Tensor:
    """Move each row's block (the first ``longest`` entries of ``source``) to its place, see the notes above."""
    arranged = _move_prompt(source, offsets, longest, sequence_dim)
    if padding_first:
        return arranged
    return _rotate_padding_to_end(arranged, offsets + lengths, longest - lengths, sequence_dim)


def _routed_prompt_block(groups: Sequence[tuple[torch.Tensor, Sequence[PromptTuning]]], lengths: torch.Tensor,
                         longest: int, padding_first: bool, like: torch.Tensor) -> torch.Tensor:
    """Return the ``(batch, longest, width)`` prompt blocks, zeros in the padding slots."""
    block = like.new_zeros(like.shape[0], longest, like.shape[-1])
    for rows, modules in groups:
        if not modules:
            continue
        rows = rows.to(like.device)
        prompts = _prompt_embeddings(modules, rows.shape[0], like)
        padding = longest - prompts.shape[1]
        prompts = torch.nn.functional.pad(prompts, (0, 0, padding, 0) if padding_first else (0, 0, 0, padding))
        block = block.index_copy(0, rows, prompts)
    return block


def _routed_positions(positions: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, longest: int,
                      padding_first: bool) -> torch.Tensor:
    """Return given position ids ``(..., batch or 1, n)`` with each row's block inserted (before arranging).

    Each row's prompt takes the positions from its first attended token on, and its tokens move up
    by its own prompt length. Padding slots repeat a neighbouring prompt position.
    """
    batch_size = offsets.shape[0]
    if positions.shape[-2] != batch_size:
        positions = positions.expand(*positions.shape[:-2], batch_size, positions.shape[-1])
    first_token = offsets.clamp(max=positions.shape[-1] - 1).unsqueeze(1).expand(*positions.shape[:-1], 1)
    start = positions.gather(-1, first_token)
    slots = torch.arange(longest, device=positions.device, dtype=positions.dtype).unsqueeze(0)
    row_lengths = lengths.to(positions.dtype).unsqueeze(1)
    within = slots - (longest - row_lengths) if padding_first else slots
    within = torch.minimum(within.clamp(min=0), (row_lengths - 1).clamp(min=0))
    return torch.cat([start + within, positions + row_lengths], dim=-1)


def _skip_padding_positions(total: int, offsets: torch.Tensor, extras: torch.Tensor, past: int) -> torch.Tensor:
    """Return ``(batch, total)`` position ids that count every position except each row's padding slots.

    Position ``j`` gets ``past + j`` before the row's offset and ``past + j - extras`` after its
    padding slots, which start at the offset. The slots repeat the position of the offset.
    """
    target = torch.arange(total, device=offsets.device).unsqueeze(0)
    offsets, extras = offsets.unsqueeze(1), extras.unsqueeze(1)
    positions = torch.where(target < offsets, target, (target - extras).clamp(min=offsets))
    return positions + past


def extend_routed_inputs(inputs: dict[str, Any], groups: Sequence[tuple[torch.Tensor, Sequence[PromptTuning]]],
                         embeddings: nn.Module, token_labels: bool = False, padding_first: bool = True,
                         takes_position_ids: bool = True) -> bool:
    """Rewrite the forward arguments ``inputs`` in place so that each row reads its own prompts.

    The per-row counterpart of ``extend_inputs``, with the same contract (see the module docstring)
    and the padding slots described above this function.

    Args:
        inputs: The forward's arguments by name, as for ``extend_inputs``.
        groups: ``(rows, modules)``: the batch rows ``(n,)`` and the prompts they read, in order.
            Together the groups cover every row once; a row with no prompt has empty ``modules``.
        embeddings: The module that embeds ``input_ids``.
        token_labels: Whether ``labels`` has one entry per token, so the block needs ignored labels.
        padding_first: Put the padding slots before the prompt (causal models) or at the end of
            the row (encoders).
        takes_position_ids: Whether the forward takes ``position_ids``, which causal models need
            to skip the padding slots when the caller gave none.

    Returns:
        Whether ``inputs`` changed.

    Raises:
        ValueError: If the attention mask is not 2-D.
    """
    input_ids = inputs.get("input_ids")
    inputs_embeds = inputs.get("inputs_embeds")
    if input_ids is None and inputs_embeds is None:
        return False
    reference = input_ids if input_ids is not None else inputs_embeds
    batch_size = reference.shape[0]
    lengths = row_prompt_lengths(groups, batch_size, reference.device)
    longest = int(lengths.max()) if batch_size else 0
    if not longest:
        return False
    extras = longest - lengths
    uneven = bool(extras.any())
    cache = next((inputs[key] for key in CACHE_KEYWORDS if inputs.get(key) is not None), None)
    cached = cache_length(cache)
    starts_sequence = cached == 0
    mask = inputs.get("attention_mask")
    if mask is not None:
        _validate_mask(mask, "attention_mask")
    offsets = _leading_padding(mask, batch_size, reference.device)

    def arrange(source: torch.Tensor, sequence_dim: int = 1) -> torch.Tensor:
        return _arrange_block(source, offsets, lengths, longest, padding_first, sequence_dim)

    given_positions = inputs.get("position_ids")
    if starts_sequence:
        if inputs_embeds is None:
            inputs_embeds = embeddings(input_ids)
        block = _routed_prompt_block(groups, lengths, longest, padding_first, inputs_embeds)
        sequence_length = inputs_embeds.shape[1]
        inputs["inputs_embeds"] = arrange(torch.cat([block, inputs_embeds], dim=1))
        inputs["input_ids"] = None
        _insert_routed_token_inputs(inputs, arrange, lengths, longest, padding_first, sequence_length, token_labels)
        if given_positions is not None:
            inputs["position_ids"] = arrange(_routed_positions(given_positions, offsets, lengths, longest,
                                                               padding_first), sequence_dim=-1)
        elif padding_first and uneven and takes_position_ids:
            inputs["position_ids"] = _skip_padding_positions(longest + sequence_length, offsets, extras, past=0)
    elif given_positions is not None:
        inputs["position_ids"] = given_positions + lengths.to(given_positions.dtype).unsqueeze(1)
    elif padding_first and uneven and takes_position_ids:
        # The cache holds every row's whole block, so each row's own count is ``extras`` lower.
        steps = torch.arange(reference.shape[1], device=reference.device).unsqueeze(0)
        inputs["position_ids"] = cached - extras.unsqueeze(1) + steps

    if mask is None and uneven:
        mask = torch.ones(batch_size, cached - (longest if not starts_sequence else 0) + reference.shape[1],
                          dtype=torch.long, device=reference.device)
    if mask is not None:
        block_mask = _block_mask(lengths, longest, padding_first).to(mask.dtype)
        inputs["attention_mask"] = arrange(torch.cat([block_mask, mask], dim=1))
    _shift_cache_position(inputs, longest, starts_sequence)
    return True


def _insert_routed_token_inputs(inputs: dict[str, Any], arrange: Any, lengths: torch.Tensor, longest: int,
                                padding_first: bool, sequence_length: int, token_labels: bool) -> None:
    """Give the blocks zeros in ``token_type_ids`` and ignored ``labels``, and shift question-answering spans."""
    token_type_ids = inputs.get("token_type_ids")
    if token_type_ids is not None:
        zeros = token_type_ids.new_zeros(token_type_ids.shape[0], longest)
        inputs["token_type_ids"] = arrange(torch.cat([zeros, token_type_ids], dim=1))
    labels = inputs.get("labels")
    if token_labels and labels is not None and labels.dim() >= 2 and labels.shape[1] == sequence_length:
        ignored = labels.new_full((labels.shape[0], longest, *labels.shape[2:]), IGNORE_INDEX)
        inputs["labels"] = arrange(torch.cat([ignored, labels], dim=1))
    # Padding slots before the prompt move the tokens by the whole block, slots at the end only by the prompt.
    shift = longest if padding_first else lengths
    for name in ("start_positions", "end_positions"):
        if inputs.get(name) is not None:
            inputs[name] = inputs[name] + shift


def extend_routed_cross_attention_mask(inputs: dict[str, Any], lengths: torch.Tensor) -> bool:
    """Insert each row's block into a decoder's ``encoder_attention_mask``, as the encoder got it.

    The encoder's blocks put their padding slots at the end of the row (``padding_first=False``).
    Without a mask, one is made when the blocks have padding slots, so the decoder does not attend to them.

    Args:
        inputs: The decoder's forward arguments by name.
        lengths: ``(batch,)`` prompt lengths of the decoder's rows.

    Returns:
        Whether ``inputs`` changed.
    """
    mask = inputs.get("encoder_attention_mask")
    states = inputs.get("encoder_hidden_states")
    longest = int(lengths.max()) if lengths.numel() else 0
    if not isinstance(states, torch.Tensor) or not longest:
        return False
    if mask is None:
        if not bool((lengths != longest).any()):
            return False
        mask = torch.ones(states.shape[0], states.shape[1] - longest, dtype=torch.long, device=states.device)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[-1] + longest != states.shape[1]:
        return False
    lengths = lengths.to(mask.device)
    offsets = _leading_padding(mask, mask.shape[0], mask.device)
    block_mask = _block_mask(lengths, longest, padding_first=False).to(mask.dtype)
    inputs["encoder_attention_mask"] = _arrange_block(torch.cat([block_mask, mask], dim=1), offsets, lengths,
                                                      longest, padding_first=False, sequence_dim=1)
    return True
