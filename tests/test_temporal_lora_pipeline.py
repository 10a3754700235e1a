"""Temporal LoRA as a platform family: the three stages run from their configs through the CLI, in-process, with a
tiny backbone on CPU (pretrain → adapters → router + calibration → hysteresis → fatigue), and hand over through
``last.ckpt`` (frozen parts bit-identical, trained parts changed, router calibrated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from src.cli import main
from src.lightning_modules.temporal_lora import TemporalLoRALM, model_part
from tests.conftest import CONFIGS

STEPS = 7  # not a multiple of every_n_train_steps below: the stage's last step must still reach last.ckpt
SMALL = [
    "--trainer.max_steps", str(STEPS),
    "--trainer.val_check_interval", str(STEPS),
    "--trainer.limit_val_batches", "2",
    "--trainer.limit_test_batches", "2",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--checkpoint.every_n_train_steps", "5",
    "--model.init_args.preset", "tiny",
    "--model.init_args.config_overrides", "{n_embd: 32, router_hidden: 16, router_window: 4}",
    "--model.init_args.warmup_steps", "2",
    "--data.init_args.seq_len", "64",
    "--data.init_args.batch_size", "8",
    "--data.init_args.max_chars", "100000",
]  # fmt: skip
ANALYSIS = [
    "--trainer.callbacks.segment_len", "24",
    "--trainer.callbacks.n_sequences", "2",
    "--trainer.callbacks.block_lengths", "[8, 24]",
    "--trainer.callbacks.n_per_length", "2",
    "--trainer.callbacks.lead_len", "16",
    "--trainer.callbacks.tail_len", "32",
]  # fmt: skip


def _fit(config: str, root: Path, *extra: str):  # type: ignore[no-untyped-def]
    return main(["fit", "--config", str(CONFIGS / config), *SMALL, "--run.root", str(root), *extra])


def _state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    return checkpoint["state_dict"], checkpoint


def _parts(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if model_part(k) == part}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_three_stages_hand_over_and_analyses_run(run_root: Path) -> None:
    # 1. backbone pretraining
    cli = _fit("tlora_backbone.yaml", run_root)
    assert cli is not None and cli.model.family == "temporal_lora"
    val = cli.datamodule.datasets["val"]
    assert [int(val[i]["domain"]) for i in range(4)] == [0, 1, 0, 1]  # any prefix of the val split has both domains
    first = run_root / "tlora_backbone" / "v0" / "checkpoints" / "last.ckpt"
    s1, c1 = _state(first)
    assert c1["global_step"] == STEPS and c1["temporal_lora"]["stage"] == "backbone"
    assert all(v.abs().sum() == 0 for k, v in _parts(s1, "adapters").items() if ".lora_B." in k)  # peft's init

    # 2. adapters on the frozen backbone
    _fit("tlora_adapters.yaml", run_root, "--model.init_args.init_from", str(first))
    second = run_root / "tlora_adapters" / "v0" / "checkpoints" / "last.ckpt"
    s2, c2 = _state(second)
    assert c2["global_step"] == STEPS
    assert _same(_parts(s1, "backbone"), _parts(s2, "backbone"))  # frozen: bit-identical
    assert _same(_parts(s1, "router"), _parts(s2, "router"))
    for name in ("shakespeare", "python"):  # every domain's adapter learned (B left zero)
        assert all(v.abs().sum() > 0 for k, v in s2.items() if f".lora_B.{name}." in k)
    header = (run_root / "tlora_adapters" / "v0" / "metrics.csv").read_text().splitlines()[0]
    assert "val/loss_base" in header and "val/ppl" in header

    # 3. router + calibration + analyses; the run-directory form of init_from picks its last.ckpt
    # (calibration_windows above the val size: the calibration uses every validation window, checked below)
    cli = _fit(
        "tlora_router.yaml",
        run_root,
        "--model.init_args.init_from",
        str(second.parents[1]),
        "--model.init_args.calibration_windows",
        "100000",
        *ANALYSIS,
    )
    third = run_root / "tlora_router" / "v0" / "checkpoints" / "last.ckpt"
    s3, c3 = _state(third)
    assert c3["global_step"] == STEPS
    assert _same(_parts(s2, "backbone"), _parts(s3, "backbone"))
    assert _same(_parts(s2, "adapters"), _parts(s3, "adapters"))
    assert not _same(_parts(s2, "router"), _parts(s3, "router"))
    offset = s3["model.router.offset"]
    assert offset.abs().sum() > 0 and c3["temporal_lora"]["calibration"]["offset"] == pytest.approx(offset.tolist())

    # The checkpoint's router is calibrated: recomputed by hand on all validation windows, the mean weight of
    # adapter i on domain d's tokens, averaged over d, is 1/2 for both adapters.
    model = TemporalLoRALM.load_from_checkpoint(third, map_location="cpu").eval()
    val = cli.datamodule.datasets["val"]
    batch = cli.datamodule.collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        weights = torch.cat([model.model.route(ids).weights for ids in batch["input_ids"].split(64)])
    per_domain = torch.stack([weights[batch["domain"] == d].mean(dim=(0, 1)) for d in (0, 1)])
    assert per_domain.mean(0).tolist() == pytest.approx([0.5, 0.5], abs=1e-4)
    assert c3["temporal_lora"]["calibration"]["windows"] == len(val)

    metrics = (run_root / "tlora_router" / "v0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/router_acc", "val/router_acc/shakespeare", "val/router_acc/python"):
        assert key in metrics
    assert "train/routing/mean_weight/python" in metrics and "calibration/offset/python" in metrics

    analysis = run_root / "tlora_router" / "v0" / "analysis"
    for pair in ("shakespeare-python", "python-shakespeare"):
        assert all((analysis / f"{kind}_{pair}.png").stat().st_size > 0 for kind in ("hysteresis", "fatigue"))
        hysteresis = json.loads((analysis / f"hysteresis_{pair}.json").read_text())
        assert hysteresis["summary"]["ABA"]["n"] == hysteresis["summary"]["AMixA"]["n"] == 2
        fatigue = json.loads((analysis / f"fatigue_{pair}.json").read_text())
        assert set(fatigue["by_block_len"]) == {"8", "24"} and len(fatigue["per_trace"]) == 4
    events = [json.loads(line) for line in (run_root / "tlora_router" / "v0" / "telemetry.jsonl").open()]
    assert any(e["metric"].startswith("tlora/hysteresis/") for e in events)

    # 4. `test` of the router checkpoint alone (it holds everything: no init_from): held-out accuracy per domain,
    # equal to a count by hand over the same windows (2 batches of 8), and the analyses again in the new run dir
    cli = main(["test", "--config", str(CONFIGS / "tlora_router.yaml"), *SMALL, *ANALYSIS, "--run.root", str(run_root),
                "--model.init_args.init_from", "null", "--ckpt_path", str(third)])  # fmt: skip
    test = cli.datamodule.datasets["test"]
    batch = cli.datamodule.collate([test[i] for i in range(16)])
    with torch.no_grad():
        predicted = model.model.route(batch["input_ids"]).weights.argmax(-1)
    for d, name in enumerate(("shakespeare", "python")):
        by_hand = (predicted[batch["domain"] == d] == d).float().mean().item()
        assert float(cli.trainer.callback_metrics[f"test/router_acc/{name}"]) == pytest.approx(by_hand, abs=1e-6)
    assert (run_root / "tlora_router" / "v1" / "analysis" / "fatigue_python-shakespeare.json").is_file()


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_init_from_mistakes_are_clear(run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "last.ckpt"
    err = _error(["fit", "--config", str(CONFIGS / "tlora_adapters.yaml"), *SMALL, "--run.root", str(run_root),
                  "--model.init_args.init_from", str(missing)], capsys)  # fmt: skip
    assert f"init_from={str(missing)!r} does not exist" in err and "tlora_backbone.yaml" in err

    _fit("tlora_backbone.yaml", run_root, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")
    backbone = run_root / "tlora_backbone" / "v0" / "checkpoints" / "last.ckpt"
    err = _error(["fit", "--config", str(CONFIGS / "tlora_router.yaml"), *SMALL, "--run.root", str(run_root),
                  "--model.init_args.init_from", str(backbone)], capsys)  # fmt: skip
    assert "backbone-stage checkpoint" in err and "tlora_adapters.yaml" in err

    err = _error(["fit", "--config", str(CONFIGS / "tlora_adapters.yaml"), *SMALL, "--run.root", str(run_root),
                  "--model.init_args.init_from", str(backbone),
                  "--model.init_args.config_overrides", "{n_embd: 48}"], capsys)  # fmt: skip
    assert "does not fit this model's backbone" in err and "shape" in err

    err = _error(["fit", "--config", str(CONFIGS / "tlora_adapters.yaml"), *SMALL, "--run.root", str(run_root),
                  "--model.init_args.init_from", str(tmp_path)], capsys)  # fmt: skip
    assert "no checkpoints/last.ckpt" in err
