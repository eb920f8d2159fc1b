"""
What a training run leaves on disk, and how to read it back:

    checkpoints      last.pt and best.pt (with the tokenizer's state, data.Tokenizer): written atomically, read
                     back checked whole (load_checkpoint)
    the log          log.csv: one row per logged iteration (CsvLog, read_log)
    the folder       out_dir/<variant>/: made (output_folder) and held by one run at a time (FolderLock)

train_shakespeare.py writes these files; sample.py, study.py and compare.py read them. Nothing here trains.
"""

import contextlib
import csv
import dataclasses
import errno
import io
import logging
import os
import warnings
from pathlib import Path

import torch

from cli import fail, meta_model
from crope import GPT, GPTConfig
from data import tokenizer_problem

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("crope")


# ----------------------------------------------------------------------------- checkpoints

# what train_shakespeare.py saves; sample.py reads model, model_config and tokenizer, --resume all of it
# former names of the rope_scaling methods, which older checkpoints may hold: load_checkpoint reads them as the new
RENAMED_ROPE_SCALINGS = {"none": "extrapolate"}
CHECKPOINT_KEYS = {"model", "optimizer", "model_config", "settings", "variant", "tokenizer", "iter", "best_val_loss",
                   "wall_seconds"}


def write_atomically(path, write, then=None):
    """Write a file through a temporary one that then replaces it: a kill or a full disk mid-write leaves the
    previous version. write(f) writes the content into a binary file; a failed write stops with one line, which
    ends with then (default: continue with --resume, or run the command again where there was no file)."""
    tmp = path.with_suffix(".tmp")
    existed = path.exists()
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if existed:
            cannot_write(path, e, "its previous version is intact", then or "continue with --resume")
        cannot_write(path, e, "nothing was written there", then or "run the command again")
    finally:
        with contextlib.suppress(OSError):  # a folder that cannot be written has no tmp to remove either
            tmp.unlink(missing_ok=True)  # left only by a write that failed


def cannot_write(path, error, kept, then):
    """Stop with one line at a write that failed (a full disk, say): which file, why, what is intact, and
    what to do."""
    reason, fix = ("the disk is full", "make room") if error.errno == errno.ENOSPC else \
        (error.strerror or str(error), "fix that")
    fail(f"could not write {path}: {reason}; {kept}: {fix}, then {then}")


def save_checkpoint(path, state):
    def write(f):
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch reports a failed write (a full disk) as its own error, the OSError inside
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    write_atomically(path, write)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint's dict (a run folder means its best.pt), checked whole, or one clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        fail(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch's warnings about other pickle protocols: the outcome is below
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
        reason = "" if isinstance(state, dict) and CHECKPOINT_KEYS <= state.keys() else "keys missing"
    except Exception as e:
        reason = e.__class__.__name__
    if reason:
        fail(f"{path} is not a readable crope checkpoint ({reason}); it may be truncated or from another program")
    config = state["model_config"]
    if isinstance(config, dict) and config.get("rope_scaling") in RENAMED_ROPE_SCALINGS:
        config["rope_scaling"] = RENAMED_ROPE_SCALINGS[config["rope_scaling"]]  # the one place former names map
    problem = checkpoint_problem(state)
    if problem:
        fail(f"{path} is not a consistent crope checkpoint: {problem}; use one that train_shakespeare.py wrote")
    if not all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point()):
        fail(f"{path} holds weights that are not finite (its training diverged before it was saved): "
             "use an earlier checkpoint, or train again with a lower --lr")
    return state


def checkpoint_problem(state):
    """Why the parts of a checkpoint disagree (model_config, the weights' names and shapes, the tokenizer, the
    training state), or None."""
    problem = model_config_problem(state["model_config"])
    if problem:
        return problem
    config = GPTConfig(**state["model_config"])
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        return "its model is not a dict of tensors"
    layers = {str(name).split(".")[2] for name in weights if str(name).startswith("transformer.h.")}
    if len(layers) != config.n_layer:  # checked before a model of that depth is built, even on the meta device
        return f"its model_config has n_layer {config.n_layer}, its weights {len(layers)} layers"
    shapes = {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}
    stray = sorted(weights.keys() ^ shapes.keys(), key=str)
    if stray:
        return f"weight {stray[0]} is {'missing' if stray[0] in shapes else 'not in the model of its model_config'}"
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != shape:
            return f"weight {name} has shape {tuple(weights[name].shape)}, its model_config needs {shape}"
    problem = tokenizer_problem(state["tokenizer"], config.vocab_size)
    if problem:
        return problem
    kinds = dict(optimizer=dict, settings=dict, variant=str, iter=int, best_val_loss=float, wall_seconds=float)
    for key, kind in kinds.items():
        if not isinstance(state[key], kind | int if kind is float else kind):
            return f"its {key} is not of type {kind.__name__}"
    return optimizer_problem(state["optimizer"], len(list(meta_model(config).parameters())))


