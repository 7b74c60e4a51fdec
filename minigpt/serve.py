"""minigpt serve: a run behind an OpenAI-compatible HTTP API (FastAPI, uvicorn and prometheus_client: the
`serve` extra). The HTTP face only: request bodies, routes, error shapes, the guard in front of every
route (Host names, the API key, the body limit), Prometheus metrics and the server's life. Requests
become engine work in `jobs.py`; the engine (`engine.py`) decodes them together with continuous batching.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations at run time
import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import resources
from typing import Any

from .checkpoint import find_checkpoint, resolve_run
from .config import GenerateConfig, Sampling, ServeConfig
from .jobs import MAX_CHOICES, MAX_STOPS, ApiError, Choice, Job, Server
from .utils import UserError, console, err_console, resolve_device

# bounds that keep every setting a finite float32 on the device (the fuzz pass found 1e308)
MAX_TEMPERATURE, MAX_TOP_K, PENALTY_RANGE = 100.0, 2**31 - 1, (0.01, 100.0)

# --------------------------------------------------------------------------------------------------
# Host names, and events


LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})


def host_names(host: str, extra: list[str]) -> frozenset[str] | None:
    """The Host names a server bound to `host` answers to besides any IP address (None: any name): the
    loopback names and the bound one, this machine's names when it listens on every interface, and `extra`."""
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


def host_allowed(name: str, hosts: frozenset[str]) -> bool:
    """An address (a LAN or public IP, whatever the interface) or a listed name: DNS rebinding always
    arrives under a name."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return True
    return name in hosts


def host_of(header: str) -> str:
    """The name in a Host header: `name:port`, `[v6]:port` or `name`."""
    name = header.strip().lower()
    if name.startswith("["):
        return name[1 : name.find("]")] if "]" in name else name[1:]
    return name.rsplit(":", 1)[0].rstrip(".") if name.count(":") == 1 else name.rstrip(".")


async def finish_job(job: Job, disconnected: Callable[[], Any]) -> None:
    """Run a request to its end (non-streaming)."""
    watcher = asyncio.ensure_future(job.watch(disconnected))
    try:
        async for _ in job.events():
            pass
    finally:
        watcher.cancel()
        job.cancel()


# JSON leaves these raw, yet clients that split lines as Python's str.splitlines does (httpx) break on them
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj: Any) -> str:
    """One server-sent event: UTF-8 JSON on one line, whatever the client takes for a line break."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':')).translate(_LINE_BREAKS)}\n\n"


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
    """ASGI middleware: the Host name, the API key, the body limit (the body is read here, at most
    `max_body` bytes), and request counts by route and status."""

    def __init__(self, app: Any, server: Server) -> None:
        self.app, self.server = app, server
        self.hosts = host_names(server.cfg.host, server.cfg.allowed_hosts)

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
            hosts, host = self.hosts, headers.get("host")
            if hosts is not None and host is not None and not host_allowed(host_of(host), hosts):
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
# request bodies: pydantic comes with the serve extra; without it this module still imports (the CLI lists
# `serve`) and `serve_run` says what to install


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


try:
    from pydantic import BaseModel, ConfigDict, Field, model_validator
except ImportError:
    BaseModel = None

if BaseModel is not None:
    _HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(Sampling)}
    _DEFAULT = Sampling()
    _MAX_SEED = 2**63 - 1 - MAX_CHOICES  # choice j of a seed draws with seed + j

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

    class CompletionRequest(Strict):
        model: str | None = Field(None, description="The served model's name (GET /v1/models); another is a 404.")
        prompt: str | list[str] | list[int] | list[list[int]] = Field(
            "", description="Text (a document start and the tags are put before it), a list of texts, or token "
            "ids (a list of ints, or a list of such lists: used as they are).")
        max_tokens: int = Field(16, ge=1, description="Tokens to generate per choice, at most the server's "
                                "--max-tokens.")
        temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, description=_HELP["temperature"])
        top_p: float = Field(1.0, gt=0, le=1, description=_HELP["top_p"])
        n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt.")
        stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} strings that end a choice "
                                             "(the text stops before them).")
        seed: int | None = Field(None, ge=0, le=_MAX_SEED, description="Seed of the draws (choice j uses seed + j).")
        stream: bool = Field(False, description="Send the text as Server-Sent Events as it comes.")
        stream_options: StreamOptions | None = None
        echo: bool = Field(False, description="Put the prompt before the completion.")
        user: str | None = Field(None, description="Accepted and ignored.")
        top_k: int = Field(0, ge=0, le=MAX_TOP_K, description=_HELP["top_k"] + " (minigpt's extension)")
        repetition_penalty: float = Field(1.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1],
                                          description=_HELP["repetition_penalty"] + " (extension)")
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
        temperature: float = Field(_DEFAULT.temperature, ge=0, le=MAX_TEMPERATURE, description=_HELP["temperature"])
        top_k: int = Field(_DEFAULT.top_k, ge=0, le=MAX_TOP_K, description=_HELP["top_k"])
        top_p: float = Field(_DEFAULT.top_p, gt=0, le=1, description=_HELP["top_p"])
        repetition_penalty: float = Field(_DEFAULT.repetition_penalty, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1],
                                          description=_HELP["repetition_penalty"])
        num_samples: int = Field(1, ge=1, le=MAX_CHOICES, description="Samples per prompt.")
        seed: int | None = Field(None, ge=0, le=_MAX_SEED, description="Seed of the draws (sample j uses seed + j).")
        tags: dict[str, str] | None = Field(None, description="Tags to condition on (GET /info lists them).")
        stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} strings that end a sample.")
        stream: bool = Field(False, description="Send the text as Server-Sent Events as it comes.")
        truncate: bool = Field(True, description="Cut the start of a prompt longer than the context (as "
                               "minigpt generate does); false: answer 400.")
        ignore_eos: bool = Field(False, description="Go on past <|endoftext|> up to max_new_tokens.")


