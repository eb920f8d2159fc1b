#!/usr/bin/env bash
# Everything the fused kernel needs checked on a GPU, in one call: the build (with ptxas's register
# report), the kernel tests (every CUDA path forced, against float64, and the self-check), the benchmark
# (every path side by side) and a `gpu`-preset training run of CRoPE with the op against RoPE.
#
#   bash tools/gpu_check.sh        # logs in $OUT when it is set, else in /tmp/crope_gpu_check
#
# Needs: an NVIDIA GPU; a CUDA build of PyTorch with triton (a plain `pip install torch` on Linux), ninja
# and pytest in the python3 on the PATH; nvcc (CUDA_HOME, or on the PATH). The training run reads tiny
# Shakespeare from CROPE_DATA if set, else downloads it into data/ (internet needed once).
set -uo pipefail
out=${OUT:-/tmp/crope_gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$out/gpu.txt"
# build for this GPU only, ahead of time, with the register/spill report of every kernel
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
NVCC_APPEND_FLAGS="-Xptxas -v" python3 setup.py build_ext --inplace > "$out/build.log" 2>&1
tail -3 "$out/build.log"
python3 tools/ptxas_report.py "$out/build.log" | tee "$out/ptxas.txt"
PYTHONUNBUFFERED=1 python3 -m pytest -q tests/test_kernel.py 2>&1 | tee "$out/tests.log" | tail -15
PYTHONUNBUFFERED=1 python3 bench.py --train_tokens 2>&1 | tee "$out/bench.log" | tail -40
PYTHONUNBUFFERED=1 python3 train_shakespeare.py --preset gpu --out_dir "$out/gpu_preset" 2>&1 | tail -8 | tee "$out/gpu_preset.log"
