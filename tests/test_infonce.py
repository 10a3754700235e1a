"""InfoNCE against the textbook formula and its known limits."""

from __future__ import annotations

import math

import pytest
import torch

from src.errors import EngramError
from src.models.emma.losses import info_nce


def naive_info_nce(queries: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor, tau: float) -> float:
    """−mean log( exp(cos(q, c⁺)/τ) / Σ_j exp(cos(q, c_j)/τ) ), one query at a time in float64."""
    total = 0.0
    for q, t in zip(queries.double(), targets.tolist(), strict=True):
        sims = [float(q @ c / (q.norm() * c.norm())) for c in candidates.double()]
        total += -math.log(math.exp(sims[t] / tau) / sum(math.exp(s / tau) for s in sims))
    return total / len(queries)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_matches_naive_formula(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    queries, candidates = torch.randn(6, 16, generator=g), torch.randn(9, 16, generator=g) * 3  # scale-invariant
    targets = torch.randint(0, 9, (6,), generator=g)
    assert info_nce(queries, candidates, targets, tau).item() == pytest.approx(
        naive_info_nce(queries, candidates, targets, tau), rel=1e-5
    )


def test_chance_level_and_perfect_reads() -> None:
    g = torch.Generator().manual_seed(1)
    candidates = torch.randn(64, 1024, generator=g)
    targets = torch.randint(0, 64, (512,), generator=g)
    random_reads = torch.randn(512, 1024, generator=g)
    assert info_nce(random_reads, candidates, targets, 1.0).item() == pytest.approx(math.log(64), rel=0.01)
    assert info_nce(candidates[targets], candidates, targets, 0.01).item() < 1e-3


def test_rejects_non_positive_temperature() -> None:
    with pytest.raises(EngramError, match="temperature"):
        info_nce(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), 0.0)
