"""The EMMA family in Lightning: ``EmmaModel`` (``src/models/emma``) trained on needle retrieval or ListOps-lite,
with the hooks ``callbacks/infonce_gate.py`` drives (``infonce_weight``, ``write_enabled``, ``oracle_mix``,
``read_cos``), the plasticity-capture hook ``callbacks/plasticity.py`` uses, and the model's telemetry logged every
step as ``emma/<key>``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from src.errors import EngramError
from src.lightning_modules.base import IGNORE_INDEX, DelegatesPlasticity, EngramModule
from src.models.emma import EmmaConfig, EmmaModel, EmmaOutput, needle_accuracy, needle_read_targets

TASKS = ("needle", "listops")


class EmmaLM(DelegatesPlasticity, EngramModule):
    """An EMMA model with its task head and loss.

    Args:
        vocab_size: set from the data module's tokenizer (linked by the CLI).
        preset: ``EmmaConfig`` preset (``needle-tiny``, ``needle-small``, ``needle-base``, ``listops-lite``).
        config_overrides: ``EmmaConfig`` fields to change, e.g. ``{d_mem: 512, deq: {max_iter: 30}}``.
        task: ``needle`` (next-token loss on the answer labels, exact-match val/acc) or ``listops``
            (10-way classification of the batch's ``label``).
        infonce_temperature: temperature of the InfoNCE loss on reads; its weight λ (``infonce_weight``) is 0
            unless an ``InfoNCEGateCallback`` opens it.
        (the optimizer arguments are EngramModule's)
    """

    family = "emma"

    def __init__(
        self,
        vocab_size: int,
        preset: str = "needle-small",
        config_overrides: dict[str, Any] | None = None,
        task: str = "needle",
        infonce_temperature: float = 0.07,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        if task not in TASKS:
            raise EngramError(f"task={task!r} is unknown; use one of {', '.join(TASKS)}.")
        if infonce_temperature <= 0:
            raise EngramError(f"infonce_temperature={infonce_temperature} must be > 0.")
        self.task = task
        self.infonce_temperature = infonce_temperature
        self.config = EmmaConfig.from_name(
            preset, vocab_size=vocab_size, task="lm" if task == "needle" else "classify", **(config_overrides or {})
        )
        self.model = EmmaModel(self.config)
        # Written by InfoNCEGateCallback before every training batch; these defaults are the no-gate behaviour.
        self.infonce_weight = 0.0
        self.write_enabled = True
        self.oracle_mix = 0.0
        self.read_cos: torch.Tensor | None = None  # read back by the gate after every training batch
        if task == "listops":
            self.val_acc = MulticlassAccuracy(num_classes=self.config.n_classes, average="micro")
            self.test_acc = MulticlassAccuracy(num_classes=self.config.n_classes, average="micro")

    def _forward(self, batch: dict[str, torch.Tensor], training: bool) -> tuple[EmmaOutput, torch.Tensor]:
        """Run the model (gate controls only in training; validation never sees the oracle) and the task loss."""
        input_ids = batch["input_ids"]
        if self.task == "needle":
            targets = needle_read_targets(input_ids, batch["answer_start"], batch["answer_end"])
            mask = None
        else:
            # ListOps ends in "= answer": classify at "=", never showing the model the answer token itself.
            targets, mask = batch["label"], batch.get("attention_mask")
            input_ids, mask = input_ids[:, :-1], mask[:, :-1] if mask is not None else None
        out = self.model(
            input_ids,
            mask,
            targets,
            oracle_mix=self.oracle_mix if training else 0.0,
            write_enabled=self.write_enabled if training else True,
        )
        if self.task == "needle":
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX)
        else:
            loss = F.cross_entropy(out.logits.float(), batch["label"])
        return out, loss

    def _log_telemetry(self, out: EmmaOutput, stage: str) -> None:
        prefix = "emma" if stage == "train" else f"{stage}/emma"
        self.log_dict({f"{prefix}/{key}": value for key, value in out.telemetry.items()}, on_step=stage == "train")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out, task_loss = self._forward(batch, training=True)
        loss = task_loss
        if self.infonce_weight > 0:
            infonce = self.model.infonce_loss(out, self.infonce_temperature)
            loss = loss + self.infonce_weight * infonce
            self.log("train/infonce", infonce)
        # The gate needs a finite value every batch; a batch with no supervised read counts as no alignment.
        self.read_cos = out.telemetry.get("read_cos_raw", torch.zeros(()))
        self.count_tokens(batch["input_ids"])
        self.log_dict({"train/loss": loss, "train/task_loss": task_loss}, prog_bar=True)
        self._log_telemetry(out, "train")
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out, loss = self._forward(batch, training=False)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        if self.task == "needle":
            acc = needle_accuracy(out.logits, batch["input_ids"], batch["answer_start"], batch["answer_end"])
            self.log(f"{stage}/acc", acc, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        else:
            metric = getattr(self, f"{stage}_acc")
            metric.update(out.logits.float(), batch["label"])
            self.log(f"{stage}/acc", metric, prog_bar=True)
        self._log_telemetry(out, stage)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")
