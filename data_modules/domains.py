"""Text domains for Temporal LoRA: windows labelled with their domain's index, and spliced domain-switch sequences.

A domain is a :class:`DomainSpec`. ``path: null`` names a built-in corpus: ``shakespeare`` is the embedded Project
Gutenberg plays (:mod:`data_modules.embedded`, split by play), ``python`` is the Python standard library's own
sources (``sysconfig.get_paths()["stdlib"]``, without ``site-packages``). Any local folder is a domain too
(``path: /some/folder``, files matched by ``pattern``, default ``**/*.txt``).

Folder domains (``python`` included) are split by file: files are ordered by a seeded hash of their path relative
to the folder, the first ``round(val_fraction · n)`` (at least one) are validation, the next test, the rest train.
Held-out windows come from files never seen in training, and no file needs reading to know its split.
``max_chars`` caps how much of a large domain is read: each split reads its files in that order until its share of
the budget is filled. The embedded Shakespeare (~1.5 MB) is always read whole.

Items of :class:`DomainWindows`: ``input_ids``/``labels`` ``[seq_len]``, ``domain`` (the domain's index, which is
also its adapter's index), ``doc_id`` (unique across domains), ``position``.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from data_modules import embedded
from data_modules.base import SPLITS, EngramDataModule, TokenWindows
from data_modules.text_corpus import check_fractions, doc_hash
from src.errors import EngramError

BUILTIN = ("shakespeare", "python")
DEFAULT_DOMAINS: tuple[dict[str, Any], ...] = ({"name": "shakespeare", "path": None}, {"name": "python", "path": None})
# Sub-trees of the stdlib folder that are not the standard library's own sources.
NOT_STDLIB = {"site-packages", "dist-packages"}


@dataclass(frozen=True)
class DomainSpec:
    name: str
    path: str | None = None
    pattern: str | None = None  # glob relative to ``path``; default ``**/*.py`` for python, ``**/*.txt`` otherwise

    @classmethod
    def parse(cls, spec: DomainSpec | Mapping[str, Any]) -> DomainSpec:
        if isinstance(spec, DomainSpec):
            return spec
        unknown = set(spec) - {"name", "path", "pattern"}
        if "name" not in spec or unknown:
            raise EngramError(f"domain spec {dict(spec)} needs a name and may have path and pattern, nothing else.")
        return cls(**spec)


def domain_files(spec: DomainSpec) -> tuple[Path, list[Path]]:
    """The folder of a folder-backed domain and its files, sorted."""
    if spec.path is None and spec.name == "python":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(f for f in root.glob(spec.pattern or "**/*.py") if not NOT_STDLIB & set(f.parts))
    elif spec.path is not None:
        root = Path(spec.path).expanduser()
        if not root.is_dir():
            raise EngramError(f"domain {spec.name!r}: path {spec.path!r} is not a folder; give a folder of text files.")
        files = sorted(f for f in root.glob(spec.pattern or "**/*.txt") if f.is_file())
    else:
        raise EngramError(
            f"domain {spec.name!r} has path: null but is not a built-in corpus ({', '.join(BUILTIN)}); give a path."
        )
    if not files:
        raise EngramError(f"domain {spec.name!r}: no files match {spec.pattern or 'the default pattern'} in {root}.")
    return root, files


def domain_documents(
    spec: DomainSpec,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_chars: int | None = None,
    cache_dir: str | Path = "runs/.cache",
) -> dict[str, list[str]]:
    """The domain's texts per split (``train``/``val``/``test``), each split in a fixed, seeded order."""
    check_fractions(val_fraction, test_fraction)
    share = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    if spec.path is None and spec.name == "shakespeare":
        texts = embedded.load_texts("shipped", cache_dir)
        by_split = embedded.split_by_work(texts, seed, val_fraction, test_fraction)
        docs = {split: [texts[name] for name in by_split[split]] for split in SPLITS}
    else:
        root, files = domain_files(spec)
        # Seeded order by a hash of the relative path: no file needs reading to know its split.
        order = sorted(files, key=lambda f: doc_hash(f.relative_to(root).as_posix(), salt=f"engram-domain-{seed}:"))
        n_held = {s: max(1, round(share[s] * len(order))) if share[s] > 0 else 0 for s in ("val", "test")}
        if n_held["val"] + n_held["test"] >= len(order):
            raise EngramError(
                f"domain {spec.name!r} has {len(order)} files, too few for {n_held['val']} validation and "
                f"{n_held['test']} test files plus training; give more files or lower val/test_fraction."
            )
        parts = {
            "val": order[: n_held["val"]],
            "test": order[n_held["val"] : n_held["val"] + n_held["test"]],
            "train": order[n_held["val"] + n_held["test"] :],
        }
        docs = {split: [] for split in SPLITS}
        for split, split_files in parts.items():
            used = 0
            for file in split_files:
                if max_chars is not None and used >= share[split] * max_chars:
                    break
                text = file.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    docs[split].append(text)
                    used += len(text)
    empty = [split for split in SPLITS if share[split] > 0 and not docs[split]]
    if empty:
        raise EngramError(
            f"domain {spec.name!r} has no documents for {empty}; give it more files or change val/test_fraction."
        )
    return docs


