"""Titans (Behrouz, Zhong, Mirrokni 2024): the neural long-term memory; see ``memory.py``."""

from src.models.titans.config import PRESETS, TitansConfig
from src.models.titans.memory import NeuralMemory, NeuralMemoryState

__all__ = ["PRESETS", "NeuralMemory", "NeuralMemoryState", "TitansConfig"]
