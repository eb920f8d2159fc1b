"""
The text to train on: tiny Shakespeare (downloaded once, its sha256 checked on every use) or any UTF-8 file, its
tokens (characters or GPT-2 BPE: Tokenizer, whose state every checkpoint holds), the 90/10 split into train and
validation like nanoGPT's, and the random windows a batch is made of.
"""

import contextlib
import hashlib
import logging
import os
import urllib.request
from pathlib import Path

import torch

from cli import fail

log = logging.getLogger("crope")

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"
VAL_SEED = 20260127  # validation batches are the same for every variant, seed and run


@contextlib.contextmanager
def loading_tiktoken(what):
    """Wraps code that loads what from tiktoken: a failure (missing package, or no network and no
    TIKTOKEN_CACHE_DIR) is one line that says how to get it."""
    try:
        yield
    except Exception as e:
        if isinstance(e.__cause__, (KeyboardInterrupt, SystemExit)):
            raise e.__cause__   # Ctrl-C while tiktoken's classes were built (wrapped so before Python 3.12)
        fail(f"could not load {what} ({e.__class__.__name__}: {e}); pip install tiktoken, and offline set "
             "TIKTOKEN_CACHE_DIR to a folder with its cache files")


class Tokenizer:
    """Characters (the vocabulary is the text's sorted set of characters) or GPT-2 BPE (tiktoken)."""

    def __init__(self, kind, chars=None):
        self.kind, self.chars = kind, chars
        if kind == "char":
            self.stoi = {c: i for i, c in enumerate(chars)}
            self.vocab_size = len(chars)
        else:
            with loading_tiktoken("tiktoken's gpt2 encoding"):
                import tiktoken
                self.bpe = tiktoken.get_encoding("gpt2")
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


GPT2_VOCAB_SIZE = 50257  # tiktoken's gpt2 encoding: 256 bytes, 50,000 merges and <|endoftext|>


def tokenizer_problem(state, vocab_size):
    """Why a saved tokenizer state cannot serve a model of vocab_size tokens, or None."""
    if not isinstance(state, dict) or state.keys() != {"kind", "chars"}:
        return "its tokenizer is not a dict of kind and chars"
    kind, chars = state["kind"], state["chars"]
    if kind == "gpt2":
        return None if vocab_size == GPT2_VOCAB_SIZE else \
            f"a gpt2 tokenizer has {GPT2_VOCAB_SIZE} tokens, its model_config vocab_size {vocab_size}"
    if kind != "char":
        return f"unknown tokenizer kind {kind!r:.40}"
    if not isinstance(chars, str) or len(set(chars)) != len(chars) or len(chars) != vocab_size:
        return f"its character tokenizer does not hold {vocab_size} distinct characters (its vocab_size)"
    return None


def fetch_shakespeare(path=DEFAULT_DATA, url=SHAKESPEARE_URL):
    """The tiny Shakespeare file, downloaded once, checked against its sha256 and cached at path."""
    path = Path(path)
    if not path.exists():
        log.info("downloading tiny Shakespeare from %s", url)
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                content = response.read()
        except OSError as e:
            fail(f"could not download tiny Shakespeare ({e}); without internet, put the file "
                 f"(char-rnn's data/tinyshakespeare/input.txt) at {path}, or pass --data PATH or set CROPE_DATA")
        if hashlib.sha256(content).hexdigest() != SHAKESPEARE_SHA256:
            fail(f"the file downloaded from {url} has the wrong sha256; nothing was saved")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    elif hashlib.sha256(path.read_bytes()).hexdigest() != SHAKESPEARE_SHA256:
        fail(f"{path} is not tiny Shakespeare (sha256 mismatch); delete it to download it again")
    return path


def read_text(path):
    """(text, sha256 of the file) of a non-empty UTF-8 file (as data_path found it), or one clear error."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not text.strip():
        fail(f"{path} is empty: the data file must hold text to train on")
    return text, hashlib.sha256(raw).hexdigest()


def data_path(given):
    """The text to train on: --data, else CROPE_DATA, else tiny Shakespeare (downloaded once); one clear error
    if there is no such file."""
    path = Path(given or os.environ.get("CROPE_DATA") or fetch_shakespeare()).resolve()
    if not path.is_file():
        fail(f"no data file at {path}: pass --data with a UTF-8 text file")
    return str(path)


def load_dataset(path, tokenizer_kind, block_size):
    """The text at path tokenized ("char" or "gpt2") and split 90/10 into train and validation token ids, like
    nanoGPT's; also the tokenizer and the file's sha256."""
    text, data_sha256 = read_text(path)
    tokenizer = Tokenizer.for_text(tokenizer_kind, text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = int(0.9 * len(ids))
    train, val = ids[:n], ids[n:]
    if len(val) <= block_size:
        fail(f"--block_size {block_size} needs more than {block_size} tokens in the validation split "
             f"(the last 10%), but {path} gives only {len(val)}: use a smaller --block_size or more text")
    log.info("data: %s, %d tokens (%s, vocab %d), %d train / %d val",
             path, len(ids), tokenizer_kind, tokenizer.vocab_size, len(train), len(val))
    return train, val, tokenizer, data_sha256


def get_batch(data, block_size, batch_size, generator, device=None, shard=(0, 1)):
    """batch_size random windows of data (on the CPU): inputs x and next-token targets y, each (B, T), on device
    (default: the CPU). shard (rank, processes): this process's rows of the batch. The windows are drawn on the
    CPU, so every device gets the same batches; a GPU gets them from pinned memory without waiting for its queue."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    rank, processes = shard
    share = batch_size // processes
    windows = data[starts[rank * share:(rank + 1) * share, None] + torch.arange(block_size + 1)]  # (B, T+1)
    if device is not None and torch.device(device).type == "cuda":
        windows = windows.pin_memory().to(device, non_blocking=True)
    elif device is not None:
        windows = windows.to(device)
    return windows[:, :-1], windows[:, 1:]
