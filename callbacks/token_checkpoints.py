"""Checkpoints by training tokens, and freezing checkpoints for later study.

**Saving.** Each time the run's training tokens (``pl_module.tokens_seen``, all ranks) pass a multiple of
``every_n_tokens``, a checkpoint is written to ``<run_dir>/checkpoints/tokens/tokens-<tokens>-step-<step>.ckpt``:
first under a hidden temporary name, then renamed, so a write that dies half-way never shows up under a real name
and never replaces anything. Only after a successful write are the oldest ones beyond ``keep_last`` deleted; pruning
looks at that folder alone, so it never touches a frozen checkpoint.

**Freezing** copies the current training state into ``<run_dir>/frozen/<tag>/`` with a manifest (``src/frozen.py``:
sha256 per file, step, tokens, metrics, the run's config, a sha256 of the manifest itself), atomically, and makes
it read-only. Triggers:

* the Cap-Gauge's capacity alert (``freeze_on_capacity_alert``), tag ``capacity-alert-step<step>``;
* a token count reached (``freeze_at_tokens``), tag ``tokens-<count>``;
* a command: a file named ``command_file`` (default ``FREEZE``) dropped into the run directory, checked every
  ``command_every_n_steps`` steps; its first line is the tag (empty: ``command-step<step>``). The file is removed
  once the freeze is done. ``touch runs/<name>/v<N>/FREEZE`` or ``echo before-lr-drop > .../FREEZE``.

``python -m src.frozen list|verify RUN_DIR`` lists and verifies frozen checkpoints. Saves and freezes are collective
(every rank takes part in ``trainer.save_checkpoint``; rank 0 writes), and every trigger is decided on rank 0.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from callbacks.cap_gauge import CapGauge, CapMeasurement
from src.atomic import remove_stale_temporaries
from src.errors import EngramError
from src.frozen import CHECKPOINT_NAME, staged_freeze
from src.telemetry import log_scalars

TOKEN_DIR = "checkpoints/tokens"
_NAME = re.compile(r"tokens-(\d+)-step-(\d+)\.ckpt")


def token_checkpoints(folder: str | Path) -> list[Path]:
    """The token checkpoints in ``folder``, fewest tokens first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _metrics_now(trainer: pl.Trainer) -> dict[str, float]:
    """The logged scalars and the Cap-Gauge's latest measurement, for a frozen checkpoint's manifest."""
    metrics = {
        name: value.item()
        for name, value in trainer.callback_metrics.items()
        if isinstance(value, torch.Tensor) and value.numel() == 1
    }
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, CapGauge) and callback.history:
            metrics.update(callback.history[-1].metrics())
    return metrics


