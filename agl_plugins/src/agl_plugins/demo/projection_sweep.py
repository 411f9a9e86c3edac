"""Screening experiment behind docs/results.md §'Where the drift goes': project a plain LoRA adapter of the demo off
the top-k input directions of the aligned base's K-FAC input statistics (alignment data; contrastive against benign
prompts, or not) for several k, and measure refusal on held-out unsafe prompts and the held-out task loss.

    python -m agl_plugins.demo.projection_sweep --adapter out/demo/adapters/plain --out out/projection-sweep
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="A plain LoRA adapter of the demo (PEFT folder).")
    parser.add_argument("--out", default="out/projection-sweep")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 16, 64, 192])
    parser.add_argument("--fisher-examples", type=int, default=96)
    parser.add_argument("--max-unsafe", type=int, default=120, help="Held-out unsafe prompts judged (first N).")
    parser.add_argument("--heldout", default="400:460", help="Slice START:END of arithmetic_task(0, 500)'s rows used "
                        "as held-out task rows (400:500 were the held-out rows of the 400-row demo).")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from agl_core.config import AGLConfig
    from agl_core.mask import FisherMask

    from ..models import load_model_and_tokenizer
    from ..project import project_adapter_dir
    from . import align, pipeline
    from .data import arithmetic_task, eval_records
    from .train import ATTN, mean_nll

    out = Path(args.out)
    base = align.ensure_aligned_base()
    model, tok = load_model_and_tokenizer(str(base), progress=lambda s: None)
    stats = pipeline.estimate_stats(model, tok, ATTN, kinds=("contrastive",), max_examples=args.fisher_examples)
    unsafe = [r for r in eval_records() if r["label"] == "unsafe"][: args.max_unsafe]
    lo, hi = (int(x) for x in args.heldout.split(":"))
    held = arithmetic_task(0, hi)["heldout"][lo:hi]

    def judge(adapter: str) -> tuple[float, float]:
        tuned = pipeline.load_adapter(str(base), adapter)
        return pipeline.refusal_rates(tuned, tok, unsafe)["unsafe"], mean_nll(tuned, tok, held)

    results = {"plain": judge(args.adapter)}
    print(f"plain: refusal {results['plain'][0]:.3f}, task loss {results['plain'][1]:.5f}", flush=True)
    kmax = max(args.ks)
    for contrastive in (True, False):
        tag = "contrastive" if contrastive else "top"
        full = FisherMask.load(pipeline.build_mask(stats, AGLConfig(basis="kfac", k_in=kmax, k_out="all"), model,
                                                   out / "masks" / f"{tag}-{kmax}", contrastive=contrastive))
        for k in args.ks:  # the top-k directions are the first k columns (eigenvalues in descending order)
            blocks = {n: replace(b, V=b.V[:, :k].contiguous(), lam=b.lam[:k].contiguous())
                      for n, b in full.blocks.items()}
            mask_dir = out / "masks" / f"{tag}-{k}"
            FisherMask(blocks, replace(full.config, k_in=k), dict(full.metadata)).save(str(mask_dir))
            t0 = time.perf_counter()
            info = project_adapter_dir(args.adapter, mask_dir, out / "adapters" / f"{tag}-{k}", overwrite=True)
            results[f"{tag}-{k}"] = judge(info["out"])
            print(f"{tag} k={k}: refusal {results[f'{tag}-{k}'][0]:.3f}, task loss {results[f'{tag}-{k}'][1]:.5f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    from agl_core.safeio import atomic_write_bytes

    atomic_write_bytes(out / "results.json", json.dumps(results, indent=1).encode("utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
