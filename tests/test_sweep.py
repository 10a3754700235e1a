"""The local sweep driver (``python -m src.sweep``): a W&B sweep YAML run by Optuna, each trial a CLI process.

A real sweep of three tiny CPU trials (and its resume) runs through ``python -m src.cli``; failure handling, stale
trials and bad input use a stand-in for the CLI (``src.sweep.CLI``) that needs no torch import."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

import src.sweep as sweep_module
from src.sweep import PARAMS_SLOT, Param, load_sweep, main
from tests.conftest import REPO

TINY = "tests/fixtures/sweep_tiny.yaml"  # gemma_tiny's lr, 3 CPU steps a trial (tests/fixtures/sweep_trial_fast.yaml)
LR = "model.init_args.lr"
PROGRESS = re.compile(r"^\[sweep\] \d+/\d+ trial \d+: ", re.MULTILINE)  # one line per finished trial


def _sweep(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "src.sweep", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    sweep_dir = tmp_path_factory.mktemp("sweep") / "tiny"
    return sweep_dir, _sweep([TINY, "--trials", "3", "--parallel", "2", "--dir", str(sweep_dir)])


def test_local_sweep_writes_the_table_and_the_best_config(tiny_sweep: tuple[Path, subprocess.CompletedProcess[str]]):
    sweep_dir, result = tiny_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(sweep_dir)
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and {r["state"] for r in rows} == {"COMPLETE"}
    losses = [float(r["val/loss"]) for r in rows]
    assert all(math.isfinite(v) for v in losses) and len({r[LR] for r in rows}) == 3
    best = min(rows, key=lambda r: float(r["val/loss"]))
    config = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert config["model"]["init_args"]["lr"] == pytest.approx(float(best[LR]), rel=1e-12)
    assert config["run"]["dir"] is None  # freed: `fit --config best.yaml` starts a new run
    # One progress line per trial, then the table with the best trial starred.
    assert len(PROGRESS.findall(result.stdout)) == 3
    assert f"{best['trial']} *" in result.stdout
    # Each trial ran the sweep command's configs, without the W&B logger fragment, in its own run directory.
    trial = yaml.safe_load((sweep_dir / "trial_000" / "config.yaml").read_text())
    assert trial["trainer"]["max_steps"] == 3 and trial["trainer"]["logger"] is None
    assert trial["run"]["dir"] == str(sweep_dir / "trial_000")
    assert (sweep_dir / "trial_000" / "trial.log").is_file() and (sweep_dir / "study.db").is_file()


def test_resume_adds_only_the_missing_trials(tiny_sweep: tuple[Path, subprocess.CompletedProcess[str]]):
    sweep_dir, first = tiny_sweep
    assert first.returncode == 0, first.stderr[-3000:]
    before = _rows(sweep_dir)
    result = _sweep([TINY, "--trials", "4", "--dir", str(sweep_dir), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(sweep_dir)
    assert rows[:3] == before and [r["trial"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[3]["state"] == "COMPLETE" and rows[3][LR] not in {r[LR] for r in before}
    assert sorted(p.name for p in sweep_dir.glob("trial_*")) == [f"trial_00{i}" for i in range(4)]
    assert PROGRESS.findall(result.stdout) == ["[sweep] 4/4 trial 3: "]


# --- with a stand-in CLI: failed trials, interrupted trials -------------------------------------------------------
FAKE_CLI = """
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
run_dir = Path(args[args.index("--run.dir") + 1])
(run_dir / "gpu.txt").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "none"))
lr = json.loads(Path(args[args.index("--config") + 1]).read_text())["model.init_args.lr"]
if lr == 0.5:
    sys.exit("error: training diverged (a stand-in)")
