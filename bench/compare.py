"""Before / after of the penalty: an older agl_core (a git revision) against the working tree's, interleaved.

Both versions are loaded into one process (the old package under the name `agl_core_before`, extracted with
`git archive <rev> core/src/agl_core`), bound to the same random LoRA factors, and timed alternately
(old, new, old, new, ...), so both sides of every ratio see the same machine load. Each setting prints the
two medians, ns per protected coordinate, the ratio, and how far the two versions' terms differ.
Run: python -m bench.compare --rev 7d42d44 [--threads 1] [--repeats 7] [--settings qkvo-1,...]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from bench.common import bare_model, machine, smollm2_shapes, sync, time_once

SETTINGS = {  # name: (description, shapes kind, r, ρ or "kfac")
    "qkvo-1": ("SmolLM2 r=8 q,k,v,o ρ=1 %", "smollm-qkvo", 8, 0.01),
    "qkvo-10": ("SmolLM2 r=8 q,k,v,o ρ=10 %", "smollm-qkvo", 8, 0.10),
    "all-1": ("SmolLM2 r=8 all linear ρ=1 %", "smollm-all", 8, 0.01),
    "all-1-r4": ("SmolLM2 r=4 all linear ρ=1 %", "smollm-all", 4, 0.01),
    "all-10": ("SmolLM2 r=8 all linear ρ=10 %", "smollm-all", 8, 0.10),
    "all-1-r64": ("SmolLM2 r=64 all linear ρ=1 %", "smollm-all", 64, 0.01),
    "all-10-r64": ("SmolLM2 r=64 all linear ρ=10 %", "smollm-all", 64, 0.10),
    "kfac-qkvo": ("SmolLM2 r=8 q,k,v,o K-FAC k_in=4 k_out=all", "smollm-qkvo", 8, "kfac"),
    "kfac-all": ("SmolLM2 r=8 all linear K-FAC k_in=4 k_out=all", "smollm-all", 8, "kfac"),
    "4096-1": ("one 4096x4096 module r=16 ρ=1 %", "4096", 16, 0.01),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="git revision of the 'before' agl_core (e.g. 7d42d44)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per version and setting (after one warm-up)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    return p.parse_args()


def load_before(rev: str, root: str):
    """Import agl_core of git revision `rev` as the package `agl_core_before` (it uses relative imports only)."""
    tar = subprocess.run(["git", "archive", rev, "core/src/agl_core"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", root], input=tar, check=True)
    os.rename(os.path.join(root, "core/src/agl_core"), os.path.join(root, "agl_core_before"))
    sys.path.insert(0, root)
    return importlib.import_module("agl_core_before")


def shapes_for(kind: str) -> dict[str, tuple[int, int]]:
    if kind == "4096":
        return {"proj": (4096, 4096)}
    return smollm2_shapes(attention_only=kind != "smollm-all")


def mask_for(pkg, shapes, rho, seed=0):
    """The same random mask built from `pkg`'s own classes (each version checks its own block types)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = {}
    for name, (out_f, in_f) in shapes.items():
        if rho == "kfac":
            V = torch.linalg.qr(torch.randn(in_f, 4, generator=gen, dtype=torch.float64)).Q.float()
            mu, lam = torch.rand(out_f, generator=gen) + 0.1, torch.rand(4, generator=gen) * 3 + 0.05
            blocks[name] = pkg.KFACBlock((out_f, in_f), None, V, mu, lam, 0.9, 0.005)
        else:
            index = torch.randint(0, out_f * in_f, (max(1, int(rho * out_f * in_f)),), generator=gen).unique()
            fisher = torch.rand(index.numel(), generator=gen) + 0.05
            blocks[name] = pkg.CoordinateBlock((out_f, in_f), index.to(torch.int32), fisher, 0.55, 0.05)
    kw = dict(basis="kfac", k_in=4, k_out="all") if rho == "kfac" else dict(rho=rho)
    cfg = pkg.AGLConfig(**kw, lambda_t=0.1, lambda_nc=0.1)
    return pkg.FisherMask(blocks=blocks, config=cfg), cfg


def run_setting(name, before, after, device, repeats):
    desc, kind, r, rho = SETTINGS[name]
    shapes = shapes_for(kind)
    model = bare_model(shapes, r, device)
    params = [p for p in model.parameters() if p.requires_grad]
    calls, totals = {}, {}
    for label, pkg in (("before", before), ("after", after)):
        mask, cfg = mask_for(pkg, shapes, rho)
        pen = pkg.AGLPenalty(model, mask, cfg, check_fingerprint=False)
        calls[label] = lambda pen=pen: torch.autograd.grad(pen().total, params)
        res = pen()
        totals[label] = torch.stack([res.L_A, res.L_T, res.E_rie, res.E_geo]).detach().double().cpu()
        size = pen.num_protected
    for fn in calls.values():  # warm-up
        fn()
    sync(device)
    times = {"before": [], "after": []}
    for _ in range(repeats):
        for label in ("before", "after"):
            times[label].append(time_once(calls[label], device))
    tb, ta = statistics.median(times["before"]), statistics.median(times["after"])
    diff = float(((totals["before"] - totals["after"]).abs() / totals["before"].abs().clamp(min=1e-300)).max())
    print(f"{desc:<46s} |S|={size:>11,d}: before {tb * 1e3:8.1f} ms ({tb * 1e9 / size:6.1f} ns/coordinate), "
          f"after {ta * 1e3:8.1f} ms ({ta * 1e9 / size:6.1f} ns/coordinate), before/after {tb / ta:5.2f}x; "
          f"terms (L_A, L_T, E_rie, E_geo) differ by ≤ {diff:.1e} relative; load {os.getloadavg()[0]:.1f}", flush=True)
    return tb, ta


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    import agl_core

    with tempfile.TemporaryDirectory() as root:
        before = load_before(args.rev, root)
        print(f"# bench.compare: agl_core at {args.rev} (before) vs the working tree (after) on {machine(device)}; "
              f"penalty + gradient of every LoRA factor, medians of {args.repeats} interleaved calls")
        for name in args.settings.split(","):
            if name not in SETTINGS:
                raise SystemExit(f"unknown setting {name!r}; choose from {list(SETTINGS)}")
            run_setting(name, before, agl_core, device, args.repeats)


if __name__ == "__main__":
    main()
