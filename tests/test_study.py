"""The pieces study.py adds: the 2x2 energy split, the projection onto CRoPE, the statistics, the
extrapolation study."""

import csv
import math

import pytest
import torch

import study
from conftest import SMALL
from crope import ROPE_SCALINGS, GPT, ComplexLinear, GPTConfig, basis_coefficients

BASIS = {  # the paper's basis of real 2x2 matrices
    "s0": torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64),   # identity
    "s1": torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64),   # reflection about the 45 degree line
    "s2": torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64),  # 90 degree rotation
    "s3": torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64),  # reflection about the x axis
}


def from_coefficients(c):
    """A real (2o, 2i) weight whose block (o, i) is sum_k c[k][o, i] * s_k."""
    blocks = sum(ck[:, :, None, None] * s for ck, s in zip(c, BASIS.values()))   # (o, i, 2, 2)
    return blocks.permute(0, 2, 1, 3).reshape(2 * c[0].size(0), 2 * c[0].size(1))


def test_split_is_exact_on_constructed_matrices_and_energy_adds_up():
    torch.manual_seed(0)
    c = [torch.randn(3, 5, dtype=torch.float64) for _ in range(4)]
    weight = from_coefficients(c)
    for got, want in zip(basis_coefficients(weight), c):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    total = (weight ** 2).sum()
    parts = sum(2 * (ck ** 2).sum() for ck in basis_coefficients(weight))
    torch.testing.assert_close(parts, total, rtol=1e-14, atol=0)


def test_energy_share_extremes():
    zeros = torch.zeros(4, 6, dtype=torch.float64)
    ones = torch.ones(4, 6, dtype=torch.float64)
    assert study.energy_shares(from_coefficients([ones, zeros, -ones, zeros])) == pytest.approx(1.0)
    assert study.energy_shares(from_coefficients([zeros, ones, zeros, 2 * ones])) == pytest.approx(0.0)
    assert study.energy_shares(from_coefficients([ones, ones, zeros, zeros])) == pytest.approx(0.5)


def test_projection_of_a_crope_weight_is_the_identity():
    layer = ComplexLinear(10, 6).double()
    projected = ComplexLinear.from_real_weight(layer.to_real_weight())
    assert torch.equal(projected.weight, layer.weight)


def test_projection_is_the_nearest_complex_linear_map():
    torch.manual_seed(1)
    weight = torch.randn(6, 8, dtype=torch.float64)
    residual = weight - ComplexLinear.from_real_weight(weight).to_real_weight()
    for _ in range(5):  # the residual is orthogonal to every complex-linear weight
        other = ComplexLinear(8, 6).double()
        torch.nn.init.normal_(other.weight)
        assert abs((residual * other.to_real_weight()).sum().item()) < 1e-12


def test_rope_to_crope_round_trip_keeps_logits():
    torch.manual_seed(0)
    crope = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16)).double().eval()
    back = crope.to_rope().to_crope()
    idx = torch.randint(0, 30, (2, 16))
    torch.testing.assert_close(back(idx)[0], crope(idx)[0], rtol=1e-12, atol=1e-12)


def test_mean_ci95_on_a_known_sample():
    mean, half = study.mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    # t_{0.975, 4} = 2.7764, sd = sqrt(2.5), n = 5
    assert mean == 3.0 and half == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), abs=1e-3)
    mean, half = study.mean_ci95([0.5, 0.5, 0.5])
    assert (mean, half) == (0.5, 0.0)


def write_log(run_dir, val_losses):
    run_dir.mkdir(parents=True)
    with open(run_dir / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["iter", "train_loss", "val_loss", "lr", "tokens", "wall_seconds"])
        writer.writeheader()
        for i, v in enumerate(val_losses):
            writer.writerow(dict(iter=100 * i, train_loss="", val_loss=v, lr="", tokens=0, wall_seconds=i))


def test_seeds_table_pairs_by_seed(tmp_path):
    finals = {"rope": [2.0, 2.1, 1.9], "crope": [2.01, 2.12, 1.92]}   # differences 0.01, 0.02, 0.02
    runs = {}
    for variant, values in finals.items():
        runs[variant] = {}
        for seed, final in enumerate(values):
            run = tmp_path / f"seed{seed}" / variant
            write_log(run, [3.0, final - 0.1, final])   # best is the middle point
            runs[variant][seed] = run
    table = study.seeds_table(runs, [("crope", "rope")])
    mean, half = study.mean_ci95([0.01, 0.02, 0.02])
    assert f"| crope - rope | 3 | {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]" in table
    assert "| rope | 3 | 2.0000 +- 0.1000 | 1.9000 +- 0.1000 |" in table


def test_flops_of_crope_equal_rope_at_the_same_width():
    rope = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, pos="rope")
    crope = GPTConfig(**{**vars(rope), "pos": "crope"})
    L, d, T, V = 4, 128, 64, 65  # nanoGPT's count: 6 per weight of the 12 L d^2 block matrices and lm_head
    assert GPT(rope).flops_per_token() == 6 * (12 * L * d * d + V * d) + 12 * L * T * d
    assert GPT(crope).flops_per_token() == GPT(rope).flops_per_token()
    wider = GPTConfig(**{**vars(crope), "n_embd": 136})
    assert GPT(wider).flops_per_token() > GPT(rope).flops_per_token()


def test_loss_per_position_averages_to_the_models_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16, pos="crope")).eval()
    x, y = torch.randint(0, 50, (40, 32)), torch.randint(0, 50, (40, 32))
    per_position = study.loss_per_position(model, x, y, chunk=16)   # three chunks, the last one short
    assert per_position.shape == (32,)
    torch.testing.assert_close(per_position.mean().item(), model(x, y)[1].item(), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory, text_file):
    """A 'study.py seeds' folder: rope and crope, seeds 0 and 1, 6 iterations at a context of 32."""
    base = tmp_path_factory.mktemp("base")
    assert study.main(["seeds", "--out_dir", str(base), "--seeds", "0,1", "--variants", "rope,crope", *SMALL,
                       "--data", str(text_file), "--max_iters", "6"]) == 0
    return base


def test_extrapolate_writes_tables_and_plots(tmp_path, text_file, tiny_baseline):
    small = [*SMALL, "--data", str(text_file), "--max_iters", "6"]
    assert study.main(["extrapolate", "--out_dir", str(tmp_path / "ext"), "--baseline", str(tiny_baseline),
                       "--seeds", "0,1", "--lengths", "32,200", "--tokens", "512", "--finetune_block", "64",
                       "--finetune_iters", "3", *small]) == 0
    text = (tmp_path / "ext" / "study.md").read_text()
    rows = ["| any, 32 (trained) |", "Cost of extension"] + [f"| {method}, {length} |" for method in ROPE_SCALINGS
                                                            for length in (64, 128, 200)]
    for row in rows:   # zero-shot at 200, fine-tuned at 64 and 128, with every method
        assert row in text, row
    for plot in ("extrapolate.png", "positions.png"):
        assert (tmp_path / "ext" / plot).stat().st_size > 10_000
    tuned = torch.load(tmp_path / "ext" / "finetune_yarn" / "seed1" / "crope" / "last.pt", weights_only=True)
    assert tuned["iter"] == 3 and tuned["model_config"]["block_size"] == 64
    assert tuned["model_config"]["trained_block_size"] == 32 and tuned["model_config"]["rope_scaling"] == "yarn"


# ----------------------------------------------------------------------------- why CRoPE extrapolates better

def test_slow_pairs_are_those_that_never_turn_once_in_the_trained_context():
    config = GPTConfig(block_size=64, n_embd=128, n_head=4, pos="rope")   # head size 32, base 10000
    # wavelength 2 pi 10000^(j/16): 62.8 at j = 4, 111.7 at j = 5
    assert study.slow_pairs(config).tolist() == [False] * 5 + [True] * 11
    longer = GPTConfig(**{**vars(config), "block_size": 256, "trained_block_size": 64})
    assert torch.equal(study.slow_pairs(longer), study.slow_pairs(config))   # by the trained context


