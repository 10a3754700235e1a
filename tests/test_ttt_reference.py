"""TTT port vs. independent oracles: a naive per-token loop (autograd inner gradient), finite differences, the full
forward for cached decoding, eager mode for torch.compile, float32 for bf16 autocast, and closed-form sizes."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from src.errors import EngramError
from src.models.ttt import MAMBA_BACKBONE, PRESETS, TTTMLP, TTTCache, TTTConfig, TTTForCausalLM, TTTLinear
from src.models.ttt.model import _linear_step, chunk_of, scan_loop
from tests.ttt_naive import naive_ttt_layer, random_parameters_

BACKBONES = {"transformer": {}, "mamba": MAMBA_BACKBONE}
LAYERS = {"linear": TTTLinear, "mlp": TTTMLP}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: intra-op threads only add synchronisation cost (and contend on shared CI cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> TTTConfig:
    values = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
    return TTTConfig(**{**values, **overrides})


def random_model(config: TTTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> TTTForCausalLM:
    torch.manual_seed(seed)
    model = TTTForCausalLM(config).to(dtype)
    random_parameters_(model, seed)
    return model.eval()


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mini_batch_size", [16, 8, 4])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 37])
def test_ttt_linear_dual_form_equals_naive_per_token_loop(backbone: str, mini_batch_size: int, length: int) -> None:
    config = tiny(mini_batch_size=mini_batch_size, **BACKBONES[backbone])
    layer = TTTLinear(config, 0).double()
    random_parameters_(layer, seed=mini_batch_size + length)
    X = torch.randn(2, length, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    expected, _ = naive_ttt_layer(layer, X)
    with torch.no_grad():
        actual = layer(X)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize(("mini_batch_size", "length"), [(4, 17), (8, 37), (16, 15)])
def test_ttt_mlp_dual_form_equals_naive_per_token_loop(backbone: str, mini_batch_size: int, length: int) -> None:
    config = tiny(mini_batch_size=mini_batch_size, ttt_layer_type="mlp", **BACKBONES[backbone])
    layer = TTTMLP(config, 0).double()
    random_parameters_(layer, seed=3)
    X = torch.randn(2, length, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected, _ = naive_ttt_layer(layer, X)
    with torch.no_grad():
        actual = layer(X)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradients_through_the_inner_loop_match_finite_differences(kind: str, backbone: str) -> None:
    # every parameter and the input, through the scan, the dual-form readout and a partial last mini-batch
    config = TTTConfig(
        vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        mini_batch_size=4, ttt_layer_type=kind, **BACKBONES[backbone],
    )  # fmt: skip
    layer = LAYERS[kind](config, 0).double()
    random_parameters_(layer, seed=5, scale=0.3)
    names = [n for n, _ in layer.named_parameters()]
    X = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 6, 8, dtype=torch.float64)

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x,))
        return (out * weights).sum()

    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (X, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_prefill_then_one_token_decoding_equals_full_forward(kind: str, backbone: str) -> None:
    ids = torch.randint(0, 61, (2, 37), generator=torch.Generator().manual_seed(0))
    for mini_batch_size in (16, 8, 4):
        model = random_model(tiny(mini_batch_size=mini_batch_size, ttt_layer_type=kind, **BACKBONES[backbone]))
        with torch.no_grad():
            full = model(ids).logits
            for prefill in (1, 16, 21):
                cache = TTTCache()
                steps = [model(ids[:, :prefill], cache=cache).logits]
                steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(prefill, ids.shape[1])]
                assert cache.seqlen_offset == ids.shape[1]
                torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_chunks_of_any_length_continue_the_sequence_exactly(backbone: str) -> None:
    model = random_model(tiny(mini_batch_size=8, **BACKBONES[backbone]))
    ids = torch.randint(0, 61, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache, chunks, start = TTTCache(), [], 0
        for size in (3, 7, 1, 12, 14):  # chunks that start and end inside mini-batches
            chunks.append(model(ids[:, start : start + size], cache=cache).logits)
            start += size
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


def test_generate_decodes_from_the_cache_and_equals_greedy_full_forwards() -> None:
    model = random_model(tiny(mini_batch_size=4, **MAMBA_BACKBONE), seed=2)
    prompt = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(2))
    generated = model.generate(prompt, max_new_tokens=9)
    expected = prompt
    with torch.no_grad():
        for _ in range(9):  # no cache: every step re-reads the whole sequence
            expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)
    sampled = model.generate(prompt, 5, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :6], prompt)


def test_a_cache_without_state_for_its_offset_is_an_error() -> None:
    model = random_model(tiny())
    with pytest.raises(EngramError, match="fresh TTTCache"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=TTTCache(seqlen_offset=5))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_torch_compile_fullgraph_matches_eager(backbone: str) -> None:
    torch._dynamo.reset()
    model = random_model(tiny(num_hidden_layers=1, mini_batch_size=8, **BACKBONES[backbone]))
    ids = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(3))
    eager = model(ids, labels=ids)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # no graph break anywhere
    out = compiled(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4, atol=1e-6)


class DtypeLog(TorchDispatchMode):
    """Records (op name, dtype of its second argument) for every op the forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if len(args) > 1 and isinstance(args[1], torch.Tensor):
            self.log.append((func.overloadpacket.__name__, args[1].dtype))
        return func(*args, **(kwargs or {}))


