"""The training loop (the library behind 03_train.py): one process or many under torchrun.

Exact resume: trainer_state.json holds the step, the batch sampler's generator state, torch's RNG
states and the fp16 gradient scaler's state, so on CPU a resumed run logs the same losses an
uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import getpass
import hashlib
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Set
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import find_checkpoint, load_model, read_trainer_state, save_checkpoint
from .config import ModelConfig, Sampling, TrainConfig, model_config
from .data import BatchSampler, TokenData, eval_windows, find_tokenized, load_tokenizer
from .evaluate import Score, evaluate
from .generate import generate
from .model import GPT, flops_per_token
from .utils import (
    Dist,
    UserError,
    atomic_open,
    autocast,
    console,
    dtype_name,
    first_line,
    human_count,
    human_time,
    init_distributed,
    peak_flops,
    read_json,
    resolve_dtype,
)

# --------------------------------------------------------------------------------------------------
# optimisation pieces


def lr_at(step: int, cfg: TrainConfig, time_used: float = 0.0) -> float:
    """Linear warmup (step 0 already learns, at lr / warmup_steps), then to min_lr_ratio * lr at max_steps:
    `wsd` holds the peak and decays linearly over the last --cooldown share of the run; `cosine` decays
    all the way.

    With a time budget, progress is whichever is further along, steps or time (`time_used` is the
    share of --max-minutes spent), so the decay completes when time runs out first.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    progress = max(progress, min(1.0, time_used))
    if cfg.schedule == "wsd":
        share = 1.0 - max(0.0, progress - (1 - cfg.cooldown)) / cfg.cooldown  # 1 while stable, 0 at the end
    else:
        share = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * share)


# torch.compile on CPU (inductor writes C++). Measured on 2 cores at 4 layers x 128 wide, context 64, batch 12:
# a step of 58.5 ms instead of 73 (1.25x; 57 vs 75 in an earlier session), after a first compilation of 32-41 s,
# or of ~4 s once inductor's cache holds that shape: it repays itself after about 3 minutes of eager training,
# or 20 seconds. Where the output head is most of the work (the pipeline's tiny model over 8,192 tokens: 332
# vs 337 ms in one pair of runs, 272 vs 321 in another) the gain is small beside a first compilation.
CPU_COMPILE_MINUTES = 3.0  # a shorter run trains eagerly on CPU...
CPU_COMPILE_MINUTES_CACHED = 0.5  # ...unless this shape was compiled here before
CPU_COMPILE_HEAD_SHARE = 1 / 3  # above this share of the step's FLOPs in the output head, eager
CPU_EAGER_FLOPS = 50e9  # eager training FLOP/s of 2 cores (measured: 48-55e9), to size a run without a time budget


def compile_plan(cfg: TrainConfig, model: GPT, device: torch.device, steps_left: int, tokens_per_step: int,
                 minutes_used: float = 0.0, cached: bool = False) -> str:
    """How the training step runs: '' (eagerly) or 'compiled (...)', saying why. `cached`: this shape was
    compiled on this machine before (see `compile_marker`)."""
    if not cfg.compile or device.type not in ("cuda", "cpu"):
        return ""
    if device.type == "cuda":
        return f"compiled ({cfg.compile_mode})"
    flops = model.flops_per_token()
    head = 6 * model.cfg.vocab_size * model.cfg.n_embd / flops
    minutes = steps_left * tokens_per_step * flops / CPU_EAGER_FLOPS / 60
    if cfg.max_minutes:  # whichever budget ends the run first
        minutes = min(minutes, cfg.max_minutes - minutes_used)
    pays_after = CPU_COMPILE_MINUTES_CACHED if cached else CPU_COMPILE_MINUTES
    if head > CPU_COMPILE_HEAD_SHARE or minutes < pays_after or not cpp_compiler():
        return ""
    return f"compiled ({cfg.compile_mode}{', cached' if cached else ''}: about {human_time(minutes * 60)} to train)"


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU, if there is one."""
    return os.environ.get("CXX") or next((name for name in ("g++", "clang++", "c++") if shutil.which(name)), None)


def compile_marker(model: GPT, rows: int, dtype: torch.dtype, mode: str) -> Path:
    """A file in inductor's cache folder that says this step (shape, dtype, mode, torch version) compiled
    here: it goes when the cache goes (a reboot clears /tmp). The folder is found as inductor finds it
    ($TORCHINDUCTOR_CACHE_DIR, else torchinductor_<user> in the temp folder), without importing inductor
    (seconds)."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not folder:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
        folder = os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    key = json.dumps([torch.__version__, dataclasses.asdict(model.cfg), rows, str(dtype), mode], sort_keys=True)
    return Path(folder) / "minigpt" / hashlib.sha256(key.encode()).hexdigest()[:20]


# An evaluation during training scores 1/8 as many tokens as the steps between evaluations train on: as a
# forward pass costs about a third of a training step, evaluating takes ~4% of the run (by the same estimate
# it was 11% at the #14 shape, and about 40 s of the pipeline's 6.5 minutes). The subset is spread over the split, an unbiased
# sample of it, so its figures compare with the whole split's.
EVAL_PROBE_SHARE = 8
EVAL_PROBE_MIN = 16_384  # tokens: fewer would make the best-checkpoint choice noisy


# The peak rate --lr 0 picks. Measured at equal time (2.5 minutes, 4 layers x 128 wide, context 64, batch 12):
# 2e-3 beat 1e-3 on both held-out sets, tinyshakespeare by 0.011 nats/char and Tatar by 0.032 bits/byte.
# Wider models want less (the gpu recipe's medium, 512 wide, trains at 1e-3); AdamW's rate shrinking as
# 1/sqrt(width) joins the two measured points.
AUTO_LR, AUTO_LR_WIDTH = 2e-3, 128


def auto_lr(mcfg: ModelConfig) -> float:
    return AUTO_LR * min(1.0, math.sqrt(AUTO_LR_WIDTH / mcfg.n_embd))


def epoch_steps(epochs: float, train_tokens: int, tokens_per_step: int) -> int:
    """The steps that read the train split `epochs` times (at least one)."""
    return max(1, math.ceil(epochs * train_tokens / tokens_per_step))


