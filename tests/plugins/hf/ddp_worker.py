"""torchrun worker: a 2-process gloo DDP Trainer run with and without AGLCallback, LoRA gradients saved per rank."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # hfkit, tiny

import torch  # noqa: E402

import hfkit  # noqa: E402
from agl_hf_callback import AGLCallback  # noqa: E402


def run(out: Path, settings: dict, agl: bool) -> tuple[list, dict]:
    """One DDP training run; (captured grads per step, final LoRA weights)."""
    model = hfkit.lora_model()
    capture = hfkit.capture_callback(model)
    callbacks = [capture]
    if agl:
        callbacks.append(AGLCallback(hfkit.agl_config(warmup_steps=settings["warmup"]), hfkit.make_mask()))
    trainer = hfkit.trainer(
        model, out / ("agl" if agl else "plain"), callbacks, ddp_backend="gloo", learning_rate=0.0,
        max_grad_norm=0.0, per_device_train_batch_size=settings["batch"], max_steps=settings["steps"],
        gradient_accumulation_steps=settings["ga"],
    )
    trainer.train()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return capture.grads, weights


def main() -> None:
    out = Path(sys.argv[1])
    settings = json.loads(sys.argv[2])
    rank = int(os.environ["RANK"])
    plain, _ = run(out, settings, agl=False)
    agl, weights = run(out, settings, agl=True)
    torch.save({"plain": plain, "agl": agl, "weights": weights, "world": int(os.environ["WORLD_SIZE"])},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
