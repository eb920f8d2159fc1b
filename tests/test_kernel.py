"""The fused op torch.ops.crope.qkv_rotary (csrc/) against the PyTorch path of crope.py in float64."""

import shutil

import pytest
import torch

import crope
import train_shakespeare as ts
from crope import GPT, ComplexLinear, GPTConfig, apply_rotary, rope_frequencies, rotary_tables, use_kernel

CUDA = torch.cuda.is_available()
# relative error ||op - ref|| / ||ref|| allowed per dtype (METHOD: fp32 far under 1e-3, bf16 1e-3..1e-2)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module", autouse=True)
def extension():
    if not _prebuilt() and (shutil.which("c++") is None or shutil.which("ninja") is None):
        pytest.skip("no C++ compiler or ninja here: the extension cannot be built (the PyTorch path is tested)")
    assert use_kernel("ext")  # a build failure here is a real failure: the message says why
    yield
    use_kernel("auto")


def _prebuilt():
    import importlib.util
    return importlib.util.find_spec("crope_ext") is not None


def reference(x, weight, cos, sin, start_pos, n_rotary):
    """float64: ComplexLinear, then apply_rotary on the first n_rotary features (the q and k heads)."""
    layer = ComplexLinear(2 * weight.size(1), 2 * weight.size(0))
    B, T, _ = x.shape
    y = torch.func.functional_call(layer, {"weight": weight.double()}, (x.double(),))
    head_size = 2 * cos.size(1)
    rotated = apply_rotary(y[..., :n_rotary].reshape(B, T, -1, head_size),
                           cos[start_pos:start_pos + T].double(), sin[start_pos:start_pos + T].double())
    return torch.cat((rotated.reshape(B, T, n_rotary), y[..., n_rotary:]), dim=-1)


