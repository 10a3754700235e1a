"""The Titans neural memory (src/models/titans) against a naive per-token loop written from the paper's equations.

The reference differentiates the memory MLP with autograd (``create_graph=True``), one token at a time, so it
shares nothing with the closed-form, dual-form chunked code except the q/k/v/gate features.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.errors import EngramError
from src.models.titans import PRESETS, NeuralMemory, TitansConfig


def tiny(**overrides: object) -> TitansConfig:
    values = dict(hidden_size=12, num_heads=2, memory_depth=2, memory_expansion=2, chunk_size=4, max_lr=0.5)
    return TitansConfig.from_name("titans-tiny", **{**values, **overrides})


def make(config: TitansConfig, seed: int = 0) -> NeuralMemory:
    torch.manual_seed(seed)
    memory = NeuralMemory(config).double()
    # Larger-than-init gate weights and M_0 so that θ, η, α really vary from token to token and the test is not
    # dominated by the near-constant init.
    with torch.no_grad():
        memory.gates.weight.normal_(std=1.0)
        memory.gates.bias.normal_(std=1.0)
        memory.qkv.weight.normal_(std=0.5)
    return memory


def mlp(weights: list[Tensor], x: Tensor) -> Tensor:
    """M(x) for per-(batch, head) weights (B, H, d_in, d_out) and x (B, H, d)."""
    h = x
    for i, w in enumerate(weights):
        h = torch.einsum("bhi,bhio->bho", h, w)
        if i < len(weights) - 1:
            h = F.silu(h)
    return h


def clip_factor(config: TitansConfig, grads: tuple[Tensor, ...]) -> Tensor | float:
    """min(1, τ/‖u_t‖_F) per (batch, head), the norm taken over all memory layers' gradient matrices."""
    if config.inner_grad_clip is None:
        return 1.0
    norm = torch.sqrt(sum(g.square().sum((-2, -1)) for g in grads))[..., None, None]
    return torch.clamp(config.inner_grad_clip / norm, max=1.0)


def naive(memory: NeuralMemory, x: Tensor, chunk_size: int | None = None) -> Tensor:
    """The paper's recurrence token by token: u_t = ∇ℓ(M_{t'}; x_t) at the weights M_{t'} of the start of t's chunk
    (t' = t − t mod C), S_t = η_t S_{t−1} − θ_t u_t, M_t = (1 − α_t) M_{t−1} + S_t, y_t = M_t(q_t)."""
    c = memory.config
    size = chunk_size or c.chunk_size
    b, t, _ = x.shape
    q, k, v, logits, _ = memory.features(x, memory.initial_state(b).conv)
    if c.gate_granularity == "chunk":  # the gates of each chunk's first token
        first = torch.arange(t) // size * size
        logits = logits[..., first]
    theta, log_eta, log_keep = memory.gate_values(logits)
    eta = log_eta.exp() if c.momentum else torch.zeros_like(log_eta)
    keep = log_keep.exp()
    weights = [w.unsqueeze(0).expand(b, *w.shape) for w in memory.memory_init]
    moms = [torch.zeros_like(w) for w in weights]
    frozen = weights
    ys = []
    for i in range(t):
        if i % size == 0:
            frozen = weights
        loss = (mlp(frozen, k[:, :, i]) - v[:, :, i]).pow(2).sum()  # summed over (b, h): independent memories
        grads = torch.autograd.grad(loss, frozen, create_graph=True)
        e, th, kp = (g[:, :, i, None, None] for g in (eta, theta, keep))
        th = th * clip_factor(c, grads)
        moms = [e * s - th * g for s, g in zip(moms, grads, strict=True)]
        weights = [kp * w + s for w, s in zip(weights, moms, strict=True)]
        ys.append(mlp(weights, q[:, :, i]))
    y = torch.stack(ys, dim=2)
    return memory.out(y.transpose(1, 2).reshape(b, t, c.hidden_size))


