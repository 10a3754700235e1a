"""The telemetry stream format: one JSON object per line, optional fields omitted, torn lines tolerated."""

from __future__ import annotations

import json
from pathlib import Path

from src.telemetry import TelemetryWriter, read_events


def test_events_round_trip_and_append(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    writer = TelemetryWriter(path, run_id="demo/v0", family="ttt")
    writer.emit("train/loss", 2.5, step=3, tokens=96)
    writer.emit_many([("ttt/grad_norm", 0.25, 1, 2, 7), ("ttt/lr", float("nan"), 0, None, None)], step=4, tokens=128)
    writer.close()
    TelemetryWriter(path, run_id="demo/v0", family="ttt").emit("train/loss", 2.0, step=5, tokens=160)

    lines = path.read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert set(first) == {"run_id", "step", "tokens", "family", "metric", "value", "time"}
    events = list(read_events(path))
    assert [e["step"] for e in events] == [3, 4, 4, 5]
    assert events[1]["layer"] == 1 and events[1]["head"] == 2 and events[1]["position"] == 7
    assert "head" not in events[2] and events[2]["value"] != events[2]["value"]  # NaN survives as NaN


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    TelemetryWriter(path, run_id="r", family="f").emit("m", 1.0, step=1, tokens=1)
    with path.open("a") as handle:
        handle.write('{"run_id": "r", "step": 2, "tok')  # a crash mid-write
    assert [e["value"] for e in read_events(path)] == [1.0]
