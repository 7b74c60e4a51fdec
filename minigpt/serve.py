"""minigpt serve: a trained run behind an OpenAI-compatible HTTP API, with continuous batching.

The engine (torch only) owns the model and `max_batch` slots, the rows of one static KV cache. Its
thread runs the decode loop. Each step it:
- lets waiting sequences join free slots: a sequence's prompt, all but its last token, is prefilled
  into its slot's rows, and the last token goes into the step;
- runs one decode step over the rows in use, each row at its own position;
- samples each row with its own request's settings (`next_token_rows`, its own generator when seeded);
- hands every new token to its request.

A sequence leaves at <|endoftext|>, at its token limit, when the HTTP side found a stop string, or
when its client went away; its slot is free at the next step, so a long request never holds short
ones back. A row whose context is full slides as `generate`'s rows do.

The HTTP face (FastAPI, uvicorn and prometheus_client: the `serve` extra, imported only when a
server starts) turns requests into sequences and tokens into text. Text is decoded as tokens come,
a character cut in the middle of its bytes waits for the rest, and text that may still begin a stop
string is held back.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations at run time, and their
# request models live inside `create_app`
import asyncio
import contextlib
import dataclasses
import hmac
import http.client
import json
import math
import os
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from .checkpoint import Loaded, find_checkpoint, load_run, resolve_run, run_info
from .config import GenerateConfig, Sampling, ServeConfig
from .generate import RowSampling, next_token_rows
from .model import KVCache, activation_dtype
from .utils import UserError, console, err_console, resolve_device

MAX_CHOICES = 16  # `n` / `num_samples` per request
MAX_STOPS = 4  # stop strings per request, as OpenAI allows
SHUTDOWN_REASON = "abort"
# bounds that keep every setting a finite float32 on the device (the fuzz pass found 1e308)
MAX_TEMPERATURE, MAX_TOP_K, PENALTY_RANGE = 100.0, 2**31 - 1, (0.01, 100.0)  # finish_reason of a sequence the server cut short when it shut down

# --------------------------------------------------------------------------------------------------
# the engine


@dataclass(eq=False)
class Sequence:
    """One choice of one request, from the queue to its last token."""

    ids: list[int]  # the prompt as the model sees it (document start, tags, text)
    max_new: int
    sampling: Sampling
    seed: int | None
    emit: Callable[[int | None, str | None], None]  # (token, None) per token, then (None, finish_reason)
    ignore_eos: bool = False  # go on past <|endoftext|> (fixed lengths, for load tests)
    queued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    produced: int = 0
    # the engine's, once the sequence has a slot
    context: list[int] = field(default_factory=list)  # its latest tokens (for slides); the last one is in `tok`
    gen: torch.Generator | None = None
    last: float = 0.0  # when its latest token came


class QueueFull(Exception):
    pass


class Closing(Exception):
    pass


class Engine:
    """Continuous batching over a fixed number of slots (see the module doc). `submit`, `cancel`, `drain`
    and `close` may be called from any thread; everything else runs on the engine's own thread."""

    def __init__(self, loaded: Loaded, slots: int, max_queue: int, metrics: Any = None) -> None:
        model, device = loaded.model, next(loaded.model.parameters()).device
        vocab, T = model.cfg.vocab_size, model.cfg.block_size
        self.model, self.eot, self.T, self.device, self.max_queue = model, loaded.eot, T, device, max_queue
        self.keep = (3 * T + 3) // 4  # context a full row keeps when it slides, as `Decoder` rows do
        self.cache = KVCache(model.cfg, slots, T, device, activation_dtype(model))
        self.tok = torch.zeros(slots, dtype=torch.long, device=device)  # each row's newest token, not yet cached
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.host_pos = [0] * slots  # the slot `tok` goes into, per row (the host's copy is the truth)
        self.temperature = torch.zeros(slots, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.penalty = torch.ones(slots, device=device)
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.noise = torch.empty(slots, vocab, device=device)
        self.gen = torch.Generator(device=device)
        self.gen.seed()  # unseeded requests draw from here: a fresh seed per server start
        self.slots: list[Sequence | None] = [None] * slots
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.deadline: float | None = None  # set by `drain`: no new sequences; cut running ones at this time
        self.metrics = metrics
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
                for r, s in enumerate(self.slots):
                    if s is not None:
                        self._free(r, SHUTDOWN_REASON)
                while self.waiting:
                    self.waiting.popleft().emit(None, SHUTDOWN_REASON)
                return False
            joins = []
            for r, s in enumerate(self.slots):
                if s is None and self.waiting:
                    joins.append((r, self.waiting.popleft()))
                    self.slots[r] = joins[-1][1]
        for r, seq in joins:
            try:
                self._join(r, seq)
            except Exception:  # this sequence fails alone; the others go on
                traceback.print_exc(file=sys.stderr)
                with self.cond:
                    self._free(r, "error")
        try:
            if any(self.slots):
                self._step()
        except Exception:  # a bug or an out-of-memory must not take the server down: end what ran, go on
            traceback.print_exc(file=sys.stderr)
            with self.cond:
                for r, s in enumerate(self.slots):
                    if s is not None:
                        self._free(r, "error")
        self._report()
        return True

    def _drop_cancelled(self) -> None:
        for r, s in enumerate(self.slots):
            if s is not None and s.cancelled:
                self.slots[r] = None
                self.host_pos[r] = 0
        if any(s.cancelled for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.cancelled)

    def _join(self, r: int, seq: Sequence) -> None:
        """Put `seq` into slot `r`: its prompt but the last token into the slot's cache rows; the last token
        is the row's next input, so the next step gives its first new token."""
        if self.metrics is not None:
            self.metrics.queue_time(time.perf_counter() - seq.queued)
        prompt = seq.ids[-self.T :]
        if len(prompt) > 1:
            ctx = torch.tensor([prompt[:-1]], dtype=torch.long, device=self.device)
            self.model.prefill(ctx, self.cache.rows(r, r + 1))
        self.tok[r] = prompt[-1]
        self.host_pos[r] = len(prompt) - 1
        s = seq.sampling
        self.temperature[r], self.top_k[r], self.top_p[r], self.penalty[r] = (
            s.temperature, s.top_k, s.top_p, s.repetition_penalty)
        self.seen[r].zero_()
        self.seen[r, torch.tensor(seq.ids, device=self.device)] = True
        seq.context = list(prompt)
        if seq.seed is not None:
            seq.gen = torch.Generator(device=self.device).manual_seed(seq.seed)

    def _slide(self, r: int, seq: Sequence) -> None:
        """The row's context is full: keep its last `keep` tokens, the `keep - 1` before its newest token
        re-encoded from slot 0, the newest one into the next step."""
        ctx = torch.tensor([seq.context[-self.keep : -1]], dtype=torch.long, device=self.device)
        self.model.prefill(ctx, self.cache.rows(r, r + 1))
        self.host_pos[r] = self.keep - 1
        del seq.context[: -self.keep]

    def _step(self) -> None:
        active = [(r, s) for r, s in enumerate(self.slots) if s is not None]
        for r, seq in active:
            if self.host_pos[r] == self.T:
                self._slide(r, seq)
        hi = active[-1][0] + 1  # rows [0, hi): free rows inside compute a token nobody reads (fixed slot 0)
        self.pos[:hi].copy_(torch.tensor(self.host_pos[:hi]))
        settings = [s.sampling for _, s in active]
        rows = RowSampling(self.temperature[:hi], self.top_k[:hi], self.top_p[:hi], self.penalty[:hi],
                           max_k=max(s.top_k for s in settings), any_top_p=any(s.top_p < 1 for s in settings),
                           any_sampled=any(not s.greedy for s in settings))
        seen = self.seen[:hi] if any(s.repetition_penalty != 1 for s in settings) else None
        noise = None
        if rows.any_sampled:
            noise = self.noise[:hi].exponential_(generator=self.gen)
            for r, seq in active:
                if seq.gen is not None:  # a seeded request draws from its own generator only
                    noise[r].exponential_(generator=seq.gen)
        logits = self.model.decode(self.tok[:hi], self.pos[:hi], self.cache.rows(0, hi))
        new = next_token_rows(logits, rows, seen, noise)
        self.tok[:hi].copy_(new)
        if seen is not None:
            seen.scatter_(1, new[:, None], True)
        tokens, now = new.tolist(), time.perf_counter()
        if self.metrics is not None:
            self.metrics.step(len(active))
        with self.cond:
            for r, seq in active:
                if seq.cancelled:
                    continue  # dropped at the next round, unheard
                t = tokens[r]
                self.host_pos[r] += 1
                seq.context.append(t)
                seq.produced += 1
                if self.metrics is not None:
                    self.metrics.token(now - (seq.queued if seq.produced == 1 else seq.last), seq.produced == 1)
                seq.last = now
                seq.emit(t, None)
                ended = t == self.eot and not seq.ignore_eos
                if ended or seq.produced >= seq.max_new:
                    self._free(r, "stop" if ended else "length")

    def _free(self, r: int, reason: str) -> None:
        seq = self.slots[r]
        assert seq is not None
        self.slots[r] = None
        self.host_pos[r] = 0
        seq.emit(None, reason)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.load(*self.load())


# --------------------------------------------------------------------------------------------------
# text


class TextStream:
    """A choice's text as its tokens come. A character cut in the middle of its bytes waits for the rest;
    the text ends before the first stop string; text that could still begin a stop string is held back
    until it cannot. Only the tokens not yet decoded are decoded: linear in the text's length."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.decode, self.stops = decode, stops
        self.pending: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Take a token; returns the text that may go to the client now."""
        if self.stopped:
            return ""
        self.pending.append(token)
        piece = self.decode(self.pending)
        if piece.endswith("\ufffd"):
            return ""  # the rest of the character comes with the next token(s)
        self.pending = []
        self.text += piece
        return self._release(final=False)

    def finish(self) -> str:
        """The end of the sequence: whatever was held back (bytes that never became a character included)."""
        if not self.stopped and self.pending:
            self.text += self.decode(self.pending)
            self.pending = []
        return self._release(final=True)

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
# requests -> sequences -> events


class ApiError(Exception):
    """A request the server refuses: OpenAI's error shape with this status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Ask:
    """What both routes ask for, once their fields are checked: the prompts, choices per prompt, limits."""

    prompts: list[str | list[int]]
    n: int
    max_new: int
    sampling: Sampling
    seed: int | None
    tags: dict[str, str]
    stops: list[str]
    truncate: bool
    ignore_eos: bool = False


@dataclass
class Choice:
    index: int
    prompt_tokens: int
    prompt_text: str
    seq: Sequence
    stream: TextStream
    tokens: int = 0  # tokens the client was told of (a stop string ends the count)
    finish: str | None = None


class Job:
    """A request's sequences in the engine, and their tokens coming back as text events."""

    def __init__(self, server: "Server", ask: Ask) -> None:
        self.server, self.ask = server, ask
        loaded, T = server.loaded, server.loaded.model.cfg.block_size
        self.queue: asyncio.Queue[tuple[int, int | None, str | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.choices: list[Choice] = []
        self.started = time.perf_counter()
        self.gone = False  # the client went away
        self.accounted = False
        self.done: Callable[[], None] = lambda: None  # called once the stream is over (the app counts it)
        for p, prompt in enumerate(ask.prompts):
            if isinstance(prompt, str):
                try:
                    ids, cut = loaded.prompt(prompt, ask.tags)
                except UserError as e:
                    raise ApiError(400, str(e), param="tags", code="unknown_tag") from None
                text = prompt
            else:  # token ids are used as they are: the client chose the document start and tags
                if any(not 0 <= t < loaded.model.cfg.vocab_size for t in prompt):
                    raise ApiError(400, f"prompt token ids must be in [0, {loaded.model.cfg.vocab_size}).",
                                   param="prompt")
                ids, cut, text = list(prompt), max(len(prompt) - T, 0), loaded.decode(prompt)
                ids = ids[cut:]
            if cut and not ask.truncate:
                raise ApiError(400, f"the prompt is {cut} tokens longer than the model's context of {T} tokens "
                               "allows; shorten it or send truncate: true to keep its end.",
                               param="prompt", code="context_length_exceeded")
            for j in range(ask.n):
                index = p * ask.n + j

                def emit(tok: int | None, reason: str | None, index: int = index) -> None:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, tok, reason))

                seed = None if ask.seed is None else ask.seed + j  # n choices of one seed must differ
                seq = Sequence(ids, ask.max_new, ask.sampling, seed, emit, ask.ignore_eos)
                self.choices.append(Choice(index, len(ids), text, seq, TextStream(loaded.decode, ask.stops)))

    def submit(self) -> None:
        try:
            self.server.engine.submit([c.seq for c in self.choices])
        except QueueFull:
            raise ApiError(429, "the server is busy (its queue is full); retry in a moment.",
                           "rate_limit_error", "queue_full") from None
        except Closing:
            raise ApiError(503, "the server is shutting down.", "service_unavailable") from None

    def cancel(self) -> None:
        self.server.engine.cancel([c.seq for c in self.choices if c.finish is None])

    async def watch(self, disconnected: Callable[[], Any]) -> None:
        """Cancel the job within a quarter second of its client going away (`disconnected` is Starlette's
        `request.is_disconnected`): its slots are free at the next step."""
        while not await disconnected():
            await asyncio.sleep(0.25)
        self.gone = True
        self.cancel()
        self.queue.put_nowait((-1, None, None))

    async def events(self) -> AsyncIterator[tuple[Choice, str]]:
        """(choice, new text) as tokens come; a choice's last event has its `finish` set. Ends early when
        the client goes away."""
        left = len(self.choices)
        while left:
            index, tok, reason = await self.queue.get()
            if index < 0:
                return
            c = self.choices[index]
            if c.finish is not None:
                continue  # a token that was on its way when a stop string ended the choice
            if tok is not None:
                c.tokens += 1
                text = c.stream.push(tok) if tok != self.server.loaded.eot else ""
                if c.stream.stopped:
                    c.finish = "stop"
                    self.server.engine.cancel([c.seq])
                    left -= 1
                yield c, text
            else:
                c.finish = reason
                left -= 1
                yield c, c.stream.finish()

    @property
    def usage(self) -> dict[str, int]:
        prompt = sum(c.prompt_tokens for c in self.choices[:: self.ask.n])
        done = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


# --------------------------------------------------------------------------------------------------
# the server


LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})


