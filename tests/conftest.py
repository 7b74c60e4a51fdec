"""Shared fixtures: toy corpora made in the test, script runners, the optional ../shared corpora."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = ROOT.parent / "shared" / "corpora"


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a numbered script (or `-m minigpt.cli`) the way a user does; output captured as text."""
    cmd = [sys.executable, *(["-m", "minigpt.cli"] if script == "minigpt" else [str(ROOT / script)]), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


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
