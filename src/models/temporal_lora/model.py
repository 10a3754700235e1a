"""Temporal LoRA: a frozen HF GPT-2, one peft LoRA adapter per domain, and a Time Mixer routing tokens between them.

The backbone holds the lasting knowledge, each adapter one "epoch" (domain), and the router decides token by token
which epoch the text is in. Everything lives in one ``nn.Module`` whose ``state_dict`` carries backbone, adapters,
router and calibration offsets, so each training stage's checkpoint holds what the next stage needs:

1. backbone pretraining: ``set_trainable("backbone")``; ``model(input_ids, labels=...)`` (no weights: bare GPT-2);
2. adapter training: ``set_trainable("adapters")``; ``model(input_ids, labels=..., weights=model.one_hot(domain, T))``
   (one-hot rows: each row trains its own domain's adapter, several domains can share a batch);
3. router training: ``set_trainable("router")``; cross-entropy of ``model.route(input_ids).scores`` against per-token
   domain labels, then ``model.calibrate(input_ids, domains)`` on held-out text;
4. use: ``model.routed(input_ids)`` → LM output mixed token by token, plus the router's weights.

Where the router reads (``router_layer``, an index into HF's ``hidden_states``: 0 = embeddings, i = input of block i,
``n_layer`` (or -1) = final output after ``ln_f``) and how (``routing``):

* ``"base_pass"``: a no-grad pass of the bare backbone gives ``hidden_states[router_layer]``, then one mixed pass.
  The routing pass depends on no trainable parameter (the backbone is frozen), so its result can be cached.
* ``"inline"``: adapters sit only in blocks ≥ ``router_layer`` and a forward pre-hook on that block computes the
  weights from its input mid-forward: exactly one forward. Its weights equal ``"base_pass"``'s, because blocks
  before ``router_layer`` carry no adapter.

Mixing is one forward in both modes (see ``mixing.py``), never one forward per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from src.errors import EngramError
from src.models.config_checks import OVERRIDES_KEY, check_fields, check_known
from src.models.temporal_lora.mixing import AdapterMixer
from src.models.temporal_lora.router import RouterOutput, TimeMixer

BYTE_VOCAB = 259  # data_modules.tokenizer.ByteTokenizer: 256 bytes + <pad>, <bos>, <eos>


@dataclass
class TemporalLoRAConfig:
    """Backbone shape (ignored where ``pretrained_path`` is given: the saved config wins), adapters, router."""

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    n_positions: int = 512
    vocab_size: int = BYTE_VOCAB
    pretrained_path: str | None = None  # a local folder saved with save_pretrained (GPT-2 weights + config)
    adapters: tuple[str, ...] = ("shakespeare", "python")  # one adapter per domain, in domain-index order
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")  # "c_proj" matches attn.c_proj and mlp.c_proj
    router_hidden: int = 64
    router_window: int = 1  # tokens the Time Mixer pools over (causal); 1 = a per-token router
    router_layer: int = -1
    routing: Literal["base_pass", "inline"] = "base_pass"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self, RANGES)
        if self.pretrained_path is None and self.n_embd % self.n_head:  # a pretrained backbone brings its own shape
            raise EngramError(
                f"{OVERRIDES_KEY}: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; choose sizes that "
                "give every attention head n_embd // n_head features."
            )

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TemporalLoRAConfig:
        if name not in PRESETS:
            raise EngramError(f"unknown Temporal LoRA preset {name!r}; choose one of {sorted(PRESETS)}.")
        check_known(cls, overrides)
        return replace(PRESETS[name], **overrides)


# The domain of every numeric field (its type and the Literal choices are checked from the annotations).
RANGES = {
    "n_layer": ">= 1",
    "n_head": ">= 1",
    "n_embd": ">= 1",
    "n_positions": ">= 1",
    "vocab_size": ">= 2",  # the last two ids are <bos> and <eos>
    "lora_r": ">= 1",
    "lora_alpha": "> 0",
    "lora_dropout": "in [0, 1)",
    "router_hidden": ">= 1",
    "router_window": ">= 1",
    "temperature": "> 0",
}


PRESETS: dict[str, TemporalLoRAConfig] = {
    # Unit tests: a few seconds on one CPU core.
    "tiny": TemporalLoRAConfig(),
    # The small CPU config of the acceptance run (byte tokens, 4 blocks, ~1M parameters).
    "small": TemporalLoRAConfig(n_layer=4, n_head=4, n_embd=128, router_hidden=128),
    # GPT-2 (124M) shapes, meant to be used with pretrained_path pointing at local GPT-2 weights.
    "gpt2": TemporalLoRAConfig(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257, lora_r=16),
}


def build_backbone(config: TemporalLoRAConfig) -> GPT2LMHeadModel:
    if config.pretrained_path:
        try:
            return GPT2LMHeadModel.from_pretrained(config.pretrained_path)
        except OSError as err:
            raise EngramError(
                f"pretrained_path={config.pretrained_path!r} holds no GPT-2 saved with save_pretrained ({err}); "
                "give such a folder or set pretrained_path: null to build the backbone from the config."
            ) from err
    gpt2 = GPT2Config(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        n_positions=config.n_positions,
        vocab_size=config.vocab_size,
        # GPT-2's defaults (50256) lie outside a small vocabulary; the byte tokenizer's <bos>/<eos> are 257/258.
        bos_token_id=config.vocab_size - 2,
        eos_token_id=config.vocab_size - 1,
    )
    return GPT2LMHeadModel(gpt2)


@dataclass
class RoutedOutput:
    lm: CausalLMOutputWithCrossAttentions  # logits (B, T, V) and loss when labels were given
    router: RouterOutput = field(repr=False)


class TemporalLoRA(nn.Module):
    """Frozen GPT-2 + per-domain LoRA adapters (peft) + Time Mixer; see the module docstring for the stages."""

    def __init__(self, config: TemporalLoRAConfig, backbone: GPT2LMHeadModel | None = None) -> None:
        super().__init__()
        self.config = config
        backbone = backbone if backbone is not None else build_backbone(config)
        n_layer = backbone.config.n_layer
        self.router_layer = self._resolve_router_layer(config, n_layer)
        self.adapter_names = list(config.adapters)
        self._check_adapter_names(self.adapter_names)
        self._check_target_modules(config.target_modules, backbone)

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            fan_in_fan_out=True,  # GPT-2's projections are Conv1D with (in, out) weights
            layers_to_transform=list(range(self.router_layer, n_layer)) if config.routing == "inline" else None,
            layers_pattern="h" if config.routing == "inline" else None,
        )
        self.peft = get_peft_model(backbone, lora, adapter_name=self.adapter_names[0])
        for name in self.adapter_names[1:]:
            self.peft.add_adapter(name, lora)
        # No active adapter: peft's LoRA layers return the base output alone and the mixer's hook adds the mix.
        self.peft.base_model.set_adapter([])
        self.mixer = AdapterMixer(self.peft, self.adapter_names)

        self.router = TimeMixer(
            backbone.config.n_embd,
            len(self.adapter_names),
            config.router_hidden,
            config.temperature,
            config.router_window,
        )
        self._inline_route: RouterOutput | None = None
        self._inline_active = False
        if config.routing == "inline":
            self.gpt2.transformer.h[self.router_layer].register_forward_pre_hook(self._route_inline)
        self.set_trainable("adapters")

    @staticmethod
    def _resolve_router_layer(config: TemporalLoRAConfig, n_layer: int) -> int:
        layer = config.router_layer % (n_layer + 1) if -(n_layer + 1) <= config.router_layer <= n_layer else None
        if layer is None:
            raise EngramError(f"router_layer={config.router_layer} is out of range; use 0..{n_layer} (or -1 = final).")
        if config.routing == "inline" and layer == n_layer:
            raise EngramError(
                f"routing: inline reads the input of a block, so router_layer must be 0..{n_layer - 1} "
                f"(got {config.router_layer}); or use routing: base_pass to read the final layer."
            )
        return layer

    @staticmethod
    def _check_adapter_names(names: list[str]) -> None:
        if len(names) < 2 or len(set(names)) != len(names):
            raise EngramError(f"adapters={names}: give at least two distinct domain names.")
        bad = [n for n in names if not n.isidentifier()]
        if bad:
            raise EngramError(f"adapter names {bad} must be identifiers (letters, digits, _): they key peft modules.")

    @staticmethod
    def _check_target_modules(targets: tuple[str, ...], backbone: GPT2LMHeadModel) -> None:
        # peft's own error for a name that matches nothing is a traceback from inside get_peft_model; it matches a
        # name against the end of each module's dotted path, as here.
        names = [name for name, _ in backbone.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            raise EngramError(
                f"{OVERRIDES_KEY}.target_modules={list(targets)}: no GPT-2 module is named {missing}; use some of "
                "c_attn, c_proj, c_fc (or attn.c_proj / mlp.c_proj for one of the two c_proj)."
            )

    @property
    def gpt2(self) -> GPT2LMHeadModel:
        """The backbone with peft's LoRA layers inside (called directly: the PeftModel wrapper adds nothing here)."""
        return self.peft.get_base_model()

    # --- what trains ----------------------------------------------------------------------------------------------
    def set_trainable(
        self, stage: Literal["backbone", "adapters", "router"], adapters: list[str] | None = None
    ) -> None:
        """Freeze everything except the stage's parameters: the backbone's own weights (pretraining), the LoRA
        factors of ``adapters`` (default all), or the router."""
        if stage not in ("backbone", "adapters", "router"):
            raise EngramError(f"stage={stage!r}; use backbone, adapters or router.")
        chosen = set(adapters or self.adapter_names)
        if not chosen <= set(self.adapter_names):
            raise EngramError(
                f"adapters {sorted(chosen - set(self.adapter_names))} do not exist: {self.adapter_names}."
            )
        for name, param in self.peft.named_parameters():
            parts = name.split(".")
            is_lora = "lora_A" in parts or "lora_B" in parts
            if is_lora:
                adapter = parts[parts.index("lora_A" if "lora_A" in parts else "lora_B") + 1]
                param.requires_grad_(stage == "adapters" and adapter in chosen)
            else:
                param.requires_grad_(stage == "backbone")
        self.router.requires_grad_(stage == "router")

    # --- forward passes -------------------------------------------------------------------------------------------
    def one_hot(self, domains: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """Weights ``(B, T, E)`` selecting each token's own adapter; ``domains`` is ``(B,)`` (one domain per row,
        repeated over ``seq_len`` tokens) or ``(B, T)``."""
        if domains.dim() == 1:
            if seq_len is None:
                raise EngramError("one_hot with one domain per row needs seq_len.")
            domains = domains[:, None].expand(-1, seq_len)
        return F.one_hot(domains, len(self.adapter_names)).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> CausalLMOutputWithCrossAttentions:
        """``weights`` ``(B, T, E)`` mix the adapters per token; ``None`` runs the bare backbone. ``labels`` are
        aligned with ``input_ids`` (HF shifts them); -100 = no loss."""
        with self.mixer.mixing(weights):
            return self.gpt2(input_ids=input_ids, labels=labels, attention_mask=attention_mask, use_cache=False)

    def router_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's hidden states the router reads, ``(B, T, d)``, from a no-grad bare pass."""
        with torch.no_grad(), self.mixer.mixing(None):
            out = self.gpt2.transformer(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[self.router_layer]

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RouterOutput:
        """Per-token router scores and weights (gradients reach the router only)."""
        return self.router(self.router_hidden(input_ids, attention_mask))

    def routed(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> RoutedOutput:
        """Route, then run the adapters mixed by the router's weights (one mixed forward)."""
        if self.config.routing == "base_pass":
            router_out = self.route(input_ids, attention_mask)
            return RoutedOutput(lm=self(input_ids, labels, attention_mask, router_out.weights), router=router_out)
        with self.mixer.mixing(None):
            self._inline_active = True
            try:
                lm = self.gpt2(input_ids=input_ids, labels=labels, attention_mask=attention_mask, use_cache=False)
                router_out = self._inline_route
            finally:
                self._inline_active, self._inline_route = False, None
        assert router_out is not None  # set by _route_inline during the forward
        return RoutedOutput(lm=lm, router=router_out)

    def _route_inline(self, block: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """Forward pre-hook on block ``router_layer``: its input is ``hidden_states[router_layer]``."""
        if self._inline_active:
            self._inline_route = self.router(args[0])
            self.mixer.weights = self._inline_route.weights

    @torch.no_grad()
    def calibrate(
        self, input_ids: torch.Tensor, domains: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, list[float]]:
        """Contrastive calibration of the router on held-out windows; ``domains`` ``(B,)`` or ``(B, T)``."""
        hidden = self.router_hidden(input_ids, attention_mask)
        if domains.dim() == 1:
            domains = domains[:, None].expand(-1, input_ids.shape[1])
        return self.router.calibrate(hidden, domains, attention_mask)
