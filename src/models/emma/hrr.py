"""Holographic Reduced Representations (Plate 1995): bind, unbind, bundle, clean-up, read sharpening.

Vectors live in R^d. Binding is circular convolution, computed as ``irfft(rfft(a) * rfft(b), n=d)``; unbinding
is circular correlation, i.e. binding with the involution ``a†_j = a_{(-j) mod d}``, whose spectrum is
``conj(rfft(a))``. For Gaussian keys the involution is only an approximate inverse: one stored pair reads back
with cosine ≈ 1/√2 and k superposed pairs with ≈ 1/√(k+1). Unitary keys (|rfft(a)| = 1 at every frequency)
make the involution the exact inverse, so a single pair comes back exactly and k pairs give ≈ 1/√k.

Every FFT runs in float32 (float64 if the inputs are float64) with autocast switched off: cuFFT has no bf16
kernels and fp16 only for power-of-two sizes, and half-precision phase errors would swamp the small HRR signal.
Results are returned in that compute dtype; callers cast back if they need to.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from src.errors import EngramError


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def no_autocast(device: torch.device) -> torch.autocast:
    """A context that switches autocast off on ``device`` (HRR and equilibrium maths run in float32)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _hermitian_weights(d: int, like: Tensor) -> Tensor:
    """How often each rfft bin appears in the full spectrum: 1 for DC (and Nyquist when d is even), else 2."""
    w = torch.full((d // 2 + 1,), 2.0, dtype=like.real.dtype, device=like.device)
    w[0] = 1.0
    if d % 2 == 0:
        w[-1] = 1.0
    return w


class _RFFT(torch.autograd.Function):
    """``rfft`` with an explicit adjoint. PyTorch's own backward zero-pads to a full complex FFT and runs ~10×
    slower than the forward on CPU; the adjoint of a real-to-half-spectrum DFT is ``d · irfft(G / w)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.d = x.shape[-1]
        return torch.fft.rfft(x, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.fft.irfft(grad / _hermitian_weights(ctx.d, grad), n=ctx.d, dim=-1) * ctx.d


class _IRFFT(torch.autograd.Function):
    """``irfft(·, n=d)`` with the explicit adjoint ``rfft(g) · w / d``."""

    @staticmethod
    def forward(ctx: Any, spectrum: Tensor, d: int) -> Tensor:
        ctx.d = d
        return torch.fft.irfft(spectrum, n=d, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return torch.fft.rfft(grad, dim=-1) * (_hermitian_weights(ctx.d, grad) / ctx.d), None


def rfft(x: Tensor) -> Tensor:
    """Half spectrum of real ``x`` over the last dim, in float32 (float64 stays float64), autocast off."""
    with no_autocast(x.device):
        return _RFFT.apply(x.to(_compute_dtype(x)))


def irfft(spectrum: Tensor, d: int) -> Tensor:
    """Real signal of length ``d`` from a half spectrum (inverse of ``rfft``), autocast off."""
    with no_autocast(spectrum.device):
        return _IRFFT.apply(spectrum, d)


def bind(a: Tensor, b: Tensor) -> Tensor:
    """Circular convolution ``(a ⊛ b)_j = Σ_k a_k b_{(j-k) mod d}`` over the last dim (broadcasting)."""
    dtype = _compute_dtype(a, b)
    return irfft(rfft(a.to(dtype)) * rfft(b.to(dtype)), a.shape[-1])


def unbind(trace: Tensor, key: Tensor) -> Tensor:
    """Read ``key† ⊛ trace`` (circular correlation): the value bound to ``key`` plus crosstalk noise."""
    dtype = _compute_dtype(trace, key)
    return irfft(rfft(trace.to(dtype)) * rfft(key.to(dtype)).conj(), trace.shape[-1])


def involution(a: Tensor) -> Tensor:
    """The approximate inverse ``a†_j = a_{(-j) mod d}``: an index permutation (flip, then roll by one)."""
    return torch.roll(torch.flip(a, dims=(-1,)), shifts=1, dims=-1)


def make_unitary(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Project onto unitary vectors, ``F⁻¹(F(x) / √(|F(x)|² + eps²))``: the involution becomes the exact inverse.

    ``eps`` keeps the division, and its gradient, finite where a frequency bin is (nearly) zero.
    """
    spectrum = rfft(x)
    magnitude = torch.sqrt(spectrum.real.square() + spectrum.imag.square() + eps**2)
    return irfft(spectrum / magnitude, x.shape[-1])


def random_vectors(
    n: int,
    d: int,
    *,
    unitary: bool = False,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` random HRR vectors with i.i.d. N(0, 1/d) entries (E‖x‖² = 1), or their unitary projections."""
    x = torch.randn(n, d, generator=generator, dtype=dtype) / d**0.5
    return make_unitary(x) if unitary else x


def bundle(x: Tensor, dim: int = -2) -> Tensor:
    """Superposition: the plain sum along ``dim`` (no normalisation; reads are compared by cosine)."""
    return x.sum(dim=dim)


def cosine_matrix(x: Tensor, prototypes: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of every row of ``x`` ``[..., d]`` with every prototype ``[M, d]`` → ``[..., M]``."""
    return F.normalize(x, dim=-1, eps=eps) @ F.normalize(prototypes, dim=-1, eps=eps).transpose(0, 1)


def sharpen(similarity: Tensor, temperature: float, top_k: int = 0) -> Tensor:
    """Read sharpening: softmax(similarity / temperature) over the ``top_k`` best entries only (0 = all).

    The entries outside the top-k get weight exactly 0, so a noisy read cannot smear over the whole codebook.
    """
    if temperature <= 0:
        raise EngramError(f"clean-up temperature={temperature} must be > 0; use e.g. 0.1.")
    logits = similarity / temperature
    if 0 < top_k < similarity.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(dim=-1)


def cleanup(
    read: Tensor,
    prototypes: Tensor,
    *,
    mode: Literal["hard", "soft"] = "soft",
    temperature: float = 0.1,
    top_k: int = 0,
) -> tuple[Tensor, Tensor]:
    """Map noisy reads ``[..., d]`` onto the prototype codebook ``[M, d]``.

    ``hard``: the prototype with the highest cosine (argmax). In training the forward value is that prototype and
    the gradient is the soft clean-up's (straight-through), so the read path still learns.
    ``soft``: the sharpened softmax mixture ``sharpen(cos, temperature, top_k) @ prototypes``.

    Returns ``(cleaned [..., d], weights [..., M])``; ``weights`` is one-hot for ``hard``.
    """
    sims = cosine_matrix(read, prototypes)
    weights = sharpen(sims, temperature, top_k)
    if mode == "soft":
        return weights @ prototypes, weights
    if mode == "hard":
        one_hot = F.one_hot(sims.argmax(dim=-1), prototypes.shape[0]).to(weights.dtype)
        one_hot = one_hot + weights - weights.detach()  # straight-through: hard value, soft gradient
        return one_hot @ prototypes, one_hot
    raise EngramError(f"clean-up mode={mode!r} is unknown; use 'hard' or 'soft'.")


def key_collisions(keys: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Collision telemetry for sets of keys ``[B, n, d]`` with write weights ``[B, n]``.

    For independent random keys cos(k_i, k_j) ~ N(0, 1/d), so |cos| > 3/√d happens for 0.27% of pairs and
    E|cos| = √(2/(πd)). Returns, over distinct pairs weighted by w_i·w_j: the fraction with |cos| > 3/√d, and
    the mean |cos| minus √(2/(πd)). Both are comparable across d; ≈ (0.0027, 0) means no more collisions than
    chance.
    """
    d = keys.shape[-1]
    unit = F.normalize(keys.float(), dim=-1)
    abs_cos = (unit @ unit.transpose(1, 2)).abs()
    pair_w = weights.unsqueeze(2) * weights.unsqueeze(1)
    pair_w = pair_w * (1 - torch.eye(keys.shape[1], device=keys.device, dtype=pair_w.dtype))
    total = pair_w.sum().clamp_min(1e-12)
    frac = (pair_w * (abs_cos > 3 / d**0.5)).sum() / total
    excess = (pair_w * abs_cos).sum() / total - (2 / (torch.pi * d)) ** 0.5
    return frac, excess
