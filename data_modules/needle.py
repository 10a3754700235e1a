"""Needle-in-a-haystack retrieval, RULER-style (Hsieh et al. 2024), generated on the fly.

One example of ``seq_len`` tokens::

    [haystack filler with needles inserted ........................][queries + answers]
    ... The special magic number for crimson-falcon is: 4829301. ...  What is the special magic number for
    crimson-falcon? The special magic number for crimson-falcon is: 4829301.

* ``num_needles`` needles are queried (1 = single needle, >1 = multi-query); ``distractors`` more needles with
  other keys are inserted but never asked for (RULER's multi-key). Keys are ``adjective-noun`` pairs, values
  7-digit numbers, both distinct within an example.
* Haystack ``text``: a random stretch of the embedded Shakespeare plays of the same split (val/test haystacks
  come from plays unseen in training). ``noise``: random words drawn from the plays' vocabulary.
* ``depth``: fixes where the first queried needle goes, as a share of the filler before it (0 = start,
  1 = just before the queries); ``null`` draws every needle position uniformly.

Batch keys (``n = num_needles``, queries in the order they appear):

* ``input_ids`` / ``labels`` ``[B, T]``; labels are ``-100`` except the answer tokens (``loss_on: answer``),
  or a plain LM target (``loss_on: all``).
* ``answer_start`` / ``answer_end`` ``[B, n]``: token span ``[start, end)`` of each answer in ``input_ids``.
  The logits at positions ``start-1 .. end-2`` predict it (the model shifts).
* ``needle_start`` ``[B, n]``: where each queried needle begins; ``depth`` ``[B, n]`` float: its filler share.

Example ``i`` of split ``s`` is a pure function of ``(seed, s, i)``: any rank or worker can build any example.

``TokenNeedleDataModule`` lays out the same example over a symbol vocabulary (``<key> k <val> v`` needles in
random filler symbols, ``<query> k <val>`` then the answer ``v``), with the same batch keys: memory without
reading English.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.base import EngramDataModule
from data_modules.embedded import SOURCES, load_texts, split_by_work
from data_modules.tokenizer import SymbolTokenizer, Tokenizer
from src.errors import EngramError

ADJECTIVES = (
    "amber", "azure", "bold", "brave", "bright", "calm", "clever", "crimson", "daring", "eager", "fierce",
    "gentle", "golden", "happy", "hidden", "humble", "jolly", "lively", "lucky", "mellow", "misty", "noble",
    "proud", "quiet", "rapid", "silent", "silver", "swift", "tender", "vivid", "wild", "witty",
)  # fmt: skip
NOUNS = (
    "badger", "beacon", "canyon", "cedar", "comet", "dolphin", "ember", "falcon", "fern", "glacier", "harbor",
    "heron", "island", "jaguar", "lantern", "meadow", "nebula", "orchid", "otter", "panther", "pebble", "quartz",
    "raven", "river", "saddle", "spruce", "summit", "thistle", "tiger", "valley", "walrus", "willow",
)  # fmt: skip
NUM_KEYS = len(ADJECTIVES) * len(NOUNS)
NEEDLE = "\nThe special magic number for {key} is: {value}.\n"
QUESTION = "\nWhat is the special magic number for {key}? The special magic number for {key} is: "
HAYSTACKS = ("text", "noise")
LOSS_ON = ("answer", "all")
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
SPLIT_SHARE = 0.1  # share of plays for each of the val and test haystacks


def key_name(index: int) -> str:
    return f"{ADJECTIVES[index // len(NOUNS)]}-{NOUNS[index % len(NOUNS)]}"


def noise_lexicon(texts: Iterable[str]) -> list[str]:
    """Lower-case words of the texts, minus the key words (so a key never shows up as noise)."""
    words = {w for text in texts for w in re.findall(r"[a-z]{2,}", text.lower())}
    return sorted(words - set(ADJECTIVES) - set(NOUNS))


class NeedleHaystack(Dataset):
    """``size`` needle examples of one split; see the module docstring for the layout and keys."""

    def __init__(
        self,
        split: str,
        size: int,
        seed: int,
        seq_len: int,
        tokenizer: Tokenizer,
        num_needles: int,
        distractors: int,
        depth: float | None,
        loss_on: str,
        text_stream: torch.Tensor | None = None,
        lexicon: list[str] | None = None,
    ) -> None:
        if (text_stream is None) == (lexicon is None):
            raise ValueError("give exactly one of text_stream (text haystack) and lexicon (noise haystack)")
        self.split, self.size, self.seed, self.seq_len = split, size, seed, seq_len
        self.tokenizer = tokenizer
        self.num_needles, self.distractors, self.depth, self.loss_on = num_needles, distractors, depth, loss_on
        self.text_stream, self.lexicon = text_stream, lexicon

    def __len__(self) -> int:
        return self.size

    def _encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text), dtype=torch.long)

    def _filler(self, rng: np.random.Generator, length: int) -> torch.Tensor:
        if self.text_stream is not None:
            start = int(rng.integers(len(self.text_stream)))
            return self.text_stream[(start + torch.arange(length)) % len(self.text_stream)]
        assert self.lexicon is not None
        chunks: list[torch.Tensor] = []
        have = 0
        while have < length:  # words cost >= 1 token each, so a round of (length - have) words always suffices
            words = rng.integers(len(self.lexicon), size=length - have + 1)
            chunk = self._encode(" " + " ".join(self.lexicon[w] for w in words))
            chunks.append(chunk)
            have += len(chunk)
        return torch.cat(chunks)[:length]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, SPLIT_CODE[self.split], i])
        n_all = self.num_needles + self.distractors
        keys = [key_name(int(k)) for k in rng.choice(NUM_KEYS, size=n_all, replace=False)]
        values = [str(int(v) + 1_000_000) for v in rng.choice(9_000_000, size=n_all, replace=False)]
        needles = [self._encode(NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values, strict=True)]

        # Queries: the first num_needles needles (the rest are distractors), asked in a random order.
        asked = [int(j) for j in rng.permutation(self.num_needles)]
        query_parts: list[torch.Tensor] = []
        answer_offsets: list[tuple[int, int]] = []
        offset = 0
        for j in asked:
            question, answer = self._encode(QUESTION.format(key=keys[j])), self._encode(values[j])
            answer_offsets.append((offset + len(question), offset + len(question) + len(answer)))
            query_parts += [question, answer, self._encode(".")]
            offset += len(question) + len(answer) + len(query_parts[-1])

        return assemble_example(
            rng, self.seq_len, needles, asked, query_parts, answer_offsets, self.depth, self.loss_on, self._filler
        )


def check_layout(depth: float | None, loss_on: str, sizes: tuple[int, int, int]) -> None:
    """The settings both needle modules share, checked with errors that name the value and the fix."""
    if depth is not None and not 0 <= depth <= 1:
        raise EngramError(f"depth={depth} must be in [0, 1] (share of the haystack), or null for random.")
    if loss_on not in LOSS_ON:
        raise EngramError(f"loss_on={loss_on!r} is unknown; use one of {', '.join(LOSS_ON)}.")
    if min(sizes) < 1:
        train, val, test = sizes
        raise EngramError(f"train_size/val_size/test_size = {train}/{val}/{test}: all must be >= 1.")


def assemble_example(
    rng: np.random.Generator,
    seq_len: int,
    needles: list[torch.Tensor],
    asked: list[int],
    query_parts: list[torch.Tensor],
    answer_offsets: list[tuple[int, int]],
    depth: float | None,
    loss_on: str,
    filler: Callable[[np.random.Generator, int], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Lay out one example: a haystack of ``filler`` with the needles inserted, then the queries.

    ``needles`` holds every needle, queried ones first (``asked`` lists those in query order; needle 0 goes at
    ``depth``, the others anywhere); ``answer_offsets`` are the answer spans inside the concatenated ``query_parts``.
    Returns the batch keys of the module docstring.
    """
    query_len = sum(len(part) for part in query_parts)
    budget = seq_len - query_len - sum(len(n) for n in needles)
    if budget < 0:
        raise EngramError(
            f"seq_len={seq_len} is too short for {len(asked)} needle(s) + {len(needles) - len(asked)} "
            f"distractor(s) with their queries ({seq_len - budget} tokens). Raise seq_len or lower "
            "num_needles/distractors."
        )
    haystack = filler(rng, budget)
    points = rng.integers(0, budget + 1, size=len(needles))
    if depth is not None:
        points[0] = round(depth * budget)

    pieces: list[torch.Tensor] = []
    starts = [0] * len(needles)
    pos = prev = 0
    for j in np.argsort(points, kind="stable"):
        point = int(points[j])
        pieces.append(haystack[prev:point])
        pos += point - prev
        prev = point
        starts[j] = pos
        pieces.append(needles[j])
        pos += len(needles[j])
    pieces.append(haystack[prev:])
    context_len = pos + budget - prev
    input_ids = torch.cat(pieces + query_parts)
    assert len(input_ids) == seq_len

    answer_start = torch.tensor([context_len + s for s, _ in answer_offsets])
    answer_end = torch.tensor([context_len + e for _, e in answer_offsets])
    if loss_on == "all":
        labels = input_ids.clone()
    else:
        labels = torch.full_like(input_ids, -100)
        for s, e in zip(answer_start.tolist(), answer_end.tolist(), strict=True):
            labels[s:e] = input_ids[s:e]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "answer_start": answer_start,
        "answer_end": answer_end,
        "needle_start": torch.tensor([starts[j] for j in asked]),
        "depth": torch.tensor([points[j] / max(budget, 1) for j in asked], dtype=torch.float32),
    }


