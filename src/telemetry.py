"""The telemetry stream: one JSON object per line, shared by every hook, analysis and the dashboard.

Schema of one event (``TelemetryEvent``):

============  ==========  =====================================================================
field         type        meaning
============  ==========  =====================================================================
``run_id``    str         the run directory's name (stable across resumes of the same run)
``step``      int         optimizer steps taken so far (``trainer.global_step``)
``tokens``    int         training tokens seen so far, summed over all ranks
``family``    str         the model family that emitted it (``causal_lm``, ``ttt``, ``emma`` ...)
``metric``    str         slash-separated name, e.g. ``train/loss`` or ``ttt/grad_norm``
``value``     float       the measurement
``time``      float       Unix time of writing
``layer``     int | null  optional: layer index
``head``      int | null  optional: attention / memory head index
``position``  int | null  optional: token position in the sequence
============  ==========  =====================================================================

Optional fields are omitted when they do not apply. The file is append-only: a resumed run keeps
appending to the same file, and readers (``read_events``) tolerate a torn last line from a crash.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

TELEMETRY_FILENAME = "telemetry.jsonl"


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
