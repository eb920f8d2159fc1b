#!/usr/bin/env bash
# Everything the fused kernel needs checked on a GPU, in one call: build, tests, benchmark.
# Through the device tool:  bash tools/gpu_check.sh   (writes logs to $OUT when it is set), with
# carry ["data"] after `python -c "import train_shakespeare as t; t.fetch_shakespeare()"` put the text there.
set -uo pipefail
out=${OUT:-/tmp/crope_gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
export TORCH_CUDA_ARCH_LIST="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
export CROPE_DATA="${CROPE_DATA:-$PWD/data/tinyshakespeare.txt}"
# ahead-of-time build (also shows registers and spills of every kernel)
python3 setup.py build_ext --inplace 2>&1 | tee "$out/build.log" | tail -3
PYTHONUNBUFFERED=1 python3 -m pytest -q tests/test_kernel.py 2>&1 | tee "$out/tests.log" | tail -15
PYTHONUNBUFFERED=1 python3 bench.py --train_tokens 2>&1 | tee "$out/bench.log" | tail -25
PYTHONUNBUFFERED=1 python3 train_shakespeare.py --preset gpu --out_dir "$out/gpu_preset" 2>&1 | tail -8 | tee "$out/gpu_preset.log"
