"""Parsing blocks of ``telemetry.jsonl`` lines fast: numpy finds the fields, pyarrow converts the numbers.

``json.loads`` costs ~15 µs a line on the 2-core CI machine, 15 s for a million events. The writer
(``src/telemetry.py``) always writes the same layout, in one order and without spaces::

    {"run_id":"r","step":1,"tokens":2,"family":"f","metric":"m","value":0.5,"time":1.7e9[,"layer":0][,"head":1][,"position":2]}

so :func:`parse_block` locates the fields of all lines of a block at once (fixed literals between them, numbers ended
by ``,`` or ``}``) and converts the numbers with one pyarrow cast per column. Any line that does not have exactly
that layout (another writer, an escaped metric name, a second run id or family, a torn line) goes through
``json.loads`` instead, so the result is the same as parsing every line with json, only faster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_COMMA, _BRACE, _QUOTE, _BACKSLASH = ord(","), ord("}"), ord('"'), ord("\\")
_OPTIONAL = (b',"layer":', b',"head":', b',"position":')
# Key fields packed into one int64 (metric index, layer + 1, head + 1, position + 1); larger values take json.
_LAYER_LIMIT, _HEAD_LIMIT, _POSITION_LIMIT, _NAME_LIMIT = 1 << 12, 1 << 12, 1 << 24, 1 << 14


@dataclass
class Block:
    """Parsed events of a block, in file order: ``key`` indexes ``keys``."""

    keys: list[tuple[str, int | None, int | None, int | None]]  # metric, layer, head, position
    key: np.ndarray  # int64 per event
    step: np.ndarray  # int64
    value: np.ndarray  # float64
    time: np.ndarray  # float64
    slow_lines: int  # lines that went through json.loads (0 for the writer's own output)


def parse_line(line: bytes) -> tuple[str, int | None, int | None, int | None, int, float, float] | None:
    """One line as ``(metric, layer, head, position, step, value, time)``; ``None`` if it is not a valid event."""
    try:
        event = json.loads(line)
        return (
            str(event["metric"]),
            _optional_int(event.get("layer")),
            _optional_int(event.get("head")),
            _optional_int(event.get("position")),
            int(event["step"]),
            float(event["value"]),  # NaN/inf are written as strings ("nan"); float() reads both forms
            float(event.get("time", 0.0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


class _Fields:
    """Vectorised look-ups into one block: literal checks, and the next delimiter after each position."""

    def __init__(self, data: np.ndarray, pad: int) -> None:
        self.data = data  # the block followed by ``pad`` zero bytes, so that no literal check runs off the end
        body = data[: len(data) - pad]
        sentinel = np.array([len(data) - 1], np.int64)  # a zero byte: "not found" fails every later check
        self._quotes = np.concatenate([np.flatnonzero(body == _QUOTE), sentinel])
        self._enders = np.concatenate([np.flatnonzero((body == _COMMA) | (body == _BRACE)), sentinel])
        self._backslashes = np.concatenate([np.flatnonzero(body == _BACKSLASH), sentinel])
        self._windows: dict[int, np.ndarray] = {}

    def equals(self, pos: np.ndarray, literal: bytes) -> np.ndarray:
        width = len(literal)
        if width not in self._windows:  # a view: indexing it copies only the rows asked for
            self._windows[width] = np.lib.stride_tricks.sliding_window_view(self.data, width)
        # A position past the block (from a delimiter not found) lands in the zero padding: never equal.
        pos = np.minimum(pos, len(self.data) - width)
        return (self._windows[width][pos] == np.frombuffer(literal, np.uint8)).all(axis=1)

    def byte(self, pos: np.ndarray) -> np.ndarray:
        return self.data[np.minimum(pos, len(self.data) - 1)]

    @staticmethod
    def _next(stops: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return stops[np.minimum(np.searchsorted(stops, pos), len(stops) - 1)]

    def next_quote(self, pos: np.ndarray) -> np.ndarray:
        return self._next(self._quotes, pos)

    def next_ender(self, pos: np.ndarray) -> np.ndarray:
        """The next ``,`` or ``}`` at or after each position: where a number ends."""
        return self._next(self._enders, pos)

    def next_backslash(self, pos: np.ndarray) -> np.ndarray:
        return self._next(self._backslashes, pos)

    def strings(self, start: np.ndarray, stop: np.ndarray) -> pa.StringArray:
        """The byte ranges ``[start, stop)`` as one Arrow string array (copied into one contiguous buffer)."""
        length = stop - start
        offsets = np.zeros(len(start) + 1, np.int32)
        np.cumsum(length, out=offsets[1:])
        index = np.repeat(start - offsets[:-1], length) + np.arange(offsets[-1])
        return pa.StringArray.from_buffers(len(start), pa.py_buffer(offsets), pa.py_buffer(self.data[index]))


def _layout(line: bytes) -> tuple[bytes, bytes] | None:
    """The literal texts around step and metric in a line of the writer's layout: ``(head, middle)``."""
    event = json.loads(line)
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("run_id"), str)
        or not isinstance(event.get("family"), str)
    ):
        return None
    head = b'{"run_id":' + json.dumps(event["run_id"]).encode() + b',"step":'
    middle = b',"family":' + json.dumps(event["family"]).encode() + b',"metric":"'
    return head, middle