def planned_steps(cfg: TrainConfig, mcfg: ModelConfig, rows: int, device: torch.device, train_tokens: int,
                  world: int = 1) -> int:
    """The steps this run will likely take: --max-steps, or fewer where --max-epochs or --max-minutes ends it
    first, the latter estimated from the model's FLOPs at a typical rate (CPU_EAGER_FLOPS on CPU, 40% of a
    known GPU's peak)."""
    steps = cfg.max_steps
    if cfg.max_epochs:
        steps = min(steps, epoch_steps(cfg.max_epochs, train_tokens, rows * mcfg.block_size))
    # `rows` counts every process's: on GPUs each brings its own FLOPs (CPU processes share the cores)
    rate = CPU_EAGER_FLOPS if device.type == "cpu" else 0.4 * (peak_flops(device) or 0) * world
    if not (cfg.max_minutes and rate):
        return steps
    step_seconds = rows * mcfg.block_size * flops_per_token(mcfg) / rate
    return min(steps, int(cfg.max_minutes * 60 / step_seconds))


# Measured on Tatar cut to 400 KB (vocab 2048, the cpu recipe for 4 minutes, ~20 epochs): without dropout
# val bits per byte bottomed at 1.2706 and rose to 1.3393; with 0.1 it reached 1.2294 and kept falling.
SMALL_DATA_EPOCHS = 4  # a run planned to read its train split more often than this gets dropout unless told
SMALL_DATA_DROPOUT = 0.1

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: the steepest slope at 0 that still settles


def orthogonalise(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of g = U S V^T, by Newton-Schulz iterations: every singular value pushed towards 1 (into
    roughly [0.7, 1.2], which trains as well as exactly 1). bfloat16 on CUDA, float32 elsewhere."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: X X^T is then the smaller product
        x = x.T
    x = x / (x.norm() + eps)  # singular values at most 1, where the iteration converges
    for _ in range(steps):
        xx = x @ x.T
        x = a * x + (b * xx + c * xx @ xx) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, orthogonalised (`orthogonalise`), decoupled weight decay,
    and the step scaled by 0.2 sqrt(max(rows, cols)) so that its RMS matches an AdamW step's (Moonshot's
    rule: one learning rate serves both optimizers).

    `torch.optim.Muon` computes the same in bfloat16 only: on a CPU without bf16 matmuls its step took
    880 ms where this one takes ~50 (4 layers x 128 wide, 2 cores, measured), so training runs this one.
    """

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.1, momentum: float = 0.95,
                 ns_steps: int = 5) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                update = orthogonalise(p.grad.add(buf, alpha=mu), group["ns_steps"])  # Nesterov: g + mu B
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class Optimizers:
    """Every weight's update. `adamw`: AdamW, with weight decay on matrices (and the embedding), never on
    norms. `muon`: `Muon` for the 2-D weights inside the blocks, beside AdamW for the embedding, the
    output head and the norm gains.

    One schedule drives every group: `set_lr` gives each group its peak rate times the schedule's share.
    Stepped, zeroed, saved and restored as one; `optimizer.pt` holds AdamW's state as before, or both
    states under "adamw" and "muon".
    """

    def __init__(self, model: GPT, cfg: TrainConfig, device: torch.device) -> None:
        self.kind, self.lr = cfg.optimizer, cfg.lr
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        hidden = [p for n, p in named if cfg.optimizer == "muon" and n.startswith("blocks.") and p.dim() == 2]
        taken = {id(p) for p in hidden}
        rest = [p for _, p in named if id(p) not in taken]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        # fused: one kernel for every tensor (on CPU too since torch 2.4, where it skips the per-tensor loop)
        fused = device.type in ("cuda", "cpu") or None
        self.adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
        self.all: list[torch.optim.Optimizer] = [self.adamw]
        self.peaks = [cfg.lr, cfg.lr]
        if hidden:
            muon_lr = cfg.muon_lr or cfg.lr
            self.muon = Muon(hidden, lr=muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
            self.all.append(self.muon)
            self.peaks.append(muon_lr)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.all for g in o.param_groups]

    def set_lr(self, lr: float) -> None:
        """`lr` is the schedule's rate for --lr; every group gets the same share of its own peak."""
        share = lr / self.lr if self.lr else 0.0
        for group, peak in zip(self.param_groups, self.peaks, strict=True):
            group["lr"] = peak * share

    def zero_grad(self) -> None:
        for o in self.all:
            o.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        if len(self.all) == 1:
            return self.adamw.state_dict()
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        saved = "muon" if set(state) == {"adamw", "muon"} else "adamw"
        if saved != self.kind:
            raise UserError(f"{source} was trained with --optimizer {saved}; resume it with --optimizer {saved}.")
        # a state keeps its own settings (betas, weight decay, momentum, kernel flags: saved on another device
        # perhaps): this run's, which a resume may have changed, go back in
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        if saved == "adamw":
            self.adamw.load_state_dict(state)
        else:
            self.adamw.load_state_dict(state["adamw"])
            self.muon.load_state_dict(state["muon"])
        for group, ours in zip(self.param_groups, settings, strict=True):
            group.update(ours)


def accumulation(cfg: TrainConfig, block_size: int, world: int) -> tuple[int, int]:
    """(rows per optimizer step across all processes, micro-steps per process)."""
    per_micro = cfg.batch_size * world
    if not cfg.total_batch_tokens:
        return per_micro, 1
    rows, rest = divmod(cfg.total_batch_tokens, block_size)
    if rest or rows % per_micro:
        raise UserError(
            f"--total-batch-tokens {cfg.total_batch_tokens} must be a multiple of block_size x batch_size x "
            f"processes = {block_size} x {cfg.batch_size} x {world} = {block_size * per_micro}."
        )
    return rows, rows // per_micro


# --resume continues a run with the settings it was saved with. An option given again may change the cadence
# (the losses stay those of an uninterrupted run), or the budgets, the device, precision and compilation, and the
# optimisation (from there the losses differ, and the log says so); one that would change the batch, the model
# or the data stream is refused.
KEEPS_LOSSES = frozenset({"log_every", "eval_every", "eval_tokens", "sample_every", "save_every", "patience",
                          "max_bad_steps", "grad_checkpoint", "data"})  # data: the same tokens at another path
CHANGES_LOSSES = frozenset({"max_steps", "max_minutes", "max_epochs", "device", "dtype", "compile", "compile_mode",
                            "batch_size", "total_batch_tokens", "lr", "muon_lr", "schedule", "warmup_steps",
                            "cooldown", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip",
                            "muon_momentum"})  # the budgets move the schedule's decay; a batch must stay (below)
