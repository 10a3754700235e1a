"""Records *where* (layer, head), *when* (token) and *why* (Syntax / Retrieval / Novelty) a memory model changes its
memory at test time: TTT's inner weights, Titans' neural memory, EMMA's holographic trace.

The callback talks to the model only through the ``CapturesPlasticity`` hook of the LightningModule:
``set_capture(enabled: bool)`` and ``plasticity_records() -> list[dict[str, Tensor]]`` (one dict per memory layer, in
the schema of ``src/models/plasticity.py``), so it works the same for every family. It records

* during ``fit``: the training forward of every ``every_n_steps``-th step (the exact step, no extra forward);
* during ``validate`` / ``test`` / ``predict``: the first ``max_eval_batches`` batches;

keeping the first ``max_sequences`` sequences of a batch. Each capture becomes a tidy table (one row per run, step,
sequence, layer, head, position: token, bucket, update_norm and the family's other metrics) written as parquet
under ``<run_dir>/plasticity/<stage>/``; per-layer and per-bucket summaries go to the telemetry stream (named
``<family>/<metric>``) and the mean update_norm per bucket to the loggers (``plasticity/<stage>/update_norm/<bucket>``). When a stage ends, the stage's tables are analysed: Layer x Time heatmaps, bucket charts with bootstrap
intervals and the RQ1/RQ2 report (``src/analysis/plasticity.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from src.analysis.buckets import label_batch, load_stopwords
from src.analysis.plasticity import analyse, build_tables, read_tables, telemetry_rows, write_tables
from src.errors import EngramError
from src.models.plasticity import POSITION, UPDATE_NORM, check_records
from src.protocols import CapturesPlasticity
from src.telemetry import log_rows


class PlasticityCallback(pl.Callback):
    """Args:
    every_n_steps: during fit, capture the training step whose ``global_step`` is a multiple of this.
    max_sequences: sequences of a batch to keep (captures grow as layers x heads x tokens).
    max_eval_batches: batches captured per validate/test/predict run.
    stopwords: a stop-word file (one word per line) or null for the shipped English list.
    long_range: token distance from which a Retrieval token counts as long-range (RQ2).
    analyse_at_end: write heatmaps, bucket charts and the report when a stage ends.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        max_sequences: int = 4,
        max_eval_batches: int = 4,
        stopwords: str | None = None,
        long_range: int = 16,
        analyse_at_end: bool = True,
    ) -> None:
        if every_n_steps < 1 or max_sequences < 1:
            raise EngramError("PlasticityCallback: every_n_steps and max_sequences must be at least 1.")
        self.every_n_steps = every_n_steps
        self.max_sequences = max_sequences
        self.max_eval_batches = max_eval_batches
        self.stopwords = load_stopwords(stopwords)
        self.long_range = long_range
        self.analyse_at_end = analyse_at_end
        self._armed = False
        self.tables: dict[str, list[Path]] = {}

    # --- plumbing ---------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, CapturesPlasticity):
            raise EngramError(
                f"PlasticityCallback needs a memory family with the CapturesPlasticity hook (TTTLM, TitansLM, "
                f"EmmaLM); {type(pl_module).__name__} has none. Remove the callback from trainer.callbacks or use one "
                "of those families."
            )
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)  # type: ignore[attr-defined]
        if tokenizer is None:
            raise EngramError("PlasticityCallback needs a data module with a tokenizer to bucket tokens into words.")
        self._tokenizer = tokenizer

    def _out_dir(self, trainer: pl.Trainer, stage: str) -> Path:
        return Path(trainer.default_root_dir) / "plasticity" / stage

    def _arm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.set_capture(True)
        self._armed = True
        self._step = trainer.global_step  # the step whose forward is captured (before its optimizer update)

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, stage: str, index: int) -> None:
        if not self._armed:
            return
        records = pl_module.plasticity_records()
        pl_module.set_capture(False)
        self._armed = False
        check_records(records)
        n = min(self.max_sequences, batch["input_ids"].shape[0])
        # Captured forwards here always start at position 0, so the table's own 0..L-1 positions are the same. A
        # family may read fewer tokens than the batch holds (EMMA's ListOps stops before the answer): keep those.
        input_ids = batch["input_ids"][:n, : records[0][POSITION].shape[0]].cpu()
        captures = [{key: value[:n] for key, value in layer.items() if key != POSITION} for layer in records]
        tok = self._tokenizer
        buckets = label_batch(
            input_ids, tok.decode, stopwords=self.stopwords, ignore_ids={tok.pad_id, tok.bos_id, tok.eos_id}
        )
        run = Path(trainer.default_root_dir).parent.name + "/" + Path(trainer.default_root_dir).name
        token_df, minibatch_df = build_tables(captures, input_ids, buckets, run=run, step=self._step)
        token_df["stage"] = stage
        if not trainer.is_global_zero:
            return
        path = self._out_dir(trainer, stage) / f"step{self._step:07d}_batch{index:04d}.parquet"
        self.tables.setdefault(stage, []).append(write_tables(token_df, minibatch_df, path))
        # telemetry names follow the family (ttt/update_norm, emma/update_norm ...); every Engram module has one
        family = getattr(pl_module, "family", type(pl_module).__name__.lower())
        log_rows(trainer, telemetry_rows(token_df, minibatch_df, family=family), step=self._step)
        if stage == "predict":  # Lightning does not log from predict
            return
        # observed: a bucket without tokens (symbol vocabularies have no stop words) logs nothing rather than NaN
        for bucket, value in token_df.groupby("bucket", observed=True)[UPDATE_NORM].mean().items():
            pl_module.log(f"plasticity/{stage}/{UPDATE_NORM}/{bucket}", float(value), rank_zero_only=True)

    def _finish(self, trainer: pl.Trainer, stage: str) -> None:
        paths = self.tables.get(stage)
        if not (self.analyse_at_end and trainer.is_global_zero and paths):
            return
        token_df, minibatch_df = read_tables(paths)
        analyse(token_df, self._out_dir(trainer, stage), minibatch_df=minibatch_df, long_range=self.long_range)

    # --- fit ----------------------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._arm(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._collect(trainer, pl_module, batch, "train", batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, "train")

    # --- evaluation -------------------------------------------------------------------------------------------
    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        if not trainer.sanity_checking and batch_idx < self.max_eval_batches:
            self._arm(trainer, pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._eval_start(trainer, pl_module, batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._collect(trainer, pl_module, batch, "val", batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            self._finish(trainer, "val")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._eval_start(trainer, pl_module, batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._collect(trainer, pl_module, batch, "test", batch_idx)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, "test")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._eval_start(trainer, pl_module, batch_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._collect(trainer, pl_module, batch, "predict", batch_idx)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, "predict")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation during fit is analysed once, over every validation capture of the run.
        self._finish(trainer, "val")
