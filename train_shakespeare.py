r"""
Train CRoPE, RoPE and learned-position GPTs on tiny Shakespeare (or any text) and compare them.

    python train_shakespeare.py                      # laptop CPU: crope and rope, ~1 minute each
    python train_shakespeare.py --preset gpu         # one GPU
    torchrun --standalone --nproc_per_node=4 train_shakespeare.py --preset gpu   # several GPUs
    python train_shakespeare.py --resume             # continue the runs in out/cpu where they stopped
    python train_shakespeare.py --variants crope --init_from out/cpu/crope/best.pt --block_size 128 \
        --rope_scaling linear --max_iters 200 --lr 3e-4 --warmup_iters 0 --out_dir out/ft128   # longer context

Every variant is trained with the same seed, the same batches and the same validation batches,
into OUT_DIR/<variant>/ (log.csv, last.pt, best.pt); OUT_DIR gets compare.png and summary.md.
"""

import argparse
import hashlib
import logging
import logging.handlers
import math
import os
import signal
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from crope import GPT, ROPE_SCALINGS, GPTConfig
from fused_op import KERNEL_MODES, KernelError, fused_op_used, use_kernel
from runs import (ArgParser, CsvLog, FolderLock, Tokenizer, check_memory, fail, kept_log_rows, load_checkpoint,
                  make_folder, model_from_checkpoint, read_log, resolve_device, save_checkpoint)

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

# What a run is, saved in its checkpoints. On --resume every setting not given on the command line
# comes from the checkpoint, and one given with another value is refused, except RESUME_MAY_CHANGE.
RUN_SETTINGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "rope_base", "batch_size",
                "max_iters", "lr", "min_lr", "warmup_iters", "lr_decay_iters", "schedule", "step_size", "gamma",
                "weight_decay", "beta1", "beta2", "grad_clip", "seed", "tokenizer", "data", "init_from",
                "eval_interval", "eval_iters", "log_interval")
# none changes what the steps compute (the data's content is compared through its sha256)
RESUME_MAY_CHANGE = ("max_iters", "eval_interval", "log_interval", "data")

VAL_SEED = 20260127  # validation batches are the same for every variant and seed


# ----------------------------------------------------------------------------- arguments

def variant_list(text):
    """A comma list of variant names, as --variants takes it."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise argparse.ArgumentTypeError(f"unknown variant {','.join(unknown) or repr(text)}: "
                                         f"choose from {', '.join(VARIANTS)}")
    if len(set(variants)) < len(variants):
        raise argparse.ArgumentTypeError(f"{text!r} names a variant twice: each is trained once")
    return variants


def parse_args(argv=None):
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="cpu", help="base settings; any flag below overrides")
    p.add_argument("--variants", type=variant_list, default="crope,rope",
                   help=f"comma list of the models to train: {', '.join(VARIANTS)}")
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
                   "checkpoint given to a crope variant is projected onto the nearest CRoPE model; a --block_size "
                   "above the checkpoint's extends its context (see --rope_scaling)")
    p.add_argument("--rope_scaling", choices=ROPE_SCALINGS,
                   help="with --init_from and a longer --block_size: how rotary angles reach past the trained "
                   "context (extrapolate: no scaling; linear: position interpolation; ntk; yarn; llama3); "
                   "default: the checkpoint's own method (extrapolate for a model never extended)")
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

    given = {key for key in RUN_SETTINGS if getattr(args, key) is not None}
    settings = {**COMMON, **PRESETS[args.preset]}
    for key, value in vars(args).items():
        if value is not None or key not in settings:
            settings[key] = value
    args = argparse.Namespace(**settings, given=given)
    args.out_dir = Path(args.out_dir or Path("out") / args.preset)
    try:  # a bad CROPE_KERNEL (argparse checks only the flag); nothing is built yet
        use_kernel(args.kernel)
    except KernelError as e:
        fail(str(e))
    return args


def check_settings(args):
    """Refuse values no run can use, before anything is written."""
    for name in ("max_iters", "batch_size", "block_size", "eval_interval", "eval_iters", "log_interval",
                 "step_size", "lr", "gamma", "lr_decay_iters", "n_layer", "n_head", "n_embd"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            fail(f"--{name} must be positive, got {value}")
    for name in ("warmup_iters", "min_lr", "weight_decay", "grad_clip"):
        if not getattr(args, name) >= 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("beta1", "beta2", "dropout"):
        if not 0 <= getattr(args, name) < 1:
            fail(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 31:
        fail(f"--seed must be in [0, 2^31), got {args.seed}")
    for name in ("lr", "min_lr", "rope_base", "gamma", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(args, name)):
            fail(f"--{name} must be a finite number, got {getattr(args, name)}")


def restore_settings(args):
    """--resume: every run setting not given on the command line is taken from the runs' checkpoints."""
    saved = {}
    for variant in args.variants:
        path = args.out_dir / variant / "last.pt"
        if path.exists():
            state = load_checkpoint(path)
            saved[variant] = {**state["model_config"], **state["settings"]}
    if not saved:
        fail(f"nothing to resume in {args.out_dir}: no {'/'.join(args.variants)} checkpoint there")
    for key in sorted(set(RUN_SETTINGS) - args.given):
        values = {variant: settings[key] for variant, settings in saved.items() if key in settings}
        if len({repr(v) for v in values.values()}) > 1:
            fail(f"the runs in {args.out_dir} were started with different {key} ({values}): "
                 "resume them one at a time with --variants")
        if values:
            setattr(args, key, next(iter(values.values())))


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


