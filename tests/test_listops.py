"""ListOps: labels checked by an evaluator written apart from the generator, LRA bounds, format and errors."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
import torch

from data_modules.listops import (
    COMPACT,
    ListOpsDataModule,
    generate_listops,
    read_tsv,
    tree_source,
    tree_value,
)
from src.errors import EngramError


def stack_eval(source: str) -> tuple[int, int]:
    """Evaluate an LRA ``Source`` string with a token stack, and count its tokens (parentheses excluded).

    Independent of the generator: it never sees a tree, only the text, and computes MED with
    ``statistics.median`` (float mean of the middle pair) truncated like LRA's ``int(np.median(...))``.
    """
    ops = {
        "[MIN": min,
        "[MAX": max,
        "[MED": lambda a: int(statistics.median(a)),
        "[SM": lambda a: sum(a) % 10,
    }
    frames: list[tuple[str, list[int]]] = []
    result: list[int] = []
    n_tokens = 0
    for tok in source.split():
        if tok in ("(", ")"):
            continue
        n_tokens += 1
        if tok in ops:
            frames.append((tok, []))
        elif tok == "]":
            op, args = frames.pop()
            (frames[-1][1] if frames else result).append(ops[op](args))
        else:
            (frames[-1][1] if frames else result).append(int(tok))
    assert not frames and len(result) == 1, f"malformed expression: {source[:80]}"
    return result[0], n_tokens


def test_ten_thousand_labels_match_independent_evaluator_and_bounds_hold() -> None:
    min_length, max_length = 20, 200
    rows = generate_listops(seed=7, sizes=(9_000, 500, 500), max_depth=10, max_args=10,
                            min_length=min_length, max_length=max_length)  # fmt: skip
    all_rows = rows["train"] + rows["val"] + rows["test"]
    assert len(all_rows) == 10_000
    lengths = []
    for source, target in all_rows:
        value, n_tokens = stack_eval(source)
        assert value == target, source
        lengths.append(n_tokens)
    assert min_length < min(lengths) and max(lengths) < max_length
    # Deduplicated, so no expression is in two splits (as LRA's set-based generation).
    assert len({source for source, _ in all_rows}) == 10_000
    # The label skew LRA's grammar is known for: 0 and 9 each more common than any of 1-8.
    counts = Counter(target for _, target in all_rows)
    assert min(counts[0], counts[9]) > max(counts[d] for d in range(1, 9))


def test_lra_default_bounds_hold() -> None:
    rows = generate_listops(seed=0, sizes=(150, 25, 25), max_depth=10, max_args=10, min_length=500, max_length=2000)
    for source, target in rows["train"] + rows["val"] + rows["test"]:
        value, n_tokens = stack_eval(source)
        assert value == target and 500 < n_tokens < 2000


def test_known_lra_expression_and_operator_edge_cases() -> None:
    # The worked example from the LRA notes: tokens "[SM [MIN 5 3 8 8 1 8 ] 8 1 0 5 5 ]", length 15, target 0.
    tree = ("[SM", [("[MIN", [5, 3, 8, 8, 1, 8]), 8, 1, 0, 5, 5])
    expected = "( ( ( ( ( ( ( [SM ( ( ( ( ( ( ( [MIN 5 ) 3 ) 8 ) 8 ) 1 ) 8 ) ] ) ) 8 ) 1 ) 0 ) 5 ) 5 ) ] )"
    assert tree_source(tree) == expected
    assert tree_value(tree) == 0 and stack_eval(expected) == (0, 15)
    assert tree_value(("[MED", [1, 2])) == 1  # mean 1.5 truncated
    assert tree_value(("[MED", [2, 9, 4])) == 4
    assert tree_value(("[SM", [9, 9])) == 8
    assert tree_value(("[MAX", [3, ("[MIN", [7, 2])])) == 3


def test_generation_is_seeded() -> None:
    kwargs = dict(sizes=(50, 5, 5), max_depth=6, max_args=5, min_length=5, max_length=60)
    assert generate_listops(seed=3, **kwargs) == generate_listops(seed=3, **kwargs)
    assert generate_listops(seed=3, **kwargs)["train"] != generate_listops(seed=4, **kwargs)["train"]


def small_module(tmp_path, **kwargs) -> ListOpsDataModule:
    args = dict(seq_len=64, batch_size=4, cache_dir=str(tmp_path / "cache"), train_size=40, val_size=8,
                test_size=8, max_depth=6, max_args=5, min_length=5, max_length=60)  # fmt: skip
    return ListOpsDataModule(**{**args, **kwargs})


def test_batches_put_the_answer_last(tmp_path) -> None:
    dm = small_module(tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ids, labels, mask, label = batch["input_ids"], batch["labels"], batch["attention_mask"], batch["label"]
    assert ids.shape == labels.shape == mask.shape == (4, 64) and ids.dtype == labels.dtype == torch.int64
    digit_ids = torch.tensor([ord("0") + d for d in label.tolist()])  # byte tokenizer: digit d is byte '0'+d
    assert torch.equal(ids[:, -1], digit_ids) and torch.equal(labels[:, -1], digit_ids)
    assert (labels[:, :-1] == -100).all()
    assert torch.equal(mask.bool(), ids != dm.tokenizer.pad_id)
    # Decoded, the unpadded part is the compact expression, '=', and the answer; its value is the label.
    inverse = {c: t for t, c in COMPACT.items()}
    for row in range(4):
        text = dm.tokenizer.decode(ids[row][mask[row].bool()].tolist())
        expression, answer = text.split("=")
        value, _ = stack_eval(" ".join(inverse[c] for c in expression))
        assert value == int(answer) == label[row].item()


def test_cache_is_lra_tsv_and_data_path_reads_it(tmp_path) -> None:
    dm = small_module(tmp_path)
    dm.setup("fit")
    folders = list((tmp_path / "cache").glob("listops-*"))
    assert len(folders) == 1
    files = sorted(p.name for p in folders[0].iterdir())
    assert files == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]
    assert (folders[0] / "basic_val.tsv").read_text().startswith("Source\tTarget\n")
    assert read_tsv(folders[0] / "basic_train.tsv") == dm.rows("train")
    from_files = small_module(tmp_path, data_path=str(folders[0]))
    from_files.setup("test")
    assert torch.equal(from_files.datasets["test"][3]["input_ids"], dm.make_split("test")[3]["input_ids"])


def test_bad_settings_fail_with_the_fix(tmp_path) -> None:
    with pytest.raises(EngramError, match=r"seq_len=256 .*seq_len >= 2001"):
        ListOpsDataModule(seq_len=256)
    with pytest.raises(EngramError, match="max_length must exceed min_length"):
        generate_listops(0, (1, 1, 1), 10, 10, min_length=10, max_length=11)
    with pytest.raises(EngramError, match=r"found only 10 distinct .* fewer examples"):
        generate_listops(0, (20, 1, 1), max_depth=1, max_args=2, min_length=0, max_length=5)
    with pytest.raises(EngramError, match=r"data.init_args.data_path='/nonexistent/lra' is not a folder"):
        small_module(tmp_path, data_path="/nonexistent/lra").setup("fit")
    (tmp_path / "lra").mkdir()
    with pytest.raises(EngramError, match=r"exactly one \*_train.tsv"):
        small_module(tmp_path, data_path=str(tmp_path / "lra")).setup("fit")
