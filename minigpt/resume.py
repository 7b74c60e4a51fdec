"""Where a run stands and how it goes on: `TrainerState` (trainer_state.json, saved with every `last`
checkpoint: the step, the batch sampler's generator, every process's RNG streams, the fp16 scaler, the
best val loss so far), and `resume`, which reads a run back with the settings it was saved with.

A resumed run continues with its saved settings. An option given again may change the cadence (the
losses stay those of an uninterrupted run), or the budgets, the device, precision and compilation, and
the optimisation (from there the losses differ, and the log says so); one that would change the batch,
the model or the data stream is refused in one sentence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shlex
import socket
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import find_checkpoint, read_trainer_state
from .config import ModelConfig, TrainConfig
from .data import accumulation, find_tokenized
from .optim import auto_lr
from .utils import Dist, UserError, console, device_of, read_json, resolve_dtype

STATE_VERSION = 3  # 1: before the version was written (read the same way, with the fields it lacks derived); 3: the
# decay after going back to the best point, which an older minigpt would drop


@dataclass
class TrainerState:
    """Everything a resumed run needs beyond the weights, the optimizer and the settings."""

    step: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)  # the batch sampler's generator
    torch_rng: list[list[int]] = field(default_factory=list)  # per process (dropout)
    cuda_rng: list[list[int]] = field(default_factory=list)
    scaler: dict[str, Any] | None = None  # fp16's gradient scaler
    best_val_loss: float = math.inf
    best_val_bpb: float = math.inf
    bad_evals: int = 0  # evaluations since the best, for --patience
    train_seconds: float = 0.0  # for --max-minutes
    tokens_seen: int = 0
    cpu_compiled: bool | None = None  # how a CPU run stepped, so that it steps alike after the resume
    probe_tokens: int | None = None  # the evaluation subset (None: every --eval-tokens window, as before subsets)
    rows_per_step: int | None = None
    max_steps_asked: int | None = None  # --max-steps before --max-epochs cut it
    best_step: int = 0  # where val loss was best, and the learning rate there
    best_lr: float = 0.0
    decay_from: int = 0  # out of patience: the step that went back to the best weights, the step it went back to,
    rewound_to: int = 0  # and the length of the decay from there
    decay_steps: int = 0
    decay_peak: float = 0.0  # the learning rate the decay starts from (best_lr moves on as the decay improves)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        if d.get("version", 1) > STATE_VERSION:
            raise UserError("this run was saved by a newer minigpt; update minigpt to resume it.")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def rows(self, block_size: int) -> int:
        """Sequences per step (a run saved before it was recorded: from the tokens it has seen)."""
        return self.rows_per_step or self.tokens_seen // max(self.step, 1) // block_size


def rng_states(device: torch.device, world: int) -> tuple[list[list[int]], list[list[int]]]:
    """Every process's torch (and CUDA) RNG state, gathered: each resumes its own dropout stream."""
    rng = [torch.get_rng_state()]
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    if world > 1:
        rng, cuda = _gather(rng[0], world), _gather(cuda[0], world) if cuda else []
    return [r.tolist() for r in rng], [r.tolist() for r in cuda]


def restore_rng(state: TrainerState, d: Dist, device: torch.device, seed: int) -> None:
    """This process's streams as saved; a process the run did not have (more processes, the batch kept)
    gets a stream of its own."""
    if d.rank >= len(state.torch_rng):
        torch.manual_seed(seed + d.rank + 7919 * state.step)
        return
    torch.set_rng_state(torch.tensor(state.torch_rng[d.rank], dtype=torch.uint8))
    if device.type == "cuda" and d.rank < len(state.cuda_rng):
        torch.cuda.set_rng_state(torch.tensor(state.cuda_rng[d.rank], dtype=torch.uint8), device)


def _gather(t: torch.Tensor, world: int) -> list[Any]:
    out: list[Any] = [None] * world
    dist.all_gather_object(out, t)
    return out


# --------------------------------------------------------------------------------------------------
# resuming a run

KEEPS_LOSSES = frozenset({"log_every", "eval_every", "eval_tokens", "sample_every", "save_every", "patience",
                          "max_bad_steps", "grad_checkpoint", "data"})  # data: the same tokens at another path
