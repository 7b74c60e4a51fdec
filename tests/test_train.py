"""Training: loss falls, checkpoints round-trip, accumulation = one big batch, exact resume, DDP."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    MODEL,
    MODEL_ARGS,
    ROOT,
    assert_user_error,
    ctrl_c_during,
    losses,
    metrics,
    run_cli,
    run_face,
    run_script,
    train_cfg,
)
from typer.testing import CliRunner

from minigpt.bench import bench_train
from minigpt.checkpoint import find_checkpoint, load_model, save_checkpoint
from minigpt.cli import app, script_app
from minigpt.compilation import compile_plan, cpp_compiler
from minigpt.config import (
    OPTIMIZERS,
    RECIPES,
    BenchConfig,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
    model_config,
    with_recipe,
)
from minigpt.data import BatchSampler, Shards, TokenData, eval_windows
from minigpt.model import GPT
from minigpt.optim import Muon, Optimizers, auto_lr, lr_at, orthogonalise
from minigpt.plan import planned_steps
from minigpt.resume import resume_command
from minigpt.tokenizer import build
from minigpt.train import Trainer, forward_backward, train
from minigpt.utils import Dist, UserError, sha256_file


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
    # a rate so small that no weight moves (0 would pick one by width)
    summary = train(train_cfg(tokens, tmp_path, lr=1e-30, warmup_steps=1, eval_every=3, patience=2), MODEL)
    # best at step 3, out of patience at 9, then back to step 3's weights for a decay of ceil(0.3 x 3) steps
    assert summary["steps"] == 10 and "out of patience at step 9, then decayed from the best point (step 3)" \
        in summary["stop_reason"]


def test_checkpoint_round_trip(tokens: Path, tmp_path: Path) -> None:
    train(train_cfg(tokens, tmp_path, max_steps=5), MODEL)
    model, config = load_model(find_checkpoint(tmp_path / "run", "last"))
    save_checkpoint(tmp_path / "copy", "last", model, {k: v for k, v in config.items() if k != "format_version"},
                    tokens / "tokenizer.json")
    again, _ = load_model(find_checkpoint(tmp_path / "copy", "last"))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert again.lm_head.weight.data_ptr() == again.wte.weight.data_ptr()  # tie restored


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_accumulation_matches_one_large_batch(tokens: Path, tmp_path: Path, kind: str) -> None:
    train(train_cfg(tokens, tmp_path / "big", batch_size=16, max_steps=6, eval_every=100, optimizer=kind), MODEL)
    train(train_cfg(tokens, tmp_path / "acc", batch_size=4, total_batch_tokens=16 * 32, max_steps=6, eval_every=100,
                    optimizer=kind), MODEL)
    big, acc = losses(tmp_path / "big" / "run"), losses(tmp_path / "acc" / "run")
    assert big.keys() == acc.keys()
    for step in big:
        assert big[step] == pytest.approx(acc[step], abs=2e-5)
    a, _ = load_model(find_checkpoint(tmp_path / "big" / "run", "last"))
    b, _ = load_model(find_checkpoint(tmp_path / "acc" / "run", "last"))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):  # Newton-Schulz amplifies rounding a little
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5 if kind == "adamw" else 1e-4)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest() -> None:
    for tie in (True, False):
        model = GPT(ModelConfig(**MODEL, vocab_size=64, tie_embeddings=tie))
        opt = Optimizers(model, TrainConfig(optimizer="muon", lr=2e-3, muon_lr=0.02), torch.device("cpu"))
        muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
        adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
        named = dict(model.named_parameters())
        assert muon == {id(p) for n, p in named.items() if n.startswith("blocks.") and p.dim() == 2}
        assert not muon & adamw and muon | adamw == {id(p) for p in model.parameters()}
        assert id(model.wte.weight) in adamw and id(model.lm_head.weight) in adamw
        opt.set_lr(1e-3)  # half the schedule's peak: every group at half its own peak
        assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 0.01]
    plain = Optimizers(model, TrainConfig(), torch.device("cpu"))
    assert plain.all == [plain.adamw] and len(plain.param_groups) == 2


def test_orthogonalise_pushes_every_singular_value_towards_one() -> None:
    torch.manual_seed(0)
    for shape in ((384, 128), (128, 384), (64, 200)):  # not square: a random square matrix is nearly singular
        g = torch.randn(shape) * torch.logspace(-1, 1, shape[1])  # singular values over two decades
        o = orthogonalise(g)
        s = torch.linalg.svdvals(o)
        assert o.shape == g.shape and o.dtype == g.dtype
        assert 0.5 < s.min() and s.max() < 1.3, (shape, s.min(), s.max())
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ vh).flatten(), dim=0) > 0.9


def test_a_run_that_would_read_its_data_many_times_gets_dropout(tokens: Path, tmp_path: Path, capsys) -> None:
    cpu = torch.device("cpu")
    train_tokens = TokenData(tokens).train.tokens
    many = 5 * train_tokens // (8 * 32) + 1  # steps of 8 x 32 tokens: five epochs and a bit
    assert Trainer(train_cfg(tokens, tmp_path, max_steps=many, fit_data=True), MODEL, Dist(), cpu).mcfg.dropout == 0.1
    assert "--dropout 0 to train without it" in " ".join(capsys.readouterr().out.split())
    assert Trainer(train_cfg(tokens, tmp_path, max_steps=many, fit_data=True), MODEL | {"dropout": 0.0}, Dist(),
                   cpu).mcfg.dropout == 0
    assert Trainer(train_cfg(tokens, tmp_path, max_steps=many), MODEL, Dist(), cpu).mcfg.dropout == 0  # --no-fit-data
    few = 3 * train_tokens // (8 * 32)  # three epochs: no dropout
    assert Trainer(train_cfg(tokens, tmp_path, max_steps=few, fit_data=True), MODEL, Dist(), cpu).mcfg.dropout == 0


def test_one_muon_step_by_hand() -> None:
    """Nesterov momentum, orthogonalised, the RMS-matching scale 0.2 sqrt(max(rows, cols)), decoupled decay."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    w0, buf = w.detach().clone(), torch.zeros(6, 4)
    opt = Muon([w], lr=0.1, weight_decay=0.5, momentum=0.9)
    for _ in range(2):
        g = torch.randn(6, 4)
        w.grad = g.clone()
        before = w.detach().clone()
        opt.step()
        buf = 0.9 * buf + g
        want = before * (1 - 0.1 * 0.5) - 0.1 * 0.2 * math.sqrt(6) * orthogonalise(g + 0.9 * buf)
        torch.testing.assert_close(w.detach(), want)
    assert not torch.equal(w.detach(), w0)