class TokenCheckpoints(pl.Callback):
    """Token-count checkpoints and freezing; see the module docstring.

    Args:
        every_n_tokens: save a checkpoint every this many training tokens; null = no periodic saves (freezing only).
        keep_last: how many token checkpoints to keep (the newest).
        freeze_at_tokens: freeze once the run has seen each of these token counts.
        freeze_on_capacity_alert: freeze when the Cap-Gauge's alert fires.
        command_file: name of the file in the run directory that requests a freeze.
        command_every_n_steps: how often (optimizer steps) to look for the command file.
    """

    def __init__(
        self,
        every_n_tokens: int | None = None,
        keep_last: int = 3,
        freeze_at_tokens: list[int] | None = None,
        freeze_on_capacity_alert: bool = True,
        command_file: str = "FREEZE",
        command_every_n_steps: int = 10,
    ) -> None:
        if every_n_tokens is not None and every_n_tokens < 1:
            raise EngramError(f"every_n_tokens={every_n_tokens} must be >= 1 (or null for no periodic saves).")
        if keep_last < 1 or command_every_n_steps < 1:
            raise EngramError(f"keep_last={keep_last} and command_every_n_steps={command_every_n_steps} must be >= 1.")
        self.every_n_tokens = every_n_tokens
        self.keep_last = keep_last
        self.freeze_at_tokens = sorted(freeze_at_tokens or [])
        self.done_tokens: list[int] = []  # the freeze_at_tokens counts already frozen
        self.freeze_on_capacity_alert = freeze_on_capacity_alert
        self.command_file = command_file
        self.command_every_n_steps = command_every_n_steps
        self.next_save = every_n_tokens or 0
        self.frozen: list[dict[str, Any]] = []  # tag, reason, step, tokens, path of every freeze so far
        self._last_command_step = -1

    # --- wiring ---------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.freeze_on_capacity_alert:
            for callback in trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(callback, CapGauge):
                    callback.add_listener(self._on_measurement)
        if trainer.is_global_zero:  # token checkpoints and freezes a killed run left half-written
            remove_stale_temporaries(trainer.default_root_dir)

    def _on_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule, m: CapMeasurement) -> None:
        if m.alert:
            self.freeze(trainer, pl_module, f"capacity-alert-step{m.step}", "capacity_alert", m.metrics())

    # --- saving ---------------------------------------------------------------------------------------------
    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """Write a token checkpoint now (atomically), then prune beyond ``keep_last``; returns its path."""
        tokens, step = int(pl_module.tokens_seen), trainer.global_step
        folder = Path(trainer.default_root_dir) / TOKEN_DIR
        target = folder / f"tokens-{tokens:015d}-step-{step:09d}.ckpt"
        temporary = folder / f".{target.name}.tmp"
        try:
            trainer.save_checkpoint(temporary, weights_only=False)
            if trainer.is_global_zero:
                os.replace(temporary, target)
        except BaseException:
            if trainer.is_global_zero:
                temporary.unlink(missing_ok=True)
            raise
        if trainer.is_global_zero:
            for old in token_checkpoints(folder)[: -self.keep_last]:
                old.unlink()
            log_scalars(trainer, {"token_checkpoints/saved": float(tokens)})
        return target

    def freeze(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        tag: str,
        reason: str,
        metrics: dict[str, float] | None = None,
    ) -> Path | None:
        """Freeze the current state under ``frozen/<tag>`` (collective; returns the entry's path on rank 0)."""
        run_dir = Path(trainer.default_root_dir)
        tokens = int(getattr(pl_module, "tokens_seen", 0))
        if not trainer.is_global_zero:
            # Join the collective save; only global rank 0 writes, so this path is never created.
            trainer.save_checkpoint(run_dir / ".not-written", weights_only=False)
            return None
        info = {
            "reason": reason,
            "step": trainer.global_step,
            "tokens": tokens,
            "metrics": {**_metrics_now(trainer), **(metrics or {})},
            "config": self._config(trainer, pl_module),
        }
        with staged_freeze(run_dir, tag, info) as stage:
            trainer.save_checkpoint(stage.folder / CHECKPOINT_NAME, weights_only=False)
        assert stage.path is not None
        self.frozen.append({"tag": stage.path.name, "reason": reason, "step": trainer.global_step, "tokens": tokens})
        log_scalars(trainer, {"token_checkpoints/frozen": float(tokens)})
        print(f"[token-checkpoints] froze {stage.path} ({reason}, step {trainer.global_step}, {tokens:,} tokens)")
        return stage.path

    @staticmethod
    def _config(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The run's resolved config (``config.yaml`` written by the CLI), else the module's hyper-parameters."""
        saved = Path(trainer.default_root_dir) / "config.yaml"
        if saved.is_file():
            return yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        datamodule = trainer.datamodule
        return {
            "model": {"class": type(pl_module).__name__, **dict(pl_module.hparams)},
            "data": {"class": type(datamodule).__name__, **dict(getattr(datamodule, "hparams", {}))},
        }

    # --- triggers -------------------------------------------------------------------------------------------
    def _command_tag(self, trainer: pl.Trainer) -> str | None:
        """Rank 0 reads the command file; every rank gets its answer (``None``: no command)."""
        tag = None
        if trainer.is_global_zero:
            command = Path(trainer.default_root_dir) / self.command_file
            if command.is_file():
                lines = command.read_text(encoding="utf-8", errors="replace").strip().splitlines()
                tag = (lines[0].strip() if lines else "") or f"command-step{trainer.global_step}"
        return trainer.strategy.broadcast(tag, src=0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        tokens, step = int(pl_module.tokens_seen), trainer.global_step
        if self.every_n_tokens is not None and tokens >= self.next_save:
            self.save(trainer, pl_module)
            self.next_save = (tokens // self.every_n_tokens + 1) * self.every_n_tokens
        for count in self.freeze_at_tokens:
            if tokens >= count and count not in self.done_tokens:
                self.freeze(trainer, pl_module, f"tokens-{count}", "tokens")
                self.done_tokens.append(count)
        if step != self._last_command_step and step % self.command_every_n_steps == 0:
            self._last_command_step = step
            tag = self._command_tag(trainer)
            if tag is not None:
                self.freeze(trainer, pl_module, tag, "command")
                if trainer.is_global_zero:
                    (Path(trainer.default_root_dir) / self.command_file).unlink(missing_ok=True)

    # --- resuming -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "next_save": self.next_save,
            "done_tokens": list(self.done_tokens),
            "frozen": self.frozen,
            "last_command_step": self._last_command_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_save = int(state_dict["next_save"])
        self.done_tokens = [int(t) for t in state_dict["done_tokens"]]
        self.frozen = list(state_dict["frozen"])
        self._last_command_step = int(state_dict["last_command_step"])
