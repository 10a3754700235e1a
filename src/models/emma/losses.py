"""InfoNCE on memory reads (van den Oord et al. 2018, with the cosine/temperature form of SimCLR and MoCo).

For a read r with true prototype p⁺ among candidates P, ℓ = −log( exp(cos(r, p⁺)/τ) / Σ_j exp(cos(r, p_j)/τ) ),
which is the cross-entropy of cosine logits. Using the clean-up codebook as the candidate set makes the loss
"softmax clean-up + CE": it pushes the raw read towards its prototype and away from all others. Chance level
is ln |P|; since a read of k superposed pairs has cosine ≈ 1/√(k+1) to its value, capacity caps the
achievable margin at about (1/√(k+1))/τ.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from src.errors import EngramError


def info_nce(queries: Tensor, candidates: Tensor, targets: Tensor, temperature: float = 0.07) -> Tensor:
    """Mean InfoNCE of ``queries [N, d]`` against ``candidates [M, d]``; ``targets [N]`` index the positives."""
    if temperature <= 0:
        raise EngramError(f"InfoNCE temperature={temperature} must be > 0; typical values are 0.05-0.1.")
    logits = F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
    return F.cross_entropy(logits / temperature, targets)
