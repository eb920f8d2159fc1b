"""Summarise `nvcc -Xptxas -v` output: one line per kernel and architecture with its registers, spills,
stack and static shared memory. Reads a build log on stdin (or the files named), prints a table.

    python tools/ptxas_report.py build.log
"""

import fileinput
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def demangle(names):
    """Readable kernel names: c++filt when it is there, without namespaces and parameter lists."""
    if shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    short = []
    for name in names:
        name = re.sub(r"[\w:]*\(anonymous namespace\)::|crope::", "", name)
        name = re.sub(r"\(.*\)$", "", name)                           # parameter list
        short.append(name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("void ", ""))
    return short


def parse(lines):
    """[(mangled name, arch, registers, spill stores, spill loads, stack bytes, smem bytes)]"""
    kernels, current = [], None
    for line in lines:
        if m := ENTRY.search(line):
            current = {"name": m[1], "arch": m[2], "stack": 0, "spill_st": 0, "spill_ld": 0}
        elif current and (m := PROPERTIES.search(line)):
            current.update(stack=int(m[1]), spill_st=int(m[2]), spill_ld=int(m[3]))
        elif current and "Used" in line and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(registers=int(m[1]), smem=int(smem[1]) if smem else 0)
            kernels.append(current)
            current = None
    return kernels


def main():
    kernels = parse(fileinput.input())
    if not kernels:
        sys.exit("ptxas_report: no 'Compiling entry function' lines: was the build run with -Xptxas -v?")
    names = demangle([k["name"] for k in kernels])
    rows = sorted({(name, k["arch"], k["registers"], k["spill_st"], k["spill_ld"], k["stack"], k["smem"])
                   for name, k in zip(names, kernels)})
    width = max(len(r[0]) for r in rows)
    print(f"{'kernel':<{width}}  arch    registers  spill stores/loads (B)  stack (B)  smem (B)")
    for name, arch, regs, spill_st, spill_ld, stack, smem in rows:
        print(f"{name:<{width}}  {arch:<6}  {regs:>9}  {spill_st:>12} / {spill_ld:<8}  {stack:>9}  {smem:>8}")
    spilling = sorted({r[0] for r in rows if r[3] or r[4]})
    print(f"{len(rows)} kernel builds; spills in: {', '.join(spilling) if spilling else 'none'}")


if __name__ == "__main__":
    main()
