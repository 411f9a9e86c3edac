"""Percentile bootstrap over prompts, paired across models: means, differences (drift) and drift reduction."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are computed: `resamples` draws of the prompts (with replacement), fixed `seed`."""

    resamples: int = RESAMPLES
    seed: int = SEED
    confidence: float = CONFIDENCE

    def __post_init__(self) -> None:
        if not isinstance(self.resamples, int) or self.resamples < 10:
            raise ValueError(f"resamples={self.resamples!r} is invalid: use an integer ≥ 10 (1000 is usual).")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence={self.confidence!r} is invalid: use a value in [0.5, 1), e.g. 0.95.")

    def draws(self, n: int, group: str) -> np.ndarray:
        """(resamples, n) prompt indices for one group; the same for every model (paired) and independent of
        which other groups exist (the group name seeds it)."""
        salt = int(hashlib.sha256(group.encode("utf-8")).hexdigest()[:8], 16)
        rng = np.random.default_rng([self.seed, salt])
        return rng.integers(0, n, size=(self.resamples, n))

    def interval(self, samples: np.ndarray) -> tuple[Optional[float], Optional[float]]:
        """Percentile interval of the finite samples (last axis), or (None, None) when there are none."""
        finite = samples[np.isfinite(samples)]
        if finite.size == 0:
            return None, None
        tail = (1.0 - self.confidence) / 2.0
        low, high = np.quantile(finite, [tail, 1.0 - tail])
        return float(low), float(high)


def resampled_means(values: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """values (M, n) per model and prompt, draws (R, n) → (M, R) mean of each resample."""
    return values[:, draws].mean(axis=-1)


def ratio_reduction(d_agl: float, d_plain: float) -> Optional[float]:
    """1 − d_agl / d_plain, or None when plain LoRA did not drift (d_plain = 0)."""
    if d_plain == 0 or not math.isfinite(d_plain):
        return None
    return 1.0 - d_agl / d_plain


def reduction_samples(boot_agl: np.ndarray, boot_plain: np.ndarray) -> tuple[np.ndarray, int]:
    """Resampled 1 − d_agl/d_plain (R,), NaN where d_plain = 0, and how many resamples were undefined."""
    undefined = boot_plain == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = 1.0 - boot_agl / np.where(undefined, np.nan, boot_plain)
    return samples, int(undefined.sum())
