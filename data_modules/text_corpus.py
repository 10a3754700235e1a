"""Shared machinery for the natural-text modules (PG-19, Slim-Pile): finding files, document-level splits,
map-style windows for local data and streamed, rank-sharded windows for large or remote data.

Two read modes:

* **map-style** (local files, ``streaming: false``): every document of a split is read and tokenized once,
  then cut by :class:`~data_modules.base.TokenWindows`. Lightning's ``DistributedSampler`` gives each DDP
  rank its own shard of the windows. ``doc_id`` is the document's index within the split.
* **streaming** (``streaming: true`` or a Hub id): a ``datasets`` ``IterableDataset``; each rank keeps its
  own shard (``split_dataset_by_node`` with the trainer's global rank and world size), documents are cut
  into windows on the fly. The train stream repeats without end (set ``trainer.max_steps``, and an integer
  ``val_check_interval``: with an endless train loader an epoch never ends) and goes through a seeded shuffle
  buffer; val/test streams are read once, so DDP ranks may see different numbers of eval batches (avoid
  per-step collectives in eval steps). Nothing is materialised, so corpora larger than memory work. ``doc_id`` is a 63-bit hash of the document text (stable across ranks
  and runs, which a running index on a sharded stream would not be). The ``StatefulDataLoader`` checkpoints
  the stream position, so a resumed run continues where it stopped.

Where the data has no validation/test split of its own, documents are assigned to train/val/test by a
seeded hash of their text: the same rule for both read modes, no document in two splits, and val/test
text is never seen in training.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from data_modules.base import SPLITS, EngramDataModule, TokenWindows
from data_modules.file_check import naming_bad_file
from src.errors import EngramError

# Our split names -> the names the Hub / ``datasets`` file conventions use.
HF_SPLIT = {"train": "train", "val": "validation", "test": "test"}
# Streaming modes feed the first few train documents to the BPE trainer (it hashes and reads them all).
BPE_STREAM_DOCS = 2000


def doc_hash(text: str, salt: str = "") -> int:
    """A 63-bit integer from the SHA-256 of ``salt + text`` (fits an int64 tensor)."""
    digest = hashlib.sha256((salt + text).encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def hash_split(text: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split a document belongs to, from a seeded hash of its text (identical documents go together)."""
    u = doc_hash(text, salt=f"engram-split-{seed}:") / 2**63
    if u < val_fraction:
        return "val"
    return "test" if u < val_fraction + test_fraction else "train"


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise EngramError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) and their sum "
            "below 1 so that some documents stay for training."
        )


def resolve_data_files(data_path: str, extensions: tuple[str, ...], config_key: str) -> dict[str, list[str]]:
    """Files per split (our split names) under ``data_path``: a folder, one file, or a glob.

    A folder is searched with the ``datasets`` naming conventions (``train/``, ``validation/``,
    ``data/test-00000-of-00001.parquet``, ``*_valid_*``...); files outside any split name all count as
    ``train``. A file or a glob is all ``train``. Only names ending in one of ``extensions`` are kept.
    """
    path = Path(data_path).expanduser()
    if glob.has_magic(data_path):
        files = sorted(f for f in glob.glob(str(path), recursive=True) if f.endswith(extensions))
        found = {"train": files}
    elif path.is_file():
        found = {"train": [str(path)] if str(path).endswith(extensions) else []}
    elif path.is_dir():
        from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

        try:
            patterns = get_data_patterns(str(path))
        except EmptyDatasetError:
            patterns = {}
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(path)) if patterns else {}
        ours = {hf: ours for ours, hf in HF_SPLIT.items()}
        found = {
            ours[split]: sorted(f for f in files if f.endswith(extensions))
            for split, files in resolved.items()
            if split in ours
        }
    else:
        raise EngramError(f"{config_key}={data_path!r} does not exist. Set {config_key} to a folder, a file or a glob.")
    found = {split: files for split, files in found.items() if files}
    if "train" not in found:
        raise EngramError(
            f"no training files ending in {' / '.join(extensions)} were found at {config_key}={data_path!r}. "
            f"Point {config_key} at a folder with such files (split folders train/ validation/ test/ optional)."
        )
    return found


