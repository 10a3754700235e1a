"""The port against golden outputs of the official ttt-lm-pytorch code (``tests/fixtures/ttt_golden``, see its
README): official state_dicts load strictly and give the same block outputs, logits, inner-loop quantities, cache
states and parameter gradients. Also: a ttt-lm-jax parameter tree converts to the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.errors import EngramError
from src.models.ttt import TTTCache, TTTConfig, TTTForCausalLM
from src.models.ttt.convert_jax import config_from_jax_params, convert_jax_params

FIXTURES = Path(__file__).parent / "fixtures" / "ttt_golden"
CASES = ["transformer_k16_l37", "mamba_k8_l21"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=CASES)
def golden(request) -> dict:
    return torch.load(FIXTURES / f"{request.param}.pt")


def official_model(golden: dict) -> TTTForCausalLM:
    model = TTTForCausalLM(TTTConfig.from_dict(golden["config"])).double()
    model.load_state_dict(golden["state_dict"], strict=True)
    return model


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_official_state_dict_loads_strictly_with_the_same_names_and_shapes(golden: dict) -> None:
    model = official_model(golden)
    ours = model.state_dict()
    assert set(ours) == set(golden["state_dict"])
    assert all(ours[name].shape == value.shape for name, value in golden["state_dict"].items())


def test_block_outputs_and_logits(golden: dict) -> None:
    model = official_model(golden)
    blocks: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, a, out: blocks.append(out)) for layer in model.model.layers]
    with torch.no_grad():
        out = model(golden["input_ids"], output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    for actual, expected in zip(blocks, golden["block_outputs"], strict=True):
        assert actual.dtype == torch.float64
        assert (actual - expected).abs().max().item() <= 1e-7
    # the official convention: hidden_states = block outputs then the final normed states, no embedding entry
    assert len(out.hidden_states) == len(blocks) + 1 and torch.equal(out.hidden_states[0], blocks[0])
    assert out.logits.dtype == torch.float32  # the official model returns float32 logits
    assert rel(out.logits, golden["logits"]) <= 1e-6


def test_inner_loop_quantities_and_captured_gradient_norms(golden: dict) -> None:
    model = official_model(golden)
    inputs: list[torch.Tensor] = []
    hooks = [
        layer.seq_modeling_block.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        for layer in model.model.layers
    ]
    with torch.no_grad(), model.capture_plasticity() as records:
        model(golden["input_ids"])
    for hook in hooks:
        hook.remove()
    for i, layer in enumerate(model.model.ttt_layers()):
        X = inputs[i]
        with torch.no_grad():  # the layer's own pieces, as its forward runs them
            inp = layer.inner_inputs(X, *layer.project(X, None), offset=0)
            state, pending = layer.initial_state(X.shape[0], torch.float64, None, 0)
            res = layer.scan(inp, state, pending)
        Z = layer.tokens(layer.inner_model(inp.XK, res.starts), inp)
        assert (Z - golden["inner_Z"][i]).abs().max().item() <= 1e-8
        assert (layer.tokens(inp.XV - inp.XK, inp) - golden["inner_target"][i]).abs().max().item() <= 1e-8
        official_g = golden["inner_grad_Z"][i]
        assert (layer.tokens(res.grads["W1"], inp) - official_g).abs().max().item() <= 1e-8
        assert (records[i]["g_norm"] - official_g.norm(dim=-1)).abs().max().item() <= 1e-8


def test_cache_states_after_prefill(golden: dict) -> None:
    model = official_model(golden)
    cache = TTTCache()
    with torch.no_grad():
        model(golden["input_ids"], cache=cache)
    assert cache.seqlen_offset == golden["input_ids"].shape[1]
    for key, per_layer in golden["cache_states"].items():
        for i, expected in enumerate(per_layer):
            actual = cache.ttt_states[i][key]
            assert actual.shape == expected.shape
            assert (actual - expected).abs().max().item() <= 1e-12, (key, i)


def test_parameter_gradients(golden: dict) -> None:
    model = official_model(golden)
    ids = golden["input_ids"]
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, golden["loss"], rtol=1e-6, atol=0)
    out.loss.backward()
    grads = dict(model.named_parameters())
    assert set(grads) == set(golden["param_grads"])  # tied lm_head appears once, as in the official model
    for name, expected in golden["param_grads"].items():
        error = (grads[name].grad - expected).norm() / expected.norm()
        assert error.item() <= 1e-6, name


def jax_tree(golden: dict) -> dict:
    """The parameter tree ttt-lm-jax would hold for this model (names from ttt/models/model.py and ttt_layer.py):
    Dense kernels [in, out], Conv kernels [width, 1, C], learnable_ttt_lr/kernel [H, C, 1], nested dicts."""
    sd = {k: v.float().numpy() for k, v in golden["state_dict"].items()}
    config = golden["config"]
    blocks = {}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s = p + "seq_modeling_block."
        seq = {
            "learnable_token_idx": sd[s + "learnable_token_idx"],
            "learnable_ttt_lr": {
                "kernel": sd[s + "learnable_ttt_lr_weight"].transpose(0, 2, 1),
                "bias": sd[s + "learnable_ttt_lr_bias"],
            },
            "ttt_norm": {"scale": sd[s + "ttt_norm_weight"], "bias": sd[s + "ttt_norm_bias"]},
            "post_norm": {"scale": sd[s + "post_norm.weight"], "bias": sd[s + "post_norm.bias"]},
            "ttt_dense_0": sd[s + "W1"],
            "ttt_bias_0": sd[s + "b1"],
        }
        for name in ("q", "k", "v", "o", "g"):
            if f"{s}{name}_proj.weight" in sd:
                seq[f"w{name}"] = {"kernel": sd[f"{s}{name}_proj.weight"].T}
        for name in ("conv_q", "conv_k"):
            if f"{s}{name}.weight" in sd:
                seq[name] = {"kernel": sd[f"{s}{name}.weight"].transpose(2, 1, 0), "bias": sd[f"{s}{name}.bias"]}
        block = {
            "seq_modeling_block": seq,
            "feed_forward": {
                jax: {"kernel": sd[f"{p}mlp.{name}.weight"].T}
                for jax, name in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))
            },
            "seq_norm": {"kernel": sd[p + "seq_norm.weight"]},
            "ffn_norm": {"kernel": sd[p + "ffn_norm.weight"]},
        }
        if p + "conv.conv.weight" in sd:
            block["conv"] = {
                "conv1": {"kernel": sd[p + "conv.conv.weight"].transpose(2, 1, 0), "bias": sd[p + "conv.conv.bias"]},
                "conv_norm": {"kernel": sd[p + "conv.norm.weight"]},
            }
        blocks[str(i)] = block
    tree = {
        "model": {
            "wte": {"embedding": sd["model.embed_tokens.weight"]},
            "h": blocks,
            "ln_f": {"kernel": sd["model.norm.weight"]},
        }
    }
    if not config["tie_word_embeddings"]:
        tree["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    return {"params": tree}


def test_a_jax_parameter_tree_converts_to_the_official_model(golden: dict) -> None:
    tree = jax_tree(golden)
    config = config_from_jax_params(tree, ttt_base_lr=golden["config"]["ttt_base_lr"])
    assert config == TTTConfig.from_dict(golden["config"])  # sizes and backbone read off the tree
    model = TTTForCausalLM(config)
    model.load_state_dict(convert_jax_params(tree, config), strict=True)
    with torch.no_grad():
        logits = model(golden["input_ids"]).logits
    assert rel(logits, golden["logits"]) <= 1e-5  # the tree is float32
    with pytest.raises(EngramError, match="no place in this config"):
        convert_jax_params(tree, config.replace(num_hidden_layers=1))
