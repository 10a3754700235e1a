"""The causal-LM family: any ``transformers`` AutoModelForCausalLM (Gemma-2, Llama, GPT-2 ...), built from a
preset or loaded from a path, trained with next-token cross-entropy."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from src.errors import EngramError
from src.lightning_modules.base import EngramModule
from src.models.hf_causal_lm import PRESETS, build_causal_lm, context_length

IGNORE = -100


class CausalLM(EngramModule):
    """A causal LM over ``transformers``.

    Args:
        vocab_size: set from the data module's tokenizer (linked by the CLI; do not set it by hand).
        preset: architecture preset (``src/models/hf_causal_lm.py``: gemma2-2b, gemma2-tiny, llama3-8b, llama-tiny,
            llama-small, gpt2-124m, gpt2-tiny).
        pretrained_path: local folder (or hub id) to load weights from instead of building from the preset.
        config_overrides: fields of the transformers config to change, e.g. ``{num_hidden_layers: 4}``.
        attn_implementation: force ``eager``/``sdpa``/``flash_attention_2``; default picks per architecture.
        compile: wrap the network in ``torch.compile``.
        (the optimizer arguments are EngramModule's)
    """

    family = "causal_lm"

    def __init__(
        self,
        vocab_size: int,
        preset: str = "llama-tiny",
        pretrained_path: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        compile: bool = False,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        overrides = dict(config_overrides or {})
        if pretrained_path is None and "vocab_size" not in PRESETS.get(preset, {}):
            # Test-size presets take the tokenizer's vocabulary; real architectures keep their published one.
            overrides.setdefault("vocab_size", vocab_size)
        self.model = build_causal_lm(preset, pretrained_path, overrides, attn_implementation)
        model_vocab = self.model.config.vocab_size
        if vocab_size > model_vocab:
            raise EngramError(
                f"the tokenizer has {vocab_size} tokens but the model's vocabulary has {model_vocab}. "
                "Use the tokenizer the model was trained with (data tokenizer: <model folder>)."
            )
        self.network = torch.compile(self.model) if compile else self.model
        self.val_ppl = Perplexity(ignore_index=IGNORE)
        self.val_acc = MulticlassAccuracy(num_classes=model_vocab, ignore_index=IGNORE, average="micro")
        self.test_ppl = Perplexity(ignore_index=IGNORE)
        self.test_acc = MulticlassAccuracy(num_classes=model_vocab, ignore_index=IGNORE, average="micro")

    @property
    def max_context(self) -> int | None:
        return context_length(self.model.config)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        return self.network(input_ids=input_ids, labels=labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], batch["labels"])
        self.count_tokens(batch["input_ids"])
        self.log("train/loss", out.loss, prog_bar=True)
        return out.loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, ppl: Perplexity, acc: MulticlassAccuracy) -> None:
        out = self(batch["input_ids"], batch["labels"])
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        ppl.update(logits, target)
        acc.update(logits.reshape(-1, logits.size(-1)), target.reshape(-1))
        self.log(f"{stage}/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/ppl", ppl)
        self.log(f"{stage}/acc", acc)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_ppl, self.val_acc)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_ppl, self.test_acc)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-sequence mean next-token loss (nats), for scoring held-out text."""
        logits = self(batch["input_ids"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
        mask = (target != IGNORE).float()
        return {"loss": (nll * mask).sum(1) / mask.sum(1).clamp_min(1)}
