"""Build the modules of each method for one model, and list where each module runs.

A method's modules form one ``nn.ModuleDict`` tree whose keys name where they sit, so a saved
adapter's weight names are readable (``layers.3.feed_forward.down_proj.weight``,
``layers.0.query.0.lora_A``, ``prefix.decoder.mlp.0.weight``). ``placements`` walks a tree and
returns, for each module, the key of the site that runs it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .architectures import ArchitectureSpec, StackSpec, attention_shape, find_base_model, get_layers, get_submodule
from .config import (BottleneckConfig, IA3Config, InvertibleConfig, LoRAConfig, MethodConfig, PrefixTuningConfig,
                     PromptTuningConfig)
from .methods.bottleneck import Bottleneck
from .methods.ia3 import IA3
from .methods.invertible import InvertibleAdapter
from .methods.lora import LoRA
from .methods.phm import PHMRule
from .methods.prefix import PrefixTuning
from .methods.prompt import PromptTuning, input_embeddings, prompt_target


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """Return ``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    weight = getattr(layer, "weight", None)
    if type(layer).__name__ == "Conv1D" and weight is not None:
        return weight.shape[0], weight.shape[1]
    raise TypeError(f"{type(layer).__name__} is not a linear projection; LoRA and (IA)^3 adapt nn.Linear and "
                    "transformers Conv1D layers. Point the architecture description's projections at those")


class ModelLayout:
    """The blocks of one model, numbered across its stacks, with the places its description names.

    Args:
        model: The transformers model.
        spec: Its architecture description.
    """

    def __init__(self, model: nn.Module, spec: ArchitectureSpec):
        self.model = model
        self.spec = spec
        self.family = getattr(model.config, "model_type", "")
        self.hidden_size = self._hidden_size(model.config)
        self.blocks: list[tuple[StackSpec, nn.Module]] = []
        for stack in spec.stacks:
            self.blocks.extend((stack, block) for block in get_layers(model, stack))

    @staticmethod
    def _hidden_size(config: Any) -> int:
        text_config = getattr(config, "text_config", None) or config
        for name in ("hidden_size", "d_model", "n_embd", "dim"):
            value = getattr(text_config, name, None)
            if value:
                return value
        raise ValueError(f"{type(config).__name__} has no hidden_size, d_model, n_embd or dim, so adapterkit "
                         "cannot size the adapters")

    def __len__(self) -> int:
        return len(self.blocks)

    def indices(self, stack: StackSpec) -> list[int]:
        """Return the global indices of the blocks of ``stack``."""
        return [i for i, (s, _) in enumerate(self.blocks) if s is stack]

    def submodule(self, path: str) -> nn.Module:
        """Return the module at ``path`` relative to the model's body (see ``find_base_model``)."""
        return get_submodule(find_base_model(self.model), path, family=self.family)

    def projection(self, index: int, role: str, number: int) -> nn.Module:
        """Return the ``number``-th projection of ``role`` in block ``index``."""
        stack, block = self.blocks[index]
        return get_submodule(block, stack.linear_refs(role)[number].path, family=self.family)

    def prefix_stacks(self, config: PrefixTuningConfig) -> list[tuple[str, StackSpec, list[int]]]:
        """Return ``(key, stack, block indices)`` for each group of attention modules that gets a prefix."""
        groups = []
        for stack in self.spec.stacks:
            blocks = [i for i in self.indices(stack) if i not in config.leave_out]
            is_encoder_self = stack.name == "encoder"
            if blocks and stack.attention_module and (config.encoder_prefix or not is_encoder_self):
                groups.append((stack.name, stack, blocks))
            if blocks and stack.cross_attention_module and config.cross_prefix:
                groups.append(("cross", stack, blocks))
        return groups


# -- checks before anything is built --------------------------------------------------------------

