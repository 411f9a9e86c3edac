"""AGLPlugin: Axolotl's BasePlugin that trains with AGL from `plugins: [agl_axolotl.AGLPlugin]` and an `agl:` block."""

from __future__ import annotations

from typing import Any

from agl_core.config import AGLConfig
from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from .adapter import AxolotlAGLCallback
from .args import ARGS_PATH, options_from_cfg
from .masks import ensure_mask, training_config

# Axolotl shows INFO only from loggers under "axolotl"; this name keeps the plugin's lines beside its own.
LOG = get_logger("axolotl.integrations.agl")


def tokenizer_of(trainer: Any) -> Any:
    """The text tokenizer of the trainer's processing class (a processor's `.tokenizer`), or None."""
    from transformers import ProcessorMixin

    processing = getattr(trainer, "processing_class", None)
    if isinstance(processing, ProcessorMixin):
        processing = getattr(processing, "tokenizer", None)
    return processing


class AGLPlugin(BasePlugin):
    """AlignGuard-LoRA (reconstructed) for Axolotl SFT and DPO runs.

    `add_callbacks_post_trainer` finds the mask (estimating it from agl.alignment_dataset with the trainer's
    model and tokenizer when missing or stale) and returns the AGL callback; `post_trainer_create` binds it
    through `agl_plugins.attach` (Axolotl's trainers get the AxolotlTrainerAdapter: metrics go to
    `store_metrics` / TRL's `_metrics`). No trainer class is chosen or replaced (`get_trainer_cls` is unused).
    """

    def __init__(self) -> None:
        super().__init__()
        self._configs: dict[int, AGLConfig] = {}  # id(trainer) → the config its callback was built with

    def get_input_args(self) -> str:
        return ARGS_PATH

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list:
        options = options_from_cfg(cfg)
        if not options.enabled:
            LOG.info("AGL: agl.enabled is false; training without the AGL penalty.")
            return []
        config = self._prepare(cfg, trainer, options)
        self._configs[id(trainer)] = config
        return [AxolotlAGLCallback(config)]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        options = options_from_cfg(cfg)
        if not options.enabled:
            return
        config = self._configs.pop(id(trainer), None)
        if config is None:  # add_callbacks_post_trainer did not run for this trainer: attach() adds the callback
            config = self._prepare(cfg, trainer, options)
        from agl_plugins import attach

        adapter = attach(trainer, config)
        penalty = adapter.penalty
        LOG.info(f"AGL: {type(adapter).__name__} on {type(trainer).__name__}: {len(penalty.modules)} LoRA modules, "
                 f"|S| = {penalty.num_protected:,}, lambda_a={config.lambda_a}, lambda_t={config.lambda_t}, "
                 f"lambda_nc={config.lambda_nc}, warmup_steps={config.warmup_steps}; metrics agl/* in each log.")

    def _prepare(self, cfg: Any, trainer: Any, options: Any) -> AGLConfig:
        plan = ensure_mask(trainer.model, tokenizer_of(trainer), options.agl_config(), options.fisher_options(),
                           output_dir=cfg.get("output_dir"), model_name=str(cfg.get("base_model") or ""),
                           log=LOG.info)
        return training_config(options.agl_config(), plan, warn=LOG.warning)