def inputs(B, T, d, heads, dtype, device="cpu", start_pos=0, seed=0):
    """x (B, T, d) and stacked Q/K/V complex weights (3d/2, d/2, 2), fresh random values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    weight = torch.randn(3 * d // 2, d // 2, 2, generator=g, dtype=torch.float64) / d ** 0.5
    cos, sin = rotary_tables(start_pos + T + 3, rope_frequencies(d // heads, 10000.0))
    return (x.to(device, dtype), weight.to(device, dtype), cos.to(device), sin.to(device), start_pos, 2 * d)


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, start_pos", [((2, 7, 32, 4), 0), ((3, 5, 48, 2), 11), ((1, 1, 16, 2), 20)])
def test_cpu_op_matches_float64_reference(dtype, shape, start_pos):
    args = inputs(*shape, dtype, start_pos=start_pos)
    out = torch.ops.crope.qkv_rotary(*args)
    assert out.dtype == dtype and out.shape == (shape[0], shape[1], 3 * shape[2])
    assert relative_error(out, reference(*args)) < TOLERANCE[dtype]


def test_gradcheck_cpu_float64():
    x, weight, cos, sin, start_pos, n_rotary = inputs(2, 3, 8, 2, torch.float64, start_pos=2)
    x.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: torch.ops.crope.qkv_rotary(x, w, cos, sin, start_pos, n_rotary),
                                    (x, weight))


def test_backward_matches_reference_gradients():
    x, weight, cos, sin, start_pos, n_rotary = inputs(2, 6, 32, 4, torch.float64, start_pos=3)
    grad = torch.randn(2, 6, 96, dtype=torch.float64)
    ours = torch.autograd.grad(torch.ops.crope.qkv_rotary(x.requires_grad_(), weight.requires_grad_(), cos, sin,
                                                          start_pos, n_rotary), (x, weight), grad)
    expected = torch.autograd.grad(reference(x, weight, cos, sin, start_pos, n_rotary), (x, weight), grad)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_opcheck(device):
    x, weight, cos, sin, start_pos, n_rotary = inputs(2, 4, 16, 2, torch.float32, device, start_pos=1)
    torch.library.opcheck(torch.ops.crope.qkv_rotary.default,
                          (x.requires_grad_(), weight.requires_grad_(), cos, sin, start_pos, n_rotary))


def test_bad_op_arguments_are_refused_clearly():
    x, weight, cos, sin, start_pos, n_rotary = inputs(1, 4, 16, 2, torch.float32)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.crope.qkv_rotary(x, weight[:, :4], cos, sin, 0, n_rotary)
    with pytest.raises(RuntimeError, match="exceed the rotary tables"):
        torch.ops.crope.qkv_rotary(x, weight, cos, sin, 10, n_rotary)
    with pytest.raises(RuntimeError, match="multiple of head_size"):
        torch.ops.crope.qkv_rotary(x, weight, cos, sin, 0, 6)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, **overrides))


def test_model_with_op_equals_pytorch_path_and_to_rope():
    fused = tiny().double().eval()
    assert fused.transformer.h[0].attn.fused
    use_kernel("torch")
    try:
        plain = tiny().double().eval()
    finally:
        use_kernel("ext")
    assert not plain.transformer.h[0].attn.fused
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 50, (2, 20))
    torch.testing.assert_close(fused(idx)[0], plain(idx)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused(idx[:, 5:], start_pos=9)[0], plain(idx[:, 5:], start_pos=9)[0],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.to_rope()(idx)[0], fused(idx)[0], rtol=1e-12, atol=1e-12)
    torch.manual_seed(3)
    with_cache = fused.generate(idx[:, :4], 40, top_k=10)
    torch.manual_seed(3)
    assert torch.equal(with_cache, plain.generate(idx[:, :4], 40, top_k=10))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_compiled_model_with_op_equals_eager(device):
    model = tiny().to(device).train()
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


def test_failed_build_falls_back_in_auto_and_is_an_error_for_ext(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(crope, "_kernel", {"mode": "auto", "loaded": False, "failure": None})
    monkeypatch.setattr(crope, "_load_extension", lambda: "OSError: simulated: no compiler")
    assert use_kernel("auto") is False
    assert "simulated: no compiler" in caplog.text and "PyTorch path" in caplog.text
    assert not tiny().transformer.h[0].attn.fused
    with pytest.raises(RuntimeError, match="could not be loaded: OSError: simulated"):
        use_kernel("ext")
    with pytest.raises(SystemExit) as excinfo:
        ts.main(["--kernel", "ext", "--out_dir", str(tmp_path)])
    assert str(excinfo.value).startswith("error: the crope extension was asked for") and "\n" not in str(excinfo.value)


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, start_pos", [
    ((1, 1, 256, 4), 0), ((1, 1, 4096, 32), 7), ((3, 1, 512, 8), 2), ((16, 1, 256, 2), 0),  # decode kernel
    ((1, 17, 256, 4), 0), ((4, 75, 768, 12), 5), ((2, 64, 96, 3), 1),                          # tiled kernel
])
def test_cuda_op_matches_float64_reference(dtype, shape, start_pos):
    args = inputs(*shape, dtype, "cuda", start_pos=start_pos, seed=shape[1] * 31 + start_pos)
    B, T, d, _ = shape
    poison = torch.full((B, T, 3 * d), float("nan"), device="cuda", dtype=dtype)
    del poison  # the caching allocator hands this block to the op's output: unwritten elements stay NaN
    out = torch.ops.crope.qkv_rotary(*args)
    assert not out.isnan().any()
    assert relative_error(out, reference(*(a.cpu() if torch.is_tensor(a) else a for a in args)).cuda()) \
        < TOLERANCE[dtype]


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_matches_reference(dtype):
    x, weight, cos, sin, start_pos, n_rotary = inputs(2, 40, 256, 4, dtype, "cuda", start_pos=3)
    grad = torch.randn(2, 40, 768, device="cuda", dtype=dtype)
    ours = torch.autograd.grad(torch.ops.crope.qkv_rotary(x.requires_grad_(), weight.requires_grad_(), cos, sin,
                                                          start_pos, n_rotary), (x, weight), grad)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference(x64, w64, cos, sin, start_pos, n_rotary), (x64, w64), grad.double())
    for a, b in zip(ours, expected):
        assert relative_error(a, b) < TOLERANCE[dtype]