def test_causal_pair_products_match_the_sum_they_name():
    torch.manual_seed(0)
    B, T, nh, hs = 2, 5, 3, 4
    qk = torch.randn(B, T, 2 * nh * hs, dtype=torch.float64)
    pairs = qk.view(B, T, 2, nh, hs // 2, 2)
    q, k = pairs[:, :, 0].norm(dim=-1), pairs[:, :, 1].norm(dim=-1)          # (B, T, nh, hs/2)
    expected = sum(q[b, m, h] * k[b, n, h] for b in range(B) for h in range(nh)
                   for m in range(T) for n in range(m + 1))
    products, count = study.causal_pair_products(qk, nh)
    torch.testing.assert_close(products, expected, rtol=1e-12, atol=0)
    assert count == B * nh * T * (T + 1) // 2


def test_pair_reliance_reads_each_layers_queries_and_keys():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16, pos="crope")).double()
    x = torch.randint(0, 30, (9, 16))
    reliance = study.pair_reliance(model, x)
    assert reliance.shape == (2, 4)
    first = model.transformer.h[0]
    qk = first.attn.c_attn(first.ln_1(model.transformer.wte(x)))[..., :32]   # layer 0's input is the embedding
    products, count = study.causal_pair_products(qk, 2)
    torch.testing.assert_close(reliance[0], products / count, rtol=1e-12, atol=0)
    with torch.no_grad():   # pair 1 of every head of q zeroed in layer 1: it carries nothing there
        weight = model.transformer.h[1].attn.c_attn.weight   # complex (out/2, in/2, 2); q's pairs come first
        weight.view(3, 2, 4, -1, 2)[0, :, 1] = 0
    reliance = study.pair_reliance(model, x)
    assert (reliance[1, 1] == 0).item() and (reliance[1, [0, 2, 3]] > 0).all() and (reliance[0] > 0).all()


@pytest.mark.parametrize("condition", ["slow pairs zeroed", "fast pairs zeroed"])
def test_zeroing_pairs_in_the_tables_equals_zeroing_their_weights(condition):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16, pos="rope")).double().eval()
    slow = study.slow_pairs(model.config)                                   # head size 8, L = 16: pairs 1-3 slow
    assert slow.tolist() == [False, True, True, True]
    pairs = slow if condition == "slow pairs zeroed" else ~slow
    weights = model.extend_context(48, "extrapolate")
    with torch.no_grad():
        for block in weights.transformer.h:     # the q and k rows of those pairs, in every head
            block.attn.c_attn.weight.view(3, 2, 4, 2, -1)[:2, :, pairs] = 0
    idx = torch.randint(0, 30, (2, 48))
    zeroed = study.under_condition(model.extend_context(48, "extrapolate"), condition)
    torch.testing.assert_close(zeroed(idx)[0], weights(idx)[0], rtol=1e-12, atol=1e-12)
    assert model.rope_cos.abs().sum() > 0   # the model itself is left as it was


def test_interpolated_slow_pairs_keep_to_their_trained_angles():
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=1, n_embd=8, pos="crope"))
    slow = study.slow_pairs(model.config)
    interpolated = study.under_condition(model.extend_context(64, "extrapolate"), "slow pairs interpolated")     # s = 4
    as_trained = study.under_condition(model.extend_context(64, "extrapolate"), "no scaling")
    m = torch.arange(16)
    torch.testing.assert_close(interpolated.rope_cos[4 * m][:, slow], model.rope_cos[m][:, slow], rtol=0, atol=1e-6)
    torch.testing.assert_close(interpolated.rope_sin[4 * m][:, slow], model.rope_sin[m][:, slow], rtol=0, atol=1e-6)
    assert torch.equal(interpolated.rope_cos[:, ~slow], as_trained.rope_cos[:, ~slow])      # fast pairs as trained
    assert torch.equal(as_trained.rope_cos, model.extend_context(64, "extrapolate").rope_cos)


def test_pearson_ci95_and_within_groups():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]   # sum dx dy = 8, sum dx^2 = sum dy^2 = 10
    r, low, high = study.pearson_ci95(x, y)
    assert r == pytest.approx(0.8, abs=1e-12)
    half = 1.96 / math.sqrt(5 - 3)
    assert (low, high) == pytest.approx((math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)))
    assert study.within_groups([1.0, 3.0, 10.0, 14.0], ["a", "a", "b", "b"]) == [-1.0, 1.0, -2.0, 2.0]


