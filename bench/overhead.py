"""Training overhead of AGL (issue #8, item 1): LoRA + AGL vs plain LoRA steps interleaved in one Trainer run.

SmolLM2-135M-Instruct, HF Trainer + AGLCallback, the callback switched on for even and off for odd optimizer
steps of the same run (same model, same data stream). For each setting (r, target modules, ρ) it prints the
median step time of both groups, their ratio, the median and spread of the paired ratios (step 2k over step
2k+1), the callback's own work timed alone, and the peak-memory ratio (median per-step peak; see
bench/common.py for how memory is measured). One Fisher (token estimator, 16 alignment-v1 examples, all
linear layers) is estimated once; each coordinate setting's mask is its top-ρ (global budget) over its target
modules. The K-FAC setting (`r8-qkvo-kfac`) uses the demo's basis (agl_plugins.demo.run.MASK: basis=kfac,
k_in=4, k_out=all, kfac_out_weight=g_diag, contrastive): K-FAC statistics of q,k,v,o on the same 16 examples
against the input covariance of 16 safe alignment-v1 prompts.
Run: python -m bench.overhead [--quick] [--steps N] [--settings r8-qkvo-1,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import PeakMemory, machine, memory_method, pick_device  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = QKVO + ["gate_proj", "up_proj", "down_proj"]
SETTINGS = {f"r{r}-{t}-{int(rho * 100)}": (r, QKVO if t == "qkvo" else ALL, rho)
            for r in (8, 64) for t in ("qkvo", "all") for rho in (0.01, 0.10)}
SETTINGS["r8-qkvo-kfac"] = (8, QKVO, None)  # ρ unused: the demo's K-FAC basis (KFAC_MASK)
KFAC_MASK = dict(basis="kfac", k_out="all", k_in=4, kfac_out_weight="g_diag")  # = agl_plugins.demo.run.MASK


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 steps per setting instead of 30")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per setting (alternating AGL on / off)")
    p.add_argument("--skip", type=int, default=2, help="first steps of each setting left out (warm-up)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="out/bench-overhead")
    return p.parse_args()


def base_fisher(device, kfac=False):
    """Token-estimator Fisher of every linear layer on 16 alignment-v1 examples with written responses; with
    `kfac`, also (K-FAC statistics of q,k,v,o on the same examples, input covariance of 16 safe prompts)."""
    from agl_core import estimate_fisher, estimate_input_covariance, estimate_kfac, make_batches
    from agl_plugins import load_model_and_tokenizer
    from agl_plugins.prompts import alignment_v1

    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    model.to(device)
    all_records = alignment_v1().records("fisher")
    records = [r for r in all_records if r["response"]][:16]
    batches = make_batches(records, tokenizer, batch_size=4, max_length=128)
    fisher = estimate_fisher(model, batches, target_modules=ALL, progress=False)
    fisher = {k: v.cpu() for k, v in fisher.items()}
    if not kfac:
        return fisher, None
    stats = estimate_kfac(model, batches, target_modules=QKVO, progress=False)
    safe = [{"prompt": r["prompt"], "response": ""} for r in all_records if r["label"] == "safe"][:16]
    ref = estimate_input_covariance(model, make_batches(safe, tokenizer, batch_size=4, max_length=128),
                                    target_modules=QKVO, progress=False)
    return fisher, (stats, ref)


def step_timer(agl, device):
    """Times each optimizer step (on_step_begin → on_step_end) and its peak memory; AGL on for even steps."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[int, bool, float, int]] = []  # (step, agl on, seconds, peak bytes)

        def on_step_begin(self, args, state, control, **kw):
            self.on = state.global_step % 2 == 0
            agl.enable() if self.on else agl.disable()
            self.mem = PeakMemory(device).__enter__()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - self.t0
            self.mem.__exit__(None, None, None)
            self.steps.append((state.global_step - 1, self.on, seconds, self.mem.absolute))

    return Timer()


