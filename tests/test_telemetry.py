"""The telemetry stream: one JSON object per line, optional fields omitted, torn lines tolerated; written by one
logger, at the same steps and with the same values as metrics.csv; and the import layers that keep observation
out of the models."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import pytest

from src.cli import main
from src.telemetry import TelemetryWriter, read_events
from tests.conftest import CONFIGS, FAST, REPO


def test_events_round_trip_and_append(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    writer = TelemetryWriter(path, run_id="demo/v0", family="ttt")
    writer.emit("train/loss", 2.5, step=3, tokens=96)
    writer.emit_many([("ttt/update_norm", 0.25, 1, 2, 7), ("ttt/lr", float("nan"), 0, None, None)], step=4, tokens=128)
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


# --- one observation path -------------------------------------------------------------------------------------
def test_metrics_csv_and_telemetry_agree_on_steps_and_values(run_root: Path) -> None:
    main(["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *FAST[2:], "--trainer.max_steps", "10",
          "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "5", "--run.root", str(run_root)])  # fmt: skip
    run_dir = run_root / "gemma_tiny" / "v0"
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    events = list(read_events(run_dir / "telemetry.jsonl"))

    def series(metric: str) -> tuple[dict[int, float], dict[int, float]]:
        from_csv = {int(r["step"]): float(r[metric]) for r in rows if r.get(metric)}
        return from_csv, {e["step"]: e["value"] for e in events if e["metric"] == metric}

    for metric in ("train/loss", "val/loss", "perf/tokens_per_s", "lr-AdamW/pg1", "capgauge/bpp_seen"):
        from_csv, from_stream = series(metric)
        assert from_csv and from_csv == pytest.approx(from_stream), metric
    assert sorted(series("train/loss")[0]) == [2, 4, 6, 8, 10]  # trainer.global_step: steps completed
    assert sorted(series("val/loss")[0]) == [5, 10]
    weight_delta = [e for e in events if e["metric"].startswith("weight_delta/") and "layer" in e]
    assert weight_delta and {e["step"] for e in weight_delta} == {
        int(s) for s in series("weight_delta/all/rel_init")[0]
    }
    assert all(e["run_id"] == "gemma_tiny/v0" and e["family"] == "causal_lm" for e in events)
    tokens = [e["tokens"] for e in events if e["metric"] == "train/loss"]
    assert tokens == [4 * 64 * step for step in (2, 4, 6, 8, 10)]  # batch 4 x 64 tokens a step


LAYERS = {  # folder -> top-level packages it must not import
    "src/analysis": {"callbacks", "data_modules"},
    "src/dashboard": {"callbacks", "data_modules", "torch"},
    "src/models": {"callbacks", "data_modules", "lightning"},
    "src/lightning_modules": {"callbacks"},
}


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_layers_import_only_downwards(folder: str) -> None:
    offenders = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in LAYERS[folder]]
    assert not offenders
