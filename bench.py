"""
Time CRoPE's Q/K/V projection (x -> rotated q, k and plain v) side by side in one run:

  op PATH      torch.ops.crope.qkv_rotary (csrc/), projection and rotation in one op. On a GPU once per
               CUDA path that can take the shape (decode, tiled, cublas: forced through the op's `path`
               argument; "(auto)" marks the one the cost model picks); on the CPU its one implementation
               (a GEMM, then one fused rotation loop)
  crope torch  the pure-PyTorch path of crope.py: ComplexLinear, then apply_rotary
  rope         the baseline: nn.Linear (twice the weights), then apply_rotary
  GEMM alone   RoPE's projection without the rotation (forward only): the floor a fused op aims at

    python bench.py                 # the CPU laptop config, and the GPU shapes when there is a GPU
    python bench.py --train_tokens  # also end-to-end training tokens/s of the gpu preset (GPU)

Ratios below 1 mean the op is faster. On a GPU the PyTorch paths are compiled, inputs are bf16, and
decode shapes cycle through copies of the weights so that they are read from memory, not from L2.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.nn import functional as F

from crope import ComplexLinear, apply_rotary, real_block_matrix, rope_frequencies, rotary_tables
from fused_op import KernelError, fused_op_used, fused_qkv_rotary, use_kernel

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


def paths(B, T, d, heads, device, dtype, compile_torch):
    """{name: (forward, forward_and_backward)} closures, each computing rotated q, k and plain v."""
    copies = 8 if B * T <= 16 else 1  # decode: rotate weights so that each call reads them from memory
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
        return lambda x, w: fused_qkv_rotary(x, w, cos, sin, 0, 2 * d, "auto" if path == "cpu" else path)

    fns = {f"op {label}": (op(label.split()[0]), "complex") for label in op_paths(x, weights["complex"][0], 2 * d)}
    fns.update({"crope torch": (crope_torch, "complex"), "rope": (rope, "real"), "GEMM alone": (gemm, "real")})
    out = {}
    for name, (fn, kind) in fns.items():
        if compile_torch and not name.startswith("op"):
            fn = torch.compile(fn)
        out[name] = make_closures(fn, x, weights[kind], grad)
    return out


def op_paths(x, weight, n_rotary):
    """The op's CUDA paths that can take this shape, the cost model's pick first and marked; on the CPU "cpu"."""
    ranked = torch.ops.crope.qkv_rotary_paths(x, weight, n_rotary)
    if not ranked:
        return ["cpu"]
    return [f"{ranked[0]} (auto)"] + ranked[1:]


def make_closures(fn, x, weights, grad):
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

    return forward, forward_backward


def ceilings(device):
    """Measured device copy bandwidth (bytes read + written per second) and bf16 GEMM rate (FLOP/s)."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    gemm_ms = time_ms(lambda: a @ a, device)
    return 2 * src.numel() / (copy_ms / 1000), 2 * 8192 ** 3 / (gemm_ms / 1000)


def bench_device(device, shapes, dtype, compile_torch, rows):
    bandwidth = flops = None
    if device.type == "cuda":
        bandwidth, flops = ceilings(device)
        print(f"ceilings on {torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, "
              f"bf16 GEMM {flops / 1e12:.0f} TFLOP/s")
    for B, T, d, heads in shapes:
        timed = paths(B, T, d, heads, device, dtype, compile_torch)
        ops = [name for name in timed if name.startswith("op")]
        for pass_name, index in (("fwd", 0), ("fwd+bwd", 1)):
            ms = {name: time_ms(closures[index], device) for name, closures in timed.items()
                  if not (name == "GEMM alone" and index == 1)}
            for op in ops:  # one row per path of the op, the references repeated
                roof = ""
                if bandwidth and B * T <= 16 and index == 0:
                    weight_bytes = 3 * d * d // 2 * torch.finfo(dtype).bits // 8
                    roof = f"{weight_bytes / bandwidth * 1000 / ms[op]:.0%} of copy bandwidth"
                elif flops and index == 0:
                    roof = f"{2 * B * T * d * 3 * d / flops * 1000 / ms[op]:.0%} of bf16 GEMM rate"
                rows.append((f"{device.type} {B}x{T}x{d}/{heads}", pass_name, op[3:], ms[op], ms, roof))


def train_tokens_per_second():
    """End-to-end training tokens/s of the gpu preset, CRoPE with the fused op against RoPE."""
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run([sys.executable, "train_shakespeare.py", "--preset", "gpu", "--max_iters", "300",
                                 "--eval_interval", "1000", "--variants", "crope,rope", "--kernel", "ext",
                                 "--out_dir", out], capture_output=True, text=True)
        print(result.stderr[-2000:])
        with open(f"{out}/summary.md") as f:
            print(f.read())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_tokens", action="store_true", help="also time 300 training iterations of the gpu preset")
    args = p.parse_args()
    try:
        use_kernel("ext")
        fused_op_used("cpu")
        gpu = torch.cuda.is_available() and fused_op_used("cuda")  # builds, self-checks
    except KernelError as e:
        raise SystemExit(f"error: bench.py times the fused op, which is unavailable: {e}")
    print(f"torch {torch.__version__}")
    rows = []
    bench_device(torch.device("cpu"), CPU_SHAPES, torch.float32, False, rows)
    if gpu:
        bench_device(torch.device("cuda"), GPU_SHAPES, torch.bfloat16, True, rows)
    print("\n| shape B x T x d / heads | pass | op path | op ms | crope torch ms | rope ms | "
          "op / crope torch | op / rope | GEMM alone ms | op / GEMM | roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, pass_name, path, op, ms, roof in rows:
        gemm = ms.get("GEMM alone")
        gemm_cells = f"{gemm:.4f} | {op / gemm:.2f}" if gemm else "- | -"
        print(f"| {shape} | {pass_name} | {path} | {op:.4f} | {ms['crope torch']:.4f} | {ms['rope']:.4f} | "
              f"{op / ms['crope torch']:.2f} | {op / ms['rope']:.2f} | {gemm_cells} | {roof} |")
    if args.train_tokens and torch.cuda.is_available():
        train_tokens_per_second()


if __name__ == "__main__":
    main()
