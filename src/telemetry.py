"""The telemetry stream: one JSON object per line, shared by every hook, analysis and the dashboard.

Schema of one event (``TelemetryEvent``):

============  ==========  =====================================================================
field         type        meaning
============  ==========  =====================================================================
``run_id``    str         the run directory's name (stable across resumes of the same run)
``step``      int         optimizer steps taken so far (``trainer.global_step``)
``tokens``    int         training tokens seen so far, summed over all ranks
``family``    str         the model family that emitted it (``causal_lm``, ``ttt``, ``emma`` ...)
``metric``    str         slash-separated name, e.g. ``train/loss`` or ``ttt/update_norm``
``value``     float       the measurement
``time``      float       Unix time of writing
``layer``     int | null  optional: layer index
``head``      int | null  optional: attention / memory head index
``position``  int | null  optional: token position in the sequence
============  ==========  =====================================================================

Optional fields are omitted when they do not apply. The file is append-only: a resumed run keeps
appending to the same file, and readers (``read_events``) tolerate a torn last line from a crash.

One observation path writes it: :class:`TelemetryLogger`, a Lightning logger the CLI installs beside the CSV logger.
Scalars reach it (and every other logger) the Lightning way, ``self.log`` in a module or callback hook; code outside
the hooks that allow ``self.log`` calls :func:`log_scalars`. Structured rows (a layer, head or position) go through
:func:`log_rows`, to the telemetry stream only. Nothing else writes the file::

    log_rows(trainer, [("ttt/update_norm", 0.3, layer, head, None)])

``step`` is the same number in ``metrics.csv``, here and in the plasticity tables: ``trainer.global_step``, the
optimizer steps completed when the value was logged (Lightning's own logging counter lags it by one in training).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

TELEMETRY_FILENAME = "telemetry.jsonl"
Row = tuple[str, float, int | None, int | None, int | None]  # (metric, value, layer, head, position)


@dataclass(frozen=True)
class TelemetryEvent:
    run_id: str
    step: int
    tokens: int
    family: str
    metric: str
    value: float
    time: float
    layer: int | None = None
    head: int | None = None
    position: int | None = None

    def to_json(self) -> str:
        record = {k: v for k, v in asdict(self).items() if v is not None}
        # JSON has no NaN/inf; keep the line valid and the fact visible.
        if not math.isfinite(record["value"]):
            record["value"] = str(record["value"])
        return json.dumps(record, separators=(",", ":"))


class TelemetryWriter:
    """Appends events to ``<run_dir>/telemetry.jsonl`` and flushes after every batch of events."""

    def __init__(self, path: str | Path, run_id: str, family: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.family = family
        self._file: IO[str] | None = None

    def _handle(self) -> IO[str]:
        if self._file is None or self._file.closed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        return self._file

    def emit(
        self,
        metric: str,
        value: float,
        *,
        step: int,
        tokens: int,
        layer: int | None = None,
        head: int | None = None,
        position: int | None = None,
        family: str | None = None,
    ) -> None:
        self.emit_many([(metric, value, layer, head, position)], step=step, tokens=tokens, family=family)

    def emit_many(
        self,
        rows: list[tuple[str, float, int | None, int | None, int | None]],
        *,
        step: int,
        tokens: int,
        family: str | None = None,
    ) -> None:
        """Write ``(metric, value, layer, head, position)`` rows as events sharing one step and time."""
        now = time.time()
        fam = family or self.family
        lines = [
            TelemetryEvent(self.run_id, int(step), int(tokens), fam, m, float(v), now, la, h, p).to_json()
            for m, v, la, h, p in rows
        ]
        if not lines:
            return
        handle = self._handle()
        handle.write("\n".join(lines) + "\n")
        handle.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TrainerStep:
    """For loggers that record ``trainer.global_step`` instead of the step Lightning passes them. Lightning's counter
    is the number of optimizer steps *before* the one just taken while training and the number after it elsewhere, so
    two files logged at the same moment disagreed by one. :meth:`bind` gives the logger its trainer (the CLI does it);
    unbound, Lightning's step is kept."""

    _trainer: pl.Trainer | None = None

    def bind(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer

    def trainer_step(self, step: int | None) -> int:
        return self._trainer.global_step if self._trainer is not None else int(step or 0)


class TelemetryLogger(TrainerStep, Logger):
    """Writes ``<run_dir>/telemetry.jsonl``: every logged scalar as an event, and structured rows (:meth:`log_rows`).

    Events carry ``trainer.global_step``, the module's ``tokens_seen`` and ``family`` once :meth:`bind` gave the
    logger its trainer. Only global rank 0 writes. Scalars are named as logged; a value logged both per step and per
    epoch arrives as ``name_step`` and is written as ``name``, its epoch aggregate (``name_epoch``) is left out.
    """

    def __init__(self, run_dir: str | Path, filename: str = TELEMETRY_FILENAME) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.filename = filename
        self._writer: TelemetryWriter | None = None

    @property
    def name(self) -> str:
        return "telemetry"

    @property
    def version(self) -> str:
        return self.run_dir.name

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    def _module_value(self, name: str, default: Any) -> Any:
        module = self._trainer.lightning_module if self._trainer is not None else None
        return getattr(module, name, default) if module is not None else default

    def _stream(self) -> TelemetryWriter:
        if self._writer is None:
            run_id = f"{self.run_dir.parent.name}/{self.run_dir.name}"
            family = str(self._module_value("family", "unknown"))
            self._writer = TelemetryWriter(self.run_dir / self.filename, run_id, family)
        return self._writer

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing: the run's ``config.yaml`` holds them."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        rows: list[Row] = [
            (name.removesuffix("_step"), float(value), None, None, None)
            for name, value in sorted(metrics.items())
            if name != "epoch" and not name.endswith("_epoch")
        ]
        self._write(rows, self.trainer_step(step))

    @rank_zero_only
    def log_rows(self, rows: list[Row], step: int | None = None) -> None:
        """Append ``(metric, value, layer, head, position)`` rows at the token count and ``step`` (default: the
        trainer's; a capture of the forward before step S+1's update says S, as its plasticity table does)."""
        self._write(rows, self.trainer_step(None) if step is None else step)

    def _write(self, rows: list[Row], step: int) -> None:
        if rows:
            self._stream().emit_many(rows, step=step, tokens=int(self._module_value("tokens_seen", 0)))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Give ``metrics`` to every logger at the current step, for code outside the hooks where ``self.log`` works
    (a listener, a callback's end-of-stage hook). The loggers write on global rank 0 only."""
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=trainer.global_step)


def log_rows(trainer: pl.Trainer, rows: list[Row], step: int | None = None) -> None:
    """Append structured rows (a layer, head or position; see :class:`TelemetryLogger`) to the telemetry stream."""
    for logger in trainer.loggers:
        if isinstance(logger, TelemetryLogger):
            logger.log_rows(rows, step)


def read_events(path: str | Path) -> Iterator[dict]:
    """Yield the events of a telemetry file; a torn final line (crash mid-write) is skipped."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event.get("value"), str):
                event["value"] = float(event["value"])
            yield event
