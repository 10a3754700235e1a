"""The runs under a runs root, and a one-line summary of each, read cheaply enough to poll every two seconds.

A run is a folder holding ``telemetry.jsonl`` or ``config.yaml`` (``src/runs.py``: ``<root>/<name>/v<N>/``; sweep
trials: ``<root>/sweeps/<study>/trial_NNN/``), found at most :data:`MAX_DEPTH` folders down. Hidden folders and
symbolic links are not followed, and a run's own sub-folders are not searched. A summary reads the first and last
few kilobytes of the telemetry file only (family, newest step and loss) and is cached by the file's size and mtime.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from src.dashboard.paths import check_relative

TELEMETRY = "telemetry.jsonl"  # src/telemetry.py TELEMETRY_FILENAME (not imported: the dashboard stays light)
CONFIG = "config.yaml"
MAX_DEPTH = 4
LIVE_SECONDS = 30.0  # a run whose telemetry changed this recently is shown as running
TAIL_BYTES = 256 << 10
LOSS_METRICS = (b'"train/loss"', b'"val/loss"')


@dataclass
class RunSummary:
    run: str  # path below the root, "/"-separated: the run's id in URLs
    family: str | None
    status: str  # running | done | stopped | empty
    step: int | None
    loss: float | None
    updated: float | None  # Unix time of the newest telemetry (or of config.yaml)
    max_steps: int | None

    def to_json(self) -> dict:
        return asdict(self)


def find_runs(root: Path) -> list[str]:
    """The run folders under ``root``, as relative ``/``-separated paths, sorted."""
    found: list[str] = []

    def walk(folder: Path, parts: tuple[str, ...]) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        names = {e.name for e in entries}
        if parts and (TELEMETRY in names or CONFIG in names):
            found.append("/".join(parts))
            return
        if len(parts) >= MAX_DEPTH:
            return
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                check_relative(entry.name)
            except ValueError:  # a name the file endpoint would refuse: do not list it either
                continue
            walk(Path(entry.path), (*parts, entry.name))

    walk(root, ())
    return sorted(found)


def _first_event(path: Path) -> dict | None:
    try:
        with path.open("rb") as handle:
            head = handle.read(64 << 10)
    except OSError:
        return None
    for line in head.split(b"\n")[:-1]:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            return event
    return None


def _tail_state(path: Path, size: int) -> tuple[int | None, float | None]:
    """Newest step and newest loss (training loss, else validation loss) in the last :data:`TAIL_BYTES`."""
    with path.open("rb") as handle:
        handle.seek(max(0, size - TAIL_BYTES))
        tail = handle.read(TAIL_BYTES)
    lines = tail.split(b"\n")
    lines = lines[1:-1] if size > TAIL_BYTES else lines[:-1]  # drop a cut first line and an unfinished last one
    step = loss = None
    for needle in LOSS_METRICS:
        for line in reversed(lines):
            if needle in line:
                try:
                    loss = float(json.loads(line)["value"])
                    loss = loss if math.isfinite(loss) else None  # JSON (and the page) have no NaN
                    break
                except (ValueError, KeyError, TypeError):
                    continue
        if loss is not None:
            break
    for line in reversed(lines):
        try:
            step = int(json.loads(line)["step"])
            break
        except (ValueError, KeyError, TypeError):
            continue
    return step, loss


def _config_facts(path: Path) -> tuple[str | None, int | None]:
    """``(model class name, trainer.max_steps)`` from a run's config.yaml; ``(None, None)`` if unreadable."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None, None
    if not isinstance(config, dict):
        return None, None
    model = config.get("model")
    class_path = model.get("class_path") if isinstance(model, dict) else None
    trainer = config.get("trainer")
    max_steps = trainer.get("max_steps") if isinstance(trainer, dict) else None
    name = class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else None
    return name, max_steps if isinstance(max_steps, int) and max_steps > 0 else None


class RunsIndex:
    """Lists the runs under ``root`` with their summaries; summaries are cached by file size and mtime."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, tuple[tuple, RunSummary]] = {}
        self._lock = threading.Lock()

    def summaries(self) -> list[RunSummary]:
        runs = find_runs(self.root)
        with self._lock:
            for gone in set(self._cache) - set(runs):
                del self._cache[gone]
            return [self._summary(run) for run in runs]

    def _summary(self, run: str) -> RunSummary:
        folder = self.root / run
        telemetry, config = folder / TELEMETRY, folder / CONFIG
        t_stat = _stat(telemetry)
        c_stat = _stat(config)
        stamp = (t_stat and (t_stat.st_size, t_stat.st_mtime_ns), c_stat and c_stat.st_mtime_ns)
        cached = self._cache.get(run)
        if cached is not None and cached[0] == stamp:
            summary = cached[1]
        else:
            model, max_steps = _config_facts(config) if c_stat else (None, None)
            family, step, loss = model, None, None
            if t_stat and t_stat.st_size:
                first = _first_event(telemetry)
                family = str(first.get("family")) if first and first.get("family") else model
                step, loss = _tail_state(telemetry, t_stat.st_size)
            updated = t_stat.st_mtime if t_stat else (c_stat.st_mtime if c_stat else None)
            summary = RunSummary(run, family, "", step, loss, updated, max_steps)
            self._cache[run] = (stamp, summary)
        summary.status = _status(summary, t_stat is not None)
        return summary


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _status(summary: RunSummary, has_telemetry: bool) -> str:
    if summary.max_steps is not None and summary.step is not None and summary.step >= summary.max_steps:
        return "done"
    if summary.updated is not None and time.time() - summary.updated < LIVE_SECONDS:
        return "running"
    return "stopped" if has_telemetry else "empty"
