"""`minigpt bench` on CPU: the JSON line has every figure, all positive (shape only, never a speed)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import assert_user_error, run_cli, run_script, toy_documents

from minigpt.config import PrepareConfig, TokenizerConfig
from minigpt.corpus import prepare
from minigpt.tokenizer import build

INFERENCE_FIELDS = ["prefill_tokens_per_s", "decode_batch1_tokens_per_s", "ms_per_token_p50", "ms_per_token_p95",
                    "decode_batch8_tokens_per_s", "decode_batch32_tokens_per_s", "peak_memory_gib"]
TRAIN_FIELDS = ["ms_per_step", "tokens_per_s", "mfu", "peak_memory_gib"]


def test_bench_json_shape(tmp_path: Path) -> None:
    corpus = tmp_path / "toy.txt"
    corpus.write_text("\n\n".join(toy_documents(200)), encoding="utf-8")
    data, _ = prepare(PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp_path / "data")))
    tokens = build(TokenizerConfig(data=str(data), vocab_size=300)).out
    out_json = tmp_path / "bench.json"
    proc = run_script("minigpt", "bench", "--device", "cpu", "--preset", "tiny", "--n-layer", "1", "--n-head", "2",
                      "--n-embd", "32", "--block-size", "32", "--vocab-size", "300", "--steps", "2", "--batch-size", "4",
                      "--prompt-tokens", "8", "--new-tokens", "8", "--data", str(tokens), "--json", str(out_json), "--no-compile",
                      "--profile", str(tmp_path / "profile"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])  # the last line is the JSON
    assert json.loads(out_json.read_text()) == result
    assert result["device"] == "cpu" and result["torch"] and result["device_name"]
    assert result["model"]["n_layer"] == 1 and result["model"]["vocab_size"] == 300 and result["params"] > 0
    assert result["peak_flops"] > 0 and result["peak_source"] == "measured matmul"
    assert all(result["train"]["eager"][k] > 0 for k in TRAIN_FIELDS)
    assert result["train"]["compiled"] is None  # --no-compile: no compiled figures, and a null says so
    assert result["inference"]["graph"] is None and result["inference"]["compiled"] is None  # CUDA only
    for path in ("plain", "cache"):
        assert all(result["inference"][path][k] > 0 for k in INFERENCE_FIELDS), result["inference"][path]
    assert all(result["data"][k] > 0 for k in ("batches_per_s", "tokens_per_s", "encode_mb_per_s"))
    assert "minigpt bench" in proc.stdout and "decode tokens/s, batch 32" in proc.stdout
    for job in ("train", "decode"):  # a trace Perfetto can open, and the top operators by self time
        profile = result["profile"][job]
        assert json.loads(Path(profile["trace"]).read_text())["traceEvents"]
        assert profile["top"][0]["self_ms"] > 0 and any(op["name"] == "aten::mm" for op in profile["top"])
        assert Path(profile["table"]).read_text().count("aten::") >= 5


def test_bench_errors(tmp_path: Path) -> None:
    assert_user_error(run_cli("bench", "--device", "cpu", "--preset", "huge"), "unknown preset")
    assert_user_error(run_cli("bench", "--run", str(tmp_path / "none")), "does not exist")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_user_error(run_cli("bench", "--device", "cpu", "--profile", str(afile)), "--profile")
