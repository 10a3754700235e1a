"""Titans language models (Behrouz, Zhong, Mirrokni 2024, §4): the neural memory of ``memory.py`` in a decoder.

Every block is pre-norm with residuals: ``x = x + mixer(norm(x)); x = x + SwiGLU(norm(x))``. The mixer is what
``TitansConfig.architecture`` names:

* ``mac``, memory as context (Eqs. 21–25). The sequence is cut into segments S of ``segment_size`` tokens. For each:
  h = M*_{before}(S) is read with the memory state *before* the segment (no write); attention runs over
  [p || h || S], every token of S seeing all persistent tokens p and the h and S tokens up to itself (the paper
  shows all of h visible, but h_j is read with token j's query: causal LM needs it masked); the
  memory is then written with y = S + Attn(...), the residual stream after attention, and o = y ⊗ M(y) reads it
  back token by token (each token
  through the weights after its own write, so it stays causal). The state after the segment serves the next one.
* ``mag``, memory as gate (Eqs. 26–28): o = SWA(x) ⊗ M(x), both branches on the same input.
* ``mal``, memory as layer (Eqs. 29–31): x + M(x), then x + SWA(x), one after the other in the block.
* ``lmm``: the memory alone. ``swa``: sliding-window attention alone, the same-size baseline without memory.

⊗ is the paper's gating: both branches RMS-normalised with learned weights, o = norm(y) · σ(norm(m)).
MAG / MAL / LMM / SWA prepend the persistent tokens to the sequence (x̃ = [p] || x, Eq. 19) and drop them before
the head; sliding-window attention keeps them visible to every token ("SW-Attn*" with a prefix). MAC keeps one set
of persistent tokens per layer, in front of every segment. Attention is ``scaled_dot_product_attention`` with a
boolean mask and rotary positions.

Plasticity: ``set_capture(True)`` makes every memory record its test-time updates (``memory.py``'s ``measure``);
``plasticity_records()`` returns one record per memory layer of the latest forward (src/models/plasticity.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.errors import EngramError
from src.models.titans.config import TitansConfig
from src.models.titans.memory import NeuralMemory

IGNORE_INDEX = -100


def rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding (rotate-half form) of x (B, H, T, d) at integer ``positions`` (T,)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def window_mask(length: int, window: int, prefix: int, device: torch.device) -> Tensor:
    """(T, T) boolean, True where query i may attend key j: causal, within ``window`` tokens, or one of the first
    ``prefix`` (persistent) tokens."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & ((i - j < window) | (j < prefix))


def segment_mask(segment: int, persistent: int, device: torch.device) -> Tensor:
    """(S, persistent + 2S) boolean for MAC's context [p || h || S]: a segment token i sees every persistent token,
    the retrieved h_j and the segment tokens j for j <= i.

    The paper's mask (Fig. 3a) shows all of h visible; but h_j = M*(q_j) is read with token j's own query, so a
    token seeing h_{j>i} would see its future. Causal language modelling needs h masked like the segment."""
    causal = torch.ones(segment, segment, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(segment, persistent, dtype=torch.bool, device=device), causal, causal], dim=1)


class RMSNorm(nn.Module):
    """RMSNorm in float32 (under autocast its input is bf16 while the weight stays float32), cast back."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Attention(nn.Module):
    """Multi-head attention of queries x over keys/values ``context`` (x itself by default) under a boolean mask."""

    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        c = self.config
        context = x if context is None else context
        b, t, _ = x.shape
        s = context.shape[1]

        def heads(z: Tensor, n: int) -> Tensor:
            return z.view(b, n, c.num_heads, c.head_dim).transpose(1, 2)

        q = heads(self.q(x), t)
        k, v = (heads(z, s) for z in self.kv(context).chunk(2, dim=-1))
        # Queries are the last t of the s context positions (their own tokens close the context).
        positions = torch.arange(s, device=x.device)
        q, k = rotary(q, positions[s - t :], c.rope_theta), rotary(k, positions, c.rope_theta)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, c.hidden_size))


class MemoryGate(nn.Module):
    """o = RMSNorm(y) · σ(RMSNorm(m)): the paper's non-linear gating ⊗ of an attention output y by a memory read m."""

    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        self.y_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.m_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        return self.y_norm(y) * torch.sigmoid(self.m_norm(m))


