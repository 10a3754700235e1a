"""Token checkpoints and frozen checkpoints: every trigger freezes a verifiable, read-only copy; pruning never
deletes it; a write that dies half-way never replaces a good checkpoint; an edited manifest fails verification."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from callbacks.cap_gauge import CapGauge
from callbacks.token_checkpoints import TOKEN_DIR, TokenCheckpoints, token_checkpoints
from src.checkpoints import read_checkpoint
from src.errors import EngramError
from src.frozen import (
    CHECKPOINT_NAME,
    FROZEN_SUBDIR,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_SHA256,
    frozen_entries,
    main,
    staged_freeze,
    verify_entry,
)
from tests.chrono_tiny import TOKENS_PER_STEP, HalfWriteIO, fit
from tests.conftest import REPO


class DropCommand(TokenCheckpoints):
    """TokenCheckpoints that also plays the user: writes the FREEZE command file after step 3."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == 3:
            (Path(trainer.default_root_dir) / "FREEZE").write_text("before lr drop\n")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_every_trigger_freezes_a_verifiable_read_only_copy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    keeper = DropCommand(
        every_n_tokens=TOKENS_PER_STEP, keep_last=1, freeze_at_tokens=[5 * TOKENS_PER_STEP], command_every_n_steps=2
    )
    gauge = CapGauge(every_n_steps=2, alert_bpp=0.0, verbose=False)  # bpp >= 0 always: fires at step 2
    fit(tmp_path, [gauge, keeper], max_steps=8)

    entries = {p.name: p for p in frozen_entries(tmp_path)}
    assert set(entries) == {"capacity-alert-step2", "before-lr-drop", f"tokens-{5 * TOKENS_PER_STEP}"}
    assert not (tmp_path / "FREEZE").exists()  # the command was consumed
    for tag, entry in entries.items():
        manifest = json.loads((entry / MANIFEST).read_text())
        assert verify_entry(entry) == []
        checkpoint = entry / CHECKPOINT_NAME
        assert manifest["files"][CHECKPOINT_NAME]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        assert (saved["global_step"], saved["tokens_seen"]) == (manifest["step"], manifest["tokens"])
        assert manifest["config"]["model"]["preset"] == "gpt2-tiny"
        assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o444 and stat.S_IMODE(entry.stat().st_mode) == 0o555
        if tag.startswith("capacity"):
            assert manifest["reason"] == "capacity_alert" and manifest["step"] == 2
            assert manifest["metrics"]["capgauge/alert_bpp"] == 0.0 and "capgauge/bpp_seen" in manifest["metrics"]
    assert json.loads((entries["before-lr-drop"] / MANIFEST).read_text())["step"] == 4  # first check after step 3
    assert json.loads((entries["tokens-640"] / MANIFEST).read_text())["tokens"] == 5 * TOKENS_PER_STEP
    # Pruning kept one token checkpoint of eight and deleted none of the frozen ones, which all still verify.
    assert [p.name for p in token_checkpoints(tmp_path / TOKEN_DIR)] == [f"tokens-{8 * 128:015d}-step-{8:09d}.ckpt"]

    capsys.readouterr()
    assert main(["verify", str(tmp_path)]) == 0
    assert main(["list", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert all(tag in listed for tag in entries) and "capacity_alert" in listed

    tampered = entries["before-lr-drop"] / CHECKPOINT_NAME
    tampered.chmod(0o644)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert verify_entry(entries["before-lr-drop"]) == [f"{CHECKPOINT_NAME}: sha256 differs from the manifest"]
    assert main(["verify", str(tmp_path)]) == 1
    assert main(["verify", str(tmp_path), "capacity-alert-step2"]) == 0
    assert "FAIL before-lr-drop" in capsys.readouterr().out


def test_a_failed_freeze_leaves_nothing_and_keeps_earlier_entries(tmp_path: Path) -> None:
    with staged_freeze(tmp_path, "good", {"reason": "test", "step": 1, "tokens": 2}) as stage:
        (stage.folder / "weights.bin").write_bytes(b"x" * 1000)
    assert stage.path == tmp_path / FROZEN_SUBDIR / "good"
    with pytest.raises(OSError, match="simulated"), staged_freeze(tmp_path, "good", {"reason": "test"}) as stage:
        (stage.folder / "weights.bin").write_bytes(b"y" * 500)
        raise OSError("disk full (simulated)")
    assert sorted(os.listdir(tmp_path / FROZEN_SUBDIR)) == ["good"]  # no staging folder, no "good-2"
    assert verify_entry(tmp_path / FROZEN_SUBDIR / "good") == []

    # The same through the callback: the checkpoint write of a command freeze dies half-way.
    run = tmp_path / "run"
    run.mkdir()
    (run / "FREEZE").write_text("")
    with pytest.raises(OSError, match="simulated"):
        fit(run, [TokenCheckpoints(command_every_n_steps=1)], max_steps=3, plugins=[HalfWriteIO(1)])
    assert list((run / FROZEN_SUBDIR).iterdir()) == []


def test_a_token_checkpoint_write_that_raises_keeps_the_previous_one(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="simulated"):
        fit(tmp_path, [TokenCheckpoints(every_n_tokens=TOKENS_PER_STEP, keep_last=1)], 10, plugins=[HalfWriteIO(3)])
    folder = tmp_path / TOKEN_DIR
    assert sorted(os.listdir(folder)) == [f"tokens-{2 * 128:015d}-step-{2:09d}.ckpt"]  # no partial file left
    read_checkpoint(folder / os.listdir(folder)[0])
    assert torch.load(folder / os.listdir(folder)[0], weights_only=False)["global_step"] == 2


def test_a_token_checkpoint_write_killed_half_way_never_replaces_anything(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "tests.chrono_tiny", str(tmp_path)], cwd=REPO, env=env)
    folder = tmp_path / TOKEN_DIR
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in folder.glob(".*")):
            assert child.poll() is None and time.monotonic() < deadline, "the writer never started its third save"
            time.sleep(0.2)
        time.sleep(0.5)  # the hanging writer has flushed its half and sleeps
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    good = [f"tokens-{n * 128:015d}-step-{n:09d}.ckpt" for n in (1, 2)]
    assert [p.name for p in token_checkpoints(folder)] == good
    for name in good:
        read_checkpoint(folder / name)
    partial = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(partial) == 1
    with pytest.raises(EngramError, match="corrupt or truncated"):
        read_checkpoint(partial[0])  # what was cut off is unreadable, and under no real name

    fit(tmp_path, [TokenCheckpoints(every_n_tokens=10**9)], max_steps=1)  # a new run in the folder cleans it up
    assert not list(folder.glob(".*.tmp")) and [p.name for p in token_checkpoints(folder)] == good


