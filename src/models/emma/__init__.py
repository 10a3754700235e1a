"""EMMA: a DEQ encoder with a holographic (HRR) key-value trace. See ``model.py`` for the data flow."""

from src.models.emma.deq import DEQSettings, SolverStats, anderson, deq_fixed_point, fixed_point_iter
from src.models.emma.losses import info_nce
from src.models.emma.model import (
    PLASTICITY_CHUNK_KEYS,
    PLASTICITY_KEYS,
    PLASTICITY_TOKEN_KEYS,
    TELEMETRY_KEYS,
    EmmaConfig,
    EmmaModel,
    EmmaOutput,
    needle_accuracy,
    needle_read_targets,
)

__all__ = [
    "PLASTICITY_CHUNK_KEYS",
    "PLASTICITY_KEYS",
    "PLASTICITY_TOKEN_KEYS",
    "TELEMETRY_KEYS",
    "DEQSettings",
    "EmmaConfig",
    "EmmaModel",
    "EmmaOutput",
    "SolverStats",
    "anderson",
    "deq_fixed_point",
    "fixed_point_iter",
    "info_nce",
    "needle_accuracy",
    "needle_read_targets",
]
