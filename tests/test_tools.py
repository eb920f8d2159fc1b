"""The timing tools do what their help says, on the CPU: tools/bench_model.py's arms and report, tools/bench_op.py's
table, and tools/gpu_check.sh's refusals (its steps need a GPU)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL

TINY = SMALL[:SMALL.index("--log_interval")]  # the tiny model (the tools log nothing per step)


def run(command, **env):
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**{k: v for k, v in os.environ.items() if k != "CROPE_KERNEL"}, **env})


def test_bench_model_times_every_arm_in_alternating_blocks_and_reports_the_ratio(text_file):
    result = run([sys.executable, "tools/bench_model.py", "train", "--blocks", "3", "--block_iters", "4", "--warmup",
                  "2", *TINY, "--data", str(text_file)])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    blocks = re.findall(r"^block (\d) \| (rope|crope|crope, op) \| [\d,]+ tokens/s", out, re.M)
    assert len(blocks) == 9 and {arm for _, arm in blocks} == {"rope", "crope", "crope, op"}
    assert [arm for b, arm in blocks if b == "1"] != [arm for b, arm in blocks if b == "2"]  # the order rotates
    assert "crope: CRoPE's Q/K/V projection and rotation: crope.py's code" in out
    assert "crope, op: CRoPE's Q/K/V projection and rotation: the fused op of csrc/ (C++) in every layer" in out
    # ratios of tiny steps on a busy machine can pass 10
    assert re.search(r"^\| crope \| [\d,]+ \[[\d,]+, [\d,]+\] \| \d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\] \| - \|$", out,
                     re.M)
    line = re.search(r"^target cpu preset training: CRoPE by default at (\d+\.\d{3})x .*range (\d+\.\d{3})-(\d+\.\d{3}).*"
                     r": (met|MISSED)$", out, re.M)
    assert line and (line[4] == "met") == (float(line[2]) >= 1.0)


def test_bench_model_times_generation(text_file):
    result = run([sys.executable, "tools/bench_model.py", "generate", "--blocks", "2", "--samples", "2",
                  "--new_tokens", "6", *TINY])
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"^block \d \| .* tokens/s$", result.stdout, re.M)) == 6
    assert "target cpu preset generation: CRoPE by default at" in result.stdout


def test_bench_model_refuses_bad_input_in_one_line():
    result = run([sys.executable, "tools/bench_model.py", "train", "--blocks", "0"])
    assert result.returncode == 1 and result.stderr.strip() == "error: --blocks must be at least 1, got 0"


def test_bench_op_prints_the_cpu_table():
    result = run([sys.executable, "tools/bench_op.py"])
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\| cpu 12x64x128/4 \| fwd\+bwd \| cpu \| [\d.]+ \|", result.stdout, re.M)


@pytest.mark.parametrize("what", ["data", "device"])
def test_gpu_check_stops_at_once_without_data_or_a_gpu(tmp_path, text_file, what):
    data = tmp_path / "missing.txt" if what == "data" else text_file
    result = run(["bash", "tools/gpu_check.sh", "--logs", str(tmp_path / "logs"), "build", "probe", "tests"],
                 CROPE_DATA=str(data), CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 1 and result.stdout == ""
    expected = f"gpu_check: no data file at {data}" if what == "data" else "gpu_check: no CUDA device here"
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1
    assert not (tmp_path / "logs").exists()


def test_gpu_check_help_names_the_two_commands():
    result = run(["bash", "tools/gpu_check.sh", "--help"])
    assert result.returncode == 0
    assert "bash tools/gpu_check.sh build probe tests" in result.stdout
    assert "bash tools/gpu_check.sh train generate" in result.stdout


def test_bench_model_refuses_a_kernel_flag():
    result = run([sys.executable, "tools/bench_model.py", "train", "--kernel", "ext"])
    assert result.returncode == 1 and result.stderr.startswith("error: bench_model.py times every --kernel side by side")
