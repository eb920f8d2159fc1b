"""
Time CRoPE's Q/K/V projection (x -> rotated q, k and plain v) side by side in one run:

  op PATH      torch.ops.crope.qkv_rotary (csrc/), projection and rotation in one op. On a GPU once per CUDA path
               that takes the shape (forced through the op's `path` argument); on the CPU its one implementation
  crope torch  the pure-PyTorch path of crope.py: ComplexLinear, then apply_rotary
  rope         the baseline: nn.Linear (twice the weights), then apply_rotary
  GEMM alone   RoPE's projection without the rotation (forward only): the floor a fused op aims at

and what `--kernel auto` chooses for each shape (fused_op.chosen_path: measured, kept on disk).

    python bench.py                   # the CPU laptop config, and the GPU shapes when there is a GPU
    python bench.py --train_tokens    # also end-to-end training tokens/s: RoPE, CRoPE by default, CRoPE on the
                                      # PyTorch path and on each op path (the gpu preset on a GPU, cpu on a CPU)
    python bench.py --train_only      # only the end-to-end runs

Ratios below 1 mean the op is faster. On a GPU the PyTorch paths are compiled, inputs are bf16, and decode shapes
cycle through copies of the weights so that they are read from memory, not from L2; decode shapes are also timed
under CUDA graphs ("fwd graph": one graph of a call per weight copy, so that launch costs drop out). The table ends
with the speed targets, each read off the rows above it.
"""

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import fused_op
from crope import ComplexLinear, apply_rotary, real_block_matrix, rope_frequencies, rotary_tables
from fused_op import CUDA_PATHS, KernelError, tolerance

GPU_SHAPES = [(8, 2048, 768, 12), (4, 2048, 4096, 32), (1, 1, 4096, 32), (16, 1, 4096, 32)]
CPU_SHAPES = [(12, 64, 128, 4)]  # the cpu preset: batch 12, block 64, n_embd 128, 4 heads


