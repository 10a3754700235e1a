"""Checkpoint files: the one writer (atomic, finite weights only), reading them with one-line errors, and their
identity (which family, model class and model settings wrote them).

* :class:`AtomicCheckpointIO` is the checkpoint writer of every CLI run (Lightning's ``ModelCheckpoint``, token
  checkpoints and freezes all go through ``trainer.save_checkpoint`` and so through it). It refuses to write a
  checkpoint whose weights or optimizer state hold NaN/Inf, so a diverged run cannot replace a good checkpoint.
* :func:`read_checkpoint` loads a file memory-mapped (cheap even for a 2B model) or names the problem.
* :func:`check_fits` compares a checkpoint with the model a config builds before anything runs: the class, every
  tensor's shape and, when resuming training, the settings the checkpoint restores (AdamW's ``lr``, ``betas``,
  ``weight_decay`` live in its ``param_groups``), which an override on the command line could not change.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.atomic import atomic_write, remove_stale_temporaries
from src.errors import EngramError, NonFiniteError

# Beside Lightning's own keys, whose "hyper_parameters" already hold the model's settings: {format, family, model_class}
IDENTITY_KEY = "engram"
IDENTITY_FORMAT = 1
CHECKPOINT_SUFFIX = ".ckpt"


# --- what a checkpoint holds ------------------------------------------------------------------------------------
def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def checkpoint_identity(module: pl.LightningModule) -> dict[str, Any]:
    """The record :class:`~src.lightning_modules.base.EngramModule` writes into every checkpoint."""
    return {
        "format": IDENTITY_FORMAT,
        "family": getattr(module, "family", "unknown"),
        "model_class": qualified_name(type(module)),
    }


def _float_tensors(tree: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            yield prefix, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _float_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from _float_tensors(value, f"{prefix}[{i}]")


def nonfinite_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """Names of the weight and optimizer-state tensors of a Lightning checkpoint that hold NaN or Inf."""
    parts = {"state_dict": checkpoint.get("state_dict", {}), "optimizer_states": checkpoint.get("optimizer_states", [])}
    named = [(name, tensor) for name, tensor in _float_tensors(parts, "") if tensor.numel()]
    # amax and amin propagate NaN and keep ±Inf, without a bool copy of the tensor; the flags stay on their device
    # and are read back once per device, not once per tensor.
    flags = [torch.isfinite(t.amax()) & torch.isfinite(t.amin()) for _, t in named]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for flag in flags:
        by_device.setdefault(flag.device, []).append(flag)
    if all(bool(torch.stack(group).all()) for group in by_device.values()):
        return []
    return [name for (name, _), flag in zip(named, flags, strict=True) if not bool(flag)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint file under ``folder`` (hidden temporaries excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [p for p in folder.rglob(f"*{CHECKPOINT_SUFFIX}") if not p.name.startswith(".") and p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def describe_checkpoint(path: Path | None) -> str:
    """``path (step N)`` for messages, or a sentence saying there is none."""
    if path is None:
        return "none (no checkpoint was written yet)"
    try:
        step = read_checkpoint(path).get("global_step")
    except EngramError:
        return f"{path} (unreadable)"
    return f"{path} (step {step})"


# --- writing ----------------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints through :func:`src.atomic.atomic_write`; refuse any whose weights are not finite.

    A write killed half-way leaves the previous checkpoint untouched and a hidden temporary, which
    :class:`RunCheckpoint` deletes when the next run in this directory starts.

    Args:
        checkpoint_dir: the run's checkpoint folder, named in the error as where the last good checkpoint is.
    """

    def __init__(self, checkpoint_dir: str | Path | None = None) -> None:
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        target = Path(path)
        bad = nonfinite_tensors(checkpoint)
        if bad:
            last = latest_checkpoint(self.checkpoint_dir or target.parent)
            raise NonFiniteError(
                f"refused to write checkpoint {target} at step {checkpoint.get('global_step')}: {len(bad)} tensors "
                f"hold NaN/Inf (e.g. {bad[0]}). Last good checkpoint: {describe_checkpoint(last)}. Lower the learning "
                "rate or clip gradients (--trainer.gradient_clip_val 1.0) and resume from it."
            )
        atomic_write(target, lambda tmp: torch.save(checkpoint, tmp))


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for a run directory.

    * It also writes ``last.ckpt`` when training ends between two periodic saves, so ``last.ckpt`` always holds the
      final step (Lightning's saves only on its step/epoch schedule).
    * When fit starts and ends it deletes the temporaries of writes a killed process left in the run directory.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            remove_stale_temporaries(trainer.default_root_dir)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            remove_stale_temporaries(trainer.default_root_dir)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# --- reading ----------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint memory-mapped on the CPU (tensors are read only when touched), or raise one line."""
    path = Path(path)
    if path.is_dir():
        raise EngramError(
            f"checkpoint {str(path)!r} is a folder of shards (FSDP's state_dict_type sharded, or "
            "save_distributed_checkpoint true), which Engram cannot check or resume: it resumes full-state checkpoint "
            "files, which configs/strategies/fsdp.yaml and fsdp2.yaml write. Give such a file, or start fresh."
        )
    if not path.is_file():
        raise EngramError(f"checkpoint {str(path)!r} does not exist. Check --ckpt_path (or use --ckpt_path last).")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # a cut-off zip, a zip of something else, a pickle: all mean "not loadable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EngramError(
            f"checkpoint {str(path)!r} is corrupt or truncated, or not a torch checkpoint ({reason}). Resume from "
            "an earlier checkpoint, or start fresh without --ckpt_path."
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise EngramError(
            f"checkpoint {str(path)!r} is a torch file but not a Lightning checkpoint (no state_dict). Give a "
            "checkpoint written by Engram (runs/<name>/v<N>/checkpoints/*.ckpt)."
        )
    return checkpoint


# --- does it fit the configured model? -----------------------------------------------------------------------------
def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _settings_that_differ(theirs: Mapping[str, Any], ours: Mapping[str, Any], keys: Any = None) -> list[str]:
    names = sorted(set(theirs) | set(ours)) if keys is None else list(keys)
    return [
        f"{name}: checkpoint {_short(theirs.get(name))}, config {_short(ours.get(name))}"
        for name in names
        if _normalise(theirs.get(name)) != _normalise(ours.get(name))
    ]


def _normalise(value: Any) -> Any:
    """YAML gives lists where Python defaults are tuples; compare them as equal."""
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def check_fits(path: str | Path, checkpoint: Mapping[str, Any], model: pl.LightningModule, resuming: bool) -> None:
    """Refuse, in one line naming both sides, a checkpoint that the configured ``model`` cannot take.

    ``resuming`` (``fit --ckpt_path``): the settings in ``model.RESTORED_FROM_CHECKPOINT`` must also be equal,
    since the checkpoint's values would silently win over the config's.
    """
    ours_class = qualified_name(type(model))
    ours_name = f"{type(model).__name__} (family {getattr(model, 'family', 'unknown')})"
    identity = checkpoint.get(IDENTITY_KEY) or {}
    theirs_settings = dict(checkpoint.get("hyper_parameters") or {})
    ours_settings = dict(model.hparams)
    if identity and identity.get("model_class") != ours_class:
        theirs_name = f"{str(identity.get('model_class')).rsplit('.', 1)[-1]} (family {identity.get('family')})"
        raise EngramError(
            f"checkpoint {str(path)!r} holds a {theirs_name} but the config builds a {ours_name}. Use the config "
            "the checkpoint was trained with (its run's config.yaml), or drop --ckpt_path."
        )
    theirs_shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
    ours_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differ = sorted(k for k in theirs_shapes.keys() & ours_shapes.keys() if theirs_shapes[k] != ours_shapes[k])
    missing = sorted(ours_shapes.keys() - theirs_shapes.keys())
    unexpected = sorted(theirs_shapes.keys() - ours_shapes.keys())
    if differ or missing or unexpected:
        if differ:
            example = f"{differ[0]} is {theirs_shapes[differ[0]]} there and {ours_shapes[differ[0]]} here"
        elif missing:
            example = f"{missing[0]} is missing from it"
        else:
            example = f"it has {unexpected[0]}, which the configured model lacks"
        settings = _settings_that_differ(theirs_settings, ours_settings)
        because = f"; settings that differ: {'; '.join(settings)}" if settings else ""
        raise EngramError(
            f"checkpoint {str(path)!r} does not fit the configured {ours_name}: {len(differ)} tensors differ in "
            f"shape, {len(missing)} are missing, {len(unexpected)} unexpected (e.g. {example}){because}. Build the "
            "model the checkpoint was trained with (its run's config.yaml), or drop --ckpt_path."
        )
    if resuming:
        restored = getattr(model, "RESTORED_FROM_CHECKPOINT", ())
        superseded = _settings_that_differ(
            theirs_settings, ours_settings, [k for k in restored if k in theirs_settings]
        )
        if superseded:
            raise EngramError(
                f"resuming from {str(path)!r} restores the optimizer's state, so these model settings would "
                f"not take effect: {'; '.join(superseded)}. Drop the override to resume, or start a new run "
                "without --ckpt_path."
            )