def check_fits(layout: ModelLayout, config: MethodConfig) -> None:
    """Raise ``ValueError`` naming what ``config`` needs that this model or its description lacks."""
    for member in config.methods:
        out_of_range = [i for i in member.leave_out if i >= len(layout)]
        if out_of_range:
            raise ValueError(f"leave_out={list(member.leave_out)} names blocks {out_of_range}, but the model "
                             f"has {len(layout)} blocks (0 to {len(layout) - 1})")
        if isinstance(member, BottleneckConfig):
            _check_bottleneck(layout, member)
        elif isinstance(member, (LoRAConfig, IA3Config)):
            for role in member.targets:
                missing = [s.name for s in layout.spec.stacks if not s.projections.get(role)]
                if missing:
                    raise ValueError(f"targets includes {role!r}, but the {layout.family!r} description lists "
                                     f"no {role!r} projection in the {', '.join(missing)} blocks; remove it from "
                                     "targets or add it to the description's projections")
            if isinstance(member, LoRAConfig):
                _check_lora_patterns(layout, member)
        elif isinstance(member, PrefixTuningConfig):
            if member.shift_positions and layout.spec.position_ids is None:
                raise ValueError(f"shift_positions=True, but the {layout.family!r} description names no position_ids "
                                 "rule (families with relative positions have none); use shift_positions=False")
            if not layout.prefix_stacks(member):
                raise ValueError(f"The {layout.family!r} description names no attention module for prefix tuning "
                                 "in any block that the config keeps; set StackSpec.attention_module")
        elif isinstance(member, InvertibleConfig) and layout.spec.embeddings is None:
            raise ValueError(f"The {layout.family!r} description names no embeddings module for the invertible "
                             "adapter; set ArchitectureSpec.embeddings")
        elif isinstance(member, PromptTuningConfig):
            _check_prompt(layout)


def _check_bottleneck(layout: ModelLayout, config: BottleneckConfig) -> None:
    hidden = layout.hidden_size
    width = config.bottleneck_width(hidden)
    if config.phm_layer and (hidden % config.phm_dim or width % config.phm_dim):
        raise ValueError(f"phm_dim={config.phm_dim} must divide both the hidden size ({hidden}) and the "
                         f"bottleneck width ({width}); choose a phm_dim that divides both or change reduction_factor")
    if config.before_head and layout.spec.final is None:
        raise ValueError(f"before_head=True, but the {layout.family!r} description names no final module; "
                         "set ArchitectureSpec.final")
    if config.cross_adapter and not any(s.cross_attention for s in layout.spec.stacks):
        raise ValueError(f"cross_adapter=True, but {layout.family!r} blocks have no cross-attention; "
                         "it exists only in encoder-decoder models")
    if config.projection == "conv" and config.kernel_size % 2 == 0:
        encoders = [s.name for s in layout.spec.stacks if not s.causal]
        if encoders:
            raise ValueError(f"kernel_size={config.kernel_size} must be odd in the {', '.join(encoders)} blocks, "
                             f"where the convolution is centred; use {config.kernel_size + 1}")


def _check_lora_patterns(layout: ModelLayout, config: LoRAConfig) -> None:
    """Raise ``ValueError`` for ``rank_pattern`` or ``alpha_pattern`` keys that select no projection of this model."""
    projections = [(index, role, number) for index, (stack, _) in enumerate(layout.blocks)
                   if index not in config.leave_out
                   for role in config.targets for number in range(len(stack.linear_refs(role)))]
    unmatched = config.unmatched_pattern_keys(projections)
    if unmatched:
        counts = ", ".join(f"{role}: {max(len(stack.linear_refs(role)) for stack in layout.spec.stacks)}"
                           for role in config.targets)
        raise ValueError(f"rank_pattern or alpha_pattern keys {unmatched} select no projection of this "
                         f"{layout.family!r} model, which has {len(layout)} blocks (0 to {len(layout) - 1}) and at "
                         f"most this many projections per block and role ({counts}). Fix the block indices or "
                         "projection numbers of those keys")


def _check_prompt(layout: ModelLayout) -> None:
    target = prompt_target(layout.model)
    input_embeddings(target)
    if "inputs_embeds" not in inspect.signature(target.forward).parameters:
        raise ValueError(f"{type(target).__name__}.forward takes no inputs_embeds, through which prompt tuning "
                         "passes the prompt; this model cannot use prompt tuning")


# -- building -------------------------------------------------------------------------------------

def build(layout: ModelLayout, config: MethodConfig) -> nn.ModuleDict:
    """Return the freshly initialised modules of one single-method ``config``."""
    if isinstance(config, BottleneckConfig):
        return _build_bottleneck(layout, config)
    if isinstance(config, (LoRAConfig, IA3Config)):
        return _build_projections(layout, config)
    if isinstance(config, PrefixTuningConfig):
        return _build_prefix(layout, config)
    if isinstance(config, PromptTuningConfig):
        return _build_prompt(layout, config)
    if isinstance(config, InvertibleConfig):
        return nn.ModuleDict({"invertible": InvertibleAdapter(layout.hidden_size, block_type=config.block_type,
                                                              reduction_factor=config.reduction_factor,
                                                              non_linearity=config.non_linearity)})
    raise TypeError(f"adapterkit cannot build a {type(config).__name__}")


