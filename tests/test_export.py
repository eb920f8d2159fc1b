"""export_hf.py: the transformers model loaded from an export computes this project's logits (float32, max
difference below 1e-5 of the largest logit) for every variant, with and without biases, with every context
extension method; greedy generate gives sample.py --top_k 1's tokens; the tokenizers round-trip text as
data.Tokenizer does; bad input is one line and writes nothing."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[hf]): no export tests")
pytest.importorskip("safetensors", reason="safetensors is not installed (pip install -e .[hf]): no export tests")

from conftest import ROOT, error_line  # noqa: E402  (after the skips)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import export_hf  # noqa: E402
import sample  # noqa: E402
import settings  # noqa: E402
import train_shakespeare as ts  # noqa: E402
from crope import GPT, ROPE_SCALINGS, GPTConfig  # noqa: E402
from data import Tokenizer  # noqa: E402
from runs import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from settings import VARIANTS  # noqa: E402

FLOAT32_TOLERANCE = 1e-5  # max |logit difference| / max |logit|
CHARS = "\n !',.:;?ABCDEIJLMNORTUabcdefghiklmnorstuvwyéç—"  # a character vocabulary beyond ASCII
PROMPT = "ROMEO"  # in the vocabulary of conftest's text too
EXPORT_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Everything here reads local files only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def random_model(vocab_size=len(CHARS), block_size=32, **fields):
    """A small GPT with every weight random, LayerNorm gains and all biases too, so that a tensor exported to
    the wrong place (or transposed, or left out) changes the logits. Noise of std 0.2 keeps the float32 model
    within 1e-6 of its float64 self (at 0.5 the attention scores grow so sharp that float32 alone is 1e-5 off)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **fields))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def checkpoint(path, model, tokenizer=None):
    """A checkpoint as train_shakespeare.py writes one (an untrained run's training state)."""
    tokenizer = tokenizer or {"kind": "char", "chars": CHARS}
    optimizer = ts.make_optimizer(model, settings.parse_args([]), torch.device("cpu")).state_dict()
    save_checkpoint(path, dict(model_config=vars(model.config), model=model.state_dict(), tokenizer=tokenizer,
                               optimizer=optimizer, settings={}, variant=model.config.pos, iter=0,
                               best_val_loss=float("inf"), wall_seconds=0.0))
    return path


def export(tmp_path, model, tokenizer=None, name="model"):
    """tmp_path/NAME.pt exported to tmp_path/NAME; the model transformers loads from there, and the folder."""
    out = tmp_path / name
    assert export_hf.main([str(checkpoint(tmp_path / f"{name}.pt", model, tokenizer)), str(out)]) == 0
    return AutoModelForCausalLM.from_pretrained(out), out


