"""Naive per-token reference of one TTT layer, written from the equations (notes/ttt.md §2.3), not from the port.

A plain loop over tokens; the inner gradient comes from autograd (no closed form, no dual form, no padding), the
rotary embedding is the complex-number form of the JAX code. It reads the parameters of a port layer by name only.
Returns the layer output and, per token, the plasticity quantities the port's capture must reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_parameters_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every parameter off its initial value (identity norms, zero biases, zero token offsets), so that no path
    is trivially an identity in a comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _layer_norm(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + 1e-6) * weight + bias


def _causal_conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [B, L, C]; weight [C, 1, k]: y[t] = bias + Σ_j weight[:, 0, j] · x[t − (k−1) + j] (zero before the start)."""
    k = weight.shape[-1]
    y = bias.expand_as(x).clone()
    for j in range(k):
        shift = k - 1 - j
        if shift < x.shape[1]:
            y[:, shift:] += weight[:, 0, j] * x[:, : x.shape[1] - shift]
    return y


def _rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """(x_{2m} + i x_{2m+1}) · exp(i p ω_m), ω_m = θ^{−2m/f}; angles in float32 as in both official codes."""
    f = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, f, 2, dtype=torch.float32) / f))
    angle = positions.to(torch.float32)[:, None] * freqs[None, :]
    rot = torch.complex(angle.cos().to(x.dtype), angle.sin().to(x.dtype))
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], f // 2, 2).contiguous())
    return torch.view_as_real(pairs * rot).reshape(x.shape)


def naive_ttt_layer(layer: torch.nn.Module, X: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Output [B, L, C] of a TTT layer (port module, used for its parameters and config) and per-token records."""
    cfg = layer.config
    B, L, C = X.shape
    H = cfg.num_attention_heads
    f, K = C // H, cfg.mini_batch_size
    mlp = cfg.ttt_layer_type == "mlp"
    p = dict(layer.named_parameters())

    if cfg.share_qk:
        P = X @ p["q_proj.weight"].T
        XQ = _causal_conv(P, p["conv_q.weight"], p["conv_q.bias"])
        XK = _causal_conv(P, p["conv_k.weight"], p["conv_k.bias"])
    else:
        XQ, XK = X @ p["q_proj.weight"].T, X @ p["k_proj.weight"].T
    XV = X @ p["v_proj.weight"].T

    def heads(t: Tensor) -> Tensor:
        return t.reshape(B, L, H, f).permute(0, 2, 1, 3)  # [B, H, L, f]

    positions = torch.arange(L) % K
    XQ, XK, XV = _rotary(heads(XQ), positions, cfg.rope_theta), _rotary(heads(XK), positions, cfg.rope_theta), heads(XV)
    lr = torch.stack(
        [
            cfg.ttt_base_lr
            * torch.sigmoid(X @ p["learnable_ttt_lr_weight"][h, 0] + p["learnable_ttt_lr_bias"][h, 0])
            / f
            for h in range(H)
        ],
        dim=1,
    )  # [B, H, L]
    tau = torch.clamp(1.0 / torch.arange(1, K + 1, dtype=X.dtype) + p["learnable_token_idx"], min=0.0)
    gamma, beta = p["ttt_norm_weight"][None, :, None], p["ttt_norm_bias"][None, :, None]  # [1, H, 1, f]

    names = ("W1", "b1", "W2", "b2") if mlp else ("W1", "b1")
    init = {n: p[n].detach()[None].expand(B, *p[n].shape) for n in names}  # [B, H, ...]

    def inner(x: Tensor, w: dict[str, Tensor]) -> Tensor:
        if mlp:
            return F.gelu(x @ w["W1"] + w["b1"], approximate="tanh") @ w["W2"] + w["b2"]
        return x @ w["W1"] + w["b1"]

    def loss(x: Tensor, target: Tensor, w: dict[str, Tensor]) -> Tensor:  # per (b, h)
        return 0.5 * ((_layer_norm(inner(x, w), gamma, beta) - target) ** 2).sum(dim=(-2, -1))

    state = {n: t.clone() for n, t in init.items()}
    keys = ("update_norm", "g_norm", "lr", "tau", "loss_pre", "loss_init", "loss_post")
    rec: dict[str, list[Tensor]] = {k: [] for k in keys}
    deltas: list[Tensor] = []
    outputs = []
    with torch.no_grad():
        for t in range(L):
            i = t % K
            if i == 0:
                start = {n: s.clone() for n, s in state.items()}
                sums = {n: torch.zeros_like(s) for n, s in state.items()}
            k, v, q = XK[:, :, t : t + 1], XV[:, :, t : t + 1], XQ[:, :, t : t + 1]
            target = v - k
            with torch.enable_grad():
                w = {n: s.clone().requires_grad_(True) for n, s in start.items()}
                z = inner(k, w)
                ell = 0.5 * ((_layer_norm(z, gamma.detach(), beta.detach()) - target) ** 2).sum(dim=(-2, -1))
                grads = torch.autograd.grad(ell.sum(), [*w.values(), z])
            grad_w, grad_z = dict(zip(names, grads[:-1], strict=True)), grads[-1]
            for n in names:
                sums[n] = sums[n] + lr[:, :, t, None, None] * grad_w[n]
            current = {n: start[n] - tau[i] * sums[n] for n in names}
            outputs.append(q + _layer_norm(inner(q, current), gamma, beta))

            weights = [n for n in names if n.startswith("W")]
            rec["update_norm"].append(torch.sqrt(sum(grad_w[n].pow(2).sum(dim=(-2, -1)) for n in weights)))
            rec["g_norm"].append(grad_z.norm(dim=-1)[..., 0])
            rec["lr"].append(lr[:, :, t])
            rec["tau"].append(tau[i].expand(B, H))
            rec["loss_pre"].append(ell.detach())
            rec["loss_init"].append(loss(k, target, init))
            rec["loss_post"].append(loss(k, target, current))
            if i == K - 1 or t == L - 1:
                deltas.append(torch.sqrt(sum((current[n] - start[n]).pow(2).sum(dim=(-2, -1)) for n in weights)))
            if i == K - 1:
                state = current

    o = torch.cat(outputs, dim=2).permute(0, 2, 1, 3).reshape(B, L, C)
    o = F.layer_norm(o, (C,), p["post_norm.weight"], p["post_norm.bias"], eps=1e-6)
    if cfg.use_gate:
        o = o * F.gelu(X @ p["g_proj.weight"].T, approximate="tanh")
    records = {k: torch.stack(v, dim=-1) for k, v in rec.items()}
    records["delta_w_norm"] = torch.stack(deltas, dim=-1)
    return o @ p["o_proj.weight"].T, records
