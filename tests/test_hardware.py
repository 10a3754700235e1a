"""Accelerator/precision resolution and the refusal of impossible combinations."""

from __future__ import annotations

import pytest
import torch

from src import hardware
from src.errors import EngramError
from src.hardware import resolve_hardware


def test_auto_on_this_machine_follows_the_device() -> None:
    hw = resolve_hardware("auto", "auto", "auto", None)
    if torch.cuda.is_available():
        assert hw.accelerator == "cuda"
        assert hw.precision == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true")
    else:
        assert hw.accelerator in ("mps", "cpu")
    if hw.accelerator == "cpu":
        assert hw.precision == "32-true"
    assert hw.precision_was_auto
    assert hw.summary().startswith("[engram] accelerator=")


def test_explicit_precision_is_kept() -> None:
    hw = resolve_hardware("cpu", 1, "auto", "bf16-mixed")
    assert hw.precision == "bf16-mixed" and not hw.precision_was_auto


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_names_the_fix() -> None:
    with pytest.raises(EngramError, match=r"accelerator=cuda but no CUDA GPU.*--trainer.accelerator auto"):
        resolve_hardware("cuda", 1, "auto", None)


def test_more_gpus_than_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend to be a one-GPU machine: the check is pure arithmetic on the device count.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    with pytest.raises(EngramError, match=r"devices=4 but only 1 CUDA GPU.*--trainer.devices 1"):
        resolve_hardware("cuda", 4, "ddp", None)


def test_bf16_on_gpu_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla V100")
    with pytest.raises(EngramError, match=r"precision=bf16-mixed but Tesla V100 has no bf16.*16-mixed or 32-true"):
        resolve_hardware("cuda", 1, "auto", "bf16-mixed")
    assert resolve_hardware("cuda", 1, "auto", None).precision == "32-true"


def test_ddp_on_mps_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_mps_available", lambda: True)
    with pytest.raises(EngramError, match=r"strategy=ddp is not supported on MPS"):
        resolve_hardware("mps", 1, "ddp", None)
    with pytest.raises(EngramError, match=r"devices=2 on MPS"):
        resolve_hardware("mps", 2, "auto", None)
