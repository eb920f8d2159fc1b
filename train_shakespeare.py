"""
Train CRoPE, RoPE and learned-position GPTs on tiny Shakespeare (or any text) and compare them.

    python train_shakespeare.py                      # laptop CPU: crope and rope, ~1 minute each
    python train_shakespeare.py --preset gpu         # one GPU
    torchrun --standalone --nproc_per_node=4 train_shakespeare.py --preset gpu   # several GPUs

Every variant is trained with the same seed, the same batches and the same validation batches,
into OUT_DIR/<variant>/ (log.csv, last.pt, best.pt); OUT_DIR gets compare.png and summary.md.
"""

import argparse
import csv
import hashlib
import logging
import math
import os
import signal
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from crope import GPT, KERNEL_MODES, GPTConfig, KernelError, fused_op_used, use_kernel

log = logging.getLogger("crope")

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"

# A variant is a name for a set of GPTConfig fields.
VARIANTS = {
    "learned": dict(pos="learned"),
    "rope": dict(pos="rope"),
    "crope": dict(pos="crope"),
    "crope_full": dict(pos="crope", complex_out=True),  # complex-linear output projection too
}

PRESETS = {
    # nanoGPT's laptop config for shakespeare_char
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
                max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100, schedule="cosine",
                eval_interval=250, eval_iters=20, log_interval=10, tokenizer="char", compile=False),
    # nanoGPT's shakespeare_char GPU config
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2,
                max_iters=5000, lr=1e-3, min_lr=1e-4, warmup_iters=100, schedule="cosine",
                eval_interval=250, eval_iters=200, log_interval=10, tokenizer="char", compile=True),
    # the paper's recipe: step decay x0.8 every 1000 iterations, GPT-2 tokens
    "paper": dict(n_layer=4, n_head=4, n_embd=128, block_size=1024, batch_size=16, dropout=0.0,
                  max_iters=10000, lr=1e-3, min_lr=1e-4, warmup_iters=0, schedule="step",
                  eval_interval=250, eval_iters=20, log_interval=50, tokenizer="gpt2", compile=True),
}
COMMON = dict(bias=False, rope_base=10000.0, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
              step_size=1000, gamma=0.8, seed=1337)

# Settings a resumed run must share with its checkpoint; max_iters may grow to extend a run.
RUN_SETTINGS = ("batch_size", "lr", "min_lr", "warmup_iters", "lr_decay_iters", "schedule", "step_size",
                "gamma", "weight_decay", "beta1", "beta2", "grad_clip", "seed", "tokenizer", "data_sha256",
                "init_from")

VAL_SEED = 20260127  # validation batches are the same for every variant and seed


