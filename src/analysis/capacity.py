"""The Morris et al. (2025) capacity estimator and the Mem-Absorption spike detector, as pure functions.

**Memorized bits** of a set of sequences, each of ``S`` tokens drawn i.i.d. uniformly from a vocabulary of ``V``
symbols (the model's whole vocabulary, or a sub-vocabulary ``[offset, offset + V)`` of it)::

    M = Σ_x max(0, S·log2 V − ℓ(x))        ℓ(x) = code length of x under the model, in bits

``S·log2 V`` is the exact code length of ``x`` under the true (uniform) distribution, so each term is the number of
bits the model saves on ``x``: what it has stored about that particular sequence. ``M ≤ N·S·log2 V`` (the data's
information) always holds. Conventions (``sequence_code_bits``):

* The first token has no context and is charged ``log2 V`` bits (no BOS token), so the model's parameter count is
  the paper's (GPT-2 with ``n_positions = S``) and ``M ≤ N·(S−1)·log2 V`` in practice.
* ``restrict=True`` (default) renormalises the model's distribution over the sub-vocabulary before taking the
  log-probability: still a valid code (the decoder knows the sub-vocabulary), and a model with uniform output over
  ``V`` scores exactly 0. With ``restrict=False`` the full-vocabulary probability is used, an upper bound on that.
* Log-softmax is computed in float32 whatever the model's dtype.

**Parameter counting rule** (``count_parameters``): P is the number of distinct scalar weights of the model, all of
them (trainable or not, embeddings and position tables included); a tensor shared by several modules (tied input
and output embeddings) counts once; 4-bit quantised weights count at their logical (unpacked) size. For HF GPT-2
with tied embeddings this is ``P = V·d + S·d + L·(12d² + 13d) + 2d`` (``gpt2_parameter_count``), which reproduces
the paper's parameter counts. Bits per parameter ``α = M / P``; the paper's capacity is ≈3.6 bits/parameter
(3.51 in bf16, 3.83 in fp32; ``alert_threshold`` by the weights' storage width, ``weight_bits``).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# Bits per parameter at which a model is at its capacity (Morris et al. 2025, §3.4): bf16 3.51, fp32 3.83, ≈3.6
# averaged over precisions.
CAPACITY_BPP_DEFAULT, CAPACITY_BPP_HALF, CAPACITY_BPP_FP32 = 3.6, 3.5, 3.8


def information_bits(num_sequences: int, seq_len: int, vocab_size: int) -> float:
    """H(D) = N·S·log2 V: the information in ``num_sequences`` uniform random sequences."""
    return num_sequences * seq_len * math.log2(vocab_size)


def sequence_code_bits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    vocab_offset: int = 0,
    vocab_size: int | None = None,
    restrict: bool = True,
) -> torch.Tensor:
    """Code length in bits of each sequence under the model (conventions in the module docstring).

    Args:
        logits: ``[N, S, V_model]``; ``logits[:, t]`` is the model's prediction of ``tokens[:, t + 1]``.
        tokens: ``[N, S]`` token ids, all in ``[vocab_offset, vocab_offset + vocab_size)``.
        vocab_offset: first id of the sub-vocabulary the tokens were drawn from.
        vocab_size: its size ``V``; default: the model's whole vocabulary.
        restrict: renormalise over the sub-vocabulary (see the module docstring).

    Returns:
        ``[N]`` float32: ``log2 V + Σ_{t≥1} −log2 p(x_t | x_<t)``.
    """
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    vocab = vocab_size or logits.shape[-1]
    pred = logits[:, :-1].float()
    target = tokens[:, 1:]
    if restrict:
        pred = pred[..., vocab_offset : vocab_offset + vocab]
        target = target - vocab_offset
    log_probs = torch.log_softmax(pred, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return math.log2(vocab) - log_probs.sum(dim=1) / math.log(2)


def memorized_bits(code_bits: torch.Tensor, seq_len: int, vocab_size: int) -> torch.Tensor:
    """Per-sequence memorization ``max(0, S·log2 V − ℓ(x))`` in bits."""
    return (seq_len * math.log2(vocab_size) - code_bits).clamp_min(0.0)


def count_parameters(model: nn.Module) -> int:
    """P by the rule in the module docstring: every distinct weight once, quantised weights at logical size."""
    total = 0
    for param in model.parameters():  # ``parameters()`` yields a shared (tied) tensor once
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit packs two weights per byte
        total += math.prod(quant_state.shape) if quant_state is not None else param.numel()
    return total


def gpt2_parameter_count(vocab_size: int, n_positions: int, n_layer: int, n_embd: int, tied: bool = True) -> int:
    """Closed form of ``count_parameters`` for HF GPT-2: embeddings V·d + S·d, per block 12d² + 13d (attention
    4d² + 4d, MLP 8d² + 5d, two LayerNorms 4d), final LayerNorm 2d, plus V·d for an untied output head."""
    d = n_embd
    return vocab_size * d + n_positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d + (0 if tied else vocab_size * d)


def weight_bits(model: nn.Module) -> float:
    """Mean storage bits per weight (32 for fp32, 16 for bf16, ~4 for a 4-bit model): what its capacity depends on."""
    stored = sum(p.numel() * p.element_size() * 8 for p in model.parameters())
    return stored / max(1, count_parameters(model))


def alert_threshold(bits_per_weight: float) -> float:
    """Capacity in bits per parameter for weights of that storage width: 3.8 for (mostly) fp32, 3.5 for (mostly)
    bf16/fp16, 3.6 for anything else (e.g. 4-bit); ``weight_bits`` gives the width."""
    if bits_per_weight >= 24:
        return CAPACITY_BPP_FP32
    if bits_per_weight >= 12:
        return CAPACITY_BPP_HALF
    return CAPACITY_BPP_DEFAULT


class SpikeDetector:
    """One-sided rolling z-score: ``z = (x − mean) / std`` over the previous ``window`` values; a spike is
    ``z > z_threshold`` once at least ``min_history`` values are known. Every value, spike or not, joins the window.
    A flat history (std 0) gives z = +inf for any larger value, 0 for an equal one. ``state_dict`` round-trips."""

    def __init__(self, window: int = 20, z_threshold: float = 3.0, min_history: int = 5) -> None:
        if window < 2 or not 2 <= min_history <= window:
            raise ValueError(f"need window >= 2 and 2 <= min_history <= window (got {window}, {min_history})")
        self.window = window
        self.z_threshold = z_threshold
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> tuple[float | None, bool]:
        """Score ``value`` against the history, then add it; returns ``(z or None while warming up, is_spike)``."""
        z: float | None = None
        if len(self.history) >= self.min_history:
            mean, std = statistics.fmean(self.history), statistics.stdev(self.history)
            flat = math.copysign(math.inf, value - mean) if value != mean else 0.0
            z = (value - mean) / std if std > 0 else flat
        self.history.append(float(value))
        return z, z is not None and z > self.z_threshold

    def scan(self, values: Iterable[float]) -> list[tuple[float | None, bool]]:
        """``update`` over a whole series (post-hoc analysis of a telemetry series)."""
        return [self.update(v) for v in values]

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.window)
