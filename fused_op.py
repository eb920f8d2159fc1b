"""
The fused op of csrc/, torch.ops.crope.qkv_rotary, as crope.py uses it: whether a model uses it (the
one place that decides), how it is built and loaded, the self-check that every path passes on a device
before it may train a model there, and what torch.compile and autograd need to know of it.

    torch.ops.crope.qkv_rotary(x, weight, cos, sin, start_pos, n_rotary, path="auto")

computes, in one op, apply_rotary on the first n_rotary features of ComplexLinear(x) at positions
start_pos + t, with a C++ implementation for the CPU and CUDA kernels for GPUs. The PyTorch path of
crope.py is the reference it is tested against, and the fallback wherever the op cannot be built or
fails its self-check.
"""

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch.nn import functional as F

log = logging.getLogger("crope")

KERNEL_MODES = ("auto", "torch", "ext")  # auto: the op where it loads and passes its self-check, else PyTorch
# The op's `path`: "auto" picks among decode, tiled and cublas by cost (csrc/crope.h); the later versions
# (csrc/crope_qkv_v2.cu, crope_qkv_v3.cu) run only when forced, until a GPU has measured them. "tiled_v2" and
# "tiled_v3" force the second version of the backward too (the un-rotation inside the gradient GEMMs).
CUDA_PATHS = ("auto", "decode", "tiled", "cublas", "decode_v2", "tiled_v2", "tiled_v3")
# Largest relative error ||op - reference|| / ||reference|| (Frobenius norms) allowed against the float64
# PyTorch path, per dtype, for the tests and the self-check. 16-bit types round every output once (bf16
# keeps 8 significant bits: ~1e-3 from that rounding alone; fp16 11 bits: ~3e-4) and accumulate in fp32;
# float32 differs from float64 in summation order only, unless matmuls may use TF32 (10 bits).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
TF32_TOLERANCE = 5e-3
_BUILD_WAIT_S = 1800  # the longest a run waits for another process building the op

_state = {
    "mode": os.environ.get("CROPE_KERNEL", "auto"),      # checked when read: kernel_mode()
    "path": os.environ.get("CROPE_CUDA_PATH", "auto"),   # forces one CUDA path everywhere (tests, benchmarks)
    "loaded": False, "failure": None,                    # the extension: loaded, or why not
    "devices": (),                                       # device types the loaded op has kernels for
    "checked": {},                                       # device -> None, or why its self-check failed
    "decisions": {},                                     # (mode, path, device, bias) -> fused_op_used()
    "noted": set(),                                      # reasons already logged
}


class KernelError(RuntimeError):
    """The fused op cannot be used as asked (--kernel ext / CROPE_KERNEL=ext), or a mode or path name is
    unknown. The message is one line, fit for `error: ...`."""


def _checked(value, allowed, what):
    if value not in allowed:
        raise KernelError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def use_kernel(mode):
    """Choose how CRoPE's Q/K/V projection runs from now on: "auto", "torch" or "ext" (KERNEL_MODES).
    Nothing is built here: the op is loaded on first use (fused_op_used)."""
    _state["mode"] = _checked(mode, KERNEL_MODES, "the kernel mode (--kernel or CROPE_KERNEL)")


def kernel_mode():
    """The current kernel mode: use_kernel()'s, else CROPE_KERNEL's, else "auto"."""
    return _checked(_state["mode"], KERNEL_MODES, "CROPE_KERNEL")


def _constant_under_compile(fn):
    """Mark fn as torch.compiler.assume_constant_result does (torch.compile then calls it while tracing
    and keeps its result as a constant) without importing torch._dynamo, which would add about a second
    to every `import crope`. tests/test_kernel.py checks that the mark is still the one torch sets."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile  # under torch.compile: decided once, eagerly, while tracing
def fused_op_used(device, bias=False):
    """Whether CRoPE's Q/K/V projection on `device` runs the fused op: the one place that decides.

    "torch": never. "auto": where the op loads (built on first use, then cached), has kernels for the
    device's type and passes its self-check on that device (once per device); otherwise the PyTorch path,
    with one log line saying why. "ext": the same, but any reason not to is a KernelError. The op has no
    bias. A meta device never loads anything (models built on it are shapes only).
    """
    mode, device = kernel_mode(), torch.device(device)
    path = _checked(_state["path"], CUDA_PATHS, "CROPE_CUDA_PATH")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (mode, path, str(device), bool(bias))
    if key not in _state["decisions"]:
        why = None
        if mode != "torch" and device.type != "meta":
            why = _why_not_fused(device, bias)
            if why is not None and mode == "ext":  # not cached: every call says why
                raise KernelError(f"--kernel ext (CROPE_KERNEL=ext): {why}; or use --kernel torch")
            if why is not None and why not in _state["noted"]:
                _state["noted"].add(why)
                log.warning("crope: %s; using the PyTorch path (CROPE_KERNEL=torch skips the attempt)", why)
        _state["decisions"][key] = mode != "torch" and device.type != "meta" and why is None
    return _state["decisions"][key]


def _why_not_fused(device, bias):
    """None where the fused op can run CRoPE's projection on device; else why not, in one line."""
    if bias:
        return "the fused op has no bias (use --no-bias, or --kernel torch)"
    why = _load()
    if why is None and device.type not in _state["devices"]:
        why = (f"the crope extension has no {device.type} kernels (a build without nvcc has none for CUDA, "
               "and none exist for MPS)")
    return why if why is not None else _self_checked(device)


