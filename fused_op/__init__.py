"""
The fused op of csrc/ as the scripts hand it to a model. A model needs to know no more than "a kernel, or None":

    kernel = fused_op.qkv_kernel(device, "ext")   # None: crope.py's code (--kernel torch, and auto for now)
    line = fused_op.use_kernel(model, kernel)     # each layer where the op computes what crope.py's code does

torch.ops.crope.qkv_rotary(x, weight, cos, sin, start_pos, n_rotary, path="default") computes, in one op,
apply_rotary on the first n_rotary features of ComplexLinear(x) at positions start_pos + t: crope.py's
CausalSelfAttention.project_and_rotate, which it stands in for and is checked against. csrc/crope.h lists its CUDA
paths and what each takes; this package: which code runs (here), the op's registration (ops.py), its build and
loading (build.py), its self-check against float64 (check.py).
"""

import copy
import logging
import os
import time

import torch

from crope import ComplexLinear
from fused_op import build
from fused_op.build import one_line
from fused_op.check import mismatch, self_check, tolerance

log = logging.getLogger("crope")

KERNEL_MODES = ("auto", "torch", "ext")  # auto: OP_MEASURED_FASTER; torch: crope.py's code; ext: the op anywhere
# --kernel auto takes the op only where whole steps, measured side by side, showed it faster than crope.py's
# PyTorch path (tools/bench_model.py; csrc/NOTES.md has the measurements, with the card and date):
# {(device name, "train" or "generate"): CUDA path, or None for the op's default}. None has shown that yet (on an
# H200 CRoPE with the op trained the gpu preset at 0.87x RoPE's tokens/s), so auto runs crope.py's code everywhere.
OP_MEASURED_FASTER = {}
CUDA_PATHS = ("decode", "tiled", "pipelined", "cublas")  # the names of the op's CUDA paths (csrc/crope.h)
PROBE_TOKENS = 16  # positions of the probe input that use_kernel compares the op and crope.py's code on

_checked = {}    # device -> None, or why its self-check failed
_noted = set()   # reasons already logged


class KernelError(RuntimeError):
    """The fused op cannot be used as asked (--kernel ext, CROPE_KERNEL=ext), or a mode or path name is unknown.
    The message is one line, fit for `error: ...`."""


def _checked_name(value, allowed, what):
    if value not in allowed:
        raise KernelError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def kernel_mode(mode=None):
    """The kernel mode: `mode`, else CROPE_KERNEL, else "auto"; checked."""
    if mode is None:
        return _checked_name(os.environ.get("CROPE_KERNEL", "auto"), KERNEL_MODES, "CROPE_KERNEL")
    return _checked_name(mode, KERNEL_MODES, "the kernel mode (--kernel or CROPE_KERNEL)")


def device_name(device):
    """The name OP_MEASURED_FASTER knows a device by: the GPU's (torch.cuda.get_device_name), else its type."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def qkv_kernel(device, mode=None, use="train", bias=False):
    """The fused op as a kernel for use_kernel on `device`, or None for crope.py's code.

    mode (default: CROPE_KERNEL, else "auto"): "torch" gives None; "auto" gives the op where OP_MEASURED_FASTER
    names this device for use ("train" or "generate"), else None; "ext" gives the op. The op is loaded (built on
    first use, then cached) and self-checked on the device (once per device); where it cannot run, "ext" is a
    KernelError and "auto" gives None with one log line saying why. CROPE_CUDA_PATH forces one CUDA path (tests,
    benchmarks). The op has no bias. Nothing here times anything: which code runs is decided before a model runs."""
    mode, device = kernel_mode(mode), torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if mode == "torch" or (mode == "auto" and (device_name(device), use) not in OP_MEASURED_FASTER):
        return None
    why = "the fused op has no bias (train with --no-bias)" if bias else build.loaded_or_why()
    if why is None and device.type not in build.state["devices"]:
        why = (f"the crope extension has no {device.type} kernels (a build without nvcc has none for CUDA, "
               "and none exist for MPS)")
    if why is None:
        why = _self_checked(device)
    if why is None:
        forced = os.environ.get("CROPE_CUDA_PATH")
        if forced:
            _checked_name(forced, CUDA_PATHS, "CROPE_CUDA_PATH")
        if forced and device.type == "cuda":  # the CPU has one implementation
            return QKVKernel(forced)
        return QKVKernel(OP_MEASURED_FASTER.get((device_name(device), use)) if device.type == "cuda" else None)
    if mode == "ext":
        raise KernelError(f"--kernel ext (CROPE_KERNEL=ext): {why}; or use --kernel torch (CROPE_KERNEL=torch)")
    if why not in _noted:
        _noted.add(why)
        log.warning("crope: %s; using crope.py's code (CROPE_KERNEL=torch skips the attempt)", why)
    return None


def _self_checked(device):
    """None, or why the op failed its self-check on device; runs it on the first call per device."""
    if str(device) not in _checked:
        start = time.perf_counter()
        _checked[str(device)] = failure = self_check(device)
        if failure is None:
            log.info("crope: the fused op passed its self-check on %s (%.2f s)", device, time.perf_counter() - start)
    failure = _checked[str(device)]
    return None if failure is None else f"the fused op failed its self-check on {device} ({failure})"


class QKVKernel:
    """CRoPE's Q/K/V projection and the rotation of q and k through the op, in the autocast dtype where autocast is
    on. path: a CUDA path for every input on a GPU, or None for the op's default there (decode for a decoding step
    that it takes, cublas otherwise: csrc/crope.h)."""

    def __init__(self, path=None):
        self.path = path

    def __call__(self, x, weight, cos, sin, n_rotary):
        """Rotated q, k and plain v (B, T, out) of x (B, T, in) through the complex weight (out/2, in/2, 2) and the
        tables cos, sin (T, head_size/2) of x's positions."""
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        return torch.ops.crope.qkv_rotary(x, weight, cos, sin, 0, n_rotary, self.path or "default")


