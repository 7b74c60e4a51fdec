"""When training compiles its step (torch.compile): always on CUDA; on CPU only where a first compilation
(inductor writes C++) repays itself within the run, judged from the model's FLOPs and whether this shape
compiled on this machine before. Measurements behind the constants: docs/LOG.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .config import TrainConfig
from .model import GPT
from .utils import human_time

CPU_COMPILE_MINUTES = 3.0  # the training after which a first compilation has repaid itself (docs/LOG.md)...
CPU_COMPILE_MINUTES_CACHED = 0.5  # ...or one from inductor's cache, which takes seconds
CPU_COMPILE_HEAD_SHARE = 1 / 3  # above this share of the step's FLOPs in the output head, compiling gains little
CPU_EAGER_FLOPS = 50e9  # eager training FLOP/s of 2 cores, to size a run that has no time budget


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


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether a compiled step replays CUDA graphs (reduce-overhead and max-autotune do, on CUDA): a replay
    reuses its output memory, so the gradients of one micro-batch would not survive the next."""
    return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


def mark_compiled(marker: Path) -> None:
    """Note beside inductor's cache that this shape compiled here: a note for later runs, never a reason to
    stop this one."""
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


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
