"""The cross-family comparison: needle roles and effect sizes on tables with a known answer (``src.analysis.compare``),
the driver (``src.compare``) end to end on a tiny version of the CPU config, resuming, and its one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from data_modules.needle import TokenNeedleDataModule
from src.analysis.buckets import label_batch
from src.analysis.compare import (
    ANSWER,
    CONTRASTS,
    DISTRACTOR_KEY,
    DISTRACTOR_VALUE,
    FILLER,
    KEY,
    QUERY_KEY,
    QUERY_VAL,
    ROLES,
    VALUE,
    analyse_comparison,
    needle_roles,
    plasticity_summary,
)
from src.analysis.plasticity import build_tables
from src.cli import main as cli_main
from src.compare import CompareError, fit_fragment, load_comparison, main, run_comparison
from tests.conftest import CONFIGS

COMPARE_CONFIGS = sorted(CONFIGS.glob("compare_*.yaml"))


def test_needle_roles_of_a_handmade_sequence() -> None:
    text = "w1 <key> k3 <val> v7 w2 <key> k4 <val> v8 w3 <query> k3 <val> v7"
    assert needle_roles(text.split(" ")) == [
        FILLER, "<key>", KEY, "<val>", VALUE, FILLER, "<key>", DISTRACTOR_KEY, "<val>", DISTRACTOR_VALUE, FILLER,
        "<query>", QUERY_KEY, QUERY_VAL, ANSWER,
    ]  # fmt: skip
    assert needle_roles([" w5", "<eos>", "v2"]) == [FILLER, "other", "other"]  # texts keep their leading space


def test_needle_roles_match_the_data_module_layout() -> None:
    data = TokenNeedleDataModule(seq_len=96, num_needles=2, distractors=3)
    tok = data.tokenizer
    for i in range(5):
        example = data.make_split("test")[i]
        roles = needle_roles([tok.decode([t]) for t in example["input_ids"].tolist()])
        assert [roles[s] for s in example["answer_start"].tolist()] == [ANSWER, ANSWER]
        assert [roles[s + 1] for s in example["needle_start"].tolist()] == [KEY, KEY]
        assert roles.count(DISTRACTOR_KEY) == roles.count(DISTRACTOR_VALUE) == 3
        assert roles.count(FILLER) == 96 - 4 * 5 - 4 * 2


def _symbol_table(update: dict[str, float], sequences: int = 6) -> Any:
    """A token table of a 2-layer, 2-head memory whose update norm is set by each token's needle role (plus noise
    far smaller than the gaps between roles, so every comparison of two roles is decided)."""
    data = TokenNeedleDataModule(seq_len=64, num_needles=2, distractors=2)
    tok = data.tokenizer
    ids = np.stack([data.make_split("test")[i]["input_ids"].numpy() for i in range(sequences)])
    roles = np.array([needle_roles([tok.decode([t]) for t in row]) for row in ids.tolist()])
    base = np.vectorize(lambda r: update.get(r, 1.0))(roles)
    rng = np.random.default_rng(0)
    captures = [
        {
            "update_norm": scale * (base[:, None, :] + 1e-3 * rng.random((sequences, 2, 64))),
            "theta": np.full((sequences, 2, 64), 0.5),
            "delta_w_norm": np.ones((sequences, 2, 4)),
        }
        for scale in (1.0, 100.0)  # layers differ in scale: the percentiles must not care
    ]
    labels = label_batch(ids, tok.decode, ignore_ids={tok.pad_id, tok.bos_id, tok.eos_id})
    return build_tables(captures, ids, labels, run="synthetic/v0", step=0)[0]


def test_effect_sizes_have_the_known_sign_and_size() -> None:
    needle = {r: 3.0 for r in ("<key>", KEY, DISTRACTOR_KEY, "<val>", VALUE, DISTRACTOR_VALUE)}
    summary = plasticity_summary(_symbol_table({**needle, "<query>": 0.5, QUERY_KEY: 0.5, QUERY_VAL: 0.5, ANSWER: 0.5}))
    contrasts = summary["contrasts"]
    assert set(contrasts) == set(CONTRASTS)
    assert contrasts["needle_vs_filler"]["effect_size"] == pytest.approx(1.0)  # every needle token above all filler
    assert contrasts["query_vs_filler"]["effect_size"] == pytest.approx(-1.0)
    assert abs(contrasts["queried_vs_distractor"]["effect_size"]) < 0.5  # same update, only noise between them
    roles = summary["roles"]
    assert list(roles) == [r for r in ROLES if r in roles] and roles[FILLER]["n"] == 6 * (64 - 24)
    assert roles[VALUE]["mean_percentile"] > roles[FILLER]["mean_percentile"] > roles[ANSWER]["mean_percentile"]
    assert [row["layer"] for row in summary["by_layer"]] == [0, 1]
    first, second = summary["by_layer"]
    assert second["mean_by_group"]["needle"] == pytest.approx(100 * first["mean_by_group"]["needle"], rel=1e-3)
    assert all(row["needle_vs_filler"]["effect_size"] == pytest.approx(1.0) for row in summary["by_layer"])
    assert summary["metrics_by_role"]["theta"][ANSWER] == pytest.approx(0.5)


def test_a_memory_that_writes_only_the_queried_needle_shows_in_the_control() -> None:
    summary = plasticity_summary(_symbol_table({KEY: 2.0, VALUE: 2.0}))
    assert summary["contrasts"]["queried_vs_distractor"]["effect_size"] == pytest.approx(1.0)


# --- the driver -----------------------------------------------------------------------------------------------------
def _tiny(
    config: Path, tmp_path: Path, families: tuple[str, ...] = ("ttt", "llama"), lengths: tuple[int, ...] = (64,)
) -> Path:
    """``config`` cut to two families, short lengths and two steps, with small splits."""
    spec = yaml.safe_load(config.read_text())
    spec.update(
        steps=2,
        lengths=list(lengths),
        depths=[0.5],
        needle={**spec["needle"], "batch_size": 4, "train_size": 8, "val_size": 4, "test_size": 4},
        plasticity={"max_eval_batches": 1, "max_sequences": 2},
        families={name: spec["families"][name] for name in families},
    )
    path = tmp_path / "compare_tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _finite_numbers(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _finite_numbers(v)]
    return [obj] if isinstance(obj, int | float) and not isinstance(obj, bool) else []


def test_cpu_config_end_to_end_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, out = _tiny(CONFIGS / "compare_needle.yaml", tmp_path, lengths=(48, 64)), tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out), "--threads", "1"]) == 0
    for name in ("report.md", "report.json", "accuracy_length.png", "accuracy_depth.png", "plasticity_roles.png",
                 "plasticity_buckets.png", "plasticity_layers.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    rep = json.loads((out / "report.json").read_text())
    assert all(math.isfinite(x) for x in _finite_numbers(rep))
    assert list(rep["families"]) == ["ttt", "llama"] and rep["lengths"] == [48, 64] and rep["depths"] == [0.5]
    assert rep["tasks_differ"] is False and rep["task"]["num_values"] == 64  # the lengths differ, nothing else
    assert rep["families"]["ttt"]["memory"] is True and rep["families"]["llama"]["memory"] is False
    assert 50_000 < rep["families"]["llama"]["params"] < 300_000
    assert [(r["family"], r["length"]) for r in rep["runs"]] == [("ttt", 48), ("ttt", 64), ("llama", 48), ("llama", 64)]
    ttt, llama = rep["runs"][1], rep["runs"][3]
    for run in rep["runs"]:
        assert run["status"] == "ok" and run["steps"] == 2
        assert set(run["accuracy"]) == {"uniform", "d0.50"} and all(0 <= a <= 1 for a in run["accuracy"].values())
    assert llama["plasticity"] is None
    plasticity = ttt["plasticity"]
    assert plasticity["n_sequences"] == 2 and plasticity["layers"] == [0, 1, 2]
    assert {ANSWER, KEY, DISTRACTOR_VALUE, FILLER} <= set(plasticity["roles"])
    assert set(plasticity["contrasts"]) == set(CONTRASTS)
    assert plasticity["contrasts"]["needle_vs_filler"]["effect_size"] is not None
    assert "| TTT-Linear |" in (out / "report.md").read_text()
    # Nothing outside the output folder; each run in its own folder with one folder per evaluation.
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["llama-L48", "llama-L64", "ttt-L48", "ttt-L64"]
    assert (out / "runs" / "ttt-L64" / "eval-uniform" / "plasticity" / "test").is_dir()

    # A rerun finds every step recorded and only rewrites the report.
    before = (out / "runs" / "ttt-L64" / "run.json").read_text()
    capsys.readouterr()
    assert main(["--config", str(config), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done earlier") == 4
    assert (out / "runs" / "ttt-L64" / "run.json").read_text() == before

    # The analysis alone, on the existing run folders.
    paths = analyse_comparison(out / "runs", tmp_path / "again")
    assert json.loads(paths["report_json"].read_text()) == rep

    # The same folder with other settings is refused, naming the folder.
    spec = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**spec, "steps": 3}, sort_keys=False))
    with pytest.raises(CompareError, match="ttt-L48 was made with other settings"):
        run_comparison(load_comparison(config), out)


@pytest.mark.parametrize("config", COMPARE_CONFIGS, ids=lambda p: p.name)
def test_every_family_of_the_compare_configs_parses(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    comparison = load_comparison(config)
    assert len(comparison.families) == 5 and comparison.steps > 0
    longest = comparison.lengths[-1]
    for family in comparison.families:
        fragment = tmp_path / f"{family.name}.yaml"
        fragment.write_text(yaml.safe_dump(fit_fragment(comparison, family, longest)))
        configs = [a for c in family.configs for a in ("--config", c)]
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", *configs, "--config", str(fragment), "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["data"]["init_args"]["seq_len"] == longest, family.name
        assert printed["trainer"]["max_steps"] == comparison.steps
        assert printed["trainer"]["callbacks"] is None or all(
            "PlasticityCallback" not in c["class_path"] for c in printed["trainer"]["callbacks"]
        )  # capture belongs to the test runs, not to every training step


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stepz": 3}, "unknown keys ['stepz']"),
        ({"steps": 0}, "steps must be a whole number >= 1, not 0"),
        ({"lengths": []}, "lengths must be a non-empty list"),
        ({"depths": [1.5]}, "depths must be a list of numbers in [0, 1]"),
        ({"needle": {"seq_len": 64}}, "needle keys ['seq_len'] are not TokenNeedleDataModule settings"),
        ({"families": {"x": {"configs": ["configs/nope.yaml"]}}}, "config configs/nope.yaml is not a file"),
        ({"families": {"x": {"configs": ["configs/quickstart.yaml"], "overrides": {"data": {}}}}}, "set it in needle"),
        ({"families": {"a/b": {"configs": ["configs/quickstart.yaml"]}}}, "family name 'a/b'"),
    ],
)
def test_mistakes_end_in_one_line(
    change: dict[str, Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {**yaml.safe_load((CONFIGS / "compare_needle.yaml").read_text()), **change}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(spec))
    assert main(["--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_diverging_family_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    config = _tiny(CONFIGS / "compare_needle.yaml", tmp_path, families=("llama", "ttt"))
    spec = yaml.safe_load(config.read_text())
    spec["steps"] = 20
    spec["families"]["llama"]["overrides"]["model"]["init_args"]["lr"] = 1.0e6
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out)]) == 0
    llama, ttt = json.loads((out / "report.json").read_text())["runs"]
    assert llama["status"] == "failed" and "exit code 3" in llama["error"] and llama["accuracy"] == {}
    assert ttt["status"] == "ok" and ttt["plasticity"] is not None
    assert "failed: the fit stopped with exit code 3" in (out / "report.md").read_text()
