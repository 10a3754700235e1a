"""Choose the accelerator and precision, and refuse combinations that cannot run before any work starts.

``accelerator: auto`` picks CUDA, then MPS, then CPU. Precision, when not set, follows the device: ``bf16-mixed``
where the device supports it, ``32-true`` otherwise (CPU autocast in bf16 is slower than fp32, so CPU gets 32).
The precision printed and recorded in ``config.yaml`` is the one Lightning runs: aliases (``16``, ``bf16``, ``32``)
are written out, and ``16-mixed`` on the CPU, which Lightning would quietly run as ``bf16-mixed`` (the CPU has no
fp16 autocast), is mapped to ``bf16-mixed`` with a note in the start line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from src.errors import EngramError

_DDP_STRATEGIES = ("ddp", "fsdp", "deepspeed")
_PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


@dataclass(frozen=True)
class Hardware:
    accelerator: str
    devices: int | str | list[int]
    strategy: str
    precision: str
    precision_was_auto: bool
    precision_note: str = ""

    def summary(self) -> str:
        how = " (auto)" if self.precision_was_auto else f" ({self.precision_note})" if self.precision_note else ""
        name = f" [{torch.cuda.get_device_name(0)}]" if self.accelerator == "cuda" else ""
        return (
            f"[engram] accelerator={self.accelerator}{name} devices={self.devices} "
            f"strategy={self.strategy} precision={self.precision}{how}"
        )


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _auto_accelerator() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if _mps_available():
        return "mps"
    return "cpu"


def _supports_bf16(accelerator: str) -> bool:
    if accelerator == "cuda":
        return torch.cuda.is_bf16_supported()
    if accelerator == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
            return True
        except (RuntimeError, TypeError):
            return False
    return False


def _device_count(devices: int | str | list[int]) -> int | None:
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        return int(devices)
    return None  # "auto"


def resolve_hardware(
    accelerator: str | None,
    devices: int | str | list[int] | None,
    strategy: str | None,
    precision: str | int | None,
) -> Hardware:
    """Resolve ``auto`` choices and validate the combination; raise :class:`EngramError` naming the fix."""
    requested = (accelerator or "auto").lower()
    if requested == "gpu":
        requested = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cuda"
    acc = _auto_accelerator() if requested == "auto" else requested
    if acc == "cuda" and not torch.cuda.is_available():
        raise EngramError("accelerator=cuda but no CUDA GPU is visible. Use --trainer.accelerator auto (or cpu).")
    if acc == "mps" and not _mps_available():
        raise EngramError("accelerator=mps but MPS is not available here. Use --trainer.accelerator auto (or cpu).")

    devs = devices if devices is not None else "auto"
    count = _device_count(devs)
    strat = str(strategy or "auto")
    if acc == "cuda" and count is not None and count > torch.cuda.device_count():
        raise EngramError(
            f"devices={devs} but only {torch.cuda.device_count()} CUDA GPU(s) exist. "
            f"Use --trainer.devices {torch.cuda.device_count()} (or auto)."
        )
    if acc == "mps":
        if count is not None and count > 1:
            raise EngramError(f"devices={devs} on MPS: Apple GPUs run one device only. Use --trainer.devices 1.")
        if strat.startswith(_DDP_STRATEGIES):
            raise EngramError(
                f"strategy={strat} is not supported on MPS. Use --trainer.strategy auto, or run DDP on CUDA or CPU."
            )

    if precision is None or str(precision) == "auto":
        prec, was_auto = ("bf16-mixed" if _supports_bf16(acc) else "32-true"), True
    else:
        prec, was_auto = _PRECISION_ALIASES.get(str(precision), str(precision)), False
        if prec == "16-mixed" and acc == "cpu":
            note = "16-mixed was asked for; the CPU has no fp16 autocast, so it trains in bf16-mixed"
            return Hardware(acc, devs, strat, "bf16-mixed", False, note)
        if "bf16" in prec and acc in ("cuda", "mps") and not _supports_bf16(acc):
            device = torch.cuda.get_device_name(0) if acc == "cuda" else "this MPS device"
            raise EngramError(
                f"precision={prec} but {device} has no bf16 support. Use --trainer.precision 16-mixed or 32-true."
            )
    return Hardware(acc, devs, strat, prec, was_auto)
