"""The GPU and Mac paths, asked on a CPU: every device-dependent choice is a small function of what it depends
on (device type, compute capability, torch version, platform), and the trainer's wiring of each is checked
with the device part stood in for. What only a device can show is in test_gpu.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import MODEL, metrics, train_cfg

from minigpt.bench import max_rss_bytes
from minigpt.compilation import uses_cuda_graphs
from minigpt.config import ModelConfig, TrainConfig
from minigpt.data import TokenData, eval_windows
from minigpt.evaluate import evaluate, total_dtype
from minigpt.model import GPT
from minigpt.resume import resume
from minigpt.train import Trainer, train
from minigpt.utils import (
    Dist,
    UserError,
    auto_dtype,
    peak_flops_of,
    resolve_device,
    resolve_dtype,
    torch_version,
    uses_tf32,
)

CPU = torch.device("cpu")


def test_auto_dtype_is_bf16_only_where_its_tensor_cores_are() -> None:
    """V100 (7.0) and T4 (7.5) report bf16 as supported (emulated, slow): fp16 with the scaler there."""
    assert auto_dtype("cuda", (7, 0)) == auto_dtype("cuda", (7, 5)) == torch.float16
    assert auto_dtype("cuda", (8, 0)) == auto_dtype("cuda", (8, 9)) == auto_dtype("cuda", (9, 0)) == torch.bfloat16
    assert auto_dtype("cpu", None) == auto_dtype("mps", None) == torch.float32
    assert auto_dtype("cuda", (6, 1)) == torch.float32  # Pascal: slow fp16, no bf16


def test_fp32_on_cuda_runs_tf32_matmuls_from_ampere_on() -> None:
    assert uses_tf32("cuda", torch.float32, (8, 0)) and uses_tf32("cuda", torch.float32, (9, 0))
    assert not uses_tf32("cuda", torch.float32, (7, 5)) and not uses_tf32("cuda", torch.bfloat16, (9, 0))
    assert not uses_tf32("cpu", torch.float32, None) and not uses_tf32("mps", torch.float32, None)


def test_fp16_on_mps_needs_a_torch_whose_scaler_runs_there() -> None:
    mps = torch.device("mps")
    with pytest.raises(UserError, match="needs torch 2.8 or newer"):
        resolve_dtype("fp16", mps, version=(2, 7))
    assert resolve_dtype("fp16", mps, version=(2, 8)) == torch.float16
    assert resolve_dtype("bf16", mps, version=(2, 4)) == torch.bfloat16
    assert torch_version("2.13.0+cpu") == (2, 13) and torch_version("2.8.0a0") == (2, 8)
    assert torch_version("2.10a0") == (2, 10) and torch_version("2.10.0.dev20250101") == (2, 10)


def test_mfu_peaks_tell_pcie_and_nvl_cards_from_sxm() -> None:
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12 and peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert peak_flops_of("NVIDIA H200") == 989e12 and peak_flops_of("NVIDIA H200 NVL") == 835e12
    assert peak_flops_of("NVIDIA GH200 480GB") == 989e12 and peak_flops_of("NVIDIA L40S") == 362e12
    assert peak_flops_of("Tesla T4") == 65e12 and peak_flops_of("Some Future GPU") is None


def test_peak_memory_is_in_bytes_on_macos_and_kib_on_linux() -> None:
    assert max_rss_bytes(1_000_000, "darwin") == 1_000_000
    assert max_rss_bytes(1_000_000, "linux") == 1_024_000_000


def test_cuda_graph_modes_refuse_gradient_accumulation(tokens: Path, tmp_path: Path, monkeypatch) -> None:
    """reduce-overhead and max-autotune replay CUDA graphs, whose outputs (the .grad of one micro-batch)
    the next replay overwrites: a run that accumulates is refused, and so is an OOM halving under them."""
    assert uses_cuda_graphs("reduce-overhead", torch.device("cuda")) and uses_cuda_graphs("max-autotune", torch.device("cuda"))
    assert not uses_cuda_graphs("default", torch.device("cuda")) and not uses_cuda_graphs("max-autotune-no-cudagraphs",
                                                                                          torch.device("cuda"))
    assert not uses_cuda_graphs("reduce-overhead", CPU)  # inductor's CPU code has no CUDA graphs
    # the trainer's wiring, with the CUDA part stood in for
    monkeypatch.setattr("minigpt.train.compile_plan", lambda *a, **k: "compiled (reduce-overhead)")
    monkeypatch.setattr("minigpt.train.uses_cuda_graphs", lambda mode, device: True)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    cfg = train_cfg(tokens, tmp_path, batch_size=4, total_batch_tokens=8 * 32, compile_mode="reduce-overhead")
    with pytest.raises(UserError, match="accumulates 2; use --compile-mode default"):
        Trainer(cfg, MODEL, Dist(), CPU)
    trainer = Trainer(train_cfg(tokens, tmp_path, batch_size=4, compile_mode="reduce-overhead"), MODEL, Dist(), CPU)
    forward = GPT.forward

    def out_of_memory(self, idx, targets=None, cache=None, last_only=False):
        if self.training:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, idx, targets, cache, last_only)

    monkeypatch.setattr(GPT, "forward", out_of_memory)
    with pytest.raises(UserError, match="out of GPU memory under --compile-mode reduce-overhead"):
        trainer.train_step(1e-3)


def test_training_times_its_steps_after_the_device_has_done_them(tokens: Path, tmp_path: Path, monkeypatch) -> None:
    """On CUDA and MPS a step only queues work: ms/step, tokens/s and MFU read the clock after a sync, at
    log steps, and before an evaluation or a save (whose time is left out), never inside a step."""
    calls = []
    monkeypatch.setattr("minigpt.train.sync", lambda device: calls.append(device))
    train(train_cfg(tokens, tmp_path, max_steps=10, log_every=5, eval_every=100), MODEL)
    assert calls == [CPU, CPU, CPU]  # steps 5 and 10, and before the final evaluation and save
    assert [r["step"] for r in metrics(tmp_path / "run") if "ms" in r] == [5, 10]


def test_a_gpu_index_becomes_the_current_device(monkeypatch) -> None:
    """--device cuda:1: streams, CUDA graphs and pinned memory must live on GPU 1, not GPU 0."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(device))
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    with pytest.raises(UserError, match="has 2 CUDA GPU"):
        resolve_device("cuda:2")


