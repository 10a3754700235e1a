"""What every Engram data module shares: a tokenizer, seeded train/val/test splits, resumable loaders.

A subclass implements ``make_split(split)`` returning a map-style dataset of dicts of tensors and, if it
has natural text, ``corpus_texts()`` for BPE training. Batches are dicts; the keys every LM family reads:

* ``input_ids``  ``[B, T]`` int64
* ``labels``     ``[B, T]`` int64, aligned with ``input_ids`` (the model shifts), ``-100`` = no loss

Task modules add their own keys (``answer_start``/``answer_end``, ``label``, ``doc_id``, ``position`` ...).

Resuming is exact: loaders are ``torchdata``'s ``StatefulDataLoader`` whose state (sampler generator,
batches yielded) Lightning stores in the checkpoint. Under DDP Lightning swaps in a
``DistributedSampler``, so each rank reads its own shard of every map-style split.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from data_modules.tokenizer import Tokenizer, build_tokenizer
from src.errors import EngramError

SPLITS = ("train", "val", "test")


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that is a pure function of ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every epoch (and restores the epoch on resume), and the stateful loader
    skips the samples already yielded, so a resumed run sees exactly the order an uninterrupted one would. A
    generator carried across epochs would not survive that: its state depends on how often iterators were built.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.yielded = 0  # indices handed out in the current epoch
        self._skip = 0
        self._skip_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # The stateful loader stores this in the checkpoint. On resume Lightning may build the iterator before it calls
    # ``set_epoch``, so the epoch comes back with the state, and the sampler itself skips what was already yielded.
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._skip = int(state["yielded"])
        self._skip_epoch = self.epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        # The skip belongs to the epoch it was saved in. A checkpoint from an epoch's last batch resumes straight
        # into the next epoch (set_epoch comes first), which must start from its beginning.
        self.yielded = self._skip if self.epoch == self._skip_epoch else 0
        self._skip = 0
        for index in order[self.yielded :]:
            self.yielded += 1
            yield index


class EngramDataModule(pl.LightningDataModule):
    """Base class; see the module docstring.

    Args:
        seq_len: tokens per example (the model's context must be at least this long).
        batch_size: examples per batch and per device.
        tokenizer: ``byte``, ``bpe`` (trained on this module's corpus), or a local HF tokenizer folder.
        bpe_vocab_size: vocabulary size when ``tokenizer: bpe``.
        num_workers: DataLoader worker processes.
        seed: seeds generation, splitting and shuffling; same seed, same data in the same order.
        cache_dir: where trained tokenizers and prepared data are cached.
    """

    def __init__(
        self,
        seq_len: int = 256,
        batch_size: int = 8,
        tokenizer: str = "byte",
        bpe_vocab_size: int = 2048,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str = "runs/.cache",
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise EngramError(f"seq_len={seq_len} is too short; use at least 2 tokens.")
        if batch_size < 1:
            raise EngramError(f"batch_size={batch_size} must be at least 1.")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.tokenizer_spec = tokenizer
        self.bpe_vocab_size = bpe_vocab_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = Path(cache_dir)
        self._tokenizer: Tokenizer | None = None
        self.datasets: dict[str, Dataset] = {}

    # --- to implement -------------------------------------------------------------------------
    def make_split(self, split: str) -> Dataset:
        """Return the map-style dataset of ``split`` (one of ``train``, ``val``, ``test``)."""
        raise NotImplementedError

    def corpus_texts(self) -> Iterable[str]:
        """Natural text to train a BPE tokenizer on; modules without text leave this unimplemented."""
        raise EngramError(f"{type(self).__name__} has no text corpus to train a BPE on; use tokenizer: byte.")

    # --- shared -------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            corpus = self.corpus_texts if self.tokenizer_spec == "bpe" else None
            self._tokenizer = build_tokenizer(self.tokenizer_spec, corpus, self.cache_dir, self.bpe_vocab_size)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split not in self.datasets:
                dataset = self.make_split(split)
                if len(dataset) == 0:  # type: ignore[arg-type]
                    raise EngramError(
                        f"{type(self).__name__}: the {split} split is empty. Give more data, a shorter seq_len "
                        f"(now {self.seq_len}), or a larger share for that split."
                    )
                self.datasets[split] = dataset

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}

    def loader_generator(self) -> torch.Generator:
        """A generator of the loader's own. Every new data iterator draws a worker base seed, from the global torch
        RNG unless the loader has a generator: then validating or starting an epoch would shift the dropout masks of
        every later step, and a run resumed from a checkpoint taken just before either would diverge."""
        return torch.Generator().manual_seed(self.seed)

    def _loader(self, split: str, shuffle: bool) -> StatefulDataLoader:
        if split not in self.datasets:
            self.setup(None)
        dataset = self.datasets[split]
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None  # type: ignore[arg-type]
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=shuffle,
            generator=self.loader_generator(),
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", shuffle=False)


class TokenWindows(Dataset):
    """Fixed windows of ``seq_len`` tokens cut from tokenized documents, keeping document id and position.

    Each item: ``input_ids``/``labels`` ``[seq_len]``, ``doc_id`` and ``position`` (token offset of the
    window's first token inside its document). Windows do not cross documents; a document's tail shorter
    than a window is dropped.
    """

    def __init__(self, docs: list[torch.Tensor], seq_len: int, stride: int | None = None) -> None:
        self.docs = docs
        self.seq_len = seq_len
        stride = stride or seq_len
        self.index = [(d, start) for d, doc in enumerate(docs) for start in range(0, len(doc) - seq_len + 1, stride)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d, start = self.index[i]
        window = self.docs[d][start : start + self.seq_len]
        return {
            "input_ids": window,
            "labels": window,
            "doc_id": torch.tensor(d),
            "position": torch.tensor(start),
        }
