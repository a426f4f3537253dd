"""Adapter configurations: one frozen dataclass per method, unions of methods, and presets by name."""

from .base import CONFIG_CLASSES, ROLES, MethodConfig, config_from_dict
from .bottleneck import NON_LINEARITIES, AdapterConfig, BottleneckConfig
from .invertible import InvertibleConfig
from .lora import IA3Config, LoRAConfig
from .prefix import PrefixTuningConfig
from .presets import PRESETS, resolve_config
from .prompt import PromptTuningConfig
from .union import ConfigUnion

__all__ = [
    "CONFIG_CLASSES",
    "NON_LINEARITIES",
    "PRESETS",
    "ROLES",
    "AdapterConfig",
    "BottleneckConfig",
    "ConfigUnion",
    "IA3Config",
    "InvertibleConfig",
    "LoRAConfig",
    "MethodConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "config_from_dict",
    "resolve_config",
]
