"""Temporal LoRA analyses: how the router switches (hysteresis) and how it gets stuck (fatigue).

Both read router weight traces ``w`` of shape ``(T, E)`` over spliced sequences A→X→A (a :class:`SwitchTrace`),
where X is a block of domain B (A→B→A) or a mix that alternates A and B chunks (A→Mix→A). Definitions (token
indices are positions in the sequence; "run" means consecutive tokens):

* **sustained crossing** from ``start`` to ``threshold``: the offset ``t − start`` of the first token ``t ≥ start``
  that begins a run of ``k`` tokens with weight ``> threshold``, all before ``end``; ``None`` if there is none
  (a censored observation, counted apart and left out of means).
* **switch-lag**: sustained crossing of the new domain's weight, ``threshold = 0.9``, ``k = 3``. Into B from the
  start of the B block (A→B→A only; a mix has no single target) and back to A from the start of the second A.
* **return-gap**: distance between the weight trajectories of the first and the second A segment: cosine
  similarity and Euclidean distance of the flattened trajectories over their common length (both aligned at the
  segment start), and DTW (dtaidistance: ``sqrt`` of the summed squared distances along the optimal warping path,
  full lengths) with ``dtw_rms = dtw / sqrt(path length)``, comparable across segment lengths.
* **switching asymmetry**: ``lag_in − lag_back`` and ``(lag_in − lag_back) / (lag_in + lag_back)`` (0 when both
  are 0): positive = entering B is slower than returning to A.
* **deep crystallization ratio**: share of the B block's tokens with ``w_B > 0.95``.
* **relax time**: sustained crossing of ``w_A`` to ``0.99`` (same ``k``) from the first token after the B block.
* **tail area**: ``Σ_{t<32} (1 − w_A)`` over the first 32 tokens after the B block, in token units.
* **fatigue trend**: Pearson r (and its two-sided p-value, scipy) of each fatigue metric against the B-block
  length, over all traces (censored relax times left out).

``hysteresis_analysis`` and ``fatigue_analysis`` write ``<name>.json`` (atomically) and ``<name>.png``.
``hysteresis_inputs``/``fatigue_inputs`` build the sequences from domain token streams, and ``route_traces`` runs
any model with a ``route(input_ids)`` method (``TemporalLoRA``) over them and returns the traces.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from dtaidistance import dtw as dtw_path
from dtaidistance import dtw_ndim
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from src.atomic import atomic_write
from src.errors import EngramError
from src.splicing import compose_sequence

SWITCH_THRESHOLD = 0.9
CRYSTAL_THRESHOLD = 0.95
RELAX_THRESHOLD = 0.99
RUN_LENGTH = 3
TAIL_WINDOW = 32


@dataclass(frozen=True)
class SwitchTrace:
    """Router weights over one A→X→A sequence; X (tokens ``[middle_start, middle_end)``) is B or a mix of A and B."""

    weights: np.ndarray  # (T, E)
    a: int
    b: int
    middle_start: int
    middle_end: int
    kind: Literal["ABA", "AMixA"] = "ABA"

    def __post_init__(self) -> None:
        t = len(self.weights)
        if self.weights.ndim != 2 or not 0 < self.middle_start < self.middle_end < t:
            raise EngramError(
                f"trace of shape {self.weights.shape} with middle [{self.middle_start}, {self.middle_end}): need "
                "weights (T, E) and 0 < middle_start < middle_end < T (three non-empty segments)."
            )
        if self.kind not in ("ABA", "AMixA"):
            raise EngramError(f"trace kind {self.kind!r}; use ABA or AMixA.")


# --- metrics on one trace ---------------------------------------------------------------------------------------
def sustained_crossing(
    trace: np.ndarray, start: int, threshold: float, k: int = RUN_LENGTH, end: int | None = None
) -> int | None:
    """Offset from ``start`` of the first run of ``k`` tokens ``> threshold`` inside ``[start, end)``, else None."""
    above = np.asarray(trace[start:end]) > threshold
    run = 0
    for i, hit in enumerate(above):
        run = run + 1 if hit else 0
        if run == k:
            return i - k + 1
    return None


def crystallization_ratio(block_weights: np.ndarray, threshold: float = CRYSTAL_THRESHOLD) -> float:
    return float(np.mean(np.asarray(block_weights) > threshold))


def tail_area(weights_after_return: np.ndarray, window: int = TAIL_WINDOW) -> float:
    w = np.asarray(weights_after_return, dtype=np.float64)
    if len(w) < window:
        raise EngramError(f"tail area needs {window} tokens after the return, the trace has {len(w)}; lengthen it.")
    return float(np.sum(1.0 - w[:window]))


def dtw(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """DTW distance of two ``(T, D)`` trajectories (dtaidistance's C core) and the length of its warping path."""
    x, y = (np.ascontiguousarray(np.asarray(v, dtype=np.float64).reshape(len(v), -1)) for v in (x, y))
    # One C DP gives the distance and the accumulated-cost matrix the path is read from (dtaidistance 2.5.1's
    # ``dtw_ndim.warping_path`` rejects (T, 1) arrays, ``warping_paths`` + ``best_path`` does not).
    distance, paths = dtw_ndim.warping_paths(x, y, use_c=True)
    return float(distance), len(dtw_path.best_path(paths))


def return_gap(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    n = min(len(first), len(second))
    u, v = np.asarray(first[:n], np.float64).ravel(), np.asarray(second[:n], np.float64).ravel()
    distance, path = dtw(first, second)
    return {
        "cosine": float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))),
        "euclidean": float(np.linalg.norm(u - v)),
        "dtw": distance,
        "dtw_rms": distance / math.sqrt(path),
    }


