"""What runs.py promises under stress: one run at a time per folder, however many start at once."""

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

import runs
from conftest import error_line

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
