"""Training step time with the Chrono-MemBench hooks (Cap-Gauge, Weight-Δ, Mem-Absorption) off and on.

    python bench/telemetry_overhead.py                       # cuda: gpt2-124m, 8 x 512 tokens, bf16, default intervals
    python bench/telemetry_overhead.py --device cpu          # llama-tiny, 4 x 64 tokens, same intervals, 1 repeat

Each mode is a real Lightning ``fit`` on the shipped Shakespeare (byte tokens) with the platform's telemetry stream
on in both; the time is the mean over all steps after ``--warmup`` (so the periodic measurements are included, not
hidden by a median). Modes alternate ``--repeats`` times; the median of each mode's means is reported, with the
ratio on/off (goal: <= 1.05 at the callbacks' default intervals, Cap-Gauge every 500 and Weight-Δ every 100 steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.cap_gauge import CapGauge
from callbacks.mem_absorption import MemAbsorption
from callbacks.weight_delta import WeightDelta
from data_modules.embedded import EmbeddedDataModule
from src.lightning_modules import CausalLM
from src.telemetry import TelemetryLogger


class StepTimer(pl.Callback):
    """Wall time from the end of step ``warmup`` to the end of the last step (device synchronised)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.warmup:
            self.start = self._now(pl_module)
        elif trainer.global_step == trainer.max_steps:
            self.end = self._now(pl_module)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--preset", default=None, help="CausalLM preset (default: gpt2-124m on cuda, llama-tiny on cpu)"
    )
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on cuda, 4 on cpu")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 512 on cuda, 64 on cpu")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 1550 cuda, 1050 cpu)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--cap-every", type=int, default=500, help="Cap-Gauge interval (its default: 500)")
    parser.add_argument("--delta-every", type=int, default=100, help="Weight-Δ interval (its default: 100)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 2 on cuda, 1 on cpu")
    return parser.parse_args()


def mean_step_time(args: argparse.Namespace, hooks: bool) -> tuple[float, int]:
    """Seconds per step after warm-up, and how many Cap-Gauge measurements fell in the timed part."""
    torch.manual_seed(0)
    data = EmbeddedDataModule(seq_len=args.seq_len, batch_size=args.batch)
    model = CausalLM(data.vocab_size, preset=args.preset, lr=3e-4, warmup_steps=10)
    timer = StepTimer(args.warmup)
    gauge = CapGauge(every_n_steps=args.cap_every, canary_length=min(64, args.seq_len), verbose=False)
    chrono = [gauge, WeightDelta(every_n_steps=args.delta_every), MemAbsorption(verbose=False)] if hooks else []
    with tempfile.TemporaryDirectory() as run_dir:
        telemetry = TelemetryLogger(run_dir)
        trainer = pl.Trainer(
            default_root_dir=run_dir,
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed" if args.device == "cuda" else "32-true",
            max_steps=args.steps,
            limit_val_batches=0,
            logger=[telemetry],
            log_every_n_steps=10,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer, *chrono],
        )
        telemetry.bind(trainer)
        trainer.fit(model, datamodule=data)
    measured = sum(m.step > args.warmup for m in gauge.history) if hooks else 0
    return (timer.end - timer.start) / (args.steps - args.warmup), measured


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda"
    args.preset = args.preset or ("gpt2-124m" if cuda else "llama-tiny")
    args.batch = args.batch or (8 if cuda else 4)
    args.seq_len = args.seq_len or (512 if cuda else 64)
    args.steps = args.steps or (1550 if cuda else 1050)
    args.repeats = args.repeats or (2 if cuda else 1)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    times: dict[bool, list[float]] = {False: [], True: []}
    measured = 0
    for _ in range(args.repeats):
        for hooks in (False, True):
            seconds, count = mean_step_time(args, hooks)
            times[hooks].append(seconds)
            measured = max(measured, count)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"device={args.device} preset={args.preset} batch={args.batch}x{args.seq_len} steps={args.steps} "
        f"(timed {args.steps - args.warmup}) cap_every={args.cap_every} delta_every={args.delta_every} "
        f"cap_measurements_timed={measured} repeats={args.repeats}"
    )
    print(
        f"hooks off: {off * 1e3:.2f} ms/step  hooks on: {on * 1e3:.2f} ms/step  "
        f"ratio on/off = {on / off:.3f} (goal <= 1.05)"
    )


if __name__ == "__main__":
    main()
