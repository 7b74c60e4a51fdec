"""The training loop (the library behind 03_train.py): one process or many under torchrun.

`Trainer` builds a run (or restores one), then loops: a step (the gradients of one batch over its
micro-batches, clipped, the update skipped when it is not finite), a dense log line at log steps, and
between steps the evaluations, samples and checkpoints that are due, until the steps, the time or the
patience run out, or Ctrl-C. What it stands on has files of its own: the optimizers and the schedule
(optim.py), when the step compiles (compilation.py), the resume state and the settings a resumed run
keeps (resume.py), batches (data.py). A resumed run on CPU logs the losses an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import math
import os
import signal
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

from .checkpoint import load_model, save_checkpoint
from .compilation import (
    compile_marker,
    compile_plan,
    cpp_compiler,
    mark_compiled,
    uses_cuda_graphs,
)
from .config import ModelConfig, Sampling, TrainConfig, model_config
from .data import BatchSampler, TokenData, accumulation, eval_windows, load_tokenizer
from .evaluate import Score, evaluate, no_better_than_unigram, unigram_baseline
from .generate import generate
from .hf_import import source_model, start_model
from .model import GPT
from .optim import Optimizers, auto_lr, decay_lr, lr_at
from .plan import epoch_steps, fit_to_data
from .resume import (
    Resumed,
    TrainerState,
    check_same_data,
    check_same_step,
    restore_rng,
    resume,
    resume_command,
    rng_states,
    run_folder,
)
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
    set_matmul_precision,
    sync,
)

# An evaluation during training scores 1/8 of the tokens trained since the last one (a forward pass costs about
# a third of a step: ~4% of the run), on a fixed subset spread over the split, so its figures compare with the
# whole split's; the end of the run scores all --eval-tokens.
EVAL_PROBE_SHARE = 8
EVAL_PROBE_MIN = 16_384  # tokens: fewer would make the best-checkpoint choice noisy


def new_model(cfg: TrainConfig, overrides: dict[str, Any], vocab_size: int) -> GPT:
    """The preset with the model options given, initialised from --seed."""
    torch.manual_seed(cfg.seed)
    return GPT(model_config(cfg.preset, vocab_size, overrides))


def wrap(model: GPT, compiled: bool, mode: str, device: torch.device, world: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model evaluation runs, the model training runs): compiled when asked, and under DDP for training.
    The DDP module is what compiles, so that the graph breaks at each gradient bucket and the all-reduce of
    one overlaps the backward pass of the next. On CPU evaluation stays eager: its other batch shapes and
    eval mode would each cost another compilation. The rotary tables are derived buffers,
    identical everywhere: DDP need not broadcast them."""
    trained: torch.nn.Module = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        # the option's name changed in torch 2.13 (`broadcast_buffers` before)
        renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
        trained = DDP(model, device_ids=ids, **no_sync)
    if not compiled:
        return model, trained
    trained = torch.compile(trained, mode=mode)
    evaluated = (trained if world == 1 else torch.compile(model, mode=mode)) if device.type == "cuda" else model
    return evaluated, trained


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
        reduce_now = i == len(starts) - 1 or world == 1  # DDP all-reduces gradients on the last micro-batch only
        # Under --compile-mode reduce-overhead this tells the CUDA graphs the last outputs are no longer
        # needed (a no-op otherwise).
        torch.compiler.cudagraph_mark_step_begin()
        with (contextlib.nullcontext() if reduce_now else model.no_sync()), autocast(device, dtype):
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
        self.reported = 0  # skipped updates already reported

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

    def report(self, world: int, max_bad: int, main: bool) -> str | None:
        """Warnings for the steps since the last log line; a stop reason after `max_bad` bad updates in a row."""
        skipped, streak, spikes, top = self.read(world)
        if main and skipped > self.reported:
            console.print(f"[yellow]skipped {skipped - self.reported} update(s) with a non-finite loss or "
                          f"gradient ({skipped} in all)[/]")
        if main and spikes:
            console.print(f"[yellow]gradient norm spike: {spikes} step(s) above {self.SPIKE:g}x the running "
                          f"norm (largest {top:.3g})[/]")
        self.reported = skipped
        return f"{streak} updates in a row had a non-finite loss or gradient" if streak >= max_bad else None


