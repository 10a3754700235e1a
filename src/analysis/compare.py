"""The cross-family comparison report: accuracy against context length and needle depth, and where (layer) and on
which tokens each family's memory updates, with effect sizes.

Reads the run folders of ``python -m src.compare`` (each holds a ``run.json``: the family, the length, the fit and
every test evaluation with its accuracy and, for families with test-time memory, its plasticity tables) and writes
into one folder:

* ``report.md`` and ``report.json`` (the same numbers; ``null`` where a value does not exist);
* ``accuracy_length.png`` (answer accuracy on the training layout per family and length), ``accuracy_depth.png``
  (one queried needle at a fixed depth, one panel per length);
* ``plasticity_roles.png`` and ``plasticity_buckets.png`` (mean within-layer percentile of the update norm by needle
  role and by word bucket, per family and length), ``plasticity_layers.png`` (raw update norm per layer for filler,
  needle and query tokens).

``python -m src.analysis.compare --runs DIR --out DIR`` re-writes the report from existing run folders.

**Needle roles.** The word buckets of ``buckets.py`` (Syntax / Retrieval / Novelty / Other) mean little on symbol
needles (no stop words; every repeated filler symbol is "Retrieval"), so each token also gets its role in the
``TokenNeedleDataModule`` layout, read from the token texts alone: a needle ``<key> k <val> v`` (``k`` is the
*key* and ``v`` the *value* when the key is queried later in the sequence, else a *distractor key* / *distractor
value*), a query ``<query> k <val>`` (*query key*, *query <val>*: the position that must read the memory to predict
the answer) and the *answer* ``v``; ``w*`` symbols are *filler*, anything else *other*.

**Statistics**, per family and length, on the tables of ``src/analysis/plasticity.py``: the unit is one token
occurrence with the metric averaged over heads (``token_layer_matrix``). Families differ in scale and in layer
count, so roles are compared on each token's within-layer percentile averaged over layers (0.5 = a typical token
of that model). Effect size Cliff's δ = P(x > y) − P(x < y) with a two-sided Mann-Whitney U test
(``compare_groups``): needle tokens vs filler (does the memory write more where there is something to store?),
query tokens vs filler, the queried needle's key and value vs a distractor's (a causal model cannot know at write
time which needle will be asked: δ ≈ 0 is the expected control) and Retrieval vs Novelty. Per layer, δ of needle vs
filler on the raw metric with Holm-adjusted p over the layers. Tokens of one sequence are not independent, so
p-values are optimistic for few sequences.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from src.analysis.buckets import BUCKETS, NOVELTY, RETRIEVAL
from src.analysis.plasticity import (
    TOKEN_KEYS,
    TOKEN_METRICS,
    compare_groups,
    holm,
    json_ready,
    read_tables,
    token_layer_matrix,
    within_layer_percentiles,
)
from src.atomic import atomic_write
from src.errors import EngramError
from src.models.plasticity import UPDATE_NORM

RUN_RECORD = "run.json"  # one per run folder, written by src/compare.py
UNIFORM = "uniform"  # the evaluation on the training layout (needles anywhere)

FILLER, OTHER = "filler", "other"
KEY_MARK, VAL_MARK, QUERY_MARK = "<key>", "<val>", "<query>"
KEY, VALUE, DISTRACTOR_KEY, DISTRACTOR_VALUE = "key", "value", "distractor key", "distractor value"
QUERY_KEY, QUERY_VAL, ANSWER = "query key", "query <val>", "answer"
ROLES: tuple[str, ...] = (
    FILLER, KEY_MARK, KEY, DISTRACTOR_KEY, VAL_MARK, VALUE, DISTRACTOR_VALUE, QUERY_MARK, QUERY_KEY, QUERY_VAL, ANSWER,
    OTHER,
)  # fmt: skip
NEEDLE_ROLES = (KEY_MARK, KEY, DISTRACTOR_KEY, VAL_MARK, VALUE, DISTRACTOR_VALUE)
QUERY_ROLES = (QUERY_MARK, QUERY_KEY, QUERY_VAL, ANSWER)
ROLE_GROUPS: dict[str, tuple[str, ...]] = {"filler": (FILLER,), "needle": NEEDLE_ROLES, "query": QUERY_ROLES}
# name: (what, x roles or buckets, y roles or buckets, labelled by "role" or "bucket")
CONTRASTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]] = {
    "needle_vs_filler": ("needle tokens vs filler", NEEDLE_ROLES, (FILLER,), "role"),
    "query_vs_filler": ("query tokens vs filler", QUERY_ROLES, (FILLER,), "role"),
    "queried_vs_distractor": (
        "queried needle's key+value vs a distractor's",
        (KEY, VALUE),
        (DISTRACTOR_KEY, DISTRACTOR_VALUE),
        "role",
    ),
    "retrieval_vs_novelty": ("Retrieval vs Novelty (word buckets)", (RETRIEVAL,), (NOVELTY,), "bucket"),
}
GROUP_COLORS = {"filler": "#a0a0a0", "needle": "#dd8452", "query": "#4c72b0"}
_SYMBOL = re.compile(r"([kvw])\d+")


# --------------------------------------------------------------------------------------------------- roles


def needle_roles(texts: Sequence[str]) -> list[str]:
    """The role (:data:`ROLES`) of every token of one symbol-needle sequence, from the token texts in order."""
    texts = [str(t).strip() for t in texts]
    roles: list[str] = []
    needles: list[tuple[int, int, str]] = []  # (key index, value index or -1, key text) of every needle
    opener, offset = "", 0  # the marker that opened the current needle or query, and how far back it was
    for i, text in enumerate(texts):
        kind = m.group(1) if (m := _SYMBOL.fullmatch(text)) else text
        offset += 1
        if text in (KEY_MARK, QUERY_MARK):
            opener, offset = text, 0
            roles.append(text)
        elif opener and offset == 1 and kind == "k":
            roles.append(KEY if opener == KEY_MARK else QUERY_KEY)
            if opener == KEY_MARK:
                needles.append((i, -1, text))
        elif opener and offset == 2 and text == VAL_MARK:
            roles.append(VAL_MARK if opener == KEY_MARK else QUERY_VAL)
        elif opener and offset == 3 and kind == "v":
            roles.append(VALUE if opener == KEY_MARK else ANSWER)
            if opener == KEY_MARK:
                needles[-1] = (needles[-1][0], i, needles[-1][2])
            opener = ""
        else:
            opener = ""
            roles.append(FILLER if kind == "w" else OTHER)
    queried = {texts[i] for i, role in enumerate(roles) if role == QUERY_KEY}
    for key_at, value_at, key in needles:
        if key not in queried:
            roles[key_at] = DISTRACTOR_KEY
            if value_at >= 0:
                roles[value_at] = DISTRACTOR_VALUE
    return roles


def token_roles(token_df: pd.DataFrame, index: pd.Index) -> np.ndarray:
    """The needle role of every token occurrence of ``index`` (``TOKEN_KEYS`` levels, as ``token_layer_matrix``)."""
    texts = token_df.groupby(list(TOKEN_KEYS), observed=True, sort=True)["token_text"].first()
    roles = texts.astype(str).groupby(level=list(TOKEN_KEYS[:-1]), observed=True, sort=False).transform(needle_roles)
    return roles.loc[index].to_numpy()


# ------------------------------------------------------------------------------------------------ statistics


def _by_label(labels: np.ndarray, order: Sequence[str], pooled: np.ndarray, raw: np.ndarray) -> dict[str, Any]:
    out = {}
    for label in order:
        sel = labels == label
        if sel.any():
            out[label] = {
                "n": int(sel.sum()),
                "mean_percentile": float(np.nanmean(pooled[sel])),
                "mean": float(np.nanmean(raw[sel])),
            }
    return out


def plasticity_summary(token_df: pd.DataFrame, metric: str = UPDATE_NORM) -> dict[str, Any]:
    """Roles, buckets, contrasts and layers of one run's token table (see the module docstring)."""
    values, tokens = token_layer_matrix(token_df, metric)
    roles = token_roles(token_df, values.index)
    labels = {"role": roles, "bucket": tokens["bucket"].astype(str).to_numpy()}
    pooled = within_layer_percentiles(values).mean(axis=1).to_numpy()
    raw = values.mean(axis=1).to_numpy()
    contrasts = {}
    for name, (what, x, y, by) in CONTRASTS.items():
        result = compare_groups(pooled[np.isin(labels[by], x)], pooled[np.isin(labels[by], y)])
        contrasts[name] = {"what": what, "x": list(x), "y": list(y), **result}
    layers = []
    for layer in values.columns:
        col = values[layer].to_numpy()
        groups = {
            g: float(np.nanmean(col[np.isin(roles, r)])) for g, r in ROLE_GROUPS.items() if np.isin(roles, r).any()
        }
        effect = compare_groups(col[np.isin(roles, NEEDLE_ROLES)], col[roles == FILLER])
        layers.append(
            {"layer": int(layer), "mean": float(np.nanmean(col)), "mean_by_group": groups, "needle_vs_filler": effect}
        )
    for row, p_adj in zip(layers, holm([r["needle_vs_filler"]["p_value"] for r in layers]), strict=True):
        row["needle_vs_filler"]["p_holm"] = p_adj
    metrics_by_role = {}
    # the family's own metrics (Titans θ, η, α ...), raw, by role
    for name in [c for c in token_df.columns if c in TOKEN_METRICS]:
        per_token = token_layer_matrix(token_df, name)[0].mean(axis=1).to_numpy()
        metrics_by_role[name] = {r: float(np.nanmean(per_token[roles == r])) for r in ROLES if (roles == r).any()}
    return {
        "metric": metric,
        "n_tokens": len(values),
        "n_sequences": int(values.index.droplevel("position").nunique()),
        "layers": [int(la) for la in values.columns],
        "roles": _by_label(roles, ROLES, pooled, raw),
        "buckets": _by_label(labels["bucket"], BUCKETS, pooled, raw),
        "contrasts": contrasts,
        "by_layer": layers,
        "metrics_by_role": metrics_by_role,
    }


