"""PG-19 (Rae et al. 2019): public-domain books, read with their real schema and cut into token windows.

Sources, all read through ``datasets``:

* local parquet with the PG-19 columns ``short_book_title``, ``publication_date``, ``url``, ``text`` (the layout of
  the ``emozilla/pg19`` mirror: ``data/train-00000-of-000NN.parquet``, ``validation-*``, ``test-*``);
* a folder of ``.txt`` books, one book per file (DeepMind's layout ``train/ validation/ test/ <book_id>.txt``);
* the Hub (``hub_id: emozilla/pg19``), always streamed; the original ``deepmind/pg19`` is a loading script that
  ``datasets>=4`` refuses to run.

Windows keep ``doc_id`` and ``position`` (token offset inside the book) for position-resolved evaluation.
"""

from __future__ import annotations

from typing import Any

from data_modules.text_corpus import HF_SPLIT, TextCorpusDataModule
from src.errors import EngramError

PG19_COLUMNS = ("short_book_title", "publication_date", "url", "text")


class PG19DataModule(TextCorpusDataModule):
    """PG-19 books as fixed token windows with ``doc_id`` and ``position``.

    Args:
        seq_len: tokens per window.
        batch_size: windows per batch and per device.
        tokenizer: ``byte``, ``bpe`` (trained on the train books) or a local HF tokenizer folder.
        bpe_vocab_size: vocabulary size when ``tokenizer: bpe``.
        num_workers: DataLoader worker processes.
        seed: seeds the document split (when the data has none), the BPE corpus order and shuffling.
        cache_dir: where tokenizers and ``datasets`` Arrow caches go.
        data_path: a folder of PG-19 parquet files or ``.txt`` books (split folders/file names
            ``train``/``validation``/``test`` are recognised), one file, or a glob. Parquet wins if both exist.
        hub_id: a Hub dataset with the PG-19 schema, e.g. ``emozilla/pg19``; streamed (needs network).
        streaming: stream local files instead of loading them (for data larger than memory). The streamed
            train split repeats without end: set ``trainer.max_steps`` and an integer ``val_check_interval``.
        val_fraction: share of books for validation when the data has no validation split (by text hash).
        test_fraction: share of books for test when the data has no test split.
        max_docs: read at most this many books per split (quick runs); null = all.
        stride: tokens between window starts; null = ``seq_len`` (no overlap).
        shuffle_buffer: windows in the streaming train shuffle buffer (map-style data is shuffled by the sampler).
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
        data_path: str | None = None,
        hub_id: str | None = None,
        streaming: bool = False,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_docs: int | None = None,
        stride: int | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__(
            seq_len, batch_size, tokenizer, bpe_vocab_size, num_workers, seed, cache_dir,
            data_path, hub_id, streaming, val_fraction, test_fraction, max_docs, stride, shuffle_buffer,
        )  # fmt: skip

    def load_docs(self, split: str) -> Any:
        from datasets import load_dataset

        if self.hub_id is not None:
            docs = load_dataset(self.hub_id, split=HF_SPLIT[split], streaming=True)
            return self._check_schema(docs)
        # Parquet if there is any; else .txt books, one example per file
        docs = self.load_files(split, (".parquet", ".txt"), "text", sample_by="document")
        return self.restrict_to_split(self._check_schema(docs), split)

    def _check_schema(self, docs: Any) -> Any:
        columns = docs.column_names
        if columns is not None and "text" not in columns:
            raise EngramError(
                f"PG19DataModule: {self._source()} has columns {columns} but no 'text'. PG-19 rows have "
                f"{list(PG19_COLUMNS)}; point data_path at PG-19 parquet files or a folder of .txt books."
            )
        return docs
