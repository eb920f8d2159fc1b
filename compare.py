"""
Compare the runs of a folder: compare.png (validation and training loss against iterations and against wall
seconds) and summary.md (parameters, best and final validation loss, time and tokens/s of each run), read from
the runs' log.csv and last.pt. train_shakespeare.py writes both after training; this script writes them again.

    python compare.py out/cpu
"""

import csv
import logging
import sys
from pathlib import Path

from cli import ArgParser, fail, meta_model
from crope import GPTConfig
from runs import load_checkpoint, read_log, write_atomically

log = logging.getLogger("crope")


def read_run(out_dir, variant):
    """A run's (config, settings, parameter report, training and validation points (iter, wall seconds, loss),
    wall seconds, tokens); ValueError says why its log.csv cannot be summarised."""
    state = load_checkpoint(out_dir / variant / "last.pt")
    config = GPTConfig(**state["model_config"])
    try:
        entries = read_log(out_dir / variant / "log.csv")
        points = {column: [(int(r["iter"]), float(r["wall_seconds"]), float(r[column])) for r in entries
                           if r[column]] for column in ("train_loss", "val_loss")}
        wall, tokens = float(entries[-1]["wall_seconds"]), int(entries[-1]["tokens"])
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"not a readable training log ({e.__class__.__name__})") from None
    if not points["val_loss"]:
        raise ValueError("no validation loss yet")
    return config, state["settings"], meta_model(config).param_report(), points, wall, tokens


def compare_runs(out_dir, first=()):
    """Write compare.png and summary.md of every run in out_dir (a subfolder with log.csv and last.pt): the
    runs named in first, then the others by name; a run whose log cannot be summarised is left out, with a line.
    Both files are written atomically. Returns summary.md's table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    found = sorted(p.parent.name for p in out_dir.glob("*/log.csv") if (p.parent / "last.pt").exists())
    runs = {}
    for variant in [v for v in dict.fromkeys([*first, *found]) if v in found]:
        try:
            runs[variant] = read_run(out_dir, variant)
        except ValueError as e:
            log.warning("%s: %s; left out of the comparison", out_dir / variant / "log.csv", e)
    if not runs:
        fail(f"no runs to compare in {out_dir}: no subfolder with last.pt and a log.csv with a validation loss")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    rows = ["| variant | params | attention params | QKV params | best val loss | final val loss | "
            "time (s) | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for i, (variant, (config, settings, report, points, wall, tokens)) in enumerate(runs.items()):
        label = f"{variant} ({report['total'] / 1e6:.2f}M params, attention {report['attention'] / 1e6:.2f}M)"
        train, val = points["train_loss"], points["val_loss"]
        for ax, column in zip(axes, (0, 1)):
            ax.plot([t[column] for t in train], [t[2] for t in train], color=f"C{i}", alpha=0.35, lw=1)
            ax.plot([t[column] for t in val], [t[2] for t in val], "o-", color=f"C{i}", label=label, ms=3)
        speed = f"{tokens / wall:,.0f}" if wall > 0 else "-"
        rows.append(f"| {variant} | {report['total']:,} | {report['attention']:,} | {report['qkv']:,} | "
                    f"{min(v[2] for v in val):.4f} | {val[-1][2]:.4f} | {wall:.1f} | {speed} |")
    for ax, xlabel in zip(axes, ("iteration", "wall seconds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="validation (dots), training (thin)")
    fig.suptitle(f"{config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, block {config.block_size}, "
                 f"batch {settings['batch_size']}, {settings['tokenizer']} tokens")
    fig.tight_layout()
    again = f"run python compare.py {out_dir}"  # the runs themselves are never touched here
    write_atomically(out_dir / "compare.png", lambda f: fig.savefig(f, format="png", dpi=120), then=again)
    plt.close(fig)
    summary = "\n".join(rows)
    write_atomically(out_dir / "summary.md", lambda f: f.write((summary + "\n").encode()), then=again)
    return summary


def main(argv=None):
    p = ArgParser(description=__doc__)
    p.add_argument("out_dir", help="a folder of runs, as train_shakespeare.py's --out_dir")
    args = p.parse_args(argv)
    print(compare_runs(args.out_dir))
    print(f"\nwrote {Path(args.out_dir) / 'compare.png'} and {Path(args.out_dir) / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
