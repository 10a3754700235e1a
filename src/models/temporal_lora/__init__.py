"""Temporal LoRA: frozen GPT-2, one LoRA adapter per domain, a per-token Time Mixer router (see ``model.py``)."""

from src.models.temporal_lora.mixing import AdapterMixer, lora_gate_factors, stacked_lora_delta
from src.models.temporal_lora.model import PRESETS, RoutedOutput, TemporalLoRA, TemporalLoRAConfig, build_backbone
from src.models.temporal_lora.router import (
    RouterOutput,
    TimeMixer,
    balanced_mean_weights,
    balanced_offsets,
    routing_stats,
)

__all__ = [
    "PRESETS",
    "AdapterMixer",
    "RoutedOutput",
    "RouterOutput",
    "TemporalLoRA",
    "TemporalLoRAConfig",
    "TimeMixer",
    "balanced_mean_weights",
    "balanced_offsets",
    "build_backbone",
    "lora_gate_factors",
    "routing_stats",
    "stacked_lora_delta",
]