def host_names(host: str, extra: list[str]) -> frozenset[str] | None:
    """The Host names a server bound to `host` answers to (None: any): the loopback names and the bound
    one, this machine's names and addresses when it listens on every interface, and `extra`."""
    wanted = {h.strip().strip("[]").lower() for h in extra}
    if "*" in wanted:
        return None
    names = set(LOCAL_NAMES) | wanted | {host.strip("[]").lower()}
    if host in EVERY_INTERFACE:
        with contextlib.suppress(OSError):
            for name in {socket.gethostname(), socket.getfqdn()}:
                names.add(name.lower())
                names |= {str(a[4][0]).lower() for a in socket.getaddrinfo(name, None)}
    return frozenset(names - {""})


def host_of(header: str) -> str:
    """The name in a Host header: `name:port`, `[v6]:port` or `name`."""
    name = header.strip().lower()
    if name.startswith("["):
        return name[1 : name.find("]")] if "]" in name else name[1:]
    return name.rsplit(":", 1)[0].rstrip(".") if name.count(":") == 1 else name.rstrip(".")


class Server:
    """What the routes share: the settings, the run once loaded, the engine, the metrics."""

    def __init__(self, cfg: ServeConfig, api_key: str, metrics: Any) -> None:
        self.cfg, self.api_key, self.metrics = cfg, api_key, metrics
        self.hosts = host_names(cfg.host, cfg.allowed_hosts)
        self.loaded: Loaded | None = None  # type: ignore[assignment]
        self.engine: Engine | None = None  # type: ignore[assignment]
        self.info: dict[str, Any] = {}
        self.name = cfg.model_name
        self.created = int(time.time())
        self.failed: str | None = None

    def load(self) -> None:
        """Load the run and start the engine (in a thread of its own: /health says 503 meanwhile)."""
        try:
            loaded = load_run(self.cfg.run, self.cfg.checkpoint, resolve_device(self.cfg.device), self.cfg.runs_dir)
            engine = Engine(loaded, self.cfg.max_batch, self.cfg.max_queue, self.metrics)
        except UserError as e:
            self.failed = str(e)
            return
        except Exception as e:  # out of memory for --max-batch slots, a CUDA error...: say so and stop
            traceback.print_exc(file=sys.stderr)
            self.failed = f"loading the run failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})."
            return
        self.name = self.name or loaded.folder.parent.name
        self.created = int(loaded.folder.stat().st_mtime)
        self.info = run_info(loaded) | {"model_name": self.name, "device": str(next(loaded.model.parameters()).device),
                                        "server": {"max_batch": self.cfg.max_batch, "max_queue": self.cfg.max_queue,
                                                   "max_tokens": self.cfg.max_tokens, "max_body": self.cfg.max_body,
                                                   "max_choices": MAX_CHOICES, "api_key": bool(self.api_key)}}
        engine.start()
        self.loaded, self.engine = loaded, engine

    def ready(self) -> None:
        if self.engine is None:
            raise ApiError(503, "the model is still loading; retry in a moment.", "service_unavailable", "loading")
        if self.engine.closing:
            raise ApiError(503, "the server is shutting down.", "service_unavailable", "shutting_down")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise ApiError(404, f"this server serves the model {self.name!r}, not {model!r}.", "not_found_error",
                           "model_not_found", "model")

    def ask(self, prompt: str | list[str] | list[int] | list[list[int]], n: int, max_new: int, sampling: Sampling,
            seed: int | None, tags: dict[str, str] | None, stop: str | list[str] | None, truncate: bool,
            ignore_eos: bool) -> Ask:
        """Check what both routes share; the errors name the OpenAI field (the native route's are alike)."""
        if max_new > self.cfg.max_tokens:
            raise ApiError(400, f"max_tokens is {max_new}, over this server's limit of {self.cfg.max_tokens}.",
                           param="max_tokens")
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[Any] = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(isinstance(p, list) and not p for p in prompts):
            raise ApiError(400, "the prompt is empty; send text (or a list of texts, or of token ids).", param="prompt")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ApiError(400, f"stop takes up to {MAX_STOPS} non-empty strings.", param="stop")
        if len(prompts) * n > self.cfg.max_queue:
            raise ApiError(400, f"the request asks for {len(prompts) * n} sequences (prompts x n); this server "
                           f"queues at most {self.cfg.max_queue}.", param="n")
        return Ask(prompts, n, max_new, sampling, seed, dict(tags or {}), stops, truncate, ignore_eos)


