"""Output sent to a file (`bash run_pipeline.sh > log`): one line per log line, tables at their natural
width, no colour codes or progress redraws; progress becomes a periodic plain line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODEL_ARGS, ROOT

from minigpt.utils import PlainProgress, console


def run_to_file(tmp_path: Path, *args: str) -> str:
    """Run a script with stdout and stderr going to a file, as a terminal-less user would, no COLUMNS set."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"PYTHONPATH": str(ROOT)}
    log = tmp_path / "log"
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, *args], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path)
    raw = log.read_bytes()
    text = raw.decode("utf-8")  # valid UTF-8 throughout
    assert proc.returncode == 0, text[-3000:]
    assert b"\x1b" not in raw and b"\r" not in raw, "control characters in a log file"
    return text


@pytest.mark.slow
def test_scripts_write_plain_unwrapped_logs(toy_txt: Path, tmp_path: Path) -> None:
    out = run_to_file(tmp_path, str(ROOT / "01_prepare_data.py"), str(toy_txt), "--out-dir", str(tmp_path / "data"),
                     "--val-fraction", "0.3")
    header = next(ln for ln in out.splitlines() if "docs in" in ln)
    for column in ("source", "docs in", "kept", "dup", "dropped", "bytes in"):
        assert column in header, out
    assert any("chars /" in ln and ln.startswith("│ train") for ln in out.splitlines()), out
    assert next(ln for ln in out.splitlines() if ln.startswith("prepare ")).rstrip().endswith("}")  # one line
    data = tmp_path / "data" / "toy"
    run_to_file(tmp_path, str(ROOT / "02_train_tokenizer.py"), "--data", str(data), "--vocab-size", "300")
    out = run_to_file(tmp_path, str(ROOT / "03_train.py"), "--data", str(data), "--runs-dir", str(tmp_path / "runs"),
                      "--device", "cpu", "--max-steps", "6", "--log-every", "2", "--eval-every", "3",
                      "--eval-tokens", "1024", "--batch-size", "4", *MODEL_ARGS)
    steps = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(steps) == 3 and all(" | eta " in ln and " | mfu " in ln for ln in steps), out
    assert any(ln.startswith("train {") and ln.endswith("}") for ln in out.splitlines()), out
    out = run_to_file(tmp_path, "-m", "minigpt.cli", "generate", "--run", str(tmp_path / "runs" / "toy-bpe300-tiny"),
                      "--prompt", "a", "--prompt", "b", "--max-new-tokens", "4")
    rules = [ln for ln in out.splitlines() if ln.startswith("── prompt")]
    assert len(rules) == 2 and all(len(ln) == 80 for ln in rules), out


def test_progress_in_a_file_is_a_periodic_plain_line(capsys) -> None:
    assert not console.is_terminal  # pytest captures stdout
    bars = PlainProgress(unit="bytes", every=0.0)
    task = bars.add_task("preparing corpus", total=4_000_000)
    bars.advance(task, 1_000_000)
    bars.update(task, completed=3_000_000, description="preparing more")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("preparing corpus: 1.0 MB / 4.0 MB (25%)") and lines[0].endswith("/s")
    assert lines[1].startswith("preparing more: 3.0 MB / 4.0 MB (75%)")
    quiet = PlainProgress(every=3600.0)
    quiet.advance(quiet.add_task("counting", total=10), 5)
    assert capsys.readouterr().out == ""  # not before its time