(run_dir / "config.yaml").write_text(f"model:\\n  init_args:\\n    lr: {lr}\\nrun:\\n  dir: {run_dir}\\n")
(run_dir / "metrics.csv").write_text("epoch,step,val/loss\\n" + ("" if lr == 0.25 else f"0,1,{lr + 1}\\n"))
"""


def _fake_sweep(tmp_path: Path, method: str, values: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    fake = tmp_path / "fake_cli.py"
    fake.write_text(FAKE_CLI)
    monkeypatch.setattr(sweep_module, "CLI", [sys.executable, str(fake)])
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "method": method, "parameters": {LR: yaml.safe_load(values)}}))
    return path


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    path = _fake_sweep(tmp_path, "grid", "{values: [0.1, 0.25, 0.5, 0.05]}", monkeypatch)
    assert main([str(path), "--dir", str(tmp_path / "out")]) == 0  # grid: --trials defaults to its 4 points
    rows = {float(r[LR]): r for r in _rows(tmp_path / "out")}
    assert rows[0.1]["state"] == rows[0.05]["state"] == "COMPLETE"
    assert rows[0.25]["state"] == "FAIL" and "no val/loss in metrics.csv" in rows[0.25]["error"]
    assert rows[0.5]["state"] == "FAIL" and rows[0.5]["exit_code"] == "1"
    assert "error: training diverged (a stand-in)" in rows[0.5]["error"]
    assert yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())["model"]["init_args"]["lr"] == 0.05
    out = capsys.readouterr().out
    assert out.count("FAIL") == 4 and f"best: trial {rows[0.05]['trial']}," in out  # 2 progress lines, 2 table rows


def test_one_gpu_per_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fake_sweep(tmp_path, "grid", "{values: [0.1, 0.2, 0.3, 0.4, 0.6]}", monkeypatch)
    assert main([str(path), "--gpus", "0,3", "--dir", str(tmp_path / "out")]) == 0  # 2 at a time, one per GPU
    seen = [(tmp_path / "out" / f"trial_00{i}" / "gpu.txt").read_text() for i in range(5)]
    assert set(seen) == {"0", "3"} and seen[:2] in (["0", "3"], ["3", "0"])


def test_every_trial_failing_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    path = _fake_sweep(tmp_path, "grid", "{values: [0.5]}", monkeypatch)
    assert main([str(path), "--dir", str(tmp_path / "out")]) == 1
    assert "error: no trial finished with a val/loss (trial 0: exit code 1" in capsys.readouterr().err
    assert not (tmp_path / "out" / "best.yaml").exists()


def test_a_trial_left_running_by_a_killed_driver_runs_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = _fake_sweep(tmp_path, "random", "{distribution: uniform, min: 0.01, max: 0.2}", monkeypatch)
    assert main([str(path), "--trials", "2", "--dir", str(tmp_path / "out")]) == 0
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    stale = study.ask()  # as a driver killed with -9 leaves it: RUNNING, never told
    lr = load_sweep(path).params[0].suggest(stale)
    assert main([str(path), "--trials", "3", "--dir", str(tmp_path / "out"), "--resume"]) == 0
    rows = _rows(tmp_path / "out")
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert rows[2]["error"] == "interrupted; rerun as trial 3" and float(rows[3][LR]) == lr


# --- the sweep YAML -----------------------------------------------------------------------------------------------
def test_the_wandb_sweep_yaml_reads_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    sweep = load_sweep("sweeps/quickstart_lr.yaml")
    assert (sweep.method, sweep.metric, sweep.goal) == ("bayes", "val/loss", "minimize")
    assert sweep.args == ["--config", "configs/quickstart.yaml", "--config", PARAMS_SLOT]  # W&B logger left out
    assert sweep.params == [
        Param(LR, "float", low=1e-4, high=1e-2, log=True),
        Param("model.init_args.warmup_steps", "categorical", choices=[10, 30, 100]),
        Param("data.init_args.batch_size", "categorical", choices=[8, 16, 32]),
    ]


def test_distributions_map_to_optuna(tmp_path: Path) -> None:
    spec = {
        "method": "random",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {
            "a": {"values": ["x", None]},
            "b": {"value": 3},
            "c": {"min": 1, "max": 4},  # ints: int_uniform, as W&B infers
            "d": {"min": 0.5, "max": 1.5},
            "e": {"distribution": "q_uniform", "min": 0, "max": 10, "q": 4},
            "f": {"distribution": "log_uniform", "min": 0, "max": 1},
            "g": {"distribution": "log_uniform_values", "min": "1e-5", "max": "1e-3"},
        },
        "command": ["${env}", "${interpreter}", "-m", "src.cli", "fit", "--config", "${args_json_file}"],
    }
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    assert sweep.params == [
        Param("a", "categorical", choices=["x", None]),
        Param("b", "categorical", choices=[3]),
        Param("c", "int", low=1, high=4),
        Param("d", "float", low=0.5, high=1.5),
        Param("e", "int", low=0, high=8, step=4),
        Param("f", "float", low=1.0, high=math.e, log=True),
        Param("g", "float", low=1e-5, high=1e-3, log=True),
    ]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = {p.name: p.suggest(trial) for p in sweep.params}
        assert values["c"] in range(1, 5) and values["e"] in (0, 4, 8) and 1e-5 <= values["g"] <= 1e-3
        study.tell(trial, 0.0)
    json.dumps(values)  # a trial's parameter file


# --- bad input: one line on stderr, exit code 2, nothing written --------------------------------------------------
GOOD = {
    "method": "random",
    "metric": {"name": "val/loss", "goal": "minimize"},
    "parameters": {LR: {"distribution": "uniform", "min": 0.001, "max": 0.01}},
    "command": ["${env}", "${interpreter}", "-m", "src.cli", "fit", "--config", "${args_json_file}"],
}
BAD = [
    ("missing-yaml", None, [], "does not exist"),
    ("unknown-method", {"method": "hyperband"}, [], "method 'hyperband' is not one of grid, random, bayes"),
    ("bad-goal", {"metric": {"name": "val/loss", "goal": "lowest"}}, [], "goal 'lowest'"),
    ("bad-distribution", {"parameters": {LR: {"distribution": "normal", "mu": 0, "sigma": 1}}}, [],
     f"parameter {LR}: distribution 'normal' is not supported by the local driver; use one of: values, constant"),
    ("min-above-max", {"parameters": {LR: {"min": 0.1, "max": 0.01}}}, [], "must be below max"),
    ("grid-over-a-range", {"method": "grid"}, [], "method grid needs a finite set"),
    ("command-not-the-cli", {"command": ["python", "train.py"]}, [], "command must run Engram's CLI"),
    ("missing-config", {"command": [*GOOD["command"], "--config", "configs/nope.yaml"]}, [], "configs/nope.yaml is not a file"),
    ("parallel-zero", {}, ["--parallel", "0"], "--parallel 0 must be at least 1"),
    ("parallel-over-gpus", {}, ["--parallel", "3", "--gpus", "0,1"], "--gpus 0,1,0,1"),
    ("trials-zero", {}, ["--trials", "0"], "--trials 0 must be at least 1"),
    ("no-trials", {}, [], "give --trials N"),
    ("unknown-option", {}, ["--trails", "3"], "unrecognized arguments: --trails 3"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "args", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(change: dict | None, args: list[str], message: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "sweep.yaml"
    if change is not None:
        path.write_text(yaml.safe_dump({**GOOD, **change}))
    trials = [] if message == "give --trials N" or "--trials" in args else ["--trials", "2"]
    assert main([str(path), *trials, *args, "--dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_study_is_not_restarted_without_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    path = _fake_sweep(tmp_path, "grid", "{values: [0.1]}", monkeypatch)
    assert main([str(path), "--dir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main([str(path), "--dir", str(tmp_path / "out")]) == 2
    assert "already holds a study; add --resume" in capsys.readouterr().err
    _fake_sweep(tmp_path, "grid", "{values: [0.1, 0.2]}", monkeypatch)  # the same file, another grid
    assert main([str(path), "--dir", str(tmp_path / "out"), "--resume"]) == 2
    assert "changed its parameters since the study" in capsys.readouterr().err


def test_bad_input_from_the_shell_is_one_line(tmp_path: Path) -> None:
    result = _sweep([str(tmp_path / "missing.yaml"), "--trials", "2"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "does not exist" in result.stderr
