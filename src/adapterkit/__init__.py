"""adapterkit: add adapters to pretrained transformers models, train only them, and share them."""

__version__ = "0.1.0"

from .architectures import (ARCHITECTURES, ArchitectureSpec, FeedForwardShape, InputRef, LinearRef, StackSpec,
                            SublayerSpec, register_architecture)
from .composition import Average, BatchSplit, Fuse, Parallel, Split, Stack
from .config import (PRESETS, AdapterConfig, BottleneckConfig, ConfigUnion, FusionConfig, IA3Config, InvertibleConfig,
                     LoRAConfig, MethodConfig, PrefixTuningConfig, PromptTuningConfig)
from .model import init

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "AdapterConfig",
    "ArchitectureSpec",
    "Average",
    "BatchSplit",
    "BottleneckConfig",
    "ConfigUnion",
    "FeedForwardShape",
    "Fuse",
    "FusionConfig",
    "IA3Config",
    "InputRef",
    "InvertibleConfig",
    "LinearRef",
    "LoRAConfig",
    "MethodConfig",
    "Parallel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "Split",
    "Stack",
    "StackSpec",
    "SublayerSpec",
    "__version__",
    "init",
    "register_architecture",
]