def time_ms(fn, device, reps=50):
    """Median milliseconds of fn() after warm-up (device events through triton on a GPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=50, rep=200, return_mode="median")
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def weight_copies(B, T):
    """Decode shapes cycle through 8 copies of the weights, so that each call reads them from memory."""
    return 8 if B * T <= 16 else 1


def paths(B, T, d, heads, device, dtype, compile_torch, only=None):
    """{name: closures (make_closures)}, each computing rotated q, k and plain v. Every path of the op (those
    in `only`, if given) is first checked against the PyTorch path, forward and backward, on this shape: one
    that disagrees or fails is reported and left out."""
    copies = weight_copies(B, T)
    complex_layers = [ComplexLinear(d, 3 * d).to(device) for _ in range(copies)]
    real_layers = [torch.nn.Linear(d, 3 * d, bias=False).to(device) for _ in range(copies)]
    cos, sin = (t.to(device) for t in rotary_tables(T, rope_frequencies(d // heads, 10000.0)))
    x = torch.randn(B, T, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, T, 3 * d, device=device, dtype=dtype)
    weights = {"complex": [l.weight.detach().to(dtype).requires_grad_() for l in complex_layers],
               "real": [l.weight.detach().to(dtype).requires_grad_() for l in real_layers]}

    def rotate_qk(qkv):
        qk, v = qkv.split([2 * d, d], dim=-1)
        qk = apply_rotary(qk.view(B, T, 2 * heads, d // heads), cos, sin).view(B, T, 2 * d)
        return torch.cat((qk, v), dim=-1)

    def crope_torch(x, w):
        return rotate_qk(F.linear(x, real_block_matrix(w)))

    def rope(x, w):
        return rotate_qk(F.linear(x, w))

    def gemm(x, w):
        return F.linear(x, w)

    def op(path):  # the fused op forced onto one path ("cpu": the CPU's one implementation)
        return lambda x, w: fused_op.qkv_rotary(x, w, cos, sin, 0, 2 * d, "auto" if path == "cpu" else path)

    fns = {}
    offered = torch.ops.crope.qkv_rotary_paths(x, weights["complex"][0], 2 * d) or ["cpu"]
    for path in offered:
        if only is not None and path not in only:
            continue
        problem = disagreement(op(path), crope_torch, x, weights["complex"][0], grad, 2 * tolerance(dtype, device))
        if problem is None:
            fns[f"op {path}"] = (op(path), "complex")
        else:
            print(f"  {device.type} {B}x{T}x{d}: op path {path} left out: {problem}")
    fns.update({"crope torch": (crope_torch, "complex"), "rope": (rope, "real"), "GEMM alone": (gemm, "real")})
    out = {}
    for name, (fn, kind) in fns.items():
        if compile_torch and not name.startswith("op"):
            fn = torch.compile(fn)
        out[name] = make_closures(fn, x, weights[kind], grad)
    return out


def disagreement(fn, reference, x, w, grad, allowed):
    """None, or how fn's output or gradients differ from reference's beyond `allowed` (relative error in the
    Frobenius norm; both are rounded, so twice a path's tolerance against float64), or how fn failed."""
    try:
        out, ref = fn(x, w), reference(x, w)
        pairs = zip(("output", "dx", "dweight"), (out, *torch.autograd.grad(out, (x, w), grad)),
                    (ref, *torch.autograd.grad(ref, (x, w), grad)))
        for what, a, b in pairs:
            error = ((a.double() - b.double()).norm() / b.double().norm()).item()
            if not error <= allowed:  # NaN too
                return f"{what} relative error {error:.1e} against the PyTorch path, allowed {allowed:.0e}"
    except Exception as e:  # noqa: BLE001: a failing path is reported, the others still timed
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def make_closures(fn, x, weights, grad):
    """forward, forward + backward (each on the next weight copy), and forward on every copy in turn."""
    state = {"i": 0}

    def next_weight():
        state["i"] = (state["i"] + 1) % len(weights)
        return weights[state["i"]]

    def forward():
        with torch.no_grad():
            return fn(x, next_weight())

    def forward_backward():
        w = next_weight()
        return torch.autograd.grad(fn(x, w), (x, w), grad)

    def forward_every_copy():
        with torch.no_grad():
            return [fn(x, w) for w in weights]

    return forward, forward_backward, forward_every_copy


def graph_ms(forward_every_copy, copies, device):
    """Milliseconds per call of forward replayed from a CUDA graph of one call per weight copy; None where
    the path cannot be captured (the reason is printed)."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
            for _ in range(3):
                forward_every_copy()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward_every_copy()
        return time_ms(graph.replay, device) / copies
    except Exception as e:  # noqa: BLE001: report and go on with the other paths
        print(f"  (no CUDA graph: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
        return None


def ceilings(device):
    """Measured device copy bandwidth (bytes read + written per second) and bf16 GEMM rate (FLOP/s)."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    gemm_ms = time_ms(lambda: a @ a, device)
    return 2 * src.numel() / (copy_ms / 1000), 2 * 8192 ** 3 / (gemm_ms / 1000)


def auto_choice(B, T, d, heads, device, dtype, grad, compiled):
    """What --kernel auto takes for this shape (fused_op.chosen_path: measured once, kept on disk)."""
    path = fused_op.chosen_path("auto", compiled, None, str(device), dtype, B, T, d, 3 * d, 2 * d, d // heads // 2,
                                grad)
    return {fused_op.PYTORCH: "crope torch", "auto": "cpu"}.get(path, path)


def bench_device(device, shapes, dtype, compile_torch, rows, only=None):
    """Append one row per (shape, pass, op path) to rows; return the measured ceilings (None on the CPU)."""
    bandwidth = flops = None
    if device.type == "cuda":
        bandwidth, flops = ceilings(device)
        print(f"ceilings on {torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, "
              f"bf16 GEMM {flops / 1e12:.0f} TFLOP/s")
    for B, T, d, heads in shapes:
        timed = paths(B, T, d, heads, device, dtype, compile_torch, only)
        ops = [name for name in timed if name.startswith("op")]
        passes = [("fwd", 0), ("fwd+bwd", 1)] + ([("fwd graph", 2)] if device.type == "cuda" and B * T <= 16 else [])
        for pass_name, index in passes:
            if index == 2:
                ms = {name: graph_ms(closures[2], weight_copies(B, T), device) for name, closures in timed.items()}
                ms = {name: t for name, t in ms.items() if t is not None}
            else:
                ms = {name: time_ms(closures[index], device) for name, closures in timed.items()
                      if not (name == "GEMM alone" and index == 1)}
            auto = auto_choice(B, T, d, heads, device, dtype, index == 1, compile_torch)
            for op in [op for op in ops if op in ms]:  # one row per path of the op, the references repeated
                roof = ""
                if bandwidth and B * T <= 16 and index != 1:
                    weight_bytes = 3 * d * d // 2 * torch.finfo(dtype).bits // 8
                    roof = f"{weight_bytes / bandwidth * 1000 / ms[op]:.0%} of copy bandwidth"
                elif flops and index == 0:
                    roof = f"{2 * B * T * d * 3 * d / flops * 1000 / ms[op]:.0%} of bf16 GEMM rate"
                label = op[3:] + (" (auto)" if op[3:] == auto else "")
                rows.append((f"{device.type} {B}x{T}x{d}/{heads}", pass_name, label, ms[op], ms, roof))
            if auto == "crope torch":
                print(f"  auto takes the PyTorch path on {device.type} {B}x{T}x{d}/{heads} {pass_name}")
    return bandwidth, flops


# The speed targets on a GPU: (shape, pass, which op row, reference, the op's largest time / the reference's,
# smallest share of copy bandwidth on the complex weight bytes)
TARGETS = [("cuda 1x1x4096/32", "fwd graph", "fastest", "rope", 0.52, 0.85),
           ("cuda 8x2048x768/12", "fwd+bwd", "auto", "rope", 1.0, None)]


def report_targets(rows, bandwidth):
    """One line per target: the op's row (its fastest path, or auto's choice), its ratio, and whether it is met."""
    for shape, pass_name, which, reference, allowed, copy_share in TARGETS:
        candidates = [r for r in rows if r[0] == shape and r[1] == pass_name and reference in r[4]
                      and (which == "fastest" or r[2].endswith("(auto)"))]
        if not candidates:
            print(f"target {shape} {pass_name}: not measured" + (" (auto took the PyTorch path)" if which == "auto"
                                                                   else ""))
            continue
        _, _, path, op, ms, _ = min(candidates, key=lambda r: r[3])
        ratio = op / ms[reference]
        line = (f"target {shape} {pass_name}: {which} op path {path}, {op:.4f} ms = {ratio:.2f} x {reference} "
                f"(at most {allowed:.2f}): {'met' if ratio <= allowed else 'MISSED'}")
        if copy_share and bandwidth:
            d = int(shape.split("x")[2].split("/")[0])
            share = 3 * d * d // 2 * 2 / bandwidth * 1000 / op  # bf16 weight bytes at copy bandwidth
            line += f"; {share:.0%} of copy bandwidth (at least {copy_share:.0%}): {'met' if share >= copy_share else 'MISSED'}"
        print(line)


# ----------------------------------------------------------------------------- end to end

def train_arms(device, only=None):
    """The training runs timed side by side: (label, extra flags, extra environment)."""
    arms = [("rope", ["--variants", "rope"], {}),
            ("crope (default: --kernel auto)", ["--variants", "crope"], {}),
            ("crope, PyTorch path", ["--variants", "crope", "--kernel", "torch"], {})]
    if device.type == "cuda":
        arms += [(f"crope, op {path}", ["--variants", "crope", "--kernel", "ext"], {"CROPE_CUDA_PATH": path})
                 for path in CUDA_PATHS if only is None or path in only]
    else:
        arms.append(("crope, op", ["--variants", "crope", "--kernel", "ext"], {}))
    return arms


def train_tokens_per_second(device, iters, only=None):
    """Training tokens/s of the gpu preset (cpu preset on a CPU), one train_shakespeare.py process per arm, in one
    run: tokens over wall seconds between the log rows of iteration iters // 5 and the last training row (so that
    compilation, the first timings of the fused op's paths and the final evaluation do not count)."""
    preset = "gpu" if device.type == "cuda" else "cpu"
    print(f"\nend to end: the {preset} preset, {iters} iterations per run")
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for i, (label, flags, env) in enumerate(train_arms(device, only)):
            folder = Path(out) / str(i)
            command = [sys.executable, "train_shakespeare.py", "--preset", preset, "--max_iters", str(iters),
                       "--eval_interval", str(10 * iters), "--eval_iters", "1", "--log_interval", "10",
                       "--out_dir", str(folder), *flags]
            result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
            if result.returncode != 0:
                print(f"  {label}: failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
                continue
            variant = flags[1]
            results[label] = tokens_per_second(folder / variant / "log.csv", iters // 5)
            chosen = sorted(set(re.findall(r"CRoPE projection on [^:]*: (.*?) \(", result.stdout)))
            print(f"  {label}: {results[label]:,.0f} tokens/s" + (f" ({'; '.join(chosen)})" if chosen else ""))
    if "rope" in results:
        print("\n| run | tokens/s | / rope |\n|---|---|---|")
        for label, rate in results.items():
            print(f"| {label} | {rate:,.0f} | {rate / results['rope']:.2f} |")
        default = results.get("crope (default: --kernel auto)")
        if default:
            ratio = default / results["rope"]
            print(f"\ntarget {preset} preset end to end: CRoPE by default at {ratio:.2f} x RoPE's tokens/s "
                  f"(at least 1.00): {'met' if ratio >= 1.0 else 'MISSED'}")


def tokens_per_second(log_csv, first_iter):
    with open(log_csv, newline="") as f:
        rows = [(int(r["tokens"]), float(r["wall_seconds"])) for r in csv.DictReader(f)
                if r["train_loss"] and int(r["iter"]) >= first_iter]
    (tokens0, t0), (tokens1, t1) = rows[0], rows[-1]
    return (tokens1 - tokens0) / (t1 - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_tokens", action="store_true", help="also time end-to-end training, side by side")
    p.add_argument("--train_only", action="store_true", help="only the end-to-end training runs")
    p.add_argument("--train_iters", type=int, default=300, help="iterations per training run (default 300)")
    p.add_argument("--paths", help="comma-separated CUDA paths of the op to time (default: every one that takes "
                                   "the shape), e.g. to leave out one that crashes")
    args = p.parse_args()
    only = None
    if args.paths:
        only = args.paths.split(",")
        if unknown := [q for q in only if q not in CUDA_PATHS]:
            raise SystemExit(f"error: --paths: unknown {', '.join(unknown)} (known: {', '.join(CUDA_PATHS)})")
    gpu = torch.cuda.is_available()
    try:  # builds, loads and self-checks the op
        fused_op.qkv_kernel("cuda" if gpu else "cpu", "ext")
    except KernelError as e:
        raise SystemExit(f"error: bench.py times the fused op, which is unavailable: {e}")
    print(f"torch {torch.__version__}")
    if args.train_only:
        return train_tokens_per_second(torch.device("cuda" if gpu else "cpu"), args.train_iters, only)
    rows = []
    bench_device(torch.device("cpu"), CPU_SHAPES, torch.float32, False, rows)
    bandwidth = None
    if gpu:
        print(f"GPU: {torch.cuda.get_device_name()}")
        bandwidth, _ = bench_device(torch.device("cuda"), GPU_SHAPES, torch.bfloat16, True, rows, only)
    print("\n| shape B x T x d / heads | pass | op path | op ms | crope torch ms | rope ms | "
          "op / crope torch | op / rope | GEMM alone ms | op / GEMM | roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, pass_name, path, op, ms, roof in rows:
        cells = []
        for reference in ("crope torch", "rope", "GEMM alone"):  # a reference a CUDA graph could not capture: -
            t = ms.get(reference)
            cells.append((f"{t:.4f}", f"{op / t:.2f}") if t else ("-", "-"))
        print(f"| {shape} | {pass_name} | {path} | {op:.4f} | {cells[0][0]} | {cells[1][0]} | {cells[0][1]} | "
              f"{cells[1][1]} | {cells[2][0]} | {cells[2][1]} | {roof} |")
    if gpu:
        print()
        report_targets(rows, bandwidth)
    if args.train_tokens:
        train_tokens_per_second(torch.device("cuda" if gpu else "cpu"), args.train_iters, only)


if __name__ == "__main__":
    main()
