"""Call the fused op with every argument it must refuse, in a child process, and check that each refusal raises
with its message: a refusal that kills the process (a signal) or says the wrong thing fails the probe.

    python tools/refusal_probe.py                  # the CPU cases, and the CUDA ones where there is a GPU
    python tools/refusal_probe.py --device cpu     # one device's cases only

The cases run one after another in one child; when the child dies, the case it was running is marked crashed and
a new child goes on from the next case, so one crash hides nothing. The cases: every bad argument of
crope::qkv_rotary and its backward (shapes, dtypes, devices, positions, n_rotary, the path's name), and on a GPU
every forced path on every dtype and feature count it does not take (as qkv_rotary_paths says). Prints one line
per failure and a summary; exits 1 if any case failed. It stops early, as a failure, after three crashed children or two minutes per device
(--max_crashes, --time_limit).
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cases(device):
    """[(name, call, expected message regex)]: call() must raise an exception whose text matches."""
    import torch

    import fused_op
    from crope import rope_frequencies, rotary_tables

    def inputs(T=4, d=16, dtype=torch.float32, out=48, head_size=8):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, T, d, generator=g).to(device, dtype)
        weight = torch.randn(out // 2, d // 2, 2, generator=g).to(device, dtype)
        cos, sin = (t.to(device) for t in rotary_tables(T, rope_frequencies(head_size, 10000.0)))
        return x, weight, cos, sin

    op, backward = torch.ops.crope.qkv_rotary, torch.ops.crope.qkv_rotary_backward
    x, weight, cos, sin = inputs()
    grad = torch.zeros(1, 4, 48, device=device)
    other = "meta"
    found = [
        ("x 2-d", lambda: op(x[0], weight, cos, sin, 0, 32), r"x must be \(B, T, in_features\), got \[4, 16\]"),
        ("x int", lambda: op(x.int(), weight, cos, sin, 0, 32), r"x must be float64, float32, bfloat16 or float16"),
        ("weight shape", lambda: op(x, weight[:, :4], cos, sin, 0, 32),
         r"weight must be \(out/2, in/2, 2\) with in = x.size\(-1\) = 16, got \[24, 4, 2\]"),
        ("weight dtype", lambda: op(x, weight.double(), cos, sin, 0, 32), r"weight must have x's dtype \(Float\)"),
        ("weight device", lambda: op(x, weight.to(other), cos, sin, 0, 32), r"weight must be on x's device"),
        ("cos 1-d", lambda: op(x, weight, cos[0], sin, 0, 32), r"cos must be \(positions, head_size/2\), got \[4\]"),
        ("sin shape", lambda: op(x, weight, cos, sin[:, :2], 0, 32),
         r"sin must have cos's shape \[4, 4\], got \[4, 2\]"),
        ("sin int", lambda: op(x, weight, cos, sin.int(), 0, 32), r"sin must be a floating-point table"),
        ("cos device", lambda: op(x, weight, cos.to(other), sin, 0, 32), r"cos must be on x's device"),
        ("positions", lambda: op(x, weight, cos, sin, 10, 32), r"positions 10\.\.14 exceed the rotary tables \(4\)"),
        ("n_rotary", lambda: op(x, weight, cos, sin, 0, 6),
         r"n_rotary \(6\) must be a multiple of head_size \(8\) and at most out_features \(48\)"),
        ("path name", lambda: op(x, weight, cos, sin, 0, 32, "fast"),
         r"path must be default, decode, tiled, pipelined or cublas, got 'fast'"),
        ("backward grad shape", lambda: backward(grad[:, :, :4], x, weight, cos, sin, 0, 32, [True, True]),
         r"grad must be \(B, T, out\) = \[1, 4, 48\], got \[1, 4, 4\]"),
        ("backward grad dtype", lambda: backward(grad.double(), x, weight, cos, sin, 0, 32, [True, True]),
         r"grad must have x's dtype"),
        ("backward positions", lambda: backward(grad, x, weight, cos, sin, 3, 32, [True, True]),
         r"positions 3\.\.7 exceed the rotary tables \(4\)"),
        ("paths: x 2-d", lambda: torch.ops.crope.qkv_rotary_paths(x[0], weight, 32),
         r"x must be \(B, T, in\) and weight"),
    ]
    if device == "cuda":  # every forced path on every input the op says it cannot compute (qkv_rotary_paths)
        for path in fused_op.CUDA_PATHS:
            for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
                for d in (64, 40, 44, 16416):  # in_features: multiples of 32, of 8, of 4; past 32 KB in 16 bits
                    x, weight, cos, sin = inputs(1, d, dtype, out=8, head_size=4)
                    if path in torch.ops.crope.qkv_rotary_paths(x, weight, 8):
                        continue
                    found.append((f"{path} {str(dtype)[6:]} in_features {d}",
                                  lambda args=(x, weight, cos, sin, 0, 8, path): op(*args),
                                  rf"path '{path}' (takes|needs a GPU of compute capability 8.0)"))
    return found


def child(device, start, crash_case=None):
    """Run the cases from index start: first 'total N', then per case 'start i name', then 'raised i' or
    'wrong i message'; 'done' at the end. crash_case: the case to replace by a segmentation fault, -1 for every
    case (for the tests that show the probe survives a crash, and stops a crash loop)."""
    found = cases(device)
    print(f"total {len(found)}", flush=True)
    for i in range(start, len(found)):
        name, call, expected = found[i]
        print(f"start {i} {name}", flush=True)
        if crash_case in (i, -1):
            os.kill(os.getpid(), signal.SIGSEGV)
        try:
            call()
            print(f"wrong {i} no exception", flush=True)
        except Exception as e:  # noqa: BLE001: every refusal is an exception; its text is what is checked
            text = " ".join(str(e).split())
            print(f"raised {i}" if re.search(expected, text) else f"wrong {i} {text[:300]}", flush=True)
    print("done", flush=True)


def probe(device, extra=(), max_crashes=3, time_limit=120):
    """Run every case of device in children; returns (the failures as lines, the number of cases). Stops after
    max_crashes crashed children or time_limit seconds, the cases not run counted as failures (a crash loop would
    otherwise cost a restart per case). extra: more arguments for the children (the tests add a case that crashes)."""
    failures, start, total, names, crashes = [], 0, 0, {}, 0
    deadline = time.monotonic() + time_limit
    while True:
        try:
            result = subprocess.run([sys.executable, __file__, "--child", "--device", device, "--start", str(start),
                                     *extra], cwd=ROOT, capture_output=True, text=True,
                                    timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return failures + [f"{device}: stopped after {time_limit} s, at case {start} of {total or '?'}"], total
        lines, running = result.stdout.splitlines(), None
        for line in lines:
            word, *rest = line.split(" ", 2)
            if word == "total":
                total = int(rest[0])
            elif word == "start":
                running = int(rest[0])
                names[running] = rest[1]
            elif word in ("raised", "wrong"):
                running = None
                if word == "wrong":
                    failures.append(f"{device} {names[int(rest[0])]}: wrong refusal: {rest[1] if len(rest) > 1 else ''}")
        if "done" in lines:
            return failures, total
        if running is None:  # the child died outside any case: nothing to blame on a case
            return failures + [f"{device}: the probe's child failed (exit {result.returncode}): "
                               f"{result.stderr.strip().splitlines()[-1:]}"], total
        how = f"signal {signal.Signals(-result.returncode).name}" if result.returncode < 0 else \
            f"exit {result.returncode}"
        failures.append(f"{device} {names[running]}: the process died ({how}) instead of raising")
        crashes, start = crashes + 1, running + 1
        if crashes >= max_crashes and start < total:
            return failures + [f"{device}: stopped after {crashes} crashes; {total - start} cases not run"], total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cpu, and cuda where there is a GPU")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--crash_case", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max_crashes", type=int, default=3, help="stop after this many crashed children (default 3)")
    p.add_argument("--time_limit", type=float, default=120, help="stop after this many seconds per device "
                   "(default 120)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        import fused_op
        fused_op.qkv_kernel(args.device, "ext")  # builds, loads and self-checks the op
        child(args.device, args.start, args.crash_case)
        return 0
    import torch
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failed = 0
    for device in devices:
        failures, total = probe(device, max_crashes=args.max_crashes, time_limit=args.time_limit)
        for line in failures:
            print(line)
        print(f"refusal probe on {device}: {total - len(failures)} of {total} refusals raised their message")
        failed += len(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
