"""Stop (or skip) a training step whose loss or gradients are not finite, before the optimizer applies it.

The CLI installs one :class:`FiniteGuard` in every run (``--guard.*``). Each optimizer step it checks the loss handed
to ``backward`` and, unless a ``GradScaler`` already handles overflow (``16-mixed``), the gradients (one fused norm
over all of them, one host sync a step). On a non-finite step:

* ``on_nonfinite: stop`` (default) raises :class:`~src.errors.NonFiniteError`: the CLI prints one line naming the step
  and the last good checkpoint and exits 3. Nothing of the bad step reaches the weights or any checkpoint.
* ``on_nonfinite: skip`` drops the step's gradients, so AdamW leaves every weight and moment untouched (the LR
  schedule and ``global_step`` still advance, as in large-model trainers), logs ``guard/skipped_steps``, and stops as
  above after more than ``max_consecutive_skips`` bad steps in a row.

The second line of defence is the checkpoint writer (:class:`src.checkpoints.AtomicCheckpointIO`), which refuses any
checkpoint holding NaN/Inf weights, so pruning never replaces the last good checkpoint with a bad one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from src.checkpoints import describe_checkpoint, latest_checkpoint
from src.errors import EngramError, NonFiniteError
from src.runs import CHECKPOINT_SUBDIR

MODES = ("stop", "skip")


class FiniteGuard(pl.Callback):
    """Guards every optimizer step against NaN/Inf; see the module docstring.

    Args:
        on_nonfinite: ``stop`` the run, or ``skip`` the step.
        max_consecutive_skips: with ``skip``, stop once more than this many steps in a row were not finite.
        check_gradients: also check the gradients (a loss can be finite while a gradient overflows).
    """

    def __init__(
        self,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        max_consecutive_skips: int = 3,
        check_gradients: bool = True,
    ) -> None:
        if on_nonfinite not in MODES:
            raise EngramError(f"guard.on_nonfinite={on_nonfinite!r}; use one of {', '.join(MODES)}.")
        if max_consecutive_skips < 0:
            raise EngramError(f"guard.max_consecutive_skips={max_consecutive_skips} must be >= 0.")
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.check_gradients = check_gradients
        self.skipped_steps = 0
        self.consecutive = 0
        self._finite: torch.Tensor | None = None  # over the micro-batches of this optimizer step
        self._loss: torch.Tensor | None = None  # the latest micro-batch's, for the message

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()
        finite = torch.isfinite(self._loss).all()
        self._finite = finite if self._finite is None else self._finite & finite

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        finite = self._finite if self._finite is not None else torch.ones((), dtype=torch.bool)
        loss_finite = finite
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # A GradScaler meets overflowing fp16 gradients routinely and skips those steps itself.
        if self.check_gradients and grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).to(finite.device))
            finite = finite & torch.isfinite(grad_norm)
        bad = not bool(finite.item())  # the one host sync of a step
        if trainer.world_size > 1:  # every rank must take the same branch, or the others hang in the next all-reduce
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._finite = None
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.on_nonfinite == "skip" and self.consecutive <= self.max_consecutive_skips:
            self.skipped_steps += 1
            # AdamW passes over parameters whose gradient is None: weights and moments stay as they were.
            optimizer.zero_grad(set_to_none=True)
            pl_module.log("guard/skipped_steps", float(self.skipped_steps))
            return
        if not bool(loss_finite.item()):
            what = f"loss ({self._loss.float().mean().item() if self._loss is not None else 'nan'})"
        else:
            what = "gradients (the loss was finite)"
        last = latest_checkpoint(Path(trainer.default_root_dir) / CHECKPOINT_SUBDIR)
        if last is None and trainer.ckpt_path:
            last = Path(trainer.ckpt_path)  # resumed, and nothing written since
        streak = f" ({self.consecutive} steps in a row)" if self.on_nonfinite == "skip" else ""
        raise NonFiniteError(
            f"non-finite {what} at step {trainer.global_step}{streak}; stopped before the optimizer applied it, no "
            f"checkpoint written. Last good checkpoint: {describe_checkpoint(last)}. Lower the learning rate, clip "
            "gradients (--trainer.gradient_clip_val 1.0), or skip bad steps (--guard.on_nonfinite skip)."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.consecutive = int(state_dict["consecutive"])
