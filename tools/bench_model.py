"""
The whole model, timed side by side in one process: training steps (what train_shakespeare.py runs) or generation
(what sample.py runs) of RoPE, CRoPE as it runs by default, and CRoPE through the fused op. This is the measurement
that decides where --kernel auto takes the op (fused_op.OP_MEASURED_FASTER; csrc/NOTES.md): the op alone is not.

    python tools/bench_model.py train                    # the gpu preset on a GPU, the cpu preset elsewhere
    python tools/bench_model.py train --blocks 5 --block_iters 200 --n_layer 8   # training flags are passed on
    python tools/bench_model.py generate --samples 8 --new_tokens 255

Every arm is built (and, for training with --compile, compiled) once and warmed up; then the arms run in turn, in
blocks of steps (training) or of whole generations, the order rotating from block to block, so that a busy machine
or a warming GPU slows them alike. Each block is timed on its own (synchronised at its ends only). The report:
tokens/s of every arm in every block, and per arm its median and range over the blocks against RoPE's in the same
blocks; the target line says "met" only when CRoPE by default is at least RoPE's speed in every block. On a GPU the
training steps of the last block run under torch.cuda.set_sync_debug_mode, which counts every wait of the host for
the GPU inside them (there should be none).
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules sit one folder up

import fused_op  # noqa: E402
import settings  # noqa: E402
import train_shakespeare as ts  # noqa: E402
from cli import fail, gives  # noqa: E402
from crope import GPT  # noqa: E402
from data import data_path, load_dataset  # noqa: E402

# (label, variant, --kernel mode): RoPE, CRoPE as train_shakespeare.py and sample.py run it by default, CRoPE through
# the op (CROPE_CUDA_PATH forces one of its CUDA paths)
ARMS = (("rope", "rope", "torch"), ("crope", "crope", "auto"), ("crope, op", "crope", "ext"))


class Arm:
    """One arm's model (and for training its optimizer), built as train_shakespeare.py builds it."""

    def __init__(self, label, variant, mode, args, rt, vocab_size, use):
        self.label, self.args, self.rt = label, args, rt
        torch.manual_seed(args.seed)
        self.model = GPT(ts.model_config(args, variant, vocab_size)).to(rt.device)
        kernel = fused_op.qkv_kernel(rt.device, mode, use=use, bias=args.bias) if variant == "crope" else None
        line = fused_op.use_kernel(self.model, kernel)
        self.kernel_line = line if variant == "crope" else "RoPE's projection: nn.Linear, then apply_rotary"
        self.optimizer = ts.make_optimizer(self.model, args, rt.device)
        self.compiled = torch.compile(self.model, dynamic=False) if args.compile and use == "train" else self.model
        self.it = 0
        self.rates = []  # tokens/s of each block

    def train(self, steps, train_data):
        for _ in range(steps):
            ts.train_step(self.it, self.compiled, self.optimizer, train_data, self.args, self.rt)
            self.it += 1

    def generate(self, prompt, new_tokens):
        with torch.no_grad():
            self.model.generate(prompt, new_tokens, top_k=1)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_block(arm, run, tokens, device):
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    arm.rates.append(tokens / (time.perf_counter() - start))
    return arm.rates[-1]


def host_waits(run, device):
    """How often run() made the host wait for the GPU (torch.cuda.set_sync_debug_mode's warnings), or None on a
    CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def report(arms, what, target):
    """Per arm: median and range of tokens/s, and of its ratio to RoPE's tokens/s in the same blocks; the target."""
    rope = arms[0]
    print(f"\n| arm | tokens/s, median [range] | / rope, median [range] |{' MFU, median |' if target else ''}")
    print("|---|---|---|" + ("---|" if target else ""))
    ratios = {}
    for arm in arms:
        ratios[arm.label] = [a / r for a, r in zip(arm.rates, rope.rates)]
        r = ratios[arm.label]
        cells = [f"{statistics.median(arm.rates):,.0f} [{min(arm.rates):,.0f}, {max(arm.rates):,.0f}]",
                 f"{statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]"]
        if target:
            mfu = arm.rt.peak_flops and arm.model.flops_per_token() * statistics.median(arm.rates) / arm.rt.peak_flops
            cells.append(f"{mfu:.1%}" if mfu else "-")
        print(f"| {arm.label} | " + " | ".join(cells) + " |")
    default = ratios["crope"]
    print(f"\ntarget {what}: CRoPE by default at {statistics.median(default):.3f}x RoPE's tokens/s (median of "
          f"{len(default)} blocks, range {min(default):.3f}-{max(default):.3f}; met when the low end is at least "
          f"1.00): {'met' if min(default) >= 1.0 else 'MISSED'}")


