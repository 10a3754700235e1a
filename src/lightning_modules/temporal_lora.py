"""The Temporal LoRA family: a frozen GPT-2, one LoRA adapter per domain and a Time Mixer router
(``src/models/temporal_lora``), trained in three CLI stages that hand over through checkpoints::

    python -m src.cli fit --config configs/tlora_backbone.yaml   # 1. pretrain the backbone on the mixed domains
    python -m src.cli fit --config configs/tlora_adapters.yaml   # 2. one adapter per domain, backbone frozen
    python -m src.cli fit --config configs/tlora_router.yaml     # 3. router, calibration, hysteresis + fatigue
    python -m src.cli test --config configs/tlora_router.yaml \\
        --ckpt_path runs/tlora_router/v0/checkpoints/last.ckpt   # held-out router accuracy per domain (+ analyses)

Every stage is :class:`TemporalLoRALM` with another ``stage``; ``init_from`` names the previous stage's ``last.ckpt``.
The data are :class:`data_modules.domains.DomainTextDataModule` windows (batch key ``domain`` = adapter index).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from src.errors import EngramError
from src.lightning_modules.base import EngramModule
from src.models.temporal_lora import TemporalLoRA, TemporalLoRAConfig, routing_stats
from src.runs import CHECKPOINT_SUBDIR, LAST_CHECKPOINT, latest_resumable
from src.telemetry import log_scalars

Stage = Literal["backbone", "adapters", "router"]
STAGES: tuple[str, ...] = ("backbone", "adapters", "router")
# The parts of the model each stage takes from the earlier stages and keeps frozen: init_from must hold them.
GIVEN: dict[str, tuple[str, ...]] = {"backbone": (), "adapters": ("backbone",), "router": ("backbone", "adapters")}
CHECKPOINT_KEY = "temporal_lora"  # stage, adapter names and calibration report, beside the state_dict
IGNORE_INDEX = -100


def model_part(key: str) -> str:
    """``backbone``, ``adapters`` or ``router``: which part of :class:`TemporalLoRA` a ``state_dict`` key belongs to
    (keys as this module names them, ``model.…``)."""
    if key.startswith("model.router."):
        return "router"
    if ".lora_A." in key or ".lora_B." in key:
        return "adapters"
    return "backbone"


def resolve_init_from(path: str) -> Path:
    """A checkpoint file, a run directory (``runs/x/v0``: its ``checkpoints/last.ckpt``) or a run-name folder
    (``runs/x``: the newest version that has one)."""
    target = Path(path).expanduser()
    if target.is_dir():
        run = target if (target / CHECKPOINT_SUBDIR / LAST_CHECKPOINT).is_file() else latest_resumable(target)
        if run is None:
            raise EngramError(
                f"init_from={path!r} is a folder with no {CHECKPOINT_SUBDIR}/{LAST_CHECKPOINT} in it or in a v<N> "
                "under it. Run the previous stage first, or give its last.ckpt."
            )
        target = run / CHECKPOINT_SUBDIR / LAST_CHECKPOINT
    if not target.is_file():
        raise EngramError(
            f"init_from={path!r} does not exist. Run the previous stage first (configs/tlora_backbone.yaml, then "
            "tlora_adapters.yaml) or point --model.init_args.init_from at its runs/<name>/v<N>/checkpoints/last.ckpt."
        )
    return target


class TemporalLoRALM(EngramModule):
    """One stage of Temporal LoRA.

    * ``backbone``: next-token loss of the bare GPT-2 on windows of all domains (skip it with a
      ``pretrained_path`` in ``config_overrides``).
    * ``adapters``: backbone frozen; every window trains its own domain's adapter (one-hot mixing weights).
    * ``router``: backbone and adapters frozen (and in eval mode: the router learns from the features it sees at
      inference); cross-entropy of the router's per-token scores against the window's domain. When training ends
      the router is calibrated on validation windows (contrastive, removes the lean toward one adapter), and the
      offsets go into ``last.ckpt``.

    ``init_from`` (a ``last.ckpt``, a run directory or a run-name folder) is loaded when the stage starts: the parts
    earlier stages trained (backbone; adapters for the router stage) must be there with the same shapes; the part this
    stage trains is taken too when its shapes match (continuing a stage), else it starts fresh, so e.g. ``lora_r`` or
    ``router_window`` may differ from the earlier stage's config. A ``--ckpt_path`` checkpoint replaces it all (to
    ``test`` a checkpoint whose ``init_from`` is gone, pass ``--model.init_args.init_from null``).
    At the end of every stage the final weights are written to ``last.ckpt`` whatever ``checkpoint.every_n_train_steps``
    is, so the next stage starts from the last step.

    Logged: ``train/loss``; LM stages ``{val,test}/loss`` and ``/ppl`` (adapters: with the window's own adapter, and
    ``/loss_base`` of the bare backbone); router stage ``train/router_acc``, ``{val,test}/loss`` (router
    cross-entropy), ``/router_acc`` (mean over domains) and ``/router_acc/<domain>`` (torchmetrics, every token
    counted), ``/lm_loss`` (LM loss through the routed mix) and ``/lm_loss_oracle`` (each window's own adapter),
    ``{train,val,test}/routing/{mean_weight/<domain>,entropy,switches_per_1k}``; ``calibration/*`` once.

    Args:
        vocab_size: set from the data module's tokenizer (linked by the CLI).
        stage: ``backbone``, ``adapters`` or ``router``.
        init_from: the previous stage's checkpoint; null starts from a random (or ``pretrained_path``) backbone.
        preset: ``TemporalLoRAConfig`` preset (``tiny``, ``small``, ``gpt2``).
        config_overrides: ``TemporalLoRAConfig`` fields to change, e.g. ``{router_window: 16, lora_r: 4}``.
        calibration_windows: validation windows (evenly spread over the domains) used to calibrate the router.
        (the optimizer arguments are EngramModule's)
    """

    family = "temporal_lora"
    # A full checkpoint supersedes init_from (on_load_checkpoint), so a changed init_from would not be loaded.
    RESTORED_FROM_CHECKPOINT = (*EngramModule.RESTORED_FROM_CHECKPOINT, "init_from")

    def __init__(
        self,
        vocab_size: int,
        stage: Stage = "backbone",
        init_from: str | None = None,
        preset: str = "small",
        config_overrides: dict[str, Any] | None = None,
        calibration_windows: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        if stage not in STAGES:
            raise EngramError(f"stage={stage!r}; use one of {', '.join(STAGES)}.")
        if calibration_windows < 1:
            raise EngramError(f"calibration_windows={calibration_windows} must be at least 1.")
        self.stage = stage
        self.init_from = init_from
        self.calibration_windows = calibration_windows
        # YAML gives lists; the config's sequence fields are tuples.
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in (config_overrides or {}).items()}
        self.config = TemporalLoRAConfig.from_name(preset, **{"vocab_size": vocab_size, **overrides})
        self.model = TemporalLoRA(self.config)
        model_vocab = self.model.gpt2.config.vocab_size
        if model_vocab != vocab_size:
            raise EngramError(
                f"the tokenizer has {vocab_size} tokens but the backbone's vocabulary has {model_vocab}. Use the "
                "tokenizer the backbone was trained with, or drop vocab_size/pretrained_path from config_overrides."
            )
        self.model.set_trainable(stage)
        self.domains = list(self.model.adapter_names)
        n_domains = len(self.domains)
        for split in ("val", "test"):
            setattr(self, f"{split}_ppl", Perplexity(ignore_index=IGNORE_INDEX))
            # average=None: one accuracy per domain (recall of its tokens), what the acceptance asks for
            setattr(self, f"{split}_router_acc", MulticlassAccuracy(num_classes=n_domains, average=None))
        self.calibration: dict[str, Any] | None = None
        self._weights_loaded = False

    @property
    def max_context(self) -> int | None:
        return int(self.model.gpt2.config.n_positions)

    def train(self, mode: bool = True) -> TemporalLoRALM:
        super().train(mode)
        if self.stage == "router":
            self.model.peft.eval()  # frozen backbone + adapters: no dropout noise in the features the router reads
        return self

    # --- stage hand-off -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "domain_names", None)
        if names is None:
            raise EngramError(
                "TemporalLoRALM needs domain-labelled windows: use data_modules.domains.DomainTextDataModule."
            )
        if list(names) != self.domains:
            raise EngramError(
                f"the data's domains {list(names)} differ from the model's adapters {self.domains}; give the same "
                "names in the same order (data init_args.domains, or model config_overrides.adapters)."
            )
        if self._weights_loaded:
            return
        self._weights_loaded = True
        if self.init_from:
            self.load_init_from(self.init_from)
        elif stage == "fit" and self.stage != "backbone" and not self.config.pretrained_path:
            rank_zero_warn(
                f"stage {self.stage!r} with init_from: null starts from a RANDOM backbone"
                f"{' and untrained adapters' if self.stage == 'router' else ''}; give the previous stage's last.ckpt."
            )

    def load_init_from(self, path: str) -> None:
        """Load the previous stage's checkpoint (see the class docstring for what must match)."""
        file = resolve_init_from(path)
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated zip, a pickle of something else: all mean "not a checkpoint"
            raise EngramError(
                f"init_from={str(file)!r} is not a readable checkpoint ({type(err).__name__}: {err}); rerun the "
                "previous stage or give another last.ckpt."
            ) from err
        meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
        if meta is None:
            raise EngramError(
                f"init_from={str(file)!r} is not a Temporal LoRA checkpoint; give the last.ckpt of a tlora_* stage."
            )
        if self.stage == "router" and meta["stage"] == "backbone":
            raise EngramError(
                f"init_from={str(file)!r} is a backbone-stage checkpoint: its adapters are untrained. Run the "
                "adapters stage (configs/tlora_adapters.yaml) and give its last.ckpt."
            )
        theirs, own = checkpoint["state_dict"], self.state_dict()
        loaded, fresh = {}, []
        for part in ("backbone", "adapters", "router"):
            keys = [k for k in own if model_part(k) == part]
            bad = [k for k in keys if k not in theirs or theirs[k].shape != own[k].shape]
            if bad and part in GIVEN[self.stage]:
                k = bad[0]
                found = "missing" if k not in theirs else f"shape {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}"
                raise EngramError(
                    f"init_from={str(file)!r} does not fit this model's {part} ({len(bad)} tensors differ, e.g. "
                    f"{k}: {found}). Use the preset and config_overrides of the stage that wrote it."
                )
            if bad:
                fresh.append(part)
            else:
                loaded.update({k: theirs[k] for k in keys})
        self.load_state_dict(loaded, strict=False)
        if "router" not in fresh and meta.get("calibration") is not None:
            self.calibration = meta["calibration"]
        note = f"; fresh (shapes differ): {', '.join(fresh)}" if fresh else ""
        rank_zero_info(f"[engram] init_from {file} ({meta['stage']} stage): loaded {len(loaded)} tensors{note}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = {"stage": self.stage, "adapters": self.domains, "calibration": self.calibration}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.calibration = (checkpoint.get(CHECKPOINT_KEY) or {}).get("calibration")
        self._weights_loaded = True  # a full checkpoint (--ckpt_path, load_from_checkpoint) supersedes init_from

    def on_train_end(self) -> None:
        if self.stage == "router":
            self.calibrate_router()
        # ModelCheckpoint writes last.ckpt only every n steps; the next stage must start from this stage's end.
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.last_model_path:
                self.trainer.save_checkpoint(callback.last_model_path, weights_only=False)

    # --- calibration ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_router(self) -> dict[str, Any]:
        """Contrastive calibration of the router on up to ``calibration_windows`` validation windows, evenly spread
        over the split (whose windows alternate between domains, so all domains are in)."""
        datamodule = self.trainer.datamodule  # type: ignore[attr-defined]
        data = datamodule.datasets["val"]  # built by setup("fit") with the training split
        chosen = torch.linspace(0, len(data) - 1, min(len(data), self.calibration_windows)).round().long().unique()
        batch = datamodule.collate([data[int(i)] for i in chosen])
        ids = batch["input_ids"].to(self.device)
        was_training = self.training
        self.eval()
        try:
            hidden = torch.cat([self.model.router_hidden(chunk) for chunk in ids.split(datamodule.batch_size)])
            report = self.model.router.calibrate(hidden, batch["domain"].to(self.device)[:, None].expand_as(ids))
        finally:
            self.train(was_training)
        offset = self.trainer.strategy.broadcast(self.model.router.offset)  # all ranks keep rank 0's offsets
        self.model.router.offset.copy_(offset)
        self.calibration = {**report, "offset": offset.tolist(), "windows": len(chosen), "tokens": ids.numel()}
        metrics = {f"calibration/offset/{n}": float(v) for n, v in zip(self.domains, offset, strict=True)}
        for key in ("balanced_mean_weight_before", "balanced_mean_weight_after"):
            metrics.update({f"calibration/{key}/{n}": v for n, v in zip(self.domains, report[key], strict=True)})
        log_scalars(self.trainer, metrics)
        rank_zero_info(
            f"[engram] router calibrated on {len(chosen)} validation windows: offsets "
            f"{dict(zip(self.domains, (round(v, 4) for v in offset.tolist()), strict=True))}, balanced mean weight "
            f"{[round(v, 3) for v in report['balanced_mean_weight_before']]} -> "
            f"{[round(v, 3) for v in report['balanced_mean_weight_after']]}"
        )
        return self.calibration

    # --- steps ------------------------------------------------------------------------------------------------------
    def _token_domains(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["domain"][:, None].expand_as(batch["input_ids"])

    def _log_routing(self, prefix: str, weights: torch.Tensor) -> None:
        for key, value in routing_stats(weights).items():
            if key.startswith("mean_weight/"):
                key = f"mean_weight/{self.domains[int(key.split('/')[1])]}"
            self.log(f"{prefix}/routing/{key}", value)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        self.count_tokens(ids)
        if self.stage == "router":
            routed = self.model.route(ids)
            target = self._token_domains(batch)
            loss = F.cross_entropy(routed.scores.flatten(0, 1), target.flatten())
            self.log("train/router_acc", (routed.scores.argmax(-1) == target).float().mean())
            self._log_routing("train", routed.weights)
        else:
            weights = self.model.one_hot(batch["domain"], ids.shape[1]) if self.stage == "adapters" else None
            loss = self.model(ids, labels=batch["labels"], weights=weights).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        ids, labels = batch["input_ids"], batch["labels"]
        if self.stage == "router":
            routed = self.model.routed(ids, labels=labels)
            target = self._token_domains(batch)
            scores = routed.router.scores
            getattr(self, f"{prefix}_router_acc").update(scores.flatten(0, 1), target.flatten())
            loss = F.cross_entropy(scores.flatten(0, 1), target.flatten())
            self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True)
            self.log(f"{prefix}/lm_loss", routed.lm.loss)
            oracle = self.model(ids, labels=labels, weights=self.model.one_hot(batch["domain"], ids.shape[1]))
            self.log(f"{prefix}/lm_loss_oracle", oracle.loss)
            self._log_routing(prefix, routed.router.weights)
            return
        weights = self.model.one_hot(batch["domain"], ids.shape[1]) if self.stage == "adapters" else None
        out = self.model(ids, labels=labels, weights=weights)
        ppl = getattr(self, f"{prefix}_ppl")
        ppl.update(out.logits[:, :-1].float(), labels[:, 1:])
        self.log(f"{prefix}/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/ppl", ppl)
        if self.stage == "adapters":
            self.log(f"{prefix}/loss_base", self.model(ids, labels=labels).loss, sync_dist=True)

    def _log_router_accuracy(self, prefix: str) -> None:
        if self.stage != "router":
            return
        metric = getattr(self, f"{prefix}_router_acc")
        per_domain = metric.compute()
        for name, acc in zip(self.domains, per_domain, strict=True):
            self.log(f"{prefix}/router_acc/{name}", acc)
        self.log(f"{prefix}/router_acc", per_domain.mean(), prog_bar=True)
        metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_router_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_router_accuracy("test")
