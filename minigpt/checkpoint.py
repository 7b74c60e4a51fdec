"""Checkpoints: a folder per checkpoint (`last`, `best`) inside a run folder, written atomically.

Layout of `runs/<name>/<tag>/`: model.safetensors, config.json, tokenizer.json, and for `last` also
optimizer.pt and trainer_state.json; manifest.json (size and sha256 of each file) is written last.
A checkpoint is built in `.<tag>.tmp/`, then swapped in with two renames; if a crash falls between
them, `.<tag>.old/` still holds the previous one and loading falls back to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .common import UserError, atomic_open, fsync_dir, read_json, sha256_file, write_json
from .config import ModelConfig
from .model import GPT
from .quantize import SCHEMES, to_int8_model

FORMAT_VERSION = 1


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict to save: from the uncompiled module, the tied head stored once (as wte)."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(
    run_dir: Path,
    tag: str,
    model: GPT,
    config: dict[str, Any],
    tokenizer_json: Path,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `tag` of `model` (or of prepared `tensors`, e.g. quantized ones) atomically."""
    final, tmp, old = run_dir / tag, run_dir / f".{tag}.tmp", run_dir / f".{tag}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors if tensors is not None else model_tensors(model), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        write_json(tmp / "config.json", {"format_version": FORMAT_VERSION, **config})
        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        if optimizer is not None:
            with atomic_open(tmp / "optimizer.pt", "wb") as f:
                torch.save(optimizer.state_dict(), f)
        if trainer_state is not None:
            write_json(tmp / "trainer_state.json", trainer_state)
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:  # everything on disk before the manifest says it is complete
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        manifest = {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in files}
        write_json(tmp / "manifest.json", manifest)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def verify(folder: Path, full: bool = True) -> str | None:
    """None if the checkpoint folder is complete and its files match the manifest, else why not."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable manifest.json (an unfinished write)"
    for name, info in manifest.items():
        path = folder / name
        if not path.exists() or path.stat().st_size != info["bytes"]:
            return f"{name} is missing or truncated"
        if full and sha256_file(path) != info["sha256"]:
            return f"{name} does not match its checksum"
    return None


def find_checkpoint(run_dir: Path, tag: str) -> Path:
    """The folder of a valid checkpoint `tag` in `run_dir`, falling back to the copy a crash left."""
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; check the path or train one with 03_train.py.")
    problems = []
    for folder in (run_dir / tag, run_dir / f".{tag}.old"):
        if folder.is_dir():
            why = verify(folder)
            if why is None:
                return folder
            problems.append(f"{folder.name}: {why}")
    if problems:
        raise UserError(f"checkpoint {tag} in {run_dir} is damaged ({'; '.join(problems)}); use another checkpoint or retrain.")
    raise UserError(f"{run_dir} has no '{tag}' checkpoint; train with 03_train.py first.")


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[GPT, dict[str, Any]]:
    """A model and its config.json from a checkpoint folder (already verified)."""
    config = read_json(folder / "config.json", "checkpoint config")
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{folder} was written by another minigpt version; it cannot be loaded.")
    cfg = ModelConfig(**config["model"])
    try:
        tensors = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{folder}/model.safetensors cannot be read ({e}); use another checkpoint.") from None
    emb = tensors.get("wte.weight")
    if emb is None or emb.shape[0] != cfg.vocab_size:
        raise UserError(f"{folder}: the weights do not match the vocab size {cfg.vocab_size} in config.json.")
    model = GPT(cfg)
    scheme = (config.get("quantization") or {}).get("scheme")
    if scheme == "int8":
        try:
            to_int8_model(model, tensors)
        except KeyError:
            raise UserError(f"{folder}: the int8 weights do not fit the model in config.json; the checkpoint is damaged.") from None
        return model.to(device), config
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
        raise UserError(f"{folder}: the weights do not fit the model in config.json; the checkpoint is damaged.")
    if scheme in SCHEMES:  # bf16 / fp16: the whole model in that dtype
        model.to(SCHEMES[scheme])
    return model.to(device), config


def latest_run(runs_dir: Path) -> Path:
    runs = []
    if runs_dir.is_dir():
        runs = [p for p in runs_dir.iterdir() if (p / "last").is_dir() or (p / "best").is_dir()]
    if not runs:
        raise UserError(f"no runs in {runs_dir}/; train one with 03_train.py (or pass --run).")
    return max(runs, key=lambda p: p.stat().st_mtime)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    with contextlib.suppress(FileNotFoundError):
        return read_json(folder / "trainer_state.json", "trainer state")
    raise UserError(f"{folder} has no trainer_state.json; only a 'last' checkpoint can be resumed.")
