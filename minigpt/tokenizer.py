"""Tokenizers and token shards (the library behind 02_train_tokenizer.py).

Two kinds, both saved as one Hugging Face `tokenizer.json`:
- byte-level BPE: a GPT-4-style pre-tokenizer split in which every Unicode letter (Cyrillic and
  Tatar ә ө ү җ ң һ as much as Latin) is a letter, so no byte sequence is ever unknown;
- characters: one token per character seen in train, with byte fallback for anything unseen.

Shards are flat little-endian uint16 arrays (uint32 when the vocab needs it), each document followed
by <|endoftext|> (and preceded by its tag tokens), with `meta.json` beside them; meta.json is written
last and is the commit point. Before the commit, the first val documents are decoded back from the
shards themselves and must equal their text (the round-trip check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import TokenizerConfig
from .corpus import iter_documents
from .data import EOT, FORMAT_VERSION, IMPORTED_FILES, given_tokenizer, tag_ids_of, tag_token
from .utils import (
    PlainProgress,
    UserError,
    console,
    human_bytes,
    human_count,
    progress,
    read_json,
    sha256_file,
    write_json,
)

# GPT-4's split with letters widened to letters + combining marks; numbers in groups of at most 3.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BATCH_CHARS = 4 << 20  # characters of text encoded per encode_batch call


# --------------------------------------------------------------------------------------------------
# training


def _train_texts(data: Path, max_chars: int) -> Iterator[str]:
    used = 0
    for text, _ in iter_documents(data, "train"):
        yield text
        used += len(text)
        if used >= max_chars:
            return


def choose_tags(stats: dict[str, Any], max_values: int) -> tuple[list[str], list[str]]:
    """Tag special tokens for the fields with at most `max_values` distinct values (others are ids)."""
    tokens, skipped = [], []
    for field, values in sorted(stats.get("tags", {}).items()):
        if len(values) > max_values:
            skipped.append(field)
            continue
        tokens += [tag_token(field, v) for v in sorted(values)]
    return tokens, skipped


def train_bpe(texts: Iterable[str], vocab_size: int, specials: list[str], min_frequency: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def train_char(texts: Iterable[str], specials: list[str]) -> Tokenizer:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    chars = sorted(counts, key=lambda c: (-counts[c], c))
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    vocab = {tok: i for i, tok in enumerate([*specials, *chars, *byte_tokens])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    # Splitting at blanks only makes encoding faster (repeated words hit the cache); it changes nothing.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    return tok


# --------------------------------------------------------------------------------------------------
# shards


class ShardWriter:
    """Appends token arrays to `<split>_NNNN.bin` files of at most `shard_tokens` tokens each.

    Files are written under temporary names; `commit` renames them into place.
    """

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.folder, self.split, self.cap, self.dtype = folder, split, shard_tokens, dtype
        self.shards: list[dict[str, Any]] = []
        self.f: Any = None

    def _tmp(self, i: int) -> Path:
        return self.folder / f".{self.split}_{i:04d}.bin.tmp"

    def write(self, arr: np.ndarray) -> None:
        while arr.size:
            if self.f is None or self.shards[-1]["tokens"] == self.cap:
                if self.f is not None:
                    self.f.close()
                self.shards.append({"file": f"{self.split}_{len(self.shards):04d}.bin", "tokens": 0})
                self.f = open(self._tmp(len(self.shards) - 1), "wb")
            room = self.cap - self.shards[-1]["tokens"]
            part, arr = arr[:room], arr[room:]
            part.astype(self.dtype.newbyteorder("<"), copy=False).tofile(self.f)
            self.shards[-1]["tokens"] += int(part.size)

    def close(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            self.f = None

    def commit(self) -> None:
        for i, shard in enumerate(self.shards):
            os.replace(self._tmp(i), self.folder / shard["file"])

    def discard(self) -> None:
        self.close()
        for i in range(len(self.shards)):
            with contextlib.suppress(FileNotFoundError):
                self._tmp(i).unlink()


def _batches(docs: Iterable[tuple[str, dict[str, str]]]) -> Iterator[list[tuple[str, dict[str, str]]]]:
    batch: list[tuple[str, dict[str, str]]] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[0])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_split(
    tok: Tokenizer, data: Path, split: str, writer: ShardWriter, tag_ids: dict[str, int], eot: int,
    bars: Progress | PlainProgress, total_chars: int, bos: int | None = None,
) -> dict[str, int]:
    """Encode every document of a split into the writer (after `bos`, a given tokenizer's document start,
    when it has one of its own); returns its token, byte and document counts."""
    task = bars.add_task(f"encoding {split}", total=total_chars)
    tokens = nbytes = docs = 0
    for batch in _batches(iter_documents(data, split)):
        encodings = tok.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
        ids: list[int] = []
        for (text, tags), enc in zip(batch, encodings, strict=True):
            if bos is not None:
                ids.append(bos)
            if tags:
                ids += tag_ids_of(tags, tag_ids)
            ids += enc.ids
            ids.append(eot)
            nbytes += len(text.encode("utf-8"))
        arr = np.array(ids, dtype=np.uint32)
        writer.write(arr)
        tokens += arr.size
        docs += len(batch)
        bars.advance(task, sum(len(t) for t, _ in batch))
    return {"tokens": tokens, "bytes": nbytes, "documents": docs}


def _shard_documents(writer: ShardWriter, eot: int) -> Iterator[list[int]]:
    """The token ids of each document, read back from the shards `writer` wrote (not yet committed)."""
    carry: list[int] = []
    for i in range(len(writer.shards)):
        arr = np.memmap(writer._tmp(i), dtype=writer.dtype.newbyteorder("<"), mode="r")
        start = 0
        for end in np.flatnonzero(arr == eot).tolist():
            yield carry + arr[start:end].tolist()
            carry, start = [], end + 1
        carry += arr[start:].tolist()


def check_roundtrip(tok: Tokenizer, data: Path, writer: ShardWriter, eot: int, tag_ids: set[int], limit: int,
                    documents: int) -> dict[str, Any]:
    """The shards hold exactly the documents: up to `limit` of the `documents` val documents, decoded from
    the val shards' tokens (tag tokens dropped), must equal their text, and none may be missing."""
    pairs = zip(itertools.islice(iter_documents(data, "val"), limit), _shard_documents(writer, eot), strict=False)
    checked, failures, first = 0, 0, None
    for chunk in iter(lambda: list(itertools.islice(pairs, 512)), []):
        ids = [list(itertools.dropwhile(tag_ids.__contains__, doc_ids)) for _, doc_ids in chunk]
        for (text, _), decoded in zip(chunk, tok.decode_batch(ids, skip_special_tokens=False), strict=True):
            if decoded != text[0]:
                failures += 1
                first = checked if first is None else first
            checked += 1
    missing = min(limit, documents) - checked  # shards that end early hold fewer documents
    if missing > 0:
        failures, first = failures + missing, checked if first is None else first
    return {"checked": checked + max(missing, 0), "failures": failures, "first_failure": first}


