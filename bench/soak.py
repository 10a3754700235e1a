"""Soak test: a long CPU run through the real CLI with every telemetry callback on. Does the process's memory stay
flat, and does the telemetry stream grow linearly with the steps?

    python bench/soak.py                                    # 10,000 steps of configs/gemma_tiny.yaml, temporary root
    python bench/soak.py --steps 2000 --run-root runs/soak  # shorter, and keep the run directory

The run is ``python -m src.cli fit --config configs/gemma_tiny.yaml`` in this process, with the Chrono-MemBench
callbacks at soak cadences (Cap-Gauge every 100 steps, Weight-Δ every 50, Mem-Absorption on every Cap-Gauge
measurement, a token checkpoint every 250 steps' worth of tokens and two token-count freezes), telemetry every 10
steps, periodic checkpoints every 500 steps and validation (2 batches) every 500 steps. ``SoakProbe`` records the
resident set size (``/proc/self/statm``; psutil or the peak from ``resource`` elsewhere) and the size of
``telemetry.jsonl`` every ``--sample-every`` steps, written to ``<run_dir>/soak.csv`` at the end (to plot; kept with
``--run-root``).

After the warm-up (the first ``--warmup`` of the steps: allocator pools, first checkpoint, first validation) it
prints the RSS at the end of warm-up and at the end, the growth, the least-squares slope in MB per 1,000 steps, the
telemetry bytes per step in the first and second half of the rest with their ratio (linear growth: about 1) and the
R² of a linear fit of size against step. Exit code 1 if the RSS grows by more than ``--max-growth`` (5 %) after
warm-up or the ratio falls outside [0.9, 1.1]. The load average is printed at start and end: the machine is shared.
Runs of a few hundred steps fail the ratio by design: their halves hold unequal shares of the validations (every
500 steps) and Cap-Gauge measurements (every 100).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/soak.py` puts only bench/ on the path

from src.cli import main as cli_main
from src.telemetry import TELEMETRY_FILENAME

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gemma_tiny.yaml"
RATIO_BOUNDS = (0.9, 1.1)


def rss_bytes() -> int:
    """The resident set size of this process now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        import resource

        # Only the peak is available here, so a leak shows but a shrink does not; KiB on Linux, bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class SoakProbe(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, records ``(step, RSS bytes, telemetry.jsonl bytes)``."""

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = every_n_steps
        self.samples: list[tuple[int, int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        step = trainer.global_step
        if step % self.every_n_steps or (self.samples and self.samples[-1][0] == step):
            return  # not a sampling step, or a repeat of one under gradient accumulation
        telemetry = Path(trainer.default_root_dir) / TELEMETRY_FILENAME
        self.samples.append((step, rss_bytes(), telemetry.stat().st_size if telemetry.exists() else 0))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps excluded (default: 0.1)")
    parser.add_argument("--sample-every", type=int, default=100, help="steps between samples (default: 100)")
    parser.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth after warm-up, in %%")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1; the machine is shared)")
    parser.add_argument("--run-root", default=None, help="keep the run here (default: a temporary folder)")
    return parser.parse_args()


def cli_args(args: argparse.Namespace, run_root: str) -> list[str]:
    tokens_per_step = 4 * 64  # gemma_tiny's batch_size x seq_len
    chrono = [
        {
            "class_path": "callbacks.cap_gauge.CapGauge",
            "init_args": {
                "every_n_steps": 100,
                "canary_count": 32,
                "canary_length": 32,
                "canary_rate": 0.05,
                "verbose": False,
            },
        },
        {"class_path": "callbacks.weight_delta.WeightDelta", "init_args": {"every_n_steps": 50}},
        {"class_path": "callbacks.mem_absorption.MemAbsorption", "init_args": {"window": 10, "min_history": 3}},
        {
            "class_path": "callbacks.token_checkpoints.TokenCheckpoints",
            "init_args": {
                "every_n_tokens": 250 * tokens_per_step,
                "keep_last": 2,
                "freeze_at_tokens": [args.steps // 4 * tokens_per_step, args.steps * 3 // 4 * tokens_per_step],
            },
        },
    ]
    # The probe's own module path: "__main__" when run as a script, so the CLI builds this very class and the
    # samples can be read off it after fit (importing bench.soak again would make a second, separate class).
    probe = {"class_path": f"{SoakProbe.__module__}.SoakProbe", "init_args": {"every_n_steps": args.sample_every}}
    return [
        "fit",
        "--config", str(CONFIG),
        "--run.root", run_root,
        "--run.name", "soak",
        "--trainer.max_steps", str(args.steps),
        "--trainer.val_check_interval", "500",
        "--trainer.check_val_every_n_epoch", "null",  # every 500 steps across epoch boundaries
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "10",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.callbacks", json.dumps(chrono),  # replaces the config's list (its cadences are test-size)
        f"--trainer.callbacks+={json.dumps(probe)}",
        "--checkpoint.every_n_train_steps", "500",
    ]  # fmt: skip


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} cores)"


