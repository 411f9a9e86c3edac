"""The plugin's mask: the one at mask_path, or one estimated with Axolotl's model and tokenizer, reused when it fits."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
from agl_core.config import MASK_FIELDS, AGLConfig
from agl_core.mask import FisherMask
from agl_core.maskio import resolve_path

MASK_DIR = "agl_mask"
CREATOR = "agl_axolotl"  # metadata key of masks this plugin estimated (and may therefore re-estimate)
RECIPE_FISHER_OPTIONS = ("alignment_dataset", "reference_dataset", "max_examples", "max_length", "max_new_tokens")

Log = Callable[[str], None]


@dataclass
class MaskPlan:
    """What to do with the mask file at `path`: 'use' (someone else's mask), 'reuse' (ours, fits) or 'estimate'."""

    path: Path
    action: str
    reason: str


def mask_file(mask_path: Optional[str], output_dir: Any) -> Path:
    """The mask file: `mask_path` (a *.safetensors file or a folder holding mask.safetensors), else
    <output_dir>/agl_mask/mask.safetensors."""
    if mask_path:
        return resolve_path(mask_path, for_write=False)
    if not output_dir:
        raise ValueError("AGLPlugin needs output_dir (where it keeps the estimated mask) or agl.mask_path.")
    return resolve_path(Path(str(output_dir)) / MASK_DIR, for_write=False)


def records_digest(records: list[dict]) -> str:
    """sha256 of the alignment records used (prompt, label, response): a changed data file gives a new mask."""
    rows = [[r["id"], r["prompt"], r["label"], r["response"]] for r in records]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def mask_recipe(config: AGLConfig, fisher: dict[str, Any], records: list[dict]) -> dict[str, Any]:
    """Everything that decides an estimated mask besides the base model (whose fingerprint the mask holds)."""
    recipe = {name: getattr(config, name) for name in MASK_FIELDS + ("estimator", "target_modules")}
    recipe.update({name: fisher[name] for name in RECIPE_FISHER_OPTIONS})
    recipe["data_sha256"] = records_digest(records)
    return json.loads(json.dumps(recipe))  # the JSON form the mask file stores (tuples → lists)


def plan_mask(path: Path, recipe: dict[str, Any], model: torch.nn.Module) -> MaskPlan:
    """Decide whether the file at `path` can be used as is, reused, or must be (re-)estimated, and why."""
    if not path.is_file():
        return MaskPlan(path, "estimate", f"no mask at {path}")
    try:
        ours = (FisherMask.file_info(path).get("metadata") or {}).get(CREATOR)
    except ValueError as err:
        return MaskPlan(path, "estimate", f"the file at {path} is not a usable mask ({err})")
    if not isinstance(ours, dict):
        return MaskPlan(path, "use", f"using the mask at {path} as given (not estimated by AGLPlugin)")
    saved = ours.get("recipe") or {}
    changed = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} → {recipe.get(k)!r}" for k in changed[:4])
        return MaskPlan(path, "estimate", f"the mask at {path} was estimated with other settings ({shown})")
    try:
        FisherMask.load(path).check_model(model)
    except ValueError as err:
        return MaskPlan(path, "estimate", f"the mask at {path} does not fit this base model ({err})")
    return MaskPlan(path, "reuse", f"reusing the mask at {path}: base-model fingerprint and settings match")


def training_config(config: AGLConfig, plan: MaskPlan, warn: Log = print) -> AGLConfig:
    """The AGLConfig the callback trains with: `config` with mask_path = the plan's file.

    A mask not estimated here keeps its own mask settings (rho, basis, ...): they describe what it protects;
    differing `agl:` values are reported through `warn`, not applied.
    """
    config = dataclasses.replace(config, mask_path=str(plan.path))
    if plan.action != "use":
        return config
    try:
        saved = AGLConfig.from_dict(FisherMask.file_info(plan.path)["config"])
    except (ValueError, KeyError, TypeError):
        return config  # unreadable: the callback's start-up check says what is wrong with the file
    differ = [f"{k}: agl {getattr(config, k)!r}, mask {getattr(saved, k)!r}" for k in MASK_FIELDS
              if getattr(config, k) != getattr(saved, k)]
    if differ:
        warn(f"AGL: the mask at {plan.path} keeps its own settings ({'; '.join(differ)}); re-create it to change "
             "them, or drop agl.mask_path to let the plugin estimate one.")
    return dataclasses.replace(config, **{k: getattr(saved, k) for k in MASK_FIELDS})


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _job(config: AGLConfig, fisher: dict[str, Any], records: list[dict], reference: Optional[list[dict]],
         model_name: str, log: Log) -> Any:
    from agl_plugins.fisher_run import FisherJob
    from agl_plugins.manager import available_estimators

    args = SimpleNamespace(data=fisher["alignment_dataset"], reference_data=fisher["reference_dataset"],
                           batch_size=fisher["batch_size"], max_length=fisher["max_length"],
                           max_new_tokens=fisher["max_new_tokens"], model=model_name, seed=None)
    estimators = available_estimators()
    return FisherJob(args, config, config.estimator, estimators[config.estimator], records, reference, log)


