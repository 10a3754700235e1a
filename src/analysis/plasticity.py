"""Plasticity analysis of any memory family: where (layer), when (token) and why (syntax or memory) it updates itself.

Family-agnostic: it reads the records every memory family (TTT-Linear/MLP, Titans, EMMA) emits through the
``CapturesPlasticity`` hook, in the one schema of ``src/models/plasticity.py``, and knows nothing else about the
model. Pipeline: capture dicts from the model -> :func:`build_tables` -> :func:`write_tables` (parquet) ->
:func:`analyse` (heat-maps, bucket bar chart, RQ report) and :func:`telemetry_rows` (summary events).
``python -m src.analysis.plasticity --table t.parquet --out dir`` re-runs :func:`analyse` on saved tables.

**Capture dict** (one per layer; tensors or arrays, any float dtype, any device; ``position`` left out):

* per token, ``[B, H, L]``: ``update_norm`` (required: how strongly the token writes into the memory), then any
  of the family metrics of ``src.models.plasticity.TOKEN_METRICS`` (TTT ``g_norm``, ``lr``, ``loss_pre`` ...;
  Titans ``surprise_past``, ``theta`` ...; EMMA ``write_strength``, ``write_cos``, ``read_cos``);
* per chunk, ``[B, H, n_minibatch]``: ``delta_w_norm`` (required: ‖M_end − M_start‖ over the family's chunk: TTT
  mini-batch, Titans chunk, EMMA block), plus any other of ``CHUNK_METRICS``.

Every layer of a capture holds the same keys; the tables get one column per metric, in the schema's order.

**Token table** (tidy; one row per run, step, sequence, layer, head, position). ``sequence`` is the row of the
batch (plus ``sequence_offset``), needed because a capture holds ``B`` sequences:

=====================  ===========  ===============================================================
column                 dtype        meaning
=====================  ===========  ===============================================================
run                    category     run id
step                   int64        optimizer step of the capture
sequence               int64        batch row + ``sequence_offset``
layer, head, position  int32        where and when
token_id               int64        the input token
token_text             category     the token's text (see ``buckets.py``)
bucket                 category     Syntax / Retrieval / Novelty / Other (``buckets.BUCKETS`` order)
retrieval_distance     int32        tokens since the word's previous occurrence; -1 unless Retrieval
update_norm, ...       float32      the captured metrics, in the order of ``TOKEN_METRICS``
=====================  ===========  ===============================================================

**Mini-batch table**: run, step, sequence, layer, head, ``minibatch`` (int32, the family's chunk index),
``delta_w_norm`` (+ any other chunk metric).

**Statistics.** The unit of observation is one token occurrence in one layer, with the metric averaged over heads
(heads of a token share its input, so they are not independent samples). RQ1 compares memory tokens (Novelty ∪
Retrieval) with Syntax tokens, per layer and overall, by a two-sided Mann-Whitney U test with Cliff's delta
δ = P(X > Y) − P(X < Y) as effect size. "Overall" first turns each token's value into its percentile rank within
its layer and averages those over layers, so no layer's scale dominates. RQ2 takes the long-range Retrieval tokens
(previous occurrence at least ``long_range`` tokens back, default 16 = TTT's official inner mini-batch, so the
earlier occurrence can only act through the memory state), and for each one compares its mean within-layer percentile in
the middle + deep thirds of the layers with that in the early third: a paired two-sided Wilcoxon signed-rank test,
effect size the matched-pairs rank-biserial correlation (in [−1, 1], like δ). Percentiles make layers with very
different scales comparable and ask "is this token's update unusually large *for this layer*". Caveat: tokens of
one sequence are not independent either; p-values are therefore optimistic for tables of few sequences.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from src.analysis.buckets import BUCKETS, NOVELTY, RETRIEVAL, SYNTAX, BatchBuckets
from src.atomic import atomic_write
from src.errors import EngramError
from src.models import plasticity as schema

TOKEN_METRICS: tuple[str, ...] = tuple(schema.TOKEN_METRICS)  # every family's, update_norm first
MINIBATCH_METRICS: tuple[str, ...] = tuple(schema.CHUNK_METRICS)  # delta_w_norm first
TOKEN_KEYS: tuple[str, ...] = ("run", "step", "sequence", "position")  # one token occurrence
TOKEN_COLUMNS: tuple[str, ...] = (
    "run",
    "step",
    "sequence",
    "layer",
    "head",
    "position",
    "token_id",
    "token_text",
    "bucket",
    "retrieval_distance",
)
MINIBATCH_COLUMNS: tuple[str, ...] = ("run", "step", "sequence", "layer", "head", "minibatch")

METRIC_LABELS: dict[str, str] = {
    "update_norm": r"update norm $\|u_t\|$",
    "g_norm": r"$\|g\|$",
    "k_norm": r"$\|k\|$",
    "lr": "inner learning rate",
    "tau": r"$\tau$",
    "loss_pre": r"$\ell_{pre}$",
    "loss_init": r"$\ell_{init}$",
    "loss_post": r"$\ell_{post}$",
    "surprise_past": r"past surprise $\|S_t\|_F$",
    "theta": r"step size $\theta_t$",
    "eta": r"momentum $\eta_t$",
    "alpha": r"forgetting $\alpha_t$",
    "write_strength": r"write strength $\beta_t$",
    "write_cos": "write cos (value, prototype)",
    "read_cos": "read cos (raw, cleaned)",
    "delta_w_norm": r"$\|\Delta M\|_F$ per chunk",
}
BUCKET_COLORS: dict[str, str] = {"Syntax": "#4c72b0", "Retrieval": "#dd8452", "Novelty": "#55a868", "Other": "#a0a0a0"}
MEMORY_BUCKETS: tuple[str, ...] = (NOVELTY, RETRIEVAL)


# ----------------------------------------------------------------------------------------------------- tables


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor: bf16 has no numpy dtype, so go through float32
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _metric_names(capture: Mapping[str, Any], names: tuple[str, ...]) -> list[str]:
    # names[0] is the required metric: listed even when absent, so that the check below names it as missing
    return [m for i, m in enumerate(names) if i == 0 or m in capture]


def build_tables(
    captures: Sequence[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]],
    input_ids: Any,
    labels: BatchBuckets,
    *,
    run: str,
    step: int,
    sequence_offset: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The token table and the mini-batch table (schemas in the module docstring) of one capture.

    ``captures`` is a list of per-layer dicts (index = layer) or a ``{layer: dict}`` mapping (for a subset of
    layers); ``input_ids`` is ``[B, L]``; ``labels`` comes from ``buckets.label_batch(input_ids, ...)``.
    """
    layers = dict(captures) if isinstance(captures, Mapping) else dict(enumerate(captures))
    if not layers:
        raise ValueError("build_tables needs at least one layer's capture")
    ids = _numpy(input_ids).astype(np.int64)
    if ids.ndim != 2 or labels.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape} and labels {labels.shape} must both be [batch, length]")
    batch, length = ids.shape
    known = set(TOKEN_METRICS + MINIBATCH_METRICS)
    first = layers[min(layers)]
    token_metrics = _metric_names(first, TOKEN_METRICS)
    mb_metrics = _metric_names(first, MINIBATCH_METRICS)

    texts = pd.Categorical(labels.token_text.ravel())
    buckets = pd.Categorical(labels.bucket.ravel(), categories=BUCKETS)
    if buckets.isna().any():
        raise ValueError(f"labels.bucket holds values outside {BUCKETS}")

    token_parts: list[dict[str, np.ndarray]] = []
    mb_parts: list[dict[str, np.ndarray]] = []
    for layer in sorted(layers):
        capture = layers[layer]
        unknown = set(capture) - known
        missing = [m for m in (*token_metrics, *mb_metrics) if m not in capture]
        if unknown or missing:
            raise ValueError(f"layer {layer} capture: unknown keys {sorted(unknown)}, missing keys {missing}")
        arrays = {m: _numpy(capture[m]).astype(np.float32) for m in token_metrics}
        heads = arrays[schema.UPDATE_NORM].shape[1] if arrays[schema.UPDATE_NORM].ndim == 3 else -1
        for name, arr in arrays.items():
            if arr.shape != (batch, heads, length):
                raise ValueError(
                    f"layer {layer} {name} has shape {arr.shape}; expected [B, H, L] = {(batch, heads, length)}"
                )
        per_token = batch * heads * length  # C order of [B, H, L]: sequence, then head, then position
        token_parts.append(
            {
                "sequence": np.repeat(np.arange(batch, dtype=np.int64) + sequence_offset, heads * length),
                "layer": np.full(per_token, layer, dtype=np.int32),
                "head": np.tile(np.repeat(np.arange(heads, dtype=np.int32), length), batch),
                "position": np.tile(np.arange(length, dtype=np.int32), batch * heads),
                "token_id": np.repeat(ids[:, None, :], heads, axis=1).ravel(),
                "_label": np.repeat(np.arange(batch * length).reshape(batch, 1, length), heads, axis=1).ravel(),
                **{m: a.ravel() for m, a in arrays.items()},
            }
        )
        mb = {m: _numpy(capture[m]).astype(np.float32) for m in mb_metrics}
        n_mb = mb[schema.DELTA_W_NORM].shape[-1]
        for name, arr in mb.items():
            if arr.shape != (batch, heads, n_mb):
                raise ValueError(f"layer {layer} {name} has shape {arr.shape}; expected [B, H, n_minibatch]")
        per_mb = batch * heads * n_mb
        mb_parts.append(
            {
                "sequence": np.repeat(np.arange(batch, dtype=np.int64) + sequence_offset, heads * n_mb),
                "layer": np.full(per_mb, layer, dtype=np.int32),
                "head": np.tile(np.repeat(np.arange(heads, dtype=np.int32), n_mb), batch),
                "minibatch": np.tile(np.arange(n_mb, dtype=np.int32), batch * heads),
                **{m: a.ravel() for m, a in mb.items()},
            }
        )

    def frame(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    tok = frame(token_parts)
    label_index = tok.pop("_label")
    n_rows = len(label_index)
    token_df = pd.DataFrame(
        {
            "run": pd.Categorical([run] * n_rows),
            "step": np.full(n_rows, step, dtype=np.int64),
            "sequence": tok["sequence"],
            "layer": tok["layer"],
            "head": tok["head"],
            "position": tok["position"],
            "token_id": tok["token_id"],
            "token_text": pd.Categorical.from_codes(texts.codes[label_index], categories=texts.categories),
            "bucket": pd.Categorical.from_codes(buckets.codes[label_index], categories=BUCKETS),
            "retrieval_distance": labels.distance.ravel()[label_index].astype(np.int32),
            **{m: tok[m] for m in token_metrics},
        }
    )
    mbf = frame(mb_parts)
    n_mb_rows = len(mbf["sequence"])
    mb_df = pd.DataFrame(
        {"run": pd.Categorical([run] * n_mb_rows), "step": np.full(n_mb_rows, step, dtype=np.int64), **mbf}
    )
    return token_df, mb_df


def _atomic_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def minibatch_path(table_path: str | Path) -> Path:
    """Where the mini-batch table of ``<name>.parquet`` lives: ``<name>.minibatch.parquet``."""
    path = Path(table_path)
    return path.with_name(f"{path.stem}.minibatch.parquet")


def write_tables(token_df: pd.DataFrame, minibatch_df: pd.DataFrame | None, path: str | Path) -> Path:
    """Write the token table to ``path`` and the mini-batch table beside it (:func:`minibatch_path`), atomically."""
    path = Path(path)
    atomic_write(path, lambda tmp: token_df.to_parquet(tmp, index=False))
    if minibatch_df is not None:
        atomic_write(minibatch_path(path), lambda tmp: minibatch_df.to_parquet(tmp, index=False))
    return path


def read_tables(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Concatenate saved token tables (and their mini-batch tables, where every one has one)."""
    tokens, minibatches = [], []
    for p in map(Path, paths):
        if not p.is_file():
            raise EngramError(
                f"plasticity table {str(p)!r} does not exist; pass a .parquet file written by write_tables"
            )
        df = pd.read_parquet(p)
        missing = [c for c in (*TOKEN_COLUMNS, schema.UPDATE_NORM) if c not in df.columns]
        if missing:
            raise EngramError(f"{str(p)!r} is not a plasticity token table: it lacks the columns {missing}")
        tokens.append(df)
        if minibatch_path(p).is_file():
            minibatches.append(pd.read_parquet(minibatch_path(p)))
    token_df = pd.concat(tokens, ignore_index=True) if len(tokens) > 1 else tokens[0]
    for col, cats in (("bucket", list(BUCKETS)), ("run", None), ("token_text", None)):
        token_df[col] = pd.Categorical(token_df[col].astype(str), categories=cats)
    mb_df = pd.concat(minibatches, ignore_index=True) if minibatches and len(minibatches) == len(tokens) else None
    return token_df, mb_df


# ------------------------------------------------------------------------------------------------ statistics


def bootstrap_mean_ci(
    values: np.ndarray, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean; NaN bounds below two values.

    Percentile rather than BCa: BCa's jackknife is quadratic in n, and for means of thousands of tokens the two agree.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2 or np.all(x == x[0]):
        return (mean, math.nan, math.nan) if x.size < 2 else (mean, mean, mean)
    res = stats.bootstrap(
        (x,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        batch=max(1, 4_000_000 // x.size),  # bounds the resample matrix to ~32 MB
        rng=np.random.default_rng(seed),
    )
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def compare_groups(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Two-sided Mann-Whitney U test of ``x`` against ``y`` with Cliff's delta (positive: ``x`` larger).

    δ = P(X > Y) − P(X < Y) = 2U/(n_x n_y) − 1 with U the Mann-Whitney statistic of ``x`` (ties count one half), so
    it costs a sort instead of all n_x·n_y pairs.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    out: dict[str, Any] = {"test": "Mann-Whitney U, two-sided", "effect": "Cliff's delta", "n_x": len(x), "n_y": len(y)}
    out.update(
        mean_x=float(x.mean()) if len(x) else None,
        mean_y=float(y.mean()) if len(y) else None,
        median_x=float(np.median(x)) if len(x) else None,
        median_y=float(np.median(y)) if len(y) else None,
    )
    if len(x) < 2 or len(y) < 2:
        return {**out, "effect_size": None, "p_value": None, "note": "fewer than two values in a group"}
    res = stats.mannwhitneyu(x, y, alternative="two-sided")
    delta = float(2.0 * res.statistic / (len(x) * len(y)) - 1.0)
    return {**out, "effect_size": delta, "p_value": float(res.pvalue)}


def paired_shift(diffs: np.ndarray) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test that paired differences centre on 0, with the rank-biserial correlation.

    r = (W+ − W−) / (W+ + W−) over the ranks of |d| (zeros dropped, ties mid-ranked): +1 when every difference is
    positive.
    """
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    out: dict[str, Any] = {
        "test": "Wilcoxon signed-rank, two-sided",
        "effect": "rank-biserial correlation",
        "n": len(d),
        "mean_diff": float(d.mean()) if len(d) else None,
        "median_diff": float(np.median(d)) if len(d) else None,
    }
    nonzero = d[d != 0]
    if len(nonzero) < 2:
        return {**out, "effect_size": None, "p_value": None, "note": "fewer than two non-zero differences"}
    ranks = stats.rankdata(np.abs(nonzero))
    w_plus, w_minus = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
    res = stats.wilcoxon(nonzero, alternative="two-sided")
    return {**out, "effect_size": float((w_plus - w_minus) / (w_plus + w_minus)), "p_value": float(res.pvalue)}


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (family-wise error), ``None`` entries left out of the family."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])  # type: ignore[arg-type, return-value]
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * float(pvalues[i])))  # type: ignore[arg-type]
        adjusted[i] = running
    return adjusted


