"""Engram's command line: ``python -m src.cli {fit,validate,test,predict} --config configs/<name>.yaml``.

LightningCLI in subclass mode: the model family and the data module are chosen in YAML by ``class_path``.
On top of Lightning this CLI

* gives every run its own directory (``src/runs.py``): config, checkpoints (atomic, ``last.ckpt``), metrics CSV and
  the telemetry stream; ``--ckpt_path last`` resumes the newest run of the same ``--run.name``;
* resolves ``accelerator``/``precision`` from the hardware and refuses impossible combinations up front
  (``src/hardware.py``), printing its choice in one line;
* links the tokenizer's vocabulary size from the data module into the model;
* checks a ``--ckpt_path`` checkpoint against the configured model before anything runs (``src/checkpoints.py``)
  instead of letting its hyper-parameters replace the config, so ``config.yaml`` records what really runs;
* guards every step against NaN/Inf (``callbacks/finite_guard.py``, ``--guard.*``);
* logs ``perf/tokens_per_s`` and ``perf/mfu`` (``callbacks/throughput.py``, ``--throughput.*``), shows progress in
  steps toward ``max_steps`` and validates once more at the last step (``callbacks/console.py``,
  ``callbacks/final_validation.py``); TF32 matmuls on CUDA;
* turns user mistakes (:class:`~src.errors.EngramError`, bad config keys, impossible trainer values) into one short
  line on stderr and exit code 2 (3 for a diverged run); library progress and info go to stdout;
* removes a run directory it created when the run fails before its first optimizer step.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from callbacks.console import StepBar, SummaryTable
from callbacks.epoch_csv import EpochCSVCallback
from callbacks.final_validation import FinalValidation
from callbacks.finite_guard import FiniteGuard
from callbacks.rng_state import RNGStateCallback
from callbacks.throughput import ThroughputCallback
from data_modules.base import EngramDataModule
from src.checkpoints import AtomicCheckpointIO, RunCheckpoint, check_fits, latest_checkpoint, read_checkpoint
from src.errors import EngramError
from src.hardware import resolve_hardware
from src.lightning_modules.base import EngramModule
from src.runs import (
    CHECKPOINT_SUBDIR,
    LAST_CHECKPOINT,
    RUN_DIR_ENV,
    RunCSVLogger,
    default_run_name,
    resolve_run_dir,
    writable_folder,
)
from src.telemetry import TelemetryLogger

_LOGGERS_WITH_SAVE_DIR = ("WandbLogger", "TensorBoardLogger")
RUN_DIR_PLACEHOLDER = "{run_dir}"  # a logger's save_dir written like this in YAML means "this run's directory"

# jsonargparse changes into a config file's folder while parsing it; class paths in the YAML (callbacks.*,
# data_modules.*) must still import, so the project root goes on sys.path as an absolute path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _quiet_console() -> None:
    """stderr is for errors and warnings: Lightning's info lines ("GPU available: ...", "Seed set to 0") go to stdout;
    bitsandbytes' import-time note that its optional CPU 4-bit kernel cannot be fetched (Engram quantizes on CUDA
    only; peft imports bitsandbytes whenever it is installed) and library-internal deprecation notes are dropped."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                handler.setStream(sys.stdout)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Deprecation notes from inside libraries (torchdata calls torch.set_vital; Lightning's pytree helper), not ours.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # datasets draws progress bars and logs "Failed to load ..." on stderr while it prepares local files; the data
    # modules name a failing file and line themselves. HF_DATASETS_DISABLE_PROGRESS_BARS=0 brings the bars back.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    # Lightning's hint on every multi-core machine; the data modules' num_workers option is where to act on it.
    warnings.filterwarnings("ignore", message=r"The '\w+_dataloader' does not have many workers")
    # Resuming writes into the run's own checkpoint folder on purpose.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


_quiet_console()

# (key, accepted?, what is allowed) for values Lightning itself would only reject later, with a traceback.
_VALUE_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("trainer.max_steps", lambda v: v is None or v >= -1, "a number of steps >= 0, or -1 for no limit"),
    ("trainer.max_epochs", lambda v: v is None or v >= -1, "a number of epochs >= 0, or -1 for no limit"),
    ("trainer.min_steps", lambda v: v is None or v >= 0, ">= 0 or null"),
    ("trainer.accumulate_grad_batches", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.gradient_clip_val", lambda v: v is None or v >= 0, ">= 0, or null for no clipping"),
    ("trainer.log_every_n_steps", lambda v: v is None or v >= 1, "an integer >= 1"),
    ("trainer.val_check_interval", lambda v: v is None or v > 0, "> 0 (a fraction of an epoch, or a step count)"),
    ("trainer.check_val_every_n_epoch", lambda v: v is None or v >= 1, ">= 1, or null"),
    ("trainer.num_sanity_val_steps", lambda v: v is None or v >= -1, ">= 0, or -1 for all"),
    *[
        (f"trainer.limit_{split}_batches", lambda v: v is None or v >= 0, ">= 0 (a fraction, or a batch count)")
        for split in ("train", "val", "test", "predict")
    ],
    ("checkpoint.every_n_train_steps", lambda v: v is None or v >= 0, ">= 0 (0 = no periodic checkpoints)"),
    ("checkpoint.save_top_k", lambda v: v >= -1, ">= 0, or -1 to keep all"),
]


