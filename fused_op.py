"""
The fused op of csrc/, torch.ops.crope.qkv_rotary, as the scripts hand it to a model: how it is built and loaded,
the self-check every path passes on a device before it may train a model there, the measurement that picks the
fastest way to compute each kind of input, and what torch.compile and autograd need to know of it.

    torch.ops.crope.qkv_rotary(x, weight, cos, sin, start_pos, n_rotary, path="auto")

computes, in one op, apply_rotary on the first n_rotary features of ComplexLinear(x) at positions start_pos + t,
with a C++ implementation for the CPU and CUDA kernels for GPUs (csrc/crope.h lists the paths). The PyTorch path of
crope.py is the reference it is tested against, and the fallback wherever the op cannot be built, fails its
self-check, or is slower.

    kernel = fused_op.qkv_kernel(device)      # None where the op cannot run (one log line says why)
    model.use_qkv_kernel(kernel)              # crope.py's GPT: its CRoPE attention layers call the kernel
"""

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from crope import apply_rotary, real_block_matrix

log = logging.getLogger("crope")

KERNEL_MODES = ("auto", "torch", "ext")  # auto: the fastest of the op and PyTorch; ext: the op; torch: PyTorch
CUDA_PATHS = ("decode_v2", "tiled", "tiled_v2", "cublas")  # the op's paths on a GPU (csrc/crope.h)
# What each CUDA path takes, as csrc/crope.h's *_takes say it: a forced path is refused here, before the op is called.
PATH_TAKES = {
    "decode_v2": (lambda dtype, k, n: dtype in (torch.float32, torch.bfloat16, torch.float16)
                  and k * dtype.itemsize % 16 == 0 and k * dtype.itemsize <= 32768,
                  "float32, bfloat16 or float16 with in_features a multiple of 8 (4 in float32) and at most 16384 "
                  "(8192 in float32)"),
    "tiled": (lambda dtype, k, n: dtype in (torch.bfloat16, torch.float16) and k % 32 == 0,
              "bfloat16 or float16 with in_features a multiple of 32"),
    "tiled_v2": (lambda dtype, k, n: dtype in (torch.bfloat16, torch.float16) and k % 8 == 0 and n % 8 == 0,
                 "bfloat16 or float16 with in_features and out_features multiples of 8"),
    "cublas": (lambda dtype, k, n: True, "every input"),
}
# Largest relative error ||op - reference|| / ||reference|| (Frobenius norms) allowed against the float64
# PyTorch path, per dtype, for the tests and the self-check. 16-bit types round every output once (bf16
# keeps 8 significant bits: ~1e-3 from that rounding alone; fp16 11 bits: ~3e-4) and accumulate in fp32;
# float32 differs from float64 in summation order only, unless matmuls may use TF32 (10 bits).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
TF32_TOLERANCE = 5e-3
# Inputs are timed per kind: up to 8 tokens (a decoding step; decode_v2 streams the weights once per 8 tokens),
# up to 512, and more. The first input of a kind is timed, and its choice serves the whole kind.
TOKEN_KINDS = ((8, "decode"), (512, "few tokens"), (float("inf"), "many tokens"))
PYTORCH, CPU_OP = "pytorch", "op"  # candidates beside the op's CUDA paths: the PyTorch path; the op on a CPU
_BUILD_WAIT_S = 1800  # the longest a run waits for another process building the op

_state = {
    "loaded": False, "failure": None,  # the extension: loaded, or why not
    "devices": (),                     # device types the loaded op has kernels for
    "checked": {},                     # device -> None, or why its self-check failed
    "choices": {},                     # chosen_path's key -> the path it chose
    "noted": set(),                    # reasons already logged
}


class KernelError(RuntimeError):
    """The fused op cannot be used as asked (--kernel ext, CROPE_KERNEL=ext, a forced path that does not take the
    input), or a mode or path name is unknown. The message is one line, fit for `error: ...`."""


