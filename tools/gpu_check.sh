#!/usr/bin/env bash
# What the fused kernels and the GPU training path need checked on a GPU, in two commands of at most about four
# minutes each on an H200 (each step's row goes into DIR/summary.md as soon as the step ends, so a run that is cut
# off keeps what it finished):
#
#   bash tools/gpu_check.sh build probe tests      # about 3 minutes: build, refusals, kernel tests
#   bash tools/gpu_check.sh train generate         # about 3-4 minutes: whole steps, RoPE against CRoPE
#
#   bash tools/gpu_check.sh [--logs DIR] STEP ...
#
#   build     build csrc/ for this GPU ahead of time: ptxas's register/spill report, the machine-code check (~1 min)
#   probe     tools/refusal_probe.py: every argument the op must refuse, in child processes; a refusal that kills the
#             process fails it; stops after three crashes or two minutes (~20 s when all is well)
#   tests     tests/test_kernel.py: every CUDA path against float64, the backward, the self-check, the probe that
#             declines the op for edited code (the probe step's refusals are not run again) (~1-2 min)
#   train     tools/bench_model.py train: the gpu preset's training steps, RoPE, CRoPE by default and CRoPE through
#             the op, each compiled once in one process, then 5 alternating blocks of 200 steps per arm; the median
#             and range of CRoPE/RoPE tokens/s, MFU, and the host's waits for the GPU inside steady-state steps
#             (estimated 4-8 ms a step: 3 x 1,230 steps with warm-up and the host-wait count, ~20 s, plus 3
#             compilations, ~30-40 s each: ~2.5 min)
#   generate  tools/bench_model.py generate: sampling 8 x 255 tokens with the KV cache, the same three arms (~30 s)
#   bench     tools/bench_op.py: the op alone, every path side by side with RoPE (~2-3 min; not in the two commands:
#             the op alone does not decide what the model runs)
#   preset    study.py scaling --configs gpu: the gpu preset for rope and crope over 3 seeds, 2000 iterations each
#             (about a minute a run, ~7 min; not in the two commands), into the scaling table with the paired
#             CRoPE - RoPE interval; finished runs in out/study/scaling are kept
#
# DIR defaults to ./gpu_check_logs. It stops at once, with one line, where there is no CUDA device or no data file
# (CROPE_DATA, else data/tinyshakespeare.txt: `python -c "import data; data.fetch_shakespeare()"` downloads it).
# Needs: a GPU of compute capability 8.0 or newer for the tensor-core paths; a CUDA build of PyTorch with triton (a
# plain `pip install torch` on Linux), ninja and pytest in the python3 on the PATH; nvcc (CUDA_HOME, or on the PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash tools/gpu_check.sh [--logs DIR] STEP ... (steps: build probe tests train generate bench preset);
the two commands: bash tools/gpu_check.sh build probe tests, then bash tools/gpu_check.sh train generate"
logs=gpu_check_logs
if [ "${1:-}" = "--logs" ]; then
  [ -n "${2:-}" ] || { echo "gpu_check: --logs needs a folder" >&2; exit 2; }
  logs=$2
  shift 2
fi
case "${1:-}" in
  -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; echo "$usage"; exit 0 ;;
  "") echo "$usage" >&2; exit 2 ;;
esac
data="${CROPE_DATA:-data/tinyshakespeare.txt}"
[ -f "$data" ] || { echo "gpu_check: no data file at $data: set CROPE_DATA, or download it with python -c 'import data; data.fetch_shakespeare()'" >&2; exit 1; }
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || { echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check" >&2; exit 1; }
export CROPE_DATA="$(cd "$(dirname "$data")" && pwd)/$(basename "$data")"
mkdir -p "$logs"
[ -f "$logs/summary.md" ] || printf '| step | result | wall time | what it found |\n|---|---|---|---|\n' > "$logs/summary.md"
failed=0

timed() {  # $1: name; the rest: the command. Its summary row is written when it ends; a failure does not stop the next.
  local name=$1 start=$SECONDS status=ok
  shift
  echo "== $name =="
  "$@" || { echo "gpu_check: $name FAILED"; failed=1; status=FAILED; }
  echo "== $name: $((SECONDS - start)) s"
  echo "| $name | $status | $((SECONDS - start)) s | $(found "$name") |" >> "$logs/summary.md"
}

found() {  # the lines of a step's log that say what it found
  case "$1" in
    build) grep -h "spills in:" "$logs/ptxas.txt" 2>/dev/null | head -1 ;;
    probe) grep -h "refusal probe on cuda\|stopped after" "$logs/probe.log" 2>/dev/null | tr '\n' ' ' ;;
    tests) grep -hE "[0-9]+ (passed|failed)" "$logs/tests.log" 2>/dev/null | tail -1 ;;
    train | generate) grep -h "^target\|^host waits" "$logs/$1.log" 2>/dev/null | tr '\n' ' ' ;;
    bench) grep -h "^target" "$logs/bench.log" 2>/dev/null | tr '\n' ' ' ;;
    preset) awk -F'|' '/^\| gpu:/ {print "CRoPE - RoPE, final" $8 "best" $9}' "$logs/scaling.md" 2>/dev/null ;;
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
  timeout 300 python3 tools/refusal_probe.py --max_crashes 3 --time_limit 120 2>&1 | tee "$logs/probe.log"
}

tests() {  # the refusals ran in the probe step
  PYTHONUNBUFFERED=1 python3 -m pytest -q -rs tests/test_kernel.py -k "not refusal" 2>&1 | tee "$logs/tests.log" | tail -25
}

train() {
  PYTHONUNBUFFERED=1 python3 tools/bench_model.py train 2>&1 | tee "$logs/train.log" | tail -30
}

generate() {
  PYTHONUNBUFFERED=1 python3 tools/bench_model.py generate 2>&1 | tee "$logs/generate.log" | tail -30
}

bench() {
  PYTHONUNBUFFERED=1 python3 tools/bench_op.py 2>&1 | tee "$logs/bench.log" | tail -60
}

preset() {
  PYTHONUNBUFFERED=1 python3 study.py scaling --out_dir out/study/scaling --configs gpu --eval_iters 100 2>&1 |
    tee "$logs/preset.log" | tail -30
  local status=${PIPESTATUS[0]}
  cp out/study/scaling/scaling.md out/study/scaling/scaling.png "$logs/" 2>/dev/null
  return "$status"
}

for ((i = 1; i <= $#; i++)); do
  step=${!i}
  case "$step" in
    build)
      timed build build
      [ $failed = 0 ] || break ;;  # no build of this source: nothing below would test it
    probe | tests | train | generate | bench | preset) timed "$step" "$step" ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
cat "$logs/summary.md"
exit $failed
