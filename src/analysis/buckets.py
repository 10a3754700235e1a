"""Token buckets for the plasticity analysis: does a token carry syntax, a repeated (retrievable) word, or a new one?

Every token of a sequence gets one of four buckets:

``Syntax``     its word is in the stop-word list (function words: "the", "of", "was" ...)
``Retrieval``  its word is not a stop word and occurred earlier in the same sequence (the context)
``Novelty``    its word is not a stop word and this is its first occurrence in the sequence
``Other``      it belongs to no word: whitespace, punctuation, symbols, special tokens

Buckets are defined on **words**, not tokens, so the labels do not depend on the tokenizer: a word split into
several tokens ("m" + "at", or three UTF-8 bytes of "é" under a byte-level tokenizer) gives all its tokens the
same bucket. Precisely:

1. **Text and spans.** The sequence is decoded incrementally (see :func:`decode_spans`): each token gets the
   character span of the text it adds. Decoding uses a sliding window of the previous tokens, so tokenizers that
   drop a leading space when a token is decoded alone (SentencePiece "▁") still give the right text. Tokens that
   end inside a multi-byte character (byte-level tokenizers) are held until the character is complete; all the
   tokens of that group share the span of the text the group produced. Ids in ``ignore_ids`` (pad, bos, eos) are
   not decoded: they are ``Other`` and act as a word boundary.
2. **Words.** A word is a maximal run of Unicode letters and digits (regex ``[^\\W_]+``). Everything else, i.e.
   whitespace, punctuation, symbols, the underscore *and the apostrophe*, separates words: "don't" is "don" + "t",
   "John's" is "john" + "s", "state-of-the-art" is four words, "3.14" is "3" + "14". Numbers are words, so a
   repeated pass-key is ``Retrieval``.
3. **Case.** Words are compared after ``str.casefold()``: "The" is the stop word "the", and "Paris" after "paris"
   is ``Retrieval``. No stemming: "cats" after "cat" is ``Novelty``.
4. **Token → word.** A token takes the bucket of the *first* word its span overlaps (a token " of the" is
   labelled by "of"). A token overlapping no word character is ``Other``; whitespace or punctuation glued to a word
   inside one token (" cat", "cat.") does not change the token's word.
5. **Word → bucket.** Stop words are always ``Syntax``, even when repeated. Any other word is ``Retrieval`` if the
   same case-folded word occurred earlier in the sequence (even if that earlier occurrence was not the first word
   of its token), else ``Novelty``. For a ``Retrieval`` token, ``distance`` is the number of tokens from the first
   token of the previous occurrence to the first token of this occurrence (``-1`` for the other buckets), so an
   analysis can keep only long-range retrievals.

The stop-word list is configurable: a path to a text file (one word per line, ``#`` comments, blank lines
ignored), an iterable of words, or ``None`` for the shipped English list ``stopwords_en.txt`` (181 entries: function
words plus the contraction fragments that rule 2 creates).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.errors import EngramError

SYNTAX, RETRIEVAL, NOVELTY, OTHER = "Syntax", "Retrieval", "Novelty", "Other"
BUCKETS: tuple[str, ...] = (SYNTAX, RETRIEVAL, NOVELTY, OTHER)
DEFAULT_STOPWORDS_PATH = Path(__file__).with_name("stopwords_en.txt")

_WORD = re.compile(r"[^\W_]+")
_REPLACEMENT = "\ufffd"  # what decoders emit for an incomplete UTF-8 sequence
_SEPARATOR = "\n"  # stands in for an ignored (special) token in the text so it splits words

Decode = Callable[[Sequence[int]], str]


def load_stopwords(source: str | Path | Iterable[str] | None = None) -> frozenset[str]:
    """The case-folded stop words from a file path, an iterable of words, or the default English list (``None``)."""
    if source is None:
        source = DEFAULT_STOPWORDS_PATH
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise EngramError(
                f"stop-word list {str(path)!r} does not exist; give a text file with one word per line, "
                "a list of words, or leave it unset for the default English list."
            )
        lines = (line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())
        words = [line.strip() for line in lines]
    else:
        words = [str(w).strip() for w in source]
    return frozenset(w.casefold() for w in words if w)


@dataclass(frozen=True)
class SequenceBuckets:
    """The labels of one sequence; every list has one entry per token."""

    text: str  # the reconstructed text (ignored tokens appear as "\n")
    spans: list[tuple[int, int]]  # each token's [start, end) in ``text``
    token_text: list[str]  # text[start:end]; tokens of one multi-byte character all show that character
    word: list[int]  # index into ``words`` of the token's word, -1 for Other
    words: list[str]  # the case-folded words of the text, in order
    bucket: list[str]
    distance: list[int]  # tokens since the previous occurrence of the word (Retrieval only), else -1


@dataclass(frozen=True)
class BatchBuckets:
    """The labels of a batch ``[B, L]``, as numpy arrays of that shape."""

    bucket: np.ndarray  # str
    token_text: np.ndarray  # str
    distance: np.ndarray  # int64

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bucket.shape


def decode_spans(
    ids: Sequence[int], decode: Decode, ignore_ids: Collection[int] = ()
) -> tuple[str, list[tuple[int, int]]]:
    """Decode ``ids`` token by token; return the text and each token's character span in it.

    Incremental detokenisation as in text-generation servers: decode a window that starts one emitted token back,
    and take as the new token's text what the window adds beyond the previously emitted part. Decoding the full
    prefix each time would be exact too, but quadratic in the length.
    """
    text = ""
    spans: list[tuple[int, int]] = []
    pending: list[int] = []  # tokens whose bytes end inside a character that is not complete yet
    prefix_start = read_start = 0  # ids[prefix_start:read_start] is emitted context; the window starts there

    def emit(delta: str, tokens: list[int]) -> None:
        nonlocal text
        start = len(text)
        text += delta
        for j in tokens:
            spans[j] = (start, len(text))

    for i, tok in enumerate(ids):
        spans.append((len(text), len(text)))
        if tok in ignore_ids:
            if pending:  # a character cut off by a special token: keep its replacement text
                emit(decode(ids[read_start:i]), pending)
                pending = []
            emit(_SEPARATOR, [i])
            prefix_start = read_start = i + 1
            continue
        prefix_text = decode(ids[prefix_start:read_start])
        new_text = decode(ids[prefix_start : i + 1])
        if new_text.endswith(_REPLACEMENT):
            pending.append(i)
            continue
        if len(new_text) <= len(prefix_text):  # decodes to nothing (e.g. a special token the decoder drops)
            if pending:
                pending.append(i)
            continue
        emit(new_text[len(prefix_text) :], [*pending, i])
        pending = []
        prefix_start, read_start = read_start, i + 1
    if pending:  # the sequence ends inside a character: emit what the decoder makes of it
        emit(decode(ids[prefix_start:])[len(decode(ids[prefix_start:read_start])) :], pending)
    return text, spans


def spans_from_pieces(pieces: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Text and spans when each token's text is already known (concatenating the pieces gives the text)."""
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    return "".join(pieces), spans


