"""Weight-Δ: how far and how fast each layer's weights move, per parameter group.

Every ``every_n_steps`` optimizer steps, for every (layer, group) with group one of ``embeddings``, ``attention``,
``mlp``, ``norms``, ``other`` (from the parameter's name, ``parameter_group``) and layer the block index in the
name (``layers.3.``, ``h.3.``; none for embeddings and the final norm):

* ``weight_delta/<group>/rel_prev`` = ‖W_t − W_prev‖ / ‖W_prev‖ against the previous measurement;
* ``weight_delta/<group>/rel_init`` = ‖W_t − W_0‖ / ‖W_0‖ against the weights at the start of training;
* ``weight_delta/<group>/update_ratio`` = ‖W_t − W_{t−1}‖ / ‖W_{t−1}‖ over the last optimizer step alone (the
  update-to-weight ratio; ~1e-3 is the usual healthy order of magnitude).

Norms are Frobenius over all tensors of the (layer, group) together, i.e. of their concatenation. Telemetry gets
every (layer, group) with the ``layer`` field set, plus each group over all layers and ``weight_delta/all/...`` over
the whole model with no layer; the loggers get the per-group and whole-model values only (not hundreds of columns).
``weight_delta/interval_steps`` is the number of steps ``rel_prev`` spans.

Only trainable parameters are tracked by default (a QLoRA run tracks its LoRA weights; 4-bit base weights never
change). Reference copies (one per tracked weight for each of prev, init and pre-step: 3 x 10 GB for a 2.6B model)
live on the parameters' device when they take at most ``REF_BUDGET`` of its memory, otherwise in pinned host memory
(``ref_device: auto``), and are compared one tensor at a time on the parameter's device. The
initial weights are also written once to ``<run_dir>/weight_delta_init.pt``, so ``rel_init`` survives a resume;
``rel_prev`` after a resume spans from the resumed step. Runs on global rank 0 only (DDP replicas are identical);
sharded strategies (FSDP, DeepSpeed) are not supported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from src.atomic import atomic_write
from src.errors import EngramError
from src.telemetry import log_rows, log_scalars

GROUPS = ("embeddings", "attention", "mlp", "norms", "other")
INIT_FILENAME = "weight_delta_init.pt"
REF_BUDGET = 0.1  # share of a GPU's memory that ``ref_device: auto`` lets the reference copies take
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# Checked in this order: "post_attention_layernorm" is a norm, "attn.c_proj" attention, "mlp.c_proj" MLP.
_GROUP_PATTERNS = (
    ("norms", re.compile(r"norm|(?:^|\.)ln_|\.ln\d?\.|(?:^|\.)ln_f\.")),
    ("embeddings", re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.|lm_head|(?:^|\.)tok_emb")),
    ("attention", re.compile(r"attn|attention|(?:^|\.)[qkvo]_proj\.")),
    ("mlp", re.compile(r"mlp|feed_forward|ffn|(?:^|\.)(?:gate|up|down)_proj\.|(?:^|\.)c_fc\.|(?:^|\.)fc\d?\.")),
)


def parameter_group(name: str) -> str:
    """The group of a parameter from its qualified name (``GROUPS``)."""
    for group, pattern in _GROUP_PATTERNS:
        if pattern.search(name):
            return group
    return "other"


def layer_index(name: str) -> int | None:
    """The block index in a parameter's name (``model.layers.3.mlp.up_proj.weight`` → 3), or ``None``."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def _relative(diff_sq: float, ref_sq: float) -> float:
    if ref_sq > 0:
        return (diff_sq / ref_sq) ** 0.5
    return float("inf") if diff_sq > 0 else 0.0


