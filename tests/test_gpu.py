"""What only a device can show: each test skips, with its reason, where its device is missing. On a GPU
machine: `python3 -m pytest tests/test_gpu.py tests/test_model.py -k "cuda or gpu or mps"`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MODEL, losses, train_cfg

from minigpt.config import ModelConfig, Sampling
from minigpt.data import TokenData, eval_windows
from minigpt.evaluate import evaluate
from minigpt.generate import Decoder, generate_reference
from minigpt.model import GPT
from minigpt.train import Trainer, train
from minigpt.utils import Dist, UserError, auto_dtype, cuda_capability

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
mps = pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple MPS")


@cuda
def test_a_bf16_or_fp16_run_trains_on_cuda(tokens: Path, tmp_path: Path) -> None:
    """--dtype auto picks bf16 where its tensor cores are, fp16 with the scaler elsewhere; either trains."""
    summary = train(train_cfg(tokens, tmp_path, device="cuda", max_steps=30), MODEL)
    expected = auto_dtype("cuda", cuda_capability(torch.device("cuda")))
    assert summary["dtype"] == {torch.bfloat16: "bf16", torch.float16: "fp16"}[expected]
    loss = losses(tmp_path / "run")
    assert all(v == v for v in loss.values()) and loss[30] < loss[1]


@cuda
def test_fp16_overflows_halve_the_scale_on_cuda(tokens: Path, tmp_path: Path, monkeypatch) -> None:
    from test_robustness import poison

    poison(monkeypatch, {3, 4}, factor=1e30)
    summary = train(train_cfg(tokens, tmp_path, device="cuda", dtype="fp16", max_steps=10, log_every=5,
                              save_every=10, max_bad_steps=2, compile=False), MODEL)  # the patched forward: eager
    assert not summary["failed"] and summary["steps"] == 10
    state = json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] == 65536.0 / 4


@cuda
def test_reduce_overhead_trains_one_micro_batch_and_refuses_accumulation(tokens: Path, tmp_path: Path) -> None:
    summary = train(train_cfg(tokens, tmp_path / "a", device="cuda", max_steps=10, compile_mode="reduce-overhead"),
                    MODEL)
    assert not summary["failed"]
    with pytest.raises(UserError, match="replays CUDA graphs"):
        Trainer(train_cfg(tokens, tmp_path / "b", device="cuda", batch_size=4, total_batch_tokens=8 * 32,
                          compile_mode="reduce-overhead"), MODEL, Dist(), torch.device("cuda"))


@cuda
@pytest.mark.parametrize("fails_in", ["step", "evaluation"])
def test_a_failed_cuda_compilation_goes_on_eagerly(tokens: Path, tmp_path: Path, monkeypatch, capsys,
                                                  fails_in: str) -> None:
    class Broken(torch.nn.Module):  # a compilation that fails at its first call, in training or in eval mode
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *a, **k):
            if self.training == (fails_in == "step"):
                raise RuntimeError("inductor: simulated failure")
            return self.inner(*a, **k)

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken(model))
    summary = train(train_cfg(tokens, tmp_path, device="cuda", max_steps=10, eval_every=5), MODEL)
    assert not summary["failed"] and summary["steps"] == 10 and summary["best_val_bpb"] < float("inf")
    assert f"the first compiled {fails_in} failed on cuda" in capsys.readouterr().out


@two_gpus
def test_cuda_graph_decoding_on_the_second_gpu_matches_the_reference() -> None:
    """A graph captured on GPU 0 first (the process's default capture stream then lives there), then one for
    a model on GPU 1: each records its own GPU's work and replays the reference's tokens."""
    greedy = Sampling(temperature=0)
    for device in ("cuda:0", "cuda:1"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=64)).to(device).eval()
        decoder = Decoder(model, 1, 20, greedy, graph=True)
        assert decoder.graph is not None, device
        got = decoder.run([[1, 2, 3]])[0].tolist()
        assert got == generate_reference(model, [1, 2, 3], 20, greedy)[0], device


@mps
def test_evaluation_and_a_train_step_on_mps(tokens: Path, tmp_path: Path) -> None:
    summary = train(train_cfg(tokens, tmp_path, device="mps", max_steps=10, eval_every=5), MODEL)
    assert not summary["failed"] and summary["best_val_bpb"] < float("inf")
    data = TokenData(tokens)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=data.vocab_size, **MODEL)).eval()
    windows = eval_windows(data.val, 32, 4096)
    on_cpu = evaluate(model, data.val.arrays, windows, data.token_bytes, 8, torch.device("cpu"), torch.float32)
    on_mps = evaluate(model.to("mps"), data.val.arrays, windows, data.token_bytes, 8, torch.device("mps"),
                      torch.float32)
    assert on_mps.tokens == on_cpu.tokens and on_mps.bpb == pytest.approx(on_cpu.bpb, rel=1e-4)
