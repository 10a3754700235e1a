"""Finding the data file that a failed read tripped over, so that the error names it (and the line) in one line.

``datasets`` reports a bad file as a chain of generic errors (a ``DatasetGenerationError`` around a
``UnicodeDecodeError``, an ``ArrowInvalid`` "in row 3" of an unnamed block) that often does not say which file, and
a row without text fails later still, as a ``TypeError`` in whatever reads it first. When a read fails inside
:func:`naming_bad_file`, :func:`find_unreadable` re-reads that read's files one by one with the rules of the
``datasets`` builders: parquet must open and decode with pyarrow; ``.jsonl``/``.json`` must be UTF-8 with one JSON
object per line, or a single JSON array when the file starts with ``[``; anything else must be UTF-8 text. ``.zst``
and ``.gz`` files are decompressed first. With a ``text_field``, every parquet/JSON row must hold a string there.
Only the failure path pays for the re-read.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import zstandard

from src.errors import EngramError

JSON_SUFFIXES = (".jsonl", ".json")
# A corrupt or cut-short compressed stream raises these while it is read (zstd, gzip, deflate).
STREAM_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


@contextmanager
def naming_bad_file(
    files: Callable[[], Iterable[str | Path]], fix: str, text_field: str | None = None
) -> Iterator[None]:
    """Turn any failure inside the block into ``EngramError("<find_unreadable's line>. <fix>")`` if one of
    ``files()`` (asked only then: a lazy read learns its files as it goes) is unreadable. A failure that no file
    explains is re-raised as it is, with its traceback: it is not a bad-data problem."""
    try:
        yield
    except EngramError:
        raise
    except Exception as err:
        problem = find_unreadable(files(), text_field)
        if problem is None:
            raise
        raise EngramError(f"{problem}. {fix}") from err


def find_unreadable(files: Iterable[str | Path], text_field: str | None = None) -> str | None:
    """``"data file <path>[ line <n>]: <what is wrong>"`` for the first of ``files`` that cannot be read (or, with
    ``text_field``, has a parquet/JSON row without a string there), else None."""
    for file in files:
        path = Path(file)
        try:
            problem = _problem(path, text_field)
        except STREAM_ERRORS as err:
            problem = f": cannot be read ({_first_line(err)})"
        if problem is not None:
            return f"data file {path}{problem}"
    return None


def _problem(path: Path, text_field: str | None) -> str | None:
    """``" line <n>: ..."`` or ``": ..."`` saying what is wrong with ``path``; None if it reads cleanly."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _parquet_problem(path, text_field)
    with _open(path) as stream:
        if name.removesuffix(".zst").removesuffix(".gz").endswith(JSON_SUFFIXES):
            return _json_problem(stream, text_field)
        return _text_problem(stream)


def _parquet_problem(path: Path, text_field: str | None) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        if text_field is not None and text_field not in names:
            return f": no {text_field!r} column (it has {names})"
        row = 0
        for batch in table.iter_batches():  # decoding every page: the footer alone would miss corrupt ones
            if text_field is not None:
                column = batch.column(text_field)
                if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                    return f": column {text_field!r} holds {column.type}, not strings"
                if column.null_count:
                    return f": row {row + column.is_null().index(True).as_py()} has no {text_field!r} (null)"
            row += batch.num_rows
    except pa.ArrowException as err:
        return f": not a readable parquet file ({_first_line(err)})"
    return None


def _open(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed where its name ends in ``.zst`` or ``.gz``."""
    name = path.name.lower()
    if name.endswith(".zst"):
        reader = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)  # type: ignore[arg-type]  # the zstd reader cannot split lines itself
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, str | UnicodeDecodeError, int]]:
    """``(line number, text or its decode error, byte offset of the line)`` for each line of ``stream``.

    Splitting the bytes at ``\\n`` before decoding loses nothing: no UTF-8 multi-byte sequence contains that byte.
    """
    offset = 0
    for number, raw in enumerate(stream, 1):
        try:
            yield number, raw.decode("utf-8"), offset
        except UnicodeDecodeError as err:
            yield number, err, offset
        offset += len(raw)


def _not_utf8(number: int, err: UnicodeDecodeError, offset: int) -> str:
    return f" line {number}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {offset + err.start})"


def _text_problem(stream: IO[bytes]) -> str | None:
    for number, line, offset in _lines(stream):
        if isinstance(line, UnicodeDecodeError):
            return _not_utf8(number, line, offset)
    return None


def _json_problem(stream: IO[bytes], text_field: str | None) -> str | None:
    """JSON Lines, or one JSON array if the file starts with ``[``, as the ``datasets`` json builder reads them
    (a leading UTF-8 byte order mark allowed, as there)."""
    array: list[str] | None = None  # the file's text, when it is one JSON array
    for number, line, offset in _lines(stream):
        if isinstance(line, UnicodeDecodeError):
            return _not_utf8(number, line, offset)
        if number == 1:
            line = line.removeprefix("\ufeff")
            array = [] if line.startswith("[") else None
        if array is not None:
            array.append(line)
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:  # its own "line 1" would be misleading: report the column only
            return f" line {number}: not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})"
        problem = _row_problem(row, text_field)
        if problem is not None:
            return f" line {number}: {problem}"
    if array is not None:
        try:
            items = json.loads("".join(array))
        except json.JSONDecodeError as err:
            return f": not a valid JSON array ({err})"
        for i, item in enumerate(items):
            # datasets reads an array of strings as text rows
            problem = None if isinstance(item, str) else _row_problem(item, text_field)
            if problem is not None:
                return f": item {i} of the JSON array: {problem}"
    return None


def _row_problem(row: Any, text_field: str | None) -> str | None:
    if not isinstance(row, dict):
        return f"a JSON {_json_type(row)}, not an object (one {{...}} row per line)"
    if text_field is not None and not isinstance(row.get(text_field), str):
        if text_field not in row:
            return f"no {text_field!r} (its keys: {sorted(row)})"
        return f"{text_field!r} is a JSON {_json_type(row[text_field])}, not a string"
    return None


def _json_type(value: Any) -> str:
    return JSON_TYPES.get(type(value), "null")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
