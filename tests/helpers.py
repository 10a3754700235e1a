"""Callbacks used by the end-to-end tests through the real CLI (they are named by class path in overrides)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """Ends the process abruptly (no clean-up, like a SIGKILL or a node failure) once ``step`` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step >= self.step:
            os._exit(17)


class RecordBatches(pl.Callback):
    """Writes ``(doc_id, position)`` of every training example each rank sees to ``<dir>/rank<k>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.seen += [[int(d), int(p)] for d, p in zip(batch["doc_id"], batch["position"], strict=True)]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.seen))
