"""Peak memory and speed of one training step of a causal LM, with and without the memory options.

    python bench/lm_memory.py --preset gemma2-2b --batch 4 --seq 2048          # one GPU
    python bench/lm_memory.py --preset gemma2-tiny --batch 2 --seq 64 --steps 3  # any machine

For each variant (plain; chunked loss; gradient checkpointing; both) it builds the ``CausalLM`` the CLI builds, on
the device, and trains ``--steps`` steps (after one warm-up) on random tokens with fused AdamW (on CUDA) under bf16
autocast where the device has it, as Lightning's ``bf16-mixed`` does. It prints tokens/s, MFU (6·N·tokens plus
attention, ``CausalLM.training_flops_per_token``, against ``--peak-tflops``; 989 = dense bf16 of an H100/H200) and the peak memory
PyTorch allocated, or ``out of memory``. All variants run in one process, so their ratios are comparable.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.lightning_modules import CausalLM

VARIANTS = {
    "plain": {},
    "chunked loss": {"loss_chunk_size": 4096},
    "checkpointing": {"gradient_checkpointing": True},
    "both": {"gradient_checkpointing": True, "loss_chunk_size": 4096},
}


def run(preset: str, options: dict, batch: int, seq: int, steps: int, device: torch.device, peak: float) -> str:
    torch.manual_seed(0)
    with device:
        model = CausalLM(259, preset=preset, **options).train()
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, 259, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for step in range(steps + 1):
            if step == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with autocast:
                loss = model.lm_loss(ids, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    except torch.OutOfMemoryError:
        return "out of memory"
    finally:
        flops = model.training_flops_per_token(seq) * batch * seq
        del model, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    mfu = f", MFU {flops / seconds / (peak * 1e12):.1%}" if device.type == "cuda" else ""
    return f"{batch * seq / seconds:,.0f} tokens/s{mfu}{memory}, loss {loss.item():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma2-2b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(
        f"{args.preset}, batch {args.batch} x {args.seq}, {args.steps} timed steps on {name}, torch {torch.__version__}"
    )
    for variant in args.variants:
        result = run(args.preset, VARIANTS[variant], args.batch, args.seq, args.steps, device, args.peak_tflops)
        print(f"  {variant:<14} {result}", flush=True)


if __name__ == "__main__":
    main()