NAMING = frozenset({"name", "runs_dir", "resume"})  # find the run: never compared
SAVED_BEFORE = {"schedule": "cosine"}  # a run saved before a setting existed trained with this value of it


def flag(name: str, value: Any) -> str:
    """An option as a user types it: `--max-steps 300`, `--lr 0.002`, `--no-compile`."""
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return option if value else "--no-" + option[2:]
    if value == "":
        return "no " + option
    return f"{option} {value:g}" if isinstance(value, float) else f"{option} {value}"


@dataclasses.dataclass
class Resumed:
    """The settings a resumed run goes on with, and those the command line changed: name -> (saved, now)."""

    cfg: TrainConfig
    changed: dict[str, tuple[Any, Any]]
    folder: Path  # the `last` checkpoint resumed from
    saved: dict[str, Any]  # its config.json
    state: dict[str, Any]  # its trainer_state.json

    @property
    def departs(self) -> bool:
        """A change that makes the losses from here differ from an uninterrupted run's."""
        return bool(self.changed.keys() & CHANGES_LOSSES)

    def describe(self) -> str:
        def value(name: str, v: Any) -> str:
            return flag(name, v) if isinstance(v, bool) else flag(name, v).split(" ", 1)[1]

        return ", ".join(f"{flag(k, a)} -> {value(k, b)}" for k, (a, b) in self.changed.items())


def run_folder(cfg: TrainConfig) -> Path:
    """The run's folder: <runs-dir>/<name>, the name by default from the token folder and the preset."""
    if cfg.name:
        return Path(cfg.runs_dir) / cfg.name
    folder = find_tokenized(cfg.data)
    return Path(cfg.runs_dir) / f"{folder.parent.name}-{folder.name}-{cfg.preset}"


def resume(cfg: TrainConfig, overrides: dict[str, Any], given: Set[str] | None, world: int) -> Resumed:
    """The run's `last` checkpoint and the settings it goes on with (`resumed_config`)."""
    run = run_folder(cfg)
    folder = find_checkpoint(run, "last")
    state = read_trainer_state(folder)
    saved = read_json(folder / "config.json", "checkpoint config")
    return resumed_config(cfg, overrides, given, saved, state, world, run, folder)


def resumed_config(cfg: TrainConfig, overrides: dict[str, Any], given: Set[str] | None, saved: dict[str, Any],
                   state: dict[str, Any], world: int, run: Path, folder: Path) -> Resumed:
    """The saved settings of `run`, with the options given again (`given`: their names; None, from Python:
    those that differ from TrainConfig's defaults) where they may change; any other option given with
    another value than the run's, and any model option that differs, is refused in one sentence."""
    fields = dataclasses.fields(TrainConfig)
    if given is None:
        given = {f.name for f in fields if getattr(cfg, f.name) != f.default}
    before = SAVED_BEFORE | saved["train"] | {
        "data": saved["data"]["folder"],  # the exact token folder, not a dataset folder that may hold a newer one
        "max_steps": state.get("max_steps_asked") or saved["train"]["max_steps"],  # before --max-epochs cut it
    }
    model = ModelConfig(**saved["model"])
    values: dict[str, Any] = {}
    changed: dict[str, tuple[Any, Any]] = {}
    for f in fields:
        now = getattr(cfg, f.name)
        if f.name in NAMING or f.name not in before:
            values[f.name] = now
            continue
        old = before[f.name]
        if f.name == "lr" and not now:
            now = auto_lr(model)  # sized to the width, as it was at the start
        # the data as given at the start (a dataset folder) or as saved (the token folder inside it) is no change
        same_data = f.name == "data" and Path(now).resolve() in (Path(old).resolve(), Path(old).resolve().parent)
        if f.name not in given or now == old or same_data:
            values[f.name] = old
            continue
        if f.name not in KEEPS_LOSSES | CHANGES_LOSSES:
            raise UserError(f"{run} was trained with {flag(f.name, old)}, which a resumed run keeps (it makes the "
                            f"batch, the model or the data stream); leave {flag(f.name, now).split()[0]} out, or "
                            "train a new run under another --name.")
        values[f.name], changed[f.name] = now, (old, now)
    for name, value in overrides.items():
        if getattr(model, name) != value:
            raise UserError(f"{run} was trained with {flag(name, getattr(model, name))}; a resumed run keeps its "
                            f"model: leave {flag(name, value).split()[0]} out, or train a new run under another --name.")
    resumed = TrainConfig(**values)
    rows_before = state.get("rows_per_step") or state["tokens_seen"] // max(state["step"], 1) // model.block_size
    rows, _ = accumulation(resumed, model.block_size, world)
    if rows != rows_before:
        raise UserError(f"{run} trained on {rows_before} sequences per step and would resume on {rows} "
                        f"(--batch-size {resumed.batch_size} x {world} process(es)); keep the batch: the same "
                        f"--batch-size and processes, or --total-batch-tokens {rows_before * model.block_size}.")
    return Resumed(resumed, changed, folder, saved, state)


def forward_backward(
    model: torch.nn.Module, batch: torch.Tensor, micro_bs: int, device: torch.device, dtype: torch.dtype,
    scaler: torch.amp.GradScaler, world: int,
) -> torch.Tensor:
    """Gradients of the mean loss over every row of `batch`, `micro_bs` rows at a time (the last micro-batch
    may be smaller); returns that mean loss (on the device). Targets are the inputs shifted by one."""
    rows = batch.size(0)
    starts = range(0, rows, micro_bs)
    total = torch.zeros((), device=device)
    for i, start in enumerate(starts):
        part = batch[start : start + micro_bs]
        weight = part.size(0) / rows  # each row counts the same, however the rows were split
        sync = i == len(starts) - 1 or world == 1  # DDP all-reduces gradients on the last micro-batch only
        # Under --compile-mode reduce-overhead this tells the CUDA graphs the last outputs are no longer
        # needed (a no-op otherwise).
        torch.compiler.cudagraph_mark_step_begin()
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, dtype):
            loss = model(part[:, :-1], part[:, 1:]).loss * weight
        scaler.scale(loss).backward()
        total += loss.detach()  # read at log steps only: no host sync per step
    return total


