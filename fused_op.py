"""
The fused op of csrc/, torch.ops.crope.qkv_rotary, as the scripts hand it to a model: which code computes CRoPE's
projection (--kernel), the probe that declines the op wherever crope.py's code computes something else, the
self-check every path passes on a device, how the op is built and loaded, and what torch.compile and autograd need
to know of it.

    torch.ops.crope.qkv_rotary(x, weight, cos, sin, start_pos, n_rotary, path="auto")

computes, in one op, apply_rotary on the first n_rotary features of ComplexLinear(x) at positions start_pos + t,
with a C++ implementation for the CPU and CUDA kernels for GPUs (csrc/crope.h lists the paths). crope.py's
CausalSelfAttention.project_and_rotate is the code it stands in for and is checked against.

    kernel = fused_op.qkv_kernel(device, "ext")   # None: crope.py's code (--kernel torch, and auto for now)
    line = fused_op.use_kernel(model, kernel)     # each layer where the op computes what crope.py's code does
"""

import contextlib
import hashlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from crope import ComplexLinear, apply_rotary, real_block_matrix

log = logging.getLogger("crope")

KERNEL_MODES = ("auto", "torch", "ext")  # auto: OP_MEASURED_FASTER; torch: crope.py's code; ext: the op anywhere
# --kernel auto takes the op only where whole steps, measured side by side, showed it faster than crope.py's
# PyTorch path (tools/bench_model.py; csrc/NOTES.md has the measurements, with the card and date):
# {(device name, "train" or "generate"): CUDA path, or None for the op's default}. None has shown that yet (on an
# H200 CRoPE with the op trained the gpu preset at 0.87x RoPE's tokens/s), so auto runs crope.py's code everywhere.
OP_MEASURED_FASTER = {}
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
DECODE_TOKENS = 8  # up to this many tokens per call (a decoding step), the op's default on a GPU is decode_v2
# Largest relative error ||op - reference|| / ||reference|| (Frobenius norms) allowed against the float64
# PyTorch path, per dtype, for the tests and the self-check. 16-bit types round every output once (bf16
# keeps 8 significant bits: ~1e-3 from that rounding alone; fp16 11 bits: ~3e-4) and accumulate in fp32;
# float32 differs from float64 in summation order only, unless matmuls may use TF32 (10 bits).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
TF32_TOLERANCE = 5e-3
PROBE_TOKENS = 16  # positions of the probe input that use_kernel compares the op and crope.py's code on
_BUILD_WAIT_S = 1800  # the longest a run waits for another process building the op