def asymmetry(lag_in: int | None, lag_back: int | None) -> dict[str, float | None]:
    if lag_in is None or lag_back is None:
        return {"difference": None, "normalized": None}
    total = lag_in + lag_back
    return {"difference": float(lag_in - lag_back), "normalized": (lag_in - lag_back) / total if total else 0.0}


def hysteresis_metrics(trace: SwitchTrace, threshold: float = SWITCH_THRESHOLD, k: int = RUN_LENGTH) -> dict[str, Any]:
    w = trace.weights
    lag_in = (
        sustained_crossing(w[:, trace.b], trace.middle_start, threshold, k, trace.middle_end)
        if trace.kind == "ABA"
        else None
    )
    lag_back = sustained_crossing(w[:, trace.a], trace.middle_end, threshold, k)
    return {
        "kind": trace.kind,
        "lag_in": lag_in,
        "lag_back": lag_back,
        "asymmetry": asymmetry(lag_in, lag_back) if trace.kind == "ABA" else None,
        "return_gap": return_gap(w[: trace.middle_start], w[trace.middle_end :]),
        "middle_mean_weight_a": float(w[trace.middle_start : trace.middle_end, trace.a].mean()),
    }


def fatigue_metrics(trace: SwitchTrace, k: int = RUN_LENGTH) -> dict[str, Any]:
    w = trace.weights
    return {
        "block_len": trace.middle_end - trace.middle_start,
        "crystallization": crystallization_ratio(w[trace.middle_start : trace.middle_end, trace.b]),
        "relax_time": sustained_crossing(w[:, trace.a], trace.middle_end, RELAX_THRESHOLD, k),
        "tail_area": tail_area(w[trace.middle_end :, trace.a]),
    }


# --- summaries ------------------------------------------------------------------------------------------------------
def _describe(values: Sequence[float | None]) -> dict[str, Any]:
    seen = [v for v in values if v is not None]
    return {
        "n": len(seen),
        "censored": len(values) - len(seen),
        "mean": float(np.mean(seen)) if seen else None,
        "median": float(np.median(seen)) if seen else None,
        "std": float(np.std(seen)) if seen else None,
    }