async def finish_job(job: Job, disconnected: Callable[[], Any]) -> None:
    """Run a request to its end (non-streaming)."""
    watcher = asyncio.ensure_future(job.watch(disconnected))
    try:
        async for _ in job.events():
            pass
    finally:
        watcher.cancel()
        job.cancel()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream_events(job: Job, disconnected: Callable[[], Any], chunk: Callable[[Choice, str], Any],
                        head: list[Any], tail: Callable[[], list[Any]]) -> AsyncIterator[str]:
    """Server-Sent Events of a job: `head`, a `chunk` per piece of text (or end of a choice), `tail()` at the
    end, then [DONE]. The job is cancelled when the client goes away or the stream stops early."""
    watcher = asyncio.ensure_future(job.watch(disconnected))
    try:
        for obj in head:
            yield sse(obj)
        async for c, text in job.events():
            if text or c.finish is not None:
                yield sse(chunk(c, text))
        if job.gone:
            return
        for obj in tail():
            yield sse(obj)
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        job.cancel()
        job.done()


# --------------------------------------------------------------------------------------------------
# metrics


class Metrics:
    """Prometheus figures of one server (a registry of its own, so that several apps can live in a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        fast = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
        slow = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
        self.requests = Counter("minigpt_requests", "HTTP requests by route and status code.", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("minigpt_prompt_tokens", "Prompt tokens of the generation requests served.",
                                     registry=r)
        self.generated_tokens = Counter("minigpt_generation_tokens", "Tokens generated (those past a stop string "
                                        "or a disconnect included).", registry=r)
        self.ttft = Histogram("minigpt_time_to_first_token_seconds", "From a sequence's arrival to its first token.",
                              buckets=slow, registry=r)
        self.itl = Histogram("minigpt_inter_token_latency_seconds", "Between a sequence's consecutive tokens.",
                             buckets=fast, registry=r)
        self.queue = Histogram("minigpt_queue_time_seconds", "A sequence's wait for a slot.", buckets=slow, registry=r)
        self.latency = Histogram("minigpt_request_latency_seconds", "A generation request, arrival to last token.",
                                 buckets=slow, registry=r)
        self.running = Gauge("minigpt_requests_running", "Generation requests in progress.", registry=r)
        self.seq_running = Gauge("minigpt_sequences_running", "Sequences in a slot (a request has n of them).",
                                 registry=r)
        self.seq_waiting = Gauge("minigpt_sequences_waiting", "Sequences waiting for a slot.", registry=r)
        self.batch = Gauge("minigpt_batch_size", "Sequences in the latest decode step.", registry=r)

    # the engine's hooks
    def queue_time(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def token(self, seconds: float, first: bool) -> None:
        self.generated_tokens.inc()
        (self.ttft if first else self.itl).observe(seconds)

    def step(self, rows: int) -> None:
        self.batch.set(rows)

    def load(self, running: int, waiting: int) -> None:
        self.seq_running.set(running)
        self.seq_waiting.set(waiting)
        if not running:
            self.batch.set(0)


# --------------------------------------------------------------------------------------------------
# the guard in front of every route


ROUTES = {"/", "/health", "/info", "/metrics", "/generate", "/v1/models", "/v1/completions", "/docs", "/openapi.json"}
PUBLIC = {"/", "/health", "/docs", "/openapi.json"}  # the page asks for the key itself; the docs hold no data


class Guard:
    """ASGI middleware: the API key, the body limit (the body is read here, at most `max_body` bytes), and
    request counts by route and status."""

    def __init__(self, app: Any, server: "Server") -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, status = scope["path"], 500
        route = path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"

        async def counted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            hosts, host = self.server.hosts, headers.get("host")
            if hosts is not None and host is not None and host_of(host) not in hosts:
                await self._refuse(counted, ApiError(400, f"this server does not answer to the host {host_of(host)!r}; "
                                   f"start it with --allowed-hosts {host_of(host)} to allow that name.",
                                   code="host_not_allowed"))
                return
            key = self.server.api_key
            if key and path not in PUBLIC:
                given = headers.get("authorization", "").encode("latin-1")  # the header's bytes, as sent
                if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                    await self._refuse(counted, ApiError(401, "a valid API key is needed: send the header "
                                       "'Authorization: Bearer KEY'.", "authentication_error", "invalid_api_key"))
                    return
            body = await self._read_body(headers, receive)
            if body is None:
                await self._refuse(counted, ApiError(413, f"the request body is over this server's limit of "
                                   f"{self.server.cfg.max_body:,} bytes.", code="body_too_large"))
                return
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counted)
        finally:
            self.server.metrics.requests.labels(route=route, status=str(status)).inc()

    async def _read_body(self, headers: dict[str, str], receive: Callable[[], Any]) -> bytes | None:
        limit = self.server.cfg.max_body
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    async def _refuse(send: Callable[[Any], Any], error: ApiError) -> None:
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if error.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------------
# the app


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic's first complaint as one sentence, and the field it is about."""
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')}).", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "the body"
    return f"{where}: {e.get('msg', 'invalid')}" + ("" if str(e.get("msg", "")).endswith(".") else "."), param


