"""Shared helpers of the TRL adapter tests: tiny SFT / DPO datasets, configs and trainers over hfkit's LoRA models."""

from __future__ import annotations

import hfkit  # tests/plugins/hf, put on sys.path by this folder's conftest.py
import tiny

MASK = hfkit.make_mask()
CPU = dict(bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
           disable_tqdm=True, dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", warmup_steps=0,
           logging_steps=1, per_device_train_batch_size=2, max_steps=3)


def sft_rows(n: int = 32) -> list[dict]:
    """Conversational prompt/completion rows for SFTTrainer (the tiny tokenizer has a chat template)."""
    return [{"prompt": [{"role": "user", "content": f"Say {i}."}],
             "completion": [{"role": "assistant", "content": f"Sure, {i} {'ok' * (i % 3 + 1)}"}]} for i in range(n)]


def dpo_rows(n: int = 32) -> list[dict]:
    """Plain-text preference rows for DPOTrainer."""
    return [{"prompt": f"Say {i}:", "chosen": f" yes {i}{'!' * (i % 3)}", "rejected": f" no {'?' * (i % 4 + 1)}"}
            for i in range(n)]


def sft_config(out, **kw):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out), **{**CPU, **kw})


def dpo_config(out, **kw):
    from trl import DPOConfig

    return DPOConfig(output_dir=str(out), **{**CPU, **kw})


def sft_trainer(model, out, callbacks=(), cls=None, extra=None, **kw):
    """An SFTTrainer (or subclass `cls`, given `extra` constructor kwargs) over a PEFT model."""
    from datasets import Dataset
    from trl import SFTTrainer

    cls = cls or SFTTrainer
    return cls(model=model, args=sft_config(out, **kw), train_dataset=Dataset.from_list(sft_rows()),
               processing_class=tiny.tiny_tokenizer(), callbacks=list(callbacks), **(extra or {}))


def dpo_trainer(model, out, callbacks=(), cls=None, extra=None, **kw):
    """A DPOTrainer over a PeftModel with no ref_model: TRL adds the frozen `ref` adapter as reference."""
    from datasets import Dataset
    from trl import DPOTrainer

    cls = cls or DPOTrainer
    return cls(model=model, args=dpo_config(out, **kw), train_dataset=Dataset.from_list(dpo_rows()),
               processing_class=tiny.tiny_tokenizer(), callbacks=list(callbacks), **(extra or {}))


TRAINERS = {"sft": sft_trainer, "dpo": dpo_trainer}


def build_sft_trainer(model, out):
    """Builder for tests/plugins/hf/test_hf_equivalence.py (BUILDERS["agl_trl"])."""
    return sft_trainer(model, out, max_steps=3, learning_rate=5e-2, max_grad_norm=0.0)


def ref_adapter_untouched(model) -> bool:
    """DPO's frozen `ref` adapter exists, is frozen and received no gradient."""
    refs = [p for n, p in model.named_parameters() if ".ref." in n]
    return bool(refs) and all(not p.requires_grad and p.grad is None for p in refs)


def script_workdir(root, seed: int = 5):
    """A folder for `agl-trl` runs: model/ (tiny Llama + tokenizer), mask/ (its mask), sft/ and dpo/ JSONL data."""
    import json
    from pathlib import Path

    root = Path(root)
    tiny.tiny_llama(seed).save_pretrained(root / "model")
    tiny.tiny_tokenizer().save_pretrained(root / "model")
    hfkit.make_mask(seed=seed).save(root / "mask")
    for name, rows in (("sft", sft_rows(16)), ("dpo", dpo_rows(16))):
        (root / name).mkdir()
        (root / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def script_argv(root, script: str, out, *extra: str) -> list[str]:
    """TRL script arguments for a 3-step CPU LoRA run on script_workdir(root)."""
    return ["--model_name_or_path", str(root / "model"), "--dataset_name", str(root / script),
            "--output_dir", str(out),
            "--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false", "--report_to", "none",
            "--max_steps", "3", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--use_peft",
            "--lora_r", "4", "--lora_dropout", "0",  # no dropout: runs in different processes stay comparable
            "--lora_target_modules", "q_proj", "v_proj", "--save_strategy", "no", "--seed", "0",
            "--disable_tqdm", "true", *extra]