class NeedleDataModule(EngramDataModule):
    """Needle-in-a-haystack retrieval with answer spans for scoring (see the module docstring).

    Args:
        seq_len: tokens per example, queries included.
        batch_size: examples per batch and per device.
        tokenizer: ``byte``, ``bpe`` (trained on the train plays) or a local HF tokenizer folder.
        bpe_vocab_size: vocabulary size when ``tokenizer: bpe``.
        num_workers: DataLoader worker processes.
        seed: example ``i`` of a split is a pure function of (seed, split, i).
        cache_dir: where tokenizers (and a fetched corpus) are cached.
        train_size: examples per training epoch (generated lazily, so large values cost nothing up front).
        val_size: validation examples.
        test_size: test examples.
        num_needles: needles that are queried: 1 = single needle, more = multi-query.
        distractors: extra needles with other keys that are never queried (multi-key).
        depth: filler share before the first queried needle, in [0, 1]; null = uniform random.
        haystack: ``text`` (embedded Shakespeare, split by play) or ``noise`` (random words).
        loss_on: ``answer`` (labels only on answer tokens) or ``all`` (plain LM loss on every token).
        corpus_source: embedded corpus for the haystack: ``shipped`` or ``fetch``.
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
        train_size: int = 100_000,
        val_size: int = 500,
        test_size: int = 500,
        num_needles: int = 1,
        distractors: int = 0,
        depth: float | None = None,
        haystack: str = "text",
        loss_on: str = "answer",
        corpus_source: str = "shipped",
    ) -> None:
        super().__init__(seq_len, batch_size, tokenizer, bpe_vocab_size, num_workers, seed, cache_dir)
        if num_needles < 1 or distractors < 0 or num_needles + distractors > NUM_KEYS:
            raise EngramError(
                f"num_needles={num_needles}, distractors={distractors}: need num_needles >= 1, distractors >= 0 "
                f"and at most {NUM_KEYS} keys in all."
            )
        if haystack not in HAYSTACKS:
            raise EngramError(f"haystack={haystack!r} is unknown; use one of {', '.join(HAYSTACKS)}.")
        if corpus_source not in SOURCES:
            raise EngramError(f"corpus_source={corpus_source!r} is unknown; use one of {', '.join(SOURCES)}.")
        check_layout(depth, loss_on, (train_size, val_size, test_size))
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.num_needles = num_needles
        self.distractors = distractors
        self.depth = depth
        self.haystack = haystack
        self.loss_on = loss_on
        self.corpus_source = corpus_source
        self._plays: dict[str, list[str]] | None = None

    def plays(self, split: str) -> list[str]:
        """The embedded texts a split's haystacks come from (split by play, seeded)."""
        if self._plays is None:
            texts = load_texts(self.corpus_source, self.cache_dir)
            names = split_by_work(texts, self.seed, SPLIT_SHARE, SPLIT_SHARE)
            self._plays = {s: [texts[n] for n in ns] for s, ns in names.items()}
        return self._plays[split]

    def corpus_texts(self) -> Iterable[str]:
        return self.plays("train")

    def make_split(self, split: str) -> NeedleHaystack:
        stream, lexicon = None, None
        if self.haystack == "text":
            sep = self.tokenizer.encode("\n\n")
            stream = torch.tensor(
                [t for play in self.plays(split) for t in [*self.tokenizer.encode(play), *sep]], dtype=torch.long
            )
        else:
            lexicon = noise_lexicon(self.plays("train"))
        dataset = NeedleHaystack(
            split, self.sizes[split], self.seed, self.seq_len, self.tokenizer, self.num_needles, self.distractors,
            self.depth, self.loss_on, text_stream=stream, lexicon=lexicon,
        )  # fmt: skip
        dataset[0]  # fail now, not mid-epoch, when seq_len cannot hold the needles and queries
        return dataset


