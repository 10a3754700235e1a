"""The InfoNCE gate: a scripted EMA sequence gives a hand-computed schedule; resuming continues it exactly."""

from __future__ import annotations

import io
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from callbacks.infonce_gate import GateConfig, InfoNCEGateCallback, InfoNCEGateSchedule
from src.errors import EngramError

# Binary-exact read cosines so every EMA below is exact: with ema_decay 0.5 the EMAs are
# 0.125, 0.1875, 0.34375 (≥ 0.3: opens at the end of epoch 2), ...
EPOCH_COS = [0.125, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75, 0.75]
BATCHES = 2


def batch_cos(epoch: int, batch_idx: int) -> float:
    """The batches of an epoch differ (±1/16) but average to EPOCH_COS[epoch], so a lost batch changes the EMA."""
    return EPOCH_COS[epoch] + (0.0625 if batch_idx % 2 else -0.0625)


CONFIG = GateConfig(
    ema_decay=0.5,
    threshold=0.3,
    lambda_start=0.1,
    lambda_increment=0.1,
    lambda_max=0.3,
    freeze_epochs=1,
    lr_restart_factor=3.0,
    lr_restart_epochs=2,
    write_cooldown_batches=3,
    oracle_mix_start=1.0,
    oracle_mix_end=0.0,
    oracle_mix_epochs=4,
)


def _run(schedule: InfoNCEGateSchedule, epochs: range, log: list) -> None:
    for epoch in epochs:
        for b in range(BATCHES):
            log.append((epoch, schedule.infonce_weight, schedule.write_enabled, schedule.lr_scale, schedule.oracle_mix))
            schedule.record_batch(batch_cos(epoch, b))
        schedule.end_epoch()


def test_schedule_follows_scripted_ema_sequence() -> None:
    schedule = InfoNCEGateSchedule(CONFIG)
    log: list = []
    emas = []
    for epoch in range(len(EPOCH_COS)):
        _run(schedule, range(epoch, epoch + 1), log)
        emas.append(schedule.ema)
    assert emas[:3] == [0.125, 0.1875, 0.34375]
    assert schedule.open_epoch == 3

    lam = [entry[1] for entry in log[::BATCHES]]
    # closed for epochs 0-2; λ_start in 3 and held one freeze epoch (4); +0.1 per epoch; capped at 0.3
    assert lam == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.1, 0.2, 0.3, 0.3], abs=1e-12)
    # write cooldown: the first 3 batches after opening (both of epoch 3, the first of epoch 4)
    writes = [entry[2] for entry in log]
    assert writes == [True] * 6 + [False, False, False] + [True] * 7
    # LR warm restart: ×3 in the opening epoch, half-cosine back to 1 over 2 epochs: 3, 1 + 2·½(1 + cos(π/2)) = 2
    lr = [entry[3] for entry in log[::BATCHES]]
    assert lr == pytest.approx([1, 1, 1, 3, 2, 1, 1, 1], abs=1e-12)
    # oracle mix: linear from 1 at epoch 0 to 0 at epoch 4
    mix = [entry[4] for entry in log[::BATCHES]]
    assert mix == pytest.approx([1, 0.75, 0.5, 0.25, 0, 0, 0, 0], abs=1e-12)


def test_plateau_requirement_delays_opening() -> None:
    """With require_plateau the EMA must also stop improving for more than `patience` epochs."""
    config = GateConfig(ema_decay=0.0, threshold=0.3, require_plateau=True, patience=1, plateau_threshold=0.01)
    schedule = InfoNCEGateSchedule(config)
    # ema = the epoch value (decay 0). Above threshold from epoch 1, improving until epoch 3, flat after.
    for value in [0.2, 0.4, 0.5, 0.6, 0.603, 0.6, 0.6]:
        schedule.record_batch(value)
        schedule.end_epoch()
        if schedule.is_open:
            break
    # bad epochs: epoch 4 (0.603 < 0.6·1.01), epoch 5 → 2 > patience 1 → opens at the end of epoch 5
    assert schedule.epochs_done == 6 and schedule.open_epoch == 6
    no_plateau = InfoNCEGateSchedule(GateConfig(ema_decay=0.0, threshold=0.3))
    for value in [0.2, 0.4]:
        no_plateau.record_batch(value)
        no_plateau.end_epoch()
    assert no_plateau.open_epoch == 2


