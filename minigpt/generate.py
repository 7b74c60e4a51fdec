"""Text generation: sampling rules, the fast path, and the plain reference path it is tested against.

Both paths take a batch of rows that share one prompt (several samples at once) and return the new
token ids of each row, stopping a row at <|endoftext|>; `generate_many` batches several prompts on the
fast path, left-padded to one length. Randomness comes from a private generator, so sampling during
training never disturbs the training RNG; both paths draw the same random numbers in the same order,
so with one seed they sample the same tokens.

The fast path (`Decoder`) keeps everything in preallocated tensors: the KV cache, the current token,
its position, the sampled tokens, the done flags. One decode step (model, sampling, bookkeeping) then
has fixed shapes and never waits for the host, so on CUDA it is captured once in a CUDA graph (after
`torch.compile` when asked) and each token costs one graph replay, plus one launch for the random
numbers when sampling. The host reads results back only to stream a token or, every few tokens, to
see whether every row has ended.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import find_checkpoint, latest_run, load_model
from .common import UserError, console
from .model import GPT, KVCache
from .quantize import int8_path
from .tokenizer import load_tokenizer

DONE_CHECK_EVERY = 16  # tokens between the host's looks at the done flags (each look is a device sync)


@dataclass
class Sampling:
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def next_token(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    """One token per row from (rows, vocab) logits.

    `noise` holds Exp(1) random numbers of the logits' shape (unused when greedy): argmax(p / noise) is a
    draw from p (the exponential race, the same trick `torch.multinomial` uses), with no host sync.
    """
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
    assert noise is not None, "sampling needs noise"
    return (logits.softmax(dim=-1) / noise).argmax(dim=-1)


def draw_noise(shape: tuple[int, int], device: torch.device, gen: torch.Generator | None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Exp(1) numbers for `next_token`: the one random draw per generated token, shared by both paths."""
    out = torch.empty(shape, device=device) if out is None else out
    return out.exponential_(generator=gen)