# --------------------------------------------------------------------------------------------------
# the whole step


@dataclass
class TokenizerResult:
    out: Path
    meta: dict[str, Any]


# --vocab-size 0 sizes the BPE vocab to the corpus: the largest power of two in this range that keeps at
# least BYTES_PER_ENTRY bytes of train text per vocab entry (the rule beat its neighbours on Tatar: docs/LOG.md)
AUTO_VOCAB_RANGE = (512, 8192)
BYTES_PER_ENTRY = 128


def auto_vocab_size(train_bytes: int) -> int:
    size = AUTO_VOCAB_RANGE[0]
    while size * 2 <= AUTO_VOCAB_RANGE[1] and size * 2 * BYTES_PER_ENTRY <= train_bytes:
        size *= 2
    return size


def resolve_vocab(data: Path, cfg: TokenizerConfig) -> tuple[int, Path]:
    """The vocab size (--vocab-size, or sized to the dataset's train bytes when 0) and the output folder."""
    data = Path(data)
    stats = read_json(data / "stats.json", "dataset stats") if data.is_dir() else None
    if stats is None or not any((data / f"train{e}").exists() for e in (".txt", ".jsonl")):
        raise UserError(f"{data} is not a prepared dataset; run 01_prepare_data.py first (or check --data).")
    vocab = cfg.vocab_size or auto_vocab_size(int(stats["bytes"]["train"]))
    name = f"tok-{Path(cfg.tokenizer).resolve().name}" if cfg.tokenizer else "char" if cfg.char else f"bpe{vocab}"
    return vocab, Path(cfg.out) if cfg.out else data / name