def parse_block(buf: bytes) -> Block:
    """Parse the complete lines of ``buf`` (it must end with a newline, or be empty)."""
    ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == ord("\n"))
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
    nonempty = ends > starts
    starts, ends = starts[nonempty], ends[nonempty]
    fast = np.zeros(len(starts), bool)
    layout = None
    for s, e in zip(starts[:8].tolist(), ends[:8].tolist(), strict=True):  # the first valid line sets the layout
        try:
            layout = _layout(buf[s:e])
        except ValueError:
            continue
        if layout is not None:
            break
    columns: dict[str, np.ndarray] = {}
    names: list[str] = []
    if layout is not None and len(starts):
        head, middle = layout
        pad = 64 + len(head) + len(middle)  # longer than every literal checked
        f = _Fields(np.frombuffer(buf + b"\0" * pad, np.uint8), pad)
        ok = f.equals(starts, head)
        step_at = starts + len(head)
        step_end = f.next_ender(step_at)
        ok &= f.equals(step_end, b',"tokens":')
        tokens_end = f.next_ender(step_end + len(b',"tokens":'))
        ok &= f.equals(tokens_end, middle)
        metric_at = tokens_end + len(middle)
        metric_end = f.next_quote(metric_at)
        ok &= (f.next_backslash(metric_at) > metric_end) & f.equals(metric_end, b'","value":')
        value_at = metric_end + len(b'","value":')
        quoted = f.byte(value_at) == _QUOTE  # "nan", "inf", "-inf"
        value_at = value_at + quoted
        value_end = np.where(quoted, f.next_quote(value_at), f.next_ender(value_at))
        after_value = value_end + quoted
        ok &= (value_end > value_at) & f.equals(after_value, b',"time":')
        time_at = after_value + len(b',"time":')
        cursor = time_end = f.next_ender(time_at)
        ok &= time_end > time_at
        optional = []
        for tag in _OPTIONAL:
            has = f.equals(cursor, tag)
            at = cursor + len(tag)
            stop = f.next_ender(at)
            ok &= ~has | (stop > at)
            optional.append((has, at, stop))
            cursor = np.where(has, stop, cursor)
        ok &= (f.byte(cursor) == _BRACE) & (cursor + 1 == ends)
        rows = np.flatnonzero(ok)
        try:
            step = pc.cast(f.strings(step_at[rows], step_end[rows]), pa.int64()).to_numpy()
            value = pc.cast(f.strings(value_at[rows], value_end[rows]), pa.float64()).to_numpy()
            time = pc.cast(f.strings(time_at[rows], time_end[rows]), pa.float64()).to_numpy()
            extra = []
            for has, at, stop in optional:
                column = np.full(len(rows), -1, np.int64)
                present = np.flatnonzero(has[rows])
                if len(present):
                    strings = f.strings(at[rows][present], stop[rows][present])
                    column[present] = pc.cast(strings, pa.int64()).to_numpy()
                extra.append(column)
            encoded = pc.dictionary_encode(f.strings(metric_at[rows], metric_end[rows]))
            names = encoded.dictionary.to_pylist()
            if len(names) >= _NAME_LIMIT:
                raise ValueError("too many distinct metrics in one block to pack their keys")
            metric = encoded.indices.to_numpy().astype(np.int64)
        except (pa.ArrowInvalid, ValueError):  # a malformed number: let json decide, line by line
            columns = {}
        else:
            in_range = np.ones(len(rows), bool)
            for column, limit in zip(extra, (_LAYER_LIMIT, _HEAD_LIMIT, _POSITION_LIMIT), strict=True):
                in_range &= (column >= -1) & (column < limit - 1)
            columns = {
                "metric": metric[in_range],
                "layer": extra[0][in_range],
                "head": extra[1][in_range],
                "position": extra[2][in_range],
                "step": step[in_range],
                "value": value[in_range],
                "time": time[in_range],
            }
            fast[rows[in_range]] = True
    return _assemble(buf, starts, ends, fast, columns, names)