def pad_prompts(prompts: list[list[int]], rows: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """`rows` rows per prompt, in one (rows * prompts, longest) tensor, and each row's first real slot.

    Shorter prompts are left-padded, so every row's next token lands in the same cache slot; the padding
    repeats the row's own first token, which keeps the repetition penalty's set of seen tokens as it is.
    """
    if not prompts or any(not p for p in prompts):
        raise UserError("a prompt is empty; give some text (or start from <|endoftext|>).")
    longest = max(map(len, prompts))
    ids = [[p[0]] * (longest - len(p)) + p for p in prompts for _ in range(rows)]
    first = [longest - len(p) for p in prompts for _ in range(rows)]
    return torch.tensor(ids, dtype=torch.long, device=device), first


def _generator(model: GPT, seed: int | None) -> torch.Generator | None:
    device = next(model.parameters()).device
    return torch.Generator(device=device).manual_seed(seed) if seed is not None else None


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
    idx, _ = pad_prompts([prompt], rows, next(model.parameters()).device)
    gen = _generator(model, seed)
    seen = _seen(idx, model.cfg.vocab_size)
    done = torch.zeros(rows, dtype=torch.bool, device=idx.device)
    out: list[torch.Tensor] = []
    for _ in range(max_new):
        logits = model(idx[:, -model.cfg.block_size :]).logits[:, -1]
        noise = draw_noise(logits.shape, idx.device, gen) if s.temperature > 0 else None
        tok = next_token(logits, s, seen, noise)
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
    graph: bool | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """The fast path: the prompt once into a static KV cache, then one captured step per token.

    `graph` (default: on CUDA) replays the step from a CUDA graph; `compile` runs it through
    `torch.compile` first (worth its start-up time for long or batched generations). When the context
    fills up, the last 3/4 of it is re-encoded into the cache and generation goes on (the reference
    path instead slides one token at a time, so past the context the two may differ). `on_token` gets
    row 0's new token after each step (for streaming; it costs one host sync a token).
    """
    return generate_many(model, [prompt], max_new, s, rows, eot, seed, on_token, graph, compile)[0]


@torch.no_grad()
def generate_many(
    model: GPT,
    prompts: list[list[int]],
    max_new: int,
    s: Sampling,
    rows: int = 1,
    eot: int | None = None,
    seed: int | None = 0,
    on_token: Callable[[int], None] | None = None,
    graph: bool | None = None,
    compile: bool = False,
) -> list[list[list[int]]]:
    """`generate` for several prompts in one batch (`rows` rows each); returns each prompt's rows.

    Prompts of different lengths are left-padded and attention skips the padding (`KVCache.first`),
    so each row's tokens are those it would get alone, up to float rounding (greedy is tested against
    the reference). Random draws differ: one generator serves the whole batch. All rows share the
    context, so a short prompt's row slides its context when the longest prompt's row does.
    """
    device = next(model.parameters()).device
    idx, first = pad_prompts(prompts, rows, device)
    if max_new < 1:
        return [[[] for _ in range(rows)] for _ in prompts]
    decoder = Decoder(model, len(first), max_new, s, eot, _generator(model, seed), graph=graph, compile=compile)
    out = _finish(decoder.run(idx, on_token, first), eot, len(first))
    return [out[i * rows : (i + 1) * rows] for i in range(len(prompts))]


def graph_by_default(device: torch.device) -> bool:
    """Whether decoding replays a CUDA graph unless told otherwise: on CUDA devices, which have them."""
    return device.type == "cuda"


class Decoder:
    """Generation state in preallocated tensors, advanced one token per `step` (see the module doc)."""

    def __init__(
        self, model: GPT, rows: int, max_new: int, s: Sampling, eot: int | None = None,
        gen: torch.Generator | None = None, graph: bool | None = None, compile: bool = False,
    ) -> None:
        p = next(model.parameters())
        device, vocab = p.device, model.cfg.vocab_size
        self.model, self.s, self.eot, self.gen, self.max_new = model, s, eot, gen, max_new
        dtype = model.wte.out_dtype if hasattr(model.wte, "out_dtype") else p.dtype  # int8: the activations' dtype
        self.cache = KVCache(model.cfg, rows, model.cfg.block_size, device, dtype)
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)  # the last sampled token of each row
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # where `tok` goes in the cache
        self.n = torch.zeros((), dtype=torch.long, device=device)  # tokens sampled so far
        self.out = torch.zeros(rows, max_new, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device) if s.repetition_penalty != 1 else None
        self.noise = torch.empty(rows, vocab, device=device) if s.temperature > 0 else None
        self.first = [0] * rows  # each row's first real slot in the prompt rows (left padding), set by `start`
        self.step_fn: Callable[[], None] = self._step
        if compile:
            self.step_fn = torch.compile(self._step, fullgraph=True, dynamic=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph is None:
            graph = graph_by_default(device)
        if graph:
            self.graph = self._capture()

    # the step: everything below runs on the device, in fixed shapes

    def _sample(self, logits: torch.Tensor) -> None:
        tok = next_token(logits, self.s, self.seen, self.noise)
        self.tok.copy_(tok)
        self.out.index_copy_(1, self.n.view(1), tok[:, None])
        self.n.add_(1)
        if self.seen is not None:
            self.seen.scatter_(1, tok[:, None], True)
        if self.eot is not None:
            self.done.logical_or_(tok == self.eot)

    def _step(self) -> None:
        logits = self.model.decode(self.tok, self.pos, self.cache)
        self.pos.add_(1)
        self._sample(logits)

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """Record one step in a CUDA graph (warm-up steps first, on a side stream, as capture requires)."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # also compiles, when compiling
                    self.pos.zero_()  # every warm-up step writes slot 0 of the cache and of `out`: in bounds
                    self.n.zero_()  # whatever the context and max_new (`start` resets them all later)
                    self.step_fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step_fn()
            return graph
        except RuntimeError as e:  # keep generating, without the graph, and say so
            console.print(f"[yellow]CUDA graph capture failed ({str(e).splitlines()[0][:120]}); decoding without it[/]")
            torch.cuda.synchronize()
            return None

    # the host loop

    def start(self, idx: torch.Tensor, first: list[int] | None = None) -> None:
        """A new generation after the prompt rows `idx`: reset the state, encode the prompt (its last
        context's worth) and sample the first token. `first`: each row's first real slot when the rows
        are left-padded (`pad_prompts`)."""
        self.n.zero_()
        self.done.zero_()
        self.first = first or [0] * idx.size(0)
        if self.seen is not None:
            self.seen.zero_().scatter_(1, idx, True)
        self._prefill(idx, self.model.cfg.block_size)

    def _prefill(self, seq: torch.Tensor, keep: int) -> None:
        """Encode the last `keep` slots of `seq` (the prompt rows, then what was sampled) into an empty
        cache and sample the token after them."""
        cut = max(0, seq.size(1) - keep)
        self.cache.pos = 0
        self.cache.set_first([max(0, f - cut) for f in self.first])
        logits = self.model(seq[:, cut:], cache=self.cache, last_only=True).logits[:, -1]
        self.pos.fill_(seq.size(1) - cut)
        self._draw()
        self._sample(logits)

    def _draw(self) -> None:
        if self.noise is not None:
            draw_noise(self.noise.shape, self.noise.device, self.gen, out=self.noise)

    def step(self) -> None:
        self._draw()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step_fn()

    def run(self, idx: torch.Tensor, on_token: Callable[[int], None] | None = None,
            first: list[int] | None = None) -> torch.Tensor:
        """Generate up to `max_new` tokens after the prompt rows `idx` (left-padded: `first`, as for
        `start`); returns (rows, produced)."""
        T = self.model.cfg.block_size
        self.start(idx, first)
        filled = min(idx.size(1), T)
        produced = 1
        while True:
            if on_token is not None:
                on_token(int(self.tok[0]))
            if produced == self.max_new:
                break
            if self.eot is not None and (on_token is not None or produced % DONE_CHECK_EVERY == 0):
                if bool(self.done.all()):
                    break
            if filled == T:  # context full: keep the most recent 3/4 (with the newest token) and carry on
                filled = (3 * T + 3) // 4
                self._prefill(torch.cat([idx, self.out[:, :produced]], dim=1), filled)
            else:
                self.step()
                filled += 1
            produced += 1
        return self.out[:, :produced]


def _seen(idx: torch.Tensor, vocab: int) -> torch.Tensor:
    seen = torch.zeros(idx.size(0), vocab, dtype=torch.bool, device=idx.device)
    return seen.scatter_(1, idx, True)


def _finish(out: list[torch.Tensor] | torch.Tensor, eot: int | None, rows: int) -> list[list[int]]:
    if len(out) == 0:
        return [[] for _ in range(rows)]
    result = (out if isinstance(out, torch.Tensor) else torch.stack(out, dim=1)).tolist()
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
    from .quantize import Int8Embedding, Int8Linear

    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
        if isinstance(model.wte, Int8Embedding):
            model.wte.out_dtype = dtype
        for m in model.modules():
            if isinstance(m, Int8Linear):  # scales in the activation dtype: no cast per matmul per token
                m.scale = m.scale.to(dtype)
    return str(next(model.parameters()).dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
