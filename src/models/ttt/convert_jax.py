"""Convert a ttt-lm-jax (Flax) parameter tree to the ``state_dict`` of ``TTTForCausalLM``.

The tree is what ``CausalLM.init`` / the ttt-lm-jax checkpointer hold: ``{"model": {"wte", "h": {"0": ...}, "ln_f"},
"lm_head"}``, optionally under one or two ``"params"`` levels, as nested dicts, or flat with ``"/"``-joined or tuple
keys; leaves are arrays (numpy, jax, torch; bfloat16 included). Mapping (Flax Dense kernels are [in, out] and are
transposed; Flax Conv kernels [width, 1, C] become [C, 1, width]):

    seq_modeling_block/wq, wk, wv, wo, wg          -> q_proj, k_proj, v_proj, o_proj, g_proj (.weight)
    seq_modeling_block/conv_q, conv_k              -> conv_q, conv_k (Mamba backbone)
    seq_modeling_block/ttt_dense_0, ttt_bias_0     -> W1, b1   (TTT-MLP also ttt_dense_1, ttt_bias_1 -> W2, b2)
    seq_modeling_block/ttt_norm/scale, bias        -> ttt_norm_weight, ttt_norm_bias
    seq_modeling_block/learnable_ttt_lr/kernel     -> learnable_ttt_lr_weight ([H, C, 1] -> [H, 1, C])
    seq_modeling_block/learnable_ttt_lr/bias       -> learnable_ttt_lr_bias
    seq_modeling_block/learnable_token_idx         -> learnable_token_idx
    seq_modeling_block/post_norm/scale, bias       -> post_norm.weight, post_norm.bias
    feed_forward/w1, w3, w2                        -> mlp.gate_proj, mlp.up_proj, mlp.down_proj
    seq_norm/kernel, ffn_norm/kernel               -> seq_norm.weight, ffn_norm.weight
    conv/conv_norm/kernel, conv/conv1              -> conv.norm.weight, conv.conv (pre_conv)
    model/wte/embedding, model/ln_f/kernel         -> model.embed_tokens.weight, model.norm.weight
    lm_head/kernel (absent when tied)              -> lm_head.weight

The JAX model names (``seq_modeling_block``) select the backbone: ``ttt_linear``/``ttt_mlp`` is the Mamba backbone
(pre_conv, shared Q/K with convs, gate), ``ttt_linear_base``/``ttt_mlp_base`` the Transformer one;
``config_from_jax_params`` reads that and every size off the tree.

Command line (the JAX side writes the flat tree to an ``.npz``, e.g.
``np.savez(path, **flax.traverse_util.flatten_dict(params, sep="/"))``, casting bfloat16 to float32 first):

    python -m src.models.ttt.convert_jax params.npz converted.pt [--ttt-base-lr 1.0] [--rope-theta 10000]

writes ``{"config": TTTConfig fields, "state_dict": ...}``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from src.errors import EngramError
from src.models.ttt.config import OFFICIAL_TTT_BASE_LR, TTTConfig


def flatten_tree(tree: Mapping[Any, Any]) -> dict[str, Any]:
    """Nested / flat / tuple-keyed tree -> {"a/b/c": leaf}, without leading "params" levels."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                parts = tuple(str(k) for k in key) if isinstance(key, tuple) else tuple(str(key).split("/"))
                walk(value, prefix + parts)
        else:
            flat["/".join(prefix)] = node

    walk(tree, ())
    while flat and all(key.startswith("params/") for key in flat):
        flat = {key[len("params/") :]: value for key, value in flat.items()}
    return flat


def to_tensor(leaf: Any) -> Tensor:
    """An array leaf as a torch tensor (keeps its dtype; numpy/ml_dtypes bfloat16 is reinterpreted bit-exactly)."""
    if isinstance(leaf, Tensor):
        return leaf.detach().clone()
    array = np.asarray(leaf)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array).copy())


def config_from_jax_params(tree: Mapping[Any, Any], **overrides: Any) -> TTTConfig:
    """Sizes and backbone read off the tree; ``ttt_base_lr`` defaults to the official value of the layer type and
    ``rope_theta`` to 1e4 (neither is stored in the parameters): pass them if the run used others."""
    flat = flatten_tree(tree)
    try:
        vocab_size, hidden_size = np.shape(flat["model/wte/embedding"])
        layers = {key.split("/")[2] for key in flat if key.startswith("model/h/")}
        block = "model/h/0/"
        heads = np.shape(flat[block + "seq_modeling_block/ttt_norm/scale"])[0]
        intermediate_size = np.shape(flat[block + "feed_forward/w1/kernel"])[1]
        mini_batch_size = np.shape(flat[block + "seq_modeling_block/learnable_token_idx"])[0]
    except KeyError as err:
        raise EngramError(f"not a ttt-lm-jax TTT parameter tree: missing {err.args[0]!r}.") from err
    share_qk = block + "seq_modeling_block/conv_q/kernel" in flat
    pre_conv = block + "conv/conv1/kernel" in flat
    conv_key = block + ("seq_modeling_block/conv_q/kernel" if share_qk else "conv/conv1/kernel")
    layer_type = "mlp" if block + "seq_modeling_block/ttt_dense_1" in flat else "linear"
    values: dict[str, Any] = dict(
        vocab_size=int(vocab_size),
        hidden_size=int(hidden_size),
        intermediate_size=int(intermediate_size),
        num_hidden_layers=len(layers),
        num_attention_heads=int(heads),
        mini_batch_size=int(mini_batch_size),
        tie_word_embeddings="lm_head/kernel" not in flat,
        share_qk=share_qk,
        pre_conv=pre_conv,
        use_gate=block + "seq_modeling_block/wg/kernel" in flat,
        ttt_layer_type=layer_type,
        ttt_base_lr=OFFICIAL_TTT_BASE_LR[layer_type],
    )
    if share_qk or pre_conv:
        values["conv_kernel"] = int(np.shape(flat[conv_key])[0])
    return TTTConfig.from_dict({**values, **overrides})


