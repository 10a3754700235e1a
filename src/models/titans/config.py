"""Configuration of the Titans neural long-term memory (Behrouz, Zhong, Mirrokni 2024, arXiv 2501.00663).

Same conventions as ``src.models.ttt.config``: a dataclass whose fields are checked when it is built, named size
presets in :data:`PRESETS`, ``TitansConfig.from_name("titans-tiny", **overrides)`` and ``from_dict`` for YAML blocks.

``NeuralMemory`` reads the memory fields; ``TitansForCausalLM`` (``model.py``) the rest. The preset sizes are *nominal* (Llama-style width x depth at the paper's reported scales,
170M / 340M / 400M); the paper's per-size architecture table is not in our notes, so they are our choice, not theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from src.errors import EngramError
from src.models.config_checks import OVERRIDES_KEY, PresetConfig, check_fields

PRESETS: dict[str, dict[str, int]] = {
    # Unit tests and CPU needle runs.
    "titans-tiny": dict(
        hidden_size=64, intermediate_size=176, num_layers=2, num_heads=2, chunk_size=8, vocab_size=256,
        window=32, segment_size=32,
    ),
    "titans-170m": dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12),
    "titans-340m": dict(hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16),
    "titans-400m": dict(hidden_size=1152, intermediate_size=3072, num_layers=24, num_heads=18),
}  # fmt: skip

RANGES = {
    "vocab_size": ">= 1",
    "hidden_size": ">= 1",
    "intermediate_size": ">= 1",
    "persistent_tokens": ">= 0",
    "window": ">= 1",
    "segment_size": ">= 1",
    "rms_norm_eps": "> 0",
    "rope_theta": "> 0",
    "num_layers": ">= 1",
    "num_heads": ">= 1",
    "memory_depth": ">= 1",
    "memory_expansion": ">= 1",
    "chunk_size": ">= 1",
    "conv_kernel": ">= 1",
    "max_lr": ">= 0",  # 0 switches the inner-loop update off (an ablation)
    "inner_grad_clip": "> 0",
    "initializer_range": ">= 0",
}


@dataclass
class TitansConfig(PresetConfig):
    """Hyper-parameters of the Titans memory and LM. Defaults are the "titans-170m" width."""

    PRESETS: ClassVar[dict[str, dict[str, int]]] = PRESETS
    PRESET_FAMILY: ClassVar[str] = "Titans"

    # What each block mixes tokens with (paper §4): "mac" memory as context (segment attention over [persistent ||
    # retrieved || segment], then a memory update with its output), "mag" memory as gate (sliding-window attention
    # gated by the memory branch), "mal" memory as layer (memory, then sliding-window attention), "lmm" the memory
    # alone, and "swa" sliding-window attention alone: the same-size Transformer baseline, with no memory at all.
    architecture: Literal["mac", "mag", "mal", "lmm", "swa"] = "mac"
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048  # SwiGLU feed-forward width of every block
    num_layers: int = 12
    num_heads: int = 12  # of the memory and of the attention
    # Persistent memory (Eq. 19): learned, input-independent tokens. MAG / MAL / LMM / SWA prepend them to the
    # sequence (x̃ = [p] || x; sliding-window attention always sees them); MAC prepends them to every segment.
    persistent_tokens: int = 4
    window: int = 512  # sliding-window attention (MAG, MAL, SWA): a token sees itself and window − 1 before it
    # MAC: attention runs within segments of this many tokens. A multiple of chunk_size makes each segment start a
    # chunk boundary; otherwise a segment reads the state of the last complete chunk before it.
    segment_size: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
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
    # Each token's inner gradient is applied with step θ_t·min(1, τ/‖∇ℓ_t‖) (titans-pytorch's max_grad_norm). Without
    # it a depth-2 memory diverged on the CPU needle task after ~100 outer steps: the outer loop made keys within a chunk
    # alike, the summed step outgrew the memory's curvature, and its weights grew ×1e3 per chunk to NaN (measured).
    # At init ‖∇ℓ_t‖ is ~0.7 (p99 1.4), so τ = 2 leaves ordinary updates alone. None switches it off.
    inner_grad_clip: float | None = 2.0
    # "token": θ/η/α per token (the paper's experiments). "chunk": constant inside a chunk (the paper's optional
    # speed-up), taken from the chunk's *first* token so that it stays causal and streamable.
    gate_granularity: Literal["token", "chunk"] = "token"
    # Ablations of Table 5 ("w/o momentum", "w/o weight decay"): False fixes η_t = 0 or α_t = 0 exactly.
    momentum: bool = True
    forgetting: bool = True
    # Gate biases at init: θ = max_lr*σ(0) = max_lr/2, η = σ(0) = 0.5, α = σ(-8) ≈ 3.4e-4 (a ~3000-token horizon).
    # Not σ(-4) ≈ 0.018: a bias-free MLP memory has a saddle at W = 0 (zero weights give zero gradients for depth
    # >= 2), and at that forgetting rate a depth-2 memory decayed into it within 4K tokens (|W| ~ 1e-12, measured).
    # torch.compile one chunk's step (its shapes are fixed per chunk size): the eager step is ~400 small kernels, so
    # on a GPU it is launch-bound. The first call of each chunk length compiles; plasticity capture runs eager.
    compile_inner_step: bool = False
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
