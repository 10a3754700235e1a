"""Training throughput, MFU and peak memory of causal LMs through the CausalLM module and Lightning Trainer the CLI uses.

    python bench/lm_mfu.py                      # one GPU: gpt2-124m and gemma2-2b (configs/gemma.yaml as shipped)
    python bench/lm_mfu.py --cases gpt2-tiny-eager gpt2-tiny-compiled --steps 3 --warmup 2   # any machine

Each case runs in its own process (a case that runs out of memory cannot disturb the next) and trains ``--warmup``
optimizer steps, which include compilation, then ``--steps`` timed ones on random tokens, with the optimizer, schedule,
gradient clipping and bf16-mixed precision of a CLI run. Tokens/s and MFU are taken between CUDA synchronizations
around the timed steps; FLOPs per token come from the module (``src/flops.py``: 6·N plus causal attention, no credit
for recomputation) and the peak is the dense bf16 tensor-core figure (989.4 TFLOP/s for an H100/H200). Peak memory is
``torch.cuda.max_memory_allocated``. The ``eager`` cases are the baseline measured in the same run: no compilation,
and for Gemma-2 the eager attention it used before flex_attention.

Measured on one H200 (torch 2.11, transformers 5.17), one run of the defaults:

    gpt2-124m-b64-nanogpt-eager     64 x 1024 x1    208,925 tok/s  MFU 16.9%   68.0 GiB
    gpt2-124m-b64-nanogpt-model     64 x 1024 x1    428,179 tok/s  MFU 34.6%   29.9 GiB
    gemma2-2b-eager                  8 x 2048 x4     12,358 tok/s  MFU 20.4%  101.7 GiB
    gemma2-2b (configs/gemma.yaml)   8 x 2048 x4     22,199 tok/s  MFU 36.7%   66.3 GiB

Other runs: gpt2-124m-b64-nanogpt-compiled (layers only) 351,268 tok/s (28.4%); gemma2-2b-b4 20,654 (34.1%,
59.0 GiB); gemma2-2b-b4-model 20,928 (34.6%); gemma2-2b-b4-no-checkpointing 19,597 (32.4%, 86.0 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.throughput import compute_dtype  # noqa: E402
from src.flops import dense_peak_flops  # noqa: E402
from src.lightning_modules import CausalLM  # noqa: E402


def gemma_config() -> dict[str, Any]:
    """The model options, batch and optimizer settings of configs/gemma.yaml."""
    config = yaml.safe_load((ROOT / "configs" / "gemma.yaml").read_text())
    model = {k: v for k, v in config["model"]["init_args"].items() if k not in ("lr", "warmup_steps", "weight_decay")}
    trainer = config["trainer"]
    return {
        "model": model,
        "batch": config["data"]["init_args"]["batch_size"],
        "seq": config["data"]["init_args"]["seq_len"],
        "accumulate": trainer.get("accumulate_grad_batches", 1),
        "clip": trainer.get("gradient_clip_val"),
    }


def cases() -> dict[str, dict[str, Any]]:
    gemma = gemma_config()
    gemma_b4 = {**gemma, "batch": 4, "accumulate": 8}
    gpt2 = {"model": {"preset": "gpt2-124m"}, "batch": 16, "seq": 1024, "accumulate": 1, "clip": 1.0}
    gpt2_big = {**gpt2, "batch": 64, "model": {"preset": "gpt2-124m", "loss_chunk_size": 16384}}
    # nanoGPT's training settings: no dropout, the vocabulary padded to a multiple of 64 (50304) for the head's matmul.
    nanogpt = {
        **gpt2_big,
        "model": {
            "preset": "gpt2-124m",
            "loss_chunk_size": 16384,
            "config_overrides": {"vocab_size": 50304, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
        },
    }
    whole = {**nanogpt, "model": {**nanogpt["model"], "compile": True, "compile_scope": "model"}}
    whole_full_logits = {**whole, "model": {**whole["model"], "loss_chunk_size": None}}
    tiny = {"model": {"preset": "gpt2-tiny"}, "batch": 2, "seq": 64, "accumulate": 1, "clip": 1.0}
    return {
        "gpt2-124m-eager": gpt2,
        "gpt2-124m-compiled": {**gpt2, "model": {**gpt2["model"], "compile": True}},
        "gpt2-124m-b64-eager": gpt2_big,
        "gpt2-124m-b64-compiled": {**gpt2_big, "model": {**gpt2_big["model"], "compile": True}},
        "gpt2-124m-b64-nanogpt-eager": nanogpt,
        "gpt2-124m-b64-nanogpt-compiled": {**nanogpt, "model": {**nanogpt["model"], "compile": True}},
        "gpt2-124m-b64-nanogpt-model": whole,
        "gpt2-124m-b64-nanogpt-model-full-logits": whole_full_logits,
        "gpt2-124m-b32-nanogpt-model-full-logits": {**whole_full_logits, "batch": 32},
        # configs/gemma.yaml as shipped (compiled), and its eager baseline: no compile, eager attention as before.
        "gemma2-2b": gemma,
        "gemma2-2b-eager": {**gemma, "model": {**gemma["model"], "compile": False, "attn_implementation": "eager"}},
        # The same tokens per optimizer step in micro-batches of 4, and two variants at that size.
        "gemma2-2b-b4": gemma_b4,
        "gemma2-2b-b4-no-checkpointing": {**gemma_b4, "model": {**gemma["model"], "gradient_checkpointing": False}},
        "gemma2-2b-b4-model": {**gemma_b4, "model": {**gemma["model"], "compile_scope": "model"}},
        "gpt2-tiny-eager": tiny,
        "gpt2-tiny-compiled": {**tiny, "model": {**tiny["model"], "compile": True}},
        "gpt2-tiny-model": {**tiny, "model": {**tiny["model"], "compile": True, "compile_scope": "model"}},
    }


DEFAULT_CASES = [
    "gpt2-124m-b64-nanogpt-eager",
    "gpt2-124m-b64-nanogpt-model",
    "gemma2-2b-eager",
    "gemma2-2b",
]


class RandomTokens(torch.utils.data.IterableDataset):
    def __init__(self, batch_vocab: int, seq: int) -> None:
        self.vocab, self.seq = batch_vocab, seq

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(0, self.vocab, (self.seq,), generator=generator)
            yield {"input_ids": ids, "labels": ids}


class StepTimer(pl.Callback):
    """Wall time and tokens of the optimizer steps after ``warmup``; with ``profile``, the timed steps' heaviest GPU
    kernels (``torch.profiler``) as a table."""

    def __init__(self, warmup: int, profile: bool = False) -> None:
        self.warmup = warmup
        # GPU kernels on CUDA, operators on a CPU.
        self.activity = "cuda" if torch.cuda.is_available() else "cpu"
        activities = [getattr(torch.profiler.ProfilerActivity, self.activity.upper())]
        self.profiler = torch.profiler.profile(activities=activities) if profile else None
        self.profile_table = ""
        self.start: float | None = None
        self.tokens_at_start = 0
        self.seconds = 0.0
        self.tokens = 0

    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.warmup and self.start is None:
            self.start = self._now(pl_module)
            self.tokens_at_start = pl_module.tokens_seen
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if self.profiler is not None:
                self.profiler.start()

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        assert self.start is not None, "no timed steps ran"
        self.seconds = self._now(pl_module) - self.start
        if self.profiler is not None:
            self.profiler.stop()
            self.profile_table = self.profiler.key_averages().table(sort_by=f"{self.activity}_time_total", row_limit=25)
        self.tokens = pl_module.tokens_seen - self.tokens_at_start


def run_case(name: str, warmup: int, steps: int, profile: bool = False) -> dict[str, Any]:
    case = cases()[name]
    vocab = 50257 if case["model"]["preset"].startswith("gpt2-124m") else 256
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        module = CausalLM(vocab, lr=1e-4, warmup_steps=10, **case["model"])
    timer = StepTimer(warmup, profile)
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        precision="bf16-mixed" if device == "cuda" else "32-true",
        max_steps=warmup + steps,
        accumulate_grad_batches=case["accumulate"],
        gradient_clip_val=case["clip"],
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    data = torch.utils.data.DataLoader(RandomTokens(vocab, case["seq"]), batch_size=case["batch"], pin_memory=True)
    result: dict[str, Any] = {
        "case": name,
        "batch": f"{case['batch']} x {case['seq']}",
        "accumulate": case["accumulate"],
    }
    try:
        trainer.fit(module, train_dataloaders=data)
    except torch.OutOfMemoryError:
        return {**result, "error": "out of memory"}
    flops = module.training_flops_per_token(case["seq"]) * timer.tokens
    peak = dense_peak_flops(torch.device(device), compute_dtype(str(trainer.precision)))  # fit ends on the CPU
    result.update(
        tokens_per_s=timer.tokens / timer.seconds,
        mfu=flops / timer.seconds / peak if peak else None,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        loss=float(trainer.callback_metrics["train/loss"]),
        fused_adamw=bool(trainer.optimizers[0].defaults.get("fused")),
    )
    if timer.profile_table:
        result["profile"] = timer.profile_table
    return result


def describe(result: dict[str, Any]) -> str:
    head = f"{result['case']:<38} {result['batch']:>11} x{result['accumulate']}"
    if "error" in result:
        return f"{head}  {result['error']}"
    mfu = f"{result['mfu']:6.1%}" if result["mfu"] is not None else "   n/a"
    memory = f"{result['peak_gib']:6.1f} GiB" if result["peak_gib"] is not None else ""
    return f"{head}  {result['tokens_per_s']:>10,.0f} tok/s  MFU {mfu}  {memory}  loss {result['loss']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, choices=list(cases()))
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing (compilation included)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--profile", action="store_true", help="print each case's heaviest GPU kernels (timed steps)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one case in this process, print its JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_case(args.one, args.warmup, args.steps, args.profile)), flush=True)
        return
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.warmup} warm-up + {args.steps} timed optimizer steps per case")
    for case in args.cases:
        command = [sys.executable, __file__, "--one", case, "--warmup", str(args.warmup), "--steps", str(args.steps)]
        command += ["--profile"] if args.profile else []
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            print(f"{case:<38} failed (exit {done.returncode}): {' | '.join(tail)}", flush=True)
            continue
        result = json.loads(lines[-1].removeprefix("RESULT "))
        print(describe(result), flush=True)
        if "profile" in result:
            print(result["profile"], flush=True)


if __name__ == "__main__":
    main()
