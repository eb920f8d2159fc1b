"""
The settings of a training run, in one table: each row is a flag (its type, its default in each preset, its help),
whether the run's checkpoints save it (and --resume then restores it), and whether --resume may change it. The
parser, --help, the checkpoint's settings and the resume check are all read off the table.

    python settings.py --preset gpu --lr 3e-4     # prints the settings train_shakespeare.py would run with
    python train_shakespeare.py --preset gpu --help
"""

import argparse
import math
import sys
from dataclasses import dataclass
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

# cpu: nanoGPT's laptop config for shakespeare_char; gpu: nanoGPT's shakespeare_char GPU config; paper: the paper's
# recipe (GPT-2 tokens, block 1024, step decay x0.8 every 1000 iterations)
PRESET_NAMES = ("cpu", "gpu", "paper")


def comma_list(allowed, what):
    """An argparse type: a comma list of names of allowed (a variant, say), each named once."""
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {','.join(unknown) or repr(text)}: "
                                             f"choose from {', '.join(allowed)}")
        if len(set(names)) < len(names):
            raise argparse.ArgumentTypeError(f"{text!r} names a {what} twice: each is trained once")
        return names
    return parse


variant_list = comma_list(VARIANTS, "variant")  # --variants


# The checks of a value (check_settings): None, or what it must be.
def positive(value):
    return None if value > 0 else "must be positive"


def not_negative(value):
    return None if value >= 0 else "must not be negative"


def fraction(value):
    return None if 0 <= value < 1 else "must be in [0, 1)"


def seed_range(value):
    return None if 0 <= value < 2 ** 31 else "must be in [0, 2^31)"


@dataclass(frozen=True)
class Setting:
    """One row of SETTINGS. kind: int, float, bool (--x / --no-x), a tuple of choices, or a function that parses
    the text. default: one value for every preset, or a tuple of one per preset (PRESET_NAMES' order); None means
    what help says. saved: in the run's checkpoints, restored by --resume unless given (a given value must equal
    the checkpoint's unless may_change). check: None, or a function that says what a value must be."""
    name: str
    kind: object
    default: object
    help: str
    saved: bool = True
    may_change: bool = False
    check: object = None

    def value(self, preset):
        return self.default[PRESET_NAMES.index(preset)] if isinstance(self.default, tuple) else self.default


S = Setting
SETTINGS = (
    # how this command runs, not what a run is: never saved
    S("variants", variant_list, None, f"comma list of the models to train: {', '.join(VARIANTS)} (default: "
      f"{','.join(DEFAULT_VARIANTS)}; with --resume, the runs in --out_dir)", saved=False),
    S("out_dir", path_text, None, "where runs go (default: out/PRESET)", saved=False),
    S("device", str, "auto", "auto, cpu, cuda, cuda:N or mps", saved=False),
    S("dtype", ("auto", "float32", "bfloat16"), "auto", "auto: bf16 autocast on GPUs that support it, float32 "
      "elsewhere", saved=False),
    S("compile", bool, (False, True, True), "torch.compile the model", saved=False),
    S("kernel", fused_op.KERNEL_MODES, None, "CRoPE's Q/K/V projection and rotation: crope.py's code (torch), the "
      "fused op of csrc/ wherever it computes the same (ext), or the op only where whole training steps measured it "
      "faster on this GPU, none so far (auto; default: CROPE_KERNEL, else auto)", saved=False),
    # the model
    S("n_layer", int, (4, 6, 4), "transformer blocks", check=positive),
    S("n_head", int, (4, 6, 4), "attention heads", check=positive),
    S("n_embd", int, (128, 384, 128), "width of the residual stream", check=positive),
    S("block_size", int, (64, 256, 1024), "context length in tokens", check=positive),
    S("dropout", float, (0.0, 0.2, 0.0), "dropout probability", check=fraction),
    S("bias", bool, False, "biases in Linears and LayerNorms"),
    S("rope_base", float, 10000.0, "RoPE's base: theta_j = base^(-2j/d)", check=positive),
    # the optimisation
    S("batch_size", int, (12, 64, 16), "sequences per step, over all processes", check=positive),
    S("max_iters", int, (2000, 5000, 10000), "optimisation steps", may_change=True, check=positive),
    S("lr", float, 1e-3, "peak learning rate", check=positive),
    S("min_lr", float, 1e-4, "cosine schedule: the learning rate it decays to", check=not_negative),
    S("warmup_iters", int, (100, 100, 0), "linear warmup steps", check=not_negative),
    S("lr_decay_iters", int, None, "cosine schedule: the step where min_lr is reached (default: max_iters)",
      check=positive),
    S("schedule", ("cosine", "step"), ("cosine", "cosine", "step"),
      "cosine: warmup, cosine decay to min_lr by lr_decay_iters; step: lr *= gamma every step_size"),
    S("step_size", int, 1000, "step schedule: steps between decays", check=positive),
    S("gamma", float, 0.8, "step schedule: the factor of each decay", check=positive),
    S("weight_decay", float, 0.1, "AdamW's, on matrices only", check=not_negative),
    S("beta1", float, 0.9, "AdamW's", check=fraction),
    S("beta2", float, 0.99, "AdamW's", check=fraction),
    S("grad_clip", float, 1.0, "gradient norm clipping (0: none)", check=not_negative),
    S("seed", int, 1337, "weights, batches and dropout", check=seed_range),
    # the data; the data's content is compared through its sha256, so the file may move
    S("tokenizer", ("char", "gpt2"), ("char", "char", "gpt2"), "characters, or GPT-2 BPE through tiktoken"),
    S("data", path_text, None, "a UTF-8 text file to train on (default: tiny Shakespeare, downloaded; or set "
      "CROPE_DATA)", may_change=True),
    # read only when a run starts, so the same checkpoint may be named from another folder
    S("init_from", path_text, None, "start from a checkpoint's weights instead of a random init; a rope checkpoint "
      "given to a crope variant is projected onto the nearest CRoPE model; a --block_size above the checkpoint's "
      "extends its context (see --rope_scaling)", may_change=True),
    S("rope_scaling", ROPE_SCALINGS, None, "with --init_from and a longer --block_size: how rotary angles reach past "
      "the trained context (extrapolate: no scaling; linear: position interpolation; ntk; yarn; llama3); default: "
      "the checkpoint's own method (extrapolate for a model never extended)",
      saved=False),  # a run keeps it in its model_config
    # evaluation and logging; eval_iters sets the fixed validation batches, so it stays
    S("eval_interval", int, 250, "steps between evaluations and checkpoints", may_change=True, check=positive),
    S("eval_iters", int, (20, 200, 20), "validation batches per evaluation", check=positive),
    S("log_interval", int, (10, 10, 50), "steps between log lines", may_change=True, check=positive),
)
del S
RUN_SETTINGS = tuple(s.name for s in SETTINGS if s.saved)  # what a run is: saved in its checkpoints
RESUME_MAY_CHANGE = tuple(s.name for s in SETTINGS if s.may_change)
PRESETS = {preset: {s.name: s.value(preset) for s in SETTINGS} for preset in PRESET_NAMES}


