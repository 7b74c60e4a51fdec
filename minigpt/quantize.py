"""Quantized models: int8 weight-only (symmetric, per output channel) and bf16/fp16 casts.

int8: every Linear weight and the token embedding become int8 with one fp32 scale per output row,
`w ~= q * scale`, |q| <= 127. The embedding's rows are the output head's rows when they are tied, so
one int8 matrix serves both. Matmuls run one of two ways, and the run says which:
- `dequant` (the reference, and the CUDA path): the int8 weight is widened to the activation dtype
  for the matmul, so the product runs on the tensor cores, and the output is scaled per channel;
- `cpu-dynamic` (CPU, when PyTorch still ships it): PyTorch's dynamic int8 linear (fbgemm), which
  also quantizes the activations per row batch; faster than fp32 on CPU at every batch size here.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import GPT

SCHEMES = {"int8": torch.int8, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q, scale) with w ~= q * scale[:, None] and |error| <= scale / 2."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.dynamic: nn.Module | None = None  # set by use_cpu_dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic is not None:
            return self.dynamic(x.float()).to(x.dtype)
        # The scale is per output channel, so it applies to the product's N outputs rather than the N x K
        # weights: one small multiply instead of a full scaled copy of the matrix (and the cast alone is
        # what torch.compile can fold into the matmul's load).
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)


class Int8Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.out_dtype = torch.float32  # the activation dtype of the whole model follows from this

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return (self.weight[idx].float() * self.scale[idx][..., None]).to(self.out_dtype)


def _linears(model: GPT) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every Linear that becomes int8, the output head last."""
    found = []
    for block in model.blocks:
        found += [(block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "up"), (block.mlp, "down")]
    return found


def int8_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict of `model` with every Linear weight and the embedding as int8 + `.scale`."""
    tensors: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for parent, attr in _linears(model):
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


def to_int8_model(model: GPT, tensors: dict[str, torch.Tensor]) -> GPT:
    """Swap the model's Linear layers and embedding for int8 modules holding `tensors`."""
    names = {id(m): n for n, m in model.named_modules()}
    for parent, attr in _linears(model):
        prefix = f"{names[id(parent)]}.{attr}"
        setattr(parent, attr, Int8Linear(tensors[f"{prefix}.weight"], tensors[f"{prefix}.scale"]))
    model.wte = Int8Embedding(tensors["wte.weight"], tensors["wte.scale"])
    if model.cfg.tie_embeddings:  # the head reads the same int8 rows as the embedding
        model.lm_head = Int8Linear(model.wte.weight, model.wte.scale)
    else:
        model.lm_head = Int8Linear(tensors["lm_head.weight"], tensors["lm_head.scale"])
    rest = {k: v for k, v in tensors.items() if k.endswith(".weight") and "norm" in k}
    missing = [k for k, _ in model.named_parameters() if k not in rest]
    if missing:
        raise KeyError(f"int8 checkpoint lacks {missing[:3]}")
    model.load_state_dict(rest, strict=False)
    return model


def use_cpu_dynamic(model: GPT) -> str:
    """On CPU, run the int8 linears through PyTorch's dynamic int8 kernels when they exist."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization warns that it is deprecated
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

            for module in model.modules():
                if isinstance(module, Int8Linear):
                    out_f, in_f = module.weight.shape
                    dyn = DynamicLinear(in_f, out_f, bias_=False, dtype=torch.qint8)
                    # our exact int8 values, re-expressed as a per-channel quantized tensor
                    qw = torch.quantize_per_channel(
                        dequantize(module.weight, module.scale), module.scale.double(),
                        torch.zeros(out_f, dtype=torch.long), 0, torch.qint8,
                    )
                    dyn.set_weight_bias(qw, None)
                    module.dynamic = dyn
        return "int8 cpu-dynamic"
    except (ImportError, RuntimeError, AttributeError):
        return "int8 dequant"


def int8_path(model: GPT, device: torch.device) -> str:
    """Choose and set the int8 matmul path for `device`; returns its description."""
    if device.type == "cpu":
        return use_cpu_dynamic(model)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.dynamic = None
    return "int8 dequant"


def describe(config: dict[str, Any]) -> str:
    q = config.get("quantization")
    return "none" if not q else q["scheme"]


# --------------------------------------------------------------------------------------------------
# `minigpt quantize`: write the quantized run folder, then measure it against the original


def quantize_run(cfg: Any) -> dict[str, Any]:
    # imported here: checkpoint and generate import this module
    from pathlib import Path

    from .bench import decode_tokens_per_s, default_path
    from .checkpoint import latest_run, model_tensors, save_checkpoint
    from .common import UserError, console
    from .data import TokenData, eval_windows
    from .generate import load_run
    from .train import Dist, evaluate, resolve_device

    device = resolve_device(cfg.device)
    run_dir = Path(cfg.run) if cfg.run else latest_run(Path("runs"))
    src = load_run(run_dir, cfg.checkpoint, "cpu")
    existing = describe(src.config)
    if existing != "none":
        same = "already quantized to " + existing if existing == cfg.to else f"quantized ({existing})"
        raise UserError(f"{run_dir} is {same}; quantize the original run instead.")
    out_dir = Path(cfg.out) if cfg.out else run_dir.with_name(f"{run_dir.name}-{cfg.to}")
    if cfg.to == "int8":
        tensors = int8_tensors(src.model)
        info = {"scheme": "int8", "weights": "int8, symmetric, per output channel", "scales": "float32, one per row",
                "quantized": sorted(k.removesuffix(".scale") for k in tensors if k.endswith(".scale"))}
    else:
        tensors = {k: v.to(SCHEMES[cfg.to]) for k, v in model_tensors(src.model).items()}
        info = {"scheme": cfg.to}
    config = {k: v for k, v in src.config.items() if k != "format_version"}
    config["quantization"] = info | {"source": str(src.folder), "source_step": src.config.get("step")}
    save_checkpoint(out_dir, "best", src.model, config, src.folder / "tokenizer.json", tensors=tensors)

    data = TokenData(src.config["data"]["folder"])
    before = load_run(run_dir, cfg.checkpoint, device)
    after = load_run(out_dir, "best", device)
    block = before.model.cfg.block_size
    windows = eval_windows(data.val, block, cfg.eval_tokens)
    prompt = [before.eot, *before.encode("The")][:8]
    report: dict[str, Any] = {"run": str(run_dir), "out": str(out_dir), "to": cfg.to, "device": str(device),
                              "path": after.path, "val_tokens": len(windows) * block}
    for label, loaded in (("before", before), ("after", after)):
        with console.status(f"measuring {label}..."):
            loss, bpb = evaluate(loaded.model, data, windows, block, 16, device, torch.float32, Dist())
            path = default_path(device)
            speed = {rows: decode_tokens_per_s(loaded.model, prompt, cfg.new_tokens, rows, device, path) for rows in (1, 32)}
        size = (loaded.folder / "model.safetensors").stat().st_size
        report[label] = {"bytes": size, "val_loss": loss, "val_bpb": bpb, "decode_batch1_tokens_per_s": speed[1],
                         "decode_batch32_tokens_per_s": speed[32], "path": loaded.path}
    b, a = report["before"], report["after"]
    report["size_ratio"] = a["bytes"] / b["bytes"]
    report["val_bpb_change_pct"] = 100 * (a["val_bpb"] - b["val_bpb"]) / b["val_bpb"]
    return report
