"""What runs.py promises under stress: one run at a time per folder however many start at once, a full disk
told in one line with the previous checkpoint intact, and memory estimates that refuse absurd sizes at once."""

import argparse
import errno
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import cli
import data
import runs
import sample
import train_shakespeare as ts
from conftest import SMALL, error_line, losses
from crope import GPT, GPTConfig
import settings
from settings import PRESETS

ROUNDS, CONTENDERS = 200, 4


def take_the_lock_each_round(rank, folder, dead_pid, start, holders, most, held):
    """One contender: every round, with the others at once, take the folder's lock over from a dead run,
    hold it a moment, and count how many hold it together."""
    for round_ in range(ROUNDS):
        if rank == 0:  # a lock file left by a run that was killed
            (folder / "run.lock").write_text(str(dead_pid))
        start.wait()
        try:
            with runs.FolderLock(folder):
                with holders.get_lock():
                    holders.value += 1
                    most.value = max(most.value, holders.value)
                held[round_] += 1
                time.sleep(0.01)
                with holders.get_lock():
                    holders.value -= 1
        except SystemExit as e:
            assert "is in use by another run" in str(e), e
        start.wait()


@pytest.mark.skipif(runs.fcntl is None, reason="Windows: run.lock is created exclusively, no takeover")
def test_several_runs_taking_over_a_dead_runs_lock_at_once_never_hold_it_together(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    context = multiprocessing.get_context("fork")
    start = context.Barrier(CONTENDERS)
    holders, most, held = context.Value("i", 0), context.Value("i", 0), context.Array("i", ROUNDS)
    contenders = [context.Process(target=take_the_lock_each_round,
                                  args=(rank, tmp_path, dead.pid, start, holders, most, held))
                  for rank in range(CONTENDERS)]
    for process in contenders:
        process.start()
    for process in contenders:
        process.join(timeout=120)
    assert [process.exitcode for process in contenders] == [0] * CONTENDERS
    assert most.value == 1                      # never two at once
    assert min(held) >= 1                       # and every round one took it over
    assert not (tmp_path / "run.lock").exists()


def test_a_lock_held_by_a_live_run_is_refused_and_released_when_it_ends(tmp_path):
    with runs.FolderLock(tmp_path):
        with pytest.raises(SystemExit) as excinfo:
            runs.FolderLock(tmp_path).__enter__()
        assert "is in use by another run" in error_line(excinfo)
    with runs.FolderLock(tmp_path):
        assert (tmp_path / "run.lock").read_text() == str(os.getpid())


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "the disk is full"), (errno.EIO, "Input/output error")])
def test_a_failed_checkpoint_write_is_one_line_and_the_run_resumes(code, reason, tmp_path, text_file, full_run,
                                                                    monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    saved = {name: (run / "crope" / name).read_bytes() for name in ("last.pt", "best.pt")}

    def write_fails_halfway(state, f):
        f.write(b"half a checkpoint")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(runs.torch, "save", write_fails_halfway)
    resume = [*SMALL, "--data", str(text_file), "--out_dir", str(run), "--variants", "crope", "--resume",
              "--max_iters", "50"]
    with pytest.raises(SystemExit) as excinfo:
        ts.main(resume)
    message = error_line(excinfo)
    assert f"could not write {run / 'crope'}" in message and f"{reason}; its previous version is intact" in message
    assert {name: (run / "crope" / name).read_bytes() for name in saved} == saved
    assert not list(run.rglob("*.tmp"))
    monkeypatch.undo()
    assert ts.main(resume) == 0
    assert {k: v for k, v in losses(run / "crope").items() if k < 40} == losses(full_run / "crope")


def saved_for_backward(config, batch_size):
    """Bytes of the tensors autograd keeps for the backward of one training step (weights left out)."""
    torch.manual_seed(0)
    model = GPT(config)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(config.vocab_size, (batch_size, config.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(kept.values())


@pytest.mark.parametrize("preset, pos", [("cpu", "crope"), ("cpu", "rope"), ("cpu", "learned")])
def test_the_training_estimate_covers_what_a_step_keeps(preset, pos):
    settings = PRESETS[preset]
    config = GPTConfig(vocab_size=65, pos=pos, **{k: settings[k] for k in ("n_layer", "n_head", "n_embd",
                                                                           "block_size")})
    estimate = cli.training_bytes(config, settings["batch_size"], 1, 0)
    measured = saved_for_backward(config, settings["batch_size"]) + 16 * cli.parameter_count(config)
    assert measured <= estimate <= 1.5 * measured, (measured, estimate)


def test_the_parameter_count_is_the_models():
    for pos in ("learned", "rope", "crope"):
        config = GPTConfig(vocab_size=65, block_size=64, n_layer=5, n_head=4, n_embd=64, pos=pos)
        assert cli.parameter_count(config) == sum(p.numel() for p in GPT(config).parameters())


def test_the_presets_fit_and_absurd_sizes_are_refused_at_once(text_file):
    cpu = argparse.Namespace(world=1, device=torch.device("cpu"))
    args = settings.parse_args(["--preset", "cpu"])
    ts.check_training_memory(args, 65, cpu)   # the laptop preset: about 0.1 GB
    assert cli.training_bytes(ts.model_config(args, "crope", 65), args.batch_size, 1, args.eval_iters) < 0.2e9
    for flag, value in [("--n_layer", "1000000"), ("--batch_size", "10000000000"), ("--block_size", "100000000")]:
        args = settings.parse_args([*SMALL, flag, value])
        start = time.perf_counter()
        with pytest.raises(SystemExit) as excinfo:
            ts.check_training_memory(args, 65, cpu)
        assert time.perf_counter() - start < 0.5 and "needs about" in error_line(excinfo)
    config = GPTConfig(vocab_size=65, block_size=64)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as excinfo:
        sample.check_generation_memory(config, sample.parse_args(["x", "--num_samples", "1000000000"]), 1,
                                       torch.device("cpu"))
    assert time.perf_counter() - start < 0.5 and "needs about" in error_line(excinfo)


def test_ctrl_c_while_tiktoken_loads_stops_and_is_not_reported_as_a_tiktoken_error(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def interrupted(name):   # what Python before 3.12 raises when Ctrl-C lands in a class's __set_name__
        raise RuntimeError("Error calling __set_name__") from SystemExit("stopped by Ctrl-C")
    monkeypatch.setattr(tiktoken, "get_encoding", interrupted)
    with pytest.raises(SystemExit, match="stopped by Ctrl-C"):
        data.Tokenizer("gpt2")


class FullDisk:
    """A file of the real filesystem whose writes fail once `room` bytes are written, as on a full disk."""

    def __init__(self, path, mode, room):
        self.file, self.room = open(path, mode), room

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name):  # fileno, flush, truncate, close, ...
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_during_torch_save_is_one_line(tmp_path, monkeypatch):
    """torch.save reports the failed write as its own RuntimeError ('unexpected pos'); the line names the disk."""
    path = tmp_path / "last.pt"
    monkeypatch.setattr(runs, "open", lambda p, mode: FullDisk(p, mode, room=2000), raising=False)
    with pytest.raises(SystemExit) as excinfo:
        runs.save_checkpoint(path, {"weights": torch.zeros(10_000)})
    assert error_line(excinfo) == (f"error: could not write {path}: the disk is full; nothing was written there: "
                                   "make room, then run the command again")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_taking_the_lock_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "open", lambda p, mode: FullDisk(p, mode, room=0), raising=False)
    with pytest.raises(SystemExit) as excinfo:
        with runs.FolderLock(tmp_path):
            pytest.fail("the lock was taken")
    assert error_line(excinfo) == (f"error: could not write {tmp_path / 'run.lock'}: the disk is full; nothing was "
                                   "started: make room, then run the command again")
    assert not (tmp_path / "run.lock").exists()
