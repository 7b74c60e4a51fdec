"""The `minigpt` command: generate, bench, quantize."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
import typer

from .common import UserError, console, err_console
from .config import BenchConfig, GenerateConfig, ModelConfig, QuantizeConfig, cli_command
from .generate import Loaded, Sampling, generate, generate_many, graph_by_default, load_run
from .train import resolve_device

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
    help="minigpt: train small GPT models from scratch. The pipeline: 01_prepare_data.py, "
    "02_train_tokenizer.py, 03_train.py, quick_test.py (or bash run_pipeline.sh).",
)


@app.callback()
def _root() -> None:
    """Keeps `minigpt <command>` a group even while it has one command."""


def prompt_ids(loaded: Loaded, text: str) -> list[int]:
    """<|endoftext|> + the prompt (a document start, as in training), left-truncated to fit the context."""
    ids = [loaded.eot, *loaded.encode(text)]
    room = loaded.model.cfg.block_size - 1
    if len(ids) > room:
        err_console.print(f"[yellow]the prompt has {len(ids)} tokens; keeping the last {room} (the context is "
                          f"{room + 1})[/]")
        ids = ids[-room:]
    return ids


class Streamer:
    """Prints row 0's text as tokens arrive, holding back a character cut in the middle of its bytes.

    Only the tokens not yet printed are decoded (both tokenizers decode token by token into bytes, so
    a suffix that starts on a whole character decodes on its own): linear in the sample's length.
    """

    def __init__(self, loaded: Loaded) -> None:
        self.loaded, self.pending = loaded, []

    def __call__(self, token: int) -> None:
        if token == self.loaded.eot:
            return
        self.pending.append(token)
        text = self.loaded.decode(self.pending)
        if not text.endswith("\ufffd"):
            self.write(text)

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.pending = []

    def flush(self) -> None:
        """Whatever is still held back (bytes that never became a character) at the end."""
        if self.pending:
            self.write(self.loaded.decode(self.pending))


@app.command("generate")
@cli_command(GenerateConfig)
def generate_cmd(cfg: GenerateConfig) -> None:
    """Sample text from a trained run (static KV cache, CUDA graph on GPUs; streaming for a single sample)."""
    device = resolve_device(cfg.device)
    loaded = load_run(cfg.run, cfg.checkpoint, device)
    graph = cfg.cuda_graph and graph_by_default(device)
    decode = ("compiled step, " if cfg.compile else "") + ("cuda graph" if graph else "kv cache")
    console.print(f"[dim]{loaded.folder} | step {loaded.config.get('step')} | {device} | {loaded.path} | {decode}[/]",
                  highlight=False)
    prompts = cfg.prompt or [""]
    if cfg.prompt and any(not p.strip() for p in cfg.prompt):
        raise UserError("a --prompt is empty; give some text, or leave --prompt out to sample from scratch.")
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
    stream = cfg.stream and len(prompts) == 1 and cfg.num_samples == 1
    t0 = time.perf_counter()
    ids = [prompt_ids(loaded, text) for text in prompts]
    if stream:
        sys.stdout.write(prompts[0])
        streamer = Streamer(loaded)
        rows = generate(loaded.model, ids[0], cfg.max_new_tokens, sampling, 1, loaded.eot, cfg.seed, streamer,
                        graph=graph, compile=cfg.compile)
        streamer.flush()
        sys.stdout.write("\n")
        produced = len(rows[0])
    else:  # every prompt and sample in one batch
        batches = generate_many(loaded.model, ids, cfg.max_new_tokens, sampling, cfg.num_samples, loaded.eot,
                                cfg.seed, graph=graph, compile=cfg.compile)
        for i, (text, rows) in enumerate(zip(prompts, batches, strict=True)):
            for j, row in enumerate(rows):
                console.rule(f"prompt {i + 1} sample {j + 1}")
                console.print(text + loaded.decode(row), markup=False, highlight=False)
        produced = sum(len(row) for rows in batches for row in rows)
    seconds = time.perf_counter() - t0  # prompts, graph capture and compilation included: what the user waited
    err_console.print(f"[dim]{produced:,} tokens in {seconds:.2f} s ({produced / max(seconds, 1e-9):,.0f} tokens/s, "
                      f"start-up included)[/]", highlight=False)


@app.command("bench")
@cli_command(BenchConfig, overrides=ModelConfig)
def bench_cmd(cfg: BenchConfig, overrides: dict[str, Any]) -> None:
    """Training, generation and data throughput on one device: a table, then one JSON line."""
    from .bench import bench_table, run_bench
    from .common import atomic_open

    result = run_bench(cfg, overrides)
    console.print(bench_table(result))
    line = json.dumps(result, separators=(",", ":"))
    if cfg.json:
        with atomic_open(cfg.json, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line)


@app.command("quantize")
@cli_command(QuantizeConfig)
def quantize_cmd(cfg: QuantizeConfig) -> None:
    """int8 (weight-only) or bf16/fp16 copy of a run, with size, val bits per byte and speed before/after."""
    from rich.table import Table

    from .common import human_bytes
    from .quantize import quantize_run

    r = quantize_run(cfg)
    t = Table(title=f"quantize {r['run']} -> {r['out']} ({r['to']}) on {r['device']}")
    for col in ("", "file", "val loss", "val bits/byte", "decode tok/s b1", "decode tok/s b32", "matmul path"):
        t.add_column(col, justify="left" if col in ("", "matmul path") else "right")
    for label in ("before", "after"):
        x = r[label]
        t.add_row(label, human_bytes(x["bytes"]), f"{x['val_loss']:.4f}", f"{x['val_bpb']:.4f}",
                  f"{x['decode_batch1_tokens_per_s']:,.0f}", f"{x['decode_batch32_tokens_per_s']:,.0f}", x["path"])
    t.caption = (f"size x{r['size_ratio']:.3f} | val bits/byte {r['val_bpb_change_pct']:+.3f}% on "
                 f"{r['val_tokens']:,} tokens")
    console.print(t)
    print(json.dumps(r, separators=(",", ":")))


def main() -> None:
    torch.set_grad_enabled(False)
    app()


if __name__ == "__main__":
    main()
