"""EMMA's plasticity hook: its record equals a naive per-token loop that rebuilds the trace M_t from the forward's keys,
values and write gates (every renormalisation mode, decay, padding, chunks that do not divide the length); nothing is
computed when capture is off; and PlasticityCallback runs on EmmaLM through the CLI, writing tables, plots and report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from callbacks.plasticity import PlasticityCallback
from src.cli import main
from src.errors import EngramError
from src.lightning_modules.emma import EmmaLM
from src.models import plasticity
from src.models.emma import PLASTICITY_KEYS, EmmaConfig, EmmaModel
from src.protocols import CapturesPlasticity
from src.telemetry import read_events
from tests.conftest import CONFIGS

VOCAB = 40


def tiny(**overrides) -> EmmaModel:
    torch.manual_seed(0)
    return EmmaModel(EmmaConfig.from_name("needle-tiny", vocab_size=VOCAB, **overrides))


def circular_conv(a: Tensor, b: Tensor) -> Tensor:
    """(a ⊛ b)_j = Σ_k a_k b_{(j−k) mod d}, summed out over an index matrix (no FFT)."""
    d = a.shape[-1]
    j, k = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    return (a[..., None, :] * b[..., (j - k) % d]).sum(-1)


def circular_corr(q: Tensor, m: Tensor) -> Tensor:
    """The read q† ⊛ m: (Σ_k q_k m_{(j+k) mod d})_j."""
    d = q.shape[-1]
    j, k = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    return (q[..., None, :] * m[..., (j + k) % d]).sum(-1)


def cos(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-8)


def naive_records(model: EmmaModel, ids: Tensor, mask: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run the model once with forward hooks on its key, query, value and write-gate heads, then rebuild the record
    token by token in float64 from those head outputs and the equations of ``model.py``. Returns (naive, captured)."""
    c = model.config
    heads: dict[str, list[Tensor]] = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: heads.setdefault(name, []).append(out)
        )
        for name in ("key", "value", "write_gate", *(() if c.share_query_key else ("query",)))
    ]
    model.set_capture(True)
    with torch.no_grad():
        out = model(ids, mask)
    (captured,) = model.plasticity_records()
    for hook in hooks:
        hook.remove()

    def unit_keys(x: Tensor) -> Tensor:  # |F(k)| = 1 at every frequency (eps 1e-6: padding keys are 0), or unit norm
        if not c.unitary_keys:
            return F.normalize(x, dim=-1)
        spectrum = torch.fft.fft(x, dim=-1)
        return torch.fft.ifft(spectrum / (spectrum.abs().square() + 1e-12).sqrt(), dim=-1).real

    keys = unit_keys(heads["key"][0].double())
    queries = keys if c.share_query_key else unit_keys(heads["query"][0].double())
    values = F.normalize(heads["value"][0].double(), dim=-1)  # [0]: the value head is then run on the prototypes
    gate = torch.sigmoid(heads["write_gate"][0].double()[..., 0])
    protos = out.prototypes.double()
    m = mask.double()
    bsz, seq_len, d = values.shape
    rec: dict[str, list[Tensor]] = {k: [] for k in ("update_norm", "write_strength", "write_cos", "read_cos")}
    trace = torch.zeros(bsz, d, dtype=torch.float64)
    traces = []
    for t in range(seq_len):
        beta = c.write_strength * gate[:, t] * m[:, t] * (m[:, t - 1] if t > 0 else torch.zeros(bsz))
        pair = circular_conv(keys[:, t - 1], values[:, t]) if t > 0 else torch.zeros(bsz, d, dtype=torch.float64)
        if c.renorm == "write":
            pair = pair / pair.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        write = beta[:, None] * pair
        trace = c.decay * trace + write
        if c.renorm == "unit":
            trace = trace / trace.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        elif c.renorm == "clip":
            trace = trace / trace.norm(dim=-1, keepdim=True).clamp_min(1.0)
        traces.append(trace)
        read = circular_corr(queries[:, t], trace)
        sims = torch.stack([cos(read, p.expand_as(read)) for p in protos], dim=-1)
        if c.cleanup == "hard":
            cleaned = protos[sims.argmax(dim=-1)]
        else:
            cleaned = torch.softmax(sims / c.cleanup_temperature, dim=-1) @ protos
        value_cos = torch.stack([cos(values[:, t], p.expand_as(values[:, t])) for p in protos], dim=-1)
        rec["update_norm"].append(write.norm(dim=-1))
        rec["write_strength"].append(beta)
        rec["write_cos"].append(value_cos.amax(dim=-1))
        rec["read_cos"].append(cos(read, cleaned))
    naive = {key: torch.stack(v, dim=-1)[:, None] for key, v in rec.items()}
    deltas, start = [], torch.zeros(bsz, d, dtype=torch.float64)
    for first in range(0, seq_len, c.plasticity_chunk):
        end = traces[min(first + c.plasticity_chunk, seq_len) - 1]
        deltas.append((end - start).norm(dim=-1))
        start = end
    naive["delta_w_norm"] = torch.stack(deltas, dim=-1)[:, None]
    return naive, captured