def pearson(x: Sequence[float], y: Sequence[float | None]) -> dict[str, Any]:
    """Pearson r and two-sided p of ``y`` against ``x`` over the pairs where ``y`` is known; None where undefined."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if b is not None]
    out: dict[str, Any] = {"n": len(pairs), "r": None, "p": None}
    if len(pairs) < 3:
        out["note"] = "fewer than 3 points"
        return out
    xs, ys = np.array(pairs, dtype=np.float64).T
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        out["note"] = "constant input"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.NearConstantInputWarning)
        result = stats.pearsonr(xs, ys)
    out["r"], out["p"] = float(result.statistic), float(result.pvalue)
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2), encoding="utf-8"))


def _figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure on the Agg canvas, without pyplot: no global backend state, safe in workers and threads."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save_figure(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def hysteresis_analysis(
    traces: Sequence[SwitchTrace],
    out_dir: str | Path,
    threshold: float = SWITCH_THRESHOLD,
    k: int = RUN_LENGTH,
    name: str = "hysteresis",
) -> dict[str, Any]:
    """Switch-lags, return-gaps and asymmetry per trace and per kind; writes ``<name>.json`` and ``<name>.png``."""
    if not traces:
        raise EngramError("hysteresis analysis got no traces; build some with hysteresis_inputs.")
    per_trace = [hysteresis_metrics(t, threshold, k) for t in traces]
    summary: dict[str, Any] = {}
    for kind in ("ABA", "AMixA"):
        rows = [m for m in per_trace if m["kind"] == kind]
        if not rows:
            continue
        summary[kind] = {
            "n": len(rows),
            "lag_back": _describe([m["lag_back"] for m in rows]),
            "return_gap": {key: _describe([m["return_gap"][key] for m in rows]) for key in rows[0]["return_gap"]},
            "middle_mean_weight_a": _describe([m["middle_mean_weight_a"] for m in rows]),
        }
        if kind == "ABA":
            summary[kind]["lag_in"] = _describe([m["lag_in"] for m in rows])
            summary[kind]["asymmetry"] = {
                key: _describe([m["asymmetry"][key] for m in rows]) for key in ("difference", "normalized")
            }
    result = {"threshold": threshold, "k": k, "summary": summary, "per_trace": per_trace}
    out = Path(out_dir)
    _write_json(out / f"{name}.json", result)
    _plot_hysteresis(traces, summary, threshold, out / f"{name}.png")
    return result


def fatigue_analysis(
    traces: Sequence[SwitchTrace], out_dir: str | Path, k: int = RUN_LENGTH, name: str = "fatigue"
) -> dict[str, Any]:
    """Crystallization, relax time and tail area per trace, their means per B-block length and their Pearson r with
    block length; writes ``<name>.json`` and ``<name>.png``."""
    if not traces:
        raise EngramError("fatigue analysis got no traces; build some with fatigue_inputs.")
    per_trace = [fatigue_metrics(t, k) for t in traces]
    lengths = sorted({m["block_len"] for m in per_trace})
    metrics = ("crystallization", "relax_time", "tail_area")
    by_length = {
        str(n): {key: _describe([m[key] for m in per_trace if m["block_len"] == n]) for key in metrics} for n in lengths
    }
    block = [m["block_len"] for m in per_trace]
    trend = {key: pearson(block, [m[key] for m in per_trace]) for key in metrics}
    result = {
        "thresholds": {"crystallization": CRYSTAL_THRESHOLD, "relax": RELAX_THRESHOLD, "k": k, "tail": TAIL_WINDOW},
        "by_block_len": by_length,
        "pearson_vs_block_len": trend,
        "per_trace": per_trace,
    }
    out = Path(out_dir)
    _write_json(out / f"{name}.json", result)
    _plot_fatigue(per_trace, by_length, trend, out / f"{name}.png")
    return result


def _plot_hysteresis(traces: Sequence[SwitchTrace], summary: dict[str, Any], threshold: float, path: Path) -> None:
    kinds = [kind for kind in ("ABA", "AMixA") if kind in summary]
    fig, axes = _figure(len(kinds), 1, (9, 3.2 * len(kinds)))
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        group = [t for t in traces if t.kind == kind]
        for t in group:
            ax.plot(t.weights[:, t.a], color="tab:blue", alpha=max(0.08, 1.0 / len(group)), lw=1)
        if len({(len(t.weights), t.middle_start, t.middle_end) for t in group}) == 1:  # same layout: draw the mean
            ax.plot(np.mean([t.weights[:, t.a] for t in group], axis=0), color="black", lw=1.8, label="mean $w_A$")
        ref = group[0]
        ax.axvspan(
            ref.middle_start, ref.middle_end, color="tab:orange", alpha=0.12, label="B" if kind == "ABA" else "Mix"
        )
        ax.axhline(threshold, color="gray", ls="--", lw=0.8)
        lag = summary[kind]["lag_back"]["mean"]
        lag_text = "censored" if lag is None else f"{lag:.1f}"
        ax.set_title(f"{kind}: weight of A per token (n={len(group)}; mean lag back to A = {lag_text})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("token")
        ax.set_ylabel("$w_A$")
        ax.legend(loc="lower left", fontsize=8)
    _save_figure(fig, path)


def _plot_fatigue(
    per_trace: list[dict[str, Any]], by_length: dict[str, Any], trend: dict[str, Any], path: Path
) -> None:
    labels = {
        "crystallization": "deep crystallization ratio",
        "relax_time": "relax time (tokens)",
        "tail_area": "tail area",
    }
    fig, axes = _figure(1, 3, (13, 3.6))
    for ax, (key, label) in zip(axes[0], labels.items(), strict=True):
        points = [(m["block_len"], m[key]) for m in per_trace if m[key] is not None]
        if points:
            ax.scatter(*zip(*points, strict=True), s=12, alpha=0.5)
        means = [(int(n), d[key]["mean"]) for n, d in by_length.items() if d[key]["mean"] is not None]
        if means:
            ax.plot(*zip(*means, strict=True), color="black", marker="o", lw=1.5)
        r, p = trend[key]["r"], trend[key]["p"]
        ax.set_title(f"{label}\nr = {r:.3f}, p = {p:.3g}" if r is not None else f"{label}\nr undefined")
        ax.set_xlabel("B block length (tokens)")
    _save_figure(fig, path)


# --- building the sequences and tracing a router over them ----------------------------------------------------------
def hysteresis_inputs(
    streams: Sequence[torch.Tensor],
    a: int,
    b: int,
    segment_len: int,
    n_sequences: int,
    seed: int = 0,
    mix_chunk: int = 16,
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """``n_sequences`` A→B→A and as many A→Mix→A sequences (three segments of ``segment_len`` tokens; the mix
    alternates ``mix_chunk``-token chunks starting with B). Each item: ``input_ids`` and the :class:`SwitchTrace`
    fields other than ``weights``."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for kind, middle in (("ABA", b), ("AMixA", (b, a))):
        for _ in range(n_sequences):
            plan = [(a, segment_len), (middle, segment_len), (a, segment_len)]
            ids, _, segments = compose_sequence(streams, plan, generator, mix_chunk)
            items.append(
                (ids, {"a": a, "b": b, "middle_start": segments[1].start, "middle_end": segments[1].end, "kind": kind})
            )
    return items


