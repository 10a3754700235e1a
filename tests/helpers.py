"""Callbacks used by the end-to-end tests through the real CLI (they are named by class path in overrides)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor


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


class PoisonWeights(pl.Callback):
    """Fills the first parameter with NaN once ``step`` optimizer steps are done: before the next batch's forward
    (``when="batch_start"``: the loss turns NaN) or right after the step, before its checkpoint (``"batch_end"``)."""

    def __init__(self, step: int, when: str = "batch_start") -> None:
        self.step, self.when = step, when

    def _poison(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step >= self.step:
            next(pl_module.parameters()).data.fill_(float("nan"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.when == "batch_start":
            self._poison(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.when == "batch_end":
            self._poison(trainer, pl_module)


class PoisonGrads(pl.Callback):
    """Makes one gradient NaN in the optimizer steps numbered ``steps`` (``global_step`` before the step)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("nan"))


class RecordShards(pl.Callback):
    """Writes ``<dir>/rank<k>.json``: the step training starts from, every training loss, and what the rank holds
    at its first optimizer step (every parameter's local and global element count, whether it is a DTensor shard);
    rank 0 also writes the full weights training starts from (gathered from the shards) to ``<dir>/start.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.record: dict = {"losses": []}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["start_step"] = trainer.global_step
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # a collective: every rank calls it
        weights = get_model_state_dict(pl_module, options=options)
        if trainer.is_global_zero:
            torch.save(weights, Path(self.out_dir) / "start.pt")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:  # type: ignore[no-untyped-def]
        if "local" in self.record:
            return
        # After the backward every unit is resharded (the root unit stays gathered from a forward to its backward).
        params = dict(pl_module.named_parameters())
        self.record.update(
            local={n: (p.to_local() if isinstance(p, DTensor) else p).numel() for n, p in params.items()},
            full={n: p.numel() for n, p in params.items()},
            dtensor={n: isinstance(p, DTensor) for n, p in params.items()},
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.record["losses"].append(float(outputs["loss"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