class TextCorpusDataModule(EngramDataModule):
    """Base of the file/Hub text modules; subclasses implement :meth:`load_docs`.

    Args (after the base ones): see :class:`~data_modules.pg19.PG19DataModule` and
    :class:`~data_modules.slim_pile.SlimPileDataModule`, which document them for the CLI.
    """

    def __init__(
        self,
        seq_len: int,
        batch_size: int,
        tokenizer: str,
        bpe_vocab_size: int,
        num_workers: int,
        seed: int,
        cache_dir: str,
        data_path: str | None,
        hub_id: str | None,
        streaming: bool,
        val_fraction: float,
        test_fraction: float,
        max_docs: int | None,
        stride: int | None,
        shuffle_buffer: int,
    ) -> None:
        super().__init__(seq_len, batch_size, tokenizer, bpe_vocab_size, num_workers, seed, cache_dir)
        check_fractions(val_fraction, test_fraction)
        if data_path is None and hub_id is None:
            raise EngramError(
                f"{type(self).__name__} needs data: set data.init_args.data_path to a local folder/file/glob, "
                "or data.init_args.hub_id to a Hub dataset id (streamed; needs network)."
            )
        if stride is not None and stride < 1:
            raise EngramError(f"stride={stride} must be a positive number of tokens (or null for seq_len).")
        self.data_path = data_path
        self.hub_id = hub_id
        # The Hub is always streamed: a non-streamed SlimPajama would be a 900 GB download.
        self.streaming = streaming or hub_id is not None
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_docs = max_docs
        self.stride = stride
        self.shuffle_buffer = shuffle_buffer
        self._files: dict[str, list[str]] | None = None
        self._read_files: dict[str, list[str]] = {}  # per split, the local files load_files read

    # --- subclass hook ---------------------------------------------------------------------------
    def load_docs(self, split: str) -> Any:
        """A ``datasets`` ``Dataset`` (map-style) or ``IterableDataset`` (streaming) of ``split``'s documents
        with a ``text`` column, already restricted to that split and to any subclass filter."""
        raise NotImplementedError

    # --- helpers for subclasses ------------------------------------------------------------------
    def files(self, extensions: tuple[str, ...]) -> dict[str, list[str]]:
        if self._files is None:
            assert self.data_path is not None
            self._files = resolve_data_files(self.data_path, extensions, "data.init_args.data_path")
        return self._files

    def own_splits(self) -> bool:
        """Whether the source brings its own val/test splits (else documents are split by hash)."""
        if self.hub_id is not None:
            return True
        files = self._files or {}
        return "val" in files or "test" in files

    def restrict_to_split(self, docs: Any, split: str) -> Any:
        """Keep ``split``'s documents of a train-only source (seeded hash of the text; see module doc)."""
        if self.own_splits():
            return docs
        seed, val_f, test_f = self.seed, self.val_fraction, self.test_fraction
        return docs.filter(lambda ex: hash_split(ex["text"], seed, val_f, test_f) == split)

    def split_files(self, split: str, extensions: tuple[str, ...]) -> tuple[str, list[str]]:
        """The files holding ``split`` and the ``datasets`` split name to read them as: the split's own files
        where the source has split folders/names, else the train files (then split by hash)."""
        files = self.files(extensions)
        source = split if self.own_splits() else "train"
        if source not in files:
            raise EngramError(
                f"{type(self).__name__}: data_path={self.data_path!r} has split folders or file names but none "
                f"for {HF_SPLIT[split]!r}. Add {HF_SPLIT[split]} files, or put all files in one folder to split "
                "them by hash."
            )
        return HF_SPLIT[source], files[source]

    def hf_cache(self) -> str:
        return str(self.cache_dir / "hf_datasets")

    def load_files(self, split: str, extensions: tuple[str, ...], builder: str, **kwargs: Any) -> Any:
        """``split``'s local files through ``datasets`` (streamed or cached, as configured): its parquet files if
        there are any, else all of them with ``builder`` and its ``kwargs``."""
        from datasets import load_dataset

        hf_split, files = self.split_files(split, extensions)
        parquet = [f for f in files if f.endswith(".parquet")]
        if parquet:
            builder, files, kwargs = "parquet", parquet, {}
        self._read_files[split] = files
        return load_dataset(
            builder,
            data_files={hf_split: files},
            split=hf_split,
            streaming=self.streaming,
            cache_dir=None if self.streaming else self.hf_cache(),
            **kwargs,
        )

    def _reading(self, split: str) -> AbstractContextManager[None]:
        """A failed read of ``split``'s local files becomes one line naming the bad file (or row without text).

        ``datasets`` reads map-style data while loading it, streamed data lazily: the first-window check and the BPE
        corpus read it inside this too, but files the stream reaches only later are read during training, outside.
        """
        return naming_bad_file(
            lambda: self._read_files.get(split, []),
            "Repair or remove the file, or point data.init_args.data_path elsewhere.",
            text_field="text",
        )

    # --- EngramDataModule -------------------------------------------------------------------------
    def corpus_texts(self) -> Iterable[str]:
        limit = BPE_STREAM_DOCS if self.streaming else None
        with self._reading("train"):
            for i, example in enumerate(self.load_docs("train")):
                if limit is not None and i >= limit:
                    break
                yield example["text"]

    def make_split(self, split: str) -> Dataset | IterableDataset:
        with self._reading(split):
            return self._split_windows(split)

    def _split_windows(self, split: str) -> Dataset | IterableDataset:
        docs = self.load_docs(split)
        if self.streaming:
            return self._stream_windows(docs, split)
        if self.max_docs is not None:
            docs = docs.select(range(min(self.max_docs, len(docs))))
        texts = list(docs["text"])
        if not texts:
            raise EngramError(
                f"{type(self).__name__}: no documents in the {split} split of {self._source()}. Check the files "
                "(and any set filter), or lower val_fraction/test_fraction."
            )
        tokens = [torch.tensor(self.tokenizer.encode(t), dtype=torch.long) for t in texts]
        windows = TokenWindows(tokens, self.seq_len, self.stride)
        if len(windows) == 0:
            longest = max(len(t) for t in tokens)
            raise EngramError(
                f"{type(self).__name__}: all {len(texts)} documents of the {split} split are shorter than "
                f"seq_len={self.seq_len} tokens (longest: {longest}). Lower seq_len or give longer documents."
            )
        return windows

    def setup(self, stage: str | None = None) -> None:
        if not self.streaming:
            super().setup(stage)
            return
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split not in self.datasets:
                self.datasets[split] = self.make_split(split)

    def _loader(self, split: str, shuffle: bool) -> StatefulDataLoader:
        if not self.streaming:
            return super()._loader(split, shuffle)
        if split not in self.datasets:
            self.setup(None)
        # Shuffling is the stream's shuffle buffer; samplers do not apply to an IterableDataset.
        return StatefulDataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=shuffle,
            generator=self.loader_generator(),
        )

    # --- streaming ----------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _stream_windows(self, docs: Any, split: str) -> Any:
        from datasets.distributed import split_dataset_by_node

        if self.max_docs is not None:
            docs = docs.take(self.max_docs)
        rank, world = self._rank_and_world()
        # Whole files per rank where there are enough (uneven counts are fine: train repeats, eval tolerates it);
        # otherwise every rank reads everything and keeps one window in world_size.
        strategy = "shards" if docs.num_shards >= world else "examples"
        if strategy == "examples":
            rank_zero_warn(
                f"{type(self).__name__}: the {split} stream has {docs.num_shards} file(s) for {world} ranks, so "
                f"every rank reads all of it and keeps one window in {world}. Split the data into at least as "
                "many files as GPUs to read less."
            )
        docs = split_dataset_by_node(docs, rank=rank, world_size=world, strategy=strategy)
        docs = docs.select_columns(["text"])
        windows = docs.map(self._cut_windows, batched=True, batch_size=8, remove_columns=["text"])
        self._check_stream_nonempty(windows, split)
        if split == "train":
            # Endless, so no DDP rank runs dry before the others (their shards differ in length) and blocks
            # the gradient all-reduce; the run's length is trainer.max_steps.
            windows = windows.repeat(None)
            if self.shuffle_buffer > 1:
                windows = windows.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        return windows.with_format("torch")

    def _cut_windows(self, batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        """Batched ``map``: documents in, fixed windows out (the row count changes, hence batched)."""
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "doc_id": [], "position": []}
        step = self.stride or self.seq_len
        for text in batch["text"]:
            ids = self.tokenizer.encode(text)
            key = doc_hash(text)
            for start in range(0, len(ids) - self.seq_len + 1, step):
                window = ids[start : start + self.seq_len]
                out["input_ids"].append(window)
                out["labels"].append(window)
                out["doc_id"].append(key)
                out["position"].append(start)
        return out

    def _check_stream_nonempty(self, windows: Any, split: str) -> None:
        """Read up to the first window so an empty or too-short stream fails now, not mid-training."""
        # Not ``windows.take(1)``: after an example-wise split_dataset_by_node, take counts the examples of
        # every rank (datasets 5.2), so rank 1 of 2 would see nothing.
        first: Iterator[Any] = iter(windows)
        if next(first, None) is None:
            raise EngramError(
                f"{type(self).__name__}: the streamed {split} split of {self._source()} yields no window of "
                f"seq_len={self.seq_len} tokens: no documents (check files and filters) or all shorter than "
                "seq_len (lower seq_len)."
            )

    def _source(self) -> str:
        return f"hub_id={self.hub_id!r}" if self.hub_id is not None else f"data_path={self.data_path!r}"
