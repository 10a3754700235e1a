"""EMMA: a DEQ sequence encoder that writes key⊛value pairs into a holographic (HRR) trace and reads them back.

Data flow for a batch ``input_ids [B, T]`` (``D = d_model``, ``d = d_mem``):

1. Encoder. Token embeddings give an input injection u ``[B, T, D]``; the state is the fixed point
   z* = f(z*) of ``DEQCell`` (a causal convolution + tanh, contractive by construction), found by
   ``deq.deq_fixed_point`` with Anderson or plain iteration and differentiated implicitly or by phantom steps.
2. Writes. Position t writes ``β_t · key_{t-1} ⊛ value_t`` with β_t = ``write_strength`` · sigmoid(gate(z*_t)).
   Keys and queries are spectral-normed heads on a causal window of ``key_window`` states (one shared head with
   ``share_query_key``, as the needle presets do); the write key comes from the window ending *before* the value,
   so a later query whose window holds the same context recalls the token that followed it (associative recall). Values are the spectral-normed value head on z*_t. The trace
   follows M_t = α M_{t-1} + write_t with decay α = ``decay``; per-write renormalisation ``renorm``:
   ``write`` (default) rescales every key⊛value pair to unit norm before β weights it; ``unit``/``clip``
   instead renormalise the trace after each write (‖M_t‖ = 1 / ≤ 1), which makes old content fade with every
   write and, in our measurements, stops a needle at L=256 from being learned while write gates are still
   dense; ``none`` adds the raw pairs.
3. Reads. The query of position t unbinds M_t (involution); the raw read is cleaned up against the value
   prototypes by hard argmax or a sharpened softmax (top-k + temperature). For ``lm`` the prototype of token j
   is the value head applied to token j's context-free state (see ``value_prototypes``); for ``classify``
   they are fixed random label vectors.
4. Heads. Logits = head(LayerNorm(z*)) + softplus(read_gate(z*)) · cos(cleaned read, prototypes) / τ_out.
   ``lm`` (needle retrieval): logits for every position, predicting the next token.
   ``classify`` (ListOps-lite): one read at the last real token, logits over ``n_classes``.

The forward returns ``EmmaOutput`` with the logits, the raw reads at supervised positions (for the InfoNCE
loss, see ``EmmaModel.infonce_loss``) and a telemetry dict of detached scalars (keys in ``TELEMETRY_KEYS``).

Plasticity capture (the hook of every memory family, schema in ``src/models/plasticity.py``): after
``model.set_capture(True)`` every forward records, from tensors it already has, per token the write's norm
(``update_norm``), β_t, the value's and the read's prototype cosines, and per block of ``plasticity_chunk`` tokens
‖ΔM‖ of the trace; keys in ``PLASTICITY_KEYS``. The trace is one memory, so the record has one layer and H = 1.
With capture off nothing extra is computed or kept.

Training controls set per batch by the InfoNCE-gate callback (passed as forward arguments by the
LightningModule): ``oracle_mix`` (blend the true prototype into the cleaned read at supervised positions) and
``write_enabled`` (False = the trace is still written, but no gradient reaches the write path: keys, values,
write gates).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from src.errors import EngramError
from src.models.config_checks import OVERRIDES_KEY, check_fields, check_known
from src.models.emma import hrr
from src.models.emma.deq import DEQSettings, SolverStats, deq_fixed_point
from src.models.emma.losses import info_nce
from src.models.plasticity import captured

IGNORE_INDEX = -100

TELEMETRY_KEYS = (
    "read_cos_raw",  # cos(raw read, true prototype), mean over supervised reads (needs read_targets)
    "read_cos_clean",  # cos(cleaned read, true prototype), same reads (before any oracle mix)
    "read_top1",  # fraction of supervised reads whose clean-up argmax is the true prototype
    "write_cos",  # β-weighted mean over writes of max_j cos(value_t, prototype_j)
    "collision_frac",  # β-weighted fraction of written-key pairs with |cos| > 3/√d (random: 0.0027)
    "collision_excess",  # β-weighted mean |cos| of written-key pairs minus the random baseline √(2/(πd))
    "write_gate_open_fraction",  # fraction of real positions whose write gate sigmoid is > 0.5
    "write_strength_mean",  # mean β_t over real positions
    "deq_rel_residual",  # mean over samples of ‖f(z*) − z*‖ / ‖z*‖
    "deq_rel_residual_max",
    "deq_iterations",  # forward solver iterations run for the batch
    "deq_nstep_mean",  # mean iteration at which each sample's returned iterate was reached
)

# The record of the trace after a captured forward (float32, detached; src/models/plasticity.py has the schema).
# Per token t, [B, 1, T] (positions that cannot write, padding and t = 0, have β_t = 0 and update_norm 0):
#   update_norm     ‖write_t‖ = β_t·‖key_{t−1} ⊛ value_t‖ (β_t with renorm="write"): the increment added to the
#                   trace, before the decay of the next step and before any trace renormalisation (unit/clip)
#   write_strength  β_t = write_strength · σ(write_gate(z*_t)) · (t and t−1 are real tokens)
#   write_cos       max_j cos(value_t, prototype_j) (the per-token quantity behind the write_cos telemetry)
#   read_cos        cos(r_t, clean(r_t)): the raw read of M_t with query_t against its cleaned-up read (oracle mix not
#                   applied); for classify every position is read for the record, though only the last is used
# Per block n of ``plasticity_chunk`` tokens (the last one may be shorter), [B, 1, ceil(T / chunk)]:
#   delta_w_norm    ‖M_end − M_start‖: the trace after the block's last token minus the trace before its first one
#                   (the zero trace for block 0); decay and renormalisation included
# Also ``position`` [T] int64 = 0..T−1.
PLASTICITY_TOKEN_KEYS = ("update_norm", "write_strength", "write_cos", "read_cos")
PLASTICITY_CHUNK_KEYS = ("delta_w_norm",)
PLASTICITY_KEYS = (*PLASTICITY_TOKEN_KEYS, *PLASTICITY_CHUNK_KEYS, "position")


@dataclass
class EmmaConfig:
    """Architecture and memory settings; ``EmmaConfig.from_name(preset, **overrides)`` builds a named preset."""

    name: str = "needle-small"
    task: Literal["lm", "classify"] = "lm"
    vocab_size: int = 259  # set from the data module's tokenizer
    n_classes: int = 10  # classify only
    # encoder
    d_model: int = 64
    conv_kernel: int = 4  # causal window of the DEQ cell, in tokens
    contraction: float = 0.9  # γ: a fixed bound on the cell's Lipschitz constant, not learned
    spectral_power_iters: int = 1  # power iterations per training forward for every spectral norm
    deq: DEQSettings = field(default_factory=DEQSettings)
    # memory
    d_mem: int = 256
    key_window: int = 2  # keys and queries read this many consecutive states (ending at the key's position)
    unitary_keys: bool = True  # project keys and queries to |F(k)| = 1 (exact single-pair recall)
    # one head for write keys and read queries: a query whose window repeats the write's context recalls its value
    # from the first step, instead of two heads having to learn to agree first
    share_query_key: bool = False
    write_strength: float = 1.0  # β, multiplies the learned per-position write gate
    decay: float = 1.0  # α, applied to the trace before every write
    renorm: Literal["write", "unit", "clip", "none"] = "write"
    cleanup: Literal["soft", "hard"] = "soft"
    cleanup_temperature: float = 0.1
    read_top_k: int = 0  # read sharpening: keep the top-k prototype similarities (0 = all)
    readout_temperature: float = 0.1  # τ_out for the memory logits
    collision_positions: int = 64  # telemetry: how many most-written keys per sequence enter the collision count
    plasticity_chunk: int = 16  # plasticity capture: ‖ΔM‖ per block of this many tokens (TTT's mini-batch size)

    def __post_init__(self) -> None:
        if isinstance(self.deq, dict):
            check_known(DEQSettings, self.deq, f"{OVERRIDES_KEY}.deq")
            self.deq = DEQSettings(**self.deq)
        check_fields(self, RANGES)

    @property
    def n_prototypes(self) -> int:
        return self.vocab_size if self.task == "lm" else self.n_classes

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> EmmaConfig:
        if name not in PRESETS:
            raise EngramError(f"EMMA preset {name!r} is unknown; choose one of {sorted(PRESETS)}.")
        base = PRESETS[name]
        check_known(cls, overrides)
        deq = overrides.pop("deq", {})
        # deq overrides change single settings of the preset's (and make a copy: presets stay untouched)
        deq = {**asdict(base.deq), **deq} if isinstance(deq, dict) else deq
        return replace(base, **{"name": name, **overrides, "deq": deq})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The domain of every numeric field (its type and the Literal choices are checked from the annotations).
RANGES = {
    "vocab_size": ">= 1",
    "n_classes": ">= 1",
    "d_model": ">= 1",
    "conv_kernel": ">= 1",
    "contraction": "in (0, 1)",  # the DEQ has a unique fixed point only for a contraction
    "spectral_power_iters": ">= 1",
    "d_mem": ">= 2",
    "key_window": ">= 1",
    "write_strength": ">= 0",
    "decay": "in (0, 1]",  # 1 keeps everything until renormalisation
    "cleanup_temperature": "> 0",
    "read_top_k": ">= 0",
    "readout_temperature": "> 0",
    "collision_positions": ">= 1",
    "plasticity_chunk": ">= 1",
}

PRESETS: dict[str, EmmaConfig] = {
    # unit tests: seconds on one CPU core
    "needle-tiny": EmmaConfig(
        name="needle-tiny", d_model=32, d_mem=64, conv_kernel=3, share_query_key=True, deq=DEQSettings(max_iter=20)
    ),
    # needle retrieval. Writes become sparse (one per needle), so d_mem bounds the number of needles, not L:
    # read cos ≈ 1/√k for k stored pairs (unitary keys). needle-small learns L=256 with 4 needles on CPU in minutes.
    "needle-small": EmmaConfig(name="needle-small", d_model=64, d_mem=256, share_query_key=True),
    "needle-base": EmmaConfig(name="needle-base", d_model=96, d_mem=512, share_query_key=True),
    # ListOps-lite (LRA grammar): one read at the last real token (EmmaLM passes the expression up to '='), 10 classes
    "listops-lite": EmmaConfig(
        name="listops-lite", task="classify", vocab_size=18, n_classes=10, d_model=96, d_mem=256, conv_kernel=4
    ),
}


@dataclass
class EmmaOutput:
    """What ``EmmaModel.forward`` returns.

    ``logits``: ``[B, T, vocab]`` (lm; position t predicts token t+1) or ``[B, n_classes]`` (classify).
    ``reads``: raw (unbound, not cleaned) reads ``[N, d_mem]`` at the N supervised positions, float32.
    ``read_targets``: ``[N]`` prototype indices of those reads (empty when no ``read_targets`` were given).
    ``telemetry``: detached 0-dim tensors keyed by ``TELEMETRY_KEYS`` (read_* only with targets).
    ``deq_stats``: the forward solver's per-sample statistics.
    ``prototypes``: the clean-up codebook this forward used ``[n_prototypes, d_mem]`` (InfoNCE candidates).
    """

    logits: Tensor
    reads: Tensor
    read_targets: Tensor
    telemetry: dict[str, Tensor]
    deq_stats: SolverStats
    prototypes: Tensor


class DEQCell(nn.Module):
    """f(z) = γ · mask ⊙ tanh(W · window_K(z) / √K + u): a causal K-token convolution with a spectral-normed W.

    Lipschitz bound in the Frobenius norm over the whole sequence: the causal unfold repeats each state at most
    K times (‖window_K(z)‖ ≤ √K ‖z‖), σ(W) = 1 under spectral normalisation, tanh and the 0/1 mask are
    1-Lipschitz, so Lip(f) ≤ γ < 1 and f is a contraction (Banach: a unique fixed point, and plain iteration
    converges to it). γ is a constant, never learned, so training cannot break the bound. The only slack is the
    power-iteration estimate of σ(W), which is why γ should leave some margin below 1.
    """

    def __init__(self, d_model: int, kernel: int, contraction: float, power_iters: int = 1) -> None:
        super().__init__()
        self.kernel = kernel
        self.contraction = contraction
        self.mix = spectral_norm(nn.Linear(kernel * d_model, d_model, bias=False), n_power_iterations=power_iters)

    def bind_inputs(self, injection: Tensor, mask: Tensor) -> Callable[[Tensor], Tensor]:
        """The map z ↦ f(z) for one input, with the spectral-normed weight computed once, here.

        One weight per solve means every solver iteration applies the same contraction, and the weight is
        computed with autograd on (if it is on), so the differentiable steps after the no-grad solve reach the
        raw parameter.
        """
        weight = self.mix.weight
        gate = mask.unsqueeze(-1)

        def f(z: Tensor) -> Tensor:
            padded = F.pad(z, (0, 0, self.kernel - 1, 0))  # causal: position t sees t-K+1 .. t
            windows = padded.unfold(1, self.kernel, 1).flatten(2)  # [B, T, D*K]
            pre = F.linear(windows, weight) / math.sqrt(self.kernel) + injection
            return self.contraction * torch.tanh(pre) * gate

        return f

    def forward(self, z: Tensor, injection: Tensor, mask: Tensor) -> Tensor:
        return self.bind_inputs(injection, mask)(z)


class EmmaModel(nn.Module):
    """See the module docstring. ``EmmaModel(EmmaConfig.from_name("needle-small", vocab_size=...))``."""

    def __init__(self, config: EmmaConfig) -> None:
        super().__init__()
        self.config = config
        c = config

        def sn(module: nn.Module) -> nn.Module:
            return spectral_norm(module, n_power_iterations=c.spectral_power_iters)

        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.inject = nn.Linear(c.d_model, c.d_model)
        self.cell = DEQCell(c.d_model, c.conv_kernel, c.contraction, c.spectral_power_iters)
        self.key = sn(nn.Linear(c.key_window * c.d_model, c.d_mem, bias=False))
        if not c.share_query_key:
            self.query = sn(nn.Linear(c.key_window * c.d_model, c.d_mem, bias=False))
        self.value = sn(nn.Linear(c.d_model, c.d_mem, bias=False))
        self.write_gate = nn.Linear(c.d_model, 1)
        if c.task == "classify":  # a fixed random codebook: nearly orthogonal labels the reads cannot drag together
            self.register_buffer("class_prototypes", torch.randn(c.n_classes, c.d_mem))
        self.norm = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.n_prototypes)
        self.read_gate = nn.Linear(c.d_model, 1)
        self.capture = False
        self.plasticity: dict[str, Tensor] | None = None

    # --- pieces -------------------------------------------------------------------------------------------
    def value_prototypes(self) -> Tensor:
        """The clean-up codebook ``[n_prototypes, d_mem]``, unit rows.

        ``lm``: prototype j is the value the model writes for token j seen without context (the value head on
        the cell's output for token j alone, γ·tanh(u_j)). Values and prototypes share every weight, so a
        written value starts (and stays, up to its context) next to its token's prototype; ``write_cos``
        measures that distance. ``classify``: fixed random unit vectors, one per label.
        """
        if self.config.task == "classify":
            return F.normalize(self.class_prototypes.float(), dim=-1)
        isolated = self.config.contraction * torch.tanh(self.inject(self.embed.weight))
        return F.normalize(self.value(isolated).float(), dim=-1)

    def _window(self, z: Tensor) -> Tensor:
        """Causal windows of ``key_window`` states ``[B, T, w*D]``, scaled by 1/√w (keeps the head 1-Lipschitz)."""
        w = self.config.key_window
        return F.pad(z, (0, 0, w - 1, 0)).unfold(1, w, 1).flatten(2) / math.sqrt(w)

    def _keys(self, x: Tensor) -> Tensor:
        x = x.float()
        return hrr.make_unitary(x) if self.config.unitary_keys else F.normalize(x, dim=-1)

    def _writes(self, keys: Tensor, values: Tensor, beta: Tensor) -> Tensor:
        """The trace increments β_t · key_t ⊛ value_t ``[B, T, d]``; ``renorm="write"`` gives each pair unit norm
        first, so β alone sets its weight (Gaussian keys would otherwise weight pairs by ‖key ⊛ value‖)."""
        pairs = hrr.bind(keys, values)
        if self.config.renorm == "write":
            pairs = F.normalize(pairs, dim=-1)
        return beta.unsqueeze(-1) * pairs

    def _accumulate(self, writes: Tensor) -> Tensor:
        """Run M_t = α M_{t-1} + write_t over time, renormalising the trace if asked; returns every M_t ``[B, T, d]``.

        ``write``/``none`` leave the recurrence linear: a cumulative sum when α = 1, else a loop. ``unit``/``clip``
        rescale by the trace's own norm after each write, which makes it non-linear (a loop over positions) and
        also makes old content fade by about (1 + ‖write‖²)^(-1/2) per write: harmless with sparse writes,
        fatal for long sequences while the write gates are still open everywhere.
        """
        alpha, mode = self.config.decay, self.config.renorm
        if mode in ("write", "none") and alpha == 1.0:
            return writes.cumsum(dim=1)
        trace = writes.new_zeros(writes.shape[0], writes.shape[2])
        out = []
        for write in writes.unbind(dim=1):  # one UnbindBackward, not T full-size SelectBackwards
            trace = write + trace if alpha == 1.0 else torch.add(write, trace, alpha=alpha)
            if mode in ("unit", "clip"):
                norm = trace.norm(dim=-1, keepdim=True)
                # unit: ‖M‖ = 1 once anything was written (the floor only guards the empty trace);
                # clip: shrink only when ‖M‖ > 1, so decay still acts between writes.
                trace = trace / (norm.clamp_min(1e-6) if mode == "unit" else norm.clamp_min(1.0))
            out.append(trace)
        return torch.stack(out, dim=1)

    # --- forward ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        read_targets: Tensor | None = None,
        *,
        oracle_mix: float = 0.0,
        write_enabled: bool = True,
        telemetry: bool = True,
    ) -> EmmaOutput:
        """Encode, write, read, decode.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding (padding writes nothing, and
                ``classify`` reads at the last real token). None = all real.
            read_targets: the prototype each read should return. ``lm``: ``[B, T]``, the next token at the
                positions whose read is supervised and ``-100`` elsewhere (``needle_read_targets`` builds it
                from answer spans). ``classify``: ``[B]``, the label. Needed for InfoNCE, oracle mixing and the
                read_* telemetry; the logits do not depend on it unless ``oracle_mix > 0``.
            oracle_mix: weight of the true prototype blended into the cleaned read at supervised positions.
            write_enabled: False detaches the write path (the trace is still written and read).
            telemetry: compute the telemetry scalars (no effect on logits).
        """
        c = self.config
        bsz, seq_len = input_ids.shape
        if seq_len < 2 and c.task == "lm":
            raise EngramError(
                f"EMMA needs at least 2 tokens per sequence, got input_ids of shape {tuple(input_ids.shape)}."
            )
        mask = torch.ones_like(input_ids, dtype=torch.float32) if attention_mask is None else attention_mask.float()
        # The encoder and the memory heads run in float32 even under autocast: a bf16 map carries ~1e-2 relative
        # noise, so the solver could never reach its 1e-3 residual (it would run max_iter every forward).
        # Every spectral-normed weight is computed once per forward (one power-iteration update in training);
        # the cache also makes the value head used for values and prototypes the same tensor.
        with hrr.no_autocast(input_ids.device), parametrize.cached():
            injection = self.inject(self.embed(input_ids))
            f = self.cell.bind_inputs(injection, mask)
            z, stats = deq_fixed_point(f, torch.zeros_like(injection), c.deq)
            windows = self._window(z)
            keys, values = self.key(windows), self.value(z)
            queries = keys if c.share_query_key else self.query(windows)
            protos = self.value_prototypes()
            gate = torch.sigmoid(self.write_gate(z).squeeze(-1))

        keys, values = self._keys(keys), F.normalize(values.float(), dim=-1)
        queries = keys if c.share_query_key else self._keys(queries)
        prev_mask = F.pad(mask[:, :-1], (1, 0))  # position t writes key_{t-1}: needs a real token before it
        beta = c.write_strength * gate * mask * prev_mask
        write_keys = F.pad(keys[:, :-1], (0, 0, 1, 0))
        if not write_enabled:
            write_keys, values, beta = write_keys.detach(), values.detach(), beta.detach()
        writes = self._writes(write_keys, values, beta)
        traces = self._accumulate(writes)

        if c.task == "lm":
            reads, states = hrr.unbind(traces, queries), z  # [B, T, d], [B, T, D]
            flat_targets = read_targets.reshape(-1) if read_targets is not None else None
            flat_reads = reads.reshape(-1, c.d_mem)
        else:
            # the last real token, wherever the padding is (ListOps pads on the left, other data on the right)
            positions = torch.arange(seq_len, device=input_ids.device)
            last = torch.where(mask > 0, positions, -1).amax(dim=1).clamp_min(0)
            rows = torch.arange(bsz, device=input_ids.device)
            reads, states = hrr.unbind(traces[rows, last], queries[rows, last]), z[rows, last]  # [B, d], [B, D]
            flat_targets, flat_reads = read_targets, reads

        cleaned, weights = hrr.cleanup(
            reads, protos, mode=c.cleanup, temperature=c.cleanup_temperature, top_k=c.read_top_k
        )
        if flat_targets is not None:
            supervised = flat_targets != IGNORE_INDEX
            sup_targets = flat_targets[supervised]
            sup_reads = flat_reads[supervised]
        else:
            supervised = None
            sup_targets = torch.zeros(0, dtype=torch.long, device=input_ids.device)
            sup_reads = reads.new_zeros(0, c.d_mem)

        decoded = cleaned
        if oracle_mix > 0.0 and supervised is not None:
            flat = cleaned.reshape(-1, c.d_mem)
            mix = torch.zeros(flat.shape[0], 1, device=flat.device, dtype=flat.dtype)
            mix[supervised] = oracle_mix
            oracle = protos[flat_targets.clamp_min(0)]
            decoded = ((1 - mix) * flat + mix * oracle).view_as(cleaned)

        memory_logits = hrr.cosine_matrix(decoded, protos) / c.readout_temperature
        logits = self.head(self.norm(states)) + F.softplus(self.read_gate(states)) * memory_logits.to(states.dtype)

        stats_out: dict[str, Tensor] = {}
        if telemetry or self.capture:
            with torch.no_grad():
                proto_cos = hrr.cosine_matrix(values, protos).amax(dim=-1)  # [B, T] max_j cos(value_t, prototype_j)
                if self.capture:
                    lm = c.task == "lm"
                    self.plasticity = self._measure(
                        writes, traces, queries, protos, beta, proto_cos, reads if lm else None, cleaned if lm else None
                    )
                if telemetry:
                    stats_out = self._write_telemetry(proto_cos, write_keys, beta, gate, mask * prev_mask, stats)
                if telemetry and supervised is not None and sup_targets.numel() > 0:
                    true = protos[sup_targets]
                    sup_cleaned = cleaned.reshape(-1, c.d_mem)[supervised]
                    sup_weights = weights.reshape(-1, protos.shape[0])[supervised]
                    stats_out["read_cos_raw"] = F.cosine_similarity(sup_reads, true, dim=-1).mean()
                    stats_out["read_cos_clean"] = F.cosine_similarity(sup_cleaned, true, dim=-1).mean()
                    stats_out["read_top1"] = (sup_weights.argmax(dim=-1) == sup_targets).float().mean()
        return EmmaOutput(logits, sup_reads, sup_targets, stats_out, stats, protos)

    def _write_telemetry(
        self,
        proto_cos: Tensor,
        write_keys: Tensor,
        beta: Tensor,
        gate: Tensor,
        real: Tensor,
        stats: SolverStats,
    ) -> dict[str, Tensor]:
        """Write-side and solver scalars; ``proto_cos`` [B, T] is max_j cos(value_t, prototype_j) and ``real`` marks
        positions that can write (a real token and one before)."""
        out: dict[str, Tensor] = {}
        beta_sum = beta.sum().clamp_min(1e-12)
        out["write_cos"] = (beta * proto_cos).sum() / beta_sum
        # Collisions among the keys that were actually written: the n most-written positions of each sequence.
        n = min(self.config.collision_positions, beta.shape[1])
        top_beta, top_idx = beta.topk(n, dim=1)
        top_keys = torch.gather(write_keys, 1, top_idx.unsqueeze(-1).expand(-1, -1, write_keys.shape[-1]))
        out["collision_frac"], out["collision_excess"] = hrr.key_collisions(top_keys, top_beta)
        real_sum = real.sum().clamp_min(1.0)
        out["write_gate_open_fraction"] = ((gate > 0.5).float() * real).sum() / real_sum
        out["write_strength_mean"] = beta.sum() / real_sum
        out["deq_rel_residual"] = stats.rel_residual.mean()
        out["deq_rel_residual_max"] = stats.rel_residual.max()
        out["deq_iterations"] = torch.tensor(float(stats.iterations))
        out["deq_nstep_mean"] = stats.nstep.float().mean()
        return {key: value.detach().float() for key, value in out.items()}

    # --- plasticity capture (src/models/plasticity.py) ---------------------------------------------------------
    def set_capture(self, enabled: bool) -> None:
        """Record (or stop recording) the trace's per-token writes on the next forwards; off drops the record."""
        self.capture = enabled
        if not enabled:
            self.plasticity = None

    def plasticity_records(self) -> list[dict[str, Tensor]]:
        """The ``PLASTICITY_KEYS`` record of the latest forward with capture on: one layer (the trace), H = 1."""
        if self.plasticity is None:
            raise EngramError("no plasticity records: run a forward pass with capture on (set_capture(True)) first.")
        return [self.plasticity]

    def capture_plasticity(self) -> AbstractContextManager[list[dict[str, Tensor]]]:
        """``with model.capture_plasticity() as records: model(ids)``; capture is off again afterwards."""
        return captured(self)

    def _measure(
        self,
        writes: Tensor,
        traces: Tensor,
        queries: Tensor,
        protos: Tensor,
        beta: Tensor,
        proto_cos: Tensor,
        reads: Tensor | None,
        cleaned: Tensor | None,
    ) -> dict[str, Tensor]:
        """The ``PLASTICITY_KEYS`` record of this forward from its [B, T, ...] tensors (call under no_grad).

        ``reads``/``cleaned``: the raw and cleaned reads of every position (lm), or None (classify, which reads only
        the last token): then they are computed here, for the record only.
        """
        c = self.config
        if reads is None or cleaned is None:
            reads = hrr.unbind(traces, queries)
            cleaned, _ = hrr.cleanup(
                reads, protos, mode=c.cleanup, temperature=c.cleanup_temperature, top_k=c.read_top_k
            )
        seq_len = beta.shape[1]
        starts = torch.arange(0, seq_len, c.plasticity_chunk, device=traces.device)
        ends = (starts + c.plasticity_chunk).clamp_max(seq_len)
        # with the zero trace prepended, index s holds M_{s−1}: the trace before a block's first token
        before, after = F.pad(traces, (0, 0, 1, 0))[:, starts], traces[:, ends - 1]
        per_chunk = {"delta_w_norm": (after - before).norm(dim=-1)}
        per_token = {
            "update_norm": writes.norm(dim=-1),
            "write_strength": beta,
            "write_cos": proto_cos,
            # float32 both: under autocast the clean-up's matmul may have run in half precision
            "read_cos": F.cosine_similarity(reads.float(), cleaned.float(), dim=-1),
        }
        # float32 and detached (the forward graph must not outlive the step), one head: [B, T] -> [B, 1, T]
        record = {key: value.detach().float().unsqueeze(1) for key, value in {**per_token, **per_chunk}.items()}
        record["position"] = torch.arange(seq_len, device=traces.device)
        return record

    def infonce_loss(self, output: EmmaOutput, temperature: float = 0.07) -> Tensor:
        """InfoNCE of the raw reads against the whole prototype codebook (positive = the true prototype)."""
        if output.read_targets.numel() == 0:
            return output.logits.new_zeros(())
        return info_nce(output.reads, output.prototypes, output.read_targets, temperature)


def needle_read_targets(input_ids: Tensor, answer_start: Tensor, answer_end: Tensor) -> Tensor:
    """``[B, T]`` read targets for needle answers: position p−1 must read the answer token at p.

    ``answer_start``/``answer_end`` are ``[B, n_queries]`` (or ``[B]``) token positions in ``input_ids``,
    end exclusive; the answer tokens are in the input (teacher forcing), as for a causal LM.
    """
    spans = _answer_spans(input_ids, answer_start, answer_end)  # [B, Q, T] bool over answer positions
    in_answer = spans.any(dim=1)
    targets = torch.where(in_answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return F.pad(targets[:, 1:], (0, 1), value=IGNORE_INDEX)


def needle_accuracy(logits: Tensor, input_ids: Tensor, answer_start: Tensor, answer_end: Tensor) -> Tensor:
    """Exact-match accuracy over queries: a query counts when every answer token is the argmax prediction."""
    spans = _answer_spans(input_ids, answer_start, answer_end)
    correct = torch.ones_like(input_ids, dtype=torch.bool)
    correct[:, 1:] = logits[:, :-1].argmax(dim=-1) == input_ids[:, 1:]
    return ((~spans) | correct.unsqueeze(1)).all(dim=-1).float().mean()


def _answer_spans(input_ids: Tensor, answer_start: Tensor, answer_end: Tensor) -> Tensor:
    start = answer_start.reshape(input_ids.shape[0], -1)
    end = answer_end.reshape(input_ids.shape[0], -1)
    if (start < 1).any() or (end <= start).any() or (end > input_ids.shape[1]).any():
        raise EngramError(
            "answer spans must satisfy 1 <= answer_start < answer_end <= seq_len "
            f"(seq_len={input_ids.shape[1]}); got starts {start.tolist()} and ends {end.tolist()}."
        )
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions >= start.unsqueeze(-1)) & (positions < end.unsqueeze(-1))
