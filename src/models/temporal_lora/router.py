"""The Time Mixer: a per-token router over the adapters, and its contrastive calibration.

The router reads the frozen backbone's hidden states (causal: token t's weights depend only on tokens ≤ t) and
outputs mixing weights on the simplex::

    u_t = Σ_{j<window} k_j ⊙ LayerNorm(h_{t−j})                 (causal depthwise convolution over time)
    scores_t = MLP(u_t) / temperature − offset,      w_t = softmax(scores_t)

The time mixing lets the router pool evidence over the last ``window`` tokens (a domain is a property of a
stretch of text, not of one token); it starts as the identity (``k_0 = 1``, the rest 0), so an untrained mixer is a
per-token router, and ``window = 1`` keeps it one. Any window adds up to ``window − 1`` tokens of built-in lag
to the switching the hysteresis analysis measures. ``offset`` is a buffer (saved in checkpoints) that only
calibration sets.

Contrastive calibration. A router trained on unbalanced or ambiguous text (sequence starts, whitespace, tokens both
domains share) leans toward one adapter, in practice the first. Calibration fits the offsets alone, the MLP is not
touched, by minimising the domain-balanced contrastive (InfoNCE) loss over adapters: for every token, its own
domain's adapter is the positive and the other adapters are the negatives, and every domain has the same total
weight::

    L(c) = (1/E) Σ_d mean_{t ∈ domain d} −log softmax(z_t − c)_d

L is convex in c, and its gradient is ∂L/∂c_i = m_i(c) − 1/E, where m_i is the balanced mean weight of adapter i (the
mean over domains of adapter i's mean weight on that domain's tokens). So at the optimum every adapter gets exactly
the same balanced share 1/E: the router no longer favours any adapter, the first included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from src.errors import EngramError


@dataclass
class RouterOutput:
    scores: torch.Tensor  # (B, T, E) calibrated logits; train the router with cross-entropy on these
    weights: torch.Tensor  # (B, T, E) softmax(scores), rows sum to 1


class TimeMixer(nn.Module):
    """Per-token router: hidden states ``(B, T, d_model)`` → weights ``(B, T, n_adapters)``."""

    def __init__(
        self, d_model: int, n_adapters: int, hidden: int = 64, temperature: float = 1.0, window: int = 1
    ) -> None:
        super().__init__()
        if temperature <= 0 or window < 1:
            raise EngramError(f"router temperature={temperature} must be > 0 and window={window} at least 1.")
        self.temperature = temperature
        self.window = window
        self.norm = nn.LayerNorm(d_model)
        self.time_mix = nn.Conv1d(d_model, d_model, window, groups=d_model, bias=False)
        with torch.no_grad():  # identity: only the current token (the last tap of the causal kernel)
            self.time_mix.weight.zero_()
            self.time_mix.weight[:, :, -1] = 1.0
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, n_adapters))
        self.register_buffer("offset", torch.zeros(n_adapters))

    def raw_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores before calibration (``offset`` not subtracted); ``hidden`` is ``(B, T, d_model)``."""
        x = self.norm(hidden).transpose(1, 2)  # (B, d, T)
        x = self.time_mix(F.pad(x, (self.window - 1, 0))).transpose(1, 2)  # left padding keeps it causal
        return self.net(x) / self.temperature

    def forward(self, hidden: torch.Tensor) -> RouterOutput:
        scores = self.raw_scores(hidden) - self.offset
        return RouterOutput(scores=scores, weights=scores.softmax(dim=-1))

    @torch.no_grad()
    def calibrate(
        self, hidden: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, list[float]]:
        """Set ``offset`` by contrastive calibration on held-out tokens; returns balanced mean weights before/after.

        ``hidden``: ``(B, T, d_model)`` backbone hidden states; ``domains``: ``(B, T)`` labels; ``mask``: ``(B, T)``,
        true for the tokens to use (default all).
        """
        raw, labels = self.raw_scores(hidden), domains
        if mask is not None:
            raw, labels = raw[mask.bool()], labels[mask.bool()]
        raw, labels = raw.reshape(-1, self.offset.numel()), labels.reshape(-1)
        before = balanced_mean_weights((raw - self.offset).softmax(-1), labels)
        self.offset.copy_(balanced_offsets(raw, labels))
        after = balanced_mean_weights((raw - self.offset).softmax(-1), labels)
        return {"balanced_mean_weight_before": before.tolist(), "balanced_mean_weight_after": after.tolist()}


def balanced_mean_weights(weights: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """``m_i`` = mean over domains d of the mean weight of adapter i on domain d's tokens; ``(E,)``, sums to 1.

    ``m_i − 1/E`` is adapter i's bias: how much more weight it gets than it would if every domain counted equally.
    """
    n_adapters = weights.shape[-1]
    weights, domains = weights.reshape(-1, n_adapters), domains.reshape(-1)
    missing = [d for d in range(n_adapters) if not (domains == d).any()]
    if missing:
        raise EngramError(f"calibration data have no tokens of domains {missing}; give held-out text of every domain.")
    return torch.stack([weights[domains == d].mean(0) for d in range(n_adapters)]).mean(0)


def balanced_offsets(raw_scores: torch.Tensor, domains: torch.Tensor, max_iter: int = 200) -> torch.Tensor:
    """The offsets ``c`` (mean 0) minimising the domain-balanced InfoNCE loss of ``softmax(raw_scores − c)``.

    Convex in ``c`` (see the module docstring), so L-BFGS with a strong-Wolfe line search finds the optimum; the loss
    does not change when a constant is added to every ``c_i``, hence the centring.
    """
    n_adapters = raw_scores.shape[-1]
    raw = raw_scores.detach().double().reshape(-1, n_adapters)
    domains = domains.reshape(-1)
    balanced_mean_weights(raw.softmax(-1), domains)  # raises if a domain is missing
    # Per-token weight that makes every domain's total weight 1/E.
    counts = torch.bincount(domains, minlength=n_adapters).double()
    token_weight = 1.0 / (n_adapters * counts[domains])
    offsets = torch.zeros(n_adapters, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [offsets], max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        nll = -(raw - offsets).log_softmax(-1).gather(1, domains[:, None]).squeeze(1)
        loss = (token_weight * nll).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (offsets - offsets.mean()).detach().to(raw_scores.dtype)


def routing_stats(weights: torch.Tensor) -> dict[str, float]:
    """Telemetry of one batch of weights ``(B, T, E)``: mean weight per adapter (a constant lean shows up here),
    mean entropy in nats, and argmax switches per 1000 token transitions."""
    flat = weights.detach().float().reshape(-1, weights.shape[-1])
    entropy = -(flat * flat.clamp_min(1e-12).log()).sum(-1).mean()
    top = weights.argmax(-1)
    transitions = top.shape[0] * max(top.shape[-1] - 1, 1)
    switches = (top[..., 1:] != top[..., :-1]).sum()
    stats = {f"mean_weight/{i}": float(v) for i, v in enumerate(flat.mean(0))}
    stats["entropy"] = float(entropy)
    stats["switches_per_1k"] = float(1000.0 * switches / transitions)
    return stats