def inputs(b: int = 2, t: int = 19, d: int = 12, seed: int = 1) -> Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 7])
def test_chunked_equals_naive_loop(depth: int, chunk_size: int) -> None:
    memory = make(tiny(memory_depth=depth, chunk_size=chunk_size))
    x = inputs()
    y, _ = memory(x)
    torch.testing.assert_close(y, naive(memory, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(momentum=False),
        dict(forgetting=False),
        dict(momentum=False, forgetting=False),
        dict(gate_granularity="chunk"),
        dict(use_conv=False),
        dict(num_heads=1),
        dict(num_heads=3, memory_expansion=1),
        dict(inner_grad_clip=None),
        dict(inner_grad_clip=0.3),  # clips most tokens
    ],
)
def test_chunked_equals_naive_loop_for_each_switch(overrides: dict[str, object]) -> None:
    memory = make(tiny(**overrides))
    x = inputs()
    y, _ = memory(x)
    torch.testing.assert_close(y, naive(memory, x), rtol=1e-10, atol=1e-10)


def test_chunks_change_the_result() -> None:
    """C > 1 is a different model from C = 1 (gradients at stale weights), not a re-ordering of the same sums."""
    memory = make(tiny(chunk_size=4))
    x = inputs()
    assert (memory(x)[0] - naive(memory, x, chunk_size=1)).abs().max() > 1e-4