def _encodable(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_encodable(v) for v in value)
    return True


def create_app(cfg: ServeConfig, api_key: str = "", on_load_error: Callable[[str], None] | None = None) -> Any:
    """The FastAPI app (routes, error shapes, the guard, metrics). It loads the run in a thread when it
    starts; /health says 503 until the model is ready."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, model_validator
    from starlette.exceptions import HTTPException

    metrics = Metrics()
    server = Server(cfg, api_key, metrics)
    defaults = Sampling()
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(Sampling)}
    max_seed = 2**63 - 1 - MAX_CHOICES

    def load() -> None:
        server.load()
        if server.failed:
            err_console.print(f"[bold red]error:[/] {server.failed}", markup=True, highlight=False)
            if on_load_error is not None:
                on_load_error(server.failed)
            return
        console.print(f"ready: {server.name} ({server.info['run']}, {server.info['checkpoint']}, step "
                      f"{server.info['step']}) on {server.info['device']}, {cfg.max_batch} slots", highlight=False)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        threading.Thread(target=load, name="minigpt-load", daemon=True).start()
        yield
        if server.engine is not None:
            await asyncio.to_thread(server.engine.close)

    app = FastAPI(title="minigpt serve", version="1", lifespan=lifespan,
                  description="A minigpt run behind an OpenAI-compatible completions API, plus a native "
                  "/generate route. Errors have OpenAI's shape: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}.")
    app.state.server = server

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

        @model_validator(mode="after")
        def _unicode(self) -> Any:
            # JSON lets a lone surrogate through ("\ud800"); no tokenizer or response can take it
            if not _encodable(self.model_dump()):
                raise ValueError("a string in the body is not valid Unicode (a lone surrogate escape)")
            return self

    class StreamOptions(Strict):
        include_usage: bool = Field(False, description="Send a last chunk with the usage, before [DONE].")

    prompt_help = ("Text (a document start and the tags are put before it), a list of texts, or token ids "
                   "(a list of ints, or a list of such lists: used as they are).")

    class CompletionRequest(Strict):
        model: str | None = Field(None, description="The served model's name (GET /v1/models); another is a 404.")
        prompt: str | list[str] | list[int] | list[list[int]] = Field("", description=prompt_help)
        max_tokens: int = Field(16, ge=1, description="Tokens to generate per choice, at most the server's "
                                "--max-tokens.")
        temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, description=helps["temperature"])
        top_p: float = Field(1.0, gt=0, le=1, description=helps["top_p"])
        n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt.")
        stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} strings that end a choice "
                                             "(the text stops before them).")
        seed: int | None = Field(None, ge=0, le=max_seed, description="Seed of the draws (choice j uses seed + j).")
        stream: bool = Field(False, description="Send the text as Server-Sent Events as it comes.")
        stream_options: StreamOptions | None = None
        echo: bool = Field(False, description="Put the prompt before the completion.")
        user: str | None = Field(None, description="Accepted and ignored.")
        top_k: int = Field(0, ge=0, le=MAX_TOP_K, description=helps["top_k"] + " (minigpt's extension)")
        repetition_penalty: float = Field(1.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1],
                                          description=helps["repetition_penalty"] + " (extension)")
        tags: dict[str, str] | None = Field(None, description="Tags to condition on, e.g. {\"lang\": \"tt\"} "
                                            "(GET /info lists the run's; extension).")
        truncate: bool = Field(False, description="Keep the end of a prompt longer than the context instead "
                               "of answering 400 (extension).")
        ignore_eos: bool = Field(False, description="Go on past <|endoftext|> up to max_tokens (extension).")
        logprobs: int | None = Field(None, description="Not supported: only null.")
        best_of: int | None = Field(None, description="Not supported: only null or n.")
        suffix: str | None = Field(None, description="Not supported: only null.")
        logit_bias: dict[str, float] | None = Field(None, description="Not supported: only null or {}.")
        presence_penalty: float = Field(0.0, description="Not supported: only 0 (see repetition_penalty).")
        frequency_penalty: float = Field(0.0, description="Not supported: only 0 (see repetition_penalty).")

    class GenerateRequest(Strict):
        prompt: str | list[str] = Field("", description="Text, or a list of texts (generated in one batch).")
        max_new_tokens: int | None = Field(None, ge=1, description="Tokens per sample (default: the smaller of "
                                           f"{GenerateConfig.max_new_tokens} and the server's --max-tokens).")
        temperature: float = Field(defaults.temperature, ge=0, le=MAX_TEMPERATURE, description=helps["temperature"])
        top_k: int = Field(defaults.top_k, ge=0, le=MAX_TOP_K, description=helps["top_k"])
        top_p: float = Field(defaults.top_p, gt=0, le=1, description=helps["top_p"])
        repetition_penalty: float = Field(defaults.repetition_penalty, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1],
                                          description=helps["repetition_penalty"])
        num_samples: int = Field(1, ge=1, le=MAX_CHOICES, description="Samples per prompt.")
        seed: int | None = Field(None, ge=0, le=max_seed, description="Seed of the draws (sample j uses seed + j).")
        tags: dict[str, str] | None = Field(None, description="Tags to condition on (GET /info lists them).")
        stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} strings that end a sample.")
        stream: bool = Field(False, description="Send the text as Server-Sent Events as it comes.")
        truncate: bool = Field(True, description="Cut the start of a prompt longer than the context (as "
                               "minigpt generate does); false: answer 400.")
        ignore_eos: bool = Field(False, description="Go on past <|endoftext|> up to max_new_tokens.")

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers={"www-authenticate": "Bearer"} if e.status == 401
                            else None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(e.errors()))
        return error_response(ApiError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = (f"no route {request.method} {request.url.path}; see /docs." if e.status_code in (404, 405)
                   else str(e.detail))
        return error_response(ApiError(e.status_code, message, kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        traceback.print_exception(e, file=sys.stderr)
        return error_response(ApiError(500, "the server failed on this request; its log says why.", "server_error"))

    def sampling_of(body: Any) -> Sampling:
        try:
            return Sampling(body.temperature, body.top_k, body.top_p, body.repetition_penalty)
        except UserError as e:
            raise ApiError(400, str(e)) from None

    async def start(ask: Ask) -> Job:
        job = Job(server, ask)
        job.submit()
        metrics.running.inc()

        def account() -> None:  # once, when the stream or the request is over
            if not job.accounted:
                job.accounted = True
                metrics.running.dec()
                metrics.prompt_tokens.inc(job.usage["prompt_tokens"])
                metrics.latency.observe(time.perf_counter() - job.started)

        job.done = account  # type: ignore[method-assign]
        return job

    def failed(job: Job) -> ApiError | None:
        if any(c.finish == "error" for c in job.choices):
            return ApiError(500, "generation failed on the server; its log says why.", "server_error")
        return None

    def streamed(job: Job, request: Request, chunk: Callable[[Choice, str], Any], head: list[Any],
                 tail: Callable[[], list[Any]]) -> StreamingResponse:
        """Both routes' streams: `chunk` frames each piece of text; a failed choice sends OpenAI's error."""

        def framed(c: Choice, text: str) -> Any:
            if c.finish == "error":
                return {"error": failed(job).body()["error"]}  # type: ignore[union-attr]
            return chunk(c, text)

        return StreamingResponse(stream_events(job, request.is_disconnected, framed, head, tail),
                                 media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def finished(job: Job, request: Request) -> None:
        """Both routes without streaming: the job run to its end, counted, and a 500 if it failed."""
        try:
            await finish_job(job, request.is_disconnected)
        finally:
            job.done()
        if (e := failed(job)) is not None:
            raise e

    @app.post("/v1/completions", summary="OpenAI-compatible text completion (streaming with stream: true)")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        server.ready()
        server.check_model(body.model)
        for name, neutral in (("logprobs", None), ("suffix", None), ("presence_penalty", 0.0),
                              ("frequency_penalty", 0.0)):
            if getattr(body, name) != neutral:
                raise ApiError(400, f"{name} is not supported by minigpt serve; leave it out.", param=name)
        if body.best_of not in (None, body.n):
            raise ApiError(400, "best_of is not supported by minigpt serve; leave it out.", param="best_of")
        if body.logit_bias:
            raise ApiError(400, "logit_bias is not supported by minigpt serve; leave it out.", param="logit_bias")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true.", param="stream_options")
        ask = server.ask(body.prompt, body.n, body.max_tokens, sampling_of(body), body.seed, body.tags, body.stop,
                         body.truncate, body.ignore_eos)
        job = await start(ask)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage

            def chunk(c: Choice, text: str) -> dict[str, Any]:
                return head | {"choices": [{"text": text, "index": c.index, "logprobs": None,
                                            "finish_reason": c.finish}]} | ({"usage": None} if usage else {})

            echoes = [chunk(c, c.prompt_text) for c in job.choices] if body.echo else []
            return streamed(job, request, chunk, echoes,
                            lambda: [head | {"choices": [], "usage": job.usage}] if usage else [])
        await finished(job, request)
        return head | {"choices": [{"text": (c.prompt_text if body.echo else "") + c.stream.completion,
                                    "index": c.index, "logprobs": None, "finish_reason": c.finish}
                                   for c in job.choices], "usage": job.usage}

    @app.post("/generate", summary="minigpt's own route: minigpt generate's options as JSON")
    async def generate_route(body: GenerateRequest, request: Request) -> Any:
        server.ready()
        max_new = body.max_new_tokens or min(GenerateConfig.max_new_tokens, cfg.max_tokens)
        ask = server.ask(body.prompt, body.num_samples, max_new, sampling_of(body), body.seed, body.tags, body.stop,
                         body.truncate, body.ignore_eos)
        job = await start(ask)

        def summary() -> dict[str, Any]:
            seconds = time.perf_counter() - job.started
            done = job.usage["completion_tokens"]
            return {"model": server.name, "prompt_tokens": job.usage["prompt_tokens"], "generated_tokens": done,
                    "seconds": round(seconds, 4), "tokens_per_s": round(done / max(seconds, 1e-9), 2)}

        if body.stream:
            return streamed(job, request, lambda c, text: {"index": c.index, "text": text, "finish_reason": c.finish},
                            [], lambda: [summary() | {"done": True}])
        await finished(job, request)
        return summary() | {"samples": [{"index": c.index, "prompt": c.index // ask.n, "text": c.stream.completion,
                                         "tokens": c.tokens, "finish_reason": c.finish} for c in job.choices]}

    def model_card() -> dict[str, Any]:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "minigpt"}

    @app.get("/v1/models", summary="The served model (OpenAI's list shape)")
    async def models() -> Any:
        server.ready()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", summary="One model, by name")
    async def model(model: str) -> Any:
        server.ready()
        server.check_model(model)
        return model_card()

    @app.get("/health", summary="200 once the model is loaded; 503 while it loads or the server shuts down")
    async def health() -> Any:
        if server.engine is None or server.engine.closing:
            status = "failed" if server.failed else "loading" if server.engine is None else "shutting down"
            return JSONResponse({"status": status}, status_code=503)
        running, waiting = server.engine.load()
        return {"status": "ok", "model": server.name, "running": running, "waiting": waiting}

    @app.get("/info", summary="What minigpt info shows, and the server's limits")
    async def info() -> Any:
        server.ready()
        return server.info

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    async def metrics_route() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    page = (resources.files("minigpt") / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return Guard(app, server)


def serve_run(cfg: ServeConfig) -> None:
    """minigpt serve: check the run, the device and the address, then serve until SIGTERM or Ctrl-C."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"minigpt serve needs the serve extra ({e.name} is missing): pip install 'minigpt[serve]'.") \
            from None
    run_dir = resolve_run(cfg.run, cfg.runs_dir)
    with contextlib.suppress(UserError):  # `best` falls back to `last` when the run has no best: load_run says so
        find_checkpoint(run_dir, "last")
        if cfg.checkpoint == "best" and not (run_dir / "best").exists():
            cfg = dataclasses.replace(cfg, checkpoint="last")
    find_checkpoint(run_dir, cfg.checkpoint)
    resolve_device(cfg.device)
    try:
        family = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((cfg.host, cfg.port), family=family)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}); pick another --port "
                        "(or --host).") from None
    api_key = cfg.api_key or os.environ.get("MINIGPT_API_KEY", "")
    failure: list[str] = []

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # running requests get `shutdown_timeout` seconds, then end with finish_reason 'abort' (so their
            # streams close properly); new ones get 503
            engine = app.app.state.server.engine
            if engine is not None:
                engine.drain(cfg.shutdown_timeout)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # as uvicorn's, without sending the signal again once shut down: a graceful stop exits with 0
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    def stop_on_failure(message: str) -> None:
        failure.append(message)
        uv.should_exit = True

    app = create_app(cfg, api_key, stop_on_failure)
    url = f"http://{cfg.host if ':' not in cfg.host else f'[{cfg.host}]'}:{cfg.port}"
    console.print(f"minigpt serve {run_dir} at {url}/ (the page), {url}/docs (the API), {url}/metrics; "
                  f"{'an API key is required' if api_key else 'no API key'}", highlight=False)
    uv = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                                timeout_graceful_shutdown=int(cfg.shutdown_timeout) + 5))
    uv.run(sockets=[sock])
    if failure:
        raise UserError(failure[0])