class DomainWindows(Dataset):
    """Token windows of several domains; ``balance`` keeps the same number of windows (a seeded choice) per domain,
    so that a router trained on them sees no domain prior."""

    def __init__(self, windows: Sequence[TokenWindows], balance: bool = True, seed: int = 0) -> None:
        counts = [len(w) for w in windows]
        keep = min(counts) if balance else None
        self.windows = list(windows)
        per_domain = []
        for domain, count in enumerate(counts):
            chosen = (
                sorted(random.Random(f"{seed}:{domain}").sample(range(count), keep))
                if keep is not None
                else range(count)
            )
            per_domain.append([(domain, i) for i in chosen])
        # Round-robin over the domains: every prefix of an unshuffled split (limit_val_batches) holds all of them.
        self.index: list[tuple[int, int]] = [p for row in zip_longest(*per_domain) for p in row if p is not None]
        # doc ids unique across domains: offset by the documents of the domains before
        self.doc_offset = [sum(len(w.docs) for w in self.windows[:d]) for d in range(len(self.windows))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        domain, j = self.index[i]
        item = self.windows[domain][j]
        item["domain"] = torch.tensor(domain)
        item["doc_id"] = item["doc_id"] + self.doc_offset[domain]
        return item


class DomainTextDataModule(EngramDataModule):
    """Windows of several text domains labelled with their domain index (batch key ``domain``, ``[B]``).

    Args:
        domains: domain specs (``name``, ``path``, ``pattern``), in adapter order; see the module docstring.
        seq_len, batch_size, tokenizer, bpe_vocab_size, num_workers, seed, cache_dir: as in ``EngramDataModule``.
        val_fraction: share of each domain's documents (plays for Shakespeare) held out for validation.
        test_fraction: share held out for test (the hysteresis and fatigue sequences are cut from it).
        max_chars: characters read per domain at most (null = all); bounds large folders such as the stdlib.
        balance: equal window counts per domain in every split.
        stride: tokens between window starts; null = ``seq_len``.
    """

    def __init__(
        self,
        domains: Sequence[Mapping[str, Any]] = DEFAULT_DOMAINS,
        seq_len: int = 256,
        batch_size: int = 8,
        tokenizer: str = "byte",
        bpe_vocab_size: int = 2048,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str = "runs/.cache",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_chars: int | None = 2_000_000,
        balance: bool = True,
        stride: int | None = None,
    ) -> None:
        super().__init__(seq_len, batch_size, tokenizer, bpe_vocab_size, num_workers, seed, cache_dir)
        self.specs = [DomainSpec.parse(d) for d in domains]
        if len(self.specs) < 2 or len({s.name for s in self.specs}) != len(self.specs):
            raise EngramError(f"domains {[s.name for s in self.specs]}: give at least two, with distinct names.")
        check_fractions(val_fraction, test_fraction)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_chars = max_chars
        self.balance = balance
        self.stride = stride
        self._docs: list[dict[str, list[str]]] | None = None

    @property
    def domain_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def documents(self, domain: int, split: str) -> list[str]:
        if self._docs is None:
            self._docs = [
                domain_documents(s, self.seed, self.val_fraction, self.test_fraction, self.max_chars, self.cache_dir)
                for s in self.specs
            ]
        return self._docs[domain][split]

    def corpus_texts(self) -> Iterable[str]:
        return [text for d in range(len(self.specs)) for text in self.documents(d, "train")]

    def _tokens(self, domain: int, split: str) -> list[torch.Tensor]:
        return [torch.tensor(self.tokenizer.encode(t), dtype=torch.long) for t in self.documents(domain, split)]

    def make_split(self, split: str) -> DomainWindows:
        windows = [TokenWindows(self._tokens(d, split), self.seq_len, self.stride) for d in range(len(self.specs))]
        short = [self.specs[d].name for d, w in enumerate(windows) if len(w) == 0]
        if short:
            raise EngramError(
                f"domains {short} have no {split} window of seq_len={self.seq_len} tokens; shorten seq_len or give "
                "more text (max_chars, val/test_fraction)."
            )
        return DomainWindows(windows, self.balance, self.seed)

    def streams(self, split: str = "test") -> list[torch.Tensor]:
        """Each domain's ``split`` text as one token stream (documents joined by ``<eos>``), for
        :func:`src.splicing.compose_sequence`."""
        eos = torch.tensor([self.tokenizer.eos_id])
        return [torch.cat([x for doc in self._tokens(d, split) for x in (doc, eos)]) for d in range(len(self.specs))]