def probe(model):
    """Token ids over every position of the model's context, and the model's logits there."""
    c = model.config
    idx = torch.randint(0, c.vocab_size, (2, c.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return idx, model(idx)[0]


def relative_difference(model, exported):
    """max |logit difference| / max |logit| over every position of the model's context."""
    idx, ours = probe(model)
    with torch.no_grad():
        theirs = exported(idx).logits
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_for_every_variant(tmp_path, variant, bias):
    model = random_model(bias=bias, **VARIANTS[variant])
    exported, _ = export(tmp_path, model)
    expected = "GPT2LMHeadModel" if model.config.pos == "learned" else "GPTNeoXForCausalLM"
    assert type(exported).__name__ == expected
    assert relative_difference(model, exported) < FLOAT32_TOLERANCE


# transformers' rope_type for each of crope's methods: static NTK-aware scaling is plain RoPE with a larger base
EXPORTED_ROPE_TYPE = {"extrapolate": "default", "linear": "linear", "ntk": "default", "yarn": "yarn",
                      "llama3": "llama3"}


@pytest.mark.parametrize("method", ROPE_SCALINGS)
@pytest.mark.parametrize("pos", ["rope", "crope"])
def test_extended_context_carries_its_method(tmp_path, pos, method):
    model = random_model(pos=pos).extend_context(80, method)  # trained at 32, s = 2.5
    exported, _ = export(tmp_path, model)
    rope = exported.config.rope_parameters
    assert rope["rope_type"] == EXPORTED_ROPE_TYPE[method] and exported.config.max_position_embeddings == 80
    if method in ("yarn", "llama3"):
        assert rope["factor"] == 2.5 and rope["original_max_position_embeddings"] == 32
    assert relative_difference(model, exported) < FLOAT32_TOLERANCE


def sample_greedy(checkpoint_path, max_new_tokens, capsys):
    """The token ids sample.py --top_k 1 prints after PROMPT (one sample)."""
    capsys.readouterr()
    assert sample.main([str(checkpoint_path), "--start", PROMPT, "--top_k", "1", "--num_samples", "1",
                        "--max_new_tokens", str(max_new_tokens), "--device", "cpu"]) == 0
    text = capsys.readouterr().out.split("\n---------------\n")[0]
    return Tokenizer(**load_checkpoint(checkpoint_path)["tokenizer"]).encode(text)


def generate_greedy(out, max_new_tokens):
    """The token ids transformers' greedy generate gives after PROMPT."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    prompt = tokenizer(PROMPT, return_tensors="pt")
    return model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)[0].tolist()


@pytest.mark.parametrize("variant, method", [(v, None) for v in VARIANTS] + [("crope", "yarn"), ("rope", "linear")])
def test_greedy_generate_equals_sample_top_k_1(tmp_path, capsys, variant, method):
    """To the end of the context: past the trained context for an extended model (trained at 32, run at 64).
    yarn scales the rotary tables too; every method's logits are checked above."""
    model = random_model(**VARIANTS[variant])
    if method is not None:
        model = model.extend_context(64, method)
    _, out = export(tmp_path, model)
    new_tokens = model.config.block_size - len(PROMPT)
    assert generate_greedy(out, new_tokens) == sample_greedy(tmp_path / "model.pt", new_tokens, capsys)


def test_a_trained_run_exports(tmp_path, capsys, full_run):
    """A checkpoint train_shakespeare.py wrote (a run folder, its best.pt): logits and greedy tokens."""
    run, out = full_run / "crope", tmp_path / "hf"
    assert export_hf.main([str(run), str(out)]) == 0
    model = model_from_checkpoint(load_checkpoint(run)).eval()
    assert relative_difference(model, AutoModelForCausalLM.from_pretrained(out)) < FLOAT32_TOLERANCE
    new_tokens = model.config.block_size - len(PROMPT)
    assert generate_greedy(out, new_tokens) == sample_greedy(run, new_tokens, capsys)


def test_character_tokenizer_round_trip(tmp_path):
    _, out = export(tmp_path, random_model(pos="rope"))
    ours, theirs = Tokenizer("char", CHARS), AutoTokenizer.from_pretrained(out)
    text = "ROMEO: Is 't so, Juliet?\n\n  Adieu — ça, été!\n"
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text) and theirs.decode(ids) == text == ours.decode(ids)


def gpt2_tokenizer_or_skip():
    try:  # offline, TIKTOKEN_CACHE_DIR must point at tiktoken's cache files
        import tiktoken
        tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken's gpt2 encoding is not available offline here: {e}")
    return Tokenizer("gpt2")


def test_gpt2_tokenizer_round_trip_and_logits(tmp_path, text_file):
    ours = gpt2_tokenizer_or_skip()
    model = random_model(vocab_size=ours.vocab_size, pos="crope")
    exported, out = export(tmp_path, model, {"kind": "gpt2", "chars": None})
    theirs = AutoTokenizer.from_pretrained(out)
    data = os.environ.get("CROPE_DATA")
    texts = [text_file.read_text(encoding="utf-8"), "I'll say 't is 123,456 ... <|endoftext|>  two  spaces\t\r\n",
             "café 🤗 naïve"]
    if data and os.path.isfile(data):  # tiny Shakespeare where it is here
        texts.append(Path(data).read_text(encoding="utf-8")[:100_000])
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text) and theirs.decode(ids) == text == ours.decode(ids)
    assert relative_difference(model, exported) < FLOAT32_TOLERANCE


