"""The Titans neural long-term memory (LMM), Behrouz, Zhong, Mirrokni 2024 (arXiv 2501.00663, §3), as one module.

Per head h (heads are independent memories of width d_h; the batch and head axes are left out below):

    q_t, k_t, v_t = SiLU(conv(x_t W_Q)), SiLU(conv(x_t W_K)), SiLU(conv(x_t W_V)); q_t, k_t <- q_t/|q_t|, k_t/|k_t|
    θ_t = max_lr·σ(x_t w_θ),  η_t = σ(x_t w_η),  α_t = σ(x_t w_α)                       (data-dependent gates)
    ℓ(M; x_t) = ||M(k_t) − v_t||²  (the paper's Eq. 12: a plain sum over features, no ½, no 1/d)
    u_t = ∇_M ℓ(M_{t'}; x_t),   t' = the start of t's chunk (chunk_size C; C = 1 is the token-level recurrence)
    S_t = η_t S_{t−1} − θ_t u_t                                                              (Eq. 10, 18)
    M_t = (1 − α_t) M_{t−1} + S_t                                                            (Eq. 13)
    y_t = M_t(q_t)                                  (Eq. 15: a forward pass, no update; reads the state *after* t)
    out = concat_h(y_t) W_O

M is an MLP of ``memory_depth`` L bias-free layers, row-vector convention: z_l = h_{l−1} W_l, h_l = SiLU(z_l) for
l < L, M(k) = z_L. M_0 (per head) and S_0 = 0 start every sequence; M_0 is learned by the outer loop.

Chunked form ("TTT mini-batch" semantics, §3.2): inside a chunk every u_t is taken at the chunk-start weights M_{t'},
while the momentum and the decay still act token by token. Because u_{l,t} = h_{l−1,t}ᵀ δ_{l,t} is an outer product
(input of layer l times the gradient of ℓ_t w.r.t. its output), the two linear recurrences unroll into lower-
triangular decay matrices built from cumulative products, and the retrieval through the per-token weights M_t never
needs to materialise them (a "dual form", like TTT's):

    E[s,i] = Π_{j=i+1..s} η_j,  B[t,s] = Π_{j=s+1..t} (1−α_j)   (1 on the diagonal, 0 above it)
    S_t = P^η_t S_{t'} − Σ_{i≤t} E[t,i] θ_i u_i,                  P^η_t = Π_{j≤t} η_j  (j inside the chunk)
    M_t = P^β_t M_{t'} + G_t S_{t'} − Σ_{i≤t} D[t,i] θ_i u_i,     P^β_t = Π_{j≤t} (1−α_j),  G = B P^η,  D = B E
    q W_{l,t} = P^β_t q W_{l,t'} + G_t q S_{l,t'} − Σ_{i≤t} D[t,i] θ_i (q·h_{l−1,i}) δ_{l,i}

All products are formed as exp of (segment) sums of log-gates, which are <= 0, so nothing is ever divided by a small
cumulative product. Everything is ordinary autograd: outer gradients (projections, gates, M_0) flow through the
inner updates, second order included (δ contains SiLU', whose derivative autograd takes).

Streaming: ``forward(x, state)`` continues a sequence. Chunks are aligned to the start of the stream; a piece that
ends inside a chunk keeps that chunk's start weights and its features in ``state.pending``, and the next call
re-runs those few tokens from the same start weights (their outputs were already returned), so feeding a sequence in
any pieces gives the full forward's outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.models.titans.config import TitansConfig


def silu_grad(z: Tensor) -> Tensor:
    """d/dz SiLU(z) = σ(z)(1 + z(1 − σ(z))), written out so that autograd can differentiate it again (outer loop)."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def segsum(log_a: Tensor) -> Tensor:
    """L[..., t, i] = Σ_{j=i+1..t} log_a[..., j] for i <= t, −inf above the diagonal; exp(L) is the matrix of
    cumulative products Π_{j=i+1..t} a_j. Built by a masked cumsum rather than a difference of cumsums, so that a
    very negative log-gate never produces inf − inf (Mamba-2's trick)."""
    n = log_a.shape[-1]
    x = log_a.unsqueeze(-1).expand(*log_a.shape, n)  # x[..., j, i] = log_a[j]
    strict = torch.ones(n, n, dtype=torch.bool, device=log_a.device).tril(-1)
    x = x.masked_fill(~strict, 0.0).cumsum(dim=-2)  # Σ_{i<j<=t}
    return x.masked_fill(~strict.logical_or(torch.eye(n, dtype=torch.bool, device=log_a.device)), -math.inf)


