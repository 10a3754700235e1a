"""Token buckets (Syntax / Retrieval / Novelty / Other) on hand-made sentences, for several tokenizers."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_modules.tokenizer import BPETokenizer, ByteTokenizer
from src.analysis.buckets import (
    BUCKETS,
    DEFAULT_STOPWORDS_PATH,
    label_batch,
    label_sequence,
    load_stopwords,
)
from src.errors import EngramError

S, R, N, X = "Syntax", "Retrieval", "Novelty", "Other"


def expand_to_bytes(text: str, char_labels: list[str]) -> list[str]:
    """Per-character labels -> per-UTF-8-byte labels (the byte tokenizer's tokens)."""
    return [lab for ch, lab in zip(text, char_labels, strict=True) for _ in ch.encode("utf-8")]


def char_labels(text: str, word_labels: dict[int, str]) -> list[str]:
    """Label every character: word characters by the label of their word (numbered in order), the rest Other."""
    labels, word, inside = [], -1, False
    for ch in text:
        if ch.isalnum():
            if not inside:
                word += 1
            inside = True
            labels.append(word_labels[word])
        else:
            inside = False
            labels.append(X)
    return labels


def test_word_level_pieces_known_buckets() -> None:
    pieces = ["The", " cat", " sat", " on", " the", " mat", ".", " The", " cat", " ran", "!"]
    out = label_sequence(pieces=pieces)
    assert out.bucket == [S, N, N, S, S, N, X, S, R, N, X]
    assert out.distance == [-1, -1, -1, -1, -1, -1, -1, -1, 7, -1, -1]
    assert out.text == "The cat sat on the mat. The cat ran!"
    assert out.token_text == pieces


def test_bpe_like_split_gives_all_tokens_of_a_word_its_bucket() -> None:
    # "mat" is split differently at its two occurrences; "understanding" into three tokens.
    pieces = ["The", " m", "at", " is", " on", " the", " ma", "t", " under", "stand", "ing", "."]
    out = label_sequence(pieces=pieces)
    assert out.bucket == [S, N, N, S, S, S, R, R, N, N, N, X]
    assert out.distance[6] == out.distance[7] == 5  # first token of "mat" #2 minus first token of "mat" #1
    assert out.words == ["the", "mat", "is", "on", "the", "mat", "understanding"]
    assert out.word == [0, 1, 1, 2, 3, 4, 5, 5, 6, 6, 6, -1]


def test_token_spanning_two_words_takes_the_first() -> None:
    out = label_sequence(pieces=["of the", " cat", " of cat"])
    assert out.bucket == [S, N, S]  # "of cat" starts with the stop word "of"
    assert out.words == ["of", "the", "cat", "of", "cat"]


def test_byte_level_ids_with_multibyte_characters_and_case() -> None:
    tok = ByteTokenizer()
    text = "Café au lait, CAFÉ noir; the café's noir."
    # words: café au lait café noir the café s noir
    words = {0: N, 1: N, 2: N, 3: R, 4: N, 5: S, 6: R, 7: S, 8: R}
    ids = tok.encode(text)
    out = label_sequence(ids, decode=tok.decode)
    assert out.text == text
    assert out.bucket == expand_to_bytes(text, char_labels(text, words))
    # both bytes of an "é" show the whole character
    assert [t for t in out.token_text if t in "éÉ"] == ["é", "é", "É", "É", "é", "é"]
    # distances count byte tokens between word starts: "CAFÉ" at byte 15, "Café" at 0
    assert out.distance[ids.index(ord("C"), 1)] == 15


def test_case_folding_and_no_stemming() -> None:
    out = label_sequence(pieces=["Paris", " THE", " paris", " cat", " cats", " Cat"])
    assert out.bucket == [N, S, R, N, N, R]


def test_custom_stopword_list_from_iterable_and_file(tmp_path) -> None:
    pieces = ["the", " cat", " the", " Cat", " dog"]
    assert label_sequence(pieces=pieces, stopwords=["CAT"]).bucket == [N, S, R, S, N]
    path = tmp_path / "stop.txt"
    path.write_text("# my list\n\nDog  # trailing comment\n  the\n", encoding="utf-8")
    assert load_stopwords(path) == frozenset({"dog", "the"})
    assert label_sequence(pieces=pieces, stopwords=path).bucket == [S, N, S, R, S]
    with pytest.raises(EngramError, match="does not exist"):
        load_stopwords(tmp_path / "missing.txt")


def test_default_stopword_list() -> None:
    words = load_stopwords()
    assert DEFAULT_STOPWORDS_PATH.is_file()
    assert len(words) == 181
    assert {"the", "of", "and", "is", "t", "s", "don"} <= words
    assert not {"won", "cat", "paris"} & words
    assert all(w == w.casefold() and w.isalnum() for w in words)


def test_ignored_special_tokens_are_other_and_split_words() -> None:
    tok = ByteTokenizer()
    ids = [tok.bos_id, *tok.encode("cat"), tok.eos_id, *tok.encode("cat"), tok.pad_id]
    out = label_sequence(ids, decode=tok.decode, ignore_ids={tok.bos_id, tok.eos_id, tok.pad_id})
    assert out.bucket == [X, N, N, N, X, R, R, R, X]
    assert out.distance[5] == 4
    # Without ignore_ids the byte decoder silently drops the specials and the two words fuse into "catcat".
    fused = label_sequence(ids, decode=tok.decode)
    assert fused.words == ["catcat"]


def test_sequence_ending_inside_a_character() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("ab é")[:-1]  # cut the last UTF-8 byte off
    out = label_sequence(ids, decode=tok.decode)
    assert out.text == "ab \ufffd" == tok.decode(ids)
    assert out.bucket == [N, N, X, X]


def _word_tokens(out) -> int:
    """How many words are split over two or more tokens."""
    counts: dict[int, int] = {}
    for w in out.word:
        if w >= 0:
            counts[w] = counts.get(w, 0) + 1
    return sum(1 for c in counts.values() if c > 1)


def _check_against_characters(out, stopwords=None) -> None:
    """A token's bucket is the character-level bucket of the first word character in its span."""
    chars = label_sequence(pieces=list(out.text), stopwords=stopwords)
    for (start, end), bucket in zip(out.spans, out.bucket, strict=True):
        word_chars = [chars.bucket[c] for c in range(start, end) if chars.bucket[c] != X]
        assert bucket == (word_chars[0] if word_chars else X)


def test_byte_level_bpe_tokenizer_matches_character_labels(tmp_path) -> None:
    corpus = ["the cat sat on the mat", "a matter of cats and mats", "the category of matters"] * 4
    tok = BPETokenizer.train_or_load(lambda: iter(corpus), vocab_size=280, cache_dir=tmp_path)
    text = "The naïve cat met the café cat; matters of the mat."
    ids = tok.encode(text)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some token is a lone byte of a character
    out = label_sequence(ids, decode=tok.decode)
    assert out.text == text == tok.decode(ids)
    assert _word_tokens(out) >= 3
    _check_against_characters(out)
    cats = [i for i, t in enumerate(out.token_text) if t.strip() == "cat"]
    assert [out.bucket[i] for i in cats] == [N, R]


def test_metaspace_tokenizer_needs_context_to_decode() -> None:
    # A SentencePiece-style decoder drops the "▁" space of a token decoded alone: per-token decoding would glue
    # "the" "cat" into one word. Decoding in a window keeps the spaces.
    corpus = ["the cat sat on the mat", "a matter of cats and mats", "the category of matters"] * 4
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=45, special_tokens=["<unk>"], show_progress=False))
    ids = raw.encode("the cat sat on the cattery mat cat").ids
    assert "".join(raw.decode([i]) for i in ids).count(" ") == 0  # the naive way loses every space
    out = label_sequence(ids, decode=raw.decode)
    assert out.text == "the cat sat on the cattery mat cat"
    assert _word_tokens(out) >= 1
    _check_against_characters(out)
    assert out.words == ["the", "cat", "sat", "on", "the", "cattery", "mat", "cat"]
    assert out.bucket[-1] == R and out.distance[-1] == len(ids) - 2


def test_label_batch_shapes_and_rows_are_separate_contexts() -> None:
    tok = ByteTokenizer()
    rows = [tok.encode("dog cat dog"), tok.encode("cat dog cat")]
    batch = label_batch(torch.tensor(rows), tok.decode)
    assert batch.shape == (2, 11)
    assert batch.bucket[0].tolist() == [N] * 3 + [X] + [N] * 3 + [X] + [R] * 3
    assert batch.bucket[1].tolist() == [N] * 3 + [X] + [N] * 3 + [X] + [R] * 3
    assert batch.distance[0, 8:].tolist() == [8, 8, 8]
    assert batch.distance.dtype.kind == "i"
    assert set(batch.bucket.ravel()) <= set(BUCKETS)
    with pytest.raises(ValueError, match="batch, length"):
        label_batch(torch.tensor(rows[0]), tok.decode)