def _checked(value, allowed, what):
    if value not in allowed:
        raise KernelError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def kernel_mode(mode=None):
    """The kernel mode: `mode`, else CROPE_KERNEL, else "auto"; checked."""
    if mode is None:
        return _checked(os.environ.get("CROPE_KERNEL", "auto"), KERNEL_MODES, "CROPE_KERNEL")
    return _checked(mode, KERNEL_MODES, "the kernel mode (--kernel or CROPE_KERNEL)")


# ---------------------------------------------------------------- what the scripts hand to the model
def qkv_kernel(device, mode=None, compiled=False, bias=False):
    """The fused op as a kernel for GPT.use_qkv_kernel on `device`, or None for the PyTorch path.

    mode (default: CROPE_KERNEL, else "auto"): "torch" gives None. "auto" loads the op (built on first use, then
    cached), checks that it has kernels for the device and passes its self-check there (once per device), and
    gives a kernel that times the op's paths and the PyTorch path on each kind of input and takes the fastest;
    anything that stops the op gives None, with one log line saying why. "ext" does the same but times the op's
    paths only, and anything that stops the op is a KernelError. compiled: the model runs under torch.compile (the
    PyTorch path is then timed compiled too). The op has no bias."""
    mode, device = kernel_mode(mode), torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if mode == "torch":
        return None
    why = "the fused op has no bias (use --no-bias, or --kernel torch)" if bias else _load()
    if why is None and device.type not in _state["devices"]:
        why = (f"the crope extension has no {device.type} kernels (a build without nvcc has none for CUDA, "
               "and none exist for MPS)")
    if why is None:
        why = _self_checked(device)
    if why is None:
        forced = os.environ.get("CROPE_CUDA_PATH", "auto")
        return QKVKernel(mode, compiled, None if forced == "auto" else _checked(forced, CUDA_PATHS, "CROPE_CUDA_PATH"))
    if mode == "ext":
        raise KernelError(f"--kernel ext (CROPE_KERNEL=ext): {why}; or use --kernel torch")
    if why not in _state["noted"]:
        _state["noted"].add(why)
        log.warning("crope: %s; using the PyTorch path (CROPE_KERNEL=torch skips the attempt)", why)
    return None


class QKVKernel:
    """CRoPE's Q/K/V projection and the rotation of q and k, through the op on the path measured fastest for each
    kind of input (chosen_path), or left to the model's PyTorch path (None) where that is faster.
    forced_path (CROPE_CUDA_PATH, for tests and benchmarks): that CUDA path for every input on a GPU, unmeasured."""

    def __init__(self, mode, compiled, forced_path=None):
        self.mode, self.compiled, self.forced_path = mode, compiled, forced_path

    def __call__(self, x, weight, cos, sin, n_rotary):
        """Rotated q, k and plain v (B, T, out) of x (B, T, in) through the complex weight (out/2, in/2, 2) and the
        tables cos, sin (T, head_size/2) of x's positions; or None: this input takes the PyTorch path."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        path = chosen_path(self.mode, self.compiled, self.forced_path, str(x.device), dtype, x.size(0), x.size(1),
                           x.size(2), 2 * weight.size(0), n_rotary, cos.size(1), grad)
        if path == PYTORCH:
            return None
        return torch.ops.crope.qkv_rotary(x.to(dtype), weight.to(dtype), cos, sin, 0, n_rotary, path)


def qkv_rotary(x, weight, cos, sin, start_pos, n_rotary, path="auto"):
    """torch.ops.crope.qkv_rotary, with a forced CUDA path checked here first: one KernelError line naming the path
    and what it takes, rather than the op's refusal from C++."""
    if path != "auto" and x.device.type == "cuda":
        _check_path(path, x, weight, n_rotary)
    return torch.ops.crope.qkv_rotary(x, weight, cos, sin, start_pos, n_rotary, path)


