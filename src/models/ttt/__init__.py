"""TTT-Linear / TTT-MLP language models (port of the official ttt-lm-pytorch code); see ``model.py``."""

from src.models.ttt.config import MAMBA_BACKBONE, PRESETS, TTTConfig
from src.models.ttt.model import (
    PLASTICITY_KEYS,
    PLASTICITY_MINIBATCH_KEYS,
    PLASTICITY_TOKEN_KEYS,
    TTTMLP,
    TTTCache,
    TTTCausalLMOutput,
    TTTForCausalLM,
    TTTLinear,
    TTTModel,
)

__all__ = [
    "MAMBA_BACKBONE",
    "PLASTICITY_KEYS",
    "PLASTICITY_MINIBATCH_KEYS",
    "PLASTICITY_TOKEN_KEYS",
    "PRESETS",
    "TTTMLP",
    "TTTCache",
    "TTTCausalLMOutput",
    "TTTConfig",
    "TTTForCausalLM",
    "TTTLinear",
    "TTTModel",
]
