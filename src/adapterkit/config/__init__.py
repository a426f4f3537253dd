"""Adapter configurations: one frozen dataclass per method, unions of methods, and presets by name."""

from .base import CONFIG_CLASSES, ROLES, MethodConfig, config_from_dict
from .bottleneck import NON_LINEARITIES, AdapterConfig, BottleneckConfig
from .fusion import FUSION_PRESETS, FusionConfig, resolve_fusion_config
from .invertible import InvertibleConfig
from .lora import IA3Config, LoRAConfig
from .prefix import PrefixTuningConfig
from .presets import PRESETS, resolve_config
from .prompt import PromptTuningConfig
from .union import ConfigUnion

__all__ = [
    "CONFIG_CLASSES",
    "FUSION_PRESETS",
    "NON_LINEARITIES",
    "PRESETS",
    "ROLES",
    "AdapterConfig",
    "BottleneckConfig",
    "ConfigUnion",
    "FusionConfig",
    "IA3Config",
    "InvertibleConfig",
    "LoRAConfig",
    "MethodConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "config_from_dict",
    "resolve_fusion_config",
    "resolve_config",
]
