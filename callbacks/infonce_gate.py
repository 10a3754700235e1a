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
   on a plateau), or, with ``read_patience`` = n, at the end of the n-th further epoch in a row that is ≥
   ``threshold`` (reads must be ready, not just touch the threshold once). It stays open. ``open_epoch`` is the
   first epoch trained with λ > 0. On opening:
   λ = ``lambda_start``; λ is then held for ``freeze_epochs`` further epochs, after which it grows by
   ``lambda_increment`` per epoch up to ``lambda_max``; the write path is disabled for the next
   ``write_cooldown_batches`` training batches; the learning rate is multiplied by ``lr_scale``, which is
   ``lr_restart_factor`` in ``open_epoch`` and returns to 1 along a half cosine over ``lr_restart_epochs`` epochs.
4. The guard (``guard_drop`` set): once open, an epoch whose EMA falls more than ``guard_drop`` below the EMA the
   gate opened at is a trip: λ is multiplied by ``guard_backoff`` instead of advancing (a freeze epoch is still
   used up). This is the documented failure it catches: InfoNCE pulling reads onto prototypes while the writes
   collapse, so read cosine and accuracy slide after opening.
5. ``oracle_mix`` is independent of the gate: it goes linearly from ``oracle_mix_start`` (epoch 0) to
   ``oracle_mix_end`` (epoch ``oracle_mix_epochs`` and after).

Interface with the LightningModule (nothing else is touched):

* the callback **writes** ``pl_module.infonce_weight`` (float, λ: multiply the InfoNCE loss by it),
  ``pl_module.write_enabled`` (bool) and ``pl_module.oracle_mix`` (float) before every training batch; the
  module passes the last two to ``EmmaModel.forward``;
* the module **sets** ``pl_module.read_cos`` (float or 0-dim tensor: the batch's mean raw read cosine, e.g.
  ``output.telemetry["read_cos_raw"]``) in every ``training_step``; the callback reads it after the batch
  (averaged over ranks under DDP, so all ranks follow one schedule);
* the callback scales every optimizer param group's ``lr`` by ``lr_scale`` for the duration of each
  ``optimizer.step()`` only (step pre- and post-hooks), so LR schedulers never see the factor, whenever Lightning
  steps them, and the two compose multiplicatively; ``lr-*`` curves from LearningRateMonitor show the
  scheduler's LR, ``gate/lr_scale`` the factor;
