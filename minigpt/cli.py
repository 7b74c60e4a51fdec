"""The faces' glue: Typer options built from the config dataclasses, and the `minigpt` command
(generate, bench, quantize). The numbered scripts build their options here too."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import time
import typing
from collections.abc import Callable
from typing import Any

import torch
import typer
from rich.table import Table

from .bench import bench_table, run_bench
from .checkpoint import Loaded, load_run
from .config import (
    RECIPE_OPTIONS,
    BenchConfig,
    GenerateConfig,
    ModelConfig,
    QuantizeConfig,
    Sampling,
    with_recipe,
)
from .generate import default_mode, generate, generate_many
from .quantize import quantize_run
from .utils import UserError, atomic_open, console, err_console, human_bytes, resolve_device, rule

# --------------------------------------------------------------------------------------------------
# dataclasses -> Typer options


def cli_command(
    *classes: type, overrides: type | None = None, skip: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn `fn(cfg_a, cfg_b, ...)` into a Typer command whose options are the classes' fields.

    With `overrides`, that class's fields also become options, defaulting to None (the preset
    decides), and `fn` gets a dict of them as its last argument. In a class with a `recipe` field, the
    options a recipe sets default to None, so that the recipe (or else the class default) fills in just
    the ones the command line left out. A `UserError` raised inside (from a config check or the work
    itself) becomes one line on stderr and exit code 2.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        params: dict[str, inspect.Parameter] = {}
        override_names: list[str] = []
        for cls, is_override in [(c, False) for c in classes] + ([(overrides, True)] if overrides else []):
            hints = typing.get_type_hints(cls)
            recipes = {f.name for f in dataclasses.fields(cls)} >= {"recipe"}
            for f in dataclasses.fields(cls):
                if f.name in params or f.name in skip:
                    continue  # shared fields (device, seed...) appear once and feed every class
                flag, help_text, annotation = "--" + f.name.replace("_", "-"), f.metadata["help"], hints[f.name]
                if recipes and f.name in RECIPE_OPTIONS:  # None: the recipe, else the default, decides
                    info = typer.Option(None, flag, help=f"{help_text} (default: {f.default}, or the recipe's)",
                                        show_default=False)
                    annotation = typing.Optional[annotation]  # noqa: UP045
                elif is_override:  # None: the preset decides
                    override_names.append(f.name)
                    names = [f"{flag}/--no-{flag[2:]}"] if annotation is bool else [flag]
                    info = typer.Option(None, *names, help=f"{help_text} [preset]", show_default=False)
                    annotation = typing.Optional[annotation]  # noqa: UP045
                elif f.metadata.get("argument"):
                    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                    info = typer.Argument(default, help=help_text, show_default=False)
                else:
                    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                    info = typer.Option(default, flag, *f.metadata.get("aliases", ()), help=help_text)
                params[f.name] = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)

        @functools.wraps(fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
        def command(**kwargs: Any) -> Any:
            try:
                cfgs = []
                for cls in classes:
                    values = {f.name: kwargs[f.name] for f in dataclasses.fields(cls) if f.name in kwargs}
                    cfgs.append(cls(**(with_recipe(values) if "recipe" in values else values)))
                if overrides is not None:
                    cfgs.append({n: kwargs[n] for n in override_names if kwargs[n] is not None})
                return fn(*cfgs)
            except UserError as e:
                err_console.print(f"[bold red]error:[/] {e}")
                raise typer.Exit(2) from None

        command.__signature__ = inspect.Signature(list(params.values()))  # type: ignore[attr-defined]
        # Typer resolves annotations itself; give it real types, not strings from this module
        command.__annotations__ = {name: p.annotation for name, p in params.items()}
        return command

    return decorate


def script_app(fn: Callable[..., Any]) -> typer.Typer:
    """A one-command Typer app for a numbered script."""
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, rich_markup_mode="rich")
    app.command(help=fn.__doc__)(fn)
    return app


# --------------------------------------------------------------------------------------------------
# minigpt


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
@cli_command(GenerateConfig, Sampling)
def generate_cmd(cfg: GenerateConfig, sampling: Sampling) -> None:
    """Sample text from a trained run (static KV cache, CUDA graph on GPUs; streaming for a single sample)."""
    device = resolve_device(cfg.device)
    loaded = load_run(cfg.run, cfg.checkpoint, device, cfg.runs_dir)
    graph = cfg.cuda_graph and default_mode(device) == "graph"
    decode = ("compiled step, " if cfg.compile else "") + ("cuda graph" if graph else "kv cache")
    console.print(f"[dim]{loaded.folder} | step {loaded.config.get('step')} | {device} | {loaded.matmul} | {decode}[/]",
                  highlight=False)
    prompts = cfg.prompt or [""]
    if cfg.prompt and any(not p.strip() for p in cfg.prompt):
        raise UserError("a --prompt is empty; give some text, or leave --prompt out to sample from scratch.")
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
                rule(f"prompt {i + 1} sample {j + 1}")
                console.print(text + loaded.decode(row), markup=False, highlight=False)
        produced = sum(len(row) for rows in batches for row in rows)
    seconds = time.perf_counter() - t0  # prompts, graph capture and compilation included: what the user waited
    err_console.print(f"[dim]{produced:,} tokens in {seconds:.2f} s ({produced / max(seconds, 1e-9):,.0f} tokens/s, "
                      f"start-up included)[/]", highlight=False)


@app.command("bench")
@cli_command(BenchConfig, overrides=ModelConfig)
def bench_cmd(cfg: BenchConfig, overrides: dict[str, Any]) -> None:
    """Training, generation and data throughput on one device: a table, then one JSON line."""
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
    r = quantize_run(cfg)
    t = Table(title=f"quantize {r['run']} -> {r['out']} ({r['to']}) on {r['device']}")
    for col in ("", "file", "val loss", "val bits/byte", "decode tok/s b1", "decode tok/s b32", "matmul"):
        t.add_column(col, justify="left" if col in ("", "matmul") else "right")
    for label in ("before", "after"):
        x = r[label]
        t.add_row(label, human_bytes(x["bytes"]), f"{x['val_loss']:.4f}", f"{x['val_bpb']:.4f}",
                  f"{x['decode_batch1_tokens_per_s']:,.0f}", f"{x['decode_batch32_tokens_per_s']:,.0f}", x["matmul"])
    t.caption = (f"size x{r['size_ratio']:.3f} | val bits/byte {r['val_bpb_change_pct']:+.3f}% on "
                 f"{r['val_tokens']:,} tokens")
    console.print(t)
    print(json.dumps(r, separators=(",", ":")))


def main() -> None:
    torch.set_grad_enabled(False)
    app()


if __name__ == "__main__":
    main()
