"""The plasticity panel: a Layer × Time (token position) heatmap and per-bucket bars from a run's parquet tables.

Tables are ``<run>/plasticity/<stage>/step<S>_batch<B>.parquet`` (``callbacks/plasticity.py``; one row per sequence,
layer, head and position), for any memory family: the metrics offered are those of the schema
(``src/models/plasticity.py``) that the tables hold, ``update_norm`` first. Only the columns drawn are read, each
table once per mtime; values are averaged over sequences and heads, like the heatmaps ``src/analysis/plasticity.py``
draws.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from src.analysis.buckets import BUCKETS
from src.models.plasticity import TOKEN_METRICS, UPDATE_NORM

STAGES = ("train", "val", "test", "predict")  # callbacks/plasticity.py writes these folders
METRICS = tuple(TOKEN_METRICS)  # every family's per-token metrics; a table holds its family's subset
MAX_POSITIONS = 512  # heatmap columns; longer sequences are averaged into bins
MAX_CACHED_TABLES = 64
_TABLE = re.compile(r"step(\d+)_batch(\d+)\.parquet")


def stage_tables(run_dir: Path) -> dict[str, dict[int, list[Path]]]:
    """``{stage: {step: [token tables]}}`` for the stages that have tables."""
    found: dict[str, dict[int, list[Path]]] = {}
    base = run_dir / "plasticity"
    for stage in STAGES:
        folder = base / stage
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in sorted(folder.iterdir()):
            match = _TABLE.fullmatch(path.name)
            if match and path.is_file() and not path.is_symlink():
                found.setdefault(stage, {}).setdefault(int(match.group(1)), []).append(path)
    return found


class PlasticityView:
    """Aggregates of token tables, cached by (path, mtime) for at most :data:`MAX_CACHED_TABLES` tables."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[Path, int, str], dict] = OrderedDict()
        self._lock = threading.Lock()

    def _aggregate(self, path: Path, metric: str) -> dict:
        key = (path, path.stat().st_mtime_ns, metric)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        table = pq.read_table(path, columns=["layer", "position", "bucket", metric])
        layer = table["layer"].to_numpy().astype(np.int64)
        position = table["position"].to_numpy().astype(np.int64)
        value = table[metric].to_numpy().astype(np.float64)
        layers, positions = int(layer.max()) + 1, int(position.max()) + 1
        cell = layer * positions + position
        sums = np.bincount(cell, weights=value, minlength=layers * positions)
        counts = np.bincount(cell, minlength=layers * positions)
        bucket = pc.cast(table["bucket"], pa.string()).combine_chunks()
        encoded = pc.dictionary_encode(bucket)
        names = encoded.dictionary.to_pylist()
        codes = encoded.indices.to_numpy()
        bucket_sums = np.bincount(codes, weights=value, minlength=len(names))
        bucket_counts = np.bincount(codes, minlength=len(names))
        result = {
            "layers": layers,
            "positions": positions,
            "sums": sums.reshape(layers, positions),
            "counts": counts.reshape(layers, positions),
            "buckets": {n: (float(s), int(c)) for n, s, c in zip(names, bucket_sums, bucket_counts, strict=True)},
        }
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > MAX_CACHED_TABLES:
                self._cache.popitem(last=False)
        return result

    def panel(self, run_dir: Path, stage: str | None, step: int | None, metric: str) -> dict:
        """The heatmap and bucket bars of one capture step (default: the newest) of one stage (default: train)."""
        tables = stage_tables(run_dir)
        if not tables:
            return {"stages": [], "images": []}
        stage = stage if stage in tables else next(iter(tables))
        steps = sorted(tables[stage])
        step = step if step in tables[stage] else steps[-1]
        columns = set(pq.read_schema(tables[stage][step][0]).names)
        metrics = [m for m in METRICS if m in columns]
        metric = metric if metric in metrics else UPDATE_NORM  # e.g. g_norm asked of an EMMA run: its update_norm
        parts = [self._aggregate(p, metric) for p in tables[stage][step]]
        layers = max(p["layers"] for p in parts)
        positions = max(p["positions"] for p in parts)
        sums = np.zeros((layers, positions))
        counts = np.zeros((layers, positions))
        buckets: dict[str, list[float]] = {}
        for p in parts:
            sums[: p["layers"], : p["positions"]] += p["sums"]
            counts[: p["layers"], : p["positions"]] += p["counts"]
            for name, (s, c) in p["buckets"].items():
                total = buckets.setdefault(name, [0.0, 0])
                total[0] += s
                total[1] += c
        width = -(-positions // MAX_POSITIONS)  # positions per heatmap column
        columns = -(-positions // width)
        pad = columns * width - positions
        sums = np.pad(sums, ((0, 0), (0, pad))).reshape(layers, columns, width).sum(axis=2)
        counts = np.pad(counts, ((0, 0), (0, pad))).reshape(layers, columns, width).sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            heat = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        order = [b for b in BUCKETS if b in buckets] + sorted(set(buckets) - set(BUCKETS))
        images = sorted(
            f"plasticity/{stage}/{p.name}" for p in (run_dir / "plasticity" / stage).glob("*.png") if p.is_file()
        )
        return {
            "stages": list(tables),
            "stage": stage,
            "steps": steps,
            "step": step,
            "metric": metric,
            "metrics": metrics,
            "layers": layers,
            "position_bin": width,
            "positions": columns,
            "heat": [[_finite(round(float(v), 6)) for v in row] for row in heat],
            "buckets": [
                {
                    "bucket": b,
                    "mean": _finite(buckets[b][0] / buckets[b][1]) if buckets[b][1] else None,
                    "count": buckets[b][1],
                }
                for b in order
            ],
            "images": images,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN: a missing cell or bar