def test_read_patience_and_guard_follow_scripted_sequence() -> None:
    """read_patience: the EMA must stay ≥ threshold for 1 more epoch; the guard halves λ when the EMA drops more
    than 0.1 below the EMA the gate opened at, and λ resumes its ramp from there."""
    config = GateConfig(
        ema_decay=0.0, threshold=0.3, read_patience=1, lambda_start=0.1, lambda_increment=0.1, lambda_max=0.5,
        guard_drop=0.1, guard_backoff=0.5,
    )  # fmt: skip
    schedule = InfoNCEGateSchedule(config)
    lam, fractions = [], []
    for value in [0.2, 0.4, 0.5, 0.6, 0.45, 0.55, 0.3, 0.6]:  # ema = the epoch value (decay 0)
        lam.append(schedule.infonce_weight)
        schedule.record_batch(value)
        schedule.end_epoch()
        fractions.append(schedule.open_fraction)
    # ready from epoch 1; one more ready epoch (2) → opens after epoch 2 at EMA 0.5; the guard line is 0.4
    assert schedule.open_epoch == 3 and schedule.open_ema == 0.5
    # 0.45 and 0.55 stay above 0.4 (λ ramps), 0.3 trips: 0.4 → 0.2, then the ramp continues to 0.3
    assert lam == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3, 0.4, 0.2], abs=1e-12)
    assert schedule.lam == pytest.approx(0.3) and schedule.guard_trips == 1
    assert fractions == [0, 0, 0, 1, 1, 1, 1, 1]
    # without read_patience the first ready epoch opens the gate
    eager = InfoNCEGateSchedule(GateConfig(ema_decay=0.0, threshold=0.3))
    for value in [0.2, 0.4]:
        eager.record_batch(value)
        eager.end_epoch()
    assert eager.open_epoch == 2


def test_guard_trip_during_freeze_still_backs_off() -> None:
    config = GateConfig(ema_decay=0.0, threshold=0.3, lambda_start=0.2, freeze_epochs=2, guard_drop=0.05)
    schedule = InfoNCEGateSchedule(config)
    for value in [0.5, 0.3, 0.5]:  # opens after epoch 0 at 0.5; epoch 1 (frozen) trips; epoch 2 (frozen) does not
        schedule.record_batch(value)
        schedule.end_epoch()
    assert schedule.guard_trips == 1 and schedule.lam == pytest.approx(0.1) and schedule.freeze_left == 0


def _stream(schedule: InfoNCEGateSchedule, first: int, stop: int, log: list, close_last_epoch: bool = True) -> None:
    """Process global batches first..stop-1; an epoch ends after its last batch (optionally not the final one)."""
    for b in range(first, stop):
        epoch = b // BATCHES
        log.append((epoch, schedule.infonce_weight, schedule.write_enabled, schedule.lr_scale, schedule.oracle_mix))
        schedule.record_batch(batch_cos(epoch, b))
        if (b + 1) % BATCHES == 0 and (close_last_epoch or b + 1 < stop):
            schedule.end_epoch()


@pytest.mark.parametrize(
    ("stop", "closed"),
    [(5, True), (6, True), (6, False), (7, True)],  # mid-epoch 2; after its end; just before its end; mid-epoch 3
)
def test_saved_and_restored_schedule_gives_same_sequence(stop: int, closed: bool) -> None:
    total = len(EPOCH_COS) * BATCHES
    uninterrupted, reference = InfoNCEGateSchedule(CONFIG), []
    _stream(uninterrupted, 0, total, reference)

    first, log = InfoNCEGateSchedule(CONFIG), []
    _stream(first, 0, stop, log, close_last_epoch=closed)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = InfoNCEGateSchedule(CONFIG)
    resumed.load_state_dict(torch.load(buffer))
    if resumed.epochs_done < stop // BATCHES:  # saved just before an epoch end: Lightning re-runs that end
        resumed.end_epoch()
    _stream(resumed, stop, total, log)
    assert log == reference
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_config_validation() -> None:
    with pytest.raises(EngramError, match="lambda_start"):
        GateConfig(lambda_start=0.9, lambda_max=0.5)
    with pytest.raises(EngramError, match="patience"):
        GateConfig(patience=-1)
    with pytest.raises(EngramError, match="read_patience=-2"):
        GateConfig(read_patience=-2)
    with pytest.raises(EngramError, match=r"guard_drop=-0\.1"):
        GateConfig(guard_drop=-0.1)
    with pytest.raises(EngramError, match=r"guard_backoff=1\.5"):
        GateConfig(guard_backoff=1.5)
    with pytest.raises(EngramError, match="read_cos"):
        InfoNCEGateSchedule().record_batch(float("nan"))