CHANGES_LOSSES = frozenset({"max_steps", "max_minutes", "max_epochs", "device", "dtype", "compile", "compile_mode",
                            "batch_size", "total_batch_tokens", "lr", "muon_lr", "schedule", "warmup_steps",
                            "cooldown", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip",
                            "muon_momentum"})  # the budgets move the schedule's decay; a batch must stay (below)
NAMING = frozenset({"name", "runs_dir", "resume"})  # find the run: never compared
AT_START = frozenset({"fit_data"})
STARTED_FROM = frozenset({"init_from"})  # where the run's weights came from: the saved value stays  # its rules ran when the run began (their outcome is saved): never compared
SAVED_BEFORE = {"schedule": "cosine"}  # a run saved before a setting existed trained with this value of it


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag(name: str, value: Any) -> str:
    """An option as a user types it: `--max-steps 300`, `--lr 0.002`, `--no-compile`, `no --recipe`."""
    if isinstance(value, bool):
        return option(name) if value else "--no-" + option(name)[2:]
    if value == "":
        return "no " + option(name)
    return f"{option(name)} {value:g}" if isinstance(value, float) else f"{option(name)} {value}"


@dataclass
class Resumed:
    """The settings a resumed run goes on with, those the command line changed (name -> (saved, now)), and
    what it resumes from."""

    cfg: TrainConfig
    changed: dict[str, tuple[Any, Any]]
    folder: Path  # the `last` checkpoint
    saved: dict[str, Any]  # its config.json
    state: TrainerState

    @property
    def departs(self) -> bool:
        """A change that makes the losses from here differ from an uninterrupted run's."""
        return bool(self.changed.keys() & CHANGES_LOSSES)

    def describe(self) -> str:
        def value(name: str, v: Any) -> str:
            return flag(name, v) if isinstance(v, bool) else flag(name, v).removeprefix(option(name) + " ")

        return ", ".join(f"{flag(k, a)} -> {value(k, b)}" for k, (a, b) in self.changed.items())

    def say(self) -> None:
        """What the command line changed, and whether the losses will now differ from an uninterrupted run's."""
        if self.changed:
            console.print(f"resuming with the run's saved settings but {self.describe()}", highlight=False)
        if self.departs:
            console.print("[yellow]from here the run differs from an uninterrupted one (a budget moves the "
                          "schedule's decay; precision, compilation and the optimisation change the numbers)[/]",
                          highlight=False)


def run_folder(cfg: TrainConfig) -> Path:
    """The run's folder: <runs-dir>/<name>, the name by default from the token folder and the preset."""
    if cfg.name:
        return Path(cfg.runs_dir) / cfg.name
    folder = find_tokenized(cfg.data)
    return Path(cfg.runs_dir) / f"{folder.parent.name}-{folder.name}-{cfg.preset}"


def resume(cfg: TrainConfig, overrides: dict[str, Any], given: Set[str] | None, world: int, rank: int = 0) -> Resumed:
    """The run's `last` checkpoint and the settings it goes on with (`resumed_config`). Every process reads
    it: under torchrun across nodes, a process that cannot see it says where it runs."""
    run = run_folder(cfg)
    try:
        folder = find_checkpoint(run, "last")
    except UserError as e:
        if world > 1 and not run.is_dir():
            raise UserError(f"process {rank} of {world} (on {socket.gethostname()}) cannot see the run folder {run}; "
                            "a multi-node resume needs the runs folder on shared storage, at the same path on every "
                            "node.") from None
        raise e from None
    state = TrainerState.from_dict(read_trainer_state(folder))
    saved = read_json(folder / "config.json", "checkpoint config")
    return resumed_config(cfg, overrides, given, saved, state, world, run, folder)


