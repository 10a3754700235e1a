"""The TTT family: TTT-Linear / TTT-MLP language models (``src/models/ttt``), trained with next-token loss, with the
plasticity-capture hook the ``PlasticityCallback`` uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from src.errors import EngramError
from src.lightning_modules.base import DelegatesPlasticity, LanguageModel
from src.models.ttt import TTTConfig, TTTForCausalLM

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights saved by the official ttt-lm-pytorch model (or this port): a file, or a folder holding one of
    ``model.safetensors`` / ``pytorch_model.bin`` / ``model.pt``."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise EngramError(f"checkpoint_path={str(path)!r} holds none of {list(_WEIGHT_FILES)}.")
        path = found[0]
    if not path.is_file():
        raise EngramError(
            f"checkpoint_path={str(path)!r} does not exist. Give the official TTT weights (a .safetensors/.bin/.pt "
            "file or its folder), or set checkpoint_path: null to train from scratch."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class TTTLM(DelegatesPlasticity, LanguageModel):
    """A TTT language model.

    Args:
        vocab_size: set from the data module's tokenizer (linked by the CLI).
        preset: official size ``125m``, ``350m``, ``760m`` or ``1b`` (the paper's 1.3B).
        config_overrides: ``TTTConfig`` fields to change, e.g. ``{num_hidden_layers: 4, ttt_layer_type: mlp}`` or
            the Mamba backbone ``{pre_conv: true, share_qk: true, use_gate: true}``.
        checkpoint_path: official weights to load with ``strict=True`` (then ``vocab_size`` must match theirs).
        compile: compile each mini-batch step of the inner-loop scan (``compile_inner_step``), for GPUs.
        (the optimizer arguments are EngramModule's)
    """

    family = "ttt"

    def __init__(
        self,
        vocab_size: int,
        preset: str = "125m",
        config_overrides: dict[str, Any] | None = None,
        checkpoint_path: str | None = None,
        compile: bool = False,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        overrides = {"vocab_size": vocab_size, **(config_overrides or {})}
        if compile:
            overrides["compile_inner_step"] = True
        self.config = TTTConfig.from_name(preset, **overrides)
        self.model = TTTForCausalLM(self.config)
        if checkpoint_path:
            state = load_official_state_dict(checkpoint_path)
            try:
                self.model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise EngramError(
                    f"checkpoint_path={checkpoint_path!r} does not fit preset {preset!r} with overrides "
                    f"{config_overrides}: {str(err).splitlines()[0]} Match the preset/overrides to the checkpoint."
                ) from err
        self.init_metrics(self.config.vocab_size)