# ----------------------------------------------------------------------------- transformers 4.x

TRANSFORMERS4 = "transformers==4.57.*"  # the version llama.cpp's converter pins

# Run under transformers 4.x in a child process: for each export folder, its logits' largest difference from
# those saved beside it (FOLDER.logits.pt), relative to the largest; its tokenizer's ids for a text and that
# text decoded; its end-of-text ids (the config's, the generation config's, the tokenizer's).
TRANSFORMERS4_CHECK = """
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
text, results = sys.argv[1], {"version": transformers.__version__}
for folder in sys.argv[2:]:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    saved = torch.load(folder + ".logits.pt")
    with torch.no_grad():
        theirs = model(saved["idx"]).logits
    ids = tokenizer(text)["input_ids"]
    difference = (saved["logits"] - theirs).abs().max() / saved["logits"].abs().max()
    results[folder] = {"difference": difference.item(), "ids": ids, "text": tokenizer.decode(ids),
                       "eos": [model.config.eos_token_id, model.generation_config.eos_token_id, tokenizer.eos_token_id]}
print(json.dumps(results))
"""


@pytest.fixture(scope="session")
def transformers4():
    """A folder holding transformers 4.57 with the tokenizers and huggingface_hub pip chose for it, to put first
    on a child process's PYTHONPATH: CROPE_TRANSFORMERS4, else ~/.cache/crope-transformers4 (.ci/run installs it
    there). Installed here when missing; the tests that need it skip when it cannot be (offline)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = Path(os.environ.get("CROPE_TRANSFORMERS4") or cache / "crope-transformers4")
    if not list(folder.glob("transformers-4.57.*.dist-info")):
        install = [sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--target", str(folder), TRANSFORMERS4]
        pip = subprocess.run([*install, "--retries", "1", "--timeout", "30"], capture_output=True, text=True,
                             timeout=600)
        if pip.returncode != 0:
            reason = (pip.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot install {TRANSFORMERS4} into {folder} (set CROPE_TRANSFORMERS4 to a copy): {reason}")
    return folder


def check_under_transformers4(transformers4, exports, text):
    """TRANSFORMERS4_CHECK's results for exports ({export folder: the model exported there}) and text."""
    for out, model in exports.items():
        idx, logits = probe(model)
        torch.save({"idx": idx, "logits": logits}, f"{out}.logits.pt")
    path = os.pathsep.join([str(transformers4), *filter(None, [os.environ.get("PYTHONPATH")])])
    child = subprocess.run([sys.executable, "-c", TRANSFORMERS4_CHECK, text, *map(str, exports)], cwd=transformers4,
                           env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout)
    assert results.pop("version").startswith("4.57.")
    return results


def test_transformers4_computes_the_same_logits(tmp_path, transformers4, full_run):
    """transformers 4.x reads rotary_pct, rotary_emb_base and rope_scaling where 5 reads rope_parameters (and
    without them rotates a quarter of each head): the export gives this project's logits there too. A trained
    run, every variant, and each context extension method; the character tokenizer; no end-of-text id."""
    trained, state = tmp_path / "trained", load_checkpoint(full_run / "crope")
    assert export_hf.main([str(full_run / "crope"), str(trained)]) == 0
    exports, vocabularies = {trained: model_from_checkpoint(state).eval()}, {str(trained): state["tokenizer"]["chars"]}
    models = {variant: random_model(**fields) for variant, fields in VARIANTS.items()}
    models |= {f"rope_{method}": random_model(pos="rope").extend_context(80, method) for method in ROPE_SCALINGS}
    for name, model in models.items():
        exports[export(tmp_path, model, name=name)[1]] = model
    text = "ROMEO loves the sun.\n"  # in CHARS and in the trained run's vocabulary
    for out, result in check_under_transformers4(transformers4, exports, text).items():
        assert result["difference"] < FLOAT32_TOLERANCE, out
        assert result["ids"] == Tokenizer("char", vocabularies.get(out, CHARS)).encode(text), out
        assert result["text"] == text, out
        assert result["eos"] == [None, None, None], out


def test_transformers4_reads_the_gpt2_tokenizer(tmp_path, transformers4):
    """GPT-2 tokens under transformers 4.x: the same ids, GPT-2's end of text, the same logits."""
    ours = gpt2_tokenizer_or_skip()
    model = random_model(vocab_size=ours.vocab_size, pos="crope")
    _, out = export(tmp_path, model, {"kind": "gpt2", "chars": None})
    text = "I'll say 't is 123,456 ... <|endoftext|>  café 🤗\n"  # crope reads <|endoftext|> as plain text
    [result] = check_under_transformers4(transformers4, {out: model}, text).values()
    assert result["difference"] < FLOAT32_TOLERANCE
    assert result["ids"] == ours.encode(text) and result["text"] == text
    assert result["eos"] == [50256, 50256, 50256]


def test_a_character_model_has_no_end_of_text(tmp_path):
    """Its vocabulary has none: eos and bos are null in config.json, written out (transformers 4.x's GPT-NeoX
    would take a missing eos_token_id as 2), so that no client takes a character for the end of text."""
    exported, out = export(tmp_path, random_model(pos="rope"))
    tokenizer, config = AutoTokenizer.from_pretrained(out), json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (None, None)
    assert (exported.config.eos_token_id, exported.generation_config.eos_token_id, tokenizer.eos_token) == \
        (None, None, None)


def test_a_gpt2_model_ends_text_as_gpt2_does(tmp_path):
    """GPT-2's <|endoftext|> (50256) is eos and bos, as GPT-2's config has it, yet in text it is read as plain
    text, as this project's GPT-2 tokenizer reads it."""
    ours = gpt2_tokenizer_or_skip()
    exported, out = export(tmp_path, random_model(vocab_size=ours.vocab_size, pos="learned"),
                           {"kind": "gpt2", "chars": None})
    tokenizer, generation = AutoTokenizer.from_pretrained(out), exported.generation_config
    assert (exported.config.eos_token_id, exported.config.bos_token_id) == (50256, 50256)
    assert (generation.eos_token_id, generation.bos_token_id) == (50256, 50256)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token_id) == ("<|endoftext|>", 50256, 50256)
    assert tokenizer("<|endoftext|>")["input_ids"] == ours.encode("<|endoftext|>") != [50256]


