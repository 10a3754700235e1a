"""Frozen checkpoints: copies kept for later study, written atomically, hashed and made read-only.

Layout inside a run directory::

    frozen/<tag>/checkpoint.ckpt     the Lightning checkpoint at the moment of freezing
    frozen/<tag>/manifest.json       tag, reason, step, tokens, metrics, the run's config, sha256 + size per file,
                                     and ``manifest_sha256``: the sha256 of the manifest itself

The manifest protects itself (format 2): ``manifest_sha256`` is the sha256 of the manifest's canonical JSON text
(every field but ``manifest_sha256``; sorted keys, separators ``,`` and ``:``, ASCII escapes), so an edit to the
step, tokens, metrics, config or a recorded file hash makes :func:`verify_entry` report ``manifest.json: edited
after freezing``. It covers content, not layout: re-indenting the file changes nothing. It catches edits, not
forgery: whoever edits the manifest and recomputes the hash goes unnoticed (there is no secret key). A format-1
manifest (written before the self-hash) records no hash of itself, so edits to it cannot be detected; verify
reports that as a problem and the entry as FAIL (exit code 1) rather than print an OK it cannot back up. Its
files are still checked against it.

A freeze is staged in a hidden folder ``frozen/.<tag>.<random>.tmp`` and renamed to ``frozen/<tag>`` only once the
checkpoint and the manifest are complete (a rename is atomic on POSIX), so a crash mid-freeze never leaves a
half-written entry under a real tag; stale staging folders are removed by
:func:`src.atomic.remove_stale_temporaries` when a run starts. Files become
mode 0444 and the folder 0555. Nothing in Engram deletes a frozen entry.

Command line::

    python -m src.frozen list RUN_DIR              # tag, step, tokens, reason, created
    python -m src.frozen verify RUN_DIR [TAG ...]  # re-hash every file and manifest; exit 1 if any entry fails
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.atomic import TEMPORARY
from src.errors import EngramError

FROZEN_SUBDIR = "frozen"
MANIFEST = "manifest.json"
CHECKPOINT_NAME = "checkpoint.ckpt"
MANIFEST_FORMAT = 2  # 2: the manifest records its own sha256 (MANIFEST_SHA256)
MANIFEST_SHA256 = "manifest_sha256"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON text, without its own ``manifest_sha256`` field.

    ``manifest`` must hold plain JSON values (as :func:`json.loads` returns them): those serialise to the same
    text before writing and after reading back (floats by their shortest ``repr``, NaN as ``NaN``).
    """
    body = {key: value for key, value in manifest.items() if key != MANIFEST_SHA256}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def safe_tag(tag: str) -> str:
    """A tag usable as one folder name: letters, digits, ``.``, ``_``, ``-`` (others become ``-``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", tag.strip()).strip(".-")
    if not cleaned:
        raise EngramError(f"freeze tag {tag!r} has no usable characters; use letters, digits, '.', '_' or '-'.")
    return cleaned


def _unique(root: Path, tag: str) -> Path:
    candidate, n = root / tag, 2
    while candidate.exists():
        candidate, n = root / f"{tag}-{n}", n + 1
    return candidate


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Stage:
    folder: Path  # where the body writes the files to freeze
    path: Path | None = None  # the committed entry, once the ``with`` block has ended without error


@contextmanager
def staged_freeze(run_dir: str | Path, tag: str, info: dict[str, Any]) -> Iterator[Stage]:
    """Yield a :class:`Stage` whose empty ``folder`` the body writes the files to freeze into.

    On a normal exit every file is hashed, ``manifest.json`` (``info`` plus tag, time and hashes) is written, the
    folder is renamed to ``frozen/<tag>`` (``<tag>-2``, ... if taken), made read-only and stored in ``stage.path``.
    If the body raises, the staging folder is deleted and nothing appears under ``frozen/``. Values of ``info``
    that JSON has no type for are written as ``str(value)``.
    """
    root = Path(run_dir) / FROZEN_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    tag = safe_tag(tag)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{tag}.", suffix=".tmp"))
    stage = Stage(staging)
    try:
        yield stage
        files = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(staging.iterdir())
            if p.is_file()
        }
        target = _unique(root, tag)
        manifest = {
            "format": MANIFEST_FORMAT,
            "tag": target.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **info,
            "files": files,
        }
        # Hash what a reader will load, not the Python objects: the round trip turns tuples into lists, non-str
        # keys into strings (which sort differently) and other objects into str(), exactly as the file will.
        manifest = json.loads(json.dumps(manifest, default=str))
        manifest[MANIFEST_SHA256] = manifest_digest(manifest)
        with (staging / MANIFEST).open("w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(staging)
        os.rename(staging, target)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for path in target.iterdir():
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    target.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    stage.path = target


def read_manifest(entry: str | Path) -> dict[str, Any]:
    path = Path(entry) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise EngramError(
            f"{path} is missing or unreadable ({err}); this is not a complete frozen checkpoint."
        ) from err


def verify_entry(entry: str | Path) -> list[str]:
    """Problems with one frozen entry (empty = verified): an edited or unverifiable manifest, missing, changed or
    unlisted files."""
    entry = Path(entry)
    try:
        manifest = read_manifest(entry)
    except EngramError as err:
        return [str(err)]
    problems = []
    recorded = manifest.get(MANIFEST_SHA256)
    if recorded is None:
        problems.append(
            f"{MANIFEST}: format {manifest.get('format')} records no sha256 of itself, so edits to its step, tokens, "
            "metrics or config cannot be detected (only its files were checked)"
        )
    elif manifest_digest(manifest) != recorded:
        problems.append(f"{MANIFEST}: edited after freezing (its sha256 differs from the one it records)")
    listed = manifest.get("files", {})
    for name, meta in sorted(listed.items()):
        path = entry / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != meta["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {meta['bytes']}")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    extra = sorted(p.name for p in entry.iterdir() if p.name not in listed and p.name != MANIFEST)
    problems += [f"{name}: not listed in the manifest" for name in extra]
    if not listed:
        problems.append("the manifest lists no files")
    return problems


def frozen_entries(run_dir: str | Path) -> list[Path]:
    """Committed entries of a run, oldest first (staging folders excluded)."""
    root = Path(run_dir) / FROZEN_SUBDIR
    if not root.is_dir():
        raise EngramError(f"{root} does not exist: no checkpoint of {run_dir} was frozen. Give a run directory.")
    entries = [p for p in root.iterdir() if p.is_dir() and not TEMPORARY.fullmatch(p.name)]
    return sorted(entries, key=lambda p: (p.stat().st_mtime, p.name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.frozen", description="List or verify frozen checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="one line per frozen checkpoint").add_argument("run_dir")
    verify = sub.add_parser("verify", help="re-hash files and manifests; exit 1 on any mismatch")
    verify.add_argument("run_dir")
    verify.add_argument("tags", nargs="*", help="only these tags (default: all)")
    args = parser.parse_args(argv)
    try:
        entries = frozen_entries(args.run_dir)
        if args.command == "list":
            print(f"{'tag':<32} {'step':>10} {'tokens':>15} {'reason':<16} created")
            for entry in entries:
                m = read_manifest(entry)
                print(f"{entry.name:<32} {m['step']:>10} {m['tokens']:>15} {m['reason']:<16} {m['created']}")
            return 0
        names = {e.name: e for e in entries}
        unknown = [t for t in args.tags if t not in names]
        if unknown:
            raise EngramError(f"no frozen checkpoint tagged {unknown} under {args.run_dir}; known: {sorted(names)}.")
        failed = 0
        for entry in [names[t] for t in args.tags] if args.tags else entries:
            problems = verify_entry(entry)
            failed += bool(problems)
            print(f"{'OK  ' if not problems else 'FAIL'} {entry.name}" + "".join(f"\n     {p}" for p in problems))
        return 1 if failed else 0
    except EngramError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
