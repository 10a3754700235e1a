"""TTT-Linear and TTT-MLP language models: a port of the official PyTorch code, fast enough to train.

Same math, parameter names and shapes as ``ttt.py`` of test-time-training/ttt-lm-pytorch (commit cd831db1), so its
``state_dict`` loads with ``strict=True``. Notation below: B batch, L tokens, C hidden size, H heads, f = C / H,
K = mini_batch_size, N mini-batches; row vectors, ``z = k W + b``.

One TTT layer keeps per sequence and head a small inner model (TTT-Linear: ``W ∈ R^{f×f}, b ∈ R^{1×f}``) and trains
it on the sequence while reading it. For token t (position i = t mod K inside its mini-batch n):

    Z_t   = k_t W_n + b_n                       all gradients of a mini-batch are taken at its start state W_n
    ℓ_t   = ½ ‖LN(Z_t) − (v_t − k_t)‖²          LN: per-head LayerNorm (ttt_norm_weight/bias), eps 1e-6
    g_t   = ∂ℓ_t/∂Z_t                           closed form = LayerNorm backward of the residual (``ln_l2_grad``)
    lr_t  = ttt_base_lr · σ(a_h·x_t + c_h) / f   per head and token, from the seq-normed input x_t
    τ_i   = max(0, 1/(i+1) + learnable_token_idx[i])
    W_{n,i} = W_n − τ_i Σ_{j≤i} lr_j k_jᵀ g_j   (b likewise with g_j)
    o_t   = q_t + LN(q_t W_{n,i} + b_{n,i});     W_{n+1} = W_{n,K−1}

q and k get a rotary embedding whose positions restart at every mini-batch (i, not t).

How it is computed here (the official code loops over mini-batches doing everything inside the loop):
  1. everything that does not depend on the state is computed for all heads, sequences and mini-batches at once;
  2. ``scan``: the only sequential part, a loop over mini-batches that computes g and the next state
     (three batched matmuls and one fused LayerNorm-backward per step, see ``_linear_step``);
  3. ``readout``: the outputs of every mini-batch in one batched "dual form" computation from the stacked start
     states, using ``(E ∘ QKᵀ) G = diag(τ) tril(QKᵀ) diag(lr) G``.
A partial mini-batch (at the end, or at the start when decoding from a cache) is padded to K with tokens whose lr
is 0, which leaves every real token's output and the state exactly as the official code computes them. The same
path therefore serves training, prefill and token-by-token decoding (the official code's primal form), with the
cache holding the official quantities (``W1_states``, ``b1_states``, ``W1_grad``, ``b1_grad``).

The inner loop (state, g, readout) runs in float32 (float64 for float64 models) with autocast off, so it stays
exact under bf16 autocast; projections, convolutions and the MLP follow the ambient autocast.

Speed: plain PyTorch by default. ``TTTConfig.compile_inner_step`` runs the scan as ``torch.compile``d graphs of
``compile_chunk`` mini-batch steps. The training forward has no host synchronisation and no data-dependent shapes,
so ``torch.compile(model)`` works (fullgraph when the scan is not compiled separately) and a whole training step can
be captured in one CUDA graph (``bench/ttt_lm.py --modes cudagraph``).

Plasticity capture (the hook of every memory family, schema in ``src/models/plasticity.py``):
``model.set_capture(True)`` (or ``with model.capture_plasticity() as records:``) makes every TTT layer record, from
tensors it already has, per-head per-token update norms (inner-gradient norms), learning rates and inner losses,
and per-mini-batch weight-update norms; see ``PLASTICITY_KEYS``. When capture is off nothing extra is computed or
kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.errors import EngramError
from src.models.plasticity import captured
from src.models.ttt.config import TTTConfig

TTT_NORM_EPS = 1e-6  # eps of the inner LayerNorm (official ln_fwd / ln_fused_l2_bwd)

# Records of one TTT layer after a captured forward (all float32/float64, detached, on the layer's device), in the
# schema of src/models/plasticity.py (the chunk is the mini-batch, K tokens). Per token, shape [B, H, L] (L = tokens
# of that forward call):
#   update_norm  ‖∇_W ℓ_t‖_F: TTT-Linear ‖k_t‖·‖g_t‖; TTT-MLP the Frobenius norm over both inner weight matrices,
#                sqrt((‖k_t‖‖g1_t‖)² + (‖x2_t‖‖g2_t‖)²). Gradient at the mini-batch start state W_n.
#   g_norm       ‖g_t‖ = ‖∂ℓ_t/∂Z_t‖ for the inner model's output Z (= ‖∇_b ℓ_t‖ for TTT-Linear)
#   k_norm       ‖k_t‖, the inner model's input (key after projection, conv and rotary embedding)
#   lr           lr_t = ttt_base_lr · σ(a_h·x_t + c_h) / f, the per-token inner learning rate
#   tau          τ_i = max(0, 1/(i+1) + learnable_token_idx[i]), i = position of the token in its mini-batch
#   loss_pre     ℓ_t at the mini-batch start state W_n (the loss whose gradient is used)
#   loss_init    ℓ_t at the layer's learned initial state W_0 (the parameters W1, b1, ...)
#   loss_post    ℓ_t at W_{n,i}, i.e. after the token's own update (the weights its output is read with)
# Per mini-batch, shape [B, H, M] (M = mini-batches touched by the call, in order):
#   delta_w_norm  ‖W_end − W_n‖_F over the inner weight matrices: W_end = W_{n+1} for a mini-batch that the call
#                 completes; for one it leaves unfinished, the weights its last token was read with, W_{n,i}.
# Also ``position`` [L] (int64): absolute token positions; token t belongs to mini-batch
# position[t] // K − position[0] // K of the per-mini-batch axis.
PLASTICITY_TOKEN_KEYS = ("update_norm", "g_norm", "k_norm", "lr", "tau", "loss_pre", "loss_init", "loss_post")
PLASTICITY_MINIBATCH_KEYS = ("delta_w_norm",)
PLASTICITY_KEYS = (*PLASTICITY_TOKEN_KEYS, *PLASTICITY_MINIBATCH_KEYS, "position")


# ---------------------------------------------------------------------------------------------------------------
# Backbone pieces
# ---------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, exactly as the official code.

    float32 also for float64 inputs: that is what the official model does, and float64 runs then reproduce its
    numbers instead of differing at the 1e-8 level.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_causal_conv(channels: int, kernel: int) -> nn.Conv1d:
    # Parameters as the official nn.Conv1d(C, C, kernel, groups=C, bias=True); the causal padding is done in
    # ``causal_conv`` so that a cache can supply the previous inputs instead of zeros.
    return nn.Conv1d(channels, channels, kernel_size=kernel, groups=channels, bias=True)


def causal_conv(x: Tensor, conv: nn.Conv1d, past: Tensor | None) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution over time of ``x`` [B, L, C].

    ``past`` [B, kernel−1, C] holds the inputs before ``x`` (zeros at the start of a sequence). Returns the output
    [B, L, C] and the new ``past`` for the next call.
    """
    width = conv.kernel_size[0]
    if past is None:
        past = x.new_zeros(x.shape[0], width - 1, x.shape[2])
    full = torch.cat([past.to(x.dtype), x], dim=1)
    y = F.conv1d(full.transpose(1, 2), conv.weight, conv.bias, groups=conv.groups).transpose(1, 2)
    return y, full[:, full.shape[1] - (width - 1) :]


