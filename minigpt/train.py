"""The training loop (the library behind 03_train.py): one process or many under torchrun.

Exact resume: trainer_state.json holds the step, the batch sampler's generator state and torch's RNG
states, so on CPU a resumed run logs the same losses an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import find_checkpoint, load_model, read_trainer_state, save_checkpoint
from .common import UserError, atomic_open, console, human_count, human_time
from .config import ModelConfig, TrainConfig, model_config
from .data import BatchSampler, TokenData, eval_windows
from .generate import Sampling, generate
from .model import GPT
from .tokenizer import load_tokenizer

# Dense bf16 tensor-core peaks (FLOP/s) for MFU, matched against torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "A6000": 155e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


# --------------------------------------------------------------------------------------------------
# device, precision, distribution


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu (or auto).")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available here; use --device cpu (or auto).")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cuda, cuda:N, mps or cpu.") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # bf16 autocast is slower than fp32 on most CPUs; MPS: ask with --dtype
    if name == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 is not supported on CPU; use bf16 or fp32.")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun's environment decides: WORLD_SIZE > 1 means DDP (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


# --------------------------------------------------------------------------------------------------
# optimisation pieces


def lr_at(step: int, cfg: TrainConfig, time_used: float = 0.0) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps.

    With a time budget, progress is whichever is further along, steps or time (`time_used` is the
    share of --max-minutes spent), so the decay completes when time runs out first.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    progress = max(progress, min(1.0, time_used))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and the embedding) only, never on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


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


class Health:
    """Non-finite updates and gradient-norm spikes, counted on the device and read at log steps.

    An update whose gradient norm is not finite is skipped: inside the fused CUDA AdamW kernel (its
    `found_inf` input, so no host sync per step), with a host check elsewhere.
    """

    SPIKE = 10.0  # a norm this many times the running norm is a spike

    def __init__(self, device: torch.device) -> None:
        z = lambda: torch.zeros((), device=device)  # noqa: E731
        self.skipped, self.streak, self.max_streak, self.spikes, self.max_spike, self.ema = z(), z(), z(), z(), z(), z()
        self.seen = 0

    def check(self, norm: torch.Tensor) -> torch.Tensor:
        """1.0 if this update must be skipped, else 0.0 (a device tensor)."""
        norm = norm.float()
        bad = (~torch.isfinite(norm)).float()
        self.skipped += bad
        self.streak = (self.streak + bad) * bad
        self.max_streak = torch.maximum(self.max_streak, self.streak)
        good = bad == 0
        if self.seen >= 20:  # after a short warm-up of the running norm
            spike = good & (norm > self.SPIKE * self.ema)
            self.spikes += spike.float()
            self.max_spike = torch.where(spike, torch.maximum(self.max_spike, norm), self.max_spike)
            good = good & ~spike
        self.ema = torch.where(good, norm if self.seen == 0 else 0.9 * self.ema + 0.1 * norm, self.ema)
        self.seen += 1
        return bad

    def read(self) -> tuple[int, int, int, float]:
        """(skipped so far, longest run of skips since the last read, spikes since then, largest spike)."""
        skipped, streak, spikes, top = torch.stack([self.skipped, self.max_streak, self.spikes, self.max_spike]).tolist()
        self.max_streak.copy_(self.streak)
        self.spikes.zero_()
        self.max_spike.zero_()
        return int(skipped), int(streak), int(spikes), top


# --------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: TokenData, windows: list[tuple[int, int]], block_size: int, batch_size: int,
    device: torch.device, dtype: torch.dtype, d: Dist,
) -> tuple[float, float]:
    """(mean val loss in nats per token, bits per byte) over fixed windows shared across processes."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    mine = windows[d.rank :: d.world]
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        rows = np.stack([data.val.arrays[s][o : o + block_size + 1] for s, o in chunk]).astype(np.int64)
        batch = torch.from_numpy(rows).to(device)
        with autocast(device, dtype):
            loss = model(batch[:, :-1], batch[:, 1:]).loss
        total[0] += loss.double() * batch[:, 1:].numel()
        total[1] += batch[:, 1:].numel()
    if d.world > 1:
        dist.all_reduce(total)
    model.train()
    loss = float(total[0] / total[1])
    return loss, loss / math.log(2) / data.bytes_per_token


