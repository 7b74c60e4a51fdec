"""What every part shares: the console, user-facing errors, atomic writes, hashing, formatting, progress,
and the device side (device, precision, autocast, torchrun's processes, peak FLOPs)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import Progress, ProgressColumn

# --------------------------------------------------------------------------------------------------
# output a person reads, on a terminal or in a log file

LOG_WIDTH = 1000  # in a file nothing wraps: a log line stays one line and a table keeps its natural width
RULE_WIDTH = 80


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    # Not a terminal (a log file, a pipe): no colour codes, no wrapping at 80 columns.
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=LOG_WIDTH)


console = _console(stderr=False)
err_console = _console(stderr=True)


def rule(title: str) -> None:
    """A titled separator line: the terminal's width on a terminal, 80 columns in a file."""
    if console.is_terminal:
        console.rule(title)
    else:
        head = f"── {title} "
        console.print(head + "─" * max(3, RULE_WIDTH - len(head)), markup=False)


class PlainProgress:
    """What a progress bar becomes in a log file: a plain line every `every` seconds, no redraws."""

    def __init__(self, unit: str = "", every: float = 10.0) -> None:
        self.unit, self.every = unit, every
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_: Any) -> int:
        self.tasks.append({"description": description, "total": total, "completed": completed, "from": completed,
                           "start": time.perf_counter(), "shown": time.perf_counter()})
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self.tasks[task]["completed"] + advance)

    def update(self, task: int, completed: float | None = None, description: str | None = None, **_: Any) -> None:
        t = self.tasks[task]
        if description is not None:
            t["description"] = description
        if completed is not None:
            t["completed"] = completed
        now = time.perf_counter()
        if now - t["shown"] >= self.every:
            t["shown"] = now
            console.print(self.line(t, now), markup=False)

    def line(self, t: dict[str, Any], now: float) -> str:
        done, total = t["completed"], t["total"]
        rate = (done - t["from"]) / max(now - t["start"], 1e-9)  # this run's speed (a resumed download's too)
        fmt = human_bytes if self.unit == "bytes" else human_count
        share = f" ({done / total:.0%})" if total else ""
        return f"{t['description']}: {fmt(done)}{f' / {fmt(total)}' if total else ''}{share}, {fmt(rate)}/s"


def progress(*columns: str | ProgressColumn, unit: str = "", transient: bool = True) -> Progress | PlainProgress:
    """A rich progress bar on a terminal; periodic plain lines in a log file."""
    if console.is_terminal:
        return Progress(*columns, console=console, transient=transient)
    return PlainProgress(unit)


class UserError(Exception):
    """A mistake the user can fix: shown as one sentence and exit code 2, never as a traceback."""


# --------------------------------------------------------------------------------------------------
# files


