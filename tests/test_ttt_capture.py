"""Plasticity capture: every record equals the naive per-token reference (autograd gradient norms, losses at the
three weight states, per-mini-batch update norms); documented keys and shapes; nothing computed when off."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from src.errors import EngramError
from src.models import plasticity
from src.models.ttt import (
    MAMBA_BACKBONE,
    PLASTICITY_KEYS,
    PLASTICITY_MINIBATCH_KEYS,
    PLASTICITY_TOKEN_KEYS,
    TTTMLP,
    TTTCache,
    TTTConfig,
    TTTForCausalLM,
    TTTLinear,
)
from tests.ttt_naive import naive_ttt_layer, random_parameters_

BACKBONES = {"transformer": {}, "mamba": MAMBA_BACKBONE}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> TTTConfig:
    values = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
    return TTTConfig(**{**values, **overrides})


@pytest.mark.parametrize("layer_cls", [TTTLinear, TTTMLP])
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("length", [5, 21])
def test_captured_records_equal_the_naive_reference(layer_cls: type, backbone: str, length: int) -> None:
    kind = "linear" if layer_cls is TTTLinear else "mlp"
    config = tiny(mini_batch_size=8, ttt_layer_type=kind, **BACKBONES[backbone])
    layer = layer_cls(config, 0).double()
    random_parameters_(layer, seed=length)
    X = torch.randn(2, length, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    _, expected = naive_ttt_layer(layer, X)
    layer.capture = True
    layer(X)
    records = layer.plasticity
    # update_norm = ‖k‖·‖g‖ (TTT-Linear) vs. the norm of autograd's per-token gradient ∇_W ℓ_t at the mini-batch start
    for key in (*PLASTICITY_TOKEN_KEYS[:2], *PLASTICITY_TOKEN_KEYS[3:], *PLASTICITY_MINIBATCH_KEYS):
        actual, reference = records[key], expected[key]
        assert actual.shape == reference.shape, key
        assert ((actual - reference).abs().max() / reference.abs().max()).item() <= 1e-6, key
        assert not actual.requires_grad
    assert (records["update_norm"] > 0).all()


def test_records_have_the_documented_keys_shapes_and_positions() -> None:
    torch.manual_seed(0)
    model = TTTForCausalLM(tiny(mini_batch_size=8))
    ids = torch.randint(0, 61, (3, 21))
    with model.capture_plasticity() as records:
        model(ids)
    assert len(records) == 2
    plasticity.check_records(records)  # the schema every memory family shares
    assert set(PLASTICITY_TOKEN_KEYS) <= set(plasticity.TOKEN_METRICS)
    assert set(PLASTICITY_MINIBATCH_KEYS) <= set(plasticity.CHUNK_METRICS)
    for layer, rec in zip(model.model.ttt_layers(), records, strict=True):
        assert set(rec) == set(PLASTICITY_KEYS)
        for key in PLASTICITY_TOKEN_KEYS:
            assert rec[key].shape == (3, 2, 21), key
        assert rec["delta_w_norm"].shape == (3, 2, 3)  # ceil(21 / 8) mini-batches
        assert torch.equal(rec["position"], torch.arange(21))
        assert torch.equal(rec["tau"][0, 0, :8], torch.clamp(1 / torch.arange(1.0, 9) + layer.learnable_token_idx, 0))
        torch.testing.assert_close(rec["update_norm"], rec["k_norm"] * rec["g_norm"])
    # the context switched capture off again and the layers keep nothing
    assert all(not layer.capture and layer.plasticity is None for layer in model.model.ttt_layers())


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_capture_off_computes_and_keeps_nothing() -> None:
    torch.manual_seed(0)
    model = TTTForCausalLM(tiny(mini_batch_size=8))
    ids = torch.randint(0, 61, (2, 21))

    def ops() -> int:
        with OpCounter() as counter:
            model(ids)
        return counter.count

    never = ops()
    assert all(layer.plasticity is None for layer in model.model.ttt_layers())
    model.set_capture(True)
    captured = ops()
    assert all(layer.plasticity is not None for layer in model.model.ttt_layers())
    model.set_capture(False)
    assert all(layer.plasticity is None for layer in model.model.ttt_layers())
    assert ops() == never < captured
    with pytest.raises(EngramError, match="set_capture"):
        model.plasticity_records()


def test_capture_while_decoding_matches_the_full_forward() -> None:
    torch.manual_seed(1)
    model = TTTForCausalLM(tiny(mini_batch_size=4, **MAMBA_BACKBONE))
    random_parameters_(model, seed=1)
    ids = torch.randint(0, 61, (2, 11))
    model.set_capture(True)
    with torch.no_grad():
        model(ids)
        full = model.plasticity_records()
        cache = TTTCache()
        model(ids[:, :6], cache=cache)
        steps = [model.plasticity_records()]
        for t in range(6, 11):
            model(ids[:, t : t + 1], cache=cache)
            steps.append(model.plasticity_records())
    for layer, reference in enumerate(full):
        for key in PLASTICITY_TOKEN_KEYS:
            decoded = torch.cat([step[layer][key] for step in steps], dim=-1)
            torch.testing.assert_close(decoded, reference[key], rtol=1e-5, atol=1e-6, msg=key)
        assert torch.equal(torch.cat([step[layer]["position"] for step in steps]), torch.arange(11))
        # mini-batch 1 (positions 4..7) is completed by the decoding step at position 7
        torch.testing.assert_close(steps[2][layer]["delta_w_norm"][..., 0], reference["delta_w_norm"][..., 1])