# --------------------------------------------------------------------------------------------------- runs


def find_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``run.json`` under ``runs_dir``, each with its folder as ``dir``, in family order then length."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise EngramError(f"--runs {str(root)!r} is not a folder; give the runs/ folder of a comparison's output.")
    records = []
    for path in sorted(root.rglob(RUN_RECORD)):
        record = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in ("family", "length", "fit") if k not in record]
        if missing:
            raise EngramError(f"{path} is not a comparison run record: it lacks {missing}.")
        records.append({**record, "dir": path.parent})
    if not records:
        raise EngramError(f"no {RUN_RECORD} under {str(root)!r}; run python -m src.compare first.")
    return sorted(records, key=lambda r: (r.get("order", 0), r["family"], r["length"]))


def run_summary(record: Mapping[str, Any], metric: str = UPDATE_NORM) -> dict[str, Any]:
    """One run of the report: its fit, the accuracy of every evaluation and the plasticity of the captured one."""
    fit = record["fit"]
    evals = record.get("evals", [])
    tables = [record["dir"] / p for e in evals for p in e.get("plasticity_tables", [])]
    plasticity = plasticity_summary(read_tables(tables)[0], metric) if tables else None
    return {
        "family": record["family"],
        "label": record.get("label", record["family"]),
        "length": int(record["length"]),
        "status": fit["status"],
        **({"error": fit["error"]} if "error" in fit else {}),
        **{k: fit.get(k) for k in ("seconds", "steps", "params", "model", "memory", "val_acc")},
        "accuracy": {e["name"]: e["acc"] for e in evals},
        "depths": {e["name"]: e["depth"] for e in evals if e["depth"] is not None},
        "plasticity": plasticity,
    }


