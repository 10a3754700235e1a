"""One-pass per-token mixing of several peft LoRA adapters.

For a LoRA-wrapped projection with frozen base map ``f(x) = x W + b`` and adapters ``e = 1..E`` (peft's ``lora_A[e]``
with weight ``A_e`` of shape ``(r_e, in)``, ``lora_B[e]`` with ``B_e`` of shape ``(out, r_e)``, scale
``s_e = lora_alpha / r_e``), the mixed output of token ``t`` with router weights ``w_t`` is::

    y_t = f(x_t) + Σ_e w_{t,e} · s_e · B_e A_e x_t

It costs two matmuls whatever E is (the "CAT" layout of LoRA Soups with a per-token gate, the stacked layout of peft's
Arrow router): stack ``A_cat = [A_1; …; A_E]`` (Σr × in) and ``B_cat = [B_1 … B_E]`` (out × Σr), compute
``u = x A_catᵀ``, multiply adapter e's r_e columns of u by ``w_{t,e} s_e``, and project back with ``B_catᵀ``.

How this sits on peft (the "hook"): peft's own ``lora.Linear.forward`` adds every *active* adapter with a fixed scale.
``TemporalLoRA`` makes no adapter active (``set_adapter([])``), so every peft LoRA layer returns ``f(x)`` alone, and the
forward hook installed here adds the mixed term while weights are set (inside ``AdapterMixer.mixing``). Without weights
the hook adds nothing and the model is the bare backbone. The stacked factors are concatenated on every call, not
cached, so gradients reach both the adapters and (through the weights) the router.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from src.errors import EngramError


def stacked_lora_delta(
    layer: LoraLayer,
    x: torch.Tensor,
    weights: torch.Tensor,
    names: Sequence[str],
    gate_factors: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """``Σ_e weights[..., e] · s_e · B_e A_e x`` for peft LoRA layer ``layer``, in one pair of matmuls.

    ``x``: ``(..., in)`` input of the layer; ``weights``: ``(..., E)`` with the same leading shape; ``names``: the
    adapter names in the order of the last axis of ``weights``; ``gate_factors``: ``lora_gate_factors`` already on
    ``x``'s device (built here when omitted). One dropout mask is shared by all adapters (they are built from one
    ``LoraConfig``, so their dropout modules are equal).
    """
    a_cat = torch.cat([layer.lora_A[n].weight for n in names], dim=0)  # (Σr, in)
    b_cat = torch.cat([layer.lora_B[n].weight for n in names], dim=1)  # (out, Σr)
    scales, ranks, total_rank = gate_factors or lora_gate_factors(layer, names, x.device, a_cat.dtype)
    gate = (weights.to(a_cat.dtype) * scales).repeat_interleave(ranks, dim=-1, output_size=total_rank)  # (..., Σr)
    x = layer.lora_dropout[names[0]](x.to(a_cat.dtype))
    return ((x @ a_cat.T) * gate) @ b_cat.T


def lora_gate_factors(
    layer: LoraLayer, names: Sequence[str], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-adapter scales ``s_e`` and ranks ``r_e`` as tensors on ``device``, and ``Σ r_e``."""
    scales = torch.tensor([layer.scaling[n] for n in names], device=device, dtype=dtype)
    ranks = torch.tensor([layer.r[n] for n in names], device=device)
    return scales, ranks, sum(layer.r[n] for n in names)


class AdapterMixer:
    """Installs the mixing hook on every peft LoRA layer of ``model`` that holds all of ``names``.

    Not an ``nn.Module``: it owns no parameters (the adapters stay in peft's modules, where peft saves and loads them).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.names = list(names)
        self.weights: torch.Tensor | None = None
        self.layers: list[LoraLayer] = []
        # Scales and ranks per (layer, device, dtype), built once: a host-to-device copy in every forward would
        # synchronise the GPU at every layer. (They go stale if peft's scaling is changed after the first forward.)
        self._gate_factors: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor, int]] = {}
        for module_name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or not set(self.names) <= set(module.lora_A):
                continue
            self._check_vanilla(module_name, module)
            module.register_forward_hook(self._hook)
            self.layers.append(module)
        if not self.layers:
            raise EngramError(f"no LoRA layer holds all adapters {self.names}; check target_modules and the adapters.")

    def _check_vanilla(self, module_name: str, layer: LoraLayer) -> None:
        # The stacked formula is plain LoRA: DoRA & co. rescale the base output, a LoRA bias is not gated.
        for n in self.names:
            if n in layer.lora_variant or layer.lora_bias.get(n, False):
                raise EngramError(
                    f"{module_name}: adapter {n!r} is not plain LoRA (DoRA/variant/lora_bias); use plain."
                )
        dropouts = {getattr(layer.lora_dropout[n], "p", 0.0) for n in self.names}
        if len(dropouts) > 1:
            raise EngramError(f"{module_name}: adapters have different lora_dropout {sorted(dropouts)}; use one value.")

    def _hook(self, layer: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self.weights is None:
            return None
        x = args[0]
        dtype = layer.lora_A[self.names[0]].weight.dtype
        key = (id(layer), x.device, dtype)
        if key not in self._gate_factors:
            self._gate_factors[key] = lora_gate_factors(layer, self.names, x.device, dtype)
        delta = stacked_lora_delta(layer, x, self.weights, self.names, self._gate_factors[key])
        return output + delta.to(output.dtype)

    @contextmanager
    def mixing(self, weights: torch.Tensor | None) -> Iterator[None]:
        """Within the block every hooked layer adds the mix with ``weights`` ``(B, T, E)``; ``None`` = set later
        (the inline router sets ``self.weights`` mid-forward). Always reset afterwards, also on errors."""
        if weights is not None and weights.shape[-1] != len(self.names):
            raise EngramError(
                f"weights have {weights.shape[-1]} adapters on the last axis; the model has {self.names}."
            )
        self.weights = weights
        try:
            yield
        finally:
            self.weights = None
