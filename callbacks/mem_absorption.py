"""Mem-Absorption: how fast the model is taking memorized bits in, and when that speed jumps.

**Definition.** Let ``M_k`` be the Cap-Gauge's seen − unseen memorized bits (``capgauge/bits_diff``) at its k-th
measurement and ``T_k`` the training tokens seen by then. The *absorption rate* is

    A_k = (M_k − M_{k−1}) / ((T_k − T_{k−1}) / 10^6)        bits per million training tokens

Using seen − unseen rather than the seen bits alone removes what the model learns about random sequences *in
general* (e.g. the canary sub-vocabulary), leaving the bits only those particular sequences explain. A_k > 0 means
memorization is growing; it falls to ~0 when the model saturates (the Morris et al. plateau), and is negative when
memorized canaries are being forgotten or overwritten.

An *absorption spike* is a measurement whose rate stands out from the recent ones: a one-sided rolling z-score
``z_k = (A_k − mean) / std`` over the previous ``window`` rates (``src.analysis.capacity.SpikeDetector``), a spike
when ``z_k > z_threshold`` once ``min_history`` rates are known. Spikes are the moments to look at: a burst of
memorization, e.g. when the data's bits approach the model's capacity (where Morris et al. see double descent) or
after a learning-rate change.

Beside it, at every validation, the callback writes the *generalisation gap*: the validation loss minus the mean
training loss since the previous validation (nats per token). Memorization that grows while the gap widens is
memorization at the expense of generalisation.

Telemetry (and loggers): ``mem_absorption/rate`` (A_k), ``mem_absorption/zscore`` (once warmed up),
``mem_absorption/spike`` (1.0 at a spike, else 0.0) at every Cap-Gauge measurement after the first, and
``mem_absorption/gen_gap`` at every validation. Needs a :class:`~callbacks.cap_gauge.CapGauge` in the same trainer.

README paragraph: *Mem-Absorption is the rate at which a model memorizes, in bits per million training tokens:
the change of the Cap-Gauge's seen-minus-unseen canary bits between two measurements divided by the tokens trained
in between. A rolling z-score over the last ``window`` rates marks absorption spikes (sudden bursts of
memorization) in the telemetry stream, written next to the generalisation gap (validation minus training loss).*
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.cap_gauge import CapGauge, CapMeasurement
from src.analysis.capacity import SpikeDetector
from src.errors import EngramError
from src.telemetry import log_scalars


class MemAbsorption(pl.Callback):
    """Mem-Absorption rate, spikes and the generalisation gap; see the module docstring.

    Args:
        window: rates in the rolling z-score window.
        z_threshold: z-score above which a rate is a spike.
        min_history: rates needed before spikes are detected.
        verbose: print a line at every spike (rank 0).
    """

    def __init__(self, window: int = 20, z_threshold: float = 3.0, min_history: int = 5, verbose: bool = True) -> None:
        try:
            self.detector = SpikeDetector(window, z_threshold, min_history)
        except ValueError as err:
            raise EngramError(f"MemAbsorption: {err}.") from err
        self.verbose = verbose
        self.previous: tuple[int, float] | None = None  # (tokens, bits) of the last measurement
        self.rates: list[dict[str, Any]] = []  # step, tokens, rate, z, spike: the series so far
        self.gaps: list[dict[str, float]] = []  # step, tokens, gen_gap
        self._loss_sum: torch.Tensor | float = 0.0  # summed on the device: no host sync per step
        self._loss_count = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        gauges = [cb for cb in trainer.callbacks if isinstance(cb, CapGauge)]  # type: ignore[attr-defined]
        if not gauges:
            raise EngramError("MemAbsorption reads the Cap-Gauge's measurements: add callbacks.cap_gauge.CapGauge.")
        gauges[0].add_listener(self._on_measurement)

    def _on_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule, m: CapMeasurement) -> None:
        previous, self.previous = self.previous, (m.tokens, m.bits_diff)
        if previous is None or m.tokens <= previous[0]:
            return
        rate = (m.bits_diff - previous[1]) / ((m.tokens - previous[0]) / 1e6)
        z, spike = self.detector.update(rate)
        self.rates.append({"step": m.step, "tokens": m.tokens, "rate": rate, "z": z, "spike": spike})
        metrics = {"mem_absorption/rate": rate, "mem_absorption/spike": float(spike)}
        if z is not None:
            metrics["mem_absorption/zscore"] = z
        log_scalars(trainer, metrics)
        if spike and self.verbose and trainer.is_global_zero:
            print(f"[mem-absorption] spike at step {m.step}: {rate:,.1f} bits/Mtok (z={z:.1f})", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning hands over the loss divided by the accumulation count; undo that for a per-batch mean.
            self._loss_sum = self._loss_sum + loss.detach().float() * trainer.accumulate_grad_batches
            self._loss_count += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        val = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or val is None or self._loss_count == 0:
            return
        train = float(self._loss_sum) / self._loss_count
        self._loss_sum, self._loss_count = 0.0, 0
        gap = float(val) - train
        tokens = int(getattr(pl_module, "tokens_seen", 0))
        self.gaps.append({"step": trainer.global_step, "tokens": tokens, "gen_gap": gap})
        log_scalars(trainer, {"mem_absorption/gen_gap": gap})

    def state_dict(self) -> dict[str, Any]:
        return {
            "previous": list(self.previous) if self.previous is not None else None,
            "detector": self.detector.state_dict(),
            "rates": self.rates,
            "gaps": self.gaps,
            "loss_sum": float(self._loss_sum),
            "loss_count": self._loss_count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        previous = state_dict["previous"]
        self.previous = (int(previous[0]), float(previous[1])) if previous is not None else None
        self.detector.load_state_dict(state_dict["detector"])
        self.rates = list(state_dict["rates"])
        self.gaps = list(state_dict["gaps"])
        self._loss_sum = float(state_dict["loss_sum"])
        self._loss_count = int(state_dict["loss_count"])
