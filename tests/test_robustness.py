"""No crash loses a run and numerical trouble is survived: NaN, spikes, OOM, disk full, SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import MODEL, MODEL_ARGS, ROOT, losses, metrics, train_cfg

import minigpt.checkpoint as checkpoint
from minigpt.checkpoint import find_checkpoint, load_model, load_run
from minigpt.model import GPT
from minigpt.train import train
from minigpt.utils import UserError


def poison(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int], factor: float = float("nan")) -> None:
    """Multiply the training loss of the given forward calls (counted from 0) by `factor`."""
    forward, calls = GPT.forward, [0]

    def patched(self, idx, targets=None, cache=None, last_only=False):
        out = forward(self, idx, targets, cache, last_only)
        if self.training and targets is not None:
            if calls[0] in bad_calls:
                out.loss = out.loss * factor
            calls[0] += 1
        return out

    monkeypatch.setattr(GPT, "forward", patched)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_non_finite_updates_are_skipped_and_counted(tokens: Path, tmp_path: Path, monkeypatch, capsys, kind: str) -> None:
    poison(monkeypatch, {7, 8, 20})
    summary = train(train_cfg(tokens, tmp_path, log_every=5, optimizer=kind), MODEL)
    out = " ".join(capsys.readouterr().out.split())
    assert "skipped 2 update(s)" in out and "skipped 1 update(s)" in out and "(3 in all)" in out
    assert not summary["failed"] and summary["steps"] == 30
    model, _ = load_model(find_checkpoint(tmp_path / "run", "last"))
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no NaN reached the weights
    assert losses(tmp_path / "run")[30] < losses(tmp_path / "run")[5]


def test_a_run_of_non_finite_losses_stops_with_the_last_good_checkpoint(tokens: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    poison(monkeypatch, set(range(12, 100)))
    summary = train(train_cfg(tokens, tmp_path, log_every=5, save_every=10, max_bad_steps=5), MODEL)
    out = " ".join(capsys.readouterr().out.split())
    assert summary["failed"] and "updates in a row had a non-finite" in summary["stop_reason"]
    assert "last good checkpoint" in out and "--resume" in out
    assert summary["steps"] == 20  # stopped at the first log step after 5 bad updates in a row
    evals = [r["val_loss"] for r in metrics(tmp_path / "run") if "val_loss" in r]
    assert summary["last_val_loss"] == pytest.approx(evals[-1], abs=1e-6)  # step 10: the last evaluation
    folder = find_checkpoint(tmp_path / "run", "last")
    assert json.loads((folder / "config.json").read_text())["step"] == 10
    model, _ = load_model(folder)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_norm_spike_is_a_warning(tokens: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    poison(monkeypatch, {25}, factor=1e4)
    summary = train(train_cfg(tokens, tmp_path, log_every=5, grad_clip=1.0), MODEL)
    assert "gradient norm spike: 1 step(s)" in " ".join(capsys.readouterr().out.split())
    assert not summary["failed"]


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_batch(tokens: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """5 rows that do not fit: micro-batches of 2, 2 and 1 row cover all of them, with the same losses."""
    train(train_cfg(tokens, tmp_path / "ref", log_every=5, batch_size=5, max_steps=10), MODEL)
    forward = GPT.forward

    def patched(self, idx, targets=None, cache=None, last_only=False):
        if self.training and idx.size(0) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, idx, targets, cache, last_only)

    monkeypatch.setattr(GPT, "forward", patched)
    train(train_cfg(tokens, tmp_path / "oom", log_every=5, batch_size=5, max_steps=10), MODEL)
    assert "out of memory at step 1: micro-batch 5 -> 2, accumulation 1 -> 3 (same batch)" in " ".join(capsys.readouterr().out.split())
    ref, oom = losses(tmp_path / "ref" / "run"), losses(tmp_path / "oom" / "run")
    assert ref.keys() == oom.keys() and all(ref[k] == pytest.approx(oom[k], abs=1e-5) for k in ref)


def test_failed_checkpoint_write_keeps_the_previous_one(tokens: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    save_file, calls = checkpoint.save_file, [0]

    def disk_full(*args, **kw):
        calls[0] += 1
        if calls[0] > 2:  # the first 'best' and 'last' (step 10) go through, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(*args, **kw)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    summary = train(train_cfg(tokens, tmp_path, log_every=5), MODEL)
    out = " ".join(capsys.readouterr().out.split())
    assert "could not write checkpoint 'last' at step 20 (No space left on device)" in out
    assert "is intact" in out and summary["failed"]
    folder = find_checkpoint(tmp_path / "run", "last")
    assert json.loads((folder / "config.json").read_text())["step"] == 10
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no half-written folder left behind
    load_model(folder)


def test_crash_between_the_two_renames_falls_back_to_the_old_copy(tokens: Path, tmp_path: Path) -> None:
    train(train_cfg(tokens, tmp_path, log_every=5, max_steps=10), MODEL)
    run = tmp_path / "run"
    os.replace(run / "last", run / ".last.old")
    (run / "last").mkdir()
    (run / "last" / "model.safetensors").write_bytes(b"partial")
    assert find_checkpoint(run, "last") == run / ".last.old"


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_reaches_the_same_final_loss(tokens: Path, tmp_path: Path) -> None:
    """Kill a training process 5 times (once while a checkpoint is being written), checking the run
    folder loads after each kill, then resume to the end: the losses match an uninterrupted run."""
    def cmd(runs: Path, resume: bool) -> list[str]:
        return [sys.executable, str(ROOT / "03_train.py"), "--data", str(tokens), "--runs-dir", str(runs), "--name",
                "run", "--device", "cpu", "--batch-size", "8", "--max-steps", "120", "--lr", "3e-3", "--log-every", "10",
                "--eval-every", "40", "--eval-tokens", "2048", "--save-every", "10", "--dropout", "0.1", *MODEL_ARGS,
                *(["--resume"] if resume else [])]

    whole = subprocess.run(cmd(tmp_path / "whole", False), env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    rng = random.Random(1234)
    run = tmp_path / "split" / "run"
    has_checkpoint = lambda: (run / "last").exists() or (run / ".last.old").exists()  # noqa: E731
    for kill in range(5):
        before = (run / "last" / "manifest.json").stat().st_mtime if (run / "last").exists() else 0.0
        proc = start(cmd(tmp_path / "split", resume=has_checkpoint()))
        deadline = time.time() + 120
        if kill == 0:  # during start-up, before anything is written
            time.sleep(rng.uniform(0.2, 1.5))
        elif kill == 2:  # the moment a checkpoint write begins
            while not (run / ".last.tmp").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.0005)
        else:  # a random moment after this process has saved a new checkpoint
            while proc.poll() is None and time.time() < deadline:
                manifest = run / "last" / "manifest.json"
                if manifest.exists() and manifest.stat().st_mtime > before:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if has_checkpoint():
            load_model(find_checkpoint(run, "last"))  # loadable after every kill
    assert has_checkpoint()
    done = subprocess.run(cmd(tmp_path / "split", resume=True), env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(run) == losses(tmp_path / "whole" / "run")
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln]
    evals_whole = [json.loads(ln) for ln in (tmp_path / "whole" / "run" / "metrics.jsonl").read_text().splitlines()
                   if "val_loss" in ln]
    assert evals == evals_whole and evals[-1]["step"] == 120


# A training process that kills itself with SIGKILL inside the swap of its `last` checkpoint, from step
# `at` on: "between" right after `last` became `.last.old`, "before-new" just before the new folder moves in.
KILL_IN_SWAP = """
import os, runpy, signal, sys
import minigpt.checkpoint as checkpoint, minigpt.train as train
where, at = sys.argv.pop(1), int(sys.argv.pop(1))
save, rename, armed = train.save_checkpoint, checkpoint._rename, []
def saving(run_dir, tag, model, config, *args, **kw):
    armed[:] = [tag == "last" and config["step"] >= at]
    return save(run_dir, tag, model, config, *args, **kw)
