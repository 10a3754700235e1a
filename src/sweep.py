"""Local sweeps: a W&B sweep YAML run by Optuna on this machine, without a W&B server.

    python -m src.sweep sweeps/quickstart_lr.yaml --trials 8 [--parallel N] [--gpus 0,1] [--dir DIR] [--resume]

The same YAML still drives ``wandb sweep``. Read from it: ``method`` (grid, random, bayes), ``metric`` (``name``,
``goal``, optional ``target``), ``parameters`` (flat dotted CLI keys with W&B distributions) and ``command``: the
arguments after ``fit`` are kept, except a config that only adds the W&B logger and the agent's parameter macros;
the driver puts the trial's parameters where ``--config ${args_json_file}`` stood.

Every trial is its own ``python -m src.cli fit ... --config DIR/trial_NNN/params.json --run.dir DIR/trial_NNN``
process, with its output in ``trial_NNN/trial.log``; its metric is the last value of ``metric.name`` in the run's
``metrics.csv``. A trial that exits non-zero, or logs no finite metric, is a failed trial (Optuna's FAIL, with its
exit code and reason); the sweep goes on. The sweep directory (default ``runs/sweeps/<yaml stem>``) holds::

    study.db        the Optuna study (SQLite); --resume continues it up to --trials finished trials
    results.csv     one row per trial: trial, state, metric, seconds, exit code, parameters, run dir, error
    best.yaml       the best trial's config.yaml, its run paths freed: `python -m src.cli fit --config best.yaml`
    trial_NNN/      one run directory per trial (config.yaml, metrics.csv, checkpoints/, params.json, trial.log)

A trial cut short by the driver stopping (Ctrl-C, a kill) is recorded as FAIL without an exit code, is not counted,
and runs again with the same parameters on --resume. Mistakes in the YAML or the options end in one line on stderr
and exit code 2, before any trial starts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import optuna
import yaml
from optuna.trial import FrozenTrial, Trial, TrialState

from src.atomic import atomic_write
from src.errors import EngramError

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "src.cli", "fit"]  # the trial program; tests swap in a stand-in
PARAMS_SLOT = "${args_json_file}"  # where a trial's parameter file goes in its arguments
STUDY_NAME = "sweep"
LOCK = "sweep.lock"
INTERRUPTED = "interrupted: runs again on --resume"
SUPPORTED = (
    "values",
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
)
# Agent macros that carry the parameters; the driver hands them over in its own JSON file instead.
_PARAM_MACROS = ("${args}", "${args_no_hyphens}", "${args_no_boolean_flags}", "${args_json}", PARAMS_SLOT)
_SCALAR = (str, int, float, bool, type(None))


# --- the sweep YAML ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One swept CLI key: a categorical ``choices`` list, or a ``low``..``high`` range (``step``, ``log``)."""

    name: str
    kind: str  # "categorical", "int" or "float"
    choices: list[Any] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False

    def suggest(self, trial: Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[Any] | None:
        """Every value this parameter can take, or None for a continuous range."""
        if self.kind == "categorical":
            return self.choices
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is not None:
            count = round((self.high - self.low) / self.step)
            return [round(self.low + i * self.step, 12) for i in range(count + 1)]
        return None


@dataclass(frozen=True)
class Sweep:
    path: Path
    method: str
    metric: str
    goal: str  # "minimize" or "maximize"
    target: float | None
    params: list[Param]
    args: list[str]  # the CLI arguments after `fit`, with PARAMS_SLOT where the trial's parameters go
    run_cap: int | None
    notes: list[str]

    def identity(self) -> dict[str, Any]:
        """What a resumed study must share with the one it continues."""
        return {
            "method": self.method,
            "metric": [self.metric, self.goal],
            "parameters": [asdict(p) for p in self.params],
            "command": self.args,
        }

    def better(self, a: float, b: float) -> bool:
        return a < b if self.goal == "minimize" else a > b


class SweepError(EngramError):
    """A mistake in the sweep YAML or the driver's options (one line, exit code 2)."""


def _number(value: Any, where: str) -> float:
    """A number from the YAML; PyYAML reads ``1e-4`` (no dot) as a string, so numeric strings count too."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SweepError(f"{where} must be a number, not {value!r}.")
    try:
        return float(value)
    except ValueError:
        raise SweepError(f"{where} must be a number, not {value!r}.") from None


def _param(name: str, spec: Any, where: str) -> Param:
    """A W&B parameter spec as a :class:`Param` (the distribution is inferred as W&B does when none is given)."""
    at = f"{where}: parameter {name}"
    if not isinstance(spec, dict):
        raise SweepError(f"{at} must be a mapping (values: [...], or distribution: ... with min/max).")
    if "parameters" in spec:
        raise SweepError(f"{at} nests parameters; give flat dotted CLI keys (model.init_args.lr) instead.")
    kind = spec.get("distribution")
    if kind is None:
        if "values" in spec:
            kind = "values"
        elif "value" in spec:
            kind = "constant"
        elif all(isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool) for k in ("min", "max")):
            kind = "int_uniform"
        else:
            kind = "uniform"
    if kind not in SUPPORTED:
        raise SweepError(
            f"{at}: distribution {kind!r} is not supported by the local driver; use one of: {', '.join(SUPPORTED)}."
        )
    if kind in ("values", "categorical", "constant"):
        choices = [spec["value"]] if kind == "constant" and "value" in spec else spec.get("values")
        if not isinstance(choices, list) or not choices:
            raise SweepError(f"{at}: {kind} needs {'value: X' if kind == 'constant' else 'a non-empty values: [...]'}.")
        if not all(isinstance(c, _SCALAR) for c in choices):
            raise SweepError(f"{at}: values must be numbers, strings, booleans or null (not lists or mappings).")
        if "probabilities" in spec:
            raise SweepError(f"{at}: probabilities are not supported by the local driver; remove them.")
        return Param(name, "categorical", choices=list(choices))
    for key in ("min", "max"):
        if key not in spec:
            raise SweepError(f"{at}: {kind} needs min and max.")
    low, high = _number(spec["min"], f"{at} min"), _number(spec["max"], f"{at} max")
    if not low < high:
        raise SweepError(f"{at}: min ({spec['min']}) must be below max ({spec['max']}).")
    if kind == "int_uniform":
        if not (low.is_integer() and high.is_integer()):
            raise SweepError(f"{at}: int_uniform needs whole-number min and max.")
        return Param(name, "int", low=low, high=high)
    if kind == "q_uniform":
        q = _number(spec.get("q", 1.0), f"{at} q")
        if q <= 0 or q > high - low:
            raise SweepError(f"{at}: q ({q:g}) must be > 0 and at most max - min ({high - low:g}).")
        high = low + math.floor((high - low) / q + 1e-9) * q  # the last multiple of q from min (as Optuna would)
        if low.is_integer() and q.is_integer():
            return Param(name, "int", low=low, high=high, step=q)
        return Param(name, "float", low=low, high=high, step=q)
    if kind == "log_uniform":  # W&B: min and max are natural logarithms
        return Param(name, "float", low=math.exp(low), high=math.exp(high), log=True)
    if kind == "log_uniform_values":
        if low <= 0:
            raise SweepError(f"{at}: log_uniform_values needs min > 0 (got {spec['min']}).")
        return Param(name, "float", low=low, high=high, log=True)
    return Param(name, "float", low=low, high=high)


def _is_wandb_fragment(path: Path) -> bool:
    """True for a config that only adds W&B loggers (configs/loggers/wandb.yaml): trials here log to metrics.csv."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(config, dict) or set(config) != {"trainer"} or not isinstance(config["trainer"], dict):
        return False
    if set(config["trainer"]) != {"logger"}:
        return False
    loggers = config["trainer"]["logger"]
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return bool(loggers) and all(
        isinstance(spec, dict) and str(spec.get("class_path", "")).endswith("WandbLogger") for spec in loggers
    )


def _trial_args(command: Any, program: Any, where: str, notes: list[str]) -> list[str]:
    """The CLI arguments after ``fit`` in the sweep's ``command``, as the local driver runs them."""
    runs_cli = "command must run Engram's CLI: [${env}, ${interpreter}, -m, src.cli, fit, --config, ...]"
    if not isinstance(command, list) or not all(isinstance(t, str) for t in command):
        raise SweepError(f"{where}: {runs_cli}.")
    if "fit" not in command:
        raise SweepError(f"{where}: {runs_cli} (no `fit` in it).")
    head, rest = command[: command.index("fit")], command[command.index("fit") + 1 :]
    program_tokens = [str(program) if token == "${program}" else token for token in head]
    if not any(token in ("src.cli", "src/cli.py") for token in program_tokens):
        raise SweepError(f"{where}: {runs_cli}.")
    args: list[str] = []
    tokens = iter(rest)
    for token in tokens:
        value: str | None = None
        if token == "--config":
            value = next(tokens, None)
            if value is None:
                raise SweepError(f"{where}: command ends with --config and no file.")
        elif token.startswith("--config="):
            value = token.removeprefix("--config=")
        if value is None:
            if token in _PARAM_MACROS:
                continue
            if token.startswith("${"):
                raise SweepError(f"{where}: command: {token} after `fit` is not understood by the local driver.")
            args.append(token)
        elif value in (PARAMS_SLOT, "${args_json}"):
            if PARAMS_SLOT not in args:
                args += ["--config", PARAMS_SLOT]
        elif _is_wandb_fragment(Path(value)):
            notes.append(f"left out {value} (W&B logger): trials log to their metrics.csv")
        elif not Path(value).is_file():
            raise SweepError(
                f"{where}: command's --config {value} is not a file (paths are relative to the folder "
                f"you start the sweep from, as for `wandb agent`)."
            )
        else:
            args += ["--config", value]
    if PARAMS_SLOT not in args:
        args += ["--config", PARAMS_SLOT]
    return args


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a W&B sweep YAML; every mistake is one :class:`SweepError` line."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(
            f"sweep file {str(path)!r} does not exist. Give a W&B sweep YAML (e.g. sweeps/quickstart_lr.yaml)."
        )
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise SweepError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)}).") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep YAML is a mapping with method, metric, parameters and command.")
    method = spec.get("method")
    if method not in ("grid", "random", "bayes"):
        raise SweepError(f"{path}: method {method!r} is not one of grid, random, bayes.")
    metric = spec.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or not metric["name"]:
        raise SweepError(f"{path}: metric needs a name (a column of metrics.csv, e.g. val/loss) and a goal.")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise SweepError(f"{path}: metric goal {goal!r} is not minimize or maximize.")
    target = _number(metric["target"], f"{path}: metric target") if metric.get("target") is not None else None
    parameters = spec.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SweepError(f"{path}: parameters must map CLI keys (model.init_args.lr) to their values or distributions.")
    params = [_param(str(name), p, str(path)) for name, p in parameters.items()]
    notes: list[str] = []
    if method == "grid":
        for p in params:
            values = p.grid()
            if values is None:
                raise SweepError(
                    f"{path}: parameter {p.name}: method grid needs a finite set of values; give "
                    "values: [...] (or int_uniform, q_uniform), or use method random or bayes."
                )
        params = [Param(p.name, "categorical", choices=p.grid() or []) for p in params]
    run_cap = spec.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise SweepError(f"{path}: run_cap must be a whole number >= 1, not {run_cap!r}.")
    if spec.get("early_terminate"):
        notes.append("early_terminate is ignored: every trial runs to its end")
    args = _trial_args(spec.get("command"), spec.get("program"), str(path), notes)
    return Sweep(path, method, metric["name"], goal, target, params, args, run_cap, notes)


