"""Forward+backward throughput of one TTT layer at 125m shapes, with and without plasticity capture.

    python bench/ttt_layer.py --device cpu --batch 1 --seq-len 512 --steps 3
    python bench/ttt_layer.py --device cuda            # batch 8 x 2048 tokens, bf16 autocast

Prints tokens/s for capture off and on and their ratio (goal: on/off time ratio <= 1.05). The two modes are
interleaved step by step so that clock or load drift hits both alike; the median step time is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.models.ttt import TTTMLP, TTTConfig, TTTLinear


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="125m", help="TTTConfig preset giving the layer shapes")
    parser.add_argument("--layer-type", default="linear", choices=["linear", "mlp"])
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on cuda, 1 on cpu")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 2048 on cuda, 512 on cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default: 20 cuda, 3 cpu)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-autocast", action="store_true", help="run in float32 instead of bf16 autocast")
    parser.add_argument("--compile-inner-step", action="store_true", help="TTTConfig.compile_inner_step")
    parser.add_argument("--compile-chunk", type=int, default=16, help="TTTConfig.compile_chunk")
    parser.add_argument("--compile-mode", default="default", help="TTTConfig.compile_mode")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (8 if cuda else 1)
    seq_len = args.seq_len or (2048 if cuda else 512)
    steps = args.steps or (20 if cuda else 3)
    config = TTTConfig.from_name(
        args.preset,
        ttt_layer_type=args.layer_type,
        compile_inner_step=args.compile_inner_step,
        compile_chunk=args.compile_chunk,
    )
    torch.manual_seed(0)
    layer = (TTTLinear if args.layer_type == "linear" else TTTMLP)(config, 0).to(device)
    x = torch.randn(batch, seq_len, config.hidden_size, device=device, requires_grad=True)
    weights = torch.randn_like(x)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast)

    def step(capture: bool) -> float:
        layer.capture = capture
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            out = layer(x)
        (out.float() * weights).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        layer.plasticity = None
        return elapsed

    for _ in range(args.warmup):
        step(False)
        step(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(steps):
        for capture in (False, True):
            times[capture].append(step(capture))
    tokens = batch * seq_len
    off, on = statistics.median(times[False]), statistics.median(times[True])
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(
        f"TTT-{args.layer_type} layer {args.preset} (C={config.hidden_size}, H={config.num_attention_heads}, "
        f"K={config.mini_batch_size}) on {name}, batch {batch} x {seq_len}, "
        f"{'fp32' if args.no_autocast else 'bf16 autocast'}, compile_inner_step={args.compile_inner_step} (chunk {args.compile_chunk}, {args.compile_mode}), "
        f"{steps} steps (median)"
    )
    print(f"  capture off: {tokens / off:12,.0f} tokens/s  ({off * 1e3:8.2f} ms/step fwd+bwd)")
    print(f"  capture on:  {tokens / on:12,.0f} tokens/s  ({on * 1e3:8.2f} ms/step fwd+bwd)")
    print(f"  overhead ratio (on/off time): {on / off:.3f}   goal <= 1.05")


if __name__ == "__main__":
    main()
