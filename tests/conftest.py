"""Shared test set-up: runs go to a temporary root, W&B never touches the network, one thread per test process
(the CI machine has two cores)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.cli_forkserver import CLIServer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# A few steps with validation and every log line; FAST[2:] leaves max_steps to the test.
FAST = [
    "--trainer.max_steps", "4",
    "--trainer.val_check_interval", "2",
    "--trainer.limit_val_batches", "1",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def error_line_of(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in-process on arguments that must fail: exit code 2, no traceback, exactly one ``error:`` line
    (library progress output may come before it), which is returned."""
    from src.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    return root


@pytest.fixture(autouse=True)
def _isolate_run_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI exports the run directory for DDP children; a test must not inherit the previous test's.
    monkeypatch.delenv("ENGRAM_RUN_DIR", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture(scope="session")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLIServer]:
    """``python -m src.cli`` as separate processes, sharing one import (``tests/cli_forkserver.py``)."""
    server = CLIServer(REPO, tmp_path_factory.mktemp("cli_server"))
    yield server
    server.close()