def test_an_optimizer_state_saved_with_other_kernels_still_steps() -> None:
    """optimizer.pt from before AdamW was fused on CPU (or from another device) carries fused=False: the
    loaded groups keep this machine's kernel, and the on-device skip still works."""
    model = GPT(ModelConfig(**MODEL, vocab_size=64))
    old = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=False)
    model(torch.randint(0, 64, (2, 9))[:, :-1], torch.randint(0, 64, (2, 8))).loss.backward()
    old.step()
    opt = Optimizers(model, TrainConfig(), torch.device("cpu"))
    state = old.state_dict()
    state["param_groups"] = [dict(state["param_groups"][0], params=ids) for ids in
                             ([i for i, p in enumerate(model.parameters()) if p.dim() >= 2],
                              [i for i, p in enumerate(model.parameters()) if p.dim() < 2])]
    opt.load_state_dict(state, Path("old"))
    assert all(g["fused"] for g in opt.adamw.param_groups)
    opt.adamw.found_inf = torch.zeros(())  # what train_step sets
    opt.adamw.step()


def test_fp16_overflow_in_one_optimizers_weights_skips_both(tokens: Path, tmp_path: Path, monkeypatch) -> None:
    """Under the fp16 scaler each optimizer sees only its own gradients: an overflow in the embedding alone
    must not let Muon step the blocks with the clip's zeroed gradients."""
    import minigpt.train as train_module

    monkeypatch.setattr(train_module, "resolve_dtype", lambda name, device: torch.float16)
    trainer = Trainer(train_cfg(tokens, tmp_path, optimizer="muon"), MODEL, Dist(), torch.device("cpu"))
    trainer.train_step(1e-3)
    blocks = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters() if n.startswith("blocks.")}
    momentum = [s["momentum_buffer"].clone() for s in trainer.optimizer.muon.state.values()]
    handle = trainer.raw_model.wte.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
    trainer.train_step(1e-3)
    handle.remove()
    for n, p in trainer.raw_model.named_parameters():
        if n in blocks:
            assert torch.equal(p.detach(), blocks[n]), n
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in zip(trainer.optimizer.muon.state.values(), momentum,
                                                                      strict=True))
    trainer.train_step(1e-3)  # and the next good step moves them again
    assert any(not torch.equal(p.detach(), blocks[n]) for n, p in trainer.raw_model.named_parameters() if n in blocks)