class SymbolNeedles(Dataset):
    """Token-level needles (RULER's layout over a symbol vocabulary, as in Zoology's associative recall).

    Needle ``<key> k <val> v``; haystack: uniform random filler symbols; query ``<query> k <val>`` followed by the
    answer ``v``. Keys, values and filler are disjoint vocabularies; keys and values are distinct within an
    example. One answer token per query, so exact match is token accuracy at the answer.
    """

    def __init__(
        self,
        split: str,
        size: int,
        seed: int,
        seq_len: int,
        tokenizer: SymbolTokenizer,
        num_needles: int,
        distractors: int,
        depth: float | None,
        loss_on: str,
        vocab: tuple[int, int, int],
    ) -> None:
        self.split, self.size, self.seed, self.seq_len = split, size, seed, seq_len
        self.num_needles, self.distractors, self.depth, self.loss_on = num_needles, distractors, depth, loss_on
        self.num_keys, self.num_values, self.num_filler = vocab
        ids = tokenizer.ids
        self.key_mark, self.val_mark, self.query_mark = ids["<key>"], ids["<val>"], ids["<query>"]
        self.first_key, self.first_value, self.first_filler = ids["k0"], ids["v0"], ids["w0"]

    def __len__(self) -> int:
        return self.size

    def _filler(self, rng: np.random.Generator, length: int) -> torch.Tensor:
        return torch.from_numpy(rng.integers(self.num_filler, size=length) + self.first_filler)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, SPLIT_CODE[self.split], i])
        n_all = self.num_needles + self.distractors
        keys = rng.choice(self.num_keys, size=n_all, replace=False) + self.first_key
        values = rng.choice(self.num_values, size=n_all, replace=False) + self.first_value
        needles = [torch.tensor([self.key_mark, k, self.val_mark, v]) for k, v in zip(keys, values, strict=True)]
        asked = [int(j) for j in rng.permutation(self.num_needles)]
        query_parts = [torch.tensor([self.query_mark, keys[j], self.val_mark, values[j]]) for j in asked]
        answer_offsets = [(4 * q + 3, 4 * q + 4) for q in range(len(asked))]
        return assemble_example(
            rng, self.seq_len, needles, asked, query_parts, answer_offsets, self.depth, self.loss_on, self._filler
        )


