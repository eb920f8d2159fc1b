#!/usr/bin/env bash
# Everything the fused kernels need checked on a GPU, in steps of a few minutes each:
#
#   bash tools/gpu_check.sh                 # build, tests, bench: the one call that settles correctness and speed
#   bash tools/gpu_check.sh build           # build csrc/ for this GPU: ptxas report, SASS check
#   bash tools/gpu_check.sh tests           # tests/test_kernel.py: every CUDA path and both backward versions
#                                           # against float64, outputs poisoned with NaN; the self-check
#   bash tools/gpu_check.sh bench           # bench.py: every path side by side (each first checked against the
#                                           # PyTorch path), copy and GEMM ceilings, decode under CUDA graphs,
#                                           # the speed targets; then 300 training iterations of the gpu preset
#   bash tools/gpu_check.sh preset [SEEDS]  # the gpu preset end to end, crope, rope and learned for each seed
#                                           # (default 0,1,2): study.py's table with the paired CRoPE - RoPE interval
#
# Logs go to $OUT when it is set, else to /tmp/crope_gpu_check; each step prints its wall time. The default
# (build, tests, bench) has not been timed on a GPU yet: the build compiles four files for one architecture,
# the tests take seconds each, and bench.py compiles three PyTorch functions per shape, so expect several
# minutes. `preset` trains 3 models per seed, 2000 iterations each on nanoGPT's 5000-iteration schedule
# (its best validation loss comes near iteration 1750): run one seed per call (`preset 0`, `preset 1`,
# `preset 2`; finished runs are kept in out/gpu_study and skipped), then `preset 0,1,2` writes the table.
#
# Needs: an NVIDIA GPU of compute capability 8.0 or newer for the tensor-core paths; a CUDA build of PyTorch
# with triton (a plain `pip install torch` on Linux), ninja and pytest in the python3 on the PATH; nvcc
# (CUDA_HOME, or on the PATH). Training reads tiny Shakespeare from CROPE_DATA if set, else downloads it into
# data/ (internet needed once).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/crope_gpu_check}
mkdir -p "$out"
step=${1:-all}
failed=0

timed() {  # $1: name; the rest: the command. Prints the wall time; a failure is remembered, the next step runs.
  local name=$1 start=$SECONDS
  shift
  echo "== $name =="
  "$@" || { echo "gpu_check: $name FAILED"; failed=1; }
  echo "== $name: $((SECONDS - start)) s"
}

build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$out/gpu.txt"
  # this GPU's architecture only (Hopper: 9.0a, for wgmma), ahead of time, with ptxas's register/spill report
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch
major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}" + ("a" if major == 9 else ""))')}"
  NVCC_APPEND_FLAGS="-Xptxas -v" python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; return 1; }
  python3 tools/ptxas_report.py "$out/build.log" | tee "$out/ptxas.txt"
  local cuobjdump="${CUDA_HOME:+$CUDA_HOME/bin/cuobjdump}"
  [ -x "$cuobjdump" ] || cuobjdump="$(command -v cuobjdump || true)"
  if [ -n "$cuobjdump" ]; then
    CUOBJDUMP="$cuobjdump" python3 tools/sass_check.py crope_ext*.so | tee "$out/sass.txt"
  else
    echo "sass check skipped: no cuobjdump"
  fi
}

tests() {
  PYTHONUNBUFFERED=1 python3 -m pytest -q -rs tests/test_kernel.py 2>&1 | tee "$out/tests.log" | tail -25
}

bench() {
  PYTHONUNBUFFERED=1 python3 bench.py --train_tokens 2>&1 | tee "$out/bench.log" | tail -60
}

preset() {  # $1: seeds
  PYTHONUNBUFFERED=1 python3 study.py seeds --out_dir out/gpu_study --seeds "$1" --variants crope,rope,learned \
    --preset gpu --max_iters 2000 --lr_decay_iters 5000 2>&1 | tee "$out/preset.log" | tail -30
  cp out/gpu_study/study.md "$out/" 2>/dev/null
}

case "$step" in
  all)
    timed build build
    [ $failed = 0 ] || exit 1  # no build of this source: nothing below would test it
    timed tests tests
    timed bench bench ;;
  build) timed build build ;;
  tests) timed tests tests ;;
  bench) timed bench bench ;;
  preset) timed preset preset "${2:-0,1,2}" ;;
  *) echo "usage: bash tools/gpu_check.sh [all|build|tests|bench|preset [SEEDS]]" >&2; exit 2 ;;
esac
exit $failed
