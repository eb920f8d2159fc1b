"""The math of crope.py, checked against independent references in float64."""

import math

import pytest
import torch
from torch.nn import functional as F

from crope import ROPE_SCALINGS, GPT, ComplexLinear, GPTConfig, apply_rotary, rope_frequencies, rotary_tables, sample_next

TINY = dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).double().eval()


def test_complex_linear_equals_complex128_matmul():
    torch.manual_seed(0)
    layer = ComplexLinear(8, 6, bias=True).double()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 8, dtype=torch.float64)
    # independent reference: complex dtypes, z_j = x[2j] + i x[2j+1], y = W z + bias
    W = torch.view_as_complex(layer.weight.detach().contiguous())              # (3, 4) complex128
    z = torch.view_as_complex(x.view(5, 4, 2))                                 # (5, 4)
    bias = torch.view_as_complex(layer.bias.detach().view(3, 2))
    expected = torch.view_as_real(z @ W.T + bias).flatten(-2)                  # (5, 6)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.linear(x, layer.to_real_weight(), layer.bias), expected, rtol=1e-12, atol=1e-12)


def test_complex_linear_real_weight_has_rotation_scaling_blocks():
    layer = ComplexLinear(4, 4).double()
    W = layer.to_real_weight()
    a, b = layer.weight[1, 0]
    assert torch.equal(W[2:4, 0:2], torch.stack((torch.stack((a, -b)), torch.stack((b, a)))))
    blocks = W.detach().view(2, 2, 2, 2).permute(0, 2, 1, 3)                   # (out/2, in/2, 2, 2)
    assert torch.equal(blocks[..., 0, 0], blocks[..., 1, 1])
    assert torch.equal(blocks[..., 0, 1], -blocks[..., 1, 0])


def test_complex_linear_has_half_the_parameters():
    for n_in, n_out in [(128, 384), (6, 10)]:
        complex_count = sum(p.numel() for p in ComplexLinear(n_in, n_out).parameters())
        real_count = sum(p.numel() for p in torch.nn.Linear(n_in, n_out, bias=False).parameters())
        assert 2 * complex_count == real_count


def test_complex_linear_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        ComplexLinear(7, 8)


def test_gradcheck_complex_linear_and_rotation():
    torch.manual_seed(0)
    layer = ComplexLinear(6, 4, bias=True).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,)), (x, weight, bias))
    cos, sin = (t.double() for t in rotary_tables(5, rope_frequencies(8, 10000.0)))
    q = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: apply_rotary(q, cos, sin), (q,))


