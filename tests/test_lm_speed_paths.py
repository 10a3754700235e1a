"""The speed paths of the causal-LM family change no number: compiled layers, the compiled chunked loss and the
whole-model graph equal the eager model; flex_attention (Gemma-2's soft-capping as a score modifier) equals eager
attention on CUDA. FLOP counting matches a hand count, and the CLI logs throughput, counts steps toward max_steps and validates at the last step."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from src.cli import main
from src.errors import EngramError
from src.flops import causal_attention_flops_per_token, matmul_parameters
from src.lightning_modules import CausalLM
from tests.conftest import CONFIGS

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
QUIET = ["--trainer.enable_model_summary", "false", "--data.init_args.num_workers", "0"]


def _loss_and_grads(model: CausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = model.lm_loss(ids, ids)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, params)]


def _assert_same(a: tuple[torch.Tensor, list[torch.Tensor]], b: tuple[torch.Tensor, list[torch.Tensor]], rel: float):
    assert abs(a[0].item() - b[0].item()) <= rel * abs(b[0].item())
    for got, want in zip(a[1], b[1], strict=True):
        assert (got - want).norm() <= rel * want.norm() + 1e-8


@pytest.mark.slow
def test_compiled_layers_and_loss_equal_the_eager_model() -> None:
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = CausalLM(64, preset="gemma2-tiny", compile=compile, loss_chunk_size=16)
        results.append(_loss_and_grads(model, ids))
    compiled_layers = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled_layers) == 2  # both decoder layers, nothing else
    _assert_same(results[1], results[0], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("loss_chunk_size", [None, 16])
def test_the_whole_model_graph_equals_the_eager_model(loss_chunk_size: int | None) -> None:
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # compiled RNG streams differ from eager
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = CausalLM(
            64,
            preset="gpt2-tiny",
            config_overrides=no_dropout,
            compile=compile,
            compile_scope="model",
            loss_chunk_size=loss_chunk_size,
        )
        results.append(_loss_and_grads(model, ids))
    assert not [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]  # no layer alone
    assert model._compiled_loss is not None  # the loss went through the one graph
    _assert_same(results[1], results[0], rel=1e-4)


def test_an_unknown_compile_scope_is_one_clear_line() -> None:
    with pytest.raises(EngramError, match="compile_scope='graph' must be 'layers' or 'model'"):
        CausalLM(64, preset="gpt2-tiny", compile=True, compile_scope="graph")  # type: ignore[arg-type]


@pytest.mark.gpu
@CUDA
def test_flex_attention_equals_eager_attention_with_softcapping_on_cuda() -> None:
    ids = torch.randint(0, 64, (2, 160), generator=torch.Generator().manual_seed(0)).cuda()
    results = {}
    for attn in ("eager", "flex_attention"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            # A short sliding window and a strong cap, so both are exercised at this length.
            overrides = {"sliding_window": 64, "attn_logit_softcapping": 5.0}
            model = CausalLM(64, preset="gemma2-tiny", attn_implementation=attn, config_overrides=overrides)
        results[attn] = _loss_and_grads(model, ids)
    _assert_same(results["flex_attention"], results["eager"], rel=1e-4)


@pytest.mark.gpu
@CUDA
def test_the_default_gemma2_attention_on_cuda_is_flex() -> None:
    with torch.device("cuda"):
        model = CausalLM(64, preset="gemma2-tiny")
    assert model.model.config._attn_implementation == "flex_attention"


def test_flops_per_token_is_the_matmul_count_plus_causal_attention() -> None:
    model = CausalLM(64, preset="llama-tiny")
    config = model.model.config
    d, f, layers, kv = config.hidden_size, config.intermediate_size, config.num_hidden_layers, 2 * 16
    # Per layer: q and o (d x d), k and v (d x 32), gate/up/down (d x f), two norms; then the final norm and the
    # tied head (64 x d), which counts once; the embedding lookup is the same tensor.
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    assert matmul_parameters(model) == (layers * per_layer + d + 64 * d, 0)
    expected = 6.0 * (layers * per_layer + d + 64 * d) + causal_attention_flops_per_token(layers, 128, d)
    assert model.training_flops_per_token(128) == expected
    untied = CausalLM(64, preset="llama-tiny", config_overrides={"tie_word_embeddings": False})
    assert matmul_parameters(untied)[0] == matmul_parameters(model)[0]  # the untied input table is a lookup


def test_frozen_weights_cost_four_flops_per_token() -> None:
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    model = CausalLM(64, preset="llama-tiny", lora=lora)
    trained, frozen = matmul_parameters(model)
    assert 0 < trained < frozen
    assert model.training_flops_per_token(1) == 6.0 * trained + 4.0 * frozen + causal_attention_flops_per_token(
        model.model.config.num_hidden_layers, 1, model.model.config.hidden_size
    )


def _metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_fit_logs_throughput_shows_steps_and_validates_at_the_last_step(
    run_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # gemma_tiny validates every 10 steps; 13 steps end between two validations.
    main(["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *QUIET, "--trainer.max_steps", "13",
          "--trainer.log_every_n_steps", "2", "--run.root", str(run_root)])  # fmt: skip
    out = capsys.readouterr().out  # Lightning's bars write to stdout
    assert "Training steps" in out and "13/13" in out  # the bar counts optimizer steps toward max_steps
    assert "training FLOPs per token" in out
    rows = _metric_rows(run_root / "gemma_tiny" / "v0")
    rates = [float(r["perf/tokens_per_s"]) for r in rows if r.get("perf/tokens_per_s")]
    assert rates and all(rate > 0 for rate in rates)
    assert not any(r.get("perf/mfu") for r in rows)  # no known peak on a CPU
    validated = [int(r["step"]) for r in rows if r.get("val/loss")]
    trained = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert validated[-1] == trained[-1]  # the last val/loss is of the final weights
    assert len(validated) == 2  # step 10 on schedule and step 13 at the end, nothing twice


@pytest.mark.gpu
@CUDA
def test_compiled_gemma_fits_on_cuda_and_logs_mfu(run_root: Path) -> None:
    main(["fit", "--config", str(CONFIGS / "gemma_tiny.yaml"), *QUIET, "--trainer.max_steps", "12",
          "--trainer.log_every_n_steps", "4", "--model.init_args.compile", "true",
          "--model.init_args.loss_chunk_size", "64", "--run.root", str(run_root)])  # fmt: skip
    rows = _metric_rows(run_root / "gemma_tiny" / "v0")
    mfu = [float(r["perf/mfu"]) for r in rows if r.get("perf/mfu")]
    assert mfu and all(0 < value < 1 for value in mfu)
    assert [r for r in rows if r.get("perf/peak_memory_gib")]
