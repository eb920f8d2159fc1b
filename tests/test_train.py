"""The tools do what the README says: train, resume, torchrun, sample, and refuse bad input clearly."""

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compare
import data
import runs
import sample
import train_shakespeare as ts

from conftest import ROOT, SMALL, error_line, losses, train
import settings
from settings import PRESETS


def test_training_lowers_the_loss_and_writes_everything(full_run):
    for variant in ("crope", "rope"):
        val = losses(full_run / variant, "val_loss")
        assert val[40] < val[0] - 0.5, val
        state = torch.load(full_run / variant / "last.pt", weights_only=True)
        assert state["iter"] == 40
        assert not any(k.startswith("_orig_mod.") for k in state["model"])
        best = torch.load(full_run / variant / "best.pt", weights_only=True)
        assert best["best_val_loss"] == pytest.approx(min(val.values()), abs=1e-4)
    assert (full_run / "compare.png").stat().st_size > 10_000
    summary = (full_run / "summary.md").read_text()
    assert "| crope |" in summary and "| rope |" in summary
    # each variant's clock starts when it starts training (all are set up before the first trains)
    assert losses(full_run / "rope", "wall_seconds")[0] < losses(full_run / "crope", "wall_seconds")[40]
    header = (full_run / "crope" / "log.csv").read_text().splitlines()[0]
    assert header == "iter,train_loss,val_loss,lr,tokens,wall_seconds"


def test_resume_reproduces_the_uninterrupted_run(tmp_path, text_file, full_run):
    # stop at 20 (the schedule still aims at 40), then continue to 40
    assert train(tmp_path, text_file, "--max_iters", "20", "--lr_decay_iters", "40", "--variants", "crope,rope") == 0
    assert train(tmp_path, text_file, "--max_iters", "40", "--resume", "--variants", "crope,rope") == 0
    for variant in ("crope", "rope"):
        assert losses(tmp_path / variant) == losses(full_run / variant)
        assert losses(tmp_path / variant, "val_loss") == losses(full_run / variant, "val_loss")


def test_ctrl_c_saves_and_resume_continues_exactly(tmp_path, text_file, full_run):
    cmd = [sys.executable, str(ROOT / "train_shakespeare.py"), *SMALL, "--data", str(text_file),
           "--out_dir", str(tmp_path), "--max_iters", "40", "--variants", "crope,rope"]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # the "device ..." line comes once Ctrl-C is handled, before training
            if line.startswith("device "):
                proc.send_signal(signal.SIGINT)
                break
        output = proc.stdout.read()
        code = proc.wait(timeout=120)
    advice = f"Continue with: python train_shakespeare.py --resume --out_dir {tmp_path} --variants crope,rope\n"
    assert code == 1 and advice in output, output
    assert 0 < torch.load(tmp_path / "crope" / "last.pt", weights_only=True)["iter"] < 40
    assert not (tmp_path / "rope").exists()
    assert ts.main(["--resume", "--out_dir", str(tmp_path), "--variants", "crope,rope"]) == 0  # the advice: rope too
    for variant in ("crope", "rope"):
        assert losses(tmp_path / variant) == losses(full_run / variant)
    summary = (tmp_path / "summary.md").read_text()
    assert "| crope |" in summary and "| rope |" in summary


