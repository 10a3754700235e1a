"""The cross-family comparison: every memory family trained on the same needle task at several lengths, one report.

    python -m src.compare --config configs/compare_needle.yaml [--out DIR] [--threads N]

The YAML (not a LightningCLI config) names the families, each as its own CLI configs plus overrides, and the task
they share::

    output: runs/compare_needle     # the output folder (--out wins)
    steps: 300                      # optimizer steps per fit
    lengths: [128, 256, 512]        # one fit per family and length (seq_len)
    depths: [0.1, 0.5, 0.9]         # needle depths evaluated after each fit
    needle: {batch_size: 16, train_size: 1600, val_size: 64, test_size: 128, num_needles: 2, distractors: 2}
    plasticity: {max_eval_batches: 1, max_sequences: 8}   # what the PlasticityCallback keeps of the test
    families:
      ttt: {label: TTT-Linear, configs: [configs/ttt_verify_synthetic.yaml], overrides: {trainer: {callbacks: []}}}

``needle`` holds ``data_modules.needle.TokenNeedleDataModule`` settings; ``seq_len``, ``depth`` and ``loss_on`` are
the driver's (training draws needle positions uniformly; the loss is on the answer tokens only, so every family's
``test/acc`` is answer accuracy). ``overrides`` is a config fragment applied after the family's configs; the driver's
own settings (data, ``max_steps``) come last.

Per family and length, in ``<out>/runs/<family>-L<length>/``: one in-process ``src.cli fit``, then ``src.cli test``
runs from its ``last.ckpt``, each in its own folder:

* ``eval-uniform``: the training layout (needles anywhere); this is the accuracy-vs-length number, and for families
  with the ``CapturesPlasticity`` hook the ``PlasticityCallback`` records the first test batches here;
* ``eval-d<depth>``: one queried needle at that depth (share of the filler before it) among as many needles as in
  training (the others become distractors), so the accuracy is that of a needle at exactly that depth.

``run.json`` records each finished step (fit, then every evaluation); a rerun skips what is recorded, resumes an
interrupted fit from its ``last.ckpt`` and redoes an interrupted evaluation, and refuses a run folder made with other
settings (of the YAML, or a family config edited since). A fit that diverges or crashes is recorded as failed and the comparison goes on; a config mistake (the
CLI's one ``error:`` line, exit code 2) stops it. Finally ``src.analysis.compare`` writes ``report.md``,
``report.json`` and the PNGs into ``<out>``. Nothing is written outside ``<out>``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

from data_modules.needle import TokenNeedleDataModule
from src.analysis.compare import RUN_RECORD, analyse_comparison
from src.atomic import atomic_write
from src.cli import main as cli_main
from src.errors import EngramError
from src.protocols import CapturesPlasticity
from src.runs import CHECKPOINT_SUBDIR, LAST_CHECKPOINT
from src.sweep import read_metric

NEEDLE_CLASS = f"{TokenNeedleDataModule.__module__}.{TokenNeedleDataModule.__name__}"
DRIVER_DATA_KEYS = ("seq_len", "depth", "loss_on")  # set per run by the driver, not in the YAML's needle block
PLASTICITY_CALLBACK = "callbacks.plasticity.PlasticityCallback"
UNIFORM = "uniform"
TOP_KEYS = ("output", "steps", "lengths", "depths", "needle", "plasticity", "families")
FAMILY_KEYS = ("label", "configs", "overrides")


class CompareError(EngramError):
    """A mistake in the comparison YAML, the driver's options or an output folder (one line, exit code 2)."""


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    configs: list[str]
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Comparison:
    path: Path
    output: Path
    steps: int
    lengths: list[int]
    depths: list[float]
    needle: dict[str, Any]
    plasticity: dict[str, Any]
    families: list[Family] = field(default_factory=list)