# --------------------------------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    d, device = init_distributed(cfg.device)
    if d.world == 1:
        return Trainer(cfg, overrides, d, device).run()
    trainer = None
    try:
        trainer = Trainer(cfg, overrides, d, device)
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


class Trainer:
    """One run: `__init__` builds or restores everything, `run` loops over `train_step`, `log_step`,
    `validate` and `save` until the steps, the time or the patience run out, or Ctrl-C."""

    def __init__(self, cfg: TrainConfig, overrides: dict[str, Any], d: Dist, device: torch.device) -> None:
        self.cfg, self.d, self.device = cfg, d, device
        self.dtype = resolve_dtype(cfg.dtype, device)
        self.data = data = TokenData(cfg.data)
        self.name = cfg.name or f"{data.folder.parent.name}-{data.folder.name}-{cfg.preset}"
        self.run_dir = Path(cfg.runs_dir) / self.name
        self.tokenizer_json = data.folder / "tokenizer.json"

        # The model: from the checkpoint when resuming, else preset + overrides.
        state: dict[str, Any] = {}
        if cfg.resume:
            folder = find_checkpoint(self.run_dir, "last")
            state = read_trainer_state(folder)
            model, saved = load_model(folder, "cpu")
            if saved["data"]["tokenizer_sha256"] != data.meta["tokenizer_sha256"]:
                raise UserError(f"run {self.run_dir} was trained on other token data; pass the same --data to resume.")
            mcfg = model.cfg
        else:
            if (self.run_dir / "last").exists() and d.main:
                console.print(f"[yellow]{self.run_dir} already holds a run; starting over (use --resume to continue it)[/]")
            mcfg = model_config(cfg.preset, data.vocab_size, overrides)
            torch.manual_seed(cfg.seed)
            model = GPT(mcfg)
        self.mcfg = mcfg
        data.check_context(mcfg.block_size)
        model.grad_checkpoint = cfg.grad_checkpoint
        model.to(device)
        self.raw_model = model  # saved and sampled from: never the compiled or DDP wrapper
        self.optimizer = make_optimizer(model, cfg, device)
        if cfg.resume:
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))

        self.rows_per_step, accum = accumulation(cfg, mcfg.block_size, d.world)
        self.tokens_per_step = self.rows_per_step * mcfg.block_size
        self.sampler = BatchSampler(data.train, mcfg.block_size, cfg.seed)
        self.windows = eval_windows(data.val, mcfg.block_size, cfg.eval_tokens)
        if cfg.resume:
            self.sampler.set_state(state["sampler"])
            torch.set_rng_state(torch.tensor(state["torch_rng"][d.rank % len(state["torch_rng"])], dtype=torch.uint8))
            if device.type == "cuda" and state.get("cuda_rng"):
                cuda_rng = state["cuda_rng"][d.rank % len(state["cuda_rng"])]
                torch.cuda.set_rng_state(torch.tensor(cuda_rng, dtype=torch.uint8), device)
        else:
            torch.manual_seed(cfg.seed + d.rank)  # dropout differs per process, weights do not

        self.model: torch.nn.Module = model
        if cfg.compile and device.type == "cuda":
            self.model = torch.compile(self.model, mode=cfg.compile_mode)
        if d.world > 1:
            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.peak = peak_flops(device)
        self.flops_per_step = model.flops_per_token() * self.tokens_per_step
        self.config_json = {
            "model": dataclasses.asdict(mcfg),
            "train": dataclasses.asdict(cfg),
            "data": {k: data.meta[k] for k in ("kind", "vocab_size", "eot_id", "pad_id", "tokenizer_sha256", "dataset")}
            | {"folder": str(data.folder), "bytes_per_token": data.bytes_per_token},
        }

        # Where the run stands: restored when resuming.
        self.step = self.start_step = state.get("step", 0)
        self.best = state.get("best_val_loss", float("inf"))
        self.best_bpb = state.get("best_val_bpb", float("inf"))
        self.bad_evals = state.get("bad_evals", 0)
        self.elapsed_before = state.get("train_seconds", 0.0)
        self.micro_bs = cfg.batch_size
        self.health = Health(device)
        self.skipped_reported = 0
        self.loss_sum = torch.zeros((), device=device)  # summed on the device, read at log steps
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tok = load_tokenizer(self.tokenizer_json) if d.main else None
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _trim_metrics(self.metrics_path, self.start_step if cfg.resume else 0)
            _print_header(cfg, mcfg, model, data, device, self.dtype, d, self.rows_per_step, accum, self.run_dir,
                          self.start_step)

    # checkpoints and records

    def trainer_state(self, elapsed: float) -> dict[str, Any]:
        d, device = self.d, self.device
        rng = [torch.get_rng_state()]
        if d.world > 1:  # each process's dropout RNG, so every process resumes its own stream
            gathered: list[Any] = [None] * d.world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        cuda_rng = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
        if d.world > 1 and cuda_rng:
            gathered_cuda: list[Any] = [None] * d.world
            dist.all_gather_object(gathered_cuda, cuda_rng[0])
            cuda_rng = gathered_cuda
        return {
            "step": self.step, "sampler": self.sampler.state(), "torch_rng": [r.tolist() for r in rng],
            "cuda_rng": [r.tolist() for r in cuda_rng],
            "best_val_loss": self.best, "best_val_bpb": self.best_bpb, "bad_evals": self.bad_evals,
            "train_seconds": elapsed, "tokens_seen": self.step * self.tokens_per_step,
        }

    def save(self, tag: str, elapsed: float, extra: dict[str, Any] | None = None) -> bool:
        """Write a checkpoint; a failed write (disk full...) is reported and leaves the previous one."""
        st = self.trainer_state(elapsed)  # every process joins the gather
        if not self.d.main:
            return True
        cfg_out = self.config_json | {"step": self.step, **(extra or {})}
        try:
            if tag == "last":
                save_checkpoint(self.run_dir, "last", self.raw_model, cfg_out, self.tokenizer_json, self.optimizer, st)
            else:
                save_checkpoint(self.run_dir, tag, self.raw_model, cfg_out, self.tokenizer_json)
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
        """Gradients of one batch, clipped, and the update (skipped when not finite); returns the norm."""
        cfg, d, optimizer = self.cfg, self.d, self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = self.batch()
        per_rank = self.rows_per_step // d.world
        while True:  # a CUDA out-of-memory error halves the micro-batch and retries the same rows
            try:
                self.loss_sum += _forward_backward(self.model, batch, self.micro_bs, self.device, self.dtype,
                                                   self.scaler, d.world)
                break
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                if self.micro_bs == 1 or d.world > 1:
                    raise UserError(
                        "out of GPU memory" + (" with one sequence per micro-batch" if self.micro_bs == 1 else " under torchrun")
                        + "; use a smaller --batch-size or model, --block-size, or --grad-checkpoint."
                    ) from None
                self.micro_bs //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if d.main:
                    console.print(f"[yellow]out of memory at step {self.step + 1}: micro-batch {self.micro_bs * 2} -> "
                                  f"{self.micro_bs}, accumulation {per_rank // (self.micro_bs * 2)} -> "
                                  f"{per_rank // self.micro_bs} (same batch)[/]")
        self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip or float("inf"))
        skip = self.health.check(norm)
        if self.scaler.is_enabled():  # fp16: the scaler skips non-finite steps itself, and lowers its scale
            self.scaler.step(optimizer)
            self.scaler.update()
        elif optimizer.defaults.get("fused"):
            optimizer.found_inf = skip  # type: ignore[attr-defined]  # the kernel skips on the device
            optimizer.step()
        elif not skip.item():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return norm

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
                f"mfu {f'{mfu:.1%}' if mfu else '-'} | eta {human_time((cfg.max_steps - self.step) * dt)}"
            )
        self.log({"step": self.step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm.item(), 4),
                  "ms": round(dt * 1000, 2), "tok_s": round(tok_s), "mfu": mfu})
        skipped, streak, spikes, top = self.health.read()
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

    def validate(self, elapsed: float) -> tuple[float, float, bool]:
        """Val loss and bits per byte; saves `best` when better. Returns (loss, bpb, out of patience)."""
        cfg = self.cfg
        val_loss, val_bpb = evaluate(self.model, self.data, self.windows, self.mcfg.block_size, cfg.batch_size,
                                     self.device, self.dtype, self.d)
        improved = val_loss < self.best
        if improved:
            self.best, self.best_bpb, self.bad_evals = val_loss, val_bpb, 0
        else:
            self.bad_evals += 1
        if self.d.main:
            console.print(f"[bold]eval[/] step {self.step} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}"
                          + (" *" if improved else ""))
        self.log({"step": self.step, "val_loss": round(val_loss, 6), "val_bpb": round(val_bpb, 6)})
        if improved:
            self.save("best", elapsed, {"val_loss": val_loss, "val_bpb": val_bpb})
        return val_loss, val_bpb, bool(cfg.patience and self.bad_evals >= cfg.patience)

    def sample(self) -> None:
        eot = self.data.meta["eot_id"]
        self.raw_model.eval()  # no dropout while sampling; eager decoding: 64 tokens do not pay for a graph
        ids = generate(self.raw_model, [eot], 64, Sampling(0.8, top_k=50), eot=eot, seed=self.step, graph=False)
        self.raw_model.train()
        assert self.tok is not None
        console.print(f"[dim]sample:[/] {self.tok.decode(ids[0], skip_special_tokens=False)!r}")

    # the loop

    def run(self) -> dict[str, Any]:
        cfg, d, device = self.cfg, self.d, self.device
        sample_every = cfg.sample_every or cfg.eval_every
        save_every = cfg.save_every or cfg.eval_every
        self.model.train()
        last_eval = None
        t_start = time.perf_counter()
        t_log, step_log = t_start, self.step
        stop_reason = "max steps"
        failed = interrupted = out_of_time = sigint = False
        time_used = 0.0
        previous_handler = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:  # finish the step, then save and stop
            nonlocal sigint
            sigint = True

        # Every process: a terminal's Ctrl-C reaches them all, and they agree to stop through all_reduce.
        # Under torchrun they agree on the clock and on stopping at log steps only: no sync in every step.
        signal.signal(signal.SIGINT, on_sigint)
        # A bar on a terminal; in a log file the dense lines say it all.
        bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=console, transient=True, disable=not (d.main and console.is_terminal))
        bar_task = bar.add_task("train", total=cfg.max_steps, completed=self.step)
        bar.start()
        try:
            while self.step < cfg.max_steps:
                if cfg.max_minutes and (d.world == 1 or self.step % cfg.log_every == 0 or self.step == step_log):
                    time_used = (self.elapsed_before + time.perf_counter() - t_start) / (cfg.max_minutes * 60)
                    if d.world > 1:  # the same learning rate on every process
                        t = torch.tensor([time_used], device=device)
                        dist.broadcast(t, 0)
                        time_used = float(t)
                lr = lr_at(self.step, cfg, time_used)
                norm = self.train_step(lr)
                step = self.step
                bar.update(bar_task, completed=step)

                elapsed = self.elapsed_before + time.perf_counter() - t_start
                if d.world == 1 or step % cfg.log_every == 0 or step == cfg.max_steps:
                    interrupted, out_of_time = sigint, bool(cfg.max_minutes and elapsed >= cfg.max_minutes * 60)
                    if d.world > 1:  # every process must agree to stop
                        flags = torch.tensor([float(interrupted), float(out_of_time)], device=device)
                        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                        interrupted, out_of_time = bool(flags[0]), bool(flags[1])

                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    unhealthy = self.log_step(lr, norm, step - step_log, now - t_log)
                    t_log, step_log = time.perf_counter(), step
                    if unhealthy:
                        stop_reason, failed = unhealthy, True
                        break

                final = step == cfg.max_steps or interrupted or out_of_time
                t_between = time.perf_counter()  # evaluation, samples and saves stay out of ms/step
                if step % cfg.eval_every == 0 or (final and not interrupted):
                    *last_eval, patience_out = self.validate(elapsed)
                    if patience_out:
                        stop_reason = f"no better val loss in {cfg.patience} evaluations"
                        final = True
                if d.main and self.tok is not None and (step % sample_every == 0 or (final and not interrupted)):
                    self.sample()
                if step % save_every == 0 or final:
                    saved = self.save("last", elapsed)
                    if final and not saved:
                        failed = True
                        stop_reason += " (the final checkpoint could not be written)"
                t_log += time.perf_counter() - t_between
                if interrupted:
                    stop_reason = "interrupted"
                    break
                if out_of_time:
                    stop_reason = f"time limit of {cfg.max_minutes:g} minutes"
                    break
                if final:
                    break
        finally:
            bar.stop()
            signal.signal(signal.SIGINT, previous_handler)
        return self.finish(self.elapsed_before + time.perf_counter() - t_start, stop_reason, failed, interrupted,
                           last_eval)

    def finish(self, elapsed: float, stop_reason: str, failed: bool, interrupted: bool,
               last_eval: list[float] | None) -> dict[str, Any]:
        """The summary (and, on the main process, the loss plot and what to do next)."""
        cfg, step = self.cfg, self.step
        summary = {
            "run": str(self.run_dir), "steps": step, "stop_reason": stop_reason,
            "best_val_loss": self.best, "best_val_bpb": self.best_bpb,
            "last_val_loss": last_eval[0] if last_eval else None,
            "tokens_seen": step * self.tokens_per_step, "train_seconds": elapsed,
            "params": self.raw_model.num_params(), "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."), "failed": failed, "main": self.d.main,
        }
        if self.d.main:
            _plot(self.metrics_path, self.run_dir / "loss.png")
            resume = f"python 03_train.py --data {cfg.data} --runs-dir {cfg.runs_dir} --name {self.name} --resume"
            if interrupted:
                console.print(f"[yellow]interrupted at step {step}; saved {self.run_dir}/last. Resume with: {resume}[/]")
            if failed:
                console.print(f"[bold red]stopped: {stop_reason}. The last good checkpoint is in {self.run_dir}/last; "
                              f"lower --lr or try --dtype fp32, then: {resume}[/]")
        return summary