class Block(nn.Module):
    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        self.config = config
        arch, d, eps = config.architecture, config.hidden_size, config.rms_norm_eps
        self.mixer_norm = RMSNorm(d, eps)
        self.memory = NeuralMemory(config) if arch != "swa" else None
        self.attention = Attention(config) if arch != "lmm" else None
        self.gate = MemoryGate(config) if arch in ("mac", "mag") else None
        if arch == "mal":  # the block's second mixer gets its own norm and residual
            self.attention_norm = RMSNorm(d, eps)
        if arch == "mac":
            self.persistent = nn.Parameter(torch.randn(config.persistent_tokens, d) * config.initializer_range)
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = SwiGLU(config)

    def sliding_attention(self, x: Tensor) -> Tensor:
        assert self.attention is not None
        mask = window_mask(x.shape[1], self.config.window, self.prefix_length, x.device)
        return self.attention(x, mask)

    @property
    def prefix_length(self) -> int:
        """Persistent tokens at the front of the sequence (all architectures but MAC)."""
        return 0 if self.config.architecture == "mac" else self.config.persistent_tokens

    def memory_as_context(self, x: Tensor) -> Tensor:
        assert self.memory is not None and self.attention is not None and self.gate is not None
        c = self.config
        state = self.memory.initial_state(x.shape[0])
        persistent = self.persistent.to(x.dtype).expand(x.shape[0], -1, -1)
        outs = []
        for start in range(0, x.shape[1], c.segment_size):
            segment = x[:, start : start + c.segment_size]
            retrieved = self.memory.retrieve(segment, state)  # M*_{t−1}(q_t): the state before the segment
            context = torch.cat([persistent, retrieved, segment], dim=1)
            # y: the segment's residual stream after attention. Written alone, the attention output (near-uniform
            # mixing at init) carries no token identity for the memory's keys and values: MAC then stayed at chance
            # on the L = 256 needle after 400 steps while LMM, written with tokens, reached 100% by step 300.
            y = segment + self.attention(
                segment, segment_mask(segment.shape[1], c.persistent_tokens, x.device), context
            )
            m, state = self.memory(y, state)  # write with y, read each token back after its own write
            outs.append(self.gate(y, m))
        return torch.cat(outs, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        arch = self.config.architecture
        h = self.mixer_norm(x)
        if arch == "mac":
            x = x + self.memory_as_context(h)
        elif arch == "mag":
            assert self.memory is not None and self.gate is not None
            x = x + self.gate(self.sliding_attention(h), self.memory(h)[0])
        elif arch == "mal":
            assert self.memory is not None
            x = x + self.memory(h)[0]
            x = x + self.sliding_attention(self.attention_norm(x))
        elif arch == "lmm":
            assert self.memory is not None
            x = x + self.memory(h)[0]
        else:  # swa
            x = x + self.sliding_attention(h)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class TitansOutput:
    logits: Tensor
    loss: Tensor | None


class TitansForCausalLM(nn.Module):
    """``out = model(input_ids, labels=None)``: logits (B, T, vocab) and, with labels (aligned with input_ids, −100
    ignored), the mean next-token cross-entropy."""

    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        prefix = 0 if config.architecture == "mac" else config.persistent_tokens
        self.persistent = nn.Parameter(torch.empty(prefix, config.hidden_size)) if prefix else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        if self.persistent is not None:
            nn.init.normal_(self.persistent, std=std)
        for memory in self.memories():  # its own initialisation (gate biases, M_0, near-identity conv)
            memory.reset_parameters()

    @property
    def prefix_length(self) -> int:
        return 0 if self.persistent is None else self.persistent.shape[0]

    def memories(self) -> list[NeuralMemory]:
        return [block.memory for block in self.blocks if block.memory is not None]

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> TitansOutput:
        for memory in self.memories():
            memory.captured.clear()  # records describe the latest forward only
        x = self.embed(input_ids)
        if self.persistent is not None:
            x = torch.cat([self.persistent.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x[:, self.prefix_length :]))
        loss = None
        if labels is not None:
            # bf16 logits are promoted for the softmax; float64 (tests) stays float64
            shifted = logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return TitansOutput(logits=logits, loss=loss)

    # ----- plasticity capture (src/protocols.py: CapturesPlasticity) ------------------------------------------

    def set_capture(self, enabled: bool) -> None:
        """Record (or stop recording, dropping the records) every memory's test-time updates on the next forwards."""
        for memory in self.memories():
            memory.capture = enabled
            memory.captured.clear()

    def plasticity_records(self) -> list[dict[str, Tensor]]:
        """Per memory layer, the records of the latest forward with capture on, over the text tokens only.

        A layer's memory may have run several times in that forward (MAC: once per segment); its calls are joined
        along time. The persistent prefix (MAG / MAL / LMM) is written like any token, so it counts in the first
        chunk's ``delta_w_norm``, but its own per-token rows are dropped."""
        if not self.memories():
            raise EngramError("architecture 'swa' has no memory, so no plasticity records; use mac, mag, mal or lmm.")
        prefix = self.prefix_length
        records = []
        for memory in self.memories():
            if not memory.captured:
                raise EngramError("no plasticity records: run a forward pass with capture on (set_capture(True)).")
            calls = memory.captured
            joined = {key: torch.cat([r[key] for r in calls], dim=-1) for key in calls[0] if key != "position"}
            positions = torch.cat([r["position"] for r in calls])
            keep = positions >= prefix
            record = {key: value if key == "delta_w_norm" else value[..., keep] for key, value in joined.items()}
            record["position"] = positions[keep] - prefix
            records.append(record)
        return records
