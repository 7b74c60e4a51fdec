"""`minigpt quantize`: int8 weight-only (symmetric, per output channel) or a bf16/fp16 cast of a run,
written as a run folder of its own, then measured against the original (size, val bits per byte, speed).

int8: every Linear weight and the token embedding become int8 with one fp32 scale per output row,
`w ~= q * scale`, |q| <= 127 (the layers are in `model.py`). With tied embeddings the embedding's rows
are the output head's rows, so one int8 matrix serves both.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from .bench import decode_tokens_per_s
from .checkpoint import (
    SCHEMES,
    load_run,
    model_tensors,
    quantization,
    resolve_run,
    save_checkpoint,
)
from .config import QuantizeConfig
from .data import IMPORTED_FILES, TokenData, eval_windows
from .evaluate import evaluate
from .generate import default_mode
from .int8 import int8_linears, quantize_int8
from .model import GPT
from .utils import UserError, console, output_folder, read_json, resolve_device


def int8_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict of `model` with every Linear weight and the embedding as int8 + `.scale`."""
    tensors: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for parent, attr in int8_linears(model):
        q, s = quantize_int8(getattr(parent, attr).weight.detach())
        prefix = f"{names[id(parent)]}.{attr}"
        tensors[f"{prefix}.weight"], tensors[f"{prefix}.scale"] = q, s
    q, s = quantize_int8(model.wte.weight.detach())
    tensors["wte.weight"], tensors["wte.scale"] = q, s
    if not model.cfg.tie_embeddings:
        q, s = quantize_int8(model.lm_head.weight.detach())
        tensors["lm_head.weight"], tensors["lm_head.scale"] = q, s
    for name, p in model.named_parameters():  # norms and anything else stay fp32
        if name not in tensors and not name.startswith(("wte.", "lm_head.")):
            tensors[name] = p.detach().float()
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def earlier_output(folder: Path) -> bool:
    """Whether `folder` is a run that `minigpt quantize` wrote (its `best`, or the copy a crash left), or
    what a quantize killed before its first checkpoint was in place left (`.best.tmp` alone)."""
    if [p.name for p in folder.iterdir()] == [".best.tmp"]:
        return True
    for tag in ("best", ".best.old"):
        with contextlib.suppress(UserError, AttributeError):  # unreadable, or not a JSON object
            if read_json(folder / tag / "config.json", "checkpoint config").get("quantization"):
                return True
    return False


def quantize_run(cfg: QuantizeConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    run_dir = resolve_run(cfg.run, cfg.runs_dir)
    src = load_run(run_dir, cfg.checkpoint, "cpu")
    existing = quantization(src.config)
    if existing != "none":
        same = "already quantized to " + existing if existing == cfg.to else f"quantized ({existing})"
        raise UserError(f"{run_dir} is {same}; quantize the original run instead.")
    out_dir = output_folder(cfg.out or run_dir.with_name(f"{run_dir.name}-{cfg.to}"), run_dir, cfg.force,
                            earlier_output, "quantize output")
    if cfg.to == "int8":
        tensors = int8_tensors(src.model)
        info = {"scheme": "int8", "weights": "int8, symmetric, per output channel", "scales": "float32, one per row",
                "quantized": sorted(k.removesuffix(".scale") for k in tensors if k.endswith(".scale"))}
    else:
        tensors = {k: v.to(SCHEMES[cfg.to]) for k, v in model_tensors(src.model).items()}
        info = {"scheme": cfg.to}
    # the source's val figures are not this run's: they stay with the source (quantize measures the new ones)
    config = {k: v for k, v in src.config.items() if k not in ("format_version", "val_loss", "val_bpb")}
    config["quantization"] = info | {"source": str(src.folder), "source_step": src.config.get("step")}
    kept = [src.folder / n for n in IMPORTED_FILES if (src.folder / n).exists()]  # an imported model's own files
    save_checkpoint(out_dir, "best", src.model, config, src.folder / "tokenizer.json", tensors=tensors, extra_files=kept)

    folder = src.config["data"].get("folder")  # an imported model has no val split here: size and speed only
    data = TokenData(folder) if folder else None
    before = load_run(run_dir, cfg.checkpoint, device)
    after = load_run(out_dir, "best", device)
    block = before.model.cfg.block_size
    windows = eval_windows(data.val, block, cfg.eval_tokens) if data else []
    prompt = [before.bos, *before.encode("The")][:8]
    report: dict[str, Any] = {"run": str(run_dir), "out": str(out_dir), "to": cfg.to, "device": str(device),
                              "matmul": after.matmul}
    for label, loaded in (("before", before), ("after", after)):
        with console.status(f"measuring {label}..."):
            score = evaluate(loaded.model, data.val.arrays, windows, data.token_bytes, 16, device, torch.float32,
                             unscored=data.bos) \
                if data else None
            mode = default_mode(device)
            speed = {rows: decode_tokens_per_s(loaded.model, prompt, cfg.new_tokens, rows, mode) for rows in (1, 32)}
        size = (loaded.folder / "model.safetensors").stat().st_size
        report["val_tokens"] = score.tokens if score else 0
        report[label] = {"bytes": size, "val_loss": score.loss if score else None, "val_bpb": score.bpb if score else None,
                         "decode_batch1_tokens_per_s": speed[1], "decode_batch32_tokens_per_s": speed[32],
                         "matmul": loaded.matmul}
    b, a = report["before"], report["after"]
    report["size_ratio"] = a["bytes"] / b["bytes"]
    report["val_bpb_change_pct"] = 100 * (a["val_bpb"] - b["val_bpb"]) / b["val_bpb"] if data else None
    return report
