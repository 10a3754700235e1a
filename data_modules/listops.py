"""ListOps, generated exactly like the Long Range Arena's (Tay et al. 2021; ``lra_benchmarks/data/listops.py``).

Grammar and constants are LRA's: operators ``[MIN [MAX [MED [SM`` closed by ``]``, values 0-9, a node below
``max_depth`` is a value with probability 0.75, an operator node has ``randint(2, max_args)`` arguments, and an
expression is kept when ``min_length < tokens < max_length`` (tokens counted without parentheses). ``MED`` is
``int(np.median(args))`` (the mean of the two middle values for an even count, truncated); ``SM`` is the sum
mod 10. Expressions are deduplicated in generation order, then the first ``train_size`` go to train, the next
ones to val and test, as LRA does -- but seeded and with an insertion-ordered dict, so the splits are
reproducible (LRA's unseeded ``set`` is not).

The generated splits are cached as LRA-format TSV (``Source<TAB>Target`` with LRA's parenthesised ``Source``),
and LRA's own TSV files can be read instead (``data_path``).

What the model sees: each LRA token as one character (:data:`COMPACT`; with the byte tokenizer one token per LRA
token, so ``seq_len`` matches LRA lengths), then ``=`` and the answer digit, left-padded so the answer is
always the last token. Batch keys: ``input_ids``/``labels`` ``[B, T]`` (labels ``-100`` except the answer at
``T-1``), ``attention_mask`` ``[B, T]`` (0 on padding), ``label`` ``[B]`` (0-9, for classification heads).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data_modules.base import SPLITS, EngramDataModule
from data_modules.tokenizer import Tokenizer
from src.atomic import atomic_write
from src.errors import EngramError

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")  # LRA's order (random.choice draws from it)
END = "]"
VALUE_P = 0.25
# One character per LRA token, so the byte tokenizer gives one model token per LRA token.
COMPACT = {"[MIN": "m", "[MAX": "M", "[MED": "D", "[SM": "S", END: "]", **{str(v): str(v) for v in range(10)}}
ANSWER_SEP = "="
GENERATOR_VERSION = 1  # part of the cache key; bump when generation changes

Tree = int | tuple[str, list["Tree"]]


class _TooLong(Exception):
    """Raised inside generation once a tree reaches ``max_length`` tokens: it would be rejected anyway."""


def generate_tree(rng: random.Random, max_depth: int, max_args: int, max_length: int) -> tuple[Tree, int] | None:
    """One LRA tree and its token count, or None if it reached ``max_length`` (drawing stops there, which
    leaves the distribution of accepted trees unchanged). Random draws are in LRA's order."""
    count = 0

    def grow(depth: int) -> Tree:
        nonlocal count
        r = rng.random() if depth < max_depth else 1.0
        if r > VALUE_P:
            count += 1
            if count >= max_length:
                raise _TooLong
            return rng.choice(range(10))
        count += 2
        if count >= max_length:
            raise _TooLong
        n_args = rng.randint(2, max_args)
        children = [grow(depth + 1) for _ in range(n_args)]
        return (rng.choice(OPERATORS), children)

    try:
        tree = grow(1)
    except _TooLong:
        return None
    return tree, count


def tree_value(tree: Tree) -> int:
    """The label of a tree (LRA's ``to_value``)."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    args = [tree_value(c) for c in children]
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[SM":
        return sum(args) % 10
    ordered = sorted(args)  # [MED: np.median then int(), i.e. floor of the middle pair's mean (args >= 0)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) // 2


def tree_source(tree: Tree) -> str:
    """LRA's ``to_string``: the nested pairs ``((((op, a0), a1), ...), ']')``, every pair in parentheses."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    text = f"( {op} {tree_source(children[0])} )"
    for child in children[1:]:
        text = f"( {text} {tree_source(child)} )"
    return f"( {text} {END} )"


def source_tokens(source: str) -> list[str]:
    """LRA tokens of a ``Source`` string: parentheses dropped (LRA's pipeline also drops them)."""
    return source.replace("(", " ").replace(")", " ").split()


def compact(tokens: Iterable[str]) -> str:
    return "".join(COMPACT[t] for t in tokens)


