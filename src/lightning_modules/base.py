"""What every Engram LightningModule shares: the family name used in telemetry, the count of training tokens
seen (kept in checkpoints), the AdamW + linear-warmup + cosine schedule, and the check that the data fits the
model's context."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from src.errors import EngramError


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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

    def __init__(
        self,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
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
        datamodule = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and self.max_context is not None and seq_len > self.max_context:
            raise EngramError(
                f"data seq_len={seq_len} is longer than the model's context ({self.max_context} tokens). "
                f"Set --data.init_args.seq_len {self.max_context} or less, or build a model with a longer context."
            )

    def count_tokens(self, input_ids: torch.Tensor) -> None:
        """Call once per training batch: adds the batch's tokens over all ranks."""
        self.tokens_seen += int(input_ids.numel()) * self.trainer.world_size

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(self.warmup_steps, max(1, total // 10)) if total > 0 else self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
