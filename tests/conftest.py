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
