"""Shared fixtures: toy corpora made in the test, script runners, the optional ../shared corpora."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from minigpt.cli import app as cli_app
from minigpt.cli import script_app
from minigpt.config import PrepareConfig, TokenizerConfig, TrainConfig
from minigpt.corpus import prepare
from minigpt.model import GPT
from minigpt.tokenizer import build

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = ROOT.parent / "shared" / "corpora"


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a numbered script (or `-m minigpt.cli`) the way a user does; output captured as text."""
    cmd = [sys.executable, *(["-m", "minigpt.cli"] if script == "minigpt" else [str(ROOT / script)]), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`minigpt ARGS` in this process, through Typer's test runner: what `run_script("minigpt", ...)` gives
    (exit code, stdout, stderr) without a Python start and a torch import (seconds) per call. A few
    tests still run each face as a user does."""
    return _invoke(cli_app, ["minigpt", *args], cwd)


def run_face(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`run_cli` for the numbered scripts too: the script's own command, run in this process."""
    if script == "minigpt":
        return run_cli(*args, cwd=cwd)
    spec = importlib.util.spec_from_file_location(f"script_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _invoke(script_app(module.main), [script, *args], cwd)


def _invoke(app: typer.Typer, argv: list[str], cwd: Path | None) -> subprocess.CompletedProcess:
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        r = CliRunner().invoke(app, argv[1:])
    finally:
        os.chdir(old)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):  # what a subprocess would print
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(argv, r.exit_code, r.stdout, stderr)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, a one-sentence error that names the problem, and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    for fragment in fragments:
        assert fragment.lower() in " ".join(out.lower().split()), out


def shared_corpus(name: str) -> Path:
    path = SHARED_CORPORA / name
    if not path.exists():
        pytest.skip(f"{path} is not here (a clone without ../shared)")
    return path


ENGLISH = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."
RUSSIAN = "Съешь же ещё этих мягких французских булок, да выпей чаю. Москва — столица России."
TATAR = "Әнием җырлый, һәр көн өйдә яңа җыр ишетелә. Татарстан Республикасы — Идел буенда."
CODE = "def add(a, b):\n    # sum two numbers\n    return a + b\n\n\nclass Point:\n    def __init__(self):\n        self.x = 0\n"


def toy_documents(n: int = 60) -> list[str]:
    """Distinct multilingual paragraphs, enough for a tokenizer and a val split."""
    base = [ENGLISH, RUSSIAN, TATAR, "Emoji 😀🎉 and numbers 12345 ok.", "Шәһәр урамнары киң һәм якты."]
    return [f"{base[i % len(base)]} №{i} {'ә' * (i % 7)}word{i}" for i in range(n)]


@pytest.fixture
def toy_txt(tmp_path: Path) -> Path:
    path = tmp_path / "toy.txt"
    path.write_text("\n\n".join(toy_documents()) + "\n", encoding="utf-8")
    return path


# A model small enough to train in a second, for tests of the training machinery.
MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
MODEL_ARGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 toy multilingual documents, prepared (10% val)."""
    tmp = tmp_path_factory.mktemp("toy")
    corpus = tmp / "toy.txt"
    corpus.write_text("\n\n".join(toy_documents(600)) + "\n", encoding="utf-8")
    return prepare(PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp / "data"), val_fraction=0.1))[0]


@pytest.fixture(scope="session")
def tokens(toy_dataset: Path) -> Path:
    """BPE (320 tokens) shards of the toy dataset."""
    return build(TokenizerConfig(data=str(toy_dataset), vocab_size=320)).out


def train_cfg(tokens: Path, runs: Path, **kw) -> TrainConfig:
    base = dict(data=str(tokens), runs_dir=str(runs), name="run", batch_size=8, max_steps=30, lr=3e-3,
                warmup_steps=5, log_every=1, eval_every=10, eval_tokens=2048, sample_every=1000, device="cpu",
                fit_data=False)  # the small-data rules would refit the toy corpus; test_small_data tests them
    return TrainConfig(**(base | kw))


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


def ctrl_c_during(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """SIGINT in the middle of training step `step` (counted from 1): the trainer's handler finishes the step,
    saves and stops."""
    forward, calls = GPT.forward, [0]

    def patched(self, idx, targets=None, cache=None, last_only=False):
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] == step:
                os.kill(os.getpid(), signal.SIGINT)
        return forward(self, idx, targets, cache, last_only)

    monkeypatch.setattr(GPT, "forward", patched)