def test_inner_state_and_layernorm_backward_stay_float32_under_bf16_autocast() -> None:
    model = random_model(tiny(mini_batch_size=8, **MAMBA_BACKBONE))
    ids = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(4))
    reference = model(ids, labels=ids)
    cache = TTTCache()
    with torch.autocast("cpu", dtype=torch.bfloat16), DtypeLog() as log:
        out = model(ids, labels=ids, cache=cache)
    # the scan's matmuls (baddbmm) and the closed-form LayerNorm gradient run in float32 ...
    inner = [dtype for name, dtype in log.log if name in ("baddbmm", "native_layer_norm_backward")]
    assert len(inner) == 2 * 3 * 4 and set(inner) == {torch.float32}  # 2 layers x 3 mini-batches x 4 ops
    # ... while autocast does put the projections in bf16
    assert any(name in ("mm", "addmm") and dtype == torch.bfloat16 for name, dtype in log.log)
    for state in cache.ttt_states.values():
        assert all(t.dtype == torch.float32 for t in state.values())
    # only the projections and the MLP are bf16: the loss stays close to the float32 one, and gradients flow
    assert abs(out.loss.item() - reference.loss.item()) < 2e-2 * reference.loss.item()
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def count_parameters(config: TTTConfig) -> int:
    """Closed form from the official parameter table (notes §2.5), independent of the modules."""
    C, inter, V, H, K = (config.hidden_size, config.intermediate_size, config.vocab_size,
                         config.num_attention_heads, config.mini_batch_size)  # fmt: skip
    f, width = C // H, config.conv_kernel
    ttt = 4 * C * C + H * C + H + K + 2 * H * f + H * f * f + H * f + 2 * C
    if config.share_qk:
        ttt += -C * C + 2 * (C * width + C)
    if config.use_gate:
        ttt += C * C
    block = ttt + 3 * C * inter + 2 * C + (C * width + C + C if config.pre_conv else 0)
    return config.num_hidden_layers * block + V * C + C + (0 if config.tie_word_embeddings else V * C)


