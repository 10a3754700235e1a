"""Slim-Pile: a SlimPajama / Pile style corpus, rows ``{"text": str, "meta": {"redpajama_set_name": str}}``.

Read from ``.jsonl``, ``.jsonl.zst`` (SlimPajama's own shards: ``train/chunk1/example_train_0.jsonl.zst``,
``validation/...``, ``test/...``) or ``.parquet`` (e.g. ``DKYoon/SlimPajama-6B``), local or streamed, or from the
Hub (``hub_id: cerebras/SlimPajama-627B``, always streamed). The Pile's rows carry ``meta.pile_set_name``
instead: set ``set_field: pile_set_name``. Rows without ``meta`` are fine as long as no set filter is asked for.
"""

from __future__ import annotations

from typing import Any

from data_modules.text_corpus import HF_SPLIT, TextCorpusDataModule
from src.errors import EngramError

# The values the two published corpora use; filters are checked against them before any data is read.
KNOWN_SETS = {
    "redpajama_set_name": (
        "RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook", "RedPajamaArXiv",
        "RedPajamaWikipedia", "RedPajamaStackExchange",
    ),
    "pile_set_name": (
        "Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "ArXiv", "Github", "FreeLaw", "StackExchange",
        "USPTO Backgrounds", "PubMed Abstracts", "Gutenberg (PG-19)", "OpenSubtitles", "Wikipedia (en)",
        "DM Mathematics", "Ubuntu IRC", "BookCorpus2", "EuroParl", "HackerNews", "YoutubeSubtitles", "PhilPapers",
        "NIH ExPorter", "Enron Emails",
    ),
}  # fmt: skip
EXTENSIONS = (".jsonl", ".jsonl.zst", ".json", ".parquet")


class SlimPileDataModule(TextCorpusDataModule):
    """SlimPajama/Pile-style documents as fixed token windows with ``doc_id`` and ``position``.

    Args:
        seq_len: tokens per window.
        batch_size: windows per batch and per device.
        tokenizer: ``byte``, ``bpe`` (trained on the train documents) or a local HF tokenizer folder.
        bpe_vocab_size: vocabulary size when ``tokenizer: bpe``.
        num_workers: DataLoader worker processes.
        seed: seeds the document split (when the data has none), the BPE corpus order and shuffling.
        cache_dir: where tokenizers and ``datasets`` Arrow caches go.
        data_path: a folder of ``.jsonl`` / ``.jsonl.zst`` / ``.parquet`` files (split folders/file names
            ``train``/``validation``/``test`` are recognised), one file, or a glob. Parquet wins if mixed.
        hub_id: a Hub dataset of this shape, e.g. ``cerebras/SlimPajama-627B``; streamed (needs network).
        streaming: stream local files instead of loading them (for data larger than memory). The streamed
            train split repeats without end: set ``trainer.max_steps`` and an integer ``val_check_interval``.
        sets: keep only documents whose ``meta.<set_field>`` is one of these; null = all.
        exclude_sets: drop documents from these sets (litgpt drops ``RedPajamaGithub``); null = none.
        set_field: the ``meta`` key naming the source set: ``redpajama_set_name`` or ``pile_set_name``
            (names are then checked against the published lists), or another key (checked against the data).
        val_fraction: share of documents for validation when the data has no validation split (by text hash).
        test_fraction: share of documents for test when the data has no test split.
        max_docs: read at most this many documents per split (after filtering); null = all.
        stride: tokens between window starts; null = ``seq_len`` (no overlap).
        shuffle_buffer: windows in the streaming train shuffle buffer.
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
        sets: list[str] | None = None,
        exclude_sets: list[str] | None = None,
        set_field: str = "redpajama_set_name",
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
        self.sets = list(sets) if sets else None
        self.exclude_sets = list(exclude_sets) if exclude_sets else None
        self.set_field = set_field
        if set_field in KNOWN_SETS:
            self._check_set_names(KNOWN_SETS[set_field], f"the published {set_field} values")

    def _check_set_names(self, valid: tuple[str, ...] | list[str], where: str) -> None:
        for key, names in (("sets", self.sets), ("exclude_sets", self.exclude_sets)):
            unknown = [n for n in names or [] if n not in valid]
            if unknown:
                raise EngramError(
                    f"SlimPileDataModule: {key}={unknown} are not set names. Valid ({where}): {', '.join(valid)}."
                )

    def load_docs(self, split: str) -> Any:
        from datasets import load_dataset

        if self.hub_id is not None:
            docs = load_dataset(self.hub_id, split=HF_SPLIT[split], streaming=True)
            return self._filter_sets(docs)
        docs = self.load_files(split, EXTENSIONS, "json")
        return self.restrict_to_split(self._filter_sets(docs), split)

    def _filter_sets(self, docs: Any) -> Any:
        columns = docs.column_names
        if columns is not None and "text" not in columns:
            raise EngramError(
                f"SlimPileDataModule: {self._source()} has columns {columns} but no 'text'. Rows must look like "
                '{"text": ..., "meta": {"redpajama_set_name": ...}}.'
            )
        if self.sets is None and self.exclude_sets is None:
            return docs
        if columns is not None and "meta" not in columns:
            raise EngramError(
                f"SlimPileDataModule: sets/exclude_sets need a 'meta' column, but {self._source()} has only "
                f"{columns}. Remove the set filter or use SlimPajama/Pile-style rows."
            )
        field = self.set_field
        if not self.streaming and self.hub_id is None and field not in KNOWN_SETS:
            present = sorted({meta.get(field) for meta in docs["meta"]} - {None})
            self._check_set_names(present, f"the {field} values in data_path")
        keep, drop = set(self.sets or ()), set(self.exclude_sets or ())

        def wanted(example: dict[str, Any]) -> bool:
            name = (example.get("meta") or {}).get(field)
            return (not keep or name in keep) and name not in drop

        return docs.filter(wanted)