def optimizer_problem(optimizer, n_parameters):
    """Why a saved AdamW state cannot be the optimizer of a model of n_parameters parameters, or None."""
    groups = optimizer.get("param_groups")
    if not isinstance(optimizer.get("state"), dict) or not isinstance(groups, list) or not groups or \
            not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        return "its optimizer state has no parameter groups"
    held = sum(len(g["params"]) for g in groups)
    return None if held == n_parameters else f"its optimizer holds {held} parameters, its model {n_parameters}"


def model_config_problem(config):
    """Why a saved model_config is not a GPTConfig (an unknown field, a value of the wrong type, a value
    GPTConfig refuses), or None."""
    if not isinstance(config, dict):
        return "its model_config is not a dict"
    types = {f.name: f.type for f in dataclasses.fields(GPTConfig)}
    unknown = [str(name) for name in config if name not in types]
    if unknown:
        return f"model_config has unknown fields {', '.join(sorted(unknown))}"
    for name, value in config.items():
        kind = float | int if types[name] is float else types[name]  # an integer is a float too
        if not isinstance(value, kind) or (isinstance(value, bool) and types[name] is not bool):
            type_name = getattr(types[name], "__name__", types[name])
            return f"model_config {name} {value!r:.40} is not of type {type_name}"
    try:
        GPTConfig(**config)
    except ValueError as e:
        return f"model_config: {e}"
    return None


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
        """Start the log with rows (those a resumed run keeps), written atomically, so a kill never loses them."""
        self.path = path
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomically(path, lambda f: f.write(text.getvalue().encode()))

    def write(self, **row):
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, LOG_COLUMNS).writerow(row)
        except OSError as e:
            cannot_write(self.path, e, "the checkpoints are intact", "continue with --resume")


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


@contextlib.contextmanager
def output_folder(path, flag="--out_dir"):
    """make_folder for the length of a command that writes into path: a folder it creates that is still empty
    when the command ends (it was refused) is removed again, so a refused command leaves no trace."""
    new = not path.exists()
    make_folder(path, flag)
    try:
        yield path
    finally:
        if new and not any(path.iterdir()):
            path.rmdir()


class FolderLock:
    """One writer per run folder, as a context manager: an operating-system lock (flock) on the folder's
    run.lock, a file that also holds the writer's pid for the message. Taking it is one atomic call, and the
    OS releases it when its holder ends, however it ends, so the lock of a killed run is free at once.
    Windows has no flock: there run.lock is created exclusively, and one left by a killed run is deleted by
    hand, as the message says."""

    def __init__(self, folder):
        self.folder, self.path = folder, Path(folder) / "run.lock"

    def __enter__(self):
        while True:
            try:
                self.file = open(self.path, "a+" if fcntl else "x")
            except FileExistsError:  # Windows: another run's lock, or a killed one's
                self.refuse()
            except OSError as e:
                fail(f"cannot use {self.path} as the run's lock ({e.strerror or e}): remove it")
            if fcntl is None:
                break
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.close()
                self.refuse()
            if is_same_file(self.file, self.path):
                break
            self.file.close()  # its holder deleted it as it let go (see __exit__): lock the file there now
        try:
            self.file.truncate(0)
            self.file.write(str(os.getpid()))
            self.file.flush()
        except OSError as e:  # a full disk: let go of the lock and leave no lock file behind
            with contextlib.suppress(OSError):  # closing flushes again, and fails again
                self.file.close()
            self.path.unlink(missing_ok=True)
            cannot_write(self.path, e, "nothing was started", "run the command again")
        return self

    def refuse(self):
        try:
            owner = f" (process {int(self.path.read_text())})"
        except (OSError, ValueError):  # gone, or not yet written
            owner = ""
        stale = "" if fcntl else f" (if no run uses it, delete {self.path})"
        fail(f"{self.folder} is in use by another run{owner}: wait for it to end or choose another --out_dir{stale}")

    def __exit__(self, *exc):
        if fcntl is None:  # Windows deletes no open file
            self.file.close()
        self.path.unlink(missing_ok=True)  # while still locked: whoever opened it meanwhile sees it replaced
        self.file.close()


def is_same_file(file, path):
    """Whether path still names the open file."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False
