"""The faces' glue: Typer options built from the config dataclasses, and the `minigpt` command
(generate, eval, info, export, serve, bench, quantize). The numbered scripts build their options here too."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import time
import typing
from collections.abc import Callable
from typing import Any

import torch
import typer
from rich.markup import escape
from rich.table import Table

from .bench import bench_table, load_bench, run_bench
from .checkpoint import Loaded, load_run, run_info
from .config import (
    RECIPE_OPTIONS,
    BenchConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    ImportConfig,
    InfoConfig,
    ModelConfig,
    PrepareConfig,
    QuantizeConfig,
    Sampling,
    ServeConfig,
    with_recipe,
)
from .data import parse_tags
from .engine import TextStream
from .evaluate import eval_run
from .export import export_run
from .generate import default_mode, generate, generate_many
from .hf_import import import_folder
from .quantize import quantize_run
from .serve import serve_run
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
    the ones the command line left out. An `fn` with a `given` parameter also gets the names of the
    options the command line gave (a resumed run keeps its saved value of every other one). A `UserError`
    raised inside (from a config check or the work itself) becomes one line on stderr and exit code 2.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        params: dict[str, inspect.Parameter] = {}
        override_names: list[str] = []
        for cls, is_override in [(c, False) for c in classes] + ([(overrides, True)] if overrides else []):
            hints = typing.get_type_hints(cls)
            recipes = {f.name for f in dataclasses.fields(cls)} >= {"recipe"}
            for f in dataclasses.fields(cls):
                if f.name in params or f.name in skip or f.metadata.get("cli") is False:
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
                    # a switch that is on by default (--compile) needs its off form too
                    names = [f"{flag}/--no-{flag[2:]}"] if annotation is bool else [flag]
                    info = typer.Option(default, *names, *f.metadata.get("aliases", ()), help=help_text)
                params[f.name] = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)

        wants_given = "given" in inspect.signature(fn).parameters

        @functools.wraps(fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
        def command(**kwargs: Any) -> Any:
            ctx = kwargs.pop("ctx", None)
            try:
                cfgs = []
                for cls in classes:
                    values = {f.name: kwargs[f.name] for f in dataclasses.fields(cls) if f.name in kwargs}
                    cfgs.append(cls(**(with_recipe(values) if "recipe" in values else values)))
                if overrides is not None:
                    cfgs.append({n: kwargs[n] for n in override_names if kwargs[n] is not None})
                if ctx is not None:
                    return fn(*cfgs, given=given_options(ctx, kwargs))
                return fn(*cfgs)
            except UserError as e:
                err_console.print(f"[bold red]error:[/] {escape(str(e))}")  # a message is text, not markup
                raise typer.Exit(2) from None

        if wants_given:  # Typer hands a command its context through a parameter of this type
            params = {"ctx": inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)} | params
        command.__signature__ = inspect.Signature(list(params.values()))  # type: ignore[attr-defined]
        # Typer resolves annotations itself; give it real types, not strings from this module
        command.__annotations__ = {name: p.annotation for name, p in params.items()}
        return command

    return decorate


def given_options(ctx: typer.Context, kwargs: dict[str, Any]) -> frozenset[str]:
    """The options of the running command that the command line (or the environment) set."""
    unset = ("DEFAULT", "DEFAULT_MAP")
    return frozenset(name for name in kwargs if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in unset)


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


def prompt_ids(loaded: Loaded, text: str, tags: dict[str, str]) -> list[int]:
    """A document start (<|endoftext|>, the tags) + the prompt, whose start is cut to fit the context."""
    ids, cut = loaded.prompt(text, tags)
    if cut:
        err_console.print(f"[yellow]the prompt is {cut} tokens too long for the context of "
                          f"{loaded.model.cfg.block_size}; its first {cut} tokens are left out[/]")
    return ids


def write_json_line(result: dict[str, Any], path: str) -> None:
    """The result as one JSON line on stdout (for scripts), and in `path` too when given."""
    line = json.dumps(result, separators=(",", ":"), ensure_ascii=False)
    if path:
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line)


class Streamer:
    """Prints row 0's text as tokens arrive (`engine.TextStream`: a character cut in the middle of its bytes
    waits for the rest; only new tokens are decoded), leaving out the end token."""

    def __init__(self, loaded: Loaded) -> None:
        self.eot, self.text = loaded.eot, TextStream(loaded.decode, [])

    def __call__(self, token: int) -> None:
        if token != self.eot:
            self.write(self.text.push(token))

    def flush(self) -> None:
        """Whatever is still held back (bytes that never became a character) at the end."""
        self.write(self.text.finish())

    @staticmethod
    def write(text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()


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
    tags = parse_tags(cfg.tag)
    stream = cfg.stream and len(prompts) == 1 and cfg.num_samples == 1
    t0 = time.perf_counter()
    ids = [prompt_ids(loaded, text, tags) for text in prompts]
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


@app.command("eval")
@cli_command(EvalConfig, PrepareConfig, skip=("name", "val_fraction", "dedup"))
def eval_cmd(cfg: EvalConfig, read: PrepareConfig) -> None:
    """Score any text with a run (as the pipeline would encode it, in sliding windows): loss, perplexity,
    bits per byte and per character; per document and per tag value; then one JSON line."""
    r = eval_run(cfg, read)
    # paths, tag values and document texts are the user's text: escaped, never read as markup
    t = Table(title=escape(f"eval {r['run']} ({r['checkpoint']}) on {', '.join(r['inputs'])}"), title_justify="left")
    t.add_column("")
    t.add_column("", justify="right")
    for label, value in (("documents", f"{r['documents']:,}" if r["documents"] is not None else "-"),
                         ("tokens scored", f"{r['tokens']:,}"), ("bytes / characters", f"{r['bytes']:,} / "
                         + (f"{r['chars']:,}" if r["chars"] else "-")), ("loss (nats/token)", f"{r['loss']:.4f}"),
                         ("perplexity", f"{r['perplexity']:,.2f}"), ("bits per byte", f"{r['bpb']:.4f}"),
                         ("bits per character", f"{r['bpc']:.4f}" if r["bpc"] else "-"),
                         ("windows", f"{r['windows']:,} of {r['context']} tokens, stride {r['stride']}"),
                         ("speed", f"{r['tokens_per_s']:,.0f} tokens/s on {r['device']} ({r['matmul']})")):
        t.add_row(label, value)
    console.print(t)
    for field, values in r["tags"].items():
        tt = Table(title=escape(f"by {field}"), title_justify="left")
        for col in (field, "documents", "tokens", "bits per byte"):
            tt.add_column(col, justify="left" if col == field else "right")
        for value, g in values.items():
            tt.add_row(escape(value), f"{g['documents']:,}", f"{g['tokens']:,}", f"{g['bpb']:.4f}" if g["bpb"] else "-")
        console.print(tt)
    for title, key in (("most surprising documents", "most_surprising"), ("least surprising", "least_surprising")):
        if r[key]:
            dt = Table(title=title, title_justify="left")
            for col in ("bits/byte", "perplexity", "tokens", "document"):
                dt.add_column(col, justify="left" if col == "document" else "right")
            for row in r[key]:
                dt.add_row(f"{row['bpb']:.3f}", f"{row['perplexity']:,.1f}", str(row["tokens"]),
                           escape(row["head"].replace("\n", " ")[:60]))
            console.print(dt)
    if r["per_doc"]:
        console.print(f"per-document figures: {escape(r['per_doc'])}")
    skipped = r["skipped"]
    if skipped["malformed"] or skipped["dropped"]:
        dropped = ", ".join(f"{n} {why}" for why, n in skipped["dropped"].items()) or "none"
        console.print(f"[yellow]not scored: {skipped['malformed']} malformed record(s); documents dropped by "
                      f"cleaning: {dropped}[/]")
    write_json_line(r, cfg.json)


@app.command("info")
@cli_command(InfoConfig)
def info_cmd(cfg: InfoConfig) -> None:
    """What a run is: model shape and size, tokenizer, tags (and their documents), training, val bits per
    byte, files; then one JSON line."""
    r = run_info(load_run(cfg.run, cfg.checkpoint, "cpu", cfg.runs_dir))
    m, tok = r["model"], r["tokenizer"]
    t = Table(title=escape(f"{r['run']} ({r['checkpoint']})"), title_justify="left")
    t.add_column("")
    t.add_column("")
    kv = f" ({m['n_kv_head']} key/value)" if m.get("n_kv_head") and m["n_kv_head"] != m["n_head"] else ""
    t.add_row("model", f"{m['n_layer']} layers x {m['n_embd']} wide, {m['n_head']} heads{kv}, context {m['block_size']}, "
              f"{m['mlp']}, {'tied' if m['tie_embeddings'] else 'untied'} embeddings; {r['parameters']:,} parameters")
    t.add_row("tokenizer", f"{tok['kind']}, vocab {tok['vocab_size']:,}")
    mem = r["memory"]
    t.add_row("memory", f"{human_bytes(mem['weights_bytes'])} of weights; training with AdamW needs about "
              f"{human_bytes(mem['train_bytes'])} ({mem['train_bytes_per_weight']} bytes a weight: fp32 weights, "
              "gradients, two moments) plus activations")
    t.add_row("weights", f"{r['quantization']} ({r['matmul']})" + (
        escape(f", from {r['quantization_source']}") if r["quantization_source"] else ""))
    t.add_row("training", f"step {r['step']:,} of {r['train']['max_steps']:,}" if r["step"] is not None else "-")
    t.add_row("val", f"{r['val_loss']:.4f} nats/token, {r['val_bpb']:.4f} bits/byte (best)" if r["val_bpb"]
              else "- (minigpt quantize reports a quantized run's)" if r["quantization_source"] else "-")
    for field, values in r["tags"].items():
        t.add_row(escape(f"tag {field}"), escape(", ".join(f"{v} ({n:,} docs)" if n is not None else v
                                                          for v, n in values.items())))
    if not r["tags"]:
        t.add_row("tags", "none")
    t.add_row("data", escape(str(r["train"]["data"] or "-")))
    if r["source"]:
        src = r["source"]
        t.add_row("source", escape(f"imported from {src['folder']} ({src['architecture']}, context {src['context']}, "
                                   f"{src['dtype']})"))
    t.add_row("files", escape(", ".join(f"{name} {human_bytes(size)}" for name, size in r["files"].items())))
    console.print(t)
    write_json_line(r, cfg.json)


@app.command("import")
@cli_command(ImportConfig)
def import_cmd(cfg: ImportConfig) -> None:
    """A local Hugging Face Llama-family folder as a minigpt run (generate, eval, serve, quantize, export it)."""
    r = import_folder(cfg)
    console.print(f"wrote {escape(r['out'])}: {r['layers']} layers x {r['width']} wide, {r['heads']} heads "
                  f"({r['kv_heads']} key/value), context {r['context']:,}, vocab {r['vocab_size']:,}, "
                  f"{r['parameters']:,} weights in {r['dtype']} ({r['size']}, {r['seconds']:.1f} s; {r['memory_note']})",
                  highlight=False)
    write_json_line(r, cfg.json)


@app.command("export")
@cli_command(ExportConfig)
def export_cmd(cfg: ExportConfig) -> None:
    """A run as a Hugging Face transformers folder (--format hf, LlamaForCausalLM) or ONNX (--format onnx)."""
    r = export_run(cfg)
    console.print(f"wrote {escape(r['out'])} ({r['format']}, {r['size']}, {r['seconds']:.1f} s): "
                  + escape(", ".join(r["files"])))
    if r["format"] == "onnx":
        console.print(f"onnxruntime vs PyTorch: max |logit difference| {r['max_abs_diff']:.2e} (opset {r['opset']})")
    write_json_line(r, cfg.json)


@app.command("bench")
@cli_command(BenchConfig, overrides=ModelConfig)
def bench_cmd(cfg: BenchConfig, overrides: dict[str, Any]) -> None:
    """Training, generation and data throughput on one device (or, with --serve URL, a running server's
    throughput and latency under --clients at once): a table, then one JSON line."""
    if cfg.serve:
        r = load_bench(cfg.serve, cfg.clients, cfg.new_tokens, os.environ.get("MINIGPT_API_KEY", ""))
        t = Table(title=escape(f"minigpt serve at {r['url']}: {r['clients']} streamed requests of {r['new_tokens']} "
                               "tokens"), title_justify="left")
        for col in ("", "seconds", "tokens/s", "latency p50", "p95", "first token p50", "p95"):
            t.add_column(col, justify="left" if not col else "right")
        for label, key in (("one at a time", "one_by_one"), ("all at once", "at_once")):
            x = r[key]
            t.add_row(label, f"{x['seconds']:.2f}", f"{x['tokens_per_s']:,.1f}", f"{x['latency_p50_s']:.3f} s",
                      f"{x['latency_p95_s']:.3f} s", f"{x['ttft_p50_s']:.3f} s", f"{x['ttft_p95_s']:.3f} s")
        t.caption = f"all at once: x{r['speedup']} the tokens/s"
        console.print(t)
        write_json_line(r, cfg.json)
        return
    result = run_bench(cfg, overrides)
    console.print(bench_table(result))
    write_json_line(result, cfg.json)


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
        val = (f"{x['val_loss']:.4f}", f"{x['val_bpb']:.4f}") if x["val_bpb"] is not None else ("-", "-")
        t.add_row(label, human_bytes(x["bytes"]), *val,
                  f"{x['decode_batch1_tokens_per_s']:,.0f}", f"{x['decode_batch32_tokens_per_s']:,.0f}", x["matmul"])
    t.caption = f"size x{r['size_ratio']:.3f} | " + (
        f"val bits/byte {r['val_bpb_change_pct']:+.3f}% on {r['val_tokens']:,} tokens" if r["val_tokens"]
        else "no val split (an imported model): score both with minigpt eval")
    console.print(t)
    print(json.dumps(r, separators=(",", ":")))


@app.command("serve")
@cli_command(ServeConfig)
def serve_cmd(cfg: ServeConfig) -> None:
    """An OpenAI-compatible HTTP server (/v1/completions, streaming) with a native /generate, a web page at /,
    /docs, /health, /info and Prometheus /metrics; concurrent requests decode together. Needs the serve extra."""
    serve_run(cfg)


def main() -> None:
    torch.set_grad_enabled(False)
    app()


if __name__ == "__main__":
    main()