def _check_path(path, x, weight, n_rotary):
    takes, what = PATH_TAKES[_checked(path, CUDA_PATHS, "the op's path")]
    in_features, out_features = x.size(-1), 2 * weight.size(0)
    if not takes(x.dtype, in_features, out_features):
        raise KernelError(f"path '{path}' takes {what}; got {_name(x.dtype)}, in_features {in_features}, "
                          f"out_features {out_features}")
    if path not in torch.ops.crope.qkv_rotary_paths(x, weight, n_rotary):
        raise KernelError(f"path '{path}' needs a GPU of compute capability 8.0 or newer and a build for it "
                          "(TORCH_CUDA_ARCH_LIST with 8.0 or newer)")


def _name(dtype):
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- choosing a path by measurement
def _constant_under_compile(fn):
    """Mark fn as torch.compiler.assume_constant_result does (torch.compile then calls it while tracing and keeps
    its result as a constant) without importing torch._dynamo, which would add about a second to every
    `import fused_op`. tests/test_kernel.py checks that the mark is still the one torch sets."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile  # under torch.compile: decided eagerly while tracing, never traced
def chosen_path(mode, compiled, forced, device, dtype, batch, seq, in_features, out_features, n_rotary, half, grad):
    """The fastest way to compute this kind of input: the path to pass to the op ("auto" on the CPU, which has one
    implementation), or PYTORCH. On the first input of its kind (TOKEN_KINDS; per device, dtype, feature counts and
    whether gradients are needed) every candidate is timed on that input's shape, forward and, when training,
    forward plus backward; the choice is kept in the process and on disk (choices_file(): per machine, versions
    and sources of the op), so that later runs time nothing. One log line says what was chosen and why.
    forced: a CUDA path that every input on a GPU takes, unmeasured (a KernelError where it cannot)."""
    kind = next(name for limit, name in TOKEN_KINDS if batch * seq <= limit)
    key = (mode, compiled, forced, device, dtype, kind, in_features, out_features, n_rotary, grad)
    if key not in _state["choices"]:
        if forced and torch.device(device).type == "cuda":
            x = torch.empty(1, 1, in_features, device=device, dtype=dtype)
            _check_path(forced, x, torch.empty(out_features // 2, in_features // 2, 2, device=device, dtype=dtype),
                        n_rotary)
            _state["choices"][key] = forced
        else:
            _state["choices"][key] = _choose(key, batch, seq, half)
    return _state["choices"][key]


def _choose(key, batch, seq, half):
    mode, compiled, _, device, dtype, kind, in_features, out_features, n_rotary, grad = key
    what = (f"{_machine(device)}, {_name(dtype)}, {kind}, {in_features} -> {out_features} features, "
            f"{'forward and backward' if grad else 'forward'}" + (", compiled" if compiled else "")
            + (", the op only" if mode == "ext" else ""))
    candidates = _candidates(mode, device, dtype, in_features, out_features, n_rotary)
    stored = _read_choices()
    entry = stored.get(what)
    how = "measured before"
    if entry is None or entry["path"] not in candidates:
        times = _measure(candidates, torch.device(device), dtype, batch, seq, in_features, out_features, n_rotary,
                         half, grad, compiled) if len(candidates) > 1 else {}
        entry = stored[what] = {"path": min(times, key=times.get) if times else candidates[0], "ms": times}
        _write_choices(stored)
        how = "measured now"
    timings = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(entry["ms"].items(), key=lambda item: item[1]))
    log.info("crope: CRoPE projection on %s: %s (%s; %s; kept in %s)", what, _path_label(entry["path"]),
             timings or "the only candidate", how, choices_file())
    return "auto" if entry["path"] == CPU_OP else entry["path"]


def _path_label(path):
    return {PYTORCH: "the PyTorch path", CPU_OP: "the op"}.get(path, f"the op's {path} path")


def _candidates(mode, device, dtype, in_features, out_features, n_rotary):
    """What may compute the input: the op's paths that take it (on the CPU its one implementation, CPU_OP), and
    the PyTorch path unless mode is "ext"."""
    device = torch.device(device)
    if device.type == "cuda":
        x = torch.empty(1, 1, in_features, device=device, dtype=dtype)
        weight = torch.empty(out_features // 2, in_features // 2, 2, device=device, dtype=dtype)
        paths = list(torch.ops.crope.qkv_rotary_paths(x, weight, n_rotary))
    else:
        paths = [CPU_OP]
    return paths + ([PYTORCH] if mode == "auto" else [])


def _measure(candidates, device, dtype, batch, seq, in_features, out_features, n_rotary, half, grad, compiled):
    """{candidate: milliseconds} of each candidate on random inputs of this shape (fastest_ms): forward, or forward
    and backward when grad. Inputs come from a private generator: the caller's random numbers are untouched."""
    def pytorch(x, weight, cos, sin):  # crope.py's PyTorch path, as CausalSelfAttention runs it
        qk, v = F.linear(x, real_block_matrix(weight)).split([n_rotary, out_features - n_rotary], dim=-1)
        return apply_rotary(qk.view(batch, seq, -1, 2 * half), cos, sin).flatten(2), v

    def op(path):
        return lambda x, weight, cos, sin: torch.ops.crope.qkv_rotary(x, weight, cos, sin, 0, n_rotary, path).split(
            [n_rotary, out_features - n_rotary], dim=-1)

    with torch.inference_mode(False), torch.autocast(device.type, enabled=False), torch.set_grad_enabled(grad):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, seq, in_features, generator=generator).to(device, dtype).requires_grad_(grad)
        weight = (torch.randn(out_features // 2, in_features // 2, 2, generator=generator) / in_features ** 0.5).to(
            device, dtype).requires_grad_(grad)
        angles = torch.randn(seq, half, generator=generator, dtype=torch.float64)
        cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
        grads = [torch.randn(batch, seq, n, generator=generator).to(device, dtype)
                 for n in (n_rotary, out_features - n_rotary)]
        calls = {}
        for name in candidates:
            fn = pytorch if name == PYTORCH else op("auto" if name == CPU_OP else name)
            if compiled and name == PYTORCH:
                fn = torch.compile(fn, dynamic=False)
            if grad:
                calls[name] = lambda fn=fn: torch.autograd.grad(fn(x, weight, cos, sin), (x, weight), grads)
            else:
                calls[name] = lambda fn=fn: fn(x, weight, cos, sin)
        return fastest_ms(calls, device)


def fastest_ms(calls, device, budget_s=0.3):
    """{name: milliseconds of the fastest of its calls} for each function in calls, after two calls of warm-up each,
    the calls interleaved (one of each in turn) for about budget_s per function and at least 5 rounds; on a GPU
    timed with CUDA events. Other programs on the machine add time to a call, never take it away, and interleaving
    spreads them over every candidate: the fastest call is the least disturbed measure of each."""
    for fn in calls.values():
        fn()
        fn()
    times = {name: [] for name in calls}
    start, rounds = time.perf_counter(), 0
    while rounds < 5 or (time.perf_counter() - start < budget_s * len(calls) and rounds < 1000):
        for name, fn in calls.items():
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(1000 * (time.perf_counter() - t0))
        rounds += 1
    return {name: min(ms) for name, ms in times.items()}


def _machine(device):
    """The device, as the choices file names it: the GPU's name, or the CPU's and its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), name)
    return f"{name} ({torch.get_num_threads()} threads)"


CHOICES_FORMAT = "crope path choices 1"


def choices_file():
    """Where the measured choices are kept: CROPE_CACHE_DIR, else ~/.cache/crope, in a file per torch version and
    per version of the op's sources (a rebuilt op is timed again)."""
    root = Path(os.environ.get("CROPE_CACHE_DIR") or Path.home() / ".cache" / "crope")
    return root / f"path_choices_torch{torch.__version__}_{_sources_digest()[:12]}.json"


def _read_choices():
    """The stored choices ({description: {"path", "ms"}}); a file that is not one is ignored, with one line."""
    path = choices_file()
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
        if not (isinstance(stored, dict) and stored.get("format") == CHOICES_FORMAT):
            raise ValueError("not a crope path-choice file")
        return {what: entry for what, entry in stored["choices"].items()
                if isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("ms"), dict)}
    except (OSError, ValueError, KeyError, AttributeError) as e:
        if path not in _state["noted"]:
            _state["noted"].add(path)
            log.warning("crope: ignoring %s (%s); its choices are measured again and the file rewritten",
                        path, _one_line(e))
        return {}