EDITED = f"{MANIFEST}: edited after freezing (its sha256 differs from the one it records)"
# Values whose JSON text could change between writing and reading back if the hash were taken over the Python
# objects: int keys (sorted as numbers, read back as strings), a tuple, a Path (written as str()), floats with long
# or exponent forms, NaN and infinity, non-ASCII text, an int beyond float precision.
AWKWARD_INFO: dict[str, Any] = {
    "reason": "test",
    "step": 7,
    "tokens": 2**53 + 1,
    "metrics": {"train/loss": 0.1, "third": 1 / 3, "tiny": 5e-324, "big": 1e16, "zero": -0.0, "nan": float("nan")},
    "config": {
        "model": {"lr": 3e-4, "name": "Gemma — ü 字", "path": Path("/data/pg19"), "dims": (64, 128)},
        "by_layer": {10: "late", 2: "early", "inf": float("inf")},
    },
}


def _freeze(run_dir: Path) -> Path:
    with staged_freeze(run_dir, "entry", AWKWARD_INFO) as stage:
        (stage.folder / CHECKPOINT_NAME).write_bytes(b"weights" * 100)
    assert stage.path is not None
    return stage.path


def _rewrite(entry: Path, change: Callable[[dict[str, Any]], object], indent: int = 2) -> None:
    """Edit a frozen manifest the way a person would: load, change, save (it is read-only, so chmod first)."""
    path = entry / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.chmod(0o644)
    path.write_text(json.dumps(manifest, indent=indent, sort_keys=True))


EDITS: dict[str, Callable[[dict[str, Any]], object]] = {
    "step": lambda m: m.update(step=m["step"] + 1),
    "tokens": lambda m: m.update(tokens=m["tokens"] - 1),
    "metric": lambda m: m["metrics"].update({"train/loss": 0.09}),
    "config": lambda m: m["config"]["model"].update(lr=1e-3),
    "file hash": lambda m: m["files"][CHECKPOINT_NAME].update(sha256="0" * 64),
}


def test_an_untouched_manifest_verifies_after_the_json_round_trip(tmp_path: Path) -> None:
    entry = _freeze(tmp_path)
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["format"] == MANIFEST_FORMAT == 2 and len(manifest[MANIFEST_SHA256]) == 64
    assert manifest["config"]["model"]["path"] == "/data/pg19" and manifest["config"]["by_layer"]["10"] == "late"
    assert verify_entry(entry) == []
    assert main(["verify", str(tmp_path)]) == 0
    _rewrite(entry, lambda m: None, indent=4)  # the hash covers the content, not the layout
    assert verify_entry(entry) == []


@pytest.mark.parametrize("field", EDITS)
def test_an_edited_manifest_fails_verification(tmp_path: Path, field: str, capsys: pytest.CaptureFixture[str]) -> None:
    entry = _freeze(tmp_path)
    _rewrite(entry, EDITS[field])
    # A changed file hash also no longer matches the checkpoint; the manifest's own hash names the cause.
    also = [f"{CHECKPOINT_NAME}: sha256 differs from the manifest"] if field == "file hash" else []
    assert verify_entry(entry) == [EDITED, *also]
    capsys.readouterr()
    assert main(["verify", str(tmp_path)]) == 1
    assert f"FAIL entry\n     {EDITED}" in capsys.readouterr().out


def test_a_format_1_manifest_fails_because_edits_to_it_cannot_be_detected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = _freeze(tmp_path)
    _rewrite(entry, lambda m: (m.pop(MANIFEST_SHA256), m.update(format=1)))
    assert verify_entry(entry) == [
        f"{MANIFEST}: format 1 records no sha256 of itself, so edits to its step, tokens, metrics or config cannot "
        "be detected (only its files were checked)"
    ]
    capsys.readouterr()
    assert main(["verify", str(tmp_path)]) == 1
    assert "FAIL entry" in capsys.readouterr().out
