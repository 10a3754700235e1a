"""Validate once more when training reaches ``max_steps``, so the last ``val/*`` printed and logged describe the
final weights rather than those of the last ``val_check_interval`` boundary.

Lightning validates after a step that asks the loop to stop (``trainer.should_stop``, as early stopping does), in its
own loop: checkpoint callbacks, loggers and the telemetry stream see that validation like any other. Raising the flag
at the step that reaches ``max_steps`` changes nothing else, since the loop ends there anyway; a step that validates
on schedule is not validated twice.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class FinalValidation(pl.Callback):
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