def _write_choices(choices):
    """Write the choices atomically (a temporary file renamed), so that a reader never sees half a file; a folder
    that cannot be written costs only the measurement next time, with one line."""
    path = choices_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": CHOICES_FORMAT, "choices": choices}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("crope: cannot keep the measured choices in %s (%s)", path, e.strerror or e)


# ---------------------------------------------------------------- the self-check
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

    The shape (3 sequences of 50 tokens, 64 features, 4 heads, positions from 3) gives decode_v2 full and partial
    token chunks and the tiled kernels full and partial tiles. Inputs come from a private generator: the caller's
    random numbers are untouched."""
    from crope import rope_frequencies, rotary_tables
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
            for path in (list(_self_check_paths(x, weight, n_rotary)) or ["auto"]) + ["backward"]:
                what = f"{path} {str(dtype).removeprefix('torch.')}"
                try:
                    if path == "backward":
                        outs = _run_backward(grad, x, weight, cos, sin, start_pos, n_rotary)
                        refs = ref_grads
                    else:
                        outs = (_run_path(x, weight, cos, sin, start_pos, n_rotary, path),)
                        refs = (ref,)
                    for out, expected in zip(outs, refs):
                        if (problem := _mismatch(out, expected, tolerance(dtype, device))) is not None:
                            return f"{what}: {problem}"
                except Exception as e:  # a crash is a failure of that path, not of the caller
                    return f"{what}: {_one_line(e)}"
    return None


def _mismatch(out, expected, allowed):
    """None, or how out differs from expected (float64) beyond the relative error allowed."""
    if out.shape != expected.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    error = ((out.double() - expected).norm() / expected.norm()).item()
    return None if error <= allowed else f"relative error {error:.1e} against float64, allowed {allowed:.0e}"  # NaN too


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


def _self_checked(device):
    """None, or why the op failed its self-check on device; runs it on the first call per device."""
    if str(device) not in _state["checked"]:
        start = time.perf_counter()
        _state["checked"][str(device)] = failure = self_check(device)
        if failure is None:
            log.info("crope: the fused op passed its self-check on %s (%.2f s)", device, time.perf_counter() - start)
    failure = _state["checked"][str(device)]
    return None if failure is None else f"the fused op failed its self-check on {device} ({failure})"


def _one_line(e):
    text = str(e).strip()
    return f"{e.__class__.__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------- building and loading
class _BuildChatter(logging.Handler):
    """What torch.utils.cpp_extension logs (its import warns on a machine with a CUDA toolkit and no GPU): kept
    here, and written into the build folder's build.log when a build runs, never onto the user's screen."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