def resumed_config(cfg: TrainConfig, overrides: dict[str, Any], given: Set[str] | None, saved: dict[str, Any],
                   state: TrainerState, world: int, run: Path, folder: Path) -> Resumed:
    """The saved settings of `run`, with the options given again (`given`: their names; None, from Python:
    those that differ from TrainConfig's defaults) where they may change; any other option given with
    another value than the run's, and any model option that differs, is refused in one sentence."""
    fields = dataclasses.fields(TrainConfig)
    if given is None:
        given = {f.name for f in fields if getattr(cfg, f.name) != f.default}
    before = SAVED_BEFORE | saved["train"] | {
        "data": saved["data"]["folder"],  # the exact token folder, not a dataset folder that may hold a newer one
        "max_steps": state.max_steps_asked or saved["train"]["max_steps"],  # before --max-epochs cut it
    }
    model = ModelConfig(**saved["model"])
    values: dict[str, Any] = {}
    changed: dict[str, tuple[Any, Any]] = {}
    for f in fields:
        now = getattr(cfg, f.name)
        if f.name in STARTED_FROM:
            values[f.name] = before.get(f.name, now)
            continue
        if f.name in NAMING | AT_START or f.name not in before:
            values[f.name] = now
            continue
        old = before[f.name]
        if f.name == "lr" and not now:
            now = auto_lr(model)  # sized to the width, as it was at the start
        if f.name not in given or now == old or same_meaning(f.name, old, now, values.get("device", "auto")):
            values[f.name] = old
            continue
        if f.name not in KEEPS_LOSSES | CHANGES_LOSSES:
            raise UserError(f"{run} was trained with {flag(f.name, old)}, which a resumed run keeps (it makes the "
                            f"batch, the model or the data stream); leave {option(f.name)} out, or train a new run "
                            "under another --name.")
        values[f.name], changed[f.name] = now, (old, now)
    for name, value in overrides.items():
        if getattr(model, name) != value:
            raise UserError(f"{run} was trained with {flag(name, getattr(model, name))}; a resumed run keeps its "
                            f"model: leave {flag(name, value) if isinstance(value, bool) else option(name)} out, or "
                            "train a new run under another --name.")
    resumed = TrainConfig(**values)
    rows_before = state.rows(model.block_size)
    rows, _ = accumulation(resumed, model.block_size, world)
    if rows != rows_before:
        raise UserError(f"{run} trained on {rows_before} sequences per step and would resume on {rows} "
                        f"(--batch-size {resumed.batch_size} x {world} process(es)); keep the batch: the same "
                        f"--batch-size and processes, or --total-batch-tokens {rows_before * model.block_size}.")
    return Resumed(resumed, changed, folder, saved, state)


def same_meaning(name: str, old: Any, now: Any, device: str = "auto") -> bool:
    """Two spellings of one setting: the data as given at the start (a dataset folder) and as saved (the token
    folder inside it); `--device auto` and the device it picks here; `--dtype auto` and the dtype it picks."""
    if name == "data":
        return Path(now).resolve() in (Path(old).resolve(), Path(old).resolve().parent)
    if name in ("device", "dtype"):
        with contextlib.suppress(UserError):  # a device that is not here (a run saved on a GPU): a change
            if name == "device":
                return device_of(old) == device_of(now)
            return resolve_dtype(old, device_of(device)) == resolve_dtype(now, device_of(device))
    return False


def check_same_step(step: int, world: int, device: torch.device) -> None:
    """Under torchrun every process must resume the same checkpoint: a node that reads a runs folder of its
    own (not the shared one) would resume another step."""
    if world > 1:
        t = torch.tensor([step, -step], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise UserError(f"the processes resumed different steps ({-int(t[1])} to {int(t[0])}): each node read a runs "
                            "folder of its own; a multi-node resume needs the runs folder on shared storage.")


def check_same_data(saved: dict[str, Any], meta: dict[str, Any], train_shards: list[int], run: Path) -> None:
    """A resumed run reads the token data it was trained on: the same tokenizer and train shards."""
    shards = saved["data"].get("train_shards")  # what the batch sampler draws from (runs saved before: unknown)
    if saved["data"]["tokenizer_sha256"] != meta["tokenizer_sha256"] or shards not in (None, train_shards):
        raise UserError(f"run {run} was trained on other token data; resume it on {saved['data']['folder']} "
                        "(leave --data out).")


def resume_command(run_dir: Path, world: int) -> str:
    """The command that resumes `run_dir`: its saved settings come back with it, so naming the run is all it
    takes (--resume first: a paste cut short then fails instead of starting the run over)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = [f"--nnodes={world // per_node}"] if world > per_node else []  # and the rendezvous it started with
    script = ["python"] if world == 1 else ["torchrun", *nodes, f"--nproc_per_node={per_node}"]
    return shlex.join([*script, "03_train.py", "--resume", "--runs-dir", str(run_dir.parent), "--name", run_dir.name])
