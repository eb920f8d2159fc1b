#!/usr/bin/env bash
# The nanoGPT reference numbers the README compares with: nanoGPT's own train.py on tiny
# Shakespeare (character level), with the CPU command from nanoGPT's README, timed end to end.
#
#   bash tools/nanogpt_reference.sh                 # clones nanoGPT (needs git and internet)
#   bash tools/nanogpt_reference.sh PATH/TO/nanoGPT # or uses a checkout you already have
#   bash tools/nanogpt_reference.sh PATH gpu        # nanoGPT's GPU config instead (one GPU)
#
# nanoGPT needs numpy and requests besides torch. The text comes from CROPE_DATA, or
# data/tinyshakespeare.txt (python train_shakespeare.py downloads it there), so nanoGPT's
# prepare.py needs no network. nanoGPT estimates validation loss on random batches (eval_iters
# of them), crope on fixed ones: compare to two decimals.
set -euo pipefail
cd "$(dirname "$0")/.."
NANOGPT_COMMIT=3adf61e154c3fe3fca428ad6bc3818b27a3b8291  # the commit the README's numbers used
nanogpt=${1:-}
config=${2:-cpu}
text=${CROPE_DATA:-data/tinyshakespeare.txt}
[ -f "$text" ] || python3 -c "import data; data.fetch_shakespeare()"

if [ -z "$nanogpt" ]; then
  nanogpt=$(mktemp -d)/nanoGPT
  git clone -q https://github.com/karpathy/nanoGPT "$nanogpt"
  git -C "$nanogpt" checkout -q "$NANOGPT_COMMIT"
fi
work=$(mktemp -d)
cp -r "$nanogpt"/. "$work"
cp "$text" "$work/data/shakespeare_char/input.txt"
cd "$work"
python3 data/shakespeare_char/prepare.py >/dev/null

if [ "$config" = gpu ]; then
  flags=(config/train_shakespeare_char.py)
else  # nanoGPT's README, "I only have a macbook"
  flags=(config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1
         --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
         --lr_decay_iters=2000 --dropout=0.0)
fi
start=$(date +%s.%N)
python3 train.py "${flags[@]}" | tee train.log | grep -E "^step " 
end=$(date +%s.%N)
echo "nanoGPT ($config config): $(grep -E '^step ' train.log | tail -1), $(python3 -c "print(f'{$end - $start:.0f}')") s wall in all"