class Health:
    """Non-finite updates and gradient-norm spikes, counted on the device and read at log steps.

    An update whose gradient norm is not finite is skipped: inside the fused CUDA AdamW kernel (its
    `found_inf` input, so no host sync per step), with a host check elsewhere. With fp16 the gradient
    scaler skips overflowing updates itself and lowers its scale, which is its normal work: there a
    bad step is a loss that is not finite, or an overflow that more than OVERFLOWS halvings of the
    scale in a row did not cure (the gradients themselves are not finite).
    """

    SPIKE = 10.0  # a norm this many times the running norm is a spike
    OVERFLOWS = 24  # fp16: 65536 halved 24 times is 2**-8; an overflow past that is no overflow

    def __init__(self, device: torch.device) -> None:
        z = lambda: torch.zeros((), device=device)  # noqa: E731
        self.skipped, self.streak, self.max_streak, self.spikes, self.max_spike, self.ema = z(), z(), z(), z(), z(), z()
        self.overflows = z()
        self.seen = 0

    def check(self, norm: torch.Tensor, loss: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        """1.0 if this update is bad (and, without a scaler, must be skipped), else 0.0 (a device tensor)."""
        norm = norm.float()
        finite = torch.isfinite(norm)
        if scaled:
            self.overflows = (self.overflows + 1) * (~finite)
            bad = (~torch.isfinite(loss) | (self.overflows > self.OVERFLOWS)).float()
        else:
            bad = (~finite).float()
        self.skipped += bad
        self.streak = (self.streak + bad) * bad
        self.max_streak = torch.maximum(self.max_streak, self.streak)
        good = finite
        if self.seen >= 20:  # after a short warm-up of the running norm
            spike = good & (norm > self.SPIKE * self.ema)
            self.spikes += spike.float()
            self.max_spike = torch.where(spike, torch.maximum(self.max_spike, norm), self.max_spike)
            good = good & ~spike
        self.ema = torch.where(good, norm if self.seen == 0 else 0.9 * self.ema + 0.1 * norm, self.ema)
        self.seen += 1
        return bad

    def read(self, world: int = 1) -> tuple[int, int, int, float]:
        """(skipped so far, longest run of skips since the last read, spikes since then, largest spike);
        under torchrun the largest of each over the processes, so that they all decide alike to stop."""
        figures = torch.stack([self.skipped, self.max_streak, self.spikes, self.max_spike])
        if world > 1:  # a loss is each process's own: with fp16 the processes can see different bad steps
            dist.all_reduce(figures, op=dist.ReduceOp.MAX)
        skipped, streak, spikes, top = figures.tolist()
        self.max_streak.copy_(self.streak)
        self.spikes.zero_()
        self.max_spike.zero_()
        return int(skipped), int(streak), int(spikes), top


# --------------------------------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig, overrides: dict[str, Any], given: Set[str] | None = None) -> dict[str, Any]:
    """Train a run, or resume one (`given`: the options the command line gave; see `resumed_config`)."""
    resumed = resume(cfg, overrides, given, int(os.environ.get("WORLD_SIZE", "1"))) if cfg.resume else None
    d, device = init_distributed(resumed.cfg.device if resumed else cfg.device)
    if d.world == 1:
        return Trainer(cfg, overrides, d, device, resumed).run()
    trainer = None
    try:
        trainer = Trainer(cfg, overrides, d, device, resumed)
        summary = trainer.run()
        # Leave together: rank 0 still samples and plots after the last collective, and a process that
        # tears its connections down while a peer still holds them open can abort at exit.
        dist.barrier()
        return summary
    finally:
        # DDP's reducer holds the process group and its worker threads: free it while the interpreter
        # is whole, then shut the group down, rather than leave both to interpreter teardown.
        del trainer
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclasses.dataclass
class Stop:
    """Why the loop ended, and how."""

    reason: str = "max steps"
    failed: bool = False
    interrupted: bool = False


class Trainer:
    """One run: `__init__` builds or restores everything, `run` loops over `train_step`, `log_step`,
    `validate` and `save` until the steps, the time or the patience run out, or Ctrl-C."""

    def __init__(self, cfg: TrainConfig, overrides: dict[str, Any], d: Dist, device: torch.device,
                 resumed: Resumed | None = None) -> None:
        if cfg.resume and resumed is None:
            resumed = resume(cfg, overrides, None, d.world)
        if resumed is not None:
            cfg = resumed.cfg
        self.cfg, self.d, self.device = cfg, d, device
        self.dtype = resolve_dtype(cfg.dtype, device)
        self.data = data = TokenData(cfg.data)
        self.run_dir = resumed.folder.parent if resumed is not None else run_folder(cfg)
        self.name = self.run_dir.name

        state: dict[str, Any] = {}
        if resumed is not None:
            self.resume_folder, state = resumed.folder, resumed.state
            model = self._restore_model(resumed.saved)
        else:
            model = self._new_model(overrides)
        self.mcfg: ModelConfig = model.cfg
        if not cfg.lr:  # sized to the width, and saved so: a resumed run sizes it the same way
            self.cfg = cfg = dataclasses.replace(cfg, lr=auto_lr(model.cfg))
        if resumed is not None and resumed.changed and d.main:
            console.print(f"resuming with the run's saved settings but {resumed.describe()}", highlight=False)
            if resumed.departs:
                console.print("[yellow]from here the run differs from an uninterrupted one (a budget moves the "
                              "schedule's decay; precision, compilation and the optimisation change the numbers)[/]",
                              highlight=False)
        self.max_steps_asked = cfg.max_steps
        if cfg.max_epochs:  # the step budget in epochs: the schedule then ends where the epochs do
            rows, _ = accumulation(cfg, model.cfg.block_size, d.world)
            steps = epoch_steps(cfg.max_epochs, data.train.tokens, rows * model.cfg.block_size)
            if steps < cfg.max_steps:
                self.cfg = cfg = dataclasses.replace(cfg, max_steps=steps)
                if d.main:
                    console.print(f"max steps {steps:,}: {cfg.max_epochs:g} epochs of {data.train.tokens:,} train "
                                  "tokens (--max-epochs)", highlight=False)
        data.check_context(self.mcfg.block_size)
        model.grad_checkpoint = cfg.grad_checkpoint
        self.raw_model = model.to(device)  # saved and sampled from: never the compiled or DDP wrapper
        self.optimizer = Optimizers(model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.rows_per_step, self.accum = accumulation(cfg, self.mcfg.block_size, d.world)
        self.tokens_per_step = self.rows_per_step * self.mcfg.block_size
        self.micro_bs = cfg.batch_size
        self.sampler = BatchSampler(data.train, self.mcfg.block_size, cfg.seed)
        # the evaluation at the end scores --eval-tokens (the whole split when it is smaller); those during
        # training a fixed, spread subset sized to the training between them, so that they cost a few percent
        self.windows = eval_windows(data.val, self.mcfg.block_size, cfg.eval_tokens)
        # a resumed run keeps its subset, so that its best so far compares with the new scores (a run saved
        # before subsets existed compared all --eval-tokens windows)
        self.probe_tokens = state.get("probe_tokens", cfg.eval_tokens) if state else min(
            cfg.eval_tokens, max(EVAL_PROBE_MIN, cfg.eval_every * self.tokens_per_step // EVAL_PROBE_SHARE))
        self.probe = self.windows
        if self.probe_tokens != cfg.eval_tokens:
            self.probe = eval_windows(data.val, self.mcfg.block_size, self.probe_tokens)
            if len(self.probe) == len(self.windows):  # a split smaller than either: all of it, both times
                self.probe = self.windows
        self._restore_state(state)
        self.marker = compile_marker(model, self.micro_bs, self.dtype, cfg.compile_mode)
        self.compiled = compile_plan(cfg, model, device, cfg.max_steps - state.get("step", 0), self.tokens_per_step,
                                     state.get("train_seconds", 0.0) / 60, self.marker.exists())
        if device.type == "cpu" and state.get("cpu_compiled") is not None and cfg.compile and cpp_compiler():
            # a resumed CPU run steps as it did before (compiled or eager), so that it logs the same losses
            self.compiled = f"compiled ({cfg.compile_mode}: as before the resume)" if state["cpu_compiled"] else ""
        self.compile_unproven = bool(self.compiled) and device.type == "cpu"  # falls back to eager if it fails
        self.eval_model, self.model = self._wrap(model)

        # where the run stands: restored when resuming
        self.step = self.start_step = state.get("step", 0)
        self.best = state.get("best_val_loss", float("inf"))
        self.best_bpb = state.get("best_val_bpb", float("inf"))
        self.bad_evals = state.get("bad_evals", 0)
        self.elapsed_before = state.get("train_seconds", 0.0)
        self.health = Health(device)
        self.skipped_reported = 0
        self.loss_sum = torch.zeros((), device=device)  # summed on the device, read at log steps
        self.peak = peak_flops(device)
        self.flops_per_step = model.flops_per_token() * self.tokens_per_step
        self.config_json = {
            "model": dataclasses.asdict(self.mcfg),
            "train": dataclasses.asdict(cfg),
            "data": {k: data.meta[k] for k in ("kind", "vocab_size", "eot_id", "tags", "tokenizer_sha256", "dataset")}
            | {"folder": str(data.folder), "tag_documents": data.meta.get("tag_documents", {}),
               "train_shards": data.train.lengths.tolist()},
        }
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tok = load_tokenizer(data.tokenizer_json) if d.main else None
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _trim_metrics(self.metrics_path, self.start_step if cfg.resume else 0)
            self._print_header()

    # building and restoring

    def _new_model(self, overrides: dict[str, Any]) -> GPT:
        if (self.run_dir / "last").exists() and self.d.main:
            console.print(f"[yellow]{self.run_dir} already holds a run; starting over (use --resume to continue it)[/]")
        torch.manual_seed(self.cfg.seed)
        mcfg = model_config(self.cfg.preset, self.data.vocab_size, overrides)
        if overrides.get("dropout") is None and not mcfg.dropout:
            rows, _ = accumulation(self.cfg, mcfg.block_size, self.d.world)
            steps = planned_steps(self.cfg, mcfg, rows, self.device, self.data.train.tokens, self.d.world)
            epochs = steps * rows * mcfg.block_size / max(self.data.train.tokens, 1)
            if epochs > SMALL_DATA_EPOCHS:  # a small corpus, read many times over: regularise
                mcfg = dataclasses.replace(mcfg, dropout=SMALL_DATA_DROPOUT)
                if self.d.main:
                    about = "" if steps == self.cfg.max_steps else "about "
                    console.print(f"dropout {SMALL_DATA_DROPOUT}: {about}{steps:,} steps would read the "
                                  f"{self.data.train.tokens:,} train tokens {epochs:.0f} times (--dropout 0 to "
                                  "train without it)", highlight=False)
        return GPT(mcfg)

    def _restore_model(self, saved: dict[str, Any]) -> GPT:
        model, _ = load_model(self.resume_folder, "cpu")
        same = saved["data"]["tokenizer_sha256"] == self.data.meta["tokenizer_sha256"]
        shards = saved["data"].get("train_shards")  # what the batch sampler draws from (runs saved before: unknown)
        if not same or (shards is not None and shards != self.data.train.lengths.tolist()):
            raise UserError(f"run {self.run_dir} was trained on other token data; resume it on "
                            f"{saved['data']['folder']} (leave --data out).")
        return model

    def _restore_state(self, state: dict[str, Any]) -> None:
        """Optimizer, scaler, batch sampler and RNG streams as the checkpoint left them (or fresh seeds)."""
        if not state:
            torch.manual_seed(self.cfg.seed + self.d.rank)  # dropout differs per process, weights do not
            return
        optimizer_state = torch.load(self.resume_folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optimizer_state, self.resume_folder)
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.set_state(state["sampler"])
        rank = self.d.rank
        if rank >= len(state["torch_rng"]):  # more processes than saved (the batch kept): a stream of its own
            torch.manual_seed(self.cfg.seed + rank + 7919 * state["step"])
            return
        torch.set_rng_state(torch.tensor(state["torch_rng"][rank], dtype=torch.uint8))
        if self.device.type == "cuda" and rank < len(state.get("cuda_rng") or []):
            torch.cuda.set_rng_state(torch.tensor(state["cuda_rng"][rank], dtype=torch.uint8), self.device)

    def _wrap(self, model: GPT) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the model evaluation runs, the model training runs): compiled as `compile_plan` says, and under
        DDP for training. On CPU evaluation stays eager: its other batch shapes and eval mode would each
        cost another compilation of ~20 s. The rotary tables are derived buffers, identical everywhere:
        DDP need not broadcast them."""
        compiled: torch.nn.Module = model
        if self.compiled:
            compiled = torch.compile(model, mode=self.cfg.compile_mode)
        evaluated = compiled if self.device.type == "cuda" else model
        if self.d.world == 1:
            return evaluated, compiled
        ids = [self.device.index] if self.device.type == "cuda" else None
        # the option's name changed in torch 2.13 (`broadcast_buffers` before)
        renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
        return evaluated, DDP(compiled, device_ids=ids, **no_sync)

    # checkpoints and records

    def trainer_state(self, elapsed: float) -> dict[str, Any]:
        d, device = self.d, self.device
        rng = [torch.get_rng_state()]
        cuda_rng = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
        if d.world > 1:  # each process's dropout RNG, so every process resumes its own stream
            rng, cuda_rng = _gather(rng[0], d.world), _gather(cuda_rng[0], d.world) if cuda_rng else []
        return {
            "step": self.step, "sampler": self.sampler.state(), "torch_rng": [r.tolist() for r in rng],
            "cuda_rng": [r.tolist() for r in cuda_rng], "scaler": self.scaler.state_dict() or None,
            "best_val_loss": self.best, "best_val_bpb": self.best_bpb, "bad_evals": self.bad_evals,
            "train_seconds": elapsed, "tokens_seen": self.step * self.tokens_per_step,
            "cpu_compiled": bool(self.compiled) if device.type == "cpu" else None,
            "probe_tokens": self.probe_tokens, "rows_per_step": self.rows_per_step,
            "max_steps_asked": self.max_steps_asked,
        }

    def save(self, tag: str, elapsed: float, extra: dict[str, Any] | None = None) -> bool:
        """Write a checkpoint; a failed write (disk full...) is reported and leaves the previous one."""
        st = self.trainer_state(elapsed)  # every process joins the gather
        if not self.d.main:
            return True
        cfg_out = self.config_json | {"step": self.step, **(extra or {})}
        last = tag == "last"
        try:
            save_checkpoint(self.run_dir, tag, self.raw_model, cfg_out, self.data.tokenizer_json,
                            self.optimizer if last else None, st if last else None)
            return True
        except OSError as e:
            console.print(f"[bold red]could not write checkpoint '{tag}' at step {self.step} ({e.strerror or e}); "
                          f"the previous one in {self.run_dir / tag} is intact[/]")
            return False

    def log(self, record: dict[str, Any]) -> None:
        if self.d.main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # one optimizer step

    def batch(self) -> torch.Tensor:
        """This process's rows of the next global batch, on the device."""
        d, per_rank = self.d, self.rows_per_step // self.d.world
        shard, offset = self.sampler.global_batch(self.rows_per_step)
        mine = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
        batch = self.sampler.read(shard[mine], offset[mine])
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def train_step(self, lr: float) -> torch.Tensor:
        """Gradients of one batch, clipped, then the update (skipped when not finite); returns the norm
        before clipping."""
        self.optimizer.set_lr(lr)
        loss = self._gradients(self.batch())
        self.loss_sum += loss
        for optimizer in self.optimizer.all:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip or float("inf"))
        bad = self.health.check(norm, loss, self.scaler.is_enabled())
        if self.scaler.is_enabled():  # fp16: the scaler skips non-finite steps itself, and lowers its scale
            # each optimizer sees only its own overflow; with two, an overflow anywhere skips both (the
            # clip has already zeroed every finite gradient)
            if len(self.optimizer.all) == 1 or bool(torch.isfinite(norm)):
                for optimizer in self.optimizer.all:
                    self.scaler.step(optimizer)
            self.scaler.update()
        else:
            skip = None  # read from the device once, and only when an optimizer cannot skip by itself
            for optimizer in self.optimizer.all:
                if optimizer.defaults.get("fused"):
                    optimizer.found_inf = bad  # type: ignore[attr-defined]  # the kernel skips on the device
                    optimizer.step()
                else:
                    skip = bool(bad.item()) if skip is None else skip
                    if not skip:
                        optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1
        return norm

    def _gradients(self, batch: torch.Tensor) -> torch.Tensor:
        """Gradients of `batch`: a CUDA out-of-memory error halves the micro-batch and retries the same rows."""
        while True:
            try:
                loss = forward_backward(self.model, batch, self.micro_bs, self.device, self.dtype, self.scaler,
                                        self.d.world)
                if self.compile_unproven:  # compiled and ran: the next run of this shape finds it cached
                    self.compile_unproven = False
                    self._mark_compiled()
                return loss
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad()
                self._halve_micro_batch(batch.size(0))
            except Exception as e:  # a CPU compilation that fails (a broken C++ toolchain...): train eagerly
                if not self.compile_unproven:
                    raise
                self._compile_failed(e)

    def _mark_compiled(self) -> None:
        if self.d.main:
            with contextlib.suppress(OSError):  # a note for later runs, never a reason to stop this one
                self.marker.parent.mkdir(parents=True, exist_ok=True)
                self.marker.touch()

    def _compile_failed(self, e: Exception) -> None:
        first = first_line(e)
        if self.d.world > 1:
            raise UserError(f"the first compiled step failed on {self.device} ({first}); rerun with --no-compile.") from None
        if self.d.main:
            console.print(f"[yellow]the first compiled step failed on {self.device} ({first}); training on without "
                          "torch.compile (--no-compile skips the attempt)[/]")
        self.optimizer.zero_grad()
        self.compiled, self.compile_unproven = "", False
        self.eval_model = self.model = self.raw_model

    def _halve_micro_batch(self, rows: int) -> None:
        if self.micro_bs == 1 or self.d.world > 1:
            raise UserError(
                "out of GPU memory" + (" with one sequence per micro-batch" if self.micro_bs == 1 else " under torchrun")
                + "; use a smaller --batch-size or model, --block-size, or --grad-checkpoint."
            ) from None
        before, self.micro_bs = self.micro_bs, self.micro_bs // 2
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.d.main:
            console.print(f"[yellow]out of memory at step {self.step + 1}: micro-batch {before} -> {self.micro_bs}, "
                          f"accumulation {-(-rows // before)} -> {-(-rows // self.micro_bs)} (same batch)[/]")

    # what happens between steps

    def log_step(self, lr: float, norm: torch.Tensor, steps: int, seconds: float) -> str | None:
        """The dense log line and metrics record for the last `steps` steps; a stop reason if unhealthy."""
        cfg, d = self.cfg, self.d
        if d.world > 1:
            dist.all_reduce(self.loss_sum, op=dist.ReduceOp.AVG)
        loss = self.loss_sum.item() / steps
        self.loss_sum.zero_()
        dt = seconds / steps
        tok_s = self.tokens_per_step / dt
        mfu = self.flops_per_step / dt / (self.peak * d.world) if self.peak else None
        if d.main:
            console.print(
                f"step {self.step:>{len(str(cfg.max_steps))}}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"norm {norm.item():.2f} | {dt * 1000:.0f}ms | {human_count(tok_s)} tok/s | "
                f"mfu {f'{mfu:.1%}' if mfu else '-'} | eta {human_time(self._seconds_left(dt))}"
            )
        self.log({"step": self.step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm.item(), 4),
                  "ms": round(dt * 1000, 2), "tok_s": round(tok_s), "mfu": mfu})
        skipped, streak, spikes, top = self.health.read(d.world)
        if d.main and skipped > self.skipped_reported:
            console.print(f"[yellow]skipped {skipped - self.skipped_reported} update(s) with a non-finite loss or "
                          f"gradient ({skipped} in all)[/]")
        if d.main and spikes:
            console.print(f"[yellow]gradient norm spike: {spikes} step(s) above {Health.SPIKE:g}x the running "
                          f"norm (largest {top:.3g})[/]")
        self.skipped_reported = skipped
        if streak >= cfg.max_bad_steps:
            return f"{streak} updates in a row had a non-finite loss or gradient"
        return None

    def _seconds_left(self, step_seconds: float) -> float:
        """Until the last step, or the end of --max-minutes when that comes first."""
        left = (self.cfg.max_steps - self.step) * step_seconds
        return min(left, self.cfg.max_minutes * 60 - self._elapsed()) if self.cfg.max_minutes else left

    def validate(self, elapsed: float) -> tuple[Score, bool]:
        """Val loss and bits per byte on the fixed subset (every evaluation scores the same windows, so the
        best checkpoint and the patience compare like with like); saves `best` when better. Returns (score,
        out of patience)."""
        score = self._score(self.probe)
        improved = score.loss < self.best
        if improved:
            self.best, self.best_bpb, self.bad_evals = score.loss, score.bpb, 0
        else:
            self.bad_evals += 1
        if self.d.main:
            console.print(f"[bold]eval[/] step {self.step} | val loss {score.loss:.4f} | val bpb {score.bpb:.4f} | "
                          f"{human_count(score.tokens)} tokens" + (" *" if improved else ""))
        self.log({"step": self.step, "val_loss": round(score.loss, 6), "val_bpb": round(score.bpb, 6),
                  "val_tokens": score.tokens})
        if improved:
            self.save("best", elapsed, {"val_loss": score.loss, "val_bpb": score.bpb})
        return score, bool(self.cfg.patience and self.bad_evals >= self.cfg.patience)

    def _score(self, windows: list[Any]) -> Score:
        return evaluate(self.eval_model, self.data.val.arrays, windows, self.data.token_bytes, self.cfg.batch_size,
                        self.device, self.dtype, self.d)

    def score_whole(self) -> Score:
        """At the end: the model on all --eval-tokens windows (the whole split when it is smaller), the
        figure `minigpt eval` reproduces for the last checkpoint; recorded, never compared with the subset's."""
        score = self._score(self.windows)
        if self.d.main:
            console.print(f"[bold]eval[/] step {self.step} | whole val: loss {score.loss:.4f} | bpb {score.bpb:.4f} | "
                          f"{human_count(score.tokens)} tokens")
        self.log({"step": self.step, "whole_val_loss": round(score.loss, 6), "whole_val_bpb": round(score.bpb, 6),
                  "whole_val_tokens": score.tokens})
        return score

    def sample(self) -> None:
        eot = self.data.meta["eot_id"]
        was_training = self.raw_model.training
        self.raw_model.eval()  # no dropout while sampling; eager decoding: 64 tokens do not pay for a graph
        ids = generate(self.raw_model, [eot], 64, Sampling(0.8, top_k=50), eot=eot, seed=self.step, graph=False)
        self.raw_model.train(was_training)
        assert self.tok is not None
        console.print(f"[dim]sample:[/] {self.tok.decode(ids[0], skip_special_tokens=False)!r}")

    # the loop

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        self.t_start = time.perf_counter()
        t_log, step_log = self.t_start, self.step
        stop: Stop | None = None
        last_eval: Score | None = None
        with self._stop_on_ctrl_c(), self._progress_bar() as bar:
            while self.step < cfg.max_steps:
                lr = lr_at(self.step, cfg, self._time_used(first=self.step == step_log))
                norm = self.train_step(lr)
                bar(self.step)

                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    unhealthy = self.log_step(lr, norm, self.step - step_log, time.perf_counter() - t_log)
                    t_log, step_log = time.perf_counter(), self.step
                    if unhealthy:  # no save: the last good checkpoint stays as it is
                        stop = Stop(unhealthy, failed=True)
                        break

                stop = self._should_stop()
                t_between = time.perf_counter()  # evaluation, samples and saves stay out of ms/step
                score, stop = self._between_steps(stop)
                last_eval = score or last_eval
                t_log += time.perf_counter() - t_between
                if stop:
                    break
        return self.finish(stop or Stop(), last_eval)

    def _between_steps(self, stop: Stop | None) -> tuple[Score | None, Stop | None]:
        """Evaluation, samples and checkpoints due after this step (all of them when the run ends,
        except after Ctrl-C, which only saves)."""
        cfg, elapsed, score = self.cfg, self._elapsed(), None
        wrap_up = stop is not None and not stop.interrupted
        if self.step % cfg.eval_every == 0 or wrap_up:
            score, out_of_patience = self.validate(elapsed)
            if out_of_patience and (stop is None or stop.reason == Stop().reason):
                stop = Stop(f"no better val loss in {cfg.patience} evaluations")
                wrap_up = True
            if wrap_up and self.probe is not self.windows:
                score = self.score_whole()
        if self.d.main and (self.step % (cfg.sample_every or cfg.eval_every) == 0 or wrap_up):
            self.sample()
        if self.step % (cfg.save_every or cfg.eval_every) == 0 or stop is not None:
            saved = self.save("last", elapsed)
            if stop is not None and not saved:
                stop.failed = True
                stop.reason += " (the final checkpoint could not be written)"
        return score, stop

    def _should_stop(self) -> Stop | None:
        """Ctrl-C, the time budget or the last step. Under torchrun the processes agree at log steps only
        (no sync in every step), so a stop there can come up to --log-every steps later."""
        cfg, d = self.cfg, self.d
        if self.step == cfg.max_steps:
            return Stop()
        if d.world > 1 and self.step % cfg.log_every:
            return None
        interrupted = self.sigint
        out_of_time = bool(cfg.max_minutes and self._elapsed() >= cfg.max_minutes * 60)
        if d.world > 1:  # every process must agree to stop
            flags = torch.tensor([float(interrupted), float(out_of_time)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            interrupted, out_of_time = bool(flags[0]), bool(flags[1])
        if interrupted:
            return Stop("interrupted", interrupted=True)
        if out_of_time:
            return Stop(f"time limit of {cfg.max_minutes:g} minutes")
        return None

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def _time_used(self, first: bool) -> float:
        """The share of --max-minutes spent, for the learning rate; under torchrun it is rank 0's clock,
        read at log steps (and the first step), so every process uses the same learning rate."""
        cfg, d = self.cfg, self.d
        if not cfg.max_minutes:
            return 0.0
        if d.world > 1 and not (first or self.step % cfg.log_every == 0):
            return self.time_used
        self.time_used = self._elapsed() / (cfg.max_minutes * 60)
        if d.world > 1:
            t = torch.tensor([self.time_used], device=self.device)
            dist.broadcast(t, 0)
            self.time_used = float(t)
        return self.time_used

    @contextlib.contextmanager
    def _stop_on_ctrl_c(self) -> Iterator[None]:
        """Ctrl-C finishes the step, then saves and stops. Every process gets the terminal's Ctrl-C, and
        they agree to stop through an all_reduce."""
        self.sigint = False

        def on_sigint(signum: int, frame: Any) -> None:
            self.sigint = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[Any]:
        """A bar on a terminal; in a log file the dense step lines say it all."""
        if not (self.d.main and console.is_terminal):
            yield lambda step: None
            return
        bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=console, transient=True)
        task = bar.add_task("train", total=self.cfg.max_steps, completed=self.step)
        with bar:
            yield lambda step: bar.update(task, completed=step)

    def finish(self, stop: Stop, last_eval: Score | None) -> dict[str, Any]:
        """The summary (and, on the main process, the loss plot and what to do next)."""
        step = self.step
        summary = {
            "run": str(self.run_dir), "steps": step, "stop_reason": stop.reason,
            "best_val_loss": self.best, "best_val_bpb": self.best_bpb,
            "last_val_loss": last_eval.loss if last_eval else None,
            "tokens_seen": step * self.tokens_per_step, "train_seconds": self._elapsed(),
            "params": self.raw_model.num_params(), "device": str(self.device),
            "dtype": dtype_name(self.dtype), "failed": stop.failed, "main": self.d.main,
        }
        if self.d.main:
            _plot(self.metrics_path, self.run_dir / "loss.png")
            resume = resume_command(self.run_dir, self.d.world)
            if stop.interrupted:
                console.print(f"[yellow]interrupted at step {step}; saved {escape(str(self.run_dir))}/last. Resume with: "
                              f"{escape(resume)}[/]", soft_wrap=True)  # one line a user can copy whole
            if stop.failed:
                console.print(f"[bold red]stopped: {stop.reason}. The last good checkpoint is in "
                              f"{escape(str(self.run_dir))}/last; resume it with a lower --lr or with --dtype fp32: "
                              f"{escape(resume)}[/]", soft_wrap=True)
        return summary

    def _print_header(self) -> None:
        cfg, mcfg, data, d = self.cfg, self.mcfg, self.data, self.d
        compiled = f" {self.compiled}" if self.compiled else ""
        console.print(f"[bold]train[/] {dataclasses.asdict(cfg)}")
        console.print(f"[bold]model[/] {dataclasses.asdict(mcfg)}")
        console.print(
            f"{human_count(self.raw_model.num_params())} parameters | {data.folder} ({data.meta['kind']}, vocab "
            f"{data.vocab_size}, train {human_count(data.train.tokens)} / val {human_count(data.val.tokens)} tokens) | "
            f"{self.device} {dtype_name(self.dtype)}{compiled} | {d.world} process(es) | {self.tokens_per_step:,} "
            f"tokens/step = {self.rows_per_step} x {mcfg.block_size} ({self.accum} accumulation) | run {self.run_dir}"
            + (f" | resuming at step {self.start_step}" if self.start_step else "")
        )


def resume_command(run_dir: Path, world: int) -> str:
    """The command that resumes `run_dir`: its saved settings come back with it, so naming the run is all it
    takes (--resume first: a paste cut short then fails instead of starting the run over)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = [f"--nnodes={world // per_node}"] if world > per_node else []  # and the rendezvous it started with
    script = ["python"] if world == 1 else ["torchrun", *nodes, f"--nproc_per_node={per_node}"]
    return shlex.join([*script, "03_train.py", "--resume", "--runs-dir", str(run_dir.parent), "--name", run_dir.name])


def _gather(t: torch.Tensor, world: int) -> list[Any]:
    out: list[Any] = [None] * world
    dist.all_gather_object(out, t)
    return out


def _trim_metrics(path: Path, keep_through: int) -> None:
    """On resume, drop records a killed run logged after its last checkpoint (they will be redone)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = []
    for ln in lines:
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(ln)["step"] <= keep_through:
                kept.append(ln)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("".join(k + "\n" for k in kept))


def _plot(metrics: Path, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # optional: pip install minigpt[plot]
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def summary_table(s: dict[str, Any]) -> Table:
    t = Table(title="training summary")
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row("run", s["run"])
    t.add_row("stopped", f"{s['stop_reason']} at step {s['steps']:,}")
    t.add_row("best val loss", f"{s['best_val_loss']:.4f}")
    t.add_row("best val bits/byte", f"{s['best_val_bpb']:.4f}")
    t.add_row("tokens seen", human_count(s["tokens_seen"]))
    t.add_row("parameters", human_count(s["params"]))
    t.add_row("wall time", human_time(s["train_seconds"]))
    t.add_row("device", f"{s['device']} {s['dtype']}")
    return t
