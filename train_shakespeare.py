r"""
Train CRoPE, RoPE and learned-position GPTs on tiny Shakespeare (or any text) and compare them.

    python train_shakespeare.py                      # laptop CPU: crope and rope, ~1 minute each
    python train_shakespeare.py --preset gpu         # one GPU
    torchrun --standalone --nproc_per_node=4 train_shakespeare.py --preset gpu   # several GPUs
    python train_shakespeare.py --resume             # continue the runs in out/cpu where they stopped
    python train_shakespeare.py --variants crope --init_from out/cpu/crope/best.pt --block_size 128 \
        --rope_scaling linear --max_iters 200 --lr 3e-4 --warmup_iters 0 --out_dir out/ft128   # longer context
    python train_shakespeare.py --preset gpu --help  # every flag, with the gpu preset's defaults

Every variant is trained with the same seed, the same batches and the same validation batches,
into OUT_DIR/<variant>/ (log.csv, last.pt, best.pt); OUT_DIR gets train.log, compare.png and summary.md.
"""

if __name__ == "__main__":  # first, before torch loads: Ctrl-C while the command starts is one line
    import ctrl_c
    ctrl_c.stop_with_one_line()

import logging
import logging.handlers
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_op
import settings
from cli import check_memory, fail, meta_model, resolve_device, training_bytes
from compare import compare_runs
from crope import GPT, GPTConfig
from data import VAL_SEED, data_path, get_batch, load_dataset
from runs import CsvLog, FolderLock, kept_log_rows, load_checkpoint, model_from_checkpoint, output_folder, save_checkpoint
from settings import RESUME_MAY_CHANGE, RUN_SETTINGS, VARIANTS

log = logging.getLogger("crope")


# ----------------------------------------------------------------------------- model, optimizer, schedule

def check_training_memory(args, vocab_size, rt):
    """Refuse, in one line, settings whose training needs more memory than the device has, before any model
    is built (even on the meta device, which a very deep one would keep busy for minutes)."""
    for variant in args.variants:
        config = model_config(args, variant, vocab_size)
        check_memory(training_bytes(config, args.batch_size, rt.world, args.eval_iters), rt.device,
                     f"training the {variant} model (batch {args.batch_size} x block {args.block_size}; weights, "
                     "gradients, AdamW state and activations)",
                     "use a smaller --batch_size, --block_size, --n_embd or --n_layer")


def model_config(args, variant, vocab_size, trained_block_size=None, rope_scaling="extrapolate"):
    try:
        return GPTConfig(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                         n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=args.bias,
                         rope_base=args.rope_base, rope_scaling=args.rope_scaling or rope_scaling,
                         trained_block_size=trained_block_size, **VARIANTS[variant])
    except ValueError as e:  # a config GPTConfig refuses, such as an odd head size
        fail(str(e))


def variant_model(args, variant, tokenizer, state):
    """A variant's GPTConfig, and the --init_from model it starts from (None when resuming or from scratch).
    A resumed run keeps the context extension it was trained with; an --init_from run takes its source's."""
    saved = state["model_config"] if state else {}
    config = model_config(args, variant, tokenizer.vocab_size, saved.get("trained_block_size"),
                          saved.get("rope_scaling", "extrapolate"))
    source = initial_model(args.init_from, config, args.rope_scaling, tokenizer) if args.init_from and not state \
        else None
    if source:  # an extended model keeps the context its weights were first trained at
        config = replace(config, trained_block_size=source.config.trained_block_size,
                         rope_scaling=source.config.rope_scaling)
    if args.rope_scaling not in (None, "extrapolate") and config.context_scale == 1:
        fail("--rope_scaling extends a trained model's context: use it with --init_from CKPT and a "
             "--block_size above the checkpoint's")
    return config, source


def initial_model(path, config, method, tokenizer):
    """Checkpoint path's model made to fit config: RoPE weights projected onto CRoPE for a crope variant,
    the context extended to config's block_size by method (None: the checkpoint's own). Its tokens must be
    the tokenizer's."""
    state = load_checkpoint(path)
    if state["tokenizer"] != tokenizer.state():
        fail(f"--init_from {path} was trained on other tokens than --data gives with --tokenizer {tokenizer.kind} "
             "(another tokenizer, or characters that differ): train from its data, or from scratch")
    source = model_from_checkpoint(state)
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


def make_optimizer(model, args, device):
    # weight decay on matrices (Linear, ComplexLinear, embeddings), not on biases and norms
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    one_kernel = device.type in ("cuda", "cpu")  # AdamW's fused implementation: one kernel for all parameters
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=one_kernel)


