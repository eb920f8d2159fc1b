"""
Time CRoPE's Q/K/V projection (x -> rotated q, k and plain v) alone, side by side in one run:

  op PATH      torch.ops.crope.qkv_rotary (csrc/), projection and rotation in one op. On a GPU once per CUDA path
               that takes the shape (forced through the op's `path` argument); on the CPU its one implementation
  crope torch  the pure-PyTorch path of crope.py: ComplexLinear, then apply_rotary
  rope         the baseline: nn.Linear (twice the weights), then apply_rotary
  GEMM alone   RoPE's projection without the rotation (forward only): the floor a fused op aims at

    python tools/bench_op.py                 # the CPU laptop config, and the GPU shapes when there is a GPU
    python tools/bench_op.py --paths tiled   # only these CUDA paths of the op

Ratios below 1 mean the op is faster. On a GPU the PyTorch paths are compiled, inputs are bf16, and decode shapes
cycle through copies of the weights so that they are read from memory, not from L2; decode shapes are also timed
under CUDA graphs ("fwd graph": one graph of a call per weight copy, so that launch costs drop out). Each row is
printed as it is measured; on a GPU the table ends with the decode target, read off the rows above it. What the
op alone gains is not what a model gains: tools/bench_model.py times whole training steps and generation, and only
that decides where --kernel auto takes the op.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules sit one folder up

import fused_op  # noqa: E402
from crope import ComplexLinear, apply_rotary, real_block_matrix, rope_frequencies, rotary_tables  # noqa: E402
from fused_op import CUDA_PATHS, KernelError  # noqa: E402
from fused_op.check import tolerance  # noqa: E402

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
        return lambda x, w: torch.ops.crope.qkv_rotary(x, w, cos, sin, 0, 2 * d, "default" if path == "cpu" else path)

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


TABLE_HEADER = ("| shape B x T x d / heads | pass | op path | op ms | crope torch ms | rope ms | op / crope torch | "
                "op / rope | GEMM alone ms | op / GEMM | roofline |\n|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(shape, pass_name, path, op, ms, roof):
    cells = []
    for reference in ("crope torch", "rope", "GEMM alone"):  # a reference a CUDA graph could not capture: -
        t = ms.get(reference)
        cells.append((f"{t:.4f}", f"{op / t:.2f}") if t else ("-", "-"))
    return (f"| {shape} | {pass_name} | {path} | {op:.4f} | {cells[0][0]} | {cells[1][0]} | {cells[0][1]} | "
            f"{cells[1][1]} | {cells[2][0]} | {cells[2][1]} | {roof} |")


def bench_device(device, shapes, dtype, compile_torch, rows, only=None):
    """Append one row per (shape, pass, op path) to rows, printing each as it is measured; return the measured
    copy bandwidth (None on the CPU)."""
    bandwidth = flops = None
    if device.type == "cuda":
        bandwidth, flops = ceilings(device)
        print(f"ceilings on {torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, "
              f"bf16 GEMM {flops / 1e12:.0f} TFLOP/s")
    print(TABLE_HEADER, flush=True)
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
            for op in [op for op in ops if op in ms]:  # one row per path of the op, the references repeated
                roof = ""
                if bandwidth and B * T <= 16 and index != 1:
                    weight_bytes = 3 * d * d // 2 * torch.finfo(dtype).bits // 8
                    roof = f"{weight_bytes / bandwidth * 1000 / ms[op]:.0%} of copy bandwidth"
                elif flops and index == 0:
                    roof = f"{2 * B * T * d * 3 * d / flops * 1000 / ms[op]:.0%} of bf16 GEMM rate"
                rows.append((f"{device.type} {B}x{T}x{d}/{heads}", pass_name, op[3:], ms[op], ms, roof))
                print(table_row(*rows[-1]), flush=True)
    return bandwidth


# The decode target on a GPU: the op's fastest path at most this fraction of RoPE's time under CUDA graphs, and at
# least this share of copy bandwidth on the complex weight bytes
DECODE_TARGET = ("cuda 1x1x4096/32", "fwd graph", 0.52, 0.85)


def report_target(rows, bandwidth):
    shape, pass_name, allowed, copy_share = DECODE_TARGET
    candidates = [r for r in rows if r[0] == shape and r[1] == pass_name and "rope" in r[4]]
    if not candidates:
        print(f"target {shape} {pass_name}: not measured")
        return
    _, _, path, op, ms, _ = min(candidates, key=lambda r: r[3])
    ratio = op / ms["rope"]
    d = int(shape.split("x")[2].split("/")[0])
    share = 3 * d * d // 2 * 2 / bandwidth * 1000 / op  # bf16 weight bytes at copy bandwidth
    print(f"target {shape} {pass_name}: fastest op path {path}, {op:.4f} ms = {ratio:.2f} x rope (at most "
          f"{allowed:.2f}): {'met' if ratio <= allowed else 'MISSED'}; {share:.0%} of copy bandwidth (at least "
          f"{copy_share:.0%}): {'met' if share >= copy_share else 'MISSED'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        raise SystemExit(f"error: tools/bench_op.py times the fused op, which is unavailable: {e}")
    print(f"torch {torch.__version__}")
    rows = []
    bench_device(torch.device("cpu"), CPU_SHAPES, torch.float32, False, rows)
    if gpu:
        print(f"\nGPU: {torch.cuda.get_device_name()}")
        bandwidth = bench_device(torch.device("cuda"), GPU_SHAPES, torch.bfloat16, True, rows, only)
        print()
        report_target(rows, bandwidth)


if __name__ == "__main__":
    main()
