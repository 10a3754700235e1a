"""FLOP accounting for throughput and MFU: the training FLOPs a model spends per token, and the dense peak of the
device it runs on.

Training FLOPs follow the usual matmul count (Kaplan et al. 2020; PaLM appendix B): a weight used in a matmul costs
2 FLOPs per token forward, 2 for the gradient of its input and 2 for its own gradient, so ``6·N`` for a fully trained
model and ``4·N_frozen + 6·N_trained`` when part of it is frozen (LoRA). Embedding tables are lookups, not matmuls, and
count only where the same weight is also the output head (tied). Attention's score and value products add
``6·L·T·d_attn`` per token for causal attention over ``T`` tokens. Recomputation (activation checkpointing) is not
counted, as MFU conventionally does not count it.

The peak is the dense (no 2:4 sparsity) tensor-core figure: Lightning's table lists H100/H200 bf16 with sparsity
and has no H200 entry, so those chips get their dense datasheet numbers here and other chips Lightning's table.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch import nn

# Dense tensor-core FLOP/s of the H100 SXM and the H200 (same compute die), by compute dtype.
_HOPPER_DENSE = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tf32": 494.7e12, torch.float32: 66.9e12}


def matmul_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trained, frozen)`` parameter counts of the weights that take part in matmuls: every parameter except
    embedding tables, unless an embedding's weight is also a linear layer's (a tied output head)."""
    # Parameters through .parameters(), never the .weight attribute: under a parametrization (spectral norm in a
    # DEQ) reading .weight computes it, and a training-mode spectral norm would take a power-iteration step.
    in_linears = {id(p) for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    lookups = {
        id(p)
        for m in module.modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag)
        for p in m.parameters()
        if id(p) not in in_linears
    }
    trained = frozen = 0
    for param in module.parameters():  # each shared parameter once
        if id(param) in lookups:
            continue
        if param.requires_grad:
            trained += param.numel()
        else:
            frozen += param.numel()
    return trained, frozen


def training_flops_per_token(module: nn.Module) -> float:
    """Matmul FLOPs of one training token (forward and backward), attention's scores excluded."""
    trained, frozen = matmul_parameters(module)
    return 6.0 * trained + 4.0 * frozen


def causal_attention_flops_per_token(layers: int, seq_len: int, width: int) -> float:
    """``Q·Kᵀ`` and ``P·V`` forward and backward, averaged over the causal positions of a ``seq_len`` sequence."""
    return 6.0 * layers * seq_len * width


def dense_peak_flops(device: torch.device, compute_dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of ``device`` for matmuls in ``compute_dtype``; None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    if "h100" in name or "h200" in name:
        key: torch.dtype | str = compute_dtype
        if compute_dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            key = "tf32"
        return _HOPPER_DENSE.get(key)
    peak = get_available_flops(device, compute_dtype)
    return float(peak) if peak else None
