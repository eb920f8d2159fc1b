"""
How the op of csrc/ is built and loaded as torch.ops.crope: the module `pip install -e .` built if there is one,
else a just-in-time build (torch.utils.cpp_extension.load) in a folder named by a hash of its sources, flags and
versions, under an OS file lock, so that a killed build never blocks the next one. setup.py builds from the same
description (extension_spec).
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

from fused_op import ops

log = logging.getLogger("crope")

CUDA_SOURCES = ("qkv_rotary_cuda.cu", "decode.cu", "tiled.cu", "pipelined.cu")  # a file per CUDA path, in csrc/
_BUILD_WAIT_S = 1800  # the longest a run waits for another process building the op

state = {"loaded": False, "failure": None,  # the extension: loaded, or why not
         "devices": ()}                     # device types the loaded op has kernels for


def one_line(e):
    text = str(e).strip()
    return f"{e.__class__.__name__}: {text.splitlines()[0] if text else ''}"


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
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    cuda = (torch.version.cuda is not None and _cpp_extension().CUDA_HOME is not None
            and (torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))))
    flags = ["-O3"] + (["-DWITH_CUDA"] if cuda else [])
    return dict(name="crope_ext", cuda=cuda, cflags=flags, cuda_cflags=flags if cuda else [],
                sources=[csrc / "qkv_rotary.cpp"] + ([csrc / name for name in CUDA_SOURCES] if cuda else []),
                headers=[csrc / "crope.h", csrc / "crope_cuda.cuh"])


def load_extension(verbose=False):
    """Load csrc/ as torch.ops.crope, once: the module `pip install -e .` built if there is one, else the
    cached just-in-time build, else a just-in-time build now (verbose: show the compiler's output).
    Returns None, or why it failed in one line."""
    if state["loaded"]:
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
        ops.register()
    except Exception as e:  # no compiler, no ninja, no nvcc, a failed build: all mean "fall back"
        return one_line(e)
    # a build without nvcc has no CUDA kernels: CUDA (and MPS) tensors then take the PyTorch path
    state["devices"] = tuple(d for d in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key(
        "crope::qkv_rotary", d.upper()))
    state["loaded"] = True
    return None


def loaded_or_why():
    """None once the op is loaded; else why not (the first attempt's answer, kept for the process)."""
    if not state["loaded"] and state["failure"] is None:
        state["failure"] = load_extension()
    return state["failure"]


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
        start, noted_wait = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > _BUILD_WAIT_S:
                    raise TimeoutError(f"another process has been building the fused kernel in {folder} for "
                                       f"{waited / 60:.0f} minutes: stop it, or set CROPE_KERNEL=torch")
                if not noted_wait:
                    noted_wait = True
                    log.info("crope: waiting for another process that is building the fused kernel in %s", folder)
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