_state = {
    "loaded": False, "failure": None,  # the extension: loaded, or why not
    "devices": (),                     # device types the loaded op has kernels for
    "checked": {},                     # device -> None, or why its self-check failed
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


def device_name(device):
    """The name OP_MEASURED_FASTER knows a device by: the GPU's (torch.cuda.get_device_name), else its type."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


# ---------------------------------------------------------------- what the scripts hand to the model
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
    why = "the fused op has no bias (use --no-bias, or --kernel torch)" if bias else _load()
    if why is None and device.type not in _state["devices"]:
        why = (f"the crope extension has no {device.type} kernels (a build without nvcc has none for CUDA, "
               "and none exist for MPS)")
    if why is None:
        why = _self_checked(device)
    if why is None:
        forced = os.environ.get("CROPE_CUDA_PATH")
        if forced:
            return QKVKernel(_checked(forced, CUDA_PATHS, "CROPE_CUDA_PATH"))
        return QKVKernel(OP_MEASURED_FASTER.get((device_name(device), use)))
    if mode == "ext":
        raise KernelError(f"--kernel ext (CROPE_KERNEL=ext): {why}; or use --kernel torch")
    if why not in _state["noted"]:
        _state["noted"].add(why)
        log.warning("crope: %s; using crope.py's code (CROPE_KERNEL=torch skips the attempt)", why)
    return None


class QKVKernel:
    """CRoPE's Q/K/V projection and the rotation of q and k through the op, in the autocast dtype where autocast is
    on. path: a CUDA path for every input on a GPU, or None for the op's default there (decode_v2 for a decoding
    step that it takes, cublas otherwise: csrc/NOTES.md's measurements of the op alone)."""

    def __init__(self, path=None):
        self.path = path

    def __call__(self, x, weight, cos, sin, n_rotary):
        """Rotated q, k and plain v (B, T, out) of x (B, T, in) through the complex weight (out/2, in/2, 2) and the
        tables cos, sin (T, head_size/2) of x's positions."""
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        return qkv_rotary(x, weight, cos, sin, 0, n_rotary, self.path or self.default_path(x, weight))

    @staticmethod
    def default_path(x, weight):
        if x.device.type != "cuda":
            return "auto"  # the CPU's one implementation
        decoding = x.size(0) * x.size(1) <= DECODE_TOKENS and not (torch.is_grad_enabled() and x.requires_grad)
        takes, _ = PATH_TAKES["decode_v2"]
        return "decode_v2" if decoding and takes(x.dtype, x.size(-1), 2 * weight.size(0)) else "cublas"


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


# ---------------------------------------------------------------- the op stands in for crope.py's code, checked
def use_kernel(model, kernel):
    """Let kernel stand in for CausalSelfAttention.project_and_rotate in each CRoPE attention layer of model
    (complex-linear Q/K/V without bias) where both compute the same on a probe input; a layer whose crope.py code
    computes something else (an edited project_and_rotate) keeps that code, with one log line. kernel None: every
    layer runs crope.py's code. Returns the line that says which code computes CRoPE's projection."""
    layers = [block.attn for block in model.transformer.h]
    for attn in layers:
        attn.qkv_kernel = None
    takers = [i for i, attn in enumerate(layers) if isinstance(attn.c_attn, ComplexLinear) and attn.c_attn.bias is None]
    if kernel is None or not takers:
        return "CRoPE's Q/K/V projection and rotation: crope.py's code (CausalSelfAttention.project_and_rotate)"
    fused = []
    for i in takers:
        problem = kernel_differs(layers[i], kernel, model.rope_cos[:PROBE_TOKENS], model.rope_sin[:PROBE_TOKENS])
        if problem is None:
            layers[i].qkv_kernel = kernel
            fused.append(i)
        else:
            log.warning("crope: layer %d: crope.py's project_and_rotate differs from the fused op (%s); crope.py's "
                        "code runs there", i, problem)
    on_gpu = model.rope_cos.device.type == "cuda"
    path = f"CUDA path {kernel.path}" if kernel.path else \
        "decode_v2 for decoding steps, cublas otherwise" if on_gpu else "C++"
    if not fused:
        return "CRoPE's Q/K/V projection and rotation: crope.py's code in every layer (it differs from the fused op)"
    where = "every layer" if len(fused) == len(takers) else f"layers {', '.join(map(str, fused))} (crope.py's code " \
        "in the others, where it differs from the op)"
    return (f"CRoPE's Q/K/V projection and rotation: the fused op of csrc/ ({path}) in {where}, checked against "
            "crope.py's project_and_rotate")


def kernel_differs(attn, kernel, cos, sin):
    """None, or how kernel's q, k, v differ from attn.project_and_rotate's on a probe input of the layer's dtype and
    device (drawn from a private generator: the caller's random numbers are untouched), beyond twice the dtype's
    tolerance (both are rounded)."""
    weight = attn.c_attn.weight.detach()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, cos.size(0), attn.c_attn.in_features, generator=generator).to(weight)
    try:
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            qk, v = attn.project_and_rotate(x, cos, sin)
            expected = torch.cat((qk, v), dim=-1).double()
            out = kernel(x, weight, cos, sin, qk.size(-1))
    except Exception as e:  # an edit the op cannot follow (another shape, say): crope.py's code runs
        return _one_line(e)
    return _mismatch(out, expected, 2 * tolerance(weight.dtype, weight.device))


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