def run_setting(name, fisher, kfac, args, device):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from agl_core import AGLConfig, FisherMask
    from agl_hf_callback import AGLCallback
    from agl_plugins import load_model_and_tokenizer

    r, targets, rho = SETTINGS[name]
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    if rho is None:  # the demo's contrastive K-FAC basis
        cfg = AGLConfig(**KFAC_MASK, target_modules=targets, lambda_t=0.1)
        mask = FisherMask.from_fisher(kfac[0], cfg, model=model, reference=kfac[1])
    else:
        cfg = AGLConfig(rho=rho, target_modules=targets, lambda_t=0.1)
        mask = FisherMask.from_fisher({k: v for k, v in fisher.items() if k.endswith(tuple(targets))}, cfg,
                                      model=model)
    lora = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    agl = AGLCallback(cfg, mask)
    timer = step_timer(agl, device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (args.steps * args.batch, args.seq), generator=gen)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    targs = TrainingArguments(output_dir=args.out, use_cpu=device.type == "cpu", report_to=[], save_strategy="no",
                              disable_tqdm=True, per_device_train_batch_size=args.batch, max_steps=args.steps,
                              logging_steps=args.steps, learning_rate=1e-4, dataloader_num_workers=0)
    trainer = Trainer(model=lora, args=targs, train_dataset=data, callbacks=[timer, agl])  # timer first
    load0 = os.getloadavg()[0]
    trainer.train()
    alone = []
    for _ in range(5):  # the callback's own work (penalty, its gradient, adding into p.grad), at the trained weights
        t0 = time.perf_counter()
        agl.add_penalty_grad(args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        alone.append(time.perf_counter() - t0)
    return summarise(name, timer.steps, args.skip, agl, statistics.median(alone), load0)


def summarise(name, steps, skip, agl, alone, load0):
    on = {s: (t, m) for s, o, t, m in steps if o and s >= skip}
    off = {s: (t, m) for s, o, t, m in steps if not o and s >= skip}
    t_on, t_off = statistics.median(v[0] for v in on.values()), statistics.median(v[0] for v in off.values())
    m_on, m_off = statistics.median(v[1] for v in on.values()), statistics.median(v[1] for v in off.values())
    pairs = sorted(on[s][0] / off[s + 1][0] for s in on if s + 1 in off)
    q = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) >= 2 else [pairs[0]] * 3
    row = dict(setting=name, modules=len(agl.penalty.modules), protected=agl.penalty.num_protected,
               t_on=t_on, t_off=t_off, ratio=t_on / t_off, pair_median=statistics.median(pairs),
               pair_lo=pairs[0], pair_q1=q[0], pair_q3=q[2], pair_hi=pairs[-1], n_pairs=len(pairs),
               alone=alone, mem_ratio=m_on / m_off, mem_on=m_on, load=(load0 + os.getloadavg()[0]) / 2)
    print(f"{name:<12s} |S|={row['protected']:>10,d} ({row['modules']} modules): step AGL {t_on * 1e3:7.0f} ms, "
          f"plain {t_off * 1e3:7.0f} ms, ratio {row['ratio']:.3f}; paired ratios median {row['pair_median']:.3f} "
          f"[IQR {q[0]:.3f}–{q[2]:.3f}, range {pairs[0]:.3f}–{pairs[-1]:.3f}, {len(pairs)} pairs]; callback alone "
          f"{alone * 1e3:.1f} ms = {alone / t_off * 100:.1f} % of a plain step; peak memory ratio "
          f"{row['mem_ratio']:.3f} ({m_on / 2**20:.0f} MiB); load {row['load']:.1f}", flush=True)
    return row


def main() -> None:
    args = parse_args()
    args.steps = args.steps or (12 if args.quick else 30)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"# bench.overhead on {machine(device)}; memory: {memory_method(device)}; batch {args.batch}x{args.seq} "
          f"tokens, {args.steps} steps per setting ({args.skip} warm-up)")
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    fisher, kfac = base_fisher(device, kfac=any(SETTINGS[n][2] is None for n in names))
    rows = [run_setting(name, fisher, kfac, args, device) for name in names]
    worst = max(rows, key=lambda r: r["ratio"])
    print(f"largest ratio of medians: {worst['ratio']:.3f} ({worst['setting']}); target ≤ 1.02; "
          f"largest memory ratio {max(r['mem_ratio'] for r in rows):.3f}; target ≤ 1.05")


if __name__ == "__main__":
    main()