# --- the YAML -----------------------------------------------------------------------------------------------------
def _whole(value: Any, where: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CompareError(f"{where} must be a whole number >= {low}, not {value!r}.")
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CompareError(f"{where} must be a mapping, not {value!r}.")
    return value


def _family(name: str, spec: Any, where: str) -> Family:
    at = f"{where}: family {name}"
    if not isinstance(spec, dict):
        raise CompareError(f"{at} must be a mapping with configs (a list of CLI configs) and optional overrides.")
    unknown = sorted(set(spec) - set(FAMILY_KEYS))
    if unknown:
        raise CompareError(f"{at}: unknown keys {unknown}; a family takes {', '.join(FAMILY_KEYS)}.")
    configs = spec.get("configs")
    if not isinstance(configs, list) or not configs or not all(isinstance(c, str) for c in configs):
        raise CompareError(f"{at}: configs must be a non-empty list of CLI config files (configs/titans_needle.yaml).")
    for config in configs:
        if not Path(config).is_file():
            raise CompareError(f"{at}: config {config} is not a file (paths are relative to where you start).")
    overrides = _mapping(spec.get("overrides"), f"{at} overrides")
    if "data" in overrides:
        raise CompareError(f"{at}: overrides set data; every family shares the task, so set it in needle: instead.")
    return Family(name, str(spec.get("label") or name), list(configs), overrides)


def load_comparison(path: str | Path) -> Comparison:
    """Read and check a comparison YAML; every mistake is one :class:`CompareError` line."""
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"comparison file {str(path)!r} does not exist. Give e.g. configs/compare_needle.yaml.")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CompareError(f"{path}: not valid YAML ({getattr(err, 'problem', err)}).") from None
    if not isinstance(spec, dict):
        raise CompareError(f"{path}: a comparison YAML is a mapping with {', '.join(TOP_KEYS)}.")
    unknown = sorted(set(spec) - set(TOP_KEYS))
    if unknown:
        raise CompareError(f"{path}: unknown keys {unknown}; the keys are {', '.join(TOP_KEYS)}.")
    lengths, depths = spec.get("lengths"), spec.get("depths", [])
    if not isinstance(lengths, list) or not lengths:
        raise CompareError(f"{path}: lengths must be a non-empty list of sequence lengths, e.g. [128, 256].")
    lengths = [_whole(n, f"{path}: lengths entry") for n in lengths]
    if not isinstance(depths, list) or not all(
        isinstance(d, int | float) and not isinstance(d, bool) and 0 <= d <= 1 for d in depths
    ):
        raise CompareError(f"{path}: depths must be a list of numbers in [0, 1] (filler share before the needle).")
    needle = _mapping(spec.get("needle"), f"{path}: needle")
    allowed = set(inspect.signature(TokenNeedleDataModule.__init__).parameters) - {"self", *DRIVER_DATA_KEYS}
    bad = sorted(set(needle) - allowed)
    if bad:
        raise CompareError(
            f"{path}: needle keys {bad} are not TokenNeedleDataModule settings the YAML may set; use {sorted(allowed)} "
            f"({', '.join(DRIVER_DATA_KEYS)} are set by the driver)."
        )
    plasticity = _mapping(spec.get("plasticity"), f"{path}: plasticity")
    families = spec.get("families")
    if not isinstance(families, dict) or not families:
        raise CompareError(f"{path}: families must map names (ttt, titans_mac ...) to their configs and overrides.")
    for name in families:
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise CompareError(f"{path}: family name {name!r} must be letters, digits and '_' (it names folders).")
    return Comparison(
        path=path,
        output=Path(str(spec.get("output") or Path("runs") / path.stem)),
        steps=_whole(spec.get("steps"), f"{path}: steps"),
        lengths=lengths,
        depths=[float(d) for d in depths],
        needle=needle,
        plasticity=plasticity,
        families=[_family(name, families[name], str(path)) for name in families],
    )


# --- one run: fit, then the evaluations -------------------------------------------------------------------------
def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, mappings merged key by key and everything else (lists too) replaced, as the CLI does."""
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
        )
    return out


def fit_fragment(comparison: Comparison, family: Family, length: int) -> dict[str, Any]:
    """The config the driver adds after a family's own configs for its fit at ``length``."""
    data = {"seq_len": length, "depth": None, "loss_on": "answer", **comparison.needle}
    driver = {
        "data": {"class_path": NEEDLE_CLASS, "init_args": data},
        # The step count alone ends the fit, whatever epochs a family's config asked for, and every family validates
        # on the whole validation split at its end (FinalValidation), whatever cadence its config had.
        "trainer": {
            "max_steps": comparison.steps,
            "max_epochs": -1,
            "val_check_interval": comparison.steps,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1.0,
            "enable_progress_bar": False,
        },
    }
    return _merge(family.overrides, driver)


def eval_fragment(comparison: Comparison, depth: float | None, plasticity: bool) -> dict[str, Any]:
    """The config added for one test evaluation: the depth layout, and the PlasticityCallback where it applies."""
    data: dict[str, Any] = {}
    if depth is not None:
        # One queried needle at this depth; the training layout's other needles stay in the haystack as distractors.
        needles = int(comparison.needle.get("num_needles", 1)) + int(comparison.needle.get("distractors", 0))
        data = {"depth": depth, "num_needles": 1, "distractors": needles - 1}
    callbacks = (
        [{"class_path": PLASTICITY_CALLBACK, "init_args": {"every_n_steps": 1, **comparison.plasticity}}]
        if plasticity
        else []
    )
    # Family callbacks act on training (EMMA's InfoNCE gate); a test needs none but the capture.
    return {"data": {"init_args": data}, "trainer": {"callbacks": callbacks, "enable_progress_bar": False}}


