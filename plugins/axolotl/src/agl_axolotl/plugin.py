"""agl_plugins registration of the Axolotl trainer adapter; never imports axolotl (nor transformers) itself."""

from __future__ import annotations

import sys
from typing import Any, Optional

from agl_plugins.hookspecs import hookimpl


def is_axolotl_trainer(trainer: Any) -> bool:
    """True when a class of `trainer` comes from the axolotl package (AxolotlTrainer, AxolotlDPOTrainer, ...)."""
    return any(getattr(cls, "__module__", "").split(".")[0] == "axolotl" for cls in type(trainer).__mro__)


@hookimpl(tryfirst=True)
def agl_adapter_for_trainer(trainer: Any, config: Any) -> Optional[Any]:
    """An AxolotlTrainerAdapter for Axolotl's trainers (SFT, DPO, ...: any `transformers.Trainer` with a class
    from the axolotl package), else None. `tryfirst` so that it wins over the TRL and Hugging Face adapters,
    whose trainer classes Axolotl's subclass. A trainer that already carries a plain AGLCallback keeps the
    Hugging Face adapter (its metrics then go through the `log` wrapper)."""
    if "transformers" not in sys.modules or not is_axolotl_trainer(trainer):
        return None
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        return None
    from .adapter import AxolotlTrainerAdapter, has_plain_callback

    if has_plain_callback(trainer):
        from agl_hf_callback import HFTrainerAdapter

        return HFTrainerAdapter(trainer, config)
    return AxolotlTrainerAdapter(trainer, config)
