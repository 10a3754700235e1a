"""A run killed mid-training and resumed with ``--ckpt_path last`` ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def _final_weights(run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == steps
    return ckpt["state_dict"]


# A small needle set (6 batches an epoch) puts the kill and the resume in the second epoch.
ACROSS_EPOCHS = [
    "--data", "data_modules.needle.NeedleDataModule",
    "--data.init_args.seq_len", "192", "--data.init_args.batch_size", "4",
    "--data.init_args.train_size", "24", "--data.init_args.val_size", "4", "--data.init_args.test_size", "4",
    "--trainer.max_steps", "16", "--trainer.val_check_interval", "3",
]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "kill_at", "resume_from", "final"),
    [
        ([], 6, 4, 12),
        (ACROSS_EPOCHS, 10, 8, 16),
        # the checkpoint is the last batch of epoch 0: the resumed run must start epoch 1 from its first batch
        ([*ACROSS_EPOCHS, "--checkpoint.every_n_train_steps", "6"], 8, 6, 16),
    ],
    ids=["mid-epoch", "second-epoch", "epoch-end"],
)
def test_killed_run_resumes_exactly(
    run_root: Path, extra: list[str], kill_at: int, resume_from: int, final: int
) -> None:
    args = [*ARGS, *extra]
    main(["fit", *args, "--run.root", str(run_root), "--run.name", "straight"])
    straight = _final_weights(run_root / "straight" / "v0", final)

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # same threads as this process
    killed = subprocess.run(
        [sys.executable, "-m", "src.cli", "fit", *args, "--run.root", str(run_root), "--run.name", "crashy",
         "--trainer.callbacks+=tests.helpers.KillAtStep", f"--trainer.callbacks.step={kill_at}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == 17, killed.stderr[-2000:]
    partial = torch.load(run_root / "crashy" / "v0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert partial["global_step"] == resume_from  # the last checkpoint before the kill

    main(["fit", *args, "--run.root", str(run_root), "--run.name", "crashy", "--ckpt_path", "last"])
    assert not (run_root / "crashy" / "v1").exists()  # resumed in place, not a new version
    resumed = _final_weights(run_root / "crashy" / "v0", final)

    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
