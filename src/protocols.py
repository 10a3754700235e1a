"""The hooks through which callbacks observe a model: one protocol per capability, checked with ``isinstance``.

A LightningModule offers a capability by implementing its methods; a callback that needs one says so in one line
when the module lacks it, rather than probing attributes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class CapturesPlasticity(Protocol):
    """A memory family's test-time-update hook, for ``callbacks/plasticity.py`` (TTTLM, TitansLM, EmmaLM).

    Every model whose memory changes while it reads implements it the same way; the record schema (keys, shapes,
    meanings per family) is ``src/models/plasticity.py``.
    """

    def set_capture(self, enabled: bool) -> None:
        """Record (or stop recording, dropping the records) the memory's per-token updates on the next forwards."""
        ...

    def plasticity_records(self) -> list[dict[str, torch.Tensor]]:
        """Per memory layer, the records of the latest forward with capture on (``src.models.plasticity``)."""
        ...


@runtime_checkable
class CountsTrainingFlops(Protocol):
    """A LightningModule that can say what one training token costs, for throughput and MFU."""

    def training_flops_per_token(self, seq_len: int) -> float:
        """FLOPs of one token's forward and backward in a batch of ``seq_len``-token sequences."""
        ...
