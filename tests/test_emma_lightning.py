"""EmmaLM through the real CLI: needle training with the InfoNCE gate logs accuracy, telemetry and the gate, and a
run resumed from a mid-schedule checkpoint continues the gate (and the weights) exactly."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from data_modules.listops import ListOpsDataModule
from src.cli import main
from src.errors import EngramError
from src.lightning_modules.emma import EmmaLM
from src.models.emma import TELEMETRY_KEYS
from src.telemetry import read_events
from tests.conftest import CONFIGS

# 3 batches an epoch, 4 epochs; a threshold below any cosine opens the gate after epoch 0, so λ, the freeze,
# the write cooldown and the LR restart all happen inside 12 steps.
GATE = (
    "{ema_decay: 0.5, threshold: -1.0, lambda_start: 0.1, lambda_increment: 0.1, lambda_max: 0.5, freeze_epochs: 1,"
    " write_cooldown_batches: 2, lr_restart_factor: 0.5, lr_restart_epochs: 2}"
)
ARGS = [
    "--config", str(CONFIGS / "emma_needle_256.yaml"),
    "--model.init_args.preset", "needle-tiny",
    "--data.init_args.seq_len", "192", "--data.init_args.batch_size", "4",
    "--data.init_args.train_size", "12", "--data.init_args.val_size", "4", "--data.init_args.test_size", "4",
    "--trainer.callbacks.config", GATE,
    "--trainer.max_steps", "12", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "1",
    "--trainer.log_every_n_steps", "1",
    "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


def _gate_state(ckpt: dict) -> dict:
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("InfoNCEGateCallback")]
    return state


def _step_log(run_dir: Path, column: str) -> pd.Series:
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.dropna(subset=[column]).groupby("step")[column].last()


def test_gate_resume_matches_uninterrupted_run(run_root: Path) -> None:
    main(["fit", *ARGS, "--run.root", str(run_root), "--run.name", "straight"])
    straight_dir = run_root / "straight" / "v0"
    straight = torch.load(straight_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert straight["global_step"] == 12

    # The schedule ran as configured: opened after epoch 0, held λ for one epoch, then grew by the increment.
    state = _gate_state(straight)
    # max_steps ends the run on epoch 3's last batch, so last.ckpt precedes that epoch's end.
    assert state["open_epoch"] == 1 and state["epochs_done"] == 3
    assert state["lam"] == pytest.approx(0.2)  # +0.1 once: epoch 1 was frozen
    # Per step (logged as float32): λ; writes off for 2 batches after opening; LR ×0.5, then a half cosine to 1.
    expected = {
        "gate/lambda_step": [0.0] * 3 + [0.1] * 6 + [0.2] * 3,
        "gate/write_enabled_step": [1.0] * 3 + [0.0] * 2 + [1.0] * 7,
        "gate/lr_scale_step": [1.0] * 3 + [0.5] * 3 + [0.75] * 3 + [1.0] * 3,
    }
    for column, values in expected.items():
        logged = _step_log(straight_dir, column)
        assert list(logged.index) == list(range(1, 13)), column  # trainer.global_step after each step
        assert logged.tolist() == pytest.approx(values, abs=1e-6), column

    # The module logged the task metric and every EMMA telemetry value each training step.
    frame = pd.read_csv(straight_dir / "metrics.csv")
    acc = frame["val/acc"].dropna()
    assert len(acc) >= 1 and acc.between(0.0, 1.0).all()
    for key in TELEMETRY_KEYS:
        if not key.startswith("read_"):  # read_* exist only where a batch has supervised reads
            assert frame[f"emma/{key}"].notna().sum() >= 12, key
    assert frame["emma/read_cos_raw"].notna().sum() >= 1

    # The telemetry stream carries the family's telemetry and the gate, not just train/ scalars.
    streamed = {e["metric"] for e in read_events(straight_dir / "telemetry.jsonl")}
    assert {"emma/write_cos", "emma/deq_rel_residual", "gate/lambda", "val/acc"} <= streamed

    # per_epoch.csv: one row per finished epoch; its spread of each training scalar is that of the epoch's steps in
    # metrics.csv (the same values, recorded independently), and the epoch's validation accuracy.
    table = pd.read_csv(straight_dir / "per_epoch.csv")
    assert table["epoch"].tolist() == list(range(len(table))) and len(table) >= 3
    for _, row in table.iterrows():
        steps = frame[(frame["epoch"] == row["epoch"]) & frame["emma/write_cos"].notna()]
        assert len(steps) == 3
        for stat in ("mean", "min", "max"):
            assert row[f"emma/write_cos/{stat}"] == pytest.approx(getattr(steps["emma/write_cos"], stat)(), rel=1e-5)
        assert row["emma/write_cos/std"] == pytest.approx(steps["emma/write_cos"].std(ddof=0), rel=1e-3, abs=1e-7)
        assert row["gate/lambda/mean"] == pytest.approx(steps["gate/lambda_step"].mean(), abs=1e-7)
        # epoch-end values are this epoch's, not carried over as a per-step spread
        assert "gate/read_cos_ema/mean" not in table.columns
        ema = frame[(frame["epoch"] == row["epoch"]) & frame["gate/read_cos_ema"].notna()]["gate/read_cos_ema"]
        assert row["gate/read_cos_ema"] == pytest.approx(ema.iloc[-1])
        val = frame[(frame["epoch"] == row["epoch"]) & frame["val/acc"].notna()]["val/acc"]
        assert row["val/acc"] == pytest.approx(val.iloc[-1])

    # Resume mid-schedule from step 4 (gate open, λ frozen, LR restart running, inside epoch 1) and from step 6,
    # epoch 1's last batch: Lightning then runs neither that epoch's end nor epoch 2's start, and the gate and the
    # sampler must still continue exactly.
    for step in (4, 6):
        (mid,) = (straight_dir / "checkpoints").glob(f"*step={step}.ckpt")
        name = f"resumed{step}"
        main(["fit", *ARGS, "--run.root", str(run_root), "--run.name", name, "--ckpt_path", str(mid)])
        resumed_dir = run_root / name / "v0"
        resumed = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert resumed["global_step"] == 12
        assert _gate_state(resumed) == state
        for column in ("gate/lambda_step", "gate/write_enabled_step", "gate/lr_scale_step", "emma/read_cos_raw"):
            resumed_log, straight_log = _step_log(resumed_dir, column), _step_log(straight_dir, column)
            assert resumed_log.loc[step + 1 :].equals(straight_log.loc[step + 1 :]), (step, column)
        for key, tensor in straight["state_dict"].items():
            assert torch.equal(tensor, resumed["state_dict"][key]), (step, key)
        # the per-epoch table (rows and the interrupted epoch's sums come from the checkpoint) is the same; an epoch
        # closed late lacks only the values of the epoch end Lightning skipped (its validation, the gate's EMA)
        wall_clock = [c for c in table if c == "epoch_seconds" or c.startswith("perf/")]  # timings differ run to run
        resumed_table = pd.read_csv(resumed_dir / "per_epoch.csv").drop(columns=wall_clock)
        expected = table.drop(columns=wall_clock)
        if step == 6:
            missing = [c for c in expected if pd.isna(resumed_table.loc[1, c]) and not pd.isna(expected.loc[1, c])]
            assert "val/acc" in missing and "gate/read_cos_ema" in missing
            assert not any(c.endswith(("/mean", "/std", "/min", "/max")) for c in missing)  # all spreads are back
            expected.loc[1, missing] = float("nan")
        pd.testing.assert_frame_equal(resumed_table, expected, rtol=1e-9)


def test_listops_classifies_without_seeing_the_answer(tmp_path: Path) -> None:
    """ListOps ends in "= answer"; EMMA classifies at "=", so changing the answer token changes nothing."""
    dm = ListOpsDataModule(seq_len=64, min_length=10, max_length=60, train_size=4, val_size=4, test_size=4,
                           cache_dir=str(tmp_path))  # fmt: skip
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    torch.manual_seed(0)
    module = EmmaLM(vocab_size=dm.vocab_size, preset="listops-lite", task="listops",
                    config_overrides={"d_model": 16, "d_mem": 32})  # fmt: skip
    module.eval()
    wrong = dict(batch, input_ids=batch["input_ids"].clone())
    answer = batch["input_ids"][:, -1] - ord("0")
    wrong["input_ids"][:, -1] = ord("0") + (answer + 1) % 10
    with torch.no_grad():
        out, loss = module._forward(batch, training=False)
        out_wrong, loss_wrong = module._forward(wrong, training=False)
    assert out.logits.shape == (4, 10)
    assert torch.equal(out.logits, out_wrong.logits) and torch.equal(loss, loss_wrong)


def test_bad_task_names_the_value() -> None:
    with pytest.raises(EngramError, match="task='qa'"):
        EmmaLM(vocab_size=259, preset="needle-tiny", task="qa")
