"""
Export a checkpoint to a Hugging Face transformers checkpoint, which transformers loads with no code
from this project (no trust_remote_code):

    python export_hf.py out/cpu/crope hf/crope                  # best.pt of that run
    python export_hf.py out/ft128/crope/last.pt hf/crope128 --force

rope, crope and crope_full models become GPTNeoXForCausalLM (a CRoPE model through its RoPE form,
GPT.to_rope()), learned ones GPT2LMHeadModel; an extended context carries its rope_scaling method.
OUT_DIR gets config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json, which transformers 5 and 4.x (checked with 4.57) read alike: config.json holds
4.x's rotary keys beside 5's rope_parameters. A GPT-2-token model ends text with GPT-2's <|endoftext|>
(50256, its bos and eos); a character vocabulary has no end-of-text token, so eos_token_id is null and
generation runs to its length. Then, in Python:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = AutoModelForCausalLM.from_pretrained("hf/crope"), AutoTokenizer.from_pretrained("hf/crope")
    print(tokenizer.decode(model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=50)[0]))

Needs transformers and safetensors (pip install -e .[hf]); a GPT-2-token model needs tiktoken's files
(offline: TIKTOKEN_CACHE_DIR).
"""

import argparse
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from crope import llama3_frequencies, ntk_base, yarn_attention_scale, yarn_frequencies
from cli import ArgParser, fail, path_text
from data import loading_tiktoken
from runs import load_checkpoint, model_from_checkpoint

# The two files of tiktoken's "gpt2" encoding (tiktoken_ext.openai_public), with their sha256: GPT-2's
# byte-level BPE, which transformers' GPT2Tokenizer reads as its vocab and merges.
GPT2_ENCODER_JSON = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
GPT2_VOCAB_BPE = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")
GPT2_END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token, id 50256


def parse_args(argv=None):
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=path_text, help="a checkpoint file, or a run folder (its best.pt)")
    p.add_argument("out_dir", type=path_text, help="the folder to write; it must be new or empty unless --force")
    p.add_argument("--force", action="store_true",
                   help="write into a folder that is not empty, replacing the files of the same names")
    return p.parse_args(argv)


def import_transformers():
    """transformers, once it and safetensors are importable; else one line that says how to install them."""
    try:
        import safetensors  # noqa: F401  (save_pretrained writes model.safetensors with it)
        import transformers
    except ImportError as e:
        fail(f"the export needs transformers and safetensors ({e}): pip install -e .[hf] "
             "(or pip install 'transformers>=5' safetensors)")
    if int(transformers.__version__.split(".")[0]) < 5:  # rope_parameters and tokenizers built from a vocab
        fail(f"the export needs transformers 5 or later, found {transformers.__version__}: "
             "pip install -U 'transformers>=5'")
    transformers.logging.set_verbosity_error()  # its notes on defaults it fills in are not the user's business
    transformers.logging.disable_progress_bar()
    return transformers


# ----------------------------------------------------------------------------- rotary embeddings

