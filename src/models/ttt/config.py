"""Configuration of the TTT language models (TTT-Linear / TTT-MLP), with the official size presets.

The field names and defaults are those of ``TTTConfig`` in the official PyTorch code
(test-time-training/ttt-lm-pytorch, ``ttt.py``), minus the Hugging Face runtime switches that do not change the
model (``use_cache``, ``pretraining_tp``, token ids, ``scan_checkpoint_group_size``). The defaults describe the
Transformer backbone; the paper's headline "TTT-Linear (M)" model is the Mamba backbone, i.e. the same preset with
``MAMBA_BACKBONE`` applied (``TTTConfig.from_name("125m", **MAMBA_BACKBONE)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from src.errors import EngramError
from src.models.config_checks import OVERRIDES_KEY, PresetConfig, check_fields

# Sizes of the official presets (ttt.py TTT_STANDARD_CONFIGS; the same numbers as ttt-lm-jax CONFIGS and Table 3 of
# the paper). "1b" is the model the paper calls 1.3B. Everything else (vocab 32000, mini-batch 16, rope theta 1e4,
# tied embeddings, init std 0.02, rms eps 1e-6) is common to all sizes and lives in the dataclass defaults.
PRESETS: dict[str, dict[str, int]] = {
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "760m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=32),
}

# The Mamba backbone of the paper (JAX ``TTTLinear``/``TTTMLP``, as opposed to ``*Base``): a causal conv before the
# TTT layer, one shared Q/K projection followed by separate causal convs, and a GELU output gate.
MAMBA_BACKBONE: dict[str, bool] = dict(pre_conv=True, share_qk=True, use_gate=True)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Official inner-loop base learning rates: 1.0 for TTT-Linear, 0.1 for TTT-MLP (ttt-lm-jax scripts).
OFFICIAL_TTT_BASE_LR: dict[str, float] = {"linear": 1.0, "mlp": 0.1}


# The domain of every numeric field (its type and the Literal choices are checked from the annotations).
RANGES = {
    "vocab_size": ">= 1",
    "hidden_size": ">= 1",
    "intermediate_size": ">= 1",
    "num_hidden_layers": ">= 1",
    "num_attention_heads": ">= 1",
    "initializer_range": ">= 0",
    "rms_norm_eps": "> 0",
    "rope_theta": "> 0",
    "conv_kernel": ">= 1",
    "ttt_base_lr": ">= 0",  # 0 switches the inner-loop update off (an ablation)
    "mini_batch_size": ">= 1",
    "compile_chunk": ">= 1",
}


@dataclass
class TTTConfig(PresetConfig):
    """Hyper-parameters of ``TTTForCausalLM``; defaults are the official ones (the 1.3B "1b" size)."""

    PRESETS: ClassVar[dict[str, dict[str, int]]] = PRESETS
    PRESET_FAMILY: ClassVar[str] = "TTT"

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5504
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    # Backbone switches (all False: Transformer backbone; all True: Mamba backbone, see MAMBA_BACKBONE).
    use_gate: bool = False
    share_qk: bool = False
    pre_conv: bool = False
    conv_kernel: int = 4
    # Inner loop.
    ttt_layer_type: Literal["linear", "mlp"] = "linear"  # TTT-Linear or TTT-MLP
    ttt_base_lr: float = 1.0
    mini_batch_size: int = 16
    # Speed only (no effect on the numbers): run the inner-loop scan as torch.compile'd graphs of ``compile_chunk``
    # consecutive mini-batch steps (fused kernels, few launches; left-over steps one per graph). The Python loop over
    # those graphs is hidden from an outer torch.compile(model), which then does not unroll the scan.
    compile_inner_step: bool = False
    compile_chunk: int = 16
    compile_mode: str = "default"  # torch.compile mode of those graphs, e.g. "reduce-overhead" (CUDA graphs)

    def __post_init__(self) -> None:
        check_fields(self, RANGES)
        if self.compile_mode not in COMPILE_MODES:
            raise EngramError(
                f"{OVERRIDES_KEY}.compile_mode={self.compile_mode!r} is not a torch.compile mode; use one of "
                f"{', '.join(COMPILE_MODES)}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise EngramError(
                f"{OVERRIDES_KEY}: hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; choose sizes so that every head gets hidden_size // num_attention_heads "
                "features."
            )
        if self.head_dim % 2:
            raise EngramError(
                f"{OVERRIDES_KEY}: head_dim={self.head_dim} (hidden_size / num_attention_heads) must be even for the "
                "rotary embedding; change hidden_size or num_attention_heads."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset_values(cls, name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """An official preset (``125m``, ``350m``, ``760m``, ``1b``). When ``ttt_layer_type="mlp"`` is requested
        without an explicit ``ttt_base_lr``, the official TTT-MLP value (0.1) is used instead of TTT-Linear's 1.0."""
        values = super().preset_values(name, overrides)
        values["ttt_base_lr"] = OFFICIAL_TTT_BASE_LR.get(overrides.get("ttt_layer_type", "linear"), 1.0)
        return values
