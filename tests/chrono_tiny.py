"""A tiny capacity run for the Chrono-MemBench tests: a 1-layer GPT-2 on 32 random sequences, plus a checkpoint
writer that fails half-way (to test what a crash mid-write leaves behind). Also runnable as a script, for the test
that kills a training process in the middle of a checkpoint write."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from data_modules.canaries import SyntheticCapacityDataModule
from src.lightning_modules import CausalLM
from src.telemetry import TelemetryLogger

SEQ_LEN, VOCAB, BATCH = 16, 16, 8
TOKENS_PER_STEP = SEQ_LEN * BATCH


def tiny_model(lr: float = 1e-2) -> CausalLM:
    torch.manual_seed(0)
    overrides = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": SEQ_LEN}
    overrides |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0}
    return CausalLM(VOCAB, preset="gpt2-tiny", config_overrides=overrides, lr=lr, warmup_steps=1, weight_decay=0.0)


def tiny_data() -> SyntheticCapacityDataModule:
    return SyntheticCapacityDataModule(
        num_sequences=32, seq_len=SEQ_LEN, vocab=VOCAB, batch_size=BATCH, val_sequences=8
    )


def fit(
    run_dir: Path,
    callbacks: list[pl.Callback],
    max_steps: int,
    ckpt_path: str | None = None,
    plugins: list[Any] | None = None,
    model: pl.LightningModule | None = None,
    data: pl.LightningDataModule | None = None,
    **trainer_args: Any,
) -> pl.Trainer:
    """Train (default: the tiny model on the tiny data) from scratch or ``ckpt_path``, telemetry in ``run_dir``."""
    trainer_args = {"limit_val_batches": 0, "log_every_n_steps": 1, **trainer_args}
    telemetry = TelemetryLogger(run_dir)
    trainer = pl.Trainer(
        default_root_dir=str(run_dir),
        max_steps=max_steps,
        accelerator="cpu",
        callbacks=callbacks,
        logger=[telemetry],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=plugins,
        **trainer_args,
    )
    telemetry.bind(trainer)
    trainer.fit(model or tiny_model(), datamodule=data or tiny_data(), ckpt_path=ckpt_path)
    return trainer


class HalfWriteIO(TorchCheckpointIO):
    """Writes checkpoints normally, except the ``fail_at``-th (1-based): half its bytes reach the file, then the
    writer raises (``mode="raise"``) or hangs until the process is killed (``mode="hang"``)."""

    def __init__(self, fail_at: int, mode: str = "raise") -> None:
        self.fail_at, self.mode, self.calls = fail_at, mode, 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.calls += 1
        if self.calls != self.fail_at:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
            handle.flush()
            os.fsync(handle.fileno())
        if self.mode == "hang":
            time.sleep(600)
        raise OSError("disk full (simulated)")


if __name__ == "__main__":  # python -m tests.chrono_tiny RUN_DIR: the 3rd token checkpoint write hangs half-way
    from callbacks.token_checkpoints import TokenCheckpoints

    torch.set_num_threads(1)
    fit(Path(sys.argv[1]), [TokenCheckpoints(every_n_tokens=TOKENS_PER_STEP)], 10, plugins=[HalfWriteIO(3, "hang")])