def add_flag(parser, setting, preset):
    """setting's flag, its default left None (so that a given value is told from the default) and named in help."""
    default = setting.value(preset)
    help = setting.help if default is None else f"{setting.help} (default: {default})"
    if setting.kind is bool:
        parser.add_argument(f"--{setting.name}", action=argparse.BooleanOptionalAction, help=help)
    elif isinstance(setting.kind, tuple):
        parser.add_argument(f"--{setting.name}", choices=setting.kind, help=help)
    else:
        parser.add_argument(f"--{setting.name}", type=setting.kind, help=help)


def parse_args(argv=None, description=None):
    """The settings of a training command: the preset's column of SETTINGS, then the flags given (with --resume,
    restore_settings then adds the checkpoints'). args.given: the saved settings that were given. description:
    what --help says first."""
    preset_flag = ArgParser(add_help=False)
    preset_flag.add_argument("--preset", choices=PRESET_NAMES, default="cpu")
    preset = preset_flag.parse_known_args(argv)[0].preset
    p = ArgParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESET_NAMES, default="cpu", help="the column of defaults; the flags below "
                   "override it (their defaults below are this preset's: see --preset gpu --help)")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out_dir exactly where they stopped")
    for setting in SETTINGS:
        add_flag(p, setting, preset)
    flags = p.parse_args(argv)

    given = {key for key in RUN_SETTINGS if getattr(flags, key) is not None}
    args = argparse.Namespace(**{s.name: s.value(preset) if getattr(flags, s.name) is None else getattr(flags, s.name)
                                 for s in SETTINGS}, preset=preset, resume=flags.resume, given=given)
    args.out_dir = Path(args.out_dir or Path("out") / args.preset)
    if args.variants is None and not args.resume:  # --resume finds them in --out_dir
        args.variants = list(DEFAULT_VARIANTS)
    try:  # the mode (a bad CROPE_KERNEL: argparse checks only the flag); nothing is built yet
        args.kernel = fused_op.kernel_mode(args.kernel)
    except fused_op.KernelError as e:
        fail(str(e))
    return args


def check_settings(args):
    """Refuse values no run can use, before anything is written: every float finite, then each row's check."""
    for setting in SETTINGS:
        value = getattr(args, setting.name)
        if value is None or setting.check is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{setting.name} must be a finite number, got {value}")
        problem = setting.check(value)
        if problem:
            fail(f"--{setting.name} {problem}, got {value}")


def restore_settings(args):
    """--resume: the runs in args.out_dir (those of --variants, if given: a named one not there starts) continue, and
    every saved setting not given on the command line is taken from their checkpoints."""
    args.variants = args.variants or [v for v in VARIANTS if (args.out_dir / v / "last.pt").exists()]
    saved = {}
    for variant in args.variants:
        path = args.out_dir / variant / "last.pt"
        if path.exists():
            state = load_checkpoint(path)
            missing = [key for key in (*RUN_SETTINGS, "data_sha256") if key not in state["settings"]]
            if missing:
                fail(f"cannot resume {path}: its settings lack {', '.join(missing)} (it was not written by "
                     "train_shakespeare.py); start a new run in another --out_dir")
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


def resume_command(args):
    """The flags that continue this command where it stopped: --resume, the folder, every variant it was asked to
    train (those not started yet too), and how it ran where that is not the preset's default (the flags that no
    checkpoint saves: --preset, --compile, --kernel, --device, --dtype)."""
    flags = ["--resume", "--out_dir", str(args.out_dir), "--variants", ",".join(args.variants)]
    flags += ["--preset", args.preset] if args.preset != "cpu" else []
    for setting in SETTINGS:
        value, default = getattr(args, setting.name), setting.value(args.preset)
        if default is None:  # --kernel's: CROPE_KERNEL, else auto
            default = "auto"
        if setting.saved or setting.name in ("variants", "out_dir", "rope_scaling") or value == default:
            continue  # a run keeps its rope_scaling in its model_config
        flags += [f"--{'' if value else 'no-'}{setting.name}"] if setting.kind is bool else [f"--{setting.name}",
                                                                                              str(value)]
    return " ".join(flags)


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
