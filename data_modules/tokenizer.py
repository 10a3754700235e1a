"""Tokenizers: byte-level (the offline default), any HF tokenizer from a local path, or a BPE trained
with the ``tokenizers`` library on a data module's corpus and cached by the corpus's content hash.

``build_tokenizer("byte" | "bpe" | "<path to an HF tokenizer>", ...)`` returns an object with
``encode``, ``decode``, ``vocab_size``, ``pad_id``, ``bos_id`` and ``eos_id``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from src.errors import EngramError


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0-255 plus three specials: 256 <pad>, 257 <bos>, 258 <eos>."""

    name = "byte"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class SymbolTokenizer:
    """A closed vocabulary of named symbols for synthetic token-level tasks: ``encode`` splits on whitespace.

    The first three symbols are always ``<pad> <bos> <eos>``; an unknown symbol is an error, not a silent ``<unk>``.
    """

    name = "symbols"
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, symbols: Iterable[str]) -> None:
        self.symbols = ["<pad>", "<bos>", "<eos>", *symbols]
        self.ids = {symbol: i for i, symbol in enumerate(self.symbols)}
        if len(self.ids) != len(self.symbols):
            raise EngramError("SymbolTokenizer symbols must be distinct (and must not repeat <pad>, <bos>, <eos>).")
        self.vocab_size = len(self.symbols)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[symbol] for symbol in text.split()]
        except KeyError as err:
            raise EngramError(f"symbol {err.args[0]!r} is not in this {self.vocab_size}-symbol vocabulary.") from None

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.symbols[i] for i in ids)


class HFTokenizer:
    """Wraps a ``transformers`` tokenizer (a local folder, or a hub id where a hub is reachable)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise EngramError(
                f"tokenizer {path!r} could not be loaded ({err.__class__.__name__}). Give a local folder with "
                "tokenizer files, or use tokenizer: byte / tokenizer: bpe."
            ) from err
        self.name = path
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id if self._tok.eos_token_id is not None else 0
        self.bos_id = self._tok.bos_token_id if self._tok.bos_token_id is not None else self.eos_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


class BPETokenizer:
    """A byte-level BPE from the ``tokenizers`` library, trained once per corpus and cached as JSON."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, tokenizer_file: Path) -> None:
        from tokenizers import Tokenizer as HFCoreTokenizer

        self._tok = HFCoreTokenizer.from_file(str(tokenizer_file))
        self.name = f"bpe:{tokenizer_file.name}"
        self.vocab_size = self._tok.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (self._tok.token_to_id(s) for s in self.SPECIALS)

    @classmethod
    def train_or_load(cls, texts: Callable[[], Iterable[str]], vocab_size: int, cache_dir: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFCoreTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        digest = hashlib.sha256(f"bpe-v1:{vocab_size}".encode())
        for text in texts():
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        path = Path(cache_dir) / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
        if not path.exists():
            tok = HFCoreTokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=list(cls.SPECIALS),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            tok.train_from_iterator(texts(), trainer=trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic: another rank or a crash never sees a half-written file.
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            tok.save(tmp)
            os.replace(tmp, path)
        return cls(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def build_tokenizer(
    spec: str,
    corpus: Callable[[], Iterable[str]] | None = None,
    cache_dir: str | Path = "runs/.cache",
    bpe_vocab_size: int = 2048,
) -> Tokenizer:
    """``spec`` is ``"byte"``, ``"bpe"`` (trained on ``corpus()``), or a path to an HF tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if corpus is None:
            raise EngramError("tokenizer: bpe needs a corpus to train on; this data module has none. Use byte.")
        if bpe_vocab_size < 259:
            raise EngramError(f"bpe_vocab_size={bpe_vocab_size} is too small; use at least 259 (bytes + specials).")
        return BPETokenizer.train_or_load(corpus, bpe_vocab_size, Path(cache_dir))
    return HFTokenizer(spec)