def test_a_time_budget_counts_in_the_small_data_rule(tokens: Path, tmp_path: Path) -> None:
    """--max-steps far beyond what --max-minutes allows: the epochs are those the budget gives."""
    cpu = torch.device("cpu")
    many = 50 * TokenData(tokens).train.tokens // (8 * 32)
    budget = train_cfg(tokens, tmp_path, max_steps=many, max_minutes=0.001)
    train_tokens = TokenData(tokens).train.tokens
    planned = planned_steps(budget, model_config("tiny", 300, MODEL), 8, cpu, train_tokens)
    assert 0 < planned < 3 * TokenData(tokens).train.tokens // (8 * 32)
    assert Trainer(budget, MODEL, Dist(), cpu).mcfg.dropout == 0
    assert planned_steps(replace(budget, max_minutes=0), model_config("tiny", 300, MODEL), 8, cpu, train_tokens) == many
    # no rate known for MPS: the step budget
    assert planned_steps(budget, model_config("tiny", 300, MODEL), 8, torch.device("mps"), train_tokens) == many
    # an epoch budget: the steps that read the split that many times
    epochs = replace(budget, max_minutes=0, max_epochs=2)
    assert planned_steps(epochs, model_config("tiny", 300, MODEL), 8, cpu, train_tokens) == -(-2 * train_tokens // 256)


def test_max_epochs_caps_the_steps_and_the_schedule_ends_there(tokens: Path, tmp_path: Path) -> None:
    train_tokens = TokenData(tokens).train.tokens
    steps = -(-train_tokens // (8 * 32))  # one epoch of 8 x 32-token rows, rounded up
    summary = train(train_cfg(tokens, tmp_path, max_steps=10**6, max_epochs=1, eval_every=10**6), MODEL)
    lrs = [r["lr"] for r in metrics(tmp_path / "run") if "lr" in r]
    assert summary["steps"] == steps and summary["tokens_seen"] >= train_tokens > summary["tokens_seen"] - 256
    assert lrs[-1] < 0.15 * 3e-3 < max(lrs)  # decayed to (nearly) the floor, 10% of the peak, by the last step


def test_compile_plan_compiles_a_cpu_run_only_where_it_pays(monkeypatch) -> None:
    """Measured on 2 cores at the #14 shape: 1.25-1.31x a step after a first compilation of ~40 s (repaid after
    ~3 minutes) or ~4 s once inductor's cache holds the shape (30 s); nothing gained where the output head
    is most of the work. Compiled: CUDA always; CPU runs that long, not head-bound."""
    cpu = torch.device("cpu")
    shape = GPT(ModelConfig(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=64))  # the #14 shape
    head_bound = GPT(ModelConfig(vocab_size=8192, n_layer=4, n_head=4, n_embd=128, block_size=128))  # the pipeline's
    plan = partial(compile_plan, model=shape, device=cpu, steps_left=10**6, tokens_per_step=768)
    assert plan(TrainConfig(max_minutes=3.5)) == "compiled (default: about 3m30s to train)"
    assert plan(TrainConfig(max_minutes=2.5)) == ""  # a first compilation would not repay itself...
    assert plan(TrainConfig(max_minutes=2.5), cached=True) == "compiled (default, cached: about 2m30s to train)"
    assert plan(TrainConfig(max_minutes=0.4), cached=True) == ""  # ...a cached one does, after 30 s
    assert plan(TrainConfig(max_minutes=3.5), minutes_used=1.0) == ""  # resumed with 2.5 minutes left
    assert plan(TrainConfig(max_minutes=3.5, compile=False)) == ""
    assert plan(TrainConfig(max_minutes=10), steps_left=300) == ""  # 300 steps end it in ~26 s
    assert plan(TrainConfig(), steps_left=300, cached=True) == "" and plan(TrainConfig(), steps_left=5000)
    assert compile_plan(TrainConfig(max_minutes=6.5), head_bound, cpu, 10**6, 2048, cached=True) == ""
    assert compile_plan(TrainConfig(), shape, torch.device("cuda"), 10, 768) == "compiled (default)"
    assert compile_plan(TrainConfig(max_minutes=60), shape, torch.device("mps"), 10**6, 768) == ""
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler for inductor
    assert plan(TrainConfig(max_minutes=3.5)) == ""


def test_a_cpu_compilation_that_fails_trains_on_eagerly(tokens: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The first compiled step fails (as without a working C++ compiler): the run says so once, redoes that
    step eagerly with the same batch, and logs the eager run's losses exactly."""
    train(train_cfg(tokens, tmp_path / "eager", max_steps=6, compile=False), MODEL)

    class NoCompiler(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr("minigpt.train.compile_plan", lambda *a, **k: "compiled (default: test)")
    monkeypatch.setattr(torch, "compile", lambda model, **kw: NoCompiler())
    capsys.readouterr()
    summary = train(train_cfg(tokens, tmp_path / "fell", max_steps=6), MODEL)
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("the first compiled step failed on cpu (InvalidCxxCompiler: No working C++ compiler found); "
                     "training on without torch.compile") == 1, out
    assert summary["steps"] == 6 and losses(tmp_path / "fell" / "run") == losses(tmp_path / "eager" / "run")
    assert not (tmp_path / "inductor" / "minigpt").exists()  # never noted as compiled


@pytest.mark.skipif(not cpp_compiler(), reason="no C++ compiler: CPU runs never compile here")
def test_a_resumed_cpu_run_steps_as_before_and_says_what_changed(tokens: Path, tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:
    """Compiled or eager, a resumed CPU run keeps the way it stepped (however little is left); a run resumed
    with another budget or --lr says so, and keeps every setting it was not given (--schedule cosine here,
    whatever the default)."""
    cpu = torch.device("cpu")
    monkeypatch.setattr("minigpt.train.compile_plan", lambda *a, **k: "compiled (default: test)")
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # compiled in name: this test needs no C++
    train(train_cfg(tokens, tmp_path / "c", max_steps=4, schedule="cosine"), MODEL)
    monkeypatch.undo()
    resumed = Trainer(train_cfg(tokens, tmp_path / "c", max_steps=6, resume=True, schedule="cosine"), MODEL, Dist(), cpu)
    assert resumed.compiled == "compiled (default: as before the resume)"
    train(train_cfg(tokens, tmp_path / "e", max_steps=4), MODEL)
    monkeypatch.setattr("minigpt.train.compile_plan", lambda *a, **k: "compiled (default: test)")
    assert Trainer(train_cfg(tokens, tmp_path / "e", max_steps=6, resume=True), MODEL, Dist(), cpu).compiled == ""
    capsys.readouterr()
    trainer = Trainer(train_cfg(tokens, tmp_path / "c", max_steps=6, resume=True, lr=1e-3), MODEL, Dist(), cpu)
    out = " ".join(capsys.readouterr().out.split())
    assert "resuming with the run's saved settings but --max-steps 4 -> 6, --lr 0.003 -> 0.001" in out, out
    assert "from here the run differs from an uninterrupted one" in out
    assert trainer.cfg.schedule == "cosine" and trainer.cfg.lr == 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not cpp_compiler(), reason="no C++ compiler for inductor")
def test_the_compiled_cpu_step_trains_as_the_eager_one(tokens: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """torch.compile on CPU for real (inductor's C++): the same losses as eager, to float rounding."""
    train(train_cfg(tokens, tmp_path / "eager", max_steps=8, compile=False), MODEL)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # cold, as on a fresh machine
    plan = compile_plan
    monkeypatch.setattr("minigpt.train.compile_plan", lambda *a, **k: "compiled (default: test)")
    capsys.readouterr()
    train(train_cfg(tokens, tmp_path / "compiled", max_steps=8), MODEL)
    out = capsys.readouterr().out
    assert "compiled (default: test)" in out and "compiled step failed" not in out
    eager, compiled = losses(tmp_path / "eager" / "run"), losses(tmp_path / "compiled" / "run")
    assert eager.keys() == compiled.keys() and all(abs(eager[s] - compiled[s]) < 1e-3 for s in eager), (eager, compiled)
    # noted beside inductor's cache: a later run of this shape knows its compilation is cached
    monkeypatch.setattr("minigpt.train.compile_plan", plan)
    trainer = Trainer(train_cfg(tokens, tmp_path / "again", max_steps=10**6, max_minutes=1), MODEL | {"dropout": 0.0},
                      Dist(), torch.device("cpu"))
    assert len(list((tmp_path / "inductor" / "minigpt").iterdir())) == 1 and trainer.marker.exists()
    assert trainer.compiled.startswith("compiled (default, cached")
    # bench's compiled CPU step, on the same machinery
    step = bench_train(GPT(model_config("tiny", 300, MODEL)), BenchConfig(batch_size=8, steps=2), torch.device("cpu"),
                       torch.float32, True, 1e12)
    assert step["ms_per_step"] > 0 and step["tokens_per_s"] > 0


def test_evaluations_during_training_score_a_spread_subset_and_the_last_the_whole_split(
        tokens: Path, tmp_path: Path, monkeypatch) -> None:
    """Between steps, 1/8 of the tokens trained since the last evaluation (10 steps x 256 / 8 = 320: ten
    windows); at the end every val token, the figure `minigpt eval` gives for the last checkpoint."""
    monkeypatch.setattr("minigpt.train.EVAL_PROBE_MIN", 64)
    summary = train(train_cfg(tokens, tmp_path, max_steps=25, eval_every=10, eval_tokens=10**6), MODEL)
    evals = [r for r in metrics(tmp_path / "run") if "val_bpb" in r]
    whole = sum(w.length - 1 - w.skip for w in eval_windows(TokenData(tokens).val, 32, 10**6))
    # the same windows every time (the best checkpoint compares like with like), the last step's too
    assert whole > 320 and [(r["step"], r["val_tokens"]) for r in evals] == [(10, 320), (20, 320), (25, 320)]
    [final] = [r for r in metrics(tmp_path / "run") if "whole_val_bpb" in r]
    assert final["step"] == 25 and final["whole_val_tokens"] == whole
    assert summary["last_val_loss"] == pytest.approx(final["whole_val_loss"], abs=1e-6)
    proc = run_cli("eval", "--run", str(tmp_path / "run"), "--checkpoint", "last", "--stride", "32", "--device",
                   "cpu", str(tokens))
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["tokens"] == whole and r["bpb"] == pytest.approx(final["whole_val_bpb"], abs=1e-4)
    # resumed with evaluations twice as often: the same subset, so that its best so far still compares
    train(train_cfg(tokens, tmp_path, max_steps=35, eval_every=5, eval_tokens=10**6, resume=True), MODEL)
    evals = [r for r in metrics(tmp_path / "run") if "val_bpb" in r]
    assert [(r["step"], r["val_tokens"]) for r in evals][-2:] == [(30, 320), (35, 320)]
    # a stop for want of progress scores the whole split too
    summary = train(train_cfg(tokens, tmp_path / "patience", lr=1e-30, max_steps=100, eval_every=5, patience=2,
                              eval_tokens=10**6), MODEL)
    assert "out of patience at step 15" in summary["stop_reason"]  # then a decay from step 5, over 2 steps
    assert [r["step"] for r in metrics(tmp_path / "patience" / "run") if "whole_val_bpb" in r] == [17]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_cpu_memory_is_kept_for_the_next_tensors() -> None:
    """A 64 MB tensor made and freed 30 times: by default glibc maps it afresh each time and the process
    faults every page in again; once `resolve_device` has picked the CPU, freed memory is reused."""
    code = ("import resource, sys, torch\nfrom minigpt.utils import resolve_device\n"
            "if sys.argv[1] == 'cpu': resolve_device('cpu')\n"
            "for _ in range(30):\n    t = torch.empty(16 << 20).fill_(1); s = [torch.empty(100) for _ in range(3)]; del t\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    faults = {how: int(subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, env=env,
                                      check=True).stdout) for how in ("cpu", "default")}
    assert faults["cpu"] < faults["default"] / 3, faults


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_a_run_stopped_by_ctrl_c_resumes_exactly(tokens: Path, tmp_path: Path, monkeypatch, kind: str) -> None:
    """Ctrl-C during step 7, then --resume: the losses after it are the uninterrupted run's, exactly (the
    optimizer's moments, Muon's momentum, the batch sampler and the RNG all restored)."""
    cfg = partial(train_cfg, tokens, max_steps=14, eval_every=5, optimizer=kind)
    train(cfg(tmp_path / "whole"), MODEL)
    ctrl_c_during(monkeypatch, 7)
    summary = train(cfg(tmp_path / "split"), MODEL)
    monkeypatch.undo()
    assert summary["steps"] == 7 and max(losses(tmp_path / "split" / "run")) == 7
    train(cfg(tmp_path / "split", resume=True), MODEL)
    assert losses(tmp_path / "split" / "run") == losses(tmp_path / "whole" / "run")
    other = "adamw" if kind == "muon" else "muon"
    with pytest.raises(UserError, match=f"was trained with --optimizer {kind}, which a resumed run keeps"):
        train(cfg(tmp_path / "split", resume=True, optimizer=other), MODEL, given={"optimizer"})


# -- a resumed run keeps its settings ----------------------------------------------------------------------


def test_the_printed_resume_command_names_the_run_and_its_processes(monkeypatch) -> None:
    assert resume_command(Path("runs/exp/a b"), 1) == "python 03_train.py --resume --runs-dir runs/exp --name 'a b'"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command(Path("/r/x"), 4).startswith("torchrun --nproc_per_node=4 03_train.py --resume")
    assert resume_command(Path("/r/x"), 8).startswith("torchrun --nnodes=2 --nproc_per_node=4 03_train.py")


def test_a_resume_keeps_the_saved_settings_the_command_line_leaves_out(tokens: Path, tmp_path: Path) -> None:
    """8 steps at --batch-size 4 in one go, or 4 then `--resume --max-steps 8` without the batch size: the
    same losses (the resumed run used to take the default batch of 32)."""
    base = ["--data", str(tokens), "--name", "run", "--device", "cpu", "--lr", "3e-3", "--warmup-steps", "3",
            "--log-every", "1", "--eval-every", "100", "--eval-tokens", "1024", "--batch-size", "4", *MODEL_ARGS]
    whole = run_face("03_train.py", *base, "--runs-dir", str(tmp_path / "whole"), "--max-steps", "8")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    first = run_face("03_train.py", *base, "--runs-dir", str(tmp_path / "split"), "--max-steps", "4")
    assert first.returncode == 0, first.stdout + first.stderr
    again = run_face("03_train.py", "--runs-dir", str(tmp_path / "split"), "--name", "run", "--resume",
                     "--max-steps", "8")
    assert again.returncode == 0, again.stdout + again.stderr
    out = " ".join(again.stdout.split())
    assert "= 4 x 32" in out and "resuming at step 4" in out, out
    # a longer budget moves the schedule's decay, and the log says so (here it is still flat at step 4)
    assert "saved settings but --max-steps 4 -> 8" in out and "differs from an uninterrupted" in out, out
    assert losses(tmp_path / "split" / "run") == losses(tmp_path / "whole" / "run")


@pytest.mark.parametrize("option, value, fragment", [
    ("--batch-size", "8", "4 sequences per step and would resume on 8 (--batch-size 8 x 1 process(es))"),
    ("--seed", "7", "--seed 1337, which a resumed run keeps"),
    ("--preset", "small", "--preset tiny, which a resumed run keeps"),
    ("--optimizer", "muon", "--optimizer adamw, which a resumed run keeps"),
    ("--recipe", "cpu", "no --recipe, which a resumed run keeps"),
    ("--n-layer", "3", "--n-layer 2; a resumed run keeps its model"),
    ("--no-tie-embeddings", None, "--tie-embeddings; a resumed run keeps its model"),
    ("--total-batch-tokens", "256", "4 sequences per step and would resume on 8"),
])
def test_a_resume_refuses_what_would_change_the_batch_the_model_or_the_data(tokens: Path, tmp_path: Path, option: str,
                                                                          value: str | None, fragment: str) -> None:
    runs = tmp_path / "runs"
    train(train_cfg(tokens, runs, batch_size=4, max_steps=2), MODEL)
    args = ["--runs-dir", str(runs), "--name", "run", "--resume", option, *([value] if value else [])]
    assert_user_error(run_face("03_train.py", *args), fragment)
    # the same value as the run's is no change, and no refusal
    same = {"--batch-size": "4", "--seed": "1337", "--n-layer": "2"}
    if option in same:
        proc = run_face("03_train.py", "--runs-dir", str(runs), "--name", "run", "--resume", option, same[option],
                        "--max-steps", "3")
        assert proc.returncode == 0 and "saved settings but" in proc.stdout and option not in proc.stdout.split(
            "saved settings but")[1].splitlines()[0], proc.stdout + proc.stderr


def test_a_resume_may_change_budgets_cadence_and_retune_and_says_so(tokens: Path, tmp_path: Path) -> None:
    """Budgets and cadence change quietly beside the saved run; --batch-size may change where
    --total-batch-tokens keeps the batch (the accumulation follows); --weight-decay reaches the optimizer
    (a state loaded from disk carries its own); other token data is refused."""
    runs = tmp_path / "runs"
    train(train_cfg(tokens, runs, batch_size=4, total_batch_tokens=256, max_steps=4, max_epochs=0.1), MODEL)
    steps = json.loads((runs / "run" / "last" / "config.json").read_text())["train"]["max_steps"]
    assert steps == 4  # the epochs allow more (0.1 x 34k tokens / 256 = 14 steps)
    proc = run_face("03_train.py", "--runs-dir", str(runs), "--name", "run", "--resume", "--max-steps", "40",
                    "--eval-every", "3", "--batch-size", "2", "--weight-decay", "0.01", "--no-compile")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert ("saved settings but --compile -> --no-compile, --batch-size 4 -> 2, --max-steps 4 -> 40, --weight-decay "
            "0.1 -> 0.01, --eval-every 10 -> 3") in out, out
    assert "differs from an uninterrupted one" in out and "= 8 x 32 (4 accumulation)" in out, out
    saved = json.loads((runs / "run" / "last" / "config.json").read_text())
    assert saved["train"]["max_steps"] == 14 and saved["step"] == 14  # --max-epochs 0.1 still caps the new budget
    assert [r["step"] for r in metrics(runs / "run") if "val_loss" in r][-2:] == [12, 14]
    state = torch.load(runs / "run" / "last" / "optimizer.pt", weights_only=True)
    assert state["param_groups"][0]["weight_decay"] == 0.01
    # the cadence alone keeps the losses; the dataset folder given at the start is the same data
    proc = run_face("03_train.py", "--runs-dir", str(runs), "--name", "run", "--resume", "--log-every", "7",
                    "--data", str(tokens.parent))
    out = " ".join(proc.stdout.split())
    assert "saved settings but --log-every 1 -> 7" in out and "differs" not in out and "--data" not in out, out
    # another tokenization of the same text is other data
    other = build(TokenizerConfig(data=str(tokens.parent), vocab_size=300, out=str(tmp_path / "bpe300"))).out
    assert_user_error(run_face("03_train.py", "--runs-dir", str(runs), "--name", "run", "--resume", "--data",
                               str(other), "--max-steps", "20"), "trained on other token data")


def test_a_run_saved_before_the_typed_state_resumes_exactly(tokens: Path, tmp_path: Path, monkeypatch) -> None:
    """A trainer_state.json written before it had a version, the evaluation subset, the rows per step and
    the asked --max-steps still resumes, to the uninterrupted run's losses."""
    cfg = partial(train_cfg, tokens, max_steps=14, eval_every=5)
    train(cfg(tmp_path / "whole"), MODEL)
    ctrl_c_during(monkeypatch, 7)
    train(cfg(tmp_path / "split"), MODEL)
    monkeypatch.undo()
    last = tmp_path / "split" / "run" / "last"
    state = json.loads((last / "trainer_state.json").read_text())
    for key in ("version", "probe_tokens", "rows_per_step", "max_steps_asked"):
        del state[key]
    (last / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((last / "manifest.json").read_text())
    manifest["trainer_state.json"] = {"bytes": (last / "trainer_state.json").stat().st_size,
                                      "sha256": sha256_file(last / "trainer_state.json")}
    (last / "manifest.json").write_text(json.dumps(manifest))
    trainer = Trainer(cfg(tmp_path / "split", resume=True), MODEL, Dist(), torch.device("cpu"))
    assert trainer.step == 7 and trainer.probe_tokens == 2048  # every --eval-tokens window, as such runs scored
    train(cfg(tmp_path / "split", resume=True), MODEL)
    assert losses(tmp_path / "split" / "run") == losses(tmp_path / "whole" / "run")
    val = [(r["step"], r["val_loss"]) for r in metrics(tmp_path / "split" / "run") if "val_loss" in r]
    assert val == [(r["step"], r["val_loss"]) for r in metrics(tmp_path / "whole" / "run") if "val_loss" in r]


def test_a_device_or_dtype_spelled_otherwise_is_no_change(tokens: Path, tmp_path: Path) -> None:
    """--device cpu on a run saved with --device auto, on a CPU, and --dtype fp32 for auto there: no change."""
    train(train_cfg(tokens, tmp_path, max_steps=2, device="auto"), MODEL)
    proc = run_face("03_train.py", "--runs-dir", str(tmp_path), "--name", "run", "--resume", "--device", "cpu",
                    "--dtype", "fp32", "--max-steps", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "saved settings but --max-steps 2 -> 3" in out and "--device" not in out.split("saved settings")[1][:80]


def train_cmd(tokens: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "03_train.py"), "--data", str(tokens), "--runs-dir", str(runs), "--name", "run",
            "--device", "cpu", "--batch-size", "8", "--max-steps", "60", "--lr", "3e-3", "--warmup-steps", "5",
            "--log-every", "1", "--eval-every", "20", "--eval-tokens", "2048", "--save-every", "5",
            "--dropout", "0.1", *MODEL_ARGS, *extra]


def start_and_stop(cmd: list[str], sig: int, after_step: int) -> tuple[subprocess.Popen, str]:
    """Start a training process and send it `sig` once it has logged `after_step`; returns it and its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= after_step:
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=120)
    return proc, "".join(seen) + rest


@pytest.fixture(scope="module")
def whole_run(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run the interrupted ones must match (made once for both signals)."""
    runs = tmp_path_factory.mktemp("whole")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    subprocess.run(train_cmd(tokens, runs), check=True, env=env, capture_output=True)
    return runs / "run"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_then_resumed_run_logs_identical_losses(tokens: Path, tmp_path: Path, sig: int,
                                                           whole_run: Path) -> None:
    """Dropout on, so the RNG state matters too. SIGINT saves on the spot; SIGKILL loses up to 5 steps."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    stopped, _ = start_and_stop(train_cmd(tokens, tmp_path / "split"), sig, after_step=23)
    if sig == signal.SIGINT:
        assert stopped.returncode == 0
    partial = losses(tmp_path / "split" / "run")
    assert max(partial) < 60
    resumed = subprocess.run(train_cmd(tokens, tmp_path / "split", "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming at step" in resumed.stdout
    assert losses(tmp_path / "split" / "run") == losses(whole_run)  # exactly, every step


@pytest.mark.slow
def test_the_resume_command_a_recipe_run_prints_reproduces_it(tokens: Path, tmp_path: Path) -> None:
    """The pipeline's way to train (--recipe cpu: batch 16, warmup 50, evaluations every 300 steps, a time
    budget), Ctrl-C past the warmup, then the command the run printed, as it is: the losses of every step
    equal the uninterrupted run's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    cmd = [sys.executable, str(ROOT / "03_train.py"), "--data", str(tokens), "--name", "run", "--device", "cpu",
           "--recipe", "cpu", "--max-steps", "80", "--log-every", "1", "--eval-tokens", "2048", *MODEL_ARGS]
    whole = subprocess.run([*cmd, "--runs-dir", str(tmp_path / "whole")], env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    stopped, out = start_and_stop([*cmd, "--runs-dir", str(tmp_path / "split")], signal.SIGINT, after_step=60)
    assert stopped.returncode == 0, out
    [printed] = [ln.split("Resume with: ", 1)[1] for ln in out.splitlines() if "Resume with: " in ln]
    argv = shlex.split(printed)
    assert argv[:2] == ["python", "03_train.py"] and "--batch-size" not in argv, argv
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "= 16 x 32" in resumed.stdout and "saved settings but" not in resumed.stdout, resumed.stdout
    split, uninterrupted = losses(tmp_path / "split" / "run"), losses(tmp_path / "whole" / "run")
    assert 60 < min(k for k in split if k > 60) and split == uninterrupted


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tokens: Path, tmp_path: Path) -> None:
    """Same losses and val losses, with one eval window for 2 processes: the second runs a padding window
    that counts zero (a process with no window to score used to leave the other waiting: a hang)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    args = ["--data", str(tokens), "--name", "run", "--device", "cpu", "--batch-size", "4", "--max-steps", "8",
            "--log-every", "1", "--eval-every", "4", "--eval-tokens", "32", "--lr", "3e-3", "--warmup-steps", "2",
            *MODEL_ARGS]
    one = subprocess.run([sys.executable, str(ROOT / "03_train.py"), "--runs-dir", str(tmp_path / "one"),
                          "--total-batch-tokens", str(8 * 32), *args], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(ROOT / "03_train.py"), "--runs-dir", str(tmp_path / "two"), *args],
                         env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 process(es)" in two.stdout and two.stdout.count("step 8/8") == 1  # rank 0 alone logs
    a, b = metrics(tmp_path / "one" / "run"), metrics(tmp_path / "two" / "run")
    assert [r["step"] for r in a if "val_loss" in r] == [4, 8]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-4), (ra, rb)


@pytest.mark.slow
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
    assert_user_error(run_face("03_train.py", *base, *MODEL_ARGS, "--total-batch-tokens", "100"), "multiple of")
    assert_user_error(run_face("03_train.py", "--data", str(tmp_path / "missing")), "does not exist")
    with pytest.raises(UserError, match="shorter than one context"):
        train(train_cfg(tokens, tmp_path, max_steps=1), MODEL | {"block_size": 100_000})


def test_cli_help_and_generate(tokens: Path, tmp_path: Path) -> None:
    # every face's options build (in this process: a Python start per script is seconds of test time)
    runner = CliRunner()
    for script in ("01_prepare_data.py", "02_train_tokenizer.py", "03_train.py", "quick_test.py"):
        spec = importlib.util.spec_from_file_location(f"script_{script[:2]}", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = runner.invoke(script_app(module.main), ["--help"])
        assert result.exit_code == 0 and "Usage" in result.output, result.output
    for command in ([], ["generate"], ["eval"], ["info"], ["bench"], ["quantize"], ["export"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, (command, result.output)
    train(train_cfg(tokens, tmp_path, max_steps=80, eval_every=40), MODEL)
    run = str(tmp_path / "run")
    proc = run_script("minigpt", "generate", "--run", run, "--prompt", "Әнием", "--max-new-tokens", "12", "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.split("\n")[1].startswith("Әнием"), proc.stdout + proc.stderr
    assert re.search(r"\d+ tokens in [\d.]+ s \([\d,]+ tokens/s", proc.stderr)  # the speed, on stderr
    alone = proc.stdout.split("\n")[1]
    for by_name in ([], ["--run", "run"]):  # no --run: the newest run under --runs-dir; a name: that run there
        proc = run_cli("generate", "--runs-dir", str(tmp_path), *by_name, "--prompt", "Әнием",
                          "--max-new-tokens", "12", "--temperature", "0", cwd=tmp_path.parent)
        assert proc.returncode == 0 and proc.stdout.split("\n")[1] == alone and run in proc.stdout, proc.stdout + proc.stderr
    proc = run_cli("generate", "--run", run, "--prompt", "a", "--prompt", "Әнием", "--num-samples", "2",
                      "--max-new-tokens", "12", "--temperature", "0")  # one batch, each prompt at its own positions
    assert proc.returncode == 0 and proc.stdout.count("sample 2") == 2
    assert proc.stdout.count(f"\n{alone}\n") == 2, proc.stdout  # as when it ran alone
    assert_user_error(run_cli("generate", "--run", run, "--prompt", ""), "prompt is empty")
    assert_user_error(run_cli("generate", "--run", str(tmp_path / "none")), "does not exist")
    proc = run_script("quick_test.py", "--run", run, "--max-new-tokens", "8", "--temperature", "0.8")
    assert proc.returncode == 0 and "better than the unigram baseline" in proc.stdout, proc.stdout + proc.stderr
    assert "val_bpb" in proc.stdout and "perplexity" in proc.stdout
    train(train_cfg(tokens, tmp_path, name="untrained", max_steps=1, lr=1e-30), MODEL)
    proc = run_face("quick_test.py", "--run", str(tmp_path / "untrained"), "--max-new-tokens", "4")
    assert proc.returncode == 1 and "no better than a unigram model" in proc.stdout, proc.stdout + proc.stderr


# -- the schedule, the update, the batches -------------------------------------------------------------


def test_learning_rate_schedule_values() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # step 0 already learns
    assert lr_at(4, cfg) == pytest.approx(5e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # the peak, then cosine decay
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)  # half-way: (1 + 0.1) / 2
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    assert lr_at(20, cfg, time_used=1.0) == pytest.approx(1e-4)  # the time budget spent: the floor
    assert lr_at(20, cfg, time_used=0.5) == pytest.approx(0.55e-3)
    assert lr_at(0, TrainConfig(warmup_steps=0, lr=2e-3)) == pytest.approx(2e-3)
    # wsd (the default): the peak held until the last 30% of the run, then a straight line to the floor
    wsd = replace(cfg, schedule="wsd")
    assert lr_at(0, wsd) == pytest.approx(1e-4) and lr_at(10, wsd) == pytest.approx(1e-3)
    assert lr_at(80, wsd) == pytest.approx(1e-3)  # progress 0.7: the cooldown starts
    assert lr_at(95, wsd) == pytest.approx(0.55e-3)  # half-way down it
    assert lr_at(110, wsd) == pytest.approx(1e-4) and lr_at(500, wsd) == pytest.approx(1e-4)
    assert lr_at(20, wsd, time_used=0.85) == pytest.approx(0.55e-3)  # the time budget leads here
    assert lr_at(95, replace(wsd, cooldown=1.0)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.15))  # all decay


def test_lr_zero_is_sized_to_the_width(tokens: Path, tmp_path: Path) -> None:
    """--lr 0 (the default) gives the recipes' hand-set rates: 2e-3 at 128 wide (tiny), 1e-3 at 512
    (medium), no more than 2e-3 below 128; the run records the rate it used."""
    assert auto_lr(model_config("tiny", 8192, {})) == pytest.approx(RECIPES["cpu"]["lr"])
    assert auto_lr(model_config("medium", 8192, {})) == pytest.approx(RECIPES["gpu"]["lr"])
    assert auto_lr(model_config("tiny", 300, MODEL)) == pytest.approx(2e-3)  # 32 wide: capped
    assert auto_lr(model_config("gpt2", 50257, {})) == pytest.approx(2e-3 * math.sqrt(128 / 768))
    trainer = Trainer(train_cfg(tokens, tmp_path, lr=0.0), MODEL, Dist(), torch.device("cpu"))
    assert trainer.cfg.lr == pytest.approx(2e-3) and trainer.config_json["train"]["lr"] == pytest.approx(2e-3)


def test_the_optimizer_sees_clipped_gradients(tokens: Path, tmp_path: Path) -> None:
    trainer = Trainer(train_cfg(tokens, tmp_path, grad_clip=0.05), MODEL, Dist(), torch.device("cpu"))
    seen = []

    def before_step(optimizer, args, kwargs) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    trainer.optimizer.adamw.register_step_pre_hook(before_step)
    norms = [trainer.train_step(1e-3).item() for _ in range(3)]
    assert all(n > 0.5 for n in norms)  # the norm reported is the one before clipping...
    assert len(seen) == 3 and all(s == pytest.approx(0.05, rel=1e-4) for s in seen)  # ...the update's is clipped


def test_forward_backward_covers_every_row_however_split(tokens: Path) -> None:
    """The loss of 5 rows split 2 + 2 + 1 (what an out-of-memory halving gives) is the mean over all 5 rows
    of the next-token loss, and so are its gradients."""
    torch.manual_seed(0)
    model = GPT(model_config("tiny", 320, MODEL))
    x = torch.randint(0, 320, (5, 33))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    results = []
    for micro in (5, 2):
        model.zero_grad()
        loss = forward_backward(model, x, micro, torch.device("cpu"), torch.float32, scaler, 1)
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
    assert results[0][0] == pytest.approx(expected.item(), abs=1e-6) == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_several_unequal_shards_windows_stay_inside_and_reach_every_offset(toy_dataset: Path, tmp_path: Path) -> None:
    out = build(TokenizerConfig(data=str(toy_dataset), vocab_size=320, shard_tokens=1500, out=str(tmp_path / "tok"))).out
    data = TokenData(out)
    lengths = data.train.lengths
    assert len(lengths) >= 3 and len(set(lengths.tolist())) > 1  # several shards, the last one shorter
    for T in (32, 1490):  # many windows a shard; ten a full shard, none in a short last one
        sampler = BatchSampler(data.train, T, seed=0)
        shard, offset = sampler.global_batch(20_000)
        assert (offset >= 0).all() and (offset + T + 1 <= lengths[shard]).all()
        rows = sampler.read(shard[:50], offset[:50])
        for row, s, o in zip(rows, shard[:50], offset[:50], strict=True):
            assert row.tolist() == data.train.arrays[s][o : o + T + 1].tolist()
    for s in range(len(lengths)):  # every window of every shard is drawn, the last one included
        drawn = set(offset[shard == s].tolist())
        assert drawn == set(range(max(int(lengths[s]) - T, 0))), s
    summary = train(train_cfg(out, tmp_path / "runs", max_steps=12, eval_every=6), MODEL)
    assert summary["steps"] == 12 and math.isfinite(summary["best_val_loss"])


def test_a_shard_two_windows_long_gives_both(tmp_path: Path) -> None:
    T = 8
    shard = tmp_path / "train_0000.bin"
    np.arange(T + 2, dtype="<u2").tofile(shard)
    meta = {"dtype": "uint16", "splits": {"train": {"shards": [{"file": shard.name, "tokens": T + 2}]}}}
    sampler = BatchSampler(Shards(tmp_path, "train", meta), T, seed=1)
    _, offset = sampler.global_batch(50)
    assert set(offset.tolist()) == {0, 1}


def test_flops_per_token_count_each_matmul_once() -> None:
    tied = GPT(ModelConfig(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=64))
    untied = GPT(ModelConfig(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False))
    # per block: qkv + proj 4 d^2, SwiGLU up (2 x 192) and down: 3 x 64 x 192; the head 97 x 64; attention
    expected = 6 * (2 * (4 * 64 * 64 + 3 * 64 * 192) + 97 * 64) + 12 * 2 * 64 * 48
    assert tied.flops_per_token() == untied.flops_per_token() == expected
    norms = sum(p.numel() for p in tied.parameters() if p.dim() == 1)
    assert expected == 6 * (tied.num_params() - norms) + 12 * 2 * 64 * 48  # tied: the embedding is the head


# -- recipes, fp16, DDP --------------------------------------------------------------------------------


def test_recipe_fills_only_what_the_command_line_leaves_out(tokens: Path, tmp_path: Path) -> None:
    assert with_recipe({"recipe": "cpu", "max_steps": 7, "lr": None, "preset": None}) == {
        "recipe": "cpu", "max_steps": 7, "lr": RECIPES["cpu"]["lr"], "preset": "tiny"}
    assert with_recipe({"recipe": "", "lr": None, "max_steps": None})["lr"] == TrainConfig().lr
    with pytest.raises(UserError, match="unknown --recipe"):
        with_recipe({"recipe": "tpu"})
    proc = run_face("03_train.py", "--data", str(tokens), "--runs-dir", str(tmp_path), "--name", "r", "--device",
                      "cpu", "--recipe", "cpu", "--max-steps", "2", "--eval-tokens", "1024", "--block-size", "32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resolved = json.loads((tmp_path / "r" / "last" / "config.json").read_text())["train"]
    assert resolved["max_steps"] == 2 and resolved["recipe"] == "cpu"  # given: wins over the recipe
    assert {k: resolved[k] for k in ("batch_size", "lr", "warmup_steps", "eval_every", "max_minutes", "preset")} == {
        k: RECIPES["cpu"][k] for k in ("batch_size", "lr", "warmup_steps", "eval_every", "max_minutes", "preset")}


def test_fp16_overflows_are_the_scalers_business_and_its_state_resumes(tokens: Path, tmp_path: Path, monkeypatch,
                                                                        capsys) -> None:
    """The scaler skips overflowing updates and lowers its scale: no bad-step warnings, no stop, and the
    lowered scale is saved and restored on resume. (fp16 autocast on CPU stands in for a GPU here.)"""
    from test_robustness import poison

    import minigpt.train as train_module

    monkeypatch.setattr(train_module, "resolve_dtype", lambda name, device: torch.float16)
    poison(monkeypatch, {3, 4, 5}, factor=1e30)  # three overflowing updates in a row
    summary = train(train_cfg(tokens, tmp_path, max_steps=10, log_every=5, save_every=10, max_bad_steps=2), MODEL)
    out = " ".join(capsys.readouterr().out.split())
    assert not summary["failed"] and summary["steps"] == 10, out
    assert "non-finite" not in out
    state = json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] == 65536.0 / 8  # halved once per overflow
    resumed = Trainer(train_cfg(tokens, tmp_path, max_steps=12, resume=True), MODEL, Dist(), torch.device("cpu"))
    assert resumed.scaler.get_scale() == 65536.0 / 8 and resumed.step == 10
    # an overflow that halving the scale 24 times does not cure is no overflow: bad steps, and a stop
    poison(monkeypatch, set(range(3, 100)), factor=1e30)
    summary = train(train_cfg(tokens, tmp_path / "stuck", max_steps=60, log_every=5, max_bad_steps=2), MODEL)
    assert summary["failed"] and "non-finite" in summary["stop_reason"] and summary["steps"] == 30


def test_ddp_does_not_broadcast_the_derived_buffers(tokens: Path, tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        trainer = Trainer(train_cfg(tokens, tmp_path), MODEL, Dist(0, 2, 0), torch.device("cpu"))
        assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
        assert trainer.model.broadcast_buffers is False and trainer.eval_model is trainer.raw_model
    finally:
        dist.destroy_process_group()
