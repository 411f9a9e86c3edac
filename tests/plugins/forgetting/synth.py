"""Synthetic forgetting runs: per-prompt NLL curves following a known law, with prompt effects and noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from agl_plugins.forgetting.probe import log_schedule, summarize
from agl_plugins.forgetting.recorder import FORGET_FILE, ROW_FORMAT, ROW_VERSION


def synth_nll(A, beta, E=0.0, L0=2.0, steps=None, prompts=40, noise=0.01, spread=0.3, slope_spread=0.3, seed=0):
    """(steps, nll (S, P), labels): prompt j follows L0_j + A_j·D^β + E (step > 0) + noise; the prompt means of
    L0_j and A_j are exactly L0 and A, so the population curve is the law itself."""
    steps = np.asarray(steps if steps is not None else log_schedule(500, 12))
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, spread, prompts)
    offsets -= offsets.mean()
    slopes = 1.0 + rng.normal(0.0, slope_spread, prompts)
    slopes /= slopes.mean()
    D = steps.astype(float)
    law = np.where(D > 0, A * np.where(D > 0, D, 1.0) ** beta + E, 0.0)  # (S,)
    nll = L0 + offsets[None, :] + law[:, None] * slopes[None, :] + rng.normal(0.0, noise, (len(D), prompts))
    labels = ["unsafe" if j % 2 == 0 else "safe" for j in range(prompts)]
    return steps, nll, labels


def write_run(folder, steps, nll, labels, agl_enabled=False, tokens_per_step=None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"p{j}" for j in range(nll.shape[1])]
    with open(folder / FORGET_FILE, "w") as fh:
        for step, row in zip(steps, nll):
            tokens = int(step) * tokens_per_step if tokens_per_step and step else None
            fh.write(json.dumps({"format": ROW_FORMAT, "version": ROW_VERSION, "step": int(step), "epoch": None,
                                 "tokens_seen": tokens, "data": "synthetic", "max_steps": int(steps[-1]),
                                 "agl_enabled": agl_enabled, **summarize(labels, row), "ids": ids, "labels": labels,
                                 "prompt_nll": [float(v) for v in row]}) + "\n")
    return folder