@dataclass
class NeuralMemoryState:
    """What carries a sequence from one ``forward`` to the next (all tensors batch-first, heads second).

    ``weights`` / ``momentum``: M and S per memory layer, (B, H, d_in, d_out), at the start of the current chunk
    (= the end of the last complete chunk). ``pending``: q, k, v (B, H, n, d_h) and the raw gate logits (B, 3, H, n)
    of the n < chunk_size tokens seen of the unfinished chunk. ``conv``: the last conv_kernel − 1 q/k/v projections
    (B, 3·d, K − 1), the causal conv's left context. ``position``: how many tokens the stream has had."""

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    pending: tuple[Tensor, Tensor, Tensor, Tensor]
    conv: Tensor | None
    position: int = 0  # tokens of the stream seen so far (the plasticity records' positions)

    def detach(self) -> NeuralMemoryState:
        """The same state cut from the graph (truncated BPTT across pieces)."""
        q, k, v, logits = self.pending
        return NeuralMemoryState(
            weights=tuple(w.detach() for w in self.weights),
            momentum=tuple(s.detach() for s in self.momentum),
            pending=(q.detach(), k.detach(), v.detach(), logits.detach()),
            conv=None if self.conv is None else self.conv.detach(),
            position=self.position,
        )


class NeuralMemory(nn.Module):
    """Multi-head Titans LMM: ``y, state = memory(x, state=None)`` with x, y of shape (batch, time, hidden_size)."""

    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        self.config = config
        d, h, dh = config.hidden_size, config.num_heads, config.head_dim
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        # Depthwise (one filter per channel) causal conv over time; applied by hand so the left context can come
        # from the streaming cache.
        self.conv = nn.Conv1d(3 * d, 3 * d, config.conv_kernel, groups=3 * d, bias=False) if config.use_conv else None
        self.gates = nn.Linear(d, 3 * h)  # logits of θ, η, α per head
        self.out = nn.Linear(d, d, bias=False)
        widths = [dh] + [dh * config.memory_expansion] * (config.memory_depth - 1) + [dh]
        # M_0, one per head; learned by the outer loop.
        self.memory_init = nn.ParameterList(
            nn.Parameter(torch.empty(h, widths[i], widths[i + 1])) for i in range(config.memory_depth)
        )
        # Plasticity capture (src/models/plasticity.py): while on, every forward appends its records here.
        self.capture = False
        self.captured: list[dict[str, Tensor]] = []
        self.chunk_step = torch.compile(self.memory_chunk, dynamic=False) if config.compile_inner_step else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        for lin in (self.qkv, self.gates, self.out):
            nn.init.normal_(lin.weight, std=c.initializer_range)
        bias = torch.tensor([c.init_theta_bias, c.init_eta_bias, c.init_alpha_bias]).repeat_interleave(c.num_heads)
        with torch.no_grad():
            self.gates.bias.copy_(bias)
        if self.conv is not None:
            # Random taps of unit total variance (std 1/√K), not a near-identity start: q, k and v then mix the last K
            # tokens from the first step, which associative recall needs (k from the token before the value). With the
            # identity start (last tap 1) LMM was at 4% needle accuracy after 200 steps at L = 64; with this, 98%.
            nn.init.normal_(self.conv.weight, std=1.0 / math.sqrt(c.conv_kernel))
        for w in self.memory_init:
            # Fan-in scaling keeps |M_0(k)| ~ |k| = 1 through the SiLU layers.
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[-2]))

    # ----------------------------------------------------------------------------------------------- features

    def initial_state(self, batch: int) -> NeuralMemoryState:
        c, p = self.config, self.memory_init[0]
        weights = tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in self.memory_init)
        empty = p.new_zeros(batch, c.num_heads, 0, c.head_dim)
        conv = p.new_zeros(batch, 3 * c.hidden_size, c.conv_kernel - 1) if self.conv is not None else None
        return NeuralMemoryState(
            weights=weights,
            momentum=tuple(torch.zeros_like(w) for w in weights),
            pending=(empty, empty, empty, p.new_zeros(batch, 3, c.num_heads, 0)),
            conv=conv,
        )

    def features(self, x: Tensor, conv_cache: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, v (B, H, T, d_h), the gate logits (B, 3, H, T) and the new conv cache, for the tokens of x."""
        c = self.config
        b, t, _ = x.shape
        qkv = self.qkv(x).transpose(1, 2)  # (B, 3d, T)
        new_cache = None
        if self.conv is not None:
            assert conv_cache is not None
            padded = torch.cat([conv_cache, qkv], dim=-1)
            new_cache = padded[..., padded.shape[-1] - (c.conv_kernel - 1) :]
            qkv = F.conv1d(padded, self.conv.weight, groups=qkv.shape[1])
        qkv = F.silu(qkv).view(b, 3, c.num_heads, c.head_dim, t).transpose(-1, -2)
        q, k, v = qkv.unbind(1)
        # ℓ2-normalised q and k (§4.4): |k| = 1 bounds the inner gradient and so the effective inner step.
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        logits = self.gates(x).view(b, t, 3, c.num_heads).permute(0, 2, 3, 1)
        return q, k, v, logits, new_cache

    def gate_values(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """θ, log η, log(1 − α), each (B, H, n), from the logits (B, 3, H, n); logsigmoid keeps the logs finite."""
        c = self.config
        theta = c.max_lr * torch.sigmoid(logits[:, 0])
        log_eta = F.logsigmoid(logits[:, 1])
        log_keep = F.logsigmoid(-logits[:, 2])  # log(1 − σ(a)) = log σ(−a)
        if not c.forgetting:
            log_keep = torch.zeros_like(log_keep)
        return theta, log_eta, log_keep

    # ----------------------------------------------------------------------------------------------- the memory

    def memory_chunk(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        logits: Tensor,
        weights: tuple[Tensor, ...],
        momentum: tuple[Tensor, ...],
        records: list[dict[str, Tensor]] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """One chunk of n <= chunk_size tokens from the chunk-start (weights, momentum): returns y (B, H, n, d_h) and
        the (weights, momentum) after its last token. See the module docstring for the equations. With ``records``,
        appends the chunk's plasticity measurements to it."""
        c = self.config
        if c.gate_granularity == "chunk":
            logits = logits[..., :1].expand_as(logits)
        theta, log_eta, log_keep = self.gate_values(logits)
        depth = len(weights)

        # Key forward and backward at the chunk-start weights: δ_{l,i} = ∂ℓ_i/∂z_{l,i}, so u_{l,i} = h_{l−1,i}ᵀ δ_{l,i}.
        inputs, pre = [k], []
        h = k
        for li, w in enumerate(weights):
            z = h @ w
            pre.append(z)
            h = F.silu(z) if li < depth - 1 else z
            inputs.append(h)
        delta = 2.0 * (h - v)
        deltas: list[Tensor] = [delta] * depth
        for li in range(depth - 1, 0, -1):
            delta = (delta @ weights[li].transpose(-1, -2)) * silu_grad(pre[li - 1])
            deltas[li - 1] = delta
        # The step each token's gradient is applied with: θ_t, or with inner_grad_clip θ_t·min(1, τ/‖u_t‖). A per-token
        # scalar, so the dual form is unchanged; ‖u_t‖_F² = Σ_l ‖h_{l−1,t}‖²‖δ_{l,t}‖² (u is an outer product per layer).
        step = theta
        if c.inner_grad_clip is not None:
            sq_norm = sum(x.square().sum(-1) * d.square().sum(-1) for x, d in zip(inputs[:-1], deltas, strict=True))
            # τ/‖u‖ from the squared norm clamped first: sqrt's derivative at a zero gradient would be inf (0·inf = NaN)
            step = theta * c.inner_grad_clip * torch.rsqrt(sq_norm.clamp_min(c.inner_grad_clip**2))

        # Decay matrices (cumulative products as exp of sums of log-gates <= 0).
        keep_mat = segsum(log_keep).exp()  # B[t, s]
        keep_cum = log_keep.cumsum(-1).exp()  # P^β_t
        if c.momentum:
            eta_mat = segsum(log_eta).exp()  # E[s, i]
            eta_cum = log_eta.cumsum(-1).exp()  # P^η_t
            carry = (keep_mat @ eta_cum.unsqueeze(-1)).squeeze(-1)  # G_t: how much of S_{t'} M_t has absorbed
        else:  # η ≡ 0: S_t = −θ_t u_t, nothing carried
            n = theta.shape[-1]
            eta_mat = torch.eye(n, dtype=theta.dtype, device=theta.device).expand_as(keep_mat)
            eta_cum = carry = torch.zeros_like(theta)
        coef = keep_mat @ eta_mat  # D[t, i], lower triangular

        # Retrieval y_t = M_t(q_t) through the per-token weights, in the dual form.
        hq = q
        for li, (w, s) in enumerate(zip(weights, momentum, strict=True)):
            attn = (hq @ inputs[li].transpose(-1, -2)) * coef * step.unsqueeze(-2)  # [t, i], zero for i > t
            z = keep_cum.unsqueeze(-1) * (hq @ w) - attn @ deltas[li]
            if c.momentum:
                z = z + carry.unsqueeze(-1) * (hq @ s)
            hq = F.silu(z) if li < depth - 1 else z

        # State after the last token of the chunk.
        new_w, new_s = [], []
        last_d, last_e = (coef[..., -1, :] * step).unsqueeze(-1), (eta_mat[..., -1, :] * step).unsqueeze(-1)
        for li, (w, s) in enumerate(zip(weights, momentum, strict=True)):
            x_t = inputs[li].transpose(-1, -2)
            w_next = keep_cum[..., -1, None, None] * w - x_t @ (last_d * deltas[li])
            if c.momentum:
                w_next = w_next + carry[..., -1, None, None] * s
                s_next = eta_cum[..., -1, None, None] * s - x_t @ (last_e * deltas[li])
            else:
                s_next = s  # stays zero: with η ≡ 0 no momentum survives a token
            new_w.append(w_next)
            new_s.append(s_next)
        if records is not None:
            with torch.no_grad():
                records.append(
                    self.measure(
                        h - v, inputs, deltas, momentum, weights, new_w, theta, step, log_eta, log_keep, eta_mat
                    )
                )
        return hq, tuple(new_w), tuple(new_s)

    def measure(
        self,
        residual: Tensor,
        inputs: list[Tensor],
        deltas: list[Tensor],
        momentum: tuple[Tensor, ...],
        weights: tuple[Tensor, ...],
        new_weights: list[Tensor],
        theta: Tensor,
        step: Tensor,
        log_eta: Tensor,
        log_keep: Tensor,
        eta_mat: Tensor,
    ) -> dict[str, Tensor]:
        """One chunk's plasticity records (src/models/plasticity.py) from tensors ``memory_chunk`` already has.

        u_{l,i} = h_{l−1,i}ᵀ δ_{l,i} is an outer product, so ‖u_i‖_F² = Σ_l ‖h_{l−1,i}‖² ‖δ_{l,i}‖². The momentum
        after token t, S_t = a_t S' − Σ_i c_{ti} u_i (a = P^η, c = E θ), has, per layer,
        ‖S_t‖² = a_t² ‖S'‖² − 2 a_t Σ_i c_{ti} h_i S' δ_iᵀ + Σ_{ij} c_{ti} c_{tj} (h_i·h_j)(δ_i·δ_j): Gram matrices of the
        chunk's n tokens, never the n per-token momentum matrices. ``theta`` is the gate, ``step`` it after the
        inner gradient clip (what the update used)."""
        # With momentum off, η_t = 0 and memory_chunk's eta_mat is I (S_t = −θ_t u_t): nothing is carried, a_t = 0.
        momentum_on = self.config.momentum
        eta = log_eta.exp() if momentum_on else torch.zeros_like(theta)
        a = log_eta.cumsum(-1).exp() if momentum_on else torch.zeros_like(theta)
        c = eta_mat * step.unsqueeze(-2)
        update_sq = torch.zeros_like(theta)
        past_sq = torch.zeros_like(theta)
        delta_sq = torch.zeros_like(theta[..., 0])
        for li, s in enumerate(momentum):
            x, d = inputs[li], deltas[li]
            update_sq = update_sq + x.square().sum(-1) * d.square().sum(-1)
            cross = ((x @ s) * d).sum(-1)  # h_i S' δ_iᵀ
            gram = (x @ x.transpose(-1, -2)) * (d @ d.transpose(-1, -2))
            past_sq = (
                past_sq
                + a.square() * s.square().sum((-2, -1)).unsqueeze(-1)
                - 2 * a * (c @ cross.unsqueeze(-1)).squeeze(-1)
                + ((c @ gram) * c).sum(-1)
            )
            delta_sq = delta_sq + (new_weights[li] - weights[li]).square().sum((-2, -1))
        records = {
            "update_norm": update_sq.sqrt(),
            "surprise_past": past_sq.clamp_min(0).sqrt(),
            "theta": theta,
            "eta": eta,
            "alpha": -torch.expm1(log_keep),
            "loss_pre": residual.square().sum(-1),
            "delta_w_norm": delta_sq.sqrt().unsqueeze(-1),
        }
        return {key: value.detach() for key, value in records.items()}  # θ, η, α are forward-graph tensors

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState]:
        """Read-and-write the memory over x (B, T, hidden_size), continuing ``state`` (a new sequence if None).

        Returns y (B, T, hidden_size), where y_t = W_O-projection of M_t(q_t), and the state to continue with."""
        c = self.config
        if state is None:
            state = self.initial_state(x.shape[0])
        if x.shape[1] == 0:  # nothing to read or write (the conv would also refuse an input shorter than its kernel)
            return self.out(x), state
        q, k, v, logits, conv = self.features(x, state.conv)
        # Re-run the unfinished chunk's tokens (already answered) so that their gradients join this chunk.
        pq, pk, pv, pl = state.pending
        skip = pq.shape[2]
        q, k, v = torch.cat([pq, q], dim=2), torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        logits = torch.cat([pl, logits], dim=-1)
        weights, momentum = state.weights, state.momentum
        total, ys = q.shape[2], []
        pending = (q[..., :0, :], k[..., :0, :], v[..., :0, :], logits[..., :0])
        records: list[dict[str, Tensor]] | None = [] if self.capture else None
        for start in range(0, total, c.chunk_size):
            end = min(start + c.chunk_size, total)
            part = (q[..., start:end, :], k[..., start:end, :], v[..., start:end, :], logits[..., start:end])
            if records is None and self.chunk_step is not None:
                y, new_w, new_s = self.chunk_step(*part, weights, momentum)
            else:
                y, new_w, new_s = self.memory_chunk(*part, weights, momentum, records)
            ys.append(y)
            if end - start == c.chunk_size:
                weights, momentum = new_w, new_s
            else:  # an unfinished chunk: keep its start weights and its tokens for the next call
                pending = part
        y = torch.cat(ys, dim=2)[:, :, skip:] if ys else q[..., skip:, :]
        b, _, t, _ = y.shape
        if records:
            self.captured.append(self.merge_records(records, skip, state.position))
        y = self.out(y.transpose(1, 2).reshape(b, t, c.hidden_size))
        new_state = NeuralMemoryState(weights, momentum, pending, conv, position=state.position + t)
        return y, new_state

    @staticmethod
    def merge_records(chunks: list[dict[str, Tensor]], skip: int, position: int) -> dict[str, Tensor]:
        """One call's records: the chunks joined along time, without the ``skip`` re-run tokens (recorded by the
        call that first saw them); ``delta_w_norm`` keeps one entry per chunk touched, as TTT's records do."""
        merged = {key: torch.cat([r[key] for r in chunks], dim=-1) for key in chunks[0]}
        merged = {key: value if key == "delta_w_norm" else value[..., skip:] for key, value in merged.items()}
        length = merged["update_norm"].shape[-1]
        merged["position"] = torch.arange(position, position + length, device=merged["update_norm"].device)
        return merged

    def retrieve(self, x: Tensor, state: NeuralMemoryState) -> Tensor:
        """Read the memory without writing it (Eq. 15): M(q_t) at ``state``'s weights for every token of x (B, T, d),
        projected like ``forward``'s output. The queries' conv sees only x (zero left context): MAC retrieves for a
        segment with queries of that segment."""
        c = self.config
        b, t, _ = x.shape
        q = F.linear(x, self.qkv.weight[: c.hidden_size]).transpose(1, 2)  # (B, d, T)
        if self.conv is not None:
            q = F.conv1d(F.pad(q, (c.conv_kernel - 1, 0)), self.conv.weight[: c.hidden_size], groups=c.hidden_size)
        q = F.normalize(F.silu(q).view(b, c.num_heads, c.head_dim, t).transpose(-1, -2), dim=-1)
        depth = len(state.weights)
        for li, w in enumerate(state.weights):
            q = q @ w
            q = F.silu(q) if li < depth - 1 else q
        return self.out(q.transpose(1, 2).reshape(b, t, c.hidden_size))
