"""The callback that owns a run's telemetry stream (``<run_dir>/telemetry.jsonl``; schema in ``src/telemetry.py``).

Every ``every_n_steps`` optimizer steps it writes the training scalars the LightningModule and its callbacks logged
(``trainer.callback_metrics``: ``train/...`` and family telemetry such as ``emma/...``) as events, and after each
validation the validation scalars. Other callbacks add their own events through
:func:`telemetry_of`, so every hook shares one file and one format::

    stream = telemetry_of(trainer)
    if stream is not None:
        stream.emit_rows(trainer, pl_module, [("ttt/grad_norm", 0.3, layer, head, None)])

Only global rank 0 writes. ``pl_module.family`` (a string) and ``pl_module.tokens_seen`` (an int) are read when the
module has them.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from src.errors import EngramError
from src.telemetry import TELEMETRY_FILENAME, TelemetryWriter

Row = tuple[str, float, int | None, int | None, int | None]
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


def _rows(scalars: dict[str, torch.Tensor]) -> list[Row]:
    return [(name, float(value.item()), None, None, None) for name, value in sorted(scalars.items())]


class TelemetryCallback(pl.Callback):
    """Writes the run's telemetry stream.

    Args:
        every_n_steps: how often (in optimizer steps) logged training scalars are written as events.
        filename: the stream's file name inside the run directory.
    """

    def __init__(self, every_n_steps: int = 10, filename: str = TELEMETRY_FILENAME) -> None:
        if every_n_steps < 1:
            raise EngramError(f"telemetry.every_n_steps={every_n_steps} must be >= 1.")
        self.every_n_steps = every_n_steps
        self.filename = filename
        self.writer: TelemetryWriter | None = None
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.writer is None:
            run_dir = Path(trainer.default_root_dir)
            run_id = f"{run_dir.parent.name}/{run_dir.name}"
            self.writer = TelemetryWriter(run_dir / self.filename, run_id, getattr(pl_module, "family", "unknown"))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.writer is not None:
            self.writer.close()

    def emit_rows(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rows: list[Row]) -> None:
        """Append ``(metric, value, layer, head, position)`` rows at the current step and token count."""
        if self.writer is None or not rows:
            return
        tokens = int(getattr(pl_module, "tokens_seen", 0))
        self.writer.emit_many(rows, step=trainer.global_step, tokens=tokens)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps != 0:
            return
        self._last_step = step
        rows = _rows(step_scalars(trainer.callback_metrics))
        rows.append(("train/tokens_seen", float(getattr(pl_module, "tokens_seen", 0)), None, None, None))
        self.emit_rows(trainer, pl_module, rows)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.emit_rows(trainer, pl_module, _rows(logged_scalars(trainer.callback_metrics, "val/")))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.emit_rows(trainer, pl_module, _rows(logged_scalars(trainer.callback_metrics, "test/")))


def telemetry_of(trainer: pl.Trainer) -> TelemetryCallback | None:
    """The run's telemetry callback, if one is attached."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, TelemetryCallback):
            return callback
    return None