def build(cfg: TokenizerConfig) -> TokenizerResult:
    data = Path(cfg.data)
    vocab_size_wanted, out = resolve_vocab(data, cfg)
    stats = read_json(data / "stats.json", "dataset stats")
    auto = not cfg.char and not cfg.vocab_size
    given = given_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    auto = auto and given is None
    if auto:
        console.print(f"vocab {vocab_size_wanted:,}: sized to the corpus ({stats['bytes']['train'] / 1e6:.2f} MB of train "
                      f"text, at least {BYTES_PER_ENTRY} bytes per entry, {AUTO_VOCAB_RANGE[0]}-{AUTO_VOCAB_RANGE[1]}; "
                      "--vocab-size N to choose)", highlight=False)
    if not cfg.char and given is None:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size_wanted)
    kind = given.kind if given else "char" if cfg.char else "bpe"
    tag_tokens, skipped_tags = choose_tags(stats, cfg.max_tag_values)
    if given is not None and (tag_tokens or skipped_tags):
        raise UserError(f"{data} has tags ({', '.join(stats['tags'])}), and a given tokenizer has no tokens for "
                        "them; prepare the text without tag fields, or train a tokenizer (without --tokenizer).")
    out.mkdir(parents=True, exist_ok=True)
    if skipped_tags:
        console.print(f"[yellow]tags with more than {cfg.max_tag_values} values get no token: {skipped_tags}[/]")
    specials = [EOT, *tag_tokens]

    start = time.perf_counter()
    if given is not None:
        tok = given.tok
        console.print(f"tokenizer of {cfg.tokenizer}: {kind}, vocab {tok.get_vocab_size():,}", highlight=False)
    else:
        with console.status(f"training {kind} tokenizer on {data}/train ..."):
            texts = _train_texts(data, cfg.max_train_chars)
            if cfg.char:
                tok = train_char(texts, specials)
            else:
                tok = train_bpe(texts, cfg.vocab_size, specials, cfg.min_frequency)
    train_seconds = time.perf_counter() - start
    vocab_size = tok.get_vocab_size()
    if auto and vocab_size < cfg.vocab_size:  # a very small corpus: all the merges it has (meta.json says)
        console.print(f"[yellow]the corpus supports {vocab_size} tokens, fewer than {cfg.vocab_size}: vocab "
                      f"{vocab_size} (in {out})[/]")
    elif not cfg.char and given is None and vocab_size < cfg.vocab_size:
        raise UserError(
            f"the corpus only supports {vocab_size} tokens, fewer than --vocab-size {cfg.vocab_size}; "
            f"use --vocab-size {vocab_size} or less, or add text."
        )
    dtype = np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)
    if dtype == np.uint32:
        console.print(f"[yellow]vocab {vocab_size} does not fit uint16: shards use uint32[/]")
    eot = given.eot if given else tok.token_to_id(EOT)
    bos = given.bos if given and given.bos != given.eot else None  # an imported model's BOS opens each document
    tag_ids = {t: tok.token_to_id(t) for t in tag_tokens}

    # Inside documents, text that looks like a special token is ordinary text (load_tokenizer agrees).
    tok.encode_special_tokens = True
    start = time.perf_counter()
    splits: dict[str, Any] = {}
    writers = {s: ShardWriter(out, s, cfg.shard_tokens, dtype) for s in ("train", "val")}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    try:
        with progress(*columns, unit="chars") as bars:
            for split, writer in writers.items():
                splits[split] = encode_split(
                    tok, data, split, writer, tag_ids, eot, bars, stats["characters"][split], bos
                )
                writer.close()
                splits[split]["shards"] = writer.shards
        encode_seconds = time.perf_counter() - start
        roundtrip = check_roundtrip(tok, data, writers["val"], eot, set(tag_ids.values()) | {bos} - {None},
                                    cfg.check_docs, stats["documents"]["val"])
        if roundtrip["failures"]:
            raise UserError(
                f"the val shards do not decode back to {roundtrip['failures']} of the {roundtrip['checked']} val "
                f"documents checked (first: #{roundtrip['first_failure']}); nothing was written; please report it."
            )
    except BaseException:
        for w in writers.values():
            w.discard()
        raise

    # Commit: invalidate the old meta, move shards in, drop stale shards, write tokenizer then meta.
    with contextlib.suppress(FileNotFoundError):
        (out / "meta.json").unlink()
    keep = {s["file"] for w in writers.values() for s in w.shards}
    for w in writers.values():
        w.commit()
    for old in out.glob("*.bin"):
        if old.name not in keep:
            old.unlink()
    if given is not None:  # byte for byte, so that its sha256 is the run's or the folder's own
        shutil.copyfile(given.path, out / "tokenizer.json")
        for name in IMPORTED_FILES:  # its special tokens and chat template, for checkpoints and exports
            if (given.path.parent / name).exists():
                shutil.copyfile(given.path.parent / name, out / name)
    else:
        tok.save(str(out / "tokenizer.json"))
    total_bytes = splits["train"]["bytes"] + splits["val"]["bytes"]
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eot_id": eot,
        **({"bos_id": given.bos, "tokenizer_from": str(cfg.tokenizer)} if given else {}),
        "tags": tag_ids,
        "tag_documents": {t: n for field, values in stats.get("tags", {}).items() for value, n in values.items()
                          if (t := tag_token(field, value)) in tag_ids},
        "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
        "dataset": str(data),
        "splits": splits,
        "bytes_per_token": {
            s: round(splits[s]["bytes"] / max(splits[s]["tokens"], 1), 4) for s in ("train", "val")
        },
        "roundtrip": roundtrip,
        "train_seconds": round(train_seconds, 2),
        "encode_seconds": round(encode_seconds, 2),
        "encode_mb_per_s": round(total_bytes / 1e6 / max(encode_seconds, 1e-9), 2),
        "config": {k: v for k, v in vars(cfg).items()},
    }
    write_json(out / "meta.json", meta)
    return TokenizerResult(out, meta)


def summary_table(meta: dict[str, Any]) -> Table:
    t = Table(title=f"{meta['kind']} tokenizer, vocab {meta['vocab_size']:,} ({meta['dtype']})")
    for col in ("split", "documents", "tokens", "bytes", "bytes/token", "shards"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for s in ("train", "val"):
        sp = meta["splits"][s]
        t.add_row(s, f"{sp['documents']:,}", human_count(sp["tokens"]), human_bytes(sp["bytes"]),
                  f"{meta['bytes_per_token'][s]:.3f}", str(len(sp["shards"])))
    rt = meta["roundtrip"]
    t.caption = (
        f"trained in {meta['train_seconds']:.1f}s | encoded at {meta['encode_mb_per_s']:.2f} MB/s "
        f"({meta['encode_seconds']:.1f}s) | round trip exact on {rt['checked'] - rt['failures']:,}/"
        f"{rt['checked']:,} val documents"
    )
    return t