class PreConv(nn.Module):
    """Mamba-backbone causal conv before the TTT layer (official ``Conv``): ``h + conv(RMSNorm(h))`` in ``Block``."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.conv = make_causal_conv(config.hidden_size, config.conv_kernel)

    def forward(self, x: Tensor, past: Tensor | None) -> tuple[Tensor, Tensor]:
        return causal_conv(self.norm(x), self.conv, past)


# ---------------------------------------------------------------------------------------------------------------
# Inner-loop math
# ---------------------------------------------------------------------------------------------------------------


def ttt_layer_norm(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm over the last axis with per-head affine ``weight``/``bias`` (broadcast over the leading axes)."""
    return F.layer_norm(z, z.shape[-1:], eps=TTT_NORM_EPS) * weight + bias


def ln_l2_grad(z: Tensor, c: Tensor, gamma2: Tensor) -> Tensor:
    """g = ∂/∂z ½‖γ ⊙ LN(z) + β − y‖², given ``c = γ ⊙ (β − y)`` and ``gamma2 = γ²``.

    The gradient of the loss w.r.t. the normalised ẑ is ``γ ⊙ (γ ẑ + β − y) = γ² ẑ + c``; g is then LayerNorm's own
    backward of that, so the fused ATen LayerNorm kernels are used (and their double backward for training) instead
    of the official code's dozen elementwise ops (``ln_fused_l2_bwd``; the two agree to rounding).
    """
    shape = [z.shape[-1]]
    zhat, mean, rstd = torch.native_layer_norm(z, shape, None, None, TTT_NORM_EPS)
    grad_zhat = torch.addcmul(c, gamma2, zhat)
    grad_z, _, _ = torch.ops.aten.native_layer_norm_backward(
        grad_zhat, z, shape, mean, rstd, None, None, [True, False, False]
    )
    return grad_z


def gelu_tanh_grad(z: Tensor) -> Tensor:
    """Derivative of GELU (tanh approximation); the official ``gelu_bwd`` uses the same formula with 8-digit
    constants (a 1e-10 relative difference)."""
    s = math.sqrt(2.0 / math.pi)
    t = torch.tanh(s * z * (1.0 + 0.044715 * z * z))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * s * (1.0 + 3 * 0.044715 * z * z)


