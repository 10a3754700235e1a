"""Sharded training through ``python -m src.cli``: the strategy fragments in ``configs/strategies/``.

* ``fsdp.yaml`` (Lightning's FSDPStrategy, torch's FSDP1) needs CUDA: here it is parsed, built, and refused on the
  CPU in one line.
* ``fsdp2.yaml`` (Lightning's ModelParallelStrategy, torch's ``fully_shard`` applied by ``CausalLM.configure_model``)
  runs on the CPU over gloo: two processes train with the parameters split between them, to the same weights as
  DDP, write a full-state ``last.ckpt`` through Engram's checkpoint writer, and ``--ckpt_path last`` resumes it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from callbacks.token_checkpoints import token_checkpoints
from src import hardware
from src.checkpoints import read_checkpoint
from src.cli import main
from src.errors import EngramError
from src.hardware import resolve_hardware
from tests.conftest import CONFIGS, FAST, REPO, error_line_of

FSDP = CONFIGS / "strategies" / "fsdp.yaml"
FSDP2 = CONFIGS / "strategies" / "fsdp2.yaml"
FSDP_CLASS = "lightning.pytorch.strategies.FSDPStrategy"
FSDP2_CLASS = "lightning.pytorch.strategies.ModelParallelStrategy"


# --- the FSDP fragment (CUDA only) ------------------------------------------------------------------------------
def test_fsdp_fragment_parses_and_builds(capsys: pytest.CaptureFixture[str]) -> None:
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "gemma.yaml"), "--config", str(FSDP), "--print_config"])
    spec = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert spec["class_path"] == FSDP_CLASS and spec["init_args"]["state_dict_type"] == "full"

    # The printed config builds the strategy the way LightningCLI does: class names from YAML become a set.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy | str)
    strategy = parser.instantiate(parser.parse_object({"strategy": spec})).strategy
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert policy._module_classes == {Gemma2DecoderLayer, LlamaDecoderLayer, GPT2Block}
    assert strategy._activation_checkpointing_kwargs == {}  # the model's own checkpointing, not a second one


def test_fsdp_on_the_cpu_is_one_line(capsys: pytest.CaptureFixture[str], run_root: Path) -> None:
    args = ["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), "--trainer.accelerator", "cpu", "--run.root",
            str(run_root)]  # fmt: skip
    err = error_line_of([*args, "--config", str(FSDP), "--trainer.devices", "2"], capsys)
    assert "strategy=FSDPStrategy needs CUDA GPUs" in err and "configs/strategies/fsdp2.yaml" in err
    err = error_line_of([*args, "--trainer.strategy", "fsdp"], capsys)  # Lightning's name, one CPU process
    assert "strategy=fsdp needs CUDA GPUs" in err
    err = error_line_of([*args, "--config", str(FSDP2), "--trainer.devices", "2"], capsys)
    assert "data_parallel_size 2" in err
    assert not any(run_root.iterdir())


def test_sharded_choices_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    fsdp = {"class_path": FSDP_CLASS, "init_args": {"state_dict_type": "full"}}
    fsdp2 = {"class_path": FSDP2_CLASS, "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1,
                                                      "save_distributed_checkpoint": False}}  # fmt: skip
    hw = resolve_hardware("cpu", 2, fsdp2, None)
    assert hw.strategy == "ModelParallelStrategy" and "strategy=ModelParallelStrategy " in hw.summary()
    sharded = {**fsdp2, "init_args": {**fsdp2["init_args"], "save_distributed_checkpoint": True}}
    with pytest.raises(EngramError, match=r"folder of shards.*save_distributed_checkpoint false"):
        resolve_hardware("cpu", 2, sharded, None)
    with pytest.raises(EngramError, match=r"data_parallel_size=3 does not cover 2 devices"):
        resolve_hardware("cpu", 2, {**fsdp2, "init_args": {**fsdp2["init_args"], "data_parallel_size": 3}}, None)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "H200")
    summary = resolve_hardware("cuda", 8, fsdp, None).summary()
    assert summary.endswith("strategy=FSDPStrategy precision=bf16-mixed (auto)")
    with pytest.raises(EngramError, match=r"state_dict_type=sharded .*state_dict_type full"):
        resolve_hardware("cuda", 8, {**fsdp, "init_args": {"state_dict_type": "sharded"}}, None)
    with pytest.raises(EngramError, match=r"data_parallel_size 8 \(8 devices"):  # devices auto: every GPU
        resolve_hardware(
            "cuda", "auto", {**fsdp2, "init_args": {**fsdp2["init_args"], "data_parallel_size": "auto"}}, None
        )
    with pytest.raises(EngramError, match=r"does not support precision=16-mixed"):
        resolve_hardware("cuda", 2, fsdp2, "16-mixed")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_mps_available", lambda: True)
    for spec in (fsdp, fsdp2, "fsdp"):
        with pytest.raises(EngramError, match=r"is not supported on MPS"):
            resolve_hardware("mps", 1, spec, None)


def test_a_folder_of_shards_is_named_as_such(tmp_path: Path) -> None:
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"global_step": 4}, folder / "meta.pt")
    with pytest.raises(EngramError, match=r"is a folder of shards"):
        read_checkpoint(folder)


# --- FSDP2 on the CPU: two processes, then a resume -------------------------------------------------------------
def _callbacks(out: Path) -> list[dict]:
    """gemma_tiny's telemetry callbacks (Cap-Gauge measuring at step 4 and 8) except WeightDelta, which refuses
    sharded strategies, plus the recorders."""
    kept = []
    for spec in yaml.safe_load((CONFIGS / "gemma_tiny.yaml").read_text())["trainer"]["callbacks"]:
        if spec["class_path"].endswith("WeightDelta"):
            continue
        if spec["class_path"].endswith("CapGauge"):
            spec["init_args"]["every_n_steps"] = 4
        kept.append(spec)
    (out / "batches").mkdir(parents=True)
    return [*kept, {"class_path": "tests.helpers.RecordBatches", "init_args": {"out_dir": str(out / "batches")}},
            {"class_path": "tests.helpers.RecordShards", "init_args": {"out_dir": str(out)}}]  # fmt: skip


SHARDED = ["--config", str(FSDP2), "--trainer.strategy.init_args.data_parallel_size", "2"]


def _fit(
    run_root: Path, tmp_path: Path, name: str, *extra: str, strategy: list[str] = SHARDED
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / name
    overrides = tmp_path / f"{name}.yaml"
    overrides.write_text(yaml.safe_dump({"trainer": {"callbacks": _callbacks(out)}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "src.cli", "fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *strategy,
         "--config", str(overrides), *FAST[2:], "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--model.init_args.loss_chunk_size", "64", "--run.root", str(run_root), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_process_fsdp2_on_cpu_shards_trains_as_ddp_and_resumes(run_root: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    _, out = _fit(run_root, tmp_path, "first", "--trainer.max_steps", "4")
    run_dir = run_root / "gemma_tiny" / "v0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()  # a full-state checkpoint, one file, through Engram's writer
    saved = read_checkpoint(last)
    assert saved["global_step"] == 4 and saved["tokens_seen"] == 4 * 2 * 4 * 64
    first = shutil.copy(last, tmp_path / "first.ckpt")

    ranks = _ranks(out)
    for rank in ranks:  # every parameter is a DTensor shard, each rank holding about half of every one
        assert all(rank["dtensor"].values())
        held = sum(rank["local"].values()) / sum(rank["full"].values())
        assert 0.45 < held < 0.55, held
    assert all(ranks[0]["local"][n] + ranks[1]["local"][n] == ranks[0]["full"][n] for n in ranks[0]["full"])
    assert all(saved["state_dict"][n].numel() == full for n, full in ranks[0]["full"].items())  # whole tensors
    assert all(len(r["losses"]) == 4 and all(math.isfinite(x) for x in r["losses"]) for r in ranks)
    seen = [{tuple(x) for x in json.loads((out / "batches" / f"rank{r}.json").read_text())} for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4 * 4 and not seen[0] & seen[1]  # each rank reads its own shard of data

    # The same 4 steps under DDP (each rank holding the whole model) end in the same weights: the shards' gradients
    # are reduced as DDP's are, those of the root unit (embeddings, head) under the chunked loss included.
    _fit(
        run_root,
        tmp_path,
        "ddp",
        "--trainer.max_steps",
        "4",
        "--run.name",
        "ddp",
        strategy=["--trainer.strategy", "ddp"],
    )
    ddp = read_checkpoint(run_root / "ddp" / "v0" / "checkpoints" / "last.ckpt")["state_dict"]
    assert ddp.keys() == saved["state_dict"].keys()
    for name, weight in ddp.items():
        torch.testing.assert_close(saved["state_dict"][name], weight, rtol=0, atol=1e-6, msg=name)

    done, out = _fit(run_root, tmp_path, "resumed", "--trainer.max_steps", "8", "--ckpt_path", "last")
    assert f"[engram] resuming {last}" in done.stdout
    assert not (run_root / "gemma_tiny" / "v1").exists()
    ranks = _ranks(out)
    assert all(r["start_step"] == 4 and len(r["losses"]) == 4 for r in ranks)
    assert all(math.isfinite(x) for r in ranks for x in r["losses"])
    # The shards the resumed run starts from, gathered, are the saved weights, bit for bit.
    start = torch.load(out / "start.pt", weights_only=True)
    before = torch.load(first, weights_only=True)["state_dict"]
    assert start.keys() == before.keys() and all(torch.equal(start[k], before[k]) for k in before)
    final = read_checkpoint(last)
    assert final["global_step"] == 8 and final["tokens_seen"] == 8 * 2 * 4 * 64
    # AdamW's step counters went on from the checkpoint's 4: the optimizer state was restored, not restarted.
    assert {int(s["step"]) for s in final["optimizer_states"][0]["state"].values()} == {8}
    (token_checkpoint,) = token_checkpoints(run_dir / "checkpoints" / "tokens")  # a collective save mid-run
    assert read_checkpoint(token_checkpoint)["global_step"] == 5
    print(f"three fits of 2 processes: {time.monotonic() - started:.0f} s")
