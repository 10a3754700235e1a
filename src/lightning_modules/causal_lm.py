"""The causal-LM family: any ``transformers`` AutoModelForCausalLM (Gemma-2, Llama, GPT-2 ...), built from a
preset or loaded from a path, trained with next-token cross-entropy."""

from __future__ import annotations

from typing import Any, Literal

import torch

from src.errors import EngramError
from src.flops import causal_attention_flops_per_token
from src.lightning_modules.base import LanguageModel
from src.models.components.linear_cross_entropy import chunked_linear_cross_entropy
from src.models.hf_causal_lm import (
    PRESETS,
    apply_lora,
    build_causal_lm,
    compile_layers,
    context_length,
    enable_activation_checkpointing,
)


class CausalLM(LanguageModel):
    """A causal LM over ``transformers``.

    Args:
        vocab_size: set from the data module's tokenizer (linked by the CLI; do not set it by hand).
        preset: architecture preset (``src/models/hf_causal_lm.py``: gemma2-2b, gemma2-tiny, llama3-8b, llama-tiny,
            llama-small, gpt2-124m, gpt2-tiny).
        pretrained_path: local folder (or hub id) to load weights from instead of building from the preset.
        config_overrides: fields of the transformers config to change, e.g. ``{num_hidden_layers: 4}``.
        attn_implementation: force ``eager``/``sdpa``/``flash_attention_2``; default picks per architecture.
        compile: ``torch.compile`` the model (parameter names and checkpoints stay those of the plain model); the
            first steps pay for compilation.
        compile_scope: what ``compile`` compiles. ``layers``: each decoder layer in place (one graph serves all
            layers, so compilation stays short) and the chunked loss's softmax; ``model``: the whole training loss
            (embeddings, layers, head and loss in one graph, fusing across layer boundaries: faster for small
            models, longer to compile).
        gradient_checkpointing: recompute each layer's activations in the backward instead of keeping them
            (transformers' gradient checkpointing): much less memory for about a third more compute.
        loss_chunk_size: compute the training loss from the hidden states this many tokens at a time
            (``src/models/components/linear_cross_entropy.py``), never holding the full ``[tokens, vocab]`` fp32
            logits; null = the model's own loss on full logits. Evaluation always uses full logits.
        quantization: load the weights quantized (QLoRA): ``BitsAndBytesConfig`` fields, e.g. ``{load_in_4bit: true,
            bnb_4bit_quant_type: nf4, bnb_4bit_use_double_quant: true, bnb_4bit_compute_dtype: bfloat16}``; needs
            CUDA and bitsandbytes. Null = full precision.
        lora: train a peft LoRA adapter instead of the weights: ``LoraConfig`` fields, e.g. ``{r: 64, lora_alpha: 16,
            lora_dropout: 0.1, target_modules: all-linear}``. Null = train all weights.
        (the optimizer arguments are EngramModule's)
    """

    family = "causal_lm"

    def __init__(
        self,
        vocab_size: int,
        preset: str = "llama-tiny",
        pretrained_path: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        compile: bool = False,
        compile_scope: Literal["layers", "model"] = "layers",
        gradient_checkpointing: bool = False,
        loss_chunk_size: int | None = None,
        quantization: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        overrides = dict(config_overrides or {})
        if pretrained_path is None and "vocab_size" not in PRESETS.get(preset, {}):
            # Test-size presets take the tokenizer's vocabulary; real architectures keep their published one.
            overrides.setdefault("vocab_size", vocab_size)
        self.model = build_causal_lm(preset, pretrained_path, overrides, attn_implementation, quantization)
        if lora is not None:
            self.model = apply_lora(self.model, lora, quantized=quantization is not None)
        model_vocab = self.model.config.vocab_size
        if vocab_size > model_vocab:
            raise EngramError(
                f"the tokenizer has {vocab_size} tokens but the model's vocabulary has {model_vocab}. "
                "Use the tokenizer the model was trained with (data tokenizer: <model folder>)."
            )
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise EngramError(f"model.init_args.loss_chunk_size={loss_chunk_size} must be >= 1 (or null).")
        self.loss_chunk_size = loss_chunk_size
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        if compile_scope not in ("layers", "model"):
            raise EngramError(f"model.init_args.compile_scope={compile_scope!r} must be 'layers' or 'model'.")
        # Per layer, the chunked loss's softmax is compiled too; in the whole-loss graph it is traced with the rest.
        self.compile_chunks = compile and compile_scope == "layers"
        if self.compile_chunks:
            compile_layers(self.model)
        # torch.compile traces on the first call, so this graph sees the module after the device move and sharding.
        self._compiled_loss = torch.compile(self._uncompiled_loss) if compile and compile_scope == "model" else None
        self.init_metrics(model_vocab)

    @property
    def max_context(self) -> int | None:
        return context_length(self.model.config)

    def configure_model(self) -> None:
        """Shard the network with FSDP2 when the strategy is Lightning's ``ModelParallelStrategy``
        (``configs/strategies/fsdp2.yaml``); a no-op under every other strategy (FSDPStrategy wraps the module itself).

        Each decoder layer (the classes transformers lists in ``_no_split_modules``: ``Gemma2DecoderLayer``,
        ``LlamaDecoderLayer``, ``GPT2Block``) becomes one ``fully_shard`` unit, and the whole network (embeddings,
        final norm, head: tied weights stay in one unit) the root. Lightning calls this hook once per stage.
        """
        mesh = self.device_mesh  # set by ModelParallelStrategy only
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        if isinstance(self.model, FSDPModule):
            return
        if mesh["tensor_parallel"].size() != 1:
            raise EngramError(
                f"CausalLM shards with FSDP only and has no tensor-parallel plan, but the mesh is {tuple(mesh.shape)} "
                "(data_parallel, tensor_parallel). Set --trainer.strategy.init_args.tensor_parallel_size 1 and "
                "data_parallel_size to the number of processes (devices x nodes)."
            )
        if self.hparams.get("quantization") is not None:
            raise EngramError(
                "4-bit weights (model.init_args.quantization) cannot be sharded by FSDP2. Train QLoRA with ddp, or "
                "set --model.init_args.quantization null."
            )
        data_parallel = mesh["data_parallel"]
        layer_classes = set(getattr(_base_model(self.model), "_no_split_modules", None) or ())
        layers = [m for m in self.model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise EngramError(
                f"found no decoder layers to shard in {type(_base_model(self.model)).__name__} (transformers names "
                "none in _no_split_modules). Use ddp for this model."
            )
        for layer in layers:
            fully_shard(layer, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)
        # The chunked loss reads the decoder and the head outside the network's forward; registered as a forward of
        # the root unit, FSDP gathers the root's weights for it and reduces their gradients as for forward.
        self.model.engram_chunked_loss = self._chunked_loss
        register_fsdp_forward_method(self.model, "engram_chunked_loss")

    def training_flops_per_token(self, seq_len: int) -> float:
        config = self.model.config
        heads = config.num_attention_heads
        width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)  # Gemma-2: 8 x 256
        return super().training_flops_per_token(seq_len) + causal_attention_flops_per_token(
            config.num_hidden_layers, seq_len, width
        )

    def lm_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._compiled_loss is not None:
            return self._compiled_loss(input_ids, labels)
        return self._uncompiled_loss(input_ids, labels)

    def _uncompiled_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss_chunk_size is None:
            return super().lm_loss(input_ids, labels)
        # Sharded with FSDP2 (configure_model), the same method runs as a registered forward of the root unit.
        return getattr(self.model, "engram_chunked_loss", self._chunked_loss)(input_ids, labels)

    def _chunked_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model.get_decoder()(input_ids=input_ids).last_hidden_state
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        return chunked_linear_cross_entropy(
            hidden[:, :-1], head.weight, labels[:, 1:], head.bias, softcap, self.loss_chunk_size, self.compile_chunks
        )


def _base_model(model: Any) -> Any:
    """The transformers model under a peft adapter (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
