"""The plasticity tables, statistics, plots, report, telemetry summaries and CLI, on synthetic data with known truth,
for the metric sets of every memory family (the analysis knows only the schema of ``src/models/plasticity.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread

from data_modules.tokenizer import ByteTokenizer
from src.analysis.buckets import BUCKETS, BatchBuckets, label_batch
from src.analysis.plasticity import (
    MINIBATCH_METRICS,
    TOKEN_METRICS,
    analyse,
    bootstrap_mean_ci,
    build_tables,
    compare_groups,
    holm,
    layer_groups,
    layer_time_matrix,
    main,
    paired_shift,
    read_tables,
    report,
    telemetry_rows,
    write_tables,
)
from src.errors import EngramError
from src.models import plasticity
from src.telemetry import TelemetryWriter, read_events

ROOT = Path(__file__).resolve().parents[1]
# The per-token metrics each family emits (update_norm first): the tables must take any of these sets.
TTT_METRICS = ("update_norm", "g_norm", "lr", "tau", "loss_pre", "loss_init", "loss_post")
TITANS_METRICS = ("update_norm", "loss_pre", "surprise_past", "theta", "eta", "alpha")
EMMA_METRICS = ("update_norm", "write_strength", "write_cos", "read_cos")


def fake_captures(
    n_layers: int,
    batch: int,
    heads: int,
    length: int,
    n_mb: int,
    as_torch: bool = True,
    metrics: tuple[str, ...] = TTT_METRICS,
) -> list[dict]:
    """Every value encodes where it sits: metric index, layer, sequence, head, position."""
    caps = []
    b, h, t = np.meshgrid(np.arange(batch), np.arange(heads), np.arange(length), indexing="ij")
    bm, hm, tm = np.meshgrid(np.arange(batch), np.arange(heads), np.arange(n_mb), indexing="ij")
    for layer in range(n_layers):
        cap = {}
        for i, m in enumerate(metrics):
            arr = (i * 10000 + layer * 1000 + b * 100 + h * 10 + t).astype(np.float64)
            cap[m] = torch.tensor(arr, dtype=torch.float32) if as_torch else arr
        cap["delta_w_norm"] = (layer * 1000 + bm * 100 + hm * 10 + tm + 0.5).astype(np.float32)
        caps.append(cap)
    return caps


def test_build_tables_rows_and_values_exact() -> None:
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode("the cat, cat"), tok.encode("a dog a dog!")[:12]])
    labels = label_batch(ids, tok.decode)
    batch, length, heads, n_layers, n_mb = 2, 12, 3, 2, 2
    caps = fake_captures(n_layers, batch, heads, length, n_mb)
    caps[1] = {k: np.asarray(v) for k, v in caps[1].items()}  # numpy works as well as torch
    token_df, mb_df = build_tables(caps, ids, labels, run="r1", step=7, sequence_offset=10)

    assert len(token_df) == n_layers * batch * heads * length
    assert len(mb_df) == n_layers * batch * heads * n_mb
    assert not token_df.duplicated(["run", "step", "sequence", "layer", "head", "position"]).any()
    assert list(token_df.columns[:10]) == [
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
    ]
    assert list(token_df.columns[10:]) == list(TTT_METRICS)
    assert set(token_df["run"]) == {"r1"} and set(token_df["step"]) == {7}
    seq = token_df["sequence"].to_numpy() - 10
    la, hd, pos = (token_df[c].to_numpy() for c in ("layer", "head", "position"))
    for i, m in enumerate(TTT_METRICS):
        np.testing.assert_array_equal(token_df[m].to_numpy(), i * 10000 + la * 1000 + seq * 100 + hd * 10 + pos)
    np.testing.assert_array_equal(token_df["token_id"].to_numpy(), ids.numpy()[seq, pos])
    np.testing.assert_array_equal(token_df["bucket"].astype(str).to_numpy(), labels.bucket[seq, pos])
    np.testing.assert_array_equal(token_df["token_text"].astype(str).to_numpy(), labels.token_text[seq, pos])
    np.testing.assert_array_equal(token_df["retrieval_distance"].to_numpy(), labels.distance[seq, pos])
    assert list(token_df["bucket"].cat.categories) == list(BUCKETS)
    # "cat" #2 in row 0 starts at byte 9: Retrieval, 5 tokens after "cat" #1
    row = token_df[
        (token_df.sequence == 10) & (token_df.layer == 1) & (token_df["head"] == 2) & (token_df.position == 9)
    ]
    assert row["bucket"].item() == "Retrieval" and row["retrieval_distance"].item() == 5
    mseq = mb_df["sequence"].to_numpy() - 10
    expected = mb_df["layer"] * 1000 + mseq * 100 + mb_df["head"] * 10 + mb_df["minibatch"] + 0.5
    np.testing.assert_array_equal(mb_df["delta_w_norm"].to_numpy(), expected.to_numpy())


def test_build_tables_rejects_bad_captures() -> None:
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode("abcd")])
    labels = label_batch(ids, tok.decode)
    caps = fake_captures(1, 1, 2, 4, 1)
    with pytest.raises(ValueError, match="expected"):
        build_tables([{**caps[0], "lr": caps[0]["lr"][:, :, :3]}], ids, labels, run="r", step=0)
    with pytest.raises(ValueError, match="unknown keys"):
        build_tables([{**caps[0], "bogus": caps[0]["lr"]}], ids, labels, run="r", step=0)
    for required in ("update_norm", "delta_w_norm"):
        with pytest.raises(ValueError, match=f"missing keys.*{required}"):
            build_tables([{k: v for k, v in caps[0].items() if k != required}], ids, labels, run="r", step=0)
    # family metrics are optional, but every layer of a capture has the same ones
    two = fake_captures(2, 1, 2, 4, 1)
    with pytest.raises(ValueError, match=r"layer 1 capture.*missing keys.*'tau'"):
        build_tables([two[0], {k: v for k, v in two[1].items() if k != "tau"}], ids, labels, run="r", step=0)
    token_df, _ = build_tables([{k: v for k, v in caps[0].items() if k != "tau"}], ids, labels, run="r", step=0)
    assert "tau" not in token_df.columns
    # a known metric becomes an extra column, in the schema's order (k_norm comes before lr)
    token_df, _ = build_tables([{**caps[0], "k_norm": caps[0]["lr"] * 2}], ids, labels, run="r", step=0)
    np.testing.assert_array_equal(token_df["k_norm"].to_numpy(), 2 * token_df["lr"].to_numpy())
    assert list(token_df.columns[10:]) == [m for m in TOKEN_METRICS if m in {*TTT_METRICS, "k_norm"}]


@pytest.mark.parametrize("metrics", [TTT_METRICS, TITANS_METRICS, EMMA_METRICS], ids=["ttt", "titans", "emma"])
def test_every_familys_metric_set_builds_tables_and_reports(tmp_path, metrics: tuple[str, ...]) -> None:
    """The tables, telemetry, plots and report work for whichever schema metrics a family emits: here each family's
    own set, with EMMA's shape (one layer, one head)."""
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode("the cat sat on the mat and the cat")])
    labels = label_batch(ids, tok.decode)
    one_layer = metrics is EMMA_METRICS
    caps = fake_captures(1 if one_layer else 3, 1, 1 if one_layer else 2, ids.shape[1], 3, metrics=metrics)
    token_df, mb_df = build_tables(caps, ids, labels, run="r", step=0)
    assert list(token_df.columns[10:]) == [m for m in TOKEN_METRICS if m in metrics]
    rows = telemetry_rows(token_df, mb_df, family="fam")
    assert {m for m, *_ in rows} >= {f"fam/{m}" for m in metrics} | {"fam/delta_w_norm"}
    paths = analyse(token_df, tmp_path, minibatch_df=mb_df, n_resamples=50)
    assert paths["heatmap"].name == "heatmap_update_norm.png" and paths["heatmap_minibatch"].is_file()
    rep = json.loads(paths["report_json"].read_text())
    assert rep["metric"] == "update_norm" and rep["layers"] == ([0] if one_layer else [0, 1, 2])
    if one_layer:
        assert rep["rq2"]["verdict"] == "inconclusive" and "3 layers" in rep["rq2"]["note"]
    last = metrics[-1]
    assert analyse(token_df, tmp_path / last, metric=last, n_resamples=50)["heatmap"].name == f"heatmap_{last}.png"


