"""InfoNCE gate: open an auxiliary InfoNCE loss on memory reads once reads start to align, then ramp it.

Two layers:

* ``InfoNCEGateSchedule``: the schedule as a plain state machine (no Lightning). Feed it one ``record_batch``
  per training batch and one ``end_epoch`` per epoch; read ``infonce_weight``, ``write_enabled``,
  ``oracle_mix`` and ``lr_scale``. ``state_dict``/``load_state_dict`` capture all of it.
* ``InfoNCEGateCallback``: a thin Lightning wrapper that drives the schedule and applies it.

Schedule (epoch e counts from 0; a decision taken at the end of epoch e applies from epoch e+1):

1. After each epoch the EMA of the epoch's mean read cosine is updated: ``ema = x`` for the first epoch, then
   ``ema = ema_decay · ema + (1 − ema_decay) · x``.
2. Plateau tracking copies ``torch.optim.lr_scheduler.ReduceLROnPlateau`` in ``mode="max"``: the EMA improved
   if it beats the best so far by ``plateau_threshold`` (rel: best·(1 + t); abs: best + t); otherwise
   ``num_bad_epochs`` grows; a plateau is ``num_bad_epochs > patience``.
3. The gate opens at the end of the first epoch whose EMA is ≥ ``threshold`` (and, if ``require_plateau``, that is
   on a plateau). It stays open. ``open_epoch`` is the first epoch trained with λ > 0. On opening:
   λ = ``lambda_start``; λ is then held for ``freeze_epochs`` further epochs, after which it grows by
   ``lambda_increment`` per epoch up to ``lambda_max``; the write path is disabled for the next
   ``write_cooldown_batches`` training batches; the learning rate is multiplied by ``lr_scale``, which is
   ``lr_restart_factor`` in ``open_epoch`` and returns to 1 along a half cosine over ``lr_restart_epochs`` epochs.
4. ``oracle_mix`` is independent of the gate: it goes linearly from ``oracle_mix_start`` (epoch 0) to
   ``oracle_mix_end`` (epoch ``oracle_mix_epochs`` and after).

Interface with the LightningModule (nothing else is touched):

* the callback **writes** ``pl_module.infonce_weight`` (float, λ: multiply the InfoNCE loss by it),
  ``pl_module.write_enabled`` (bool) and ``pl_module.oracle_mix`` (float) before every training batch; the
  module passes the last two to ``EmmaModel.forward``;
* the module **sets** ``pl_module.read_cos`` (float or 0-dim tensor: the batch's mean raw read cosine, e.g.
  ``output.telemetry["read_cos_raw"]``) in every ``training_step``; the callback reads it after the batch
  (averaged over ranks under DDP, so all ranks follow one schedule);
* the callback scales every optimizer param group's ``lr`` by ``lr_scale`` for the duration of each training
  batch and restores it afterwards, so LR schedulers (stepped after ``on_train_batch_end``) never see the
  factor and the two compose multiplicatively;
* it logs ``gate/lambda``, ``gate/open`` (its epoch mean is the fraction of batches with the gate open),
  ``gate/read_cos_ema``, ``gate/write_enabled``, ``gate/oracle_mix``, ``gate/lr_scale``, ``gate/num_bad_epochs``.

Resuming: the batch sums of the running epoch are part of the state. A checkpoint written at
``on_validation_end`` (what ``ModelCheckpoint`` does whenever validation does not run exactly once per epoch)
precedes ``on_train_epoch_end``; Lightning re-runs that epoch end on resume and the stored sums make it
identical. One written after ``on_train_epoch_end`` already holds the update, which is then not repeated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from src.errors import EngramError


@dataclass
class GateConfig:
    """Settings of ``InfoNCEGateSchedule``; see the module docstring for their meaning."""

    ema_decay: float = 0.9
    threshold: float = 0.3
    require_plateau: bool = False
    patience: int = 2
    plateau_threshold: float = 1e-3
    plateau_threshold_mode: Literal["rel", "abs"] = "rel"
    lambda_start: float = 0.05
    lambda_increment: float = 0.05
    lambda_max: float = 0.5
    freeze_epochs: int = 0
    lr_restart_factor: float = 1.0
    lr_restart_epochs: int = 0
    write_cooldown_batches: int = 0
    oracle_mix_start: float = 0.0
    oracle_mix_end: float = 0.0
    oracle_mix_epochs: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise EngramError(f"ema_decay={self.ema_decay} must be in [0, 1).")
        if self.plateau_threshold_mode not in ("rel", "abs"):
            raise EngramError(f"plateau_threshold_mode={self.plateau_threshold_mode!r}: use 'rel' or 'abs'.")
        for name in ("patience", "freeze_epochs", "lr_restart_epochs", "write_cooldown_batches", "oracle_mix_epochs"):
            if getattr(self, name) < 0:
                raise EngramError(f"{name}={getattr(self, name)} must be ≥ 0.")
        if not 0.0 <= self.lambda_start <= self.lambda_max or self.lambda_increment < 0:
            raise EngramError(
                f"need 0 ≤ lambda_start ({self.lambda_start}) ≤ lambda_max ({self.lambda_max}) and "
                f"lambda_increment ({self.lambda_increment}) ≥ 0."
            )
        if self.lr_restart_factor <= 0:
            raise EngramError(f"lr_restart_factor={self.lr_restart_factor} must be > 0 (1 = no restart).")
        for name in ("oracle_mix_start", "oracle_mix_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise EngramError(f"{name}={getattr(self, name)} must be in [0, 1].")


class InfoNCEGateSchedule:
    """The gate as a deterministic state machine; all mutable state is in ``state_dict()``."""

    def __init__(self, config: GateConfig | None = None) -> None:
        self.config = config or GateConfig()
        self.epochs_done = 0  # completed epochs (= index of the running epoch)
        self.batch_sum = 0.0  # read-cosine sum / count of the running epoch
        self.batch_count = 0
        self.ema: float | None = None
        self.best: float | None = None  # best EMA, for plateau tracking
        self.num_bad_epochs = 0
        self.open_epoch: int | None = None
        self.lam = 0.0
        self.freeze_left = 0
        self.cooldown_left = 0

    # --- events -------------------------------------------------------------------------------------------
    def record_batch(self, read_cos: float) -> None:
        """After a training batch: add its read cosine to the epoch mean and count down the write cooldown."""
        if not math.isfinite(read_cos):
            raise EngramError(f"read_cos={read_cos} is not finite; the gate needs a real read cosine per batch.")
        self.batch_sum += read_cos
        self.batch_count += 1
        self.cooldown_left = max(0, self.cooldown_left - 1)

    def end_epoch(self) -> None:
        """At the end of an epoch: update the EMA and plateau count, then open the gate or advance λ."""
        c = self.config
        if self.batch_count:  # an epoch without batches leaves the EMA as it was
            mean = self.batch_sum / self.batch_count
            self.ema = mean if self.ema is None else c.ema_decay * self.ema + (1 - c.ema_decay) * mean
            self._track_plateau(self.ema)
        if self.is_open:
            if self.freeze_left > 0:
                self.freeze_left -= 1
            else:
                self.lam = min(self.lam + c.lambda_increment, c.lambda_max)
        elif self.ema is not None and self.ema >= c.threshold and (not c.require_plateau or self.on_plateau):
            self.open_epoch = self.epochs_done + 1
            self.lam = c.lambda_start
            self.freeze_left = c.freeze_epochs
            self.cooldown_left = c.write_cooldown_batches
        self.epochs_done += 1
        self.batch_sum, self.batch_count = 0.0, 0

    def _track_plateau(self, value: float) -> None:
        c = self.config
        if self.best is None:
            self.best = value
            return
        margin = self.best * c.plateau_threshold if c.plateau_threshold_mode == "rel" else c.plateau_threshold
        if value > self.best + margin:
            self.best, self.num_bad_epochs = value, 0
        else:
            self.num_bad_epochs += 1

    # --- outputs --------------------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.open_epoch is not None

    @property
    def on_plateau(self) -> bool:
        return self.num_bad_epochs > self.config.patience

    @property
    def infonce_weight(self) -> float:
        return self.lam if self.is_open else 0.0

    @property
    def write_enabled(self) -> bool:
        return self.cooldown_left == 0

    @property
    def oracle_mix(self) -> float:
        c = self.config
        if c.oracle_mix_epochs == 0:
            return c.oracle_mix_end
        frac = min(self.epochs_done / c.oracle_mix_epochs, 1.0)
        return c.oracle_mix_start + frac * (c.oracle_mix_end - c.oracle_mix_start)

    @property
    def lr_scale(self) -> float:
        c = self.config
        if self.open_epoch is None or c.lr_restart_epochs == 0:
            return 1.0
        since = self.epochs_done - self.open_epoch
        if since >= c.lr_restart_epochs:
            return 1.0
        return 1.0 + (c.lr_restart_factor - 1.0) * 0.5 * (1.0 + math.cos(math.pi * since / c.lr_restart_epochs))

    # --- checkpointing -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in vars(self).items() if k != "config"}
        state["config"] = asdict(self.config)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, current = state.get("config", {}), asdict(self.config)
        changed = sorted(k for k in saved if saved[k] != current.get(k))
        if changed:  # deliberate on resume perhaps, but then the schedule is no longer the interrupted run's
            rank_zero_warn(f"InfoNCE gate settings {changed} differ from the checkpoint's; the current ones apply.")
        for key, value in state.items():
            if key != "config":
                setattr(self, key, value)


class InfoNCEGateCallback(pl.Callback):
    """Drives ``InfoNCEGateSchedule`` from Lightning hooks; see the module docstring for the module interface."""

    INTERFACE = ("infonce_weight", "write_enabled", "oracle_mix")

    def __init__(self, config: GateConfig | None = None) -> None:
        super().__init__()
        self.schedule = InfoNCEGateSchedule(config)
        self._saved_lrs: list[list[float]] = []

    def _push(self, pl_module: pl.LightningModule) -> None:
        pl_module.infonce_weight = self.schedule.infonce_weight
        pl_module.write_enabled = self.schedule.write_enabled
        pl_module.oracle_mix = self.schedule.oracle_mix

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        missing = [name for name in self.INTERFACE if not hasattr(pl_module, name)]
        if missing:
            raise EngramError(
                f"{type(pl_module).__name__} lacks the InfoNCE-gate attribute(s) {missing}; define "
                "infonce_weight, write_enabled and oracle_mix in __init__ and use them in training_step."
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._push(pl_module)
        scale = self.schedule.lr_scale
        self._saved_lrs = [[group["lr"] for group in opt.param_groups] for opt in trainer.optimizers]
        if scale != 1.0:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["lr"] * scale

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for opt, lrs in zip(trainer.optimizers, self._saved_lrs, strict=True):
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr
        read_cos = getattr(pl_module, "read_cos", None)
        if read_cos is None:
            raise EngramError(
                f"{type(pl_module).__name__}.read_cos was not set in training_step; set it to the batch's mean "
                "raw read cosine (EmmaOutput.telemetry['read_cos_raw'])."
            )
        # Averaged over ranks, so that every rank runs the same schedule under DDP.
        local = torch.as_tensor(read_cos, dtype=torch.float32, device=pl_module.device).detach()
        value = float(trainer.strategy.reduce(local, reduce_op="mean"))
        s = self.schedule
        pl_module.log_dict(
            {
                "gate/lambda": s.infonce_weight,
                "gate/open": float(s.is_open),
                "gate/write_enabled": float(s.write_enabled),
                "gate/oracle_mix": s.oracle_mix,
                "gate/lr_scale": s.lr_scale,
            },
            on_step=True,
            on_epoch=True,
        )
        s.record_batch(value)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.epochs_done <= trainer.current_epoch:  # not yet applied for this epoch
            self.schedule.end_epoch()
        s = self.schedule
        if s.ema is not None:
            pl_module.log_dict({"gate/read_cos_ema": s.ema, "gate/num_bad_epochs": float(s.num_bad_epochs)})
        self._push(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)