def bench_train(args, rt, options):
    train_data, _, tokenizer, _ = load_dataset(data_path(args.data), args.tokenizer, args.block_size)
    arms = [Arm(label, variant, mode, args, rt, tokenizer.vocab_size, "train") for label, variant, mode in ARMS]
    tokens = options.block_iters * args.batch_size * args.block_size
    print(f"training, the {args.preset} preset's model (batch {args.batch_size} x block {args.block_size}, "
          f"{rt.dtype}, compile {args.compile}) on {fused_op.device_name(rt.device)}; {options.blocks} blocks of "
          f"{options.block_iters} steps per arm, after {options.warmup} steps of warm-up")
    for arm in arms:
        print(f"  {arm.label}: {arm.kernel_line}", flush=True)
        start = time.perf_counter()
        arm.train(options.warmup, train_data)
        synchronize(rt.device)
        print(f"  {arm.label}: warm-up (and compilation) {time.perf_counter() - start:.1f} s", flush=True)
    for block in range(options.blocks):
        for arm in arms[block % len(arms):] + arms[:block % len(arms)]:
            rate = timed_block(arm, lambda: arm.train(options.block_iters, train_data), tokens, rt.device)
            print(f"block {block + 1} | {arm.label} | {rate:,.0f} tokens/s | "
                  f"{1000 * args.batch_size * args.block_size / rate:.2f} ms/step", flush=True)
    for arm in arms:
        waits = host_waits(lambda: arm.train(options.block_iters, train_data), rt.device)
        if waits is not None:
            print(f"host waits for the GPU in {options.block_iters} steady-state steps of {arm.label}: {waits}")
    report(arms, f"{args.preset} preset training", target=True)


def bench_generate(args, rt, options):
    new_tokens = options.new_tokens or args.block_size - 1  # within the context: the KV cache, a token per step
    cache = "with the KV cache" if new_tokens < args.block_size else \
        "past the context, where each step runs the whole window"
    arms = [Arm(label, variant, mode, args, rt, options.vocab_size, "generate") for label, variant, mode in ARMS]
    for arm in arms:
        arm.model.eval()
    prompt = torch.zeros(options.samples, 1, dtype=torch.long, device=rt.device)
    tokens = options.samples * new_tokens
    print(f"generation, the {args.preset} preset's model (random weights, vocabulary {options.vocab_size}, "
          f"float32, as sample.py runs it) on {fused_op.device_name(rt.device)}: {options.samples} samples x "
          f"{new_tokens} new tokens {cache}, {options.blocks} blocks per arm")
    for arm in arms:
        print(f"  {arm.label}: {arm.kernel_line}", flush=True)
        arm.generate(prompt, 8)  # warm-up
    for block in range(options.blocks):
        for arm in arms[block % len(arms):] + arms[:block % len(arms)]:
            rate = timed_block(arm, lambda: arm.generate(prompt, new_tokens), tokens, rt.device)
            print(f"block {block + 1} | {arm.label} | {rate:,.0f} tokens/s", flush=True)
    report(arms, f"{args.preset} preset generation", target=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("train", "generate"))
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per arm (default 5)")
    p.add_argument("--block_iters", type=int, default=200, help="training steps per block (default 200)")
    p.add_argument("--warmup", type=int, default=30, help="training steps before the first block (default 30)")
    p.add_argument("--samples", type=int, default=8, help="generation: sequences per call (default 8)")
    p.add_argument("--new_tokens", type=int, help="generation: new tokens per call (default: block_size - 1)")
    p.add_argument("--vocab_size", type=int, default=65, help="generation: the model's vocabulary (default 65)")
    options, train_flags = p.parse_known_args(argv)
    for name in ("blocks", "block_iters", "warmup", "samples", "new_tokens", "vocab_size"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(options, name)}")
    if gives(train_flags, "--kernel"):
        fail("bench_model.py times every --kernel side by side (rope, crope by default, crope through the op): "
             "leave --kernel out; CROPE_CUDA_PATH picks the op's CUDA path")
    if not gives(train_flags, "--preset"):
        train_flags = ["--preset", "gpu" if torch.cuda.is_available() else "cpu", *train_flags]
    args = settings.resolve(train_flags)
    rt = ts.Runtime(args)
    try:
        (bench_train if options.what == "train" else bench_generate)(args, rt, options)
    except fused_op.KernelError as e:
        fail(f"the op's arm cannot run here: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
