"""Training: loss falls, checkpoints round-trip, accumulation = one big batch, exact resume, DDP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MODEL, MODEL_ARGS, ROOT, assert_user_error, losses, metrics, run_script, train_cfg

from minigpt.checkpoint import find_checkpoint, load_model, save_checkpoint
from minigpt.train import train
from minigpt.utils import UserError


def test_loss_falls_and_run_folder_is_complete(tokens: Path, tmp_path: Path) -> None:
    summary = train(train_cfg(tokens, tmp_path, max_steps=40), MODEL)
    run = tmp_path / "run"
    curve = losses(run)
    assert curve[40] < curve[1] - 1.0, curve
    assert summary["best_val_loss"] < 5.0 and summary["best_val_bpb"] > 0
    for tag in ("last", "best"):
        names = {p.name for p in (run / tag).iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "manifest.json"} <= names
    assert {"optimizer.pt", "trainer_state.json"} <= {p.name for p in (run / "last").iterdir()}
    config = json.loads((run / "last" / "config.json").read_text())
    assert config["step"] == 40 and config["model"]["n_embd"] == 32 and config["data"]["tokenizer_sha256"]
    evals = [r for r in metrics(run) if "val_bpb" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]


def test_early_stopping_on_val_patience(tokens: Path, tmp_path: Path) -> None:
    summary = train(train_cfg(tokens, tmp_path, lr=0.0, warmup_steps=1, eval_every=3, patience=2), MODEL)
    assert summary["steps"] == 9 and "no better val loss in 2 evaluations" in summary["stop_reason"]


def test_checkpoint_round_trip(tokens: Path, tmp_path: Path) -> None:
    train(train_cfg(tokens, tmp_path, max_steps=5), MODEL)
    model, config = load_model(find_checkpoint(tmp_path / "run", "last"))
    save_checkpoint(tmp_path / "copy", "last", model, {k: v for k, v in config.items() if k != "format_version"},
                    tokens / "tokenizer.json")
    again, _ = load_model(find_checkpoint(tmp_path / "copy", "last"))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert again.lm_head.weight.data_ptr() == again.wte.weight.data_ptr()  # tie restored


def test_accumulation_matches_one_large_batch(tokens: Path, tmp_path: Path) -> None:
    train(train_cfg(tokens, tmp_path / "big", batch_size=16, max_steps=6, eval_every=100), MODEL)
    train(train_cfg(tokens, tmp_path / "acc", batch_size=4, total_batch_tokens=16 * 32, max_steps=6, eval_every=100), MODEL)
    big, acc = losses(tmp_path / "big" / "run"), losses(tmp_path / "acc" / "run")
    assert big.keys() == acc.keys()
    for step in big:
        assert big[step] == pytest.approx(acc[step], abs=2e-5)
    a, _ = load_model(find_checkpoint(tmp_path / "big" / "run", "last"))
    b, _ = load_model(find_checkpoint(tmp_path / "acc" / "run", "last"))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def train_cmd(tokens: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "03_train.py"), "--data", str(tokens), "--runs-dir", str(runs), "--name", "run",
            "--device", "cpu", "--batch-size", "8", "--max-steps", "60", "--lr", "3e-3", "--warmup-steps", "5",
            "--log-every", "1", "--eval-every", "20", "--eval-tokens", "2048", "--save-every", "5",
            "--dropout", "0.1", *MODEL_ARGS, *extra]


def start_and_stop(cmd: list[str], sig: int, after_step: int) -> subprocess.Popen:
    """Start a training process and send it `sig` once it has logged `after_step`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= after_step:
            proc.send_signal(sig)
            break
    proc.communicate(timeout=120)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_then_resumed_run_logs_identical_losses(tokens: Path, tmp_path: Path, sig: int) -> None:
    """Dropout on, so the RNG state matters too. SIGINT saves on the spot; SIGKILL loses up to 5 steps."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    subprocess.run(train_cmd(tokens, tmp_path / "whole"), check=True, env=env, capture_output=True)
    stopped = start_and_stop(train_cmd(tokens, tmp_path / "split"), sig, after_step=23)
    if sig == signal.SIGINT:
        assert stopped.returncode == 0
    partial = losses(tmp_path / "split" / "run")
    assert max(partial) < 60
    resumed = subprocess.run(train_cmd(tokens, tmp_path / "split", "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming at step" in resumed.stdout
    assert losses(tmp_path / "split" / "run") == losses(tmp_path / "whole" / "run")  # exactly, every step


def test_two_process_torchrun_matches_one_process(tokens: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    args = ["--data", str(tokens), "--name", "run", "--device", "cpu", "--batch-size", "4", "--max-steps", "8",
            "--log-every", "1", "--eval-every", "4", "--eval-tokens", "2048", "--lr", "3e-3", "--warmup-steps", "2",
            *MODEL_ARGS]
    one = subprocess.run([sys.executable, str(ROOT / "03_train.py"), "--runs-dir", str(tmp_path / "one"),
                          "--total-batch-tokens", str(8 * 32), *args], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(ROOT / "03_train.py"), "--runs-dir", str(tmp_path / "two"), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 process(es)" in two.stdout and two.stdout.count("step 8/8") == 1  # rank 0 alone logs
    a, b = metrics(tmp_path / "one" / "run"), metrics(tmp_path / "two" / "run")
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-4), (ra, rb)


def test_two_processes_agree_to_stop_on_the_time_limit(tokens: Path, tmp_path: Path) -> None:
    """Under torchrun the clock is checked at log steps only; both processes stop there together."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(ROOT / "03_train.py"), "--runs-dir", str(tmp_path), "--data", str(tokens),
                           "--name", "run", "--device", "cpu", "--batch-size", "4", "--max-steps", "100000",
                           "--max-minutes", "0.1", "--log-every", "5", "--eval-every", "100000", "--eval-tokens", "2048",
                           *MODEL_ARGS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "time limit of 0.1 minutes" in proc.stdout
    step = json.loads((find_checkpoint(tmp_path / "run", "last") / "config.json").read_text())["step"]
    assert step > 0 and step % 5 == 0  # a log step: where the processes agree


