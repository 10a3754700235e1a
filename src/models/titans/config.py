"""Configuration of the Titans neural long-term memory (Behrouz, Zhong, Mirrokni 2024, arXiv 2501.00663).

Same conventions as ``src.models.ttt.config``: a dataclass whose fields are checked when it is built, named size
presets in :data:`PRESETS`, ``TitansConfig.from_name("titans-tiny", **overrides)`` and ``from_dict`` for YAML blocks.

The LM-level fields (``vocab_size``, ``num_layers``) are carried for the Titans LM of issue #13; ``NeuralMemory`` only
reads the memory fields. The preset sizes are *nominal* (Llama-style width x depth at the paper's reported scales,
170M / 340M / 400M); the paper's per-size architecture table is not in our notes, so they are our choice, not theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from src.errors import EngramError
from src.models.config_checks import OVERRIDES_KEY, PresetConfig, check_fields

PRESETS: dict[str, dict[str, int]] = {
    # Unit tests and CPU smoke runs.
    "titans-tiny": dict(hidden_size=64, num_layers=2, num_heads=2, chunk_size=8, vocab_size=256),
    "titans-170m": dict(hidden_size=768, num_layers=12, num_heads=12),
    "titans-340m": dict(hidden_size=1024, num_layers=24, num_heads=16),
    "titans-400m": dict(hidden_size=1152, num_layers=24, num_heads=18),
}

RANGES = {
    "vocab_size": ">= 1",
    "hidden_size": ">= 1",
    "num_layers": ">= 1",
    "num_heads": ">= 1",
    "memory_depth": ">= 1",
    "memory_expansion": ">= 1",
    "chunk_size": ">= 1",
    "conv_kernel": ">= 1",
    "max_lr": ">= 0",  # 0 switches the inner-loop update off (an ablation)
    "initializer_range": ">= 0",
}


@dataclass
class TitansConfig(PresetConfig):
    """Hyper-parameters of the Titans memory (and, later, of the Titans LM). Defaults are the "titans-170m" width."""

    PRESETS: ClassVar[dict[str, dict[str, int]]] = PRESETS
    PRESET_FAMILY: ClassVar[str] = "Titans"

    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    # Memory MLP: L_M layers, d_h -> e*d_h -> ... -> d_h. Depth 1 is a matrix memory (online linear regression).
    memory_depth: int = 2
    memory_expansion: int = 2
    # Inner-loop mini-batch b of §3.2: gradients inside a chunk are taken at the chunk-start weights.
    chunk_size: int = 16
    # Depthwise causal conv after each of the q/k/v projections (§4.4); "w/o conv" is a Table 5 ablation.
    use_conv: bool = True
    conv_kernel: int = 4
    # θ_t = max_lr * sigmoid(.): the inner step is bounded. titans-pytorch's train_mac.py uses 0.1; its default of 1.0
    # is what users reported diverging at 4K tokens (issue #29).
    max_lr: float = 0.1
    # "token": θ/η/α per token (the paper's experiments). "chunk": constant inside a chunk (the paper's optional
    # speed-up), taken from the chunk's *first* token so that it stays causal and streamable.
    gate_granularity: Literal["token", "chunk"] = "token"
    # Ablations of Table 5 ("w/o momentum", "w/o weight decay"): False fixes η_t = 0 or α_t = 0 exactly.
    momentum: bool = True
    forgetting: bool = True
    # Gate biases at init: θ = max_lr*σ(0) = max_lr/2, η = σ(0) = 0.5, α = σ(-8) ≈ 3.4e-4 (a ~3000-token horizon).
    # Not σ(-4) ≈ 0.018: a bias-free MLP memory has a saddle at W = 0 (zero weights give zero gradients for depth
    # >= 2), and at that forgetting rate a depth-2 memory decayed into it within 4K tokens (|W| ~ 1e-12, measured).
    init_theta_bias: float = 0.0
    init_eta_bias: float = 0.0
    init_alpha_bias: float = -8.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        check_fields(self, RANGES)
        if self.hidden_size % self.num_heads:
            raise EngramError(
                f"{OVERRIDES_KEY}: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "choose sizes so that every head gets hidden_size // num_heads features."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads
