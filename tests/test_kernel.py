"""The fused op torch.ops.crope.qkv_rotary (csrc/) against the PyTorch path of crope.py in float64; its refusals,
loader, self-check, which code --kernel picks, and the probe that declines the op where crope.py's code was edited.
The CUDA tests run only where a GPU is present."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import fused_op
import train_shakespeare as ts
from crope import GPT, CausalSelfAttention, GPTConfig, apply_rotary, rope_frequencies, rotary_tables
from fused_op import CUDA_PATHS, KernelError, build, check, qkv_kernel
from fused_op.check import TOLERANCE, reference_qkv_rotary, tolerance

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
sys.path.insert(0, str(ROOT / "tools"))
import refusal_probe  # noqa: E402  (tools/ is not a package)


@pytest.fixture(scope="module", autouse=True)
def extension():
    if not _prebuilt() and (shutil.which("c++") is None or shutil.which("ninja") is None):
        pytest.skip("no C++ compiler or ninja here: the extension cannot be built (the PyTorch path is tested)")
    assert qkv_kernel("cpu", "ext") is not None  # a build failure here is a real failure: the message says why


def _prebuilt():
    import importlib.util
    return importlib.util.find_spec("crope_ext") is not None


def inputs(B, T, d, heads, dtype, device="cpu", start_pos=0, seed=0):
    """x (B, T, d), stacked Q/K/V complex weights (3d/2, d/2, 2), tables, start_pos, n_rotary (q and k)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    weight = torch.randn(3 * d // 2, d // 2, 2, generator=g, dtype=torch.float64) / d ** 0.5
    cos, sin = rotary_tables(start_pos + T + 3, rope_frequencies(d // heads, 10000.0))
    return (x.to(device, dtype), weight.to(device, dtype), cos.to(device), sin.to(device), start_pos, 2 * d)


def reference64(x, weight, cos, sin, start_pos, n_rotary):
    """The PyTorch path in float64 on the CPU, from the op's (rounded) inputs."""
    return reference_qkv_rotary(x.detach().cpu().double(), weight.detach().cpu().double(), cos.cpu(), sin.cpu(),
                                start_pos, n_rotary)


def relative_error(out, ref):
    return ((out.detach().cpu().double() - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------- the op on the CPU

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, start_pos", [((2, 7, 32, 4), 0), ((3, 5, 48, 2), 11), ((1, 1, 16, 2), 20)])
def test_cpu_op_matches_float64_reference(dtype, shape, start_pos):
    args = inputs(*shape, dtype, start_pos=start_pos)
    out = torch.ops.crope.qkv_rotary(*args)
    assert out.dtype == dtype and out.shape == (shape[0], shape[1], 3 * shape[2])
    assert relative_error(out, reference64(*args)) < TOLERANCE[dtype]


def test_cpu_accepts_every_path_name_and_refuses_others():
    args = inputs(2, 3, 16, 2, torch.float64)
    expected = torch.ops.crope.qkv_rotary(*args)
    for path in ("default",) + CUDA_PATHS:  # one implementation on the CPU: the name is checked, then has no effect
        assert torch.equal(torch.ops.crope.qkv_rotary(*args, path), expected)
    with pytest.raises(RuntimeError, match="path must be default, decode, tiled, pipelined or cublas, got 'fast'"):
        torch.ops.crope.qkv_rotary(*args, "fast")
    grad = torch.randn(2, 3, 48, dtype=torch.float64)
    backward = torch.ops.crope.qkv_rotary_backward
    expected = backward(grad, *args, [True, True])
    for path in CUDA_PATHS:  # the backward takes the same names
        assert all(torch.equal(a, b) for a, b in zip(backward(grad, *args, [True, True], path), expected))
    with pytest.raises(RuntimeError, match="got 'fast'"):
        backward(grad, *args, [True, True], "fast")


def test_gradcheck_cpu_float64():
    x, weight, cos, sin, start_pos, n_rotary = inputs(2, 3, 8, 2, torch.float64, start_pos=2)
    x.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: torch.ops.crope.qkv_rotary(x, w, cos, sin, start_pos, n_rotary),
                                    (x, weight))


def test_backward_matches_reference_gradients_and_leaves_grad_alone():
    x, weight, cos, sin, start_pos, n_rotary = inputs(2, 6, 32, 4, torch.float64, start_pos=3)
    grad = torch.randn(2, 6, 96, dtype=torch.float64)
    grad_before = grad.clone()
    ours = torch.autograd.grad(torch.ops.crope.qkv_rotary(x.requires_grad_(), weight.requires_grad_(), cos, sin,
                                                          start_pos, n_rotary), (x, weight), grad)
    expected = torch.autograd.grad(reference_qkv_rotary(x, weight, cos, sin, start_pos, n_rotary), (x, weight), grad)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.equal(grad, grad_before)  # the un-rotation writes its own buffer


def test_backward_computes_only_the_gradients_asked_for():
    x, weight, cos, sin, start_pos, n_rotary = inputs(1, 4, 16, 2, torch.float64)
    grad = torch.randn(1, 4, 48, dtype=torch.float64)
    full = torch.ops.crope.qkv_rotary_backward(grad, x, weight, cos, sin, start_pos, n_rotary, [True, True])
    only_x = torch.ops.crope.qkv_rotary_backward(grad, x, weight, cos, sin, start_pos, n_rotary, [True, False])
    assert torch.equal(only_x[0], full[0]) and only_x[1].numel() == 0
    (grad_x,) = torch.autograd.grad(torch.ops.crope.qkv_rotary(x.requires_grad_(), weight, cos, sin, 0, n_rotary),
                                    x, grad)
    assert torch.equal(grad_x, full[0])


def _cancelling_inputs(device, features=2):
    """One token whose weight gradient a = g0 x0 + g1 x1 = 1.095703125 - 1.09375 = 2^-9 is exact in bf16,
    while g0 x0 is not: rounding the real weight's gradient to bf16 before the fold gives 0. `features`:
    in and out features, zeros past the first pair."""
    x = torch.zeros(1, 1, features, dtype=torch.bfloat16, device=device)
    x[0, 0, :2] = torch.tensor([1.03125, -1.09375])
    weight = torch.zeros(features // 2, features // 2, 2, dtype=torch.bfloat16, device=device)
    weight[0, 0] = torch.tensor([0.5, 0.25])
    grad = torch.zeros(1, 1, features, dtype=torch.bfloat16, device=device)
    grad[0, 0, :2] = torch.tensor([1.0625, 1.0])
    cos, sin = (t.to(device) for t in rotary_tables(1, rope_frequencies(2, 10000.0)))
    return grad, x, weight, cos, sin


def test_bf16_weight_gradient_is_folded_in_float32_and_rounded_once():
    grad, x, weight, cos, sin = _cancelling_inputs("cpu")
    _, grad_weight = torch.ops.crope.qkv_rotary_backward(grad, x, weight, cos, sin, 0, 0, [True, True])
    assert grad_weight[0, 0, 0].item() == 2 ** -9


def test_opcheck_over_samples():
    x, weight, cos, sin, _, n_rotary = inputs(2, 4, 16, 2, torch.float32, start_pos=1)
    samples = [
        (x.clone().requires_grad_(), weight.clone().requires_grad_(), cos, sin, 1, n_rotary),
        (x.clone().requires_grad_(), weight, cos, sin, 0, n_rotary),          # only x needs a gradient
        (x, weight.clone().requires_grad_(), cos, sin, 2, 0),                 # no rotation
        (x, weight, cos, sin, 1, n_rotary),                                   # no gradients
        (x.double(), weight.double().requires_grad_(), cos, sin, 1, n_rotary, "cublas"),
        (x.transpose(0, 1).contiguous().transpose(0, 1), weight, cos, sin, 0, n_rotary),  # non-contiguous x
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.crope.qkv_rotary.default, args)


def test_every_refusal_raises_its_message_in_a_child_process():
    """tools/refusal_probe.py: each bad argument the op must refuse (on a GPU also every forced path on every dtype
    and feature count it does not take), in a child process: a refusal that kills the process fails as surely as a
    wrong message."""
    for device in ["cpu"] + (["cuda"] if CUDA else []):
        failures, total = refusal_probe.probe(device)
        assert total >= 16 and failures == []


def test_the_refusal_probe_survives_a_crash_and_names_it():
    failures, total = refusal_probe.probe("cpu", ["--crash_case", "3"])
    assert failures == ["cpu weight dtype: the process died (signal SIGSEGV) instead of raising"] and total >= 16


def test_the_refusal_probe_stops_a_crash_loop_after_three_crashes():
    failures, total = refusal_probe.probe("cpu", ["--crash_case", "-1"])
    assert len(failures) == 4 and failures[-1] == f"cpu: stopped after 3 crashes; {total - 3} cases not run"


def test_no_number_is_formatted_through_a_cpp_stream():
    """csrc/ builds every refusal's text with std::to_string and passes TORCH_CHECK one string (CROPE_CHECK):
    TORCH_CHECK(cond, "got ", n) formats n through a C++ stream, which killed the process where the extension was
    built by another GCC than PyTorch's runtime came from."""
    for path in (ROOT / "csrc").iterdir():
        if path.suffix in (".cpp", ".cu", ".cuh", ".h"):
            code = re.sub(r"//.*", "", path.read_text())  # comments may speak of TORCH_CHECK
            uses = re.findall(r"\bTORCH_CHECK\w*\s*\(", code)
            expected = 1 if path.name == "crope.h" else 0  # the one in CROPE_CHECK's definition
            assert len(uses) == expected, f"{path.name}: {uses}"


@pytest.mark.parametrize("B, T, d, out", [(2, 3, 16, 0), (0, 3, 16, 48), (2, 0, 16, 48), (2, 3, 0, 48)])
def test_empty_shapes(B, T, d, out):
    x = torch.randn(B, T, d)
    weight = torch.randn(out // 2, d // 2, 2, requires_grad=True)
    cos, sin = rotary_tables(T + 1, rope_frequencies(8, 10000.0))
    y = torch.ops.crope.qkv_rotary(x.requires_grad_(), weight, cos, sin, 0, min(out, 16))
    assert y.shape == (B, T, out) and not y.detach().any()  # K = 0: a sum of nothing
    grad_x, grad_w = torch.autograd.grad(y, (x, weight), torch.ones_like(y), allow_unused=True)
    assert grad_x.shape == x.shape and grad_w.shape == weight.shape


# ----------------------------------------------------------------------------- self-check and loading

@pytest.fixture
def fresh(monkeypatch):
    """The op's state as in a new process (the op already loaded), with no kernel settings in the environment."""
    state = dict(build.state)
    monkeypatch.setattr(build, "state", state)
    monkeypatch.setattr(fused_op, "_checked", {})
    monkeypatch.setattr(fused_op, "_noted", set())
    monkeypatch.delenv("CROPE_KERNEL", raising=False)
    monkeypatch.delenv("CROPE_CUDA_PATH", raising=False)
    return state


def measured_faster_here(monkeypatch, path=None):
    """OP_MEASURED_FASTER as if whole steps had measured the op faster on this machine's CPU, training and generating."""
    monkeypatch.setattr(fused_op, "OP_MEASURED_FASTER", {("cpu", "train"): path, ("cpu", "generate"): path})


def broken(path, how="values"):
    """A _run_path whose `path` is wrong (values off by 10%) or crashes."""
    def run(x, weight, cos, sin, start_pos, n_rotary, p):
        out = torch.ops.crope.qkv_rotary(x, weight, cos, sin, start_pos, n_rotary, p)
        if p == path and how == "crash":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)\nmore")
        return out * 1.1 if p == path else out
    return run


def test_self_check_passes_on_the_cpu_quickly_and_leaves_the_random_stream_alone():
    rng = torch.get_rng_state()
    start = time.perf_counter()
    assert check.self_check("cpu") is None
    assert time.perf_counter() - start < 1.0
    assert torch.equal(torch.get_rng_state(), rng)


def test_self_check_names_the_failing_path(monkeypatch):
    monkeypatch.setattr(check, "_self_check_paths", lambda *args: CUDA_PATHS)
    monkeypatch.setattr(check, "_run_path", broken("tiled"))
    assert check.self_check("cpu").startswith("tiled float32: relative error 1.0e-01 against float64")
    monkeypatch.setattr(check, "_run_path", broken("decode", "crash"))
    assert check.self_check("cpu") == ("decode float32: RuntimeError: CUDA error: an illegal memory access was "
                                       "encountered (simulated)")
    monkeypatch.setattr(check, "_run_path", broken("none"))
    monkeypatch.setattr(check, "_run_backward", lambda *args: (torch.zeros(3, 50, 64), torch.zeros(96, 32, 2)))
    assert check.self_check("cpu").startswith("backward float32: relative error 1.0e+00")


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, **overrides))


def test_auto_takes_the_op_only_where_whole_steps_measured_it_faster(fresh, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(build, "load_extension", lambda: pytest.fail("auto loaded the op"))
        patch.setitem(fresh, "loaded", False)
        assert qkv_kernel("cpu", "auto") is None and qkv_kernel("cpu") is None  # the table names no device yet
    measured_faster_here(monkeypatch)
    assert isinstance(qkv_kernel("cpu", "auto", use="train"), fused_op.QKVKernel)
    monkeypatch.setattr(fused_op, "OP_MEASURED_FASTER", {("cpu", "generate"): None})
    assert qkv_kernel("cpu", "auto", use="train") is None and qkv_kernel("cpu", "auto", use="generate") is not None
    assert qkv_kernel("cpu", "torch", use="generate") is None


def test_failing_self_check_falls_back_once_in_auto_and_is_an_error_in_ext(fresh, monkeypatch, caplog, tmp_path,
                                                                           text_file):
    measured_faster_here(monkeypatch)
    calls = []
    monkeypatch.setattr(check, "_self_check_paths", lambda *args: calls.append(1) or CUDA_PATHS)
    monkeypatch.setattr(check, "_run_path", broken("tiled"))
    assert qkv_kernel("cpu", "auto") is None and qkv_kernel("cpu", "auto") is None
    lines = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    assert len(lines) == 1 and "failed its self-check on cpu (tiled float32: relative error" in lines[0]
    assert "using crope.py's code" in lines[0] and len(calls) == 1  # one self-check, stopped at its failure
    with pytest.raises(KernelError, match="failed its self-check on cpu \\(tiled float32"):
        qkv_kernel("cpu", "ext")
    with pytest.raises(SystemExit) as excinfo:
        ts.main(["--kernel", "ext", "--data", str(text_file), "--out_dir", str(tmp_path), "--device", "cpu"])
    message = str(excinfo.value)
    assert message.startswith("error: --kernel ext (CROPE_KERNEL=ext): the fused op failed its self-check") \
        and "\n" not in message


def test_failed_build_falls_back_in_auto_and_is_an_error_for_ext(fresh, monkeypatch, caplog, tmp_path, text_file):
    measured_faster_here(monkeypatch)
    fresh.update(loaded=False, failure=None, devices=())
    monkeypatch.setattr(build, "load_extension", lambda: "OSError: simulated: no compiler")
    assert qkv_kernel("cpu", "auto") is None
    assert "simulated: no compiler" in caplog.text and "using crope.py's code" in caplog.text
    with pytest.raises(KernelError, match="OSError: simulated: no compiler"):
        qkv_kernel("cpu", "ext")
    assert qkv_kernel("cpu", "torch") is None
    with pytest.raises(SystemExit) as excinfo:
        ts.main(["--kernel", "ext", "--data", str(text_file), "--out_dir", str(tmp_path), "--device", "cpu"])
    assert str(excinfo.value).startswith("error: --kernel ext") and "\n" not in str(excinfo.value)


def test_bad_modes_and_paths_are_one_line_errors(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("CROPE_KERNEL", "bogus")
    with pytest.raises(SystemExit) as excinfo:
        ts.main(["--out_dir", str(tmp_path)])
    assert str(excinfo.value) == "error: CROPE_KERNEL must be one of auto, torch, ext, got 'bogus'"
    with pytest.raises(KernelError, match="CROPE_KERNEL must be one of auto, torch, ext, got 'bogus'"):
        qkv_kernel("cpu")
    monkeypatch.setenv("CROPE_KERNEL", "ext")
    monkeypatch.setenv("CROPE_CUDA_PATH", "fastest")
    with pytest.raises(KernelError, match="CROPE_CUDA_PATH must be one of decode, tiled, pipelined, cublas, "
                                          "got 'fastest'"):
        qkv_kernel("cpu")


def test_crope_py_stands_alone():
    """The model never imports the op's module: the scripts hand it a kernel (fused_op.use_kernel)."""
    code = "import sys, crope; print('fused_op' in sys.modules, 'torch.utils.cpp_extension' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stderr


@pytest.mark.parametrize("mode", ["bogus", "ext"])
def test_sample_reports_kernel_errors_in_one_line(fresh, monkeypatch, tmp_path, mode):
    import sample
    model = tiny()
    checkpoint = tmp_path / "best.pt"
    torch.save({"model_config": asdict(model.config), "model": model.state_dict(),
                "tokenizer": {"kind": "char", "chars": "".join(chr(65 + i) for i in range(50))}}, checkpoint)
    fresh.update(loaded=False, failure="OSError: simulated: no compiler", devices=())
    monkeypatch.setenv("CROPE_KERNEL", mode)
    with pytest.raises(SystemExit) as excinfo:
        sample.main([str(checkpoint), "--device", "cpu", "--start", "AB", "--max_new_tokens", "2"])
    assert str(excinfo.value).startswith("error: ") and "\n" not in str(excinfo.value)


# ----------------------------------------------------------------------------- the op stands in for crope.py's code

def calls_to_the_op(monkeypatch):
    """Every call of torch.ops.crope.qkv_rotary from now on, recorded (and computed)."""
    seen, real = [], torch.ops.crope.qkv_rotary
    monkeypatch.setattr(torch.ops.crope, "qkv_rotary", lambda *args: seen.append(args) or real(*args))
    return seen


def test_the_op_stands_in_for_crope_py_in_every_layer_and_says_so(fresh, monkeypatch):
    model = tiny()
    assert fused_op.use_kernel(model, None) == ("CRoPE's Q/K/V projection and rotation: crope.py's code "
                                                "(CausalSelfAttention.project_and_rotate)")
    line = fused_op.use_kernel(model, qkv_kernel("cpu", "ext"))
    assert line == ("CRoPE's Q/K/V projection and rotation: the fused op of csrc/ (C++) in every layer, checked "
                    "against crope.py's project_and_rotate")
    seen = calls_to_the_op(monkeypatch)
    model(torch.randint(0, 50, (2, 20)))
    assert len(seen) == 2
    assert fused_op.use_kernel(tiny(bias=True), qkv_kernel("cpu", "ext")).endswith("crope.py's code "
                                                                               "(CausalSelfAttention.project_and_rotate)")


def qk_norm(attn, x, cos, sin):
    """An edit a reader might make to project_and_rotate: RMS-normalised q and k heads before the rotation."""
    B, T, C = x.size()
    qk, v = attn.c_attn(x).split([2 * C, C], dim=2)
    qk = torch.nn.functional.rms_norm(qk.view(B, T, 2 * attn.n_head, -1), (C // attn.n_head,))
    return apply_rotary(qk, cos, sin).view(B, T, 2 * C), v


def qk_gain(attn, x, cos, sin):
    """An edit that changes nothing at first: a learned gain of q and k, initialised to 1."""
    qk, v = CausalSelfAttention.plain(attn, x, cos, sin)
    return qk * attn.qk_gain, v


@pytest.mark.parametrize("edit", ["scale", "norm", "gain"])
def test_an_edited_project_and_rotate_declines_the_op(fresh, monkeypatch, caplog, edit):
    original = CausalSelfAttention.project_and_rotate
    monkeypatch.setattr(CausalSelfAttention, "plain", original, raising=False)
    edits = {"scale": lambda attn, x, cos, sin: tuple(1.01 * t for t in original(attn, x, cos, sin)),
             "norm": qk_norm, "gain": qk_gain}
    monkeypatch.setattr(CausalSelfAttention, "project_and_rotate", edits[edit])
    model, kernel = tiny(), qkv_kernel("cpu", "ext")
    for block in model.transformer.h:
        block.attn.qk_gain = torch.nn.Parameter(torch.ones(1))
    line = fused_op.use_kernel(model, kernel)
    assert line == "CRoPE's Q/K/V projection and rotation: crope.py's code in every layer (it differs from the fused op)"
    declined = [r.getMessage() for r in caplog.records if "and the fused op differ" in r.getMessage()]
    assert len(declined) == 2 and declined[0].startswith("crope: layer 0: crope.py's project_and_rotate and the fused "
                                                         "op differ (relative error")
    assert "against crope.py's code" in declined[0] and declined[0].endswith("crope.py's code runs there")
    seen = calls_to_the_op(monkeypatch)
    idx = torch.randint(0, 50, (2, 20))
    logits, loss = model(idx, idx)
    assert seen == []  # the edit ran, in every layer
    loss.backward()
    if edit == "gain":  # the same numbers at first, yet the gain learns: only crope.py's code trains it
        assert model.transformer.h[0].attn.qk_gain.grad.abs().item() > 0
    else:
        monkeypatch.setattr(CausalSelfAttention, "project_and_rotate", original)
        assert not torch.allclose(logits, model(idx)[0])


def test_one_edited_layer_keeps_its_code_and_the_others_take_the_op(fresh, monkeypatch, caplog):
    model = tiny()
    attn = model.transformer.h[1].attn
    plain = attn.project_and_rotate
    attn.project_and_rotate = lambda x, cos, sin: tuple(0.5 * t for t in plain(x, cos, sin))  # this layer only
    line = fused_op.use_kernel(model, qkv_kernel("cpu", "ext"))
    assert "the fused op of csrc/ (C++) in layers 0 (crope.py's code in the others, where it differs" in line
    assert model.transformer.h[0].attn.qkv_kernel is not None and attn.qkv_kernel is None
    assert "layer 1: crope.py's project_and_rotate and the fused op differ" in caplog.text


def test_an_edit_the_op_cannot_follow_is_declined_not_a_crash(fresh, monkeypatch, caplog):
    monkeypatch.setattr(CausalSelfAttention, "project_and_rotate", lambda attn, x, cos, sin: (x, x))  # other shapes
    assert fused_op.use_kernel(tiny(), qkv_kernel("cpu", "ext")).endswith("(it differs from the fused op)")
    assert "(shape (2, 16, 96), expected (2, 16, 64))" in caplog.text


def test_the_probe_leaves_the_random_stream_the_matmul_precision_and_the_model_alone(fresh):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as training on a GPU sets it (TF32)
    try:
        fused_op.use_kernel(model, qkv_kernel("cpu", "ext"))
        assert torch.get_float32_matmul_precision() == "high"  # the probe's "highest" undone
    finally:
        torch.set_float32_matmul_precision(precision)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_with_op_equals_pytorch_path_and_to_rope(fresh):
    fused, plain = tiny().double().eval(), tiny().double().eval()
    fused_op.use_kernel(fused, qkv_kernel("cpu", "ext"))
    assert fused.transformer.h[0].attn.qkv_kernel is not None and plain.transformer.h[0].attn.qkv_kernel is None
    idx = torch.randint(0, 50, (2, 20))
    torch.testing.assert_close(fused(idx)[0], plain(idx)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused(idx[:, 5:], start_pos=9)[0], plain(idx[:, 5:], start_pos=9)[0],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.to_rope()(idx)[0], fused(idx)[0], rtol=1e-12, atol=1e-12)
    # a new model (a longer context) runs crope.py's code until use_kernel checks it
    assert fused.extend_context(64).transformer.h[1].attn.qkv_kernel is None
    torch.manual_seed(3)
    with_cache = fused.generate(idx[:, :4], 40, top_k=10)
    torch.manual_seed(3)
    assert torch.equal(with_cache, plain.generate(idx[:, :4], 40, top_k=10))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_compiled_model_with_op_equals_eager(device):
    model = tiny().to(device).train()
    fused_op.use_kernel(model, qkv_kernel(device, "ext"))
    idx = torch.randint(0, 50, (2, 16), device=device)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: the op must not break the graph
    logits, loss = compiled(idx, idx)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager_logits, eager_loss = model(idx, idx)
    eager_loss.backward()
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the build cache and its lock

LOAD = "import fused_op; fused_op.qkv_kernel('cpu', 'ext'); print('loaded')"


def _start_load(env):
    return subprocess.Popen([sys.executable, "-c", LOAD], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _run_load(env, timeout):
    result = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO); " + LOAD],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 and "loaded" in result.stdout, result.stdout + result.stderr
    return result.stderr


@pytest.mark.skipif(_prebuilt(), reason="a setup.py build is loaded instead of the just-in-time one")
def test_a_killed_build_never_blocks_the_next_run(tmp_path, monkeypatch):
    """Kill a run (and its compiler) while it builds, holding the build lock; the next run builds and
    loads; a lock file left in a complete build folder is ignored; killing a cached load is harmless."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = build.build_directory()
    run = _start_load(env)
    deadline = time.monotonic() + 120
    while not (folder / "lock").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (folder / "lock").exists(), "the build never took its lock"
    os.killpg(run.pid, signal.SIGKILL)  # the run and the compiler it started
    run.wait()
    assert (folder / "lock").exists()  # what used to make every later run wait forever

    log = _run_load(env, timeout=600)
    assert "removing" in log and "building the fused kernel" in log
    (folder / "lock").touch()  # a lock file next to a complete build: not even looked at
    assert "building" not in _run_load(env, timeout=120)
    run = _start_load(env)
    time.sleep(0.5)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert "building" not in _run_load(env, timeout=120)


# ----------------------------------------------------------------------------- CUDA (on a GPU only)

cuda_only = pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
CUDA_SHAPES = [
    ((1, 1, 256, 4), 0), ((1, 1, 4096, 32), 7), ((3, 1, 512, 8), 2), ((2, 6, 256, 2), 1),  # decode sizes
    ((1, 17, 256, 4), 0), ((4, 75, 768, 12), 5), ((2, 64, 96, 3), 1), ((3, 50, 64, 4), 3),  # mid and many tokens
    ((2, 33, 72, 3), 4),  # in_features 72: pipelined's last K step and last column tile are partial
]


def _poisoned_call(args, path):
    """The op's output with the caching allocator's next block filled with NaN first: an element the
    kernel forgets to write stays NaN."""
    x, weight = args[0], args[1]
    poison = torch.full((x.size(0), x.size(1), 2 * weight.size(0)), float("nan"), device=x.device, dtype=x.dtype)
    del poison
    return torch.ops.crope.qkv_rotary(*args, path)


@cuda_only
@pytest.mark.parametrize("path", CUDA_PATHS + ("default",))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape, start_pos", CUDA_SHAPES)
def test_cuda_every_path_matches_float64_reference(path, dtype, shape, start_pos):
    args = inputs(*shape, dtype, "cuda", start_pos=start_pos, seed=shape[1] * 31 + start_pos)
    if path not in ["default"] + torch.ops.crope.qkv_rotary_paths(args[0], args[1], args[5]):
        with pytest.raises(RuntimeError, match=f"path '{path}' (takes|needs)"):  # (tools/refusal_probe.py: in a child)
            torch.ops.crope.qkv_rotary(*args, path)
        return
    out = _poisoned_call(args, path)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert relative_error(out, reference64(*args)) < tolerance(dtype, "cuda")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 40, 256, 4), (4, 300, 256, 4), (3, 50, 72, 3), (1, 1, 64, 2)])
def test_cuda_backward_matches_reference(dtype, shape):
    """One backward for every path: the un-rotation pass and two GEMMs; d = 72 leaves partial tiles."""
    B, T, d, heads = shape
    x, weight, cos, sin, start_pos, n_rotary = inputs(B, T, d, heads, dtype, "cuda", start_pos=3)
    grad = torch.randn(B, T, 3 * d, device="cuda", dtype=dtype)
    forward = lambda x, w: torch.ops.crope.qkv_rotary(x, w, cos, sin, start_pos, n_rotary)
    ours = torch.autograd.grad(forward(x.requires_grad_(), weight.requires_grad_()), (x, weight), grad)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference_qkv_rotary(x64, w64, cos, sin, start_pos, n_rotary), (x64, w64),
                                   grad.double())
    for a, b in zip(ours, expected):
        assert relative_error(a, b.cpu()) < tolerance(dtype, "cuda")


@cuda_only
def test_cuda_bf16_weight_gradient_is_folded_in_float32():
    grad, x, weight, cos, sin = _cancelling_inputs("cuda")
    _, grad_weight = torch.ops.crope.qkv_rotary_backward(grad, x, weight, cos, sin, 0, 0, [True, True])
    assert grad_weight[0, 0, 0].item() == 2 ** -9


@cuda_only
def test_cuda_tables_and_weight_on_another_device_are_refused():
    x, weight, cos, sin, start_pos, n_rotary = inputs(1, 4, 64, 2, torch.bfloat16, "cuda")
    for args, name in [((x, weight, cos, sin.cpu()), "sin"), ((x, weight, cos.cpu(), sin), "cos"),
                       ((x, weight.cpu(), cos, sin), "weight")]:
        with pytest.raises(RuntimeError, match=f"{name} must be on x's device"):
            torch.ops.crope.qkv_rotary(*args, start_pos, n_rotary)
    torch.cuda.synchronize()  # the CUDA context is still healthy


@cuda_only
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("B, T, d, out", [(2, 3, 64, 0), (0, 3, 64, 192), (2, 0, 64, 192), (2, 3, 0, 192)])
def test_cuda_empty_shapes(path, B, T, d, out):
    x = torch.randn(B, T, d, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(out // 2, d // 2, 2, device="cuda", dtype=torch.bfloat16)
    cos, sin = (t.cuda() for t in rotary_tables(T + 1, rope_frequencies(8, 10000.0)))
    y = torch.ops.crope.qkv_rotary(x, weight, cos, sin, 0, min(out, 16), path)
    torch.cuda.synchronize()
    assert y.shape == (B, T, out) and not y.any()
    grads = torch.ops.crope.qkv_rotary_backward(torch.ones_like(y), x, weight, cos, sin, 0, min(out, 16),
                                                [True, True], path)
    assert grads[0].shape == x.shape and grads[1].shape == weight.shape and not any(g.any() for g in grads)


@cuda_only
def test_cuda_tiled_path_offered_where_compiled_and_self_check_is_fast():
    major, _ = torch.cuda.get_device_capability()
    x, weight = torch.empty(4, 512, 256, device="cuda", dtype=torch.bfloat16), torch.empty(384, 128, 2,
                                                                                           device="cuda",
                                                                                           dtype=torch.bfloat16)
    assert ("tiled" in torch.ops.crope.qkv_rotary_paths(x, weight, 512)) == (major >= 8)
    start = time.perf_counter()
    assert check.self_check("cuda") is None
    assert time.perf_counter() - start < 1.0


@cuda_only
@pytest.mark.parametrize("path", CUDA_PATHS)
def test_cuda_opcheck(path):
    x, weight, cos, sin, start_pos, n_rotary = inputs(2, 24, 64, 4, torch.bfloat16, "cuda", start_pos=1)
    if path not in torch.ops.crope.qkv_rotary_paths(x, weight, n_rotary):
        pytest.skip(f"path {path} is not offered here (test_cuda_every_path_matches_float64_reference: it refuses)")
    torch.library.opcheck(torch.ops.crope.qkv_rotary.default,
                          (x.requires_grad_(), weight.requires_grad_(), cos, sin, start_pos, n_rotary, path))


@cuda_only
def test_cuda_default_path_is_decode_for_a_decoding_step_and_cublas_otherwise():
    for (B, T), path in (((4, 2), "decode"), ((2, 16), "cublas")):
        args = inputs(B, T, 384, 6, torch.bfloat16, "cuda")
        assert torch.equal(torch.ops.crope.qkv_rotary(*args, "default"), torch.ops.crope.qkv_rotary(*args, path))
