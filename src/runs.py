"""Run directories, atomic checkpoint writes, and the CSV logger that keeps its rows across resumes.

Layout of one run (``<root>/<name>/v<N>/``)::

    config.yaml         the fully resolved config (what --print_config would show)
    checkpoints/        last.ckpt (+ any periodic ones); written atomically
    metrics.csv         every logged scalar (CSVLogger), appended to across resumes
    telemetry.jsonl     the event stream (src/telemetry.py)
    per_epoch.csv       one row per epoch: spread of every training scalar, validation scalars (callbacks/epoch_csv.py)

A fresh ``fit`` starts a new version; ``--ckpt_path last`` continues the newest version of ``<root>/<name>`` that
has ``checkpoints/last.ckpt``. DDP ranks started by Lightning inherit the directory through ``ENGRAM_RUN_DIR``.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.errors import EngramError

RUN_DIR_ENV = "ENGRAM_RUN_DIR"
CHECKPOINT_SUBDIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"


def _versions(base: Path) -> list[tuple[int, Path]]:
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if (m := re.fullmatch(r"v(\d+)", p.name)) and p.is_dir()]
    return sorted(found)


def latest_resumable(base: Path) -> Path | None:
    """The newest version directory under ``base`` holding ``checkpoints/last.ckpt``."""
    for _, path in reversed(_versions(base)):
        if (path / CHECKPOINT_SUBDIR / LAST_CHECKPOINT).is_file():
            return path
    return None


def resolve_run_dir(root: str, name: str, resume: bool) -> tuple[Path, bool]:
    """Return ``(run_dir, resuming)``. Child DDP ranks reuse the parent's choice via the environment."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        run_dir = Path(inherited)
        return run_dir, resume and (run_dir / CHECKPOINT_SUBDIR / LAST_CHECKPOINT).is_file()
    base = Path(root) / name
    if resume:
        found = latest_resumable(base)
        if found is not None:
            return found, True
    versions = _versions(base)
    run_dir = base / f"v{versions[-1][0] + 1 if versions else 0}"
    return run_dir, False


def check_checkpoint_file(path: str | Path) -> None:
    """Fail with a clear message if ``path`` is missing or not a readable torch checkpoint (e.g. truncated)."""
    path = Path(path)
    if not path.is_file():
        raise EngramError(f"checkpoint {str(path)!r} does not exist. Check --ckpt_path (or use --ckpt_path last).")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise EngramError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({err}). Resume from an earlier checkpoint, "
            "or start fresh without --ckpt_path."
        ) from err
    if bad is not None:
        raise EngramError(f"checkpoint {str(path)!r} is corrupt (bad member {bad!r}). Resume from another checkpoint.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    A write killed half-way leaves the previous checkpoint untouched (a rename is atomic on POSIX)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run must keep its earlier rows."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                header = next(csv.reader(handle), [])
            self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<run_dir>/metrics.csv`` directly and appending across resumes."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="")

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends between two periodic saves, so
    ``last.ckpt`` always holds the final step (Lightning's saves only on its step/epoch schedule)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
