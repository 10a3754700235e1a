"""Training throughput and model FLOPs utilisation, logged as ``perf/tokens_per_s`` and ``perf/mfu`` on every run
(and ``perf/peak_memory_gib``, PyTorch's peak allocation, on CUDA, printed again when training ends).

Lightning's :class:`~lightning.fabric.utilities.throughput.Throughput` does the windowed rates; this callback feeds it
at each logging step (``trainer.log_every_n_steps``): the wall time (after a CUDA synchronize, so queued kernels are
counted), the tokens trained (``pl_module.tokens_seen``, all ranks) and the FLOPs they cost from the module's
:class:`~src.protocols.CountsTrainingFlops` hook. The peak comes from :func:`src.flops.dense_peak_flops` or
``peak_flops``; where neither knows the device (CPUs), ``perf/mfu`` is left out. Values go through ``pl_module.log``,
so the CSV logger, any other logger and the telemetry stream all receive them.

``perf/tokens_per_s`` counts all ranks; ``perf/mfu`` is per device. Both are rates over the last ``window - 1``
logging intervals, the first of which includes warm-up (and compilation, with ``compile: true``); time spent in
validation is not counted.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput

from src.errors import EngramError
from src.flops import dense_peak_flops
from src.protocols import CountsTrainingFlops

_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a Lightning precision string (``bf16-mixed`` -> bfloat16, ``32-true`` ->
    float32)."""
    return next((dtype for prefix, dtype in _COMPUTE_DTYPES.items() if precision.startswith(prefix)), torch.float32)


def _sequence_length(batch: Any, trainer: pl.Trainer) -> int:
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if isinstance(ids, torch.Tensor) and ids.ndim >= 2:
        return int(ids.shape[-1])
    return int(getattr(trainer.datamodule, "seq_len", 0) or 0)


class ThroughputCallback(pl.Callback):
    """Logs ``perf/tokens_per_s`` and ``perf/mfu``.

    Args:
        window: logging steps in the rolling window (at least 2: rates are differences over the window).
        peak_flops: the device's peak FLOP/s for MFU; null = look it up (dense tensor-core peak of the compute dtype).
    """

    def __init__(self, window: int = 2, peak_flops: float | None = None) -> None:
        if window < 2:
            raise EngramError(f"throughput.window={window} must be >= 2 (rates are taken between logging steps).")
        if peak_flops is not None and peak_flops <= 0:
            raise EngramError(f"throughput.peak_flops={peak_flops} must be > 0, or null to look the device up.")
        self.window = window
        self.peak_flops = peak_flops
        self._throughput: Throughput | None = None
        self._start = 0.0
        self._tokens_at_start = 0
        self._tokens_reported = 0
        self._validation_seconds = 0.0
        self._validation_start = 0.0
        self._flops_per_token: dict[int, float] = {}
        self._logged_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        peak = self.peak_flops or dense_peak_flops(pl_module.device, compute_dtype(str(trainer.precision)))
        self._throughput = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=self.window)
        self._sync(pl_module)
        self._start = time.perf_counter()
        self._tokens_at_start = int(getattr(pl_module, "tokens_seen", 0))
        self._tokens_reported = 0
        self._validation_seconds = 0.0
        self._flops_per_token.clear()
        if trainer.is_global_zero and isinstance(pl_module, CountsTrainingFlops):
            seq_len = int(getattr(trainer.datamodule, "seq_len", 0) or 0)
            per_token = self._flops_per_token[seq_len] = pl_module.training_flops_per_token(seq_len)
            mfu_note = f", MFU against {peak / 1e12:,.1f} TFLOP/s peak" if peak else ", no known peak: MFU not logged"
            print(f"[engram] training FLOPs per token: {per_token / 1e9:,.3f} GFLOP (seq_len {seq_len}){mfu_note}")

    # Validation inside fit is not training: its time is taken out of the rates.
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._throughput is not None and not trainer.sanity_checking:
            self._sync(pl_module)
            self._validation_seconds += time.perf_counter() - self._validation_start

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._throughput is None or step == self._logged_step or step % trainer.log_every_n_steps != 0:
            return
        tokens = (int(getattr(pl_module, "tokens_seen", 0)) - self._tokens_at_start) // trainer.world_size
        if tokens <= self._tokens_reported:
            return
        self._logged_step = step
        self._sync(pl_module)
        flops = None
        if isinstance(pl_module, CountsTrainingFlops):
            seq_len = _sequence_length(batch, trainer)
            if seq_len not in self._flops_per_token:
                self._flops_per_token[seq_len] = pl_module.training_flops_per_token(seq_len)
            flops = int(self._flops_per_token[seq_len] * (tokens - self._tokens_reported))
        # Throughput's items are tokens here; it wants samples <= items, so samples are counted in tokens too.
        self._throughput.update(
            time=time.perf_counter() - self._start - self._validation_seconds,
            batches=step,
            samples=tokens,
            lengths=tokens,
            flops=flops,
        )
        self._tokens_reported = tokens
        rates = self._throughput.compute()
        if "device/items_per_sec" in rates:
            tokens_per_s = rates["device/items_per_sec"] * trainer.world_size
            pl_module.log("perf/tokens_per_s", float(tokens_per_s), on_step=True, on_epoch=False)
        if "device/mfu" in rates:
            pl_module.log("perf/mfu", float(rates["device/mfu"]), on_step=True, on_epoch=False)
        if pl_module.device.type == "cuda":
            peak_gib = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("perf/peak_memory_gib", peak_gib, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            peak_gib = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            print(f"[engram] rank {trainer.global_rank}: peak GPU memory allocated {peak_gib:.1f} GiB", flush=True)
