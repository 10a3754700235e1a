"""One LightningModule per model family; each wraps plain ``nn.Module``s from ``src/models``."""

from typing import Any

from src.lightning_modules.base import EngramModule, LanguageModel
from src.lightning_modules.causal_lm import CausalLM
from src.lightning_modules.titans import TitansLM
from src.lightning_modules.ttt import TTTLM

__all__ = ["TTTLM", "CausalLM", "EngramModule", "LanguageModel", "TemporalLoRALM", "TitansLM"]


def __getattr__(name: str) -> Any:
    # Temporal LoRA needs peft, and importing peft imports bitsandbytes: load it only when that family is used.
    if name == "TemporalLoRALM":
        from src.lightning_modules.temporal_lora import TemporalLoRALM

        return TemporalLoRALM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