def learning_rate(it, args):
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    if args.schedule == "step":
        return args.lr * args.gamma ** (it // args.step_size)
    if it >= args.lr_decay_iters:
        return args.min_lr
    progress = (it - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def train_step(it, model, optimizer, train_data, args, rt):
    """One optimisation step of model (compiled, wrapped in DDP or neither) on iteration it's batch, with nothing that
    waits for the GPU: returns the loss (a tensor on the device) and the learning rate."""
    lr = learning_rate(it, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = get_batch(train_data, args.block_size, args.batch_size,
                     torch.Generator().manual_seed(iteration_seed(args.seed, it)), rt.device, (rt.rank, rt.world))
    torch.manual_seed(iteration_seed(args.seed, it, rt.rank))  # dropout masks
    with rt.autocast:
        _, loss = model(x, y)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, lr


def iteration_seed(seed, it, rank=0):
    """Every random draw of iteration it (its batch, its dropout) comes from this seed, so a
    resumed run needs no saved RNG state to continue exactly."""
    return (seed * 1_000_003 + it) * 1024 + rank


# ----------------------------------------------------------------------------- device and processes

class Runtime:
    """Device, precision, the process group and the fused op: what the run needs, not what it computes."""

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
        self.qkv_kernel = None  # the fused op for CRoPE's projection (fused_op.qkv_kernel) or None, set in main

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


# ----------------------------------------------------------------------------- one variant's run

class VariantRun:
    """One variant's model, optimizer, log and checkpoints: restored or initialised, then the loop's steps."""

    def __init__(self, variant, args, data_sha256, tokenizer, rt):
        self.variant, self.tokenizer, self.rt, self.args = variant, tokenizer, rt, args
        self.dir = args.out_dir / variant
        self.last_path, self.best_path = self.dir / "last.pt", self.dir / "best.pt"
        state = load_checkpoint(self.last_path) if args.resume and self.last_path.exists() else None
        self.settings = {**{k: getattr(args, k) for k in RUN_SETTINGS}, "data_sha256": data_sha256}
        self.config, source = variant_model(args, variant, tokenizer, state)
        torch.manual_seed(args.seed)
        # initialised on the CPU: the same weights on every device
        self.model = GPT(self.config).to(rt.device)
        self.optimizer = make_optimizer(self.model, args, rt.device)
        self.start_iter, self.best_val, self.wall_before = self.restore_or_initialise(state, source)
        kernel_line = fused_op.use_kernel(self.model, rt.qkv_kernel)  # layer by layer, where it computes the same
        if self.config.pos == "crope":
            log.info("%s: %s", variant, kernel_line)
        self.saved_iter = state["iter"] if state else None  # the iteration last.pt holds
        self.kept_log = kept_log_rows(self.dir / "log.csv", self.start_iter) if state and rt.main else []
        # the first iteration whose loss is not finite, kept on the device: watching costs no sync per step
        self.nonfinite_iter = torch.tensor(-1, device=rt.device)
        self.val_loss = None  # the validation loss of this iteration, once evaluated

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

    def start(self):
        """The run's log (the rows a resumed run keeps) and clock: wall seconds count from now, plus the run's
        time before a resume; so do ms/iter figures."""
        if self.rt.main:
            self.dir.mkdir(exist_ok=True)
        self.csv_log = CsvLog(self.dir / "log.csv", self.kept_log) if self.rt.main else None
        self.t0 = time.time() - self.wall_before
        self.clock = (time.time(), self.start_iter)

    def evaluate(self, it, model, val_batches):
        """The mean loss over the fixed validation batches (shared among the processes); the best and the last
        model checkpointed."""
        model.eval()
        total = 0.0
        with torch.no_grad():
            for x, y in val_batches[self.rt.rank::self.rt.world]:
                with self.rt.autocast:
                    total += model(x, y)[1].item()
        model.train()
        self.val_loss = self.rt.all_mean(total * self.rt.world / len(val_batches))
        self.check_finite(it)
        if self.rt.main:
            if self.val_loss < self.best_val:
                self.best_val = self.val_loss
                self.checkpoint(it, self.best_path)
            self.checkpoint(it, self.last_path)
        self.clock = (time.time(), it)  # ms/iter counts training steps, not evaluation

    def step(self, it, model, train_data):
        """One optimisation step on iteration it's batch; returns its loss (a tensor) and learning rate."""
        loss, lr = train_step(it, model, self.optimizer, train_data, self.args, self.rt)
        self.nonfinite_iter = torch.where((self.nonfinite_iter < 0) & ~loss.detach().isfinite(), it,
                                          self.nonfinite_iter)
        return loss, lr

    def write_log(self, it, loss=None, lr=None):
        """A row of log.csv and a line of the log for iteration it: its training loss and learning rate (none
        after the last step), and its validation loss if it was evaluated."""
        val, self.val_loss = self.val_loss, None
        row = dict(iter=it, tokens=it * self.args.batch_size * self.args.block_size,
                   val_loss="" if val is None else f"{val:.4f}")
        if loss is not None:
            self.check_finite(it)
            train_loss = self.rt.all_mean(loss.item())
            row.update(train_loss=f"{train_loss:.4f}", lr=f"{lr:.3e}")
        if not self.rt.main:
            return
        self.csv_log.write(**row, wall_seconds=f"{time.time() - self.t0:.2f}")
        if loss is not None:
            seconds, speed = self.speed(it)
            log.info("%s iter %d/%d | loss %.4f%s | lr %.2e | %.1f ms/iter | %s | ETA %s", self.variant, it,
                     self.args.max_iters, train_loss, f" | val {val:.4f}" if val is not None else "", lr,
                     1000 * seconds, speed, format_seconds(seconds * (self.args.max_iters - it)))
        elif val is not None:  # the evaluation after the last step
            log.info("%s iter %d/%d | val %.4f | the end", self.variant, it, self.args.max_iters, val)

    def save_and_stop(self, it):
        """After a stop request: the state after iteration it saved, for --resume."""
        self.check_finite(it)
        if self.rt.main:
            self.checkpoint(it + 1, self.last_path)
            log.info("%s: stopped after iter %d; saved %s. Continue with: python train_shakespeare.py %s", self.variant,
                     it, self.last_path, settings.resume_command(self.args))

    def checkpoint(self, it, path):
        """Save the state before iteration it: resuming from it runs iteration it next."""
        if path == self.last_path:
            self.saved_iter = it
        save_checkpoint(path, dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                                   model_config=asdict(self.config), settings=self.settings, variant=self.variant,
                                   tokenizer=self.tokenizer.state(), iter=it, best_val_loss=self.best_val,
                                   wall_seconds=time.time() - self.t0))

    def check_finite(self, it):
        """Stop with one line at a non-finite training or validation loss, before anything of it is saved."""
        bad_iter = int(self.nonfinite_iter.item())
        bad_val = self.val_loss is not None and not math.isfinite(self.val_loss)
        if not self.rt.any(bad_iter >= 0 or bad_val):
            return
        what = f"the training loss of iteration {bad_iter}" if bad_iter >= 0 else f"the validation loss at iteration {it}"
        kept = f"{self.last_path} holds iteration {self.saved_iter}" if self.saved_iter is not None else \
            "nothing was saved"
        fail(f"{self.variant}: {what} is not finite ({kept}); likely causes: a learning rate too high for "
             "this model (--lr), an unusual --rope_base or --grad_clip 0. Start it again with a lower --lr in another "
             "--out_dir")

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


def format_seconds(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


# ----------------------------------------------------------------------------- the training loop

def train_variant(run, train_data, val_batches, stop):
    """Train one variant from where it stands to max_iters; returns False if stopped early."""
    args, rt = run.args, run.rt
    if run.start_iter >= args.max_iters:
        log.info("%s: already trained to iter %d", run.variant, run.start_iter)
        return True
    # static shapes: the batch never changes
    model = torch.compile(run.model, dynamic=False) if args.compile else run.model
    # evaluation skips the DDP wrapper: its buffer broadcast would need equal batch counts
    train_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) \
        if rt.world > 1 else model
    run.start()
    for it in range(run.start_iter, args.max_iters):
        if it % args.eval_interval == 0:          # evaluate; checkpoint the best and the last model
            run.evaluate(it, model, val_batches)
        loss, lr = run.step(it, train_model, train_data)            # one optimisation step
        logged = it % args.log_interval == 0 or it % args.eval_interval == 0
        if logged:
            run.write_log(it, loss, lr)                             # log.csv and the log
        # Ctrl-C or SIGTERM: save, stop. Several processes agree on it at logged steps only: agreeing waits for
        # every GPU, and the steps in between must not wait for anything
        if (logged or rt.world == 1) and rt.any(stop.requested):
            run.save_and_stop(it)
            return False
    run.evaluate(args.max_iters, model, val_batches)               # the end: a last evaluation and checkpoint
    run.write_log(args.max_iters)
    return True


def main(argv=None):
    args = settings.resolve(argv, description=__doc__)  # settings.py: presets, flags, --resume; checked
    rt = Runtime(args)
    # stdout for the log (stderr is for errors alone); train.log gets it once every check has passed
    log_file = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    logging.basicConfig(level=logging.INFO if rt.main else logging.WARNING, format="%(message)s",
                        handlers=[logging.StreamHandler(sys.stdout), log_file], force=True)
    args.data = data_path(args.data)  # what needs only the flags, the data file and the folder, told at once
    for variant in args.variants:
        if not args.resume and (args.out_dir / variant / "last.pt").exists():
            fail(f"{args.out_dir / variant} already holds a run: pass --resume to continue it, or choose another "
                 "--out_dir")
    if args.warmup_iters >= args.max_iters:
        log.warning("warmup_iters %d is not below max_iters %d: the learning rate rises to %.3g at most, never to "
                    "--lr %g (pass a smaller --warmup_iters)", args.warmup_iters, args.max_iters,
                    learning_rate(args.max_iters - 1, args), args.lr)
    try:
        if not rt.main:  # one process writes the run folder
            return train_all(args, rt, log_file)
        with output_folder(args.out_dir), FolderLock(args.out_dir):  # and one run at a time
            return train_all(args, rt, log_file)
    finally:  # train.log closed, for a caller that trains again in this process (study.py)
        train_log = log_file.target
        log_file.close()  # flushes, and forgets its target without closing it
        if train_log:
            train_log.close()


def train_all(args, rt, log_file):
    """Train every variant of args into args.out_dir, then compare all the runs there."""
    if any(VARIANTS[v]["pos"] == "crope" for v in args.variants):
        try:  # the fused op (built once, self-checked) where --kernel takes it; None: crope.py's code
            rt.qkv_kernel = fused_op.qkv_kernel(rt.device, args.kernel, use="train", bias=args.bias)
        except fused_op.KernelError as e:  # --kernel ext where the op cannot run: no build, no kernels, --bias, ...
            fail(str(e))
    train_data, val_data, tokenizer, data_sha256 = load_dataset(args.data, args.tokenizer, args.block_size)
    check_training_memory(args, tokenizer.vocab_size, rt)
    val_generator = torch.Generator().manual_seed(VAL_SEED)  # train_data stays on the CPU, where batches are drawn
    val_batches = [get_batch(val_data, args.block_size, args.batch_size, val_generator, rt.device)
                   for _ in range(args.eval_iters)]
    stop = StopRequest()
    log.info("settings: %s", ", ".join(f"{k} {v}" for k, v in vars(args).items() if k != "given"))
    log.info("device %s, %s, %d process(es), compile %s, --kernel %s\n%s", rt.device, rt.dtype, rt.world,
             args.compile, args.kernel, parameter_table(args, tokenizer.vocab_size))
    try:
        # every variant restored or initialised before the first step: a bad one fails before any trains
        runs = [VariantRun(variant, args, data_sha256, tokenizer, rt) for variant in args.variants]
        if rt.main:
            log_file.setTarget(logging.FileHandler(args.out_dir / "train.log"))
            log_file.flush()
            log_file.flushLevel = logging.DEBUG  # from now on every line goes to train.log as it comes
        for run in runs:
            if not train_variant(run, train_data, val_batches, stop):
                return 1
    finally:
        stop.restore()
        rt.close()
    if rt.main:
        summary = compare_runs(args.out_dir, first=args.variants)
        log.info("\n%s\n\nwrote %s and %s", summary, args.out_dir / "compare.png", args.out_dir / "summary.md")
    return 0


def parameter_table(args, vocab_size):
    """Parameter counts of every variant next to the equivalent RoPE model, as text."""
    reports = {}
    for variant in dict.fromkeys(args.variants + ["rope"]):
        reports[variant] = meta_model(model_config(args, variant, vocab_size)).param_report()
    lines = ["| part | " + " | ".join(reports) + " |", "|---" * (len(reports) + 1) + "|"]
    for part in ("qkv", "attn_out", "attention", "mlp", "embeddings", "norms", "total"):
        cells = []
        for variant, report in reports.items():
            change = report[part] / reports["rope"][part] - 1 if reports["rope"][part] else 0.0
            cells.append(f"{report[part]:,}" + (f" ({change:+.1%})" if variant != "rope" else ""))
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
