"""The engine: token ids in, token ids out. Sampling rules, the row-slide rule, a text stream, and
continuous batching over the slots of one static KV cache. No tokenizer and no HTTP: the server is a
face on top of it, and `generate.Decoder` (a fixed batch, replayed from a CUDA graph) shares its rules.

Continuous batching: the engine owns the model and `slots` rows of one cache. Its thread runs the
decode loop; each round it
- lets waiting sequences join free slots: a sequence's prompt, all but its last token, is prefilled into
  its slot's rows, and the last token goes into the step;
- runs one decode step over the rows in use, each row at its own position;
- samples each row with its own settings (`next_token_rows`, its own generator when seeded);
- hands every new token to its sequence.
A sequence leaves at the end token, at its token limit, or when cancelled (a stop string, a client that
went away); its slot is free at the next round, so a long sequence never holds short ones back. A row
whose context is full slides (`slide`) as `Decoder`'s rows do.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import GREEDY_BELOW, Sampling
from .model import GPT, KVCache, activation_dtype

SHUTDOWN_REASON = "abort"  # finish_reason of a sequence cut short when the engine drains

# --------------------------------------------------------------------------------------------------
# sampling


def next_token(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    """One token per row from (rows, vocab) logits: penalty, then temperature, then top-k and top-p (both
    judged on the tempered distribution), then a draw.

    `noise` holds Exp(1) random numbers of the logits' shape (unused when greedy): argmax(p / noise) is a
    draw from p (the exponential race, the same trick `torch.multinomial` uses), with no host sync.
    """
    logits = logits.float()
    if s.repetition_penalty != 1.0 and seen is not None:
        # CTRL-style: make tokens already present less likely, whatever the sign of their logit
        penalised = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if s.greedy:
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


@dataclass
class RowSampling:
    """Sampling settings of each row's own, as (rows,) tensors, for a batch whose rows belong to different
    requests (the server's). The host-side flags say which rules any row uses, so that a batch of plain
    requests skips the sort and the top-k; they never change a row's token."""

    temperature: torch.Tensor
    top_k: torch.Tensor  # long; 0: off
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    max_k: int = 0  # the largest top_k of any row (0: no row uses top-k)
    any_top_p: bool = False
    any_sampled: bool = True  # some row samples (else every row is greedy: no noise needed)


def next_token_rows(logits: torch.Tensor, s: RowSampling, seen: torch.Tensor | None,
                    noise: torch.Tensor | None) -> torch.Tensor:
    """`next_token` with each row's own settings: the same rules in the same order, so each row gets the
    token `next_token` gives it alone with its settings and its noise (tested). `seen` is None when no
    row has a repetition penalty; `noise` is None when every row is greedy."""
    logits = logits.float()
    if seen is not None:
        pen = s.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(seen, penalised, logits)
    greedy = logits.argmax(dim=-1)
    if noise is None or not s.any_sampled:
        return greedy
    sampled_rows = s.temperature >= GREEDY_BELOW  # the others are greedy, as `Sampling.greedy` says
    t = s.temperature[:, None]
    logits = logits / torch.where(sampled_rows[:, None], t, torch.ones_like(t))  # greedy rows: from `greedy`
    if s.max_k:
        k = s.top_k.clamp(1, min(s.max_k, logits.size(-1)))[:, None]
        kth = torch.topk(logits, min(s.max_k, logits.size(-1)), dim=-1).values.gather(1, k - 1)
        logits = logits.masked_fill((s.top_k > 0)[:, None] & (logits < kth), float("-inf"))
    if s.any_top_p:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = (probs.cumsum(dim=-1) - probs > s.top_p[:, None]) & (s.top_p < 1)[:, None]
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    sampled = (logits.softmax(dim=-1) / noise).argmax(dim=-1)
    return torch.where(sampled_rows, sampled, greedy)


def draw_noise(shape: tuple[int, int], device: torch.device, gen: torch.Generator | None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Exp(1) numbers for `next_token`: the one random draw per generated token, shared by both paths."""
    out = torch.empty(shape, device=device) if out is None else out
    return out.exponential_(generator=gen)


# --------------------------------------------------------------------------------------------------
# the row-slide rule


def slide_keep(block_size: int) -> int:
    """The tokens a row whose context is full keeps when it slides (its newest included): 3/4 of it, so a
    slide costs one prefill every quarter context rather than one per token."""
    return (3 * block_size + 3) // 4


def slide(model: GPT, cache: KVCache, rows: list[int], contexts: list[torch.Tensor]) -> int:
    """Rows whose context is full go on from its last `slide_keep` tokens: of each row's latest tokens
    (`contexts`, the newest last), the `keep - 1` before the newest are encoded again into the row's cache
    from slot 0, and the newest goes in at the next step. Contiguous rows go through the model together.
    Returns the slot the newest token goes into, `keep - 1`, the same for every row."""
    keep = slide_keep(model.cfg.block_size)
    history = [c[-keep:-1] for c in contexts]
    start = 0
    while start < len(rows):
        stop = start + 1
        while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
            stop += 1
        model.prefill(torch.stack(history[start:stop]), cache.rows(rows[start], rows[stop - 1] + 1))
        start = stop
    return keep - 1


# --------------------------------------------------------------------------------------------------
# text


class TextStream:
    """A sequence's text as its tokens come. A character cut in the middle of its bytes waits for the rest;
    the text ends before the first stop string; text that could still begin a stop string is held back
    until it cannot. Only the tokens not yet decoded are decoded: linear in the text's length."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.decode, self.stops = decode, stops
        self.pending: list[int] = []
        self.before: list[int] = []  # the last token decoded: the context a SentencePiece decoder needs for spaces
        self.text = ""
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Take a token; returns the text that may go out now."""
        if self.stopped:
            return ""
        self.pending.append(token)
        piece = self._piece()
        if piece.endswith("\ufffd"):
            return ""  # the rest of the character comes with the next token(s)
        self.before, self.pending = self.pending[-1:], []
        self.text += piece
        return self._release(final=False)

    def finish(self) -> str:
        """The end of the sequence: whatever was held back (bytes that never became a character included)."""
        if not self.stopped and self.pending:
            self.text += self._piece()
            self.pending = []
        return self._release(final=True)

    def _piece(self) -> str:
        """The pending tokens' text, as decoding them after the last token gives it (a decoder that drops the
        leading space of a text, as SentencePiece's do, keeps it here)."""
        if not self.before:
            return self.decode(self.pending)
        head = self.decode(self.before)
        if "\ufffd" in head:  # the last byte of a character: no context to give
            return self.decode(self.pending)
        whole = self.decode(self.before + self.pending)
        return whole[len(head):] if whole.startswith(head) else self.decode(self.pending)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # a stop string cannot start before `sent`: text that could begin one was held back
        hits = [i for i in (self.text.find(s, max(self.sent - len(s) + 1, 0)) for s in self.stops) if i >= 0]
        if hits:
            end = max(min(hits), self.sent)
            self.stopped = True
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        out, self.sent = self.text[self.sent : end], max(end, self.sent)
        return out

    def _held(self) -> int:
        """The longest end of the text (not yet sent) that is the start of a stop string."""
        tail = self.text[self.sent :]
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:k])), default=0)

    @property
    def completion(self) -> str:
        return self.text[: self.sent]


