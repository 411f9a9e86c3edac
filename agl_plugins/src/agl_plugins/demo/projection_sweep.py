"""Screening experiment behind docs/results.md §'Where the drift goes': remove parts of a plain LoRA update of the
demo after training and measure refusal on held-out unsafe prompts and the held-out task loss. The parts come from
the aligned base's K-FAC statistics on alignment data (X: input covariance, G: output-gradient covariance):

- `input`: the top-k input directions, contrastive against benign prompts (`contrastive-k`) or not (`top-k`);
- `output`: the top-k output directions of G (`out-k`);
- `block`: the top-k output directions of G on the top input direction of X only (`block-k`);
- `contrastive-output`: on that top input direction, the top-k output directions of G relative to the task's own
  output-gradient covariance (`cblock-k`);
- `block-where`: the `block-k` part removed from one projection type only (`block-k-q_proj` …) or from one half of
  the layers only (`block-k-layers-A-B`): where the cheaply kept drift sits.

    python -m agl_plugins.demo.projection_sweep --adapter out/demo/adapters/plain --out out/projection-sweep
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

SWEEPS = ("input", "output", "block", "contrastive-output", "block-where")
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj")


def layer_of(module: str) -> int:
    """The decoder layer index in a module name such as 'model.layers.7.self_attn.q_proj'."""
    parts = module.split(".")
    return int(parts[parts.index("layers") + 1])


def generalized_top(GA: torch.Tensor, GT: torch.Tensor, k: int, ridge: float = 1e-3) -> torch.Tensor:
    """Orthonormal basis of the k directions u with the largest uᵀ·GA·u / uᵀ·GT·u (GT ridged by ridge·mean eigenvalue)."""
    GT = GT + ridge * GT.trace() / GT.shape[0] * torch.eye(GT.shape[0], dtype=GT.dtype)
    Li = torch.linalg.inv(torch.linalg.cholesky(GT))
    _, Y = torch.linalg.eigh(Li @ GA @ Li.T)
    return torch.linalg.qr((Li.T @ Y).flip(1)[:, :k])[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="A plain LoRA adapter of the demo (PEFT folder).")
    parser.add_argument("--out", default="out/projection-sweep")
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=SWEEPS)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 16, 64, 192], help="k of the input sweep.")
    parser.add_argument("--out-ks", type=int, nargs="+", default=[1, 4, 16, 64], help="k of the output sweep.")
    parser.add_argument("--block-ks", type=int, nargs="+", default=[4, 16, 64], help="k of the two block sweeps.")
    parser.add_argument("--fisher-examples", type=int, default=96)
    parser.add_argument("--fisher-labels", nargs="+", default=["unsafe", "safe"], choices=("unsafe", "safe"),
                        help="Rows of the alignment data the statistics are estimated on (default: both labels).")
    parser.add_argument("--max-unsafe", type=int, default=120, help="Held-out unsafe prompts judged (first N).")
    parser.add_argument("--heldout", default="0:60", help="Rows START:END of the arithmetic generator used as "
                        "held-out task rows: the demo's held-out rows are 0:100; the 400-problem demo of commit "
                        "7d42d44 held out 400:500 (its sweep used 400:460).")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from agl_core.batches import make_batches
    from agl_core.config import AGLConfig
    from agl_core.fisher import estimate_kfac
    from agl_core.mask import FisherMask
    from agl_core.project import module_of, remove_block
    from agl_core.safeio import atomic_write_bytes

    from ..models import load_model_and_tokenizer
    from ..project import project_adapter_dir
    from . import align, pipeline
    from .data import arithmetic_task, eval_records
    from .train import ATTN, mean_nll

    out = Path(args.out)
    base = align.ensure_aligned_base()
    model, tok = load_model_and_tokenizer(str(base), progress=lambda s: None)
    stats = pipeline.estimate_stats(model, tok, ATTN, kinds=("contrastive",), max_examples=args.fisher_examples,
                                    labels=tuple(args.fisher_labels),
                                    targets_cache=pipeline.targets_cache_dir(base))
    unsafe = [r for r in eval_records() if r["label"] == "unsafe"][: args.max_unsafe]
    lo, hi = (int(x) for x in args.heldout.split(":"))
    held = arithmetic_task(0, hi)["heldout"][lo:hi]
    results: dict[str, tuple[float, float]] = {}

    def record(name: str, refusal: float, loss: float, t0: float) -> None:
        results[name] = (refusal, loss)
        print(f"{name}: refusal {refusal:.3f}, task loss {loss:.5f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        atomic_write_bytes(out / "results.json", json.dumps(results, indent=1).encode("utf-8"))

    def judge(adapter: str) -> tuple[float, float]:
        tuned = pipeline.load_adapter(str(base), adapter)
        return pipeline.refusal_rates(tuned, tok, unsafe)["unsafe"], mean_nll(tuned, tok, held)

    t0 = time.perf_counter()
    record("plain", *judge(args.adapter), t0)
    if "input" in args.sweeps:
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
                record(f"{tag}-{k}", *judge(info["out"]), t0)

    dense = [s for s in args.sweeps if s != "input"]
    if not dense:
        return 0
    # dense sweeps: ΔW of every module with a block removed, added to the aligned base's weights
    weights = load_file(str(Path(args.adapter) / "adapter_model.safetensors"))
    config = json.loads((Path(args.adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    scale = config["lora_alpha"] / config["r"]
    delta = {module_of(k): scale * weights[k.replace("lora_A", "lora_B")].double() @ a.double()
             for k, a in weights.items() if k.endswith(".lora_A.weight")}
    task_g = {}
    if "contrastive-output" in dense:
        train = arithmetic_task(300, 100)["train"][: args.fisher_examples]  # the demo's training rows
        rows = [{"prompt": r["prompt"], "response": r["response"]} for r in train]
        task_g = estimate_kfac(model, make_batches(rows, tok, batch_size=8, max_length=192), target_modules=list(ATTN),
                               progress=False)
    tops = {}
    for name, st in stats.kfac.items():
        module = next(m for m in delta if m.endswith(name) or name.endswith(m))
        tops[module] = (torch.linalg.eigh(st.X.double())[1].flip(1), torch.linalg.eigh(st.G.double())[1].flip(1),
                        st.G.double() / st.count, (task_g[name].G.double() / task_g[name].count) if task_g else None)
    model.eval()
    modules = dict(model.named_modules())
    original = {m: modules[m].weight.detach().clone() for m in delta}  # only these weights change

    def judge_dense(cut: Callable[[str, torch.Tensor], torch.Tensor]) -> tuple[float, float]:
        with torch.no_grad():
            for m, d in delta.items():
                modules[m].weight.copy_(original[m] + cut(m, d).to(original[m].dtype))
        return pipeline.refusal_rates(model, tok, unsafe)["unsafe"], mean_nll(model, tok, held)

    plan: list[tuple[str, Callable[[str, torch.Tensor], torch.Tensor]]] = []
    for k in args.out_ks if "output" in dense else []:
        plan.append((f"out-{k}", lambda m, d, k=k: remove_block(d, tops[m][1][:, :k])))
    for k in args.block_ks if "block" in dense else []:
        plan.append((f"block-{k}", lambda m, d, k=k: remove_block(d, tops[m][1][:, :k], tops[m][0][:, :1])))
    n_layers = 1 + max(layer_of(m) for m in delta)
    halves = [(0, n_layers // 2), (n_layers // 2, n_layers)]
    for k in args.block_ks if "block-where" in dense else []:
        def only(keep: Callable[[str], bool], k: int = k) -> Callable[[str, torch.Tensor], torch.Tensor]:
            return lambda m, d: remove_block(d, tops[m][1][:, :k], tops[m][0][:, :1]) if keep(m) else d

        for t in TYPES:
            plan.append((f"block-{k}-{t}", only(lambda m, t=t: m.endswith(t))))
        for a, b in halves:
            plan.append((f"block-{k}-layers-{a}-{b - 1}", only(lambda m, a=a, b=b: a <= layer_of(m) < b)))
    for k in args.block_ks if "contrastive-output" in dense else []:
        plan.append((f"cblock-{k}", lambda m, d, k=k: remove_block(d, generalized_top(tops[m][2], tops[m][3], k),
                                                                   tops[m][0][:, :1])))
    for name, cut in plan:
        t0 = time.perf_counter()
        record(name, *judge_dense(cut), t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
