"""agl_core: the framework-agnostic AlignGuard-LoRA (reconstructed) math on torch tensors."""

from .blocks import CoordinateBlock, KFACBlock
from .config import AGLConfig
from .modules import LoRATarget, find_linear_modules, find_lora_targets

__all__ = [
    "AGLConfig",
    "CoordinateBlock",
    "KFACBlock",
    "LoRATarget",
    "find_linear_modules",
    "find_lora_targets",
]
__version__ = "0.1.0"
