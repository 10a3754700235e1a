"""A run killed mid-training and resumed with ``--ckpt_path last`` ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from src.cli import main
from tests.conftest import CONFIGS, REPO

# gpt2-tiny keeps dropout on, so the test also fails if the RNG state is not restored.
ARGS = [
    "--config", str(CONFIGS / "gemma_tiny.yaml"),
    "--model.init_args.preset", "gpt2-tiny",
    "--trainer.max_steps", "12",
    "--trainer.val_check_interval", "5",
    "--trainer.log_every_n_steps", "2",
    "--checkpoint.every_n_train_steps", "4",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12
    return ckpt["state_dict"]


def test_killed_run_resumes_exactly(run_root: Path) -> None:
    main(["fit", *ARGS, "--run.root", str(run_root), "--run.name", "straight"])
    straight = _final_weights(run_root / "straight" / "v0")

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # same threads as this process
    killed = subprocess.run(
        [sys.executable, "-m", "src.cli", "fit", *ARGS, "--run.root", str(run_root), "--run.name", "crashy",
         "--trainer.callbacks+=tests.helpers.KillAtStep", "--trainer.callbacks.step=6"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == 17, killed.stderr[-2000:]
    partial = torch.load(run_root / "crashy" / "v0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert partial["global_step"] == 4  # the kill came after step 6, so the last checkpoint is step 4

    main(["fit", *ARGS, "--run.root", str(run_root), "--run.name", "crashy", "--ckpt_path", "last"])
    assert not (run_root / "crashy" / "v1").exists()  # resumed in place, not a new version
    resumed = _final_weights(run_root / "crashy" / "v0")

    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
