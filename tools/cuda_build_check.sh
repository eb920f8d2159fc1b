#!/usr/bin/env bash
# Build csrc/ with CUDA exactly as a GPU user gets it, on any Linux machine with a CUDA toolkit (no GPU
# needed), then load each build on the CPU and run tests/test_kernel.py against it.
#
#   bash tools/cuda_build_check.sh
#
# Needs: nvcc (CUDA_HOME, else nvcc on the PATH; the toolkit's own folder is found even through a wrapper
# script), a C++ compiler, a package index with PyTorch (a plain `pip install torch`, which on Linux is
# the CUDA build: ~6 GB on disk, about a minute from a local index). That build lives in a virtual
# environment outside the checkout, CROPE_CUDA_VENV (default ~/.cache/crope-cuda-venv), reused by later runs.
#
# Both routes are built for TORCH_CUDA_ARCH_LIST (default "8.0;9.0": A100, H100 and H200) under PyTorch's own
# extension flags, with every nvcc warning an error (-Werror all-warnings) and ptxas's report (-Xptxas -v):
#   1. python setup.py build_ext: what `pip install -e . --no-build-isolation` runs
#   2. fused_op/build.py's just-in-time build (cpp_extension.load), in a fresh TORCH_EXTENSIONS_DIR
# It prints the registers, spills and shared memory of every kernel, checks the machine code of the
# first build (tools/sass_check.py), and exits non-zero on any error or compiler warning, or when a
# check or a test fails. Then, as a user without a GPU who installed the README's requirements (the CUDA
# build of torch) and runs the README's tools:
#   3. tests/test_bad_input.py in that environment, TORCH_CUDA_ARCH_LIST unset: every refusal is one line on
#      stderr, with nothing of PyTorch's build machinery in front of it.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc_bin="${CUDA_HOME:+$CUDA_HOME/bin/nvcc}"
nvcc_bin="${nvcc_bin:-$(command -v nvcc || true)}"
if [ -z "$nvcc_bin" ] || [ ! -x "$nvcc_bin" ]; then
  echo "cuda_build_check: no nvcc (set CUDA_HOME or put nvcc on the PATH)" >&2
  exit 1
fi
# nvcc names its own bin folder in a dry run: the real toolkit, wherever a wrapper on the PATH lives
nvcc_dir="$("$nvcc_bin" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)"
export CUDA_HOME="$(dirname "$nvcc_dir")"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Werror all-warnings -Xptxas -v"
"$CUDA_HOME/bin/nvcc" --version | tail -1
echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST NVCC_APPEND_FLAGS=$NVCC_APPEND_FLAGS"

venv="${CROPE_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/crope-cuda-venv}"
py="$venv/bin/python"
if ! "$py" -c "import torch, ninja, pytest, numpy, setuptools, matplotlib, tiktoken; assert torch.version.cuda" \
    2>/dev/null; then
  echo "creating $venv with a CUDA build of PyTorch (pip install -r requirements.txt)"
  python3 -m venv --clear "$venv"
  "$py" -m pip install -q -r requirements.txt pytest numpy setuptools
fi
"$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| GPU present:', torch.cuda.is_available())"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export TORCH_EXTENSIONS_DIR="$work/extensions"  # nothing cached from elsewhere

show_flags() {  # $1: log; the flags nvcc compiled the kernels with: PyTorch's, and the architectures
  echo "nvcc flags: $(grep -oE -- '-D__CUDA_NO_[A-Z0-9_]+|-gencode=[^ ]+|-std=[^ ]+' "$1" | sort -u | tr '\n' ' ')"
}

check_build_log() {  # $1: log; fails on a compiler warning or a missing architecture
  if grep -E "warning( #[0-9A-Za-z-]+)?:|nvcc warning" "$1"; then
    echo "cuda_build_check: FAILED: compiler warnings above ($1)" >&2
    exit 1
  fi
  for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do
    sm="sm_${arch//./}"
    sm="${sm%+PTX}"
    grep -q "for '$sm'" "$1" || { echo "cuda_build_check: FAILED: no ptxas report for $sm" >&2; exit 1; }
  done
}

show_op() {  # what the loaded build offers, on the CPU
  "$py" - <<'EOF'
import sys
import torch
from fused_op import build
why = build.load_extension()
if why or "cuda" not in build.state["devices"]:
    sys.exit(f"cuda_build_check: FAILED: the build has no CUDA kernels ({why or build.state['devices']})")
print("loaded", [lib for lib in torch.ops.loaded_libraries], "with kernels for", ", ".join(build.state["devices"]))
EOF
}

tests=(tests/test_kernel.py -q -p no:cacheprovider)

echo
echo "== 1/3 setup.py build_ext =="
if ! "$py" setup.py build_ext --build-lib "$work/setup/lib" --build-temp "$work/setup/tmp" > "$work/setup.log" 2>&1; then
  cat "$work/setup.log"
  echo "cuda_build_check: FAILED: setup.py build_ext" >&2
  exit 1
fi
grep -E "^\[[0-9]+/[0-9]+\]" "$work/setup.log" | cut -c1-160
show_flags "$work/setup.log"
check_build_log "$work/setup.log"
python3 tools/ptxas_report.py "$work/setup.log"
# the machine code, for what each kernel was written to do (cuobjdump: the toolkit's, else the one triton ships)
CUOBJDUMP="$(command -v cuobjdump || true)"
[ -x "$CUDA_HOME/bin/cuobjdump" ] && CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
[ -n "$CUOBJDUMP" ] || CUOBJDUMP="$("$py" -c 'import os, triton
print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null || true)"
if [ -x "$CUOBJDUMP" ]; then
  CUOBJDUMP="$CUOBJDUMP" python3 tools/sass_check.py --counts "$work"/setup/lib/crope_ext*.so
else
  echo "sass check skipped: no cuobjdump (neither in the CUDA toolkit nor with triton)"
fi
PYTHONPATH="$work/setup/lib" show_op
PYTHONPATH="$work/setup/lib" "$py" -m pytest "${tests[@]}"

echo
echo "== 2/3 fused_op/build.py's just-in-time build (cpp_extension.load) =="
if ! "$py" -c "import sys; from fused_op import build; why = build.load_extension(verbose=True); sys.exit(why and 'error: ' + why)" \
    > "$work/jit.log" 2>&1; then
  cat "$work/jit.log"
  echo "cuda_build_check: FAILED: the just-in-time build" >&2
  exit 1
fi
grep -E "^\[[0-9]+/[0-9]+\]" "$work/jit.log" | cut -c1-160
show_flags "$work/jit.log"
check_build_log "$work/jit.log"
if diff <(python3 tools/ptxas_report.py "$work/setup.log") <(python3 tools/ptxas_report.py "$work/jit.log") > /dev/null; then
  echo "ptxas report: the same as the setup.py build's"
else
  python3 tools/ptxas_report.py "$work/jit.log"
fi
show_op
# the killed-build test builds its own copy (a CUDA build here): the CPU suite runs it
"$py" -m pytest "${tests[@]}" --deselect tests/test_kernel.py::test_a_killed_build_never_blocks_the_next_run

echo
echo "== 3/3 the bad-input tests with this CUDA build of torch and no GPU, as the README's user runs them =="
env -u TORCH_CUDA_ARCH_LIST -u NVCC_APPEND_FLAGS TORCH_EXTENSIONS_DIR="$work/user_extensions" \
  "$py" -m pytest tests/test_bad_input.py -q -p no:cacheprovider
echo "cuda_build_check: OK (both routes built for $TORCH_CUDA_ARCH_LIST without warnings; tests passed)"
