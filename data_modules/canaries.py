"""Canaries for the Cap-Gauge (``callbacks/cap_gauge.py``): fixed, seeded sets of uniform-random token sequences.

* :class:`CanarySet` draws ``count`` *seen* sequences (mixed into training) and a matched set of ``count``
  *never-seen* ones (same length, sub-vocabulary and distribution; never trained on) from one seed. Token ids are
  uniform over the sub-vocabulary ``[vocab_offset, vocab_offset + vocab_size)``.
* :func:`mix_canaries` puts the seen set into any map-style training split (:class:`CanaryMixDataset`): the
  canaries are extra examples, so the split's own examples are all still there, and the epoch-seeded shuffle of
  the data module spreads them through the stream. Each canary example is the canary's tokens at positions
  ``0..length-1`` followed by padding that carries no loss (``labels = -100``); any other keys of the split's
  examples (``doc_id``, ``position`` ...) are set to ``-1 - slot`` (negative marks a canary, and no two slots share
  a value, so per-rank records of examples stay disjoint under DDP).
* :class:`SyntheticCapacityDataModule` is the paper's setting (Morris et al. 2025): training data made *only* of
  random sequences, so the Cap-Gauge's memorized bits over the training set divided by the parameter count is the
  paper's α. Its validation split is the matched never-seen set.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.utils.data import Dataset, IterableDataset

from data_modules.base import EngramDataModule
from src.analysis.capacity import information_bits
from src.errors import EngramError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class CanarySet:
    """``count`` seen and ``count`` never-seen sequences of ``length`` tokens, uniform over the sub-vocabulary."""

    count: int
    length: int
    vocab_size: int
    vocab_offset: int = 0
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.count < 1 or self.length < 2 or self.vocab_size < 2 or self.vocab_offset < 0:
            raise EngramError(
                f"canaries need count >= 1, length >= 2, vocab_size >= 2 and vocab_offset >= 0 (got count="
                f"{self.count}, length={self.length}, vocab_size={self.vocab_size}, vocab_offset={self.vocab_offset})."
            )

    @cached_property
    def _both(self) -> torch.Tensor:
        # One draw for both sets: they are i.i.d. from the same distribution, and a given seed always gives the
        # same seen set whatever the size of the unseen one would be.
        generator = torch.Generator().manual_seed(self.seed)
        high = self.vocab_offset + self.vocab_size
        return torch.randint(self.vocab_offset, high, (2 * self.count, self.length), generator=generator)

    @property
    def seen(self) -> torch.Tensor:
        """``[count, length]`` int64: the sequences put into training."""
        return self._both[: self.count]

    @property
    def unseen(self) -> torch.Tensor:
        """``[count, length]`` int64: the matched sequences never trained on."""
        return self._both[self.count :]

    @property
    def information_bits(self) -> float:
        """H of the seen set, ``count·length·log2 vocab_size``: the most any model can memorize of it."""
        return information_bits(self.count, self.length, self.vocab_size)

    def check_fits(self, model_vocab: int, seq_len: int) -> None:
        """Raise :class:`EngramError` unless the canaries fit the tokenizer's vocabulary and the example length."""
        if self.vocab_offset + self.vocab_size > model_vocab:
            raise EngramError(
                f"canary ids [{self.vocab_offset}, {self.vocab_offset + self.vocab_size}) exceed the vocabulary of "
                f"{model_vocab} tokens. Lower canary_vocab or canary_vocab_offset."
            )
        if self.length > seq_len:
            raise EngramError(
                f"canary_length={self.length} is longer than the data's seq_len={seq_len}. Set canary_length to "
                f"{seq_len} or less."
            )


class CanaryMixDataset(Dataset):
    """A map-style training split with canary examples appended (see the module docstring).

    Indices ``[0, len(base))`` are the split's own examples; indices ``len(base) + k`` are canary slot ``k``,
    showing canary ``k mod count``. The number of slots is ``round(len(base)·rate / (1 − rate))`` so that a share
    ``rate`` of the examples are canaries, and at least ``count`` so that every canary is seen once per epoch.
    """

    def __init__(self, base: Dataset, canaries: torch.Tensor, rate: float, seq_len: int, pad_id: int) -> None:
        if not 0.0 < rate < 1.0:
            raise EngramError(
                f"canary_rate={rate} must be in (0, 1): the share of training examples that are canaries."
            )
        self.base = base
        self.canaries = canaries
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.n_base = len(base)  # type: ignore[arg-type]
        self.n_slots = max(len(canaries), round(self.n_base * rate / (1.0 - rate)))
        self.template = base[0]
        odd = [key for key, value in self.template.items() if not isinstance(value, torch.Tensor)]
        if odd:
            raise EngramError(f"canaries can only be mixed into splits whose examples are tensors; {odd} are not.")

    @property
    def rate(self) -> float:
        """The share of examples that are canaries (at least the requested rate)."""
        return self.n_slots / (self.n_base + self.n_slots)

    def __len__(self) -> int:
        return self.n_base + self.n_slots

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < self.n_base:
            return self.base[index]
        slot = index - self.n_base
        canary = self.canaries[slot % len(self.canaries)]
        ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        ids[: len(canary)] = canary
        labels[: len(canary)] = canary
        item = {key: torch.full_like(value, -1 - slot) for key, value in self.template.items()}
        item["input_ids"], item["labels"] = ids, labels
        return item


