"""Adapter placement for each model family, as data.

A transformer block has two sublayers, attention and feed-forward. For each, adapterkit needs three
places, given as module paths relative to one block:

- ``output``: the module whose output is the sublayer output, after its dropout and before the
  block adds the residual stream. Adapters in series transform this output.
- ``residual``: a module whose input is the residual stream that the block adds to the sublayer
  output, with the position and keyword of that input. Parallel adapters read it.
- ``layer_norm``: the layer norm that post-norm blocks (BERT) apply to ``output + residual``;
  ``None`` for pre-norm blocks (GPT-2, Llama), which add the two and normalise later.

Supporting a new family is one ``ArchitectureSpec`` passed to ``register_architecture`` (or to
``adapterkit.init(model, architecture=...)``) and needs no copied ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class InputRef:
    """An input of a module: its path in the block, and its position and keyword in ``forward``."""

    module: str
    position: int = 0
    keyword: str = "hidden_states"


@dataclass(frozen=True)
class SublayerSpec:
    """The places of one sublayer (attention or feed-forward) inside a block."""

    output: str
    residual: InputRef
    layer_norm: str | None


@dataclass(frozen=True)
class ArchitectureSpec:
    """Placement of the blocks of one model family and of the two sublayers inside each block.

    Attributes:
        layers: Path of the ``nn.ModuleList`` of blocks, relative to ``model.base_model``.
        attention: Places of the attention sublayer.
        feed_forward: Places of the feed-forward sublayer.
    """

    layers: str
    attention: SublayerSpec
    feed_forward: SublayerSpec


def _bert_like(layers: str) -> ArchitectureSpec:
    return ArchitectureSpec(
        layers=layers,
        attention=SublayerSpec(
            output="attention.output.dropout",
            residual=InputRef("attention.output", 1, "input_tensor"),
            layer_norm="attention.output.LayerNorm",
        ),
        feed_forward=SublayerSpec(
            output="output.dropout",
            residual=InputRef("output", 1, "input_tensor"),
            layer_norm="output.LayerNorm",
        ),
    )


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "bert": _bert_like("encoder.layer"),
    "roberta": _bert_like("encoder.layer"),
    "distilbert": ArchitectureSpec(
        layers="transformer.layer",
        attention=SublayerSpec(
            output="attention.out_lin",
            residual=InputRef("", 0, "hidden_states"),
            layer_norm="sa_layer_norm",
        ),
        feed_forward=SublayerSpec(
            output="ffn.dropout",
            residual=InputRef("ffn", 0, "input"),
            layer_norm="output_layer_norm",
        ),
    ),
    "mpnet": ArchitectureSpec(
        layers="encoder.layer",
        attention=SublayerSpec(
            output="attention.dropout",
            residual=InputRef("attention", 0, "hidden_states"),
            layer_norm="attention.LayerNorm",
        ),
        feed_forward=SublayerSpec(
            output="output.dropout",
            residual=InputRef("output", 1, "input_tensor"),
            layer_norm="output.LayerNorm",
        ),
    ),
    "gpt2": ArchitectureSpec(
        layers="h",
        attention=SublayerSpec(output="attn.resid_dropout", residual=InputRef("ln_1"), layer_norm=None),
        feed_forward=SublayerSpec(output="mlp.dropout", residual=InputRef("ln_2"), layer_norm=None),
    ),
    "llama": ArchitectureSpec(
        layers="layers",
        attention=SublayerSpec(output="self_attn.o_proj", residual=InputRef("input_layernorm"), layer_norm=None),
        feed_forward=SublayerSpec(
            output="mlp.down_proj", residual=InputRef("post_attention_layernorm"), layer_norm=None
        ),
    ),
}

_HOW_TO_DESCRIBE = (
    "Describe it with adapterkit.ArchitectureSpec(layers=..., attention=SublayerSpec(...), "
    "feed_forward=SublayerSpec(...)) and pass it as adapterkit.init(model, architecture=spec), "
    "or register it once with adapterkit.register_architecture(model_type, spec)"
)


def register_architecture(model_type: str, spec: ArchitectureSpec) -> None:
    """Make ``spec`` the description used for every model whose ``config.model_type`` is ``model_type``."""
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"spec must be an ArchitectureSpec, not {type(spec).__name__}")
    ARCHITECTURES[model_type] = spec


def find_architecture(model: nn.Module) -> ArchitectureSpec:
    """Return the spec for ``model`` by its ``config.model_type``.

    Raises:
        NotImplementedError: For a family with no spec, listing the known families and how to add one.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise NotImplementedError(
            f"adapterkit has no description of model_type={model_type!r}; known families: "
            f"{', '.join(sorted(ARCHITECTURES))}. {_HOW_TO_DESCRIBE}"
        )
    return spec


def get_submodule(root: nn.Module, path: str, *, family: str = "") -> nn.Module:
    """Return ``root``'s submodule at dotted ``path`` (``""`` is ``root`` itself).

    Raises:
        ValueError: If the path does not exist, naming the path and the children that do.
    """
    try:
        return root.get_submodule(path)
    except AttributeError as error:
        children = ", ".join(name for name, _ in root.named_children())
        raise ValueError(
            f"The architecture description{f' for {family!r}' if family else ''} names module {path!r}, "
            f"which {type(root).__name__} does not have (its children: {children}). "
            f"The installed transformers version may lay the model out differently. {_HOW_TO_DESCRIBE}"
        ) from error


def get_layers(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    """Return the blocks of ``model`` as the spec places them."""
    family = getattr(model.config, "model_type", "")
    layers = get_submodule(model.base_model, spec.layers, family=family)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{spec.layers!r} in {type(model.base_model).__name__} is a {type(layers).__name__}, "
                         f"not the nn.ModuleList of blocks. {_HOW_TO_DESCRIBE}")
    return layers
