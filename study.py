r"""
Does CRoPE lose anything? Runs and reads the experiments behind the README's "Study" sections.

    python study.py seeds   --out_dir out/study/char --seeds 0,1,2,3,4 --variants learned,rope,crope,crope_full \
                            --eval_iters 100
    python study.py seeds   --out_dir out/study/gpt2 --seeds 0,1,2 --variants learned,rope,crope --tokenizer gpt2 \
                            --max_iters 500 --eval_interval 100 --eval_iters 50
    python study.py equal   --out_dir out/study/equal --baseline out/study/char --seeds 0,1,2 --eval_iters 100
    python study.py energy  out/study/char/seed*/rope/last.pt --out_dir out/study/energy
    python study.py project --out_dir out/study/project --baseline out/study/char --seeds 0,1,2 --eval_iters 100
    python study.py extrapolate --out_dir out/study/extrapolate --baseline out/study/char --seeds 0,1,2,3,4
    python study.py pair_reliance --out_dir out/study/reliance --baseline out/study/char --seeds 0,1,2,3,4
    python study.py scaling --out_dir out/study/scaling --eval_iters 100

Flags study.py does not know are passed to train_shakespeare.py (for example --preset, --max_iters).
Every command resumes: run it again after a stop and finished runs are kept.
"""

if __name__ == "__main__":  # first, before torch loads: Ctrl-C while the command starts is one line
    import ctrl_c
    ctrl_c.stop_with_one_line()

import argparse
import csv
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import settings
import train_shakespeare as ts
from cli import ArgParser, fail, gives, meta_model, path_text
from crope import ROPE_SCALINGS, GPT, GPTConfig, basis_coefficients, blend_frequencies, rope_frequencies, rotary_tables
from data import VAL_SEED, data_path, get_batch, load_dataset
from runs import load_checkpoint, model_from_checkpoint, output_folder, read_log
from settings import comma_list, variant_list

# Two-sided 95% quantiles of Student's t distribution, t_{0.975, df}, for df = 1..30.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def mean_ci95(values):
    """Mean and half-width of its 95% confidence interval (Student's t; normal beyond 30 degrees of freedom)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan")
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.960
    return mean, t * statistics.stdev(values) / math.sqrt(n)


# ----------------------------------------------------------------------------- runs

def run_seeds(out_dir, seeds, variants, train_args):
    """Train every variant for every seed into out_dir/seed{s}/, resuming what is there."""
    for seed in seeds:
        seed_dir = Path(out_dir) / f"seed{seed}"
        resume = ["--resume"] if any((seed_dir / v / "last.pt").exists() for v in variants) else []
        code = ts.main([*train_args, "--variants", ",".join(variants), "--seed", str(seed), "--out_dir", str(seed_dir),
                        *resume])
        if code:
            raise SystemExit(code)


def final_and_best(run_dir):
    val = [float(r["val_loss"]) for r in read_log(Path(run_dir) / "log.csv") if r["val_loss"]]
    return val[-1], min(val)


def val_curve(run_dir):
    rows = [r for r in read_log(Path(run_dir) / "log.csv") if r["val_loss"]]
    return [int(r["iter"]) for r in rows], [float(r["val_loss"]) for r in rows]


def mean_std(values):
    """mean +- standard deviation, as the tables print them."""
    return f"{statistics.fmean(values):.4f} +- {statistics.stdev(values) if len(values) > 1 else 0:.4f}"


def seeds_table(runs, pairs):
    """Markdown: final and best validation loss per variant (mean +- std over seeds), and the paired
    differences (same seed, same batches) with 95% confidence intervals.

    runs: {label: {seed: run_dir}}; pairs: [(label_a, label_b)] for a - b.
    """
    lines = ["| variant | seeds | final val loss (mean +- std) | best val loss (mean +- std) |", "|---|---|---|---|"]
    results = {label: {s: final_and_best(d) for s, d in by_seed.items()} for label, by_seed in runs.items()}
    for label, by_seed in results.items():
        finals, bests = [v[0] for v in by_seed.values()], [v[1] for v in by_seed.values()]
        lines.append(f"| {label} | {len(by_seed)} | {mean_std(finals)} | {mean_std(bests)} |")
    lines += ["", "| paired difference | seeds | final val: mean [95% CI] | best val: mean [95% CI] |",
              "|---|---|---|---|"]
    for a, b in pairs:
        seeds = sorted(results[a].keys() & results[b].keys())
        cells = []
        for column in (0, 1):
            mean, half = mean_ci95([results[a][s][column] - results[b][s][column] for s in seeds])
            cells.append(f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]")
        lines.append(f"| {a} - {b} | {len(seeds)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def band_plot(runs, path, title):
    """Validation loss against iterations: mean over seeds, with a band of +- one standard deviation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, tail) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (label, by_seed) in enumerate(runs.items()):
        curves = [val_curve(d) for d in by_seed.values()]
        iters = curves[0][0]
        if any(c[0] != iters for c in curves):
            fail(f"the {label} runs were evaluated at different iterations; rerun them alike")
        losses = torch.tensor([c[1] for c in curves])   # (seeds, points)
        mean = losses.mean(0)
        std = losses.std(0) if len(losses) > 1 else torch.zeros_like(mean)
        for ax in (full, tail):
            ax.plot(iters, mean, "o-", ms=3, color=f"C{i}", label=f"{label} ({len(losses)} seeds)")
            ax.fill_between(iters, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    start = len(iters) // 2
    if iters[start] < iters[-1]:
        tail.set_xlim(iters[start], iters[-1])
    for ax in (full, tail):
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation loss (mean +- std over seeds)")
        ax.grid(alpha=0.3)
    tail.set_title("second half, zoomed")
    _autoscale_y(tail, iters[start])
    full.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _autoscale_y(ax, x_from):
    ys = [y for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata()) if x >= x_from]
    pad = 0.1 * (max(ys) - min(ys)) + 1e-3
    ax.set_ylim(min(ys) - 2 * pad, max(ys) + 2 * pad)


def write(out_dir, name, text):
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)
    print(f"\nwrote {path}")


# ----------------------------------------------------------------------------- commands

def cmd_seeds(args, train_args):
    """Every variant over several seeds: Table-1 style mean +- std and paired CRoPE - RoPE CIs."""
    run_seeds(args.out_dir, args.seeds, args.variants, train_args)
    runs = {v: {s: args.out_dir / f"seed{s}" / v for s in args.seeds} for v in args.variants}
    pairs = [(a, "rope") for a in args.variants if a != "rope" and "rope" in args.variants]
    write(args.out_dir, "study.md", seeds_table(runs, pairs))
    base = settings.parse_args(train_args)
    band_plot(runs, args.out_dir / "seeds.png", f"{base.preset} preset, {base.tokenizer} tokens, "
              f"{base.max_iters} iterations, validation on {base.eval_iters} fixed batches")


