"""Cap-Gauge: how many bits of its training data the model has memorized, live, by the Morris et al. (2025) estimator.

Every ``every_n_steps`` optimizer steps the callback scores a fixed set of uniform-random sequences it knows were
trained on (*seen*) and a matched set it knows were not (*unseen*), and reports

* ``capgauge/bits_seen``, ``capgauge/bits_unseen``: memorized bits M = Σ max(0, S·log2 V − ℓ(x)) over each set
  (``src/analysis/capacity.py``; ``ℓ`` in bits, the first token charged log2 V);
* ``capgauge/bits_diff``: seen − unseen, the bits that only training on those very sequences can explain;
* ``capgauge/bpp_seen``, ``/bpp_unseen``, ``/bpp_diff``: the same divided by the parameter count P (all
  parameters, tied embeddings once: ``count_parameters``);
* ``capgauge/info_bits`` (H of the seen set: the most there is to memorize), ``capgauge/params``,
  ``capgauge/alert_bpp`` (the threshold) and ``capgauge/weight_bits`` (mean storage bits per weight).

Where the sequences come from:

* **synthetic mode**: the data module has a ``canary_set`` (``data_modules.canaries.SyntheticCapacityDataModule``):
  the whole training set is random sequences, the seen set *is* the training set, and ``bpp_seen`` is the paper's
  α (bits per parameter), whose ceiling is ≈3.6.
* **canary mode** (any other map-style data module): the callback mixes ``canary_count`` random sequences of
  ``canary_length`` tokens over the ids ``[canary_vocab_offset, canary_vocab_offset + canary_vocab)`` into the
  training split, as a share ``canary_rate`` of its examples (``data_modules/canaries.py``). The canary bits are
  then a lower bound on what the model memorizes, exact in the paper's sense for the canaries themselves.

**Alert.** When ``bpp_seen`` first reaches ``alert_bpp`` (default: by the weights' storage, 3.8 for fp32 weights
(also under bf16-mixed, whose weights are fp32), 3.5 for bf16/fp16 weights, 3.6 otherwise, e.g. 4-bit) the callback logs a warning, writes ``capgauge/alert`` to the telemetry stream,
POSTs ``{"text": ...}`` (Slack-compatible) to ``webhook_url`` when set, and tells its listeners
(``callbacks.token_checkpoints.TokenCheckpoints`` freezes a checkpoint). It fires once per run, resumes included. A
failed POST is logged and never stops training.

Measurements are taken on every rank (a sharded model needs all of them to run a forward) in eval mode under the
trainer's precision context, with log-softmax in float32; only global rank 0 writes. Listeners register with
:meth:`CapGauge.add_listener` and receive each :class:`CapMeasurement`.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from data_modules.canaries import CanarySet, mix_canaries
from src.analysis.capacity import (
    alert_threshold,
    count_parameters,
    memorized_bits,
    sequence_code_bits,
    weight_bits,
)
from src.errors import EngramError
from src.telemetry import log_scalars

log = logging.getLogger("engram.cap_gauge")


@dataclass
class CapMeasurement:
    step: int
    tokens: int
    bits_seen: float
    bits_unseen: float
    info_bits: float
    params: int
    threshold: float
    weight_bits: float  # mean storage bits per weight
    alert: bool = False  # this measurement fired the alert

    @property
    def bits_diff(self) -> float:
        return self.bits_seen - self.bits_unseen

    @property
    def bpp_seen(self) -> float:
        return self.bits_seen / self.params

    def metrics(self) -> dict[str, float]:
        return {
            "capgauge/bits_seen": self.bits_seen,
            "capgauge/bits_unseen": self.bits_unseen,
            "capgauge/bits_diff": self.bits_diff,
            "capgauge/bpp_seen": self.bits_seen / self.params,
            "capgauge/bpp_unseen": self.bits_unseen / self.params,
            "capgauge/bpp_diff": self.bits_diff / self.params,
            "capgauge/info_bits": self.info_bits,
            "capgauge/params": float(self.params),
            "capgauge/alert_bpp": self.threshold,
            "capgauge/weight_bits": self.weight_bits,
        }


Listener = Callable[[pl.Trainer, pl.LightningModule, CapMeasurement], None]


def post_webhook(url: str, text: str, timeout: float) -> bool:
    """POST ``{"text": text}`` as JSON (Slack incoming-webhook format); ``True`` on a 2xx answer, never raises."""
    request = urllib.request.Request(
        url, data=json.dumps({"text": text}).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except Exception as err:  # any network or HTTP failure: an alert must never stop training
        host = urllib.parse.urlsplit(url).netloc or "?"  # the rest of a webhook URL is a secret
        log.warning("Cap-Gauge webhook POST to %s failed: %s", host, err)
        return False


class CapGauge(pl.Callback):
    """The Cap-Gauge; see the module docstring.

    Args:
        every_n_steps: measure every this many optimizer steps.
        canary_count: canaries mixed into training (canary mode), and the size of the matched unseen set.
        canary_length: tokens per canary (at most the data's ``seq_len``).
        canary_vocab: size of the canary sub-vocabulary V_c.
        canary_vocab_offset: first token id of the sub-vocabulary (skip special tokens of a real tokenizer).
        canary_rate: share of training examples that are canaries (every canary appears at least once per epoch).
        canary_seed: seeds the canaries (independent of the run's seed, so runs share them).
        alert_bpp: bits-per-parameter threshold of the alert; null = by the weights' storage (module docstring).
        webhook_url: where to POST the alert (Slack-compatible JSON); null = no POST.
        webhook_timeout: seconds to wait for the webhook.
        eval_batch_size: sequences per forward pass when measuring.
        max_eval_sequences: score only the first this many sequences of each set and scale by count / n (a large
            synthetic training set); null = all.
        restrict_softmax: renormalise over the canary sub-vocabulary (``sequence_code_bits``).
        verbose: print one line per measurement (rank 0).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        canary_count: int = 256,
        canary_length: int = 64,
        canary_vocab: int = 256,
        canary_vocab_offset: int = 0,
        canary_rate: float = 0.01,
        canary_seed: int = 1234,
        alert_bpp: float | None = None,
        webhook_url: str | None = None,
        webhook_timeout: float = 3.0,
        eval_batch_size: int = 64,
        max_eval_sequences: int | None = None,
        restrict_softmax: bool = True,
        verbose: bool = True,
    ) -> None:
        if every_n_steps < 1 or eval_batch_size < 1:
            raise EngramError(f"every_n_steps={every_n_steps} and eval_batch_size={eval_batch_size} must be >= 1.")
        if max_eval_sequences is not None and max_eval_sequences < 1:
            raise EngramError(f"max_eval_sequences={max_eval_sequences} must be >= 1 (or null for all).")
        self.every_n_steps = every_n_steps
        self.canary_args = dict(
            count=canary_count,
            length=canary_length,
            vocab_size=canary_vocab,
            vocab_offset=canary_vocab_offset,
            seed=canary_seed,
        )
        self.canary_rate = canary_rate
        self.alert_bpp = alert_bpp
        self.webhook_url = webhook_url
        self.webhook_timeout = webhook_timeout
        self.eval_batch_size = eval_batch_size
        self.max_eval_sequences = max_eval_sequences
        self.restrict_softmax = restrict_softmax
        self.verbose = verbose

        self.canaries: CanarySet | None = None
        self.params = 0
        self.threshold = 0.0
        self.weight_bits = 0.0
        self.history: list[CapMeasurement] = []
        self.alerted = False
        self._last_step = -1
        self._start_time = 0.0
        self._listeners: list[Listener] = []

    # --- wiring ---------------------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(trainer, pl_module, measurement)`` after every measurement (on every rank)."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "lm_forward", None)):
            raise EngramError(
                f"Cap-Gauge scores sequences with the model's lm_forward; {type(pl_module).__name__} has none. "
                "Use a language-model family (src.lightning_modules.LanguageModel) or remove the callback."
            )
        datamodule = trainer.datamodule
        if datamodule is None:
            raise EngramError("Cap-Gauge needs a data module (it mixes canaries into the training split).")
        if getattr(datamodule, "canary_set", None) is not None:
            self.canaries = datamodule.canary_set  # synthetic mode: the training set itself
            return
        self.canaries = CanarySet(**self.canary_args)
        mixed = mix_canaries(datamodule, self.canaries, self.canary_rate)
        if trainer.is_global_zero and self.verbose:
            print(
                f"[cap-gauge] {self.canaries.count} canaries x {self.canaries.length} tokens over ids "
                f"[{self.canaries.vocab_offset}, {self.canaries.vocab_offset + self.canaries.vocab_size}) mixed into "
                f"training: {mixed.n_slots} of {len(mixed)} examples ({mixed.rate:.2%})",
                flush=True,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, after the strategy has moved and converted the model, the weights have their training dtype.
        self.params = count_parameters(pl_module)
        self.weight_bits = weight_bits(pl_module)
        self.threshold = self.alert_bpp if self.alert_bpp is not None else alert_threshold(self.weight_bits)
        self._start_time = time.monotonic()

    # --- measuring ------------------------------------------------------------------------------------------
    def _sum_memorized(self, pl_module: pl.LightningModule, tokens: torch.Tensor, trainer: pl.Trainer) -> float:
        assert self.canaries is not None
        n = min(len(tokens), self.max_eval_sequences or len(tokens))
        sums = []  # per chunk, on the device: one transfer at the end
        for chunk in tokens[:n].split(self.eval_batch_size):
            ids = chunk.to(pl_module.device)
            with trainer.precision_plugin.forward_context():
                _, logits = pl_module.lm_forward(ids, None)
            code = sequence_code_bits(
                logits, ids, self.canaries.vocab_offset, self.canaries.vocab_size, self.restrict_softmax
            )
            sums.append(memorized_bits(code, self.canaries.length, self.canaries.vocab_size).sum())
        return float(torch.stack(sums).cpu().double().sum()) * len(tokens) / n

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CapMeasurement:
        """Score the seen and unseen sets now; also fires the alert and informs listeners."""
        assert self.canaries is not None
        modes = {module: module.training for module in pl_module.modules()}  # parents first: restored in order
        pl_module.eval()
        try:
            seen = self._sum_memorized(pl_module, self.canaries.seen, trainer)
            unseen = self._sum_memorized(pl_module, self.canaries.unseen, trainer)
        finally:
            for module, training in modes.items():
                module.train(training)
        m = CapMeasurement(
            step=trainer.global_step,
            tokens=int(getattr(pl_module, "tokens_seen", 0)),
            bits_seen=seen,
            bits_unseen=unseen,
            info_bits=self.canaries.information_bits,
            params=self.params,
            threshold=self.threshold,
            weight_bits=self.weight_bits,
        )
        # Rank 0 decides, so that every rank takes the same branch (a freeze is a collective checkpoint save).
        m.alert = bool(trainer.strategy.broadcast(not self.alerted and m.bpp_seen >= self.threshold, src=0))
        self.alerted = self.alerted or m.alert
        self.history.append(m)
        self._report(trainer, pl_module, m)
        for listener in self._listeners:
            listener(trainer, pl_module, m)
        return m

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, m: CapMeasurement) -> None:
        metrics = m.metrics()
        if m.alert:
            metrics["capgauge/alert"] = m.bpp_seen
        log_scalars(trainer, metrics)
        if not trainer.is_global_zero:
            return
        if self.verbose:
            print(
                f"[cap-gauge] step={m.step} tokens={m.tokens} wall={time.monotonic() - self._start_time:.0f}s "
                f"bits_seen={m.bits_seen:,.0f} bits_unseen={m.bits_unseen:,.0f} bpp={m.bpp_seen:.3f} "
                f"(P={m.params:,}, H={m.info_bits:,.0f} bits, alert at {m.threshold})",
                flush=True,
            )
        if m.alert:
            text = (
                f"[engram] Cap-Gauge alert: run {trainer.default_root_dir} reached {m.bpp_seen:.3f} bits/parameter "
                f"(threshold {m.threshold}, {m.weight_bits:.1f}-bit weights) at step {m.step}, {m.tokens:,} tokens."
            )
            log.warning(text)
            if self.webhook_url:
                post_webhook(self.webhook_url, text, self.webhook_timeout)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        step = trainer.global_step
        if step == self._last_step or step == 0 or step % self.every_n_steps != 0:
            return
        self._last_step = step
        self.measure(trainer, pl_module)

    # --- resuming -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"alerted": self.alerted, "last_step": self._last_step, "history": [asdict(m) for m in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alerted = bool(state_dict["alerted"])
        self._last_step = int(state_dict["last_step"])
        self.history = [CapMeasurement(**m) for m in state_dict["history"]]
