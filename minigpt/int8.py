"""int8 weight-only layers (symmetric, one scale per output channel) that stand in for a GPT's Linear
layers and its embedding, and the precision a model runs inference in: `quantize.py` converts a model,
`checkpoint.py` loads one.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import GPT, activation_dtype


def set_inference_dtype(model: GPT, dtype: torch.dtype | None) -> str:
    """Run inference in `dtype` (bf16 on GPUs that have it): float weights cast, int8 weights kept,
    and the activations (hence the KV cache) in that dtype. Returns the dtype's short name."""
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
        if isinstance(model.wte, Int8Embedding):
            model.wte.out_dtype = dtype
        for m in model.modules():
            if isinstance(m, Int8Linear):  # scales in the activation dtype: no cast per matmul per token
                m.scale = m.scale.to(dtype)
    name = str(activation_dtype(model)).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q, scale) with w ~= q * scale[:, None] and |error| <= scale / 2."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


class Int8Linear(nn.Module):
    """Two ways to multiply: `dequant` (the reference, and the CUDA path) widens the int8 weight to the
    activation dtype inside the matmul (tensor cores) and scales the outputs; `cpu-dynamic` (set by
    `use_cpu_dynamic`) runs PyTorch's dynamic int8 kernels, which also quantize the activations."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.dynamic: nn.Module | None = None

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


def int8_linears(model: GPT) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every Linear in the blocks (the embedding and head are handled apart)."""
    found = []
    for block in model.blocks:
        found += [(block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "up"), (block.mlp, "down")]
    return found


def to_int8(model: GPT, tensors: dict[str, torch.Tensor]) -> GPT:
    """Swap the model's Linear layers and embedding for int8 modules holding `tensors` (int8 + `.scale`)."""
    names = {id(m): n for n, m in model.named_modules()}
    for parent, attr in int8_linears(model):
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


def int8_matmul(model: GPT, device: torch.device) -> str:
    """Choose and set the int8 matmul kind for `device`; returns its description."""
    if device.type == "cpu":
        return use_cpu_dynamic(model)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.dynamic = None
    return "int8 dequant"