def generate_listops(
    seed: int, sizes: tuple[int, int, int], max_depth: int, max_args: int, min_length: int, max_length: int
) -> dict[str, list[tuple[str, int]]]:
    """``(Source, Target)`` pairs per split: distinct expressions in generation order, train first (as LRA)."""
    if max_length - min_length < 2:
        raise EngramError(
            f"min_length={min_length}, max_length={max_length}: lengths must satisfy min_length < length < "
            "max_length, so max_length must exceed min_length by at least 2."
        )
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    total = sum(sizes)
    draws, max_draws = 0, 2000 * total + 100_000
    while len(seen) < total:
        draws += 1
        if draws > max_draws:
            raise EngramError(
                f"found only {len(seen)} distinct ListOps expressions with {min_length} < length < {max_length} "
                f"(max_depth={max_depth}, max_args={max_args}) in {max_draws} draws, {total} wanted. Widen the "
                "length bounds, raise max_depth/max_args, or ask for fewer examples."
            )
        drawn = generate_tree(rng, max_depth, max_args, max_length)
        if drawn is None or drawn[1] <= min_length:
            continue
        seen.setdefault(tree_source(drawn[0]), tree_value(drawn[0]))
    items = list(seen.items())
    n_train, n_val, _ = sizes
    return {"train": items[:n_train], "val": items[n_train : n_train + n_val], "test": items[n_train + n_val :]}


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    """LRA's file format, written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("Source\tTarget\n")
            f.writelines(f"{source}\t{target}\n" for source, target in rows)

    atomic_write(path, write)


def read_tsv(path: Path) -> list[tuple[str, int]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["Source", "Target"]:
            raise EngramError(f"{path} is not an LRA ListOps TSV (header {header}, expected Source, Target).")
        for line in f:
            source, target = line.rstrip("\n").split("\t")
            rows.append((source, int(target)))
    return rows


class ListOpsExamples(Dataset):
    """Expressions of one split, encoded on access (compact strings are ~8x smaller than int64 ids)."""

    def __init__(self, rows: list[tuple[str, int]], seq_len: int, tokenizer: Tokenizer) -> None:
        self.texts = [compact(source_tokens(source)) for source, _ in rows]
        self.targets = [target for _, target in rows]
        self.seq_len = seq_len
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokenizer.encode(self.texts[i] + ANSWER_SEP)
        answer = self.tokenizer.encode(str(self.targets[i]))
        if len(answer) != 1:
            raise EngramError(
                f"the tokenizer splits the ListOps answer {self.targets[i]} into {len(answer)} tokens; use a "
                "tokenizer with single-digit tokens (byte or bpe)."
            )
        n = len(ids) + 1
        if n > self.seq_len:
            raise EngramError(
                f"a ListOps expression takes {n} tokens with its answer, more than seq_len={self.seq_len}. Raise "
                "seq_len to at least max_length + 1, or lower max_length."
            )
        input_ids = torch.full((self.seq_len,), self.tokenizer.pad_id, dtype=torch.long)
        input_ids[self.seq_len - n :] = torch.tensor(ids + answer)
        labels = torch.full((self.seq_len,), -100, dtype=torch.long)
        labels[-1] = answer[0]
        attention_mask = torch.zeros(self.seq_len, dtype=torch.long)
        attention_mask[self.seq_len - n :] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "label": torch.tensor(self.targets[i]),
        }


class ListOpsDataModule(EngramDataModule):
    """LRA ListOps: nested MAX/MIN/MED/SM expressions, 10-way answer as the last token (see module docstring).

    Args:
        seq_len: tokens per example; at least ``max_length + 1`` with the byte tokenizer (expression + ``=`` +
            answer). LRA uses 2000-token inputs, hence the default 2048.
        batch_size: examples per batch and per device.
        tokenizer: ``byte`` (one token per LRA token), ``bpe`` (trained on train expressions) or an HF folder.
        bpe_vocab_size: vocabulary size when ``tokenizer: bpe``.
        num_workers: DataLoader worker processes.
        seed: seeds generation (and shuffling); same seed, same expressions in the same splits.
        cache_dir: where generated splits are cached as LRA TSV files.
        train_size: training expressions (LRA: 96000).
        val_size: validation expressions (LRA: 2000).
        test_size: test expressions (LRA: 2000).
        max_depth: maximum nesting depth (LRA: 10).
        max_args: maximum arguments per operator (LRA: 10).
        min_length: expressions have more than this many tokens (LRA: 500).
        max_length: expressions have fewer than this many tokens (LRA: 2000).
        data_path: a folder with LRA's ``basic_train.tsv``/``basic_val.tsv``/``basic_test.tsv`` to use
            instead of generating; null = generate.
    """

    def __init__(
        self,
        seq_len: int = 2048,
        batch_size: int = 8,
        tokenizer: str = "byte",
        bpe_vocab_size: int = 2048,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str = "runs/.cache",
        train_size: int = 96_000,
        val_size: int = 2_000,
        test_size: int = 2_000,
        max_depth: int = 10,
        max_args: int = 10,
        min_length: int = 500,
        max_length: int = 2_000,
        data_path: str | None = None,
    ) -> None:
        super().__init__(seq_len, batch_size, tokenizer, bpe_vocab_size, num_workers, seed, cache_dir)
        if min(train_size, val_size, test_size) < 1:
            raise EngramError(f"train_size/val_size/test_size = {train_size}/{val_size}/{test_size}: all must be >= 1.")
        if max_depth < 1 or max_args < 2:
            raise EngramError(f"max_depth={max_depth} must be >= 1 and max_args={max_args} >= 2 (LRA: 10 and 10).")
        if data_path is None and seq_len < max_length + 1 and tokenizer == "byte":
            raise EngramError(
                f"seq_len={seq_len} cannot hold ListOps expressions of up to {max_length - 1} tokens plus '=' and "
                f"the answer; set seq_len >= {max_length + 1} or lower max_length."
            )
        self.sizes = (train_size, val_size, test_size)
        self.max_depth = max_depth
        self.max_args = max_args
        self.min_length = min_length
        self.max_length = max_length
        self.data_path = data_path
        self._rows: dict[str, list[tuple[str, int]]] | None = None

    def rows(self, split: str) -> list[tuple[str, int]]:
        """``(Source, Target)`` pairs of a split: read from ``data_path``, the cache, or generated and cached."""
        if self._rows is None:
            self._rows = self._read_lra() if self.data_path is not None else self._generate_or_load()
        return self._rows[split]

    def _cache_folder(self) -> Path:
        params = [GENERATOR_VERSION, self.seed, *self.sizes, self.max_depth, self.max_args]
        params += [self.min_length, self.max_length]
        return self.cache_dir / f"listops-{hashlib.sha256(json.dumps(params).encode()).hexdigest()[:12]}"

    def _generate_or_load(self) -> dict[str, list[tuple[str, int]]]:
        folder = self._cache_folder()
        paths = {split: folder / f"basic_{split}.tsv" for split in SPLITS}
        if all(p.exists() for p in paths.values()):
            return {split: read_tsv(p) for split, p in paths.items()}
        rows = generate_listops(self.seed, self.sizes, self.max_depth, self.max_args, self.min_length, self.max_length)
        for split, path in paths.items():
            write_tsv(path, rows[split])
        return rows

    def _read_lra(self) -> dict[str, list[tuple[str, int]]]:
        assert self.data_path is not None
        folder = Path(self.data_path).expanduser()
        if not folder.is_dir():
            raise EngramError(
                f"data.init_args.data_path={self.data_path!r} is not a folder. Point it at LRA's ListOps output "
                "(basic_train.tsv, basic_val.tsv, basic_test.tsv), or set it to null to generate."
            )
        found = {}
        for split in SPLITS:
            matches = sorted(folder.glob(f"*_{split}.tsv"))
            if len(matches) != 1:
                raise EngramError(
                    f"data_path={self.data_path!r} should hold exactly one *_{split}.tsv (LRA: basic_{split}.tsv); "
                    f"found {[m.name for m in matches]}."
                )
            found[split] = read_tsv(matches[0])
        return found

    def corpus_texts(self) -> Iterable[str]:
        return [compact(source_tokens(source)) for source, _ in self.rows("train")]

    def make_split(self, split: str) -> ListOpsExamples:
        dataset = ListOpsExamples(self.rows(split), self.seq_len, self.tokenizer)
        if len(dataset):  # the longest expression must fit: fail now, not mid-epoch
            longest = max(range(len(dataset)), key=lambda i: len(dataset.texts[i]))
            dataset[longest]
        return dataset
