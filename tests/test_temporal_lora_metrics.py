"""Hysteresis and fatigue metrics on hand-made router weight traces with known answers; DTW against a naive DP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from src.analysis.temporal_lora import (
    SwitchTrace,
    crystallization_ratio,
    dtw,
    fatigue_analysis,
    fatigue_inputs,
    hysteresis_analysis,
    hysteresis_inputs,
    hysteresis_metrics,
    pearson,
    return_gap,
    route_traces,
    router_weights,
    sustained_crossing,
    tail_area,
)
from src.errors import EngramError
from src.models.temporal_lora import TemporalLoRA, TemporalLoRAConfig


def two_adapter(w_a: list[float] | np.ndarray) -> np.ndarray:
    """(T, 2) weights from the weight of adapter 0 (= domain A)."""
    w_a = np.asarray(w_a, dtype=np.float64)
    return np.stack([w_a, 1.0 - w_a], axis=1)


def naive_dtw(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """O(n·m) DP of the summed squared distances along the best path, and that path's length."""
    n, m = len(x), len(y)
    cost = np.full((n + 1, m + 1), np.inf)
    steps = np.zeros((n + 1, m + 1), dtype=int)
    cost[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d = float(np.sum((x[i - 1] - y[j - 1]) ** 2))
            best = min((cost[i - 1, j - 1], (i - 1, j - 1)), (cost[i - 1, j], (i - 1, j)), (cost[i, j - 1], (i, j - 1)))
            cost[i, j] = d + best[0]
            steps[i, j] = steps[best[1]] + 1
    return math.sqrt(cost[n, m]), int(steps[n, m])


# --- single metrics -------------------------------------------------------------------------------------------------
def test_sustained_crossing_needs_k_consecutive_tokens_strictly_above() -> None:
    trace_ = [0.1, 0.95, 0.95, 0.5, 0.9, 0.91, 0.92, 0.93, 0.99]
    assert sustained_crossing(trace_, 0, 0.9, k=3) == 5  # 0.9 itself is not above; the run 5,6,7 is
    assert sustained_crossing(trace_, 0, 0.9, k=2) == 1
    assert sustained_crossing(trace_, 0, 0.9, k=1) == 1
    assert sustained_crossing(trace_, 3, 0.9, k=3) == 2  # offsets count from start
    assert sustained_crossing(trace_, 0, 0.9, k=3, end=7) is None  # the run would end after `end`
    assert sustained_crossing(trace_, 0, 0.995, k=1) is None


def test_switch_lags_and_asymmetry_on_a_hand_made_aba_trace() -> None:
    w_a = [0.95] * 20  # A
    w_a += [1 - v for v in [0.2, 0.5, 0.8, 0.95, 0.6]] + [0.03] * 15  # B: w_B > 0.9 for good from token 25
    w_a += [0.3, 0.92, 0.93, 0.5, 0.91, 0.95] + [0.96] * 14  # A again: w_A > 0.9 for good from token 44
    t = SwitchTrace(two_adapter(w_a), a=0, b=1, middle_start=20, middle_end=40)
    m = hysteresis_metrics(t)
    assert m["lag_in"] == 5
    assert m["lag_back"] == 4
    assert m["asymmetry"] == {"difference": 1.0, "normalized": pytest.approx(1 / 9)}
    assert m["middle_mean_weight_a"] == pytest.approx((0.8 + 0.5 + 0.2 + 0.05 + 0.4 + 15 * 0.03) / 20)
    # a mix has no single target: no lag in, no asymmetry, the lag back is measured the same way
    mix = hysteresis_metrics(SwitchTrace(two_adapter(w_a), 0, 1, 20, 40, kind="AMixA"))
    assert mix["lag_in"] is None and mix["asymmetry"] is None and mix["lag_back"] == 4


def test_asymmetry_with_censored_or_zero_lags() -> None:
    never_back = two_adapter([0.95] * 10 + [0.0] * 10 + [0.5] * 10)
    m = hysteresis_metrics(SwitchTrace(never_back, 0, 1, 10, 20))
    assert m["lag_in"] == 0 and m["lag_back"] is None
    assert m["asymmetry"] == {"difference": None, "normalized": None}
    instant = hysteresis_metrics(SwitchTrace(two_adapter([1.0] * 5 + [0.0] * 5 + [1.0] * 5), 0, 1, 5, 10))
    assert instant["asymmetry"] == {"difference": 0.0, "normalized": 0.0}


def test_crystallization_relax_time_and_tail_area_on_a_geometric_return() -> None:
    block = np.array([0.99] * 12 + [0.95] * 3 + [0.96] * 3 + [0.5] * 2)  # 0.95 itself is not "deep"
    assert crystallization_ratio(block) == pytest.approx(15 / 20)
    t = np.arange(40)
    w_a = 1.0 - 0.5 ** (t + 1)  # 1 - w_A halves every token: 0.5, 0.25, ...
    # w_A > 0.99  <=>  0.5^(t+1) < 0.01  <=>  t >= 6; k=3 consecutive holds from t=6 on
    assert sustained_crossing(w_a, 0, 0.99, k=3) == 6
    assert tail_area(w_a) == pytest.approx(1.0 - 0.5**32, abs=1e-12)  # Σ_{t<32} 0.5^(t+1)
    assert tail_area(np.full(32, 0.75)) == pytest.approx(8.0)
    with pytest.raises(EngramError, match="32 tokens"):
        tail_area(w_a[:20])


def test_return_gap_cosine_and_euclidean_against_closed_forms() -> None:
    first = two_adapter([1.0, 1.0, 0.0, 0.0])
    second = two_adapter([0.0, 0.0, 1.0, 1.0, 1.0])  # longer: cosine/euclidean use the first 4 tokens
    gap = return_gap(first, second)
    assert gap["cosine"] == pytest.approx(0.0)  # orthogonal one-hot trajectories
    assert gap["euclidean"] == pytest.approx(math.sqrt(8.0))  # 4 tokens, each off by (1, -1)
    same = return_gap(first, first)
    assert same["cosine"] == pytest.approx(1.0) and same["euclidean"] == 0.0 and same["dtw"] == 0.0


@pytest.mark.parametrize(("n", "m", "dim"), [(7, 7, 1), (12, 9, 2), (30, 41, 3)])
def test_dtw_equals_naive_dp(n: int, m: int, dim: int) -> None:
    rng = np.random.default_rng(n * m)
    x, y = rng.random((n, dim)), rng.random((m, dim))
    distance, path = dtw(x, y)
    expected, expected_path = naive_dtw(x, y)
    assert distance == pytest.approx(expected, rel=1e-9)
    assert path == expected_path
    assert return_gap(x, y)["dtw_rms"] == pytest.approx(expected / math.sqrt(expected_path), rel=1e-9)
    assert dtw(y, x)[0] == pytest.approx(distance, rel=1e-12)  # symmetric


def test_dtw_absorbs_a_delay_that_euclidean_does_not() -> None:
    base = np.sin(np.linspace(0, 3 * np.pi, 50))
    delayed = np.concatenate([np.full(3, base[0]), base])  # the same trajectory, 3 tokens late
    gap = return_gap(base, delayed)
    assert gap["dtw"] == pytest.approx(0.0, abs=1e-12)  # repeated tokens are free under warping
    assert gap["euclidean"] > 1.0
    assert dtw(base, base)[0] == 0.0


def test_pearson_matches_the_t_distribution_formula() -> None:
    x = [16, 16, 32, 32, 64, 64, 128, 128]
    y = [1.0, 2.0, 2.5, 2.0, 4.0, 5.5, 7.0, 9.0]
    got = pearson(x, y)
    xs, ys = np.array(x, float), np.array(y, float)
    r = np.sum((xs - xs.mean()) * (ys - ys.mean())) / math.sqrt(
        np.sum((xs - xs.mean()) ** 2) * np.sum((ys - ys.mean()) ** 2)
    )
    t_stat = r * math.sqrt((len(x) - 2) / (1 - r * r))
    assert got["r"] == pytest.approx(r, rel=1e-10)
    assert got["p"] == pytest.approx(2 * stats.t.sf(abs(t_stat), len(x) - 2), rel=1e-6)
    assert pearson(x, [1.0] * 8)["r"] is None  # constant: undefined, said so
    assert pearson(x, [1.0, None, None, None, None, None, None, 2.0])["note"] == "fewer than 3 points"


# --- reports --------------------------------------------------------------------------------------------------------
def test_hysteresis_analysis_writes_json_and_png(tmp_path) -> None:
    w_a = [0.95] * 20 + [0.5, 0.05] + [0.02] * 18 + [0.4, 0.6, 0.95, 0.97] + [0.99] * 16
    traces = [
        SwitchTrace(two_adapter(w_a), 0, 1, 20, 40),  # lag in 1, lag back 2
        SwitchTrace(two_adapter([0.95] * 20 + [0.02] * 20 + [0.99] * 20), 0, 1, 20, 40),  # 0, 0
        SwitchTrace(two_adapter([0.95] * 20 + [0.5] * 20 + [0.3] * 5 + [0.99] * 15), 0, 1, 20, 40, "AMixA"),
    ]
    result = hysteresis_analysis(traces, tmp_path)
    on_disk = json.loads((tmp_path / "hysteresis.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    aba = on_disk["summary"]["ABA"]
    assert aba["lag_in"]["mean"] == 0.5 and aba["lag_back"]["mean"] == 1.0
    assert aba["asymmetry"]["difference"]["mean"] == pytest.approx(-0.5)
    assert on_disk["summary"]["AMixA"]["lag_back"]["mean"] == 5.0
    assert on_disk["summary"]["AMixA"]["middle_mean_weight_a"]["mean"] == pytest.approx(0.5)
    assert (tmp_path / "hysteresis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_fatigue_analysis_finds_a_built_in_trend(tmp_path) -> None:
    """Longer B blocks -> slower return: 1 - w_A decays by a factor that depends on the block length."""
    traces = []
    for block in (16, 32, 64, 128):
        decay = 0.5 + block / 400  # 0.54 ... 0.82: slower relaxation after longer blocks
        tail = 1.0 - 0.5 * decay ** np.arange(64)
        w_b_block = np.r_[np.linspace(0.5, 0.99, 8), np.full(block - 8, 0.99)]
        traces.append(SwitchTrace(two_adapter(np.r_[np.full(32, 0.99), 1 - w_b_block, tail]), 0, 1, 32, 32 + block))
    result = fatigue_analysis(traces, tmp_path)
    rows = {m["block_len"]: m for m in result["per_trace"]}
    for block, row in rows.items():
        decay = 0.5 + block / 400
        assert row["crystallization"] == pytest.approx(
            np.mean(np.linspace(0.5, 0.99, 8) > 0.95) * 8 / block + (block - 8) / block
        )
        assert row["relax_time"] == math.ceil(math.log(0.02) / math.log(decay))  # 0.5·d^t < 0.01
        assert row["tail_area"] == pytest.approx(0.5 * (1 - decay**32) / (1 - decay))
    trend = result["pearson_vs_block_len"]
    lengths = sorted(rows)
    for key in ("crystallization", "relax_time", "tail_area"):
        expected_r = np.corrcoef(lengths, [rows[n][key] for n in lengths])[0, 1]
        assert trend[key]["r"] == pytest.approx(expected_r, rel=1e-10) and trend[key]["n"] == 4
    assert trend["relax_time"]["r"] > 0.9 and trend["tail_area"]["r"] > 0.9
    assert json.loads((tmp_path / "fatigue.json").read_text())["by_block_len"]["64"]["relax_time"]["n"] == 1
    assert (tmp_path / "fatigue.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_traces_are_user_errors() -> None:
    with pytest.raises(EngramError, match="three non-empty segments"):
        SwitchTrace(two_adapter([1.0] * 10), 0, 1, 5, 10)
    with pytest.raises(EngramError, match="no traces"):
        hysteresis_analysis([], "unused")


# --- building sequences and tracing a real router over them ---------------------------------------------------------
def test_inputs_follow_the_plans_and_tracing_keeps_order(tmp_path) -> None:
    streams = [torch.arange(0, 100), torch.arange(100, 200)]  # token ids tell the domain
    items = hysteresis_inputs(streams, a=0, b=1, segment_len=20, n_sequences=2, seed=1, mix_chunk=5)
    assert [meta["kind"] for _, meta in items] == ["ABA", "ABA", "AMixA", "AMixA"]
    ids, _ = items[0]
    assert (ids[:20] < 100).all() and (ids[20:40] >= 100).all() and (ids[40:] < 100).all()
    mix = items[2][0][20:40]
    assert [(c >= 100).all().item() for c in mix.split(5)] == [True, False, True, False]  # B first, then A, ...
    fatigue = fatigue_inputs(streams, 0, 1, block_lengths=[8, 24], n_per_length=2, lead_len=16, tail_len=32)
    assert [len(x) for x, _ in fatigue] == [56, 56, 72, 72]

    torch.manual_seed(0)
    model = TemporalLoRA(TemporalLoRAConfig.from_name("tiny", n_embd=32, vocab_size=200, router_hidden=16)).eval()
    traces = route_traces(fatigue[::-1] + items, model.route, batch_size=3)  # mixed lengths, batches of 3
    for (ids, _), t in zip(fatigue[::-1] + items, traces, strict=True):
        alone = model.route(ids[None]).weights[0].numpy()
        assert np.allclose(t.weights, alone, atol=1e-6)
    assert hysteresis_analysis(traces[4:], tmp_path)["summary"]["ABA"]["n"] == 2
    assert len(fatigue_analysis(traces[:4], tmp_path)["per_trace"]) == 4
    assert len(router_weights(model.route, [])) == 0
