#!/usr/bin/env bash
# Everything the fused kernels need checked on a GPU, in one call, each step timed, logs in one folder:
#
#   bash tools/gpu_check.sh [--logs DIR] [STEP ...]
#
#   build     build csrc/ for this GPU ahead of time: ptxas's register/spill report, the machine-code check
#   probe     tools/refusal_probe.py: every argument the op must refuse, in child processes (a refusal that kills
#             the process fails it, and cannot hide the steps after it)
#   tests     tests/test_kernel.py: every CUDA path against float64 (outputs poisoned with NaN), the backward, the
#             self-check, the measured path choice; with pytest-xdist where it is installed (a crashed worker is
#             restarted and its test reported), else in one process after the probe has passed
#   bench     bench.py: every path side by side with RoPE (compiled), the PyTorch CRoPE path and the GEMM alone,
#             copy and GEMM ceilings, decode under CUDA graphs, what --kernel auto chooses, the speed targets
#   train     bench.py --train_tokens: the gpu preset end to end (300 iterations), RoPE, CRoPE by default, CRoPE on
#             the PyTorch path and on each op path, side by side in tokens/s
#   preset SEEDS   the gpu preset for crope, rope and learned, 2000 iterations per seed (not in the default run):
#             study.py's table with the paired CRoPE - RoPE interval; run one seed per call (finished runs in
#             out/gpu_study are kept), then all seeds for the table
#
# The default is build probe tests bench train, then summary.md: a short table of what each step found. DIR
# defaults to ./gpu_check_logs. On an H200 the build takes under a minute, the probe and the tests about two,
# bench about three and train about five (mostly torch.compile, once per run): under ten minutes in all.
#
# Needs: an NVIDIA GPU of compute capability 8.0 or newer for the tensor-core paths; a CUDA build of PyTorch
# with triton (a plain `pip install torch` on Linux), ninja and pytest in the python3 on the PATH; nvcc
# (CUDA_HOME, or on the PATH). Training reads tiny Shakespeare from CROPE_DATA if set, else downloads it into
# data/ (internet needed once).
set -uo pipefail
cd "$(dirname "$0")/.."
logs=gpu_check_logs
if [ "${1:-}" = "--logs" ]; then
  logs=${2:?--logs needs a folder}
  shift 2
fi
mkdir -p "$logs"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(build probe tests bench train)
failed=0
summary=()

timed() {  # $1: name; the rest: the command. Prints the wall time; a failure is remembered, the next step runs.
  local name=$1 start=$SECONDS status=ok
  shift
  echo "== $name =="
  "$@" || { echo "gpu_check: $name FAILED"; failed=1; status=FAILED; }
  echo "== $name: $((SECONDS - start)) s"
  summary+=("| $name | $status | $((SECONDS - start)) s | $(found "$name") |")
}

found() {  # the line of a step's log that says what it found
  case "$1" in
    build) grep -h "spills in:" "$logs/ptxas.txt" 2>/dev/null | head -1 ;;
    probe) grep -h "refusal probe on cuda" "$logs/probe.log" 2>/dev/null ;;
    tests) grep -hE "[0-9]+ (passed|failed)" "$logs/tests.log" 2>/dev/null | tail -1 ;;
    bench) grep -h "^target" "$logs/bench.log" 2>/dev/null | tr '\n' ' ' ;;
    train) grep -h "^target" "$logs/train.log" 2>/dev/null ;;
    preset*) grep -h "crope - rope" "$logs/preset.log" 2>/dev/null | tail -1 ;;
  esac
}

build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$logs/gpu.txt"
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$logs/gpu.txt"
  # this GPU's architecture only, ahead of time, with ptxas's register/spill report
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch
print("%d.%d" % torch.cuda.get_device_capability())')}"
  NVCC_APPEND_FLAGS="-Xptxas -v" python3 setup.py build_ext --inplace > "$logs/build.log" 2>&1 || { tail -30 "$logs/build.log"; return 1; }
  python3 tools/ptxas_report.py "$logs/build.log" | tee "$logs/ptxas.txt"
  local cuobjdump="${CUDA_HOME:+$CUDA_HOME/bin/cuobjdump}"
  [ -x "$cuobjdump" ] || cuobjdump="$(command -v cuobjdump || true)"
  if [ -n "$cuobjdump" ]; then
    CUOBJDUMP="$cuobjdump" python3 tools/sass_check.py crope_ext*.so | tee "$logs/sass.txt"
  else
    echo "sass check skipped: no cuobjdump"
  fi
}

probe() {
  python3 tools/refusal_probe.py 2>&1 | tee "$logs/probe.log"
}

tests() {
  local parallel=()
  python3 -c "import xdist" 2>/dev/null && parallel=(-n 8 --max-worker-restart 100)
  PYTHONUNBUFFERED=1 python3 -m pytest -q -rs "${parallel[@]}" tests/test_kernel.py 2>&1 | tee "$logs/tests.log" | tail -25
}

bench() {
  PYTHONUNBUFFERED=1 python3 bench.py 2>&1 | tee "$logs/bench.log" | tail -60
}

train() {
  PYTHONUNBUFFERED=1 python3 bench.py --train_tokens --train_only 2>&1 | tee "$logs/train.log" | tail -30
}

preset() {  # $1: seeds
  PYTHONUNBUFFERED=1 python3 study.py seeds --out_dir out/gpu_study --seeds "$1" --variants crope,rope,learned \
    --preset gpu --max_iters 2000 --lr_decay_iters 5000 2>&1 | tee "$logs/preset.log" | tail -30
  cp out/gpu_study/study.md "$logs/" 2>/dev/null
}

for ((i = 0; i < ${#steps[@]}; i++)); do
  case "${steps[$i]}" in
    build)
      timed build build
      [ $failed = 0 ] || break ;;  # no build of this source: nothing below would test it
    probe | tests | bench | train) timed "${steps[$i]}" "${steps[$i]}" ;;
    preset) i=$((i + 1)); timed "preset ${steps[$i]:-0,1,2}" preset "${steps[$i]:-0,1,2}" ;;
    *) echo "usage: bash tools/gpu_check.sh [--logs DIR] [build|probe|tests|bench|train|preset SEEDS ...]" >&2; exit 2 ;;
  esac
done
{
  echo "| step | result | wall time | what it found |"
  echo "|---|---|---|---|"
  printf '%s\n' "${summary[@]}"
} | tee "$logs/summary.md"
exit $failed