def test_check_records_names_the_key_and_shape() -> None:
    """The schema validator the callback runs on every hook's records: one clear error naming layer, key, shape."""
    good = {"update_norm": torch.rand(2, 3, 5), "lr": torch.rand(2, 3, 5), "delta_w_norm": torch.rand(2, 3, 2)}
    good["position"] = torch.arange(5)
    plasticity.check_records([good, dict(good)])
    bad = {
        "lacks the required": ({k: v for k, v in good.items() if k != "delta_w_norm"}, "missing required keys"),
        "unknown key": ({**good, "grad": good["lr"]}, "unknown keys \\['grad'\\]"),
        "token shape": ({**good, "lr": torch.rand(2, 3, 4)}, "layer 1: 'lr' has shape \\(2, 3, 4\\)"),
        "chunk shape": ({**good, "delta_w_norm": torch.rand(2, 1, 2)}, "'delta_w_norm' has shape \\(2, 1, 2\\)"),
        "position dtype": ({**good, "position": torch.arange(5.0)}, "'position' has shape \\(5,\\) and dtype"),
        "other keys": ({k: v for k, v in good.items() if k != "lr"}, "every layer of one capture"),
        "attached": ({**good, "lr": torch.rand(2, 3, 5, requires_grad=True)}, "'lr' is attached"),
    }
    for layer1, message in bad.values():
        with pytest.raises(EngramError, match=message):
            plasticity.check_records([good, layer1])
    with pytest.raises(EngramError, match="empty"):
        plasticity.check_records([])


