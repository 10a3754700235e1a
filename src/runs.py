"""Run directories and the CSV logger that keeps its rows across resumes.

Layout of one run (``<root>/<name>/v<N>/``)::

    config.yaml         the fully resolved config (what --print_config would show)
    checkpoints/        last.ckpt (+ any periodic ones); written atomically
    metrics.csv         every logged scalar (CSVLogger), appended to across resumes
    telemetry.jsonl     the event stream (src/telemetry.py)
    per_epoch.csv       one row per epoch: spread of every training scalar, validation scalars (callbacks/epoch_csv.py)

A fresh ``fit`` starts a new version; ``--ckpt_path last`` continues the newest version of ``<root>/<name>`` that
has ``checkpoints/last.ckpt``. DDP ranks started by Lightning inherit the directory through ``ENGRAM_RUN_DIR``.
A run name is one plain folder name (:data:`RUN_NAME`), so a run never lands outside ``--run.root``; ``--run.dir``
is the one way to write elsewhere.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from src.errors import EngramError
from src.telemetry import TrainerStep

RUN_DIR_ENV = "ENGRAM_RUN_DIR"
CHECKPOINT_SUBDIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"


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


def check_run_name(name: str) -> str:
    """``name`` if it is one plain folder name (no separators, no ``..``, not absolute), else one clear error."""
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise EngramError(
            f"run.name={name!r} is not a plain folder name: use {RUN_NAME_RULE} (no '/', '..' or absolute paths). "
            "To write outside --run.root, give an exact --run.dir instead."
        )
    return name


def default_run_name(config_file: str | None) -> str:
    """The first config's stem made into a valid run name (``engram`` without a config)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(config_file).stem).strip(".-_") if config_file else ""
    return stem[:128] or "engram"


def writable_folder(path: str | Path, key: str) -> Path:
    """Create ``path`` if needed and check it can be written to, or raise one line naming ``key``."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise EngramError(f"{key}={str(path)!r} is a file, not a folder. Give a folder (it is created if missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EngramError(f"{key}={str(path)!r} cannot be created ({err.strerror}). Give a writable folder.") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EngramError(f"{key}={str(path)!r} is not writable. Give a writable folder.")
    return folder


def resolve_run_dir(root: str, name: str, resume: bool) -> tuple[Path, bool]:
    """Return ``(run_dir, resuming)`` for ``<root>/<name>/v<N>``. Child DDP ranks reuse the parent's choice."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        run_dir = Path(inherited)
        return run_dir, resume and (run_dir / CHECKPOINT_SUBDIR / LAST_CHECKPOINT).is_file()
    check_run_name(name)
    root_dir = writable_folder(root, "run.root")
    base = root_dir / name
    if not base.resolve().is_relative_to(root_dir.resolve()):  # e.g. <root>/<name> is a link to elsewhere
        raise EngramError(
            f"run directory {str(base)!r} resolves to {str(base.resolve())!r}, outside run.root={root!r}. Remove the "
            "link, or give the exact --run.dir to write there."
        )
    if resume:
        found = latest_resumable(base)
        if found is not None:
            return found, True
    versions = _versions(base)
    run_dir = base / f"v{versions[-1][0] + 1 if versions else 0}"
    return run_dir, False


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run must keep its earlier rows."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                header = next(csv.reader(handle), [])
            self.metrics_keys = sorted(header)


class RunCSVLogger(TrainerStep, CSVLogger):
    """``CSVLogger`` writing ``<run_dir>/metrics.csv`` directly and appending across resumes; its ``step`` column is
    ``trainer.global_step`` once bound (:class:`~src.telemetry.TrainerStep`), as in ``telemetry.jsonl``."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="")

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, self.trainer_step(step))

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
