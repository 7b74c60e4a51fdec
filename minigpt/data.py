"""Token data: tokenizer files, shards read as memmaps, random training windows, fixed evaluation windows.

Every optimizer step draws one *global* batch of window offsets from a seeded generator that all
processes share; each process reads only its own rows. So one process with k accumulation steps
and k processes with one step each see exactly the same sequences, and the generator's state in
`trainer_state.json` makes a resumed run draw what the uninterrupted run would have drawn.

Bits per byte needs the bytes of the text behind the tokens that were scored: `token_byte_lengths`
gives each token id's bytes of source text, exact for both tokenizers (a byte-level BPE token is one
byte per symbol, a character its UTF-8 length, a byte-fallback token one byte, a special token none).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders

from .config import TrainConfig
from .utils import Dist, UserError, console, read_json

EOT = "<|endoftext|>"
FORMAT_VERSION = 1  # of meta.json and the shards


def tag_token(field: str, value: str) -> str:
    return f"<|{field}={value}|>"


def parse_tag(token: str) -> tuple[str, str]:
    """`<|field=value|>` -> (field, value)."""
    field, _, value = token.removeprefix("<|").removesuffix("|>").partition("=")
    return field, value


def parse_tags(specs: list[str]) -> dict[str, str]:
    """`--tag field=value` options -> {field: value}."""
    tags: dict[str, str] = {}
    for spec in specs:
        field, sep, value = spec.partition("=")
        if not sep or not field.strip() or not value.strip():
            raise UserError(f"--tag {spec!r} is not field=value; write it like --tag lang=tt.")
        if field.strip() in tags:
            raise UserError(f"--tag gives {field.strip()} twice; a document has one value per field.")
        tags[field.strip()] = value.strip()
    return tags


def tag_ids_of(tags: dict[str, str], known: dict[str, int]) -> list[int]:
    """The tag tokens a document starts with, as the shards hold them: one per field, in field order, for
    the values that have a token (`known`: tag token -> id; other values, like ids, have none)."""
    return [known[t] for k, v in sorted(tags.items()) if (t := tag_token(k, v)) in known]


# --------------------------------------------------------------------------------------------------
# tokenizer files


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json, set to encode the way the shards were encoded: text that looks like a special
    token (`<|endoftext|>` typed in a document) is ordinary text."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer {path} does not exist; run 02_train_tokenizer.py first.")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses for bad JSON
        raise UserError(f"tokenizer {path} cannot be read ({e}); run 02_train_tokenizer.py again.") from None
    tok.encode_special_tokens = True
    return tok


def document_tokens(folder: Path, tok: Tokenizer) -> tuple[int, int]:
    """A Hugging Face model folder's (document start, document end): its BOS when its tokenizer adds one,
    else its EOS; then its EOS (the first, when config.json lists several)."""
    def read(name: str) -> dict[str, Any]:
        return read_json(folder / name, name) if (folder / name).exists() else {}
    src, tcfg = read("config.json"), read("tokenizer_config.json")

    def token_id(key: str) -> int | None:
        given = src.get(f"{key}_token_id")
        if isinstance(given, list):  # several end tokens (an instruct model's): the first is the document end
            given = given[0] if given else None
        if given is None:
            name = tcfg.get(f"{key}_token")
            name = name.get("content") if isinstance(name, dict) else name
            given = tok.token_to_id(name) if name else None
        return given

    eos, bos = token_id("eos"), token_id("bos")
    if eos is None:
        raise UserError(f"{folder} names no end-of-text token (eos_token_id in config.json or eos_token in "
                        "tokenizer_config.json); minigpt needs one to end a document.")
    added = tok.encode("a", add_special_tokens=True).ids
    return (bos if bos is not None and added[:1] == [bos] else eos), eos


IMPORTED_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")  # a given tokenizer's own


@dataclass
class GivenTokenizer:
    """A tokenizer to encode data with instead of training one: a run's, or a Hugging Face folder's."""

    path: Path  # its tokenizer.json
    tok: Tokenizer
    kind: str
    eot: int  # the document end
    bos: int  # the document start (the end token itself for runs trained here)


def given_tokenizer(source: str | Path) -> GivenTokenizer:
    """The tokenizer of a run (its best checkpoint, else its last) or of a Hugging Face model folder."""
    path = Path(source)
    for folder in (path, path / "best", path / "last"):
        if (folder / "manifest.json").exists() and (folder / "config.json").exists():  # a minigpt checkpoint
            data = read_json(folder / "config.json", "checkpoint config")["data"]
            return GivenTokenizer(folder / "tokenizer.json", load_tokenizer(folder / "tokenizer.json"), data["kind"],
                                  data["eot_id"], data.get("bos_id", data["eot_id"]))
    if (path / "tokenizer.json").exists():
        tok = load_tokenizer(path / "tokenizer.json")
        bos, eos = document_tokens(path, tok)
        return GivenTokenizer(path / "tokenizer.json", tok, "imported", eos, bos)
    raise UserError(f"{source} is neither a run nor a model folder with a tokenizer.json; give one of those to "
                    "--tokenizer.")


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """Bytes of source text behind each token id (int64, vocab-sized)."""
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for token, i in tok.get_vocab().items():
        if token in special:
            continue  # <|endoftext|> and tags: structure, not text
        if byte_level:  # every symbol of a byte-level token stands for one byte
            lengths[i] = len(token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # byte fallback
            lengths[i] = 1
        else:  # SentencePiece's "▁" stands for a space (one byte)
            lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


def find_tokenized(path: str | Path) -> Path:
    """A tokenized folder (holding meta.json), or a dataset folder with one such folder inside."""
    path = Path(path)
    if (path / "meta.json").exists():
        return path
    if not path.exists():
        raise UserError(f"{path} does not exist; run 02_train_tokenizer.py or check --data.")
    candidates = sorted((p for p in path.iterdir() if (p / "meta.json").exists()), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"{path} holds no token shards (meta.json); run 02_train_tokenizer.py --data {path}.")
    if len(candidates) > 1:
        console.print(f"[dim]{path} has several tokenizations; using the newest, {candidates[-1].name}[/]")
    return candidates[-1]


# --------------------------------------------------------------------------------------------------
# shards


class Shards:
    """The shards of one split, as memmaps."""

    def __init__(self, folder: Path, split: str, meta: dict[str, Any]) -> None:
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.arrays = []
        for shard in meta["splits"][split]["shards"]:
            path = folder / shard["file"]
            if not path.exists() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise UserError(f"shard {path} is missing or truncated; run 02_train_tokenizer.py again.")
            self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.lengths = np.array([a.size for a in self.arrays], dtype=np.int64)
        self.tokens = int(self.lengths.sum())


class TokenData:
    def __init__(self, path: str | Path) -> None:
        self.folder = find_tokenized(path)
        self.meta = read_json(self.folder / "meta.json", "token metadata")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{self.folder} was written by another minigpt version; run 02_train_tokenizer.py again.")
        self.train = Shards(self.folder, "train", self.meta)
        self.val = Shards(self.folder, "val", self.meta)
        self.vocab_size: int = self.meta["vocab_size"]
        self.tokenizer_json = self.folder / "tokenizer.json"
        # a given tokenizer's own files (its special tokens, chat template), which checkpoints and exports keep
        self.tokenizer_files = [self.folder / n for n in IMPORTED_FILES if (self.folder / n).exists()]
        self.token_bytes = token_byte_lengths(load_tokenizer(self.tokenizer_json))
        bos = self.meta.get("bos_id")  # a given tokenizer's BOS, before every document: given, never scored
        self.bos: int | None = bos if bos is not None and bos != self.meta["eot_id"] else None

    def check_context(self, block_size: int) -> None:
        """Both splits need a shard that holds one window: a context plus the token after it."""
        if self.train.lengths.max(initial=0) < block_size + 1:
            raise UserError(
                f"the train split ({self.train.tokens} tokens) is shorter than one context of {block_size} "
                "tokens; add text or choose a smaller --block-size."
            )
        if self.val.lengths.max(initial=0) < block_size + 1:
            raise UserError(
                f"the val split has {self.val.tokens} tokens, less than one context of {block_size}; "
                "raise --val-fraction in 01_prepare_data.py or choose a smaller --block-size."
            )


def accumulation(cfg: TrainConfig, block_size: int, world: int) -> tuple[int, int]:
    """(rows per optimizer step across all processes, micro-steps per process)."""
    per_micro = cfg.batch_size * world
    if not cfg.total_batch_tokens:
        return per_micro, 1
    rows, rest = divmod(cfg.total_batch_tokens, block_size)
    if rest or rows % per_micro:
        raise UserError(
            f"--total-batch-tokens {cfg.total_batch_tokens} must be a multiple of block_size x batch_size x "
            f"processes = {block_size} x {cfg.batch_size} x {world} = {block_size * per_micro}."
        )
    return rows, rows // per_micro


class BatchSampler:
    """Random windows of `block_size + 1` tokens from the train shards, each inside one shard; resumable."""

    def __init__(self, shards: Shards, block_size: int, seed: int) -> None:
        self.shards, self.T = shards, block_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        # a shard of n tokens holds n - T windows (offsets 0 .. n - T - 1); shards are drawn in proportion
        self.counts = np.maximum(shards.lengths - block_size, 0)
        self.p = self.counts / self.counts.sum()

    def global_batch(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, offset) for `rows` windows: the same on every process."""
        shard = self.rng.choice(len(self.p), size=rows, p=self.p) if len(self.p) > 1 else np.zeros(rows, np.int64)
        return shard, (self.rng.random(rows) * self.counts[shard]).astype(np.int64)

    def read(self, shard: np.ndarray, offset: np.ndarray) -> torch.Tensor:
        """The windows as one int64 tensor of shape (rows, block_size + 1)."""
        out = np.empty((len(offset), self.T + 1), dtype=np.int64)
        for i, (s, o) in enumerate(zip(shard, offset, strict=True)):
            out[i] = self.shards.arrays[s][o : o + self.T + 1]
        return torch.from_numpy(out)

    def batch(self, rows: int, d: Dist, device: torch.device) -> torch.Tensor:
        """This process's rows of the next global batch of `rows`, on the device."""
        per_rank = rows // d.world
        shard, offset = self.global_batch(rows)
        mine = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
        batch = self.read(shard[mine], offset[mine])
        if device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


