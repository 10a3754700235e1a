"""One LightningModule per model family; each wraps plain ``nn.Module``s from ``src/models``."""

from src.lightning_modules.base import EngramModule, LanguageModel
from src.lightning_modules.causal_lm import CausalLM
from src.lightning_modules.temporal_lora import TemporalLoRALM
from src.lightning_modules.ttt import TTTLM

__all__ = ["TTTLM", "CausalLM", "EngramModule", "LanguageModel", "TemporalLoRALM"]