# --------------------------------------------------------------------------------------------------
# load figures of a running server (minigpt bench --serve URL)

LOAD_PROMPTS = ["def main():", "The", "import os\n", "Әнием", "class Config:", "Москва", "# ", "for i in range("]


def completions_url(url: str) -> tuple[type[http.client.HTTPConnection], str, int, str]:
    """(connection class, host, port, path of /v1/completions) of a server's address, given as its root
    (`http://host:port`) or as the base URL OpenAI clients take (`.../v1`), over http or https."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--serve takes a server's address, like http://127.0.0.1:8000 (or its /v1), not {url!r}.")
    https = parts.scheme == "https"
    path = parts.path.rstrip("/").removesuffix("/v1") + "/v1/completions"
    return (http.client.HTTPSConnection if https else http.client.HTTPConnection, parts.hostname,
            parts.port or (443 if https else 80), path)


def _timed_completion(url: str, prompt: str, new_tokens: int, api_key: str) -> tuple[float, float, int]:
    """(seconds to the first text, seconds in all, tokens) of one streamed completion, read as SSE."""
    connection, host, port, path = completions_url(url)
    conn = connection(host, port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0.8, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {api_key}"} if api_key else {})
    t0, first, tokens, last = time.perf_counter(), None, 0, ""
    try:
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        if response.status != 200:
            raise UserError(f"{url} answered {response.status}: {response.read(300).decode(errors='replace')}")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            last = line
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    finally:
        conn.close()
    if last != "data: [DONE]":
        raise UserError(f"a stream from {url} ended before data: [DONE].")
    return (first or time.perf_counter()) - t0, time.perf_counter() - t0, tokens


def load_bench(url: str, clients: int, new_tokens: int, api_key: str = "") -> dict[str, Any]:
    """The same `clients` streamed requests to a running server, one at a time and then all at once:
    throughput, latency and time to first token (p50, p95) of each way."""
    prompts = [LOAD_PROMPTS[i % len(LOAD_PROMPTS)] for i in range(clients)]
    try:
        _timed_completion(url, prompts[0], 2, api_key)  # warm-up, and the address checked
    except OSError as e:
        raise UserError(f"cannot reach a server at {url} ({e}); start one with minigpt serve.") from None

    def summary(results: list[tuple[float, float, int]], seconds: float) -> dict[str, float]:
        total, ttft = sorted(r[1] for r in results), sorted(r[0] for r in results)
        tokens = sum(r[2] for r in results)
        return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                "latency_p50_s": round(statistics.median(total), 3), "latency_p95_s": round(_p95(total), 3),
                "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p95_s": round(_p95(ttft), 3)}

    t0 = time.perf_counter()
    alone = [_timed_completion(url, p, new_tokens, api_key) for p in prompts]
    one_by_one = summary(alone, time.perf_counter() - t0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        together = list(pool.map(lambda p: _timed_completion(url, p, new_tokens, api_key), prompts))
    at_once = summary(together, time.perf_counter() - t0)
    return {"url": url, "clients": clients, "new_tokens": new_tokens, "one_by_one": one_by_one, "at_once": at_once,
            "speedup": round(at_once["tokens_per_s"] / one_by_one["tokens_per_s"], 2)}


def _p95(sorted_values: list[float]) -> float:
    return sorted_values[min(len(sorted_values) - 1, math.ceil(0.95 * len(sorted_values)) - 1)]