@dataclass(frozen=True)
class Window:
    """Tokens [offset, offset + length) of source (shard, stream) number `source`: every token after the
    first is a target, and the first `skip` targets are only context (an earlier window scored them)."""

    source: int
    offset: int
    length: int
    skip: int = 0


def sliding_windows(n: int, block_size: int, stride: int, source: int = 0) -> list[Window]:
    """Windows of up to `block_size + 1` tokens over a stream of `n` that score every token but the first
    exactly once: one every `stride` tokens, each scoring its targets not yet scored (so every target
    after the first window has at least `block_size - stride` tokens of context), and a last window
    aligned to the end of the stream. `stride` = `block_size` gives non-overlapping windows."""
    if n < 2:
        return []
    if n <= block_size + 1:
        return [Window(source, 0, n)]
    windows, scored, offset = [], 0, 0  # targets at positions <= `scored` are done (position 0 is none)
    while True:
        windows.append(Window(source, offset, block_size + 1, scored - offset))
        scored = offset + block_size
        if scored == n - 1:
            return windows
        offset = min(offset + stride, n - 1 - block_size)


def eval_windows(shards: Shards, block_size: int, max_tokens: int) -> list[Window]:
    """Fixed evaluation windows over the shards of a split: non-overlapping, and covering every token
    (each shard's last window reaches its end) when the split holds at most about `max_tokens`; else
    that many tokens' worth of whole windows spread evenly over the split (the start of a split is not
    a fair sample of it)."""
    every = [w for s, n in enumerate(shards.lengths) for w in sliding_windows(int(n), block_size, block_size, s)]
    want = -(-max_tokens // block_size)
    if len(every) <= want:
        return every
    whole = [w for w in every if w.skip == 0 and w.length == block_size + 1]
    picks = ((np.arange(min(want, len(whole))) + 0.5) * len(whole) / min(want, len(whole))).astype(np.int64)
    return [whole[i] for i in picks]
