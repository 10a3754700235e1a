"""Atomic file writes: results, tables and checkpoints appear whole or not at all, never torn by a killed process.

A write goes to a hidden temporary ``.<name>.<random>.tmp`` beside its target, is flushed to disk, and is renamed
over the target (atomic on POSIX). A process killed mid-write leaves only such a temporary behind;
:func:`remove_stale_temporaries` deletes them when a run starts and ends.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Hidden and ending in .tmp: the temporaries of atomic_write and of staged folders (src/frozen.py).
TEMPORARY = re.compile(r"\..+\.tmp")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write through ``write(tmp_path)`` to a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:  # the data must be on disk before the rename makes it the real file
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; run outputs are for everyone who reads the run
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete every temporary (file or staging folder) under ``folder`` left by a killed write; returns them.

    Call only while no write of this run is in flight (at the start and the end of a run)."""
    removed: list[Path] = []
    for parent, dirs, files in os.walk(folder):
        for name in [d for d in dirs if TEMPORARY.fullmatch(d)]:
            dirs.remove(name)  # a staging folder goes whole; do not walk into it
            shutil.rmtree(Path(parent) / name, ignore_errors=True)
            removed.append(Path(parent) / name)
        for name in files:
            if TEMPORARY.fullmatch(name):
                (Path(parent) / name).unlink(missing_ok=True)
                removed.append(Path(parent) / name)
    return removed
