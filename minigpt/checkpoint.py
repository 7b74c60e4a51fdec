"""Checkpoints and runs: a folder per checkpoint (`last`, `best`) inside a run folder, written atomically,
verified and loaded (quantized runs included).

Layout of `runs/<name>/<tag>/`: model.safetensors, config.json, tokenizer.json, and for `last` also
optimizer.pt and trainer_state.json; manifest.json (size and sha256 of every other file) is written
last. A checkpoint is built in `.<tag>.tmp/`, then swapped in with two renames (`<tag>` -> `.<tag>.old`,
`.<tag>.tmp` -> `<tag>`). A crash between them leaves `.<tag>.old` as the only complete copy: loading
falls back to it, and the next save keeps it until the new `<tag>` is in place. So at every moment
`<tag>` or `.<tag>.old` holds a complete, verified checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .config import CHECKPOINTS, ModelConfig
from .data import load_tokenizer, parse_tag, tag_ids_of, tag_token
from .int8 import int8_matmul, set_inference_dtype, to_int8
from .model import GPT, rotary_tables
from .utils import (
    UserError,
    atomic_open,
    auto_dtype,
    cuda_capability,
    err_console,
    fsync_dir,
    read_json,
    sha256_file,
    write_json,
)

FORMAT_VERSION = 1
REQUIRED = {"model.safetensors", "config.json", "tokenizer.json"}  # in every checkpoint folder
SCHEMES = {"int8": torch.int8, "bf16": torch.bfloat16, "fp16": torch.float16}  # quantized runs


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict to save: from the uncompiled module, the tied head stored once (as wte)."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def save_checkpoint(
    run_dir: Path,
    tag: str,
    model: GPT,
    config: dict[str, Any],
    tokenizer_json: Path,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    extra_files: Sequence[Path] = (),
) -> Path:
    """Write checkpoint `tag` of `model` (or of prepared `tensors`, e.g. quantized ones) atomically, with
    copies of `extra_files` (an imported model's tokenizer_config.json...) under the manifest too."""
    final, tmp, old = run_dir / tag, run_dir / f".{tag}.tmp", run_dir / f".{tag}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors if tensors is not None else model_tensors(model), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        write_json(tmp / "config.json", {"format_version": FORMAT_VERSION, **config})
        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        for path in extra_files:
            shutil.copyfile(path, tmp / path.name)
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
    if final.exists():  # the current copy becomes the fallback...
        shutil.rmtree(old, ignore_errors=True)
        _rename(final, old)
        fsync_dir(run_dir)  # on disk before the new copy takes its name
    # ...but with no current copy (a crash fell between these two renames last time) `old` is the only
    # complete checkpoint: it stays until the new one is in place.
    _rename(tmp, final)
    fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def verify(folder: Path) -> str | None:
    """None if the checkpoint folder is complete and its files match the manifest, else why not."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable manifest.json (an unfinished write)"
    for name, info in manifest.items():
        path = folder / name
        if not path.exists() or path.stat().st_size != info["bytes"]:
            return f"{name} is missing or truncated"
        if sha256_file(path) != info["sha256"]:
            return f"{name} does not match its checksum"
    # A manifest is written last and lists every file: one that misses a file was written too early.
    unlisted = sorted(p.name for p in folder.iterdir()
                      if p.name not in manifest and p.name != "manifest.json" and not p.name.startswith("."))
    missing = sorted(REQUIRED - manifest.keys())
    if unlisted or missing:
        return f"the manifest does not list {', '.join(unlisted + missing)}"
    return None


def has_checkpoint(run_dir: Path, tag: str) -> bool:
    """Whether the run has checkpoint `tag` at all (intact or not), counting a crash's fallback copy."""
    return (run_dir / tag).is_dir() or (run_dir / f".{tag}.old").is_dir()


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
    scheme = quantization(config)
    if scheme == "int8":
        model = GPT(cfg)
        try:
            to_int8(model, tensors)
        except KeyError:
            raise UserError(f"{folder}: the int8 weights do not fit the model in config.json; the checkpoint is damaged.") from None
        return model.to(device), config
    with torch.device("meta"):
        model = GPT(cfg)  # nothing allocated or initialised: the file's tensors become the weights (one copy in memory)
    shapes = {k: v.shape for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    if tensors.keys() != shapes.keys() or any(tensors[k].shape != shape for k, shape in shapes.items()):
        raise UserError(f"{folder}: the weights do not fit the model in config.json; the checkpoint is damaged.")
    dtype = SCHEMES.get(scheme, torch.float32)  # a bf16 / fp16 copy stays so; anything else (a bf16 import) is fp32
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # assigning replaced the shared parameter
    model.cos, model.sin = rotary_tables(cfg, cfg.block_size)  # buffers derived from the config, not saved
    return model.to(device), config


def quantization(config: dict[str, Any]) -> str:
    """The run's quantization scheme (int8, bf16, fp16) or 'none'."""
    q = config.get("quantization")
    return q["scheme"] if q else "none"


def latest_run(runs_dir: Path) -> Path:
    runs = []
    if runs_dir.is_dir():
        runs = [p for p in runs_dir.iterdir() if has_checkpoint(p, "last") or has_checkpoint(p, "best")]
    if not runs:
        raise UserError(f"no runs in {runs_dir}/; train one with 03_train.py (or pass --run).")
    return max(runs, key=lambda p: p.stat().st_mtime)


def resolve_run(run: str | Path, runs_dir: str | Path = "runs") -> Path:
    """The run folder `run` names: a path, else a name under `runs_dir`; no name: the newest run there."""
    if not run:
        return latest_run(Path(runs_dir))
    path = Path(run)
    if not path.exists() and len(path.parts) == 1 and (Path(runs_dir) / path).is_dir():
        return Path(runs_dir) / path
    return path


def read_trainer_state(folder: Path) -> dict[str, Any]:
    with contextlib.suppress(FileNotFoundError):
        return read_json(folder / "trainer_state.json", "trainer state")
    raise UserError(f"{folder} has no trainer_state.json; only a 'last' checkpoint can be resumed.")


# --------------------------------------------------------------------------------------------------
# a run, ready for inference


@dataclass
class Loaded:
    model: GPT
    tokenizer: Tokenizer
    config: dict[str, Any]
    folder: Path
    matmul: str = "fp32"  # how the matmuls run: fp32, bf16, fp16, or the int8 kind in use

    @property
    def eot(self) -> int:
        return self.config["data"]["eot_id"]

    @property
    def bos(self) -> int:
        """The document start: an imported model's BOS, else the end-of-text token, which starts documents too."""
        return self.config["data"].get("bos_id", self.eot)

    @property
    def tags(self) -> dict[str, int]:
        """The tag tokens the run was trained with (`<|field=value|>` -> id)."""
        return self.config["data"].get("tags") or {}

    def known_tags(self) -> str:
        """The run's tags as `field=value` words, for messages."""
        return ", ".join("=".join(parse_tag(t)) for t in sorted(self.tags)) or "none (it was trained without tags)"

    def prompt(self, text: str, tags: dict[str, str] | None = None) -> tuple[list[int], int]:
        """A document start as training saw one: <|endoftext|> (or BOS), the tag tokens in field order, then the text,
        whose start is cut if the whole would not leave room for a new token in the context. Returns the
        ids and how many text tokens were cut."""
        tags = tags or {}
        unknown = [f"{k}={v}" for k, v in sorted(tags.items()) if tag_token(k, v) not in self.tags]
        if unknown:
            raise UserError(f"{self.folder.parent} knows no tag {', '.join(unknown)}; it knows {self.known_tags()}.")
        head = [self.bos, *tag_ids_of(tags, self.tags)]
        ids = self.encode(text)
        room = max(self.model.cfg.block_size - 1 - len(head), 0)
        cut = max(len(ids) - room, 0)
        return head + ids[cut:], cut

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load_run(run: str | Path, which: str = "best", device: torch.device | str = "cpu", runs_dir: str = "runs",
             cast: bool = True) -> Loaded:
    """A run's checkpoint `which`, ready for inference on `device`: in bf16 on GPUs that have it (`cast`),
    else in the checkpoint's own precision (what training evaluates, under autocast).

    `best` falls back to `last` only when the run has no `best` at all (say, stopped before its first
    evaluation), and says so; a damaged checkpoint is an error, never silently replaced by another.
    """
    run_dir = resolve_run(run, runs_dir)
    if which not in CHECKPOINTS:
        raise UserError(f"--checkpoint must be best or last, got {which!r}.")
    if which == "best" and run_dir.is_dir() and not has_checkpoint(run_dir, "best") and has_checkpoint(run_dir, "last"):
        err_console.print(f"[yellow]{run_dir} has no 'best' checkpoint (no evaluation yet); using 'last'[/]")
        which = "last"
    folder = find_checkpoint(run_dir, which)
    model, config = load_model(folder, device)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    if tokenizer.get_vocab_size() != model.cfg.vocab_size:
        raise UserError(
            f"{folder}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model expects "
            f"{model.cfg.vocab_size}; the checkpoint does not belong to this tokenizer."
        )
    model.eval()
    scheme = quantization(config)
    device = torch.device(device)
    native = auto_dtype(device.type, cuda_capability(device)) == torch.bfloat16  # emulated bf16 (V100, T4) is slow
    bf16 = torch.bfloat16 if native else None
    matmul = set_inference_dtype(model, bf16 if scheme != "fp16" and cast else None)  # an fp16 run stays fp16
    if scheme == "int8":
        matmul = f"{int8_matmul(model, device)}, {matmul} activations"
    return Loaded(model, tokenizer, config, folder, matmul)


TRAIN_BYTES_PER_WEIGHT = 16  # fp32 weights, their gradients and AdamW's two moments (bf16 autocast keeps fp32 weights)


def memory(model: GPT) -> dict[str, int]:
    """The bytes a model's weights take as loaded, and what training it with AdamW needs before activations."""
    stored = {t.data_ptr(): t for t in model.state_dict().values() if isinstance(t, torch.Tensor)}  # a tie once
    weights = sum(t.numel() * t.element_size() for t in stored.values())
    params = model.num_params()
    return {"weights_bytes": weights, "train_bytes_per_weight": TRAIN_BYTES_PER_WEIGHT,
            "train_bytes": TRAIN_BYTES_PER_WEIGHT * params}


def run_info(loaded: Loaded) -> dict[str, Any]:
    """What a run is: model shape and size, tokenizer, tags and their documents, training, val figures
    (a quantized run's own are not known: its source's are under `quantization_source`), files."""
    config, run_dir = loaded.config, loaded.folder.parent
    data = config.get("data", {})
    counts = data.get("tag_documents") or {}
    tags: dict[str, dict[str, int | None]] = {}
    for token in sorted(loaded.tags):
        field, value = parse_tag(token)
        tags.setdefault(field, {})[value] = counts.get(token)
    best_config: dict[str, Any] = {}
    with contextlib.suppress(UserError):  # no best (yet), or unreadable: no val figures to show
        best_config = read_json(run_dir / "best" / "config.json", "checkpoint config")
    train = config.get("train", {})
    return {
        "run": str(run_dir), "checkpoint": loaded.folder.name, "step": config.get("step"),
        "quantization": quantization(config), "matmul": loaded.matmul,
        "model": config["model"], "parameters": loaded.model.num_params(),
        "tokenizer": {"kind": data.get("kind"), "vocab_size": data.get("vocab_size"),
                      "sha256": data.get("tokenizer_sha256")},
        "tags": tags,
        "train": {"steps": config.get("step"), "max_steps": train.get("max_steps"), "preset": train.get("preset"),
                  "recipe": train.get("recipe") or None, "data": data.get("folder"), "dataset": data.get("dataset")},
        "val_loss": best_config.get("val_loss"), "val_bpb": best_config.get("val_bpb"),
        "quantization_source": config.get("quantization", {}).get("source"),
        "source": config.get("source"),  # an imported model's folder
        "memory": memory(loaded.model),
        "files": {p.name: p.stat().st_size for p in sorted(loaded.folder.iterdir()) if p.is_file()},
    }

