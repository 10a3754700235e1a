"""Forward+backward throughput of our Titans neural memory against lucidrains' titans-pytorch, same process, same shapes.

    python bench/titans.py --device cpu                       # tiny smoke run (batch 1 x 64, dim 64, 2 heads)
    python bench/titans.py --device cuda                      # batch 8 x {1024, 4096}, dim 1024, 16 heads, C {64, 16}
    python bench/titans.py --device cuda --precisions bf16 --seq-lens 4096 --chunks 64 --profile out/

titans-pytorch is not in requirements.txt: ``pip install titans-pytorch==0.5.5`` (it pulls assoc-scan, einx,
tensordict, x-transformers, hyper-connections, rotary-embedding-torch, axial-positional-embedding and their needs; on
a machine without a registry, carry them as wheels and put them on PYTHONPATH). ``--impls ours`` runs without it.

One step is a training step of the memory module alone: ``y = memory(x)``, ``(y.float() * w).sum().backward()`` with a
fixed random ``w`` (gradients reach x, the projections, the gates and M_0, through the inner updates: second order
included, for both). For each (sequence length, chunk size, precision) every implementation takes ``--warmup`` steps,
the first of them measuring its peak memory (``torch.cuda.max_memory_allocated`` over that step, the shared input
included), then the implementations are interleaved step by step for ``--steps`` rounds so that clock or load drift
hits all alike; the median step gives tokens/s (batch x seq / step time). ``ours/theirs`` divides our tokens/s by
titans-pytorch's at the equal-semantics setting. ``fp32`` is plain float32 at PyTorch's default matmul precision
("highest": no TF32); ``bf16`` is ``torch.autocast(bfloat16)`` around the forward.

Implementations (``--impls``):

* ``ours``: ``src.models.titans.NeuralMemory`` with ``TitansConfig(hidden_size=dim, num_heads=heads,
  memory_depth=depth, memory_expansion=expansion, chunk_size=C, max_lr=0.1, gate_granularity="token",
  momentum=True, forgetting=True, use_conv=--conv, inner_grad_clip=--inner-grad-clip)``.
* ``ours-compiled``: the same with ``compile_inner_step=True`` (one chunk's step as a ``torch.compile`` graph; the
  warm-up steps pay for compilation).
* ``theirs``: ``titans_pytorch.NeuralMemory(dim, heads=heads, dim_head=dim // heads, chunk_size=C, batch_size=C,
  momentum=True, activation=SiLU, pre_rmsnorm=False, mem_model_norm_add_residual=False,
  default_step_transform_max_lr=0.1, store_memory_loss_fn=sum of squares, model=a SiLU MemoryMLP of the same
  depth and expansion)``, with its ``q_norm``/``k_norm`` modules replaced by an ℓ2 normalisation (below). ``batch_size=C`` refreshes the weights the inner gradients are taken at after every chunk,
  i.e. the paper's (and our) "gradients at the chunk-start weights"; it makes titans-pytorch run one
  ``store_memories`` call (one vmap(grad) over batch x heads) per chunk, a Python loop like ours.
* ``theirs-m0``: the same with ``batch_size=None``, titans-pytorch's default: every chunk's gradient is taken at
  M_0 (no non-linear recurrence between chunks; one vmap(grad) over all chunks and one associative scan). A
  *different* model (much less sequential work), shown for reference only; no ratio is taken against it.

What is equal: width, heads (d_h = dim / heads), a bias-free MLP memory of the same depth and expansion with SiLU,
M_0 learned per head, SiLU on q/k/v, normalised q and k, per-token θ_t = 0.1·σ(linear(x_t)) weighting each token's
loss, momentum (η) and decay/forgetting (α) on, the loss ||M(k) − v||² summed over features (titans-pytorch's
default ``(pred − v)².mean(-1)`` is replaced by the sum, so both take the paper's Eq. 12 step size), one output
projection.

What still differs (semantics and extra work, on their side unless said):

* Granularity of the update. Ours: M_t and S_t change every token inside a chunk (momentum and decay act token by
  token; retrieval y_t = M_t(q_t) reads the weights after token t, through the dual form). Theirs: the θ-weighted
  gradients of a chunk are summed into one update, so momentum and decay act once per chunk, and token p reads the
  weights after the last complete chunk ending at or before p (tokens inside a chunk read stale weights; the last
  token of a chunk reads that chunk's update).
* η and α: ours per token from x_t; theirs per chunk, σ(linear(mean of the chunk's x)). θ is per token in both.
* Memory MLP: titans-pytorch's ``MemoryMLP`` uses GELU and, by default, a ``ResidualNorm`` wrapper
  (M(x) = LN(MLP(x))·(γ+1) + x, the TTT-style residual). We pass our own 2-layer bias-free SiLU MLP (same weight
  shapes, xavier init as theirs) and switch the wrapper off (``mem_model_norm_add_residual=False``): the closest
  match to ours, M(k) = SiLU(k W_1) W_2.
* q/k normalisation: equal (ℓ2, F.normalize per head), but only because the bench swaps titans-pytorch's
  ``q_norm``/``k_norm`` (identity by default) for an ℓ2 norm. Its own option, ``qk_rmsnorm``, is an RMSNorm with a
  learned per-head gain, |k| = √d_h·(γ+1): the inner step 2θ|k|² is then d_h times ours, and with θ ≤ 0.1 and the
  summed loss the memory diverged to NaN within 64 tokens (CPU smoke, d_h 32).
* Theirs has a per-head sigmoid retrieve gate (linear dim -> heads) before the output merge; ours has none.
* Ours has a per-token inner-gradient clip (``TitansConfig.inner_grad_clip``, default 2.0 since 63595bc); the
  bench switches it off unless ``--inner-grad-clip`` is given. titans-pytorch's nearest, ``max_grad_norm``, soft-clamps
  the norm of a whole chunk's summed gradient, and is off by default.
* Ours has the paper's depthwise causal conv on q/k/v (§4.4) when ``--conv`` is given; off by default here, as
  titans-pytorch has none. Their input RMSNorm (``pre_rmsnorm``) is switched off, as ours has none.
* Inner gradients: ours in closed form (explicit backprop of the MLP, outer products folded into the dual form);
  theirs through ``torch.func.vmap(grad(functional_call))``. Both are differentiated again by autograd.
* Initialisation (M_0 xavier vs our N(0, 1/fan_in); their gate biases are PyTorch's default vs ours 0, 0, −8): no
  effect on speed, but it does on stability: their α ≈ σ(0) = 1/2 per chunk damps the memory hard, ours ≈ 3e-4.
* bf16 on CUDA: assoc_scan's ``torch.jit.script`` scan operator fails there (TorchScript's fuser emits a CUDA kernel
  ``fused__autocast_to_...`` for the bf16 gate times fp32 values that does not run); the bench then reruns that case
  with the same operator in eager mode (marked "eager scan op"). fp32 runs the operator as shipped.

``--check`` first runs both in float64 on the CPU with our parameters copied into titans-pytorch (retrieve gate
zeroed, output projection doubled to cancel its σ(0) = 1/2): at C = 1, where the two define the same function, y and
dL/dx agreed to 5e-17 and 4e-16 (max |y| 0.056, |dx| 0.40); at C = 4 they differ by O(1), as they should.

Measured on one H200 (torch 2.11.0+cu130, titans-pytorch 0.5.5), batch 8, dim 1024, 16 heads, depth 2 x2, bf16,
2 warm-up + 5 timed steps (median), in one run (``--impls ours ours-compiled theirs --precisions bf16``):

    seq   C   ours tok/s (GiB)   ours-compiled (GiB)   theirs (GiB)       ours/theirs  compiled/theirs
    1024  64   54,661 (1.91)*    148,013 (1.64)*       39,421 (3.05)      1.39         3.75
    1024  16   16,743 (3.19)      42,961 (2.71)        11,555 (21.74)     1.45         3.72
    4096  64   56,889 (7.50)*    150,507 (6.15)*       42,379 (23.41)     1.34         3.55
    4096  16   20,472 (12.47)     52,049 (10.47)       out of memory      -            -

and with our default clip on (``--inner-grad-clip 2``, seq 4096, C = 64, a second run on the same machine): ours
73,727 tokens/s (7.98 GiB), ours-compiled 185,522 (6.41), theirs 49,229 (23.45): 3.77x, every output finite.

``*``: our output was not finite. Without the clip, at C = 64 on these N(0, 1) inputs, the inner loop diverges at
init (64 gradients taken at the same weights, summed through token-level momentum with θ ≈ 0.05 and almost no
decay); C = 16 stays finite; speed does not depend on it. The eager form is launch-bound (torch.profiler: GPU kernel
time 4-10% of the step, about 390 kernels per chunk forward and backward), which is what compiling the chunk step
removes; titans-pytorch is launch-bound too (4-9%).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.models.titans import NeuralMemory, TitansConfig

MAX_LR = 0.1


class SiLUMemoryMLP(nn.Module):
    """titans-pytorch's ``MemoryMLP`` (bias-free weights d -> e·d -> ... -> d, xavier init) with SiLU instead of GELU
    between the layers: the same function as our memory, M(k) = SiLU(k W_1) W_2 for depth 2."""

    def __init__(self, dim: int, depth: int, expansion: int) -> None:
        super().__init__()
        dims = (dim, *((dim * expansion,) * (depth - 1)), dim)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(a, b)) for a, b in itertools.pairwise(dims))
        for w in self.weights:
            nn.init.xavier_uniform_(w)

    def forward(self, x: Tensor) -> Tensor:
        for i, w in enumerate(self.weights):
            if i:
                x = F.silu(x)
            x = x @ w
        return x


class L2Norm(nn.Module):
    """q, k <- q/|q|, k/|k| over the head features: our normalisation, put in place of titans-pytorch's q/k norms."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