def synthetic_table(
    seed: int,
    *,
    n_seq: int = 6,
    n_layers: int = 6,
    heads: int = 2,
    length: int = 96,
    memory_boost: float = 1.0,
    late_retrieval_boost: float = 1.0,
    short_retrieval_boost: float = 1.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Log-normal update norms; Novelty/Retrieval tokens scaled by ``memory_boost`` in every layer, long-range
    (distance >= 16) Retrieval tokens by ``late_retrieval_boost`` in the later two thirds of the layers, and
    short-range ones by ``short_retrieval_boost`` there."""
    rng = np.random.default_rng(seed)
    bucket = rng.choice(np.array(BUCKETS, dtype=object), size=(n_seq, length), p=[0.4, 0.2, 0.25, 0.15])
    distance = np.where(bucket == "Retrieval", rng.integers(1, 64, size=(n_seq, length)), -1)
    labels = BatchBuckets(bucket=bucket, token_text=np.full((n_seq, length), "x", dtype=object), distance=distance)
    later = set(layer_groups(range(n_layers))["middle"] + layer_groups(range(n_layers))["deep"])
    caps = []
    for layer in range(n_layers):
        scale = np.where(np.isin(bucket, ["Novelty", "Retrieval"]), memory_boost, 1.0)
        if layer in later:
            scale = scale * np.where((bucket == "Retrieval") & (distance >= 16), late_retrieval_boost, 1.0)
            scale = scale * np.where((bucket == "Retrieval") & (distance < 16), short_retrieval_boost, 1.0)
        update = rng.lognormal(0.0, 0.5, size=(n_seq, heads, length)) * scale[:, None, :] * (1 + layer)
        cap = {m: rng.random((n_seq, heads, length)) for m in TTT_METRICS}
        cap["update_norm"] = update
        cap["delta_w_norm"] = rng.random((n_seq, heads, length // 16))
        caps.append(cap)
    ids = rng.integers(0, 256, size=(n_seq, length))
    return build_tables(caps, ids, labels, run="synthetic", step=0)


def test_rq1_detects_a_real_effect_in_the_right_direction() -> None:
    token_df, _ = synthetic_table(0, memory_boost=1.5)
    rep = report(token_df, "update_norm")
    r1 = rep["rq1"]
    assert r1["verdict"] == "supported"
    assert r1["overall"]["effect_size"] > 0.2 and r1["overall"]["p_value"] < 1e-6
    assert r1["novelty_vs_syntax"]["effect_size"] > 0 and r1["retrieval_vs_syntax"]["effect_size"] > 0
    assert all(row["effect_size"] > 0 for row in r1["per_layer"])
    assert r1["layers_supporting"] == list(range(6))
    reverse, _ = synthetic_table(1, memory_boost=1 / 1.5)
    assert report(reverse, "update_norm")["rq1"]["verdict"] == "contradicted"


def test_rq1_no_effect_is_not_significant_and_calibrated() -> None:
    p_values = []
    for seed in range(30):
        token_df, _ = synthetic_table(100 + seed, n_seq=2, n_layers=3, heads=1, length=64)
        p_values.append(report(token_df, "update_norm")["rq1"]["overall"]["p_value"])
    token_df, _ = synthetic_table(7)
    assert report(token_df, "update_norm")["rq1"]["verdict"] == "inconclusive"
    # under the null a 5% test rejects about 1.5 of 30 times; 6 or more has probability < 0.3%
    assert sum(p < 0.05 for p in p_values) <= 5
    assert 0.3 < float(np.mean(p_values)) < 0.7  # p-values are uniform under the null


def test_rq2_detects_late_layer_long_range_retrieval() -> None:
    token_df, _ = synthetic_table(2, late_retrieval_boost=2.0)
    r2 = report(token_df, "update_norm", long_range=16)["rq2"]
    assert r2["layer_groups"] == {"early": [0, 1], "middle": [2, 3], "deep": [4, 5]}
    assert r2["verdict"] == "supported"
    assert r2["middle_and_deep_vs_early"]["effect_size"] > 0.5 and r2["middle_and_deep_vs_early"]["p_value"] < 1e-6
    assert r2["n_tokens"] == int(((token_df.bucket == "Retrieval") & (token_df.retrieval_distance >= 16)).sum() / 12)
    # boosting only short-range retrievals leaves the long-range test without an effect
    short, _ = synthetic_table(3, short_retrieval_boost=2.0)
    assert report(short, "update_norm", long_range=16)["rq2"]["verdict"] == "inconclusive"
    none, _ = synthetic_table(4)
    assert report(none, "update_norm")["rq2"]["verdict"] == "inconclusive"


def test_rq2_needs_three_layers() -> None:
    token_df, _ = synthetic_table(5, n_layers=2)
    r2 = report(token_df)["rq2"]
    assert r2["verdict"] == "inconclusive" and "3 layers" in r2["note"]


def test_effect_sizes_match_pairwise_oracles() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=40).astype(float)  # ties on purpose
    y = rng.integers(0, 5, size=30).astype(float)
    naive_delta = np.sign(x[:, None] - y[None, :]).mean()
    assert compare_groups(x, y)["effect_size"] == pytest.approx(naive_delta, abs=1e-12)
    assert compare_groups(y, x)["effect_size"] == pytest.approx(-naive_delta, abs=1e-12)

    d = rng.integers(-3, 6, size=50).astype(float)
    nz = d[d != 0]
    a = np.abs(nz)
    ranks = np.array([1 + (a < v).sum() + 0.5 * ((a == v).sum() - 1) for v in a])  # mid-ranks by counting
    naive_r = (ranks[nz > 0].sum() - ranks[nz < 0].sum()) / ranks.sum()
    res = paired_shift(d)
    assert res["effect_size"] == pytest.approx(naive_r, abs=1e-12)
    assert res["n"] == 50 and res["p_value"] < 0.05  # centred on about +1: a real shift
    assert paired_shift(np.ones(10))["effect_size"] == 1.0


def test_holm_adjustment() -> None:
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_bootstrap_interval_contains_true_mean_and_has_nominal_coverage() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=500)
    mean, low, high = bootstrap_mean_ci(x, n_resamples=2000, seed=1)
    assert low < 3.0 < high and mean == pytest.approx(x.mean())
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)  # the normal-theory interval as an independent oracle
    assert low == pytest.approx(mean - half, abs=0.15 * half) and high == pytest.approx(mean + half, abs=0.15 * half)
    covered = 0
    for seed in range(200):
        sample = np.random.default_rng(1000 + seed).exponential(1.0, size=60)
        _, lo, hi = bootstrap_mean_ci(sample, n_resamples=400, seed=seed)
        covered += lo < 1.0 < hi
    assert 0.86 <= covered / 200 <= 0.99  # percentile intervals under-cover a little for skewed data
    assert np.isnan(bootstrap_mean_ci(np.array([1.0]))[1])


def test_layer_time_matrix_is_the_mean_over_sequences_and_heads() -> None:
    token_df, _ = synthetic_table(6, n_seq=3, n_layers=3, heads=2, length=32)
    mat = layer_time_matrix(token_df, "update_norm")
    assert mat.shape == (3, 32)
    sel = token_df[(token_df.layer == 2) & (token_df.position == 17)]
    assert len(sel) == 6
    assert mat.loc[2, 17] == pytest.approx(sel["update_norm"].to_numpy(np.float64).mean(), rel=1e-6)


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_analyse_writes_plots_and_reports(tmp_path) -> None:
    token_df, mb_df = synthetic_table(8, memory_boost=1.5, late_retrieval_boost=2.0)
    paths = analyse(token_df, tmp_path / "out", minibatch_df=mb_df, n_resamples=300)
    for key in ("heatmap", "buckets", "heatmap_minibatch"):
        _assert_png(paths[key])
    rep = json.loads(paths["report_json"].read_text())
    assert rep["rq1"]["verdict"] == "supported" and rep["rq2"]["verdict"] == "supported"
    assert rep["bucket_counts"]["Syntax"] == int((token_df.bucket == "Syntax").sum() / 12)
    md = paths["report_md"].read_text()
    assert "## RQ1" in md and "**supported**" in md and "| 5 |" in md
    summary = pd.read_csv(paths["buckets_csv"])
    assert len(summary) == 6 * len(BUCKETS)
    assert (summary["ci_low"] <= summary["mean"]).all() and (summary["mean"] <= summary["ci_high"]).all()
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_parquet_roundtrip_and_cli(tmp_path, capsys) -> None:
    token_df, mb_df = synthetic_table(9, n_seq=2, n_layers=3, length=48)
    path = write_tables(token_df, mb_df, tmp_path / "plasticity.parquet")
    assert (tmp_path / "plasticity.minibatch.parquet").is_file()
    assert sorted(os.listdir(tmp_path)) == ["plasticity.minibatch.parquet", "plasticity.parquet"]
    back, mb_back = read_tables([path])
    pd.testing.assert_frame_equal(back, token_df, check_categorical=False)
    pd.testing.assert_frame_equal(mb_back, mb_df, check_categorical=False)
    assert list(back["bucket"].cat.categories) == list(BUCKETS)

    assert main(["--table", str(path), "--out", str(tmp_path / "cli"), "--resamples", "200"]) == 0
    for name in ("heatmap_update_norm.png", "buckets_update_norm.png", "heatmap_delta_w_norm.png"):
        _assert_png(tmp_path / "cli" / name)
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["metric"] == "update_norm"
    assert main(["--table", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--table", str(path), "--out", str(tmp_path / "x"), "--metric", "bogus"]) == 2
    assert "'bogus'" in capsys.readouterr().err

    proc = subprocess.run(
        [sys.executable, "-m", "src.analysis.plasticity", "--table", str(path), "--out", str(tmp_path / "m")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "report.md").is_file()


def test_telemetry_rows_round_trip(tmp_path) -> None:
    token_df, mb_df = synthetic_table(10, n_seq=2, n_layers=3, heads=2, length=32)
    rows = telemetry_rows(token_df, mb_df, family="ttt", position_bin=16)
    n_metrics = len(TTT_METRICS)
    per_layer = 3 * n_metrics
    per_bucket = 3 * len(BUCKETS) * n_metrics
    per_head, per_bin, per_mb = 3 * 2, 3 * 2, 3 * len(MINIBATCH_METRICS)
    assert len(rows) == per_layer + per_bucket + per_head + per_bin + per_mb
    values = {(m, la, h, p): v for m, v, la, h, p in rows}
    layer1 = token_df[token_df.layer == 1]
    assert values[("ttt/update_norm", 1, None, None)] == pytest.approx(layer1.update_norm.to_numpy(np.float64).mean())
    nov = layer1[layer1.bucket == "Novelty"]
    assert values[("ttt/loss_pre/novelty", 1, None, None)] == pytest.approx(nov.loss_pre.to_numpy(np.float64).mean())
    head = layer1[layer1["head"] == 1]
    assert values[("ttt/update_norm", 1, 1, None)] == pytest.approx(head.update_norm.to_numpy(np.float64).mean())
    late = layer1[layer1.position >= 16]
    assert values[("ttt/update_norm", 1, None, 16)] == pytest.approx(late.update_norm.to_numpy(np.float64).mean())
    mb1 = mb_df[mb_df.layer == 1]
    assert values[("ttt/delta_w_norm", 1, None, None)] == pytest.approx(mb1.delta_w_norm.to_numpy(np.float64).mean())

    writer = TelemetryWriter(tmp_path / "telemetry.jsonl", run_id="r", family="ttt")
    writer.emit_many(rows, step=3, tokens=100)
    writer.close()
    events = list(read_events(tmp_path / "telemetry.jsonl"))
    assert len(events) == len(rows)
    assert {(e["metric"], e.get("layer"), e.get("head"), e.get("position")) for e in events} == set(values)
