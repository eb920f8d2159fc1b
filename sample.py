"""
Sample text from a checkpoint written by train_shakespeare.py, with the KV cache.

    python sample.py out/cpu/crope                       # best.pt of that run
    python sample.py out/cpu/rope/last.pt --start "ROMEO:" --num_samples 3 --top_p 0.9
    python sample.py out/cpu/crope --block_size 256 --rope_scaling yarn   # past the trained context
"""

if __name__ == "__main__":  # first, before torch loads: Ctrl-C while the command starts is one line
    import ctrl_c
    ctrl_c.stop_with_one_line()

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

import fused_op
from cli import ArgParser, check_memory, fail, generation_bytes, path_text, resolve_device
from crope import ROPE_SCALINGS, GPTConfig
from fused_op import KernelError
from data import Tokenizer
from runs import load_checkpoint, model_from_checkpoint

# Below this, logits / temperature can overflow float32 (and sampling is all but greedy anyway).
MIN_TEMPERATURE = 1e-3


def parse_args(argv=None):
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", type=path_text, help="a checkpoint file, or a run folder (its best.pt)")
    p.add_argument("--out_dir", type=path_text,
                   help="a run folder, as train_shakespeare.py wrote it (same as the positional)")
    p.add_argument("--start", default="\n", help="the prompt; FILE:path reads it from a file")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8,
                   help=f"< 1 sharper, > 1 more random; at least {MIN_TEMPERATURE} (--top_k 1 is greedy)")
    p.add_argument("--top_k", type=int, help="keep the k most likely tokens")
    p.add_argument("--top_p", type=float, help="keep the most likely tokens that hold this much probability")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--block_size", type=int, help="a context longer than the model was trained with (rope and "
                   "crope models), its rotary angles by --rope_scaling")
    p.add_argument("--rope_scaling", choices=ROPE_SCALINGS,
                   help="with --block_size: extrapolate (no scaling), linear (position interpolation), ntk, yarn "
                   "or llama3; default: the model's own (extrapolate unless it was extended)")
    args = p.parse_args(argv)
    if args.checkpoint and args.out_dir:
        p.error("name the checkpoint once: as the first argument or with --out_dir")
    args.checkpoint = args.checkpoint or args.out_dir
    if not args.checkpoint:
        p.error("name a checkpoint file or a run folder")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        p.error(f"--temperature must be a positive number, got {args.temperature}")
    if args.temperature < MIN_TEMPERATURE:
        p.error(f"--temperature must be at least {MIN_TEMPERATURE}, got {args.temperature}: for the most likely "
                "token every time, use --top_k 1")
    if not 0 <= args.seed < 2 ** 63:
        p.error(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.rope_scaling is not None and args.block_size is None:
        p.error("--rope_scaling sets how a longer context is reached: give the context with --block_size")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top_p must be in (0, 1]")
    if args.top_p is not None:  # as float32, a smaller top_p is 0 and keeps no token; this one keeps the likeliest
        args.top_p = max(args.top_p, torch.finfo(torch.float32).tiny)
    if args.top_k is not None and args.top_k < 1:
        p.error("--top_k must be at least 1")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        p.error("--num_samples and --max_new_tokens must be at least 1")
    return args


def prompt_ids(start, tokenizer):
    """The tokens of --start (FILE:path reads a file), or one clear error."""
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            fail(f"no prompt file at {path}")
        try:
            start = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            fail(f"the prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})")
    ids = tokenizer.encode(start)
    if not ids:
        fail("the prompt is empty: give --start some text")
    return ids


def check_generation_memory(config, args, prompt_tokens, device):
    """Refuse, in one line, samples that need more memory than the device has, before the model is built."""
    try:  # the longer context of --block_size (a shorter one is refused when the model is extended)
        config = dataclasses.replace(config, block_size=max(args.block_size or 0, config.block_size))
    except ValueError as e:
        fail(str(e))
    tokens = prompt_tokens + args.max_new_tokens
    check_memory(generation_bytes(config, args.num_samples, tokens), device,
                 f"sampling {args.num_samples} x {tokens} tokens with a context of {config.block_size} tokens",
                 "use a smaller --num_samples, --max_new_tokens or --block_size")


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)
    tokenizer = Tokenizer(**state["tokenizer"])
    ids = prompt_ids(args.start, tokenizer)
    check_generation_memory(GPTConfig(**state["model_config"]), args, len(ids), device)
    model = model_from_checkpoint(state).to(device).eval()
    if args.block_size is not None:
        try:
            model = model.extend_context(args.block_size, args.rope_scaling)
        except ValueError as e:
            fail(str(e))
    if model.config.pos == "crope":
        try:  # the fused op where CROPE_KERNEL (auto, torch or ext) takes it; a bad mode, or ext where it cannot run
            kernel = fused_op.qkv_kernel(device, use="generate", bias=model.config.bias)
        except KernelError as e:
            fail(str(e))
        print(fused_op.use_kernel(model, kernel), file=sys.stderr)
    prompt = torch.tensor(ids, dtype=torch.long, device=device)[None].repeat(args.num_samples, 1)

    torch.manual_seed(args.seed)
    start_time = time.perf_counter()
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p)
    seconds = time.perf_counter() - start_time
    for row in out.tolist():
        print(tokenizer.decode(row))
        print("---------------")
    print(f"{args.num_samples} x {args.max_new_tokens} tokens in {seconds:.2f} s: "
          f"{args.num_samples * args.max_new_tokens / seconds:,.0f} tokens/s on {device}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
