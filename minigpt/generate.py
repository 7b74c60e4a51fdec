"""Text generation: sampling rules, the KV-cache path, and the plain reference path it is tested against.

Both paths take a batch of rows that share one prompt (several samples at once) and return the new
token ids of each row, stopping a row at <|endoftext|>. Randomness comes from a private generator,
so sampling during training never disturbs the training RNG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import find_checkpoint, latest_run, load_model
from .common import UserError
from .model import GPT, KVCache
from .quantize import int8_path
from .tokenizer import load_tokenizer


@dataclass
class Sampling:
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def next_token(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row from (rows, vocab) logits."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and seen is not None:
        # CTRL-style: make tokens already present less likely, whatever the sign of their logit
        penalised = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > s.top_p  # keep the smallest prefix that reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=gen).squeeze(-1)


def _setup(model: GPT, prompt: list[int], rows: int, seed: int | None) -> tuple[torch.Tensor, torch.Generator | None]:
    if not prompt:
        raise UserError("the prompt is empty; give some text (or start from <|endoftext|>).")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    return torch.tensor([prompt] * rows, dtype=torch.long, device=device), gen


@torch.no_grad()
def generate_reference(
    model: GPT,
    prompt: list[int],
    max_new: int,
    s: Sampling,
    rows: int = 1,
    eot: int | None = None,
    seed: int | None = 0,
    on_token: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Recompute the whole (cropped) sequence for every new token: slow, obviously right."""
    idx, gen = _setup(model, prompt, rows, seed)
    seen = _seen(idx, model.cfg.vocab_size)
    done = torch.zeros(rows, dtype=torch.bool, device=idx.device)
    out: list[torch.Tensor] = []
    for _ in range(max_new):
        logits = model(idx[:, -model.cfg.block_size :]).logits[:, -1]
        tok = next_token(logits, s, seen, gen)
        out.append(tok)
        idx = torch.cat([idx, tok[:, None]], dim=1)
        seen[torch.arange(rows), tok] = True
        if on_token is not None:
            on_token(int(tok[0]))
        if eot is not None:
            done |= tok == eot
            if done.all():
                break
    return _finish(out, eot, rows)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    max_new: int,
    s: Sampling,
    rows: int = 1,
    eot: int | None = None,
    seed: int | None = 0,
    on_token: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """The KV-cache path: the prompt once, then one token at a time.

    When the context fills up, the last 3/4 of it is re-encoded into the cache and generation goes on
    (the reference path instead slides one token at a time, so past the context the two may differ).
    `on_token` gets row 0's new token after each step (for streaming; it costs one host sync a token).
    """
    idx, gen = _setup(model, prompt, rows, seed)
    T = model.cfg.block_size
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, rows, T, idx.device, dtype)
    seen = _seen(idx, model.cfg.vocab_size)
    done = torch.zeros(rows, dtype=torch.bool, device=idx.device)
    logits = model(idx[:, -T:], cache=cache).logits[:, -1]
    out: list[torch.Tensor] = []
    for step in range(max_new):
        tok = next_token(logits, s, seen, gen)
        out.append(tok)
        seen[torch.arange(rows), tok] = True
        if on_token is not None:
            on_token(int(tok[0]))
        if eot is not None:
            done |= tok == eot
            if done.all():
                break
        if step == max_new - 1:
            break
        if cache.pos == T:  # context full: keep the most recent 3/4 and carry on
            idx = torch.cat([idx, torch.stack(out, dim=1)], dim=1)
            cache.pos = 0
            logits = model(idx[:, -(3 * T) // 4 :], cache=cache).logits[:, -1]
        else:
            logits = model(tok[:, None], cache=cache).logits[:, -1]
    return _finish(out, eot, rows)


def _seen(idx: torch.Tensor, vocab: int) -> torch.Tensor:
    seen = torch.zeros(idx.size(0), vocab, dtype=torch.bool, device=idx.device)
    return seen.scatter_(1, idx, True)


def _finish(out: list[torch.Tensor], eot: int | None, rows: int) -> list[list[int]]:
    if not out:
        return [[] for _ in range(rows)]
    result = torch.stack(out, dim=1).tolist()
    if eot is not None:
        result = [r[: r.index(eot)] if eot in r else r for r in result]
    return result


# --------------------------------------------------------------------------------------------------
# loading a run for generation


@dataclass
class Loaded:
    model: GPT
    tokenizer: Any
    config: dict[str, Any]
    folder: Path
    path: str = "fp32"  # how the matmuls run: fp32, bf16, fp16, or the int8 path in use

    @property
    def eot(self) -> int:
        return self.config["data"]["eot_id"]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load_run(run: str | Path, which: str = "best", device: torch.device | str = "cpu", runs_dir: str = "runs") -> Loaded:
    run_dir = Path(run) if run else latest_run(Path(runs_dir))
    if which not in ("best", "last"):
        raise UserError(f"--checkpoint must be best or last, got {which!r}.")
    with contextlib.suppress(UserError):
        folder = find_checkpoint(run_dir, which)
        return _load(folder, device)
    other = "last" if which == "best" else "best"
    return _load(find_checkpoint(run_dir, other), device)  # raises the clear error if neither exists


def _load(folder: Path, device: torch.device | str) -> Loaded:
    model, config = load_model(folder, device)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    if tokenizer.get_vocab_size() != model.cfg.vocab_size:
        raise UserError(
            f"{folder}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model expects "
            f"{model.cfg.vocab_size}; the checkpoint does not belong to this tokenizer."
        )
    model.eval()
    scheme = (config.get("quantization") or {}).get("scheme")
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    path = inference_dtype(model, dtype) if scheme != "fp16" else "fp16"
    if scheme == "int8":
        path = f"{int8_path(model, device)}, {path} activations"
    return Loaded(model, tokenizer, config, folder, path)


def inference_dtype(model: GPT, dtype: torch.dtype | None) -> str:
    """Run inference in `dtype` (bf16 on GPUs that have it): float weights cast, int8 weights kept,
    and the activations (hence the KV cache) in that dtype. Returns the dtype's name."""
    from .quantize import Int8Embedding

    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
        if isinstance(model.wte, Int8Embedding):
            model.wte.out_dtype = dtype
    return str(next(model.parameters()).dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