def fatigue_inputs(
    streams: Sequence[torch.Tensor],
    a: int,
    b: int,
    block_lengths: Sequence[int],
    n_per_length: int,
    lead_len: int = 64,
    tail_len: int = 2 * TAIL_WINDOW,
    seed: int = 0,
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """A (``lead_len``) → B (each of ``block_lengths``) → A (``tail_len`` ≥ 32) sequences, ``n_per_length`` each."""
    if tail_len < TAIL_WINDOW:
        raise EngramError(f"tail_len={tail_len} is shorter than the {TAIL_WINDOW}-token tail window; raise it.")
    generator = torch.Generator().manual_seed(seed)
    items = []
    for block in block_lengths:
        for _ in range(n_per_length):
            ids, _, segments = compose_sequence(streams, [(a, lead_len), (b, block), (a, tail_len)], generator)
            items.append((ids, {"a": a, "b": b, "middle_start": segments[1].start, "middle_end": segments[1].end}))
    return items


@torch.no_grad()
def router_weights(
    route: Callable[[torch.Tensor], Any],
    sequences: Sequence[torch.Tensor],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> list[np.ndarray]:
    """Router weights ``(T, E)`` for each 1-D sequence; ``route`` is e.g. ``TemporalLoRA.route`` of a model in eval
    mode (returns an object with ``.weights``), on ``device``. Sequences of equal length are batched together; the
    order of the input is kept."""
    out: list[np.ndarray | None] = [None] * len(sequences)
    by_len: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        by_len.setdefault(len(seq), []).append(i)
    for indices in by_len.values():
        for lo in range(0, len(indices), batch_size):
            chunk = indices[lo : lo + batch_size]
            batch = torch.stack([sequences[i] for i in chunk]).to(device)
            weights = route(batch).weights.float().cpu().numpy()
            for i, w in zip(chunk, weights, strict=True):
                out[i] = w
    return [w for w in out if w is not None]


def route_traces(
    items: Sequence[tuple[torch.Tensor, dict[str, Any]]],
    route: Callable[[torch.Tensor], Any],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> list[SwitchTrace]:
    """Route every built sequence and pair its weights with its layout: the input of the two analyses."""
    weights = router_weights(route, [ids for ids, _ in items], batch_size, device)
    return [SwitchTrace(weights=w, **meta) for w, (_, meta) in zip(weights, items, strict=True)]
