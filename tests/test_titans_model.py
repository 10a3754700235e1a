"""The Titans language models (src/models/titans/model.py): causality, MAC's retrieve → attend → update order checked
against a reference built from the memory's own full forward, the sliding window's reach, and the plasticity records
of every architecture."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor

from src.cli import main
from src.errors import EngramError
from src.models import plasticity
from src.models.titans import TitansConfig, TitansForCausalLM
from src.models.titans.memory import NeuralMemoryState
from tests.conftest import CONFIGS

ARCHITECTURES = ("mac", "mag", "mal", "lmm", "swa")


def build(architecture: str, **overrides: object) -> TitansForCausalLM:
    torch.manual_seed(0)
    values = dict(architecture=architecture, vocab_size=50, segment_size=16, window=8, chunk_size=4)
    model = TitansForCausalLM(TitansConfig.from_name("titans-tiny", **{**values, **overrides})).double()
    return model.eval()


def tokens(b: int = 2, t: int = 40, seed: int = 0) -> Tensor:
    return torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_outputs_do_not_depend_on_later_tokens(architecture: str) -> None:
    model = build(architecture)
    ids = tokens()
    changed = ids.clone()
    changed[:, 21:] = (changed[:, 21:] + 7) % 50
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :21], b[:, :21], rtol=0, atol=1e-12)
    assert (a[:, 21:] - b[:, 21:]).abs().max() > 1e-6


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_loss_is_the_shifted_cross_entropy_and_trains_every_parameter(architecture: str) -> None:
    model = build(architecture)
    ids = tokens()
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_sliding_window_attention_reaches_exactly_layers_times_window() -> None:
    """Two layers of window w: the output at t sees tokens back to t − 2(w − 1), and no further (persistent tokens,
    always visible, carry nothing from the input)."""
    model = build("swa", window=8, persistent_tokens=2)
    ids = tokens(t=30)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 50
    diff = (model(ids).logits - model(changed).logits).abs().amax(dim=(0, 2))
    reach = 5 + 2 * (8 - 1)
    assert diff[5 : reach + 1].min() > 1e-9
    assert diff[reach + 1 :].max() < 1e-12


def test_mac_retrieves_before_attending_and_writes_the_attention_output() -> None:
    """Segment s reads h with the state the memory reaches after being written with the y of segments < s (rebuilt
    here by one full memory forward over those y), and y is the residual stream after attention, not the input."""
    model = build("mac", num_layers=1, segment_size=8, chunk_size=4)
    block = model.blocks[0]
    memory = block.memory
    ys: list[Tensor] = []
    read_states: list[NeuralMemoryState] = []
    memory.register_forward_pre_hook(lambda mod, inp: ys.append(inp[0]))  # what each segment writes
    original_retrieve = memory.retrieve

    def retrieve(x: Tensor, state: NeuralMemoryState) -> Tensor:
        read_states.append(state)
        return original_retrieve(x, state)

    memory.retrieve = retrieve  # type: ignore[method-assign]
    model(tokens(t=32))
    assert len(ys) == len(read_states) == 4
    h = block.mixer_norm(model.embed(tokens(t=32)))
    assert (ys[0] - h[:, :8]).abs().max() > 1e-6  # attention has changed it
    initial = memory.initial_state(2)
    for w, w0 in zip(read_states[0].weights, initial.weights, strict=True):
        torch.testing.assert_close(w, w0)
    for s in range(1, 4):
        _, expected = memory(torch.cat(ys[:s], dim=1))
        for w, w_ref in zip(read_states[s].weights, expected.weights, strict=True):
            torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)


def test_retrieval_reads_without_writing() -> None:
    model = build("mac")
    memory = model.blocks[0].memory
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    _, state = memory(x)
    before = [w.clone() for w in state.weights]
    memory.retrieve(torch.randn(2, 8, 64, dtype=torch.float64), state)
    assert all(torch.equal(a, b) for a, b in zip(before, state.weights, strict=True))


@pytest.mark.parametrize("architecture", ["mac", "mag", "mal", "lmm"])
def test_plasticity_records_cover_the_text_tokens_of_every_memory_layer(architecture: str) -> None:
    model = build(architecture, persistent_tokens=3)
    ids = tokens(t=40)
    model.set_capture(True)
    model(ids)
    records = model.plasticity_records()
    plasticity.check_records(records)
    assert len(records) == model.config.num_layers
    for record in records:
        torch.testing.assert_close(record["position"], torch.arange(40))
        for key in ("update_norm", "surprise_past", "theta", "eta", "alpha", "loss_pre"):
            assert record[key].shape == (2, 2, 40), key
            assert torch.isfinite(record[key]).all() and (record[key] >= 0).all()
        # MAC writes 40 tokens in segments of 16 (4 + 4 + 2 chunks); the others 3 persistent + 40 tokens.
        chunks = 10 if architecture == "mac" else 11
        assert record["delta_w_norm"].shape == (2, 2, chunks)
    model(ids)  # a second forward replaces the records, it does not add to them
    assert model.plasticity_records()[0]["update_norm"].shape[-1] == 40
    model.set_capture(False)
    with pytest.raises(EngramError, match="capture on"):
        model.plasticity_records()


def test_the_memoryless_baseline_says_it_has_no_records() -> None:
    model = build("swa")
    model.set_capture(True)
    model(tokens())
    with pytest.raises(EngramError, match="no memory"):
        model.plasticity_records()


def test_an_unknown_architecture_is_one_clear_line() -> None:
    with pytest.raises(EngramError, match="architecture"):
        TitansConfig.from_name("titans-tiny", architecture="mamba")


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm", "swa"])
def test_every_needle_variant_trains_through_the_cli_with_plasticity_capture(variant: str, run_root: Path) -> None:
    overlay = [] if variant == "mac" else ["--config", str(CONFIGS / "titans_needle" / f"{variant}.yaml")]
    capture = [] if variant == "swa" else [
        "--trainer.callbacks+=callbacks.plasticity.PlasticityCallback", "--trainer.callbacks.every_n_steps=1",
        "--trainer.callbacks.max_sequences=2", "--trainer.callbacks.max_eval_batches=1",
    ]  # fmt: skip
    cli = main([
        "fit", "--config", str(CONFIGS / "titans_needle.yaml"), *overlay,
        "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4",
        "--data.init_args.train_size", "8", "--data.init_args.val_size", "4",
        "--trainer.max_steps", "2", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *capture,
        "--run.root", str(run_root), "--run.name", variant,
    ])  # fmt: skip
    assert cli is not None and cli.model.config.architecture == variant and cli.trainer.global_step == 2
    assert cli.trainer.gradient_clip_val == 1.0
    if variant == "swa":
        return
    out = run_root / variant / "v0" / "plasticity" / "train"
    tables = sorted(p for p in out.glob("step*.parquet") if not p.name.endswith(".minibatch.parquet"))
    tokens = pd.read_parquet(tables[-1])
    assert set(tokens["layer"]) == {0, 1} and len(tokens) == 2 * 2 * 2 * 64  # sequences x layers x heads x tokens
    assert {"update_norm", "surprise_past", "theta", "eta", "alpha", "loss_pre"} <= set(tokens.columns)
    assert (out / "report.md").read_text().startswith("# Plasticity report: `update_norm`")