def _pack(metric: np.ndarray, layer: np.ndarray, head: np.ndarray, position: np.ndarray) -> np.ndarray:
    return ((metric * _LAYER_LIMIT + layer + 1) * _HEAD_LIMIT + head + 1) * _POSITION_LIMIT + position + 1


def _assemble(
    buf: bytes, starts: np.ndarray, ends: np.ndarray, fast: np.ndarray, columns: dict[str, np.ndarray], names: list[str]
) -> Block:
    """Join the fast rows with the json-parsed rest, in file order, and number the distinct keys."""
    slow_rows = np.flatnonzero(~fast)
    parsed = [(i, parse_line(buf[starts[i] : ends[i]])) for i in slow_rows]
    parsed = [(i, event) for i, event in parsed if event is not None]
    order_fast = np.flatnonzero(fast)
    if columns:
        packed = _pack(columns["metric"], columns["layer"], columns["head"], columns["position"])
    else:
        packed = np.zeros(0, np.int64)
        columns = {
            k: np.zeros(0, np.float64 if k in ("value", "time") else np.int64) for k in ("step", "value", "time")
        }
    keys: list[tuple[str, int | None, int | None, int | None]] = []
    unique, inverse = np.unique(packed, return_inverse=True)
    for code in unique.tolist():
        position = code % _POSITION_LIMIT - 1
        code //= _POSITION_LIMIT
        head = code % _HEAD_LIMIT - 1
        code //= _HEAD_LIMIT
        layer = code % _LAYER_LIMIT - 1
        metric = names[code // _LAYER_LIMIT]
        keys.append(
            (metric, None if layer < 0 else layer, None if head < 0 else head, None if position < 0 else position)
        )
    key = inverse.astype(np.int64).ravel()
    step, value, time = columns["step"], columns["value"], columns["time"]
    if parsed:
        index = {k: i for i, k in enumerate(keys)}
        slow_key = []
        for _, event in parsed:
            slow_key.append(index.setdefault(event[:4], len(index)))
            if len(index) > len(keys):
                keys.append(event[:4])
        line = np.concatenate([order_fast, np.array([i for i, _ in parsed], np.int64)])
        order = np.argsort(line, kind="stable")
        key = np.concatenate([key, np.array(slow_key, np.int64)])[order]
        step = np.concatenate([step, np.array([e[4] for _, e in parsed], np.int64)])[order]
        value = np.concatenate([value, np.array([e[5] for _, e in parsed], np.float64)])[order]
        time = np.concatenate([time, np.array([e[6] for _, e in parsed], np.float64)])[order]
    return Block(keys, key, step, value, time, len(slow_rows))