@pytest.mark.parametrize("depth,chunk_size", [(1, 1), (2, 1), (2, 4)])
def test_outer_gradients_equal_autograd_through_the_naive_loop(depth: int, chunk_size: int) -> None:
    memory = make(tiny(memory_depth=depth, chunk_size=chunk_size))
    x = inputs(t=11)
    probe = torch.randn(2, 11, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = [p for _, p in memory.named_parameters()]
    fast = torch.autograd.grad((memory(x)[0] * probe).sum(), params)
    slow = torch.autograd.grad((naive(memory, x) * probe).sum(), params)
    for (name, _), a, b in zip(memory.named_parameters(), fast, slow, strict=True):
        assert b.abs().max() > 0, name  # every outer parameter is reached
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_input_gradient_matches_finite_differences() -> None:
    """Second order, independently of the naive loop: d(out)/dx through the inner updates."""
    memory = make(tiny(chunk_size=3))
    x = inputs(b=1, t=7).requires_grad_()
    assert torch.autograd.gradcheck(lambda inp: memory(inp)[0], (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides", [dict(), dict(gate_granularity="chunk"), dict(memory_depth=1, use_conv=False)])
def test_streaming_in_pieces_equals_the_full_forward(overrides: dict[str, object]) -> None:
    memory = make(tiny(chunk_size=4, **overrides))
    x = inputs(t=40)
    full, end = memory(x)
    state, pieces, start = None, [], 0
    for length in (5, 1, 3, 0, 11, 4, 16):
        y, state = memory(x[:, start : start + length], state)
        pieces.append(y)
        start += length
    assert start == 40
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
    for a, b in zip(state.weights, end.weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # Token-by-token decoding, too.
    state, steps = None, []
    for i in range(x.shape[1]):
        y, state = memory(x[:, i : i + 1], state)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


def test_detached_state_continues_the_same_numbers_without_the_graph() -> None:
    memory = make(tiny())
    x = inputs(t=10)
    full, _ = memory(x)
    _, state = memory(x[:, :6])
    y, _ = memory(x[:, 6:], state.detach())
    torch.testing.assert_close(y, full[:, 6:], rtol=1e-10, atol=1e-10)
    assert all(not w.requires_grad for w in state.detach().weights)


def test_linear_memory_without_momentum_is_the_gated_delta_rule() -> None:
    """L_M = 1 and η = 0: W_t = (1 − α_t) W_{t−1} − 2θ_t k_tᵀ(k_t W_{t−1} − v_t) (Appendix C: Gated DeltaNet), written
    out by hand, no autograd; with α = 0 too, plain online gradient descent on ||k W − v||² (the delta rule)."""
    for forgetting in (True, False):
        memory = make(tiny(memory_depth=1, chunk_size=1, momentum=False, forgetting=forgetting, inner_grad_clip=None))
        x = inputs()
        q, k, v, logits, _ = memory.features(x, memory.initial_state(2).conv)
        theta, _, log_keep = memory.gate_values(logits)
        keep = log_keep.exp()
        if not forgetting:
            assert torch.equal(keep, torch.ones_like(keep))
        w = memory.memory_init[0].unsqueeze(0).expand(2, -1, -1, -1)
        ys = []
        for t in range(x.shape[1]):
            kt, vt = k[:, :, t, None, :], v[:, :, t, None, :]  # row vectors (B, H, 1, d)
            grad = 2 * kt.transpose(-1, -2) @ (kt @ w - vt)
            w = keep[:, :, t, None, None] * w - theta[:, :, t, None, None] * grad
            ys.append((q[:, :, t, None, :] @ w).squeeze(-2))
        y = torch.stack(ys, dim=2).transpose(1, 2).reshape(2, x.shape[1], 12)
        torch.testing.assert_close(memory(x)[0], memory.out(y), rtol=1e-10, atol=1e-10)


def test_deep_memory_without_momentum_and_forgetting_is_online_sgd() -> None:
    """η = α = 0, C = 1: M_t = M_{t−1} − θ_t ∇ℓ(M_{t−1}; x_t), run as torch.optim.SGD steps on a real nn.Sequential
    per (batch, head), with the step size set to θ_t before each step."""
    memory = make(
        tiny(memory_depth=2, chunk_size=1, momentum=False, forgetting=False, num_heads=1, inner_grad_clip=None)
    )
    x = inputs(b=1, t=9)
    q, k, v, logits, _ = memory.features(x, memory.initial_state(1).conv)
    theta, _, _ = memory.gate_values(logits)
    w1, w2 = (w[0].detach().clone() for w in memory.memory_init)
    net = nn.Sequential(nn.Linear(12, 24, bias=False), nn.SiLU(), nn.Linear(24, 12, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(w1.T)
        net[2].weight.copy_(w2.T)
    sgd = torch.optim.SGD(net.parameters(), lr=0.0)
    ys = []
    for t in range(9):
        sgd.zero_grad()
        (net(k[0, 0, t].detach()) - v[0, 0, t].detach()).pow(2).sum().backward()
        sgd.param_groups[0]["lr"] = theta[0, 0, t].item()
        sgd.step()
        with torch.no_grad():
            ys.append(net(q[0, 0, t]))
    expected = memory.out(torch.stack(ys)[None])
    torch.testing.assert_close(memory(x)[0].detach(), expected.detach(), rtol=1e-10, atol=1e-10)


def test_heads_are_independent_memories_with_the_right_shapes() -> None:
    config = tiny(num_heads=3, memory_depth=2, memory_expansion=2)
    memory = make(config)
    memory.out = nn.Identity()  # look at the heads before they are mixed
    x = inputs(t=13)
    y, state = memory(x)
    assert y.shape == (2, 13, 12)
    assert [tuple(w.shape) for w in state.weights] == [(2, 3, 4, 8), (2, 3, 8, 4)]
    assert [tuple(s.shape) for s in state.momentum] == [(2, 3, 4, 8), (2, 3, 8, 4)]
    assert tuple(state.pending[0].shape) == (2, 3, 13 % 4, 4)
    assert tuple(state.conv.shape) == (2, 36, 3)
    with torch.no_grad():
        memory.memory_init[0][1].mul_(3.0)  # change head 1's M_0 only
    y2, _ = memory(x)
    torch.testing.assert_close(y2[..., :4], y[..., :4], rtol=0, atol=0)  # head 0 untouched
    torch.testing.assert_close(y2[..., 8:], y[..., 8:], rtol=0, atol=0)  # head 2 untouched
    assert (y2[..., 4:8] - y[..., 4:8]).abs().max() > 1e-3


def test_long_sequence_with_default_init_stays_finite_and_alive() -> None:
    """4096 tokens (titans-pytorch #29 reported NaN at 4K), forward and backward, fp32, default config at a CPU-sized
    width (4 heads of 64). "Alive": the memory weights must not have decayed into the W = 0 saddle."""
    torch.manual_seed(0)
    config = TitansConfig.from_name("titans-170m", hidden_size=256, num_heads=4)
    memory = NeuralMemory(config)
    x = torch.randn(1, 4096, config.hidden_size)
    y, state = memory(x)
    y.pow(2).mean().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(w).all() and w.abs().max() > 1e-2 for w in state.weights)
    assert all(torch.isfinite(p.grad).all() for p in memory.parameters())
    assert y[:, -256:].abs().mean() > 1e-2 * y[:, :256].abs().mean()


def test_config_presets_and_checks() -> None:
    assert set(PRESETS) == {"titans-tiny", "titans-170m", "titans-340m", "titans-400m"}
    for name in PRESETS:
        config = TitansConfig.from_name(name)
        assert config.hidden_size % config.num_heads == 0
    assert TitansConfig.from_name("titans-tiny", chunk_size=3).chunk_size == 3
    assert TitansConfig.from_dict(TitansConfig().to_dict()) == TitansConfig()
    for bad in (dict(chunk_size=0), dict(hidden_size=10, num_heads=3), dict(gate_granularity="x"), dict(nope=1)):
        with pytest.raises(EngramError):
            TitansConfig.from_name("titans-tiny", **bad)
    with pytest.raises(EngramError, match="unknown Titans preset"):
        TitansConfig.from_name("titans-7b")
    # Parameter count of one memory layer at the 170M width: projections + gates + out + M_0 (12 heads x 2 layers).
    memory = NeuralMemory(TitansConfig.from_name("titans-170m"))
    d = 768
    expected = 3 * d * d + 3 * d * 4 + (d * 36 + 36) + d * d + 12 * 2 * 64 * 128
    assert sum(p.numel() for p in memory.parameters()) == expected
    assert math.isclose(memory.gates.bias[0].item(), 0.0)


def naive_records(memory: NeuralMemory, x: Tensor) -> dict[str, Tensor]:
    """The plasticity records from the token loop: u_t by autograd at the chunk-start weights, S_t and M_t
    materialised per token, norms taken directly (no Gram-matrix identities)."""
    c = memory.config
    b, t, _ = x.shape
    _, k, v, logits, _ = memory.features(x, memory.initial_state(b).conv)
    theta, log_eta, log_keep = memory.gate_values(logits)
    eta = log_eta.exp() if c.momentum else torch.zeros_like(log_eta)
    keep = log_keep.exp()
    weights = [w.unsqueeze(0).expand(b, *w.shape).detach() for w in memory.memory_init]
    moms = [torch.zeros_like(w) for w in weights]
    frozen, chunk_start = weights, weights
    out: dict[str, list[Tensor]] = {key: [] for key in ("update_norm", "surprise_past", "loss_pre", "delta_w_norm")}

    def norm(ms: list[Tensor]) -> Tensor:
        return torch.sqrt(sum(m.square().sum((-2, -1)) for m in ms))

    for i in range(t):
        if i % c.chunk_size == 0:
            frozen = chunk_start = weights
        frozen = [w.detach().requires_grad_() for w in frozen]
        residual = mlp(frozen, k[:, :, i].detach()) - v[:, :, i].detach()
        grads = torch.autograd.grad(residual.pow(2).sum(), frozen)
        e, th, kp = (g[:, :, i, None, None].detach() for g in (eta, theta, keep))
        th = th * clip_factor(c, grads)
        moms = [e * s - th * g for s, g in zip(moms, grads, strict=True)]
        weights = [kp * w.detach() + s for w, s in zip(weights, moms, strict=True)]
        out["update_norm"].append(norm(list(grads)))
        out["surprise_past"].append(norm(moms))
        out["loss_pre"].append(residual.pow(2).sum(-1).detach())
        if i % c.chunk_size == c.chunk_size - 1 or i == t - 1:
            out["delta_w_norm"].append(norm([w - s for w, s in zip(weights, chunk_start, strict=True)]))
    return {key: torch.stack(values, dim=-1) for key, values in out.items()}


@pytest.mark.parametrize("overrides", [dict(), dict(momentum=False), dict(memory_depth=1, chunk_size=1)])
def test_plasticity_records_equal_the_token_loop(overrides: dict[str, object]) -> None:
    memory = make(tiny(**overrides))
    x = inputs(t=19)  # 19 = four whole chunks of 4 and an unfinished one
    memory.capture = True
    memory(x)
    (rec,) = memory.captured
    expected = naive_records(memory, x)
    for key, value in expected.items():
        torch.testing.assert_close(rec[key], value, rtol=1e-10, atol=1e-12, msg=key)
    theta, log_eta, log_keep = memory.gate_values(memory.features(x, memory.initial_state(2).conv)[3])
    torch.testing.assert_close(rec["theta"], theta.detach())
    torch.testing.assert_close(rec["alpha"], 1 - log_keep.exp().detach())
    torch.testing.assert_close(rec["eta"], log_eta.exp().detach() if memory.config.momentum else 0 * theta.detach())
    torch.testing.assert_close(rec["position"], torch.arange(19))
    assert all(not value.requires_grad for value in rec.values())


def test_streamed_records_join_into_the_full_forwards_records() -> None:
    memory = make(tiny())
    x = inputs(t=19)
    memory.capture = True
    memory(x)
    (full,) = memory.captured
    memory.captured.clear()
    state = None
    for piece in (x[:, :6], x[:, 6:13], x[:, 13:]):
        _, state = memory(piece, state)
    parts = memory.captured
    assert [int(p["position"][0]) for p in parts] == [0, 6, 13]
    for key in ("update_norm", "surprise_past", "theta", "position"):
        torch.testing.assert_close(torch.cat([p[key] for p in parts], dim=-1), full[key], rtol=1e-10, atol=1e-12)


def test_capture_off_records_nothing() -> None:
    memory = make(tiny())
    memory(inputs())
    assert memory.captured == []


def test_the_inner_gradient_clip_keeps_a_memory_fed_one_key_from_diverging() -> None:
    """The failure the clip exists for: every token of a chunk with the same key, a large step and momentum. Unclipped,
    the summed step exceeds what the memory's curvature allows and the weights grow geometrically; clipped, each
    token moves them by at most θ·τ."""
    x = inputs(b=1, t=1, d=12).expand(1, 256, 12).contiguous()
    sizes = {}
    for clip in (None, 2.0):
        memory = make(tiny(chunk_size=8, max_lr=1.0, inner_grad_clip=clip))
        with torch.no_grad():
            memory.gates.weight.zero_()
            memory.gates.bias.copy_(torch.tensor([4.0, 4.0, 4.0, 4.0, -8.0, -8.0]))  # θ ≈ 0.98, η ≈ 0.98
        _, state = memory(x)
        sizes[clip] = max(w.abs().max().item() for w in state.weights)
    assert not sizes[None] < 1e6  # diverged (inf or NaN included)
    assert sizes[2.0] < 1e3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor's CPU build takes minutes here)")
def test_the_compiled_chunk_step_equals_the_eager_one() -> None:
    eager = make(tiny(chunk_size=4)).float().cuda()
    compiled = make(tiny(chunk_size=4, compile_inner_step=True)).float().cuda()
    compiled.load_state_dict(eager.state_dict())
    x = inputs(t=18).float().cuda().requires_grad_()  # 4 whole chunks and one of 2 tokens (a second compiled shape)
    outs, grads = [], []
    for memory in (eager, compiled):
        y, _ = memory(x)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        outs.append(y)
        grads.append(g)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