def sampling_of(body: Any) -> Sampling:
    try:
        return Sampling(body.temperature, body.top_k, body.top_p, body.repetition_penalty)
    except UserError as e:
        raise ApiError(400, str(e)) from None


# --------------------------------------------------------------------------------------------------
# the app


def create_app(cfg: ServeConfig, api_key: str = "", on_load_error: Callable[[str], None] | None = None) -> Any:
    """The FastAPI app (routes, error shapes, the guard, metrics). It loads the run in a thread when it
    starts; /health says 503 until the model is ready."""
    from fastapi import FastAPI

    server = Server(cfg, api_key, Metrics())

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
    _error_handlers(app)
    _generation_routes(app, server)
    _other_routes(app, server)
    return Guard(app, server)


def error_response(e: ApiError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status, headers={"www-authenticate": "Bearer"} if e.status == 401
                        else None)


def _error_handlers(app: Any) -> None:
    """Every error in OpenAI's shape: ours, pydantic's, routing's, and a bug's (a 500 that names no detail)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> Any:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Any:
        message, param = _validation_message(list(e.errors()))
        return error_response(ApiError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> Any:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = (f"no route {request.method} {request.url.path}; see /docs." if e.status_code in (404, 405)
                   else str(e.detail))
        return error_response(ApiError(e.status_code, message, kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> Any:
        traceback.print_exception(e, file=sys.stderr)
        return error_response(ApiError(500, "the server failed on this request; its log says why.", "server_error"))


def _streamed(job: Job, request: Any, chunk: Callable[[Choice, str], Any], head: list[Any],
              tail: Callable[[], list[Any]]) -> Any:
    """Both routes' streams: `chunk` frames each piece of text; a failed choice sends OpenAI's error."""
    from fastapi.responses import StreamingResponse

    def framed(c: Choice, text: str) -> Any:
        if c.finish == "error":
            return {"error": job.failure().body()["error"]}  # type: ignore[union-attr]
        return chunk(c, text)

    return StreamingResponse(stream_events(job, request.is_disconnected, framed, head, tail),
                             media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def _finished(job: Job, request: Any) -> None:
    """Both routes without streaming: the job run to its end, counted, and a 500 if it failed."""
    try:
        await finish_job(job, request.is_disconnected)
    finally:
        job.done()
    if (e := job.failure()) is not None:
        raise e


def _generation_routes(app: Any, server: Server) -> None:
    from fastapi import Request

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
        job = server.start(server.ask(body.prompt, body.n, body.max_tokens, sampling_of(body), body.seed, body.tags,
                                      body.stop, body.truncate, body.ignore_eos))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage

            def chunk(c: Choice, text: str) -> dict[str, Any]:
                return head | {"choices": [{"text": text, "index": c.index, "logprobs": None,
                                            "finish_reason": c.finish}]} | ({"usage": None} if usage else {})

            echoes = [chunk(c, c.prompt_text) for c in job.choices] if body.echo else []
            return _streamed(job, request, chunk, echoes,
                             lambda: [head | {"choices": [], "usage": job.usage}] if usage else [])
        await _finished(job, request)
        return head | {"choices": [{"text": (c.prompt_text if body.echo else "") + c.stream.completion,
                                    "index": c.index, "logprobs": None, "finish_reason": c.finish}
                                   for c in job.choices], "usage": job.usage}

    @app.post("/generate", summary="minigpt's own route: minigpt generate's options as JSON")
    async def generate_route(body: GenerateRequest, request: Request) -> Any:
        server.ready()
        max_new = body.max_new_tokens or min(GenerateConfig.max_new_tokens, server.cfg.max_tokens)
        ask = server.ask(body.prompt, body.num_samples, max_new, sampling_of(body), body.seed, body.tags, body.stop,
                         body.truncate, body.ignore_eos)
        job = server.start(ask)

        def summary() -> dict[str, Any]:
            seconds = time.perf_counter() - job.started
            done = job.usage["completion_tokens"]
            return {"model": server.name, "prompt_tokens": job.usage["prompt_tokens"], "generated_tokens": done,
                    "seconds": round(seconds, 4), "tokens_per_s": round(done / max(seconds, 1e-9), 2)}

        if body.stream:
            return _streamed(job, request, lambda c, text: {"index": c.index, "text": text, "finish_reason": c.finish},
                             [], lambda: [summary() | {"done": True}])
        await _finished(job, request)
        return summary() | {"samples": [{"index": c.index, "prompt": c.index // ask.n, "text": c.stream.completion,
                                         "tokens": c.tokens, "finish_reason": c.finish} for c in job.choices]}


def _other_routes(app: Any, server: Server) -> None:
    """The model list, health, info, metrics and the page."""
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    page = (resources.files("minigpt") / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)


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