_build_chatter = _BuildChatter()


def _cpp_extension():
    """torch.utils.cpp_extension, imported only when a build, or the name of a build's folder, is needed."""
    chatter = logging.getLogger("torch.utils.cpp_extension")
    if _build_chatter not in chatter.handlers:
        chatter.addHandler(_build_chatter)
        chatter.propagate = False
    from torch.utils import cpp_extension
    return cpp_extension


def extension_spec():
    """What csrc/ compiles from, with which flags, with or without CUDA: the one description that setup.py
    and the just-in-time build share. The CUDA kernels are built when PyTorch has CUDA, a CUDA toolkit is
    found (CUDA_HOME, else nvcc on the PATH) and there is a GPU to build for, or TORCH_CUDA_ARCH_LIST
    names the architectures."""
    csrc = Path(__file__).resolve().parent / "csrc"
    cuda = (torch.version.cuda is not None and _cpp_extension().CUDA_HOME is not None
            and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))))
    flags = ["-O3"] + (["-DWITH_CUDA"] if cuda else [])
    return dict(name="crope_ext", cuda=cuda, cflags=flags, cuda_cflags=flags if cuda else [],
                sources=[csrc / "crope_qkv.cpp"] + ([csrc / "crope_qkv_cuda.cu", csrc / "crope_qkv_v2.cu"]
                                                    if cuda else []),
                headers=[csrc / "crope.h", csrc / "crope_cuda.cuh"])