def keyword_defaults(function):
    """A frequency function's keyword defaults: crope names them as transformers' rope_parameters do. As
    floats: transformers 4.x warns about an int there."""
    return {name: float(p.default) for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def rope_parameters(config):
    """GPT-NeoX's rope_parameters for a rope model's config: the same theta_j and the same table scale."""
    s, base = config.context_scale, config.rope_base
    rope_type = config.rope_scaling if s != 1 else "extrapolate"  # at s = 1 every method keeps theta_j
    if rope_type == "extrapolate":
        return {"rope_type": "default", "rope_theta": base}
    if rope_type == "ntk":  # static NTK-aware scaling is plain RoPE with a larger base (transformers' "dynamic" is not)
        return {"rope_type": "default", "rope_theta": ntk_base(config.head_size, base, s)}
    parameters = {"rope_type": rope_type, "rope_theta": base, "factor": s}
    if rope_type == "yarn":
        parameters |= {"original_max_position_embeddings": config.trained_block_size,
                       "attention_factor": yarn_attention_scale(s), **keyword_defaults(yarn_frequencies)}
    elif rope_type == "llama3":
        parameters |= {"original_max_position_embeddings": config.trained_block_size,
                       **keyword_defaults(llama3_frequencies)}
    return parameters


def transformers4_keys(config):
    """What transformers 4.x's GPT-NeoX reads instead of rope_parameters, beside them in config.json: it rotates
    rotary_pct of each head (0.25 when the key is absent), at rotary_emb_base, scaled as rope_scaling says (None:
    plain RoPE). 4.57 knows every rope_type rope_parameters() writes. transformers 5 reads these keys too, the
    same values; a GPT-2 config has none."""
    if config.model_type != "gpt_neox":
        return {}
    scaling = dict(config.rope_parameters)
    base, fraction = scaling.pop("rope_theta"), scaling.pop("partial_rotary_factor")
    return {"rotary_pct": fraction, "rotary_emb_base": base,
            "rope_scaling": None if scaling["rope_type"] == "default" else scaling}


# ----------------------------------------------------------------------------- weights

def weight_and_bias(prefix, module, bias=True, transpose=False):
    """{prefix.weight, prefix.bias} of a Linear or LayerNorm; a module without a bias gets zeros."""
    tensors = {f"{prefix}.weight": module.weight.T if transpose else module.weight}
    if bias:
        tensors[f"{prefix}.bias"] = module.bias if module.bias is not None else torch.zeros(module.weight.size(0))
    return tensors


def neox_qkv(tensor, n_head):
    """c_attn's rows (or bias) [q heads | k heads | v heads] -> GPT-NeoX's [q_h | k_h | v_h] for each head h,
    with q and k rows in half-split order: GPT-NeoX rotates coordinate i with i + hs/2, crope the
    interleaved pair (2j, 2j+1), both at theta_j. Rows 2j -> j and 2j+1 -> j + hs/2 in q and k alike
    leave every q . k as it was."""
    qkv = tensor.unflatten(0, (3, n_head, -1))                     # (3, nh, hs, ...)
    hs = qkv.size(2)
    half_split = torch.cat((torch.arange(0, hs, 2), torch.arange(1, hs, 2)))
    qkv = torch.cat((qkv[:2, :, half_split], qkv[2:]))
    return qkv.transpose(0, 1).flatten(0, 2)                       # (nh, 3, hs, ...) -> (3 C, ...)


def neox_weights(model):
    """GPTNeoXForCausalLM's state dict from a pos="rope" GPT's."""
    c, t = model.config, model.transformer
    state = {"gpt_neox.embed_in.weight": t.wte.weight, "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(t.h):
        layer = f"gpt_neox.layers.{i}"
        state |= weight_and_bias(f"{layer}.input_layernorm", block.ln_1)
        state[f"{layer}.attention.query_key_value.weight"] = neox_qkv(block.attn.c_attn.weight, c.n_head)
        if c.bias:
            state[f"{layer}.attention.query_key_value.bias"] = neox_qkv(block.attn.c_attn.bias, c.n_head)
        state |= weight_and_bias(f"{layer}.attention.dense", block.attn.c_proj, bias=c.bias)
        state |= weight_and_bias(f"{layer}.post_attention_layernorm", block.ln_2)
        state |= weight_and_bias(f"{layer}.mlp.dense_h_to_4h", block.mlp.c_fc)
        state |= weight_and_bias(f"{layer}.mlp.dense_4h_to_h", block.mlp.c_proj)
    return state | weight_and_bias("gpt_neox.final_layer_norm", t.ln_f)


def gpt2_weights(model):
    """GPT2LMHeadModel's state dict from a pos="learned" GPT's: the names are GPT-2's already; GPT-2's
    Conv1D holds a Linear's weight transposed, and every Linear and LayerNorm there has a bias."""
    t = model.transformer
    state = {"transformer.wte.weight": t.wte.weight, "transformer.wpe.weight": t.wpe.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(t.h):
        layer = f"transformer.h.{i}"
        state |= weight_and_bias(f"{layer}.ln_1", block.ln_1)
        state |= weight_and_bias(f"{layer}.attn.c_attn", block.attn.c_attn, transpose=True)
        state |= weight_and_bias(f"{layer}.attn.c_proj", block.attn.c_proj, transpose=True)
        state |= weight_and_bias(f"{layer}.ln_2", block.ln_2)
        state |= weight_and_bias(f"{layer}.mlp.c_fc", block.mlp.c_fc, transpose=True)
        state |= weight_and_bias(f"{layer}.mlp.c_proj", block.mlp.c_proj, transpose=True)
    return state | weight_and_bias("transformer.ln_f", t.ln_f)


def hf_model(model, transformers, end_of_text):
    """The transformers model equal to a GPT: GPT-NeoX for rotary positions, GPT-2 for learned ones.
    Inference settings: no dropout; bos and eos the tokenizer's end-of-text id (None for a character model,
    whose generation stops at its length, as sample.py's does)."""
    c = model.config
    common = dict(vocab_size=c.vocab_size, tie_word_embeddings=True, bos_token_id=end_of_text,
                  eos_token_id=end_of_text, pad_token_id=None, dtype=model.lm_head.weight.dtype)
    eps = model.transformer.ln_f.eps
    if c.pos == "learned":
        config = transformers.GPT2Config(n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                                         n_head=c.n_head, activation_function="gelu", layer_norm_epsilon=eps,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        architecture, weights = transformers.GPT2LMHeadModel, gpt2_weights(model)
    else:
        if c.pos == "crope":  # a CRoPE model is a RoPE model with structured weights
            model = model.to_rope()
        config = transformers.GPTNeoXConfig(
            hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
            intermediate_size=4 * c.n_embd, hidden_act="gelu", max_position_embeddings=c.block_size,
            rope_parameters={**rope_parameters(c), "partial_rotary_factor": 1.0}, use_parallel_residual=False,
            layer_norm_eps=eps, attention_bias=c.bias, hidden_dropout=0.0, attention_dropout=0.0, **common)
        architecture, weights = transformers.GPTNeoXForCausalLM, neox_weights(model)
    exported = architecture(config).eval()
    exported.load_state_dict({name: w.detach().contiguous() for name, w in weights.items()})  # strict: every weight
    return exported


# ----------------------------------------------------------------------------- the tokenizer

def gpt2_vocab_and_merges():
    """GPT-2's BPE vocabulary (token -> id) and merges, read as tiktoken reads them (from its cache if there)."""
    with loading_tiktoken("tiktoken's gpt2 files"):
        from tiktoken.load import read_file_cached
        vocab = json.loads(read_file_cached(*GPT2_ENCODER_JSON))
        lines = read_file_cached(*GPT2_VOCAB_BPE).decode("utf-8").split("\n")
    return vocab, [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"


def hf_tokenizer(tokenizer_state, block_size, transformers):
    """The transformers tokenizer that encodes and decodes as data.Tokenizer(**tokenizer_state) does. A GPT-2
    one has GPT-2's end-of-text token (50256) as its bos and eos, as GPT-2's own has, yet reads the text
    "<|endoftext|>" as plain text, as crope's GPT-2 tokenizer does (encode_ordinary): split_special_tokens.
    A character vocabulary has no end-of-text token: no special tokens."""
    settings = dict(model_max_length=block_size, clean_up_tokenization_spaces=False)
    if tokenizer_state["kind"] == "gpt2":
        vocab, merges = gpt2_vocab_and_merges()
        return transformers.GPT2Tokenizer(vocab=vocab, merges=merges, bos_token=GPT2_END_OF_TEXT,
                                          eos_token=GPT2_END_OF_TEXT, unk_token=None, split_special_tokens=True,
                                          **settings)
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    chars = tokenizer_state["chars"]
    characters = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}))
    characters.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character a token
    characters.decoder = decoders.Fuse()  # join the tokens as they are, with no spaces between
    return transformers.PreTrainedTokenizerFast(tokenizer_object=characters, **settings)


# ----------------------------------------------------------------------------- writing

STAGING_PREFIX = ".export_hf."  # the folder inside out_dir that an export is saved in before its files move up


def is_staging(path):
    return path.is_dir() and path.name.startswith(STAGING_PREFIX)


def check_out_dir(out_dir, force):
    """out_dir is a folder, new or empty, or --force; a killed export's staging folder does not count."""
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"{out_dir} is a file: name a folder for the export")
    if out_dir.is_dir() and any(not is_staging(p) for p in out_dir.iterdir()) and not force:
        fail(f"{out_dir} is not empty: choose a new folder, or add --force to replace the export's files there")


def save(folder, model, tokenizer):
    """The export's files, with what transformers 4.x reads beside what 5 writes: the rotary keys, and a
    tokenizer class both know (5 names its own TokenizersBackend, which 4.x lacks)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    update_json(folder / "config.json", transformers4_keys(model.config))
    update_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})


def update_json(path, keys):
    """Add keys to a JSON file, written as transformers writes its own."""
    settings = json.loads(path.read_text(encoding="utf-8")) | keys
    path.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def failure_reason(error):
    """An OSError's reason ("No space left on device"), also where safetensors reports one as text."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    code = re.search(r"os error (\d+)", str(error))
    return os.strerror(int(code.group(1))) if code else str(error)


def write_export(out_dir, model, tokenizer):
    """Save into a new folder inside out_dir, then move the files up: renames on out_dir's own filesystem
    (out_dir may be a mount point), so an interrupted export leaves out_dir's files as they were, and at most
    its staging folder (killed), which the next export clears. A failed or interrupted one removes the
    folders it made."""
    from safetensors import SafetensorError  # model.safetensors' write fails with one, not an OSError

    made = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]
    staging, done = None, False
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in filter(is_staging, out_dir.iterdir()):
            shutil.rmtree(stale)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
        save(staging, model, tokenizer)
        files, mode = sorted(staging.iterdir()), 0o666 & ~current_umask()
        for file in files:
            file.chmod(mode)  # as any new file: safetensors writes its own 0600
            file.replace(out_dir / file.name)
        done = True
    except (OSError, SafetensorError) as e:
        fail(f"cannot write {out_dir}: {failure_reason(e)}")
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if made and not done:
            shutil.rmtree(made[-1], ignore_errors=True)
    return [file.name for file in files]


def current_umask():
    """The process's umask, which can only be read by setting it (and setting it back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def positions(config):
    """How an exported config places positions, in a few words."""
    if config.model_type == "gpt2":
        return f"learned positions, context {config.n_positions}"
    rope = config.rope_parameters
    factor = f", factor {rope['factor']:g}" if "factor" in rope else ""
    return (f"rope_type {rope['rope_type']}, rope_theta {rope['rope_theta']:g}{factor}, "
            f"context {config.max_position_embeddings}")


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    check_out_dir(out_dir, args.force)
    transformers = import_transformers()
    state = load_checkpoint(args.checkpoint)  # checked whole: config, weights, tokenizer against the vocabulary
    model = model_from_checkpoint(state).eval()
    tokenizer = hf_tokenizer(state["tokenizer"], model.config.block_size, transformers)
    with torch.no_grad():
        exported = hf_model(model, transformers, tokenizer.eos_token_id)
    files = write_export(out_dir, exported, tokenizer)
    print(f"wrote {out_dir}: {type(exported).__name__} ({positions(exported.config)}; "
          f"{state['tokenizer']['kind']} tokens): {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