def estimate_mask(model: torch.nn.Module, tokenizer: Any, config: AGLConfig, fisher: dict[str, Any],
                  records: list[dict], reference: Optional[list[dict]], recipe: dict[str, Any],
                  model_name: str, log: Log) -> FisherMask:
    """The alignment Fisher of the base model (adapters off, agl_core's doing) on `records` → FisherMask."""
    from agl_core.batches import make_batches
    from agl_core.fisher import estimate_input_covariance

    if tokenizer is None:
        raise ValueError("AGLPlugin needs the trainer's tokenizer (processing_class) to estimate the mask and found "
                         "none; set agl.mask_path to a mask made by `agl fisher` instead.")
    job = _job(config, fisher, records, reference, model_name, log)
    batches = job.batches(records, model, tokenizer)
    generated = job.fill_targets(batches, tokenizer)
    stats = job.estimate(model, batches)
    ref_cov = None
    if reference is not None:
        rows = [{"prompt": r["prompt"], "response": ""} for r in reference]
        ref_batches = make_batches(rows, tokenizer, batch_size=fisher["batch_size"], max_length=fisher["max_length"])
        ref_cov = estimate_input_covariance(model, ref_batches, target_modules=config.target_modules)
    metadata = job.metadata(generated)
    metadata.pop("seed", None)
    metadata.update(created_by=CREATOR, model=model_name, **{CREATOR: {"recipe": recipe}})
    return FisherMask.from_fisher(stats, config, reference=ref_cov, model=model, metadata=metadata)


def alignment_records(config: AGLConfig, fisher: dict[str, Any]) -> tuple[list[dict], Optional[list[dict]]]:
    """The alignment records (and reference records, basis=kfac) the Fisher options select."""
    from agl_plugins.cli_fisher import fisher_records, reference_records
    from agl_plugins.manager import available_prompt_sets

    sets = available_prompt_sets()
    records = fisher_records(fisher["alignment_dataset"], sets, fisher["max_examples"])
    reference = reference_records(fisher["reference_dataset"], sets, config, fisher["max_examples"])
    return records, reference


def ensure_mask(model: torch.nn.Module, tokenizer: Any, config: AGLConfig, fisher: dict[str, Any], *,
                output_dir: Any, model_name: str = "", log: Log = print) -> MaskPlan:
    """The mask to train with: config.mask_path as given, or estimated (and saved) when missing or stale.

    fisher: the Fisher options (alignment_dataset, reference_dataset, max_examples, batch_size, max_length,
    max_new_tokens). Under torch.distributed every rank estimates its shard (agl_core all-reduces), rank 0
    saves, and all ranks wait for the file. Returns the plan that was carried out.
    """
    path = mask_file(config.mask_path, output_dir)
    plan = given_mask(path, user_given=bool(config.mask_path), can_estimate=bool(fisher.get("alignment_dataset")))
    if plan is not None:
        log(f"AGL: {plan.reason}.")
        return plan
    if not fisher.get("alignment_dataset"):
        raise ValueError(f"AGLPlugin found no mask at agl.mask_path ({path}). Correct the path, create the mask with "
                         "`agl fisher`, or set agl.alignment_dataset (e.g. builtin:alignment-v1) to estimate it there.")
    records, reference = alignment_records(config, fisher)
    recipe = mask_recipe(config, fisher, records)
    plan = plan_mask(path, recipe, model)
    if plan.action != "estimate":
        log(f"AGL: {plan.reason}.")
        return plan
    log(f"AGL: {plan.reason}; estimating the alignment Fisher mask from {fisher['alignment_dataset']} "
        f"({len(records)} examples) on the base model (adapters off).")
    mask = estimate_mask(model, tokenizer, config, fisher, records, reference, recipe, model_name, log)
    rank, world = _dist()
    if rank == 0:
        saved = mask.save(path)
        log(f"AGL: saved the mask to {saved} (|S| = {sum(b.size for b in mask.blocks.values()):,} in "
            f"{len(mask.blocks)} modules); later runs reuse it while the base model and settings match.")
    if world > 1:
        torch.distributed.barrier()
    return plan


def given_mask(path: Path, user_given: bool, can_estimate: bool = True) -> Optional[MaskPlan]:
    """A 'use' plan for a file this plugin must take as it is: a mask it did not estimate, any mask when no
    alignment dataset is given, or an unreadable file the user named in agl.mask_path (the callback then says what
    is wrong with it); None when the file is missing or may be (re-)estimated."""
    if not path.is_file():
        return None
    try:
        ours = isinstance((FisherMask.file_info(path).get("metadata") or {}).get(CREATOR), dict)
    except ValueError:
        ours = not user_given  # a damaged file in our own folder is re-estimated
    if ours and can_estimate:
        return None
    why = "not estimated by AGLPlugin" if not ours else "agl.alignment_dataset not set, so it is not re-checked"
    return MaskPlan(path, "use", f"using the mask at {path} as given ({why})")