* it logs ``gate/lambda``, ``gate/open`` (its epoch mean is the fraction of batches with the gate open),
  ``gate/read_cos_ema``, ``gate/write_enabled``, ``gate/oracle_mix``, ``gate/lr_scale``, ``gate/num_bad_epochs``,
  and per epoch ``gate/open_fraction`` (share of the epoch's batches trained with the gate open) and
  ``gate/guard_trips``.

Resuming: the batch sums of the running epoch are part of the state. A checkpoint written at
``on_validation_end`` (what ``ModelCheckpoint`` does whenever validation does not run exactly once per epoch)
precedes ``on_train_epoch_end``; Lightning re-runs that epoch end on resume and the stored sums make it
identical. One written after ``on_train_epoch_end`` already holds the update, which is then not repeated. One
written at the epoch's last ``on_train_batch_end`` (``every_n_train_steps`` landing on an epoch boundary) resumes
straight into the next epoch without that epoch end; the next batch start applies the pending update first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.hooks import RemovableHandle

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
    read_patience: int = 0
    guard_drop: float | None = None
    guard_backoff: float = 0.5
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
        counts = ("patience", "read_patience", "freeze_epochs", "lr_restart_epochs", "write_cooldown_batches")
        for name in (*counts, "oracle_mix_epochs"):
            if getattr(self, name) < 0:
                raise EngramError(f"{name}={getattr(self, name)} must be ≥ 0.")
        if not 0.0 <= self.lambda_start <= self.lambda_max or self.lambda_increment < 0:
            raise EngramError(
                f"need 0 ≤ lambda_start ({self.lambda_start}) ≤ lambda_max ({self.lambda_max}) and "
                f"lambda_increment ({self.lambda_increment}) ≥ 0."
            )
        if self.guard_drop is not None and self.guard_drop < 0:
            raise EngramError(f"guard_drop={self.guard_drop} must be ≥ 0 (or null: no guard).")
        if not 0.0 <= self.guard_backoff <= 1.0:
            raise EngramError(f"guard_backoff={self.guard_backoff} must be in [0, 1] (the factor λ keeps on a trip).")
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
        self.ready_epochs = 0  # consecutive epochs with EMA ≥ threshold (read readiness)
        self.open_ema: float | None = None  # the EMA when the gate opened (the guard's reference)
        self.guard_trips = 0
        self.open_batches = 0  # batches of the running epoch trained with the gate open
        self.open_fraction = 0.0  # of the last completed epoch

    # --- events -------------------------------------------------------------------------------------------
    def record_batch(self, read_cos: float) -> None:
        """After a training batch: add its read cosine to the epoch mean and count down the write cooldown."""
        if not math.isfinite(read_cos):
            raise EngramError(f"read_cos={read_cos} is not finite; the gate needs a real read cosine per batch.")
        self.batch_sum += read_cos
        self.batch_count += 1
        self.open_batches += int(self.is_open)
        self.cooldown_left = max(0, self.cooldown_left - 1)

    def end_epoch(self) -> None:
        """At the end of an epoch: update the EMA and plateau count, then open the gate or advance λ."""
        c = self.config
        if self.batch_count:  # an epoch without batches leaves the EMA as it was
            mean = self.batch_sum / self.batch_count
            self.ema = mean if self.ema is None else c.ema_decay * self.ema + (1 - c.ema_decay) * mean
            self._track_plateau(self.ema)
        self.ready_epochs = self.ready_epochs + 1 if self.ema is not None and self.ema >= c.threshold else 0
        if self.is_open:
            tripped = self._guard_tripped()
            if self.freeze_left > 0:
                self.freeze_left -= 1
            elif not tripped:
                self.lam = min(self.lam + c.lambda_increment, c.lambda_max)
            if tripped:
                self.guard_trips += 1
                self.lam *= c.guard_backoff
        elif self.ready_epochs > c.read_patience and (not c.require_plateau or self.on_plateau):
            self.open_epoch = self.epochs_done + 1
            self.open_ema = self.ema
            self.lam = c.lambda_start
            self.freeze_left = c.freeze_epochs
            self.cooldown_left = c.write_cooldown_batches
        self.open_fraction = self.open_batches / self.batch_count if self.batch_count else 0.0
        self.epochs_done += 1
        self.batch_sum, self.batch_count, self.open_batches = 0.0, 0, 0

    def _guard_tripped(self) -> bool:
        drop = self.config.guard_drop
        if drop is None or self.ema is None or self.open_ema is None:
            return False
        return self.ema < self.open_ema - drop

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
        self._saved_lrs: list[float] = []
        self._hooks: list[RemovableHandle] = []

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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_pre_hook(self._scale_lr))
            self._hooks.append(optimizer.register_step_post_hook(self._restore_lr))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _scale_lr(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
        scale = self.schedule.lr_scale
        if scale != 1.0:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * scale

    def _restore_lr(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in zip(optimizer.param_groups, self._saved_lrs, strict=True):
            group["lr"] = lr

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Resumed past an epoch end that never ran (Lightning calls neither that epoch end nor the next epoch's
        # start after a checkpoint from an epoch's last batch): apply it before this batch uses the schedule.
        while self.schedule.epochs_done < trainer.current_epoch:
            self.schedule.end_epoch()
        self._push(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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
        pl_module.log_dict({"gate/open_fraction": s.open_fraction, "gate/guard_trips": float(s.guard_trips)})
        self._push(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)