def mix_canaries(datamodule: EngramDataModule, canaries: CanarySet, rate: float) -> CanaryMixDataset:
    """Replace ``datamodule``'s training split by one with ``canaries.seen`` mixed in (idempotent)."""
    datamodule.setup("fit")  # creates the splits that do not exist yet; a no-op when they do
    train = datamodule.datasets["train"]
    if isinstance(train, CanaryMixDataset):
        if not torch.equal(train.canaries, canaries.seen):
            raise EngramError("the training split already holds a different canary set; use one Cap-Gauge per run.")
        return train
    if isinstance(train, IterableDataset):
        raise EngramError(
            f"{type(datamodule).__name__} streams its training data; canaries are mixed into map-style splits only. "
            "Set data.init_args.streaming: false (local files), or remove the Cap-Gauge's canaries."
        )
    canaries.check_fits(datamodule.vocab_size, datamodule.seq_len)
    mixed = CanaryMixDataset(train, canaries.seen, rate, datamodule.seq_len, datamodule.tokenizer.pad_id)
    datamodule.datasets["train"] = mixed
    return mixed


class SequenceSet(Dataset):
    """Rows of a ``[N, S]`` token tensor as LM examples (every token carries loss), ``passes`` times over.

    With ``passes > 1`` one epoch holds every row ``passes`` times in shuffled order: the same stream as that many
    epochs, without restarting loader workers every few steps (8192 rows are 8 batches of 1024).
    """

    def __init__(self, tokens: torch.Tensor, passes: int = 1) -> None:
        self.tokens = tokens
        self.passes = passes

    def __len__(self) -> int:
        return len(self.tokens) * self.passes

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.tokens[index % len(self.tokens)]
        return {"input_ids": row, "labels": row}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        # One gather per batch: capacity runs are small models on big batches, where indexing example by example
        # costs a good part of a training step.
        rows = self.tokens[torch.tensor(indices) % len(self.tokens)]
        return [{"input_ids": row, "labels": row} for row in rows]


class SyntheticCapacityDataModule(EngramDataModule):
    """The capacity experiment of Morris et al. (2025): train on ``num_sequences`` uniform-random sequences only.

    The model's vocabulary is ``vocab`` (no tokenizer). The Cap-Gauge measures memorization over the whole
    training set (its ``canary_set`` is the training set) and over the matched never-seen set, which is also the
    validation split (its loss should stay at ``log V``).

    Args:
        num_sequences: N, the training set size (the paper's capacity needs N·S·log2 V well above α·P).
        seq_len: S, tokens per sequence (the paper: 64).
        vocab: V, symbols per token (the paper: 2048; 128 in the fast V=128 setting).
        batch_size: sequences per batch and per device.
        num_workers: DataLoader worker processes.
        seed: seeds the sequences (train and never-seen) and the shuffle.
        val_sequences: how many never-seen sequences form the validation split.
        passes_per_epoch: passes over the training set per epoch (``SequenceSet``); loader workers restart once
            per epoch, so a small set on a GPU wants many.
    """

    def __init__(
        self,
        num_sequences: int = 8192,
        seq_len: int = 64,
        vocab: int = 128,
        batch_size: int = 1024,
        num_workers: int = 0,
        seed: int = 0,
        val_sequences: int = 1024,
        passes_per_epoch: int = 1,
    ) -> None:
        super().__init__(seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, seed=seed)
        if num_sequences < 1 or val_sequences < 1:
            raise EngramError(f"num_sequences={num_sequences} and val_sequences={val_sequences} must be >= 1.")
        if vocab < 2 or passes_per_epoch < 1:
            raise EngramError(f"vocab={vocab} must be at least 2 and passes_per_epoch={passes_per_epoch} at least 1.")
        self.num_sequences = num_sequences
        self.vocab = vocab
        self.val_sequences = min(val_sequences, num_sequences)
        self.passes_per_epoch = passes_per_epoch
        self.canary_set = CanarySet(num_sequences, seq_len, vocab, vocab_offset=0, seed=seed)

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def make_split(self, split: str) -> SequenceSet:
        if split == "train":
            return SequenceSet(self.canary_set.seen, self.passes_per_epoch)
        return SequenceSet(self.canary_set.unseen[: self.val_sequences])
