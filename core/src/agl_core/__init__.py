"""agl_core: the framework-agnostic AlignGuard-LoRA (reconstructed) math on torch tensors."""

from .batches import generate_targets, make_batches
from .blocks import CoordinateBlock, KFACBlock, KFACStats
from .config import AGLConfig
from .estimators import FisherCounts, FisherEstimator, resolve_estimator
from .fingerprint import model_fingerprint
from .fisher import estimate_fisher, estimate_input_covariance, estimate_kfac
from .mask import FisherMask
from .modules import LoRATarget, find_linear_modules, find_lora_targets
from .penalty import AGLPenalty, PenaltyResult
from .safeio import atomic_write

__all__ = [
    "AGLConfig",
    "AGLPenalty",
    "CoordinateBlock",
    "FisherCounts",
    "FisherEstimator",
    "FisherMask",
    "KFACBlock",
    "KFACStats",
    "LoRATarget",
    "PenaltyResult",
    "atomic_write",
    "estimate_fisher",
    "estimate_input_covariance",
    "estimate_kfac",
    "find_linear_modules",
    "find_lora_targets",
    "generate_targets",
    "make_batches",
    "model_fingerprint",
    "resolve_estimator",
]
__version__ = "0.1.0"