def _verdict(result: Mapping[str, Any], alpha: float) -> str:
    effect, p = result.get("effect_size"), result.get("p_value")
    if effect is None or p is None or p >= alpha or effect == 0:
        return "inconclusive"
    return "supported" if effect > 0 else "contradicted"


def token_layer_matrix(token_df: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(values, tokens)``: the head-mean of ``metric`` per token occurrence (rows) and layer (columns), and the
    token attributes (token_id, bucket, retrieval_distance) of the same rows."""
    if metric not in token_df.columns:
        raise EngramError(f"metric {metric!r} is not a column of the table; choose one of {_metric_columns(token_df)}")
    keys = [*TOKEN_KEYS, "layer"]
    values = token_df.groupby(keys, observed=True, sort=True)[metric].mean().unstack("layer")
    attrs = ["token_id", "bucket", "retrieval_distance"]
    tokens = token_df.groupby(list(TOKEN_KEYS), observed=True, sort=True)[attrs].first().loc[values.index]
    return values, tokens


def _metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c in TOKEN_METRICS]


def within_layer_percentiles(values: pd.DataFrame) -> pd.DataFrame:
    """Each value's mid-rank percentile in (0, 1) among all tokens of its layer (ties share a rank)."""
    return values.rank(axis=0, method="average", pct=False).sub(0.5).div(values.notna().sum(axis=0), axis=1)


def layer_groups(layers: Sequence[int]) -> dict[str, list[int]]:
    """Early, middle and deep thirds of the (sorted) layers; with 12 layers: 0-3, 4-7, 8-11."""
    ordered = sorted(int(la) for la in layers)
    early, middle, deep = (list(map(int, part)) for part in np.array_split(np.array(ordered, dtype=int), 3))
    return {"early": early, "middle": middle, "deep": deep}


def rq1(values: pd.DataFrame, tokens: pd.DataFrame, alpha: float = 0.05) -> dict[str, Any]:
    """RQ1: updates concentrate on Novelty and Retrieval tokens, not on Syntax tokens."""
    bucket = tokens["bucket"].astype(str).to_numpy()
    memory, syntax = np.isin(bucket, MEMORY_BUCKETS), bucket == SYNTAX
    pooled = within_layer_percentiles(values).mean(axis=1).to_numpy()
    overall = compare_groups(pooled[memory], pooled[syntax])
    per_layer = []
    for layer in values.columns:
        col = values[layer].to_numpy()
        per_layer.append({"layer": int(layer), **compare_groups(col[memory], col[syntax])})
    for row, p_adj in zip(per_layer, holm([r["p_value"] for r in per_layer]), strict=True):
        row["p_holm"] = p_adj
    return {
        "hypothesis": "updates concentrate on Novelty and Retrieval tokens, not on Syntax tokens",
        "x": "Novelty + Retrieval tokens",
        "y": "Syntax tokens",
        "verdict": _verdict(overall, alpha),
        "overall": overall,
        "novelty_vs_syntax": compare_groups(pooled[bucket == NOVELTY], pooled[syntax]),
        "retrieval_vs_syntax": compare_groups(pooled[bucket == RETRIEVAL], pooled[syntax]),
        "per_layer": per_layer,
        "layers_supporting": [
            r["layer"] for r in per_layer if _verdict({**r, "p_value": r["p_holm"]}, alpha) == "supported"
        ],
    }


def rq2(values: pd.DataFrame, tokens: pd.DataFrame, long_range: int = 16, alpha: float = 0.05) -> dict[str, Any]:
    """RQ2: middle and deep layers are more plastic for long-range retrieval than early layers."""
    groups = layer_groups(values.columns)
    out: dict[str, Any] = {
        "hypothesis": "middle and deep layers are more plastic for long-range retrieval than early layers",
        "long_range": long_range,
        "layer_groups": groups,
    }
    selected = (tokens["bucket"].astype(str) == RETRIEVAL).to_numpy() & (
        tokens["retrieval_distance"].to_numpy() >= long_range
    )
    out["n_tokens"] = int(selected.sum())
    if not groups["deep"]:
        return {**out, "verdict": "inconclusive", "note": f"needs at least 3 layers, the table has {values.shape[1]}"}
    pct = within_layer_percentiles(values)[selected]

    def shift(later: list[int]) -> dict[str, Any]:
        return paired_shift((pct[later].mean(axis=1) - pct[groups["early"]].mean(axis=1)).to_numpy())

    primary = shift(groups["middle"] + groups["deep"])
    return {
        **out,
        "verdict": _verdict(primary, alpha),
        "middle_and_deep_vs_early": primary,
        "middle_vs_early": shift(groups["middle"]),
        "deep_vs_early": shift(groups["deep"]),
        "per_layer_median_percentile": {int(la): _float(pct[la].median()) for la in pct.columns},
        "per_layer_median_raw": {int(la): _float(values.loc[selected, la].median()) for la in values.columns},
    }


def _float(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def report(token_df: pd.DataFrame, metric: str = schema.UPDATE_NORM, long_range: int = 16, alpha: float = 0.05) -> dict:
    """The RQ1 / RQ2 report as a JSON-ready dict (NaN becomes ``None``)."""
    values, tokens = token_layer_matrix(token_df, metric)
    counts = tokens["bucket"].astype(str).value_counts()
    return json_ready(
        {
            "metric": metric,
            "alpha": alpha,
            "unit": "token occurrence x layer, metric averaged over heads",
            "n_tokens": len(tokens),
            "layers": [int(la) for la in values.columns],
            "runs": sorted(map(str, token_df["run"].unique())),
            "steps": sorted(int(s) for s in token_df["step"].unique()),
            "bucket_counts": {b: int(counts.get(b, 0)) for b in BUCKETS},
            "rq1": rq1(values, tokens, alpha),
            "rq2": rq2(values, tokens, long_range, alpha),
        }
    )


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return _float(float(obj))
    return obj


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.2e}" if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4) else f"{x:.{digits}f}"


def report_markdown(rep: Mapping[str, Any]) -> str:
    """A readable rendering of :func:`report`'s dict."""
    r1, r2 = rep["rq1"], rep["rq2"]
    counts = ", ".join(f"{b} {n}" for b, n in rep["bucket_counts"].items())
    lines = [
        f"# Plasticity report: `{rep['metric']}`",
        "",
        f"Runs {', '.join(rep['runs'])}; steps {rep['steps']}; {rep['n_tokens']} token occurrences ({counts}); "
        f"layers {rep['layers']}. Unit: {rep['unit']}. Significance level α = {rep['alpha']}.",
        "",
        f"## RQ1: {r1['hypothesis']}: **{r1['verdict']}**",
        "",
        "Overall values are within-layer percentiles averaged over layers. Effect size: Cliff's δ = P(x > y) − "
        "P(x < y); positive means the first group updates more. Test: Mann-Whitney U, two-sided.",
        "",
        "| comparison | n (x / y) | mean x | mean y | δ | p |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, res in (
        ("Novelty+Retrieval vs Syntax", r1["overall"]),
        ("Novelty vs Syntax", r1["novelty_vs_syntax"]),
        ("Retrieval vs Syntax", r1["retrieval_vs_syntax"]),
    ):
        lines.append(
            f"| {name} | {res['n_x']} / {res['n_y']} | {_fmt(res['mean_x'])} | {_fmt(res['mean_y'])} | "
            f"{_fmt(res['effect_size'])} | {_fmt(res['p_value'])} |"
        )
    lines += [
        "",
        f"Per layer (raw `{rep['metric']}`, Holm-adjusted p over layers):",
        "",
        "| layer | mean Novelty+Retrieval | mean Syntax | δ | p | p (Holm) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in r1["per_layer"]:
        lines.append(
            f"| {row['layer']} | {_fmt(row['mean_x'])} | {_fmt(row['mean_y'])} | {_fmt(row['effect_size'])} | "
            f"{_fmt(row['p_value'])} | {_fmt(row['p_holm'])} |"
        )
    lines += [
        "",
        f"## RQ2: {r2['hypothesis']}: **{r2['verdict']}**",
        "",
        f"Long-range Retrieval tokens (previous occurrence ≥ {r2['long_range']} tokens back): {r2['n_tokens']}. "
        f"Layer groups: {r2['layer_groups']}.",
    ]
    if "note" in r2:
        lines += ["", f"Not tested: {r2['note']}."]
    else:
        lines += [
            "",
            "Per token: mean within-layer percentile in the later group minus that in the early group. Effect size: "
            "rank-biserial r (positive: later layers rank these tokens higher). Test: Wilcoxon signed-rank, two-sided.",
            "",
            "| comparison | n | mean difference | r | p |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, key in (
            ("middle+deep vs early", "middle_and_deep_vs_early"),
            ("middle vs early", "middle_vs_early"),
            ("deep vs early", "deep_vs_early"),
        ):
            res = r2[key]
            lines.append(
                f"| {name} | {res['n']} | {_fmt(res['mean_diff'])} | {_fmt(res['effect_size'])} | {_fmt(res['p_value'])} |"
            )
        lines += ["", "| layer | median percentile | median raw |", "| --- | --- | --- |"]
        for la in rep["layers"]:
            lines.append(
                f"| {la} | {_fmt(r2['per_layer_median_percentile'].get(str(la)))} | "
                f"{_fmt(r2['per_layer_median_raw'].get(str(la)))} |"
            )
    lines += [
        "",
        "Caveat: tokens of one sequence are not independent, so p-values are optimistic when the table holds few "
        "sequences.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- plots


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def layer_time_matrix(df: pd.DataFrame, metric: str, time: str = "position") -> pd.DataFrame:
    """Mean of ``metric`` per layer (rows) and time step (columns) over runs, steps, sequences and heads."""
    return df.groupby(["layer", time], observed=True)[metric].mean().unstack(time).sort_index()


def plot_layer_time_heatmap(
    df: pd.DataFrame, path: str | Path, metric: str = schema.UPDATE_NORM, time: str = "position"
) -> Path:
    """Layer × Time heat-map as a PNG: raw means (top) and the same z-scored within each layer (bottom)."""
    mat = layer_time_matrix(df, metric, time)
    raw = mat.to_numpy(dtype=np.float64)
    # Raw values span orders of magnitude (TTT's first mini-batch is read at the learned initial state), so both panels
    # work on log10 where every value is positive; otherwise on the values themselves.
    positive = bool(np.all(raw[np.isfinite(raw)] > 0))
    shown = np.log10(raw) if positive else raw
    mean = np.nanmean(shown, axis=1, keepdims=True)
    std = np.nanstd(shown, axis=1, keepdims=True)
    normed = np.divide(shown - mean, std, out=np.zeros_like(shown), where=std > 0)
    layers, times = mat.index.to_numpy(), mat.columns.to_numpy()
    extent = (times[0] - 0.5, times[-1] + 0.5, -0.5, len(layers) - 0.5)
    what = "token position" if time == "position" else time.replace("_", " ")

    # A bare Figure renders with Agg and keeps no pyplot state, so no backend switch and nothing to close.
    # at least 4 inches: with one layer (EMMA's trace) the colour-bar labels would not fit the panels
    fig = Figure(figsize=(11, max(4.0, 2.2 + 0.55 * len(layers))), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    limit = float(np.nanmax(np.abs(normed))) or 1.0
    raw_label = f"log10 mean {_label(metric)}" if positive else f"mean {_label(metric)}"
    panels = (
        (shown, "viridis", None, None, raw_label, "raw (mean over heads and sequences)"),
        (
            normed,
            "RdBu_r",
            -limit,
            limit,
            "z-score within layer",
            f"normalised per layer (z-score{' of log10' if positive else ''} over time)",
        ),
    )
    for ax, (data, cmap, vmin, vmax, cbar_label, subtitle) in zip(axes, panels, strict=True):
        image = ax.imshow(
            data, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax, extent=extent
        )
        ax.set_yticks(range(len(layers)), [str(la) for la in layers])
        ax.set_ylabel("layer")
        ax.set_title(subtitle, fontsize=10)
        fig.colorbar(image, ax=ax, label=cbar_label, pad=0.01)
    axes[-1].set_xlabel(what)
    fig.suptitle(f"Plasticity {_label(metric)}: layer × {what}")
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def bucket_summary(
    token_df: pd.DataFrame, metric: str = schema.UPDATE_NORM, n_resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per layer and bucket: n, mean and 95% bootstrap CI of the per-token head-mean of ``metric``."""
    values, tokens = token_layer_matrix(token_df, metric)
    bucket = tokens["bucket"].astype(str).to_numpy()
    rows = []
    for layer in values.columns:
        col = values[layer].to_numpy()
        for b in BUCKETS:
            sel = col[bucket == b]
            mean, low, high = bootstrap_mean_ci(sel, n_resamples=n_resamples, seed=seed)
            rows.append(
                {"layer": int(layer), "bucket": b, "n": int(sel.size), "mean": mean, "ci_low": low, "ci_high": high}
            )
    return pd.DataFrame(rows)


def plot_bucket_bars(summary: pd.DataFrame, path: str | Path, metric: str = schema.UPDATE_NORM) -> Path:
    """Grouped bars (layer × bucket) of the means in :func:`bucket_summary` with their 95% bootstrap intervals."""
    layers = sorted(summary["layer"].unique())
    present = [b for b in BUCKETS if (summary.loc[summary["bucket"] == b, "n"] > 0).any()]
    width = 0.8 / max(1, len(present))
    fig = Figure(figsize=(max(6.0, 0.9 * len(layers) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(layers))
    for i, b in enumerate(present):
        part = summary[summary["bucket"] == b].set_index("layer").reindex(layers)
        mean = part["mean"].to_numpy(dtype=np.float64)
        err = np.vstack([mean - part["ci_low"].to_numpy(np.float64), part["ci_high"].to_numpy(np.float64) - mean])
        ax.bar(
            x + (i - (len(present) - 1) / 2) * width,
            mean,
            width,
            yerr=np.nan_to_num(err),
            capsize=2,
            color=BUCKET_COLORS[b],
            label=f"{b} (n={int(part['n'].max())} per layer)",
        )
    ax.set_xticks(x, [str(la) for la in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean {_label(metric)} per token")
    ax.set_title(f"Plasticity {_label(metric)} by token bucket\n(mean over heads; error bars: 95% bootstrap CI)")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))


# ------------------------------------------------------------------------------------------------ telemetry

Row = tuple[str, float, int | None, int | None, int | None]


def telemetry_rows(
    token_df: pd.DataFrame,
    minibatch_df: pd.DataFrame | None = None,
    *,
    family: str,
    detail_metric: str = schema.UPDATE_NORM,
    position_bin: int | None = None,
) -> list[Row]:
    """Summary events ``(metric, value, layer, head, position)`` for ``TelemetryWriter.emit_many``, named after the
    model ``family`` that emitted the records (``ttt``, ``titans``, ``emma``: a LightningModule's ``family``).

    * ``{family}/{m}`` per layer, for every metric column ``m`` (mean over all rows of the layer);
    * ``{family}/{m}/{bucket}`` per layer and bucket (bucket in lower case), for every metric;
    * ``{family}/{detail_metric}`` per layer and head;
    * with ``position_bin``: ``{family}/{detail_metric}`` per layer and position bin (``position`` = bin start);
    * ``{family}/{m}`` per layer for the chunk metrics (``delta_w_norm`` ...).
    """
    rows: list[Row] = []
    metrics = _metric_columns(token_df)
    by_layer = token_df.groupby("layer", observed=True)[metrics].mean()
    for layer, vals in by_layer.iterrows():
        rows += [(f"{family}/{m}", float(vals[m]), int(layer), None, None) for m in metrics]
    by_bucket = token_df.groupby(["layer", "bucket"], observed=True)[metrics].mean()
    for (layer, bucket), vals in by_bucket.iterrows():
        rows += [(f"{family}/{m}/{str(bucket).lower()}", float(vals[m]), int(layer), None, None) for m in metrics]
    by_head = token_df.groupby(["layer", "head"], observed=True)[detail_metric].mean()
    rows += [(f"{family}/{detail_metric}", float(v), int(la), int(h), None) for (la, h), v in by_head.items()]
    if position_bin:
        bins = (token_df["position"] // position_bin) * position_bin
        by_pos = token_df.groupby([token_df["layer"], bins.rename("bin")], observed=True)[detail_metric].mean()
        rows += [(f"{family}/{detail_metric}", float(v), int(la), None, int(p)) for (la, p), v in by_pos.items()]
    if minibatch_df is not None:
        mb_metrics = [c for c in minibatch_df.columns if c in MINIBATCH_METRICS]
        for layer, vals in minibatch_df.groupby("layer", observed=True)[mb_metrics].mean().iterrows():
            rows += [(f"{family}/{m}", float(vals[m]), int(layer), None, None) for m in mb_metrics]
    return rows


# ------------------------------------------------------------------------------------------------- analyse


def analyse(
    token_df: pd.DataFrame,
    out_dir: str | Path,
    *,
    minibatch_df: pd.DataFrame | None = None,
    metric: str = schema.UPDATE_NORM,
    long_range: int = 16,
    alpha: float = 0.05,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the heat-map(s), the bucket bar chart, its numbers and the RQ report into ``out_dir``; return the paths.

    Files: ``heatmap_<metric>.png``, ``buckets_<metric>.png``, ``buckets_<metric>.csv``, ``report.json``,
    ``report.md``, and with a mini-batch table ``heatmap_delta_w_norm.png`` (layer × mini-batch index).
    """
    if metric not in _metric_columns(token_df):
        raise EngramError(f"metric {metric!r} is not in the table; choose one of {_metric_columns(token_df)}")
    if long_range < 1:
        raise EngramError(f"long_range={long_range} must be >= 1 (tokens between a word and its previous occurrence)")
    out = Path(out_dir)
    paths = {"heatmap": plot_layer_time_heatmap(token_df, out / f"heatmap_{metric}.png", metric)}
    summary = bucket_summary(token_df, metric, n_resamples=n_resamples, seed=seed)
    paths["buckets"] = plot_bucket_bars(summary, out / f"buckets_{metric}.png", metric)
    paths["buckets_csv"] = atomic_write(out / f"buckets_{metric}.csv", lambda tmp: summary.to_csv(tmp, index=False))
    rep = report(token_df, metric, long_range, alpha)
    paths["report_json"] = _atomic_text(out / "report.json", json.dumps(rep, indent=2, allow_nan=False) + "\n")
    paths["report_md"] = _atomic_text(out / "report.md", report_markdown(rep))
    if minibatch_df is not None and len(minibatch_df):
        paths["heatmap_minibatch"] = plot_layer_time_heatmap(
            minibatch_df, out / "heatmap_delta_w_norm.png", "delta_w_norm", time="minibatch"
        )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.analysis.plasticity", description="Plots and RQ report from saved plasticity tables."
    )
    parser.add_argument("--table", nargs="+", required=True, help="token table(s) (.parquet) from write_tables")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--metric", default=schema.UPDATE_NORM, help="metric column to analyse (default: update_norm)")
    parser.add_argument("--long-range", type=int, default=16, help="RQ2: minimum retrieval distance in tokens")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level for the verdicts")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per interval")
    args = parser.parse_args(argv)
    try:
        token_df, mb_df = read_tables(args.table)
        paths = analyse(
            token_df,
            args.out,
            minibatch_df=mb_df,
            metric=args.metric,
            long_range=args.long_range,
            alpha=args.alpha,
            n_resamples=args.resamples,
        )
    except EngramError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
