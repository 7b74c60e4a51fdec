"""Text generation: the fast path for a fixed batch, and the plain reference path it is tested against.
The sampling rules and the row-slide rule are the engine's (`minigpt/engine.py`), shared with the server.

Both paths return the new token ids of each row, stopping a row at <|endoftext|>. `generate` runs rows
that share one prompt (several samples at once); `generate_many` runs several prompts in one batch.
Randomness comes from a private generator, so sampling during training never disturbs the training
RNG; both paths draw the same random numbers in the same order, so with one seed they sample the same
tokens.

The fast path (`Decoder`) keeps everything in preallocated tensors: the KV cache, each row's current
token and its position, the sampled tokens, the done flags. One decode step (model, sampling,
bookkeeping) then has fixed shapes and never waits for the host, so on CUDA it is captured once in a
CUDA graph (after `torch.compile` when asked) and each token costs one graph replay, plus one launch
for the random numbers when sampling. Every row has its own position, so prompts of any lengths share
a batch with no padding to hide, and each row slides its own context when it fills up: every row gets
exactly the tokens its prompt gets alone. The host knows every row's position without asking the
device; it reads results back only to stream a token or, every few tokens, to see whether every row
has ended.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import Sampling
from .engine import draw_noise, next_token, slide
from .model import GPT, KVCache, activation_dtype
from .utils import UserError, console

DONE_CHECK_EVERY = 16  # tokens between the host's looks at the done flags (each look is a device sync)

# How the fast path runs a step, slowest first (`minigpt bench` times each; "plain" is the reference).
DECODE_MODES = {
    "plain": "whole sequence recomputed per token (the reference)",
    "cache": "static KV cache, eager step",
    "graph": "static KV cache, step replayed from a CUDA graph",
    "compiled": "static KV cache, torch.compile'd step in a CUDA graph",
}


def default_mode(device: torch.device) -> str:
    """The decode mode `minigpt generate` uses on `device`: a CUDA graph where there are CUDA graphs."""
    return "graph" if device.type == "cuda" else "cache"


def _check_prompts(prompts: list[list[int]]) -> None:
    if not prompts or any(not p for p in prompts):
        raise UserError("a prompt is empty; give some text (or start from <|endoftext|>).")


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
    _check_prompts([prompt])
    device = next(model.parameters()).device
    idx = torch.tensor([prompt] * rows, dtype=torch.long, device=device)
    gen = _generator(model, seed)
    seen = torch.zeros(rows, model.cfg.vocab_size, dtype=torch.bool, device=device).scatter_(1, idx, True)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    for _ in range(max_new):
        logits = model(idx[:, -model.cfg.block_size :], last_only=True).logits[:, -1]
        noise = draw_noise(logits.shape, device, gen) if not s.greedy else None
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
    return _finish(torch.stack(out, dim=1) if out else None, eot, rows)


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
    """The fast path for `rows` samples of one prompt: the prompt once into a static KV cache, then one
    captured step per token.

    `graph` (default: on CUDA) replays the step from a CUDA graph; `compile` runs it through
    `torch.compile` first (worth its start-up time for long or batched generations). When a row's
    context fills up, its last 3/4 is re-encoded into the cache and generation goes on (the reference
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

    Each row keeps its own position and slides its own context, so its tokens are those it would get
    alone, up to float rounding (greedy is tested against the prompts run one by one). Random draws
    differ: one generator serves the whole batch.
    """
    _check_prompts(prompts)
    if max_new < 1:
        return [[[] for _ in range(rows)] for _ in prompts]
    per_row = [p for p in prompts for _ in range(rows)]
    decoder = Decoder(model, len(per_row), max_new, s, eot, _generator(model, seed), graph=graph, compile=compile)
    out = _finish(decoder.run(per_row, on_token), eot, len(per_row))
    return [out[i * rows : (i + 1) * rows] for i in range(len(prompts))]


class Decoder:
    """Generation state in preallocated tensors, advanced one token per `step` (see the module doc)."""

    def __init__(
        self, model: GPT, rows: int, max_new: int, s: Sampling, eot: int | None = None,
        gen: torch.Generator | None = None, graph: bool | None = None, compile: bool = False,
    ) -> None:
        device, vocab, T = next(model.parameters()).device, model.cfg.vocab_size, model.cfg.block_size
        self.model, self.s, self.eot, self.gen, self.max_new, self.rows = model, s, eot, gen, max_new, rows
        self.cache = KVCache(model.cfg, rows, T, device, activation_dtype(model))
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)  # each row's newest token, not yet cached
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)  # the slot `tok` goes into, per row
        self.n = torch.zeros((), dtype=torch.long, device=device)  # tokens sampled so far
        self.out = torch.zeros(rows, max_new, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device) if s.repetition_penalty != 1 else None
        self.noise = torch.empty(rows, vocab, device=device) if not s.greedy else None
        self.host_pos = [0] * rows  # `pos` as the host knows it (it moves by one a step): no sync to read it
        self.prompts: list[torch.Tensor] = []  # each row's prompt (its last context's worth), for slides
        self.produced = 0
        self.step_fn: Callable[[], None] = self._step
        if compile:
            self.step_fn = torch.compile(self._step, fullgraph=True, dynamic=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph is None:
            graph = default_mode(device) == "graph"
        if graph:
            self.graph = self._capture()

    # the step: everything below runs on the device, in fixed shapes

    def _step(self) -> None:
        logits = self.model.decode(self.tok, self.pos, self.cache)
        self.pos.add_(1)
        self._take(logits)

    def _take(self, logits: torch.Tensor) -> None:
        """Sample each row's next token from `logits` and record it."""
        tok = next_token(logits, self.s, self.seen, self.noise)
        self.tok.copy_(tok)
        self.out.index_copy_(1, self.n.view(1), tok[:, None])
        self.n.add_(1)
        if self.seen is not None:
            self.seen.scatter_(1, tok[:, None], True)
        if self.eot is not None:
            self.done.logical_or_(tok == self.eot)

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """Record one step in a CUDA graph (warm-up steps first, on a side stream, as capture requires), on the
        model's GPU whichever is current."""
        device = self.tok.device
        try:
            with torch.cuda.device(device):
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(3):  # also compiles, when compiling
                        self.pos.zero_()  # every warm-up step writes slot 0 of the cache and of `out`: in bounds
                        self.n.zero_()  # whatever the context and max_new (`start` resets them all later)
                        self.step_fn()
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):  # not the process's default capture stream: that
                    # one lives on whichever GPU captured first
                    self.step_fn()
            return graph
        except RuntimeError as e:  # keep generating, without the graph, and say so
            console.print(f"[yellow]CUDA graph capture failed ({str(e).splitlines()[0][:120]}); decoding without it[/]")
            torch.cuda.synchronize(device)
            return None

    # the host side

    def start(self, prompts: list[list[int]]) -> None:
        """A new generation after one prompt per row: reset the state, encode each prompt's last context's
        worth into the cache (right-padded: a row's padding sits after its tokens, where causal attention
        never looks, and later steps overwrite it) and sample every row's first token."""
        assert len(prompts) == self.rows, f"{len(prompts)} prompts for {self.rows} rows"
        _check_prompts(prompts)
        T, device = self.model.cfg.block_size, self.tok.device
        self.n.zero_()
        self.done.zero_()
        self.prompts = [torch.tensor(p[-T:], dtype=torch.long, device=device) for p in prompts]
        if self.seen is not None:
            self.seen.zero_()
            for r, p in enumerate(prompts):
                self.seen[r, torch.tensor(p, device=device)] = True
        self.host_pos = [len(p) for p in self.prompts]
        lengths = torch.tensor(self.host_pos, device=device)
        ctx = torch.zeros(self.rows, max(self.host_pos), dtype=torch.long, device=device)
        for r, p in enumerate(self.prompts):
            ctx[r, : len(p)] = p
        self.cache.pos = 0
        logits = self.model.prefill(ctx, self.cache, last=lengths - 1)
        self.pos.copy_(lengths)
        self._draw()
        self._take(logits)
        self.produced = 1

    def _draw(self) -> None:
        if self.noise is not None:
            draw_noise(self.noise.shape, self.noise.device, self.gen, out=self.noise)

    def step(self) -> None:
        """One token for every row: slide the rows whose context is full, draw the noise, run the step."""
        T = self.model.cfg.block_size
        full = [r for r, p in enumerate(self.host_pos) if p == T]
        if full:
            self._slide(full)
        self._draw()
        if self.graph is not None:
            with torch.cuda.device(self.tok.device):  # replayed on the stream of the GPU it was captured on
                self.graph.replay()
        else:
            self.step_fn()
        self.host_pos = [p + 1 for p in self.host_pos]
        self.produced += 1

    def _slide(self, full: list[int]) -> None:
        """Rows with a full context go on from its last 3/4 (`engine.slide`)."""
        contexts = [torch.cat([self.prompts[r], self.out[r, : self.produced]]) for r in full]
        keep = slide(self.model, self.cache, full, contexts)
        self.pos.index_fill_(0, torch.tensor(full, device=self.pos.device), keep)
        for r in full:
            self.host_pos[r] = keep

    def run(self, prompts: list[list[int]], on_token: Callable[[int], None] | None = None) -> torch.Tensor:
        """Generate up to `max_new` tokens after one prompt per row; returns (rows, produced)."""
        self.start(prompts)
        while True:
            if on_token is not None:
                on_token(int(self.tok[0]))
            if self.produced == self.max_new:
                break
            if self.eot is not None and (on_token is not None or self.produced % DONE_CHECK_EVERY == 0):
                if bool(self.done.all()):
                    break
            self.step()
        return self.out[:, : self.produced]


def _finish(out: torch.Tensor | None, eot: int | None, rows: int) -> list[list[int]]:
    if out is None or out.size(1) == 0:
        return [[] for _ in range(rows)]
    result = out.tolist()
    if eot is not None:
        result = [r[: r.index(eot)] if eot in r else r for r in result]
    return result
