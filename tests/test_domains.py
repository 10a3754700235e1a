"""Domain-text helper for Temporal LoRA: folder and stdlib domains, splits, labels, spliced switch sequences."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from data_modules.domains import DomainSpec, DomainTextDataModule, domain_documents, domain_files
from src.errors import EngramError
from src.splicing import compose_sequence


def write_domain(folder: Path, letter: str, n_files: int = 30) -> Path:
    """Files whose every character is ``letter`` (plus newlines): any window tells its domain by its bytes."""
    folder.mkdir(parents=True)
    for i in range(n_files):
        (folder / f"doc{i:02d}.txt").write_text((letter * 40 + "\n") * (5 + i % 7))
    return folder


def test_folder_domains_give_labelled_disjoint_windows(tmp_path) -> None:
    specs = [
        {"name": "aaa", "path": str(write_domain(tmp_path / "a", "a"))},
        {"name": "bbb", "path": str(write_domain(tmp_path / "b", "b"))},
    ]
    dm = DomainTextDataModule(specs, seq_len=32, batch_size=4, val_fraction=0.2, test_fraction=0.2, max_chars=None)
    dm.setup()
    for split in ("train", "val", "test"):
        data = dm.datasets[split]
        per_domain = [0, 0]
        for i in range(len(data)):
            item = data[i]
            byte = ord("a") + int(item["domain"])
            assert set(item["input_ids"].tolist()) <= {byte, ord("\n")}  # the label matches the text
            per_domain[int(item["domain"])] += 1
        assert per_domain[0] == per_domain[1] > 0  # balanced
    # held-out files are never training files, and every file lands in exactly one split
    a_docs = {s: dm.documents(0, s) for s in ("train", "val", "test")}
    assert [len(a_docs[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["domain"].shape == (4,)
    doc_ids = {(int(dm.datasets["train"][i]["domain"]), int(dm.datasets["train"][i]["doc_id"])) for i in range(8)}
    assert len({d for _, d in doc_ids}) == len(doc_ids)  # doc ids unique across domains
    streams = dm.streams("test")
    assert set(streams[1].tolist()) <= {ord("b"), ord("\n"), dm.tokenizer.eos_id}


def test_splits_are_seeded_and_max_chars_bounds_reading(tmp_path) -> None:
    spec = DomainSpec("aaa", str(write_domain(tmp_path / "a", "a", n_files=60)))
    one = domain_documents(spec, seed=3, val_fraction=0.2, test_fraction=0.2)
    assert one == domain_documents(spec, seed=3, val_fraction=0.2, test_fraction=0.2)
    assert one != domain_documents(spec, seed=4, val_fraction=0.2, test_fraction=0.2)
    capped = domain_documents(spec, seed=3, val_fraction=0.2, test_fraction=0.2, max_chars=2000)
    full_train = sum(len(t) for t in one["train"])
    capped_train = sum(len(t) for t in capped["train"])
    assert capped_train < full_train and capped_train < 0.6 * 2000 + 41 * 12  # stops after the first file past budget


def test_python_domain_reads_the_stdlib_sources() -> None:
    root, files = domain_files(DomainSpec("python"))
    assert root == Path(sysconfig.get_paths()["stdlib"])
    assert root / "os.py" in files and not any("site-packages" in f.parts for f in files)
    docs = domain_documents(DomainSpec("python"), max_chars=50_000)
    assert all(docs[s] for s in ("train", "val", "test"))
    assert any("def " in text or "import " in text for text in docs["train"])
    assert sum(len(t) for t in docs["val"]) < 50_000


def test_compose_sequence_follows_the_plan() -> None:
    streams = [torch.arange(0, 50), torch.arange(100, 150), torch.arange(200, 250)]
    g = torch.Generator().manual_seed(0)
    ids, domains, segments = compose_sequence(streams, [(2, 10), ((0, 1), 25), (2, 7)], g, mix_chunk=10)
    assert ids.shape == domains.shape == (42,)
    assert torch.equal(ids // 100, domains)  # every token comes from the stream its label names
    assert domains[10:35].tolist() == [0] * 10 + [1] * 10 + [0] * 5
    assert torch.equal(ids[:10], torch.arange(ids[0], ids[0] + 10))  # a single-domain segment is contiguous text
    assert [(s.domains, s.start, s.end) for s in segments] == [((2,), 0, 10), ((0, 1), 10, 35), ((2,), 35, 42)]


def test_domain_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(EngramError, match="not a built-in corpus"):
        domain_files(DomainSpec("klingon"))
    with pytest.raises(EngramError, match="not a folder"):
        domain_files(DomainSpec("x", str(tmp_path / "missing")))
    with pytest.raises(EngramError, match="too few"):
        domain_documents(DomainSpec("x", str(write_domain(tmp_path / "few", "x", n_files=2))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngramError, match="no files match"):
        domain_files(DomainSpec("x", str(tmp_path / "empty")))
    with pytest.raises(EngramError, match="distinct"):
        DomainTextDataModule([{"name": "a", "path": "p"}, {"name": "a", "path": "q"}])
    with pytest.raises(EngramError, match="nothing else"):
        DomainSpec.parse({"name": "a", "folder": "p"})
    with pytest.raises(EngramError, match="fewer than"):
        compose_sequence([torch.arange(5), torch.arange(5)], [(0, 8)], torch.Generator())


def test_shakespeare_domain_is_the_embedded_corpus_split_by_play() -> None:
    docs = domain_documents(DomainSpec("shakespeare"), seed=0)
    assert [len(docs[s]) for s in ("train", "val", "test")] == [8, 1, 1]  # 10 shipped plays, 10% + 10% held out
    assert len({*docs["train"], *docs["val"], *docs["test"]}) == 10
    assert all("Enter" in text for text in docs["test"])  # stage directions: it is a play
