"""One LightningModule per model family; each wraps plain ``nn.Module``s from ``src/models``."""

from src.lightning_modules.base import EngramModule
from src.lightning_modules.causal_lm import CausalLM

__all__ = ["CausalLM", "EngramModule"]