@pytest.mark.parametrize(
    ("name", "millions"), [("125m", (110.3, 110.4)), ("350m", (337.3, 337.7)), ("760m", (733.0, 733.6)),
                           ("1b", (1284.9, 1285.6))]
)  # fmt: skip
def test_presets_have_the_official_sizes(name: str, millions: tuple[float, float]) -> None:
    for backbone, expected in zip(BACKBONES.values(), millions, strict=True):
        config = TTTConfig.from_name(name, **backbone)
        assert config.vocab_size == 32000 and config.mini_batch_size == 16 and config.ttt_base_lr == 1.0
        with torch.device("meta"):
            model = TTTForCausalLM(config)
        n = sum(p.numel() for p in model.parameters())
        assert n == count_parameters(config)
        assert round(n / 1e6, 1) == expected
    assert TTTConfig.from_name(name, ttt_layer_type="mlp").ttt_base_lr == 0.1
    assert set(PRESETS) == {"125m", "350m", "760m", "1b"}


def test_config_mistakes_name_the_bad_value() -> None:
    with pytest.raises(EngramError, match="125M"):
        TTTConfig.from_name("125M")
    with pytest.raises(EngramError, match="divisible"):
        TTTConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(EngramError, match="ttt_layer_type"):
        TTTConfig(ttt_layer_type="conv")
    with pytest.raises(EngramError, match="mini_batch"):
        TTTConfig.from_dict({"mini_batch": 8})
    overrides = "model.init_args.config_overrides"
    with pytest.raises(EngramError, match=rf"^{overrides}\.mini_batch_size=0 must be >= 1\.$"):
        TTTConfig.from_name("125m", mini_batch_size=0)
    with pytest.raises(EngramError, match=rf"^{overrides}\.rms_norm_eps=0 must be > 0\.$"):
        TTTConfig.from_name("125m", rms_norm_eps=0)
    with pytest.raises(EngramError, match=rf"^{overrides}\.num_attention_heads='4' must be an integer\.$"):
        TTTConfig.from_name("125m", num_attention_heads="4")
    with pytest.raises(EngramError, match=rf"^{overrides}: hidden_size=64 is not divisible by num_attention_heads=5"):
        TTTConfig.from_name("125m", hidden_size=64, num_attention_heads=5)
    with pytest.raises(EngramError, match=rf"^{overrides} has unknown key\(s\) \['hiden_size'\]; valid keys: "):
        TTTConfig.from_name("125m", hiden_size=64)


@pytest.mark.parametrize("with_pending", [False, True])
def test_chunked_scan_equals_the_step_by_step_scan(with_pending: bool) -> None:
    # the grouping used by compile_inner_step + compile_chunk (here uncompiled, so the test isolates the chunking logic)
    gen = torch.Generator().manual_seed(9)
    BH, N, K, f = 3, 8, 4, 5

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(True)

    state, gamma2 = [rand(BH, f, f), rand(BH, 1, f)], rand(BH, 1, f)
    sequences = [rand(BH, N, K, f), rand(BH, N, K, f), rand(BH, N, K, f), rand(BH, N, 1, K)]
    pending = [rand(BH, f, f), rand(BH, 1, f)] if with_pending else None
    tau_last = torch.tensor(0.3, dtype=torch.float64)
    leaves = [*state, gamma2, *sequences, *(pending or [])]
    results = []
    for chunk_fn, chunk in ((None, 1), (chunk_of(_linear_step, 2), 3)):
        starts, final, outs = scan_loop(_linear_step, chunk_fn, chunk, state, sequences, gamma2, pending, tau_last)
        flat = [*starts, *final, *outs]
        weights = [torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(i)) for i, t in
                   enumerate(flat)]  # fmt: skip
        loss = sum((t * w).sum() for t, w in zip(flat, weights, strict=True))
        results.append((flat, torch.autograd.grad(loss, leaves)))
    (flat_a, grads_a), (flat_b, grads_b) = results
    assert [t.shape for t in flat_a] == [t.shape for t in flat_b] == [(BH, N, f, f), (BH, N, 1, f), (BH, f, f),
                                                                        (BH, 1, f), (BH, N, K, f)]  # fmt: skip
    for a, b in zip((*flat_a, *grads_a), (*flat_b, *grads_b), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
