"""Training throughput of the TTT-Linear port (125m) beside an equal-size Llama (transformers, SDPA), same run.

    python bench/ttt_lm.py --device cuda                       # batch 8 x 2048, bf16 autocast, AdamW
    python bench/ttt_lm.py --device cpu --batch 1 --seq-len 64 --steps 2 --preset-layers 2

One training step = forward, loss, backward, AdamW step, all under bf16 autocast. Reported: median tokens/s over
``--steps`` timed steps after ``--warmup`` steps (the first step, which includes any compilation, is timed apart and
printed too). Modes of the TTT model:

  eager       plain PyTorch
  chunked     TTTConfig.compile_inner_step with compile_chunk = --chunk: the scan runs as torch.compile'd graphs
              of that many mini-batch steps
  compiled    chunked + torch.compile(model) for everything around the scan
  cudagraph   chunked + the whole training step captured in one CUDA graph (no per-kernel launch cost)
Modes of the Llama: eager, compiled (torch.compile(model)). The loss of the first step (same seed, same batch) is
printed for every run as a cross-check that all modes compute the same model.
Reference points from the issue (one H100): the official PyTorch TTT code ~2,000 tokens/s; Llama ~190,000.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.models.ttt import MAMBA_BACKBONE, TTTConfig, TTTForCausalLM

TTT_MODES = ("eager", "chunked", "compiled", "cudagraph")
LLAMA_MODES = ("eager", "compiled")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--preset-layers", type=int, default=None, help="override num_hidden_layers (small runs)")
    parser.add_argument("--backbone", default="transformer", choices=["transformer", "mamba"])
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on cuda, 1 on cpu")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 2048 on cuda, 128 on cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 cuda, 2 cpu)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=16, help="TTTConfig.compile_chunk of the compiled modes")
    parser.add_argument("--modes", default=None, help=f"TTT modes, comma-separated from {TTT_MODES}")
    parser.add_argument("--llama-modes", default=None, help=f"Llama modes from {LLAMA_MODES}; 'none' to skip")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later runs are skipped after it")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args()


def build_ttt(config: TTTConfig, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return TTTForCausalLM(config).to(device)


def build_llama(config: TTTConfig, seq_len: int, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=max(seq_len, 2048),
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_theta=config.rope_theta,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(llama, attn_implementation="sdpa").to(device)


def make_step(
    model: nn.Module, ids: torch.Tensor, device: torch.device, graph: bool
) -> tuple[Callable[[], torch.Tensor | None], float]:
    """The training-step function and the loss of the first step it ran (for whole-step graphs: in warm-up)."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda, capturable=graph)

    def step() -> torch.Tensor:
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if not graph:
            opt.zero_grad(set_to_none=True)
        return loss

    if not graph:
        first = step().item()
        return step, first
    # whole-step capture (PyTorch docs, "whole network capture"): warm up on a side stream, then record once
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            opt.zero_grad(set_to_none=True)
            loss = step()
            if i == 0:
                first = loss.item()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        step()
    return cuda_graph.replay, first


def measure(name: str, build: Callable[[], nn.Module], mode: str, args, ids, device) -> dict:
    cuda = device.type == "cuda"
    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    if mode == "compiled":
        model = torch.compile(model)
    t0 = time.perf_counter()
    step, first_loss = make_step(model, ids, device, graph=mode == "cudagraph")
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[args.warmup :]
    tokens = ids.numel()
    result = dict(
        model=name,
        mode=mode,
        params=n_params,
        tokens_per_s=tokens / statistics.median(timed),
        step_ms=1e3 * statistics.median(timed),
        first_step_s=first,
        first_loss=first_loss,
        peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    )
    print(
        f"{name:10s} {mode:10s} {result['tokens_per_s']:12,.0f} tokens/s  {result['step_ms']:9.1f} ms/step  "
        f"first loss {first_loss:.5f}  (setup+first step {first:6.1f} s"
        + (f", peak {result['peak_mem_gb']:.1f} GiB)" if cuda else ")"),
        flush=True,
    )
    del model, step
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (8 if cuda else 1)
    args.seq_len = args.seq_len or (2048 if cuda else 128)
    args.steps = args.steps or (5 if cuda else 2)
    modes = (args.modes or (",".join(TTT_MODES) if cuda else "eager")).split(",")
    llama_modes = (args.llama_modes or (",".join(LLAMA_MODES) if cuda else "eager")).split(",")
    if "cudagraph" in modes and not cuda:
        raise SystemExit("--modes cudagraph needs --device cuda")
    overrides = dict(MAMBA_BACKBONE) if args.backbone == "mamba" else {}
    if args.preset_layers:
        overrides["num_hidden_layers"] = args.preset_layers
    base = TTTConfig.from_name(args.preset, **overrides)
    ids = torch.randint(0, base.vocab_size, (args.batch, args.seq_len), device=device)
    print(
        f"{args.preset} ({args.backbone} backbone, {base.num_hidden_layers} layers), batch {args.batch} x "
        f"{args.seq_len} = {ids.numel()} tokens/step, bf16 autocast, AdamW, on "
        f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}",
        flush=True,
    )
    start, results = time.perf_counter(), []
    runs = [("TTT-Linear", m) for m in modes] + [("Llama", m) for m in llama_modes if m != "none"]
    for name, mode in runs:
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            print(f"{name:10s} {mode:10s} skipped (time budget)", flush=True)
            continue
        if name == "Llama":
            build = lambda: build_llama(base, args.seq_len, device)  # noqa: E731
        else:
            config = base.replace(
                compile_inner_step=mode != "eager",
                compile_chunk=args.chunk,
            )
            build = lambda config=config: build_ttt(config, device)  # noqa: E731
        try:
            results.append(measure(name, build, mode, args, ids, device))
        except Exception as err:  # a failing mode must not hide the others' numbers
            print(f"{name:10s} {mode:10s} FAILED: {type(err).__name__}: {str(err)[:500]}", flush=True)
            results.append(dict(model=name, mode=mode, error=f"{type(err).__name__}: {err}"[:2000]))
            if cuda:
                torch.cuda.empty_cache()
    best = {m: max((r["tokens_per_s"] for r in results if r["model"] == m and "tokens_per_s" in r), default=None)
            for m in ("TTT-Linear", "Llama")}  # fmt: skip
    if best["TTT-Linear"] and best["Llama"]:
        print(
            f"best: TTT-Linear {best['TTT-Linear']:,.0f} tokens/s, Llama {best['Llama']:,.0f} tokens/s, "
            f"ratio {best['TTT-Linear'] / best['Llama']:.3f} (goal on one H100: TTT >= 20,000 tokens/s)"
        )
    if args.json:
        payload = dict(args=vars(args), device=torch.cuda.get_device_name(device) if cuda else "cpu", results=results)
        directory = os.path.dirname(os.path.abspath(args.json))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