# --------------------------------------------------------------------------------------------------
# continuous batching


@dataclass(eq=False)
class Sequence:
    """One sequence to generate, from the queue to its last token."""

    ids: list[int]  # the prompt as the model sees it (document start, tags, text)
    max_new: int
    sampling: Sampling
    seed: int | None
    emit: Callable[[int | None, str | None], None]  # (token, None) per token, then (None, finish_reason)
    ignore_eos: bool = False  # go on past the end token (fixed lengths, for load tests)
    queued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    produced: int = 0
    # the engine's, once the sequence has a slot
    context: list[int] = field(default_factory=list)  # its latest tokens (for slides); the last one is in `tok`
    gen: torch.Generator | None = None
    last: float = 0.0  # when its latest token came

    def take(self, token: int, now: float, eot: int, metrics: Any) -> str | None:
        """A new token, handed on; returns why the sequence ends with it ('stop', 'length'), if it does."""
        self.context.append(token)
        self.produced += 1
        if metrics is not None:
            metrics.token(now - (self.queued if self.produced == 1 else self.last), self.produced == 1)
        self.last = now
        self.emit(token, None)
        if token == eot and not self.ignore_eos:
            return "stop"
        return "length" if self.produced >= self.max_new else None


class QueueFull(Exception):
    pass