def equal_parameter_crope(rope):
    """The CRoPE config of the RoPE config rope, widened (n_embd) to RoPE's total parameters, within 2%."""
    def total(config):
        return meta_model(config).param_report()["total"]
    widened = lambda width: GPTConfig(**{**vars(rope), "n_embd": width, "pos": "crope"})
    target = total(rope)
    step = 2 * rope.n_head  # n_embd must give an even head size
    width = min(range(step, 4 * rope.n_embd, step), key=lambda w: abs(total(widened(w)) - target))
    if abs(total(widened(width)) / target - 1) > 0.02:
        fail(f"no CRoPE width matches RoPE's {target:,} parameters within 2%")
    return widened(width)


def cmd_equal(args, train_args):
    """Spend CRoPE's saved parameters on width: CRoPE at n_embd w matches RoPE's total parameters
    within 2%; compare it with RoPE at the same parameters and steps, and at the same FLOPs."""
    base = settings.parse_args(train_args)
    # the baseline's RoPE model, as trained on this data (vocabulary, bias and all)
    rope = GPTConfig(**load_checkpoint(args.baseline / f"seed{args.seeds[0]}" / "rope" / "last.pt")["model_config"])
    rope_params = GPT(rope).param_report()["total"]
    wide = equal_parameter_crope(rope)
    width, wide_params = wide.n_embd, GPT(wide).param_report()["total"]
    flop_ratio = GPT(wide).flops_per_token() / GPT(rope).flops_per_token()
    rope_iters = round(base.max_iters * flop_ratio)

    run_seeds(args.out_dir / "crope_wide", args.seeds, ["crope"], [*train_args, "--n_embd", str(width)])
    run_seeds(args.out_dir / "rope_same_flops", args.seeds, ["rope"], [*train_args, "--max_iters", str(rope_iters)])
    runs = {f"crope n_embd {width} ({wide_params:,} params)":
            {s: args.out_dir / "crope_wide" / f"seed{s}" / "crope" for s in args.seeds},
            f"rope, same steps ({rope_params:,} params)":
            {s: args.baseline / f"seed{s}" / "rope" for s in args.seeds},
            f"rope, same FLOPs ({rope_iters} iters)":
            {s: args.out_dir / "rope_same_flops" / f"seed{s}" / "rope" for s in args.seeds},
            f"crope n_embd {base.n_embd}, same steps":
            {s: args.baseline / f"seed{s}" / "crope" for s in args.seeds}}
    labels = list(runs)
    text = (f"CRoPE widened to n_embd {width}: {wide_params:,} parameters against RoPE's {rope_params:,} "
            f"({wide_params / rope_params - 1:+.1%}); {flop_ratio:.3f}x RoPE's training FLOPs per token.\n\n"
            + seeds_table(runs, [(labels[0], labels[1]), (labels[0], labels[2])]))
    write(args.out_dir, "study.md", text)
    band_plot(runs, args.out_dir / "equal.png", "equal parameters: CRoPE spends its savings on width")


def energy_shares(weight):
    """Share of a real weight's energy (squared Frobenius norm) in rotation-and-scaling (s0, s2)."""
    c0, c1, c2, c3 = basis_coefficients(weight.double())
    keep = (c0 ** 2).sum() + (c2 ** 2).sum()
    return (keep / (keep + (c1 ** 2).sum() + (c3 ** 2).sum())).item()


def qkv_shares(model):
    """{(layer, 'q'|'k'|'v'): rotation-and-scaling share} of a RoPE model's Q/K/V weights."""
    shares = {}
    for layer, block in enumerate(model.transformer.h):
        for name, w in zip("qkv", block.attn.c_attn.weight.detach().chunk(3, dim=0)):
            shares[(layer, name)] = energy_shares(w)
    return shares


