"""Every method as a preset by name, and ``resolve_config`` for what users pass to ``add_adapter``."""

from __future__ import annotations

from typing import Any

from .base import MethodConfig, config_from_dict
from .bottleneck import BottleneckConfig
from .invertible import InvertibleConfig
from .lora import IA3Config, LoRAConfig
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig
from .union import ConfigUnion

_PFEIFFER = BottleneckConfig(mh_adapter=False, output_adapter=True, reduction_factor=16, non_linearity="relu",
                             original_ln_before=True)
_PARALLEL = BottleneckConfig(mh_adapter=False, output_adapter=True, reduction_factor=2, non_linearity="relu",
                             parallel=True, scaling=4.0, original_ln_before=False, init_weights="zero_up")

PRESETS: dict[str, MethodConfig] = {
    # Houlsby et al. (2019): adapters after attention and after the feed-forward block.
    "houlsby": BottleneckConfig(mh_adapter=True, output_adapter=True, reduction_factor=16,
                                non_linearity="swish", original_ln_before=False),
    # Pfeiffer et al. (2021): one adapter after the feed-forward block, behind the block's layer norm.
    "pfeiffer": _PFEIFFER,
    # He et al. (2022): a scaled parallel adapter beside the feed-forward block.
    "parallel": _PARALLEL,
    # The Pfeiffer placement with convolutions over the sequence as projections.
    "conv": _PFEIFFER.replace(projection="conv", kernel_size=3),
    # Hu et al. (2021): rank 8 on the query and value projections.
    "lora": LoRAConfig(),
    # Liu et al. (2022): rescaled keys, values and feed-forward activations.
    "ia3": IA3Config(),
    # Li and Liang (2021): 30 prefix positions produced by an MLP of width 512.
    "prefix_tuning": PrefixTuningConfig(),
    # Lester et al. (2021): 20 trained virtual-token embeddings before the input.
    "prompt_tuning": PromptTuningConfig(),
    # Karimi Mahabadi et al. (2021): PHM adapters after attention and feed-forward (Houlsby placement).
    "compacter": BottleneckConfig(mh_adapter=True, output_adapter=True, reduction_factor=32, non_linearity="gelu",
                                  original_ln_before=False, phm_layer=True, phm_dim=4),
    # Compacter++: the same PHM adapter after the feed-forward block only (Pfeiffer placement).
    "compacter++": BottleneckConfig(mh_adapter=False, output_adapter=True, reduction_factor=32,
                                    non_linearity="gelu", original_ln_before=True, phm_layer=True, phm_dim=4),
    # He et al. (2022), "mix-and-match": prefix tuning in attention plus a parallel feed-forward adapter.
    "mam": ConfigUnion(PrefixTuningConfig(prefix_length=30, bottleneck_size=512), _PARALLEL),
    # Mao et al. (2022): gated prefix tuning, gated series adapter and gated LoRA.
    "unipelt": ConfigUnion(
        LoRAConfig(r=8, alpha=2, use_gating=True),
        PrefixTuningConfig(prefix_length=10, use_gating=True),
        _PFEIFFER.replace(reduction_factor=16, use_gating=True),
    ),
    # MAD-X language adapters (Pfeiffer et al., 2020): a Pfeiffer adapter plus an invertible embedding adapter.
    "invertible": ConfigUnion(_PFEIFFER.replace(reduction_factor=2), InvertibleConfig()),
}


def resolve_config(config: MethodConfig | str | dict[str, Any] | None) -> MethodConfig:
    """Turn a config object, preset name, dict or ``None`` (the ``"pfeiffer"`` preset) into a config.

    Raises:
        ValueError: For an unknown preset name, listing the known ones.
        TypeError: For any other type.
    """
    if config is None:
        return PRESETS["pfeiffer"]
    if isinstance(config, MethodConfig):
        return config
    if isinstance(config, str):
        preset = PRESETS.get(config.lower())
        if preset is None:
            raise ValueError(f"Unknown adapter preset {config!r}; known presets: {', '.join(PRESETS)}. "
                             "Pass one of them or a config object such as LoRAConfig(r=8)")
        return preset
    if isinstance(config, dict):
        return config_from_dict(config)
    raise TypeError(f"config must be an adapter config, a preset name or a dict, not {type(config).__name__}")
