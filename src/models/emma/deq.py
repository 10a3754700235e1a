"""Deep equilibrium solving: find z* = f(z*), then differentiate through z* without storing the solver's steps.

Forward solvers (under ``no_grad``): plain fixed-point iteration and Anderson acceleration. Both work on the
state flattened per sample, stop when every sample's relative residual ‖f(z) − z‖ / ‖z‖ is below ``tol`` (or at
``max_iter``), and return each sample's lowest-residual iterate with its statistics.

Gradients:

* ``implicit``: the implicit-function theorem. With J = ∂f/∂z at z*, dL/dθ = g ᵀ ∂f/∂θ where g solves
  g = Jᵀ g + dL/dz*; g is found by the same fixed-point solver using vector-Jacobian products, inside a hook on
  the output. Exact up to the solver tolerances; memory does not grow with the number of forward iterations.
* ``phantom``: k damped unrolled steps z ← τ f(z) + (1 − τ) z from the detached fixed point (Geng et al. 2021);
  k = 1, τ = 1 is the "one-step" / Jacobian-free gradient. Cheaper and often more stable in training.

Both need f to be a contraction for the fixed point to exist uniquely and for g to converge; the EMMA cell
guarantees that by construction (see ``model.DEQCell``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from src.models.config_checks import OVERRIDES_KEY, check_fields

Map = Callable[[Tensor], Tensor]


@dataclass
class SolverStats:
    """Per-sample convergence of one solve (tensors of shape ``[B]``) and the number of f evaluations."""

    abs_residual: Tensor  # ‖f(z) − z‖ at the returned iterate
    rel_residual: Tensor  # abs_residual / ‖z‖
    nstep: Tensor  # iteration at which the returned (lowest-residual) iterate was reached
    iterations: int  # iterations actually run (the same for the whole batch)


def _residuals(fz: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    abs_res = (fz - z).norm(dim=1)
    return abs_res, abs_res / (z.norm(dim=1) + 1e-12)


class _Best:
    """Keeps each sample's lowest-residual iterate seen so far."""

    def __init__(self, z: Tensor) -> None:
        self.z = z.clone()
        self.abs = torch.full((z.shape[0],), float("inf"), dtype=z.dtype, device=z.device)
        self.rel = self.abs.clone()
        self.step = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)

    def update(self, z: Tensor, abs_res: Tensor, rel_res: Tensor, step: int) -> None:
        better = rel_res < self.rel
        self.z[better] = z[better]
        self.abs = torch.where(better, abs_res, self.abs)
        self.rel = torch.where(better, rel_res, self.rel)
        self.step = torch.where(better, torch.full_like(self.step, step), self.step)

    def stats(self, iterations: int) -> SolverStats:
        return SolverStats(self.abs, self.rel, self.step, iterations)


def fixed_point_iter(f: Map, z0: Tensor, max_iter: int = 50, tol: float = 1e-3) -> tuple[Tensor, SolverStats]:
    """Iterate z ← f(z) on ``[B, n]`` states; converges linearly at the contraction rate of f."""
    z, best = z0, _Best(z0)
    for step in range(max_iter):
        fz = f(z)
        abs_res, rel_res = _residuals(fz, z)
        best.update(z, abs_res, rel_res, step)
        if best.rel.max() < tol:
            return best.z, best.stats(step + 1)
        z = fz
    return best.z, best.stats(max_iter)