def _sources_digest():
    """sha256 of every file of csrc/ the op is built from."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parent / "csrc").iterdir()):
        if path.suffix in (".cpp", ".cu", ".cuh", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def load_extension(verbose=False):
    """Load csrc/ as torch.ops.crope, once: the module `pip install -e .` built if there is one, else the
    cached just-in-time build, else a just-in-time build now (verbose: show the compiler's output).
    Returns None, or why it failed in one line."""
    if _state["loaded"]:
        return None
    try:
        built = importlib.util.find_spec("crope_ext")
        if built is not None:
            torch.ops.load_library(built.origin)
        else:
            _jit_load(verbose)
        if not hasattr(torch.ops.crope, "qkv_rotary_paths"):
            raise ImportError(f"{built.origin if built else 'the crope build'} is older than csrc/: rebuild it "
                              "(pip install -e . --no-build-isolation) or delete it")
        _register_fake_and_autograd()
    except Exception as e:  # no compiler, no ninja, no nvcc, a failed build: all mean "fall back"
        return _one_line(e)
    # a build without nvcc has no CUDA kernels: CUDA (and MPS) tensors then take the PyTorch path
    _state["devices"] = tuple(d for d in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key(
        "crope::qkv_rotary", d.upper()))
    _state["loaded"] = True
    return None


def _load():
    """None once the op is loaded; else why not (the first attempt's answer, kept for the process)."""
    if not _state["loaded"] and _state["failure"] is None:
        _state["failure"] = load_extension()
    return _state["failure"]


def build_directory(spec=None):
    """Where the just-in-time build of this exact source and configuration lives: a folder of the
    torch extensions cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions) named by a hash of the
    sources, flags and versions, so that an up-to-date build is recognised without any lock."""
    cpp_extension = _cpp_extension()
    spec = spec or extension_spec()
    digest = hashlib.sha256()
    for path in spec["sources"] + spec["headers"]:
        digest.update(Path(path).read_bytes())
    gpus = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] if spec["cuda"] else []
    digest.update(repr((spec["cflags"], spec["cuda_cflags"], spec["cuda"], torch.__version__, torch.version.cuda,
                        sys.version, os.environ.get("TORCH_CUDA_ARCH_LIST"), cpp_extension.CUDA_HOME, gpus)).encode())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    return root / f"{spec['name']}_{digest.hexdigest()[:16]}"


def _jit_load(verbose):
    """Load the cached build if it is complete (no lock taken), else build it under an OS file lock."""
    cpp_extension = _cpp_extension()
    spec = extension_spec()
    folder = build_directory(spec)
    library = folder / (spec["name"] + (".pyd" if os.name == "nt" else ".so"))
    done = folder / "build_complete"  # written after a successful build: a killed one leaves no such file
    if done.exists() and library.exists():
        torch.ops.load_library(str(library))
        return
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder):
        if not (done.exists() and library.exists()):  # else another process built it while this one waited
            stale = folder / "lock"  # cpp_extension's lock file; under our lock only a killed build leaves one
            if stale.exists():
                log.warning("crope: removing %s, left by a build that was stopped", stale)
                stale.unlink()
            log.info("crope: building the fused kernel%s just in time (once; cached in %s)",
                     " with CUDA" if spec["cuda"] else "", folder)
            try:
                cpp_extension.load(name=spec["name"], sources=[str(s) for s in spec["sources"]],
                                   extra_cflags=spec["cflags"], extra_cuda_cflags=spec["cuda_cflags"],
                                   build_directory=str(folder), with_cuda=spec["cuda"], is_python_module=False,
                                   verbose=verbose)
            finally:
                (folder / "build.log").write_text("".join(line + "\n" for line in _build_chatter.lines))
            done.write_text("built\n")
    torch.ops.load_library(str(library))  # a no-op when load() above has loaded it


