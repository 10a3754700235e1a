"""Next-token cross-entropy straight from hidden states, without the full ``[tokens, vocab]`` logits.

A 256k-token vocabulary (Gemma-2) makes the logits of a 4 x 2048 batch 8 GiB in fp32, plus as much again for their
gradient. :func:`chunked_linear_cross_entropy` projects ``chunk_size`` tokens at a time and, while a chunk's logits
exist, also takes their gradient and pushes it through the head: into the hidden states' gradient and an fp32
accumulator of the head's weight gradient (the approach of Liger-Kernel's fused linear cross-entropy, in plain torch).
The backward then only scales the stored gradients by the incoming one. At most one chunk's logits exist at a time
and the head's matmuls run three times per token, as without chunking; recomputing the logits in the backward
(checkpointing each chunk) would cost a fourth.

Numerics match ``F.cross_entropy`` on the full logits: each chunk's logits are taken in fp32 (as HF's loss upcasts)
and Gemma-2's final soft-capping ``cap * tanh(z / cap)`` is applied before the softmax. The matmuls run in the
ambient autocast dtype, as the head's own would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _loss_and_logit_grad(
    logits: torch.Tensor, labels: torch.Tensor, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of one chunk and its gradient with respect to the (uncapped) logits, in their dtype."""
    z = logits.float()
    if softcap is not None:
        capped = torch.tanh(z / softcap)
        z = softcap * capped
    valid = labels != IGNORE_INDEX
    target = labels.clamp_min(0).unsqueeze(1)
    log_probs = z.log_softmax(dim=-1)
    loss = -(log_probs.gather(1, target).squeeze(1) * valid).sum()
    grad = log_probs.exp().scatter_add(1, target, -torch.ones_like(target, dtype=z.dtype)) * valid.unsqueeze(1)
    if softcap is not None:
        grad = grad * (1 - capped * capped)
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_loss_and_logit_grad() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return torch.compile(_loss_and_logit_grad, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        softcap: float | None,
        chunk_size: int,
        compiled: bool,
    ) -> torch.Tensor:
        step = _compiled_loss_and_logit_grad() if compiled else _loss_and_logit_grad
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        )
        total = hidden.new_zeros((), dtype=torch.float32)
        # The head in the matmul dtype once, not once per chunk and product (autocast would cast it each time).
        device = hidden.device.type
        head = weight.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else weight
        for start in range(0, hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            logits = F.linear(hidden[part], head, bias)
            loss, grad = step(logits, labels[part], softcap)
            total += loss
            if grad_hidden is not None:
                grad_hidden[part] = grad @ head.to(grad.dtype)
            if grad_weight is not None:
                grad_weight += (grad.t() @ hidden[part].to(grad.dtype)).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        count = (labels != IGNORE_INDEX).sum()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, count)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / count  # as F.cross_entropy's mean: NaN when every label is ignored

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias, count = ctx.saved_tensors
        scale = grad_output / count
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
            None if grad_bias is None else (grad_bias * scale).to(bias_dtype),
            None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int = 4096,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` over the labels that are not -100.

    ``hidden`` is ``[..., d]`` and ``labels`` the matching ``[...]`` (already shifted for next-token prediction).
    ``compiled`` runs each chunk's softmax and gradient through ``torch.compile``, which fuses the fp32 cast,
    soft-capping, softmax and gradient into few passes over the chunk's logits.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels.reshape(-1), softcap, chunk_size, compiled)
