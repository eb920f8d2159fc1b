"""Every bad input the README promises to refuse: one line starting with "error:", a non-zero exit, no
traceback, and the files of an existing run exactly as they were."""

import os
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import runs
import sample
import study
import train_shakespeare as ts
from conftest import ROOT, SMALL, error_line, losses

TOOLS = {"train": ts.main, "sample": sample.main, "study": study.main}
TRAIN = [*SMALL, "--data", "{text}", "--max_iters", "5", "--out_dir", "{tmp}"]  # a later --out_dir wins

BAD_INPUTS = [  # (tool, arguments, what the error line says); {names} are the files of the fixture below
    # flags and values
    ("train", [*TRAIN, "--variants", "crope,alibi"], "unknown variant alibi"),
    ("train", [*TRAIN, "--variants", "crope,crope"], "names a variant twice"),
    ("train", [*TRAIN, "--variants", ","], "unknown variant"),
    ("train", [*TRAIN, "--max_iters", "abc"], "invalid int value: 'abc'"),
    ("train", [*TRAIN, "--tokenizer", "bpe"], "invalid choice: 'bpe'"),
    ("train", [*TRAIN, "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("train", [*TRAIN, "--batch_size", "0"], "--batch_size must be positive"),
    ("train", [*TRAIN, "--max_iters", "-5"], "--max_iters must be positive"),
    ("train", [*TRAIN, "--eval_iters", "0"], "--eval_iters must be positive"),
    ("train", [*TRAIN, "--n_head", "0"], "--n_head must be positive"),
    ("train", [*TRAIN, "--lr", "nan"], "--lr must be a finite number, got nan"),
    ("train", [*TRAIN, "--min_lr", "nan"], "--min_lr must be a finite number, got nan"),
    ("train", [*TRAIN, "--lr_decay_iters", "0"], "--lr_decay_iters must be positive"),
    ("train", [*TRAIN, "--schedule", "step", "--step_size", "0"], "--step_size must be positive"),
    ("train", [*TRAIN, "--weight_decay", "-1"], "--weight_decay must not be negative"),
    ("train", [*TRAIN, "--grad_clip", "-1"], "--grad_clip must not be negative"),
    ("train", [*TRAIN, "--beta1", "1.5"], "--beta1 must be in [0, 1)"),
    ("train", [*TRAIN, "--beta2", "-0.5"], "--beta2 must be in [0, 1)"),
    ("train", [*TRAIN, "--dropout", "1"], "--dropout must be in [0, 1)"),
    ("train", [*TRAIN, "--seed", "1000000000000000"], "--seed must be in [0, 2^31)"),
    ("train", [*TRAIN, "--seed", "-1"], "--seed must be in [0, 2^31)"),
    ("train", [*TRAIN, "--rope_base", "0"], "--rope_base must be positive, got 0.0"),
    ("train", [*TRAIN, "--rope_base", "-2"], "--rope_base must be positive, got -2.0"),
    ("train", [*TRAIN, "--n_embd", "12", "--n_head", "4"], "must be even"),
    ("train", [*TRAIN, "--n_embd", "30", "--n_head", "4"], "multiple of n_head"),
    ("train", [*TRAIN, "--n_embd", "2000000"], "gradients, AdamW state and activations) needs about"),
    ("train", [*TRAIN, "--n_layer", "1000000"], "gradients, AdamW state and activations) needs about"),
    ("train", [*TRAIN, "--batch_size", "10000000000"], "gradients, AdamW state and activations) needs about"),
    ("train", [*TRAIN, "--eval_iters", "1000000000"], "gradients, AdamW state and activations) needs about"),
    ("train", [*TRAIN, "--device", "cuda:7"], "not available"),
    ("train", [*TRAIN, "--device", "cpu:1"], "--device cpu:1 is not available"),
    ("train", [*TRAIN, "--device", "tpu"], "unknown --device 'tpu'"),
    ("train", [*TRAIN, "--rope_scaling", "yarn"], "use it with --init_from"),
    # data
    ("train", [*TRAIN, "--data", "/nonexistent/file.txt"], "no data file"),
    ("train", [*TRAIN, "--data", ""], "argument --data: an empty path"),
    ("train", [*TRAIN, "--data", "{empty}"], "is empty"),
    ("train", [*TRAIN, "--data", "{binary}"], "not UTF-8"),
    ("train", [*TRAIN, "--block_size", "4000"], "needs more than 4000 tokens"),
    # the run folder
    ("train", [*TRAIN, "--out_dir", "{binary}"], "cannot write into --out_dir"),
    ("train", [*TRAIN, "--out_dir", "{binary}/sub"], "cannot write into --out_dir"),
    ("train", [*TRAIN, "--out_dir", "/proc/crope_run"], "cannot write into --out_dir"),
    ("train", [*TRAIN, "--out_dir", ""], "argument --out_dir: an empty path"),
    ("train", [*TRAIN, "--out_dir", "{lock_folder}"], "cannot use"),
    ("train", [*TRAIN, "--out_dir", "{busy}"], "is in use by another run"),
    ("train", [*TRAIN, "--variants", "rope,learned", "--out_dir", "{run}"], "already holds a run"),
    ("train", [*TRAIN, "--variants", "learned,crope", "--out_dir", "{run}"], "already holds a run"),
    ("train", [*TRAIN, "--resume"], "nothing to resume"),
    ("train", [*TRAIN, "--resume", "--n_layer", "3", "--out_dir", "{run}"], "different settings: n_layer"),
    ("train", [*TRAIN, "--resume", "--eval_iters", "7", "--out_dir", "{run}"], "different settings: eval_iters"),
    ("train", [*TRAIN, "--resume", "--max_iters", "60", "--out_dir", "{bad_log}"], "not a readable training log"),
    ("train", [*TRAIN, "--resume", "--max_iters", "60", "--out_dir", "{nan_run}"], "weights that are not finite"),
    ("train", [*TRAIN, "--resume", "--max_iters", "60", "--out_dir", "{forged_run}"],
     "model_config has unknown fields colour"),
    # starting from weights
    ("train", [*TRAIN, "--init_from", "/nonexistent.pt"], "no checkpoint at"),
    ("train", [*TRAIN, "--init_from", "{corrupt}"], "not a readable crope checkpoint"),
    ("train", [*TRAIN, "--init_from", ""], "argument --init_from: an empty path"),
    ("train", [*TRAIN, "--variants", "crope", "--init_from", "{run}/crope", "--data", "{other_chars}"],
     "was trained on other tokens"),
    ("train", [*TRAIN, "--variants", "crope", "--init_from", "{forged}/wide.pt"],
     "transformer.wte.weight has shape (32, 32), its model_config needs (32, 36)"),
    ("train", [*TRAIN, "--variants", "crope", "--init_from", "{forged}/short_chars.pt"],
     "does not hold 32 distinct characters"),
    ("train", [*TRAIN, "--init_from", "{run}/crope", "--block_size", "16"],
     "lengthens the context"),
    ("train", [*TRAIN, "--init_from", "{run}/crope", "--n_embd", "64"],
     "has a different model: n_embd"),
    # training that diverges
    ("train", [*TRAIN, "--lr", "1e4", "--max_iters", "30"], "is not finite"),
    # sampling
    ("sample", ["{tmp}/nope.pt"], "no checkpoint at"),
    ("sample", ["{corrupt}"], "not a readable crope checkpoint"),
    ("sample", ["{nan_run}/crope/last.pt"], "weights that are not finite"),
    ("sample", ["{old_pickle}"], "not a readable crope checkpoint (UnpicklingError)"),
    ("sample", ["{forged}/unknown_field.pt"], "model_config has unknown fields colour"),
    ("sample", ["{forged}/wide.pt"], "transformer.wte.weight has shape (32, 32), its model_config needs (32, 36)"),
    ("sample", ["{forged}/bogus_pos.pt"], "model_config: pos must be one of learned, rope, crope, got 'bogus'"),
    ("sample", ["{forged}/text_n_head.pt"], "model_config n_head '2' is not of type int"),
    ("sample", ["{forged}/deep.pt"], "its model_config has n_layer 1000000, its weights 2 layers"),
    ("sample", ["{forged}/extra_weight.pt"], "weight extra is not in the model of its model_config"),
    ("sample", ["{forged}/short_chars.pt"], "does not hold 32 distinct characters"),
    ("sample", ["{forged}/repeated_chars.pt"], "does not hold 32 distinct characters"),
    ("sample", ["{forged}/gpt2_tokens.pt"], "a gpt2 tokenizer has 50257 tokens, its model_config vocab_size 32"),
    ("sample", ["{forged}/no_chars.pt"], "its tokenizer is not a dict of kind and chars"),
    ("sample", ["{forged}/text_iter.pt"], "its iter is not of type int"),
    ("sample", ["{forged}/no_param_groups.pt"], "its optimizer state has no parameter groups"),
    ("sample", ["{forged}/few_params.pt"], "its optimizer holds 13 parameters, its model 14"),
    ("train", [*TRAIN, "--resume", "--out_dir", "{no_lr_run}"], "/crope/last.pt: its settings lack lr (it was not"),
    ("sample", [""], "argument checkpoint: an empty path"),
    ("sample", ["{run}/crope", "--temperature", "nan"], "--temperature must be a positive number"),
    ("sample", ["{run}/crope", "--temperature", "0"], "--temperature must be a positive number"),
    ("sample", ["{run}/crope", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
    ("sample", ["{run}/crope", "--temperature", "1e-300"], "--temperature must be at least 0.001"),
    ("sample", ["{run}/crope", "--seed", "1e30"], "invalid int value: '1e30'"),
    ("sample", ["{run}/crope", "--seed", str(10 ** 30)], "--seed must be in [0, 2^63)"),
    ("sample", ["{run}/crope", "--start", "FILE:{binary}"], "is not UTF-8 text"),
    ("sample", ["{run}/crope", "--start", "FILE:/nonexistent.txt"], "no prompt file"),
    ("sample", ["{run}/crope", "--start", "Zebra"], "not in the model's vocabulary"),
    ("sample", ["{run}/crope", "--block_size", "16"], "lengthens the context"),
    ("sample", ["{run}/crope", "--rope_scaling", "yarn"], "give the context with --block_size"),
    ("sample", ["{run}/crope", "--block_size", "1000000000000"], "a context of 1000000000000 tokens needs about"),
    ("sample", ["{run}/crope", "--num_samples", "1000000000"], "sampling 1000000000 x 501 tokens"),
    ("sample", ["{run}/crope", "--max_new_tokens", "1000000000000"], "x 1000000000001 tokens with a context of 32"),
    ("sample", ["{run}/crope", "--out_dir", "{run}/rope"], "name the checkpoint once"),
    ("sample", ["{run}/crope", "--block_size", "64", "--rope_scaling", "rotate"], "invalid choice: 'rotate'"),
    # the study
    ("study", ["seeds", "--out_dir", "{tmp}", "--seeds", "a,b"], "not a comma list of integers"),
    ("study", ["seeds", "--out_dir", "{tmp}", "--seed", "3"], "pass --seeds 3, not --seed 3"),
    ("study", ["seeds", "--out_dir", "{tmp}", "--variants", "crope,xpos"], "unknown variant xpos"),
    ("study", ["scaling", "--out_dir", "{tmp}", "--configs", "block64,block1024"], "unknown configuration block1024"),
    ("study", ["scaling", "--out_dir", "{tmp}", "--configs", "block64,block64"], "names a configuration twice"),
    ("study", ["scaling", "--out_dir", "{tmp}", "--block_size=32"], "configuration block64 sets --block_size itself"),
    ("study", ["scaling", "--out_dir", "{tmp}", "--configs", "gpu", "--max_iters", "10"],
     "configuration gpu sets --max_iters itself"),
    ("study", ["energy", "{run}/rope/last.pt", "--out_dir", "{tmp}", "--max_iters", "5"], "unknown arguments"),
    ("study", ["energy", "{run}/crope/last.pt", "--out_dir", "{tmp}"], "energy reads RoPE checkpoints"),
    ("study", ["energy", "{run}/rope/last.pt", "--out_dir", "{binary}"], "cannot write into --out_dir"),
    ("study", ["energy", "{run}/rope/last.pt", "--out_dir", "/proc/crope_study"], "cannot write into --out_dir"),
    ("study", ["energy", "{forged}/wide.pt", "--out_dir", "{tmp}"], "not a consistent crope checkpoint"),
    ("study", ["seeds", "--out_dir", ""], "argument --out_dir: an empty path"),
    ("study", ["equal", "--out_dir", "{tmp}", "--baseline", ""], "argument --baseline: an empty path"),
    ("study", ["extrapolate", "--out_dir", "{tmp}", "--baseline", "{tmp}", "--finetune_block", "0"],
     "argument --finetune_block: '0' is not a positive int"),
    ("study", ["extrapolate", "--out_dir", "{tmp}", "--baseline", "{tmp}", "--finetune_block", "-4"],
     "argument --finetune_block: '-4' is not a positive int"),
    ("study", ["extrapolate", "--out_dir", "{tmp}", "--baseline", "{tmp}", "--tokens", "0"],
     "argument --tokens: '0' is not a positive int"),
    ("study", ["extrapolate", "--out_dir", "{tmp}", "--baseline", "{tmp}", "--finetune_lr", "nan"],
     "argument --finetune_lr: 'nan' is not a positive float"),
    ("study", ["project", "--out_dir", "{tmp}", "--baseline", "{tmp}", "--finetune_iters", "-1"],
     "argument --finetune_iters: '-1' is not a positive int"),
    ("study", ["extrapolate", "--out_dir", "{tmp}", "--baseline", "{run_seeds}", "--seeds", "0", "--lengths", "32,64",
               "--finetune_block", "32"], "--finetune_block must be above the context the baseline was trained at"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, text_file, full_run):
    """A finished run, runs with a broken log, diverged weights or an inconsistent checkpoint, checkpoints whose
    parts disagree, a busy folder, odd files."""
    base = tmp_path_factory.mktemp("bad_input")
    run = base / "run"
    shutil.copytree(full_run, run)
    bad_log = base / "bad_log"
    shutil.copytree(full_run, bad_log)
    for variant in ("crope", "rope"):
        (bad_log / variant / "log.csv").write_bytes(b"\xff\xfe not a log \x00")
    nan_run = base / "nan_run"
    shutil.copytree(full_run, nan_run)
    for variant in ("crope", "rope"):
        state = torch.load(nan_run / variant / "last.pt", weights_only=True)
        next(iter(state["model"].values())).fill_(float("nan"))
        torch.save(state, nan_run / variant / "last.pt")
    forged = forged_checkpoints(full_run / "crope" / "best.pt", base / "forged")
    forged_run = base / "forged_run"
    shutil.copytree(full_run, forged_run)
    shutil.copy(forged / "unknown_field.pt", forged_run / "crope" / "last.pt")
    no_lr_run = base / "no_lr_run"
    shutil.copytree(full_run, no_lr_run)
    shutil.copy(forged / "no_lr.pt", no_lr_run / "crope" / "last.pt")
    run_seeds = base / "seeds"
    shutil.copytree(full_run, run_seeds / "seed0")
    lock_folder = base / "lock_folder"
    (lock_folder / "run.lock").mkdir(parents=True)
    other_chars = base / "other_chars.txt"  # as many characters as the text, one of them another
    other_chars.write_text(text_file.read_text().replace(".", "!"))
    empty, binary, corrupt, old_pickle = (base / name for name in ("empty.txt", "binary.bin", "corrupt.pt", "old.pt"))
    empty.write_text("  \n")
    binary.write_bytes(b"\xff\xfe\x00abc")
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    old_pickle.write_bytes(pickle.dumps(dict(model={}, model_config={}, tokenizer={}), protocol=4))
    busy = base / "busy"
    busy.mkdir()
    with runs.FolderLock(busy):  # held by this process for as long as the tests of this file run
        yield dict(text=text_file, run=run, bad_log=bad_log, nan_run=nan_run, busy=busy, empty=empty, binary=binary,
                   corrupt=corrupt, forged=forged, forged_run=forged_run, no_lr_run=no_lr_run, run_seeds=run_seeds,
                   lock_folder=lock_folder, other_chars=other_chars, old_pickle=old_pickle)


def forged_checkpoints(source, folder):
    """Copies of a checkpoint of the small model (vocabulary 32, n_embd 32, 2 layers), each with one part
    that disagrees with the rest."""
    edits = {
        "unknown_field": lambda s: s["model_config"].update(colour="blue"),
        "wide": lambda s: s["model_config"].update(n_embd=36),
        "bogus_pos": lambda s: s["model_config"].update(pos="bogus"),
        "text_n_head": lambda s: s["model_config"].update(n_head="2"),
        "deep": lambda s: s["model_config"].update(n_layer=1000000),
        "extra_weight": lambda s: s["model"].update(extra=torch.zeros(1)),
        "short_chars": lambda s: s["tokenizer"].update(chars=s["tokenizer"]["chars"][:-1]),
        "repeated_chars": lambda s: s["tokenizer"].update(chars=s["tokenizer"]["chars"][:-1] + "a"),
        "gpt2_tokens": lambda s: s["tokenizer"].update(kind="gpt2", chars=None),
        "no_chars": lambda s: s["tokenizer"].pop("chars"),
        "text_iter": lambda s: s.update(iter="40"),
        "no_param_groups": lambda s: s["optimizer"].update(param_groups=[]),
        "few_params": lambda s: s["optimizer"]["param_groups"][0]["params"].pop(),
        "no_lr": lambda s: s["settings"].pop("lr"),
    }
    folder.mkdir()
    for name, edit in edits.items():
        state = torch.load(source, weights_only=True)
        edit(state)
        torch.save(state, folder / f"{name}.pt")
    return folder


def snapshot(folder):
    """Every file of a run folder and its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("tool, argv, message", BAD_INPUTS, ids=[f"{t} {m}" for t, _, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_leaves_runs_untouched(tool, argv, message, files, tmp_path, capfd):
    folders = [files[name] for name in ("run", "bad_log", "nan_run", "busy", "forged", "forged_run", "no_lr_run",
                                        "run_seeds", "lock_folder")]
    before = [snapshot(folder) for folder in folders]
    with pytest.raises(SystemExit) as excinfo:
        TOOLS[tool]([a.format(**files, tmp=tmp_path) for a in argv])
    assert isinstance(excinfo.value.code, str)  # the interpreter prints it and exits with status 1
    assert message in error_line(excinfo)
    assert capfd.readouterr().err == ""       # nothing else on stderr: no warning, no traceback
    assert [snapshot(folder) for folder in folders] == before


def test_a_refused_command_leaves_no_new_folder(files, tmp_path):
    with pytest.raises(SystemExit):
        ts.main([*SMALL, "--data", str(files["text"]), "--init_from", str(files["corrupt"]),
                 "--out_dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_the_table_covers_the_promise():
    assert len(BAD_INPUTS) >= 40


def run_tool(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_a_process_with_bad_input_exits_1_with_one_line(files):
    result = run_tool("train_shakespeare.py", "--variants", "xpos", "--data", str(files["text"]), "--out_dir",
                      str(files["run"]))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("error: argument --variants: unknown variant xpos: "
                             "choose from learned, rope, crope, crope_full\n")
    result = run_tool("sample.py", str(files["corrupt"]))
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("tool", ["train_shakespeare.py", "sample.py"])
def test_a_bad_kernel_mode_in_the_environment_is_one_line(tool, files):
    args = [str(files["run"] / "crope")] if tool == "sample.py" else ["--data", str(files["text"]), "--out_dir",
                                                                      str(files["run"])]
    result = run_tool(tool, *args, env={"CROPE_KERNEL": "bogus"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "CROPE_KERNEL" in result.stderr


def test_a_resume_killed_while_it_rewrites_the_log_keeps_the_history(tmp_path, text_file, full_run, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    history = (run / "crope" / "log.csv").read_bytes()
    real_writerows = runs.csv.DictWriter.writerows

    def killed_halfway(writer, rows):
        real_writerows(writer, list(rows)[:3])
        raise KeyboardInterrupt  # the kill arrives while the kept rows are being written

    monkeypatch.setattr(runs.csv.DictWriter, "writerows", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        ts.main([*SMALL, "--data", str(text_file), "--out_dir", str(run), "--variants", "crope", "--resume",
                 "--max_iters", "50"])
    assert (run / "crope" / "log.csv").read_bytes() == history
    monkeypatch.undo()
    assert ts.main([*SMALL, "--data", str(text_file), "--out_dir", str(run), "--variants", "crope", "--resume",
                    "--max_iters", "50"]) == 0
    assert {k: v for k, v in losses(run / "crope").items() if k < 40} == losses(full_run / "crope")


def test_resume_continues_the_run_that_was_started(tmp_path, text_file, full_run):
    """Flags not given again on --resume come from the checkpoint: max_iters, eval_iters and the rest."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    log_before = (run / "crope" / "log.csv").read_bytes()
    assert ts.main(["--data", str(text_file), "--out_dir", str(run), "--variants", "crope", "--resume"]) == 0
    assert torch.load(run / "crope" / "last.pt", weights_only=True)["iter"] == 40   # not the preset's 2000
    assert (run / "crope" / "log.csv").read_bytes() == log_before


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, text_file):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(str(dead.pid))
    assert ts.main([*SMALL, "--data", str(text_file), "--max_iters", "2", "--variants", "rope",
                    "--out_dir", str(tmp_path)]) == 0
    assert not (tmp_path / "run.lock").exists()


def interrupted_after(module, *tool_args):
    """Run a tool, press Ctrl-C once it has imported module (-X importtime tells), and return its exit status
    and the lines of its stderr that are not import times."""
    with subprocess.Popen([sys.executable, "-X", "importtime", *tool_args], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as process:
        for line in process.stderr:
            if line.startswith("import time:") and line.split("|")[-1].strip().startswith(module):
                process.send_signal(signal.SIGINT)
                break
        lines = [line for line in process.stderr.read().splitlines() if not line.startswith("import time:")]
        return process.wait(timeout=120), lines


@pytest.mark.parametrize("tool", ["train_shakespeare.py", "sample.py", "study.py"])
def test_ctrl_c_while_torch_loads_is_one_line(tool, files, tmp_path):
    args = {"train_shakespeare.py": ["--data", str(files["text"]), "--out_dir", str(tmp_path / "out")],
            "sample.py": [str(files["run"] / "crope")],
            "study.py": ["seeds", "--out_dir", str(tmp_path / "out")]}[tool]
    assert interrupted_after("torch", tool, *args) == (1, ["stopped by Ctrl-C"])
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_the_data_is_tokenized_is_one_line(tmp_path):
    data = os.environ.get("CROPE_DATA")
    try:
        import tiktoken
        tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken's gpt2 encoding is not available offline here: {e}")
    if not data:
        pytest.skip("no CROPE_DATA: the GPT-2 encoding of a large text is the slow step this needs")
    status, lines = interrupted_after("tiktoken", "train_shakespeare.py", "--data", data, "--tokenizer", "gpt2",
                                      "--variants", "crope", "--out_dir", str(tmp_path / "out"))
    assert (status, lines) == (1, ["stopped by Ctrl-C"])
    assert not (tmp_path / "out").exists()
