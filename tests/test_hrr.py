"""HRR operations against independent oracles: naive O(d²) loops, finite differences, closed-form capacity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.errors import EngramError
from src.models.emma import hrr


def naive_bind(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = a.shape[-1]
    return torch.stack([sum(a[k] * b[(j - k) % d] for k in range(d)) for j in range(d)])


def naive_correlate(key: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """(key # trace)_j = Σ_k key_k trace_{(k+j) mod d}."""
    d = key.shape[-1]
    return torch.stack([sum(key[k] * trace[(k + j) % d] for k in range(d)) for j in range(d)])


@pytest.mark.parametrize("d", [7, 16])
def test_bind_and_unbind_match_naive_loops(d: int) -> None:
    g = torch.Generator().manual_seed(d)
    a, b = torch.randn(2, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(hrr.bind(a, b), naive_bind(a, b))
    torch.testing.assert_close(hrr.unbind(b, a), naive_correlate(a, b))
    # unbinding is binding with the involution a†_j = a_{-j mod d}
    torch.testing.assert_close(hrr.involution(a), torch.stack([a[(-j) % d] for j in range(d)]))
    torch.testing.assert_close(hrr.unbind(b, a), naive_bind(hrr.involution(a), b))


@pytest.mark.parametrize("d", [8, 9])
def test_fft_gradients_match_finite_differences(d: int) -> None:
    """The hand-written FFT adjoints (even d has a Nyquist bin, odd d does not) against numerical Jacobians."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(hrr.bind, (a, b))
    assert torch.autograd.gradcheck(hrr.unbind, (a, b))
    assert torch.autograd.gradcheck(hrr.make_unitary, (a,))


def test_fft_runs_in_float32_under_autocast() -> None:
    a, b = torch.randn(2, 4, 64).unbind(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hrr.bind(a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hrr.bind(a.bfloat16().float(), b.bfloat16().float()))


def _mean_read_cosine(d: int, k: int, n_reads: int, unitary: bool, seed: int) -> float:
    """Bundle k key⊛value pairs per trace, unbind every key, return the mean cos(read, its value)."""
    g = torch.Generator().manual_seed(seed)
    trials = math.ceil(n_reads / k)
    keys = hrr.random_vectors(trials * k, d, unitary=unitary, generator=g).view(trials, k, d)
    values = hrr.random_vectors(trials * k, d, generator=g).view(trials, k, d)
    trace = hrr.bundle(hrr.bind(keys, values))  # [trials, d]
    reads = hrr.unbind(trace.unsqueeze(1), keys)  # [trials, k, d]
    return F.cosine_similarity(reads, values, dim=-1).mean().item()


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_capacity_gaussian_keys_involution(k: int) -> None:
    # Parseval: read·value ≈ 1 and ‖read‖² ≈ k+1, so cos ≈ 1/√(k+1) (k=1 gives 0.707, not 1).
    mean_cos = _mean_read_cosine(d=1024, k=k, n_reads=512, unitary=False, seed=k)
    assert abs(mean_cos - 1 / math.sqrt(k + 1)) < 0.02, (k, mean_cos)


def test_capacity_unitary_keys() -> None:
    assert _mean_read_cosine(d=1024, k=1, n_reads=64, unitary=True, seed=1) > 0.999
    # k > 1: the involution is the exact inverse, so only crosstalk is left: cos ≈ 1/√k.
    assert abs(_mean_read_cosine(d=1024, k=16, n_reads=512, unitary=True, seed=2) - 0.25) < 0.02


def test_unitary_projection_properties() -> None:
    x = torch.randn(5, 128, dtype=torch.float64)
    u = hrr.make_unitary(x)
    torch.testing.assert_close(torch.fft.rfft(u).abs(), torch.ones(5, 65, dtype=torch.float64), atol=1e-5, rtol=0)
    v = torch.randn(5, 128, dtype=torch.float64)
    torch.testing.assert_close(hrr.bind(u, v).norm(dim=-1), v.norm(dim=-1), atol=1e-4, rtol=0)  # norm-preserving


def test_cleanup_hard_and_soft() -> None:
    g = torch.Generator().manual_seed(3)
    protos = F.normalize(torch.randn(50, 256, generator=g), dim=-1)
    noisy = protos[[4, 17]] + 0.05 * torch.randn(2, 256, generator=g)
    hard, one_hot = hrr.cleanup(noisy, protos, mode="hard")
    torch.testing.assert_close(hard, protos[[4, 17]])
    assert one_hot.argmax(-1).tolist() == [4, 17]
    soft, weights = hrr.cleanup(noisy, protos, mode="soft", temperature=0.01)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    assert F.cosine_similarity(soft, protos[[4, 17]]).min() > 0.99
    with pytest.raises(EngramError, match="mode"):
        hrr.cleanup(noisy, protos, mode="fuzzy")  # type: ignore[arg-type]


def test_sharpen_top_k_and_temperature() -> None:
    sims = torch.tensor([[0.9, 0.1, 0.5, -0.2]])
    w = hrr.sharpen(sims, temperature=0.5, top_k=2)
    expected = torch.softmax(torch.tensor([0.9, 0.5]) / 0.5, dim=0)
    torch.testing.assert_close(w, torch.tensor([[expected[0], 0.0, expected[1], 0.0]]))
    # lower temperature, sharper weights; top_k=0 keeps everything
    assert hrr.sharpen(sims, 0.05)[0, 0] > hrr.sharpen(sims, 0.5)[0, 0]
    assert (hrr.sharpen(sims, 0.5, top_k=0) > 0).all()
    with pytest.raises(EngramError, match="temperature"):
        hrr.sharpen(sims, 0.0)


def test_hard_cleanup_passes_soft_gradient() -> None:
    protos = F.normalize(torch.randn(10, 32), dim=-1)
    read = torch.randn(3, 32, requires_grad=True)
    cleaned, _ = hrr.cleanup(read, protos, mode="hard", temperature=0.5)
    cleaned.sum().backward()
    assert read.grad is not None and read.grad.abs().sum() > 0
