"""What the tests of the tools share: a small text, a tiny model's flags, and one finished run."""

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_shakespeare as ts  # noqa: E402  (after the path above)

# a tiny model that trains in seconds on a CPU
SMALL = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
         "--eval_interval", "10", "--eval_iters", "4", "--log_interval", "1", "--warmup_iters", "5"]


def train(out_dir, text_file, *extra):
    return ts.main([*SMALL, "--data", str(text_file), "--out_dir", str(out_dir), *extra])


def losses(run_dir, column="train_loss"):
    with open(Path(run_dir) / "log.csv", newline="") as f:
        return {int(r["iter"]): float(r[column]) for r in csv.DictReader(f) if r[column]}


def error_line(excinfo):
    """The one line a refused input stops with."""
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small text with structure a model can learn quickly (about 30 kB)."""
    lines = [f"{name} {verb} the {thing}.\n" for name in ("ROMEO", "JULIET", "HAMLET", "OTHELLO")
             for verb in ("loves", "sees", "fears") for thing in ("sun", "moon", "night", "sword", "crown")]
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text("".join(lines) * 16, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, text_file):
    """40 iterations of crope and rope, uninterrupted: the reference for resume and torchrun."""
    out = tmp_path_factory.mktemp("full")
    assert train(out, text_file, "--max_iters", "40", "--variants", "crope,rope") == 0
    return out