def report(samples: list[tuple[int, int, int]], args: argparse.Namespace) -> list[str]:
    """Print the measurements; returns the failed criteria (empty: pass)."""
    warm_step = round(args.steps * args.warmup)
    kept = [s for s in samples if s[0] >= warm_step]
    if len(kept) < 5:
        raise SystemExit(f"only {len(kept)} samples after warm-up; lower --sample-every or raise --steps")
    steps = [float(s[0]) for s in kept]
    (first_step, rss0, size0), (last_step, rss1, size1) = kept[0], kept[-1]
    growth = 100 * (rss1 - rss0) / rss0
    rss_slope = statistics.linear_regression(steps, [s[1] / 1e6 for s in kept]).slope
    print(
        f"RSS: {rss0 / 1e6:.1f} MB at step {first_step} (end of warm-up), {rss1 / 1e6:.1f} MB at step {last_step}: "
        f"{growth:+.2f} % (limit +{args.max_growth:g} %); slope {rss_slope * 1000:+.3f} MB per 1,000 steps"
    )
    mid_step, _, size_mid = kept[len(kept) // 2]
    first = (size_mid - size0) / (mid_step - first_step)
    second = (size1 - size_mid) / (last_step - mid_step)
    ratio = second / first
    r2 = statistics.correlation(steps, [float(s[2]) for s in kept]) ** 2
    print(
        f"telemetry.jsonl: {size1:,} bytes at step {last_step}; {first:.1f} B/step in steps {first_step}-{mid_step}, "
        f"{second:.1f} B/step in {mid_step}-{last_step}: ratio {ratio:.4f} (bounds {RATIO_BOUNDS}); "
        f"linear fit R² = {r2:.6f}"
    )
    failed = []
    if growth > args.max_growth:
        failed.append(f"RSS grew {growth:.2f} % after warm-up (limit {args.max_growth:g} %)")
    if not RATIO_BOUNDS[0] <= ratio <= RATIO_BOUNDS[1]:
        failed.append(f"telemetry bytes per step changed by a factor {ratio:.3f} between the halves")
    return failed


def main() -> int:
    args = parse_args()
    # As tests/conftest.py: no network, and few threads on a shared machine.
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    # LightningCLI warns when given args while sys.argv holds other flags: here those are this script's own.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    print(f"load average at start: {load()}", flush=True)
    keep = args.run_root is not None
    with contextlib.nullcontext(args.run_root) if keep else tempfile.TemporaryDirectory(prefix="soak-") as run_root:
        start = time.perf_counter()
        cli = cli_main(cli_args(args, run_root))
        wall = time.perf_counter() - start
        assert cli is not None
        probe = next(c for c in cli.trainer.callbacks if isinstance(c, SoakProbe))  # type: ignore[attr-defined]
        assert cli.run_dir is not None
        rows = ["step,rss_bytes,telemetry_bytes", *(",".join(map(str, s)) for s in probe.samples)]
        (cli.run_dir / "soak.csv").write_text("\n".join(rows) + "\n", encoding="ascii")
        print(
            f"steps={args.steps} threads={args.threads} sampled every {args.sample_every} steps, warm-up "
            f"{args.warmup:.0%}; wall {wall:.0f} s ({wall / args.steps * 1e3:.1f} ms/step incl. callbacks); "
            f"run {cli.run_dir}{'' if keep else ' (temporary, removed)'}"
        )
        failed = report(probe.samples, args)
    print(f"load average at end: {load()}")
    print("PASS" if not failed else "FAIL: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