def test_force_replaces_an_export(tmp_path):
    model = random_model(pos="rope")
    path = checkpoint(tmp_path / "model.pt", model)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as excinfo:
        export_hf.main([str(path), str(out)])
    assert "--force" in error_line(excinfo) and [p.name for p in out.iterdir()] == ["notes.txt"]
    assert export_hf.main([str(path), str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # files of other names are kept
    assert relative_difference(model, AutoModelForCausalLM.from_pretrained(out)) < FLOAT32_TOLERANCE
    assert [p.name for p in (*tmp_path.iterdir(), *out.iterdir()) if p.name.startswith(".")] == []  # no staging


def test_every_file_is_as_readable_as_a_new_file(tmp_path):
    """Others sharing the folder can load the export: safetensors writes its own file 0600."""
    _, out = export(tmp_path, random_model(pos="rope"))
    plain = tmp_path / "plain"
    plain.write_text("")
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == \
        dict.fromkeys(EXPORT_FILES, stat.S_IMODE(plain.stat().st_mode))


def test_a_killed_exports_staging_folder_is_cleared(tmp_path):
    """What a killed export leaves (its staging folder, half written) is cleared by the next export there, and
    does not make the folder one to refuse without --force."""
    path = checkpoint(tmp_path / "model.pt", random_model(pos="rope"))
    out = tmp_path / "hf"
    stale = out / f"{export_hf.STAGING_PREFIX}k1lled00"  # as tempfile.mkdtemp names it
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert export_hf.main([str(path), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == EXPORT_FILES


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, options): a tmpfs mounted at tmp_path/NAME (a filesystem other than tmp_path's),
    unmounted after the test. Skips where this process may not mount one (only root may, not in every
    container)."""
    mounted = []

    def mount(name, options):
        folder = tmp_path / name
        folder.mkdir()
        if getattr(os, "geteuid", lambda: -1)() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {(result.stderr.strip().splitlines() or ['refused'])[0]}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def read_only_folder(tmp_path, mount_tmpfs):
    """A folder this process cannot write in: mode 0555, or where that does not stop it (root), a read-only
    tmpfs."""
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    if not os.access(folder, os.W_OK):
        yield folder
        folder.chmod(0o755)  # for pytest to delete it
    else:
        folder.rmdir()
        yield mount_tmpfs("read_only", "ro,size=64k")


def test_an_export_onto_a_mount_point(tmp_path, mount_tmpfs):
    """out_dir the root of another filesystem: the export is staged there, not in its parent."""
    model = random_model(pos="rope")
    path = checkpoint(tmp_path / "model.pt", model)
    out = mount_tmpfs("mounted", "size=16m")
    assert os.path.ismount(out)
    assert export_hf.main([str(path), str(out)]) == 0
    assert relative_difference(model, AutoModelForCausalLM.from_pretrained(out)) < FLOAT32_TOLERANCE
    assert sorted(p.name for p in out.iterdir()) == EXPORT_FILES


def test_an_unwritable_destination_is_one_line_and_writes_nothing(tmp_path, read_only_folder):
    path = checkpoint(tmp_path / "model.pt", random_model(pos="rope"))
    for out in (read_only_folder / "hf", read_only_folder):  # a folder to make there, the folder itself
        with pytest.raises(SystemExit) as excinfo:
            export_hf.main([str(path), str(out), "--force"])
        reason = error_line(excinfo).removeprefix(f"error: cannot write {out}: ")
        assert reason in ("Permission denied", "Read-only file system")
        assert list(read_only_folder.iterdir()) == []


def test_a_full_filesystem_is_one_line_and_leaves_nothing(tmp_path, mount_tmpfs):
    path = checkpoint(tmp_path / "model.pt", random_model(pos="rope"))  # 108 kB of weights
    full = mount_tmpfs("full", "size=64k")
    with pytest.raises(SystemExit) as excinfo:
        export_hf.main([str(path), str(full / "hf")])
    assert error_line(excinfo) == f"error: cannot write {full / 'hf'}: No space left on device"
    assert list(full.iterdir()) == []


def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path):
    """Writes fail past 10 kB, as on a full disk: model.safetensors' (safetensors' error, not an OSError)."""
    resource = pytest.importorskip("resource", reason="file size limits are POSIX's")
    path = checkpoint(tmp_path / "model.pt", random_model(pos="rope"))
    out = tmp_path / "new" / "hf"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails rather than kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    before = sorted(p.name for p in tmp_path.iterdir())
    result = subprocess.run([sys.executable, str(ROOT / "export_hf.py"), str(path), str(out)], cwd=tmp_path,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, preexec_fn=limit_file_size,
                            capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stderr) == (1, f"error: cannot write {out}: File too large\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where an empty path would write
    good = checkpoint(tmp_path / "model.pt", random_model(pos="crope"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    alien = tmp_path / "alien.pt"  # this project's keys, a model it does not build
    torch.save({**torch.load(good, weights_only=True), "model_config": {"pos": "alibi"}}, alien)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [([str(foreign), "out"], "not a readable crope checkpoint"),
             ([str(text), "out"], "not a readable crope checkpoint"),
             ([str(alien), "out"], "not a consistent crope checkpoint: model_config: pos must be one of"),
             ([str(tmp_path / "missing.pt"), "out"], "no checkpoint at"),
             ([str(good), str(a_file)], "is a file"),
             ([str(good), "", "--force"], "argument out_dir: an empty path"),
             (["", "out"], "argument checkpoint: an empty path"),
             ([str(good)], "required")]
    for argv, words in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(SystemExit) as excinfo:
            export_hf.main([a if a != "out" else str(tmp_path / "out") for a in argv])
        assert words in error_line(excinfo)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(SystemExit) as excinfo:
        export_hf.main([str(good), str(tmp_path / "out")])
    assert "pip install" in error_line(excinfo) and not (tmp_path / "out").exists()
