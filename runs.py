"""
What a training run leaves on disk, and how to read it back: checkpoints, the tokenizer, log.csv.

train_shakespeare.py writes these files; sample.py and study.py read them. Nothing here trains, so
sampling needs only this file, crope.py and fused_op.py.
"""

import argparse
import csv
import logging
import os
import time
from pathlib import Path

import torch

from crope import RENAMED_ROPE_SCALINGS, GPT, GPTConfig

log = logging.getLogger("crope")


def fail(message):
    """Stop with one clear line (no traceback): for bad input, not for bugs."""
    raise SystemExit(f"error: {message}")


class ArgParser(argparse.ArgumentParser):
    """argparse's parser, with a bad flag reported as one line, like every other bad input."""

    def error(self, message):
        fail(message)


def resolve_device(name):
    """"auto" (CUDA, then MPS, then the CPU) or a device name that exists here, as a torch.device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    missing_gpu = device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
    if not available.get(device.type, False) or missing_gpu:
        fail(f"--device {name} is not available on this machine")
    return device


def check_memory(need, device, what, advice):
    """Refuse, in one line, what needs more bytes than the device has (a GPU's memory, or this machine's
    for the CPU), before anything is allocated."""
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if need > have:
        fail(f"{what} needs about {need / 1e9:,.1f} GB, more than the {have / 1e9:,.1f} GB of {device}: {advice}")


class Tokenizer:
    """Characters (the vocabulary is the text's sorted set of characters) or GPT-2 BPE (tiktoken)."""

    def __init__(self, kind, chars=None):
        self.kind, self.chars = kind, chars
        if kind == "char":
            self.stoi = {c: i for i, c in enumerate(chars)}
            self.vocab_size = len(chars)
        else:
            try:
                import tiktoken
                self.bpe = tiktoken.get_encoding("gpt2")
            except Exception as e:  # missing package, or no network and no TIKTOKEN_CACHE_DIR
                fail(f"could not load tiktoken's gpt2 encoding ({e.__class__.__name__}: {e}); "
                     "pip install tiktoken, and offline set TIKTOKEN_CACHE_DIR to a folder with its cache files")
            self.vocab_size = self.bpe.n_vocab

    @classmethod
    def for_text(cls, kind, text):
        return cls(kind, "".join(sorted(set(text))) if kind == "char" else None)

    def state(self):
        return {"kind": self.kind, "chars": self.chars}

    def encode(self, text):
        if self.kind == "gpt2":
            return self.bpe.encode_ordinary(text)
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            fail(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return self.bpe.decode(ids) if self.kind == "gpt2" else "".join(self.chars[i] for i in ids)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint's dict (a run folder means its best.pt), or one clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        fail(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        reason = "" if isinstance(state, dict) and {"model_config", "model", "tokenizer"} <= state.keys() \
            else "keys missing"
    except Exception as e:
        reason = e.__class__.__name__
    if reason:
        fail(f"{path} is not a readable crope checkpoint ({reason}); it may be truncated or from another program")
    scaling = state["model_config"].get("rope_scaling")
    if scaling in RENAMED_ROPE_SCALINGS:  # the one place where a method's former name maps to its name
        state["model_config"]["rope_scaling"] = RENAMED_ROPE_SCALINGS[scaling]
    if not all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point()):
        fail(f"{path} holds weights that are not finite (its training diverged before it was saved): "
             "use an earlier checkpoint, or train again with a lower --lr")
    return state


def model_from_checkpoint(state):
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model


# ----------------------------------------------------------------------------- the training log

LOG_COLUMNS = ("iter", "train_loss", "val_loss", "lr", "tokens", "wall_seconds")


def kept_log_rows(path, before_iter):
    """The rows of a resumed run's log.csv before before_iter (the later ones are run again), or one clear
    error; a missing log is a warning, and the new one starts at before_iter."""
    if not path.exists():
        log.warning("%s was missing: the new log starts at iteration %d", path, before_iter)
        return []
    try:
        return [r for r in read_log(path) if int(r["iter"]) < before_iter]
    except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as e:
        fail(f"{path} is not a readable training log ({e.__class__.__name__}): move it aside to resume "
             f"with a new log that starts at iteration {before_iter}")


class CsvLog:
    """log.csv of one run: one row per logged iteration."""

    def __init__(self, path, rows):
        """Start the log with rows (those a resumed run keeps). They go to a temporary file that then
        replaces the log, so a kill never loses them."""
        self.path = path
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def write(self, **row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow(row)


def read_log(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- the run folder

def make_folder(path, flag="--out_dir"):
    """Create a folder for a run's files (and its parents), or stop with one line that says why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        fail(f"cannot write into {flag} {path}: {e.strerror or e}")


class FolderLock:
    """One writer per run folder: a lock file created with O_EXCL that holds the writer's pid.
    A lock left by a process that no longer runs (killed, say) is taken over."""

    def __init__(self, folder):
        self.path = Path(folder) / "run.lock"
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                owner = self.owner()
                if owner is None and self.age() < 2:  # its writer created it this instant: look again
                    time.sleep(0.1)
                    continue
                if owner is not None and process_exists(owner):
                    fail(f"{folder} is in use by another run (process {owner}): wait for it to end or choose "
                         f"another --out_dir (if no run uses it, delete {self.path})")
                if self.owner() == owner:  # still the dead owner's lock: take it over
                    self.path.unlink(missing_ok=True)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))

    def owner(self):
        try:
            return int(self.path.read_text())
        except (OSError, ValueError):  # gone, or not yet written
            return None

    def age(self):
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def release(self):
        if self.owner() == os.getpid():
            self.path.unlink(missing_ok=True)


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