def comparison_report(records: Sequence[Mapping[str, Any]], metric: str = UPDATE_NORM) -> dict[str, Any]:
    """The whole report as a JSON-ready dict (NaN becomes ``None``)."""
    runs = [run_summary(r, metric) for r in records]
    tasks: list[dict[str, Any]] = []  # what every run should share: the task but its length; a failed fit has none
    for record in records:
        task = {k: v for k, v in (record.get("task") or {}).items() if k != "seq_len"}
        if task and task not in tasks:
            tasks.append(task)
    task = tasks[0] if tasks else {}
    values = int(task.get("num_values", 0))
    in_context = int(task.get("num_needles", 0)) + int(task.get("distractors", 0))
    families: dict[str, dict[str, Any]] = {}
    for run in runs:
        entry = families.setdefault(run["family"], {"label": run["label"], "params": None, "memory": None})
        for key in ("params", "memory", "model"):
            if run.get(key) is not None:
                entry[key] = run[key]
    return json_ready(
        {
            "metric": metric,
            "task": task,
            "tasks_differ": len(tasks) > 1,
            "chance": {
                "any_value": 1 / values if values else None,
                "a_value_in_context": 1 / in_context if in_context else None,
            },
            "lengths": sorted({run["length"] for run in runs}),
            "depths": sorted({d for run in runs for d in run["depths"].values()}),
            "families": families,
            "runs": runs,
        }
    )


