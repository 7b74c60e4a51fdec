"""`minigpt bench`: training, inference and data throughput on one device, as a table and one JSON line.

Every figure is measured here, on random weights of a preset's shape or on a trained run:
- training: ms/step, tokens/s, MFU, peak memory, for the eager model and (on CUDA and CPU) the compiled one;
- inference: prefill tokens/s for a prompt (to its first new token); decode tokens/s and ms/token
  p50/p95 at batch 1 (streamed), and tokens/s at batch 1, 8 and 32, for each decode mode in
  DECODE_MODES (the CUDA-graph ones on CUDA);
- data: batches/s and tokens/s from the memmap shards, tokenizer encode MB/s;
- with --profile DIR: torch.profiler traces and top-operator tables of training steps and of decoding;
- with --serve URL: a running server's throughput, latency and time to first token under load.
MFU is against the device's bf16 dense peak from a table, or a measured matmul rate when unknown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import itertools
import json
import math
import platform
import resource
import statistics
import sys
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.console import Group
from rich.table import Table

from .checkpoint import load_run
from .compilation import cpp_compiler
from .config import BenchConfig, Sampling, TrainConfig, model_config
from .corpus import iter_documents
from .data import BatchSampler, TokenData, load_tokenizer
from .generate import DECODE_MODES, Decoder, default_mode, generate_reference
from .model import GPT
from .optim import Optimizers
from .utils import (
    UserError,
    autocast,
    console,
    first_line,
    human_count,
    peak_flops,
    resolve_device,
    resolve_dtype,
    set_matmul_precision,
    sync,
)

BATCHES = (1, 8, 32)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def measured_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the MFU yardstick for devices missing from the peak table."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def peak_memory(device: torch.device) -> float:
    """GiB: the allocator's peak on CUDA; on MPS the memory its driver holds (MPS keeps no peak); on a CPU the
    process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    return max_rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**30


def max_rss_bytes(ru_maxrss: int, system: str = sys.platform) -> int:
    """getrusage's peak resident set in bytes: macOS counts it in bytes, Linux (and the BSDs) in KiB."""
    return ru_maxrss if system == "darwin" else ru_maxrss * 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":  # no peak there: at least drop what the last phase cached
        torch.mps.empty_cache()


def train_step(model: GPT, cfg: BenchConfig, device: torch.device, dtype: torch.dtype, compiled: bool,
               kind: str = "adamw") -> Callable[[], None]:
    """One optimizer step on a fixed random batch: forward and backward under autocast, clip, the update
    (`kind`: adamw, or muon for the blocks' matrices beside AdamW, as training runs them)."""
    T = model.cfg.block_size
    model.train()
    step_model: Callable[..., Any] = torch.compile(model, mode=cfg.compile_mode) if compiled else model
    optimizer = Optimizers(model, TrainConfig(lr=1e-4, optimizer=kind), device)
    x = torch.randint(0, model.cfg.vocab_size, (cfg.batch_size, T + 1), device=device)

    @torch.enable_grad()  # the CLI turns gradients off for inference
    def step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # for --compile-mode reduce-overhead; a no-op otherwise
        with autocast(device, dtype):
            loss = step_model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in optimizer.all:
            o.step()
        optimizer.zero_grad()

    return step


def bench_train(
    model: GPT, cfg: BenchConfig, device: torch.device, dtype: torch.dtype, compiled: bool, peak: float,
    kind: str = "adamw",
) -> dict[str, Any]:
    T = model.cfg.block_size
    step = train_step(model, cfg, device, dtype, compiled, kind)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(device)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / cfg.steps
    tok_s = cfg.batch_size * T / dt
    model.eval()
    return {
        "ms_per_step": dt * 1000, "tokens_per_s": tok_s, "mfu": model.flops_per_token() * tok_s / peak,
        "peak_memory_gib": peak_memory(device), "warmup_s": warmup, "batch_size": cfg.batch_size, "block_size": T,
    }


def make_decoder(model: GPT, rows: int, new: int, mode: str) -> Decoder:
    return Decoder(model, rows, new, Sampling(temperature=0), graph=mode in ("graph", "compiled"),
                   compile=mode == "compiled")


