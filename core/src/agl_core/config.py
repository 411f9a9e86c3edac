"""AGLConfig: every AGL option, declared once, with help text and validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

BUDGETS = ("global", "per_module")
SPLITS = ("soft", "hard")
BASES = ("coordinate", "kfac")
TASK_REGS = ("identity",)
ESTIMATORS = ("token", "example")
KFAC_OUT_WEIGHTS = ("g_diag", "ones")
FORGETTING_TARGETS = ("missing", "all")
# Settings of the forgetting probe: they describe a training run, not a mask, so a mask never records them (a mask's
# identity, which checkpoints record, must not change when probe options are added or set).
PROBE_PREFIX = "forgetting_"

# Fields that decide which coordinates a mask protects; a loaded mask carries its own values.
MASK_FIELDS = ("rho", "budget", "basis", "k_in", "k_out", "kfac_out_weight", "contrastive_delta")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class AGLConfig:
    """Options of the AGL (reconstructed) objective; see DESIGN.md §1 for the formulas."""

    lambda_a: float = _opt(1.0, "λ_A: weight of the Fisher penalty L_A on the alignment-critical part (≥ 0).")
    lambda_t: float = _opt(0.0, "λ_T: weight of the task regulariser L_T = ‖ΔW_T‖² (≥ 0).")
    lambda_nc: float = _opt(0.1, "λ_NC: weight of the collision terms α·E_rie + (1−α)·E_geo (≥ 0).")
    alpha: float = _opt(0.5, "α: mix of the Riemannian overlap E_rie and geodesic separation E_geo, in [0, 1].")
    beta: float = _opt(4.0, "β: strength of the magnitude gate η = 1 + β·σ(|ΔW| − τ) in E_rie (≥ 0).")
    tau: float = _opt(0.01, "τ: magnitude threshold of the gate in E_rie (≥ 0).")
    eps: float = _opt(1e-8, "ε: stabiliser of the E_geo denominator (> 0).")
    rho: float = _opt(0.01, "ρ: fraction of coordinates protected (basis=coordinate), in (0, 1].")
    budget: str = _opt("global", "How the top-ρ support is ranked: 'global' (all modules together) or 'per_module'.", choices=BUDGETS)
    split: str = _opt("soft", "Weights on the support: 'soft' m=F/(F+κ) or 'hard' m=1 (collision terms vanish).", choices=SPLITS)
    basis: str = _opt("coordinate", "'coordinate' (diagonal Fisher, top-ρ coordinates) or 'kfac' (eigen-blocks).", choices=BASES)
    k_in: int = _opt(16, "basis=kfac: number of top input-covariance eigenvectors protected (≥ 1).")
    k_out: str = _opt("16", "basis=kfac: number of top output-gradient eigenvectors (≥ 1), or 'all' (input side only).")
    kfac_out_weight: str = _opt("g_diag", "basis=kfac, k_out=all: output weights from G's diagonal or 'ones'.", choices=KFAC_OUT_WEIGHTS)
    contrastive_delta: float = _opt(1e-3, "basis=kfac with a reference covariance: ridge δ·mean(diag) added to X_ref.")
    task_reg: str = _opt("identity", "Task regulariser metric h: 'identity' (h = 1).", choices=TASK_REGS)
    estimator: str = _opt("token", "Fisher estimator: 'token' (fast) or 'example' (exact per-example).", choices=ESTIMATORS)
    mask_path: Optional[str] = _opt(None, "Path of a saved mask (a mask.safetensors file or a folder holding one).")
    warmup_steps: int = _opt(0, "λ warm-up: the penalty scales linearly from 0 to full over this many steps (≥ 0).")
    adapters: Optional[list[str]] = _opt(None, "LoRA adapter names to cover (default: every active trainable one).")
    target_modules: Optional[list[str]] = _opt(
        None, "Module names to cover: exact names, name suffixes (e.g. 'q_proj') or 're:<regex>' (default: all)."
    )
    enabled: bool = _opt(True, "Master switch: False adds no penalty (e.g. for evaluation or a baseline run).")
    forgetting_data: Optional[str] = _opt(
        None, "Measure the alignment loss during training (forgetting curve, fit with `agl forgetting`): "
        "builtin:alignment-v1 (its eval split) or a .jsonl/.json/.csv/.parquet file with prompt, label (+ response). "
        "Rows go to <output_dir>/agl_forgetting.jsonl. Works with enabled=False and no mask (plain LoRA)."
    )
    forgetting_points: int = _opt(12, "Forgetting probe: measurements per run, step 0 plus log-spaced steps up to the last (≥ 2).")
    forgetting_max_prompts: int = _opt(64, "Forgetting probe: prompts measured, alternating unsafe and safe (≥ 1).")
    forgetting_targets: str = _opt(
        "missing", "Forgetting probe targets: 'missing' (given responses; the base model's greedy answer where none) "
        "or 'all' (the base model's greedy answer for every prompt).", choices=FORGETTING_TARGETS
    )
    forgetting_max_new_tokens: int = _opt(48, "Forgetting probe: greedy tokens generated per target (≥ 1).")

    def __post_init__(self) -> None:
        self.k_out = _parse_k_out(self.k_out)
        self.adapters = _as_list("adapters", self.adapters)
        self.target_modules = _as_list("target_modules", self.target_modules)
        for name in ("lambda_a", "lambda_t", "lambda_nc", "beta", "tau"):
            _check_range(name, getattr(self, name), lo=0.0)
        _check_range("alpha", self.alpha, lo=0.0, hi=1.0)
        _check_range("eps", self.eps, lo=0.0, lo_open=True)
        _check_range("rho", self.rho, lo=0.0, hi=1.0, lo_open=True)
        _check_range("contrastive_delta", self.contrastive_delta, lo=0.0)
        _check_int("k_in", self.k_in, lo=1)
        _check_int("warmup_steps", self.warmup_steps, lo=0)
        _check_int("forgetting_points", self.forgetting_points, lo=2)
        _check_int("forgetting_max_prompts", self.forgetting_max_prompts, lo=1)
        _check_int("forgetting_max_new_tokens", self.forgetting_max_new_tokens, lo=1)
        if self.forgetting_data is not None and (not isinstance(self.forgetting_data, str) or not self.forgetting_data.strip()):
            raise ValueError(f"AGLConfig.forgetting_data={self.forgetting_data!r} is invalid: give a data file path or "
                             "builtin:<set>[:<split>] (e.g. builtin:alignment-v1), or None for no forgetting probe.")
        for name, allowed in (
            ("budget", BUDGETS),
            ("split", SPLITS),
            ("basis", BASES),
            ("task_reg", TASK_REGS),
            ("estimator", ESTIMATORS),
            ("kfac_out_weight", KFAC_OUT_WEIGHTS),
            ("forgetting_targets", FORGETTING_TARGETS),
        ):
            _check_choice(name, getattr(self, name), allowed)
        if not isinstance(self.enabled, bool):
            raise ValueError(f"AGLConfig.enabled={self.enabled!r} is invalid: must be True or False.")

    def lambda_scale(self, step: int) -> float:
        """Warm-up factor for optimizer step `step` (0-based): min(1, (step + 1) / warmup_steps)."""
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (max(step, 0) + 1) / self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def mask_dict(self) -> dict[str, Any]:
        """to_dict() without the forgetting-probe settings: what a saved mask records."""
        return {k: v for k, v in self.to_dict().items() if not k.startswith(PROBE_PREFIX)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AGLConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown AGLConfig option(s) {unknown}; valid options: {sorted(known)}.")
        return cls(**data)

    def mask_settings(self) -> dict[str, Any]:
        """The options that decide which coordinates a mask protects."""
        return {name: getattr(self, name) for name in MASK_FIELDS}


def config_fields() -> list[dataclasses.Field]:
    """The dataclass fields of AGLConfig, for generating CLI / YAML schemas from one declaration."""
    return list(dataclasses.fields(AGLConfig))


def _parse_k_out(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"AGLConfig.k_out={value!r} is invalid: must be an integer ≥ 1 or 'all'.")


def _as_list(name: str, value: Any) -> Optional[list[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value) or not value:
        raise ValueError(
            f"AGLConfig.{name}={value!r} is invalid: must be None or a non-empty list of names (or a comma-separated string)."
        )
    return list(value)


def _check_range(name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = "]" if math.isfinite(hi) else ")"
        raise ValueError(f"AGLConfig.{name}={value!r} is invalid: must be a finite number in {left}{lo}, {hi}{right}.")


def _check_int(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"AGLConfig.{name}={value!r} is invalid: must be an integer ≥ {lo}.")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"AGLConfig.{name}={value!r} is invalid: must be one of {list(allowed)}.")