def _check_values(cfg: Namespace) -> None:
    for key, accepted, allowed in _VALUE_RULES:
        value = cfg.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and not accepted(value):
            raise EngramError(f"{key}={value} is out of range: it must be {allowed}. Fix --{key}.")


def _is_rank_zero() -> bool:
    """Global rank zero, before Lightning sets ranks up: torchrun and srun start every process themselves (each
    node's first has LOCAL_RANK 0), Lightning's own launcher starts the others with LOCAL_RANK/NODE_RANK set."""
    if TorchElasticEnvironment.detect():
        return os.environ.get("RANK", "0") == "0"
    if SLURMEnvironment.detect():
        return os.environ.get("SLURM_PROCID", "0") == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _logger_specs(value: Any) -> list[Namespace]:
    if isinstance(value, Namespace):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Namespace)]
    return []


class EngramCLI(LightningCLI):
    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        self.run_dir: Path | None = None
        self._created_run_dir = False
        try:
            self._start(args, run)
        except BaseException:
            self._discard_unused_run_dir()
            raise

    def _start(self, args: ArgsType, run: bool) -> None:
        super().__init__(
            model_class=EngramModule,
            datamodule_class=EngramDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            trainer_defaults={"log_every_n_steps": 10},
            parser_kwargs={"exit_on_error": False},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.root", type=str, default="runs", help="Folder holding all runs.")
        parser.add_argument(
            "--run.name", type=str | None, default=None, help="Run name (default: the first --config file's stem)."
        )
        parser.add_argument(
            "--run.dir", type=str | None, default=None, help="Exact run directory (overrides root/name versioning)."
        )
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        # A resumed run that reaches a step saved before the kill rewrites that file (same state), never adds -v1.
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 100,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(FiniteGuard, "guard")
        parser.add_lightning_class_args(ThroughputCallback, "throughput")
        parser.add_lightning_class_args(EpochCSVCallback, "epoch_csv")
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    # --- checkpoints given on the command line --------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        # Lightning would replace the config's model with the checkpoint's hyper-parameters here, so a checkpoint of
        # another model silently changed what trains. Only check the file; _run_subcommand compares it to the model.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc"):
            read_checkpoint(ckpt_path)

    def _check_checkpoint_fits(self, subcommand: str) -> None:
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("best", "hpc"):
            return
        check_fits(ckpt_path, read_checkpoint(ckpt_path), self.model, resuming=subcommand == "fit")
        if subcommand != "fit" or self.run_dir is None:
            return
        # The RNG states come from the checkpoint on resume: a new seed would not take effect.
        saved = self.run_dir / "config.yaml"
        if saved.is_file():
            before = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("seed_everything")
            now = self.config[subcommand].get("seed_everything")
            if before is not None and now != before:
                raise EngramError(
                    f"resuming {self.run_dir} restores its random states, so seed_everything={now} would not take "
                    f"effect (the run used {before}). Drop the override to resume, or start a new run."
                )

    def _run_subcommand(self, subcommand: str) -> None:
        self._check_checkpoint_fits(subcommand)
        super()._run_subcommand(subcommand)

    def _discard_unused_run_dir(self) -> None:
        """After a failure: delete the run directory this process created if no optimizer step was taken in it."""
        run_dir = self.run_dir
        if run_dir is None or not self._created_run_dir or not _is_rank_zero() or not run_dir.is_dir():
            return
        trainer = getattr(self, "trainer", None)
        if (trainer is not None and trainer.global_step > 0) or latest_checkpoint(run_dir) is not None:
            return
        shutil.rmtree(run_dir, ignore_errors=True)
        if run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()

    # --- run directory, hardware, loggers -------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        trainer = cfg.trainer

        hardware = resolve_hardware(trainer.accelerator, trainer.devices, trainer.strategy, trainer.precision)
        trainer.accelerator, trainer.precision = hardware.accelerator, hardware.precision
        if hardware.accelerator == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the matmuls autocast leaves in fp32
        if _is_rank_zero():
            print(hardware.summary(), flush=True)

        _check_values(cfg)
        ckpt_path = cfg.get("ckpt_path")
        if cfg.run.dir:
            run_dir = Path(cfg.run.dir).expanduser()
            if run_dir.exists() and not run_dir.is_dir():
                raise EngramError(f"run.dir={cfg.run.dir!r} is a file. Give a folder (it is created if missing).")
            writable_folder(run_dir.parent, "run.dir's parent")
            resuming = (run_dir / CHECKPOINT_SUBDIR / LAST_CHECKPOINT).is_file()
        else:
            configs = cfg.get("config") or []
            name = cfg.run.name or default_run_name(str(configs[0]) if configs else None)
            run_dir, resuming = resolve_run_dir(cfg.run.root, name, resume=ckpt_path == "last")
        if ckpt_path == "last":
            if resuming:
                last = run_dir / CHECKPOINT_SUBDIR / LAST_CHECKPOINT
                cfg.ckpt_path = str(last)
                if _is_rank_zero():
                    print(f"[engram] resuming {last}", flush=True)
            else:
                if _is_rank_zero():
                    print(f"[engram] no checkpoint to resume under {run_dir.parent}; starting fresh", flush=True)
                cfg.ckpt_path = None
        elif ckpt_path and ckpt_path not in ("best", "hpc"):
            cfg.ckpt_path = str(Path(ckpt_path).expanduser())
        self._created_run_dir = not run_dir.exists()
        self.run_dir = run_dir
        os.environ[RUN_DIR_ENV] = str(run_dir)
        trainer.default_root_dir = str(run_dir)
        cfg.checkpoint.dirpath = str(run_dir / CHECKPOINT_SUBDIR)

        for spec in _logger_specs(trainer.logger):
            cls_name = str(spec.class_path).rsplit(".", 1)[-1]
            save_dir = spec.init_args.get("save_dir")
            if cls_name in _LOGGERS_WITH_SAVE_DIR and save_dir in (None, "", ".", RUN_DIR_PLACEHOLDER):
                spec.init_args.save_dir = str(run_dir)
            if cls_name == "WandbLogger" and not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
                spec.init_args.offline = True  # no key: write locally, `wandb sync` later

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        assert self.run_dir is not None
        config = self._get(self.config_init, "trainer", default={})
        user_loggers = config.get("logger")
        loggers = (
            []
            if user_loggers in (None, True, False)
            else list(user_loggers)
            if isinstance(user_loggers, list)
            else [user_loggers]
        )
        # The run's own two files: metrics.csv and the telemetry stream, both stepped by trainer.global_step.
        run_loggers = [RunCSVLogger(self.run_dir), TelemetryLogger(self.run_dir)]
        kwargs["logger"] = [*run_loggers, *loggers] if user_loggers is not False else False
        plugins = config.get("plugins") or []
        checkpoint_io = AtomicCheckpointIO(self.run_dir / CHECKPOINT_SUBDIR)
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), checkpoint_io]
        callbacks = [
            *(config.get("callbacks") or []),
            RNGStateCallback(),
            LearningRateMonitor(logging_interval="step"),
            FinalValidation(),
        ]
        if config.get("enable_progress_bar") is not False:
            callbacks.append(StepBar())
        if config.get("enable_model_summary") is not False:
            callbacks.append(SummaryTable())
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        if user_loggers is not False:
            for logger in run_loggers:
                logger.bind(trainer)
        return trainer


