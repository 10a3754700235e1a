"""Tokenizers: byte round trips, BPE trained on the embedded corpus and cached by content, HF folders, errors."""

from __future__ import annotations

import pytest

from data_modules.embedded import shipped_texts
from data_modules.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, build_tokenizer
from src.errors import EngramError

SAMPLE = "O Romeo, Romeo! wherefore art thou Romeo?\nÆsop — naïve café, 日本語.\t42"


def test_byte_tokenizer_is_utf8_plus_specials() -> None:
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))  # the oracle: Python's own UTF-8 encoder
    assert tok.decode(ids) == SAMPLE
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([*ids[:5], tok.pad_id, tok.bos_id, tok.eos_id]) == SAMPLE[:5]  # specials print as nothing


@pytest.fixture(scope="module")
def plays() -> list[str]:
    texts = shipped_texts()
    return [texts["macbeth_gut"], texts["tempest_gut"]]


def test_bpe_trains_round_trips_and_caches_by_content(plays, tmp_path) -> None:
    calls = []

    def corpus():
        calls.append(1)
        return iter(plays)

    tok = build_tokenizer("bpe", corpus, tmp_path, bpe_vocab_size=400)
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size == 400
    assert sorted((tok.pad_id, tok.bos_id, tok.eos_id)) == [0, 1, 2]
    for text in (SAMPLE, plays[0][:2000]):
        assert tok.decode(tok.encode(text)) == text  # byte-level BPE is lossless, even off-corpus
    # Merges learned on the plays compress them: fewer tokens than bytes.
    assert len(tok.encode(plays[1][:5000])) < 0.75 * len(plays[1][:5000].encode("utf-8"))

    files = list(tmp_path.glob("bpe-400-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = build_tokenizer("bpe", corpus, tmp_path, bpe_vocab_size=400)
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    build_tokenizer("bpe", lambda: iter(plays[:1]), tmp_path, bpe_vocab_size=400)
    assert len(list(tmp_path.glob("bpe-400-*.json"))) == 2  # other corpus, other cache entry
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_hf_tokenizer_from_a_local_folder(plays, tmp_path) -> None:
    from transformers import PreTrainedTokenizerFast

    bpe = build_tokenizer("bpe", lambda: iter(plays), tmp_path / "cache", bpe_vocab_size=300)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(tmp_path / "hf")
    tok = build_tokenizer(str(tmp_path / "hf"))
    assert isinstance(tok, HFTokenizer)
    assert tok.encode(SAMPLE) == bpe.encode(SAMPLE)
    assert tok.vocab_size == 300 and (tok.pad_id, tok.bos_id, tok.eos_id) == (bpe.pad_id, bpe.bos_id, bpe.eos_id)


def test_tokenizer_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(EngramError, match=r"needs a corpus .* Use byte"):
        build_tokenizer("bpe", None, tmp_path)
    with pytest.raises(EngramError, match="bpe_vocab_size=100 is too small; use at least 259"):
        build_tokenizer("bpe", lambda: iter(["x"]), tmp_path, bpe_vocab_size=100)
    with pytest.raises(EngramError, match=r"tokenizer '.*no_such_tokenizer' could not be loaded.*tokenizer: byte"):
        build_tokenizer(str(tmp_path / "no_such_tokenizer"))