@contextlib.contextmanager
def _build_lock(folder):
    """Hold an exclusive lock on folder/build.lock: the OS releases it when its holder exits or is killed,
    so a stopped build never blocks the next one. A live builder is waited for, with a line saying so."""
    try:
        import fcntl
    except ImportError:  # Windows: cpp_extension's own lock file is all there is
        yield
        return
    with open(folder / "build.lock", "a+") as f:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > _BUILD_WAIT_S:
                    raise TimeoutError(f"another process has been building the fused kernel in {folder} for "
                                       f"{waited / 60:.0f} minutes: stop it, or set CROPE_KERNEL=torch")
                if folder not in _state["noted"]:
                    _state["noted"].add(folder)
                    log.info("crope: waiting for another process that is building the fused kernel in %s", folder)
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _register_fake_and_autograd():
    """What torch.compile (register_fake: shapes and dtypes) and autograd (register_autograd) need to know
    of the op. Registered once, after the library is loaded."""
    def check(x, weight, cos, sin):  # the C++ checks, for fake tensors: shapes and dtypes
        torch._check(x.dim() == 3, lambda: f"crope::qkv_rotary: x must be (B, T, in_features), got {x.shape}")
        torch._check(weight.dim() == 3 and weight.size(2) == 2 and 2 * weight.size(1) == x.size(2),
                     lambda: f"crope::qkv_rotary: weight must be (out/2, in/2, 2) with in = {x.size(2)}, "
                             f"got {weight.shape}")
        torch._check(weight.dtype == x.dtype, lambda: f"crope::qkv_rotary: weight must have x's dtype {x.dtype}, "
                                                      f"got {weight.dtype}")
        torch._check(cos.dim() == 2 and sin.shape == cos.shape,
                     lambda: f"crope::qkv_rotary: cos and sin must be (positions, head_size/2), got {cos.shape} "
                             f"and {sin.shape}")
        for name, t in (("weight", weight), ("cos", cos), ("sin", sin)):
            torch._check(t.device == x.device, lambda: f"crope::qkv_rotary: {name} must be on x's device "
                                                       f"({x.device}), got {t.device}")

    @torch.library.register_fake("crope::qkv_rotary")
    def _(x, weight, cos, sin, start_pos, n_rotary, path="auto"):
        check(x, weight, cos, sin)
        return x.new_empty(x.size(0), x.size(1), 2 * weight.size(0))

    @torch.library.register_fake("crope::qkv_rotary_backward")
    def _(grad, x, weight, cos, sin, start_pos, n_rotary, output_mask, path="auto"):
        check(x, weight, cos, sin)
        torch._check(grad.dim() == 3 and grad.size(2) == 2 * weight.size(0),
                     lambda: f"crope::qkv_rotary_backward: grad must be (B, T, out), got {grad.shape}")
        torch._check(grad.device == x.device, lambda: f"crope::qkv_rotary_backward: grad must be on x's device "
                                                      f"({x.device}), got {grad.device}")
        return (x.new_empty(x.shape) if output_mask[0] else x.new_empty(0),
                weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0))

    def setup_context(ctx, inputs, output):
        x, weight, cos, sin, start_pos, n_rotary = inputs[:6]
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.start_pos, ctx.n_rotary, ctx.n_inputs = start_pos, n_rotary, len(inputs)

    def backward(ctx, grad):
        x, weight, cos, sin = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        grad_x, grad_weight = torch.ops.crope.qkv_rotary_backward(grad, x, weight, cos, sin, ctx.start_pos,
                                                                  ctx.n_rotary, [need_x, need_weight])
        return (grad_x if need_x else None, grad_weight if need_weight else None) + (None,) * (ctx.n_inputs - 2)

    torch.library.register_autograd("crope::qkv_rotary", backward, setup_context=setup_context)
