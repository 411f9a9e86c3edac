"""Cost of the forgetting probe on SmolLM2-135M: target generation and one measurement vs one LoRA training step.

Run: python -m agl_plugins.forgetting.bench [--prompts 64] [--threads 1]. Probe measurements and training steps
are interleaved in one run and compared by their medians, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64, help="probe prompts (alignment-v1 eval split)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5, help="probe measurements / training steps timed (interleaved)")
    p.add_argument("--batch", type=int, default=4, help="training batch (sequences of --seq tokens)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    from ..models import load_model_and_tokenizer
    from .probe import build_probe, measure
    from .recorder import load_probe_records

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct", progress=lambda m: None)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    records = load_probe_records("builtin:alignment-v1", args.prompts)
    t0 = time.perf_counter()
    probe = build_probe(model, tok, records, max_new_tokens=args.max_new_tokens, progress=False)
    generation = time.perf_counter() - t0
    tokens = sum(len(t) for t in probe.target_ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, len(tok), (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    steps, probes = [], []
    model.train()
    for _ in range(args.repeats + 1):  # the first of each is warm-up
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        measure(model, probe, tok)
        probes.append(time.perf_counter() - t0)
    step, one = statistics.median(steps[1:]), statistics.median(probes[1:])
    print(f"SmolLM2-135M, LoRA r=8 on q/v, torch threads {torch.get_num_threads()}")
    print(f"probe: {len(records)} prompts, {tokens} target tokens; targets generated once in {generation:.1f} s")
    print(f"median of {args.repeats}: training step ({args.batch}x{args.seq} tokens) {step:.2f} s, "
          f"probe measurement {one:.2f} s = {one / step:.2f} training steps")
    for n in (100, 1000):
        extra = 12 * one + generation
        print(f"12 measurements + generation in a {n}-step run: +{100 * extra / (n * step):.1f} % of training time")


if __name__ == "__main__":
    main()
