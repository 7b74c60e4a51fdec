"""The main job end to end: run_pipeline.sh on the built-in stdlib corpus (slow; CI runs it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from minigpt.corpus import sample_prompt


@pytest.mark.slow
def test_run_pipeline_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    cmd = ["bash", str(ROOT / "run_pipeline.sh"), "--data-dir", str(tmp_path / "data"), "--runs-dir",
           str(tmp_path / "runs"), "--device", "cpu", "--max-steps", "100", "--", "--eval-every", "50", "--eval-tokens", "16384"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    for step in ("1/4 prepare", "2/4 tokenizer", "3/4 train", "4/4 quick test", "better than the unigram baseline"):
        assert step in out, out[-3000:]
    run = tmp_path / "runs" / "stdlib-tiny"
    meta = json.loads((tmp_path / "data" / "stdlib" / "bpe8192" / "meta.json").read_text())
    assert meta["vocab_size"] == 8192 and meta["roundtrip"]["failures"] == 0
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val_bpb" in ln]
    assert [e["step"] for e in evals] == [50, 100] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert "val_bpb" in out and "vocab 8,192: sized to the corpus" in out  # 11.7 MB of the stdlib: the largest
    hint = out.split("Try (a prompt from your own text):")[1]
    assert "minigpt generate --run" in hint and sample_prompt(tmp_path / "data" / "stdlib")[0].split("'")[0] in hint, hint
    samples = out.split("4/4 quick test")[1]
    assert any(word in samples for word in ("def ", "return", "self", "import")), samples[:2000]