# ---------------------------------------------------------------- the op stands in for crope.py's code, checked
def use_kernel(model, kernel):
    """Let kernel stand in for CausalSelfAttention.project_and_rotate in each CRoPE attention layer of model
    (complex-linear Q/K/V without bias) where the op and that method compute the same on a probe input; a layer
    whose crope.py code computes something else (an edited project_and_rotate) keeps that code, with one log
    line. kernel None: every layer runs crope.py's code. Returns the line that says which code computes CRoPE's
    projection."""
    layers = [block.attn for block in model.transformer.h]
    for attn in layers:
        attn.qkv_kernel = None
    takers = [i for i, attn in enumerate(layers) if isinstance(attn.c_attn, ComplexLinear) and attn.c_attn.bias is None]
    if kernel is None or not takers:
        return "CRoPE's Q/K/V projection and rotation: crope.py's code (CausalSelfAttention.project_and_rotate)"
    fused = []
    for i in takers:
        problem = op_differs(layers[i], model.rope_cos[:PROBE_TOKENS], model.rope_sin[:PROBE_TOKENS])
        if problem is None:
            layers[i].qkv_kernel = kernel
            fused.append(i)
        else:
            log.warning("crope: layer %d: crope.py's project_and_rotate and the fused op differ (%s); crope.py's "
                        "code runs there", i, problem)
    if not fused:
        return "CRoPE's Q/K/V projection and rotation: crope.py's code in every layer (it differs from the fused op)"
    on_gpu = model.rope_cos.device.type == "cuda"
    path = f"CUDA path {kernel.path}" if kernel.path else "decode for decoding steps, cublas otherwise" if on_gpu \
        else "C++"
    where = "every layer" if len(fused) == len(takers) else f"layers {', '.join(map(str, fused))} (crope.py's code " \
        "in the others, where it differs from the op)"
    return (f"CRoPE's Q/K/V projection and rotation: the fused op of csrc/ ({path}) in {where}, checked against "
            "crope.py's project_and_rotate")


def op_differs(attn, cos, sin):
    """None, or how the op's q, k, v differ from attn.project_and_rotate's on a probe input, beyond twice the
    tolerance of the layer's dtype (float32 for a model trained under autocast too: the strictest test). The probe
    is a copy of the layer with every parameter drawn at random: an edit that adds a parameter the op knows nothing
    of (a gain, an adapter) differs from the op even where its initial value changes nothing. The op computes on
    its default path, which takes every input: that its other paths compute the same is the self-check's to show.
    Inputs and weights come from a private generator: the caller's random numbers are untouched."""
    probe = copy.deepcopy(attn)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    weight = probe.c_attn.weight.detach()
    x = torch.randn(2, cos.size(0), probe.c_attn.in_features, generator=generator).to(weight)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 on a GPU: its 10 bits would hide an edit of 1%
    try:
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            qk, v = probe.project_and_rotate(x, cos, sin)
            expected = torch.cat((qk, v), dim=-1).double()
            out = torch.ops.crope.qkv_rotary(x, weight, cos, sin, 0, qk.size(-1), "default")
        allowed = 2 * tolerance(weight.dtype, weight.device)
    except Exception as e:  # an edit the op cannot follow (another shape, say)
        return one_line(e)
    finally:
        torch.set_float32_matmul_precision(precision)
    return mismatch(out, expected, allowed, against="crope.py's code")