def eval_name(depth: float | None) -> str:
    return UNIFORM if depth is None else f"d{depth:.2f}"


def _write_yaml(path: Path, content: Mapping[str, Any]) -> Path:
    text = yaml.safe_dump(dict(content), sort_keys=False, default_flow_style=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_record(run_dir: Path, record: Mapping[str, Any]) -> None:
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    atomic_write(run_dir / RUN_RECORD, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class CLIStopped(Exception):
    """The CLI ended with a non-zero exit code (its reason is already on stderr)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exit code {code}")
        self.code = code


def _cli(args: list[str]) -> Any:
    """Run ``src.cli`` in-process (one import for every run); a non-zero exit becomes :class:`CLIStopped`."""
    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI warns on every run that it was given args while sys.argv holds the driver's
    try:
        return cli_main(args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if code:
            raise CLIStopped(code) from None
        return None
    finally:
        sys.argv = argv


def _fit(comparison: Comparison, family: Family, length: int, run_dir: Path, settings: dict[str, Any]) -> dict:
    """Train one family at one length; returns the fit's part of ``run.json``."""
    last = run_dir / CHECKPOINT_SUBDIR / LAST_CHECKPOINT
    if run_dir.exists() and not last.is_file():
        shutil.rmtree(run_dir)  # cut short before its first checkpoint: start clean rather than append to its CSV
    resume = ["--ckpt_path", "last"] if last.is_file() else []
    fragment = _write_yaml(run_dir / "compare_fit.yaml", settings["fit"])
    configs = [arg for config in family.configs for arg in ("--config", config)]
    started = time.perf_counter()
    cli = _cli(["fit", *configs, "--config", str(fragment), "--run.dir", str(run_dir), *resume])
    val_acc, _ = read_metric(run_dir / "metrics.csv", "val/acc")
    return {
        "status": "ok",
        "seconds": round(time.perf_counter() - started, 1),
        "steps": int(cli.trainer.global_step),
        "params": sum(p.numel() for p in cli.model.parameters()),
        "model": f"{type(cli.model).__module__}.{type(cli.model).__qualname__}",
        # only a family with the hook has test-time updates to record (the Transformer has none)
        "memory": isinstance(cli.model, CapturesPlasticity),
        "val_acc": val_acc,
        "data": cli.config["fit"]["data"]["init_args"].as_dict(),  # every needle setting, defaults included
    }


def _evaluate(
    comparison: Comparison, family: Family, run_dir: Path, depth: float | None, memory: bool
) -> dict[str, Any]:
    """One ``test`` of the fitted model; returns its entry of ``run.json``'s evaluations."""
    name = eval_name(depth)
    eval_dir = run_dir / f"eval-{name}"
    if eval_dir.exists():
        shutil.rmtree(eval_dir)  # not recorded as done: its metrics.csv would append to the cut-short one
    capture = memory and depth is None
    fragment = _write_yaml(eval_dir / "compare_test.yaml", eval_fragment(comparison, depth, capture))
    configs = [arg for config in family.configs for arg in ("--config", config)]
    ckpt = run_dir / CHECKPOINT_SUBDIR / LAST_CHECKPOINT
    _cli(
        ["test", *configs, "--config", str(run_dir / "compare_fit.yaml"), "--config", str(fragment),
         "--ckpt_path", str(ckpt), "--run.dir", str(eval_dir)]
    )  # fmt: skip
    acc, why = read_metric(eval_dir / "metrics.csv", "test/acc")
    tables = sorted(eval_dir.glob("plasticity/test/*.parquet")) if capture else []
    return {
        "name": name,
        "depth": depth,
        "dir": eval_dir.name,
        "acc": acc,
        **({"note": why} if acc is None else {}),
        "plasticity_tables": [str(p.relative_to(run_dir)) for p in tables if not p.name.endswith(".minibatch.parquet")],
    }


def run_settings(comparison: Comparison, family: Family, length: int) -> dict[str, Any]:
    """What a run folder was made with; a rerun into it must match."""
    return {
        "family": family.name,
        "configs": family.configs,
        # an edited family config (a new learning rate) makes the folder stale like an edited comparison YAML
        "config_sha256": [hashlib.sha256(Path(c).read_bytes()).hexdigest() for c in family.configs],
        "fit": fit_fragment(comparison, family, length),
        "depths": comparison.depths,
        "plasticity": comparison.plasticity,
    }


def recorded(comparison: Comparison, family: Family, length: int, run_dir: Path) -> dict[str, Any]:
    """The ``run.json`` of a run folder ({} if none), refused when the folder was made with other settings."""
    if not (run_dir / RUN_RECORD).is_file():
        return {}
    record = json.loads((run_dir / RUN_RECORD).read_text(encoding="utf-8"))
    if record.get("settings") != json.loads(json.dumps(run_settings(comparison, family, length))):
        raise CompareError(
            f"{run_dir} was made with other settings than {comparison.path} and the configs of {family.name} now "
            f"give at L={length}; give another --out, or delete that folder to train it again."
        )
    return record


def run_one(comparison: Comparison, family: Family, order: int, length: int, run_dir: Path, tag: str) -> dict[str, Any]:
    """Fit and evaluate one family at one length, skipping what ``run.json`` already records."""
    settings = run_settings(comparison, family, length)
    record = recorded(comparison, family, length, run_dir)
    if record.get("fit", {}).get("status") == "failed":
        print(f"[compare] {tag}: failed earlier ({record['fit']['error']}); delete {run_dir} to retry", flush=True)
        return record
    record.update(family=family.name, label=family.label, order=order, length=length, settings=settings)
    if record.get("fit", {}).get("status") != "ok":
        print(f"[compare] {tag}: fit {comparison.steps} steps", flush=True)
        fit, error = _attempt("fit", lambda: _fit(comparison, family, length, run_dir, settings))
        if fit is None:
            record["fit"] = {"status": "failed", "error": error}
        else:
            record["task"] = {**fit.pop("data"), "steps": comparison.steps}
            record["fit"] = fit
        record["evals"] = []
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_record(run_dir, record)
        if fit is None:
            print(f"[compare] {tag}: FAILED ({error})", flush=True)
            return record
        print(f"[compare] {tag}: trained in {fit['seconds']:.0f} s, val/acc={_show(fit['val_acc'])}", flush=True)
    done = {e["name"] for e in record["evals"]}
    todo = [depth for depth in [None, *comparison.depths] if eval_name(depth) not in done]
    if not todo:
        print(f"[compare] {tag}: done earlier ({run_dir / RUN_RECORD})", flush=True)
    memory = record["fit"]["memory"]
    for depth in todo:
        entry, error = _attempt("test", lambda d=depth: _evaluate(comparison, family, run_dir, d, memory))
        if entry is None:  # not recorded: a rerun tries it again
            print(f"[compare] {tag}: test {eval_name(depth)} FAILED ({error})", flush=True)
            continue
        record["evals"].append(entry)
        _write_record(run_dir, record)
        print(f"[compare] {tag}: test {entry['name']}: acc={_show(entry['acc'])}", flush=True)
    return record


def _attempt(what: str, step: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """``step()``, or None and why it failed. A config mistake (the CLI's exit code 2, its line already on stderr)
    stops the whole comparison, since every length of the family would repeat it."""
    try:
        return step(), None
    except CLIStopped as stop:
        if stop.code == EngramError.exit_code:
            raise
        return None, f"the {what} stopped with {stop}"
    except Exception as err:  # one broken family must not cost the whole comparison
        traceback.print_exc()
        return None, f"{type(err).__name__}: {err}"


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_comparison(comparison: Comparison, out: Path, threads: int | None = None) -> dict[str, Path]:
    """Every family at every length, then the report; returns the report's files."""
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file; give a folder (it is created if missing).")
    runs_dir = out / "runs"
    print(
        f"[compare] {comparison.path}: {len(comparison.families)} families x lengths {comparison.lengths}, "
        f"{comparison.steps} steps each, depths {comparison.depths}; into {out}",
        flush=True,
    )
    started = time.perf_counter()
    plan = [
        (order, family, length) for order, family in enumerate(comparison.families) for length in comparison.lengths
    ]
    for _, family, length in plan:  # refuse a changed folder before training anything
        recorded(comparison, family, length, runs_dir / f"{family.name}-L{length}")
    with _threads(threads):
        for i, (order, family, length) in enumerate(plan, start=1):
            tag = f"({i}/{len(plan)}) {family.name} L={length}"
            run_one(comparison, family, order, length, runs_dir / f"{family.name}-L{length}", tag)
    paths = analyse_comparison(runs_dir, out)
    print(f"[compare] done in {time.perf_counter() - started:.0f} s: {paths['report_md']}", flush=True)
    return paths


# --- the command line -----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like every other mistake
        raise CompareError(f"{message}. See python -m src.compare --help.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m src.compare",
        description="Train every memory family on one needle task at several lengths and write one comparison.",
    )
    parser.add_argument("--config", required=True, help="the comparison YAML (configs/compare_needle.yaml)")
    parser.add_argument("--out", type=Path, help="output folder (default: the YAML's output)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a busy machine)")
    try:
        args = parser.parse_args(argv)
        if args.threads is not None and args.threads < 1:
            raise CompareError(f"--threads {args.threads} must be at least 1.")
        comparison = load_comparison(args.config)
        run_comparison(comparison, args.out or comparison.output, args.threads)
    except CLIStopped as stop:
        return stop.code  # the CLI has printed its one error line
    except EngramError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