def sum_squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """||pred − target||² per token, summed over features (the paper's Eq. 12, as ours); titans-pytorch averages."""
    return (pred - target).pow(2).sum(dim=-1)


def build(impl: str, args: argparse.Namespace, chunk: int) -> nn.Module:
    """The module of ``impl`` on args.device; ``module(x)[0]`` is y for both."""
    if impl.startswith("ours"):
        config = TitansConfig(
            hidden_size=args.dim,
            num_heads=args.heads,
            memory_depth=args.depth,
            memory_expansion=args.expansion,
            chunk_size=chunk,
            use_conv=args.conv,
            max_lr=MAX_LR,
            gate_granularity="token",
            momentum=True,
            forgetting=True,
            inner_grad_clip=args.inner_grad_clip,
            compile_inner_step=impl == "ours-compiled",
        )
        return NeuralMemory(config).to(args.device)
    import titans_pytorch

    theirs = titans_pytorch.NeuralMemory(
        args.dim,
        chunk_size=chunk,
        batch_size=chunk if impl == "theirs" else None,
        dim_head=args.dim // args.heads,
        heads=args.heads,
        model=SiLUMemoryMLP(args.dim // args.heads, args.depth, args.expansion),
        store_memory_loss_fn=sum_squared_error,
        default_step_transform_max_lr=MAX_LR,
        momentum=True,
        activation=nn.SiLU(),
        pre_rmsnorm=False,
        mem_model_norm_add_residual=False,
        use_accelerated_scan=args.accelerated_scan,
    )
    # Unit-norm q and k as ours. Its own option, qk_rmsnorm, gives |k| = √d_h: the inner step 2θ|k|² is then d_h times
    # ours and the memory diverges within a few chunks (NaN at 64 tokens with θ ≤ 0.1 and the summed loss).
    theirs.q_norm, theirs.k_norm = L2Norm(), L2Norm()
    return theirs.to(args.device)


@torch.no_grad()
def copy_ours_into_theirs(ours: nn.Module, theirs: nn.Module) -> None:
    """Give titans-pytorch our parameters: q/k/v, gates, M_0 and the output projection. Its retrieve gate gets zero
    weights (σ(0) = 1/2 for every head) and its output projection twice ours, which cancels that 1/2."""
    d, h = ours.config.hidden_size, ours.config.num_heads
    for i, lin in enumerate((theirs.to_queries[0], theirs.to_keys[0], theirs.to_values[0])):
        lin.weight.copy_(ours.qkv.weight[i * d : (i + 1) * d])
    for i, seq in enumerate((theirs.to_adaptive_step, theirs.to_momentum, theirs.to_decay_factor)):
        seq[0].weight.copy_(ours.gates.weight[i * h : (i + 1) * h])
        seq[0].bias.copy_(ours.gates.bias[i * h : (i + 1) * h])
    for mine, their in zip(ours.memory_init, theirs.memory_model_parameters, strict=True):
        their.copy_(mine)
    theirs.retrieve_gate[0].weight.zero_()
    theirs.combine_heads.weight.copy_(2 * ours.out.weight)


def parity_check(args: argparse.Namespace) -> None:
    """Ours and titans-pytorch ("theirs" setting) with the same parameters, in float64 on the CPU: at C = 1 the two
    define the same function (token-level momentum, decay and retrieval), so y and dL/dx must agree to rounding; at
    C > 1 they differ by the update granularity (module docstring) and the gap is printed for information."""
    check = argparse.Namespace(
        **{**vars(args), "device": "cpu", "dim": 32, "heads": 2, "conv": False, "inner_grad_clip": None}
    )
    for chunk in (1, 4):
        torch.manual_seed(0)
        ours = build("ours", check, chunk).double()
        with torch.no_grad():  # gates that vary from token to token, so that the check is not of constants
            ours.gates.weight.normal_(std=1.0)
            ours.gates.bias.normal_(std=1.0)
            ours.qkv.weight.normal_(std=0.5)
        theirs = build("theirs", check, chunk).double()
        copy_ours_into_theirs(ours, theirs)
        x = torch.randn(2, 24, check.dim, dtype=torch.float64, requires_grad=True)
        w = torch.randn_like(x)
        out = []
        for module in (ours, theirs):
            y = module(x)[0]
            (gx,) = torch.autograd.grad((y * w).sum(), x)
            out.append((y, gx))
        (y0, g0), (y1, g1) = out
        print(
            f"parity C={chunk} (float64, batch 2 x 24, dim 32, 2 heads): max|y_ours - y_theirs| = "
            f"{(y0 - y1).abs().max().item():.2e} (max|y| ours {y0.abs().max().item():.2e}, theirs "
            f"{y1.abs().max().item():.2e}), max|dx_ours - dx_theirs| = {(g0 - g1).abs().max().item():.2e} "
            f"(max|dx| ours {g0.abs().max().item():.2e}, theirs {g1.abs().max().item():.2e})",
            flush=True,
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=["ours", "ours-compiled", "theirs", "theirs-m0"],
        choices=["ours", "ours-compiled", "theirs", "theirs-m0"],
    )
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on cuda, 1 on cpu")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default: 1024 4096 on cuda, 64 on cpu")
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=None, help="chunk sizes C (default: 64 16 cuda, 8 cpu)"
    )
    parser.add_argument("--dim", type=int, default=None, help="default: 1024 on cuda, 64 on cpu")
    parser.add_argument("--heads", type=int, default=None, help="default: 16 on cuda, 2 on cpu")
    parser.add_argument("--depth", type=int, default=2, help="memory MLP depth")
    parser.add_argument("--expansion", type=int, default=2, help="memory MLP expansion (hidden width = e * d_h)")
    parser.add_argument(
        "--precisions", nargs="+", default=None, choices=["bf16", "fp32"], help="default: bf16 fp32 cuda, fp32 cpu"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default: 5 cuda, 2 cpu)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--inner-grad-clip",
        type=float,
        default=None,
        help="our per-token inner-gradient clip τ (TitansConfig.inner_grad_clip, whose default is "
        f"{TitansConfig.inner_grad_clip}); off by default here, as titans-pytorch has no equivalent",
    )
    parser.add_argument("--conv", action="store_true", help="our depthwise q/k/v conv on (titans-pytorch has none)")
    parser.add_argument("--accelerated-scan", action="store_true", help="titans-pytorch use_accelerated_scan (triton)")
    parser.add_argument(
        "--theirs-scan",
        default="jit",
        choices=["jit", "eager"],
        help="assoc_scan's operator as shipped (torch.jit.script) or in eager mode; jit falls back to eager per case "
        "when it fails",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads on --device cpu (shared machines)")
    parser.add_argument("--check", action="store_true", help="first a float64 CPU parity check of the two at C = 1")
    parser.add_argument(
        "--profile", type=Path, default=None, help="write torch.profiler tables of 1 step per case here"
    )
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (8 if cuda else 1)
    args.seq_lens = args.seq_lens or ([1024, 4096] if cuda else [64])
    args.chunks = args.chunks or ([64, 16] if cuda else [8])
    args.dim = args.dim or (1024 if cuda else 64)
    args.heads = args.heads or (16 if cuda else 2)
    args.precisions = args.precisions or (["bf16", "fp32"] if cuda else ["fp32"])
    args.steps = args.steps or (5 if cuda else 2)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_case(label: str, step: Callable[..., float], device: torch.device, out: Path) -> None:
    """One profiled step, appended to ``out/profile_<impl>.txt``: its wall time, the GPU kernel time and kernel
    launches inside it (how far the GPU is kept busy), the heaviest kernels and the heaviest CPU-side operators."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        step()
    sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    text = [f"\n=== {label}: {wall * 1e3:.1f} ms/step wall (profiled)"]
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.self_device_time_total for e in kernels)
        launches = sum(e.count for e in events if "LaunchKernel" in e.key)
        text[0] += (
            f", GPU kernels {busy_us / 1e3:.1f} ms ({100 * busy_us / 1e6 / wall:.0f}% of wall), "
            f"{sum(e.count for e in kernels)} kernels, {launches} kernel launches"
        )
        text.append(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
    text.append(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"profile_{label.split()[0]}.txt").open("a") as f:
        f.write("\n".join(text) + "\n")


def eager_binary_operator(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """assoc_scan's scan operator (a torch.jit.script function) in plain eager PyTorch: the same arithmetic, gates
    cast to the dtype of the values they scale (which eager type promotion would give anyway)."""
    a_i, kv_i = a
    a_j, kv_j = b
    return a_j * a_i, torch.addcmul(kv_j, a_j.to(kv_j.dtype), kv_i)


def set_scan_operator(kind: str) -> None:
    """titans-pytorch's associative scan calls ``assoc_scan.assoc_scan.binary_operator`` by its module-level name."""
    import assoc_scan.assoc_scan as scan_module

    if not hasattr(scan_module, "_jit_binary_operator"):
        scan_module._jit_binary_operator = scan_module.binary_operator
    scan_module.binary_operator = scan_module._jit_binary_operator if kind == "jit" else eager_binary_operator


def run_case(args: argparse.Namespace, seq: int, chunk: int, precision: str) -> dict[str, dict[str, float | str]]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    x = torch.randn(args.batch, seq, args.dim, device=device, requires_grad=True)
    w = torch.randn_like(x)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    results: dict[str, dict[str, float | str]] = {}

    def make_step(module: nn.Module) -> Callable[..., float]:
        def step(check: bool = False) -> float:
            x.grad = None
            module.zero_grad(set_to_none=True)
            sync(device)
            start = time.perf_counter()
            with autocast:
                y = module(x)[0]
            (y.float() * w).sum().backward()
            sync(device)
            elapsed = time.perf_counter() - start
            if check:
                finite_y, finite_dx = bool(torch.isfinite(y).all()), bool(torch.isfinite(x.grad).all())
                step.finite = "yes" if finite_y and finite_dx else f"NO ({'y' if not finite_y else 'dx'})"
            return elapsed

        step.finite = "-"
        return step

    def warm_up(impl: str) -> Callable[..., float]:
        torch.manual_seed(0)
        step = make_step(build(impl, args, chunk))
        for i in range(args.warmup):
            if cuda and i == 0:
                torch.cuda.reset_peak_memory_stats(device)
            step(check=i == 0)
            if cuda and i == 0:
                results[impl]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return step

    steps: dict[str, Callable[..., float]] = {}
    for impl in args.impls:
        results[impl] = {}
        if impl.startswith("theirs"):
            set_scan_operator(args.theirs_scan)
        try:
            try:
                steps[impl] = warm_up(impl)
            except RuntimeError as error:
                if not (impl.startswith("theirs") and args.theirs_scan == "jit" and "TorchScript" in str(error)):
                    raise
                # assoc_scan's torch.jit.script operator failed (seen under CUDA bf16 autocast): say why, then run
                # the same arithmetic in eager mode for this case.
                lines = [line for line in str(error).splitlines() if line.strip()]
                print(f"  {impl}: the TorchScript scan operator failed; retrying with it in eager mode. Error:")
                print("    " + "\n    ".join([*lines[:4], "...", *lines[-2:]]), flush=True)
                free(device)
                set_scan_operator("eager")
                results[impl] = {"note": "eager scan op"}
                steps[impl] = warm_up(impl)
        except torch.OutOfMemoryError:
            results[impl] = {"error": "out of memory"}
            steps.pop(impl, None)
            free(device)
        except Exception as error:  # a failing path of one implementation must not hide the others' numbers
            results[impl] = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:160]}"}
            print(f"  {impl} failed:\n    " + "\n    ".join(str(error).strip().splitlines()[-6:]), flush=True)
            steps.pop(impl, None)
            free(device)
        if impl in steps:
            results[impl]["finite"] = steps[impl].finite
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for _ in range(args.steps):
        for impl in list(steps):
            try:
                times[impl].append(steps[impl]())
            except torch.OutOfMemoryError:
                results[impl] = {"error": "out of memory"}
                steps.pop(impl)
                free(device)
    for impl, ts in times.items():
        if impl in steps and ts:
            median = statistics.median(ts)
            results[impl].update(ms=median * 1e3, tokens_per_s=args.batch * seq / median)
    if args.profile is not None:
        for impl, step in steps.items():
            try:
                profile_case(f"{impl} seq={seq} C={chunk} {precision}", step, device, args.profile)
            except Exception as error:  # the profile is an extra: never lose the timings to it
                print(f"  profile of {impl} failed: {type(error).__name__}: {error}", flush=True)
    del steps
    free(device)
    if any(impl.startswith("theirs") for impl in args.impls):
        set_scan_operator(args.theirs_scan)
    return results


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if any(impl.startswith("theirs") for impl in args.impls):
        import titans_pytorch  # noqa: F401  (fail early, before any timing, if it is not installed)
    if args.check:
        parity_check(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        theirs_version = importlib.metadata.version("titans-pytorch")
    except importlib.metadata.PackageNotFoundError:
        theirs_version = "not installed"
    print(
        f"Titans neural memory fwd+bwd on {name}, torch {torch.__version__}, titans-pytorch {theirs_version}: "
        f"batch {args.batch}, dim {args.dim}, {args.heads} heads (d_h {args.dim // args.heads}), memory MLP depth "
        f"{args.depth} x{args.expansion}, our conv {'on' if args.conv else 'off'}, our inner-grad clip {args.inner_grad_clip}, "
        f"{args.warmup} warm-up + "
        f"{args.steps} timed steps (median)",
        flush=True,
    )
    rows = []
    for precision in args.precisions:
        for seq in args.seq_lens:
            for chunk in args.chunks:
                results = run_case(args, seq, chunk, precision)
                theirs = results.get("theirs", {})
                for impl, r in results.items():
                    ratio = (
                        f"{r['tokens_per_s'] / theirs['tokens_per_s']:.2f}"
                        if impl.startswith("ours") and "tokens_per_s" in r and "tokens_per_s" in theirs
                        else ""
                    )
                    if "error" in r:
                        cells = [str(r["error"]), "", "", "", ""]
                    else:
                        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
                        cells = [
                            f"{r['ms']:.1f}",
                            f"{r['tokens_per_s']:,.0f}",
                            peak,
                            ratio,
                            str(r["finite"]),
                        ]
                    label = f"{impl} ({r['note']})" if "note" in r else impl
                    rows.append([str(seq), str(chunk), precision, label, *cells])
                    print("  " + " | ".join(rows[-1]), flush=True)
    header = ["seq", "C", "precision", "impl", "ms/step", "tokens/s", "peak GiB", "ours/theirs", "finite"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