def fail(message):
    """Stop with one clear line (no traceback): for bad input, not for bugs."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="cpu", help="base settings; any flag below overrides")
    p.add_argument("--pos", default="crope,rope", help=f"comma list of variants: {', '.join(VARIANTS)}")
    p.add_argument("--data", help="a UTF-8 text file to train on (default: tiny Shakespeare, downloaded; "
                   "or set CROPE_DATA)")
    p.add_argument("--tokenizer", choices=("char", "gpt2"), help="characters, or GPT-2 BPE through tiktoken")
    p.add_argument("--out_dir", help="where runs go (default: out/PRESET)")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out_dir exactly where they stopped")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bf16 autocast on GPUs that support it, float32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    p.add_argument("--kernel", choices=KERNEL_MODES, default=os.environ.get("CROPE_KERNEL", "auto"),
                   help="CRoPE's Q/K/V projection: the fused csrc/ op (ext), PyTorch (torch), or the op when it "
                   "builds (auto, default; also set by CROPE_KERNEL)")
    p.add_argument("--init_from", help="start from a checkpoint's weights instead of a random init; a rope "
                   "checkpoint given to a crope variant is projected onto the nearest CRoPE model")
    for name, kind in [("n_layer", int), ("n_head", int), ("n_embd", int), ("block_size", int),
                       ("batch_size", int), ("dropout", float), ("bias", bool), ("rope_base", float),
                       ("max_iters", int), ("lr", float), ("min_lr", float), ("warmup_iters", int),
                       ("lr_decay_iters", int), ("step_size", int), ("gamma", float),
                       ("weight_decay", float), ("beta1", float), ("beta2", float), ("grad_clip", float),
                       ("eval_interval", int), ("eval_iters", int), ("log_interval", int), ("seed", int)]:
        if kind is bool:
            p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(f"--{name}", type=kind)
    p.add_argument("--schedule", choices=("cosine", "step"),
                   help="cosine: warmup, cosine decay to min_lr by lr_decay_iters; step: lr *= gamma every step_size")
    args = p.parse_args(argv)

    settings = {**COMMON, **PRESETS[args.preset]}
    for key, value in vars(args).items():
        if value is not None or key not in settings:
            settings[key] = value
    args = argparse.Namespace(**settings)
    args.out_dir = Path(args.out_dir or Path("out") / args.preset)
    args.variants = [v.strip() for v in args.pos.split(",") if v.strip()]
    try:  # a bad CROPE_KERNEL (argparse checks only the flag); nothing is built yet
        use_kernel(args.kernel)
    except KernelError as e:
        fail(str(e))
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        fail(f"unknown --pos {','.join(unknown) or repr(args.pos)}: choose from {', '.join(VARIANTS)}")
    for name in ("max_iters", "batch_size", "block_size", "eval_interval", "eval_iters", "log_interval",
                 "step_size", "lr", "gamma"):
        if getattr(args, name) <= 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("warmup_iters", "min_lr", "weight_decay", "grad_clip"):
        if getattr(args, name) < 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    return args


# ----------------------------------------------------------------------------- data

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
    """(text, sha256 of the file) of a non-empty UTF-8 file, or one clear error."""
    path = Path(path)
    if not path.is_file():
        fail(f"no data file at {path}: pass --data with a UTF-8 text file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not text.strip():
        fail(f"{path} is empty: the data file must hold text to train on")
    return text, hashlib.sha256(raw).hexdigest()


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


def load_dataset(args):
    """Tokenize the text and split it 90/10 into train and validation, like nanoGPT."""
    data_path = args.data or os.environ.get("CROPE_DATA") or fetch_shakespeare()
    text, args.data_sha256 = read_text(data_path)
    tokenizer = Tokenizer.for_text(args.tokenizer, text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = int(0.9 * len(ids))
    train, val = ids[:n], ids[n:]
    if len(val) <= args.block_size:
        fail(f"--block_size {args.block_size} needs more than {args.block_size} tokens in the validation split "
             f"(the last 10%), but {data_path} gives only {len(val)}: use a smaller --block_size or more text")
    log.info("data: %s, %d tokens (%s, vocab %d), %d train / %d val",
             data_path, len(ids), args.tokenizer, tokenizer.vocab_size, len(train), len(val))
    return train, val, tokenizer


def get_batch(data, block_size, batch_size, generator):
    """batch_size random windows of data: inputs x and next-token targets y, each (B, T)."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    windows = data[(starts[:, None] + torch.arange(block_size + 1)).to(data.device)]  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def iteration_seed(seed, it, rank=0):
    """Every random draw of iteration it (its batch, its dropout) comes from this seed, so a
    resumed run needs no saved RNG state to continue exactly."""
    return (seed * 1_000_003 + it) * 1024 + rank


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
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        fail(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        state["model_config"], state["model"]  # a checkpoint of this project has both
    except Exception as e:
        fail(f"{path} is not a readable crope checkpoint ({e.__class__.__name__}); it may be truncated or "
             "from another program")
    return state


def model_from_checkpoint(state):
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model


def initial_weights(path, config):
    """A checkpoint's weights for a model of config; rope weights for a crope model are projected."""
    source = model_from_checkpoint(load_checkpoint(path))
    if source.config.pos == "rope" and config.pos == "crope" and not config.complex_out:
        source = source.to_crope()
    differ = [k for k, v in asdict(config).items() if k != "dropout" and getattr(source.config, k) != v]
    if differ:
        fail(f"--init_from {path} has a different model: {', '.join(differ)} differ")
    return source.state_dict()


# ----------------------------------------------------------------------------- training

def model_config(args, variant, vocab_size):
    try:
        return GPTConfig(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                         n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=args.bias,
                         rope_base=args.rope_base, **VARIANTS[variant])
    except ValueError as e:  # a config GPTConfig refuses, such as an odd head size
        fail(str(e))


def learning_rate(it, args):
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    if args.schedule == "step":
        return args.lr * args.gamma ** (it // args.step_size)
    if it >= args.lr_decay_iters:
        return args.min_lr
    progress = (it - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def make_optimizer(model, args, device):
    # weight decay on matrices (Linear, ComplexLinear, embeddings), not on biases and norms
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)


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


class Runtime:
    """Device, precision and the process group: what the run needs, not what it computes."""

    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.world > 1 and args.device in ("auto", "cuda") and torch.cuda.is_available():
            args.device = f"cuda:{local_rank}"  # one GPU per process
        self.device = resolve_device(args.device)
        if self.world > 1:
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            else:  # share the cores between the processes
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
        if args.batch_size % self.world:
            fail(f"--batch_size {args.batch_size} (the global batch) must divide among {self.world} processes")
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        if args.dtype == "auto":
            args.dtype = "bfloat16" if bf16 else "float32"
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if args.dtype == "bfloat16" else nullcontext())
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.main = self.rank == 0

    def all_mean(self, value):
        if self.world == 1:
            return value
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def any(self, flag):
        if self.world == 1:
            return flag
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self):
        if self.world > 1:
            dist.barrier()  # gloo aborts if one process tears down while another still talks
            dist.destroy_process_group()


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, save a checkpoint, exit. A second Ctrl-C kills."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class CsvLog:
    COLUMNS = ("iter", "train_loss", "val_loss", "lr", "tokens", "wall_seconds")

    def __init__(self, path, keep_before_iter):
        """Open path for appending, dropping rows at or after keep_before_iter (they are re-run)."""
        self.path = path
        rows = read_log(path) if keep_before_iter > 0 and path.exists() else []
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            writer.writeheader()
            writer.writerows(r for r in rows if int(r["iter"]) < keep_before_iter)

    def write(self, **row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow(row)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@torch.no_grad()
def evaluate(model, val_batches, rt):
    """Mean loss over the fixed validation batches, shared among the processes."""
    model.eval()
    total = 0.0
    for x, y in val_batches[rt.rank::rt.world]:
        with rt.autocast:
            total += model(x, y)[1].item()
    model.train()
    return rt.all_mean(total * rt.world / len(val_batches))


def train_variant(variant, args, train_data, val_batches, tokenizer, rt, stop):
    """Train one variant to args.max_iters (or resume it); returns False if stopped early."""
    run_dir = args.out_dir / variant
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    state = load_checkpoint(last_path) if args.resume and last_path.exists() else None
    args = argparse.Namespace(**vars(args))  # this variant's settings
    for key in ("lr_decay_iters", "init_from"):  # not given again on resume: as the run started
        if state and getattr(args, key) is None:
            setattr(args, key, state["settings"][key])
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.max_iters
    config = model_config(args, variant, tokenizer.vocab_size)
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    torch.manual_seed(args.seed)
    model = GPT(config)  # initialised on the CPU: the same weights on every device
    model.to(rt.device)
    optimizer = make_optimizer(model, args, rt.device)

    start_iter, best_val, wall_before = 0, float("inf"), 0.0
    if state:
        saved = {**state["model_config"], **state["settings"]}
        differ = [f"{k} (checkpoint {saved.get(k)!r}, now {v!r})"
                  for k, v in {**asdict(config), **settings}.items() if saved.get(k) != v]
        if differ:
            fail(f"cannot resume {last_path}: different settings: {'; '.join(differ)}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_iter, best_val, wall_before = state["iter"], state["best_val_loss"], state["wall_seconds"]
        log.info("%s: resuming at iter %d", variant, start_iter)
    elif last_path.exists():
        fail(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out_dir")
    elif args.init_from:
        model.load_state_dict(initial_weights(args.init_from, config))
    if start_iter >= args.max_iters and start_iter > 0:
        log.info("%s: already trained to iter %d", variant, start_iter)
        return True

    train_model = eval_model = torch.compile(model) if args.compile else model
    if rt.world > 1:  # evaluation skips the DDP wrapper: its buffer broadcast would need equal batch counts
        train_model = DDP(eval_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    csv_log = CsvLog(run_dir / "log.csv", start_iter) if rt.main else None
    tokens_per_iter = args.batch_size * args.block_size
    local_batch = args.batch_size // rt.world

    def checkpoint(it, path):
        save_checkpoint(path, dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   model_config=asdict(config), settings=settings, variant=variant,
                                   tokenizer=tokenizer.state(), iter=it, best_val_loss=best_val,
                                   wall_seconds=time.time() - t0))

    t0 = time.time() - wall_before
    t_last, it_last = time.time(), start_iter
    for it in range(start_iter, args.max_iters + 1):
        row = {}
        if it % args.eval_interval == 0 or it == args.max_iters:
            val_loss = evaluate(eval_model, val_batches, rt)
            row["val_loss"] = f"{val_loss:.4f}"
            if rt.main:
                if val_loss < best_val:
                    best_val = val_loss
                    checkpoint(it, best_path)
                checkpoint(it, last_path)
        if it == args.max_iters:
            if rt.main:
                csv_log.write(iter=it, tokens=it * tokens_per_iter, wall_seconds=f"{time.time() - t0:.2f}", **row)
            break

        lr = learning_rate(it, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, args.block_size, args.batch_size,
                         torch.Generator().manual_seed(iteration_seed(args.seed, it)))
        x, y = (t[rt.rank * local_batch:(rt.rank + 1) * local_batch] for t in (x, y))
        torch.manual_seed(iteration_seed(args.seed, it, rt.rank))  # dropout masks
        with rt.autocast:
            _, loss = train_model(x, y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if it % args.log_interval == 0 or "val_loss" in row:
            train_loss = rt.all_mean(loss.item())
            if rt.main:
                wall = time.time() - t0
                csv_log.write(iter=it, train_loss=f"{train_loss:.4f}", lr=f"{lr:.3e}",
                              tokens=it * tokens_per_iter, wall_seconds=f"{wall:.2f}", **row)
                per_iter = (time.time() - t_last) / max(1, it - it_last)
                t_last, it_last = time.time(), it
                val = f" | val {row['val_loss']}" if row else ""
                log.info("%s iter %d/%d | loss %.4f%s | lr %.2e | %.1f ms/iter | ETA %s", variant, it,
                         args.max_iters, train_loss, val, lr, 1000 * per_iter,
                         format_seconds(per_iter * (args.max_iters - it)))
        if rt.any(stop.requested):
            if rt.main:
                checkpoint(it + 1, last_path)
                log.info("%s: stopped after iter %d; saved %s. Continue with --resume", variant, it, last_path)
            return False
    return True


def format_seconds(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


# ----------------------------------------------------------------------------- comparison

def parameter_table(args, vocab_size):
    """Parameter counts of every variant next to the equivalent RoPE model, as text."""
    reports = {}
    for variant in dict.fromkeys(args.variants + ["rope"]):
        with torch.device("meta"):  # counts need shapes only
            model = GPT(model_config(args, variant, vocab_size))
        reports[variant] = model.param_report()
    lines = ["| part | " + " | ".join(reports) + " |", "|---" * (len(reports) + 1) + "|"]
    for part in ("qkv", "attn_out", "attention", "mlp", "embeddings", "norms", "total"):
        cells = []
        for variant, report in reports.items():
            change = report[part] / reports["rope"][part] - 1 if reports["rope"][part] else 0.0
            cells.append(f"{report[part]:,}" + (f" ({change:+.1%})" if variant != "rope" else ""))
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines), reports


def summarize(args, reports):
    """compare.png (loss against iterations and wall time) and summary.md, from the runs' logs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    rows = ["| variant | params | attention params | QKV params | best val loss | final val loss | "
            "time (s) | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for i, variant in enumerate(args.variants):
        entries = read_log(args.out_dir / variant / "log.csv")
        train = [(int(r["iter"]), float(r["wall_seconds"]), float(r["train_loss"])) for r in entries if r["train_loss"]]
        val = [(int(r["iter"]), float(r["wall_seconds"]), float(r["val_loss"])) for r in entries if r["val_loss"]]
        report = reports[variant]
        label = f"{variant} ({report['total'] / 1e6:.2f}M params, attention {report['attention'] / 1e6:.2f}M)"
        color = f"C{i}"
        for ax, column in zip(axes, (0, 1)):
            ax.plot([t[column] for t in train], [t[2] for t in train], color=color, alpha=0.35, lw=1)
            ax.plot([t[column] for t in val], [t[2] for t in val], "o-", color=color, label=label, ms=3)
        wall = float(entries[-1]["wall_seconds"])
        tokens = int(entries[-1]["tokens"])
        rows.append(f"| {variant} | {report['total']:,} | {report['attention']:,} | {report['qkv']:,} | "
                    f"{min(v[2] for v in val):.4f} | {val[-1][2]:.4f} | {wall:.1f} | {tokens / wall:,.0f} |")
    for ax, xlabel in zip(axes, ("iteration", "wall seconds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="validation (dots), training (thin)")
    fig.suptitle(f"{args.preset} preset: {args.n_layer} layers, {args.n_head} heads, n_embd {args.n_embd}, "
                 f"block {args.block_size}, batch {args.batch_size}, {args.tokenizer} tokens")
    fig.tight_layout()
    fig.savefig(args.out_dir / "compare.png", dpi=120)
    plt.close(fig)
    summary = "\n".join(rows)
    (args.out_dir / "summary.md").write_text(summary + "\n")
    return summary


def main(argv=None):
    args = parse_args(argv)
    rt = Runtime(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler()]
    if rt.main:
        handlers.append(logging.FileHandler(args.out_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if rt.main else logging.WARNING, format="%(message)s",
                        handlers=handlers, force=True)
    if args.resume and not any((args.out_dir / v / "last.pt").exists() for v in args.variants):
        fail(f"nothing to resume in {args.out_dir}: no {'/'.join(args.variants)} checkpoint there")

    try:  # crope.py decides (and the model follows): builds and self-checks the op on first use
        fused = fused_op_used(rt.device, bias=args.bias)
    except KernelError as e:  # --kernel ext where the op cannot run: no build, no kernels, --bias, ...
        fail(str(e))
    train_data, val_data, tokenizer = load_dataset(args)
    train_data, val_data = train_data.to(rt.device), val_data.to(rt.device)
    val_generator = torch.Generator().manual_seed(VAL_SEED)
    val_batches = [get_batch(val_data, args.block_size, args.batch_size, val_generator)
                   for _ in range(args.eval_iters)]
    table, reports = parameter_table(args, tokenizer.vocab_size)
    stop = StopRequest()
    log.info("device %s, %s, %d process(es), compile %s, CRoPE projection %s\n%s", rt.device, args.dtype, rt.world,
             args.compile, "fused op (csrc/)" if fused else "PyTorch", table)
    try:
        for variant in args.variants:
            if not train_variant(variant, args, train_data, val_batches, tokenizer, rt, stop):
                return 1
    finally:
        stop.restore()
        rt.close()
    if rt.main:
        summary = summarize(args, reports)
        log.info("\n%s\n\nwrote %s and %s", summary, args.out_dir / "compare.png", args.out_dir / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
