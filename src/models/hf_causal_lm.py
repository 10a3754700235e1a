"""Causal LMs from ``transformers``: named architecture presets, building from a config, loading from a path.

Presets are the real architectures (``gemma2-2b`` is Gemma-2-2B's published config) and test-size members of the
same families. ``build_causal_lm`` either loads pretrained weights (``from_pretrained`` on a local folder or a hub id)
or builds a randomly initialised model from a preset plus overrides.

QLoRA (Dettmers et al. 2023) goes through transformers and peft: ``quantization`` is a ``BitsAndBytesConfig`` as a
dict (4-bit weights are made while loading, so a preset is first saved to a temporary folder and loaded back; needs
CUDA and ``bitsandbytes``), and ``apply_lora`` wraps the model in a peft ``LoraConfig`` adapter, after
``prepare_model_for_kbit_training`` when the weights are quantized (frozen base, fp32 norms, gradient checkpointing).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from src.errors import EngramError

# Architecture presets: model_type + the config fields that differ from transformers' defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # google/gemma-2-2b config.json
    "gemma2-2b": dict(
        model_type="gemma2",
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=8192,
        sliding_window=4096,
        query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        vocab_size=256000,
        tie_word_embeddings=True,
    ),
    "gemma2-tiny": dict(
        model_type="gemma2",
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=128,
        query_pre_attn_scalar=16,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "llama-tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    # A ~4M-parameter Llama that learns visibly on a laptop CPU in a few minutes.
    "llama-small": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # openai-community/gpt2 (124M)
    "gpt2-124m": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    "gpt2-tiny": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


def attn_implementation_for(model_type: str, requested: str | None = None) -> str:
    """Pick the attention kernel: flash_attention_2 where flash-attn is installed (it has Gemma-2's soft-capping);
    else SDPA, except for Gemma-2, whose attention-logit soft-capping SDPA cannot apply: it gets PyTorch's
    flex_attention on CUDA (a fused kernel with the cap as a score modifier, no ``[T, T]`` score tensors) and eager
    attention on other devices, where compiling flex_attention would cost more than it saves at test sizes."""
    if requested:
        return requested
    if not torch.cuda.is_available():
        return "eager" if model_type == "gemma2" else "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention" if model_type == "gemma2" else "sdpa"


def preset_config(preset: str, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    if preset not in PRESETS:
        raise EngramError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)} or give pretrained_path.")
    fields = {**PRESETS[preset], **(overrides or {})}
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def _check_keys(given: dict[str, Any], allowed: set[str], what: str, key: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise EngramError(f"{key} has unknown {what} field(s) {unknown}; valid fields: {sorted(allowed)}.")


def quantization_config(quantization: dict[str, Any]) -> Any:
    """A ``BitsAndBytesConfig`` from its fields, refusing unknown ones and machines without CUDA or bitsandbytes."""
    if not torch.cuda.is_available():
        raise EngramError(
            "model.init_args.quantization (bitsandbytes 4-bit, QLoRA) needs a CUDA GPU and none is visible. Run on a "
            "GPU, or set --model.init_args.quantization null to train the unquantized model."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise EngramError("model.init_args.quantization needs the bitsandbytes package: pip install bitsandbytes.")
    from transformers import BitsAndBytesConfig

    allowed = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    _check_keys(quantization, allowed, "BitsAndBytesConfig", "model.init_args.quantization")
    return BitsAndBytesConfig(**quantization)


def _load_quantized(path: str, bnb: Any, attn: str) -> PreTrainedModel:
    # Weights are quantized while loading, onto this process's GPU so that Lightning's device move is a no-op.
    device = int(os.environ.get("LOCAL_RANK", 0))
    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=bnb,
        dtype=bnb.bnb_4bit_compute_dtype or torch.float32,
        device_map={"": device},
        attn_implementation=attn,
    )


def build_causal_lm(
    preset: str | None = None,
    pretrained_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    quantization: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Load ``pretrained_path`` (local folder or hub id) or build a fresh model from ``preset`` + ``overrides``;
    with ``quantization`` (``BitsAndBytesConfig`` fields) the weights are loaded quantized."""
    bnb = quantization_config(quantization) if quantization is not None else None
    if pretrained_path:
        config = AutoConfig.from_pretrained(pretrained_path)
        attn = attn_implementation_for(config.model_type, attn_implementation)
        try:
            if bnb is not None:
                return _load_quantized(pretrained_path, bnb, attn)
            return AutoModelForCausalLM.from_pretrained(pretrained_path, attn_implementation=attn)
        except OSError as err:
            raise EngramError(
                f"could not load pretrained weights from {pretrained_path!r}: {err}. Give a local folder "
                "saved with save_pretrained, or set pretrained_path: null and use a preset."
            ) from err
    if preset is None:
        raise EngramError("model needs either preset (e.g. llama-tiny) or pretrained_path.")
    config = preset_config(preset, overrides)
    attn = attn_implementation_for(config.model_type, attn_implementation)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    if bnb is None:
        return model
    # bitsandbytes quantizes in from_pretrained only: round-trip the random initialisation through a folder.
    with tempfile.TemporaryDirectory(prefix="engram-quantize-") as folder:
        model.to(bnb.bnb_4bit_compute_dtype or torch.float32).save_pretrained(folder)
        del model
        return _load_quantized(folder, bnb, attn)


def count_4bit_linears(model: nn.Module) -> int:
    """bitsandbytes ``Linear4bit`` layers in ``model``. By class, not by name: peft's LoRA wrapper around one is also
    called ``Linear4bit``, so counting names counts every adapted projection twice."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return 0
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def apply_lora(model: PreTrainedModel, lora: dict[str, Any], quantized: bool) -> Any:
    """Wrap ``model`` in a peft LoRA adapter (``LoraConfig`` fields; ``task_type`` defaults to ``CAUSAL_LM``).

    Only the adapter trains. Quantized models go through ``prepare_model_for_kbit_training`` first (base frozen,
    norms in fp32, gradient checkpointing). The result is put in train mode: ``from_pretrained`` returns eval mode,
    which would silence LoRA dropout."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    allowed = {f.name for f in dataclasses.fields(LoraConfig)}
    _check_keys(lora, allowed, "LoraConfig", "model.init_args.lora")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    peft_model = get_peft_model(model, LoraConfig(**{"task_type": "CAUSAL_LM", **lora}))
    peft_model.train()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        trainable, total = peft_model.get_nb_trainable_parameters()
        four_bit = count_4bit_linears(peft_model)
        print(
            f"[engram] LoRA: {trainable:,} trainable of {total:,} parameters; {four_bit} Linear4bit layers "
            f"(4-bit weights: {bool(getattr(model, 'is_loaded_in_4bit', False))})",
            flush=True,
        )
    return peft_model


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in the backward. Non-reentrant checkpointing works with frozen inputs
    (LoRA) and replays dropout's random states; transformers 5.24 renamed gradient to activation checkpointing."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model: nn.Module) -> None:
    """``torch.compile`` every decoder layer in place (torchtitan's per-block compile): the layers share one graph,
    compilation stays short, and activation checkpointing wraps the compiled layers unchanged."""
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.compile()


def is_activation_checkpointing(model: Any) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def context_length(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position scheme supports, when the config says."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None
