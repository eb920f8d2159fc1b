"""
The settings of a training run, resolved in one place: the variants, the presets (nanoGPT's laptop and GPU configs,
the paper's recipe), the flags that override them, and on --resume the checkpoints' settings.

    python settings.py --preset gpu --lr 3e-4     # prints the settings train_shakespeare.py would run with
    python train_shakespeare.py --preset gpu --help
"""

import argparse
import math
import os
import sys
from pathlib import Path

import fused_op
from cli import ArgParser, fail, path_text
from crope import ROPE_SCALINGS
from runs import load_checkpoint

# A variant is a name for a set of GPTConfig fields.
VARIANTS = {
    "learned": dict(pos="learned"),
    "rope": dict(pos="rope"),
    "crope": dict(pos="crope"),
    "crope_full": dict(pos="crope", complex_out=True),  # complex-linear output projection too
}
DEFAULT_VARIANTS = ["crope", "rope"]

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
              lr_decay_iters=None, step_size=1000, gamma=0.8, seed=1337)
# the flags that override a preset's settings, with their types and what they mean
NUMERIC_FLAGS = [("n_layer", int, "transformer blocks"), ("n_head", int, "attention heads"),
                 ("n_embd", int, "width of the residual stream"), ("block_size", int, "context length in tokens"),
                 ("batch_size", int, "sequences per step, over all processes"),
                 ("dropout", float, "dropout probability"), ("rope_base", float, "RoPE's base: theta_j = base^(-2j/d)"),
                 ("max_iters", int, "optimisation steps"), ("lr", float, "peak learning rate"),
                 ("min_lr", float, "cosine schedule: the learning rate it decays to"),
                 ("warmup_iters", int, "linear warmup steps"),
                 ("lr_decay_iters", int, "cosine schedule: the step where min_lr is reached"),
                 ("step_size", int, "step schedule: steps between decays"),
                 ("gamma", float, "step schedule: the factor of each decay"),
                 ("weight_decay", float, "AdamW's, on matrices only"), ("beta1", float, "AdamW's"),
                 ("beta2", float, "AdamW's"), ("grad_clip", float, "gradient norm clipping (0: none)"),
                 ("eval_interval", int, "steps between evaluations and checkpoints"),
                 ("eval_iters", int, "validation batches per evaluation"),
                 ("log_interval", int, "steps between log lines"), ("seed", int, "weights, batches and dropout")]

# What a run is, saved in its checkpoints. On --resume every setting not given on the command line
# comes from the checkpoint, and one given with another value is refused, except RESUME_MAY_CHANGE.
RUN_SETTINGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "rope_base", "batch_size",
                "max_iters", "lr", "min_lr", "warmup_iters", "lr_decay_iters", "schedule", "step_size", "gamma",
                "weight_decay", "beta1", "beta2", "grad_clip", "seed", "tokenizer", "data", "init_from",
                "eval_interval", "eval_iters", "log_interval")
# none changes what the steps compute (the data's content is compared through its sha256; init_from is read only
# when a run starts, so the same checkpoint may be named from another folder)
RESUME_MAY_CHANGE = ("max_iters", "eval_interval", "log_interval", "data", "init_from")


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