def anderson(
    f: Map, z0: Tensor, max_iter: int = 50, tol: float = 1e-3, m: int = 5, lam: float = 1e-4, beta: float = 1.0
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration (type II) on ``[B, n]`` states.

    Each step mixes the last ``m`` iterates with weights α that minimise ‖Σ α_i (f(x_i) − x_i)‖ subject to
    Σ α_i = 1 (a bordered least-squares system, Tikhonov-regularised by ``lam`` relative to its scale), then damps with ``beta``.
    The small (m+1)×(m+1) systems are solved in float64 so half-precision states cannot make them singular.
    """
    bsz, n = z0.shape
    xs = z0.new_zeros(bsz, m, n)
    fs = z0.new_zeros(bsz, m, n)
    best = _Best(z0)
    xs[:, 0], fs[:, 0] = z0, f(z0)
    best.update(z0, *_residuals(fs[:, 0], z0), 0)
    if max_iter < 2 or best.rel.max() < tol:
        return best.z, best.stats(1)
    xs[:, 1], fs[:, 1] = fs[:, 0], f(fs[:, 0])
    best.update(xs[:, 1], *_residuals(fs[:, 1], xs[:, 1]), 1)
    for step in range(2, max_iter):
        if best.rel.max() < tol:
            return best.z, best.stats(step)
        k = min(step, m)
        g = (fs[:, :k] - xs[:, :k]).double()
        system = torch.zeros(bsz, k + 1, k + 1, dtype=torch.float64, device=z0.device)
        system[:, 0, 1:] = 1.0
        system[:, 1:, 0] = 1.0
        gram = g @ g.transpose(1, 2)
        # Tikhonov term relative to the Gram scale: an absolute lam would dominate once residuals are small
        # and stall the method at tight tolerances.
        scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(1e-30)[:, None, None]
        system[:, 1:, 1:] = gram + lam * scale * torch.eye(k, dtype=torch.float64, device=z0.device)
        rhs = torch.zeros(bsz, k + 1, 1, dtype=torch.float64, device=z0.device)
        rhs[:, 0] = 1.0
        alpha = torch.linalg.solve(system, rhs)[:, 1:, 0].to(z0.dtype)  # [B, k]
        x_new = beta * torch.einsum("bk,bkn->bn", alpha, fs[:, :k])
        if beta != 1.0:
            x_new = x_new + (1 - beta) * torch.einsum("bk,bkn->bn", alpha, xs[:, :k])
        slot = step % m
        xs[:, slot], fs[:, slot] = x_new, f(x_new)
        best.update(x_new, *_residuals(fs[:, slot], x_new), step)
    return best.z, best.stats(max_iter)


SOLVERS: dict[str, Callable[..., tuple[Tensor, SolverStats]]] = {"fixed_point": fixed_point_iter, "anderson": anderson}


# The domain of every numeric setting (the Literal choices are checked from the annotations).
DEQ_RANGES = {
    "max_iter": ">= 1",
    "tol": "> 0",
    "anderson_m": ">= 2",  # the history holds at least the first two iterates
    "phantom_steps": ">= 1",
    "phantom_tau": "in (0, 1]",
    "backward_max_iter": ">= 1",
    "backward_tol": "> 0",
}


@dataclass
class DEQSettings:
    """How to solve and differentiate one equilibrium."""

    solver: Literal["fixed_point", "anderson"] = "anderson"
    max_iter: int = 30
    tol: float = 1e-3
    anderson_m: int = 5
    grad: Literal["implicit", "phantom"] = "phantom"
    phantom_steps: int = 1  # k unrolled steps for the phantom gradient
    phantom_tau: float = 1.0  # damping τ of those steps
    backward_max_iter: int = 30  # implicit gradient: fixed-point solve of g = Jᵀg + dL/dz*
    backward_tol: float = 1e-4

    def __post_init__(self) -> None:
        check_fields(self, DEQ_RANGES, f"{OVERRIDES_KEY}.deq")


def _solve(f: Map, z0: Tensor, settings: DEQSettings) -> tuple[Tensor, SolverStats]:
    kwargs = {"m": settings.anderson_m} if settings.solver == "anderson" else {}
    return SOLVERS[settings.solver](f, z0, max_iter=settings.max_iter, tol=settings.tol, **kwargs)


def deq_fixed_point(f: Map, z0: Tensor, settings: DEQSettings) -> tuple[Tensor, SolverStats]:
    """Solve z* = f(z*) for a state of any shape ``[B, ...]`` and attach the chosen gradient.

    ``f`` closes over its input injection and parameters; it is called on the unflattened state. Without grad
    mode (evaluation) the result is the solver's iterate, detached.
    """
    shape = z0.shape

    def flat_f(z: Tensor) -> Tensor:
        return f(z.view(shape)).reshape(shape[0], -1)

    with torch.no_grad():
        z_star, stats = _solve(flat_f, z0.reshape(shape[0], -1), settings)
    z_star = z_star.view(shape)
    if not torch.is_grad_enabled():
        return z_star, stats

    if settings.grad == "phantom":
        z = z_star
        for _ in range(settings.phantom_steps):
            z = settings.phantom_tau * f(z) + (1 - settings.phantom_tau) * z
        return z, stats

    # Implicit: one differentiable step re-attaches θ; the hook swaps the incoming dL/dz for (I − Jᵀ)⁻¹ dL/dz.
    z = f(z_star)
    if not z.requires_grad:
        return z, stats
    z_leaf = z_star.detach().requires_grad_()
    f_leaf = f(z_leaf)

    def implicit_hook(grad: Tensor) -> Tensor:
        def adjoint(g: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(f_leaf, z_leaf, g.view(shape), retain_graph=True)
            return vjp.reshape(shape[0], -1) + grad.reshape(shape[0], -1)

        g, _ = fixed_point_iter(adjoint, grad.reshape(shape[0], -1), settings.backward_max_iter, settings.backward_tol)
        return g.view(shape)

    z.register_hook(implicit_hook)
    return z, stats
