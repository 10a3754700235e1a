"""The CLI end to end, in-process (torchgeo style): every config parses and runs, errors are short and helpful,
DDP on CPU works through ``python -m src.cli``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from src.cli import main
from src.telemetry import read_events
from tests.conftest import CONFIGS, FAST, REPO, error_line_of

# compare_*.yaml drive src/compare.py, not the CLI (tests/test_compare.py runs them)
TOP_LEVEL = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("compare_"))
FRAGMENTS = sorted(p for p in CONFIGS.glob("*/*.yaml"))


def _pg19_parquet(folder: Path, n_books: int = 6, chars: int = 6000) -> Path:
    """A tiny PG-19 in the real schema, one parquet file per split."""
    words = ["the", "sea", "was", "calm", "and", "the", "ship", "sailed", "on", "under", "a", "grey", "sky", "while"]
    for split in ("train", "validation", "test"):
        rows = {
            "short_book_title": [f"Book {split} {i}" for i in range(n_books)],
            "publication_date": [1850 + i for i in range(n_books)],
            "url": [f"http://www.gutenberg.org/ebooks/{i}" for i in range(n_books)],
            "text": [" ".join(words[(i + j) % len(words)] for j in range(chars // 5)) for i in range(n_books)],
        }
        (folder / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows), folder / split / "part-0.parquet")
    return folder


TINY_TTT = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, mini_batch_size: 8}"


def _smoke_overrides(config: Path, tmp_path: Path) -> list[str]:
    """GPU-size configs are exercised with the same wiring at test size."""
    pg19 = ["--data.init_args.data_path", str(_pg19_parquet(tmp_path / "pg19")), "--data.init_args.seq_len", "64",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0"]  # fmt: skip
    if config.name == "gemma.yaml":
        return [*pg19, "--model.init_args.preset", "gemma2-tiny", "--trainer.accumulate_grad_batches", "1",
                "--model.init_args.compile", "false"]  # fmt: skip
    if config.name == "ttt_pg19_baseline.yaml":
        return [*pg19, "--model.init_args.config_overrides", TINY_TTT]
    if config.name == "titans_pg19.yaml":
        return [*pg19, "--model.init_args.preset", "titans-tiny", "--model.init_args.compile", "false",
                "--model.init_args.config_overrides", "{chunk_size: 8, segment_size: 32, window: 32}"]  # fmt: skip
    if config.name == "ttt_1b.yaml":
        return [*pg19, "--model.init_args.config_overrides", TINY_TTT, "--model.init_args.checkpoint_path", "null",
                "--model.init_args.compile", "false", "--data.init_args.tokenizer", "byte",
                "--trainer.precision", "32-true"]  # fmt: skip
    if config.name == "llama3_8b_qlora.yaml":  # 4-bit weights need CUDA; the LoRA wiring runs on CPU
        return [*pg19, "--model.init_args.preset", "llama-tiny", "--model.init_args.quantization", "null",
                "--trainer.accumulate_grad_batches", "1"]  # fmt: skip
    if config.name == "capacity_synthetic.yaml":
        return ["--data.init_args.batch_size", "32", "--data.init_args.num_workers", "0"]
    if config.name in ("tlora_adapters.yaml", "tlora_router.yaml"):
        return ["--model.init_args.init_from", "null"]  # no earlier stage here: random backbone (the module warns)
    if config.name == "emma_listops_512.yaml":  # LRA-size generation takes minutes; the wiring is the same
        return ["--data.init_args.train_size", "16", "--data.init_args.batch_size", "4",
                "--data.init_args.val_size", "4", "--data.init_args.test_size", "4",
                "--data.init_args.min_length", "20", "--data.init_args.max_length", "100",
                "--data.init_args.cache_dir", str(tmp_path / "listops")]  # fmt: skip
    if config.name in ("emma_needle_768.yaml", "emma_needle_1024.yaml"):
        return ["--data.init_args.batch_size", "2"]
    if config.name == "ttt_quickstart.yaml":
        return ["--model.init_args.config_overrides", TINY_TTT, "--data.init_args.seq_len", "64"]
    return []


@pytest.mark.parametrize("config", TOP_LEVEL, ids=lambda p: p.name)
def test_every_config_prints(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_fragment_composes(fragment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = {"loggers": "gemma_tiny.yaml", "emma_profiles": "emma_needle_256.yaml", "strategies": "gemma_tiny.yaml"}
    base = CONFIGS / bases.get(fragment.parent.name, f"{fragment.parent.name}.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(base), "--config", str(fragment), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]


@pytest.mark.parametrize("config", TOP_LEVEL, ids=lambda p: p.name)
def test_every_config_fits_a_few_steps(config: Path, run_root: Path, tmp_path: Path) -> None:
    cli = main(
        ["fit", "--config", str(config), *FAST, *_smoke_overrides(config, tmp_path), "--run.root", str(run_root)]
    )
    assert cli is not None and cli.trainer.global_step == 4
    run_dir = run_root / config.stem / "v0"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4  # last.ckpt holds the final step even between periodic saves
    assert (run_dir / "config.yaml").is_file()
    assert "train/loss" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    events = list(read_events(run_dir / "telemetry.jsonl"))
    losses = [e for e in events if e["metric"] == "train/loss"]
    assert losses and all(torch.isfinite(torch.tensor(e["value"])) for e in losses)
    assert {e["run_id"] for e in events} == {f"{config.stem}/v0"}
    assert max(e["tokens"] for e in events) > 0


def test_overrides_and_new_versions(run_root: Path) -> None:
    args = ["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *FAST, "--run.root", str(run_root)]
    main([*args, "--model.init_args.lr", "0.005", "--trainer.max_steps", "2"])
    main([*args, "--trainer.max_steps", "2"])
    first = yaml.safe_load((run_root / "gemma_tiny" / "v0" / "config.yaml").read_text())
    second = yaml.safe_load((run_root / "gemma_tiny" / "v1" / "config.yaml").read_text())
    assert first["model"]["init_args"]["lr"] == 0.005 and second["model"]["init_args"]["lr"] == 0.001
    assert first["trainer"]["max_steps"] == 2


def test_sweep_agent_json_config_is_accepted(run_root: Path, tmp_path: Path) -> None:
    # A W&B agent with `--config ${args_json_file}` hands over flat dotted keys in a JSON file.
    params = tmp_path / "config-run.json"
    params.write_text(json.dumps({"model.init_args.lr": 0.002, "trainer.max_steps": 2}))
    cli = main(["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *FAST[2:], "--config", str(params),
                "--run.root", str(run_root)])  # fmt: skip
    assert cli is not None and cli.model.lr == 0.002 and cli.trainer.global_step == 2
    sweep = yaml.safe_load((REPO / "sweeps" / "quickstart_lr.yaml").read_text())
    assert "${args_json_file}" in sweep["command"]
    assert set(sweep["parameters"]) <= {
        "model.init_args.lr",
        "data.init_args.batch_size",
        "model.init_args.warmup_steps",
    }


def test_loggers_write_into_the_run_directory(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for fragment in ("wandb", "tensorboard"):
        main(["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), "--config", str(CONFIGS / "loggers" / f"{fragment}.yaml"),
              *FAST, "--trainer.max_steps", "2", "--run.root", str(run_root), "--run.name", fragment])  # fmt: skip
    assert list((run_root / "wandb" / "v0" / "wandb").glob("offline-run-*"))
    assert list((run_root / "tensorboard" / "v0").glob("events.out.tfevents.*"))
    assert (run_root / "tensorboard" / "v0" / "metrics.csv").is_file()  # CSV stays on beside other loggers


# --- bad input: one short line naming the problem and the fix -------------------------------------------------
def test_unknown_config_key(capsys: pytest.CaptureFixture[str], run_root: Path) -> None:
    err = error_line_of(["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), "--model.init_args.lrr", "0.1"], capsys)
    assert "Option 'lrr' is not accepted" in err and "--model.help" in err


def test_missing_data_path(capsys: pytest.CaptureFixture[str], run_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_pg19"
    err = error_line_of(["fit", "--config", str(CONFIGS / "gemma.yaml"), "--model.init_args.preset", "gemma2-tiny",
                     "--data.init_args.data_path", str(missing), "--run.root", str(run_root)], capsys)  # fmt: skip
    assert str(missing) in err and "data_path" in err


def test_empty_corpus(capsys: pytest.CaptureFixture[str], run_root: Path, tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    (books / "empty.txt").write_text("")
    err = error_line_of(["fit", "--config", str(CONFIGS / "gemma.yaml"), "--model.init_args.preset", "gemma2-tiny",
                     "--data.init_args.data_path", str(books), "--data.init_args.seq_len", "64",
                     "--data.init_args.num_workers", "0", "--run.root", str(run_root), *FAST], capsys)  # fmt: skip
    assert "empty" in err.lower() or "no text" in err.lower()


def test_sequence_longer_than_context(capsys: pytest.CaptureFixture[str], run_root: Path) -> None:
    err = error_line_of(["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), "--data.init_args.seq_len", "1024",
                     "--run.root", str(run_root), *FAST], capsys)  # fmt: skip
    assert "seq_len=1024 is longer than the model's context (512 tokens)" in err
    assert "--data.init_args.seq_len 512" in err


def test_corrupt_checkpoint(capsys: pytest.CaptureFixture[str], run_root: Path) -> None:
    args = ["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *FAST, "--run.root", str(run_root)]
    main([*args, "--trainer.max_steps", "2"])
    last = run_root / "gemma_tiny" / "v0" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut off half-way
    err = error_line_of([*args, "--ckpt_path", "last"], capsys)
    assert str(last) in err and "corrupt or truncated" in err
    err = error_line_of([*args, "--ckpt_path", str(last)], capsys)
    assert "corrupt or truncated" in err


# --- DDP ---------------------------------------------------------------------------------------------------
def test_two_process_ddp_on_cpu(run_root: Path, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    seen.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "src.cli", "fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *FAST,
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--run.root", str(run_root),
         "--trainer.callbacks+=tests.helpers.RecordBatches", f"--trainer.callbacks.out_dir={seen}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((seen / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(len(r) == 4 * 4 for r in ranks)  # 4 steps x batch 4 on each rank
    assert not {tuple(x) for x in ranks[0]} & {tuple(x) for x in ranks[1]}  # each rank reads its own shard
    assert not (run_root / "gemma_tiny" / "v1").exists()  # both ranks used one run directory
    ckpt = torch.load(run_root / "gemma_tiny" / "v0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["tokens_seen"] == 4 * 2 * 4 * 64


# --- reliability --------------------------------------------------------------------------------------------
def test_precision_printed_and_recorded_is_the_one_that_runs(
    run_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = main(["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *FAST, "--trainer.max_steps", "1",
                "--trainer.precision", "16-mixed", "--run.root", str(run_root)])  # fmt: skip
    assert cli is not None and cli.trainer.precision == "bf16-mixed"
    assert "precision=bf16-mixed (16-mixed was asked for" in capsys.readouterr().out
    saved = yaml.safe_load((run_root / "gemma_tiny" / "v0" / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == "bf16-mixed"


def test_resume_rewrites_a_periodic_checkpoint_instead_of_adding_versions(run_root: Path) -> None:
    args = ["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *FAST, "--checkpoint.every_n_train_steps", "2",
            "--checkpoint.save_top_k", "-1", "--run.root", str(run_root), "--trainer.max_steps", "6"]  # fmt: skip
    main(args)
    checkpoints = run_root / "gemma_tiny" / "v0" / "checkpoints"
    # As if the process died while writing step 6's last.ckpt: last.ckpt still holds step 4, the step-6 file exists.
    (checkpoints / "last.ckpt").write_bytes((checkpoints / "epoch=0-step=4.ckpt").read_bytes())
    main([*args, "--ckpt_path", "last"])
    names = sorted(p.name for p in checkpoints.glob("*.ckpt"))
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]


def test_run_names_from_config_files_are_made_valid(run_root: Path, tmp_path: Path) -> None:
    odd = tmp_path / "my config (copy).yaml"
    odd.write_text((CONFIGS / "gemma_tiny.yaml").read_text())
    main(["fit", "--config", str(odd), *FAST, "--trainer.max_steps", "1", "--run.root", str(run_root)])
    assert (run_root / "my-config-copy" / "v0" / "checkpoints" / "last.ckpt").is_file()


def test_a_run_that_fails_before_its_first_step_leaves_no_directory(
    run_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *FAST, "--run.root", str(run_root)]
    error_line_of([*args, "--data.init_args.seq_len", "1024"], capsys)  # fails in setup, after the trainer exists
    assert not (run_root / "gemma_tiny").exists()
    main([*args, "--trainer.max_steps", "1"])
    error_line_of([*args, "--data.init_args.seq_len", "1024"], capsys)
    assert sorted(p.name for p in (run_root / "gemma_tiny").iterdir()) == ["v0"]  # v1 was removed, v0 kept
