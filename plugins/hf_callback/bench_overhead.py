"""Per-step overhead of AGLCallback on SmolLM2-135M: median step time with AGL vs plain, interleaved in one run."""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=24, help="optimizer steps (alternating AGL on / off)")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the medians (warm-up)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rho", type=float, default=0.01)
    p.add_argument("--mask", default=None, help="an existing mask (default: estimate one on 16 alignment examples)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default="out/bench-overhead")
    return p.parse_args()


def build_mask(model, tokenizer, rho: float, targets: list[str]):
    """Fisher on 16 alignment-v1 examples that carry a written response (no generation), top-ρ global."""
    from agl_core import AGLConfig, FisherMask, estimate_fisher, make_batches
    from agl_plugins.prompts import alignment_v1

    records = [r for r in alignment_v1().records("fisher") if r["response"]][:16]
    batches = make_batches(records, tokenizer, batch_size=4, max_length=128)
    fisher = estimate_fisher(model, batches, target_modules=targets, progress=False)
    return FisherMask.from_fisher(fisher, AGLConfig(rho=rho, target_modules=targets), model=model)


def step_timer(agl):
    """Times each optimizer step (on_step_begin → on_step_end), wall and process CPU, AGL on for even steps."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: dict[bool, list[tuple[int, float, float]]] = {True: [], False: []}

        def on_step_begin(self, args, state, control, **kw):
            self.on = state.global_step % 2 == 0
            if self.on:
                agl.enable()
            else:
                agl.disable()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            self.times[self.on].append((state.global_step - 1, wall, cpu))

    return Timer()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from agl_core import AGLConfig, FisherMask
    from agl_hf_callback import AGLCallback
    from agl_plugins import load_model_and_tokenizer

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    mask = FisherMask.load(args.mask) if args.mask else build_mask(model, tokenizer, args.rho, targets)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    agl = AGLCallback(AGLConfig(rho=args.rho, target_modules=targets), mask)
    timer = step_timer(agl)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (args.steps * args.batch, args.seq), generator=gen)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    targs = TrainingArguments(output_dir=args.out, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                              per_device_train_batch_size=args.batch, max_steps=args.steps, logging_steps=args.steps,
                              learning_rate=1e-3, dataloader_num_workers=0)
    trainer = Trainer(model=lora, args=targs, train_dataset=data, callbacks=[timer, agl])  # timer first
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    trainer.train()
    report(args, timer, agl)


def report(args: argparse.Namespace, timer, agl) -> None:
    on = [(w, c) for s, w, c in timer.times[True] if s >= args.skip]
    off = [(w, c) for s, w, c in timer.times[False] if s >= args.skip]
    print(f"SmolLM2-135M, LoRA r=8 q,k,v,o, batch {args.batch}x{args.seq} tokens, rho={args.rho}, "
          f"|S| = {agl.penalty.num_protected:,} in {len(agl.penalty.modules)} modules, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    for i, clock in enumerate(("wall", "process CPU")):
        a, b = statistics.median(t[i] for t in on), statistics.median(t[i] for t in off)
        print(f"median step ({clock}): AGL {a * 1e3:.0f} ms ({len(on)} steps), plain {b * 1e3:.0f} ms "
              f"({len(off)} steps), overhead {(a / b - 1) * 100:+.1f} %")
    off_at = {s: w for s, w, _ in timer.times[False]}
    diffs = [w - off_at[s + 1] for s, w, _ in timer.times[True] if s >= args.skip and s + 1 in off_at]
    paired = statistics.median(diffs) / statistics.median(t[0] for t in off)
    print(f"median paired difference (AGL step 2k minus plain step 2k+1, wall): "
          f"{statistics.median(diffs) * 1e3:+.0f} ms = {paired * 100:+.1f} % of a plain step ({len(diffs)} pairs)")
    steps = sorted((s, w, on) for on in (True, False) for s, w, _ in timer.times[on])
    print("wall per step (ms, + = AGL):", " ".join(f"{s}{'+' if on else '-'}{w * 1e3:.0f}" for s, w, on in steps))
    t_pen = []
    for _ in range(10):  # the penalty + its gradient alone, at the trained weights
        t0 = time.perf_counter()
        agl.add_penalty_grad(args.steps)
        t_pen.append(time.perf_counter() - t0)
        for p in agl.lora_parameters:
            p.grad = None
    print(f"penalty + gradient alone: median {statistics.median(t_pen) * 1e3:.1f} ms over 10 calls")


if __name__ == "__main__":
    main()