def cmd_energy(args, train_args):
    """Where a trained RoPE model's Q/K/V weights live: rotation-and-scaling versus reflections."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [model_from_checkpoint(load_checkpoint(p)) for p in args.checkpoints]
    if any(m.config.pos != "rope" for m in models):
        fail("energy reads RoPE checkpoints (a CRoPE weight has no reflection part to measure)")
    trained = [qkv_shares(m) for m in models]
    config = models[0].config
    torch.manual_seed(0)
    initial = qkv_shares(GPT(config))
    keys = list(initial)
    lines = [f"Share of Q/K/V weight energy in rotation-and-scaling (s0 + s2) of {len(trained)} trained RoPE "
             "model(s), mean [min, max]; the rest is in the reflections (s1 + s3).", "",
             "| layer | weight | trained | random init |", "|---|---|---|---|"]
    for key in keys:
        values = [t[key] for t in trained]
        lines.append(f"| {key[0]} | {key[1]} | {statistics.fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}] "
                     f"| {initial[key]:.3f} |")
    write(args.out_dir, "energy.md", "\n".join(lines))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(len(keys))
    for i, t in enumerate(trained):
        ax.plot(x, [t[k] for k in keys], "o", color="C0", alpha=0.6, label="trained RoPE" if i == 0 else None)
    ax.plot(x, [initial[k] for k in keys], "s", color="C1", label="random init")
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xticks(list(x), [f"L{layer} {name}" for layer, name in keys], rotation=60)
    ax.set_ylabel("energy share in rotation + scaling")
    ax.set_title("RoPE's Q/K/V weights: how much CRoPE's subspace already holds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out_dir / "energy.png", dpi=120)
    plt.close(fig)


def cmd_project(args, train_args):
    """Project trained RoPE models onto the nearest CRoPE models, evaluate, fine-tune, and compare
    with CRoPE trained from scratch for the same total steps (and RoPE trained on as a control)."""
    base = settings.parse_args(train_args)
    finetune = [*train_args, "--max_iters", str(args.finetune_iters), "--warmup_iters", "0",
                "--lr", str(args.finetune_lr), "--min_lr", str(base.min_lr)]
    for seed in args.seeds:
        rope_ckpt = str(args.baseline / f"seed{seed}" / "rope" / "last.pt")
        for pos, name in (("crope", "projected"), ("rope", "rope_continued")):
            run_seeds(args.out_dir / name, [seed], [pos], [*finetune, "--init_from", rope_ckpt])
    total = base.max_iters + args.finetune_iters
    run_seeds(args.out_dir / "scratch", args.seeds, ["crope"], [*train_args, "--max_iters", str(total)])

    lines = [f"RoPE trained {base.max_iters} iterations, then {args.finetune_iters} more from lr "
             f"{args.finetune_lr}, against CRoPE from scratch for {total}. Validation loss, mean +- std over "
             f"{len(args.seeds)} seeds:", "", "| model | val loss |", "|---|---|"]
    rows = {
        f"RoPE after {base.max_iters} iters": [final_and_best(args.baseline / f"seed{s}" / "rope")[0]
                                               for s in args.seeds],
        "projected onto CRoPE, no training": [val_curve(args.out_dir / "projected" / f"seed{s}" / "crope")[1][0]
                                              for s in args.seeds],
        f"projected, then fine-tuned {args.finetune_iters} iters": [
            final_and_best(args.out_dir / "projected" / f"seed{s}" / "crope")[0] for s in args.seeds],
        f"RoPE trained on {args.finetune_iters} iters (control)": [
            final_and_best(args.out_dir / "rope_continued" / f"seed{s}" / "rope")[0] for s in args.seeds],
        f"CRoPE from scratch, {total} iters": [
            final_and_best(args.out_dir / "scratch" / f"seed{s}" / "crope")[0] for s in args.seeds],
    }
    for label, values in rows.items():
        lines.append(f"| {label} | {mean_std(values)} |")
    write(args.out_dir, "study.md", "\n".join(lines))


# ----------------------------------------------------------------------------- does the cost grow with context, width?

# 'study.py scaling': RoPE and CRoPE paired over the same seeds at longer contexts and a wider model, the cpu preset
# otherwise; folder: (flags to train_shakespeare.py, seeds), trained in this order. n_head stays 4, so width 256
# doubles the head size too. block512 (about 30 minutes a run on one core) and gpu, the gpu preset (block 256,
# width 384, 6 layers) cut to 2000 iterations on the schedule of its 5000, for a GPU, run only when named.
SCALING_GRID = {
    "block64": (["--block_size", "64"], 10),
    "block128": (["--block_size", "128"], 5),
    "block256": (["--block_size", "256"], 5),
    "block128_width256": (["--block_size", "128", "--n_embd", "256"], 5),
    "block128_equal": (["--block_size", "128"], 5),
    "block512": (["--block_size", "512"], 3),
    "gpu": (["--preset", "gpu", "--max_iters", "2000", "--lr_decay_iters", "5000"], 3),
}
SCALING_DEFAULT = [name for name in SCALING_GRID if name not in ("block512", "gpu")]  # about 9 core-hours
# CRoPE alone, widened to RoPE's parameters (the equal study's way), paired with the RoPE runs of another folder
EQUAL_PARAMETERS = {"block128_equal": "block128"}


def scaling_runs(out_dir, name):
    """{seed: (RoPE run, CRoPE run)} of one configuration of SCALING_GRID."""
    rope_folder = out_dir / EQUAL_PARAMETERS.get(name, name)
    return {s: (rope_folder / f"seed{s}" / "rope", out_dir / name / f"seed{s}" / "crope")
            for s in range(SCALING_GRID[name][1])}


def finished(run_dir, max_iters):
    """Whether run_dir's log reaches max_iters."""
    path = Path(run_dir) / "log.csv"
    return path.exists() and any(r["iter"] == str(max_iters) and r["val_loss"] for r in read_log(path))


def scaling_result(out_dir, name):
    """One configuration's paired results: its RoPE and CRoPE configs, final and best losses per seed, and the
    seconds each run took."""
    runs = scaling_runs(out_dir, name)
    configs = [GPTConfig(**load_checkpoint(d / "last.pt")["model_config"]) for d in runs[0]]
    losses = {s: [final_and_best(d) for d in pair] for s, pair in runs.items()}
    seconds = [[float(read_log(d / "log.csv")[-1]["wall_seconds"]) for d in pair] for pair in runs.values()]
    return dict(name=name, rope=configs[0], crope=configs[1], losses=losses, seconds=seconds)


