"""EMMA model: shapes and telemetry, causality, padding, the trace recurrence, gradients and the training controls."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.errors import EngramError
from src.models.emma import TELEMETRY_KEYS, EmmaConfig, EmmaModel, hrr, needle_accuracy, needle_read_targets

VOCAB = 40


def tiny(**overrides) -> EmmaModel:
    torch.manual_seed(0)
    return EmmaModel(EmmaConfig.from_name("needle-tiny", vocab_size=VOCAB, **overrides))


def batch(bsz: int = 3, seq_len: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (bsz, seq_len), generator=g)
    answer = torch.full((bsz, 1), seq_len - 1)
    return ids, needle_read_targets(ids, answer, answer + 1)


def test_lm_forward_shapes_and_telemetry() -> None:
    model = tiny()
    ids, targets = batch()
    out = model(ids, read_targets=targets)
    assert out.logits.shape == (3, 24, VOCAB)
    assert out.reads.shape == (3, model.config.d_mem) and out.read_targets.tolist() == ids[:, -1].tolist()
    assert set(out.telemetry) == set(TELEMETRY_KEYS)
    assert all(v.dim() == 0 and torch.isfinite(v) and not v.requires_grad for v in out.telemetry.values())
    assert out.telemetry["deq_rel_residual_max"] < model.config.deq.tol
    assert -1 <= out.telemetry["read_cos_raw"] <= 1 and 0 <= out.telemetry["collision_frac"] <= 1
    # without targets there is nothing to score reads against
    assert "read_cos_raw" not in model(ids).telemetry


def test_classify_reads_at_last_real_token() -> None:
    model = EmmaModel(EmmaConfig.from_name("listops-lite", vocab_size=VOCAB, d_model=16, d_mem=32))
    ids, _ = batch(bsz=2, seq_len=12)
    labels = torch.tensor([3, 7])
    out = model(ids, read_targets=labels)
    assert out.logits.shape == (2, 10) and out.reads.shape == (2, 32)
    # right padding does not change the prediction: the read and the head use the last real token
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 12), torch.zeros(2, 5)], dim=1)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask).logits, model(ids).logits, atol=1e-5, rtol=0)
        # nor does left padding (ListOps): the read is at the last real token, not at mask.sum() - 1
        left = torch.cat([torch.zeros(2, 5, dtype=torch.long), ids], dim=1)
        torch.testing.assert_close(model(left, mask.flip(1)).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_logits_are_causal() -> None:
    """Changing token t may change logits at positions ≥ t only (encoder, trace and reads are all causal)."""
    model = tiny(deq={"tol": 1e-7, "max_iter": 200})
    model.eval()
    ids, _ = batch(bsz=1)
    changed = ids.clone()
    changed[0, 15] = (ids[0, 15] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], atol=1e-5, rtol=0)
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3


def test_left_padding_is_invisible() -> None:
    """Padding states are held at 0 and write nothing, exactly like the causal zero padding at the start."""
    model = tiny(deq={"tol": 1e-7, "max_iter": 200})
    model.eval()
    ids, _ = batch(bsz=2)
    padded = torch.cat([torch.zeros(2, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 4), torch.ones(2, 24)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask).logits[:, 4:], model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("decay", [1.0, 0.8])
@pytest.mark.parametrize("renorm", ["write", "none", "unit", "clip"])
def test_trace_recurrence_against_closed_form(renorm: str, decay: float) -> None:
    model = tiny(decay=decay, renorm=renorm)
    writes = torch.randn(2, 5, 16, dtype=torch.float64) * 0.3
    traces = model._accumulate(writes)
    expected, trace = [], torch.zeros(2, 16, dtype=torch.float64)
    for t in range(5):
        trace = decay * trace + writes[:, t]
        norm = trace.norm(dim=-1, keepdim=True)
        if renorm == "unit":
            trace = trace / norm
        elif renorm == "clip":
            trace = trace / norm.clamp_min(1.0)
        expected.append(trace)
    torch.testing.assert_close(traces, torch.stack(expected, dim=1))
    if renorm in ("write", "none"):  # a linear trace: M_t = Σ_s α^{t-s} w_s
        closed = sum(decay ** (4 - s) * writes[:, s] for s in range(5))
        torch.testing.assert_close(traces[:, -1], closed)


@pytest.mark.parametrize("renorm", ["write", "none"])
def test_write_renormalisation_gives_every_pair_unit_energy(renorm: str) -> None:
    """Gaussian keys bind into pairs of uneven norm; renorm="write" rescales each to norm β_t exactly."""
    model = tiny(renorm=renorm)
    keys, values = torch.randn(2, 8, 64) / 8, F.normalize(torch.randn(2, 8, 64), dim=-1)
    beta = torch.rand(2, 8)
    norms = model._writes(keys, values, beta).norm(dim=-1)
    if renorm == "write":
        torch.testing.assert_close(norms, beta)
    else:
        torch.testing.assert_close(norms, beta * hrr.bind(keys, values).norm(dim=-1))
        assert (norms / beta).std() > 0.05  # uneven without renormalisation


def test_single_write_is_read_back_exactly_with_unitary_keys() -> None:
    """One stored pair, unitary key, unit renormalisation: the read equals the stored value (cos > 0.999)."""
    key = hrr.make_unitary(torch.randn(1, 1, 64))
    value = F.normalize(torch.randn(1, 1, 64), dim=-1)
    trace = tiny()._accumulate(0.3 * hrr.bind(key, value))
    assert F.cosine_similarity(hrr.unbind(trace, key), value, dim=-1).item() > 0.999


@pytest.mark.parametrize("grad", ["phantom", "implicit"])
def test_every_parameter_gets_gradient(grad: str) -> None:
    model = tiny(deq={"grad": grad})
    ids, targets = batch()
    out = model(ids, read_targets=targets)
    loss = F.cross_entropy(out.logits.reshape(-1, VOCAB), targets.reshape(-1)) + model.infonce_loss(out)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_equilibrium_is_solved_in_float32_under_autocast() -> None:
    """Under bf16 autocast the solve still converges to the float32 tolerance and matches the float32 forward;
    only the output head runs in bf16."""
    model = tiny()
    model.eval()
    ids, targets = batch()
    with torch.no_grad():
        reference = model(ids, read_targets=targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids, read_targets=targets)
    assert mixed.telemetry["deq_rel_residual_max"] < model.config.deq.tol
    assert mixed.telemetry["deq_iterations"] == reference.telemetry["deq_iterations"]
    torch.testing.assert_close(mixed.reads, reference.reads)
    torch.testing.assert_close(mixed.logits.float(), reference.logits, atol=0.1, rtol=0.05)


def test_write_disabled_stops_gradient_to_write_path_only() -> None:
    ids, targets = batch()
    enabled, disabled = tiny(share_query_key=False), tiny(share_query_key=False)  # a shared head also reads
    for model, write in ((enabled, True), (disabled, False)):
        out = model(ids, read_targets=targets, write_enabled=write)
        model.infonce_loss(out).backward()
    with torch.no_grad():
        torch.testing.assert_close(
            enabled(ids, read_targets=targets).logits, disabled(ids, read_targets=targets, write_enabled=False).logits
        )
    assert disabled.key.parametrizations.weight.original.grad is None
    assert disabled.write_gate.weight.grad is None
    assert enabled.key.parametrizations.weight.original.grad.abs().sum() > 0
    assert disabled.query.parametrizations.weight.original.grad.abs().sum() > 0  # reads still learn


def test_oracle_mix_replaces_supervised_reads_only() -> None:
    model = tiny()
    model.eval()
    ids, targets = batch()
    with torch.no_grad():
        plain = model(ids, read_targets=targets).logits
        oracle = model(ids, read_targets=targets, oracle_mix=1.0).logits
        supervised = targets != -100
        torch.testing.assert_close(oracle[~supervised], plain[~supervised])
        assert (oracle[supervised] - plain[supervised]).abs().max() > 1e-3
        # Without the local head only memory logits remain; with the oracle read they peak at the true token,
        # since cos(p_y, p_y) = 1 beats every other prototype.
        model.head.weight.zero_()
        model.head.bias.zero_()
        memory_only = model(ids, read_targets=targets, oracle_mix=1.0).logits
    assert memory_only[supervised].argmax(dim=-1).tolist() == targets[supervised].tolist()


def test_key_collisions_match_random_baseline() -> None:
    g = torch.Generator().manual_seed(0)
    d = 1024
    keys = torch.randn(4, 128, d, generator=g)
    frac, excess = hrr.key_collisions(keys, torch.ones(4, 128))
    assert abs(frac - 0.0027) < 0.002 and abs(excess) < 0.002
    duplicated = keys[:, :1].expand(4, 128, d)
    frac, excess = hrr.key_collisions(duplicated, torch.ones(4, 128))
    assert frac == 1.0 and excess == pytest.approx(1 - math.sqrt(2 / (math.pi * d)), abs=1e-5)
    # weights select the pairs that count: only the first two keys are written, and they are identical
    mixed = keys.clone()
    mixed[:, 1] = mixed[:, 0]
    weights = torch.zeros(4, 128)
    weights[:, :2] = 1
    assert hrr.key_collisions(mixed, weights)[0] == 1.0


def test_needle_targets_and_accuracy() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]])
    start, end = torch.tensor([[3], [1]]), torch.tensor([[5], [2]])
    targets = needle_read_targets(ids, start, end)
    assert targets.tolist() == [[-100, -100, 8, 9, -100], [2, -100, -100, -100, -100]]
    logits = torch.full((2, 5, 10), -1.0)
    logits[0, 2, 8] = logits[0, 3, 9] = 1.0  # first query fully right
    logits[1, 0, 7] = 1.0  # second wrong
    assert needle_accuracy(logits, ids, start, end).item() == 0.5
    logits[0, 3, 9] = -2.0  # one wrong token makes the whole answer wrong
    assert needle_accuracy(logits, ids, start, end).item() == 0.0
    with pytest.raises(EngramError, match="answer_start"):
        needle_read_targets(ids, torch.tensor([[0], [1]]), torch.tensor([[1], [2]]))


def test_config_presets_and_errors() -> None:
    cfg = EmmaConfig.from_name("needle-small", vocab_size=300, deq={"grad": "implicit"})
    assert cfg.vocab_size == 300 and cfg.deq.grad == "implicit" and cfg.deq.solver == "anderson"
    with pytest.raises(EngramError, match="preset"):
        EmmaConfig.from_name("needle-9000")
    with pytest.raises(EngramError, match="d_modle"):
        EmmaConfig.from_name("needle-small", d_modle=3)
    with pytest.raises(EngramError, match="contraction"):
        EmmaConfig(contraction=1.0)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"readout_temperature": 0}, "readout_temperature=0 must be > 0."),
        ({"cleanup_temperature": -0.1}, "cleanup_temperature=-0.1 must be > 0."),
        ({"decay": 0.0}, "decay=0.0 must be in (0, 1]."),
        ({"d_mem": 1}, "d_mem=1 must be >= 2."),
        ({"key_window": 2.5}, "key_window=2.5 must be an integer."),
        ({"write_strength": "strong"}, "write_strength='strong' must be a number."),
        ({"unitary_keys": "yes"}, "unitary_keys='yes' must be true or false."),
        ({"renorm": "l2"}, "renorm='l2' must be one of 'write', 'unit', 'clip', 'none'."),
        ({"deq": {"max_iter": 0}}, "deq.max_iter=0 must be >= 1."),
        ({"deq": {"anderson_m": 1}}, "deq.anderson_m=1 must be >= 2."),
        ({"deq": {"solver": "broyden"}}, "deq.solver='broyden' must be one of 'fixed_point', 'anderson'."),
        ({"deq": {"maxiter": 5}}, "deq has unknown key(s) ['maxiter']; valid keys: anderson_m,"),
        ({"readout_temp": 1.0}, "has unknown key(s) ['readout_temp']; valid keys: cleanup,"),
    ],
)
def test_config_overrides_fail_at_once_naming_the_key(overrides, expected) -> None:
    """Values outside a field's domain fail when the config is built, not as a NaN after a training step."""
    with pytest.raises(EngramError) as err:
        EmmaConfig.from_name("needle-tiny", vocab_size=VOCAB, **overrides)  # what EmmaLM does with config_overrides
    message = str(err.value)
    assert message.startswith("model.init_args.config_overrides") and expected in message and "\n" not in message
