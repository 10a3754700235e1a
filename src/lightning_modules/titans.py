"""The Titans family: language models with a neural long-term memory (``src/models/titans``), trained with
next-token loss, with the plasticity hook (``DelegatesPlasticity``) the ``PlasticityCallback`` uses."""

from __future__ import annotations

from typing import Any

from src.lightning_modules.base import DelegatesPlasticity, LanguageModel
from src.models.titans import TitansConfig, TitansForCausalLM


class TitansLM(DelegatesPlasticity, LanguageModel):
    """A Titans language model.

    Args:
        vocab_size: set from the data module's tokenizer (linked by the CLI).
        preset: size ``titans-tiny``, ``titans-170m``, ``titans-340m`` or ``titans-400m``.
        architecture: ``mac``, ``mag``, ``mal``, ``lmm`` (memory only) or ``swa`` (sliding-window attention only,
            the baseline without memory); see ``src/models/titans/model.py``.
        config_overrides: other ``TitansConfig`` fields, e.g. ``{memory_depth: 1, chunk_size: 4, window: 64}``.
        compile: compile each chunk's memory step (``compile_inner_step``), for GPUs: 2.5x the eager memory's
            training throughput on an H200 (``bench/titans.py``).
        (the optimizer arguments are EngramModule's)
    """

    family = "titans"

    def __init__(
        self,
        vocab_size: int,
        preset: str = "titans-tiny",
        architecture: str = "mac",
        config_overrides: dict[str, Any] | None = None,
        compile: bool = False,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        overrides = {"vocab_size": vocab_size, "architecture": architecture, **(config_overrides or {})}
        if compile:
            overrides["compile_inner_step"] = True
        self.config = TitansConfig.from_name(preset, **overrides)
        self.model = TitansForCausalLM(self.config)
        self.init_metrics(self.config.vocab_size)
