"""adapterkit: add adapters to pretrained transformers models, train only them, and share them."""

__version__ = "0.1.0"

from .architectures import ARCHITECTURES, ArchitectureSpec, InputRef, SublayerSpec, register_architecture
from .config import PRESETS, AdapterConfig, BottleneckConfig
from .model import init

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "AdapterConfig",
    "ArchitectureSpec",
    "BottleneckConfig",
    "InputRef",
    "SublayerSpec",
    "__version__",
    "init",
    "register_architecture",
]