def parse_args(argv=None, description=None):
    """The settings of a training command, resolved in one place: COMMON, then the preset's, then the flags given
    (with --resume, restore_settings then adds the checkpoints'). args.given: the run settings that were given.
    description: what --help says first."""
    preset = ArgParser(add_help=False)
    preset.add_argument("--preset", choices=PRESETS, default="cpu")
    defaults = {**COMMON, **PRESETS[preset.parse_known_args(argv)[0].preset]}
    p = ArgParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="cpu", help="base settings; the flags below override them "
                   "(their defaults below are this preset's: see --preset gpu --help)")
    p.add_argument("--variants", type=variant_list,
                   help=f"comma list of the models to train: {', '.join(VARIANTS)} (default: "
                   f"{','.join(DEFAULT_VARIANTS)}; with --resume, the runs in --out_dir)")
    p.add_argument("--data", type=path_text, help="a UTF-8 text file to train on (default: tiny Shakespeare, "
                   "downloaded; or set CROPE_DATA)")
    p.add_argument("--tokenizer", choices=("char", "gpt2"),
                   help=f"characters, or GPT-2 BPE through tiktoken (default: {defaults['tokenizer']})")
    p.add_argument("--out_dir", type=path_text, help="where runs go (default: out/PRESET)")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out_dir exactly where they stopped")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bf16 autocast on GPUs that support it, float32 elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help=f"torch.compile the model (default: {defaults['compile']})")
    p.add_argument("--kernel", choices=fused_op.KERNEL_MODES, default=os.environ.get("CROPE_KERNEL", "auto"),
                   help="CRoPE's Q/K/V projection and rotation: crope.py's code (torch), the fused op of csrc/ "
                   "wherever it computes the same (ext), or the op only where whole training steps measured it faster "
                   "on this GPU, none so far (auto, the default; also set by CROPE_KERNEL)")
    p.add_argument("--init_from", type=path_text, help="start from a checkpoint's weights instead of a random init; "
                   "a rope checkpoint given to a crope variant is projected onto the nearest CRoPE model; a "
                   "--block_size above the checkpoint's extends its context (see --rope_scaling)")
    p.add_argument("--rope_scaling", choices=ROPE_SCALINGS,
                   help="with --init_from and a longer --block_size: how rotary angles reach past the trained "
                   "context (extrapolate: no scaling; linear: position interpolation; ntk; yarn; llama3); "
                   "default: the checkpoint's own method (extrapolate for a model never extended)")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction,
                   help=f"biases in Linears and LayerNorms (default: {defaults['bias']})")
    for name, kind, what in NUMERIC_FLAGS:
        default = "max_iters" if defaults[name] is None else defaults[name]
        p.add_argument(f"--{name}", type=kind, help=f"{what} (default: {default})")
    p.add_argument("--schedule", choices=("cosine", "step"), help="cosine: warmup, cosine decay to min_lr by "
                   f"lr_decay_iters; step: lr *= gamma every step_size (default: {defaults['schedule']})")
    flags = p.parse_args(argv)

    given = {key for key in RUN_SETTINGS if getattr(flags, key) is not None}
    settings = {**defaults, **{key: value for key, value in vars(flags).items()
                               if value is not None or key not in defaults}}
    args = argparse.Namespace(**settings, given=given)
    args.out_dir = Path(args.out_dir or Path("out") / args.preset)
    if args.variants is None and not args.resume:  # --resume finds them in --out_dir
        args.variants = list(DEFAULT_VARIANTS)
    try:  # a bad CROPE_KERNEL (argparse checks only the flag); nothing is built yet
        fused_op.kernel_mode(args.kernel)
    except fused_op.KernelError as e:
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
    """--resume: the runs in args.out_dir (those of --variants, if given) continue, and every run setting not
    given on the command line is taken from their checkpoints."""
    args.variants = args.variants or [v for v in VARIANTS if (args.out_dir / v / "last.pt").exists()]
    saved = {}
    for variant in args.variants:
        path = args.out_dir / variant / "last.pt"
        if path.exists():
            state = load_checkpoint(path)
            saved[variant] = {**state["model_config"], **state["settings"]}
    if not saved:
        fail(f"nothing to resume in {args.out_dir}: no {'/'.join(args.variants) or 'run'} checkpoint there")
    for key in sorted(set(RUN_SETTINGS) - args.given):
        values = {variant: settings[key] for variant, settings in saved.items() if key in settings}
        same = "data_sha256" if key == "data" else key  # data may move: its content must be the same
        if len({repr(settings[same]) for settings in saved.values() if same in settings}) > 1:
            fail(f"the runs in {args.out_dir} were started with different {key} ({values}): "
                 "resume them one at a time with --variants")
        if values:
            setattr(args, key, next(iter(values.values())))


def resolve(argv=None, description=None):
    """The settings a training command runs with: parse_args's, and on --resume its checkpoints', checked; the
    cosine schedule ends at max_iters unless --lr_decay_iters says otherwise."""
    args = parse_args(argv, description)
    if args.resume:
        restore_settings(args)
    check_settings(args)
    args.lr_decay_iters = args.lr_decay_iters or args.max_iters
    return args


def main(argv=None):
    args = resolve(argv, description=__doc__)
    for key, value in vars(args).items():
        if key != "given":
            print(f"{key:15} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