def data_path(given):
    """The text to train on: --data, else CROPE_DATA, else tiny Shakespeare (downloaded once)."""
    return str(Path(given or os.environ.get("CROPE_DATA") or fetch_shakespeare()).resolve())


def load_dataset(args):
    """Tokenize the text and split it 90/10 into train and validation, like nanoGPT; also the file's sha256."""
    text, data_sha256 = read_text(args.data)
    tokenizer = Tokenizer.for_text(args.tokenizer, text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = int(0.9 * len(ids))
    train, val = ids[:n], ids[n:]
    if len(val) <= args.block_size:
        fail(f"--block_size {args.block_size} needs more than {args.block_size} tokens in the validation split "
             f"(the last 10%), but {args.data} gives only {len(val)}: use a smaller --block_size or more text")
    log.info("data: %s, %d tokens (%s, vocab %d), %d train / %d val",
             args.data, len(ids), args.tokenizer, tokenizer.vocab_size, len(train), len(val))
    return train, val, tokenizer, data_sha256


def get_batch(data, block_size, batch_size, generator):
    """batch_size random windows of data: inputs x and next-token targets y, each (B, T)."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    windows = data[(starts[:, None] + torch.arange(block_size + 1)).to(data.device)]  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def iteration_seed(seed, it, rank=0):
    """Every random draw of iteration it (its batch, its dropout) comes from this seed, so a
    resumed run needs no saved RNG state to continue exactly."""
    return (seed * 1_000_003 + it) * 1024 + rank


# ----------------------------------------------------------------------------- training

def initial_model(path, config, method):
    """Checkpoint path's model made to fit config: RoPE weights projected onto CRoPE for a crope variant,
    the context extended to config's block_size by method (None: the checkpoint's own)."""
    source = model_from_checkpoint(load_checkpoint(path))
    if source.config.pos == "rope" and config.pos == "crope" and not config.complex_out:
        source = source.to_crope()
    try:
        source = source.extend_context(config.block_size, method)
    except ValueError as e:
        fail(f"--init_from {path}: {e}")
    differ = [k for k, v in asdict(config).items()
              if k not in ("dropout", "trained_block_size", "rope_scaling") and getattr(source.config, k) != v]
    if differ:
        fail(f"--init_from {path} has a different model: {', '.join(differ)} differ")
    return source


def model_config(args, variant, vocab_size, trained_block_size=None, rope_scaling="extrapolate"):
    try:
        return GPTConfig(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                         n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=args.bias,
                         rope_base=args.rope_base, rope_scaling=args.rope_scaling or rope_scaling,
                         trained_block_size=trained_block_size, **VARIANTS[variant])
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


class Runtime:
    """Device, precision and the process group: what the run needs, not what it computes."""

    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = args.device
        if self.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{local_rank}"  # one GPU per process
        self.device = resolve_device(device)
        if self.world > 1:
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            else:  # share the cores between the processes
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
        if args.batch_size % self.world:
            fail(f"--batch_size {args.batch_size} (the global batch) must divide among {self.world} processes")
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.dtype = args.dtype if args.dtype != "auto" else "bfloat16" if bf16 else "float32"
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if self.dtype == "bfloat16" else nullcontext())
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.main = self.rank == 0
        self.peak_flops = peak_flops(self.device)

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


# bf16 dense tensor-core peaks (FLOP/s) of GPUs whose MFU the log shows, as nanoGPT's estimate_mfu does
PEAK_BF16_FLOPS = {"A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}


def peak_flops(device):
    """The device's bf16 peak for the MFU estimate, or None (CPUs, GPUs not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


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


