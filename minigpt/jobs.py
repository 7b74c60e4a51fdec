"""Requests as engine work, with no web framework: a request's prompts and choices become engine
sequences (`Job`), their tokens come back as text events (decoded as they come, stop strings honoured)
with the usage; `Server` holds what every request shares (the run, the engine, the limits) and checks
what both routes ask for. A refusal is an `ApiError`: an HTTP status and OpenAI's error shape, which
the HTTP face (`serve.py`) sends as it is.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .checkpoint import Loaded, load_run, run_info
from .config import Sampling, ServeConfig
from .engine import Closing, Engine, QueueFull, Sequence, TextStream
from .utils import UserError, resolve_device

MAX_CHOICES = 16  # `n` / `num_samples` per request
MAX_STOPS = 4  # stop strings per request, as OpenAI allows


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

    def __init__(self, server: Server, ask: Ask) -> None:
        self.server, self.ask = server, ask
        loaded, T = server.loaded, server.loaded.model.cfg.block_size
        self.queue: asyncio.Queue[tuple[int, int | None, str | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.choices: list[Choice] = []
        self.started = time.perf_counter()
        self.gone = False  # the client went away
        self.accounted = False
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

    def done(self) -> None:
        """Counted once, when the stream or the request is over."""
        if not self.accounted:
            self.accounted = True
            metrics = self.server.metrics
            metrics.running.dec()
            metrics.prompt_tokens.inc(self.usage["prompt_tokens"])
            metrics.latency.observe(time.perf_counter() - self.started)

    def failure(self) -> ApiError | None:
        if any(c.finish == "error" for c in self.choices):
            return ApiError(500, "generation failed on the server; its log says why.", "server_error")
        return None

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


class Server:
    """What the routes share: the settings, the run once loaded, the engine, the metrics."""

    def __init__(self, cfg: ServeConfig, api_key: str, metrics: Any) -> None:
        self.cfg, self.api_key, self.metrics = cfg, api_key, metrics
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
            engine = Engine(loaded.model, loaded.eot, self.cfg.max_batch, self.cfg.max_queue, self.metrics)
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

    def start(self, ask: Ask) -> Job:
        """The request's sequences into the engine (a 429 when its queue is full), counted as running."""
        job = Job(self, ask)
        job.submit()
        self.metrics.running.inc()
        return job

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