class TokenNeedleDataModule(EngramDataModule):
    """Needle-in-a-haystack over a symbol vocabulary (see ``SymbolNeedles``); same batch keys as ``NeedleDataModule``.

    The text needle asks a model to read English and copy a 7-digit number byte by byte; this one isolates the
    memory: store ``k → v`` once, recall it ``seq_len`` tokens later. Its vocabulary is
    ``<pad> <bos> <eos> <key> <val> <query>``, then ``k0..``, ``v0..``, ``w0..`` (filler).

    Args:
        seq_len: tokens per example, queries included.
        batch_size: examples per batch and per device.
        num_workers: DataLoader worker processes.
        seed: example ``i`` of a split is a pure function of (seed, split, i).
        train_size: examples per training epoch (generated lazily).
        val_size: validation examples.
        test_size: test examples.
        num_needles: needles that are queried (one answer token each).
        distractors: extra needles with other keys that are never queried.
        depth: filler share before the first queried needle, in [0, 1]; null = uniform random.
        loss_on: ``answer`` (labels only on answer tokens) or ``all`` (plain LM loss on every token).
        num_keys: size of the key vocabulary.
        num_values: size of the value vocabulary.
        num_filler: size of the filler vocabulary.
    """

    def __init__(
        self,
        seq_len: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        train_size: int = 100_000,
        val_size: int = 500,
        test_size: int = 500,
        num_needles: int = 1,
        distractors: int = 0,
        depth: float | None = None,
        loss_on: str = "answer",
        num_keys: int = 64,
        num_values: int = 64,
        num_filler: int = 128,
    ) -> None:
        super().__init__(seq_len, batch_size, "symbols", 0, num_workers, seed)
        n_all = num_needles + distractors
        if num_needles < 1 or distractors < 0 or n_all > min(num_keys, num_values) or num_filler < 1:
            raise EngramError(
                f"num_needles={num_needles}, distractors={distractors}, num_keys={num_keys}, num_values={num_values}, "
                f"num_filler={num_filler}: need num_needles >= 1, distractors >= 0, num_needles + distractors <= "
                "min(num_keys, num_values) (keys and values are distinct within an example) and num_filler >= 1."
            )
        check_layout(depth, loss_on, (train_size, val_size, test_size))
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.num_needles, self.distractors, self.depth, self.loss_on = num_needles, distractors, depth, loss_on
        self.num_keys, self.num_values, self.num_filler = num_keys, num_values, num_filler
        self._tokenizer = SymbolTokenizer(
            ["<key>", "<val>", "<query>"]
            + [f"k{i}" for i in range(num_keys)]
            + [f"v{i}" for i in range(num_values)]
            + [f"w{i}" for i in range(num_filler)]
        )

    def make_split(self, split: str) -> SymbolNeedles:
        dataset = SymbolNeedles(
            split, self.sizes[split], self.seed, self.seq_len, self._tokenizer, self.num_needles, self.distractors,
            self.depth, self.loss_on, (self.num_keys, self.num_values, self.num_filler),
        )  # fmt: skip
        dataset[0]  # fail now, not mid-epoch, when seq_len cannot hold the needles and queries
        return dataset
