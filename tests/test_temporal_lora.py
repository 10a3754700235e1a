"""Temporal LoRA model: one-pass mixing against peft's own per-adapter forward, freezing, router, calibration."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import GPT2Config, GPT2LMHeadModel

from data_modules.domains import DomainTextDataModule
from src.analysis.temporal_lora import (
    fatigue_analysis,
    fatigue_inputs,
    hysteresis_analysis,
    hysteresis_inputs,
    route_traces,
)
from src.errors import EngramError
from src.models.temporal_lora import (
    TemporalLoRA,
    TemporalLoRAConfig,
    TimeMixer,
    balanced_mean_weights,
    balanced_offsets,
    routing_stats,
    stacked_lora_delta,
)

ADAPTERS = ("alpha", "beta", "gamma")


def tiny(**overrides) -> TemporalLoRA:
    torch.manual_seed(0)
    config = TemporalLoRAConfig.from_name(
        "tiny", n_embd=32, n_positions=64, vocab_size=50, lora_r=4, router_hidden=16, adapters=ADAPTERS, **overrides
    )
    model = TemporalLoRA(config).eval()
    with torch.no_grad():  # peft starts B at 0 (adapters add nothing); give every adapter a distinct, visible delta
        for layer in model.mixer.layers:
            for name in ADAPTERS:
                layer.lora_B[name].weight.normal_(0.0, 0.5)
    return model


def random_weights(batch: int, seq: int, n: int) -> torch.Tensor:
    return torch.distributions.Dirichlet(torch.ones(n)).sample((batch, seq))


def peft_single_adapter(layer: LoraLayer, x: torch.Tensor, name: str) -> torch.Tensor:
    """peft's own ``lora.Linear.forward`` with only ``name`` active (the hooks are bypassed on purpose)."""
    layer.set_adapter(name)
    try:
        return type(layer).forward(layer, x)
    finally:
        layer.set_adapter([])


@torch.no_grad()
def test_one_pass_mixing_equals_weighted_sum_of_each_adapter_per_layer() -> None:
    model = tiny()
    ids = torch.randint(0, 50, (2, 12))
    weights = random_weights(2, 12, len(ADAPTERS))
    captured: list[tuple[LoraLayer, torch.Tensor, torch.Tensor]] = []
    handles = [
        layer.register_forward_hook(lambda mod, args, out: captured.append((mod, args[0], out)))
        for layer in model.mixer.layers
    ]
    model(ids, weights=weights)  # the mixer's hook runs first, so `out` is the mixed output
    for h in handles:
        h.remove()
    assert len(captured) == len(model.mixer.layers) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    for layer, x, mixed in captured:
        separate = torch.stack([peft_single_adapter(layer, x, n) for n in ADAPTERS], dim=-1)  # (B, T, out, E)
        expected = (separate * weights[:, :, None, :]).sum(-1)
        assert (mixed - expected).abs().max().item() <= 1e-5
        # and the adapters really do something: the mix is far from any single adapter
        assert (mixed - separate[..., 0]).abs().max().item() > 1e-2


