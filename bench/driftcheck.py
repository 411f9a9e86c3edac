"""DriftCheck's judging time: the margin judge and greedy generation run separately (each passes the prompts through
the model) against `margins_and_responses` (one prompt pass shared by both), interleaved in one process.

    python -m bench.driftcheck [--prompts 96] [--adapter DIR] [--repeats 2] [--threads 1]

On the aligned base of `agl demo` (SmolLM2-135M-Instruct + the shipped refusal adapter) and its held-out prompts;
--adapter judges a saved LoRA adapter on top (e.g. out/demo/adapters/plain). Prints the times, their ratio, and
whether the answers and margins agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=96, help="held-out prompts judged (default: %(default)s)")
    p.add_argument("--adapter", default=None, help="a saved LoRA adapter to judge on the aligned base")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of each (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per batch, as in agl demo (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=24, help="greedy tokens, as in agl demo (default: %(default)s)")
    args = p.parse_args()
    if min(args.prompts, args.repeats, args.threads, args.batch_size, args.new_tokens) < 1:
        p.error("--prompts, --repeats, --threads, --batch-size and --new-tokens must be at least 1")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        p.error(f"--adapter {args.adapter}: no adapter_config.json there; give a folder saved by save_pretrained")

    import torch

    from agl_plugins.demo import align
    from agl_plugins.demo.data import eval_records
    from agl_plugins.drift.generation import greedy_responses
    from agl_plugins.drift.margin import margins_and_responses, refusal_margins
    from agl_plugins.models import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(str(align.ensure_aligned_base()), progress=lambda s: None)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    prompts = [r["prompt"] for r in eval_records()][: args.prompts]
    kw = dict(batch_size=args.batch_size)

    def separate() -> tuple[list[float], list[str]]:
        return (refusal_margins(model, tok, prompts, **kw),
                greedy_responses(model, tok, prompts, max_new_tokens=args.new_tokens, **kw))

    def shared() -> tuple[list[float], list[str]]:
        return margins_and_responses(model, tok, prompts, max_new_tokens=args.new_tokens, **kw)

    times: dict[str, list[float]] = {"separate": [], "shared": []}
    out = {}
    for _ in range(args.repeats):
        for name, fn in (("separate", separate), ("shared", shared)):
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    sep, sha = statistics.median(times["separate"]), statistics.median(times["shared"])
    same = sum(a == b for a, b in zip(out["separate"][1], out["shared"][1]))
    diff = max(abs(a - b) for a, b in zip(out["separate"][0], out["shared"][0]))
    print(f"DriftCheck judging of {len(prompts)} prompts ({'adapter ' + args.adapter if args.adapter else 'aligned base'}, "
          f"{args.threads} thread(s), batch {args.batch_size}, {args.new_tokens} new tokens), median of {args.repeats}:")
    print(f"  margin + generate, separately: {sep:.1f} s")
    print(f"  one shared prompt pass:        {sha:.1f} s")
    print(f"  ratio shared / separate:       {sha / sep:.3f}")
    print(f"  identical answers: {same}/{len(prompts)}; largest margin difference: {diff:.2e}")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