# -------------------------------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _chance_lines(ax: Any, chance: Mapping[str, float | None]) -> None:
    for key, style in (("any_value", ":"), ("a_value_in_context", "--")):
        if chance.get(key):
            ax.axhline(
                chance[key], color="grey", linestyle=style, linewidth=1, label=f"chance ({key.replace('_', ' ')})"
            )


def plot_accuracy_length(rep: Mapping[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for family, info in rep["families"].items():
        points = [(r["length"], r["accuracy"].get(UNIFORM)) for r in rep["runs"] if r["family"] == family]
        points = [(n, a) for n, a in points if a is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=info["label"])
    _chance_lines(ax, rep["chance"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(rep["lengths"], [str(n) for n in rep["lengths"]])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("answer accuracy")
    ax.set_title("Needle retrieval by context length (needles anywhere, as in training)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def plot_accuracy_depth(rep: Mapping[str, Any], path: Path) -> Path:
    lengths = rep["lengths"]
    fig = Figure(figsize=(4.2 * len(lengths) + 1, 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(lengths), sharey=True))
    for ax, length in zip(axes, lengths, strict=True):
        for family, info in rep["families"].items():
            run = next((r for r in rep["runs"] if r["family"] == family and r["length"] == length), None)
            if run is None or not run["depths"]:
                continue
            points = sorted(
                (d, run["accuracy"][name]) for name, d in run["depths"].items() if run["accuracy"][name] is not None
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=info["label"])
        _chance_lines(ax, rep["chance"])
        ax.set_title(f"L = {length}")
        ax.set_xlabel("needle depth (filler share before it)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("answer accuracy (one queried needle)")
    axes[-1].legend(fontsize=8, frameon=False)
    fig.suptitle("Needle retrieval by depth")
    return _save(fig, path)


def plot_percentile_heatmap(rep: Mapping[str, Any], key: str, order: Sequence[str], path: Path, title: str) -> Path:
    """Rows: family and length; columns: the ``order`` labels present; colour: mean within-layer percentile."""
    runs = [r for r in rep["runs"] if r["plasticity"]]
    columns = [c for c in order if any(c in r["plasticity"][key] for r in runs)]
    matrix = np.full((max(1, len(runs)), max(1, len(columns))), np.nan)
    for i, run in enumerate(runs):
        for j, col in enumerate(columns):
            if col in run["plasticity"][key]:
                matrix[i, j] = run["plasticity"][key][col]["mean_percentile"]
    fig = Figure(figsize=(1.0 * len(columns) + 3.5, 0.45 * len(runs) + 2.2), layout="constrained")
    ax = fig.subplots()
    finite = matrix[np.isfinite(matrix)]
    limit = float(np.max(np.abs(finite - 0.5))) if finite.size else 0.5
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=0.5 - limit, vmax=0.5 + limit, aspect="auto")
    for (i, j), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            dark = abs(value - 0.5) > 0.6 * limit  # white on the saturated ends of the colour map
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right")
    ax.set_yticks(range(len(runs)), [f"{r['label']} L={r['length']}" for r in runs])
    fig.colorbar(image, ax=ax, label="within-layer percentile")
    ax.set_title(f"{title}: mean within-layer percentile (0.5 = a typical token of that model)")
    return _save(fig, path)


def plot_layers(rep: Mapping[str, Any], path: Path) -> Path:
    """Rows: memory families; columns: lengths; bars: raw mean metric per layer for filler, needle, query tokens."""
    families = [f for f, info in rep["families"].items() if info.get("memory")]
    lengths = rep["lengths"]
    fig = Figure(figsize=(max(7.0, 3.6 * len(lengths) + 1), 2.8 * max(1, len(families)) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(max(1, len(families)), len(lengths), squeeze=False))
    for i, family in enumerate(families):
        for j, length in enumerate(lengths):
            ax = axes[i, j]
            run = next((r for r in rep["runs"] if r["family"] == family and r["length"] == length), None)
            ax.set_title(f"{rep['families'][family]['label']} L={length}", fontsize=9)
            if run is None or not run["plasticity"]:
                ax.set_axis_off()
                continue
            layers = run["plasticity"]["by_layer"]
            x = np.arange(len(layers))
            width = 0.8 / len(ROLE_GROUPS)
            for k, group in enumerate(ROLE_GROUPS):
                heights = [row["mean_by_group"].get(group, np.nan) for row in layers]
                ax.bar(x + (k - 1) * width, heights, width, color=GROUP_COLORS[group], label=group)
            ax.set_xticks(x, [str(row["layer"]) for row in layers])
            ax.set_yscale("log")
            ax.set_xlabel("layer", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"Where each memory updates: mean {rep['metric']} per layer (raw, log scale)")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- markdown


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.1e}" if x != 0 and abs(x) < 10 ** (-digits) else f"{x:.{digits}f}"


def _effect(result: Mapping[str, Any]) -> str:
    if result.get("effect_size") is None:
        return "–"
    p = result.get("p_holm", result["p_value"])
    return f"{result['effect_size']:+.2f} (p={p:.1g})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def report_markdown(rep: Mapping[str, Any]) -> str:
    """A readable rendering of :func:`comparison_report`'s dict."""
    task, chance, lengths = rep["task"], rep["chance"], rep["lengths"]
    runs = rep["runs"]

    def run(family: str, length: int) -> Mapping[str, Any] | None:
        return next((r for r in runs if r["family"] == family and r["length"] == length), None)

    def acc(r: Mapping[str, Any] | None, name: str) -> str:
        if r is None:
            return "–"
        return "failed" if r["status"] != "ok" else _fmt(r["accuracy"].get(name), 3)

    lines = [
        "# Cross-family comparison: needle retrieval and plasticity",
        "",
        f"Task: `TokenNeedleDataModule`, {task.get('num_needles')} queried needle(s) + {task.get('distractors')} "
        f"distractor(s), {task.get('num_keys')} keys / {task.get('num_values')} values / {task.get('num_filler')} "
        f"filler symbols, batch {task.get('batch_size')}, {task.get('steps')} steps per fit, loss on the answer "
        f"tokens. Chance: {_fmt(chance['any_value'], 3)} (any value), {_fmt(chance['a_value_in_context'])} (a value "
        "present in the context)."
        + (" **Runs differ in their task settings** (see report.json)." if rep["tasks_differ"] else ""),
        "",
        "## Answer accuracy by context length",
        "",
        "Test split, needles placed anywhere as in training (`eval-uniform`).",
        "",
    ]
    lines += _table(
        ["family", "params", *(f"L={n}" for n in lengths)],
        [
            [
                info["label"],
                f"{info['params']:,}" if info.get("params") else "–",
                *(acc(run(f, n), UNIFORM) for n in lengths),
            ]
            for f, info in rep["families"].items()
        ],
    )
    if rep["depths"]:
        names = sorted({name for r in runs for name in r["depths"]}, key=lambda n: float(n[1:]))
        lines += [
            "",
            "## Answer accuracy by needle depth",
            "",
            "One queried needle at the given depth (filler share before it) among as many needles as in training.",
            "",
        ]
        lines += _table(
            ["family", "L", *(f"depth {float(n[1:]):g}" for n in names)],
            [[r["label"], str(r["length"]), *(acc(r, n) for n in names)] for r in runs],
        )
    lines += ["", "## Training", ""]
    lines += _table(
        ["family", "L", "status", "steps", "seconds", "val/acc"],
        [
            [
                r["label"],
                str(r["length"]),
                r["status"] if r["status"] == "ok" else f"failed: {r.get('error', '')}",
                str(r["steps"] or "–"),
                "–" if r["seconds"] is None else f"{r['seconds']:.0f}",
                _fmt(r["val_acc"], 3),
            ]
            for r in runs
        ],
    )
    memory_runs = [r for r in runs if r["plasticity"]]
    no_memory = [info["label"] for info in rep["families"].values() if info.get("memory") is False]
    lines += [
        "",
        f"## Plasticity: on which tokens each memory updates (`{rep['metric']}`)",
        "",
        "Mean within-layer percentile of the update norm per needle role (0.5 = a typical token of that model; "
        "averaged over layers). Effect sizes: Cliff's δ on those percentiles (positive: the first group updates "
        "more), two-sided Mann-Whitney p."
        + (f" {', '.join(no_memory)}: no test-time memory, nothing to record." if no_memory else ""),
        "",
    ]
    role_cols = [c for c in ROLES if any(c in r["plasticity"]["roles"] for r in memory_runs)]
    lines += _table(
        ["family", "L", "tokens", *role_cols],
        [
            [
                r["label"],
                str(r["length"]),
                str(r["plasticity"]["n_tokens"]),
                *(_fmt(r["plasticity"]["roles"].get(c, {}).get("mean_percentile")) for c in role_cols),
            ]
            for r in memory_runs
        ],
    )
    lines += [""]
    lines += _table(
        ["family", "L", *(what for what, *_ in CONTRASTS.values())],
        [
            [r["label"], str(r["length"]), *(_effect(r["plasticity"]["contrasts"][name]) for name in CONTRASTS)]
            for r in memory_runs
        ],
    )
    lines += [
        "",
        "## Plasticity by layer: where each memory updates",
        "",
        f"Raw mean `{rep['metric']}` per layer (all tokens; filler / needle / query tokens) and δ of needle tokens vs "
        "filler on the raw values, Holm-adjusted p over the layers.",
        "",
    ]
    lines += _table(
        ["family", "L", "layer", "mean", "filler", "needle", "query", "δ needle vs filler"],
        [
            [
                r["label"],
                str(r["length"]),
                str(row["layer"]),
                _fmt(row["mean"], 3),
                *(_fmt(row["mean_by_group"].get(g), 3) for g in ROLE_GROUPS),
                _effect(row["needle_vs_filler"]),
            ]
            for r in memory_runs
            for row in r["plasticity"]["by_layer"]
        ],
    )
    lines += [
        "",
        "Word buckets (mean within-layer percentile): "
        + "; ".join(
            f"{r['label']} L={r['length']}: "
            + ", ".join(f"{b} {_fmt(v['mean_percentile'])}" for b, v in r["plasticity"]["buckets"].items())
            for r in memory_runs
        )
        + ".",
        "",
        "Caveat: tokens of one sequence are not independent, so p-values are optimistic for tables of few sequences.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ analyse


def analyse_comparison(runs_dir: str | Path, out_dir: str | Path, metric: str = UPDATE_NORM) -> dict[str, Path]:
    """Write the report and its PNGs for the run folders under ``runs_dir`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    rep = comparison_report(find_runs(runs_dir), metric)
    text = json.dumps(rep, indent=2, allow_nan=False) + "\n"
    paths = {
        "report_json": atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8")),
        "accuracy_length": plot_accuracy_length(rep, out / "accuracy_length.png"),
    }
    if rep["depths"]:
        paths["accuracy_depth"] = plot_accuracy_depth(rep, out / "accuracy_depth.png")
    if any(r["plasticity"] for r in rep["runs"]):
        paths["plasticity_roles"] = plot_percentile_heatmap(
            rep, "roles", ROLES, out / "plasticity_roles.png", f"{metric} by needle role"
        )
        paths["plasticity_buckets"] = plot_percentile_heatmap(
            rep, "buckets", BUCKETS, out / "plasticity_buckets.png", f"{metric} by word bucket"
        )
        paths["plasticity_layers"] = plot_layers(rep, out / "plasticity_layers.png")
    markdown = report_markdown(rep)
    paths["report_md"] = atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.analysis.compare", description="The cross-family comparison report from run folders."
    )
    parser.add_argument("--runs", required=True, help="folder holding the run folders (<out>/runs of src.compare)")
    parser.add_argument("--out", required=True, help="output folder for report.md, report.json and the PNGs")
    parser.add_argument("--metric", default=UPDATE_NORM, help="plasticity metric (default: update_norm)")
    args = parser.parse_args(argv)
    try:
        paths = analyse_comparison(args.runs, args.out, args.metric)
    except EngramError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
