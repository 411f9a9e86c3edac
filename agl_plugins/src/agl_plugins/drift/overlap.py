"""Warn when evaluation prompts overlap the prompts a Fisher mask was estimated from (its metadata lists them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from ..prompts import load_records
from ..refusals import normalise

MASK_FILE = "mask.safetensors"


def find_masks(mask: Optional[str], adapter_folders: Sequence[str]) -> list[str]:
    """The --mask path (which must exist) plus any mask.safetensors saved inside an adapter folder."""
    found = []
    if mask is not None:
        found.append(str(mask))
    for folder in adapter_folders:
        candidate = Path(folder).expanduser() / MASK_FILE
        if candidate.is_file() and str(candidate) not in found:
            found.append(str(candidate))
    return found


def _mask_prompts(spec: str, ids: set[str], prompt_sets: dict[str, Any]) -> Optional[set[str]]:
    """Normalised texts of the mask's prompts, reloaded from its data spec; None when the spec cannot be read."""
    try:
        records = load_records(spec, prompt_sets)
    except (ValueError, OSError):
        return None
    return {normalise(r["prompt"]) for r in records if r["id"] in ids}


def overlap_warning(mask_path: str, records: Sequence[dict], prompt_sets: dict[str, Any]) -> Optional[str]:
    """A warning when `records` share prompts with the mask's estimation data, else None.

    Compares normalised prompt text when the mask's data spec can be reloaded, prompt ids otherwise.
    """
    from agl_core.mask import FisherMask

    info = FisherMask.file_info(mask_path)  # ValueError with an actionable message for a bad file
    data = (info.get("metadata") or {}).get("data") or {}
    ids = {str(i) for i in data.get("ids") or []}
    if not ids:
        return None
    spec = str(data.get("spec") or "")
    texts = _mask_prompts(spec, ids, prompt_sets) if spec else None
    if texts is not None:
        shared = [r for r in records if normalise(r["prompt"]) in texts]
        how = "same normalised text"
    else:
        shared = [r for r in records if r["id"] in ids]
        how = f"same id; the mask's data {spec!r} could not be reloaded to compare texts"
    if not shared:
        return None
    shown = ", ".join(r["id"] for r in shared[:5]) + (", ..." if len(shared) > 5 else "")
    return (f"{len(shared)} of {len(records)} evaluation prompts were used to estimate the mask {mask_path} "
            f"({how}: {shown}). A model protected by that mask is being tested on its own training signal; "
            "evaluate on held-out prompts (e.g. builtin:alignment-v1:eval).")
