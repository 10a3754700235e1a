"""What every Engram LightningModule shares: the family name used in telemetry, the count of training tokens
seen and the checkpoint's identity record (both kept in checkpoints), the AdamW + linear-warmup + cosine schedule
with its settings checked up front, and the check that the data fits the model's context."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from src.checkpoints import IDENTITY_KEY, checkpoint_identity
from src.errors import EngramError
from src.flops import training_flops_per_token

IGNORE_INDEX = -100


def _unwrapped_name(name: str) -> str:
    """A parameter's name without the segments FSDP1 and its activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _loss_scaler(trainer: pl.Trainer) -> object | None:
    return getattr(trainer.precision_plugin, "scaler", None)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_optimizer_settings(
    lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int, min_lr_ratio: float
) -> None:
    """AdamW would reject these only once training starts, with a traceback."""
    problems = [
        ("lr", lr, math.isfinite(lr) and lr > 0, "a finite number > 0"),
        ("weight_decay", weight_decay, math.isfinite(weight_decay) and weight_decay >= 0, ">= 0"),
        ("betas", list(betas), len(betas) == 2 and all(0 <= b < 1 for b in betas), "two numbers in [0, 1)"),
        ("warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0"),
        ("min_lr_ratio", min_lr_ratio, 0 <= min_lr_ratio <= 1, "in [0, 1]"),
    ]
    for key, value, ok, allowed in problems:
        if not ok:
            raise EngramError(f"model.init_args.{key}={value} is out of range: it must be {allowed}.")


class EngramModule(pl.LightningModule):
    """Base class for the model families. Subclasses set ``family`` and may override ``max_context``.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay, applied to matrices only (not to biases, norms or embeddings' 1-d params).
        betas: AdamW betas.
        warmup_steps: linear warm-up length in optimizer steps.
        min_lr_ratio: final LR as a fraction of ``lr`` at the end of the cosine.
    """

    family = "base"
    # Settings that resuming training restores from the checkpoint (AdamW's param_groups), not from the config;
    # the CLI refuses a resume whose config changes them. Families add their own.
    RESTORED_FROM_CHECKPOINT: tuple[str, ...] = ("lr", "weight_decay", "betas")

    def __init__(
        self,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        _check_optimizer_settings(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = betas
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.tokens_seen = 0

    @property
    def max_context(self) -> int | None:
        """Longest sequence the model accepts; ``None`` if unbounded."""
        return None

    def setup(self, stage: str) -> None:
        # Before any strategy wraps the module: FSDP1 flattens parameters into 1-d shards, which would put every
        # matrix in the no-decay group of configure_optimizers.
        self._matrix_names = {_unwrapped_name(n) for n, p in self.named_parameters() if p.ndim >= 2}
        datamodule = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and self.max_context is not None and seq_len > self.max_context:
            raise EngramError(
                f"data seq_len={seq_len} is longer than the model's context ({self.max_context} tokens). "
                f"Set --data.init_args.seq_len {self.max_context} or less, or build a model with a longer context."
            )

    def training_flops_per_token(self, seq_len: int) -> float:
        """FLOPs per training token (``src.protocols.CountsTrainingFlops``): the matmul count of the weights; families
        with attention or an inner loop add theirs."""
        return training_flops_per_token(self)

    def count_tokens(self, input_ids: torch.Tensor) -> None:
        """Call once per training batch: adds the batch's tokens over all ranks."""
        self.tokens_seen += int(input_ids.numel()) * self.trainer.world_size

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint[IDENTITY_KEY] = checkpoint_identity(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        matrices = getattr(self, "_matrix_names", None)
        for name, param in self.named_parameters():
            if param.requires_grad:
                is_matrix = _unwrapped_name(name) in matrices if matrices is not None else param.ndim >= 2
                (decay if is_matrix else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # Fused AdamW on CUDA, except where fp16's GradScaler and clipping meet (see configure_gradient_clipping).
        fused = self.device.type == "cuda" and not (self.trainer.gradient_clip_val and _loss_scaler(self.trainer))
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(self.warmup_steps, max(1, total // 10)) if total > 0 else self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            # Lightning refuses to clip for a fused optimizer under any mixed precision, because fp16's GradScaler
            # would unscale inside the fused step; bf16-mixed has no scaler, so the gradients are final here.
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


class LanguageModel(EngramModule):
    """Next-token training and evaluation shared by the LM families.

    A subclass builds its network as ``self.model`` (called ``model(input_ids, labels=labels)``, returning ``.loss``
    and ``.logits`` with HF-style labels: aligned with ``input_ids``; the loss shifts; -100 ignored) and calls
    ``init_metrics(vocab_size)``; it may override ``lm_loss`` for a training loss that needs no logits.
    Logged: ``train/loss``; ``{val,test}/loss``, ``/ppl`` and ``/acc`` (next-token top-1) via torchmetrics.
    """

    def init_metrics(self, vocab_size: int) -> None:
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.val_acc = MulticlassAccuracy(num_classes=vocab_size, ignore_index=IGNORE_INDEX, average="micro")
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_acc = MulticlassAccuracy(num_classes=vocab_size, ignore_index=IGNORE_INDEX, average="micro")

    def lm_forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(loss, logits)`` of ``self.model``, which every LM family builds with the HF calling convention."""
        out = self.model(input_ids, labels=labels)
        return out.loss, out.logits

    def lm_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss; a family may compute it without materialising the logits."""
        loss, _ = self.lm_forward(input_ids, labels)
        assert loss is not None
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.lm_loss(batch["input_ids"], batch["labels"])
        self.count_tokens(batch["input_ids"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss, logits = self.lm_forward(batch["input_ids"], batch["labels"])
        logits = logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        ppl, acc = getattr(self, f"{stage}_ppl"), getattr(self, f"{stage}_acc")
        ppl.update(logits, target)
        acc.update(logits.reshape(-1, logits.size(-1)), target.reshape(-1))
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/ppl", ppl)
        self.log(f"{stage}/acc", acc)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-sequence mean next-token loss (nats), for scoring held-out text."""
        _, logits = self.lm_forward(batch["input_ids"], None)
        logits = logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
        )
        mask = (target != IGNORE_INDEX).float()
        return {"loss": (nll * mask).sum(1) / mask.sum(1).clamp_min(1)}


class DelegatesPlasticity:
    """The ``src.protocols.CapturesPlasticity`` hook of a family whose ``self.model`` implements it (TTT, Titans,
    EMMA): records follow ``src/models/plasticity.py``, with the family's keys documented in its model package."""

    model: torch.nn.Module

    def set_capture(self, enabled: bool) -> None:
        """Record (or stop recording, dropping the records) the memory's test-time updates on the next forwards."""
        self.model.set_capture(enabled)  # type: ignore[operator]

    def plasticity_records(self) -> list[dict[str, torch.Tensor]]:
        """Per memory layer, the records of the latest forward with capture on."""
        return self.model.plasticity_records()  # type: ignore[operator]