def test_batch_and_context_errors(tokens: Path, tmp_path: Path) -> None:
    """Train-specific mistakes; the table of every bad input is in test_errors.py."""
    base = ["--data", str(tokens), "--runs-dir", str(tmp_path), "--max-steps", "2"]
    assert_user_error(run_script("03_train.py", *base, *MODEL_ARGS, "--total-batch-tokens", "100"), "multiple of")
    assert_user_error(run_script("03_train.py", "--data", str(tmp_path / "missing")), "does not exist")
    with pytest.raises(UserError, match="shorter than one context"):
        train(train_cfg(tokens, tmp_path, max_steps=1), MODEL | {"block_size": 100_000})


def test_cli_help_and_generate(tokens: Path, tmp_path: Path) -> None:
    for script in ("01_prepare_data.py", "02_train_tokenizer.py", "03_train.py", "quick_test.py", "minigpt"):
        proc = run_script(script, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout, proc.stderr
    train(train_cfg(tokens, tmp_path, max_steps=80, eval_every=40), MODEL)
    run = str(tmp_path / "run")
    proc = run_script("minigpt", "generate", "--run", run, "--prompt", "Әнием", "--max-new-tokens", "12", "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.split("\n")[1].startswith("Әнием"), proc.stdout + proc.stderr
    assert re.search(r"\d+ tokens in [\d.]+ s \([\d,]+ tokens/s", proc.stderr)  # the speed, on stderr
    alone = proc.stdout.split("\n")[1]
    proc = run_script("minigpt", "generate", "--run", run, "--prompt", "a", "--prompt", "Әнием", "--num-samples", "2",
                      "--max-new-tokens", "12", "--temperature", "0")  # one batch, the shorter prompt left-padded
    assert proc.returncode == 0 and proc.stdout.count("sample 2") == 2
    assert proc.stdout.count(f"\n{alone}\n") == 2, proc.stdout  # as when it ran alone
    assert_user_error(run_script("minigpt", "generate", "--run", run, "--prompt", ""), "prompt is empty")
    assert_user_error(run_script("minigpt", "generate", "--run", str(tmp_path / "none")), "does not exist")
    proc = run_script("quick_test.py", "--run", run, "--max-new-tokens", "8", "--temperature", "0.8")
    assert proc.returncode == 0 and "better than the unigram baseline" in proc.stdout, proc.stdout + proc.stderr
    assert "val_bpb" in proc.stdout and "perplexity" in proc.stdout
    train(train_cfg(tokens, tmp_path, name="untrained", max_steps=1, lr=0.0), MODEL)
    proc = run_script("quick_test.py", "--run", str(tmp_path / "untrained"), "--max-new-tokens", "4")
    assert proc.returncode == 1 and "no better than a unigram baseline" in proc.stdout, proc.stdout + proc.stderr