def test_torchrun_two_processes_match_one(tmp_path, text_file, full_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_shakespeare.py"), *SMALL, "--data", str(text_file), "--out_dir", str(tmp_path),
           "--max_iters", "40", "--variants", "crope", "--device", "cpu"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = losses(tmp_path / "crope"), losses(full_run / "crope")
    assert two.keys() == one.keys()
    for it in one:
        assert two[it] == pytest.approx(one[it], abs=2e-3), it
    two_val, one_val = losses(tmp_path / "crope", "val_loss"), losses(full_run / "crope", "val_loss")
    assert two_val == pytest.approx(one_val, abs=2e-3)


def test_sample_uses_the_checkpoint(full_run, capsys):
    args = [str(full_run / "crope"), "--start", "ROMEO", "--num_samples", "2", "--max_new_tokens", "50",
            "--seed", "7", "--top_p", "0.9", "--device", "cpu"]
    assert sample.main(args) == 0
    first = capsys.readouterr().out
    samples = first.split("---------------\n")[:2]
    assert all(s.startswith("ROMEO") and len(s) == len("ROMEO") + 50 + 1 for s in samples)
    assert sample.main(args) == 0
    assert capsys.readouterr().out == first   # the seed makes it repeatable


def test_gpt2_tokens(tmp_path, text_file):
    try:  # offline, TIKTOKEN_CACHE_DIR must point at tiktoken's cache files
        import tiktoken
        tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken's gpt2 encoding is not available offline here: {e}")
    assert train(tmp_path, text_file, "--max_iters", "10", "--tokenizer", "gpt2", "--variants", "crope") == 0
    state = torch.load(tmp_path / "crope" / "last.pt", weights_only=True)
    assert state["model_config"]["vocab_size"] == 50257 and state["tokenizer"]["kind"] == "gpt2"


def test_download_is_verified_and_cached(tmp_path):
    source = Path(os.environ.get("CROPE_DATA", data.DEFAULT_DATA))
    if not source.is_file() or hashlib.sha256(source.read_bytes()).hexdigest() != data.SHAKESPEARE_SHA256:
        pytest.skip("no local copy of tiny Shakespeare (CROPE_DATA) to serve as the download")
    target = tmp_path / "cache" / "tinyshakespeare.txt"
    assert data.fetch_shakespeare(target, source.as_uri()) == target
    assert hashlib.sha256(target.read_bytes()).hexdigest() == data.SHAKESPEARE_SHA256
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not Shakespeare")
    with pytest.raises(SystemExit) as excinfo:
        data.fetch_shakespeare(tmp_path / "other" / "x.txt", wrong.as_uri())
    assert "wrong sha256" in error_line(excinfo)
    assert not (tmp_path / "other" / "x.txt").exists()
    with pytest.raises(SystemExit) as excinfo:
        data.fetch_shakespeare(tmp_path / "other" / "x.txt", (tmp_path / "absent.txt").as_uri())
    assert "--data" in error_line(excinfo)
    target.write_text("tampered")
    with pytest.raises(SystemExit) as excinfo:
        data.fetch_shakespeare(target, source.as_uri())
    assert "delete it" in error_line(excinfo)


def test_extending_a_finished_run_keeps_its_schedule(tmp_path, text_file, full_run):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    assert train(run, text_file, "--max_iters", "50", "--resume", "--variants", "crope") == 0
    state = torch.load(run / "crope" / "last.pt", weights_only=True)
    assert state["iter"] == 50 and state["settings"]["lr_decay_iters"] == 40   # as the run was started
    assert losses(run / "crope", "lr")[45] == pytest.approx(PRESETS["cpu"]["min_lr"])
    assert {k: v for k, v in losses(run / "crope").items() if k < 40} == losses(full_run / "crope")


def test_checkpoint_writes_are_atomic(tmp_path):
    path = tmp_path / "last.pt"
    runs.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_config": {}})
    before = path.read_bytes()
    with pytest.raises(Exception):
        runs.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "bad": lambda: None})  # fails mid-write
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        sample.main([str(tmp_path / "nope.pt")])
    assert "no checkpoint at" in error_line(excinfo)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(corrupt)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "not a readable" in result.stderr