def renaming(src, dst):
    if armed[0] and where == "before-new" and src.name == ".last.tmp":
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
    if armed[0] and where == "between" and src.name == "last":
        os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint, checkpoint._rename = saving, renaming
sys.argv = sys.argv[1:]  # the script first, as if it were run itself
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_kills_inside_the_checkpoint_swap_always_leave_a_loadable_checkpoint(tokens: Path, tmp_path: Path) -> None:
    """Killed between the two renames, the run's only complete copy is `.last.old`; the next process, killed
    at its first save just before its new folder moves in, must not have deleted that copy first. Resuming
    then reaches the losses of an uninterrupted run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}

    def cmd(runs: Path, *extra: str) -> list[str]:
        return [str(ROOT / "03_train.py"), "--data", str(tokens), "--runs-dir", str(runs), "--name", "run", "--device",
                "cpu", "--batch-size", "8", "--max-steps", "30", "--lr", "3e-3", "--log-every", "5", "--eval-every",
                "100", "--eval-tokens", "1024", "--save-every", "5", "--dropout", "0.1", *MODEL_ARGS, *extra]

    whole = subprocess.run([sys.executable, *cmd(tmp_path / "whole")], env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = tmp_path / "split" / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SWAP, "between", "10", *cmd(tmp_path / "split")], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "last").exists() and (run / ".last.old").is_dir()
    assert json.loads((find_checkpoint(run, "last") / "config.json").read_text())["step"] == 5
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SWAP, "before-new", "10", *cmd(tmp_path / "split", "--resume")],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "resuming at step 5" in killed.stdout
    load_model(find_checkpoint(run, "last"))  # the step-5 copy survived the second kill
    done = subprocess.run([sys.executable, *cmd(tmp_path / "split", "--resume")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(run) == losses(tmp_path / "whole" / "run")
    assert not (run / ".last.old").exists() and not (run / ".last.tmp").exists()


def test_the_manifest_lists_every_file_and_any_damage_is_caught(tokens: Path, tmp_path: Path) -> None:
    train(train_cfg(tokens, tmp_path, max_steps=5, log_every=5, eval_every=5), MODEL)
    run = tmp_path / "run"
    for tag in ("best", "last"):
        manifest = json.loads((run / tag / "manifest.json").read_text())
        assert set(manifest) == {p.name for p in (run / tag).iterdir()} - {"manifest.json"}
    assert {"optimizer.pt", "trainer_state.json"} <= set(json.loads((run / "last" / "manifest.json").read_text()))
    data = bytearray((run / "last" / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (run / "last" / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="optimizer.pt does not match its checksum"):
        find_checkpoint(run, "last")
    (run / "best" / "notes.txt").write_text("not part of the checkpoint")
    with pytest.raises(UserError, match="does not list notes.txt"):
        find_checkpoint(run, "best")


def test_best_falls_back_to_last_only_when_absent(tokens: Path, tmp_path: Path, capsys) -> None:
    train(train_cfg(tokens, tmp_path, max_steps=5, log_every=5, eval_every=5), MODEL)
    run = tmp_path / "run"
    assert load_run(run, "best").folder == run / "best"
    weights = run / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # damaged: an error, never the other checkpoint in silence
    with pytest.raises(UserError, match="checkpoint best .* is damaged"):
        load_run(run, "best")
    shutil.rmtree(run / "best")  # absent (a run stopped before its first evaluation): last, and it says so
    capsys.readouterr()
    assert load_run(run, "best").folder == run / "last"
    assert "no 'best' checkpoint" in " ".join(capsys.readouterr().err.split())
