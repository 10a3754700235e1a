"""The Morris et al. capacity estimator (``src/analysis/capacity.py``): zero for a model that knows nothing, the
data's full information for a model that has memorized it, never more than that, and the parameter-counting rule."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from data_modules.canaries import CanarySet
from src.analysis.capacity import (
    alert_threshold,
    count_parameters,
    gpt2_parameter_count,
    information_bits,
    memorized_bits,
    sequence_code_bits,
    weight_bits,
)


def _gpt2(vocab: int, positions: int, layers: int, d: int, tied: bool = True, device: str = "cpu") -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=d,
        n_layer=layers,
        n_head=max(1, d // 32),
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    with torch.device(device):
        return GPT2LMHeadModel(config)


def _dataset_bits(model: GPT2LMHeadModel, tokens: torch.Tensor, vocab: int) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return float(memorized_bits(sequence_code_bits(logits, tokens), tokens.shape[1], vocab).sum())


def test_code_length_matches_a_naive_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 12, generator=generator) * 3
    tokens = torch.randint(4, 10, (3, 5), generator=generator)  # sub-vocabulary [4, 10)
    for restrict in (True, False):
        got = sequence_code_bits(logits, tokens, vocab_offset=4, vocab_size=6, restrict=restrict)
        for n in range(3):
            bits = math.log2(6)  # the first token: charged log2 V
            for t in range(1, 5):
                row = logits[n, t - 1].tolist()
                support = row[4:10] if restrict else row
                index = tokens[n, t].item() - (4 if restrict else 0)
                bits -= math.log2(math.exp(support[index]) / sum(math.exp(v) for v in support))
            assert got[n].item() == pytest.approx(bits, rel=1e-5)


def test_uniform_output_memorizes_nothing() -> None:
    canaries = CanarySet(count=16, length=64, vocab_size=32, vocab_offset=3)
    tokens = canaries.seen
    flat = torch.zeros(16, 64, 40)  # uniform over 40 ids, the canaries using 32 of them
    for restrict in (True, False):
        bits = sequence_code_bits(flat, tokens, 3, 32, restrict)
        assert memorized_bits(bits, 64, 32).sum().item() == 0.0
    assert sequence_code_bits(flat, tokens, 3, 32).allclose(torch.full((16,), 64 * 5.0))  # S·log2 V exactly

    torch.manual_seed(0)
    untrained = _gpt2(vocab=32, positions=64, layers=2, d=64)
    assert _dataset_bits(untrained, CanarySet(16, 64, 32).seen, 32) < 0.01 * information_bits(16, 64, 32)


def test_a_memorized_set_gives_its_full_information() -> None:
    vocab, n, length = 32, 16, 64
    tokens = CanarySet(count=n, length=length, vocab_size=vocab, seed=7).seen
    torch.manual_seed(0)
    model = _gpt2(vocab=vocab, positions=length, layers=2, d=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.005:
            break
    info = information_bits(n, length, vocab)
    bits = _dataset_bits(model, tokens, vocab)
    assert loss.item() < 0.02
    assert abs(bits - info) / info < 0.03, (bits, info)
    assert bits <= info
    # The unseen half of the same canary set stays unmemorized: nothing to generalise from random data.
    assert _dataset_bits(model, CanarySet(count=n, length=length, vocab_size=vocab, seed=7).unseen, vocab) < 0.02 * info


def test_memorized_bits_never_exceed_the_information() -> None:
    generator = torch.Generator().manual_seed(1)
    n, length, vocab = 8, 16, 10
    tokens = torch.randint(0, vocab, (n, length), generator=generator)
    info = information_bits(n, length, vocab)
    perfect = torch.nn.functional.one_hot(tokens.roll(-1, dims=1), vocab).float() * 1e4  # certain of every next token
    noisy = [torch.randn(n, length, vocab, generator=generator) * scale for scale in (1.0, 10.0, 1e3)]
    for logits in [perfect, *noisy]:
        for restrict in (True, False):
            bits = memorized_bits(sequence_code_bits(logits, tokens, restrict=restrict), length, vocab).sum().item()
            assert 0.0 <= bits <= info
    best = memorized_bits(sequence_code_bits(perfect, tokens), length, vocab).sum().item()
    assert best == pytest.approx(n * (length - 1) * math.log2(vocab), rel=1e-6)  # the first token stays uncoded


# (V, S, L, d) -> parameters of the paper's models (research notes §1.4, measured against the paper's tables).
PAPER_COUNTS = {
    (2048, 64, 1, 32): 80_352,
    (2048, 64, 1, 128): 468_864,
    (2048, 64, 2, 128): 667_136,
    (2048, 64, 4, 256): 3_700_224,
    (2048, 64, 8, 256): 6_859_264,
    (128, 64, 2, 128): 421_376,
    (4096, 64, 2, 128): 929_280,
    (2048, 4, 2, 128): 659_456,
    (2048, 256, 2, 128): 691_712,
}


@pytest.mark.parametrize(("shape", "expected"), PAPER_COUNTS.items(), ids=lambda v: str(v))
def test_parameter_count_follows_the_documented_rule(shape: tuple[int, int, int, int], expected: int) -> None:
    model = _gpt2(*shape, device="meta")  # shapes only: no memory, no time
    assert count_parameters(model) == gpt2_parameter_count(*shape) == expected
    untied = _gpt2(*shape, tied=False, device="meta")
    vocab, _, _, d = shape
    assert count_parameters(untied) == gpt2_parameter_count(*shape, tied=False) == expected + vocab * d


def test_shared_and_quantized_weights_count_once_at_full_size() -> None:
    shared = torch.nn.Linear(6, 4)
    model = torch.nn.ModuleDict({"a": shared, "b": shared, "c": torch.nn.Linear(4, 2, bias=False)})
    assert count_parameters(model) == 6 * 4 + 4 + 4 * 2

    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")  # quantizes
    assert layer.weight.numel() == 64 * 32 // 2  # two 4-bit weights per stored byte
    assert count_parameters(layer) == 64 * 32 + 32
    assert weight_bits(layer) == pytest.approx((64 * 32 * 4 + 32 * 32) / (64 * 32 + 32))  # 4-bit weights, fp32 bias


def test_alert_threshold_by_weight_storage() -> None:
    model = torch.nn.Linear(8, 8)
    assert weight_bits(model) == 32 and alert_threshold(weight_bits(model)) == 3.8
    assert weight_bits(model.bfloat16()) == 16 and alert_threshold(16) == 3.5
    assert alert_threshold(4.2) == 3.6  # a 4-bit base with a small fp32 adapter