def test_command_line_errors_have_no_traceback(tmp_path, text_file):
    result = subprocess.run([sys.executable, str(ROOT / "train_shakespeare.py"), "--variants", "xpos",
                             "--data", str(text_file), "--out_dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: argument --variants: unknown variant xpos: "
                                     "choose from learned, rope, crope, crope_full")
    help_text = subprocess.run([sys.executable, str(ROOT / "train_shakespeare.py"), "--help"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "--preset" in help_text and "--resume" in help_text


def test_sampling_needs_only_the_model_file_and_runs():
    code = "import sys, sample; print(sorted(m for m in ('train_shakespeare', 'study') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_extended_context_fine_tune_saves_loads_and_resumes_exactly(tmp_path, text_file, full_run):
    base = ["--variants", "crope", "--init_from", str(full_run / "crope" / "last.pt"), "--block_size", "64",
            "--rope_scaling", "yarn", "--lr_decay_iters", "8"]
    assert train(tmp_path / "whole", text_file, *base, "--max_iters", "8") == 0
    assert train(tmp_path / "parts", text_file, *base, "--max_iters", "4") == 0
    # every setting but the new max_iters from the checkpoint, the extension included; the same --init_from
    # named by another path (as from another folder) is no different setting
    assert ts.main(["--data", str(text_file), "--out_dir", str(tmp_path / "parts"), "--resume", "--max_iters", "8",
                    "--variants", "crope", "--init_from", str(full_run / ".." / full_run.name / "crope" / "last.pt")]) == 0
    assert losses(tmp_path / "parts" / "crope") == losses(tmp_path / "whole" / "crope")
    state = torch.load(tmp_path / "parts" / "crope" / "last.pt", weights_only=True)
    assert state["model_config"]["trained_block_size"] == 32 and state["model_config"]["block_size"] == 64
    model = runs.model_from_checkpoint(state)
    assert model.config.rope_scaling == "yarn" and model.config.context_scale == 2
    assert sample.main([str(tmp_path / "parts" / "crope"), "--start", "ROMEO", "--max_new_tokens", "80",
                        "--device", "cpu"]) == 0   # past the extended context, through the sliding window
    # a longer context from the extended checkpoint keeps its method and its trained context
    tokenizer = data.Tokenizer.for_text("char", text_file.read_text())
    config, _ = ts.variant_model(settings.parse_args([*SMALL, "--variants", "crope", "--block_size", "128", "--init_from",
                                                str(tmp_path / "parts" / "crope" / "last.pt")]), "crope", tokenizer,
                                 None)
    assert (config.rope_scaling, config.trained_block_size, config.block_size) == ("yarn", 32, 128)


def test_resume_continues_the_runs_in_the_folder_and_no_other(tmp_path, text_file, full_run):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    shutil.rmtree(run / "rope")
    assert ts.main(["--data", str(text_file), "--out_dir", str(run), "--resume", "--max_iters", "50"]) == 0
    assert torch.load(run / "crope" / "last.pt", weights_only=True)["iter"] == 50
    assert not (run / "rope").exists() and "| rope |" not in (run / "summary.md").read_text()
    # a crope run started from a crope checkpoint: the default variants would have had rope start from it too
    tuned = tmp_path / "tuned"
    assert train(tuned, text_file, "--variants", "crope", "--init_from", str(full_run / "crope" / "last.pt"),
                 "--max_iters", "4") == 0
    assert ts.main(["--data", str(text_file), "--out_dir", str(tuned), "--resume", "--max_iters", "8"]) == 0
    assert sorted(p.name for p in tuned.iterdir() if p.is_dir()) == ["crope"]
    assert torch.load(tuned / "crope" / "last.pt", weights_only=True)["iter"] == 8


def test_runs_started_on_copies_of_the_data_resume_together(tmp_path, text_file):
    copy = tmp_path / "copy.txt"
    shutil.copy(text_file, copy)
    run = tmp_path / "run"
    assert train(run, text_file, "--variants", "crope", "--max_iters", "4") == 0
    assert train(run, copy, "--variants", "rope", "--max_iters", "4") == 0
    assert ts.main(["--out_dir", str(run), "--resume", "--max_iters", "8"]) == 0
    for variant in ("crope", "rope"):
        assert torch.load(run / variant / "last.pt", weights_only=True)["iter"] == 8


def test_the_advice_after_a_run_diverges_works(tmp_path, text_file):
    diverging = [*SMALL, "--data", str(text_file), "--variants", "crope", "--max_iters", "10", "--lr", "1e4"]
    with pytest.raises(SystemExit) as excinfo:
        ts.main([*diverging, "--out_dir", str(tmp_path / "first")])
    assert "Start it again with a lower --lr in another --out_dir" in error_line(excinfo)
    with pytest.raises(SystemExit) as excinfo:  # why another: the folder holds the run's last finite checkpoint
        ts.main([*diverging, "--lr", "1e-3", "--out_dir", str(tmp_path / "first")])
    assert "already holds a run" in error_line(excinfo)
    assert ts.main([*diverging, "--lr", "1e-3", "--out_dir", str(tmp_path / "second")]) == 0


def test_a_tiny_top_p_samples_the_likeliest_token(full_run, capsys):
    args = [str(full_run / "crope"), "--start", "ROMEO", "--max_new_tokens", "30", "--device", "cpu"]
    assert sample.main([*args, "--top_p", "1e-300"]) == 0   # as float32 it would be 0, and keep no token
    tiny = capsys.readouterr().out
    assert sample.main([*args, "--top_k", "1"]) == 0
    assert capsys.readouterr().out == tiny


def test_checkpoints_that_name_extrapolation_none_still_load_sample_and_resume(tmp_path, text_file, full_run):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    for name in ("last.pt", "best.pt"):   # the method's former name, as older checkpoints hold it
        state = torch.load(run / "crope" / name, weights_only=True)
        state["model_config"]["rope_scaling"] = "none"
        torch.save(state, run / "crope" / name)
    assert runs.model_from_checkpoint(runs.load_checkpoint(run / "crope")).config.rope_scaling == "extrapolate"
    assert sample.main([str(run / "crope"), "--block_size", "64", "--max_new_tokens", "70", "--device", "cpu"]) == 0
    assert train(run, text_file, "--max_iters", "42", "--resume", "--variants", "crope") == 0
    assert torch.load(run / "crope" / "last.pt", weights_only=True)["model_config"]["rope_scaling"] == "extrapolate"


@pytest.mark.parametrize("mode", ["auto", "torch", "ext"])
def test_compiled_training_runs_on_a_fresh_machine_with_every_kernel_mode(tmp_path, text_file, mode):
    """The real path, nothing stubbed: a new process with empty compiler and extension caches, under torch.compile,
    as a user's first run is (ext builds the op from scratch)."""
    caches = {name: str(tmp_path / name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCH_EXTENSIONS_DIR")}
    command = [sys.executable, "train_shakespeare.py", *SMALL, "--data", str(text_file), "--out_dir",
               str(tmp_path / "out"), "--max_iters", "12", "--variants", "crope", "--compile", "--kernel", mode]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**{k: v for k, v in os.environ.items() if k != "CROPE_KERNEL"}, **caches})
    assert result.returncode == 0, result.stderr[-3000:]
    code = "the fused op of csrc/ (C++) in every layer" if mode == "ext" else "crope.py's code"
    assert f"crope: CRoPE's Q/K/V projection and rotation: {code}" in result.stdout
    assert losses(tmp_path / "out" / "crope", "val_loss")[12] < losses(tmp_path / "out" / "crope", "val_loss")[0]


# how a command runs, not what its run is: the only flags --resume does not restore
NOT_SAVED = {"preset", "resume", "variants", "out_dir", "device", "dtype", "compile", "kernel", "rope_scaling"}


def test_every_flag_is_saved_and_restored_by_resume_unless_it_is_how_a_command_runs(tmp_path, text_file):
    """A new setting is saved and restored by --resume, unless it is named here as one that is not: a setting
    left out of the checkpoint would otherwise resume with the preset's value, silently."""
    parser_flags = {s.name for s in settings.SETTINGS} | {"preset", "resume"}
    assert parser_flags - set(settings.RUN_SETTINGS) == NOT_SAVED
    pytest.importorskip("tiktoken")
    source = tmp_path / "source"
    values = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.1, bias=True, rope_base=500.0,
                  batch_size=4, max_iters=4, lr=2e-3, min_lr=2e-4, warmup_iters=2, lr_decay_iters=3, schedule="step",
                  step_size=2, gamma=0.5, weight_decay=0.05, beta1=0.8, beta2=0.95, grad_clip=0.5, seed=7,
                  tokenizer="gpt2", data=str(text_file), init_from=str(source / "crope" / "last.pt"), eval_interval=2,
                  eval_iters=2, log_interval=1)
    assert values.keys() == set(settings.RUN_SETTINGS)  # every saved setting, each off its default
    assert all(settings.PRESETS["cpu"][k] != v for k, v in values.items())
    flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in values.items() if k != "init_from"]
    try:
        assert ts.main([*flags, "--variants", "crope", "--out_dir", str(source)]) == 0
    except SystemExit as e:
        pytest.skip(f"no GPT-2 tokenizer here: {e}")
    run = tmp_path / "run"
    assert ts.main([*flags, f"--init_from={values['init_from']}", "--variants", "crope", "--out_dir", str(run)]) == 0
    saved = torch.load(run / "crope" / "last.pt", weights_only=True)["settings"]
    assert saved == {**values, "data": str(text_file.resolve()), "data_sha256": saved["data_sha256"]}
    restored = settings.resolve(["--resume", "--out_dir", str(run), "--max_iters", "6"])
    assert {k: getattr(restored, k) for k in values} == {**values, "data": str(text_file.resolve()), "max_iters": 6}
    assert ts.main(["--resume", "--out_dir", str(run), "--max_iters", "6"]) == 0
    assert max(losses(run / "crope")) == 5


def test_a_short_run_says_its_learning_rate_never_reaches_lr(tmp_path, text_file, capsys):
    assert train(tmp_path, text_file, "--max_iters", "4", "--warmup_iters", "10", "--variants", "rope") == 0
    out = capsys.readouterr().out
    assert "warmup_iters 10 is not below max_iters 4: the learning rate rises to 0.000364 at most, never to --lr 0.001" \
        in out
    assert "rope iter 4/4 | val " in out and out.count("| the end") == 1  # the last evaluation is a log line too


BROKEN_LOGS = {
    "header only": "iter,train_loss,val_loss,lr,tokens,wall_seconds\n",  # a kill between iteration 0's checkpoint and row
    "no validation": "iter,train_loss,val_loss,lr,tokens,wall_seconds\n0,4.1,,1e-4,0,0.5\n",
    "text iter": "iter,train_loss,val_loss,lr,tokens,wall_seconds\nten,4.1,4.0,1e-4,0,0.5\n",
    "undecodable": "\udcff".encode("utf-8", "surrogateescape") + b"\xfe not a log",
}


@pytest.mark.parametrize("broken", BROKEN_LOGS)
def test_compare_leaves_out_a_run_whose_log_cannot_be_read_with_one_line(tmp_path, full_run, broken, caplog):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    content = BROKEN_LOGS[broken]
    (run / "rope" / "log.csv").write_bytes(content if isinstance(content, bytes) else content.encode())
    assert compare.main([str(run)]) == 0
    (line,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert line.startswith(f"{run / 'rope' / 'log.csv'}: ") and line.endswith("; left out of the comparison")
    summary = (run / "summary.md").read_text()
    assert "| crope |" in summary and "| rope |" not in summary
    (run / "crope" / "log.csv").write_bytes((run / "rope" / "log.csv").read_bytes())
    with pytest.raises(SystemExit) as excinfo:  # nothing left to compare
        compare.main([str(run)])
    assert error_line(excinfo).startswith(f"error: no runs to compare in {run}")


def test_compare_shows_no_speed_for_a_run_of_no_time(tmp_path, full_run):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    log_csv = run / "crope" / "log.csv"
    rows = log_csv.read_text().splitlines()
    log_csv.write_text("\n".join([rows[0]] + [",".join(r.split(",")[:-1] + ["0"]) for r in rows[1:]]) + "\n")
    compare.main([str(run)])
    assert re.search(r"^\| crope \| .* \| 0\.0 \| - \|$", (run / "summary.md").read_text(), re.M)


def test_a_finished_run_in_a_folder_that_cannot_be_written_ends_with_one_line(tmp_path, text_file, full_run,
                                                                               monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    before = (run / "summary.md").read_bytes()

    def read_only(path, mode="r", *args, **kwargs):  # the comparison's files only: the runs resume, and are done
        if "w" in mode and Path(path).stem == "compare":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(runs, "open", read_only, raising=False)
    with pytest.raises(SystemExit) as excinfo:
        train(run, text_file, "--resume", "--max_iters", "40")
    assert error_line(excinfo) == (f"error: could not write {run / 'compare.png'}: Read-only file system; its previous "
                                   f"version is intact: fix that, then run python compare.py {run}")
    assert (run / "summary.md").read_bytes() == before and not list(run.glob("*.tmp"))


def test_a_folder_that_holds_a_run_is_refused_before_anything_is_built(tmp_path, text_file, full_run, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr(ts, "load_dataset", lambda *args: pytest.fail("the data was read"))
    monkeypatch.setattr(ts.fused_op, "qkv_kernel", lambda *args, **kwargs: pytest.fail("the op was asked for"))
    with pytest.raises(SystemExit) as excinfo:
        train(full_run, text_file, "--variants", "rope,crope")
    assert error_line(excinfo) == (f"error: {full_run / 'rope'} already holds a run: pass --resume to continue it, "
                                   "or choose another --out_dir")
    assert capsys.readouterr().out == ""  # no settings, no parameter table before the refusal


def test_the_resume_command_repeats_how_the_command_ran():
    args = settings.resolve(["--preset", "gpu", "--no-compile", "--kernel", "torch", "--device", "cpu", "--lr", "3e-4",
                             "--out_dir", "out/x", "--variants", "crope,rope"])
    assert settings.resume_command(args) == ("--resume --out_dir out/x --variants crope,rope --preset gpu --device cpu "
                                             "--no-compile --kernel torch")
    again = settings.resolve(["--preset", "gpu", "--out_dir", "out/x"])
    assert settings.resume_command(again).endswith("--preset gpu")  # the preset's own defaults need no flag
