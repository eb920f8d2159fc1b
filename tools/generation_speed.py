"""
Tokens per second of GPT.generate in this checkout against another git revision, side by side.

    python tools/generation_speed.py out/cpu/crope/best.pt            # against b6bee2e (generate before these changes)
    python tools/generation_speed.py out/cpu/crope/best.pt --rev HEAD~3 --new_tokens 500 --reps 5

Each revision runs in its own process (a `git archive` copy of it), alternately, so that both see the
same load on a shared machine; both sample with the same seed and must produce the same tokens.
The default, 2 samples of 500 new tokens after a one-token prompt, runs far past a 64-token context.
Besides wall-clock tokens/s it reports tokens per CPU second on one thread (--threads 1), which other
programs on a busy machine disturb much less.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GENERATE = r"""
import sys, time, torch
torch.set_num_threads({threads})
sys.path.insert(0, {tree!r})
try:
    from runs import load_checkpoint, model_from_checkpoint
except ImportError:  # revisions before runs.py
    from train_shakespeare import load_checkpoint, model_from_checkpoint
model = model_from_checkpoint(load_checkpoint({checkpoint!r})).eval()
prompt = torch.zeros({samples}, 1, dtype=torch.long)
model.generate(prompt, 20)  # warm-up
torch.manual_seed(1337)
start, start_cpu = time.perf_counter(), time.process_time()
out = model.generate(prompt, {new_tokens})
wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
print({samples} * {new_tokens} / wall, {samples} * {new_tokens} / cpu, hash(tuple(out.flatten().tolist())))
"""


def tokens_per_second(tree, args):
    code = GENERATE.format(tree=str(tree), checkpoint=str(Path(args.checkpoint).resolve()), samples=args.samples,
                           new_tokens=args.new_tokens, threads=args.threads)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree)
    if result.returncode:
        raise SystemExit(f"error: generation failed in {tree}: {result.stderr.strip().splitlines()[-1]}")
    wall, cpu, tokens = result.stdout.split()
    return float(wall), float(cpu), tokens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint both revisions can read")
    p.add_argument("--rev", default="b6bee2e", help="the git revision to compare with")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--new_tokens", type=int, default=500)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch_threads(), help="torch threads (default: torch's own)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as other:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.rev], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", other], input=archive.stdout, check=True)
        speeds = {(args.rev, unit): [] for unit in ("tokens/s", "tokens per CPU second")}
        speeds.update({("this checkout", unit): [] for unit in ("tokens/s", "tokens per CPU second")})
        outputs = set()
        for _ in range(args.reps):
            for name, tree in ((args.rev, Path(other)), ("this checkout", ROOT)):
                wall, cpu, tokens = tokens_per_second(tree, args)
                speeds[name, "tokens/s"].append(wall)
                speeds[name, "tokens per CPU second"].append(cpu)
                outputs.add(tokens)
    print(f"{args.samples} x {args.new_tokens} new tokens, {args.threads} thread(s), {args.reps} runs each, alternating")
    for (name, unit), values in speeds.items():
        print(f"{name}: median {statistics.median(values):,.0f} {unit}, best {max(values):,.0f} "
              f"({', '.join(f'{v:,.0f}' for v in values)})")
    print("same tokens from both:", len(outputs) == 1)


def torch_threads():
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    main()
