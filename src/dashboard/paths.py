"""The one gate between a name in a request and a file on disk: everything the dashboard reads goes through here.

A request names a run (``ttt_quickstart/v0``) or a file inside one (``plasticity/train/heatmap_update_norm.png``) as a
relative path below the runs root. :func:`safe_path` accepts only plain relative paths whose parts are ordinary names
and whose real location (all symlinks followed) is still under the real root; anything else is refused with
:class:`Refused`, which the server answers with 404, never with content. URL decoding happens once, in the server;
a ``%`` left after it (double encoding) is refused rather than decoded again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# One path part: letters, digits, and . _ - + = , @ inside; no leading dot (hidden files, '.', '..').
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=,@-]{0,254}")
MAX_PATH_CHARS = 1024
MAX_PARTS = 16


class Refused(ValueError):
    """A requested path that is not a plain path below the runs root."""


def check_relative(name: str) -> tuple[str, ...]:
    """The parts of ``name`` if it is a plain relative path (``a/b/c``), else :class:`Refused`."""
    if not name or len(name) > MAX_PATH_CHARS:
        raise Refused("empty or too long")
    # Absolute, drive-letter or UNC paths, backslashes, NUL and leftover percent-escapes never name a file here.
    if name.startswith("/") or "\\" in name or "\x00" in name or "%" in name or ":" in name:
        raise Refused("not a plain relative path")
    parts = tuple(name.split("/"))
    if len(parts) > MAX_PARTS or not all(_PART.fullmatch(p) for p in parts):
        raise Refused("a part is not a plain name")
    return parts


def safe_path(root: Path, name: str) -> Path:
    """``root / name`` after checking that it stays under ``root`` with every symlink resolved.

    ``root`` must already be resolved (``Path.resolve()``). The returned path need not exist.
    """
    parts = check_relative(name)
    candidate = root.joinpath(*parts)
    # realpath follows every link on the way, including links to links; a missing tail is kept as written.
    real = Path(os.path.realpath(candidate))
    if not real.is_relative_to(root):
        raise Refused("leaves the runs root")
    return real
