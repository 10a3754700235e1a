"""DEQ solvers and gradients: fixed-point residuals, implicit/phantom gradients vs finite differences, contraction."""

from __future__ import annotations

import pytest
import torch

from src.errors import EngramError
from src.models.emma.deq import DEQSettings, anderson, deq_fixed_point, fixed_point_iter
from src.models.emma.model import DEQCell


def _contractive_problem(n: int = 6, bsz: int = 3, lip: float = 0.8, seed: int = 0):
    """f(z) = tanh(W z + x) with ‖W‖₂ = lip < 1, in float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g, dtype=torch.float64)
    w = (lip * w / torch.linalg.matrix_norm(w, ord=2)).requires_grad_()
    x = torch.randn(bsz, n, generator=g, dtype=torch.float64, requires_grad=True)
    return w, x


def _f(w: torch.Tensor, x: torch.Tensor):
    return lambda z: torch.tanh(z @ w.T + x)


@pytest.mark.parametrize("solver", [fixed_point_iter, anderson])
def test_solver_reaches_fixed_point(solver) -> None:
    w, x = _contractive_problem(n=32, bsz=4, lip=0.95)
    f = _f(w.detach(), x.detach())
    z, stats = solver(f, torch.zeros_like(x), max_iter=200, tol=1e-5)
    rel = (f(z) - z).norm(dim=1) / z.norm(dim=1)
    assert rel.max() < 1e-3
    torch.testing.assert_close(stats.rel_residual, rel)
    assert stats.iterations < 200


def test_anderson_needs_fewer_iterations_than_plain_iteration() -> None:
    # A slow contraction: symmetric W with spectral radius 0.97, so plain iteration gains only 3% per step.
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    w = q @ torch.diag(torch.linspace(-0.97, 0.97, 32, dtype=torch.float64)) @ q.T
    x = torch.randn(4, 32, generator=g, dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:  # linear, so no tanh saturation speeds up the plain iteration
        return z @ w.T + x

    z_plain, plain = fixed_point_iter(f, torch.zeros_like(x), max_iter=2000, tol=1e-6)
    z_accel, accel = anderson(f, torch.zeros_like(x), max_iter=2000, tol=1e-6)
    assert accel.rel_residual.max() < 1e-6 and plain.rel_residual.max() < 1e-6
    assert accel.iterations * 3 < plain.iterations
    z_exact = torch.linalg.solve(torch.eye(32, dtype=torch.float64) - w, x.T).T  # closed form of z = Wz + x
    for z in (z_accel, z_plain):
        assert ((z - z_exact).norm(dim=1) / z_exact.norm(dim=1)).max() < 1e-4


def _objective(settings: DEQSettings, w: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    z, _ = deq_fixed_point(_f(w, x), torch.zeros_like(x), settings)
    return (z * weights).sum()


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_implicit_gradient_matches_finite_differences(solver: str) -> None:
    w, x = _contractive_problem()
    weights = torch.randn_like(x)
    settings = DEQSettings(
        solver=solver, max_iter=500, tol=1e-12, grad="implicit", backward_max_iter=500, backward_tol=1e-12
    )
    grad_w, grad_x = torch.autograd.grad(_objective(settings, w, x, weights), (w, x))

    eps = 1e-6
    for param, grad in ((w, grad_w), (x, grad_x)):
        fd = torch.zeros_like(param)
        flat = fd.view(-1)
        for i in range(param.numel()):
            delta = torch.zeros_like(param).view(-1)
            delta[i] = eps
            delta = delta.view_as(param)
            with torch.no_grad():
                args_plus = (w + delta, x) if param is w else (w, x + delta)
                args_minus = (w - delta, x) if param is w else (w, x - delta)
                flat[i] = (_objective(settings, *args_plus, weights) - _objective(settings, *args_minus, weights)) / (
                    2 * eps
                )
        torch.testing.assert_close(grad, fd, atol=1e-7, rtol=1e-6)


def test_phantom_gradient_is_one_unrolled_step() -> None:
    """Phantom (k=1, τ=1) = the gradient of f(z*) with z* held constant: an approximation, close but not equal."""
    w, x = _contractive_problem()
    weights = torch.randn_like(x)
    exact = torch.autograd.grad(
        _objective(DEQSettings(max_iter=500, tol=1e-12, grad="implicit", backward_tol=1e-12), w, x, weights), w
    )[0]
    phantom = torch.autograd.grad(_objective(DEQSettings(max_iter=500, tol=1e-12), w, x, weights), w)[0]
    with torch.no_grad():
        z_star, _ = fixed_point_iter(_f(w, x), torch.zeros_like(x), max_iter=500, tol=1e-12)
    one_step = torch.autograd.grad((_f(w, x)(z_star) * weights).sum(), w)[0]
    torch.testing.assert_close(phantom, one_step)
    cos = torch.nn.functional.cosine_similarity(phantom.flatten(), exact.flatten(), dim=0)
    assert 0.5 < cos < 0.9999


def test_eval_mode_returns_detached_fixed_point() -> None:
    w, x = _contractive_problem()
    with torch.no_grad():
        z, stats = deq_fixed_point(_f(w, x), torch.zeros_like(x), DEQSettings(tol=1e-6, max_iter=100))
    assert not z.requires_grad and stats.rel_residual.max() < 1e-6


def test_spectral_normed_cell_is_contractive() -> None:
    torch.manual_seed(0)
    d_model, seq_len, gamma = 8, 6, 0.9
    cell = DEQCell(d_model, kernel=3, contraction=gamma).double()
    with torch.no_grad():  # make the raw weight large: the normalisation, not the init, must keep the bound
        cell.mix.parametrizations.weight.original.mul_(50.0)
    for _ in range(20):  # training-mode forwards run the power iteration that tracks σ(W)
        cell(
            torch.randn(1, seq_len, d_model, dtype=torch.float64),
            torch.zeros(1, seq_len, d_model).double(),
            torch.ones(1, seq_len),
        )
    injection = torch.randn(1, seq_len, d_model, dtype=torch.float64)
    mask = torch.ones(1, seq_len, dtype=torch.float64)
    cell.eval()
    jac = torch.autograd.functional.jacobian(
        lambda z: cell(z.view(1, seq_len, d_model), injection, mask).flatten(),
        torch.randn(seq_len * d_model, dtype=torch.float64) * 0.01,  # near 0 tanh' ≈ 1: the tightest point
    )
    lipschitz = torch.linalg.matrix_norm(jac, ord=2).item()
    assert lipschitz < 1.0
    assert lipschitz <= gamma + 1e-6
    # and the bound holds between arbitrary pairs of states
    a, b = torch.randn(2, 1, seq_len, d_model, dtype=torch.float64) * 3
    assert (cell(a, injection, mask) - cell(b, injection, mask)).norm() <= gamma * (a - b).norm()


def test_settings_reject_unknown_values() -> None:
    with pytest.raises(EngramError, match="solver"):
        DEQSettings(solver="broyden")  # type: ignore[arg-type]
    with pytest.raises(EngramError, match="grad"):
        DEQSettings(grad="exact")  # type: ignore[arg-type]