def _device(model: GPT) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def bench_inference(model: GPT, cfg: BenchConfig, mode: str) -> dict[str, Any]:
    """Prefill and decode figures for one decode mode (a key of DECODE_MODES)."""
    device, T = _device(model), model.cfg.block_size
    prompt_len = min(cfg.prompt_tokens, T // 2)
    new = min(cfg.new_tokens, T - prompt_len)
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=g).tolist()
    x = torch.tensor([prompt], device=device)
    out: dict[str, Any] = {"prompt_tokens": prompt_len, "new_tokens": new}

    reset_peak(device)
    t0 = time.perf_counter()
    decoder = make_decoder(model, 1, new, mode) if mode != "plain" else None
    sync(device)
    out["setup_s"] = time.perf_counter() - t0  # graph capture and compilation

    # prefill: the whole prompt through the model, up to its first new token
    prefill = (lambda: model(x, last_only=True)) if decoder is None else (lambda: decoder.start([prompt]))
    prefill()
    sync(device)
    reps, t0 = 5, time.perf_counter()
    for _ in range(reps):
        prefill()
    sync(device)
    out["prefill_tokens_per_s"] = prompt_len * reps / (time.perf_counter() - t0)

    # batch 1, streamed: every token reaches the host, as `minigpt generate` shows it
    stamps: list[float] = []

    def stamp(_: int) -> None:
        stamps.append(time.perf_counter())

    greedy = Sampling(temperature=0)
    if decoder is None:
        generate_reference(model, prompt, 4, greedy, 1)  # warm-up
        t0 = time.perf_counter()
        generate_reference(model, prompt, new, greedy, 1, on_token=stamp)
    else:
        decoder.run([prompt])  # warm-up
        t0 = time.perf_counter()
        decoder.run([prompt], on_token=stamp)
    gaps = [b - a for a, b in itertools.pairwise([t0, *stamps])][1:]  # the first gap is the prefill
    out["ms_per_token_p50"] = statistics.median(gaps) * 1000
    out["ms_per_token_p95"] = sorted(gaps)[max(0, int(0.95 * len(gaps)) - 1)] * 1000
    for rows in BATCHES:
        out[f"decode_batch{rows}_tokens_per_s"] = decode_tokens_per_s(model, prompt, new, rows, mode)
    out["peak_memory_gib"] = peak_memory(device)
    return out


@torch.no_grad()
def decode_tokens_per_s(model: GPT, prompt: list[int], new: int, rows: int, mode: str) -> float:
    """Greedy decoding throughput of all rows, without streaming, the prefill (and its first token) excluded."""
    device = _device(model)
    x = torch.tensor([prompt] * rows, device=device)
    if mode == "plain":
        greedy = Sampling(temperature=0)
        run = lambda: generate_reference(model, prompt, new, greedy, rows)  # noqa: E731
        prefill = lambda: model(x, last_only=True)  # noqa: E731
        generate_reference(model, prompt, 2, greedy, rows)  # warm-up (short: this path is slow)
    else:
        decoder = make_decoder(model, rows, new, mode)
        run, prefill = (lambda: decoder.run([prompt] * rows)), (lambda: decoder.start([prompt] * rows))
        run()  # warm-up
    times = []
    for fn in (prefill, run):  # the best of a few runs: the figure the device can reach, less the noise
        best = float("inf")
        for _ in range(1 if mode == "plain" else 3):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    return rows * (new - 1) / max(times[1] - times[0], 1e-9)