def fused_qkv_rotary(x, weight, cos, sin, start_pos, n_rotary, path=None):
    """torch.ops.crope.qkv_rotary under autocast: x and the complex weight in the autocast dtype.
    path: one of CUDA_PATHS; None takes CROPE_CUDA_PATH (default "auto")."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    return torch.ops.crope.qkv_rotary(x, weight, cos, sin, start_pos, n_rotary, path or _state["path"])


# ---------------------------------------------------------------- the self-check
def tolerance(dtype, device):
    """TOLERANCE[dtype], or TF32_TOLERANCE for float32 on a GPU whose matmuls may use TF32."""
    tf32 = torch.device(device).type == "cuda" and torch.get_float32_matmul_precision() != "highest"
    if dtype == torch.float32 and tf32:
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def self_check(device):
    """Run every path of the op on `device` (on a GPU: every path torch.ops.crope.qkv_rotary_paths lists, the
    second versions included, each where its dtype allows; on the CPU its one implementation), forward and
    backward, in every dtype, on small inputs against the float64 PyTorch path. Returns None, or "what: why"
    of the first failure, in one line.

    The shape (3 sequences of 50 tokens, 64 features, 4 heads, positions from 3) gives the decode kernel
    full and partial token chunks and the tiled kernel full and partial tiles. Inputs come from a private
    generator: the caller's random numbers are untouched."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    B, T, d, heads, start_pos = 3, 50, 64, 4, 3
    x64 = torch.randn(B, T, d, generator=generator, dtype=torch.float64)
    w64 = torch.randn(3 * d // 2, d // 2, 2, generator=generator, dtype=torch.float64) / d ** 0.5
    grad64 = torch.randn(B, T, 3 * d, generator=generator, dtype=torch.float64)
    from crope import rope_frequencies, rotary_tables  # here, not at the top: crope.py imports this module
    cos, sin = (t.to(device) for t in rotary_tables(start_pos + T + 1, rope_frequencies(d // heads, 10000.0)))
    n_rotary = 2 * d
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        x_ref, w_ref = x64.to(device).requires_grad_(), w64.to(device).requires_grad_()
        ref = reference_qkv_rotary(x_ref, w_ref, cos, sin, start_pos, n_rotary)
        ref_grads = torch.autograd.grad(ref, (x_ref, w_ref), grad64.to(device))
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            x, weight, grad = (t.to(device, dtype) for t in (x64, w64, grad64))
            paths = list(_self_check_paths(x, weight, n_rotary)) or ["auto"]
            backwards = ["backward"] + (["backward tiled_v2"] if {"tiled_v2", "tiled_v3"} & set(paths) else [])
            for path in paths + backwards:
                what = f"{path} {str(dtype).removeprefix('torch.')}"
                try:
                    if path.startswith("backward"):  # the backward's first version, or its second (tiled_v2)
                        outs = _run_backward(grad, x, weight, cos, sin, start_pos, n_rotary, path.split()[-1])
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
    """The PyTorch path of the op, in x's dtype: ComplexLinear, then apply_rotary on the first n_rotary
    features (q and k), positions start_pos + t."""
    from crope import apply_rotary, real_block_matrix  # here, not at the top: crope.py imports this module
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


def _run_backward(grad, x, weight, cos, sin, start_pos, n_rotary, path="auto"):
    path = "auto" if path == "backward" else path
    return torch.ops.crope.qkv_rotary_backward(grad, x, weight, cos, sin, start_pos, n_rotary, [True, True], path)


def _self_checked(device):
    """None, or why the op failed its self-check on device; runs it on the first call per device."""
    if str(device) not in _state["checked"]:
        import time
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
def extension_spec():
    """What csrc/ compiles from, with which flags, with or without CUDA: the one description that setup.py
    and the just-in-time build share. The CUDA kernels are built when PyTorch has CUDA, a CUDA toolkit is
    found (CUDA_HOME, else nvcc on the PATH) and there is a GPU to build for, or TORCH_CUDA_ARCH_LIST
    names the architectures."""
    from torch.utils import cpp_extension
    csrc = Path(__file__).resolve().parent / "csrc"
    cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
            and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))))
    flags = ["-O3"] + (["-DWITH_CUDA"] if cuda else [])
    return dict(name="crope_ext", cuda=cuda, cflags=flags, cuda_cflags=flags if cuda else [],
                sources=[csrc / "crope_qkv.cpp"] + ([csrc / f"crope_qkv_{part}.cu" for part in ("cuda", "v2", "v3")]
                                                    if cuda else []),
                headers=[csrc / "crope.h", csrc / "crope_cuda.cuh"])


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
    import hashlib
    import sys
    from torch.utils import cpp_extension
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
    from torch.utils import cpp_extension
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
            cpp_extension.load(name=spec["name"], sources=[str(s) for s in spec["sources"]],
                               extra_cflags=spec["cflags"], extra_cuda_cflags=spec["cuda_cflags"],
                               build_directory=str(folder), with_cuda=spec["cuda"], is_python_module=False,
                               verbose=verbose)
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
    import time
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
        ctx.path = inputs[6] if len(inputs) > 6 else "auto"  # "tiled_v2" runs the backward's second version too

    def backward(ctx, grad):
        x, weight, cos, sin = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        grad_x, grad_weight = torch.ops.crope.qkv_rotary_backward(grad, x, weight, cos, sin, ctx.start_pos,
                                                                  ctx.n_rotary, [need_x, need_weight], ctx.path)
        return (grad_x if need_x else None, grad_weight if need_weight else None) + (None,) * (ctx.n_inputs - 2)

    torch.library.register_autograd("crope::qkv_rotary", backward, setup_context=setup_context)