def test_rotation_is_multiplication_by_e_i_m_theta():
    torch.manual_seed(0)
    T, hs, base = 7, 8, 10000.0
    cos, sin = rotary_tables(T, rope_frequencies(hs, base))
    x = torch.randn(2, T, 3, hs, dtype=torch.float64)
    theta = torch.tensor([base ** (-2 * j / hs) for j in range(hs // 2)], dtype=torch.float64)
    m = torch.arange(T, dtype=torch.float64)
    phase = torch.polar(torch.ones(T, hs // 2, dtype=torch.float64), m[:, None] * theta)   # e^(i m theta_j)
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * phase[:, None, :]).flatten(-2)
    # the tables are float32 (as in training), so agreement is to float32 precision
    torch.testing.assert_close(apply_rotary(x, cos.double(), sin.double()), expected, rtol=0, atol=1e-6)


def test_rotary_tables_keep_precision_at_long_positions():
    cos, sin = rotary_tables(100_001, rope_frequencies(64, 10000.0))
    assert abs(cos[100_000, 0].item() - math.cos(100_000)) < 1e-6
    assert abs(sin[100_000, 0].item() - math.sin(100_000)) < 1e-6


@pytest.mark.parametrize("pos", ["rope", "crope"])
def test_rotary_logits_depend_only_on_relative_position(pos):
    model = tiny_model(pos=pos)
    idx = torch.randint(0, 50, (2, 12))
    at_zero, _ = model(idx)
    shifted, _ = model(idx, start_pos=17)
    torch.testing.assert_close(shifted, at_zero, rtol=0, atol=1e-6)


def test_learned_logits_depend_on_absolute_position():
    model = tiny_model(pos="learned")
    idx = torch.randint(0, 50, (2, 12))
    assert (model(idx)[0] - model(idx, start_pos=17)[0]).abs().max() > 1e-3


def test_positions_beyond_block_size_are_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(torch.zeros(1, 10, dtype=torch.long), start_pos=30)


@pytest.mark.parametrize("complex_out", [False, True])
def test_to_rope_gives_equal_logits(complex_out):
    crope = tiny_model(pos="crope", complex_out=complex_out)
    rope = crope.to_rope()
    assert rope.config.pos == "rope" and not rope.config.complex_out
    assert isinstance(rope.transformer.h[0].attn.c_attn, torch.nn.Linear)
    idx = torch.randint(0, 50, (3, 32))
    torch.testing.assert_close(rope(idx)[0], crope(idx)[0], rtol=1e-12, atol=1e-12)


def test_to_rope_refuses_a_rope_model():
    with pytest.raises(ValueError, match="CRoPE"):
        tiny_model(pos="rope").to_rope()


@pytest.mark.parametrize("pos", ["learned", "rope", "crope"])
def test_kv_cache_generation_equals_generation_without_cache(pos):
    model = tiny_model(pos=pos)
    prompt = torch.randint(0, 50, (2, 5))
    # 60 new tokens run well past block_size 32, through the sliding window
    for sampling in [dict(), dict(top_k=5), dict(top_p=0.8, temperature=1.3)]:
        torch.manual_seed(1)
        cached = model.generate(prompt, 60, **sampling)
        torch.manual_seed(1)
        uncached = model.generate(prompt, 60, use_cache=False, **sampling)
        assert cached.shape == (2, 65)
        assert torch.equal(cached, uncached)


def test_cached_forward_equals_full_forward():
    from crope import KVCache
    model = tiny_model(pos="crope")
    idx = torch.randint(0, 50, (2, 20))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, "cpu", torch.float64)
    first, _ = model(idx[:, :8], kv_cache=cache)
    chunk, _ = model(idx[:, 8:15], start_pos=8, kv_cache=cache)   # several new tokens after the cache
    step, _ = model(idx[:, 15:16], start_pos=15, kv_cache=cache)
    torch.testing.assert_close(torch.cat((first, chunk, step), 1), full[:, :16], rtol=1e-10, atol=1e-10)


def test_param_report_figures():
    config = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    rope = GPT(GPTConfig(**config, pos="rope")).param_report()
    crope = GPT(GPTConfig(**config, pos="crope")).param_report()
    full = GPT(GPTConfig(**config, pos="crope", complex_out=True)).param_report()
    learned = GPT(GPTConfig(**config, pos="learned")).param_report()
    d, L = 128, 4
    assert rope["qkv"] == L * 3 * d * d and crope["qkv"] == rope["qkv"] // 2
    assert crope["attention"] == rope["attention"] * (1 - 0.375)
    assert full["attention"] == rope["attention"] // 2
    assert rope["total"] - crope["total"] == L * 1.5 * d * d
    assert learned["embeddings"] == rope["embeddings"] + 64 * d
    for report in (rope, crope, full, learned):
        assert report["total"] == sum(report[k] for k in ("qkv", "attn_out", "mlp", "embeddings", "norms"))


@pytest.mark.parametrize("bad, message", [
    (dict(n_embd=12, n_head=4), "must be even"),
    (dict(n_embd=30, n_head=4), "multiple of n_head"),
    (dict(pos="alibi"), "pos must be one of"),
    (dict(pos="rope", complex_out=True), "complex_out"),
    (dict(n_embd=4, n_head=2, rope_scaling="ntk"), "needs a head size of at least 4"),
    (dict(rope_base=0.0), "rope_base must be a positive number"),
])
def test_bad_configs_are_refused_at_construction(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **bad})


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    torch.manual_seed(0)
    assert set(sample_next(logits, top_k=2).flatten().tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.7).flatten().tolist()) == {0, 1}   # 0.5 < 0.7 <= 0.8
    assert set(sample_next(logits, top_p=0.1).flatten().tolist()) == {0}
    assert set(sample_next(logits).flatten().tolist()) == {0, 1, 2, 3}
    greedy = sample_next(logits, temperature=1e-3)
    assert (greedy == 0).all()


def test_compiled_pytorch_path_equals_eager():
    model = tiny_model(pos="crope").float().train()  # no kernel: the fused op's compiled path is in test_kernel.py
    idx = torch.randint(0, 50, (2, 16))
    compiled = torch.compile(model, fullgraph=True)   # fullgraph: a graph break would be an error
    eager_logits, eager_loss = model(idx, idx)
    logits, loss = compiled(idx, idx)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    loss.backward()
    grad = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    model.zero_grad()
    eager_loss.backward()
    torch.testing.assert_close(grad, model.transformer.h[0].attn.c_attn.weight.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- context extension

def expected_angles(method, m, j, head_size, s, base=10000.0):
    """The angle of pair j at position m, written from each paper's formula with plain floats (yarn and
    llama3 are checked against the reference implementation in test_rope_scaling.py)."""
    theta = base ** (-2 * j / head_size)
    if method == "linear":   # position interpolation: m -> m / s
        return (m / s) * theta
    if method == "ntk":      # NTK-aware: base -> base * s^(d / (d - 2))
        return m * (base * s ** (head_size / (head_size - 2))) ** (-2 * j / head_size)
    return m * theta


@pytest.mark.parametrize("method", ["extrapolate", "linear", "ntk"])
def test_extended_tables_follow_each_papers_formula(method):
    model = tiny_model(pos="rope", n_head=1, n_embd=64, block_size=16)   # head size 64: 32 frequencies
    extended = model.extend_context(64, method)
    assert extended.config.trained_block_size == 16 and extended.config.context_scale == 4
    expected = torch.tensor([[expected_angles(method, m, j, 64, 4) for j in range(32)] for m in range(64)],
                            dtype=torch.float64)
    torch.testing.assert_close(extended.rope_cos.double(), expected.cos(), rtol=0, atol=2e-7)
    torch.testing.assert_close(extended.rope_sin.double(), expected.sin(), rtol=0, atol=2e-7)


def test_interpolation_maps_position_s_m_onto_the_trained_angle_of_m():
    model = tiny_model(pos="crope", block_size=32)
    extended = model.extend_context(128, "linear")      # s = 4
    m = torch.arange(32)
    torch.testing.assert_close(extended.rope_cos[4 * m], model.rope_cos[m], rtol=0, atol=1e-6)
    torch.testing.assert_close(extended.rope_sin[4 * m], model.rope_sin[m], rtol=0, atol=1e-6)


@pytest.mark.parametrize("pos", ["rope", "crope"])
def test_extension_without_scaling_keeps_the_trained_positions(pos):
    model = tiny_model(pos=pos)
    idx = torch.randint(0, 50, (2, 80))
    extended = model.extend_context(96)
    torch.testing.assert_close(extended(idx[:, :32])[0], model(idx[:, :32])[0], rtol=0, atol=0)
    assert extended(idx)[0].shape == (2, 80, 50)   # and runs past the trained context


@pytest.mark.parametrize("method", ROPE_SCALINGS)
def test_crope_extended_equals_its_rope_form_extended(method):
    crope = tiny_model(pos="crope")
    idx = torch.randint(0, 50, (2, 100))
    torch.testing.assert_close(crope.extend_context(128, method)(idx)[0],
                               crope.to_rope().extend_context(128, method)(idx)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["linear", "yarn", "llama3"])
def test_kv_cache_generation_past_the_trained_context(method):
    model = tiny_model(pos="crope").extend_context(64, method)
    prompt = torch.randint(0, 50, (2, 5))
    torch.manual_seed(2)
    cached = model.generate(prompt, 90, top_k=10)     # past 32 (trained), past 64 (the window slides)
    torch.manual_seed(2)
    assert torch.equal(cached, model.generate(prompt, 90, top_k=10, use_cache=False))


def test_an_extended_model_keeps_its_method_unless_told_otherwise():
    model = tiny_model(pos="crope").extend_context(64, "linear")
    assert model.extend_context(128).config.rope_scaling == "linear"
    assert model.extend_context(128, "yarn").config.rope_scaling == "yarn"
    assert model.extend_context(128).config.trained_block_size == 32
    extrapolated = model.extend_context(128, "extrapolate")   # the trained angles, no scaling
    assert extrapolated.config.rope_scaling == "extrapolate"
    assert torch.equal(extrapolated.rope_cos[:32], tiny_model(pos="crope").rope_cos)


@pytest.mark.parametrize("pos, block_size, method, message", [
    ("learned", 64, "extrapolate", "learned-position model"),
    ("rope", 16, "extrapolate", "lengthens the context"),
    ("crope", 64, "rotate", "rope_scaling must be one of"),
    ("crope", 64, "none", "rope_scaling must be one of"),   # a former name: checkpoints only (runs.load_checkpoint)
])
def test_bad_extensions_are_refused(pos, block_size, method, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(pos=pos).extend_context(block_size, method)


def test_extended_models_build_their_tables_once(monkeypatch):
    import crope
    model = tiny_model(pos="crope").extend_context(128, "yarn")

    def rebuilt(config):
        raise AssertionError("rotary tables rebuilt after construction")

    monkeypatch.setattr(crope, "model_rotary_tables", rebuilt)
    model(torch.randint(0, 50, (2, 128)))
    model.generate(torch.randint(0, 50, (1, 4)), 140)   # the KV cache, then the sliding window