def _short_parse_error(text: str) -> str:
    """jsonargparse explains a bad key over a dozen lines; keep the lines that name the key and the problem."""
    noise = ("Subtypes:", "Errors:", "Given value", "Does not validate", "- Expected a <class 'NoneType'>")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    kept = [lines[0], *(line.lstrip("- ") for line in lines[1:] if not line.startswith(noise))]
    return " ".join(kept) + ". Check the key and value; `--model.help CLASS` / `--data.help CLASS` list the options."


def _user_error(err: BaseException) -> EngramError | None:
    """The fixable problem behind ``err``: jsonargparse wraps errors raised while instantiating a class (a model's
    ``__init__``, a callback's) in ValueErrors; Lightning rejects impossible settings with a MisconfigurationException."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, EngramError):
            return cause
        if isinstance(cause, MisconfigurationException):
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            return EngramError(f"{first} Fix the config or the override that sets it.")
        cause = cause.__cause__ or cause.__context__
    return None


def main(args: ArgsType = None, run: bool = True) -> EngramCLI | None:
    """Entry point; ``args`` lets tests run the CLI in-process (``main(["fit", "--config", ...])``)."""
    try:
        return EngramCLI(args=args, run=run)
    except ArgumentError as err:
        print(f"error: {_short_parse_error(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, EngramError, MisconfigurationException) as err:
        problem = _user_error(err)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(problem.exit_code) from None


if __name__ == "__main__":
    main()
