"""Reading metric series out of a run's ``telemetry.jsonl`` (format: ``src/telemetry.py``) incrementally and cheaply.

A chart asks for *selectors*: an exact metric (``train/loss``) or a prefix (``lr-``, ``weight_delta/``). Lines are
found with a byte search for the selector's JSON text (``"train/loss"``, ``"weight_delta/``) and only the lines that
contain it are parsed (``src/dashboard/lines.py``), so a chart of one metric in a file of a million events parses
only that metric's lines (``bench/dashboard_scale.py``). What was read is kept per (file, selector) with the byte offset reached, so later
requests read only what was appended since. Only complete lines are consumed: a line still being written (or torn by
a crash) is read once its newline arrives. A file that shrinks or is replaced is read again from the start.

Responses are downsampled here, on the server (:func:`minmax_downsample`), so a long history never reaches a browser
in full; the cache itself is bounded by :data:`MAX_CACHED_POINTS` (least recently used selectors are dropped).
"""

from __future__ import annotations

import json
import math
import os
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from src.dashboard.lines import Block, parse_block

BLOCK_BYTES = 1 << 20  # read size of a scan: small blocks keep every temporary array small (and in cache)
MAX_CACHED_POINTS = 4_000_000  # over all cached series of all runs: ~100 MB of arrays (step, value, time)
MAX_SERIES = 512  # per selector: a prefix matching more distinct (metric, layer, head, position) keys is truncated
MAX_SELECTORS = 64  # per request

SeriesKey = tuple[str, int | None, int | None, int | None]  # metric, layer, head, position


@dataclass(frozen=True)
class Selector:
    """An exact metric name, or a prefix of metric names (``prefix=True``)."""

    metric: str
    prefix: bool = False

    @property
    def needle(self) -> bytes:
        # The metric as the writer's json.dumps spells it; an exact name includes its closing quote.
        text = json.dumps(self.metric)
        return (text[:-1] if self.prefix else text).encode()

    def matches(self, metric: str) -> bool:
        return metric.startswith(self.metric) if self.prefix else metric == self.metric


@dataclass
class Series:
    step: array = field(default_factory=lambda: array("q"))
    value: array = field(default_factory=lambda: array("d"))
    time: array = field(default_factory=lambda: array("d"))

    def append(self, step: int, value: float, time: float) -> None:
        self.step.append(step)
        self.value.append(value)
        self.time.append(time)


@dataclass
class SeriesSet:
    """What one selector has read from one file so far."""

    offset: int = 0
    file_id: tuple[int, int] = (0, 0)  # (device, inode): a replaced file is read again
    series: dict[SeriesKey, Series] = field(default_factory=dict)
    truncated: bool = False

    @property
    def points(self) -> int:
        return sum(len(s.step) for s in self.series.values())


def matching_lines(buf: bytes, needle: bytes, end: int) -> bytes:
    """The lines of ``buf[:end]`` that contain ``needle``, joined (each ending with a newline)."""
    found = []
    hit = buf.find(needle, 0, end)
    while hit != -1:
        start = buf.rfind(b"\n", 0, hit) + 1
        stop = buf.find(b"\n", hit, end) + 1 or end
        found.append(buf[start:stop])
        hit = buf.find(needle, stop, end)
    return b"".join(found)


def add_block(target: SeriesSet, selector: Selector, block: Block) -> None:
    """Append the events of ``block`` whose metric ``selector`` matches (the needle may also have matched, say,
    a run id) to ``target``."""
    wanted = [i for i, key in enumerate(block.keys) if selector.matches(key[0])]
    if not wanted:
        return
    order = np.argsort(block.key, kind="stable")  # events grouped by key, file order kept within each
    bounds = np.searchsorted(block.key[order], np.arange(len(block.keys) + 1))
    for i in wanted:
        key = block.keys[i]
        series = target.series.get(key)
        if series is None:
            if len(target.series) >= MAX_SERIES:
                target.truncated = True
                continue
            series = target.series[key] = Series()
        rows = order[bounds[i] : bounds[i + 1]]
        series.step.frombytes(block.step[rows].astype(np.int64).tobytes())
        series.value.frombytes(block.value[rows].astype(np.float64).tobytes())
        series.time.frombytes(block.time[rows].astype(np.float64).tobytes())