def profile_steps(
    model: GPT | None, inference_model: GPT, cfg: BenchConfig, device: torch.device, dtype: torch.dtype, folder: Path
) -> dict[str, Any]:
    """torch.profiler over three training steps (compiled on CUDA when --compile) and over one batch-1
    generation in the default decode mode: a Chrome/Perfetto trace and a top-operator table for each."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    jobs: dict[str, Callable[[], Any]] = {}
    if model is not None:
        step = train_step(model, cfg, device, dtype, compiled=cfg.compile and cuda)
        jobs["train"] = lambda: [step() for _ in range(3)]
    T = inference_model.cfg.block_size
    prompt_len = min(cfg.prompt_tokens, T // 2)
    new = min(cfg.new_tokens, T - prompt_len)
    inference_model.eval()
    decoder = make_decoder(inference_model, 1, new, default_mode(device))
    prompt = torch.randint(0, inference_model.cfg.vocab_size, (prompt_len,)).tolist()
    jobs["decode"] = lambda: decoder.run([prompt])
    out: dict[str, Any] = {}
    for name, job in jobs.items():
        job()  # warm-up (and compilation) outside the trace
        sync(device)
        with profile(activities=activities) as prof:
            job()
            sync(device)
        if model is not None:
            model.eval()
        trace = folder / f"{name}_trace.json"
        tmp = trace.with_suffix(".tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(trace)
        events = prof.key_averages()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        table = events.table(sort_by=key, row_limit=15)
        (folder / f"{name}_top.txt").write_text(table + "\n", encoding="utf-8")
        console.print(f"[bold]profile: {name}[/] ({trace})")
        console.print(table, markup=False, highlight=False, soft_wrap=True)
        top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:10]
        out[name] = {"trace": str(trace), "table": str(folder / f"{name}_top.txt"), "sorted_by": key,
                     "top": [{"name": e.key, "self_ms": getattr(e, key) / 1000, "calls": e.count} for e in top]}
    return out


def bench_data(data: TokenData, block: int, batch: int) -> dict[str, Any]:
    sampler = BatchSampler(data.train, block, seed=0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        sampler.read(*sampler.global_batch(batch))
        n += 1
    dt = time.perf_counter() - t0
    out: dict[str, Any] = {"batches_per_s": n / dt, "tokens_per_s": n * batch * (block + 1) / dt,
                           "encode_mb_per_s": None}
    dataset = Path(data.meta["dataset"])
    if dataset.exists():
        tok = load_tokenizer(data.folder / "tokenizer.json")
        texts, size = [], 0
        for text, _ in iter_documents(dataset, "train"):
            texts.append(text)
            size += len(text.encode())
            if size > 4 << 20:
                break
        t0 = time.perf_counter()
        tok.encode_batch_fast(texts, add_special_tokens=False)
        out["encode_mb_per_s"] = size / 1e6 / (time.perf_counter() - t0)
    return out


def run_bench(cfg: BenchConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    set_matmul_precision(device, dtype)  # as training runs: TF32 matmuls for fp32 on Ampere and newer
    if cfg.profile:  # fail before the timings, not after
        try:
            Path(cfg.profile).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot use --profile {cfg.profile} as a folder ({e.strerror}); give another path.") from None
    torch.manual_seed(cfg.seed)
    data_path = cfg.data
    if cfg.run:
        loaded = load_run(cfg.run, "best", device, cfg.runs_dir)
        model = loaded.model
        data_path = data_path or loaded.config["data"].get("folder")
        source = f"{loaded.folder} ({loaded.matmul})"
    else:
        vocab = overrides.pop("vocab_size", None) or 8192
        model = GPT(model_config(cfg.preset, vocab, overrides)).to(device)
        source = f"random weights, preset {cfg.preset}"
        if not data_path and Path("data/stdlib").exists():
            data_path = "data/stdlib"
    peak = peak_flops(device)
    peak_source = "table"
    if peak is None:
        peak = measured_matmul_flops(device, dtype if device.type != "cpu" else torch.float32)
        peak_source = "measured matmul"

    result: dict[str, Any] = {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."), "source": source, "model": dataclasses.asdict(model.cfg),
        "params": model.num_params(), "flops_per_token": model.flops_per_token(),
        "peak_flops": peak, "peak_source": peak_source, "settings": dataclasses.asdict(cfg),
    }
    trainable = not any(b.dtype == torch.int8 for b in model.buffers())
    with console.status("timing training steps..."):
        result["train"] = {"eager": bench_train(model, cfg, device, dtype, False, peak) if trainable else None}
        compiled = None
        if trainable and cfg.compile and (device.type == "cuda" or (device.type == "cpu" and cpp_compiler())):
            try:  # CPU: inductor's C++, ~40 s to compile the first time
                compiled = bench_train(model, cfg, device, dtype, True, peak)
            except Exception as e:  # a broken toolchain: the other figures still stand
                if device.type == "cuda":
                    raise
                first = first_line(e)
                console.print(f"[yellow]the compiled step failed on cpu ({first}); no compiled figures[/]")
        result["train"]["compiled"] = compiled
        # the same eager step with Muon for the blocks' matrices (--optimizer muon)
        result["train"]["muon"] = bench_train(model, cfg, device, dtype, False, peak, "muon") if trainable else None
    inference_model = model
    if trainable and device.type == "cuda" and dtype != torch.float32:  # decode in the training precision's weights
        inference_model = GPT(model.cfg).to(device, dtype)
        inference_model.load_state_dict(model.state_dict())
    inference_model.eval()
    with console.status("timing generation..."):
        modes = ["plain", "cache"] + (["graph"] + (["compiled"] if cfg.compile else []) if device.type == "cuda" else [])
        result["inference"] = {m: bench_inference(inference_model, cfg, m) if m in modes else None for m in DECODE_MODES}
    result["profile"] = None
    if cfg.profile:
        with console.status("profiling..."):
            result["profile"] = profile_steps(model if trainable else None, inference_model, cfg, device, dtype,
                                              Path(cfg.profile))
    result["data"] = None
    if data_path:
        try:
            data = TokenData(data_path)
            with console.status("timing data loading..."):
                result["data"] = bench_data(data, model.cfg.block_size, cfg.batch_size)
        except UserError as e:
            console.print(f"[yellow]data figures skipped: {e}[/]")
    return result


def bench_table(r: dict[str, Any]) -> Group:
    """Three small tables (training, generation, data), with a column only for the modes that ran."""
    fmt = lambda v, f="{:,.0f}": "-" if v is None else f.format(v)  # noqa: E731

    def table(title: str, columns: dict[str, dict[str, Any]], rows: list[tuple[str, str, str]]) -> Table:
        t = Table(title=title, title_justify="left")
        t.add_column("figure")
        for name in columns:
            t.add_column(name, justify="right")
        for label, key, f in rows:
            t.add_row(label, *(fmt(c.get(key), f) for c in columns.values()))
        return t

    m = r["model"]
    head = (f"[bold]minigpt bench[/]: {r['device_name']} ({r['device']}, {r['dtype']}), torch {r['torch']}\n"
            f"{r['source']}: {human_count(r['params'])} parameters, {m['n_layer']} layers x {m['n_embd']}, "
            f"context {m['block_size']}, vocab {m['vocab_size']}; MFU against {r['peak_flops'] / 1e12:.3g} "
            f"TFLOP/s ({r['peak_source']})")
    parts: list[Any] = [head]
    train = {k: v for k, v in r["train"].items() if v}
    if train:
        parts.append(table("training", train, [
            ("ms / step", "ms_per_step", "{:.1f}"), ("tokens / s", "tokens_per_s", "{:,.0f}"),
            ("MFU", "mfu", "{:.1%}"), ("peak memory GiB", "peak_memory_gib", "{:.2f}")]))
    modes = {k: v for k, v in r["inference"].items() if v}
    prompt = next(iter(modes.values()))["prompt_tokens"]
    parts.append(table("generation (greedy)", modes, [
        (f"prefill tokens/s ({prompt} prompt)", "prefill_tokens_per_s", "{:,.0f}"),
        ("decode tokens/s, batch 1", "decode_batch1_tokens_per_s", "{:,.0f}"),
        ("ms/token p50, batch 1 streamed", "ms_per_token_p50", "{:.3f}"),
        ("ms/token p95, batch 1 streamed", "ms_per_token_p95", "{:.3f}"),
        ("decode tokens/s, batch 8", "decode_batch8_tokens_per_s", "{:,.0f}"),
        ("decode tokens/s, batch 32", "decode_batch32_tokens_per_s", "{:,.0f}"),
        ("setup s (capture, compile)", "setup_s", "{:.2f}"),
        ("peak memory GiB", "peak_memory_gib", "{:.2f}")]))
    parts.append("modes: " + "; ".join(f"{k} = {DECODE_MODES[k]}" for k in modes))
    if r["data"]:
        parts.append(table("data", {"value": r["data"]}, [
            ("batches / s", "batches_per_s", "{:,.0f}"), ("tokens / s", "tokens_per_s", "{:,.0f}"),
            ("tokenizer encode MB/s", "encode_mb_per_s", "{:.2f}")]))
    return Group(*parts)


# --------------------------------------------------------------------------------------------------
# a running server under load (minigpt bench --serve URL): an HTTP client of its own, no serve extra needed

LOAD_PROMPTS = ["def main():", "The", "import os\n", "Әнием", "class Config:", "Москва", "# ", "for i in range("]


def completions_url(url: str) -> tuple[type[http.client.HTTPConnection], str, int, str]:
    """(connection class, host, port, path of /v1/completions) of a server's address, given as its root
    (`http://host:port`) or as the base URL OpenAI clients take (`.../v1`), over http or https."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise UserError(f"--serve takes a server's address, like http://127.0.0.1:8000 (or its /v1), not {url!r}.")
    https = parts.scheme == "https"
    path = parts.path.rstrip("/").removesuffix("/v1/completions").removesuffix("/v1") + "/v1/completions"
    return (http.client.HTTPSConnection if https else http.client.HTTPConnection, parts.hostname,
            port or (443 if https else 80), path)


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