def _build_bottleneck(layout: ModelLayout, config: BottleneckConfig) -> nn.ModuleDict:
    tree = nn.ModuleDict()
    rule = None
    if config.phm_layer and config.shared_phm_rule:
        rule = PHMRule(config.phm_dim, factorized=config.factorized_phm_rule, rank=config.phm_rank,
                       init_range=config.phm_init_range, learn=config.learn_phm)
        tree["phm_rule"] = rule

    def new(causal: bool) -> Bottleneck:
        return Bottleneck(layout.hidden_size, config, causal=causal, shared_rule=rule)

    layers = nn.ModuleDict()
    for index, (stack, _) in enumerate(layout.blocks):
        if index in config.leave_out:
            continue
        places = nn.ModuleDict()
        if config.mh_adapter:
            places["attention"] = new(stack.causal)
        if config.cross_adapter and stack.cross_attention is not None:
            places["cross_attention"] = new(stack.causal)
        if config.output_adapter:
            places["feed_forward"] = new(stack.causal)
        if len(places):
            layers[str(index)] = places
    tree["layers"] = layers
    if config.before_head:
        tree["before_head"] = new(layout.spec.stacks[-1].causal)
    return tree


def _build_projections(layout: ModelLayout, config: LoRAConfig | IA3Config) -> nn.ModuleDict:
    layers = nn.ModuleDict()
    for index, (stack, _) in enumerate(layout.blocks):
        if index in config.leave_out:
            continue
        roles = nn.ModuleDict()
        for role in config.targets:
            modules = nn.ModuleList()
            for number, reference in enumerate(stack.linear_refs(role)):
                in_features, out_features = linear_shape(layout.projection(index, role, number))
                out_features //= reference.parts
                if isinstance(config, LoRAConfig):
                    modules.append(LoRA(in_features, out_features, config.rank_for(index, role, number),
                                        config.alpha_for(index, role, number), dropout=config.dropout,
                                        init_weights=config.init_weights, use_gating=config.use_gating))
                else:
                    scales_input = role == "ff_out" and config.ff_out_side == "input"
                    modules.append(IA3(in_features if scales_input else out_features,
                                       init_weights=config.init_weights))
            roles[role] = modules
        layers[str(index)] = roles
    return nn.ModuleDict({"layers": layers})


def _build_prefix(layout: ModelLayout, config: PrefixTuningConfig) -> nn.ModuleDict:
    kv_heads, head_dim = attention_shape(layout.model.config)
    prefixes = nn.ModuleDict()
    for key, stack, blocks in layout.prefix_stacks(config):
        prefixes[key] = PrefixTuning(len(blocks), kv_heads, head_dim, layout.hidden_size,
                                     prefix_length=config.prefix_length, bottleneck_size=config.bottleneck_size,
                                     non_linearity=config.non_linearity, dropout=config.dropout, flat=config.flat,
                                     use_gating=config.use_gating, gate_from_input=not stack.causal)
    return nn.ModuleDict({"prefix": prefixes})


def _build_prompt(layout: ModelLayout, config: PromptTuningConfig) -> nn.ModuleDict:
    embeddings = input_embeddings(prompt_target(layout.model))
    module = PromptTuning(config.prompt_length, embeddings.weight.shape[1])
    module.reset_parameters(config.init, embeddings)
    return nn.ModuleDict({"prompt": module})


# -- where each module runs -----------------------------------------------------------------------

def placements(layout: ModelLayout, config: MethodConfig, tree: nn.ModuleDict) -> list[tuple[tuple, Any]]:
    """Return ``(site key, payload)`` for every module in ``tree``, the modules of ``config``.

    The payload is the module itself, except for prefix tuning, where it is ``(PrefixTuning, row)``
    with the row of that block in the module's output.
    """
    found: list[tuple[tuple, Any]] = []
    if isinstance(config, BottleneckConfig):
        for index, places in tree["layers"].items():
            found.extend((("sublayer", int(index), sublayer), module) for sublayer, module in places.items())
        if "before_head" in tree:
            found.append((("final",), tree["before_head"]))
    elif isinstance(config, (LoRAConfig, IA3Config)):
        for index, roles in tree["layers"].items():
            for role, modules in roles.items():
                found.extend((("linear", int(index), role, number), module) for number, module in enumerate(modules))
    elif isinstance(config, PrefixTuningConfig):
        for key, _, blocks in layout.prefix_stacks(config):
            kind = "cross" if key == "cross" else "self"
            found.extend((("prefix", index, kind), (tree["prefix"][key], row)) for row, index in enumerate(blocks))
        if config.shift_positions:
            found.append((("positions",), config.prefix_length))
    elif isinstance(config, PromptTuningConfig):
        found.append((("prompt",), tree["prompt"]))
    elif isinstance(config, InvertibleConfig):
        found.append((("embeddings",), tree["invertible"]))
        if layout.spec.final is not None and config.invert_output:
            found.append((("final",), tree["invertible"]))
    return found