# --- the Lightning wrapper ---------------------------------------------------------------------------------


class ScriptedReads(pl.LightningModule):
    """A real (tiny) LightningModule implementing the gate interface; its read cosine follows EPOCH_COS."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.infonce_weight, self.write_enabled, self.oracle_mix = 0.0, True, 0.0
        self.read_cos: float | None = None
        self.seen: list[tuple] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        lr = self.lr_schedulers().get_last_lr()[0]  # the scheduler's LR (the gate's factor is applied on top)
        self.seen.append((self.current_epoch, batch_idx, self.infonce_weight, self.write_enabled, self.oracle_mix, lr))
        self.read_cos = torch.tensor(batch_cos(self.current_epoch, batch_idx))
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self) -> dict:
        optimizer = RecordingSGD(self.parameters(), lr=0.1)
        # a per-step schedule: the gate's LR factor must multiply it, never freeze or leak into it
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RecordingSGD(torch.optim.SGD):
    """Records the LR each ``step()`` actually uses (after the gate's step pre-hook)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.used: list[float] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        self.used.append(self.param_groups[0]["lr"])
        return super().step(closure)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(BATCHES * 4, 2)), batch_size=4)


def _fit(
    root: Path, max_epochs: int, save_on_train_epoch_end: bool, ckpt_path: str | None = None
) -> tuple[ScriptedReads, InfoNCEGateCallback]:
    module, gate = ScriptedReads(), InfoNCEGateCallback(CONFIG)
    trainer = pl.Trainer(
        default_root_dir=root,
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # save_on_train_epoch_end=False (Lightning's choice whenever validation does not run exactly once per
        # epoch) writes the checkpoint at on_validation_end, before on_train_epoch_end: the resumed run must
        # still apply that epoch's gate update.
        callbacks=[
            gate,
            ModelCheckpoint(
                dirpath=root / "ckpt",
                save_top_k=-1,
                filename="{epoch}",
                save_on_train_epoch_end=save_on_train_epoch_end,
            ),
        ],
    )
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader(), ckpt_path=ckpt_path)
    return module, gate


@pytest.mark.parametrize("save_on_train_epoch_end", [True, False])
def test_callback_applies_schedule_and_resumes_exactly(tmp_path: Path, save_on_train_epoch_end: bool) -> None:
    full, full_gate = _fit(tmp_path / "full", len(EPOCH_COS), save_on_train_epoch_end)
    lam = [row[2] for row in full.seen[::BATCHES]]
    assert lam == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.1, 0.2, 0.3, 0.3], abs=1e-12)
    assert [row[3] for row in full.seen] == [True] * 6 + [False] * 3 + [True] * 7
    # the scheduler's LR follows 0.1/(1+step), untouched by the gate; each step used it times the gate factor
    # (×3 in epoch 3, ×2 in epoch 4: the warm restart)
    steps = range(len(full.seen))
    assert [row[5] for row in full.seen] == pytest.approx([0.1 / (1 + s) for s in steps])
    factor = [1, 1, 1, 3, 2, 1, 1, 1]
    used = full.trainer.optimizers[0].used
    assert used == pytest.approx([0.1 / (1 + s) * factor[s // BATCHES] for s in steps])
    assert [row[4] for row in full.seen[::BATCHES]] == pytest.approx([1, 0.75, 0.5, 0.25, 0, 0, 0, 0])

    # Resume from the end of epoch 2, the epoch whose end opens the gate.
    checkpoint = str(tmp_path / "full/ckpt/epoch=2.ckpt")
    resumed, resumed_gate = _fit(tmp_path / "resumed", len(EPOCH_COS), save_on_train_epoch_end, checkpoint)
    assert resumed.seen == [row for row in full.seen if row[0] >= 3]
    assert resumed_gate.state_dict() == full_gate.state_dict()


def test_callback_rejects_module_without_interface(tmp_path: Path) -> None:
    class NoGate(ScriptedReads):
        def __init__(self) -> None:
            super().__init__()
            del self.oracle_mix

    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, callbacks=[InfoNCEGateCallback()])
    with pytest.raises(EngramError, match="oracle_mix"):
        trainer.fit(NoGate(), train_dataloaders=_loader())