def _linear_step(
    W: Tensor, b: Tensor, xk: Tensor, c: Tensor, ek: Tensor, e: Tensor, gamma2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One mini-batch of TTT-Linear for all sequences and heads at once (batch axis = B·H).

    W [BH,f,f], b [BH,1,f], xk / c / ek = e ⊙ xk [BH,K,f], e [BH,1,K] (the end-of-mini-batch step weights
    τ_{K−1}·lr_j). Returns the next state and g [BH,K,f].
    """
    g = ln_l2_grad(torch.baddbmm(b, xk, W), c, gamma2)
    return torch.baddbmm(W, ek.transpose(1, 2), g, alpha=-1), torch.baddbmm(b, e, g, alpha=-1), g


def _mlp_step(
    W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, xk: Tensor, c: Tensor, ek: Tensor, e: Tensor, gamma2: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One mini-batch of TTT-MLP (inner model ``gelu(k W1 + b1) W2 + b2``); returns the next state, g1, g2, x2."""
    z1 = torch.baddbmm(b1, xk, W1)
    x2 = F.gelu(z1, approximate="tanh")
    g2 = ln_l2_grad(torch.baddbmm(b2, x2, W2), c, gamma2)
    g1 = torch.bmm(g2, W2.transpose(1, 2)) * gelu_tanh_grad(z1)
    ex2 = e.transpose(1, 2) * x2
    return (
        torch.baddbmm(W1, ek.transpose(1, 2), g1, alpha=-1),
        torch.baddbmm(b1, e, g1, alpha=-1),
        torch.baddbmm(W2, ex2.transpose(1, 2), g2, alpha=-1),
        torch.baddbmm(b2, e, g2, alpha=-1),
        g1,
        g2,
        x2,
    )


_CHUNKS: dict[tuple[Callable, int], Callable] = {}


def chunk_of(step: Callable, n_state: int) -> Callable:
    """``step`` applied to a chunk of consecutive mini-batches: inputs [BH, G, ...] instead of [BH, ...]; returns
    the state after the chunk, then the start states and the extra outputs of every step, stacked on axis 1.
    (One function object per step, so that its compiled version is cached.)"""
    if (step, n_state) in _CHUNKS:
        return _CHUNKS[(step, n_state)]

    def chunk(*args: Tensor) -> tuple[Tensor, ...]:
        state, per_step, gamma2 = list(args[:n_state]), args[n_state:-1], args[-1]
        starts: list[list[Tensor]] = [[] for _ in state]
        outs: list[list[Tensor]] = []
        for inputs in zip(*(t.unbind(1) for t in per_step), strict=True):
            for acc, s in zip(starts, state, strict=True):
                acc.append(s)
            result = step(*state, *inputs, gamma2)
            state, extra = list(result[:n_state]), result[n_state:]
            outs = outs or [[] for _ in extra]
            for acc, o in zip(outs, extra, strict=True):
                acc.append(o)
        return (*state, *(torch.stack(a, 1) for a in starts), *(torch.stack(o, 1) for o in outs))

    _CHUNKS[(step, n_state)] = chunk
    return chunk


_COMPILED: dict[tuple[Callable, str], Callable] = {}


def compiled(fn: Callable, mode: str) -> Callable:
    """``torch.compile(fn)``, built once per process (a graph per input shape; all mini-batches share shapes)."""
    if (fn, mode) not in _COMPILED:
        _COMPILED[(fn, mode)] = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[(fn, mode)]


def scan_loop(
    step: Callable,
    chunk_fn: Callable | None,
    chunk: int,
    state: list[Tensor],
    sequences: list[Tensor],
    gamma2: Tensor,
    pending: list[Tensor] | None,
    tau_last: Tensor,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The sequential part: the inner loop over mini-batches.

    ``state``: the inner parameters [BH,...] at the start of the first mini-batch; ``sequences``: the step inputs
    [BH, N, ...]; ``pending``: gradient sums of tokens of the first mini-batch seen in earlier calls (decoding),
    added to its end-of-mini-batch update. With ``chunk_fn``, runs of ``chunk`` mini-batches go through one call of
    it and the rest through ``step``. Returns the start states [BH, N, ...], the final state and the step's extra
    outputs [BH, N, ...].
    """
    N, k = sequences[0].shape[1], len(state)
    if chunk_fn is None or chunk <= 1:
        sizes = [1] * N
    else:  # the first mini-batch alone when it has pending sums, then whole chunks, then single steps
        head = 1 if pending is not None else 0
        sizes = [1] * head + [chunk] * ((N - head) // chunk) + [1] * ((N - head) % chunk)
    starts: list[list[Tensor]] = [[] for _ in state]
    outs: list[list[Tensor]] = []

    def record(new_starts: Sequence[Tensor], extra: Sequence[Tensor]) -> None:
        nonlocal outs
        outs = outs or [[] for _ in extra]
        for acc, t in zip((*starts, *outs), (*new_starts, *extra), strict=True):
            acc.append(t)

    if len(sizes) == N:  # one step at a time; unbind (not indexing): autograd gathers input gradients in one stack
        for n, inputs in enumerate(zip(*(t.unbind(1) for t in sequences), strict=True)):
            result = step(*state, *inputs, gamma2)
            record(state, result[k:])
            state = list(result[:k])
            if n == 0 and pending is not None:
                state = [s - tau_last * p for s, p in zip(state, pending, strict=True)]
        stacked = [torch.stack(t, dim=1) for t in (*starts, *outs)]
        return stacked[:k], state, stacked[k:]

    for n, inputs in enumerate(zip(*(torch.split(t, sizes, dim=1) for t in sequences), strict=True)):
        if sizes[n] > 1:
            result = chunk_fn(*state, *inputs, gamma2)
            record(result[k : 2 * k], result[2 * k :])
        else:
            result = step(*state, *(t.squeeze(1) for t in inputs), gamma2)
            record([t.unsqueeze(1) for t in state], [t.unsqueeze(1) for t in result[k:]])
        state = list(result[:k])
        if n == 0 and pending is not None:
            state = [s - tau_last * p for s, p in zip(state, pending, strict=True)]
    joined = [torch.cat(t, dim=1) for t in (*starts, *outs)]
    return joined[:k], state, joined[k:]


# With compile_inner_step, the chunks are compiled graphs already; hiding this Python loop from an outer
# torch.compile(model) keeps it from unrolling hundreds of mini-batches into one huge graph.
scan_loop_opaque = torch.compiler.disable(scan_loop, recursive=False)


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TTTCache:
    """State for token-by-token decoding; constant size, like an RNN's.

    ``seqlen_offset``: tokens consumed so far (advanced by ``TTTModel.forward``).
    ``ttt_states[layer]``: the official cache quantities, detached, in the inner dtype:
      ``W1_states`` [B,H,f,f] / ``b1_states`` [B,H,1,f]: the inner state at the start of the current mini-batch;
      ``W1_grad`` / ``b1_grad``: Σ_j lr_j ∇ℓ_j over the tokens of the current mini-batch seen so far
      (zero at a mini-batch boundary); TTT-MLP adds ``W2_*``/``b2_*``.
    ``conv_states[layer]``: the last ``conv_kernel − 1`` inputs of each causal conv ("pre_conv", "ttt_conv"),
    [B, conv_kernel−1, C].
    Layers fill their entries on first use, so an empty ``TTTCache()`` starts a new sequence.
    """

    seqlen_offset: int = 0
    ttt_states: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    conv_states: dict[int, dict[str, Tensor]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# TTT layers
# ---------------------------------------------------------------------------------------------------------------


class TTTInputs(NamedTuple):
    """Inputs of the inner loop for one call, padded to whole mini-batches (see module docstring)."""

    XQ: Tensor  # [B,H,N,K,f] queries after (conv and) rotary embedding
    XK: Tensor  # [B,H,N,K,f] keys, the inner model's input
    XV: Tensor  # [B,H,N,K,f] values; the reconstruction target is XV − XK
    lr: Tensor  # [B,H,N,K] per-token inner learning rate, 0 on padding
    tau: Tensor  # [K] token-index coefficients τ_i
    start: int  # position of the first real token inside the first mini-batch (seqlen_offset mod K)
    length: int  # real tokens L


class ScanResult(NamedTuple):
    starts: dict[str, Tensor]  # inner parameters at the start of every mini-batch, [B,H,N,...] ("W1", "b1", ...)
    final: dict[str, Tensor]  # state after the last mini-batch (meaningful when the call ends on a boundary)
    acts: dict[str, Tensor]  # per weight matrix: its per-token input (TTT-Linear: XK) [B,H,N,K,d_in]
    grads: dict[str, Tensor]  # per weight matrix: ∂ℓ/∂(its output) per token [B,H,N,K,d_out]; last one is g
    pending: dict[str, Tensor] | None  # from a cache: Σ lr ∇ℓ of earlier tokens of the first mini-batch


class TTTBase(nn.Module):
    """Everything of the official ``TTTBase`` that is shared by TTT-Linear and TTT-MLP."""

    # Inner weight matrices, from input to output (each "Wi" has a bias "bi").
    weight_names: tuple[str, ...] = ()

    def __init__(self, config: TTTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        C, H, K = config.hidden_size, config.num_attention_heads, config.mini_batch_size
        self.width, self.num_heads, self.head_dim, self.mini_batch_size = C, H, config.head_dim, K
        std = config.initializer_range

        self.learnable_token_idx = nn.Parameter(torch.zeros(K))
        self.q_proj = nn.Linear(C, C, bias=False)
        if not config.share_qk:
            self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        if config.share_qk:
            self.conv_q = make_causal_conv(C, config.conv_kernel)
            self.conv_k = make_causal_conv(C, config.conv_kernel)
        self.learnable_ttt_lr_weight = nn.Parameter(torch.randn(H, 1, C) * std)
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(H, 1))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, self.head_dim))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, self.head_dim))
        if config.use_gate:
            self.g_proj = nn.Linear(C, C, bias=False)
        self.post_norm = nn.LayerNorm(C, eps=1e-6)

        self.capture = False
        self.plasticity: dict[str, Tensor] | None = None

    # ----- subclass interface ----------------------------------------------------------------------------------

    def inner_params(self) -> dict[str, Tensor]:
        """The learned initial inner state W_0 ({"W1": [H,f,f], "b1": [H,1,f], ...})."""
        raise NotImplementedError

    def scan(self, inp: TTTInputs, state: dict[str, Tensor], pending: dict[str, Tensor] | None) -> ScanResult:
        raise NotImplementedError

    def readout(self, x: Tensor, inp: TTTInputs, res: ScanResult) -> Tensor:
        """Inner-model output (before LN) for inputs ``x`` [B,H,N,K,f], token i read with W_{n,i}."""
        raise NotImplementedError

    def inner_model(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Inner-model output (before LN) for inputs ``x`` at fixed weights ``params`` (broadcast over x)."""
        raise NotImplementedError

    def start_and_read(self, x: Tensor, inp: TTTInputs, res: ScanResult) -> tuple[Tensor, Tensor]:
        """Inner-model outputs for ``x`` at the mini-batch start states W_n and at the read-out weights W_{n,i}."""
        return self.inner_model(x, res.starts), self.readout(x, inp, res)

    # ----- shared pieces -------------------------------------------------------------------------------------

    def project(self, X: Tensor, cache: TTTCache | None) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V [B, L, C] from the seq-normed input X (with the shared-QK convs on the Mamba backbone)."""
        if not self.config.share_qk:
            return self.q_proj(X), self.k_proj(X), self.v_proj(X)
        P = self.q_proj(X)
        past = None
        if cache is not None and cache.seqlen_offset > 0:
            past = cache.conv_states[self.layer_idx]["ttt_conv"]
        XQ, new_past = causal_conv(P, self.conv_q, past)
        XK, _ = causal_conv(P, self.conv_k, past)
        if cache is not None:
            cache.conv_states.setdefault(self.layer_idx, {})["ttt_conv"] = new_past.detach()
        return XQ, XK, self.v_proj(X)

    def inner_inputs(self, X: Tensor, XQ: Tensor, XK: Tensor, XV: Tensor, offset: int) -> TTTInputs:
        """Split heads, pad to whole mini-batches, apply the mini-batch-local rotary embedding, compute lr and τ.

        Runs in the inner dtype (float32, or float64 for a float64 model); call with autocast disabled.
        """
        B, L, _ = X.shape
        H, f, K = self.num_heads, self.head_dim, self.mini_batch_size
        dtype = torch.promote_types(self.ttt_norm_weight.dtype, torch.float32)
        start = offset % K
        N = -(-(start + L) // K)
        pad = (start, N * K - start - L)

        def heads(t: Tensor) -> Tensor:  # [B, L, C] -> [B, H, N, K, f]
            t = t.to(dtype).view(B, L, H, f).transpose(1, 2)
            if pad != (0, 0):
                t = F.pad(t, (0, 0, *pad))
            return t.reshape(B, H, N, K, f)

        lr_logits = torch.einsum("blc,hc->bhl", X.to(dtype), self.learnable_ttt_lr_weight[:, 0].to(dtype))
        lr = torch.sigmoid(lr_logits + self.learnable_ttt_lr_bias.to(dtype)) * (self.config.ttt_base_lr / f)
        if pad != (0, 0):
            lr = F.pad(lr, pad)  # zero learning rate: padding tokens do not touch the state
        token_idx = 1.0 / torch.arange(1, K + 1, dtype=dtype, device=X.device)
        tau = torch.clamp_min(token_idx.to(dtype) + self.learnable_token_idx.to(dtype), 0.0)
        return TTTInputs(
            XQ=self.rotary(heads(XQ)),
            XK=self.rotary(heads(XK)),
            XV=heads(XV),
            lr=lr.reshape(B, H, N, K),
            tau=tau,
            start=start,
            length=L,
        )

    def rotary(self, x: Tensor) -> Tensor:
        """Rotary embedding on interleaved pairs (2m, 2m+1) with position = index inside the mini-batch.

        Angles, cos and sin in float32 as in the official code (it uses ``permute_qk`` + HF ``rotate_half`` to get
        this JAX/EasyLM pairing); ``x`` [..., K, f].
        """
        K, f = x.shape[-2], x.shape[-1]
        exponent = torch.arange(0, f, 2, dtype=torch.int64, device=x.device).float() / f
        inv_freq = 1.0 / (self.config.rope_theta**exponent)
        angle = torch.arange(K, dtype=torch.float32, device=x.device)[:, None] * inv_freq[None, :]
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)

    def initial_state(
        self, B: int, dtype: torch.dtype, cache: TTTCache | None, offset: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """State at the start of the first mini-batch ([B,H,...]) and the pending gradient sums (None at a boundary)."""
        if cache is None or offset == 0:
            return {name: p.to(dtype).expand(B, *p.shape) for name, p in self.inner_params().items()}, None
        if self.layer_idx not in cache.ttt_states:
            raise EngramError(
                f"cache has seqlen_offset={offset} but no state for TTT layer {self.layer_idx}; "
                "start every sequence with a fresh TTTCache()."
            )
        entry = cache.ttt_states[self.layer_idx]
        names = self.inner_params()
        state = {name: entry[f"{name}_states"] for name in names}
        pending = {name: entry[f"{name}_grad"] for name in names} if offset % self.mini_batch_size else None
        return state, pending

    def minibatch_grad_sum(self, inp: TTTInputs, res: ScanResult, n: int) -> dict[str, Tensor]:
        """Σ_j lr_j ∇ℓ_j over mini-batch ``n`` (plus pending sums when n = 0), per inner parameter, [B,H,...]."""
        lr = inp.lr[:, :, n, :, None]
        sums: dict[str, Tensor] = {}
        for w in self.weight_names:
            lr_g = lr * res.grads[w][:, :, n]
            sums[w] = res.acts[w][:, :, n].transpose(-1, -2) @ lr_g
            sums["b" + w[1:]] = lr_g.sum(dim=-2, keepdim=True)
        if n == 0 and res.pending is not None:
            sums = {name: s + res.pending[name] for name, s in sums.items()}
        return sums

    def update_cache(self, cache: TTTCache, inp: TTTInputs, res: ScanResult) -> None:
        """Store the official cache quantities after this call (see ``TTTCache``)."""
        N = inp.lr.shape[2]
        if (inp.start + inp.length) % self.mini_batch_size == 0:
            state = res.final
            sums = {name: torch.zeros_like(s) for name, s in state.items()}
        else:
            state = {name: s[:, :, -1] for name, s in res.starts.items()}
            sums = self.minibatch_grad_sum(inp, res, N - 1)
        entry = {f"{name}_states": s.detach() for name, s in state.items()}
        entry.update({f"{name}_grad": s.detach() for name, s in sums.items()})
        cache.ttt_states[self.layer_idx] = entry

    def tokens(self, x: Tensor, inp: TTTInputs) -> Tensor:
        """[B,H,N,K,...] padded per-token values -> [B,H,L,...] real tokens."""
        B, H, N, K = x.shape[:4]
        return x.reshape(B, H, N * K, *x.shape[4:])[:, :, inp.start : inp.start + inp.length]

    def forward(self, hidden_states: Tensor, cache: TTTCache | None = None) -> Tensor:
        """``hidden_states`` [B, L, C] is the seq-normed block input X; returns the layer output [B, L, C]."""
        B, L, C = hidden_states.shape
        offset = 0 if cache is None else cache.seqlen_offset
        XQ, XK, XV = self.project(hidden_states, cache)
        with torch.autocast(hidden_states.device.type, enabled=False):
            inp = self.inner_inputs(hidden_states, XQ, XK, XV, offset)
            state, pending = self.initial_state(B, inp.XK.dtype, cache, offset)
            res = self.scan(inp, state, pending)
            out = inp.XQ + ttt_layer_norm(self.readout(inp.XQ, inp, res), *self.ttt_norm(inp.XQ.dtype))
            out = self.tokens(out, inp).transpose(1, 2).reshape(B, L, C)
            if cache is not None:
                self.update_cache(cache, inp, res)
            if self.capture:
                self.plasticity = self.measure(inp, res, offset)
        out = self.post_norm(out.to(hidden_states.dtype))
        if self.config.use_gate:
            out = out * F.gelu(self.g_proj(hidden_states), approximate="tanh")
        return self.o_proj(out)

    def ttt_norm(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Per-head LN weight and bias shaped [H,1,1,f] to broadcast over [B,H,N,K,f]."""
        shape = (self.num_heads, 1, 1, self.head_dim)
        return self.ttt_norm_weight.to(dtype).view(shape), self.ttt_norm_bias.to(dtype).view(shape)

    def scan_inputs(self, inp: TTTInputs) -> tuple[list[Tensor], Tensor]:
        """Step inputs [B·H, N, ...]: xk, c = γ(β − target), ek = e ⊙ xk and e [BH,N,1,K] (e = τ_{K−1}·lr, each
        token's weight in the end-of-mini-batch update); and γ² [BH,1,f]."""
        B, H, N, _, f = inp.XK.shape
        gamma, beta = self.ttt_norm(inp.XK.dtype)
        c = gamma * (beta - (inp.XV - inp.XK))
        e = inp.tau[-1] * inp.lr
        ek = e[..., None] * inp.XK
        gamma2 = (gamma * gamma).expand(B, H, 1, 1, f).reshape(B * H, 1, f)
        sequences = [inp.XK, c, ek, e[..., None, :]]
        return [t.reshape(B * H, N, *t.shape[3:]) for t in sequences], gamma2

    def run_scan(
        self,
        step: Callable,
        inp: TTTInputs,
        state: dict[str, Tensor],
        pending: dict[str, Tensor] | None,
        names: tuple[str, ...],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Run ``step`` over the mini-batches; returns the start states [B,H,N,...] and the final states [B,H,...]
        (both in the order of ``names``), and the step's extra outputs [B·H, N, ...]."""
        B, H, N = inp.lr.shape[:3]
        flat = [state[name].reshape(B * H, *state[name].shape[2:]) for name in names]
        flat_pending = None
        if pending is not None:
            flat_pending = [pending[name].reshape(B * H, *pending[name].shape[2:]) for name in names]
        sequences, gamma2 = self.scan_inputs(inp)
        chunk = self.config.compile_chunk
        if self.config.compile_inner_step:
            mode = self.config.compile_mode
            step_fn, chunk_fn = compiled(step, mode), compiled(chunk_of(step, len(names)), mode)
            loop = scan_loop_opaque
        else:
            step_fn, chunk_fn, loop = step, None, scan_loop
        starts, final, outs = loop(step_fn, chunk_fn, chunk, flat, sequences, gamma2, flat_pending, inp.tau[-1])
        starts = [s.view(B, H, N, *s.shape[2:]) for s in starts]
        return starts, [s.view(B, H, *s.shape[1:]) for s in final], outs

    # ----- plasticity capture --------------------------------------------------------------------------------

    @torch.no_grad()
    def measure(self, inp: TTTInputs, res: ScanResult, offset: int) -> dict[str, Tensor]:
        """The ``PLASTICITY_KEYS`` records of this call, from tensors the forward already computed."""
        B, H, N, K, _ = inp.XK.shape
        gamma, beta = self.ttt_norm(inp.XK.dtype)
        beta_minus_target = beta - (inp.XV - inp.XK)  # shared by the three losses

        def loss(z: Tensor) -> Tensor:  # ½‖γ ⊙ LN(z) + β − (v − k)‖², few full-size passes
            r = torch.addcmul(beta_minus_target, F.layer_norm(z, z.shape[-1:], eps=TTT_NORM_EPS), gamma)
            return 0.5 * torch.linalg.vector_norm(r, dim=-1).square()

        init = {name: p.to(inp.XK.dtype) for name, p in self.inner_params().items()}  # [H, ...]
        # at the shared initial weights, all mini-batches at once: [B,H,N·K,f] @ [H,f,f] (no per-mini-batch copies)
        z_init = self.inner_model(inp.XK.flatten(2, 3), init).view_as(inp.XK)
        z_pre, z_post = self.start_and_read(inp.XK, inp, res)
        act_norms = {w: res.acts[w].norm(dim=-1) for w in self.weight_names}
        g_norms = {w: res.grads[w].norm(dim=-1) for w in self.weight_names}
        per_token = {
            "update_norm": torch.sqrt(sum((act_norms[w] * g_norms[w]).square() for w in self.weight_names)),
            "g_norm": g_norms[self.weight_names[-1]],
            "k_norm": act_norms["W1"],
            "lr": inp.lr,
            "tau": inp.tau.expand(B, H, N, K),
            "loss_pre": loss(z_pre),
            "loss_init": loss(z_init),
            "loss_post": loss(z_post),
        }
        # detach: lr and tau come from the forward graph, and records must not keep it alive
        records = {key: self.tokens(value, inp).detach() for key, value in per_token.items()}

        # Per mini-batch: the update τ_j · Σ_i lr_i ∇_W ℓ_i of mini-batch n, j its last token here (K−1 when the call
        # completes it: then it is exactly W_{n+1} − W_n). Its norm from K×K Gram matrices, without touching the
        # f×f states: ‖Σ_i lr_i x_iᵀ g_i‖² = lrᵀ ((X Xᵀ) ∘ (G Gᵀ)) lr.
        delta_sq = 0.0
        for w in self.weight_names:
            x, g = res.acts[w], res.grads[w]
            gram = (x @ x.transpose(-1, -2)) * (g @ g.transpose(-1, -2))
            delta_sq = delta_sq + ((gram @ inp.lr[..., None])[..., 0] * inp.lr).sum(-1)
        end = inp.start + inp.length
        tau_end = inp.tau[-1].expand(N).clone()
        tau_end[-1] = inp.tau[(end - 1) % K]
        delta = tau_end * delta_sq.clamp_min(0.0).sqrt()
        if res.pending is not None:  # the first mini-batch also carries the sums of earlier calls
            sums = self.minibatch_grad_sum(inp, res, 0)
            first = tau_end[0] * sum(sums[w].square().sum(dim=(-2, -1)) for w in self.weight_names).sqrt()
            delta = torch.cat([first[:, :, None], delta[:, :, 1:]], dim=2)
        records["delta_w_norm"] = delta
        records["position"] = torch.arange(offset, offset + inp.length, device=inp.XK.device)
        return records


class TTTLinear(TTTBase):
    """TTT-Linear: inner model ``Z = k W1 + b1`` per head, with the LayerNorm-residual ``k + LN(Z)``."""

    weight_names = ("W1",)

    def __init__(self, config: TTTConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        f = self.head_dim
        self.W1 = nn.Parameter(torch.randn(self.num_heads, f, f) * config.initializer_range)
        self.b1 = nn.Parameter(torch.zeros(self.num_heads, 1, f))

    def inner_params(self) -> dict[str, Tensor]:
        return {"W1": self.W1, "b1": self.b1}

    def scan(self, inp: TTTInputs, state: dict[str, Tensor], pending: dict[str, Tensor] | None) -> ScanResult:
        B, H, N, K, f = inp.XK.shape
        names = ("W1", "b1")
        starts, final, (g,) = self.run_scan(_linear_step, inp, state, pending, names)
        return ScanResult(
            starts=dict(zip(names, starts, strict=True)),
            final=dict(zip(names, final, strict=True)),
            acts={"W1": inp.XK},
            grads={"W1": g.view(B, H, N, K, f)},
            pending=pending,
        )

    def readout(self, x: Tensor, inp: TTTInputs, res: ScanResult) -> Tensor:
        return self.start_and_read(x, inp, res)[1]

    def start_and_read(self, x: Tensor, inp: TTTInputs, res: ScanResult) -> tuple[Tensor, Tensor]:
        # z_start = x W_n + b_n; the read-out subtracts the in-mini-batch updates: τ_i Σ_{j≤i} lr_j (x_i·k_j + 1) g_j
        tau = inp.tau[:, None]
        z_start = self.inner_model(x, res.starts)
        attn = (x @ inp.XK.transpose(-1, -2) + 1.0).tril()  # tril(x kᵀ) for W plus tril(1) for b
        z = z_start - tau * (attn @ (inp.lr[..., None] * res.grads["W1"]))
        if res.pending is not None:
            first = z[:, :, :1] - tau * (x[:, :, :1] @ res.pending["W1"][:, :, None] + res.pending["b1"][:, :, None])
            z = torch.cat([first, z[:, :, 1:]], dim=2)
        return z_start, z

    def inner_model(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        return x @ params["W1"] + params["b1"]


class TTTMLP(TTTBase):
    """TTT-MLP: inner model ``gelu(k W1 + b1) W2 + b2`` (hidden 4f) per head, with ``k + LN(·)``."""

    weight_names = ("W1", "W2")

    def __init__(self, config: TTTConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        H, f, std = self.num_heads, self.head_dim, config.initializer_range
        self.W1 = nn.Parameter(torch.randn(H, f, 4 * f) * std)
        self.b1 = nn.Parameter(torch.zeros(H, 1, 4 * f))
        self.W2 = nn.Parameter(torch.randn(H, 4 * f, f) * std)
        self.b2 = nn.Parameter(torch.zeros(H, 1, f))

    def inner_params(self) -> dict[str, Tensor]:
        return {"W1": self.W1, "b1": self.b1, "W2": self.W2, "b2": self.b2}

    def scan(self, inp: TTTInputs, state: dict[str, Tensor], pending: dict[str, Tensor] | None) -> ScanResult:
        B, H, N, K, _ = inp.XK.shape
        names = ("W1", "b1", "W2", "b2")
        starts, final, (g1, g2, x2) = self.run_scan(_mlp_step, inp, state, pending, names)

        def per_token(t: Tensor) -> Tensor:  # [B·H, N, K, d] -> [B, H, N, K, d]
            return t.view(B, H, N, K, -1)

        return ScanResult(
            starts=dict(zip(names, starts, strict=True)),
            final=dict(zip(names, final, strict=True)),
            acts={"W1": inp.XK, "W2": per_token(x2)},
            grads={"W1": per_token(g1), "W2": per_token(g2)},
            pending=pending,
        )

    def readout(self, x: Tensor, inp: TTTInputs, res: ScanResult) -> Tensor:
        tau, lr = inp.tau[:, None], inp.lr[..., None]
        s, p = res.starts, res.pending

        def layer(a: Tensor, a_start: Tensor, W: str, b: str) -> Tensor:
            # dual form of one inner dense layer: inputs a, mini-batch-start inputs a_start
            attn = (a @ a_start.transpose(-1, -2) + 1.0).tril()
            z = a @ s[W] + s[b] - tau * (attn @ (lr * res.grads[W]))
            if p is not None:
                first = z[:, :, :1] - tau * (a[:, :, :1] @ p[W][:, :, None] + p[b][:, :, None])
                z = torch.cat([first, z[:, :, 1:]], dim=2)
            return z

        x2 = F.gelu(layer(x, inp.XK, "W1", "b1"), approximate="tanh")
        return layer(x2, res.acts["W2"], "W2", "b2")

    def inner_model(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        return F.gelu(x @ params["W1"] + params["b1"], approximate="tanh") @ params["W2"] + params["b2"]


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """[h += conv(norm(h))] → h += TTT(seq_norm(h)) → h += SwiGLU(ffn_norm(h)) (official ``Block``)."""

    def __init__(self, config: TTTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        layer_cls = TTTLinear if config.ttt_layer_type == "linear" else TTTMLP
        self.seq_modeling_block = layer_cls(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        if config.pre_conv:
            self.conv = PreConv(config)
        self.seq_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h: Tensor, cache: TTTCache | None = None) -> Tensor:
        if hasattr(self, "conv"):
            past = None
            if cache is not None and cache.seqlen_offset > 0:
                past = cache.conv_states[self.layer_idx]["pre_conv"]
            conv_out, new_past = self.conv(h, past)
            if cache is not None:
                cache.conv_states.setdefault(self.layer_idx, {})["pre_conv"] = new_past.detach()
            h = h + conv_out
        h = h + self.seq_modeling_block(self.seq_norm(h), cache)
        return h + self.mlp(self.ffn_norm(h))


class TTTModel(nn.Module):
    """Embedding, blocks and final RMSNorm (official ``TTTModel``)."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: TTTCache | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """Returns the final normed hidden states [B, L, C] and, if asked, the output of every block followed by the
        final normed states (the official convention: no embedding entry). Advances ``cache.seqlen_offset``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise EngramError("pass exactly one of input_ids and inputs_embeds to TTTModel.forward.")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden: tuple[Tensor, ...] = ()
        for layer in self.layers:
            h = layer(h, cache)
            if output_hidden_states:
                hidden += (h,)
        h = self.norm(h)
        if cache is not None:
            cache.seqlen_offset += h.shape[1]
        return h, (*hidden, h) if output_hidden_states else None

    def ttt_layers(self) -> list[TTTBase]:
        return [layer.seq_modeling_block for layer in self.layers]


@dataclass
class TTTCausalLMOutput:
    logits: Tensor  # [B, L, V], float32 (as the official model returns them)
    loss: Tensor | None = None  # mean next-token cross-entropy when labels were given
    cache: TTTCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None


class TTTForCausalLM(nn.Module):
    """TTT language model with the official parameter names (``model.*``, ``lm_head.weight``)."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        self.config = config
        self.model = TTTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        # official TTTPreTrainedModel._init_weights; TTT layers initialise their own parameters
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def forward(
        self,
        input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        cache: TTTCache | None = None,
        use_cache: bool = False,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> TTTCausalLMOutput:
        """``labels`` [B, L] are shifted inside (token t predicts labels[t+1]); -100 is ignored.

        With ``use_cache`` and no ``cache`` a new one is started; pass the returned ``cache`` back to continue the
        sequence (any number of tokens per call).
        """
        if use_cache and cache is None:
            cache = TTTCache()
        h, hidden = self.model(input_ids, inputs_embeds, cache, output_hidden_states)
        logits = self.lm_head(h).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return TTTCausalLMOutput(logits=logits, loss=loss, cache=cache, hidden_states=hidden)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Prefill the prompt once, then decode one token per step from the cache. Returns [B, L + new]; sequences
        that produced ``eos_token_id`` are padded with it."""
        if max_new_tokens < 1:
            raise EngramError(f"max_new_tokens={max_new_tokens} must be at least 1.")
        if do_sample and temperature <= 0:
            raise EngramError(f"temperature={temperature} must be positive when sampling (or use do_sample=False).")
        out = self(input_ids, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        tokens = [input_ids]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            if do_sample:
                scores = logits / temperature
                if top_k is not None:
                    kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                next_token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
            else:
                next_token = logits.argmax(dim=-1)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            tokens.append(next_token[:, None])
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                break
            logits = self(next_token[:, None], cache=cache).logits[:, -1]
        return torch.cat(tokens, dim=1)

    # ----- plasticity capture --------------------------------------------------------------------------------

    def set_capture(self, enabled: bool) -> None:
        """Turn plasticity capture on or off for every TTT layer; turning it off drops the records."""
        for layer in self.model.ttt_layers():
            layer.capture = enabled
            if not enabled:
                layer.plasticity = None

    def plasticity_records(self) -> list[dict[str, Tensor]]:
        """Per layer, the ``PLASTICITY_KEYS`` records of the latest forward with capture on."""
        records = [layer.plasticity for layer in self.model.ttt_layers()]
        if any(r is None for r in records):
            raise EngramError("no plasticity records: run a forward pass with capture on (set_capture(True)) first.")
        return records

    def capture_plasticity(self) -> AbstractContextManager[list[dict[str, Tensor]]]:
        """``with model.capture_plasticity() as records: model(ids)`` — after the block, ``records`` holds the
        per-layer records of the last forward inside it; capture is then off again and the layers keep nothing."""
        return captured(self)
