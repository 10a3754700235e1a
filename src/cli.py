"""Engram's command line: ``python -m src.cli {fit,validate,test,predict} --config configs/<name>.yaml``.

LightningCLI in subclass mode: the model family and the data module are chosen in YAML by ``class_path``.
On top of Lightning this CLI

* gives every run its own directory (``src/runs.py``): config, checkpoints (atomic, ``last.ckpt``), metrics CSV and
  the telemetry stream; ``--ckpt_path last`` resumes the newest run of the same ``--run.name``;
* resolves ``accelerator``/``precision`` from the hardware and refuses impossible combinations up front
  (``src/hardware.py``), printing its choice in one line;
* links the tokenizer's vocabulary size from the data module into the model;
* turns user mistakes (:class:`~src.errors.EngramError`, bad config keys) into one short line and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from callbacks.epoch_csv import EpochCSVCallback
from callbacks.rng_state import RNGStateCallback
from callbacks.telemetry import TelemetryCallback
from data_modules.base import EngramDataModule
from src.errors import EngramError
from src.hardware import resolve_hardware
from src.lightning_modules.base import EngramModule
from src.runs import (
    CHECKPOINT_SUBDIR,
    LAST_CHECKPOINT,
    RUN_DIR_ENV,
    AtomicCheckpointIO,
    RunCheckpoint,
    RunCSVLogger,
    check_checkpoint_file,
    resolve_run_dir,
)

_LOGGERS_WITH_SAVE_DIR = ("WandbLogger", "TensorBoardLogger")
RUN_DIR_PLACEHOLDER = "{run_dir}"  # a logger's save_dir written like this in YAML means "this run's directory"

# jsonargparse changes into a config file's folder while parsing it; class paths in the YAML (callbacks.*,
# data_modules.*) must still import, so the project root goes on sys.path as an absolute path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _is_rank_zero() -> bool:
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
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 100})
        parser.add_lightning_class_args(TelemetryCallback, "telemetry")
        parser.add_lightning_class_args(EpochCSVCallback, "epoch_csv")
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    # --- checkpoints given on the command line --------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        # Lightning reads hyper-parameters from an explicit checkpoint file here; check it is readable first
        # so a truncated file gives one clear line instead of a pickle traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc"):
            check_checkpoint_file(ckpt_path)
        super()._parse_ckpt_path()

    # --- run directory, hardware, loggers -------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        trainer = cfg.trainer

        hardware = resolve_hardware(trainer.accelerator, trainer.devices, trainer.strategy, trainer.precision)
        trainer.accelerator, trainer.precision = hardware.accelerator, hardware.precision
        if _is_rank_zero():
            print(hardware.summary(), flush=True)

        ckpt_path = cfg.get("ckpt_path")
        if cfg.run.dir:
            run_dir = Path(cfg.run.dir)
            resuming = (run_dir / CHECKPOINT_SUBDIR / LAST_CHECKPOINT).is_file()
        else:
            configs = cfg.get("config") or []
            name = cfg.run.name or (Path(str(configs[0])).stem if configs else "engram")
            run_dir, resuming = resolve_run_dir(cfg.run.root, name, resume=ckpt_path == "last")
        if ckpt_path == "last":
            if resuming:
                last = run_dir / CHECKPOINT_SUBDIR / LAST_CHECKPOINT
                check_checkpoint_file(last)
                cfg.ckpt_path = str(last)
                if _is_rank_zero():
                    print(f"[engram] resuming {last}", flush=True)
            else:
                if _is_rank_zero():
                    print(f"[engram] no checkpoint to resume under {run_dir.parent}; starting fresh", flush=True)
                cfg.ckpt_path = None
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
        kwargs["logger"] = [RunCSVLogger(self.run_dir), *loggers] if user_loggers is not False else False
        plugins = config.get("plugins") or []
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO()]
        callbacks = config.get("callbacks") or []
        kwargs["callbacks"] = [*callbacks, RNGStateCallback(), LearningRateMonitor(logging_interval="step")]
        return super().instantiate_trainer(**kwargs)


def _short_parse_error(text: str) -> str:
    """jsonargparse explains a bad key over a dozen lines; keep the lines that name the key and the problem."""
    noise = ("Subtypes:", "Errors:", "Given value", "Does not validate", "- Expected a <class 'NoneType'>")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    kept = [lines[0], *(line.lstrip("- ") for line in lines[1:] if not line.startswith(noise))]
    return " ".join(kept) + ". Check the key and value; `--model.help CLASS` / `--data.help CLASS` list the options."


def main(args: ArgsType = None, run: bool = True) -> EngramCLI | None:
    """Entry point; ``args`` lets tests run the CLI in-process (``main(["fit", "--config", ...])``)."""
    try:
        try:
            return EngramCLI(args=args, run=run)
        except ValueError as err:
            # jsonargparse wraps errors raised while instantiating a class (e.g. a model's __init__).
            cause = err.__cause__ or err.__context__
            while cause is not None and not isinstance(cause, EngramError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None
    except (EngramError, ArgumentError) as err:
        message = _short_parse_error(str(err)) if isinstance(err, ArgumentError) else str(err)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
