"""QLoRA in the causal-LM family: LoRA adapters train alone, 4-bit loading refuses a machine without CUDA, the
Llama-3-8B QLoRA config carries the recipe; on a GPU a tiny 4-bit Llama trains (``-m gpu``)."""

from __future__ import annotations

import pytest
import torch
import yaml

from src.cli import main
from src.errors import EngramError
from src.lightning_modules import CausalLM
from src.models.hf_causal_lm import count_4bit_linears
from tests.conftest import CONFIGS

QLORA = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
}
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}


def _train_steps(model: CausalLM, steps: int, device: str = "cpu") -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    losses = []
    for _ in range(steps):
        loss, _ = model.lm_forward(ids, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def test_lora_trains_only_the_adapter() -> None:
    torch.manual_seed(0)
    model = CausalLM(64, preset="llama-tiny", lora=LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model, 2)
    for name, param in model.named_parameters():
        assert (not torch.equal(param, before[name])) == (name in trainable), name  # adapters moved, base did not


def test_quantization_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngramError, match=r"needs a CUDA GPU.*--model.init_args.quantization null"):
        CausalLM(64, preset="llama-tiny", quantization=QLORA, lora=LORA)


def test_unknown_lora_field_is_named() -> None:
    with pytest.raises(EngramError, match=r"unknown LoraConfig field\(s\) \['rank'\]"):
        CausalLM(64, preset="llama-tiny", lora={"rank": 8})


def test_the_llama3_qlora_config_carries_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "llama3_8b_qlora.yaml"), "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert model["preset"] == "llama3-8b" and model["quantization"] == QLORA
    assert {k: model["lora"][k] for k in ("r", "lora_alpha", "target_modules")} == {
        "r": 64,
        "lora_alpha": 16,
        "target_modules": "all-linear",
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_tiny_4bit_llama_trains_on_the_gpu() -> None:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = CausalLM(64, preset="llama-tiny", quantization=QLORA, lora=LORA)
    assert model.model.is_loaded_in_4bit
    assert count_4bit_linears(model) == 2 * 7  # 7 projections x 2 layers
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = _train_steps(model, 5, device="cuda")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
