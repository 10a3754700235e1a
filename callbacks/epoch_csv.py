"""The per-epoch summary table of a run: ``<run_dir>/per_epoch.csv``, one row per training epoch.

``metrics.csv`` holds every logged value at every step; this table is the one a researcher reads first. For every
scalar the module (and its callbacks) logged each training step, it keeps the epoch's spread, not just a mean:
``<name>/mean``, ``<name>/std``, ``<name>/min``, ``<name>/max`` over the epoch's batches (e.g. how far the read
cosine of an EMMA run scatters while its gate opens). Scalars logged once at the epoch's end by callbacks
listed before this one (the InfoNCE gate's ``gate/read_cos_ema``, ``gate/open_fraction``) keep their name. Then
the epoch's validation scalars as last logged (``val/...``), the epoch, the step and the wall time.

The statistics are accumulated as tensors on the metric's device and read once per epoch (no per-step host
sync). Only global rank 0 writes; the file is rewritten atomically each epoch (temp file + rename), so a killed run
never leaves a torn table. Rows and the running epoch's sums are part of the checkpoint, so a resumed run (in
place or into a new directory) writes the same table an uninterrupted one would; except that after a resume from a
checkpoint of an epoch's last batch, whose epoch end Lightning does not run again, that epoch's row lacks the
values only that epoch end logs (its validation, a gate's EMA) and its wall time.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from src.atomic import atomic_write

EPOCH_CSV_FILENAME = "per_epoch.csv"
EVAL_PREFIXES = ("val/", "test/")


def step_scalars(metrics: dict[str, object]) -> dict[str, torch.Tensor]:
    """The training scalars of the last step, from ``trainer.callback_metrics``: everything the module and its
    callbacks logged (``train/...``, family telemetry such as ``emma/...``, ``gate/...``) minus eval metrics and
    epoch aggregates. A value logged with both ``on_step`` and ``on_epoch`` appears as ``name_step``; it is
    returned as ``name``."""
    out: dict[str, torch.Tensor] = {}
    for name, value in metrics.items():
        if name.startswith(EVAL_PREFIXES) or name.endswith("_epoch"):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name.removesuffix("_step")] = value.reshape(())
    return out


def logged_scalars(metrics: dict[str, object], prefix: str = "") -> dict[str, torch.Tensor]:
    """The scalars under ``prefix`` (``val/``, ``test/``; all by default) in ``trainer.callback_metrics``."""
    return {
        name: value
        for name, value in metrics.items()
        if name.startswith(prefix) and isinstance(value, torch.Tensor) and value.numel() == 1
    }


class _Spread:
    """Running count, sum, sum of squares, min and max of one scalar, kept on its device."""

    def __init__(self, value: torch.Tensor) -> None:
        v = value.detach().double()
        self.count, self.total, self.squares, self.low, self.high = 1, v.clone(), v * v, v.clone(), v.clone()

    def add(self, value: torch.Tensor) -> None:
        v = value.detach().double().to(self.total.device)
        self.count += 1
        self.total += v
        self.squares += v * v
        self.low = torch.minimum(self.low, v)
        self.high = torch.maximum(self.high, v)

    def summary(self) -> dict[str, float]:
        mean = self.total.item() / self.count
        var = max(self.squares.item() / self.count - mean * mean, 0.0)
        return {"mean": mean, "std": var**0.5, "min": self.low.item(), "max": self.high.item()}

    def state(self) -> list[float]:
        return [float(self.count), self.total.item(), self.squares.item(), self.low.item(), self.high.item()]

    @classmethod
    def from_state(cls, state: list[float]) -> _Spread:
        spread = cls(torch.tensor(state[1], dtype=torch.float64))
        spread.count = int(state[0])
        spread.squares, spread.low, spread.high = (torch.tensor(v, dtype=torch.float64) for v in state[2:])
        return spread


class EpochCSVCallback(pl.Callback):
    """Writes ``per_epoch.csv`` (see the module docstring).

    Args:
        filename: the table's file name inside the run directory.
    """

    def __init__(self, filename: str = EPOCH_CSV_FILENAME) -> None:
        self.filename = filename
        self.rows: list[dict[str, float]] = []
        self._spreads: dict[str, _Spread] = {}
        self._spreads_epoch = 0  # the epoch the running sums belong to
        self._before: dict[str, Any] = {}
        self._start = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        # Lightning keeps a value logged once (at an epoch end, say) in callback_metrics until it is logged again;
        # what is still the very same tensor later was not logged in this epoch.
        self._before = dict(trainer.callback_metrics)

    def _fresh(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        """Training scalars logged since this epoch started."""
        metrics = trainer.callback_metrics
        return step_scalars({name: v for name, v in metrics.items() if v is not self._before.get(name)})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self._spreads and self._spreads_epoch < trainer.current_epoch:
            # Resumed from a checkpoint of an epoch's last batch: Lightning runs neither that epoch's end nor the
            # next epoch's start, so close the pending epoch here.
            self._add_row(trainer, self._spreads_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._spreads_epoch = trainer.current_epoch
        for name, value in self._fresh(trainer).items():
            spread = self._spreads.get(name)
            if spread is None:
                self._spreads[name] = _Spread(value)
            else:
                spread.add(value)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(row["epoch"] == trainer.current_epoch for row in self.rows):  # not yet recorded (resume)
            self._add_row(trainer, trainer.current_epoch)

    def _add_row(self, trainer: pl.Trainer, epoch: int) -> None:
        row: dict[str, float] = {"epoch": epoch, "step": trainer.global_step}
        for name, spread in sorted(self._spreads.items()):
            row.update({f"{name}/{stat}": value for stat, value in spread.summary().items()})
        # values logged once at this epoch's end (by callbacks that run before this one), e.g. gate/read_cos_ema
        row.update({name: v.item() for name, v in sorted(self._fresh(trainer).items()) if name not in self._spreads})
        row.update(
            {name: value.item() for name, value in sorted(logged_scalars(trainer.callback_metrics, "val/").items())}
        )
        # an epoch closed late (after a resume) has no wall time of its own
        row["epoch_seconds"] = time.monotonic() - self._start if epoch == trainer.current_epoch else float("nan")
        self.rows.append(row)
        self._spreads = {}
        if trainer.is_global_zero:
            self.write(Path(trainer.default_root_dir) / self.filename)

    def write(self, path: Path) -> None:
        """The whole table, atomically; columns are the union over rows (a metric that appears later is blank
        before)."""
        columns: list[str] = []
        for row in self.rows:
            columns += [c for c in row if c not in columns]

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(path, write_csv)

    def state_dict(self) -> dict[str, Any]:
        spreads = {name: s.state() for name, s in self._spreads.items()}
        return {"rows": self.rows, "spreads": spreads, "spreads_epoch": self._spreads_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])
        self._spreads = {name: _Spread.from_state(s) for name, s in state_dict["spreads"].items()}
        self._spreads_epoch = int(state_dict["spreads_epoch"])