def test_pair_reliance_writes_tables_and_plots(tmp_path, text_file, tiny_baseline):
    out = tmp_path / "reliance"
    assert study.main(["pair_reliance", "--out_dir", str(out), "--baseline", str(tiny_baseline), "--seeds", "0,1",
                       "--tokens", "512", "--data", str(text_file)]) == 0
    text = (out / "reliance.md").read_text()
    rows = ["| 0 |", "| 1 |", "| mean |", "Pearson r"] + [f"| {condition}, {n} |" for condition in study.CONDITIONS
                                                       for n in (32, 64, 128, 256)]
    for row in rows:
        assert row in text, row
    assert "6 of 8 pairs are slow" in text    # head size 16, trained at 32: pairs 2-7
    with open(out / "reliance.csv", newline="") as f:
        shares = list(csv.DictReader(f))
    assert len(shares) == 2 * 2 * 2 * 8       # variants, seeds, layers, pairs
    for layer in ("0", "1"):                  # the shares of a layer add up to 1
        total = sum(float(r["share"]) for r in shares if (r["variant"], r["seed"], r["layer"]) == ("crope", "1", layer))
        assert total == pytest.approx(1.0, abs=1e-5)
    for plot in ("reliance.png", "conditions.png"):
        assert (out / plot).stat().st_size > 10_000


# ----------------------------------------------------------------------------- does the cost grow with context, width?

def test_scaling_pairs_each_configuration_and_widens_crope_to_ropes_parameters(tmp_path, text_file, monkeypatch):
    """A grid of three small configurations (the real one takes hours): the table has one row per configuration
    (each finished at its own max_iters), with the paired differences the runs' logs give, the equal-parameter row pairs a widened CRoPE with the RoPE
    runs of its source, and a second call trains nothing more."""
    monkeypatch.setattr(study, "SCALING_GRID", {"block16": (["--block_size", "16", "--max_iters", "4"], 2),
                                               "block32": (["--block_size", "32", "--max_iters", "6"], 2),
                                               "block32_equal": (["--block_size", "32", "--max_iters", "6"], 2)})
    monkeypatch.setattr(study, "EQUAL_PARAMETERS", {"block32_equal": "block32"})
    out = tmp_path / "scaling"
    at = SMALL.index("--block_size")  # each configuration sets it
    small_without_block = SMALL[:at] + SMALL[at + 2:]
    args = ["scaling", "--out_dir", str(out), "--configs", "block16,block32,block32_equal",
            *small_without_block, "--n_embd", "64", "--data", str(text_file), "--eval_interval", "3"]
    assert study.main(args) == 0
    assert not (out / "block32_equal" / "seed0" / "rope").exists()   # RoPE's runs are block32's
    wide = torch.load(out / "block32_equal" / "seed1" / "crope" / "last.pt", weights_only=True)["model_config"]
    rope = GPTConfig(**torch.load(out / "block32" / "seed1" / "rope" / "last.pt", weights_only=True)["model_config"])
    assert wide["n_embd"] > rope.n_embd
    assert GPT(GPTConfig(**wide)).param_report()["total"] == pytest.approx(GPT(rope).param_report()["total"], rel=0.02)

    rows = {line.split(":")[0].strip("| "): line for line in (out / "scaling.md").read_text().splitlines()[2:]}
    assert list(rows) == ["block16", "block32", "block32_equal"]
    for name, crope_folder in (("block16", "block16"), ("block32", "block32"), ("block32_equal", "block32_equal")):
        rope_folder = "block32" if name == "block32_equal" else name
        differences = [study.final_and_best(out / crope_folder / f"seed{s}" / "crope")[0] -
                       study.final_and_best(out / rope_folder / f"seed{s}" / "rope")[0] for s in (0, 1)]
        mean, half = study.mean_ci95(differences)
        assert f"| {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] |" in rows[name]
    assert f"CRoPE widened to {wide['n_embd']}" in rows["block32_equal"]
    assert (out / "scaling.png").stat().st_size > 10_000

    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/*/last.pt")}
    assert study.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/*/last.pt")} == before