def test_evaluation_sums_in_float32_on_mps(tokens: Path, monkeypatch) -> None:
    """MPS has no float64: its running total is float32, which scores within 1e-6 of the float64 one."""
    assert total_dtype(torch.device("mps")) == torch.float32 and total_dtype(CPU) == torch.float64
    data = TokenData(tokens)
    model = GPT(train_cfg_model(data.vocab_size)).eval()
    windows = eval_windows(data.val, 32, 4096)
    exact = evaluate(model, data.val.arrays, windows, data.token_bytes, 8, CPU, torch.float32)
    monkeypatch.setattr("minigpt.evaluate.total_dtype", lambda device: torch.float32)
    single = evaluate(model, data.val.arrays, windows, data.token_bytes, 8, CPU, torch.float32)
    assert single.tokens == exact.tokens and single.bytes == exact.bytes
    assert single.loss == pytest.approx(exact.loss, rel=1e-6) and single.bpb == pytest.approx(exact.bpb, rel=1e-6)


def train_cfg_model(vocab: int) -> ModelConfig:
    torch.manual_seed(0)
    return ModelConfig(vocab_size=vocab, **MODEL)


@pytest.fixture
def group(tmp_path: Path):
    """A one-process gloo group, for the trainer's DDP wiring (the processes' count is the test's own)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_is_what_compiles_so_the_all_reduce_overlaps_backward(tokens: Path, tmp_path: Path, monkeypatch,
                                                                   group) -> None:
    compiled = []
    monkeypatch.setattr("minigpt.train.compile_plan", lambda *a, **k: "compiled (default: test)")
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    trainer = Trainer(train_cfg(tokens, tmp_path), MODEL, Dist(0, 2, 0), CPU)
    assert isinstance(compiled[0], torch.nn.parallel.DistributedDataParallel) and trainer.model is compiled[0]
    assert trainer.eval_model is trainer.raw_model  # CPU evaluation stays eager


def test_the_loss_is_averaged_over_processes_without_reduce_op_avg(tokens: Path, tmp_path: Path, monkeypatch,
                                                                    group) -> None:
    """gloo has no ReduceOp.AVG before torch 2.7 (pyproject allows 2.4): SUM, then divide."""
    trainer = Trainer(train_cfg(tokens, tmp_path), MODEL, Dist(0, 2, 0), CPU)
    norm = trainer.train_step(1e-3)
    mine = float(trainer.loss_sum)
    real = dist.all_reduce

    def two_processes(t, op=dist.ReduceOp.SUM, **kw):
        if op == dist.ReduceOp.AVG:
            raise RuntimeError("Cannot use ReduceOp.AVG with Gloo")
        if op == dist.ReduceOp.SUM:
            t.mul_(2)  # the other process's loss equals this one's
            return None
        return real(t, op=op, **kw)

    monkeypatch.setattr(dist, "all_reduce", two_processes)
    trainer.log_step(1e-3, norm, 1, 0.1)
    assert metrics(tmp_path / "run")[-1]["loss"] == pytest.approx(mine, abs=1e-6)


def test_a_process_that_cannot_see_the_run_says_where_it_runs(tmp_path: Path) -> None:
    """A multi-node resume reads the run on every node: without shared storage, one sentence names the
    process and its host."""
    cfg = TrainConfig(runs_dir=str(tmp_path / "runs"), name="run", resume=True)
    with pytest.raises(UserError, match=rf"process 3 of 8 \(on {socket.gethostname()}\) cannot see the run folder .*"
                                        "shared storage"):
        resume(cfg, {}, None, 8, 3)
    with pytest.raises(UserError, match="does not exist"):  # one process: the plain message
        resume(cfg, {}, None, 1, 0)

