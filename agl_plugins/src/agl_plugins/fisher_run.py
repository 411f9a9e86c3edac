"""The work behind `agl fisher`: load the model, build batches, generate targets, estimate, save, report."""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from agl_core.batches import make_batches
from agl_core.config import AGLConfig
from agl_core.fisher import estimate_fisher, estimate_input_covariance, estimate_kfac, select_layers
from agl_core.mask import FisherMask

from .models import load_model_and_tokenizer, pick_device
from .prompts import LABELS
from .report import coverage_report, timings_report


class Timer:
    """Named wall-clock sections, in the order they ran."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.sections: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.sections[name] = self.sections.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.start


def data_provenance(spec: str, records: list[dict]) -> dict[str, Any]:
    """What the mask was estimated from: the spec, every prompt id used, label counts, given targets."""
    counts = {label: sum(1 for r in records if r["label"] == label) for label in LABELS}
    return {"spec": spec, "ids": [r["id"] for r in records], "labels": counts,
            "given_targets": sum(1 for r in records if r["response"])}


def _quiet_transformers() -> None:
    """The CLI shows its own progress bars; transformers' per-load weight bars would only add noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class FisherJob:
    """One `agl fisher` run; `run()` returns the printed report."""

    def __init__(self, args: argparse.Namespace, config: AGLConfig, est_name: str, estimator: Any,
                 records: list[dict], reference: Optional[list[dict]], log: Callable[[str], None]) -> None:
        self.args, self.config, self.log = args, config, log
        self.est_name, self.estimator = est_name, estimator
        self.records, self.reference = records, reference
        self.timer = Timer()
        self.generated_example: Optional[str] = None

    def batches(self, records: list[dict], model: Any, tokenizer: Any) -> Any:
        """Batches whose empty responses are left for the model to answer greedily (make_batches' 'missing')."""
        rows = [{"prompt": r["prompt"], "response": r["response"] or None} for r in records]
        return make_batches(rows, tokenizer, batch_size=self.args.batch_size, max_length=self.args.max_length,
                            model=model, max_new_tokens=self.args.max_new_tokens)

    def fill_targets(self, batches: Any, tokenizer: Any) -> int:
        """Generate the missing targets batch by batch under a progress bar; returns how many were generated."""
        from tqdm.auto import tqdm

        size = batches.batch_size
        todo = [i for i in range(len(batches)) if any(t is None for _, t in batches.examples[i * size:(i + 1) * size])]
        missing = sum(1 for _, t in batches.examples if t is None)
        for i in tqdm(todo, desc="Generating targets", unit="batch", disable=not todo):
            batches[i]  # RecordBatches generates a batch's missing targets on first access and keeps them
        first = next((r for r in self.records if not r["response"]), None)
        if first is not None:
            target = batches.examples[self.records.index(first)][1]
            self.generated_example = tokenizer.decode(target, skip_special_tokens=True).strip()
        return missing

    def estimate(self, model: Any, batches: Any) -> Any:
        common = dict(target_modules=self.config.target_modules, progress=True)
        if self.config.basis == "kfac":
            return estimate_kfac(model, batches, **common)
        return estimate_fisher(model, batches, estimator=self.estimator, **common)

    def metadata(self, generated: int) -> dict[str, Any]:
        data = dict(data_provenance(self.args.data, self.records), generated_targets=generated,
                    max_length=self.args.max_length, max_new_tokens=self.args.max_new_tokens)
        meta = {"estimator": "kfac" if self.config.basis == "kfac" else self.est_name, "data": data,
                "model": self.args.model, "seed": self.args.seed, "created_by": "agl fisher"}
        if self.reference is not None:
            meta["reference_data"] = data_provenance(self.args.reference_data, self.reference)
        return meta

    def run(self) -> str:
        torch.manual_seed(self.args.seed)
        device = pick_device(self.args.device)
        with self.timer("load model"):
            _quiet_transformers()
            model, tokenizer = load_model_and_tokenizer(self.args.model, device=device, progress=self.log)
            select_layers(model, self.config.target_modules)  # fail on a bad --target-modules before any work
        with self.timer("targets"):
            batches = self.batches(self.records, model, tokenizer)
            generated = self.fill_targets(batches, tokenizer)
        with self.timer("fisher"):
            fisher = self.estimate(model, batches)
        ref_cov = None
        if self.reference is not None:
            with self.timer("reference"):
                ref_batches = self._reference_batches(tokenizer)
                ref_cov = estimate_input_covariance(model, ref_batches, target_modules=self.config.target_modules)
        with self.timer("mask"):
            mask = FisherMask.from_fisher(fisher, self.config, reference=ref_cov, model=model,
                                          metadata=self.metadata(generated))
        with self.timer("save"):
            path = mask.save(self.args.out)
        return self.report(mask, path, generated, device)

    def _reference_batches(self, tokenizer: Any) -> Any:
        """Prompts only (forward pass, no targets needed): an empty response keeps make_batches from generating."""
        rows = [{"prompt": r["prompt"], "response": ""} for r in self.reference]
        return make_batches(rows, tokenizer, batch_size=self.args.batch_size, max_length=self.args.max_length)

    def report(self, mask: FisherMask, path: str, generated: int, device: torch.device) -> str:
        cfg = self.config
        settings = f"basis={cfg.basis}, budget={cfg.budget}, estimator={mask.metadata['estimator']}"
        settings += f", rho={cfg.rho}" if cfg.basis == "coordinate" else f", k_in={cfg.k_in}, k_out={cfg.k_out}"
        labels = mask.metadata["data"]["labels"]
        lines = [
            f"Saved mask: {path}",
            f"Model: {self.args.model} on {device} | {settings}",
            f"Data: {self.args.data}: {len(self.records)} examples ({labels['unsafe']} unsafe, {labels['safe']} safe); "
            f"targets: {len(self.records) - generated} given, {generated} generated greedily",
        ]
        if self.generated_example is not None:
            lines.append(f"  e.g. generated target: {self.generated_example[:100]!r}")
        if self.reference is not None:
            lines.append(f"Reference data: {self.args.reference_data}: {len(self.reference)} benign prompts (contrastive basis)")
        coords = {name: shape[0] * shape[1] for name, shape in mask.covered_modules().items()}
        lines += ["", coverage_report(mask.summary(), coords), "", timings_report(self.timer.sections, self.timer.total())]
        return "\n".join(lines)