def _file_id(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def scan(path: Path, sets: list[SeriesSet], selectors: list[Selector], start: int, size: int) -> int:
    """Add the events of ``path[start:size]`` to ``sets`` (one per selector); returns the offset reached (the end of
    the last complete line)."""
    offset = start  # the end of the last complete line handled
    pending: list[list[bytes]] = [[] for _ in selectors]  # matched lines, parsed a batch at a time (fewer calls)
    pending_bytes = [0] * len(selectors)

    def flush(i: int) -> None:
        if pending[i]:
            add_block(sets[i], selectors[i], parse_block(b"".join(pending[i])))
            pending[i], pending_bytes[i] = [], 0

    with path.open("rb") as handle:
        handle.seek(start)
        carry, position = b"", start
        while position < size:
            chunk = handle.read(min(BLOCK_BYTES, size - position))
            if not chunk:
                break
            position += len(chunk)
            block = carry + chunk
            end = block.rfind(b"\n") + 1
            if end == 0:  # no complete line yet (a line still being written, or a very long one)
                carry = block
                continue
            for i, selector in enumerate(selectors):
                lines = matching_lines(block, selector.needle, end)
                if lines:
                    pending[i].append(lines)
                    pending_bytes[i] += len(lines)
                    if pending_bytes[i] >= BLOCK_BYTES:
                        flush(i)
            offset += end
            carry = block[end:]
    for i in range(len(selectors)):
        flush(i)
    return offset


class TelemetryStore:
    """Cached series of every run the server was asked about; thread-safe; bounded by :data:`MAX_CACHED_POINTS`."""

    def __init__(self, max_points: int = MAX_CACHED_POINTS) -> None:
        self.max_points = max_points
        self._sets: OrderedDict[tuple[Path, Selector], SeriesSet] = OrderedDict()
        self._lock = threading.Lock()
        # pyarrow and numpy set up their kernels on first use (~0.3 s here): pay that now, not on the first chart.
        parse_block(b'{"run_id":"r","step":1,"tokens":1,"family":"f","metric":"m","value":1.5,"time":1.0,"layer":0}\n')

    def query(self, path: Path, selectors: list[Selector]) -> tuple[int, list[SeriesSet]]:
        """Bring the selectors' series of ``path`` up to date; returns ``(offset, sets)``."""
        with self._lock:
            try:
                stat = path.stat()
            except FileNotFoundError:
                return 0, [SeriesSet() for _ in selectors]
            sets = []
            for selector in selectors:
                current = self._sets.pop((path, selector), None)
                if current is None or current.file_id != _file_id(stat) or current.offset > stat.st_size:
                    current = SeriesSet(file_id=_file_id(stat))
                self._sets[(path, selector)] = current  # most recently used last
                sets.append(current)
            # Selectors at the same offset (usually all of them) are read in one pass over the file.
            for offset in sorted({s.offset for s in sets}):
                group = [i for i, s in enumerate(sets) if s.offset == offset]
                reached = scan(path, [sets[i] for i in group], [selectors[i] for i in group], offset, stat.st_size)
                for i in group:
                    sets[i].offset = reached
            self._evict(keep=len(selectors))
            return min(s.offset for s in sets), sets

    def _evict(self, keep: int) -> None:
        total = sum(s.points for s in self._sets.values())
        while total > self.max_points and len(self._sets) > keep:
            _, dropped = self._sets.popitem(last=False)
            total -= dropped.points

    def cached_points(self) -> int:
        with self._lock:
            return sum(s.points for s in self._sets.values())


def minmax_downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of ``(x, y)``, keeping each bucket's minimum and maximum (in order) and the
    last point, so spikes survive and a live chart continues from the newest value."""
    if max_points < 3:
        raise ValueError("max_points must be at least 3 (a minimum, a maximum and the last point)")
    n = len(x)
    if n <= max_points:
        return x, y
    buckets = (max_points - 1) // 2
    width = math.ceil(n / buckets)
    pad = buckets * width - n
    body = np.concatenate([y, np.full(pad, y[-1])]) if pad else y
    grid = body.reshape(buckets, width)
    finite = np.isfinite(grid)
    lows = np.where(finite, grid, np.inf).argmin(axis=1)
    highs = np.where(finite, grid, -np.inf).argmax(axis=1)
    base = np.arange(buckets) * width
    picks = np.unique(np.minimum(np.concatenate([base + lows, base + highs, [n - 1]]), n - 1))
    return x[picks], y[picks]


def _finite_list(values: np.ndarray) -> list[float | None]:
    # JSON has no NaN; a null is a gap in the chart.
    out = values.tolist()
    if not np.isfinite(values).all():
        out = [v if math.isfinite(v) else None for v in out]
    return out


def series_payload(sets: list[SeriesSet], selectors: list[Selector], max_points: int) -> list[dict]:
    """The JSON-ready series of a query, each downsampled to ``max_points``."""
    out = []
    for selector, found in zip(selectors, sets, strict=True):
        for (metric, layer, head, position), series in found.series.items():
            x, y = minmax_downsample(
                np.frombuffer(series.step, dtype=np.int64), np.frombuffer(series.value, dtype=np.float64), max_points
            )
            out.append(
                {
                    "selector": selector.metric,
                    "metric": metric,
                    "layer": layer,
                    "head": head,
                    "position": position,
                    "n": len(series.step),
                    "last_time": series.time[-1] if series.time else None,
                    "step": x.tolist(),
                    "value": _finite_list(y),
                }
            )
    return out


def matching_events(buf: bytes, selectors: list[Selector]) -> list[list]:
    """The events of the complete lines in ``buf`` that match a selector, compact for the stream:
    ``[metric, layer, head, position, step, value, time]`` in file order (an event matching two selectors once)."""
    if not buf:
        return []
    needles = {s.needle for s in selectors}
    lines = b"".join(line + b"\n" for line in buf.split(b"\n") if any(n in line for n in needles))
    block = parse_block(lines)
    wanted = [any(s.matches(key[0]) for s in selectors) for key in block.keys]
    events = []
    columns = (block.key.tolist(), block.step.tolist(), block.value.tolist(), block.time.tolist())
    for k, step, value, time in zip(*columns, strict=True):
        if wanted[k]:
            events.append([*block.keys[k], step, value if math.isfinite(value) else None, time])
    return events


def read_appended(path: Path, offset: int, max_bytes: int) -> tuple[bytes, int, bool]:
    """The complete lines appended to ``path`` after ``offset`` (at most about ``max_bytes``).

    Returns ``(lines, new_offset, restarted)``; ``restarted`` when the file is now shorter than ``offset`` (replaced
    or truncated), in which case nothing is read and the caller should start over.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return b"", offset, False
    if size < offset:
        return b"", 0, True
    if size == offset:
        return b"", offset, False
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read(min(size - offset, max_bytes))
    end = data.rfind(b"\n") + 1
    return data[:end], offset + end, False