class Closing(Exception):
    pass


class SlotSampling:
    """Each slot's sampling settings on the device, and the draws of a step: unseeded sequences share one
    generator (seeded afresh at every start), a seeded one draws from its own."""

    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        self.temperature = torch.zeros(slots, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.penalty = torch.ones(slots, device=device)
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.noise = torch.empty(slots, vocab, device=device)
        self.gen = torch.Generator(device=device)
        self.gen.seed()

    def set(self, r: int, seq: Sequence) -> None:
        s = seq.sampling
        self.temperature[r], self.top_k[r], self.top_p[r], self.penalty[r] = (
            s.temperature, s.top_k, s.top_p, s.repetition_penalty)
        self.seen[r].zero_()
        self.seen[r, torch.tensor(seq.ids, device=self.seen.device)] = True
        if seq.seed is not None:
            seq.gen = torch.Generator(device=self.seen.device).manual_seed(seq.seed)

    def sample(self, logits: torch.Tensor, active: list[tuple[int, Sequence]]) -> torch.Tensor:
        """The next token of rows [0, len(logits)): `active` holds the rows in use (the others' are unread)."""
        hi, settings = logits.size(0), [s.sampling for _, s in active]
        rows = RowSampling(self.temperature[:hi], self.top_k[:hi], self.top_p[:hi], self.penalty[:hi],
                           max_k=max(s.top_k for s in settings), any_top_p=any(s.top_p < 1 for s in settings),
                           any_sampled=any(not s.greedy for s in settings))
        seen = self.seen[:hi] if any(s.repetition_penalty != 1 for s in settings) else None
        noise = None
        if rows.any_sampled:
            noise = self.noise[:hi].exponential_(generator=self.gen)
            for r, seq in active:
                if seq.gen is not None:  # a seeded sequence draws from its own generator only
                    noise[r].exponential_(generator=seq.gen)
        new = next_token_rows(logits, rows, seen, noise)
        if seen is not None:
            seen.scatter_(1, new[:, None], True)
        return new


class Slots:
    """The rows of one static KV cache and the sequences in them: each row's newest token (not yet cached),
    its position (the host's copy is the truth: no sync to read it) and its sampling settings. `join` puts a
    sequence into a row; `step` gives every row in use its next token."""

    def __init__(self, model: GPT, rows: int) -> None:
        device = next(model.parameters()).device
        self.model, self.T, self.device = model, model.cfg.block_size, device
        self.cache = KVCache(model.cfg, rows, self.T, device, activation_dtype(model))
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.host_pos = [0] * rows
        self.sampling = SlotSampling(rows, model.cfg.vocab_size, device)
        self.seqs: list[Sequence | None] = [None] * rows

    def join(self, r: int, seq: Sequence) -> None:
        """`seq` into row `r`: its prompt but the last token into the row's cache; the last token is the
        row's next input, so the next step gives its first new token."""
        prompt = seq.ids[-self.T :]
        if len(prompt) > 1:
            ctx = torch.tensor([prompt[:-1]], dtype=torch.long, device=self.device)
            self.model.prefill(ctx, self.cache.rows(r, r + 1))
        self.tok[r] = prompt[-1]
        self.host_pos[r] = len(prompt) - 1
        self.sampling.set(r, seq)
        seq.context = list(prompt)
        self.seqs[r] = seq

    def free(self, r: int) -> Sequence:
        seq = self.seqs[r]
        assert seq is not None
        self.seqs[r], self.host_pos[r] = None, 0
        return seq

    def step(self) -> tuple[list[tuple[int, Sequence]], list[int]]:
        """One decode step over rows [0, last row in use]: (the rows in use and their sequences, every row's
        new token). Free rows inside compute a token nobody reads (at slot 0); full rows slide first."""
        active = [(r, s) for r, s in enumerate(self.seqs) if s is not None]
        for r, seq in active:
            if self.host_pos[r] == self.T:
                self.host_pos[r] = slide(self.model, self.cache, [r], [torch.tensor(seq.context, device=self.device)])
                del seq.context[: -(self.host_pos[r] + 1)]
        hi = active[-1][0] + 1
        self.pos[:hi].copy_(torch.tensor(self.host_pos[:hi]))
        logits = self.model.decode(self.tok[:hi], self.pos[:hi], self.cache.rows(0, hi))
        new = self.sampling.sample(logits, active)
        self.tok[:hi].copy_(new)
        for r, _ in active:
            self.host_pos[r] += 1
        return active, new.tolist()


class Engine:
    """Continuous batching of `model` over `slots` rows (see the module doc); `eot` ends a sequence.
    `submit`, `cancel`, `drain` and `close` may be called from any thread; everything else runs on the
    engine's own thread. `metrics` (optional) gets queue_time, token, step and load calls."""

    def __init__(self, model: GPT, eot: int, slots: int, max_queue: int, metrics: Any = None) -> None:
        self.rows, self.eot, self.max_queue, self.metrics = Slots(model, slots), eot, max_queue, metrics
        self.slots = self.rows.seqs  # the sequence in each row (None: free)
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.deadline: float | None = None  # set by `drain`: no new sequences; cut running ones at this time
        self.thread = threading.Thread(target=self._loop, name="minigpt-engine", daemon=True)

    # any thread

    def start(self) -> None:
        self.thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        with self.cond:
            if self.deadline is not None:
                raise Closing
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull
            self.waiting.extend(seqs)
            self.cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop these sequences (their client left, or a stop string came): they send nothing more."""
        with self.cond:
            for s in seqs:
                s.cancelled = True
            self.cond.notify()

    def drain(self, timeout: float) -> None:
        """Take no new sequences; those running or waiting get `timeout` seconds, then end with 'abort'."""
        with self.cond:
            if self.deadline is None:
                self.deadline = time.monotonic() + timeout
            self.cond.notify()

    def close(self) -> None:
        self.drain(0)
        if self.thread.is_alive():
            self.thread.join()

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        return sum(s is not None for s in self.slots), len(self.waiting)

    @property
    def closing(self) -> bool:
        return self.deadline is not None

    # the engine thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while self._next_round():
                pass

    def _next_round(self) -> bool:
        """One turn of the loop: joins, then a step. False once drained."""
        with self.cond:
            self._drop_cancelled()
            while not self.waiting and not any(self.slots):
                if self.deadline is not None:
                    return False
                self._report()  # idle: the gauges say so
                self.cond.wait()
                self._drop_cancelled()
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self._end_all(SHUTDOWN_REASON)
                while self.waiting:
                    self.waiting.popleft().emit(None, SHUTDOWN_REASON)
                return False
            joins = [(r, self.waiting.popleft()) for r, s in enumerate(self.slots) if s is None and self.waiting]
            for r, seq in joins:
                self.slots[r] = seq  # running from now: /health counts it while its prompt is encoded
        for r, seq in joins:
            try:
                if self.metrics is not None:
                    self.metrics.queue_time(time.perf_counter() - seq.queued)
                self.rows.join(r, seq)
            except Exception:  # this sequence fails alone; the others go on
                traceback.print_exc(file=sys.stderr)
                with self.cond:
                    self.rows.free(r).emit(None, "error")
        try:
            if any(self.slots):
                self._step()
        except Exception:  # a bug or an out-of-memory must not stop the engine: end what ran, go on
            traceback.print_exc(file=sys.stderr)
            with self.cond:
                self._end_all("error")
        self._report()
        return True

    def _drop_cancelled(self) -> None:
        for r, s in enumerate(self.slots):
            if s is not None and s.cancelled:
                self.rows.free(r)
        if any(s.cancelled for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.cancelled)

    def _step(self) -> None:
        active, tokens = self.rows.step()
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.step(len(active))
        with self.cond:
            for r, seq in active:
                if not seq.cancelled:  # else dropped at the next round, unheard
                    if reason := seq.take(tokens[r], now, self.eot, self.metrics):
                        self.rows.free(r).emit(None, reason)

    def _end_all(self, reason: str) -> None:
        for r, s in enumerate(self.slots):
            if s is not None:
                self.rows.free(r).emit(None, reason)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.load(*self.load())
