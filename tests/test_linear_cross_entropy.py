"""The chunked linear cross-entropy equals the plain loss on full logits (value and gradients), alone and inside
CausalLM, and gradient checkpointing changes no number."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.lightning_modules import CausalLM
from src.models.components.linear_cross_entropy import IGNORE_INDEX, chunked_linear_cross_entropy
from src.models.hf_causal_lm import is_activation_checkpointing


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool((a - b).norm() <= rel * b.norm())


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk_size", [7, 1000], ids=["chunks", "one-chunk"])
def test_matches_cross_entropy_of_full_logits(softcap: float | None, chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(101, 16, generator=gen, requires_grad=True)
    bias = torch.randn(101, generator=gen, requires_grad=True)
    labels = torch.randint(0, 101, (3, 37), generator=gen)
    labels[0, :5] = IGNORE_INDEX  # padding and prompt tokens are ignored

    # The oracle: full logits in float64.
    logits = F.linear(hidden.double(), weight.double(), bias.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    expected_grads = torch.autograd.grad(expected, (hidden, weight, bias))

    loss = chunked_linear_cross_entropy(hidden, weight, labels, bias, softcap, chunk_size)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert abs(loss.item() - expected.item()) <= 1e-4 * abs(expected.item())
    for got, want in zip(grads, expected_grads, strict=True):
        assert _close(got.double(), want)


def _tiny(preset: str, **kwargs: object) -> CausalLM:
    torch.manual_seed(0)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if preset.startswith("gpt2") else {}
    return CausalLM(64, preset=preset, config_overrides=no_dropout, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", ["gemma2-tiny", "gpt2-tiny", "llama-tiny"])
def test_causal_lm_training_loss_is_unchanged(preset: str) -> None:
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    results = []
    for kwargs in ({}, {"loss_chunk_size": 10}, {"gradient_checkpointing": True, "loss_chunk_size": 10}):
        model = _tiny(preset, **kwargs).train()
        assert is_activation_checkpointing(model.model) == bool(kwargs.get("gradient_checkpointing"))
        loss = model.lm_loss(ids, labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (plain, plain_grads), *others = results
    for loss, grads in others:
        assert abs(loss.item() - plain.item()) <= 1e-4 * abs(plain.item())
        assert len(grads) == len(plain_grads)
        for got, want in zip(grads, plain_grads, strict=True):
            assert _close(got, want, 1e-3)  # fp32 through a whole model: sums in another order
