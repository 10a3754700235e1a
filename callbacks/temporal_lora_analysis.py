"""Hysteresis and fatigue of a trained Temporal LoRA router, written into the run directory.

After the router stage's ``fit`` (once the router is calibrated) and after every ``test`` of a router-stage model,
the callback splices sequences from the *test* split of each domain (``DomainTextDataModule.streams("test")``),
routes them with the model and runs the two analyses of ``src/analysis/temporal_lora.py``, for every ordered pair
of domains (A, B)::

    <run_dir>/analysis/hysteresis_<A>-<B>.{json,png}   A→B→A and A→Mix→A: switch-lag, return-gap, asymmetry
    <run_dir>/analysis/fatigue_<A>-<B>.{json,png}      A→B(n)→A over block lengths n: crystallization, relax
                                                       time, tail area and their Pearson r with n

Headline numbers (mean lags, mean fatigue metrics, Pearson r) also go to the telemetry stream as
``tlora/<analysis>/<A>-<B>/<metric>``. Re-run the analyses of a finished router stage with other settings through
``python -m src.cli test --config configs/tlora_router.yaml --ckpt_path <its last.ckpt>`` plus overrides of this
callback's arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from src.analysis.temporal_lora import (
    TAIL_WINDOW,
    fatigue_analysis,
    fatigue_inputs,
    hysteresis_analysis,
    hysteresis_inputs,
    route_traces,
)
from src.errors import EngramError
from src.telemetry import log_rows

ANALYSIS_SUBDIR = "analysis"


class TemporalLoRAAnalysis(pl.Callback):
    """Args:
    pairs: ordered domain pairs ``[A, B]`` by name; null = every ordered pair of the data's domains.
    segment_len: tokens per segment of the hysteresis sequences (A, B or Mix, A: 3 × segment_len in all).
    n_sequences: A→B→A sequences per pair, and as many A→Mix→A.
    mix_chunk: chunk length of the alternating B/A text in the Mix segment.
    block_lengths: B-block lengths of the fatigue sequences.
    n_per_length: fatigue sequences per block length.
    lead_len, tail_len: tokens of A before and after the B block (tail_len ≥ 32, the tail-area window).
    seed: seed of the splice offsets (the same sequences for every checkpoint analysed with it).
    batch_size: sequences routed per forward pass.
    after_fit: also run when a router-stage ``fit`` ends (besides after ``test``).
    """

    def __init__(
        self,
        pairs: Sequence[Sequence[str]] | None = None,
        segment_len: int = 128,
        n_sequences: int = 16,
        mix_chunk: int = 16,
        block_lengths: Sequence[int] = (16, 32, 64, 128, 256),
        n_per_length: int = 8,
        lead_len: int = 64,
        tail_len: int = 2 * TAIL_WINDOW,
        seed: int = 0,
        batch_size: int = 16,
        after_fit: bool = True,
    ) -> None:
        if segment_len < 1 or n_sequences < 1 or n_per_length < 1 or not block_lengths or min(block_lengths) < 1:
            raise EngramError(
                "TemporalLoRAAnalysis: segment_len, n_sequences, n_per_length and every block length must be ≥ 1."
            )
        if tail_len < TAIL_WINDOW:
            raise EngramError(f"TemporalLoRAAnalysis: tail_len={tail_len} must be ≥ {TAIL_WINDOW} (tail-area window).")
        self.pairs = [tuple(p) for p in pairs] if pairs is not None else None
        self.segment_len = segment_len
        self.n_sequences = n_sequences
        self.mix_chunk = mix_chunk
        self.block_lengths = list(block_lengths)
        self.n_per_length = n_per_length
        self.lead_len = lead_len
        self.tail_len = tail_len
        self.seed = seed
        self.batch_size = batch_size
        self.after_fit = after_fit
        self.written: list[Path] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "family", None) != "temporal_lora":
            raise EngramError(
                f"TemporalLoRAAnalysis needs a Temporal LoRA model; {type(pl_module).__name__} is not one. Remove the "
                "callback from trainer.callbacks or use src.lightning_modules.TemporalLoRALM."
            )
        names = list(trainer.datamodule.domain_names)  # type: ignore[attr-defined]
        pairs = self.pairs if self.pairs is not None else list(permutations(names, 2))
        for pair in pairs:
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(names):
                raise EngramError(f"TemporalLoRAAnalysis pair {list(pair)}: give two different domains of {names}.")
        longest = max(3 * self.segment_len, self.lead_len + max(self.block_lengths) + self.tail_len)
        context = pl_module.max_context  # type: ignore[attr-defined]
        if context is not None and longest > context:
            raise EngramError(
                f"TemporalLoRAAnalysis builds sequences of {longest} tokens, longer than the model's context "
                f"({context}); lower segment_len (3 × segment_len) or the largest block length (lead + block + tail)."
            )
        self._index = [(names.index(a), names.index(b), f"{a}-{b}") for a, b in pairs]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.after_fit and pl_module.stage == "router":  # type: ignore[attr-defined]
            self.analyse(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.analyse(trainer, pl_module)

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
        """Run both analyses for every pair; only global rank 0 works (the results do not depend on the rank)."""
        if not trainer.is_global_zero:
            return {}
        out_dir = Path(trainer.default_root_dir) / ANALYSIS_SUBDIR
        streams = trainer.datamodule.streams("test")  # type: ignore[attr-defined]
        route = pl_module.model.route  # type: ignore[attr-defined]
        was_training = pl_module.training
        pl_module.eval()
        results: dict[str, dict[str, Any]] = {}
        rows: list[tuple[str, float, None, None, None]] = []
        try:
            for a, b, tag in self._index:
                hysteresis_items = hysteresis_inputs(
                    streams, a, b, self.segment_len, self.n_sequences, self.seed, self.mix_chunk
                )
                fatigue_items = fatigue_inputs(
                    streams, a, b, self.block_lengths, self.n_per_length, self.lead_len, self.tail_len, self.seed
                )
                hysteresis = hysteresis_analysis(
                    route_traces(hysteresis_items, route, self.batch_size, pl_module.device),
                    out_dir,
                    name=f"hysteresis_{tag}",
                )
                fatigue = fatigue_analysis(
                    route_traces(fatigue_items, route, self.batch_size, pl_module.device),
                    out_dir,
                    name=f"fatigue_{tag}",
                )
                results[tag] = {"hysteresis": hysteresis, "fatigue": fatigue}
                rows += _headline_rows(tag, hysteresis, fatigue)
                self.written += [
                    out_dir / f"{kind}_{tag}.{ext}" for kind in ("hysteresis", "fatigue") for ext in ("json", "png")
                ]
        finally:
            pl_module.train(was_training)
        log_rows(trainer, rows)
        rank_zero_info(f"[engram] Temporal LoRA hysteresis and fatigue written to {out_dir}")
        return results


def _headline_rows(
    tag: str, hysteresis: dict[str, Any], fatigue: dict[str, Any]
) -> list[tuple[str, float, None, None, None]]:
    """The summary means and Pearson r of both analyses that are defined (censored-only means are left out)."""
    values: dict[str, float | None] = {}
    aba = hysteresis["summary"].get("ABA", {})
    for key in ("lag_in", "lag_back"):
        values[f"hysteresis/{tag}/{key}_mean"] = aba.get(key, {}).get("mean")
    values[f"hysteresis/{tag}/return_gap_dtw_rms_mean"] = aba.get("return_gap", {}).get("dtw_rms", {}).get("mean")
    mix = hysteresis["summary"].get("AMixA", {})
    values[f"hysteresis/{tag}/mix_lag_back_mean"] = mix.get("lag_back", {}).get("mean")
    for key, trend in fatigue["pearson_vs_block_len"].items():
        values[f"fatigue/{tag}/{key}_pearson_r"] = trend["r"]
    return [(f"tlora/{k}", float(v), None, None, None) for k, v in values.items() if v is not None]