class WeightDelta(pl.Callback):
    """Weight-Δ telemetry; see the module docstring.

    Args:
        every_n_steps: measure every this many optimizer steps.
        track_init: also report the change since the start of training (keeps a copy of the initial weights).
        update_ratio: also report the update-to-weight ratio of the measured step (a pre-step copy, taken only
            before measured steps).
        trainable_only: track only parameters with ``requires_grad``.
        ref_device: where reference copies live: ``auto`` (module docstring), ``cpu`` (pinned host memory) or
            ``same`` (the parameter's device: fastest, costs GPU memory).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        track_init: bool = True,
        update_ratio: bool = True,
        trainable_only: bool = True,
        ref_device: str = "auto",
    ) -> None:
        if every_n_steps < 1:
            raise EngramError(f"every_n_steps={every_n_steps} must be >= 1.")
        if ref_device not in ("auto", "cpu", "same"):
            raise EngramError(f"ref_device={ref_device!r} must be 'auto', 'cpu' or 'same'.")
        self.every_n_steps = every_n_steps
        self.track_init = track_init
        self.update_ratio = update_ratio
        self.trainable_only = trainable_only
        self.ref_device = ref_device
        self.last_step = -1
        self.ref_step = 0
        self.resumed = False
        self._params: dict[str, torch.nn.Parameter] = {}
        self._prev: dict[str, torch.Tensor] = {}
        self._init: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._before_step = -1
        self._on_host = False  # reference copies in (pinned) host memory rather than beside the parameters

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and any(s in type(trainer.strategy).__name__ for s in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise EngramError(
                f"WeightDelta does not support the sharded strategy {type(trainer.strategy).__name__}; "
                "use ddp, or remove the callback."
            )

    def _refs_on_host(self) -> bool:
        if self.ref_device != "auto":
            return self.ref_device == "cpu"
        first = next(iter(self._params.values()))
        if first.device.type != "cuda":
            return False  # on the CPU "same" is the host; MPS memory is unified
        copies = 1 + self.track_init + self.update_ratio
        needed = copies * sum(p.numel() * p.element_size() for p in self._params.values())
        return needed > REF_BUDGET * torch.cuda.get_device_properties(first.device).total_memory

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if not self._on_host or tensor.device.type == "cpu":
            return tensor.clone()
        # Pinned memory makes the copies asynchronous; they are only ever read back onto the device, in stream order.
        return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor, non_blocking=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._params = {
            name: p
            for name, p in pl_module.named_parameters()
            if (p.requires_grad or not self.trainable_only) and getattr(p, "quant_state", None) is None
        }
        if not self._params:
            raise EngramError("WeightDelta found no parameters to track (none trainable?); set trainable_only: false.")
        self._on_host = self._refs_on_host()
        self._prev = {name: self._copy(p) for name, p in self._params.items()}
        self.ref_step = trainer.global_step
        if self.track_init:
            init_file = Path(trainer.default_root_dir) / INIT_FILENAME
            if self.resumed and init_file.is_file():
                saved = torch.load(init_file, map_location="cpu", weights_only=True)
                self._init = {name: self._copy(saved[name].to(p.device)) for name, p in self._params.items()}
            else:
                self._init = {name: self._copy(p) for name, p in self._params.items()}
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # the asynchronous copies must land before the host reads them
                weights = {n: t.cpu() for n, t in self._init.items()}
                atomic_write(init_file, lambda tmp: torch.save(weights, tmp))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step_after = trainer.global_step + 1
        if not (self.update_ratio and trainer.is_global_zero and step_after % self.every_n_steps == 0):
            return
        for name, p in self._params.items():
            if name in self._before:
                self._before[name].copy_(p.detach(), non_blocking=True)
            else:
                self._before[name] = self._copy(p)
        self._before_step = step_after

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[tuple[int | None, str], dict]:
        """Compare the weights with the references now; returns ``{(layer, group): {metric: value}}``."""
        step = trainer.global_step
        refs = {"rel_prev": self._prev}
        if self.track_init:
            refs["rel_init"] = self._init
        if self._before_step == step:
            refs["update_ratio"] = self._before
        keys = [(layer_index(name), parameter_group(name)) for name in self._params]
        sums = []  # per parameter: [diff², ref²] per reference, kept on the device until one transfer at the end
        for name, p in self._params.items():
            w = p.detach().float()
            row = []
            for ref_set in refs.values():
                ref = ref_set[name].to(p.device, non_blocking=True).float()
                row += [(w - ref).pow(2).sum(), ref.pow(2).sum()]
            sums.append(torch.stack(row))
            self._prev[name].copy_(p.detach(), non_blocking=True)
        values = torch.stack(sums).double().cpu()
        totals: dict[tuple[int | None, str], torch.Tensor] = {}
        for (layer, group), row in zip(keys, values, strict=True):
            for key in {(layer, group), (None, group), (None, "all")}:
                totals[key] = totals.get(key, 0) + row
        out = {
            key: {metric: _relative(float(t[2 * i]), float(t[2 * i + 1])) for i, metric in enumerate(refs)}
            for key, t in totals.items()
        }
        interval = step - self.ref_step
        self.ref_step = step
        self._report(trainer, pl_module, out, interval)
        return out

    def _report(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: dict[tuple[int | None, str], dict], interval: int
    ) -> None:
        # A block's own (layer, group) entry and the group-over-all-layers entry both have a group name; the
        # latter is the one with layer None. Groups without layers (embeddings, final norm) appear once.
        rows = [
            (f"weight_delta/{group}/{metric}", value, layer, None, None)
            for (layer, group), metrics in sorted(out.items(), key=lambda kv: (kv[0][0] is not None, kv[0]))
            for metric, value in metrics.items()
        ]
        rows.append(("weight_delta/interval_steps", float(interval), None, None, None))
        log_scalars(trainer, {name: value for name, value, layer, _, _ in rows if layer is None})
        log_rows(trainer, [row for row in rows if row[2] is not None])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        step = trainer.global_step
        if not trainer.is_global_zero or step == self.last_step or step == 0 or step % self.every_n_steps != 0:
            return
        self.last_step = step
        self.measure(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_step"])
        self.resumed = True
