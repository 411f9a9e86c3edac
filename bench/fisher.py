"""Fisher estimation throughput and estimator agreement (issue #8, item 3) on SmolLM2-135M-Instruct.

tokens/s of the `token` estimator (what `agl fisher` runs: estimate_fisher over every linear layer, adapters
off) over tokens/s of a plain LoRA training step (r=8 on q,k,v,o, AdamW, forward + backward + step) on the
same model and the same batches, measured alternately in one process (median of rounds). Then the `example`
estimator's cost on the same batches and its agreement with `token`: Spearman rank correlation of F (on a
uniform sample of coordinates of every linear layer) and the overlap of the two top-ρ supports (global budget).
Run: python -m bench.fisher [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import machine, pick_device, sync  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds of 4 batches instead of 5 rounds of 8")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--sample", type=int, default=2_000_000, help="coordinates sampled for the rank correlation")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default=None)
    return p.parse_args()


def batches_of(tokenizer, n_batches, batch, max_length, device):
    from agl_core import make_batches
    from agl_plugins.prompts import alignment_v1

    records = [r for r in alignment_v1().records("fisher") if r["response"]][: n_batches * batch]
    out = make_batches(records, tokenizer, batch_size=batch, max_length=max_length)
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def tokens_in(batches) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = torch.empty_like(x, dtype=torch.float64)
    ry = torch.empty_like(y, dtype=torch.float64)
    rx[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
    ry[y.argsort()] = torch.arange(y.numel(), dtype=torch.float64)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def support_overlap(f1, f2, rho) -> float:
    from agl_core import AGLConfig, FisherMask

    cfg = AGLConfig(rho=rho)
    m1, m2 = FisherMask.from_fisher(f1, cfg), FisherMask.from_fisher(f2, cfg)
    inter = total = 0
    for name, block in m1.blocks.items():
        total += block.size
        other = m2.blocks.get(name)
        if other is not None:
            inter += int(torch.isin(block.index.long(), other.index.long()).sum())
    return inter / max(total, 1)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rounds, n_batches = (3, 4) if args.quick else (5, 8)
    from peft import LoraConfig, get_peft_model

    from agl_core import estimate_fisher
    from agl_plugins import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    model.to(device)
    batches = batches_of(tokenizer, n_batches, args.batch, args.max_length, device)
    tokens = tokens_in(batches)
    print(f"# bench.fisher on {machine(device)}; {len(batches)} batches of {args.batch} alignment-v1 examples, "
          f"{tokens:,} tokens")
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-5)

    def train():
        lora.train()
        for b in batches:
            loss = lora(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def fisher_token():  # the adapters are switched off inside the estimator
        return estimate_fisher(lora, batches, estimator="token", progress=False)

    train()  # warm-up of both
    fisher_token()
    t_train, t_fisher = [], []
    for _ in range(rounds):  # alternate, so both see the same machine load
        t_train.append(timed(train, device))
        t_fisher.append(timed(fisher_token, device))
    tr, fi = statistics.median(t_train), statistics.median(t_fisher)
    print(f"LoRA training step: {tokens / tr:,.0f} tokens/s (median of {rounds}); token estimator: "
          f"{tokens / fi:,.0f} tokens/s; ratio {tr / fi:.2f} (target ≥ 0.7); rounds train "
          f"{[round(t, 2) for t in t_train]} s, fisher {[round(t, 2) for t in t_fisher]} s; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    f_tok = {k: v.float().cpu() for k, v in fisher_token().items()}
    t0 = time.perf_counter()
    f_ex = {k: v.float().cpu() for k, v in estimate_fisher(lora, batches, estimator="example", progress=False).items()}
    t_ex = time.perf_counter() - t0
    print(f"example estimator: {tokens / t_ex:,.0f} tokens/s = {fi / t_ex:.2f}x the token estimator's throughput")
    names = sorted(f_tok)
    flat_tok = torch.cat([f_tok[n].flatten() for n in names])
    flat_ex = torch.cat([f_ex[n].flatten() for n in names])
    gen = torch.Generator().manual_seed(0)
    pick = torch.randint(0, flat_tok.numel(), (min(args.sample, flat_tok.numel()),), generator=gen)
    rho_s = spearman(flat_tok[pick], flat_ex[pick])
    overlaps = {rho: support_overlap(f_tok, f_ex, rho) for rho in (0.01, 0.10)}
    print(f"agreement token vs example over {flat_tok.numel():,} coordinates of {len(names)} layers: Spearman "
          f"{rho_s:.3f} (on {pick.numel():,} sampled coordinates); top-ρ support overlap "
          + ", ".join(f"ρ={rho:g}: {v:.3f}" for rho, v in overlaps.items()))


if __name__ == "__main__":
    main()
