"""Fault drills through the real command line (CPU, tiny configs): a run that diverges stops with one line and never
writes a non-finite checkpoint; a diverging resumed run keeps its last good checkpoint; ``kill -9`` in the middle
of checkpoint writes never costs ``last.ckpt``, and the next start removes what the killed writes left."""

from __future__ import annotations

import random
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from callbacks.finite_guard import FiniteGuard
from src.checkpoints import nonfinite_tensors
from tests.chrono_tiny import fit
from tests.cli_forkserver import CLIServer
from tests.conftest import CONFIGS
from tests.helpers import PoisonGrads

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob("*.ckpt") if not p.name.startswith("."))


def _assert_finite(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert nonfinite_tensors(checkpoint) == [], path
    return checkpoint


def _error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_huge_learning_rate_stops_with_one_line_and_no_nan_checkpoint(cli_server: CLIServer, run_root: Path) -> None:
    done = cli_server.run(
        ["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), "--model.init_args.lr", "1e6",
         "--checkpoint.every_n_train_steps", "1", "--run.root", str(run_root), *QUIET]
    )  # fmt: skip
    assert done.rc == 3
    line = _error_line(done.stderr)
    assert line.startswith("error: non-finite loss") and "Last good checkpoint:" in line and "at step " in line
    run_dir = run_root / "gemma_tiny" / "v0"
    for path in _checkpoints(run_dir):  # every checkpoint a diverging run wrote holds finite numbers
        _assert_finite(path)
    step = int(line.split("at step ")[1].split(";")[0])
    last = _assert_finite(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == step  # the steps before the bad one were kept


@pytest.mark.parametrize(
    ("when", "message"),
    [("batch_start", "error: non-finite loss"), ("batch_end", "error: refused to write checkpoint")],
    ids=["guard", "writer"],
)
def test_diverging_resumed_run_keeps_its_last_good_checkpoint(
    cli_server: CLIServer, run_root: Path, when: str, message: str
) -> None:
    args = ["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), "--checkpoint.every_n_train_steps", "4",
            "--run.root", str(run_root), *QUIET]  # fmt: skip
    assert cli_server.run([*args, "--trainer.max_steps", "8"]).rc == 0
    # Resumed, then poisoned after step 12: the guard sees the NaN loss of step 13, or (batch_end) the checkpoint
    # writer sees NaN weights at step 12's save.
    done = cli_server.run(
        [*args, "--trainer.max_steps", "20", "--ckpt_path", "last",
         "--trainer.callbacks+=tests.helpers.PoisonWeights", "--trainer.callbacks.step=12",
         f"--trainer.callbacks.when={when}"]
    )  # fmt: skip
    assert done.rc == 3
    line = _error_line(done.stderr)
    assert line.startswith(message)
    checkpoints = run_root / "gemma_tiny" / "v0" / "checkpoints"
    named, step = line.split("Last good checkpoint: ")[1].split(". ")[0].rsplit(" (step ", 1)
    assert _assert_finite(Path(named))["global_step"] == int(step.rstrip(")"))  # it is there, whole and finite
    if when == "batch_start":
        assert int(step.rstrip(")")) == 12  # the step before the NaN loss
    else:
        assert not (checkpoints / "epoch=0-step=12.ckpt").exists()  # the refused write left nothing
    assert _assert_finite(checkpoints / "last.ckpt")["global_step"] == (12 if when == "batch_start" else 8)
    for path in _checkpoints(checkpoints.parent):
        _assert_finite(path)


def test_skip_leaves_weights_and_moments_untouched(tmp_path: Path) -> None:
    class Snapshot(pl.Callback):
        def __init__(self) -> None:
            self.before: dict[int, list[torch.Tensor]] = {}
            self.after: dict[int, list[torch.Tensor]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]

    guard, snapshot = FiniteGuard(on_nonfinite="skip", max_consecutive_skips=2), Snapshot()
    trainer = fit(tmp_path, [PoisonGrads([3, 4]), snapshot, guard], max_steps=8)
    assert trainer.global_step == 8 and guard.skipped_steps == 2
    for step in (3, 4):  # skipped: nothing moved
        assert all(torch.equal(a, b) for a, b in zip(snapshot.before[step], snapshot.after[step], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(snapshot.before[5], snapshot.after[5], strict=True))
    adam_steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert adam_steps == {6}  # 8 steps, 2 skipped
    assert trainer.callback_metrics["guard/skipped_steps"] == 2


def test_skip_stops_after_too_many_bad_steps_in_a_row(tmp_path: Path) -> None:
    from src.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"at step 5 \(3 steps in a row\)"):
        fit(tmp_path, [PoisonGrads([3, 4, 5]), FiniteGuard(on_nonfinite="skip", max_consecutive_skips=2)], 8)


def test_kill_during_checkpoint_writes(cli_server: CLIServer, run_root: Path) -> None:
    # 50 MB checkpoints twice a step (a 65k-token embedding; llama-tiny is cheap to run). Each trial waits until a
    # write is in flight (its hidden temporary appears), then kills the process after a random 0-50 ms.
    args = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--model.init_args.preset", "llama-tiny",
            "--model.init_args.config_overrides", "{vocab_size: 65536}", "--data.init_args.batch_size", "2",
            "--data.init_args.seq_len", "64", "--trainer.limit_val_batches", "0",
            "--checkpoint.every_n_train_steps", "1", "--run.root", str(run_root), "--run.name", "killed", *QUIET]  # fmt: skip
    checkpoints = run_root / "killed" / "v0" / "checkpoints"
    rng = random.Random(0)
    torn = 0

    def temporaries() -> set[str]:
        return {p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")} if checkpoints.is_dir() else set()

    for trial in range(10):
        stale = temporaries()  # the last kill's; the new process removes them when it starts
        pid = cli_server.start([*args, "--trainer.max_steps", "1000", *(["--ckpt_path", "last"] if trial else [])])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not ((checkpoints / "last.ckpt").exists() and temporaries() - stale):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        cli_server.kill(pid)
        assert cli_server.finish().rc == -9
        torn += bool(temporaries() - stale)
        _assert_finite(checkpoints / "last.ckpt")  # always whole and loadable
    assert torn >= 5  # most kills cut a write short (each such leaves a .tmp behind)
    step = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    done = cli_server.run([*args, "--trainer.max_steps", str(step + 1), "--ckpt_path", "last"])
    assert done.rc == 0, done.stderr[-2000:]
    assert not [p for p in (run_root / "killed" / "v0").rglob("*") if p.name.endswith(".tmp")]
    assert _assert_finite(checkpoints / "last.ckpt")["global_step"] == step + 1
