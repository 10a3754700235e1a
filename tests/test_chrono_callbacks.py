"""Chrono-MemBench callbacks: Weight-Δ against a hand computation, the Cap-Gauge alert (telemetry and a webhook on a
local HTTP server), the Mem-Absorption rate, gap and spike detector, and every callback's state across a resume."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from callbacks.cap_gauge import CapGauge, post_webhook
from callbacks.mem_absorption import MemAbsorption
from callbacks.token_checkpoints import TOKEN_DIR, token_checkpoints
from callbacks.weight_delta import WeightDelta, layer_index, parameter_group
from data_modules.canaries import CanaryMixDataset
from data_modules.embedded import EmbeddedDataModule
from src.analysis.capacity import SpikeDetector
from src.cli import main
from src.errors import EngramError
from src.frozen import frozen_entries
from src.lightning_modules import CausalLM
from src.telemetry import TelemetryLogger, read_events
from tests.chrono_tiny import fit
from tests.conftest import CONFIGS


def _events(run_dir: Path, prefix: str) -> list[dict]:
    return [e for e in read_events(run_dir / "telemetry.jsonl") if e["metric"].startswith(prefix)]


# --- Weight-Δ -----------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4, bias=False)
        self.mlp = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Toy(pl.LightningModule):
    """Two blocks behind an embedding, names as in real LMs; plain SGD so every step moves every weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(6, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.final_norm = nn.LayerNorm(4)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        h = self.embed(batch)
        for block in self.layers:
            h = block.norm(h + block.mlp(torch.tanh(block.attn(h))))
        return self.final_norm(h).pow(3).mean() + h.pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Snapshots(pl.Callback):
    """The oracle's input: every parameter before training and before and after every step."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}

    def _copy(self, module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.after[0] = self._copy(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        self.before[trainer.global_step + 1] = self._copy(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.after[trainer.global_step] = self._copy(pl_module)


def _hand_relative(now: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], names: list[str]) -> float:
    diff = sum(float(((now[n] - ref[n]) ** 2).sum()) for n in names)
    return math.sqrt(diff / sum(float((ref[n] ** 2).sum()) for n in names))


def test_weight_delta_matches_a_hand_computation(tmp_path: Path) -> None:
    snapshots = Snapshots()
    telemetry = TelemetryLogger(tmp_path)
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=6,
        accelerator="cpu",
        logger=[telemetry],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[snapshots, WeightDelta(every_n_steps=3)],
    )
    telemetry.bind(trainer)
    data = DataLoader(torch.randint(0, 6, (12, 5), generator=torch.Generator().manual_seed(1)), batch_size=2)
    trainer.fit(Toy(), data)

    groups = {
        (None, "embeddings"): ["embed.weight"],
        (0, "attention"): ["layers.0.attn.weight"],
        (1, "mlp"): ["layers.1.mlp.weight", "layers.1.mlp.bias"],
        (None, "mlp"): ["layers.0.mlp.weight", "layers.0.mlp.bias", "layers.1.mlp.weight", "layers.1.mlp.bias"],
        (None, "norms"): [f"layers.{i}.norm.{w}" for i in (0, 1) for w in ("weight", "bias")]
        + ["final_norm.weight", "final_norm.bias"],
    }
    groups[(None, "all")] = [n for n, p in Toy().named_parameters() if p.requires_grad]  # the frozen one excluded
    events = _events(tmp_path, "weight_delta/")
    assert {e["step"] for e in events} == {3, 6}
    for (layer, group), names in groups.items():
        for step, prev in ((3, 0), (6, 3)):
            got = {
                e["metric"].rsplit("/", 1)[1]: e["value"]
                for e in events
                if e["step"] == step and e.get("layer") == layer and e["metric"].startswith(f"weight_delta/{group}/")
            }
            now = snapshots.after[step]
            assert got["rel_prev"] == pytest.approx(_hand_relative(now, snapshots.after[prev], names), rel=1e-5)
            assert got["rel_init"] == pytest.approx(_hand_relative(now, snapshots.after[0], names), rel=1e-5)
            assert got["update_ratio"] == pytest.approx(_hand_relative(now, snapshots.before[step], names), rel=1e-5)
    assert [e["value"] for e in events if e["metric"] == "weight_delta/interval_steps"] == [3.0, 3.0]
    assert (tmp_path / "weight_delta_init.pt").is_file()


@pytest.mark.parametrize(
    ("name", "layer", "group"),
    [
        ("model.model.embed_tokens.weight", None, "embeddings"),
        ("model.model.layers.3.self_attn.q_proj.weight", 3, "attention"),
        ("model.model.layers.3.mlp.gate_proj.weight", 3, "mlp"),
        ("model.model.layers.12.post_attention_layernorm.weight", 12, "norms"),
        ("model.model.norm.weight", None, "norms"),
        ("model.lm_head.weight", None, "embeddings"),
        ("model.transformer.h.1.attn.c_proj.weight", 1, "attention"),
        ("model.transformer.h.1.mlp.c_proj.bias", 1, "mlp"),
        ("model.transformer.h.1.ln_2.weight", 1, "norms"),
        ("model.transformer.wpe.weight", None, "embeddings"),
        ("model.base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight", 0, "attention"),
    ],
)
def test_parameter_groups_of_real_architectures(name: str, layer: int | None, group: str) -> None:
    assert (layer_index(name), parameter_group(name)) == (layer, group)


# --- Cap-Gauge alert and webhook -----------------------------------------------------------------------------------
class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_alert_fires_once_on_crossing_into_telemetry_and_webhook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    probe = CapGauge(every_n_steps=2, alert_bpp=1e9, verbose=False)
    fit(tmp_path / "probe", [probe], max_steps=16)
    bpp = [m.bpp_seen for m in probe.history]
    assert [m.step for m in probe.history] == list(range(2, 17, 2)) and not any(m.alert for m in probe.history)
    assert bpp[3] > max(bpp[:3])  # memorization grows: a threshold between them is crossed at the 4th measurement
    threshold = (max(bpp[:3]) + bpp[3]) / 2

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.received.clear()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/secret"
        gauge = CapGauge(every_n_steps=2, alert_bpp=threshold, webhook_url=url, verbose=False)
        fit(tmp_path / "alert", [gauge], max_steps=16)
    finally:
        server.shutdown()
    assert [m.bpp_seen for m in gauge.history] == pytest.approx(bpp)  # same run, same numbers
    assert [m.alert for m in gauge.history] == [False, False, False, True, False, False, False, False]
    alerts = _events(tmp_path / "alert", "capgauge/alert")
    assert [(e["metric"], e["step"]) for e in alerts if e["metric"] == "capgauge/alert"] == [("capgauge/alert", 8)]
    assert [e["value"] for e in alerts if e["metric"] == "capgauge/alert"] == pytest.approx([bpp[3]])
    assert len(Hook.received) == 1
    content_type, payload = Hook.received[0]
    assert content_type == "application/json" and set(payload) == {"text"}
    assert "bits/parameter" in payload["text"] and "step 8" in payload["text"]

    # A webhook that cannot be reached is logged, and training goes on.
    dead = f"http://127.0.0.1:{server.server_address[1]}/gone"  # the server is shut down
    assert post_webhook(dead, "x", timeout=1.0) is False
    quiet = CapGauge(every_n_steps=2, alert_bpp=0.0, webhook_url=dead, webhook_timeout=1.0, verbose=False)
    trainer = fit(tmp_path / "dead", [quiet], max_steps=4)
    assert trainer.global_step == 4 and quiet.history[0].alert


def test_canary_mode_mixes_canaries_and_measures_them(tmp_path: Path) -> None:
    data = EmbeddedDataModule(seq_len=32, batch_size=4)
    torch.manual_seed(0)
    model = CausalLM(data.vocab_size, preset="llama-tiny", lr=3e-3, warmup_steps=1)
    gauge = CapGauge(
        every_n_steps=3,
        canary_count=8,
        canary_length=16,
        canary_vocab=50,
        canary_vocab_offset=97,
        canary_rate=0.1,
        max_eval_sequences=6,
        verbose=False,
    )
    fit(tmp_path, [gauge], max_steps=6, model=model, data=data)

    mixed = data.datasets["train"]
    assert isinstance(mixed, CanaryMixDataset) and mixed.n_slots == round(mixed.n_base * 0.1 / 0.9)
    seen = gauge.canaries.seen
    assert seen.min() >= 97 and seen.max() < 147 and not torch.equal(seen, gauge.canaries.unseen)
    for slot in (0, 9):
        item = mixed[mixed.n_base + slot]
        assert torch.equal(item["input_ids"][:16], seen[slot % 8]) and torch.equal(item["labels"][:16], seen[slot % 8])
        assert (item["labels"][16:] == -100).all() and (item["input_ids"][16:] == data.tokenizer.pad_id).all()
        assert int(item["doc_id"]) == int(item["position"]) == -1 - slot

    # The last measurement (step 6, the final weights) against a token-by-token oracle on the first 6 of 8 canaries.
    model.eval()
    for tokens, reported in (
        (seen, gauge.history[-1].bits_seen),
        (gauge.canaries.unseen, gauge.history[-1].bits_unseen),
    ):
        total = 0.0
        for row in tokens[:6]:
            with torch.no_grad():
                logits = model.model(input_ids=row[None]).logits[0]
            code = math.log2(50)
            for t in range(1, 16):
                code -= float(torch.log_softmax(logits[t - 1, 97:147], dim=-1)[row[t] - 97]) / math.log(2)
            total += max(0.0, 16 * math.log2(50) - code)
        assert reported == pytest.approx(total * 8 / 6, rel=1e-4, abs=1e-3)


# --- Mem-Absorption ------------------------------------------------------------------------------------------------
def test_spike_detector_on_a_synthetic_series() -> None:
    base = [10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 11.0, 9.0, 10.0, 10.5]
    series = [*base, 30.0, *base[:4]]
    results = SpikeDetector(window=5, z_threshold=3.0, min_history=3).scan(series)
    assert [z for z, _ in results[:3]] == [None, None, None]
    assert [i for i, (_, spike) in enumerate(results) if spike] == [10]
    window = series[5:10]
    assert results[10][0] == pytest.approx((30.0 - statistics.fmean(window)) / statistics.stdev(window))
    assert results[11][0] < 0  # right after the spike the window is inflated, not re-triggered

    flat = SpikeDetector(window=4, min_history=2).scan([1.0, 1.0, 1.0, 1.0, 2.0])
    assert flat[3] == (0.0, False) and flat[4] == (math.inf, True)

    restored = SpikeDetector(window=5, min_history=3)
    original = SpikeDetector(window=5, min_history=3)
    original.scan(base)
    restored.load_state_dict(original.state_dict())
    assert restored.update(30.0) == original.update(30.0)


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.train.append(float(outputs["loss"]))

    def on_validation_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        if not trainer.sanity_checking:
            self.val[trainer.global_step] = float(trainer.callback_metrics["val/loss"])


def test_absorption_rate_and_generalisation_gap(tmp_path: Path) -> None:
    losses, gauge, absorption = (
        Losses(),
        CapGauge(every_n_steps=2, verbose=False),
        MemAbsorption(window=3, min_history=2),
    )
    fit(tmp_path, [losses, gauge, absorption], max_steps=12, limit_val_batches=1, val_check_interval=4)
    expected = [
        (b.bits_diff - a.bits_diff) / ((b.tokens - a.tokens) / 1e6) for a, b in itertools.pairwise(gauge.history)
    ]
    rates = _events(tmp_path, "mem_absorption/rate")
    assert [e["step"] for e in rates] == [4, 6, 8, 10, 12]
    assert [e["value"] for e in rates] == pytest.approx(expected)
    assert [r["rate"] for r in absorption.rates] == pytest.approx(expected)
    assert len(_events(tmp_path, "mem_absorption/zscore")) == 3  # from the third rate on (min_history 2)

    gaps = _events(tmp_path, "mem_absorption/gen_gap")
    assert [e["step"] for e in gaps] == [4, 8, 12]
    for e, start in zip(gaps, (0, 4, 8), strict=True):
        oracle = losses.val[e["step"]] - statistics.fmean(losses.train[start : e["step"]])
        assert e["value"] == pytest.approx(oracle, abs=1e-5)  # float32 sums of ~2.8-nat losses


def test_mem_absorption_needs_a_cap_gauge(tmp_path: Path) -> None:
    with pytest.raises(EngramError, match="CapGauge"):
        fit(tmp_path, [MemAbsorption()], max_steps=1)


# --- resume --------------------------------------------------------------------------------------------------------
TINY = [
    "--data.init_args.num_sequences", "32", "--data.init_args.seq_len", "16", "--data.init_args.vocab", "16",
    "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0", "--data.init_args.val_sequences", "8",
    "--data.init_args.passes_per_epoch", "8",  # one epoch: a resume in a later epoch is not exact yet (EpochShuffleSampler)
    "--model.init_args.config_overrides",
    "{n_embd: 32, n_layer: 1, n_head: 2, n_positions: 16, resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}",
    "--model.init_args.warmup_steps", "2", "--model.init_args.lr", "0.01", "--model.init_args.min_lr_ratio", "1.0",
    "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
    "--checkpoint.every_n_train_steps", "100", "--trainer.enable_model_summary", "false",
]  # fmt: skip


def test_callback_state_survives_a_resume(run_root: Path, tmp_path: Path) -> None:
    callbacks = {
        "trainer": {
            "callbacks": [
                {"class_path": "callbacks.cap_gauge.CapGauge", "init_args": {"every_n_steps": 2, "alert_bpp": 0.002}},
                {"class_path": "callbacks.weight_delta.WeightDelta", "init_args": {"every_n_steps": 2}},
                {"class_path": "callbacks.mem_absorption.MemAbsorption", "init_args": {"window": 4, "min_history": 2}},
                {
                    "class_path": "callbacks.token_checkpoints.TokenCheckpoints",
                    "init_args": {"every_n_tokens": 256, "keep_last": 10, "freeze_at_tokens": [384]},
                },
            ]
        }
    }
    override = tmp_path / "chrono.yaml"
    override.write_text(yaml.safe_dump(callbacks))
    args = ["fit", "--config", str(CONFIGS / "capacity_synthetic.yaml"), "--config", str(override), *TINY]
    straight = main([*args, "--trainer.max_steps", "12", "--run.root", str(run_root), "--run.name", "straight"])
    # Stopped after a mid-training checkpoint (as a killed run would be), not an end-of-fit one.
    main([*args, "--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "6", "--run.root", str(run_root),
          "--run.name", "split"])  # fmt: skip
    resumed = main([*args, "--trainer.max_steps", "12", "--run.root", str(run_root), "--run.name", "split",
                    "--ckpt_path", "last"])  # fmt: skip
    assert straight is not None and resumed is not None and resumed.trainer.global_step == 12

    def callback(cli, kind):  # type: ignore[no-untyped-def]
        return next(cb for cb in cli.trainer.callbacks if isinstance(cb, kind))

    one, two = callback(straight, CapGauge), callback(resumed, CapGauge)
    assert [m.step for m in two.history] == [2, 4, 6, 8, 10, 12]  # measurements before the resume were kept
    assert [m.bits_seen for m in two.history] == pytest.approx([m.bits_seen for m in one.history], rel=1e-4)
    assert one.history[0].alert and two.alerted and not any(m.alert for m in two.history[1:])
    a_one, a_two = callback(straight, MemAbsorption), callback(resumed, MemAbsorption)
    assert [r["rate"] for r in a_two.rates] == pytest.approx([r["rate"] for r in a_one.rates], rel=1e-3)
    assert list(a_two.detector.history) == pytest.approx(list(a_one.detector.history), rel=1e-3)
    assert [g["gen_gap"] for g in a_two.gaps] == pytest.approx([g["gen_gap"] for g in a_one.gaps], rel=1e-4)

    split_dir, straight_dir = run_root / "split" / "v0", run_root / "straight" / "v0"
    for metric in ("weight_delta/all/rel_init", "weight_delta/all/rel_prev", "capgauge/alert"):
        want = [(e["step"], e["value"]) for e in _events(straight_dir, metric)]
        got = [(e["step"], e["value"]) for e in _events(split_dir, metric)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4)
    names = [p.name for p in token_checkpoints(split_dir / TOKEN_DIR)]
    assert names == [p.name for p in token_checkpoints(straight_dir / TOKEN_DIR)] and len(names) == 6
    # One alert freeze and one token freeze, each once, before the resume; none repeated after it.
    assert sorted(p.name for p in frozen_entries(split_dir)) == ["capacity-alert-step2", "tokens-384"]