def label_spans(text: str, spans: Sequence[tuple[int, int]], stopwords: frozenset[str]) -> SequenceBuckets:
    """Apply rules 2-5 of the module docstring to a text whose per-token spans are known."""
    char_word = np.full(len(text), -1, dtype=np.int64)
    char_token = np.full(len(text), -1, dtype=np.int64)
    words: list[str] = []
    word_starts: list[int] = []
    for w, match in enumerate(_WORD.finditer(text)):
        char_word[match.start() : match.end()] = w
        words.append(match.group().casefold())
        word_starts.append(match.start())
    for t in range(len(spans) - 1, -1, -1):  # reverse, so the earliest token owning a character wins
        start, end = spans[t]
        char_token[start:end] = t

    token_word = []
    for start, end in spans:
        inside = char_word[start:end]
        hits = np.flatnonzero(inside >= 0)
        token_word.append(int(inside[hits[0]]) if hits.size else -1)

    word_bucket: list[str] = []
    word_distance: list[int] = []
    last_seen: dict[str, int] = {}  # word -> first token of its latest occurrence
    for word, start in zip(words, word_starts, strict=True):
        first_token = int(char_token[start])
        if word in stopwords:
            word_bucket.append(SYNTAX)
            word_distance.append(-1)
        elif word in last_seen:
            word_bucket.append(RETRIEVAL)
            word_distance.append(first_token - last_seen[word])
        else:
            word_bucket.append(NOVELTY)
            word_distance.append(-1)
        if word not in stopwords:
            last_seen[word] = first_token

    return SequenceBuckets(
        text=text,
        spans=list(spans),
        token_text=[text[s:e] for s, e in spans],
        word=token_word,
        words=words,
        bucket=[word_bucket[w] if w >= 0 else OTHER for w in token_word],
        distance=[word_distance[w] if w >= 0 else -1 for w in token_word],
    )


def label_sequence(
    ids: Sequence[int] | None = None,
    *,
    decode: Decode | None = None,
    pieces: Sequence[str] | None = None,
    stopwords: str | Path | Iterable[str] | frozenset[str] | None = None,
    ignore_ids: Collection[int] = (),
) -> SequenceBuckets:
    """Buckets of one sequence, from token ids and a ``decode`` function, or from per-token strings ``pieces``.

    ``pieces`` must be the decoded text of each token (not vocabulary entries such as "Ġcat"), such that their
    concatenation is the sequence's text.
    """
    words = stopwords if isinstance(stopwords, frozenset) else load_stopwords(stopwords)
    if pieces is not None:
        text, spans = spans_from_pieces(pieces)
    elif ids is not None and decode is not None:
        text, spans = decode_spans([int(i) for i in ids], decode, ignore_ids)
    else:
        raise ValueError("label_sequence needs either pieces, or ids and decode")
    return label_spans(text, spans, words)


def label_batch(
    input_ids: Sequence[Sequence[int]] | np.ndarray,
    decode: Decode,
    *,
    stopwords: str | Path | Iterable[str] | frozenset[str] | None = None,
    ignore_ids: Collection[int] = (),
) -> BatchBuckets:
    """Buckets of every token of a batch ``[B, L]`` (a tensor, array or nested list); each row is its own context.

    With a project tokenizer: ``label_batch(ids, tok.decode, ignore_ids={tok.pad_id, tok.bos_id, tok.eos_id})``.
    """
    rows = np.asarray(input_ids.cpu() if hasattr(input_ids, "cpu") else input_ids)
    if rows.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(rows.shape)}")
    words = load_stopwords(stopwords) if not isinstance(stopwords, frozenset) else stopwords
    ignore = {int(i) for i in ignore_ids}
    labelled = [label_sequence(row.tolist(), decode=decode, stopwords=words, ignore_ids=ignore) for row in rows]
    return BatchBuckets(
        bucket=np.array([s.bucket for s in labelled], dtype=object).reshape(rows.shape),
        token_text=np.array([s.token_text for s in labelled], dtype=object).reshape(rows.shape),
        distance=np.array([s.distance for s in labelled], dtype=np.int64).reshape(rows.shape),
    )
