"""Choose the accelerator and precision, and refuse combinations that cannot run before any work starts.

``accelerator: auto`` picks CUDA, then MPS, then CPU. Precision, when not set, follows the device: ``bf16-mixed``
where the device supports it, ``32-true`` otherwise (CPU autocast in bf16 is slower than fp32, so CPU gets 32).
The precision printed and recorded in ``config.yaml`` is the one Lightning runs: aliases (``16``, ``bf16``, ``32``)
are written out, and ``16-mixed`` on the CPU, which Lightning would quietly run as ``bf16-mixed`` (the CPU has no
fp16 autocast), is mapped to ``bf16-mixed`` with a note in the start line.

The strategy may be a name (``ddp``, ``fsdp``) or a class spec from YAML (``class_path``/``init_args``, as in
``configs/strategies/``). Sharded strategies are checked here too, since Lightning and torch would refuse them only
after the processes start, with a traceback per rank: FSDP (FSDPStrategy) needs CUDA; FSDP2 (ModelParallelStrategy)
needs its mesh to cover every process; both must write full-state checkpoints (one file, through Engram's
checkpoint writer), which is what ``--ckpt_path last`` resumes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from src.errors import EngramError

_DDP_STRATEGIES = ("ddp", "fsdp", "deepspeed")
_FSDP2_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")  # what ModelParallelStrategy accepts
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


def _as_dict(value: Any) -> dict[str, Any]:
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        return value.as_dict()
    return dict(value) if isinstance(value, Mapping) else {}


def _strategy_spec(strategy: Any) -> tuple[str, str, dict[str, Any] | None]:
    """``(name to print, kind, init_args)`` of a strategy given as a name, a class spec or an instance (whose
    arguments are not known: None); kind is ``fsdp`` (FSDPStrategy), ``fsdp2`` (ModelParallelStrategy),
    ``distributed`` (DDP, DeepSpeed) or ``other``."""
    if strategy is None or isinstance(strategy, str):
        name = str(strategy or "auto")
        kind = "fsdp" if name.startswith("fsdp") else "distributed" if name.startswith(_DDP_STRATEGIES) else "other"
        return name, kind, {}
    spec = _as_dict(strategy)
    cls: Any = type(strategy)
    if "class_path" in spec:
        module, _, attr = str(spec["class_path"]).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            return attr, "other", {}  # the parser has already named a class path that does not import
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    kind = (
        "fsdp"
        if issubclass(cls, FSDPStrategy)
        else "fsdp2"
        if issubclass(cls, ModelParallelStrategy)
        else "distributed"
        if issubclass(cls, DDPStrategy | DeepSpeedStrategy)
        else "other"
    )
    return cls.__name__, kind, _as_dict(spec.get("init_args")) if "class_path" in spec else None


def _check_sharded(name: str, kind: str, init_args: dict[str, Any] | None, acc: str, count: int, prec: str) -> None:
    key = "--trainer.strategy.init_args"
    if kind == "fsdp" and acc != "cuda":
        raise EngramError(
            f"strategy={name} needs CUDA GPUs (torch's FSDP refuses the {acc.upper()}). On the CPU use "
            "configs/strategies/fsdp2.yaml (FSDP2 over gloo) or --trainer.strategy ddp."
        )
    if kind == "fsdp2" and prec not in _FSDP2_PRECISIONS:
        raise EngramError(
            f"strategy={name} does not support precision={prec}. Use --trainer.precision one of "
            f"{', '.join(_FSDP2_PRECISIONS)}."
        )
    if init_args is None:
        return
    if kind == "fsdp" and init_args.get("state_dict_type", "full") != "full":
        raise EngramError(
            f"strategy={name} with state_dict_type={init_args['state_dict_type']} writes each checkpoint as a "
            "folder of shards, past Engram's checkpoint writer (atomic, refuses NaN/Inf), and --ckpt_path last "
            f"cannot resume it. Use {key}.state_dict_type full."
        )
    if kind != "fsdp2":
        return
    if init_args.get("save_distributed_checkpoint", True):
        raise EngramError(
            f"strategy={name} with save_distributed_checkpoint=true writes each checkpoint as a folder of shards, "
            "past Engram's checkpoint writer (atomic, refuses NaN/Inf), and --ckpt_path last cannot resume it. "
            f"Use {key}.save_distributed_checkpoint false (configs/strategies/fsdp2.yaml)."
        )
    data, tensor = init_args.get("data_parallel_size", "auto"), init_args.get("tensor_parallel_size", "auto")
    if tensor != 1 and not (tensor == "auto" and count == 1):
        raise EngramError(
            f"strategy={name} with tensor_parallel_size={tensor}: Engram shards with FSDP2 only (CausalLM's "
            f"configure_model; no tensor parallelism). Use {key}.tensor_parallel_size 1 and "
            f"{key}.data_parallel_size <devices x nodes>."
        )
    if data == "auto" and count > 1:
        raise EngramError(
            f"strategy={name} with data_parallel_size=auto means one data-parallel rank per node, but FSDP2 shards "
            f"over every process. Set {key}.data_parallel_size {count} ({count} devices x 1 node; multiply by the "
            "number of nodes)."
        )
    if isinstance(data, int) and data % count:
        raise EngramError(
            f"strategy={name} with data_parallel_size={data} does not cover {count} devices per node: it must be "
            f"devices x nodes. Set {key}.data_parallel_size {count} (x the number of nodes)."
        )


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
    strat, kind, init_args = _strategy_spec(strategy)
    if acc == "cuda" and count is not None and count > torch.cuda.device_count():
        raise EngramError(
            f"devices={devs} but only {torch.cuda.device_count()} CUDA GPU(s) exist. "
            f"Use --trainer.devices {torch.cuda.device_count()} (or auto)."
        )
    if acc == "mps":
        if count is not None and count > 1:
            raise EngramError(f"devices={devs} on MPS: Apple GPUs run one device only. Use --trainer.devices 1.")
        if kind != "other":
            raise EngramError(
                f"strategy={strat} is not supported on MPS. Use --trainer.strategy auto, or run DDP on CUDA or CPU."
            )

    note = ""
    if precision is None or str(precision) == "auto":
        prec, was_auto = ("bf16-mixed" if _supports_bf16(acc) else "32-true"), True
    else:
        prec, was_auto = _PRECISION_ALIASES.get(str(precision), str(precision)), False
        if prec == "16-mixed" and acc == "cpu":
            note = "16-mixed was asked for; the CPU has no fp16 autocast, so it trains in bf16-mixed"
            prec = "bf16-mixed"
        if "bf16" in prec and acc in ("cuda", "mps") and not _supports_bf16(acc):
            device = torch.cuda.get_device_name(0) if acc == "cuda" else "this MPS device"
            raise EngramError(
                f"precision={prec} but {device} has no bf16 support. Use --trainer.precision 16-mixed or 32-true."
            )
    processes = count if count is not None and count > 0 else torch.cuda.device_count() if acc == "cuda" else 1
    _check_sharded(strat, kind, init_args, acc, processes, prec)
    return Hardware(acc, devs, strat, prec, was_auto, note)