@pytest.mark.parametrize("decay", [1.0, 0.8])
@pytest.mark.parametrize("renorm", ["write", "none", "unit", "clip"])
def test_record_equals_the_naive_trace_loop(renorm: str, decay: float) -> None:
    # 23 tokens in blocks of 5: a last block of 3; two left-padded positions in row 1 write nothing
    model = tiny(renorm=renorm, decay=decay, plasticity_chunk=5, write_strength=0.7)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 23)
    mask[1, :2] = 0
    naive, captured = naive_records(model, ids, mask)
    plasticity.check_records([captured])
    assert set(captured) == set(PLASTICITY_KEYS) and torch.equal(captured["position"], torch.arange(23))
    assert captured["delta_w_norm"].shape == (2, 1, 5)
    for key, expected in naive.items():
        actual = captured[key].double()
        assert actual.shape == expected.shape, key
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6, msg=key)
    # padding and position 0 cannot write; under renorm="write" a write's norm is its β
    assert (captured["update_norm"][1, 0, :3] == 0).all() and (captured["write_strength"][:, 0, 0] == 0).all()
    if renorm == "write":
        torch.testing.assert_close(captured["update_norm"], captured["write_strength"])


def test_separate_query_head_and_hard_cleanup() -> None:
    model = tiny(share_query_key=False, unitary_keys=False, cleanup="hard", plasticity_chunk=16)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    naive, captured = naive_records(model, ids, torch.ones(2, 20))
    for key, expected in naive.items():
        torch.testing.assert_close(captured[key].double(), expected, rtol=1e-5, atol=2e-6, msg=key)


def test_classify_records_every_position() -> None:
    """ListOps reads only the last real token; the record reads every position, and at the last one it is the
    model's own read."""
    model = EmmaModel(EmmaConfig.from_name("listops-lite", vocab_size=VOCAB, d_model=16, d_mem=32))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), model.capture_plasticity() as records:
        out = model(ids, read_targets=torch.tensor([3, 7]))
    (rec,) = records
    plasticity.check_records(records)
    assert rec["read_cos"].shape == (2, 1, 12) and rec["delta_w_norm"].shape == (2, 1, 1)
    cleaned = torch.softmax(F.normalize(out.reads, dim=-1) @ out.prototypes.T / model.config.cleanup_temperature, -1)
    torch.testing.assert_close(rec["read_cos"][:, 0, -1], cos(out.reads, cleaned @ out.prototypes))
    assert model.plasticity is None and not model.capture  # the context switched capture off and dropped it


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("telemetry", [True, False])
def test_capture_off_computes_and_keeps_nothing(telemetry: bool) -> None:
    model = tiny()
    model.train()  # records come out of a training forward detached
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(6))

    def ops() -> int:
        with OpCounter() as counter:
            model(ids, telemetry=telemetry)
        return counter.count

    never = ops()
    assert model.plasticity is None
    model.set_capture(True)
    captured = ops()
    assert all(not v.requires_grad for v in model.plasticity_records()[0].values())
    model.set_capture(False)
    assert model.plasticity is None
    assert ops() == never < captured
    with pytest.raises(EngramError, match="set_capture"):
        model.plasticity_records()


def test_emma_lm_has_the_hook_and_delegates() -> None:
    module = EmmaLM(vocab_size=VOCAB, preset="needle-tiny")
    assert isinstance(module, CapturesPlasticity)
    module.set_capture(True)
    module.model(torch.randint(0, VOCAB, (1, 10)))
    (rec,) = module.plasticity_records()
    assert rec["update_norm"].shape == (1, 1, 10)
    module.set_capture(False)
    assert module.model.plasticity is None


def test_callback_refuses_a_module_without_the_hook() -> None:
    with pytest.raises(EngramError, match="CapturesPlasticity hook \\(TTTLM, TitansLM, EmmaLM\\); Module has none"):
        PlasticityCallback().setup(None, torch.nn.Module(), "fit")  # type: ignore[arg-type]


def test_plasticity_callback_runs_on_emma_through_the_cli(run_root: Path) -> None:
    main([
        "fit", "--config", str(CONFIGS / "emma_needle_256.yaml"),
        "--model.init_args.preset", "needle-tiny",
        "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4",
        "--data.init_args.train_size", "8", "--data.init_args.val_size", "4",
        "--trainer.max_steps", "2", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.callbacks+=callbacks.plasticity.PlasticityCallback",
        "--trainer.callbacks.every_n_steps=1", "--trainer.callbacks.max_sequences=2",
        "--trainer.callbacks.max_eval_batches=1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--run.root", str(run_root), "--run.name", "emma_plasticity",
    ])  # fmt: skip
    run_dir = run_root / "emma_plasticity" / "v0"
    for stage, captures in (("train", 2), ("val", 1)):
        out = run_dir / "plasticity" / stage
        tables = sorted(p for p in out.glob("step*.parquet") if not p.name.endswith(".minibatch.parquet"))
        assert len(tables) == captures, stage
        tokens = pd.read_parquet(tables[-1])
        assert set(tokens["layer"]) == {0} and set(tokens["head"]) == {0} and len(tokens) == 2 * 64
        assert {"update_norm", "write_strength", "write_cos", "read_cos"} <= set(tokens.columns)
        blocks = pd.read_parquet(out / tables[-1].name.replace(".parquet", ".minibatch.parquet"))
        assert len(blocks) == 2 * 4 and (blocks["delta_w_norm"] > 0).all()  # 64 tokens in blocks of 16
        for name in ("heatmap_update_norm.png", "buckets_update_norm.png", "heatmap_delta_w_norm.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (out / "report.md").read_text().startswith("# Plasticity report: `update_norm`")
        assert json.loads((out / "report.json").read_text())["layers"] == [0]
    # telemetry rows are named after the family, and the per-bucket means reach the loggers
    layered = {e["metric"] for e in read_events(run_dir / "telemetry.jsonl") if e.get("layer") == 0}
    assert {"emma/update_norm", "emma/write_strength", "emma/read_cos", "emma/delta_w_norm"} <= layered
    assert any(c.startswith("plasticity/train/update_norm/") for c in pd.read_csv(run_dir / "metrics.csv").columns)