@dataclasses.dataclass
class Stop:
    """Why the loop ended, and how."""

    reason: str = "max steps"
    failed: bool = False
    interrupted: bool = False


class Clock:
    """The run's time: the seconds trained (a resumed run's count on), the share of --max-minutes spent,
    Ctrl-C, and the processes agreeing to stop. Under torchrun the processes agree at log steps only (no
    sync in every step), with rank 0's clock, so that every process uses the same learning rate."""

    def __init__(self, cfg: TrainConfig, d: Dist, device: torch.device, before: float) -> None:
        self.cfg, self.d, self.device, self.before = cfg, d, device, before
        self.t_start = time.perf_counter()
        self.used = 0.0
        self.sigint = False

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.t_start

    def time_used(self, step: int, first: bool) -> float:
        """The share of --max-minutes spent, for the learning rate (read at log steps and the first step)."""
        cfg, d = self.cfg, self.d
        if not cfg.max_minutes:
            return 0.0
        if d.world > 1 and not (first or step % cfg.log_every == 0):
            return self.used
        self.used = self.elapsed() / (cfg.max_minutes * 60)
        if d.world > 1:
            t = torch.tensor([self.used], device=self.device)
            dist.broadcast(t, 0)
            self.used = float(t)
        return self.used

    def seconds_left(self, step: int, step_seconds: float) -> float:
        """Until the last step, or the end of --max-minutes when that comes first."""
        left = (self.cfg.max_steps - step) * step_seconds
        return min(left, self.cfg.max_minutes * 60 - self.elapsed()) if self.cfg.max_minutes else left

    def should_stop(self, step: int) -> Stop | None:
        """Ctrl-C, the time budget or the last step (under torchrun, a stop can come --log-every steps later)."""
        cfg, d = self.cfg, self.d
        if step == cfg.max_steps:
            return Stop()
        if d.world > 1 and step % cfg.log_every:
            return None
        interrupted = self.sigint
        out_of_time = bool(cfg.max_minutes and self.elapsed() >= cfg.max_minutes * 60)
        if d.world > 1:  # every process must agree to stop
            flags = torch.tensor([float(interrupted), float(out_of_time)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            interrupted, out_of_time = bool(flags[0]), bool(flags[1])
        if interrupted:
            return Stop("interrupted", interrupted=True)
        if out_of_time:
            return Stop(f"time limit of {cfg.max_minutes:g} minutes")
        return None

    @contextlib.contextmanager
    def ctrl_c(self) -> Iterator[None]:
        """Ctrl-C finishes the step, then saves and stops (every process gets the terminal's Ctrl-C)."""

        def on_sigint(signum: int, frame: Any) -> None:
            self.sigint = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------------------------
# the run


class Trainer:
    """One run: `__init__` builds or restores everything, `run` loops over `train_step`, `log_step`,
    `validate` and `save` until the steps, the time or the patience run out, or Ctrl-C."""

    def __init__(self, cfg: TrainConfig, overrides: dict[str, Any], d: Dist, device: torch.device,
                 resumed: Resumed | None = None, given: Set[str] | None = None) -> None:
        if cfg.resume and resumed is None:
            resumed = resume(cfg, overrides, None, d.world, d.rank)
        cfg = resumed.cfg if resumed is not None else cfg
        self.d, self.device, self.dtype = d, device, resolve_dtype(cfg.dtype, device)
        self.matmul = set_matmul_precision(device, self.dtype)
        self.data = data = TokenData(cfg.data)
        self.run_dir = resumed.folder.parent if resumed is not None else run_folder(cfg)
        state = resumed.state if resumed is not None else TrainerState()
        if resumed is not None:
            check_same_data(resumed.saved, data.meta, data.train.lengths.tolist(), self.run_dir)
            check_same_step(state.step, d.world, device)
            model, _ = load_model(resumed.folder, "cpu")
        else:
            if (self.run_dir / "last").exists() and d.main:
                console.print(f"[yellow]{self.run_dir} already holds a run; starting over (use --resume to continue "
                              "it)[/]")
            start = None
            if cfg.init_from:  # the source's weights and shape; its tokenizer must be the data's
                if given and "preset" in given:
                    raise UserError("--init-from keeps the model it starts from; leave out --preset.")
                start, tensors, sha = source_model(cfg.init_from, overrides)
                if sha != data.meta["tokenizer_sha256"]:
                    raise UserError(f"{cfg.data} was encoded with another tokenizer than {cfg.init_from}'s; encode "
                                    f"it with 02_train_tokenizer.py --tokenizer {cfg.init_from}.")
            fitted = fit_to_data(cfg, overrides, given, data.train.tokens, data.vocab_size, device, d.world, start)
            for line in fitted.rules if d.main else ():
                console.print(line, highlight=False)
            cfg = fitted.cfg
            if start is not None:
                torch.manual_seed(cfg.seed)
                model = start_model(dataclasses.replace(start, dropout=fitted.overrides.get("dropout") or 0.0), tensors)
                del tensors
            else:
                model = new_model(cfg, fitted.overrides, data.vocab_size)
        self.mcfg: ModelConfig = model.cfg
        if not cfg.lr:  # sized to the width, and saved so: a resumed run sizes it the same way
            cfg = dataclasses.replace(cfg, lr=auto_lr(model.cfg))
        if resumed is not None and d.main:
            resumed.say()
        self.max_steps_asked = cfg.max_steps
        self.rows_per_step, self.accum = accumulation(cfg, model.cfg.block_size, d.world)
        self.tokens_per_step = self.rows_per_step * model.cfg.block_size
        if cfg.max_epochs:  # the step budget in epochs: the schedule then ends where the epochs do
            steps = epoch_steps(cfg.max_epochs, data.train.tokens, self.tokens_per_step)
            if steps < cfg.max_steps:
                cfg = dataclasses.replace(cfg, max_steps=steps)
                if d.main:
                    console.print(f"max steps {steps:,}: {cfg.max_epochs:g} epochs of {data.train.tokens:,} train "
                                  "tokens (--max-epochs)", highlight=False)
        if state.decay_from:  # gone back to the best point: the run ends where that decay does
            end = state.decay_from + state.decay_steps
            if d.main and given and {"max_steps", "max_epochs"} & set(given):
                console.print(f"this run went back to step {state.rewound_to}'s weights at step {state.decay_from}: it "
                              f"ends with that decay, at step {end} (the budget given does not move it)", highlight=False)
            cfg = dataclasses.replace(cfg, max_steps=end)
        self.cfg = cfg
        data.check_context(self.mcfg.block_size)
        model.grad_checkpoint = cfg.grad_checkpoint
        self.raw_model = model.to(device)  # saved and sampled from: never the compiled or DDP wrapper
        self.optimizer = Optimizers(model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.micro_bs = cfg.batch_size
        self.sampler = BatchSampler(data.train, self.mcfg.block_size, cfg.seed)
        # the end scores --eval-tokens (the whole split when it is smaller); evaluations during training a
        # fixed subset sized to the training between them (a resumed run keeps its own, so that its best so far
        # compares with the new scores)
        self.windows = eval_windows(data.val, self.mcfg.block_size, cfg.eval_tokens)
        self.probe_tokens = (state.probe_tokens or cfg.eval_tokens) if resumed is not None else min(
            cfg.eval_tokens, max(EVAL_PROBE_MIN, cfg.eval_every * self.tokens_per_step // EVAL_PROBE_SHARE))
        self.probe = self.windows
        if self.probe_tokens != cfg.eval_tokens:
            self.probe = eval_windows(data.val, self.mcfg.block_size, self.probe_tokens)
            if len(self.probe) == len(self.windows):  # a split smaller than either: all of it, both times
                self.probe = self.windows
        if resumed is not None:
            self._restore(resumed)
        else:
            torch.manual_seed(cfg.seed + d.rank)  # dropout differs per process, weights do not
        self.marker = compile_marker(model, self.micro_bs, self.dtype, cfg.compile_mode)
        self.compiled = compile_plan(cfg, model, device, cfg.max_steps - state.step, self.tokens_per_step,
                                     state.train_seconds / 60, self.marker.exists())
        if device.type == "cpu" and state.cpu_compiled is not None and cfg.compile and cpp_compiler():
            # a resumed CPU run steps as it did before (compiled or eager), so that it logs the same losses
            self.compiled = f"compiled ({cfg.compile_mode}: as before the resume)" if state.cpu_compiled else ""
        self.cuda_graphs = bool(self.compiled) and uses_cuda_graphs(cfg.compile_mode, device)
        if self.cuda_graphs and self.accum > 1:
            raise UserError(f"--compile-mode {cfg.compile_mode} replays CUDA graphs, which overwrite one micro-batch's "
                            f"gradients with the next's, and this run accumulates {self.accum}; use --compile-mode "
                            "default (or max-autotune-no-cudagraphs), or one micro-batch per step.")
        self.compile_unproven = bool(self.compiled)  # a first compiled step that fails falls back to eager
        self.eval_model, self.model = wrap(model, bool(self.compiled), cfg.compile_mode, device, d.world)
        self.eval_unproven = self.eval_model is not model

        # where the run stands: restored when resuming
        self.step = self.start_step = state.step
        self.best, self.best_bpb, self.bad_evals = state.best_val_loss, state.best_val_bpb, state.bad_evals
        self.best_step, self.best_lr, self.lr = state.best_step, state.best_lr, 0.0
        self.decay_from, self.rewound_to, self.decay_steps = state.decay_from, state.rewound_to, state.decay_steps
        self.decay_peak = state.decay_peak
        self.clock = Clock(cfg, d, device, state.train_seconds)
        self.health = Health(device)
        self.loss_sum = torch.zeros((), device=device)  # summed on the device, read at log steps
        self.peak = peak_flops(device)
        self.flops_per_step = model.flops_per_token() * self.tokens_per_step
        self.config_json = run_config(cfg, self.mcfg, data)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tok = load_tokenizer(data.tokenizer_json) if d.main else None
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _trim_metrics(self.metrics_path, self.start_step if resumed is not None else -1)  # a new run: none
            print_header(self)

    def _restore(self, resumed: Resumed) -> None:
        """Optimizer, scaler, batch sampler and RNG streams as the checkpoint left them."""
        folder, state = resumed.folder, resumed.state
        optimizer_state = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optimizer_state, folder)
        if self.scaler.is_enabled() and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.sampler.set_state(state.sampler)
        restore_rng(state, self.d, self.device, self.cfg.seed)

    # checkpoints and records

    def snapshot(self, elapsed: float) -> TrainerState:
        """Where the run stands now (every process joins: each one's RNG state is gathered)."""
        torch_rng, cuda_rng = rng_states(self.device, self.d.world)
        return TrainerState(
            step=self.step, sampler=self.sampler.state(), torch_rng=torch_rng, cuda_rng=cuda_rng,
            scaler=self.scaler.state_dict() or None, best_val_loss=self.best, best_val_bpb=self.best_bpb,
            bad_evals=self.bad_evals, train_seconds=elapsed, tokens_seen=self.step * self.tokens_per_step,
            cpu_compiled=bool(self.compiled) if self.device.type == "cpu" else None, probe_tokens=self.probe_tokens,
            rows_per_step=self.rows_per_step, max_steps_asked=self.max_steps_asked, best_step=self.best_step,
            best_lr=self.best_lr, decay_from=self.decay_from, rewound_to=self.rewound_to, decay_steps=self.decay_steps,
            decay_peak=self.decay_peak)

    def save(self, tag: str, elapsed: float, extra: dict[str, Any] | None = None) -> bool:
        """Write a checkpoint; a failed write (disk full...) is reported and leaves the previous one."""
        state = self.snapshot(elapsed)
        if not self.d.main:
            return True
        last = tag == "last"
        rewindable = tag == "best" and self.cfg.patience > 0 and self.d.world == 1  # `rewind` reads its optimizer
        try:
            save_checkpoint(self.run_dir, tag, self.raw_model, self.config_json | {"step": self.step, **(extra or {})},
                            self.data.tokenizer_json, self.optimizer if last or rewindable else None,
                            state.state_dict() if last else None, extra_files=self.data.tokenizer_files)
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

    def train_step(self, lr: float) -> torch.Tensor:
        """Gradients of one batch, clipped, then the update (skipped when not finite); returns the norm
        before clipping."""
        self.optimizer.set_lr(lr)
        self.lr = lr
        loss = self._gradients(self.sampler.batch(self.rows_per_step, self.d, self.device))
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
        """Gradients of `batch`: a CUDA out-of-memory error halves the micro-batch and retries the same rows;
        a CPU compilation that fails (a broken C++ toolchain...) trains on eagerly."""
        while True:
            try:
                loss = forward_backward(self.model, batch, self.micro_bs, self.device, self.dtype, self.scaler,
                                        self.d.world)
                if self.compile_unproven:  # compiled and ran: the next CPU run of this shape finds it cached
                    self.compile_unproven = False
                    if self.d.main and self.device.type == "cpu":
                        mark_compiled(self.marker)
                return loss
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad()
                if self.cuda_graphs:  # halving would accumulate, which CUDA graphs cannot
                    raise UserError(f"out of GPU memory under --compile-mode {self.cfg.compile_mode}; use a smaller "
                                    "--batch-size, or --compile-mode default (which halves the micro-batch instead)."
                                    ) from None
                self.micro_bs = halve_micro_batch(self.micro_bs, batch.size(0), self.d, self.device, self.step + 1)
            except Exception as e:
                if not self.compile_unproven:
                    raise
                self._compile_failed(e)

    def _compile_failed(self, e: Exception, what: str = "step") -> None:
        """A first compiled step (or evaluation) that fails: that part runs eagerly from now on."""
        first = first_line(e)
        if self.d.world > 1:
            raise UserError(f"the first compiled {what} failed on {self.device} ({first}); rerun with --no-compile.") from None
        if self.d.main:
            then = "training on" if what == "step" else "evaluating"
            console.print(f"[yellow]the first compiled {what} failed on {self.device} ({first}); {then} without "
                          "torch.compile (--no-compile skips the attempt)[/]")
        self.eval_model, self.eval_unproven = self.raw_model, False
        if what == "step":
            self.optimizer.zero_grad()
            self.compiled, self.compile_unproven, self.cuda_graphs = "", False, False
            self.model = self.raw_model

    # what happens between steps

    def log_step(self, lr: float, norm: torch.Tensor, steps: int, seconds: float) -> str | None:
        """The dense log line and metrics record for the last `steps` steps; a stop reason if unhealthy."""
        cfg, d = self.cfg, self.d
        if d.world > 1:  # SUM, then divide: gloo has no AVG before torch 2.7
            dist.all_reduce(self.loss_sum, op=dist.ReduceOp.SUM)
        loss = self.loss_sum.item() / d.world / steps
        self.loss_sum.zero_()
        dt = seconds / steps
        tok_s = self.tokens_per_step / dt
        mfu = self.flops_per_step / dt / (self.peak * d.world) if self.peak else None
        if d.main:
            console.print(
                f"step {self.step:>{len(str(cfg.max_steps))}}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"norm {norm.item():.2f} | {dt * 1000:.0f}ms | {human_count(tok_s)} tok/s | "
                f"mfu {f'{mfu:.1%}' if mfu else '-'} | eta {human_time(self.clock.seconds_left(self.step, dt))}"
            )
        self.log({"step": self.step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm.item(), 4),
                  "ms": round(dt * 1000, 2), "tok_s": round(tok_s), "mfu": mfu})
        return self.health.report(d.world, cfg.max_bad_steps, d.main)

    def validate(self, elapsed: float) -> tuple[Score, bool]:
        """Val loss and bits per byte on the fixed subset (every evaluation scores the same windows, so the
        best checkpoint and the patience compare like with like); saves `best` when better. Returns (score,
        out of patience)."""
        score = self._score(self.probe)
        improved = score.loss < self.best
        if improved:
            self.best, self.best_bpb, self.bad_evals = score.loss, score.bpb, 0
            self.best_step, self.best_lr = self.step, self.lr
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
        while True:
            try:
                score = evaluate(self.eval_model, self.data.val.arrays, windows, self.data.token_bytes,
                                 self.cfg.batch_size, self.device, self.dtype, self.d, unscored=self.data.bos)
                self.eval_unproven = False
                return score
            except Exception as e:  # the compiled evaluation (CUDA) builds its own graph at its first call
                if not self.eval_unproven:
                    raise
                self._compile_failed(e, "evaluation")

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

    # the loop

    def run(self) -> dict[str, Any]:
        cfg, clock = self.cfg, self.clock
        self.model.train()
        clock.t_start = t_log = time.perf_counter()
        step_log = self.step
        stop: Stop | None = None
        last_eval: Score | None = None
        if cfg.init_from and self.step == 0:  # where the source starts, before any step: what training gains
            last_eval, _ = self.validate(clock.elapsed())
            t_log = time.perf_counter()  # the first steps' timings leave it out
        with clock.ctrl_c(), progress_bar(self.d.main, cfg.max_steps, self.step) as bar:
            while self.step < self.cfg.max_steps:
                time_used = clock.time_used(self.step, first=self.step == step_log)
                lr = (decay_lr(self.step, self.decay_from, self.decay_steps, self.decay_peak, cfg) if self.decay_from
                      else lr_at(self.step, cfg, time_used))
                norm = self.train_step(lr)
                bar(self.step, self.cfg.max_steps)

                if self.step % cfg.log_every == 0 or self.step == self.cfg.max_steps:
                    sync(self.device)  # the clock reads the work done, not only the work queued (CUDA, MPS)
                    unhealthy = self.log_step(lr, norm, self.step - step_log, time.perf_counter() - t_log)
                    t_log, step_log = time.perf_counter(), self.step
                    if unhealthy:  # no save: the last good checkpoint stays as it is
                        stop = Stop(unhealthy, failed=True)
                        break

                stop = clock.should_stop(self.step)
                if stop or any(self.step % n == 0 for n in (cfg.eval_every, cfg.save_every or cfg.eval_every)):
                    sync(self.device)  # the steps' queued work is theirs, not the evaluation's or the save's
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
        cfg, elapsed, score, rewound = self.cfg, self.clock.elapsed(), None, False
        wrap_up = stop is not None and not stop.interrupted
        if self.step % cfg.eval_every == 0 or wrap_up:
            score, out_of_patience = self.validate(elapsed)
            # back to the best point only before the budget's end, whose schedule has decayed already; also at a
            # Ctrl-C, so that the resumed run goes on as an uninterrupted one would
            rewound = out_of_patience and (stop is None or stop.interrupted) and self.rewind()
            if out_of_patience and not rewound and (stop is None or stop.reason == Stop().reason):
                again = f", again while decaying from step {self.rewound_to}'s weights" if self.decay_from else ""
                stop = Stop(f"no better val loss in {cfg.patience} evaluations{again}")
                wrap_up = True
            if wrap_up and self.probe is not self.windows:
                score = self.score_whole()
        if self.d.main and (self.step % (cfg.sample_every or cfg.eval_every) == 0 or wrap_up):
            assert self.tok is not None
            console.print(f"[dim]sample:[/] {sample(self.raw_model, self.tok, self.data.meta, self.step)!r}")
        if self.step % (cfg.save_every or cfg.eval_every) == 0 or stop is not None or rewound:
            saved = self.save("last", elapsed)  # after going back: a crash resumes into the decay
            if stop is not None and not saved:
                stop.failed = True
                stop.reason += " (the final checkpoint could not be written)"
        return score, stop

    def rewind(self) -> bool:
        """Out of patience while the learning rate was still high at the best point: back to the best
        checkpoint's weights and optimizer, then a decay of the learning rate over --cooldown's share of the
        steps up to it, so that the kept model is a decayed one. False where it does not (under torchrun, after
        one decay, where the best point had itself decayed, where the decay would not fit in the steps or time
        left, or where best/ is not that point's); the run then stops."""
        cfg, folder = self.cfg, self.run_dir / "best"
        steps = max(1, math.ceil(cfg.cooldown * self.best_step))
        per_step = (self.clock.elapsed() - self.clock.before) / max(self.step - self.start_step, 1)  # evaluations too
        fits = self.step + steps <= cfg.max_steps and (
            not cfg.max_minutes or self.clock.elapsed() + steps * per_step <= cfg.max_minutes * 60)
        if self.d.world > 1 or self.decay_from or self.best_lr < 0.5 * cfg.lr or not fits:
            return False
        if not (folder / "optimizer.pt").exists():
            return False
        saved = read_json(folder / "config.json", "checkpoint config")
        if saved.get("step") != self.best_step or ModelConfig(**saved.get("model", {})) != self.mcfg:
            return False  # its save failed, or it is another run's
        best, _ = load_model(folder, "cpu")  # no second copy on the device
        self.raw_model.load_state_dict(best.state_dict())
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True),
                                       folder)
        self.decay_from, self.rewound_to, self.decay_steps, self.decay_peak = self.step, self.best_step, steps, self.best_lr
        self.cfg = self.clock.cfg = dataclasses.replace(cfg, max_steps=self.step + steps)
        self.bad_evals = 0
        if self.d.main:
            console.print(f"no better val loss in {cfg.patience} evaluations: back to step {self.best_step}'s weights "
                          f"(val loss {self.best:.4f}), decaying the learning rate over {steps} steps (to step "
                          f"{self.cfg.max_steps})", highlight=False)
        return True

    def finish(self, stop: Stop, last_eval: Score | None) -> dict[str, Any]:
        """The summary (and, on the main process, the loss plot, what to do next, and why a model that is no
        better than a unigram model of the train tokens is so)."""
        step = self.step
        if self.decay_from and stop.reason == Stop().reason:
            stop.reason = f"out of patience at step {self.decay_from}, then decayed from the best point (step {self.rewound_to})"
        scored = self.d.main and not stop.interrupted and math.isfinite(self.best)  # a bincount of the train split
        unigram = unigram_baseline(self.data, self.probe) if scored else None
        summary = {
            "run": str(self.run_dir), "steps": step, "stop_reason": stop.reason,
            "best_val_loss": self.best, "best_val_bpb": self.best_bpb,
            "unigram_val_bpb": unigram.bpb if unigram else None,
            "last_val_loss": last_eval.loss if last_eval else None,
            "tokens_seen": step * self.tokens_per_step, "train_seconds": self.clock.elapsed(),
            "params": self.raw_model.num_params(), "device": str(self.device),
            "dtype": dtype_name(self.dtype), "failed": stop.failed, "main": self.d.main,
        }
        if self.d.main:
            _plot(self.metrics_path, self.run_dir / "loss.png")
            say_how_to_resume(stop, step, self.run_dir, self.d.world)
            if unigram and self.best >= unigram.loss:
                advice = no_better_than_unigram(self.run_dir, self.data.train.tokens, self.best_bpb, unigram.bpb)
                console.print(f"[bold yellow]{escape(advice)}[/]", highlight=False)
        return summary


def print_header(t: Trainer) -> None:
    """What the run is: its settings, its model, its data, where and how it trains."""
    cfg, mcfg, data, d = t.cfg, t.mcfg, t.data, t.d
    compiled = f" {t.compiled}" if t.compiled else ""
    console.print(f"[bold]train[/] {dataclasses.asdict(cfg)}")
    console.print(f"[bold]model[/] {dataclasses.asdict(mcfg)}")
    console.print(
        f"{human_count(t.raw_model.num_params())} parameters | {data.folder} ({data.meta['kind']}, vocab "
        f"{data.vocab_size}, train {human_count(data.train.tokens)} / val {human_count(data.val.tokens)} tokens) | "
        f"{t.device} {dtype_name(t.dtype)}{' (tf32 matmuls)' if t.matmul == 'tf32' else ''}{compiled} | "
        f"{d.world} process(es) | {t.tokens_per_step:,} "
        f"tokens/step = {t.rows_per_step} x {mcfg.block_size} ({t.accum} accumulation) | run {t.run_dir}"
        + (f" | resuming at step {t.start_step}" if t.start_step else "")
    )


def halve_micro_batch(micro_bs: int, rows: int, d: Dist, device: torch.device, step: int) -> int:
    """After a CUDA out-of-memory error: half the micro-batch, over twice the accumulation (the same batch),
    said in one line; out of memory at one sequence, or under torchrun (every process would have to agree),
    a stop with advice."""
    if micro_bs == 1 or d.world > 1:
        raise UserError(
            "out of GPU memory" + (" with one sequence per micro-batch" if micro_bs == 1 else " under torchrun")
            + "; use a smaller --batch-size or model, --block-size, or --grad-checkpoint."
        ) from None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if d.main:
        console.print(f"[yellow]out of memory at step {step}: micro-batch {micro_bs} -> {micro_bs // 2}, "
                      f"accumulation {-(-rows // micro_bs)} -> {-(-rows // (micro_bs // 2))} (same batch)[/]")
    return micro_bs // 2


def run_config(cfg: TrainConfig, mcfg: ModelConfig, data: TokenData) -> dict[str, Any]:
    """What config.json says of a run: the model, the resolved training settings, and the token data (what
    a resumed run checks it reads again)."""
    keys = ("kind", "vocab_size", "eot_id", "bos_id", "tags", "tokenizer_sha256", "dataset")  # bos_id: a given tokenizer's
    return {"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(cfg),
            "data": {k: data.meta[k] for k in keys if k in data.meta} | {"folder": str(data.folder), "train_shards": data.train.lengths.tolist(),
                                                       "tag_documents": data.meta.get("tag_documents", {})}}


def sample(model: GPT, tok: Any, meta: dict[str, Any], step: int) -> str:
    """64 tokens from a document start, as the run goes (eval mode: no dropout; eager: 64 tokens do not pay
    for a CUDA graph), seeded by the step."""
    was_training = model.training
    model.eval()
    eot = meta["eot_id"]
    ids = generate(model, [meta.get("bos_id", eot)], 64, Sampling(0.8, top_k=50), eot=eot, seed=step, graph=False)
    model.train(was_training)
    return tok.decode(ids[0], skip_special_tokens=False)


def say_how_to_resume(stop: Stop, step: int, run_dir: Path, world: int) -> None:
    """After Ctrl-C or a failure: the command that resumes the run, on one line a user can copy whole."""
    resume = escape(resume_command(run_dir, world))
    if stop.interrupted:
        console.print(f"[yellow]interrupted at step {step}; saved {escape(str(run_dir))}/last. Resume with: {resume}[/]",
                      soft_wrap=True)
    if stop.failed:
        console.print(f"[bold red]stopped: {stop.reason}. The last good checkpoint is in {escape(str(run_dir))}/last; "
                      f"resume it with a lower --lr or with --dtype fp32: {resume}[/]", soft_wrap=True)


def train(cfg: TrainConfig, overrides: dict[str, Any], given: Set[str] | None = None) -> dict[str, Any]:
    """Train a run, or resume one (`given`: the options the command line gave; see `resume.resumed_config`)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    resumed = resume(cfg, overrides, given, world, rank) if cfg.resume else None
    d, device = init_distributed(resumed.cfg.device if resumed else cfg.device)
    if d.world == 1:
        return Trainer(cfg, overrides, d, device, resumed, given).run()
    trainer = None
    try:
        trainer = Trainer(cfg, overrides, d, device, resumed, given)
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


@contextlib.contextmanager
def progress_bar(main: bool, total: int, done: int) -> Iterator[Any]:
    """A bar on a terminal; in a log file the dense step lines say it all."""
    if not (main and console.is_terminal):
        yield lambda step, total: None
        return
    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task("train", total=total, completed=done)
    with bar:
        yield lambda step, total: bar.update(task, completed=step, total=total)


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
