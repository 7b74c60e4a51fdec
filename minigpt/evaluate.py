"""Scoring held-out tokens: the one evaluator behind training's val figures, quick_test.py, quantize and
`minigpt eval` (any text, as the pipeline would encode it, in sliding windows).

Loss is nats per scored token; bits per byte divides the same nats (in bits) by the bytes of source text
behind exactly the tokens scored (`TokenData.token_bytes`), so it compares fairly across vocabularies
and languages, and it does not drift when only part of a split is scored.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from .checkpoint import Loaded, load_run
from .config import EvalConfig, PrepareConfig
from .corpus import Stats, iter_documents, read_documents
from .data import TokenData, Window, eval_windows, parse_tag, sliding_windows, tag_ids_of, token_byte_lengths
from .utils import (
    Dist,
    UserError,
    atomic_open,
    autocast,
    console,
    progress,
    read_json,
    resolve_device,
    resolve_dtype,
)


@dataclass
class Score:
    loss: float  # nats per scored token
    bpb: float  # bits per byte of the text behind the scored tokens
    tokens: int
    bytes: int

    @staticmethod
    def of(nats: float, tokens: int, nbytes: int) -> Score:
        bpb = nats / math.log(2) / nbytes if nbytes else float("nan")
        return Score(nats / max(tokens, 1), bpb, tokens, nbytes)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, sources: list[np.ndarray], windows: list[Window], token_bytes: np.ndarray,
    batch_size: int, device: torch.device, dtype: torch.dtype, d: Dist | None = None,
    per_token: list[np.ndarray] | None = None, on_batch: Callable[[int], None] | None = None,
    unscored: int | None = None,
) -> Score:
    """Score the `windows` of the token `sources` (shards, or streams of documents): the loss of every
    target a window scores, and the bytes of text behind them.

    `per_token` (float arrays shaped like `sources`) receives each scored target's loss at its position;
    `on_batch` gets the number of windows done; a target equal to `unscored` (an imported model's BOS, which
    opens every document) is never scored. Under torchrun every process scores the same number of
    windows (the last ones padded with windows that count nothing), so all of them run the same forward
    passes and meet at one all_reduce. The model's train/eval mode is restored afterwards.
    """
    d = d or Dist()
    was_training = model.training
    model.eval()
    per_rank = -(-len(windows) // d.world)
    total_nats = torch.zeros((), dtype=total_dtype(device), device=device)  # summed on the device: no sync a batch
    tokens = nbytes = 0  # known on the host
    mine = list(range(d.rank, per_rank * d.world, d.world))
    for i in range(0, len(mine), batch_size):
        chunk = [windows[j] if j < len(windows) else None for j in mine[i : i + batch_size]]
        width = max((w.length for w in chunk if w), default=2)
        rows = np.zeros((len(chunk), width), dtype=np.int64)
        scored = np.zeros((len(chunk), width - 1), dtype=bool)
        for r, w in enumerate(chunk):
            if w is not None:  # None: padding, scored nowhere
                rows[r, : w.length] = sources[w.source][w.offset : w.offset + w.length]
                scored[r, w.skip : w.length - 1] = True
        if unscored is not None:
            scored &= rows[:, 1:] != unscored
        batch = torch.from_numpy(rows).to(device)
        with autocast(device, dtype):
            logits = model(batch[:, :-1]).logits
        nats = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].reshape(-1), reduction="none")
        nats = nats.view(len(chunk), -1)
        mask = torch.from_numpy(scored).to(device)
        total_nats += torch.where(mask, nats, 0.0).to(total_nats.dtype).sum()
        tokens += int(scored.sum())
        nbytes += int(token_bytes[rows[:, 1:][scored]].sum())
        if per_token is not None:
            host = nats.cpu().numpy()
            for r, w in enumerate(chunk):
                if w is not None:
                    per_token[w.source][w.offset + 1 + w.skip : w.offset + w.length] = host[r, w.skip : w.length - 1]
        if on_batch is not None:
            on_batch(sum(w is not None for w in chunk))
    total = [float(total_nats), tokens, nbytes]
    if d.world > 1:
        t = torch.tensor(total, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total = t.tolist()
    model.train(was_training)
    return Score.of(total[0], int(total[1]), int(total[2]))


def total_dtype(device: torch.device) -> torch.dtype:
    """The running sum of nats: float64, but MPS has none (float32 there: about 1e-7 of a nat per token off
    after a million tokens)."""
    return torch.float32 if device.type == "mps" else torch.float64


def window_targets(sources: list[np.ndarray], windows: list[Window]) -> np.ndarray:
    """The token ids the windows score, in order."""
    parts = [sources[w.source][w.offset + 1 + w.skip : w.offset + w.length] for w in windows]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def unigram_baseline(data: TokenData, windows: list[Window]) -> Score:
    """A unigram model of the train tokens (add-one smoothed) scored on the same val targets: the floor a
    trained model must beat."""
    counts = np.zeros(data.vocab_size, dtype=np.float64)
    for arr in data.train.arrays:
        for i in range(0, len(arr), 1 << 24):  # bincount widens to int64: a chunk at a time bounds the memory
            counts += np.bincount(arr[i:i + (1 << 24)], minlength=data.vocab_size)
    logp = np.log((counts + 1) / (counts.sum() + data.vocab_size))  # unseen tokens keep some mass
    targets = window_targets(data.val.arrays, windows)
    targets = targets[targets != data.bos] if data.bos is not None else targets  # as the model's score: no BOS
    return Score.of(float(-logp[targets].sum()), int(targets.size), int(data.token_bytes[targets].sum()))


def no_better_than_unigram(run_dir: Path, train_tokens: int, bpb: float, unigram_bpb: float) -> str:
    """Why a run's model (`bpb` on val) is no better than a unigram model of its train tokens, and what would
    help, from its metrics.jsonl and last checkpoint: a model that memorised the train split needs more text
    or fewer weights, not more steps."""
    said = f"the model is no better than a unigram model of the train tokens ({bpb:.3f} against {unigram_bpb:.3f} bits per byte)"
    metrics, state_path = run_dir / "metrics.jsonl", run_dir / "last" / "trainer_state.json"
    records = []
    for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
            records.append(json.loads(line))
    evals = [r for r in records if "val_loss" in r]
    train = [r["loss"] for r in records if "loss" in r][-5:]
    if not evals or not train or not state_path.exists():  # not a run trained here (imported, quantized)
        return said + "."
    state = read_json(state_path, "trainer state")
    per_step = state["tokens_seen"] / max(state["step"], 1) / max(train_tokens, 1)  # epochs per step
    best = min(evals, key=lambda r: r["val_loss"])
    said += (f": {train_tokens:,} train tokens read {state['step'] * per_step:.1f} times, val best at step "
             f"{best['step']} (epoch {best['step'] * per_step:.1f})")
    train_loss = sum(train) / len(train)
    if train_loss < 0.8 * best["val_loss"]:
        return (said + f", the train loss down to {train_loss:.2f} against val's {best['val_loss']:.2f}: the model "
                "memorised the train split. More text helps most, then a smaller model (--preset, --n-layer, "
                "--n-embd); more steps would not.")
    return said + f", the train loss still {train_loss:.2f}: the model has not learnt yet; train longer (--max-steps)."


# --------------------------------------------------------------------------------------------------
# minigpt eval: any text, scored as the pipeline would see it


@dataclass
class Document:
    """A scored document: its tokens are stream positions [start, end), tags and <|endoftext|> included."""

    head: str
    tags: dict[str, str]
    start: int
    end: int
    chars: int
    bytes: int


def encode_documents(loaded: Loaded, docs: Iterable[tuple[str, dict[str, str]]]) -> tuple[np.ndarray, list[Document]]:
    """One token stream as the shards hold documents: <|endoftext|> first (a document start, never scored),
    then each document's tag tokens, its text and <|endoftext|>; with an imported model's BOS, that BOS
    before every document instead (never scored either). Every text must decode back exactly."""
    sep = [loaded.bos] if loaded.bos != loaded.eot else []
    parts: list[np.ndarray] = [np.array([] if sep else [loaded.eot], dtype=np.int64)]
    documents: list[Document] = []
    position, failures, first = 0 if sep else 1, 0, ""
    batch: list[tuple[str, dict[str, str]]] = []

    def flush() -> None:
        nonlocal position, failures, first
        encodings = loaded.tokenizer.encode_batch_fast([t for t, _ in batch], add_special_tokens=False)
        texts = loaded.tokenizer.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
        ids: list[int] = []
        for (text, tags), enc, back in zip(batch, encodings, texts, strict=True):
            if back != text:
                failures += 1
                first = first or text[:60]
            doc = [*sep, *tag_ids_of(tags, loaded.tags), *enc.ids, loaded.eot]
            documents.append(Document(text[:80], tags, position + len(sep), position + len(doc), len(text),
                                      len(text.encode())))
            position += len(doc)
            ids += doc
        parts.append(np.array(ids, dtype=np.int64))
        batch.clear()

    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[0])
        if size >= 4 << 20:
            flush()
            size = 0
    if batch:
        flush()
    if failures:
        raise UserError(f"the run's tokenizer cannot encode {failures} of {len(documents)} documents exactly (first: "
                        f"{first!r}); score text in a script the tokenizer covers, or train a tokenizer that does.")
    return np.concatenate(parts), documents


def _input_kind(inputs: list[str]) -> str:
    """'shards' (a tokenized folder), 'dataset' (a prepared dataset folder) or 'text' (anything else)."""
    kinds = []
    for item in inputs:
        path = Path(item)
        kinds.append("shards" if (path / "meta.json").is_file()
                     else "dataset" if (path / "stats.json").is_file() else "text")
    if len(set(kinds)) > 1 or (len(kinds) > 1 and kinds[0] != "text"):
        raise UserError("give either text inputs, or one prepared dataset folder, or one token-shard folder.")
    return kinds[0]


def eval_run(cfg: EvalConfig, read: PrepareConfig) -> dict[str, Any]:
    """`minigpt eval`: score any text (or a prepared dataset, or token shards) with a run, in sliding
    windows; totals, per document, per tag value."""
    if not read.inputs:
        raise UserError("give the text to score: files, folders, JSONL/CSV/Parquet, a prepared dataset or token shards.")
    device = resolve_device(cfg.device)
    # training's precision (its weights, bf16 autocast on GPUs), so that eval agrees with training's figures
    loaded = load_run(cfg.run, cfg.checkpoint, device, cfg.runs_dir, cast=False)
    T = loaded.model.cfg.block_size
    stride = cfg.stride or max(T // 2, 1)
    if stride > T:
        raise UserError(f"--stride {stride} is longer than the context ({T}); use at most {T}.")
    kind = _input_kind(read.inputs)
    if kind == "shards" and cfg.per_doc:
        raise UserError("token shards hold no document texts for --per-doc; give the prepared dataset folder instead.")
    if kind != "shards" and cfg.eval_tokens:
        raise UserError("--eval-tokens picks training's windows over token shards; give the token-shard folder.")
    documents: list[Document] | None = None
    stats = Stats()
    if kind == "shards":
        data = TokenData(read.inputs[0])
        if data.meta["tokenizer_sha256"] != loaded.config["data"]["tokenizer_sha256"]:
            raise UserError(f"{data.folder} was encoded with another tokenizer than {loaded.folder}; give its text instead.")
        streams = (data.val if cfg.split == "val" else data.train).arrays
        token_bytes = data.token_bytes
    else:
        docs = (iter_documents(Path(read.inputs[0]), cfg.split) if kind == "dataset" else read_documents(read, stats))
        with console.status("reading and encoding..."):
            stream, documents = encode_documents(loaded, docs)
        if not documents:
            malformed = f" ({stats.malformed_lines} malformed records: JSONL, CSV and Parquet need a {read.text_column!r} " \
                        "text field; see --text-column)" if stats.malformed_lines else ""
            raise UserError(f"no text to score in {', '.join(read.inputs)} after cleaning{malformed}.")
        streams, token_bytes = [stream], token_byte_lengths(loaded.tokenizer)
    if kind == "shards" and cfg.eval_tokens:  # exactly the windows training scores with this --eval-tokens
        windows = eval_windows(data.val if cfg.split == "val" else data.train, T, cfg.eval_tokens)
        stride = T
    else:
        windows = [w for s, arr in enumerate(streams) for w in sliding_windows(len(arr), T, stride, s)]
    if not windows:
        raise UserError(f"{', '.join(read.inputs)} holds fewer than two tokens: nothing to score.")
    per_token = [np.full(len(a), np.nan, dtype=np.float32) for a in streams] if documents is not None else None
    dtype = resolve_dtype("auto", device)
    start = time.perf_counter()
    columns = [TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with progress(*columns) as bars:
        task = bars.add_task("scoring windows", total=len(windows))
        score = evaluate(loaded.model, streams, windows, token_bytes, cfg.batch_size, device, dtype,
                         per_token=per_token, on_batch=lambda n: bars.advance(task, n),
                         unscored=loaded.bos if loaded.bos != loaded.eot else None)
    seconds = time.perf_counter() - start
    chars = sum(doc.chars for doc in documents) if documents is not None else None
    report: dict[str, Any] = {
        "run": str(loaded.folder.parent), "checkpoint": loaded.folder.name, "inputs": read.inputs,
        "input_kind": kind, "split": cfg.split if kind != "text" else None, "device": str(device),
        "matmul": loaded.matmul, "context": T, "stride": stride, "windows": len(windows),
        "documents": len(documents) if documents is not None else None, "tokens": score.tokens,
        "bytes": score.bytes, "chars": chars, "loss": score.loss, "perplexity": math.exp(min(score.loss, 700.0)),
        "bpb": score.bpb, "bpc": score.loss * score.tokens / math.log(2) / chars if chars else None,
        "seconds": seconds, "tokens_per_s": score.tokens / max(seconds, 1e-9),
        "tags": {}, "most_surprising": [], "least_surprising": [], "per_doc": cfg.per_doc or None,
        "skipped": {"dropped": dict(stats.dropped), "malformed": stats.malformed_lines},
    }
    if documents is not None and per_token is not None:
        fields = {parse_tag(t)[0] for t in loaded.tags}  # the fields the run conditions on (ids have no token)
        _per_document(report, documents, per_token[0], cfg.per_doc, fields)
    return report


def _per_document(report: dict[str, Any], documents: list[Document], nats: np.ndarray, per_doc: str,
                  fields: set[str]) -> None:
    """Per-document figures (and the file of them), the most and least surprising, and a table per tag field
    the run has tokens for."""
    rows, groups = [], defaultdict(lambda: [0, 0.0, 0, 0])  # (field, value) -> documents, nats, tokens, bytes
    for i, doc in enumerate(documents):
        doc_nats = float(nats[doc.start : doc.end].astype(np.float64).sum())
        tokens = doc.end - doc.start
        row = {"doc": i, "head": doc.head, "tokens": tokens, "bytes": doc.bytes, "chars": doc.chars,
               "bpb": doc_nats / math.log(2) / doc.bytes if doc.bytes else None,
               "perplexity": math.exp(min(doc_nats / tokens, 700.0)), "tags": doc.tags}
        rows.append(row)
        for field, value in doc.tags.items():
            if field not in fields:
                continue
            g = groups[(field, value)]
            g[0], g[1], g[2], g[3] = g[0] + 1, g[1] + doc_nats, g[2] + tokens, g[3] + doc.bytes
    for (field, value), (n, doc_nats, tokens, nbytes) in sorted(groups.items()):
        report["tags"].setdefault(field, {})[value] = {
            "documents": n, "tokens": tokens, "bytes": nbytes,
            "bpb": doc_nats / math.log(2) / nbytes if nbytes else None}
    ranked = sorted((r for r in rows if r["bpb"] is not None), key=lambda r: r["bpb"])
    report["least_surprising"], report["most_surprising"] = ranked[:5], ranked[::-1][:5]
    if per_doc:
        with atomic_open(per_doc, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