def variant_model(args, variant, vocab_size, state):
    """A variant's GPTConfig, and the --init_from model it starts from (None when resuming or from scratch).
    A resumed run keeps the context extension it was trained with; an --init_from run takes its source's."""
    saved = state["model_config"] if state else {}
    config = model_config(args, variant, vocab_size, saved.get("trained_block_size"),
                          saved.get("rope_scaling", "extrapolate"))
    source = initial_model(args.init_from, config, args.rope_scaling) if args.init_from and not state else None
    if source:  # an extended model keeps the context its weights were first trained at
        config = replace(config, trained_block_size=source.config.trained_block_size,
                         rope_scaling=source.config.rope_scaling)
    if args.rope_scaling not in (None, "extrapolate") and config.context_scale == 1:
        fail("--rope_scaling extends a trained model's context: use it with --init_from CKPT and a "
             "--block_size above the checkpoint's")
    return config, source


class VariantRun:
    """One variant's model, optimizer and run folder, restored or initialised; the loop's steps."""

    def __init__(self, variant, args, data_sha256, tokenizer, rt):
        self.variant, self.tokenizer, self.rt, self.args = variant, tokenizer, rt, args
        self.dir = args.out_dir / variant
        self.last_path, self.best_path = self.dir / "last.pt", self.dir / "best.pt"
        state = load_checkpoint(self.last_path) if args.resume and self.last_path.exists() else None
        if state is None and self.last_path.exists():
            fail(f"{self.dir} already holds a run: pass --resume to continue it, or choose another --out_dir")
        self.settings = {**{k: getattr(args, k) for k in RUN_SETTINGS}, "data_sha256": data_sha256}
        self.config, source = variant_model(args, variant, tokenizer.vocab_size, state)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in GPT(self.config).parameters())
        check_memory(16 * n_params, rt.device, f"training the {variant} model ({n_params:,} parameters; float32 "
                     "weights, gradients and AdamW state)", "use a smaller --n_embd or --n_layer")
        torch.manual_seed(args.seed)
        self.model = GPT(self.config).to(rt.device)  # initialised on the CPU: the same weights on every device
        self.optimizer = make_optimizer(self.model, args, rt.device)
        self.start_iter, self.best_val, wall_before = self.restore_or_initialise(state, source)
        self.saved_iter = state["iter"] if state else None  # the iteration last.pt holds
        self.kept_log = kept_log_rows(self.dir / "log.csv", self.start_iter) if state and rt.main else []
        self.wall_before = wall_before                      # wall seconds of the run before a resume
        # the first iteration whose loss is not finite, kept on the device: watching costs no sync per step
        self.nonfinite_iter = torch.tensor(-1, device=rt.device)

    def restore_or_initialise(self, state, source):
        """(first iteration, best validation loss, wall seconds so far) after loading the checkpoint of a
        resumed run (what it shares with the command line must match), or the weights of --init_from."""
        if state is None:
            if source:
                self.model.load_state_dict(source.state_dict())
            return 0, float("inf"), 0.0
        saved = {**state["model_config"], **state["settings"]}
        now = {**asdict(self.config), **self.settings}
        differ = [f"{k} (checkpoint {saved[k]!r}, now {now[k]!r})" for k in saved.keys() & now.keys()
                  if k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
        if differ:
            fail(f"cannot resume {self.last_path}: different settings: {'; '.join(sorted(differ))}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        log.info("%s: resuming at iter %d", self.variant, state["iter"])
        return state["iter"], state["best_val_loss"], state["wall_seconds"]

    def start_clock(self):
        """Wall seconds count from now, plus the run's time before a resume; so do ms/iter figures."""
        self.t0 = time.time() - self.wall_before
        self.clock = (time.time(), self.start_iter)

    def checkpoint(self, it, path):
        """Save the state before iteration it: resuming from it runs iteration it next."""
        if path == self.last_path:
            self.saved_iter = it
        save_checkpoint(path, dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                                   model_config=asdict(self.config), settings=self.settings, variant=self.variant,
                                   tokenizer=self.tokenizer.state(), iter=it, best_val_loss=self.best_val,
                                   wall_seconds=time.time() - self.t0))

    def step(self, it, train_model, train_data):
        """One optimisation step on iteration it's batch; returns its loss (a tensor) and learning rate."""
        args, rt = self.args, self.rt
        lr = learning_rate(it, args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, args.block_size, args.batch_size,
                         torch.Generator().manual_seed(iteration_seed(args.seed, it)))
        share = args.batch_size // rt.world  # this process's rows of the global batch
        x, y = x[rt.rank * share:(rt.rank + 1) * share], y[rt.rank * share:(rt.rank + 1) * share]
        torch.manual_seed(iteration_seed(args.seed, it, rt.rank))  # dropout masks
        with rt.autocast:
            _, loss = train_model(x, y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_iter = torch.where((self.nonfinite_iter < 0) & ~loss.detach().isfinite(), it,
                                          self.nonfinite_iter)
        return loss, lr

    def check_finite(self, it, val_loss=0.0):
        """Stop with one line at a non-finite training or validation loss, before anything of it is saved."""
        bad_iter = int(self.nonfinite_iter.item())
        if not self.rt.any(bad_iter >= 0 or not math.isfinite(val_loss)):
            return
        what = (f"the training loss of iteration {bad_iter}" if bad_iter >= 0 else
                f"the validation loss at iteration {it}")
        kept = f"{self.last_path} holds iteration {self.saved_iter}" if self.saved_iter is not None else \
            "nothing was saved"
        fail(f"{self.variant}: {what} is not finite ({kept}); likely causes: a learning rate too high for "
             "this model (--lr), an unusual --rope_base or --grad_clip 0. Lower --lr and start again")

    def speed(self, it):
        """ms per iteration since the last call, and the text of its tokens/s (and MFU on known GPUs)."""
        now, (then, it_then) = time.time(), self.clock
        self.clock = (now, it)
        seconds = (now - then) / max(1, it - it_then)
        tokens = self.args.batch_size * self.args.block_size / seconds
        text = f"{tokens:,.0f} tok/s"
        if self.rt.peak_flops:
            text += f" | MFU {self.model.flops_per_token() * tokens / self.rt.peak_flops:.1%}"
        return seconds, text


def train_variant(run, train_data, val_batches, rt, stop):
    """Train one variant from where it stands to max_iters; returns False if stopped early."""
    args = run.args
    if run.start_iter >= args.max_iters:
        log.info("%s: already trained to iter %d", run.variant, run.start_iter)
        return True
    eval_model = torch.compile(run.model) if args.compile else run.model
    train_model = eval_model
    if rt.world > 1:  # evaluation skips the DDP wrapper: its buffer broadcast would need equal batch counts
        train_model = DDP(eval_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.main:
        run.dir.mkdir(exist_ok=True)
    csv_log = CsvLog(run.dir / "log.csv", run.kept_log) if rt.main else None
    tokens_per_iter = args.batch_size * args.block_size
    run.start_clock()

    for it in range(run.start_iter, args.max_iters + 1):
        row = dict(iter=it, tokens=it * tokens_per_iter)
        # evaluate on the fixed validation batches; checkpoint the best and the last model
        if it % args.eval_interval == 0 or it == args.max_iters:
            val_loss = evaluate(eval_model, val_batches, rt)
            run.check_finite(it, val_loss)
            row["val_loss"] = f"{val_loss:.4f}"
            if rt.main:
                if val_loss < run.best_val:
                    run.best_val = val_loss
                    run.checkpoint(it, run.best_path)
                run.checkpoint(it, run.last_path)
            run.clock = (time.time(), it)  # ms/iter counts training steps, not evaluation
        # the end: the last row has a validation loss only
        if it == args.max_iters:
            if rt.main:
                csv_log.write(**row, wall_seconds=f"{time.time() - run.t0:.2f}")
            break
        # one optimisation step
        loss, lr = run.step(it, train_model, train_data)
        # log
        if it % args.log_interval == 0 or "val_loss" in row:
            run.check_finite(it)
            train_loss = rt.all_mean(loss.item())
            if rt.main:
                csv_log.write(**row, train_loss=f"{train_loss:.4f}", lr=f"{lr:.3e}",
                              wall_seconds=f"{time.time() - run.t0:.2f}")
                seconds, speed = run.speed(it)
                val = f" | val {row['val_loss']}" if "val_loss" in row else ""
                log.info("%s iter %d/%d | loss %.4f%s | lr %.2e | %.1f ms/iter | %s | ETA %s", run.variant, it,
                         args.max_iters, train_loss, val, lr, 1000 * seconds, speed,
                         format_seconds(seconds * (args.max_iters - it)))
        # stop on Ctrl-C or SIGTERM, with the state after this step saved
        if rt.any(stop.requested):
            run.check_finite(it)
            if rt.main:
                run.checkpoint(it + 1, run.last_path)
                log.info("%s: stopped after iter %d; saved %s. Continue with --resume", run.variant, it,
                         run.last_path)
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
    return "\n".join(lines)


def summarize(args):
    """compare.png (loss against iterations and wall time) and summary.md of every run in args.out_dir
    (this command's variants first, then any other run there), from their logs and checkpoints."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    rows = ["| variant | params | attention params | QKV params | best val loss | final val loss | "
            "time (s) | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    runs = [v for v in dict.fromkeys(args.variants + list(VARIANTS))
            if (args.out_dir / v / "log.csv").exists() and (args.out_dir / v / "last.pt").exists()]
    for i, variant in enumerate(runs):
        state = load_checkpoint(args.out_dir / variant / "last.pt")
        config = GPTConfig(**state["model_config"])
        with torch.device("meta"):  # counts need shapes only
            report = GPT(config).param_report()
        entries = read_log(args.out_dir / variant / "log.csv")
        train = [(int(r["iter"]), float(r["wall_seconds"]), float(r["train_loss"])) for r in entries if r["train_loss"]]
        val = [(int(r["iter"]), float(r["wall_seconds"]), float(r["val_loss"])) for r in entries if r["val_loss"]]
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
    fig.suptitle(f"{config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, block {config.block_size}, "
                 f"batch {state['settings']['batch_size']}, {state['settings']['tokenizer']} tokens")
    fig.tight_layout()
    fig.savefig(args.out_dir / "compare.png", dpi=120)
    plt.close(fig)
    summary = "\n".join(rows)
    (args.out_dir / "summary.md").write_text(summary + "\n")
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.resume:
        restore_settings(args)
    check_settings(args)
    args.lr_decay_iters = args.lr_decay_iters or args.max_iters
    rt = Runtime(args)
    # stdout for the log (stderr is for errors alone); train.log gets it once every check has passed
    log_file = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    logging.basicConfig(level=logging.INFO if rt.main else logging.WARNING, format="%(message)s",
                        handlers=[logging.StreamHandler(sys.stdout), log_file], force=True)
    fused = False
    if any(VARIANTS[v]["pos"] == "crope" for v in args.variants):
        try:  # fused_op.py decides (and the model follows): builds and self-checks the op on first use
            fused = fused_op_used(rt.device, bias=args.bias)
        except KernelError as e:  # --kernel ext where the op cannot run: no build, no kernels, --bias, ...
            fail(str(e))
    args.data = data_path(args.data)
    lock, new_folder = None, not args.out_dir.exists()
    if rt.main:  # one process writes the run folder, and one run at a time
        make_folder(args.out_dir)
        lock = FolderLock(args.out_dir)
    try:
        return train_all(args, rt, fused, log_file)
    finally:
        if lock:
            lock.release()
        if new_folder and rt.main and not any(args.out_dir.iterdir()):  # a command refused: leave no trace
            args.out_dir.rmdir()


def train_all(args, rt, fused, log_file):
    """Train every variant of args into args.out_dir, then compare all the runs there."""
    train_data, val_data, tokenizer, data_sha256 = load_dataset(args)
    train_data, val_data = train_data.to(rt.device), val_data.to(rt.device)
    val_generator = torch.Generator().manual_seed(VAL_SEED)
    val_batches = [get_batch(val_data, args.block_size, args.batch_size, val_generator)
                   for _ in range(args.eval_iters)]
    table = parameter_table(args, tokenizer.vocab_size)
    stop = StopRequest()
    log.info("device %s, %s, %d process(es), compile %s, CRoPE projection %s\n%s", rt.device, rt.dtype, rt.world,
             args.compile, "fused op (csrc/)" if fused else "PyTorch", table)
    try:
        # every variant restored or initialised before the first step: a bad one fails before any trains
        runs = [VariantRun(variant, args, data_sha256, tokenizer, rt) for variant in args.variants]
        if rt.main:
            log_file.setTarget(logging.FileHandler(args.out_dir / "train.log"))
            log_file.flush()
            log_file.flushLevel = logging.DEBUG  # from now on every line goes to train.log as it comes
        for run in runs:
            if not train_variant(run, train_data, val_batches, rt, stop):
                return 1
    finally:
        stop.restore()
        rt.close()
    if rt.main:
        summary = summarize(args)
        log.info("\n%s\n\nwrote %s and %s", summary, args.out_dir / "compare.png", args.out_dir / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
