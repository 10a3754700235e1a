"""Next-token cross-entropy straight from hidden states, without the full ``[tokens, vocab]`` logits.

A 256k-token vocabulary (Gemma-2) makes the logits of a 4 x 2048 batch 8 GiB in fp32, plus as much again for their
gradient. :func:`chunked_linear_cross_entropy` projects ``chunk_size`` tokens at a time and checkpoints each chunk
(``torch.utils.checkpoint``): the forward keeps only the chunk's loss, the backward recomputes that chunk's logits,
so at most one chunk's logits exist at a time. The price is the head's matmul once more in the backward.

Numerics match ``F.cross_entropy`` on the full logits: each chunk's logits are taken in fp32 (as HF's loss upcasts)
and Gemma-2's final soft-capping ``cap * tanh(z / cap)`` is applied before the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` over the labels that are not -100.

    ``hidden`` is ``[..., d]`` and ``labels`` the matching ``[...]`` (already shifted for next-token prediction).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        total = total + checkpoint(
            _chunk_loss_sum, hidden[part], weight, bias, labels[part], softcap, use_reentrant=False
        )
    # As F.cross_entropy's mean: NaN when every label is ignored.
    return total / (labels != IGNORE_INDEX).sum()
