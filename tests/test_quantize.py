"""`minigpt quantize`: int8 error bound, exact save/load, generation vs its dequantized reference, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_cli, run_script, toy_documents

from minigpt.checkpoint import find_checkpoint, load_model, load_run
from minigpt.config import ModelConfig, PrepareConfig, Sampling, TokenizerConfig, TrainConfig
from minigpt.corpus import prepare
from minigpt.generate import generate
from minigpt.int8 import Int8Linear, dequantize, int8_matmul, quantize_int8, set_inference_dtype, to_int8
from minigpt.model import GPT, KVCache
from minigpt.quantize import earlier_output, int8_tensors
from minigpt.tokenizer import build
from minigpt.train import train
from minigpt.utils import sha256_file


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("quant")
    corpus = tmp / "toy.txt"
    corpus.write_text("\n\n".join(toy_documents(400)), encoding="utf-8")
    data, _ = prepare(PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp / "data")))
    tokens = build(TokenizerConfig(data=str(data), vocab_size=320)).out
    train(TrainConfig(data=str(tokens), runs_dir=str(tmp / "runs"), name="run", batch_size=8, max_steps=60, lr=3e-3,
                      warmup_steps=5, eval_every=30, eval_tokens=2048, device="cpu"),
          {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32})
    return tmp / "runs" / "run"


def test_per_channel_error_stays_within_the_int8_bound() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (64,)
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (err.amax(dim=1) / w.abs().amax(dim=1).clamp(min=1e-12) <= 1 / 254 + 1e-6).all()


def test_save_load_round_trip_is_exact(run: Path, tmp_path: Path) -> None:
    proc = run_cli("quantize", "--run", str(run), "--out", str(tmp_path / "q"), "--device", "cpu",
                      "--eval-tokens", "1024", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model, config = load_model(find_checkpoint(run, "best"))
    expected = int8_tensors(model)
    loaded, qconfig = load_model(find_checkpoint(tmp_path / "q", "best"))
    assert qconfig["quantization"]["scheme"] == "int8" and "wte" in qconfig["quantization"]["quantized"]
    state = {k: v for k, v in loaded.state_dict().items() if not k.startswith("lm_head.")}
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()  # the tie survives, in int8


def test_int8_generation_matches_its_dequantized_reference(run: Path) -> None:
    model, _ = load_model(find_checkpoint(run, "best"))
    tensors = int8_tensors(model)
    q = to_int8(GPT(model.cfg), tensors).eval()
    ref = GPT(model.cfg).eval()  # plain fp32 model holding the dequantized weights
    ref.load_state_dict({k: dequantize(tensors[k], tensors[k.removesuffix(".weight") + ".scale"])
                         if k.removesuffix(".weight") + ".scale" in tensors else v
                         for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    assert int8_matmul(q, torch.device("cuda")) == "int8 dequant"  # the weight-only path (no GPU needed to pick it)
    greedy = Sampling(temperature=0)
    assert generate(q, [1, 5, 9], 25, greedy, rows=2) == generate(ref, [1, 5, 9], 25, greedy, rows=2)
    path = int8_matmul(q, torch.device("cpu"))  # the CPU path runs and stays close
    assert path in ("int8 cpu-dynamic", "int8 dequant")
    assert len(generate(q, [1, 5, 9], 25, greedy)[0]) == 25
    x = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        assert (q(x).logits - ref(x).logits).abs().max() < 0.5
    assert all(m.dynamic is not None for m in q.modules() if isinstance(m, Int8Linear)) == (path == "int8 cpu-dynamic")


@pytest.mark.slow
def test_quantized_runs_load_everywhere_and_report(run: Path, tmp_path: Path) -> None:
    reports = {}
    for kind in ("int8", "bf16", "fp16"):
        out = tmp_path / f"run-{kind}"
        proc = run_cli("quantize", "--run", str(run), "--to", kind, "--out", str(out), "--device", "cpu",
                          "--eval-tokens", "2048", "--new-tokens", "8")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reports[kind] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["before"]["bytes"] > r["after"]["bytes"] > 0 and r["after"]["val_bpb"] > 0
        assert r["after"]["decode_batch1_tokens_per_s"] > 0 and "size x" in proc.stdout
        assert load_run(out, "best").config["quantization"]["scheme"] == kind
    assert reports["int8"]["size_ratio"] <= 0.30
    assert 0.45 < reports["bf16"]["size_ratio"] < 0.55
    assert abs(reports["int8"]["val_bpb_change_pct"]) < 5 and abs(reports["bf16"]["val_bpb_change_pct"]) < 5
    q = str(tmp_path / "run-int8")
    proc = run_cli("generate", "--run", q, "--prompt", "The", "--max-new-tokens", "8", "--temperature", "0")
    assert proc.returncode == 0 and "int8" in proc.stdout, proc.stdout + proc.stderr
    proc = run_script("quick_test.py", "--run", q, "--max-new-tokens", "4", "--temperature", "0.5")
    assert "val_bpb" in proc.stdout and "int8" in proc.stdout, proc.stdout + proc.stderr
    proc = run_cli("bench", "--run", q, "--device", "cpu", "--new-tokens", "4", "--prompt-tokens", "4")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["train"]["eager"] is None and "int8" in result["source"]
    assert result["inference"]["cache"]["decode_batch1_tokens_per_s"] > 0


def test_int8_grouped_query_attention_generates_as_its_dequantized_reference() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                            tie_embeddings=False)).eval()
    tensors = int8_tensors(model)
    q = to_int8(GPT(model.cfg), tensors).eval()
    ref = GPT(model.cfg).eval()
    ref.load_state_dict({k: dequantize(tensors[k], tensors[k.removesuffix(".weight") + ".scale"])
                         if k.removesuffix(".weight") + ".scale" in tensors else v
                         for k, v in model.state_dict().items()})
    assert q.blocks[0].attn.qkv.weight.shape == (128, 64)  # q: 64 rows, k and v: 2 heads x 16 each
    int8_matmul(q, torch.device("cuda"))  # the weight-only path
    greedy = Sampling(temperature=0, repetition_penalty=1.3)
    assert generate(q, [1, 5, 9], 25, greedy, rows=2) == generate(ref, [1, 5, 9], 25, greedy, rows=2)


def test_errors(run: Path, tmp_path: Path) -> None:
    assert_user_error(run_cli("quantize", "--run", str(tmp_path / "none")), "does not exist")
    assert_user_error(run_cli("quantize", "--run", str(run), "--to", "int4"), "unknown --to")
    out = tmp_path / "q8"
    assert run_cli("quantize", "--run", str(run), "--out", str(out), "--device", "cpu",
                      "--eval-tokens", "1024", "--new-tokens", "4").returncode == 0
    assert_user_error(run_cli("quantize", "--run", str(out), "--device", "cpu"), "already quantized to int8")
    # a second time to the same folder: only with --force (which replaces it)
    again = ["quantize", "--run", str(run), "--out", str(out), "--device", "cpu", "--eval-tokens", "1024",
             "--new-tokens", "4"]
    assert_user_error(run_cli(*again), "holds an earlier minigpt quantize output", "--force")
    assert run_cli(*again, "--force").returncode == 0
    info = json.loads(run_cli("info", "--run", str(out)).stdout.strip().splitlines()[-1])
    assert info["quantization"] == "int8" and info["quantization_source"] == str(run / "best")
    assert info["val_bpb"] is None  # the source run's figure is not this run's
    assert info["parameters"] < info["memory"]["weights_bytes"] < 1.2 * info["parameters"]  # a byte a weight, and scales
    wrong = tmp_path / "wrong"
    shutil.copytree(run, wrong)
    tok = build(TokenizerConfig(data=str(run.parent.parent / "data" / "toy"), char=True)).out / "tokenizer.json"
    for tag in ("best", "last"):
        shutil.copyfile(tok, wrong / tag / "tokenizer.json")
        (wrong / tag / "manifest.json").unlink()  # resealed below: only the vocab mismatch remains
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in (wrong / tag).iterdir()}
        (wrong / tag / "manifest.json").write_text(json.dumps(files))
    assert_user_error(run_cli("quantize", "--run", str(wrong), "--device", "cpu"), "does not belong")


def test_quantize_never_writes_over_a_run(run: Path, tmp_path: Path) -> None:
    """OUT that is the run, inside it or holds it is refused, --force or not, and so is a folder that is not
    an earlier quantize output (another run, say): the run's checkpoints stay as they were."""
    before = {p: sha256_file(p) for p in run.rglob("*") if p.is_file()}
    other = tmp_path / "other"
    shutil.copytree(run, other)
    for target, fragment in ((run, "the run"), (run / "best" / "q", "the run"), (run.parent, "the run"),
                             (other, "not an earlier minigpt quantize output"), (run / "metrics.jsonl", "is a file")):
        for force in ([], ["--force"]):
            assert_user_error(run_cli("quantize", "--run", str(run), "--out", str(target), "--device", "cpu", *force),
                              fragment)
    assert {p: sha256_file(p) for p in run.rglob("*") if p.is_file()} == before
    assert load_run(other, "best").config.get("quantization") is None
    # what a quantize killed before its first checkpoint was in place leaves is its own: --force replaces it
    killed = tmp_path / "killed"
    (killed / ".best.tmp").mkdir(parents=True)
    assert earlier_output(killed) and not earlier_output(other)


def test_bf16_inference_for_float_and_int8_models(run: Path) -> None:
    """What CUDA inference does (bf16 activations and KV cache), checked here on CPU."""
    model, _ = load_model(find_checkpoint(run, "best"))
    q = to_int8(GPT(model.cfg), int8_tensors(model)).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        ref = model.eval()(x).logits
        for m in (q, model):
            assert set_inference_dtype(m, torch.bfloat16) == "bf16"
            out = m(x).logits
            assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.25
            cache = KVCache(m.cfg, 1, 32, torch.device("cpu"), next(m.parameters()).dtype)
            assert cache.k.dtype == torch.bfloat16
            assert len(generate(m, [1, 2, 3], 10, Sampling(temperature=0))[0]) == 10
    assert all(b.dtype == torch.int8 for n, b in q.named_buffers() if n.endswith(".weight"))
