"""A corpus of bad inputs through the real command line: each ends with exit code 2, exactly one line on stderr
(``error: ...``, naming the key or file), no traceback, and no run directory left behind.

Every case is its own ``python -m src.cli`` process (``tests/cli_forkserver.py`` shares the import between them);
``test_the_import_writes_nothing_to_stderr`` shows that nothing printed while importing could precede the line.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tests.cli_forkserver import CLIServer
from tests.conftest import CONFIGS, REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY_TTT = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, mini_batch_size: 8}"


def _words(n: int) -> str:
    vocab = ["the", "sea", "was", "calm", "and", "a", "ship", "sailed", "under", "grey", "sky"]
    return " ".join(vocab[(i * 7) % len(vocab)] for i in range(n))


@pytest.fixture(scope="module")
def world(cli_server: CLIServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs, checkpoints and data files the cases point at."""
    root = tmp_path_factory.mktemp("bad_inputs")
    runs = root / "runs"
    gemma = ["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), "--trainer.max_steps", "2", *QUIET]
    made = [
        [*gemma, "--run.root", str(runs), "--run.name", "small"],
        [*gemma, "--run.root", str(runs), "--run.name", "wide", "--model.init_args.config_overrides",
         "{hidden_size: 128}"],
        ["fit", "--config", str(CONFIGS / "ttt_quickstart.yaml"), "--model.init_args.config_overrides", TINY_TTT,
         "--data.init_args.seq_len", "64", "--trainer.max_steps", "2", "--run.root", str(runs), *QUIET],
    ]  # fmt: skip
    for args in made:
        done = cli_server.run(args)
        assert done.rc == 0, done.stderr[-2000:]

    files = root / "files"
    files.mkdir()
    (files / "not_torch.zip").write_bytes(b"")
    with zipfile.ZipFile(files / "not_torch.zip", "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    last = (runs / "small" / "v0" / "checkpoints" / "last.ckpt").read_bytes()
    (files / "truncated.ckpt").write_bytes(last[: len(last) // 2])
    (files / "plain.pt").write_bytes(gzip.compress(b"x"))  # neither zip nor pickle
    books = files / "books_bad_bytes"
    books.mkdir()
    (books / "good.txt").write_text(_words(4000))
    (books / "random.txt").write_bytes(bytes(range(128, 256)) * 64)  # not UTF-8
    empty = files / "books_empty"
    empty.mkdir()
    (empty / "empty.txt").write_text("")
    jsonl = files / "slim_bad_line"
    jsonl.mkdir()
    lines = [json.dumps({"text": _words(2000), "meta": {"redpajama_set_name": "RedPajamaBook"}}) for _ in range(4)]
    lines.insert(2, '{"text": "cut off here')
    (jsonl / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    (files / "pg19_bad_schema").mkdir()
    pq.write_table(pa.table({"title": ["a"], "body": [_words(500)]}), files / "pg19_bad_schema" / "part-0.parquet")
    (files / "a_file").write_text("I am a file")
    books = files / "books_not_utf8"  # the bad book sorts first, so the streamed first-window check reads it too
    books.mkdir()
    (books / "good.txt").write_text(_words(4000))
    (books / "bad.txt").write_bytes(b"first line\nsecond\n\x9f\xff not UTF-8\n")
    rows = [json.dumps({"text": _words(2000), "meta": {"redpajama_set_name": "RedPajamaBook"}}) for _ in range(4)]
    no_text = files / "slim_no_text"
    no_text.mkdir()
    (no_text / "part-0.jsonl").write_text("\n".join([*rows[:2], '{"body": "no text here"}', *rows[2:]]) + "\n")
    parquet = files / "pg19_corrupt_parquet"
    parquet.mkdir()
    pq.write_table(pa.table({"text": [_words(4000)] * 3}), parquet / "good.parquet")
    (parquet / "bad.parquet").write_bytes(b"PAR1" + bytes(range(256)))
    zst = files / "slim_corrupt_zst"
    zst.mkdir()
    (zst / "good.jsonl.zst").write_bytes(zstandard.compress(("\n".join(rows) + "\n").encode()))
    (zst / "bad.jsonl.zst").write_bytes(b"not zstd at all" * 20)
    return {"runs": runs, "files": files}


def _cases(w: dict[str, Path]) -> dict[str, tuple[list[str], list[str]]]:
    """id -> (arguments after ``python -m src.cli``, substrings the error line must contain)."""
    runs, files = str(w["runs"]), w["files"]
    gemma = ["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), "--run.root", runs, *QUIET]
    pg19 = ["fit", "--config", str(CONFIGS / "gemma.yaml"), "--model.init_args.preset", "gemma2-tiny",
            "--model.init_args.compile", "false",
            "--trainer.accumulate_grad_batches", "1", "--data.init_args.seq_len", "64",
            "--data.init_args.num_workers", "0", "--run.root", runs, *QUIET]  # fmt: skip
    slim = [*gemma, "--data", "data_modules.slim_pile.SlimPileDataModule", "--data.init_args.seq_len", "64"]
    pg19_tiny = [*gemma, "--data", "data_modules.pg19.PG19DataModule", "--data.init_args.seq_len", "64"]
    streamed = ["--data.init_args.streaming", "true", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    over = "--model.init_args.config_overrides"
    emma = ["fit", "--config", str(CONFIGS / "emma_needle_256.yaml"), "--run.root", runs, *QUIET]
    tlora = ["fit", "--config", str(CONFIGS / "tlora_backbone.yaml"), "--run.root", runs, *QUIET]
    ttt = ["fit", "--config", str(CONFIGS / "ttt_quickstart.yaml"), "--run.root", runs, *QUIET]
    small = [*gemma, "--run.name", "small", "--ckpt_path", "last"]
    ttt_ckpt = str(w["runs"] / "ttt_quickstart" / "v0" / "checkpoints" / "last.ckpt")
    wide_ckpt = str(w["runs"] / "wide" / "v0" / "checkpoints" / "last.ckpt")
    return {
        # config keys and types
        "unknown-key": ([*gemma, "--model.init_args.lrr", "0.1"], ["lrr"]),
        "bad-type": ([*gemma, "--model.init_args.lr", "fast"], ["lr"]),
        "unknown-trainer-key": ([*gemma, "--trainer.max_stepz", "3"], ["max_stepz"]),
        "bad-precision": ([*gemma, "--trainer.precision", "8-mixed"], ["precision"]),
        "unknown-guard-mode": ([*gemma, "--guard.on_nonfinite", "ignore"], ["on_nonfinite"]),
        "missing-config-file": (["fit", "--config", str(files / "nope.yaml")], ["nope.yaml"]),
        # optimizer values (AdamW would only reject them once training starts)
        "negative-lr": ([*gemma, "--model.init_args.lr", "-0.001"], ["model.init_args.lr"]),
        "zero-lr": ([*gemma, "--model.init_args.lr", "0"], ["model.init_args.lr"]),
        "beta-out-of-range": ([*gemma, "--model.init_args.betas", "[0.9, 1.5]"], ["model.init_args.betas"]),
        "negative-weight-decay": ([*gemma, "--model.init_args.weight_decay", "-1"], ["model.init_args.weight_decay"]),
        "negative-warmup": ([*gemma, "--model.init_args.warmup_steps", "-5"], ["model.init_args.warmup_steps"]),
        "min-lr-ratio-above-one": ([*gemma, "--model.init_args.min_lr_ratio", "2"], ["model.init_args.min_lr_ratio"]),
        # trainer and callback values
        "negative-max-steps": ([*gemma, "--trainer.max_steps", "-5"], ["trainer.max_steps"]),
        "negative-max-epochs": ([*gemma, "--trainer.max_epochs", "-3"], ["trainer.max_epochs"]),
        "zero-accumulation": ([*gemma, "--trainer.accumulate_grad_batches", "0"], ["trainer.accumulate_grad_batches"]),
        "negative-clip": ([*gemma, "--trainer.gradient_clip_val", "-1"], ["trainer.gradient_clip_val"]),
        "zero-val-interval": ([*gemma, "--trainer.val_check_interval", "0"], ["trainer.val_check_interval"]),
        "negative-val-batches": ([*gemma, "--trainer.limit_val_batches", "-1"], ["trainer.limit_val_batches"]),
        "zero-log-interval": ([*gemma, "--trainer.log_every_n_steps", "0"], ["trainer.log_every_n_steps"]),
        "negative-checkpoint-steps": (
            [*gemma, "--checkpoint.every_n_train_steps", "-3"],
            ["checkpoint.every_n_train_steps"],
        ),
        "bad-save-top-k": ([*gemma, "--checkpoint.save_top_k", "-2"], ["checkpoint.save_top_k"]),
        "negative-skips": ([*gemma, "--guard.max_consecutive_skips", "-1"], ["guard.max_consecutive_skips"]),
        "no-cuda": ([*gemma, "--trainer.accelerator", "cuda"], ["accelerator=cuda"]),
        # run directories
        "run-name-parent": ([*gemma, "--run.name", "../escaped"], ["run.name", "../escaped"]),
        "run-name-grandparent": ([*gemma, "--run.name", "../../x"], ["run.name", "../../x"]),
        "run-name-absolute": ([*gemma, "--run.name", str(files / "abs")], ["run.name", "--run.dir"]),
        "run-name-dotdot": ([*gemma, "--run.name", ".."], ["run.name"]),
        "run-name-space": ([*gemma, "--run.name", "my run"], ["run.name"]),
        "run-root-read-only": ([*gemma, "--run.root", "/proc/engram-runs"], ["run.root", "/proc/engram-runs"]),
        "run-root-under-a-file": ([*gemma, "--run.root", str(files / "a_file" / "runs")], ["run.root", "a_file"]),
        "run-root-is-a-file": ([*gemma, "--run.root", str(files / "a_file")], ["run.root", "a_file"]),
        "run-dir-is-a-file": ([*gemma, "--run.dir", str(files / "a_file")], ["run.dir", "a_file"]),
        # checkpoints
        "missing-checkpoint": ([*gemma, "--ckpt_path", str(files / "none.ckpt")], ["none.ckpt", "does not exist"]),
        "truncated-checkpoint": ([*gemma, "--ckpt_path", str(files / "truncated.ckpt")], ["truncated.ckpt", "corrupt"]),
        "zip-not-torch": ([*gemma, "--ckpt_path", str(files / "not_torch.zip")], ["not_torch.zip"]),
        "not-a-zip": ([*gemma, "--ckpt_path", str(files / "plain.pt")], ["plain.pt"]),
        "foreign-family-checkpoint": ([*gemma, "--ckpt_path", ttt_ckpt], ["TTTLM", "CausalLM"]),
        "wider-checkpoint": ([*gemma, "--ckpt_path", wide_ckpt], ["does not fit", "hidden_size"]),
        "resume-into-smaller-model": (
            [*gemma, "--run.name", "wide", "--ckpt_path", "last"],
            ["wide", "does not fit", "(259, 128) there and (259, 64) here"],
        ),
        "resume-with-new-lr": ([*small, "--model.init_args.lr", "1e6"], ["lr", "would not take effect"]),
        "resume-with-new-betas": ([*small, "--model.init_args.betas", "[0.8, 0.9]"], ["betas", "would not"]),
        "resume-with-new-seed": ([*small, "--seed_everything", "7"], ["seed_everything=7", "would not"]),
        "validate-foreign-checkpoint": (
            ["validate", "--config", str(CONFIGS / "gemma_tiny.yaml"), "--run.root", runs, "--ckpt_path", ttt_ckpt],
            ["TTTLM"],
        ),
        # data
        "missing-data-path": ([*pg19, "--data.init_args.data_path", str(files / "no_books")], ["data_path"]),
        "empty-corpus": ([*pg19, "--data.init_args.data_path", str(files / "books_empty")], ["books_empty"]),
        "random-bytes-book": (
            [*pg19, "--data.init_args.data_path", str(files / "books_bad_bytes")],
            ["random.txt line 1", "not UTF-8"],
        ),
        "book-not-utf8": (
            [*pg19_tiny, "--data.init_args.data_path", str(files / "books_not_utf8")],
            ["books_not_utf8/bad.txt line 3", "not UTF-8 text (byte 0x9f at offset 18)"],
        ),
        "book-not-utf8-streaming": (
            [*pg19_tiny, "--data.init_args.data_path", str(files / "books_not_utf8"), *streamed],
            ["bad.txt line 3", "not UTF-8"],
        ),
        "book-not-utf8-bpe": (
            [
                *pg19_tiny,
                "--data.init_args.data_path",
                str(files / "books_not_utf8"),
                "--data.init_args.tokenizer",
                "bpe",
                "--data.init_args.bpe_vocab_size",
                "300",
                "--data.init_args.cache_dir",
                str(files / "cache"),
            ],
            ["bad.txt line 3", "not UTF-8"],
        ),
        "pg19-without-text-column": (
            [*pg19, "--data.init_args.data_path", str(files / "pg19_bad_schema")],
            ["text"],
        ),
        "parquet-corrupt": (
            [*pg19_tiny, "--data.init_args.data_path", str(files / "pg19_corrupt_parquet")],
            ["bad.parquet", "not a readable parquet file"],
        ),
        "parquet-corrupt-streaming": (
            [*pg19_tiny, "--data.init_args.data_path", str(files / "pg19_corrupt_parquet"), *streamed],
            ["bad.parquet", "not a readable parquet file"],
        ),
        "jsonl-bad-line": (
            [*slim, "--data.init_args.data_path", str(files / "slim_bad_line")],
            ["part-0.jsonl line 3", "not valid JSON (Unterminated string starting at column 10)"],
        ),
        "jsonl-bad-line-streaming": (
            [*slim, "--data.init_args.data_path", str(files / "slim_bad_line"), *streamed],
            ["part-0.jsonl line 3", "not valid JSON"],
        ),
        "jsonl-row-without-text": (
            [*slim, "--data.init_args.data_path", str(files / "slim_no_text")],
            ["part-0.jsonl line 3", "no 'text' (its keys: ['body'])"],
        ),
        "jsonl-zst-corrupt": (
            [*slim, "--data.init_args.data_path", str(files / "slim_corrupt_zst")],
            ["bad.jsonl.zst", "cannot be read (zstd decompress error"],
        ),
        "unknown-slim-set": (
            [*slim, "--data.init_args.data_path", str(files / "slim_bad_line"), "--data.init_args.sets", "[Books]"],
            ["sets"],
        ),
        "sequence-longer-than-context": ([*gemma, "--data.init_args.seq_len", "1024"], ["seq_len=1024"]),
        # family settings that would only fail later
        "emma-zero-readout-temperature": (
            [*emma, over, "{readout_temperature: 0}"],
            ["model.init_args.config_overrides.readout_temperature=0 must be > 0"],
        ),
        "emma-decay-above-one": (
            [*emma, over, "{decay: 1.5}"],
            ["model.init_args.config_overrides.decay=1.5 must be in (0, 1]"],
        ),
        "emma-deq-zero-iterations": (
            [*emma, over, "{deq: {max_iter: 0}}"],
            ["model.init_args.config_overrides.deq.max_iter=0 must be >= 1"],
        ),
        "emma-deq-unknown-key": (
            [*emma, over, "{deq: {maxiter: 5}}"],
            ["model.init_args.config_overrides.deq has unknown key(s) ['maxiter']"],
        ),
        "emma-unknown-key": (
            [*emma, over, "{readout_temp: 0.1}"],
            ["model.init_args.config_overrides has unknown key(s) ['readout_temp']"],
        ),
        "emma-string-for-number": (
            [*emma, over, "{write_strength: strong}"],
            ["model.init_args.config_overrides.write_strength='strong' must be a number"],
        ),
        "tlora-zero-rank": ([*tlora, over, "{lora_r: 0}"], ["model.init_args.config_overrides.lora_r=0 must be >= 1"]),
        "tlora-unknown-target-module": (
            [*tlora, over, "{target_modules: [c_attn, q_proj]}"],
            ["model.init_args.config_overrides.target_modules", "q_proj"],
        ),
        "tlora-heads-do-not-divide": (
            [*tlora, over, "{n_embd: 100, n_head: 3}"],
            ["n_embd=100 is not divisible by n_head=3"],
        ),
        "tlora-unknown-key": (
            [*tlora, over, "{lora_rank: 4}"],
            ["model.init_args.config_overrides has unknown key(s) ['lora_rank']"],
        ),
        "ttt-zero-mini-batch": (
            [*ttt, over, "{mini_batch_size: 0}"],
            ["model.init_args.config_overrides.mini_batch_size=0 must be >= 1"],
        ),
        "ttt-heads-do-not-divide": (
            [*ttt, over, "{hidden_size: 64, num_attention_heads: 5}"],
            ["hidden_size=64 is not divisible by num_attention_heads=5"],
        ),
        "ttt-zero-rms-eps": (
            [*ttt, over, "{rms_norm_eps: 0}"],
            ["model.init_args.config_overrides.rms_norm_eps=0 must be > 0"],
        ),
        "ttt-unknown-key": (
            [*ttt, over, "{hiden_size: 64}"],
            ["model.init_args.config_overrides has unknown key(s) ['hiden_size']"],
        ),
        "emma-unknown-task": ([*emma, "--model.init_args.task", "poetry"], ["task"]),
        "emma-zero-infonce-temperature": (
            [*emma, "--model.init_args.infonce_temperature", "0"],
            ["infonce_temperature"],
        ),
        "tlora-unknown-stage": ([*tlora, "--model.init_args.stage", "pretrain"], ["stage"]),
        "ttt-unknown-preset": ([*ttt, "--model.init_args.preset", "7b"], ["7b"]),
        "causal-lm-unknown-preset": ([*gemma, "--model.init_args.preset", "gemma9"], ["gemma9"]),
        "token-checkpoints-zero": (
            [*gemma, "--trainer.callbacks.every_n_tokens", "0"],
            ["every_n_tokens"],
        ),
    }


CASE_IDS = sorted(_cases({"runs": Path("r"), "files": Path("f")}))


def test_the_corpus_is_large_enough() -> None:
    assert len(CASE_IDS) >= 40


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_ends_in_one_line(case: str, world: dict[str, Path], cli_server: CLIServer) -> None:
    args, expected = _cases(world)[case]
    runs_before = sorted(p.relative_to(world["runs"]) for p in world["runs"].rglob("*") if p.is_dir())
    done = cli_server.run(args)
    assert done.rc == 2, f"exit {done.rc}; stderr:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr has {len(lines)} lines:\n{done.stderr[-3000:]}"
    assert lines[0].startswith("error: ")
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    runs_after = sorted(p.relative_to(world["runs"]) for p in world["runs"].rglob("*") if p.is_dir())
    assert runs_after == runs_before  # a failed start leaves no (empty) run directory


def test_the_import_writes_nothing_to_stderr(world: dict[str, Path], cli_server: CLIServer) -> None:
    # Every child shares the server's import; whatever that printed (a library's warning) would precede each line.
    assert cli_server.import_stderr.read_text() == ""


def test_bitsandbytes_is_imported_only_for_families_that_need_it() -> None:
    # peft imports bitsandbytes, which on some CPUs logs a warning at import; nothing but LoRA families loads peft,
    # and the CLI silences that one import-time warning where peft is needed.
    probe = (
        "import logging, sys; import src.cli; "
        "assert 'peft' not in sys.modules and 'bitsandbytes' not in sys.modules, 'imported'; "
        "assert not logging.getLogger('bitsandbytes.backends.cpu.ops').isEnabledFor(logging.WARNING), 'loud'"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
