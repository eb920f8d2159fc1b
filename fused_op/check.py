"""
The op against crope.py's PyTorch path in float64: the tolerance per dtype, the reference, and the self-check that
every path passes on a device (forward in every dtype, and the backward) before a model may use the op there.
"""

import torch
from torch.nn import functional as F

from crope import apply_rotary, real_block_matrix, rope_frequencies, rotary_tables
from fused_op.build import one_line

# Largest relative error ||op - reference|| / ||reference|| (Frobenius norms) allowed against the float64
# PyTorch path, per dtype, for the tests and the self-check. 16-bit types round every output once (bf16
# keeps 8 significant bits: ~1e-3 from that rounding alone; fp16 11 bits: ~3e-4) and accumulate in fp32;
# float32 differs from float64 in summation order only, unless matmuls may use TF32 (10 bits).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
TF32_TOLERANCE = 5e-3


def tolerance(dtype, device):
    """TOLERANCE[dtype], or TF32_TOLERANCE for float32 on a GPU whose matmuls may use TF32."""
    tf32 = torch.device(device).type == "cuda" and torch.get_float32_matmul_precision() != "highest"
    if dtype == torch.float32 and tf32:
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def self_check(device):
    """Run every path of the op on `device` (on a GPU every path torch.ops.crope.qkv_rotary_paths lists, each
    where its dtype allows; on the CPU its one implementation) forward, and the backward, in every dtype, on small
    inputs against the float64 PyTorch path. Returns None, or "what: why" of the first failure, in one line.

    The shape (3 sequences of 50 tokens, 64 features, 4 heads, positions from 3) gives decode full and partial
    token chunks and the tiled kernels full and partial tiles. Inputs come from a private generator: the caller's
    random numbers are untouched."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    B, T, d, heads, start_pos = 3, 50, 64, 4, 3
    x64 = torch.randn(B, T, d, generator=generator, dtype=torch.float64)
    w64 = torch.randn(3 * d // 2, d // 2, 2, generator=generator, dtype=torch.float64) / d ** 0.5
    grad64 = torch.randn(B, T, 3 * d, generator=generator, dtype=torch.float64)
    cos, sin = (t.to(device) for t in rotary_tables(start_pos + T + 1, rope_frequencies(d // heads, 10000.0)))
    n_rotary = 2 * d
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        x_ref, w_ref = x64.to(device).requires_grad_(), w64.to(device).requires_grad_()
        ref = reference_qkv_rotary(x_ref, w_ref, cos, sin, start_pos, n_rotary)
        ref_grads = torch.autograd.grad(ref, (x_ref, w_ref), grad64.to(device))
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            x, weight, grad = (t.to(device, dtype) for t in (x64, w64, grad64))
            for path in (list(_self_check_paths(x, weight, n_rotary)) or ["default"]) + ["backward"]:
                what = f"{path} {str(dtype).removeprefix('torch.')}"
                try:
                    if path == "backward":
                        outs = _run_backward(grad, x, weight, cos, sin, start_pos, n_rotary)
                        refs = ref_grads
                    else:
                        outs = (_run_path(x, weight, cos, sin, start_pos, n_rotary, path),)
                        refs = (ref,)
                    for out, expected in zip(outs, refs):
                        if (problem := mismatch(out, expected, tolerance(dtype, device))) is not None:
                            return f"{what}: {problem}"
                except Exception as e:  # a crash is a failure of that path, not of the caller
                    return f"{what}: {one_line(e)}"
    return None


def mismatch(out, expected, allowed, against="float64"):
    """None, or how out differs from expected (in float64) beyond the relative error allowed."""
    if out.shape != expected.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    error = ((out.double() - expected).norm() / expected.norm()).item()
    return None if error <= allowed else f"relative error {error:.1e} against {against}, allowed {allowed:.0e}"  # NaN too


def reference_qkv_rotary(x, weight, cos, sin, start_pos, n_rotary):
    """The PyTorch path of the op, in x's dtype: ComplexLinear, then apply_rotary on the first n_rotary features
    (q and k), positions start_pos + t."""
    B, T, _ = x.shape
    y = F.linear(x, real_block_matrix(weight))
    head_size = 2 * cos.size(1)
    rotated = apply_rotary(y[..., :n_rotary].reshape(B, T, -1, head_size), cos[start_pos:start_pos + T],
                           sin[start_pos:start_pos + T])
    return torch.cat((rotated.reshape(B, T, n_rotary), y[..., n_rotary:]), dim=-1)


# The self-check's ways into the op; tests replace them to simulate a broken path.
def _self_check_paths(x, weight, n_rotary):
    return torch.ops.crope.qkv_rotary_paths(x, weight, n_rotary)


def _run_path(x, weight, cos, sin, start_pos, n_rotary, path):
    return torch.ops.crope.qkv_rotary(x, weight, cos, sin, start_pos, n_rotary, path)


def _run_backward(grad, x, weight, cos, sin, start_pos, n_rotary):
    return torch.ops.crope.qkv_rotary_backward(grad, x, weight, cos, sin, start_pos, n_rotary, [True, True])