def grid_size(sweep: Sweep) -> int | None:
    return math.prod(len(p.choices) for p in sweep.params) if sweep.method == "grid" else None


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` once the grid is covered: that call works only inside
    ``study.optimize``, and this driver (ask and tell) stops by counting its trials."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        pass


def make_sampler(sweep: Sweep, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    if sweep.method == "grid":
        return _GridSampler({p.name: p.choices for p in sweep.params}, seed=seed)
    if sweep.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE's default of 10 random trials first would leave a short sweep all random.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, trials // 3)))


# --- one trial: a CLI process and its metric --------------------------------------------------------------------------
def read_metric(metrics_csv: Path, name: str) -> tuple[float | None, str]:
    """The last value of column ``name`` in a run's metrics.csv, or None and why not."""
    if not metrics_csv.is_file():
        return None, "the run wrote no metrics.csv"
    with metrics_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    values = [row[name] for row in rows if row.get(name) not in (None, "")]
    if not values:
        columns = dict.fromkeys(key for row in rows for key, value in row.items() if value not in (None, ""))
        logged = ", ".join(c for c in columns if c not in ("epoch", "step")) or "nothing"
        return None, f"no {name} in metrics.csv (it logged {logged}); check metric.name and the validation cadence"
    value = float(values[-1])
    return (value, "") if math.isfinite(value) else (None, f"{name} is {value}")


def _error_line(log: Path) -> str:
    """The CLI's own one-line reason (``error: ...``) from the end of a trial's log, if it gave one."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-50:]
    except OSError:
        return ""
    found = [line.strip() for line in lines if line.startswith("error: ")]
    return found[-1] if found else ""


def _stop_with_driver() -> None:
    """In a trial before it starts (Linux): SIGTERM when the driver dies, even by kill -9, so no trial outlives it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Running:
    trial: Trial
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    run_dir: Path
    slot: str | None  # the GPU it holds (CUDA_VISIBLE_DEVICES), None on CPU
    started: float


def _launch(sweep: Sweep, trial: Trial, sweep_dir: Path, slot: str | None, env: dict[str, str]) -> Running:
    params = {p.name: p.suggest(trial) for p in sweep.params}
    run_dir = sweep_dir / f"trial_{trial.number:03d}"
    run_dir.mkdir(parents=True, exist_ok=True)
    params_file = run_dir / "params.json"
    params_file.write_text(json.dumps(params, indent=1) + "\n")
    args = [str(params_file) if a == PARAMS_SLOT else a for a in sweep.args]
    command = [*CLI, *args, "--run.dir", str(run_dir)]
    trial.set_user_attr("run_dir", run_dir.name)
    log = (run_dir / "trial.log").open("wb")
    log.write((shlex.join(command) + "\n").encode())
    log.flush()
    if slot is not None:
        env = {**env, "CUDA_VISIBLE_DEVICES": slot}
    # Its own process group: a Ctrl-C in the terminal reaches the driver only, which then stops its trials.
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        preexec_fn=_stop_with_driver,
    )
    return Running(trial, process, log, run_dir, slot, time.monotonic())


def _finish(study: optuna.Study, sweep: Sweep, job: Running) -> FrozenTrial:
    """Record a finished trial process: COMPLETE with its metric, or FAIL with its exit code and reason."""
    job.log.close()
    code = job.process.returncode
    seconds = round(time.monotonic() - job.started, 1)
    value, why = read_metric(job.run_dir / "metrics.csv", sweep.metric) if code == 0 else (None, "")
    if code != 0:
        reason = "diverged (NaN/Inf)" if code == 3 else f"killed by signal {-code}" if code < 0 else ""
        why = "; ".join(r for r in (f"exit code {code}", reason, _error_line(job.run_dir / "trial.log")) if r)
    job.trial.set_user_attr("exit_code", code)
    job.trial.set_user_attr("seconds", seconds)
    if value is None:
        job.trial.set_user_attr("error", why)
        return study.tell(job.trial, state=TrialState.FAIL)
    return study.tell(job.trial, value)


def _interrupt(study: optuna.Study, sweep: Sweep, running: list[Running]) -> None:
    """The driver is stopping: trials that ended are recorded as usual; the others are stopped (their whole process
    group, DDP ranks included), recorded as interrupted and queued to run again with the same parameters."""
    ended = [job for job in running if job.process.poll() is not None]
    for job in ended:
        _finish(study, sweep, job)
    stopped = [job for job in running if job not in ended]
    for job in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.process.pid, signal.SIGTERM)
    for job in stopped:
        try:
            job.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.process.pid, signal.SIGKILL)
            job.process.wait()
        job.log.close()
        job.trial.set_user_attr("error", INTERRUPTED)
        study.tell(job.trial, state=TrialState.FAIL)
        study.enqueue_trial(job.trial.params, user_attrs={"rerun_of": job.trial.number})


# --- the study's trials -----------------------------------------------------------------------------------------------
def counted(trial: FrozenTrial) -> bool:
    """Finished trials count towards --trials; one cut short by the driver stopping (no exit code) does not."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and "exit_code" in trial.user_attrs)


def _recover_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by a driver that was killed: mark them FAIL and queue their parameters again."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})
    return len(stale)


def best_trial(study: optuna.Study, sweep: Sweep) -> FrozenTrial | None:
    best: FrozenTrial | None = None
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.value is not None and (best is None or best.value is None or sweep.better(trial.value, best.value)):
            best = trial
    return best


def _short_names(names: Sequence[str]) -> dict[str, str]:
    """``model.init_args.lr`` -> ``lr`` where the last part is unique among the swept keys."""
    last = [n.rsplit(".", 1)[-1] for n in names]
    return {n: s if last.count(s) == 1 else n for n, s in zip(names, last, strict=True)}


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _rows(study: optuna.Study, sweep: Sweep) -> list[dict[str, Any]]:
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    reruns = {
        t.user_attrs["rerun_of"]: t.number
        for t in trials
        if "rerun_of" in t.user_attrs and t.state != TrialState.WAITING
    }
    rows = []
    for t in trials:
        if t.state in (TrialState.WAITING, TrialState.RUNNING):
            continue
        error = t.user_attrs.get("error", "")
        if not counted(t):
            error = f"interrupted; rerun as trial {reruns[t.number]}" if t.number in reruns else INTERRUPTED
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                sweep.metric: t.value if t.state == TrialState.COMPLETE else "",
                "seconds": t.user_attrs.get("seconds", ""),
                "exit_code": t.user_attrs.get("exit_code", ""),
                **{p.name: t.params.get(p.name, "") for p in sweep.params},
                "run_dir": t.user_attrs.get("run_dir", ""),
                "error": error,
            }
        )
    return rows


def write_results(study: optuna.Study, sweep: Sweep, sweep_dir: Path) -> list[dict[str, Any]]:
    rows = _rows(study, sweep)
    columns = [
        "trial",
        "state",
        sweep.metric,
        "seconds",
        "exit_code",
        *(p.name for p in sweep.params),
        "run_dir",
        "error",
    ]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(sweep_dir / "results.csv", write)
    return rows


def write_best(study: optuna.Study, sweep: Sweep, sweep_dir: Path) -> FrozenTrial | None:
    """``best.yaml``: the best trial's ``config.yaml``, its run-specific paths reset so it trains as a new run."""
    best = best_trial(study, sweep)
    if best is None:
        return None
    run_dir = sweep_dir / best.user_attrs["run_dir"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    config.setdefault("run", {})["dir"] = None
    config.get("trainer", {})["default_root_dir"] = None
    config.get("checkpoint", {})["dirpath"] = None
    loggers = config.get("trainer", {}).get("logger")
    for spec in loggers if isinstance(loggers, list) else [loggers]:
        init = spec.get("init_args") if isinstance(spec, dict) else None
        if isinstance(init, dict) and init.get("save_dir") == str(run_dir):
            init["save_dir"] = "{run_dir}"
    header = (
        f"# Best trial of {sweep.path} ({sweep.metric}={best.value!r}, {sweep.goal}): trial {best.number}, "
        f"{run_dir / 'config.yaml'},\n# with run.dir, default_root_dir, checkpoint.dirpath and logger save_dir "
        "reset. Train it as a new run: python -m src.cli fit --config THIS_FILE\n"
    )
    text = header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    atomic_write(sweep_dir / "best.yaml", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return best


def print_table(rows: list[dict[str, Any]], sweep: Sweep, best: FrozenTrial | None) -> None:
    names = _short_names([p.name for p in sweep.params])
    header = ["trial", *names.values(), sweep.metric, "state", "seconds"]
    table = [
        [
            f"{row['trial']}{' *' if best is not None and row['trial'] == best.number else ''}",
            *(_show(row[p.name]) for p in sweep.params),
            _show(row[sweep.metric]) if row[sweep.metric] != "" else "-",
            row["state"] if row["state"] != "FAIL" else f"FAIL ({row['error'] or 'exit ' + str(row['exit_code'])})",
            f"{row['seconds']:.1f}" if row["seconds"] != "" else "-",
        ]
        for row in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *table, strict=True)]
    for line in [header, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


# --- the driver -------------------------------------------------------------------------------------------------------
def _check_dir(sweep_dir: Path, resume: bool) -> None:
    """A new sweep needs an empty or new --dir; one holding a study continues only with --resume."""
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SweepError(f"--dir {sweep_dir} is a file; give a folder (it is created if missing).")
    if (sweep_dir / "study.db").is_file():
        if not resume:
            raise SweepError(f"{sweep_dir} already holds a study; add --resume to continue it, or give another --dir.")
    elif sweep_dir.is_dir() and any(p.name != LOCK for p in sweep_dir.iterdir()):
        raise SweepError(f"{sweep_dir} is not empty and holds no study.db; give an empty or new --dir.")
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepError(f"--dir {sweep_dir} cannot be created ({err.strerror}); give a writable folder.") from None


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """Hold ``sweep.lock`` while driving: two drivers on one study would take each other's trials for stale ones."""
    with (sweep_dir / LOCK).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep driver is running in {sweep_dir}; wait for it or stop it.") from None
        yield


def _open_study(sweep: Sweep, sweep_dir: Path, seed: int, trials: int) -> optuna.Study:
    """The study in ``sweep_dir/study.db``: created, or loaded after checking it was begun by the same sweep."""
    db = sweep_dir / "study.db"
    storage = f"sqlite:///{db.resolve()}"
    if not db.is_file():
        sampler = make_sampler(sweep, seed, trials)
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=sweep.goal, sampler=sampler)
        study.set_user_attr("sweep", sweep.identity())
        return study
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    stored = study.user_attrs.get("sweep", {})
    changed = [key for key, value in sweep.identity().items() if json.loads(json.dumps(value)) != stored.get(key)]
    if changed:
        raise SweepError(
            f"{sweep.path} changed its {', '.join(changed)} since the study in {sweep_dir} began; restore it, or give "
            "another --dir for a new sweep."
        )
    # Reseeded by the trials so far, so a resumed random or TPE sampler does not repeat the first session's draws.
    sampler = make_sampler(sweep, seed + len(study.get_trials(deepcopy=False)), trials)
    return optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)


def _trial_env(parallel: int, gpus: list[str] | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if not gpus and parallel > 1 and "OMP_NUM_THREADS" not in env:  # N trials at a time share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def _progress(trial: FrozenTrial, done: int, total: int, sweep: Sweep, best: FrozenTrial | None) -> str:
    names = _short_names([p.name for p in sweep.params])
    params = " ".join(f"{names[p.name]}={_show(trial.params.get(p.name))}" for p in sweep.params)
    seconds = trial.user_attrs.get("seconds", 0.0)
    if trial.state == TrialState.COMPLETE:
        mark = " (best)" if best is not None and best.number == trial.number else ""
        outcome = f"{sweep.metric}={trial.value:.5g}{mark}"
    else:
        outcome = f"FAIL {trial.user_attrs.get('error', '')} (see {trial.user_attrs.get('run_dir')}/trial.log)"
    return f"[sweep] {done}/{total} trial {trial.number}: {outcome}  {params}  {seconds:.1f} s"


def run_sweep(
    sweep: Sweep, sweep_dir: Path, trials: int, parallel: int, gpus: list[str] | None, resume: bool, seed: int
) -> int:
    """Run the sweep until ``trials`` trials have finished in its study; returns the process exit code."""
    _check_dir(sweep_dir, resume)
    with _locked(sweep_dir):
        fresh = not (sweep_dir / "study.db").is_file()
        if resume and fresh:
            print(f"[sweep] no study in {sweep_dir} yet; starting one", flush=True)
        study = _open_study(sweep, sweep_dir, seed, trials)
        recovered = _recover_interrupted(study)
        size = grid_size(sweep)
        total = min(trials, size) if size is not None else trials
        done = sum(counted(t) for t in study.get_trials(deepcopy=False))
        for note in sweep.notes:
            print(f"[sweep] note: {note}", flush=True)
        if size is not None and trials > size:
            print(f"[sweep] note: the grid has {size} points; --trials {trials} capped to {size}", flush=True)
        print(
            f"[sweep] {sweep_dir}: {sweep.method} over {', '.join(p.name for p in sweep.params)}; {sweep.metric} "
            f"({sweep.goal}); {max(0, total - done)} of {total} trials to run, {parallel} at a time"
            + (f" on GPUs {','.join(gpus)}" if gpus else "")
            + (f"; {recovered} interrupted trial(s) run again" if recovered else ""),
            flush=True,
        )
        slots: list[str | None] = list(gpus) if gpus else [None] * parallel
        env = _trial_env(parallel, gpus)
        running: list[Running] = []
        reached_target = False
        try:
            while True:
                while slots and len(running) < parallel and done + len(running) < total and not reached_target:
                    running.append(_launch(sweep, study.ask(), sweep_dir, slots.pop(0), env))
                if not running:
                    break
                time.sleep(0.2)
                for job in [j for j in running if j.process.poll() is not None]:
                    running.remove(job)
                    slots.append(job.slot)
                    trial = _finish(study, sweep, job)
                    done += 1
                    best = write_best(study, sweep, sweep_dir)
                    write_results(study, sweep, sweep_dir)
                    print(_progress(trial, done, total, sweep, best), flush=True)
                    if sweep.target is not None and best is not None and best.value is not None:
                        reached_target = not sweep.better(sweep.target, best.value)
        except KeyboardInterrupt:
            _interrupt(study, sweep, running)
            write_best(study, sweep, sweep_dir)
            write_results(study, sweep, sweep_dir)
            print(f"[sweep] interrupted after {done} of {total} trials; add --resume to continue", file=sys.stderr)
            return 130
        rows = write_results(study, sweep, sweep_dir)
        best = write_best(study, sweep, sweep_dir)

    if reached_target:
        print(f"[sweep] {sweep.metric} reached the target {sweep.target:g}; no further trials", flush=True)
    print(flush=True)
    print_table(rows, sweep, best)
    if best is None:
        failed = next((row for row in rows if row["state"] == "FAIL"), None)
        detail = f" (trial {failed['trial']}: {failed['error']})" if failed else ""
        print(
            f"error: no trial finished with a {sweep.metric}{detail}. See the trial.log files in {sweep_dir}.",
            file=sys.stderr,
        )
        return 1
    print(f"\nbest: trial {best.number}, {sweep.metric}={best.value:.5g}: {sweep_dir / 'best.yaml'}", flush=True)
    return 0


# --- the command line -------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like every other mistake
        raise SweepError(f"{message}. See python -m src.sweep --help.")


def _gpus(text: str) -> list[str]:
    ids = [g.strip() for g in text.split(",")]
    if not all(ids):
        raise argparse.ArgumentTypeError(f"--gpus {text!r} must be GPU ids separated by commas, e.g. 0,1")
    return ids


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m src.sweep",
        description="Run a W&B sweep YAML locally with Optuna: each trial is a `python -m src.cli fit` process.",
    )
    parser.add_argument("sweep", help="the sweep YAML (the same file `wandb sweep` takes)")
    parser.add_argument(
        "--trials", type=int, metavar="N", help="finished trials wanted in all (default: run_cap, or the grid)"
    )
    parser.add_argument(
        "--parallel", type=int, metavar="N", help="trials at a time (default: one per --gpus entry, else 1)"
    )
    parser.add_argument(
        "--gpus", type=_gpus, metavar="IDS", help="GPU ids, one trial per id at a time (list one twice to share it)"
    )
    parser.add_argument("--dir", type=Path, metavar="DIR", help="sweep directory (default: runs/sweeps/<yaml stem>)")
    parser.add_argument("--resume", action="store_true", help="continue the study in --dir up to --trials")
    parser.add_argument("--seed", type=int, metavar="N", default=0, help="sampler seed (default 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        args = parse_args(argv)
        if args.parallel is not None and args.parallel < 1:
            raise SweepError(f"--parallel {args.parallel} must be at least 1.")
        if args.gpus and args.parallel is not None and args.parallel > len(args.gpus):
            raise SweepError(
                f"--parallel {args.parallel} needs as many --gpus entries (list one twice to run two "
                f"trials on it: --gpus {','.join(args.gpus * 2)})."
            )
        if args.trials is not None and args.trials < 1:
            raise SweepError(f"--trials {args.trials} must be at least 1.")
        sweep = load_sweep(args.sweep)
        trials = args.trials or sweep.run_cap or grid_size(sweep)
        if trials is None:
            raise SweepError(f"give --trials N ({sweep.path} has no run_cap and method {sweep.method} has no end).")
        parallel = args.parallel or (len(args.gpus) if args.gpus else 1)
        sweep_dir = args.dir if args.dir is not None else Path("runs") / "sweeps" / sweep.path.stem
        return run_sweep(sweep, sweep_dir, trials, parallel, args.gpus, args.resume, args.seed)
    except EngramError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the trials and records them, as Ctrl-C
    raise SystemExit(main())
