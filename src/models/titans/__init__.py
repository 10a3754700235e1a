"""Titans (Behrouz, Zhong, Mirrokni 2024): the neural long-term memory (``memory.py``) and the MAC / MAG / MAL / LMM
language models built on it (``model.py``)."""

from src.models.titans.config import PRESETS, TitansConfig
from src.models.titans.memory import NeuralMemory, NeuralMemoryState
from src.models.titans.model import TitansForCausalLM, TitansOutput

__all__ = ["PRESETS", "NeuralMemory", "NeuralMemoryState", "TitansConfig", "TitansForCausalLM", "TitansOutput"]