def _forward_backward(
    model: torch.nn.Module, batch: torch.Tensor, micro_bs: int, device: torch.device, dtype: torch.dtype,
    scaler: torch.amp.GradScaler, world: int,
) -> torch.Tensor:
    """Gradients of one optimizer step's rows, `micro_bs` rows at a time; returns the mean loss (on device)."""
    accum = batch.size(0) // micro_bs
    total = torch.zeros((), device=device)
    for micro in range(accum):
        rows = batch[micro * micro_bs : (micro + 1) * micro_bs]
        sync = micro == accum - 1 or world == 1  # DDP all-reduces gradients on the last micro-batch only
        # Under --compile-mode reduce-overhead this tells the CUDA graphs the last outputs are no longer
        # needed (a no-op otherwise).
        torch.compiler.cudagraph_mark_step_begin()
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, dtype):
            loss = model(rows[:, :-1], rows[:, 1:]).loss / accum
        scaler.scale(loss).backward()
        total += loss.detach()  # read at log steps only: no host sync per step
    return total


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


def _print_header(
    cfg: TrainConfig, mcfg: ModelConfig, model: GPT, data: TokenData, device: torch.device, dtype: torch.dtype,
    d: Dist, rows_per_step: int, accum: int, run_dir: Path, start_step: int,
) -> None:
    console.print(f"[bold]train[/] {dataclasses.asdict(cfg)}")
    console.print(f"[bold]model[/] {dataclasses.asdict(mcfg)}")
    console.print(
        f"{human_count(model.num_params())} parameters | {data.folder} ({data.meta['kind']}, vocab {data.vocab_size}, "
        f"train {human_count(data.train.tokens)} / val {human_count(data.val.tokens)} tokens) | {device} {str(dtype)[6:]}"
        f"{f' compiled ({cfg.compile_mode})' if cfg.compile and device.type == 'cuda' else ''} | {d.world} process(es) | "
        f"{rows_per_step * mcfg.block_size:,} tokens/step = {rows_per_step} x {mcfg.block_size} ({accum} accumulation) | "
        f"run {run_dir}" + (f" | resuming at step {start_step}" if start_step else "")
    )


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