def convert_jax_params(tree: Mapping[Any, Any], config: TTTConfig) -> dict[str, Tensor]:
    """The ``TTTForCausalLM`` state_dict for a ttt-lm-jax parameter tree (see the module docstring for the mapping).

    Every leaf must be used and every parameter found: a mismatch with ``config`` raises ``EngramError``.
    """
    flat = flatten_tree(tree)
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in flat:
            raise EngramError(f"parameter {key!r} is missing from the JAX tree; does the config match the checkpoint?")
        used.add(key)
        return to_tensor(flat[key])

    def dense(key: str) -> Tensor:  # Flax kernel [in, out] -> torch weight [out, in]
        return take(key + "/kernel").T.contiguous()

    def conv(key: str) -> tuple[Tensor, Tensor]:  # Flax [width, 1, C] -> torch [C, 1, width]
        return take(key + "/kernel").permute(2, 1, 0).contiguous(), take(key + "/bias")

    sd: dict[str, Tensor] = {"model.embed_tokens.weight": take("model/wte/embedding")}
    sd["model.norm.weight"] = take("model/ln_f/kernel")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if config.tie_word_embeddings else dense("lm_head")
    for i in range(config.num_hidden_layers):
        src, dst = f"model/h/{i}/", f"model.layers.{i}."
        sd[dst + "seq_norm.weight"] = take(src + "seq_norm/kernel")
        sd[dst + "ffn_norm.weight"] = take(src + "ffn_norm/kernel")
        for jax_name, torch_name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            sd[f"{dst}mlp.{torch_name}.weight"] = dense(f"{src}feed_forward/{jax_name}")
        if config.pre_conv:
            sd[dst + "conv.norm.weight"] = take(src + "conv/conv_norm/kernel")
            sd[dst + "conv.conv.weight"], sd[dst + "conv.conv.bias"] = conv(src + "conv/conv1")

        src, dst = src + "seq_modeling_block/", dst + "seq_modeling_block."
        projections = ["q", "v", "o"] + ([] if config.share_qk else ["k"]) + (["g"] if config.use_gate else [])
        for name in projections:
            sd[f"{dst}{name}_proj.weight"] = dense(f"{src}w{name}")
        if config.share_qk:
            for name in ("conv_q", "conv_k"):
                sd[f"{dst}{name}.weight"], sd[f"{dst}{name}.bias"] = conv(src + name)
        sd[dst + "learnable_token_idx"] = take(src + "learnable_token_idx")
        sd[dst + "learnable_ttt_lr_weight"] = take(src + "learnable_ttt_lr/kernel").transpose(1, 2).contiguous()
        sd[dst + "learnable_ttt_lr_bias"] = take(src + "learnable_ttt_lr/bias")
        sd[dst + "ttt_norm_weight"] = take(src + "ttt_norm/scale")
        sd[dst + "ttt_norm_bias"] = take(src + "ttt_norm/bias")
        sd[dst + "post_norm.weight"] = take(src + "post_norm/scale")
        sd[dst + "post_norm.bias"] = take(src + "post_norm/bias")
        for j in range(2 if config.ttt_layer_type == "mlp" else 1):
            sd[f"{dst}W{j + 1}"] = take(f"{src}ttt_dense_{j}")
            sd[f"{dst}b{j + 1}"] = take(f"{src}ttt_bias_{j}")
    unused = sorted(set(flat) - used)
    if unused:
        raise EngramError(
            f"{len(unused)} JAX parameter(s) have no place in this config, e.g. {unused[:5]}; "
            "check num_hidden_layers, the backbone switches and ttt_layer_type (or use config_from_jax_params)."
        )
    return sd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help=".npz holding the flat ttt-lm-jax parameter tree ('/'-joined keys)")
    parser.add_argument("output", help="where to write {'config': ..., 'state_dict': ...} (torch.save)")
    parser.add_argument("--ttt-base-lr", type=float, default=None, help="inner base lr (default: official for type)")
    parser.add_argument("--rope-theta", type=float, default=None, help="rotary base (default 1e4)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        raise EngramError(f"input {args.input!r} does not exist; pass the .npz written from the JAX parameters.")
    with np.load(args.input) as data:
        tree = {key: data[key] for key in data.files}
    overrides = {k: v for k, v in (("ttt_base_lr", args.ttt_base_lr), ("rope_theta", args.rope_theta)) if v is not None}
    config = config_from_jax_params(tree, **overrides)
    payload = {"config": config.to_dict(), "state_dict": convert_jax_params(tree, config)}
    directory = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    torch.save(payload, tmp)
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