UMASK = os.umask(0)  # read once: new files and folders get the permissions open() and mkdir() would
os.umask(UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kw: Any) -> Iterator[BinaryIO]:
    """Write to a temp file beside `path`, fsync, then rename over it.

    A crash (or SIGKILL) at any moment leaves either the old file or the new one, never half of one;
    an exception (disk full, ...) removes the temp file and leaves the old file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.__class__.__name__}); regenerate it.") from None


def output_folder(out: str | Path, run: Path, force: bool, earlier: Callable[[Path], bool], what: str) -> Path:
    """The folder a command may write `what` into (resolved): refused when it is, holds or lies inside the
    run it reads, is a file, the working or home folder, or holds anything but an earlier `what` (which
    only --force replaces): a command that writes beside a run never destroys one."""
    path, source = Path(out).resolve(), run.resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"{out} is a file; give a folder for the {what}.")
    if path == source or source in path.parents or path in source.parents or path in (Path.cwd(), Path.home()):
        raise UserError(f"{out} is, holds or lies inside the run {run}; write the {what} to a folder of its own.")
    if path.exists() and any(path.iterdir()):
        if not earlier(path):
            raise UserError(f"{out} exists, is not empty and is not an earlier minigpt {what}; give a new folder "
                            "(--force replaces only those).")
        if not force:
            raise UserError(f"{out} holds an earlier minigpt {what}; give a new folder, or --force to replace it.")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def human_time(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------------------------------
# device, precision, processes


def resolve_device(name: str) -> torch.device:
    """The device --device names, ready to use: on a CPU freed memory is kept for the next tensors; a GPU
    index becomes the current device, so streams, CUDA graphs and pinned memory live on it, not on GPU 0."""
    device = device_of(name)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def device_of(name: str) -> torch.device:
    """The device --device names (auto: cuda > mps > cpu), checked to be here; nothing set up."""
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
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cuda, cuda:N, mps or cpu.") from None
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from "
                            "0; pick one of them.")
    return device


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (glibc's malloc.h)
_kept = False


def keep_freed_memory() -> bool:
    """Have glibc keep the memory CPU tensors free, for the next ones, instead of returning it to the OS.

    By default glibc serves each allocation over 32 MB with a fresh mmap and unmaps it when freed, so a
    training step's largest tensors (the logits: 2,048 x 8,192 floats, 64 MB, at the pipeline's shape) are
    faulted in page by page at every step (a quarter of the pipeline's step: docs/LOG.md). The cost is a
    process that keeps its peak memory. A no-op (False) where the C library has no mallopt (macOS, Windows).
    """
    global _kept
    if _kept:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # every allocation from the heap, and the heap never trimmed (the int parameter's largest value)
    _kept = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept


def first_line(e: BaseException) -> str:
    """An exception's first line (its type when it has no message), short enough for a one-line report."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def auto_dtype(device_type: str, capability: tuple[int, int] | None) -> torch.dtype:
    """--dtype auto: bf16 on GPUs with bf16 tensor cores (compute capability 8.0 on: Ampere, Ada, Hopper...),
    fp16 with a gradient scaler on Volta and Turing (V100, T4: their bf16 is emulated, and slow), fp32 elsewhere
    (bf16 autocast is slower than fp32 on most CPUs; MPS: ask with --dtype)."""
    if device_type == "cuda" and capability is not None and capability >= (7, 0):
        return torch.bfloat16 if capability >= (8, 0) else torch.float16
    return torch.float32  # and on Pascal and older, whose fp16 is slow (but P100's)


MPS_FP16_TORCH = (2, 8)  # the first torch whose gradient scaler runs on MPS (older ones need float64 there)


def torch_version(version: str = torch.__version__) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def resolve_dtype(name: str, device: torch.device, version: tuple[int, int] | None = None) -> torch.dtype:
    if name == "auto":
        return auto_dtype(device.type, cuda_capability(device))
    if name == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 is not supported on CPU; use bf16 or fp32.")
    if name == "fp16" and device.type == "mps" and (version or torch_version()) < MPS_FP16_TORCH:
        raise UserError(f"--dtype fp16 on MPS needs torch {'.'.join(map(str, MPS_FP16_TORCH))} or newer (its gradient "
                        f"scaler); this is torch {torch.__version__}: use --dtype bf16 or fp32, or upgrade torch.")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def uses_tf32(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> bool:
    """fp32 on a GPU with TF32 tensor cores (Ampere on) runs its matmuls in TF32, as nanoGPT does: several
    times faster, the weights, the loss and the optimizer still in fp32. `--dtype fp32` elsewhere is fp32."""
    return device_type == "cuda" and dtype == torch.float32 and capability is not None and capability >= (8, 0)


def set_matmul_precision(device: torch.device, dtype: torch.dtype) -> str:
    """TF32 matmuls where `uses_tf32` says so; returns what the matmuls run in, for the header line."""
    tf32 = uses_tf32(device.type, dtype, cuda_capability(device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return "tf32" if tf32 else dtype_name(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    """Wait for the device: timings must include the work, not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# Dense bf16 tensor-core peaks (FLOP/s) for MFU, matched against torch.cuda.get_device_name() (the longest
# name that matches wins: an H100 PCIe or NVL card is slower than the SXM one a bare "H100" names).
PEAK_FLOPS = {
    "H200": 989e12, "H200 NVL": 835e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "GH200": 989e12,
    "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12,
    "A10": 125e12, "A6000": 155e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def peak_flops_of(name: str) -> float | None:
    return next((PEAK_FLOPS[k] for k in sorted(PEAK_FLOPS, key=len, reverse=True) if k in name), None)


def peak_flops(device: torch.device) -> float | None:
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


@dataclass
class Dist:
    """This process's place among torchrun's processes (one process: rank 0 of 1)."""

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
    device = device_of(device_name)  # each process takes its own GPU below: no context on another one
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device
