"""Every setting, declared once: a dataclass per concern, with its default, type and one line of help.

Scripts and the `minigpt` CLI build their options from these classes with `cli_command`, and the
resolved values are printed at start and written beside the artifacts as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer

from .common import UserError, err_console


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **meta: Any) -> Any:
    """A dataclass field with its CLI help; meta may say `argument=True` or give `aliases`."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


# --------------------------------------------------------------------------------------------------
# 01_prepare_data.py


@dataclass
class PrepareConfig:
    inputs: list[str] = opt(
        factory=list,
        help="Text files (.txt, .txt.gz), folders, JSONL (.jsonl, .jsonl.gz), Leipzig .tar.gz archives, "
        "http(s) URLs, or 'stdlib' (the default: this Python's standard library sources).",
        argument=True,
    )
    name: str = opt("", help="Dataset name: output goes to <out-dir>/<name>/ (default: from the first input).")
    out_dir: str = opt("data", help="Folder that holds the datasets and the download cache (raw/).")
    glob: str = opt("", help="Inside folders, only files whose name matches this pattern (e.g. '*.txt').")
    doc_unit: str = opt(
        "auto",
        help="What one document is in a text file: file, paragraph, line, or auto (a whole file inside "
        "folders; per line or paragraph for a single big file).",
    )
    val_fraction: float = opt(0.05, help="Share of documents put in val, chosen by a hash of their text.")
    min_chars: int = opt(1, help="Drop documents shorter than this many characters after cleaning.")
    max_chars: int = opt(5_000_000, help="Drop documents longer than this many characters after cleaning.")
    max_bad_fraction: float = opt(
        0.1, help="Drop documents whose undecodable bytes exceed this share of their characters."
    )
    dedup: bool = opt(True, help="Drop exact duplicate documents.")

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}.")
        if self.doc_unit not in ("auto", "file", "paragraph", "line"):
            raise UserError(f"--doc-unit must be auto, file, paragraph or line, got {self.doc_unit!r}.")
        if self.min_chars < 1 or self.max_chars < self.min_chars:
            raise UserError("--min-chars must be at least 1 and no larger than --max-chars.")


# --------------------------------------------------------------------------------------------------
# 02_train_tokenizer.py


@dataclass
class TokenizerConfig:
    data: str = opt("data/stdlib", help="A dataset folder written by 01_prepare_data.py.")
    vocab_size: int = opt(8192, help="BPE vocabulary size, special tokens included.")
    char: bool = opt(False, help="Character-level tokenizer instead of BPE (unseen characters fall back to bytes).")
    out: str = opt("", help="Output folder (default: <data>/bpe<vocab-size> or <data>/char).")
    min_frequency: int = opt(2, help="BPE merges need a pair seen at least this often.")
    max_train_chars: int = opt(
        300_000_000, help="Train BPE on at most this many characters of train text (encoding uses all)."
    )
    max_tag_values: int = opt(256, help="Most distinct values per tag field that get their own special token.")
    shard_tokens: int = opt(100_000_000, help="Tokens per shard file (bounded files for large corpora).")
    check_docs: int = opt(10_000, help="Val documents checked for an exact decode(encode(doc)) round trip.")

    def __post_init__(self) -> None:
        if not self.char and not 256 + 2 < self.vocab_size:
            raise UserError(f"--vocab-size must exceed 258 (256 bytes + 2 special tokens), got {self.vocab_size}.")
        if self.shard_tokens < 1024:
            raise UserError("--shard-tokens must be at least 1024.")


# --------------------------------------------------------------------------------------------------
# dataclasses -> Typer options


def cli_command(*classes: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn `fn(cfg_a, cfg_b, ...)` into a Typer command whose options are the classes' fields.

    A `UserError` raised inside (from a config check or the work itself) becomes one line on stderr
    and exit code 2.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        params: dict[str, inspect.Parameter] = {}
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.name in params:
                    continue  # shared fields (device, seed...) appear once and feed every class
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                if f.metadata.get("argument"):
                    info = typer.Argument(default, help=f.metadata["help"], show_default=False)
                else:
                    names = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
                    info = typer.Option(default, *names, help=f.metadata["help"])
                params[f.name] = inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hints[f.name]
                )

        @functools.wraps(fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
        def command(**kwargs: Any) -> Any:
            try:
                cfgs = [
                    cls(**{f.name: kwargs[f.name] for f in dataclasses.fields(cls) if f.name in kwargs})
                    for cls in classes
                ]
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


def as_dict(*cfgs: Any) -> dict[str, Any]:
    return {type(c).__name__: dataclasses.asdict(c) for c in cfgs}