def scaling_table(results):
    """Markdown: per configuration, RoPE's and CRoPE's final validation loss (mean +- std over seeds), the paired
    CRoPE - RoPE differences of the final and best losses with 95% intervals, and the minutes per run."""
    lines = ["| configuration | head size RoPE / CRoPE | parameters RoPE / CRoPE | seeds | RoPE final (mean +- std) | "
             "CRoPE final (mean +- std) | CRoPE - RoPE, final [95% CI] | CRoPE - RoPE, best [95% CI] | "
             "minutes per run (RoPE, CRoPE) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rope, crope = r["rope"], r["crope"]
        params = [GPT(c).param_report()["total"] for c in (rope, crope)]
        finals = [[v[i][0] for v in r["losses"].values()] for i in (0, 1)]
        cells = []
        for column in (0, 1):
            mean, half = mean_ci95([v[1][column] - v[0][column] for v in r["losses"].values()])
            cells.append(f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]")
        minutes = [statistics.fmean(pair[i] for pair in r["seconds"]) / 60 for i in (0, 1)]
        label = f"{r['name']}: block {rope.block_size}, width {rope.n_embd}, {rope.n_layer} layers" + (
            f", CRoPE widened to {crope.n_embd} (RoPE: {EQUAL_PARAMETERS[r['name']]}'s runs)"
            if r["name"] in EQUAL_PARAMETERS else "")
        lines.append(f"| {label} | {rope.head_size} / {crope.head_size} | {params[0]:,} / {params[1]:,} | "
                     f"{len(r['losses'])} | {mean_std(finals[0])} | {mean_std(finals[1])} | {cells[0]} | "
                     f"{cells[1]} | {minutes[0]:.1f}, {minutes[1]:.1f} |")
    return "\n".join(lines)


def scaling_plot(results, path):
    """scaling.png: CRoPE - RoPE (final validation loss, mean and 95% interval over seeds) against the block size
    at width 128, and against the width at block 128, with CRoPE widened to RoPE's parameters marked apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def difference(r):
        return mean_ci95([v[1][0] - v[0][0] for v in r["losses"].values()])

    # the cpu preset's family (4 layers); another preset (gpu: 6 layers, width 384) is a marker of its own
    base_layers = min(r["rope"].n_layer for r in results)
    base_width = min(r["rope"].n_embd for r in results if r["rope"].n_layer == base_layers)
    fig, (by_block, by_width) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in results:
        rope, crope = r["rope"], r["crope"]
        mean, half = difference(r)
        seeds = f"{len(r['losses'])} seeds"
        equal = r["name"] in EQUAL_PARAMETERS
        if rope.n_layer != base_layers:
            by_block.errorbar(rope.block_size * 1.08, mean, yerr=half, fmt="D", color="C2", capsize=4,  # beside
                              label=f"{r['name']}: {rope.n_layer} layers, width {rope.n_embd}, {seeds}")
        elif rope.n_embd == base_width and not equal:
            by_block.errorbar(rope.block_size, mean, yerr=half, fmt="o", color="C0", capsize=4)
            by_block.annotate(seeds, (rope.block_size, mean), textcoords="offset points", xytext=(8, -3), fontsize=8)
        if rope.n_layer == base_layers and rope.block_size == 128:
            by_width.errorbar(crope.n_embd, mean, yerr=half, fmt="s" if equal else "o", color="C1" if equal else "C0",
                              capsize=4, label=f"CRoPE at width {crope.n_embd}: RoPE's parameters" if equal else None)
            by_width.annotate(seeds, (crope.n_embd, mean), textcoords="offset points", xytext=(8, -3), fontsize=8)
    by_block.set_xscale("log", base=2)
    by_block.minorticks_off()
    blocks = sorted({r["rope"].block_size for r in results if r["rope"].n_embd == base_width or
                     r["rope"].n_layer != base_layers})
    by_block.set_xticks(blocks, [str(b) for b in blocks])
    widths = sorted({r["rope"].n_embd for r in results   # RoPE's widths: the legend names a widened CRoPE's
                     if r["rope"].n_layer == base_layers and r["rope"].block_size == 128})
    by_width.set_xscale("log", base=2)
    by_width.set_xticks(widths, [str(w) for w in widths])
    by_width.minorticks_off()
    by_block.set_xlabel(f"block size (tokens), width {base_width}, {base_layers} layers")
    by_width.set_xlabel(f"width n_embd ({results[0]['rope'].n_head} heads: the head size grows with it), block 128, "
                        f"{base_layers} layers")
    by_block.set_ylabel("CRoPE - RoPE, final validation loss (nats)")
    for ax in (by_block, by_width):
        ax.axhline(0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("CRoPE's cost against RoPE: paired over seeds, mean and 95% interval (the cpu preset otherwise, "
                 "unless the legend names another)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_scaling(args, train_args):
    """Does CRoPE's cost grow with context or width? Every configuration of SCALING_GRID named in --configs, RoPE
    and CRoPE paired over the same seeds; the table and the plot are rewritten after each configuration, from
    every configuration finished in out_dir."""
    for name in args.configs:  # a flag of yours that a configuration sets would be overridden without a word
        taken = [f for f in SCALING_GRID[name][0] if f.startswith("--") and gives(train_args, f)]
        if taken:
            fail(f"configuration {name} sets {', '.join(taken)} itself: leave {'them' if len(taken) > 1 else 'it'} "
                 "out, or train that configuration with 'study.py seeds'")
    max_iters = {n: settings.parse_args([*train_args, *flags]).max_iters for n, (flags, _) in SCALING_GRID.items()}
    for name in args.configs:
        flags, count = SCALING_GRID[name]
        seeds = list(range(count))
        if name in EQUAL_PARAMETERS:
            rope_folder = args.out_dir / EQUAL_PARAMETERS[name]
            run_seeds(rope_folder, seeds, ["rope"], [*train_args, *flags])
            rope = GPTConfig(**load_checkpoint(rope_folder / "seed0" / "rope" / "last.pt")["model_config"])
            flags = [*flags, "--n_embd", str(equal_parameter_crope(rope).n_embd)]
            run_seeds(args.out_dir / name, seeds, ["crope"], [*train_args, *flags])
        else:
            run_seeds(args.out_dir / name, seeds, ["rope", "crope"], [*train_args, *flags])
        done = [n for n in SCALING_GRID
                if all(finished(d, max_iters[n]) for pair in scaling_runs(args.out_dir, n).values() for d in pair)]
        results = [scaling_result(args.out_dir, n) for n in done]
        write(args.out_dir, "scaling.md", scaling_table(results))
        scaling_plot(results, args.out_dir / "scaling.png")


# ----------------------------------------------------------------------------- past the training context

def validation_windows(val, length, tokens):
    """Fixed windows of the validation split, tokens // length of them: inputs and targets (N, length)."""
    return get_batch(val, length, max(1, tokens // length), torch.Generator().manual_seed(VAL_SEED))


@torch.no_grad()
def loss_per_position(model, x, y, chunk=16):
    """Mean cross-entropy at every position (T,) over the windows x, y (N, T), in float64."""
    model.eval()
    total = torch.zeros(x.size(1), dtype=torch.float64)
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        logits, _ = model(xs)
        total += F.cross_entropy(logits.transpose(1, 2), ys, reduction="none").double().sum(0)
    return total / x.size(0)


def at_length(model, length, method):
    """The model with its context extended to length by method, or as it is when length fits."""
    return model if length <= model.config.block_size else model.extend_context(length, method)


def paired_row(label, rope, crope):
    """A table row: RoPE and CRoPE mean +- std over seeds, and the paired CRoPE - RoPE mean [95% CI]."""
    mean, half = mean_ci95([c - r for c, r in zip(crope, rope)])
    return f"| {label} | {mean_std(rope)} | {mean_std(crope)} | {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] |"


EXTRAPOLATION_VARIANTS = ("rope", "crope")
VARIANT_STYLES = {"rope": dict(ls="--", marker="s"), "crope": dict(ls="-", marker="o")}  # dashed RoPE, solid CRoPE


def baseline_checkpoints(baseline, seeds):
    """{(variant, seed): last.pt} of the RoPE and CRoPE runs of a 'study.py seeds' folder."""
    return {(v, s): baseline / f"seed{s}" / v / "last.pt" for v in EXTRAPOLATION_VARIANTS for s in seeds}


def load_baseline(checkpoints):
    """The checkpoints' models, the one context they were trained at, and their (tokenizer, data sha256)."""
    states = {key: load_checkpoint(path) for key, path in checkpoints.items()}
    models = {key: model_from_checkpoint(state) for key, state in states.items()}
    trained = {m.config.block_size for m in models.values()}
    kinds = {(state["settings"]["tokenizer"], state["settings"]["data_sha256"]) for state in states.values()}
    if len(trained) != 1 or len(kinds) != 1:
        fail("the baseline's runs differ in context, tokenizer or data: use runs of one setting")
    return models, trained.pop(), kinds.pop()


def validation_split(kind, data, longest):
    """The validation split of data (--data, CROPE_DATA or tiny Shakespeare) in the tokens of kind = (tokenizer,
    sha256 of the data the models were trained on), long enough for windows of longest tokens."""
    tokenizer, sha = kind
    _, val, _, data_sha = load_dataset(data_path(data), tokenizer, longest)
    if data_sha != sha:
        fail("the baseline was trained on other data than --data / CROPE_DATA gives")
    return val


def cmd_extrapolate(args, train_args):
    """Train at one context, evaluate at longer ones with every rope_scaling method (the ALiBi paper's
    protocol), and fine-tune briefly at a longer context with every method."""
    lengths, seeds = args.lengths, args.seeds
    checkpoints = baseline_checkpoints(args.baseline, seeds)
    base = settings.parse_args(train_args)
    models, trained, kind = load_baseline(checkpoints)
    if lengths[0] != trained or lengths != sorted(set(lengths)):
        fail(f"--lengths must rise from the context the baseline was trained at ({trained}), got {lengths}")
    if args.finetune_block <= trained:
        fail(f"--finetune_block must be above the context the baseline was trained at ({trained}), "
             f"got {args.finetune_block}")
    val = validation_split(kind, base.data, max(lengths + [2 * args.finetune_block]))
    tuned_lengths = (args.finetune_block, 2 * args.finetune_block)
    windows = {n: validation_windows(val, n, args.tokens) for n in dict.fromkeys(lengths + list(tuned_lengths))}

    curves = zero_shot_curves(models, lengths, windows)
    finetune = [*train_args, "--block_size", str(args.finetune_block), "--max_iters", str(args.finetune_iters),
                "--warmup_iters", "0", "--lr", str(args.finetune_lr), "--min_lr", str(base.min_lr)]
    tuned = finetuned_losses(checkpoints, finetune, args.out_dir, tuned_lengths, windows)

    text = extrapolation_tables(curves, tuned, seeds, lengths, tuned_lengths, args)
    write(args.out_dir, "study.md", text + "\n\n" + extension_cost(models["crope", seeds[0]], windows[lengths[-1]]))
    write_position_curves(curves, seeds, lengths[-1], args.out_dir / "positions.csv")
    extrapolation_plots(curves, seeds, lengths, lengths[0], args.out_dir)


def zero_shot_curves(models, lengths, windows):
    """{(method, length, variant, seed): loss at each position} of the trained models, every method at every
    length (at the trained length, lengths[0], all methods are the same model)."""
    curves = {}
    for (variant, seed), model in models.items():
        print(f"seed {seed} {variant}: evaluating at {', '.join(map(str, lengths))} tokens", flush=True)
        for method in ROPE_SCALINGS:
            for length in lengths:
                same = length == lengths[0] and method != "extrapolate"
                curves[method, length, variant, seed] = curves["extrapolate", length, variant, seed] if same else \
                    loss_per_position(at_length(model, length, method), *windows[length])
    return curves


def finetuned_losses(checkpoints, finetune_args, out_dir, lengths, windows):
    """{(method, length, variant, seed): mean loss} after fine-tuning every checkpoint with each of
    ROPE_SCALINGS (train_shakespeare.py with finetune_args, resumed where it stopped)."""
    losses = {}
    for method in ROPE_SCALINGS:
        out = out_dir / f"finetune_{method}"
        for (variant, seed), path in checkpoints.items():
            run_seeds(out, [seed], [variant], [*finetune_args, "--rope_scaling", method, "--init_from", str(path)])
            model = model_from_checkpoint(load_checkpoint(out / f"seed{seed}" / variant / "last.pt"))
            for length in lengths:
                losses[method, length, variant, seed] = loss_per_position(at_length(model, length, method),
                                                                          *windows[length]).mean().item()
    return losses


def extrapolation_tables(curves, tuned, seeds, lengths, tuned_lengths, args):
    """study.md's two tables: zero-shot by method and length, and after fine-tuning."""
    header = ["| method, length | RoPE | CRoPE | CRoPE - RoPE [95% CI] |", "|---|---|---|---|"]
    zero_shot = lambda method, length, variant: [curves[method, length, variant, s].mean().item() for s in seeds]
    lines = [f"Validation loss (nats per token) of the {len(seeds)} seeds' RoPE and CRoPE models trained at "
             f"{lengths[0]} tokens, on fixed validation windows of each length ({args.tokens} tokens per length), "
             "mean +- std over seeds, and the paired CRoPE - RoPE difference with its 95% interval.", "", *header,
             paired_row(f"any, {lengths[0]} (trained)",
                        *(zero_shot("extrapolate", lengths[0], v) for v in EXTRAPOLATION_VARIANTS))]
    lines += [paired_row(f"{method}, {length}", *(zero_shot(method, length, v) for v in EXTRAPOLATION_VARIANTS))
              for method in ROPE_SCALINGS for length in lengths[1:]]
    lines += ["", f"After fine-tuning {args.finetune_iters} iterations at {args.finetune_block} tokens (lr "
              f"{args.finetune_lr}), from the same models:", "", *header]
    lines += [paired_row(f"{method}, {length}", *([tuned[method, length, v, s] for s in seeds]
                                                  for v in EXTRAPOLATION_VARIANTS))
              for method in ROPE_SCALINGS for length in tuned_lengths]
    return "\n".join(lines)


def write_position_curves(curves, seeds, length, path):
    """positions.csv: the loss at each position of the longest windows, the data behind positions.png."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["method", "variant", "seed", *range(length)])
        for method in ROPE_SCALINGS:
            for variant in EXTRAPOLATION_VARIANTS:
                for seed in seeds:
                    curve = curves[method, length, variant, seed].tolist()
                    rows.writerow([method, variant, seed, *(f"{v:.5f}" for v in curve)])


def extension_cost(model, windows, reps=3):
    """Seconds to evaluate the windows with the model extended to their length, against a model built
    at that length with the same weights: what extension adds per forward (nothing, if the tables are
    built once)."""
    length = windows[0].size(1)
    extended = model.extend_context(length, "yarn")
    native = GPT(GPTConfig(**{**vars(model.config), "block_size": length, "trained_block_size": length}))
    native.load_state_dict(model.state_dict())
    times = {"extended": [], "native": []}
    for _ in range(reps):
        for name, m in (("extended", extended), ("native", native)):
            start = time.perf_counter()
            loss_per_position(m, *windows)
            times[name].append(time.perf_counter() - start)
    ext, nat = (statistics.median(times[k]) for k in ("extended", "native"))
    return (f"Cost of extension: evaluating {windows[0].size(0)} windows of {length} tokens takes {ext:.2f} s with "
            f"the model extended by yarn and {nat:.2f} s with a model built at {length} (median of {reps}, "
            f"ratio {ext / nat:.2f}).")


def extrapolation_plots(curves, seeds, lengths, trained, out_dir):
    """extrapolate.png: loss against length per method; positions.png: loss at each position of the
    longest windows, where extrapolation breaks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, method in enumerate(ROPE_SCALINGS):
        for variant, style in VARIANT_STYLES.items():
            values = torch.tensor([[curves[method, n, variant, s].mean().item() for n in lengths] for s in seeds])
            ax.errorbar(lengths, values.mean(0), yerr=values.std(0) if len(seeds) > 1 else None, color=f"C{i}",
                        capsize=3, label=f"{variant}, {method}", **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.axvline(trained, color="gray", lw=0.8)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("validation loss (mean +- std over seeds)")
    ax.set_title(f"trained at {trained} tokens: RoPE (dashed) and CRoPE (solid), by rope_scaling method")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "extrapolate.png", dpi=120)
    plt.close(fig)

    longest, bin_size = max(lengths), max(1, max(lengths) // 64)
    fig, axes = plt.subplots(1, len(ROPE_SCALINGS), figsize=(4 * len(ROPE_SCALINGS), 4.5), sharey=True)
    for ax, method in zip(axes, ROPE_SCALINGS):
        for variant, style in VARIANT_STYLES.items():
            curve = torch.stack([curves[method, longest, variant, s] for s in seeds]).mean(0)
            curve = curve[:len(curve) // bin_size * bin_size]
            binned = curve.view(-1, bin_size).mean(1)   # positions averaged in bins, for a readable line
            ax.plot(torch.arange(len(binned)) * bin_size + bin_size / 2, binned, ls=style["ls"], label=variant)
        ax.axvline(trained, color="gray", lw=0.8)
        ax.set_title(method)
        ax.set_xlabel("position")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"loss at each position (mean over windows and {len(seeds)} seeds)")
    axes[0].legend()
    fig.suptitle(f"windows of {longest} tokens, models trained at {trained}")
    fig.tight_layout()
    fig.savefig(out_dir / "positions.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- why CRoPE extrapolates better

RELIANCE_FACTORS = (1, 2, 4, 8)  # evaluation lengths, in multiples of the trained context
CHUNK_TOKENS = 4096              # tokens per forward pass when evaluating (GPT-2's logits are 50,257 wide)


def pair_wavelengths(config):
    """lambda_j = 2 pi / theta_j = 2 pi base^(2j/d): the distance over which pair j turns once."""
    return 2 * math.pi / rope_frequencies(config.head_size, config.rope_base)


def slow_pairs(config):
    """The pairs that never complete a turn within the trained context L (lambda_j > L), as a bool (head_size/2,):
    past L they reach angles the model never saw."""
    return pair_wavelengths(config) > config.trained_block_size


def causal_pair_products(qk, n_head):
    """Per pair j, the sum over windows, heads, queries m and keys n <= m of |q_mj| |k_nj|, and the number of
    (window, head, m, n) terms.

    qk: (B, T, 2C), one layer's query and key features (q's heads, then k's), pair j of a head being its
    features (2j, 2j+1). Rotating pair j by m theta_j keeps |q_mj|, so the features before the rotation serve.
    """
    B, T, _ = qk.shape
    q, k = qk.double().unflatten(-1, (2, n_head, -1, 2)).norm(dim=-1).unbind(2)   # (B, T, nh, hs/2) each
    products = (q * k.cumsum(1)).sum((0, 1, 2))            # sum_m |q_mj| sum_{n <= m} |k_nj|
    return products, B * n_head * T * (T + 1) // 2


@torch.no_grad()
def pair_reliance(model, x):
    """R (n_layer, head_size/2): R_lj is the mean of |q_mj| |k_nj| in layer l over the windows x (N, T), the heads
    and the causal query-key pairs n <= m. A score is q_m . k_n = sum_j Re(q_mj conj(k_nj) e^(i (m - n) theta_j))
    with the pairs read as complex numbers, so R_lj bounds what pair j adds to the scores, on average."""
    model.eval()
    n_embd, n_head = model.config.n_embd, model.config.n_head
    features = []   # each layer's q and k features, in layer order
    hooks = [block.attn.register_forward_pre_hook(lambda attn, inputs: features.append(attn.c_attn(inputs[0])))
             for block in model.transformer.h]
    sums, count = 0, 0
    try:
        for xs in x.split(max(1, CHUNK_TOKENS // x.size(1))):
            features.clear()
            model.features(xs)
            layers = [causal_pair_products(qkv[..., :2 * n_embd], n_head) for qkv in features]
            sums = sums + torch.stack([products for products, _ in layers])
            count += layers[0][1]
    finally:
        for hook in hooks:
            hook.remove()
    return sums / count


# How the study runs a trained model past its context: no scaling (angles as trained), the slow or the fast pairs
# zeroed (they add nothing to any score), or the slow pairs interpolated so that they turn less than once over the
# longer context, as in training, while the fast pairs turn as trained.
CONDITIONS = ("no scaling", "slow pairs zeroed", "fast pairs zeroed", "slow pairs interpolated")


def under_condition(extended, condition):
    """extended, a model run past its trained context L with no scaling, its rotary tables set to one of
    CONDITIONS (in place). Zeroing pair j zeroes its columns of the tables, so q_j = k_j = 0; interpolating the
    slow pairs sets theta_j -> theta_j / s for lambda_j > L, s = block_size / L, so that they turn at most by
    L theta_j < 2 pi, as in training."""
    config = extended.config
    slow = slow_pairs(config)
    kept = ~slow if condition == "slow pairs interpolated" else torch.ones_like(slow)
    theta = blend_frequencies(rope_frequencies(config.head_size, config.rope_base), config.context_scale,
                              kept.double())
    zeroed = {"slow pairs zeroed": slow, "fast pairs zeroed": ~slow}.get(condition, torch.zeros_like(slow))
    cos, sin = rotary_tables(config.block_size, theta)
    extended.rope_cos.copy_(cos.masked_fill(zeroed, 0))
    extended.rope_sin.copy_(sin.masked_fill(zeroed, 0))
    return extended


def condition_losses(model, windows):
    """{(condition, length): mean loss} of the model on windows {length: (x, y)}, under every one of CONDITIONS."""
    losses = {}
    for length, (x, y) in windows.items():
        extended = model.extend_context(length, "extrapolate")
        for condition in CONDITIONS:
            losses[condition, length] = loss_per_position(under_condition(extended, condition), x, y,
                                                          chunk=max(1, CHUNK_TOKENS // length)).mean().item()
    return losses


def loss_growth(losses, lengths, condition="no scaling"):
    """A model's loss at the longest of lengths minus its loss at the trained one (the first), from {(condition,
    length): loss}."""
    return losses[condition, lengths[-1]] - losses[condition, lengths[0]]


def pearson_ci95(x, y, groups=1):
    """Pearson's r of x and y with its 95% interval by Fisher's z: atanh r +- 1.96 / sqrt(n - 2 - groups), where
    groups counts the group means already taken out of x and y (1: none but the overall mean)."""
    r = statistics.correlation(x, y)
    if len(x) - 2 - groups < 1:
        return r, float("nan"), float("nan")
    half = 1.96 / math.sqrt(len(x) - 2 - groups)
    return r, math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


def within_groups(values, groups):
    """values minus the mean of their group: what is left once the groups differ by a constant."""
    means = {g: statistics.fmean(v for v, h in zip(values, groups) if h == g) for g in set(groups)}
    return [v - means[g] for v, g in zip(values, groups)]


def slow_share(shares, slow):
    """The share of a model's |q_j| |k_j| in the slow pairs: per layer (n_layer,), from shares (n_layer, hs/2)."""
    return shares[:, slow].sum(-1)


def cmd_pair_reliance(args, train_args):
    """Why does CRoPE extrapolate better? How much each trained model relies on each frequency pair, and what
    zeroing or interpolating the slow pairs (those that never turn once within the trained context) does past
    that context."""
    models, trained, kind = load_baseline(baseline_checkpoints(args.baseline, args.seeds))
    lengths = [f * trained for f in RELIANCE_FACTORS]
    val = validation_split(kind, args.data, lengths[-1])
    windows = {n: validation_windows(val, n, args.tokens) for n in lengths}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shares, losses = {}, {}
    for key, model in models.items():
        print(f"seed {key[1]} {key[0]}: pair reliance at {trained}, losses at {', '.join(map(str, lengths))}",
              flush=True)
        reliance = pair_reliance(model, windows[trained][0])
        shares[key] = reliance / reliance.sum(-1, keepdim=True)
        losses[key] = condition_losses(model, windows)
    config = next(iter(models.values())).config
    write_reliance_csv(shares, config, args.out_dir / "reliance.csv")
    text = reliance_tables(shares, losses, config, lengths, args)
    write(args.out_dir, "reliance.md", text)
    reliance_plot(shares, config, args.seeds, args.out_dir / "reliance.png")
    conditions_plot(shares, losses, config, args.seeds, lengths, args.out_dir / "conditions.png")


def write_reliance_csv(shares, config, path):
    """reliance.csv: every model's share of |q_j| |k_j| per layer and pair, the data behind reliance.png."""
    wavelengths = pair_wavelengths(config)
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["variant", "seed", "layer", "pair", "wavelength", "share"])
        for (variant, seed), share in shares.items():
            for layer, pair in itertools.product(range(share.size(0)), range(share.size(1))):
                rows.writerow([variant, seed, layer, pair, f"{wavelengths[pair]:.2f}", f"{share[layer, pair]:.6f}"])


def reliance_tables(shares, losses, config, lengths, args):
    """reliance.md: the slow pairs' share by layer, the losses under each condition, the loss growth, and how
    the growth goes with the slow pairs' share."""
    seeds, trained, longest = args.seeds, lengths[0], lengths[-1]
    slow = slow_pairs(config)

    def by_variant(value):   # [RoPE's values over seeds, CRoPE's], as paired_row takes them
        return [[value(v, s) for s in seeds] for v in EXTRAPOLATION_VARIANTS]

    header = ["| {} | RoPE | CRoPE | CRoPE - RoPE [95% CI] |", "|---|---|---|---|"]
    lines = [f"Models trained at L = {trained} tokens, {len(seeds)} seeds (head size {config.head_size}, base "
             f"{config.rope_base:g}): {int(slow.sum())} of {len(slow)} pairs are slow (wavelength above L: pairs "
             f"{slow.nonzero().min().item()}-{len(slow) - 1}). Mean +- std over seeds, and the paired CRoPE - RoPE "
             "difference with its 95% interval.", "",
             "Share of the mean |q_j| |k_j| (over windows, heads and causal query-key pairs) in the slow pairs:", "",
             header[0].format("layer"), header[1]]
    for layer in range(config.n_layer):
        lines.append(paired_row(str(layer), *by_variant(lambda v, s: slow_share(shares[v, s], slow)[layer].item())))
    lines.append(paired_row("mean", *by_variant(lambda v, s: slow_share(shares[v, s], slow).mean().item())))
    lines += ["", f"Validation loss with no scaling, some pairs zeroed, or the slow pairs interpolated "
              f"({args.tokens} tokens of fixed windows per length):", "", header[0].format("condition, length"),
              header[1]]
    lines += [paired_row(f"{condition}, {n}", *by_variant(lambda v, s: losses[v, s][condition, n]))
              for condition in CONDITIONS for n in lengths]

    lines += ["", f"Loss growth from {trained} to {longest} tokens (loss at {longest} - loss at {trained}):", "",
              header[0].format("condition"), header[1]]
    lines += [paired_row(condition, *by_variant(lambda v, s: loss_growth(losses[v, s], lengths, condition)))
              for condition in CONDITIONS]
    keys = list(itertools.product(EXTRAPOLATION_VARIANTS, seeds))
    share = [slow_share(shares[k], slow).mean().item() for k in keys]
    grown = [loss_growth(losses[k], lengths) for k in keys]
    variants = [v for v, _ in keys]
    r_all = pearson_ci95(share, grown)
    r_within = pearson_ci95(within_groups(share, variants), within_groups(grown, variants), groups=2)
    lines += ["", f"Loss growth to {longest} (no scaling) against the slow pairs' share (mean over layers), over "
              f"the {len(keys)} models: Pearson r = {r_all[0]:+.2f} [{r_all[1]:+.2f}, {r_all[2]:+.2f}]; within "
              f"variants (each variant's mean taken out): r = {r_within[0]:+.2f} [{r_within[1]:+.2f}, "
              f"{r_within[2]:+.2f}] (95% intervals by Fisher's z)."]
    return "\n".join(lines)


def reliance_plot(shares, config, seeds, path):
    """reliance.png: each pair's share of |q_j| |k_j| against its wavelength, one panel per layer, mean over seeds
    with its 95% interval, the trained context marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wavelengths = pair_wavelengths(config)
    fig, axes = plt.subplots(1, config.n_layer, figsize=(4 * config.n_layer, 4), sharey=True)
    for layer, ax in enumerate(axes):
        for i, variant in enumerate(EXTRAPOLATION_VARIANTS):
            values = torch.stack([shares[variant, s][layer] for s in seeds])   # (seeds, pairs)
            mean, half = zip(*(mean_ci95(column.tolist()) for column in values.T))
            mean, half = torch.tensor(mean), torch.tensor(half).nan_to_num()
            ax.plot(wavelengths, mean, "o-", ms=3, color=f"C{i}", label=variant)
            ax.fill_between(wavelengths, mean - half, mean + half, color=f"C{i}", alpha=0.25)
        ax.axvline(config.trained_block_size, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("wavelength 2 pi / theta_j (tokens)")
        ax.set_title(f"layer {layer}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of mean |q_j| |k_j|")
    axes[0].legend()
    fig.suptitle(f"How much each pair carries, {len(seeds)} seeds (95% intervals); dashed: the trained context "
                 f"{config.trained_block_size}, slow pairs to its right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def conditions_plot(shares, losses, config, seeds, lengths, path):
    """conditions.png: loss against length under each of CONDITIONS; and each model's loss growth to the longest
    length (no scaling) against its slow pairs' share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slow = slow_pairs(config)
    fig, (by_length, scatter) = plt.subplots(1, 2, figsize=(13, 5))
    for i, condition in enumerate(CONDITIONS):
        for variant, style in VARIANT_STYLES.items():
            values = torch.tensor([[losses[variant, s][condition, n] for n in lengths] for s in seeds])
            by_length.errorbar(lengths, values.mean(0), yerr=values.std(0) if len(seeds) > 1 else None,
                               color=f"C{i}", capsize=3, label=f"{variant}, {condition}", **style)
    for variant, style in VARIANT_STYLES.items():
        x = [slow_share(shares[variant, s], slow).mean().item() for s in seeds]
        y = [loss_growth(losses[variant, s], lengths) for s in seeds]
        scatter.plot(x, y, style["marker"], ms=7, label=variant)
    by_length.set_xscale("log", base=2)
    by_length.set_xticks(lengths, [str(n) for n in lengths])
    by_length.axvline(lengths[0], color="gray", lw=0.8)
    by_length.set_xlabel("evaluation length (tokens)")
    by_length.set_ylabel("validation loss (mean +- std over seeds)")
    by_length.legend(fontsize=8)
    scatter.set_xlabel("share of |q_j| |k_j| in the slow pairs (mean over layers)")
    scatter.set_ylabel(f"loss at {lengths[-1]} - loss at {lengths[0]}")
    scatter.legend()
    for ax in (by_length, scatter):
        ax.grid(alpha=0.3)
    fig.suptitle(f"trained at {lengths[0]} tokens: slow pairs zeroed or interpolated at evaluation, and loss "
                 "growth against the slow pairs' share")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def int_list(text):
    """A comma list of integers, as --seeds and --lengths take them."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers, such as 0,1,2") from None


def positive(kind):
    """An argparse type: a number of kind (int or float) above 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value
    return parse


def folder(text):
    """A folder flag's value as a Path (an empty one refused: it would mean the current folder)."""
    return Path(path_text(text))


def main(argv=None):
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                  allow_abbrev=False)  # so that a passed-through flag is never read as an abbreviation
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("seeds", "equal", "project", "extrapolate"):
        c = sub.add_parser(name, allow_abbrev=False)
        c.add_argument("--out_dir", type=folder, required=True)
        c.add_argument("--seeds", type=int_list, default=[0, 1, 2, 3, 4] if name == "extrapolate" else [0, 1, 2])
        if name != "seeds":
            c.add_argument("--baseline", type=folder, required=True,
                           help="a 'study.py seeds' folder with rope and crope runs of the same settings")
    sub.choices["seeds"].add_argument("--variants", type=variant_list, default="learned,rope,crope,crope_full")
    scaling = sub.add_parser("scaling", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                             description="RoPE and CRoPE paired over seeds, per configuration (other flags go to "
                             "train_shakespeare.py):\n" + "\n".join(
                                 f"  {name}: {' '.join(flags)}, {count} seeds" + (
                                     f", CRoPE widened to RoPE's parameters, RoPE: {EQUAL_PARAMETERS[name]}'s runs"
                                     if name in EQUAL_PARAMETERS else "") for name, (flags, count) in
                                 SCALING_GRID.items()))
    scaling.add_argument("--out_dir", type=folder, required=True)
    scaling.add_argument("--configs", type=comma_list(SCALING_GRID, "configuration"), default=SCALING_DEFAULT,
                         help=f"comma list of the configurations to train, in this order (default: "
                         f"{','.join(SCALING_DEFAULT)}; block512 and gpu only when named)")
    sub.choices["project"].add_argument("--finetune_iters", type=positive(int), default=500)
    sub.choices["project"].add_argument("--finetune_lr", type=positive(float), default=3e-4)
    extrapolate = sub.choices["extrapolate"]
    extrapolate.add_argument("--lengths", type=int_list, default=[64, 128, 256, 512],
                             help="evaluation lengths, increasing, the first the trained context")
    extrapolate.add_argument("--tokens", type=positive(int), default=32768, help="validation tokens per length")
    extrapolate.add_argument("--finetune_block", type=positive(int), default=128)
    extrapolate.add_argument("--finetune_iters", type=positive(int), default=200)
    extrapolate.add_argument("--finetune_lr", type=positive(float), default=3e-4)
    reliance = sub.add_parser("pair_reliance", allow_abbrev=False)
    reliance.add_argument("--out_dir", type=folder, required=True)
    reliance.add_argument("--baseline", type=folder, required=True,
                          help="a 'study.py seeds' folder with rope and crope runs of the same settings")
    reliance.add_argument("--seeds", type=int_list, default=[0, 1, 2, 3, 4])
    reliance.add_argument("--tokens", type=positive(int), default=32768, help="validation tokens per length")
    reliance.add_argument("--data", type=path_text, help="the text the baseline was trained on (default: CROPE_DATA "
                          "or tiny Shakespeare)")
    energy = sub.add_parser("energy", allow_abbrev=False)
    energy.add_argument("checkpoints", nargs="+", type=path_text, help="trained RoPE checkpoints")
    energy.add_argument("--out_dir", type=folder, required=True)
    args, train_args = p.parse_known_args(argv)
    if args.command in ("energy", "pair_reliance") and train_args:
        fail(f"{args.command} reads checkpoints and trains nothing: unknown arguments {' '.join(train_args)}")
    if gives(train_args, "--seed"):
        fail("study.py sets every run's seed from --seeds: pass --seeds 3, not --seed 3")
    commands = {"seeds": cmd_seeds, "equal": cmd_equal, "energy": cmd_energy, "project": cmd_project,
                "extrapolate": cmd_extrapolate, "pair_reliance": cmd_pair_reliance, "scaling": cmd_scaling}
    with output_folder(args.out_dir):
        commands[args.command](args, train_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
