"""Check the machine code (SASS) of a CUDA build of csrc/ for what each kernel was written to do (the
properties below). Needs no GPU, only cuobjdump (CUOBJDUMP, else on the PATH).

  every kernel  no local memory (LDL/STL: spills or stack arrays)
  tiled         fragments through ldmatrix (LDSM) into mma.sync (HMMA.16816.F32); no 16-bit shared
                loads (scalar fragment loads) and no 16-bit global stores (the epilogue stores pairs);
                for GPUs older than sm_80, a stub that traps
  pipelined     the same, loaded by cp.async (LDGSTS, in commit groups: LDGDEPBAR), and every output
                store 16 bytes wide (STG.E.128)
  decode        its 8 streaming weight loads (4 with 8 tokens; LDG.E.NA.128: no L1 allocation) issued
                before the first multiply, and x read from shared memory (LDS.128)
  rotate        whole pairs loaded and stored: no 16-bit global accesses

    python tools/sass_check.py build/lib/crope_ext*.so
    python tools/sass_check.py --counts build/lib/crope_ext*.so   # also how often each kernel uses them
"""

import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptxas_report import demangle  # noqa: E402

INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def functions(binary):
    """{(kernel, arch): [opcodes]} from cuobjdump -sass."""
    tool = os.environ.get("CUOBJDUMP", "cuobjdump")
    sass = subprocess.run([tool, "-sass", binary], capture_output=True, text=True, check=True).stdout
    found, arch, name = {}, None, None
    for line in sass.splitlines():
        if m := re.search(r"code for (sm_\w+)", line):
            arch = m[1]
        elif m := re.search(r"Function : (\S+)", line):
            name = m[1]
            found[(name, arch)] = []
        elif name and (m := INSTRUCTION.search(line)):
            found[(name, arch)].append(m[1])
    names = dict(zip(found, demangle([name for name, _ in found])))
    return {(names[key], key[1]): ops for key, ops in found.items()}


def accesses(ops, pattern):
    """The 16-bit memory accesses among ops, as problems."""
    return [f"16-bit access {op}" for op in sorted({op for op in ops if re.match(pattern, op)})]


# Instructions a tensor-core kernel must contain (opcode prefix, what its absence means), sm_80 and newer.
TENSOR_CORE = [("LDSM", "no ldmatrix (LDSM): fragments are loaded element by element"),
               ("HMMA.16816.F32", "no HMMA.16816.F32")]
PIPELINED = [("LDGSTS", "no cp.async (LDGSTS): tiles go through registers"),
             ("LDGDEPBAR", "no cp.async groups (LDGDEPBAR): nothing is pipelined")]
SM80_KERNELS = ("qkv_tiled_kernel", "qkv_pipelined_kernel")  # stubs that trap below sm_80


def missing(ops, required):
    return [what for prefix, what in required if not any(op.startswith(prefix) for op in ops)]


def loads_before_math(ops, load):
    """How many 16-byte global loads matching `load` come before the first fp32 multiply."""
    first_math = next(i for i, op in enumerate(ops) if op.startswith(("FFMA", "FMUL")))
    return sum(op.startswith("LDG") and ".128" in op and load in op for op in ops[:first_math])


def check(kernel, arch, ops):
    """Problems with one kernel's opcodes, as lines."""
    problems = [f"local memory ({op})" for op in sorted({op for op in ops if op.startswith(("LDL", "STL"))})]
    if kernel.startswith(SM80_KERNELS) and int(arch[3:5]) < 80:  # the stub, never launched there
        if not any(op.startswith("BPT.TRAP") for op in ops):
            problems.append("the stub for GPUs older than sm_80 does not trap")
    elif kernel.startswith("qkv_tiled_kernel"):
        problems += missing(ops, TENSOR_CORE)
        problems += accesses(ops, r"(LDS|STG)(\.E)?\.[US]16")
    elif kernel.startswith("qkv_pipelined_kernel"):
        problems += missing(ops, TENSOR_CORE + PIPELINED + [("STG.E.128", "no 16-byte stores of the output")])
        problems += accesses(ops, r"(LDS|STG)(\.E)?\.[US]16")
        if any(op.startswith("STG") and ".128" not in op for op in ops):
            problems.append("output stores narrower than 16 bytes")
    elif kernel.startswith("qkv_decode_kernel"):
        tokens = int(re.search(r", (\d+)>", kernel)[1])
        loads = loads_before_math(ops, ".NA.")  # the weights' streaming loads (no L1 allocation)
        expected = 4 if tokens >= 8 else 8      # LOADS in the kernel
        if loads < expected:
            problems.append(f"{loads} streaming 16-byte weight loads before the first multiply, expected {expected}")
        if not any(op.startswith("LDS") and op.endswith(".128") for op in ops):  # LDS.128, LDS.U.128 (sm_75)
            problems.append("x is not read from shared memory in 16-byte chunks")
    elif kernel.startswith("rotate_kernel") and ("bf16" in kernel or "fp16" in kernel):
        problems += accesses(ops, r"(LDG|STG)\.E\.[US]16")
    return problems


# What --counts shows per kernel (the static count of each instruction in its machine code; loops count once)
COUNTED = {"LDGSTS": "cp.async", "LDGDEPBAR": "commit", "DEPBAR": "wait", "BAR.SYNC": "barrier", "LDSM": "ldmatrix",
           "HMMA": "mma", "LDG.E.NA.128": "streaming 16 B load", "STG.E.128": "16 B store",
           "SHFL": "shuffle"}


def counts(kernels):
    """A table of COUNTED instructions per kernel, the tensor-core and decode kernels of sm_80 and newer."""
    print("| kernel | arch | " + " | ".join(COUNTED.values()) + " |")
    print("|---|---|" + "---|" * len(COUNTED))
    for (kernel, arch), ops in sorted(kernels.items()):
        if int(arch[3:5]) >= 80 and kernel.startswith(("qkv_", "rotate")):
            cells = [str(sum(op.startswith(prefix) for op in ops)) for prefix in COUNTED]
            print(f"| {kernel} | {arch} | " + " | ".join(cells) + " |")


def main():
    show_counts = "--counts" in sys.argv[1:]
    files = [arg for arg in sys.argv[1:] if arg != "--counts"]
    if len(files) != 1:
        sys.exit(__doc__)
    kernels = functions(files[0])
    if not kernels:
        sys.exit("sass_check: no kernels found")
    failed = False
    for (kernel, arch), ops in sorted(kernels.items()):
        for problem in check(kernel, arch, ops):
            print(f"sass_check: {kernel} {arch}: {problem}")
            failed = True
    archs = sorted({arch for _, arch in kernels})
    if failed:
        sys.exit("sass_check: FAILED")
    print(f"sass check: {len(kernels)} kernels ({', '.join(archs)}): tiled through ldmatrix and HMMA with pair stores, "
          "pipelined also through cp.async with 16-byte stores, decode's streaming loads ahead of its math and x "
          "from shared memory, rotate on whole pairs, no local memory (below sm_80 the tensor-core stubs trap)")
    if show_counts:
        counts(kernels)


if __name__ == "__main__":
    main()