@torch.no_grad()
def test_stacked_delta_with_unequal_ranks_and_scales() -> None:
    """Adapters loaded with different r / lora_alpha (the generic path of the stacked gate)."""
    torch.manual_seed(1)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, bos_token_id=0, eos_token_id=0))
    peft_model = get_peft_model(gpt2, LoraConfig(r=2, lora_alpha=3, target_modules=["c_fc"], fan_in_fan_out=True), "p")
    peft_model.add_adapter("q", LoraConfig(r=5, lora_alpha=20, target_modules=["c_fc"], fan_in_fan_out=True))
    peft_model.base_model.set_adapter([])
    layer = gpt2.transformer.h[0].mlp.c_fc
    for name in ("p", "q"):
        layer.lora_B[name].weight.normal_()
    x, w = torch.randn(2, 6, 16), random_weights(2, 6, 2)
    mixed = layer.base_layer(x) + stacked_lora_delta(layer, x, w, ["p", "q"])
    expected = w[..., :1] * peft_single_adapter(layer, x, "p") + w[..., 1:] * peft_single_adapter(layer, x, "q")
    assert layer.scaling == {"p": 1.5, "q": 4.0}
    assert (mixed - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_whole_model_mixing_equals_layerwise_explicit_sum() -> None:
    """End to end: the one-pass model equals a model in which every LoRA layer computes each adapter's full output
    separately (peft's forward, E calls) and sums them with the token's weights."""
    model = tiny()
    ids = torch.randint(0, 50, (3, 10))
    weights = random_weights(3, 10, len(ADAPTERS))
    fast = model(ids, weights=weights).logits

    def explicit(layer: LoraLayer, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([peft_single_adapter(layer, args[0], n) for n in ADAPTERS], dim=-1)
        return (outs * weights[:, :, None, :]).sum(-1)

    handles = [layer.register_forward_hook(explicit) for layer in model.mixer.layers]
    slow = model(ids).logits  # no mixer weights: base output, then `explicit` replaces it
    for h in handles:
        h.remove()
    assert (fast - slow).abs().max().item() <= 1e-5
    assert (fast - model(ids).logits).abs().max().item() > 1e-2  # the adapters change the logits


@torch.no_grad()
def test_one_hot_weights_equal_peft_active_adapter() -> None:
    model = tiny()
    ids = torch.randint(0, 50, (2, 9))
    for i, name in enumerate(ADAPTERS):
        ours = model(ids, weights=model.one_hot(torch.full((2,), i), 9)).logits
        model.peft.base_model.set_adapter(name)  # peft's standard single-adapter path, mixer off
        try:
            theirs = model.gpt2(input_ids=ids).logits
        finally:
            model.peft.base_model.set_adapter([])
        assert (ours - theirs).abs().max().item() <= 1e-5
    # without weights the model is the bare backbone: equal to peft with adapters disabled
    with model.peft.disable_adapter():
        bare = model.gpt2(input_ids=ids).logits
    assert torch.equal(model(ids).logits, bare)


def _grads(model: TemporalLoRA) -> dict[str, bool]:
    """Which parameter groups received a gradient."""
    got = {"backbone": False, "alpha": False, "beta": False, "gamma": False, "router": False}
    for name, p in model.named_parameters():
        if p.grad is None or p.grad.abs().sum() == 0:
            continue
        if name.startswith("router."):
            got["router"] = True
        elif ".lora_" in name:
            got[name.split(".lora_")[1].split(".")[1]] = True
        else:
            got["backbone"] = True
    return got


def test_backbone_is_frozen_outside_pretraining() -> None:
    model = tiny()
    ids = torch.randint(0, 50, (2, 8))
    base_params = [p for n, p in model.named_parameters() if ".lora_" not in n and not n.startswith("router.")]
    assert base_params and all(not p.requires_grad for p in base_params)  # the default stage is "adapters"

    model.set_trainable("router")  # LM loss through the routed mix: only the router learns
    model.routed(ids, labels=ids).lm.loss.backward()
    assert _grads(model) == {"backbone": False, "alpha": False, "beta": False, "gamma": False, "router": True}
    assert all(p.grad is None for p in base_params)

    model.zero_grad(set_to_none=True)
    model.set_trainable("adapters", ["beta"])  # one-hot adapter training of one domain
    model(ids, labels=ids, weights=model.one_hot(torch.tensor([1, 1]), 8)).loss.backward()
    assert _grads(model) == {"backbone": False, "alpha": False, "beta": True, "gamma": False, "router": False}

    model.zero_grad(set_to_none=True)
    model.set_trainable("backbone")  # stage 1: the bare backbone learns, nothing else
    model(ids, labels=ids).loss.backward()
    assert _grads(model) == {"backbone": True, "alpha": False, "beta": False, "gamma": False, "router": False}


@torch.no_grad()
def test_router_weights_are_causal_distributions() -> None:
    model = tiny(router_window=4)
    model.router.time_mix.weight.normal_()  # pool over the last 4 tokens for real
    ids = torch.randint(0, 50, (4, 16))
    out = model.route(ids)
    assert out.weights.shape == (4, 16, len(ADAPTERS))
    assert torch.allclose(out.weights.sum(-1), torch.ones(4, 16), atol=1e-6)
    assert (out.weights >= 0).all()
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 50  # change the future only
    again = model.route(changed).weights
    assert torch.allclose(out.weights[:, :10], again[:, :10], atol=1e-6)
    assert not torch.allclose(out.weights[:, 10:], again[:, 10:], atol=1e-6)
    stats = routing_stats(out.weights)
    assert abs(sum(stats[f"mean_weight/{i}"] for i in range(3)) - 1.0) < 1e-6
    assert 0.0 <= stats["entropy"] <= torch.log(torch.tensor(3.0)).item() + 1e-6


@torch.no_grad()
def test_inline_routing_is_one_pass_and_matches_base_pass() -> None:
    model = tiny(routing="inline", router_layer=1)
    assert {id(layer) for layer in model.mixer.layers} == {
        id(m) for m in model.gpt2.transformer.h[1].modules() if isinstance(m, LoraLayer)
    }  # adapters only in blocks after the read point
    ids = torch.randint(0, 50, (2, 11))
    calls = []
    model.gpt2.transformer.h[0].register_forward_hook(lambda *a: calls.append(1))
    one_pass = model.routed(ids, labels=ids)
    assert len(calls) == 1
    two_pass_weights = model.route(ids).weights
    assert torch.allclose(one_pass.router.weights, two_pass_weights, atol=1e-6)
    two_pass = model(ids, labels=ids, weights=two_pass_weights)
    assert (one_pass.lm.logits - two_pass.logits).abs().max().item() <= 1e-5
    assert model.mixer.weights is None  # reset after the forward


def test_calibration_offsets_match_closed_form_for_constant_scores() -> None:
    """A router that gives every token the same scores z favours argmax z everywhere; the balanced optimum is
    c = z − mean(z), which makes the weights uniform."""
    z = torch.tensor([2.0, -0.5, 0.3])
    raw = z.expand(600, 3)
    domains = torch.arange(600) % 3
    offsets = balanced_offsets(raw, domains)
    assert torch.allclose(offsets, z - z.mean(), atol=1e-6)


def test_calibration_removes_first_adapter_bias() -> None:
    torch.manual_seed(0)
    d, per_domain = 16, 400
    centers = torch.randn(2, d)
    hidden = torch.cat([centers[k] + 3.0 * torch.randn(per_domain, d) for k in range(2)])
    domains = torch.arange(2).repeat_interleave(per_domain)
    router = TimeMixer(d, 2, hidden=32)
    optimizer = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(100):  # a router that separates the two (overlapping) domains ...
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(router(hidden[:, None]).scores[:, 0], domains).backward()
        optimizer.step()
    with torch.no_grad():  # ... and then leans toward adapter 0
        router.net[2].bias.add_(torch.tensor([3.0, 0.0]))
    net_before = [p.clone() for p in router.net.parameters()]

    def bias_and_accuracy() -> tuple[float, float]:
        with torch.no_grad():
            w = router(hidden[:, None]).weights[:, 0]
        acc = torch.stack([(w[domains == k].argmax(-1) == k).float().mean() for k in range(2)]).mean()
        return balanced_mean_weights(w, domains)[0].item() - 0.5, acc.item()

    bias_before, acc_before = bias_and_accuracy()
    report = router.calibrate(hidden[:, None], domains[:, None])  # every token its own one-token sequence
    bias_after, acc_after = bias_and_accuracy()
    assert bias_before > 0.1
    assert abs(bias_after) < 1e-5
    assert acc_after > acc_before
    assert report["balanced_mean_weight_after"][0] == pytest.approx(0.5, abs=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(net_before, router.net.parameters(), strict=True))


def test_model_calibration_and_checkpoint_round_trip() -> None:
    model = tiny()
    with torch.no_grad():
        model.router.net[2].bias.copy_(torch.tensor([4.0, 0.0, 0.0]))
    ids = torch.randint(0, 50, (6, 10))
    domains = torch.arange(3).repeat(2)
    report = model.calibrate(ids, domains)
    assert report["balanced_mean_weight_before"][0] > 0.6
    assert report["balanced_mean_weight_after"] == pytest.approx([1 / 3] * 3, abs=1e-4)
    assert model.router.offset.abs().sum() > 0

    clone = TemporalLoRA(model.config).eval()
    clone.load_state_dict(model.state_dict())  # backbone, adapters, router and offsets travel together
    with torch.no_grad():
        a, b = model.routed(ids), clone.routed(ids)
    assert torch.equal(a.router.weights, b.router.weights)
    assert torch.equal(a.lm.logits, b.lm.logits)


def test_pretrained_path_and_user_errors(tmp_path) -> None:
    source = tiny().gpt2
    fresh = GPT2LMHeadModel(source.config)
    fresh.save_pretrained(tmp_path / "gpt2")
    model = TemporalLoRA(TemporalLoRAConfig.from_name("tiny", pretrained_path=str(tmp_path / "gpt2")))
    wte = model.gpt2.transformer.wte.weight
    assert wte.shape == (50, 32) and torch.equal(wte, fresh.transformer.wte.weight)

    with pytest.raises(EngramError, match="pretrained_path"):
        TemporalLoRA(TemporalLoRAConfig.from_name("tiny", pretrained_path=str(tmp_path / "missing")))
    with pytest.raises(EngramError, match="router_layer"):
        TemporalLoRA(TemporalLoRAConfig.from_name("tiny", router_layer=5))
    with pytest.raises(EngramError, match="inline"):
        TemporalLoRA(TemporalLoRAConfig.from_name("tiny", routing="inline", router_layer=-1))
    with pytest.raises(EngramError, match="distinct"):
        TemporalLoRA(TemporalLoRAConfig.from_name("tiny", adapters=("a", "a")))
    with pytest.raises(EngramError, match="unknown"):
        TemporalLoRAConfig.from_name("huge")
    overrides = "model.init_args.config_overrides"
    with pytest.raises(EngramError, match=rf"^{overrides}\.lora_r=0 must be >= 1\.$"):
        TemporalLoRAConfig.from_name("tiny", lora_r=0)
    with pytest.raises(EngramError, match=rf"^{overrides}\.lora_dropout=1\.5 must be in \[0, 1\)\.$"):
        TemporalLoRAConfig.from_name("tiny", lora_dropout=1.5)
    with pytest.raises(EngramError, match=rf"^{overrides}\.temperature=0 must be > 0\.$"):
        TemporalLoRAConfig.from_name("tiny", temperature=0)
    with pytest.raises(EngramError, match=rf"^{overrides}\.routing='both' must be one of 'base_pass', 'inline'\.$"):
        TemporalLoRAConfig.from_name("tiny", routing="both")
    with pytest.raises(EngramError, match=rf"^{overrides}: n_embd=30 is not divisible by n_head=4;"):
        TemporalLoRAConfig.from_name("tiny", n_embd=30, n_head=4)
    with pytest.raises(EngramError, match=rf"^{overrides} has unknown key\(s\) \['lora_rank'\]; valid keys: adapters,"):
        TemporalLoRAConfig.from_name("tiny", lora_rank=4)
    with pytest.raises(EngramError, match=rf"^{overrides}\.target_modules=\['c_attn', 'q_proj'\]: no GPT-2 module"):
        TemporalLoRA(TemporalLoRAConfig.from_name("tiny", target_modules=("c_attn", "q_proj")))
    with pytest.raises(EngramError, match="adapters on the last axis"):
        tiny()(torch.zeros(1, 4, dtype=torch.long), weights=torch.ones(1, 4, 2) / 2)


def test_four_stages_end_to_end_on_cpu(tmp_path) -> None:
    """Pretrain → adapters → router + calibration → hysteresis → fatigue, with plain loops over the public API
    (the order a LightningModule drives it in), on two generated domains with disjoint alphabets."""
    rng = random.Random(0)
    specs = []
    for name, letters in (("low", "abcdefghijklm"), ("high", "nopqrstuvwxyz")):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(12):
            words = ("".join(rng.choices(letters, k=rng.randint(2, 7))) for _ in range(120))
            (folder / f"{i}.txt").write_text(" ".join(words))
        specs.append({"name": name, "path": str(folder)})
    dm = DomainTextDataModule(specs, seq_len=64, batch_size=8, val_fraction=0.2, test_fraction=0.2, max_chars=None)
    dm.setup()
    torch.manual_seed(0)
    model = TemporalLoRA(
        TemporalLoRAConfig.from_name("tiny", n_embd=32, n_positions=320, router_hidden=16, adapters=("low", "high"))
    )

    def train(stage: str, steps: int, loss_fn) -> tuple[float, float]:
        model.train()
        model.set_trainable(stage)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        losses = []
        batches = (b for _ in range(steps) for b in dm.train_dataloader())  # epochs until `steps` batches
        for _, batch in zip(range(steps), batches, strict=False):
            loss = loss_fn(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return sum(losses[:3]) / 3, sum(losses[-3:]) / 3

    first, last = train("backbone", 25, lambda b: model(b["input_ids"], labels=b["labels"]).loss)
    assert last < first
    first, last = train(
        "adapters", 15, lambda b: model(b["input_ids"], labels=b["labels"], weights=model.one_hot(b["domain"], 64)).loss
    )
    assert last < first

    def router_loss(b: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = model.route(b["input_ids"]).scores
        return torch.nn.functional.cross_entropy(scores.flatten(0, 1), b["domain"].repeat_interleave(64))

    train("router", 25, router_loss)
    model.eval()
    val = dm.collate([dm.datasets["val"][i] for i in range(len(dm.datasets["val"]))])
    report = model.calibrate(val["input_ids"], val["domain"])
    assert report["balanced_mean_weight_after"] == pytest.approx([0.5, 0.5], abs=1e-4)
    test = dm.collate([dm.datasets["test"][i] for i in range(len(dm.datasets["test"]))])
    with torch.no_grad():
        correct = model.route(test["input_ids"]).weights.argmax(-1) == test["domain"][:, None]
    assert correct[:, 8:].float().mean() > 0.9  # disjoint alphabets: easy once a few characters are in

    streams = dm.streams("test")
    hysteresis = hysteresis_analysis(
        route_traces(hysteresis_inputs(streams, 0, 1, segment_len=48, n_sequences=3), model.route), tmp_path / "out"
    )
    assert hysteresis["summary"]["ABA"]["n"] == 3 and (tmp_path / "out" / "hysteresis.png").exists()
    fatigue = fatigue_analysis(
        route_traces(fatigue_inputs(streams, 0, 1, [16, 48], n_per_length=2, lead_len=32), model.route),
        tmp_path / "out",
    )
    assert set(fatigue["by_block_len"]) == {"16", "48"} and (tmp_path / "out" / "fatigue.json").exists()
