"""Raw text in, clean train/val documents out (the library behind 01_prepare_data.py).

A *document* is a file, a JSONL record, a table row (CSV, TSV, Parquet), a Leipzig sentence, or (for
one big text file) a line or a paragraph. `read_documents` gives the cleaned documents of any input
the same way, without de-dup or split (what `minigpt eval` scores). Everything streams: memory holds one block of input and one 8-byte hash per document.
The split is decided by that hash, so re-running gives the same split and adding data never moves
an existing document between train and val.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import json
import os
import re
import sysconfig
import tarfile
import time
import unicodedata
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import IO, Any

import numpy as np
from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from .config import PrepareConfig
from .utils import UserError, atomic_open, console, human_bytes, progress, sha256_file, write_json

DOC_SEP = "\x1e"  # ASCII record separator, alone on a line, ends each document in train.txt / val.txt
BLOCK = 4 << 20  # bytes read at a time from big files
SNIFF = 64 << 10  # bytes looked at to tell text from binary
READ_BUFFER = 1 << 20  # bytes asked of the OS at a time when a reader goes line by line

# Control characters go (tab and newline stay), with the BOM and lone surrogates that JSON escapes
# can smuggle in. Replacement characters (undecodable bytes) are counted per document, then removed.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_ASCII_CONTROL = bytes([*range(0, 9), *range(11, 32), 127])
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_NEWLINES = re.compile("\r\n?|[\u2028\u2029]")
# Every blank but the newline, spelled out: the same set as [^\S\n], but a plain range class is ~7x faster
# to scan than Unicode's whitespace test on non-ASCII text.
_NOT_SPACE_BLANK = "\t\x0b\x0c\r\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_LINE_BLANKS = re.compile(f"[ {_NOT_SPACE_BLANK}]{{2,}}|[{_NOT_SPACE_BLANK}]")
_ODD_BLANK = re.compile(f"[{_NOT_SPACE_BLANK}]")
_SPACE_RUNS = re.compile(" {2,}")
_LEIPZIG_ID = re.compile(r"^[^\t\n]*\t", re.M)
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANKS = re.compile(r"\n{4,}")  # at most two blank lines in a row (PEP 8 keeps two)
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_TAG_MAX_CHARS = 64


# --------------------------------------------------------------------------------------------------
# cleaning


def normalize_chars(text: str, lines: bool = False) -> str:
    """The character-level part of cleaning, safe to run on a whole block of many documents at once:
    newlines, NFC, control characters out, exotic spaces to ' ', trailing blanks off each line.
    With `lines` (a document per line), every run of blanks becomes one space instead. Replacement characters stay: each document counts its own as undecodable bytes.
    Cheap `in` tests and an ASCII path skip the regex passes that would find nothing."""
    if "\r" in text or "\u2028" in text or "\u2029" in text:
        text = _NEWLINES.sub("\n", text)
    if text.isascii():  # no NFC, no exotic spaces; deleting ASCII controls is a bytes.translate
        text = text.encode("ascii").translate(None, _ASCII_CONTROL).decode("ascii")
    else:
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        text = _CONTROL.sub("", text)
        if not lines:
            text = _SPACES.sub(" ", text)
    if lines:  # one line is one document of prose: every run of blanks becomes one space
        if _ODD_BLANK.search(text):
            return _LINE_BLANKS.sub(" ", text)
        return _SPACE_RUNS.sub(" ", text) if "  " in text else text  # the common case, scanned fast
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("", text)
    return text


def tidy(text: str, single_line: bool) -> str:
    """The per-document part: one line of prose with single spaces, or blank-line runs cut to two."""
    if single_line:
        return " ".join(text.split())
    if "\n\n\n\n" in text:
        text = _BLANKS.sub("\n\n\n", text)
    return text.strip("\n").rstrip(" \t")


def clean_text(text: str, single_line: bool = False) -> str:
    """NFC, no control characters, tidy whitespace; code keeps its indentation, prose its paragraphs."""
    return tidy(normalize_chars(text).replace("\ufffd", ""), single_line)


def doc_digest(raw: bytes) -> bytes:
    """The 64-bit hash of a cleaned document's UTF-8 bytes, as 8 bytes to read as a little-endian uint64:
    the key for de-duplication and for the train/val split (val when below val_fraction * 2**64)."""
    return hashlib.blake2b(raw, digest_size=8).digest()


class SeenHashes:
    """Hashes of the documents kept so far, as sorted numpy runs: 8 bytes a document (a Python set of
    ints takes ~70, which is gigabytes for a corpus of 100M sentences), tested a batch at a time."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []  # sorted, disjoint, each more than half the size of the one before

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def add(self, hashes: np.ndarray) -> np.ndarray:
        """True where a hash is new: not seen in earlier batches, and its first occurrence in this one."""
        uniq, first = np.unique(hashes, return_index=True)  # sorted, with the index of each first occurrence
        fresh = np.ones(len(uniq), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, uniq), len(run) - 1)
            fresh &= run[at] != uniq
        new = np.zeros(len(hashes), dtype=bool)
        new[first[fresh]] = True
        if fresh.any():
            self.runs.append(uniq[fresh])
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):  # O(log n) runs
            last = self.runs.pop()
            self.runs[-1] = np.sort(np.concatenate([self.runs[-1], last]), kind="stable")  # timsort: a merge
        return new


# --------------------------------------------------------------------------------------------------
# sources


@dataclass
class Source:
    """One input as the user named it, resolved to files of one kind."""

    label: str
    kind: str  # text | jsonl | leipzig
    files: list[Path]
    unit: str = "file"  # text only: file | paragraph | line
    explicit: bool = True  # named directly by the user: a bad file is an error, not a skipped file
    root: Path | None = None  # a folder's files: the folder, for --tag-from-folder
    text_column: str = "text"  # JSONL, CSV/TSV and Parquet: the field that holds the document
    quoted_tsv: bool = False  # TSV: quoted fields as in CSV (plain TSV has no quoting)


# Readers yield batches: a list of raw document texts and, for JSONL, a parallel list of tag dicts.
Batch = tuple[list[str], "list[dict[str, str]] | None"]


def _kind_of(name: str) -> str:
    name = name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return "jsonl"
    if name.endswith((".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")):
        return "leipzig"
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        return "table"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


TAGGED_KINDS = ("jsonl", "table", "parquet")  # inputs whose records carry fields besides the text


def _open(path: Path, advance: Callable[[int], None]) -> IO[bytes]:
    """Buffered binary reader that reports the (compressed) bytes consumed, decompressing .gz transparently.
    Buffered for every format: reading lines from the raw counter would ask the OS for one byte at a time."""
    buffered = io.BufferedReader(_Counting(open(path, "rb"), advance), READ_BUFFER)
    if path.name.lower().endswith(".gz") and _kind_of(path.name) != "leipzig":
        unzipped = gzip.GzipFile(fileobj=buffered, mode="rb")
        unzipped.myfileobj = buffered  # closed with it (GzipFile closes only a file it opened itself)
        return unzipped  # type: ignore[return-value]
    return buffered  # type: ignore[return-value]


class _Counting(io.RawIOBase):
    def __init__(self, f: IO[bytes], advance: Callable[[int], None]) -> None:
        self.f, self.advance = f, advance

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)  # type: ignore[attr-defined]
        self.advance(n or 0)
        return n or 0

    def close(self) -> None:
        self.f.close()
        super().close()


def sniff(path: Path) -> str:
    """'ok', 'empty', 'binary' (NUL bytes) or 'not_utf8' from the first 64 KB (decompressed)."""
    try:
        with _open(path, lambda n: None) as f:
            head = f.read(SNIFF)
    except (OSError, EOFError, gzip.BadGzipFile):
        return "binary"
    return _classify(head)


def _classify(head: bytes) -> str:
    if not head:
        return "empty"
    if b"\x00" in head:
        return "binary"
    bad = head.decode("utf-8", errors="replace").count("\ufffd") - head.count(b"\xef\xbf\xbd")
    # the sniffed head may end inside a character: allow up to 3 bad bytes for that
    return "not_utf8" if bad > 3 and bad > 0.3 * len(head) / 2 else "ok"


def _auto_unit(path: Path) -> str:
    """For one big text file: a document per paragraph when it has blank lines, else per line."""
    with _open(path, lambda n: None) as f:
        head = f.read(SNIFF).decode("utf-8", errors="replace")
    return "paragraph" if _PARAGRAPH.search(_NEWLINES.sub("\n", head)) else "line"


def stdlib_files() -> list[Path]:
    """The .py files of the running Python's standard library, test folders and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("test"))
        files += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def resolve_inputs(cfg: PrepareConfig, raw_dir: Path) -> list[Source]:
    sources = []
    for item in cfg.inputs or ["stdlib"]:
        if item == "stdlib":
            sources.append(Source("stdlib", "text", stdlib_files(), "file", explicit=False))
            continue
        if item.startswith(("http://", "https://")):
            path = download(item, raw_dir, cfg.download_retries, cfg.download_timeout)
        else:
            path = Path(item).expanduser()
            if not path.exists():
                raise UserError(f"input {item} does not exist; check the path (or give a URL, or 'stdlib').")
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (not cfg.glob or fnmatch(p.name, cfg.glob))
            )
            if not files:
                hint = f" matching {cfg.glob!r}" if cfg.glob else ""
                raise UserError(f"folder {item} holds no files{hint}; check the path or --glob.")
            by_kind: dict[str, list[Path]] = defaultdict(list)
            for p in files:
                by_kind[_kind_of(p.name)].append(p)
            for kind, fs in by_kind.items():
                unit = "file" if cfg.doc_unit == "auto" else cfg.doc_unit
                sources.append(Source(f"{item} ({kind})", kind, fs, unit, explicit=False, root=path,
                                      text_column=cfg.text_column, quoted_tsv=cfg.quoted_tsv))
            continue
        kind = _kind_of(path.name)
        if kind not in ("leipzig", "parquet"):
            state = sniff(path)
            if state == "empty":
                raise UserError(f"input {item} is empty; give a file with text in it.")
            if state == "binary":
                raise UserError(f"input {item} looks like a binary file, not text; give text, JSONL or a .tar.gz.")
            if state == "not_utf8":
                raise UserError(
                    f"input {item} is not UTF-8 text; convert it first (e.g. iconv -f cp1251 -t utf-8)."
                )
        unit = cfg.doc_unit
        if kind == "text" and unit == "auto":
            unit = _auto_unit(path)
        sources.append(Source(item, kind, [path], unit, text_column=cfg.text_column, quoted_tsv=cfg.quoted_tsv))
    return sources


def _split_blocks(f: IO[bytes], unit: str, strip_ids: bool = False) -> Iterator[list[str]]:
    """Documents (lines or paragraphs) of a big stream, normalised a 4 MB block at a time.
    `strip_ids` drops the `id<TAB>` that starts every line of a Leipzig sentences file."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # blocks may cut a character
    carry = ""
    while True:
        block = f.read(BLOCK)
        text = carry + decoder.decode(block, final=not block)
        carry = ""
        if block:  # whole lines only; a line cut by the block boundary waits for the next block
            cut = text.rfind("\n") + 1
            text, carry = text[:cut], text[cut:]
        if strip_ids:
            text = _LEIPZIG_ID.sub("", text)
        text = normalize_chars(text, lines=unit == "line")
        if unit == "line":
            yield text.split("\n")
        else:
            pieces = _PARAGRAPH.split(text)
            if block:  # the last paragraph may go on in the next block (cleaning is idempotent)
                carry = pieces.pop() + "\n" + carry
            yield pieces
        if not block:
            return


def _read_text(src: Source, path: Path, advance: Callable[[int], None], stats: Stats) -> Iterator[Batch]:
    if src.unit == "file":  # small files: read once, then judge them from their own bytes
        try:
            with _open(path, advance) as f:
                data = f.read()
        except (OSError, EOFError, gzip.BadGzipFile):
            data = b"\x00"
        state = _classify(data[:SNIFF]) if not src.explicit else "ok"
        if state != "ok":
            stats.sources[src.label]["documents_in"] += 1
            stats.drop(state, src.label)
            return
        yield [normalize_chars(data.decode("utf-8", errors="replace"))], None
        return
    if not src.explicit:
        state = sniff(path)
        if state != "ok":
            stats.sources[src.label]["documents_in"] += 1
            stats.drop(state, src.label)
            advance(path.stat().st_size)
            return
    with _open(path, advance) as f:
        for pieces in _split_blocks(f, src.unit):
            yield pieces, None


def _tags_of(record: dict[str, Any], text_field: str = "text") -> dict[str, str]:
    """A record's other short string or integer fields: its tags."""
    tags = {}
    for k, v in record.items():
        if not k or k in (text_field, "text") or isinstance(v, bool) or not isinstance(v, (str, int)):
            continue
        v = str(v).strip()
        if v and len(v) <= _TAG_MAX_CHARS and "\n" not in v:
            tags[k] = v
    return tags


def _read_jsonl(src: Source, path: Path, advance: Callable[[int], None], stats: Stats) -> Iterator[Batch]:
    texts: list[str] = []
    tags: list[dict[str, str]] = []
    with _open(path, advance) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                stats.malformed(f"{path.name}:{lineno}")
                continue
            if not isinstance(record, dict) or not isinstance(record.get(src.text_column), str):
                stats.malformed(f"{path.name}:{lineno}")
                continue
            texts.append(normalize_chars(record[src.text_column]))
            tags.append(_tags_of(record, src.text_column))
            if len(texts) == 1024:
                yield texts, tags
                texts, tags = [], []
    if texts:
        yield texts, tags


def _read_leipzig(src: Source, path: Path, advance: Callable[[int], None], stats: Stats) -> Iterator[Batch]:
    """Leipzig Wortschatz archives: `<corpus>/<corpus>-sentences.txt` holds `id<TAB>sentence` lines."""
    found = False
    try:
        with _Counting(open(path, "rb"), advance) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:  # streaming mode: members come in archive order, read once
                if not (member.isfile() and member.name.endswith("-sentences.txt")):
                    continue
                found = True
                f = tar.extractfile(member)
                assert f is not None
                for lines in _split_blocks(f, "line", strip_ids=True):
                    yield lines, None
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as e:
        raise UserError(f"{path} is not a readable tar archive ({e}); check the file or download it again.") from None
    if not found:
        raise UserError(
            f"{path} holds no Leipzig '*-sentences.txt' file; give a Leipzig corpus archive or the text itself."
        )


def _read_table(src: Source, path: Path, advance: Callable[[int], None], stats: Stats) -> Iterator[Batch]:
    """CSV or TSV (by extension, .gz too) with a header row: the text column is the document, the other
    short columns are its tags, as JSONL fields are. TSV is plain (a row per line, no quoting: Common Voice,
    Tatoeba) unless `--quoted-tsv`."""
    column = src.text_column
    tsv = path.name.lower().removesuffix(".gz").endswith(".tsv")
    plain = tsv and not src.quoted_tsv
    csv.field_size_limit(2**31 - 1)  # a document may be long
    with _open(path, advance) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")  # Excel writes a BOM
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if plain else csv.QUOTE_MINIMAL)
        try:
            header = reader.fieldnames or []
        except csv.Error as e:
            raise UserError(f"{path} is not a readable {'TSV' if tsv else 'CSV'} file ({e}).") from None
        if column not in header:
            raise UserError(f"{path} has no {column!r} column (it has {', '.join(map(repr, header[:8])) or 'none'}); "
                            "name the text column with --text-column.")
        texts: list[str] = []
        tags: list[dict[str, str]] = []
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                stats.malformed(f"{path.name}:{reader.line_num}")
                continue
            text = row.get(column)
            if not isinstance(text, str) or None in row or None in row.values():  # too many or too few fields
                stats.malformed(f"{path.name}:{reader.line_num}")
                continue
            texts.append(normalize_chars(text))
            tags.append(_tags_of(row, column))
            if len(texts) == 1024:
                yield texts, tags
                texts, tags = [], []
    if texts:
        yield texts, tags


def _read_parquet(src: Source, path: Path, advance: Callable[[int], None], stats: Stats) -> Iterator[Batch]:
    """Parquet (what Hugging Face datasets ship): the text column is the document, the other short string
    and integer columns its tags. Needs pyarrow (`pip install 'minigpt[parquet]'`)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path.name} needs pyarrow; install it with pip install 'minigpt[parquet]'.") from None
    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except Exception as e:  # pyarrow raises its own error types for files that are not Parquet
        raise UserError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:100]}).") from None
    column = src.text_column
    if column not in names:
        raise UserError(f"{path} has no {column!r} column (it has {', '.join(map(repr, names[:8]))}); name the text "
                        "column with --text-column.")
    size, rows = path.stat().st_size, max(table.metadata.num_rows, 1)
    for batch in table.iter_batches(batch_size=1024):
        texts: list[str] = []
        tags: list[dict[str, str]] = []
        for record in batch.to_pylist():
            text = record.get(column)
            if not isinstance(text, str):
                stats.malformed(f"{path.name}:row")
                continue
            texts.append(normalize_chars(text))
            tags.append(_tags_of(record, column))
        advance(size * batch.num_rows // rows)
        if texts:
            yield texts, tags


READERS = {"text": _read_text, "jsonl": _read_jsonl, "leipzig": _read_leipzig, "table": _read_table,
           "parquet": _read_parquet}


def _read(src: Source, path: Path, advance: Callable[[int], None], stats: Stats, folder_tag: str) -> Iterator[Batch]:
    """A source file's batches, with the tag its first-level subfolder gives when `folder_tag` is set
    (a record's own field of that name wins)."""
    extra: dict[str, str] = {}
    if folder_tag and src.root is not None:
        parts = path.relative_to(src.root).parts
        value = parts[0].strip() if len(parts) > 1 else ""
        if value and len(value) <= _TAG_MAX_CHARS:
            extra = {folder_tag: value}
    try:
        for texts, tags in READERS[src.kind](src, path, advance, stats):
            if extra:
                tags = [extra | t for t in tags] if tags is not None else [dict(extra) for _ in texts]
            yield texts, tags
    except (OSError, EOFError) as e:  # a corrupt or cut .gz, a file that vanished
        if src.explicit:
            raise UserError(f"{path} cannot be read to its end ({e}); check the file or download it again.") from None
        stats.drop("unreadable", src.label)


# --------------------------------------------------------------------------------------------------
# statistics


@dataclass
class Stats:
    docs: Counter = field(default_factory=Counter)  # per split
    chars: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    duplicates: int = 0
    undecodable_bytes: int = 0
    malformed_lines: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    sources: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    tags: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def drop(self, reason: str, label: str) -> None:
        self.dropped[reason] += 1
        if label:
            self.sources[label]["dropped"] += 1

    def malformed(self, where: str) -> None:
        self.malformed_lines += 1
        if len(self.malformed_examples) < 20:
            self.malformed_examples.append(where)


@dataclass
class Cleaned:
    """One batch after cleaning and filters: the kept documents, where they came from in the batch (for
    their tags), their 64-bit hashes and their sizes in bytes."""

    texts: list[str]
    where: list[int]
    hashes: np.ndarray
    nbytes: np.ndarray


def _clean_batch(
    cfg: PrepareConfig, texts: list[str], single: bool, stats: Stats, per_src: Counter
) -> Cleaned:
    """Tidy and filter one batch of normalised texts: a lean loop per document (tidy, filter, hash)."""
    lo, hi, max_bad = cfg.min_chars, cfg.max_chars, cfg.max_bad_fraction
    kept: list[str] = []
    where: list[int] = []  # index in `texts` of each kept document (for its tags)
    digests: list[bytes] = []
    nbytes: list[int] = []
    docs_in = bad_total = 0
    maybe_bad = any("\ufffd" in t for t in texts) if len(texts) < 64 else "\ufffd" in "".join(texts)
    for i, text in enumerate(texts):
        if single:
            text = text.strip(" ")
            if not text:  # a blank line: a separator, not a document
                continue
        else:
            text = tidy(text, False)
        docs_in += 1
        bad = 0
        if maybe_bad and "\ufffd" in text:
            bad = text.count("\ufffd")
            text = text.replace("\ufffd", "")
            bad_total += bad
            if not single:
                text = tidy(text, False)
        n = len(text)
        if bad or not lo <= n <= hi:
            reason = (
                "empty" if not n
                else "undecodable" if bad > max_bad * n
                else "too_short" if n < lo
                else "too_long" if n > hi
                else None
            )
            if reason:
                stats.drop(reason, "")
                per_src["dropped"] += 1
                continue
        raw = text.encode("utf-8")
        kept.append(text)
        where.append(i)
        digests.append(doc_digest(raw))
        nbytes.append(len(raw))
    stats.undecodable_bytes += bad_total
    per_src["documents_in"] += docs_in
    return Cleaned(kept, where, np.frombuffer(b"".join(digests), dtype="<u8"), np.array(nbytes, dtype=np.int64))


def _process_batch(
    cfg: PrepareConfig,
    texts: list[str],
    tags: list[dict[str, str]] | None,
    single: bool,
    seen: SeenHashes,
    sinks: dict[str, IO[str]],
    fmt: str,
    stats: Stats,
    per_src: Counter,
) -> None:
    """Cleaning and filters for one batch, then de-dup and split over the whole batch's hashes at once."""
    c = _clean_batch(cfg, texts, single, stats, per_src)
    kept, where, hashes = c.texts, c.where, c.hashes
    new = seen.add(hashes) if cfg.dedup else np.ones(len(kept), dtype=bool)
    is_val = hashes < np.uint64(int(cfg.val_fraction * 2**64))  # val_fraction < 1: the bound fits
    end = "\n" + DOC_SEP + "\n"  # text: each document ends with a separator line
    for split, mask in (("train", new & ~is_val), ("val", new & is_val)):
        chosen = np.flatnonzero(mask).tolist()
        docs = [kept[j] for j in chosen]
        if fmt == "jsonl":
            lines = []
            for j, text in zip(chosen, docs, strict=True):
                record = {"text": text, **tags[where[j]]} if tags else {"text": text}
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                for k, v in record.items():
                    if k != "text":
                        stats.tags[k][v] += 1
            payload = "".join(lines)
        else:
            payload = end.join(docs) + end if docs else ""
        if payload:
            sinks[split].write(payload)
        stats.docs[split] += len(docs)
        stats.bytes[split] += int(c.nbytes[mask].sum())
        stats.chars[split] += sum(map(len, docs))
    dups = len(kept) - int(new.sum())
    stats.duplicates += dups
    per_src["documents_kept"] += len(kept) - dups
    per_src["duplicates"] += dups


def process(cfg: PrepareConfig, sources: list[Source], sinks: dict[str, IO[str]], fmt: str) -> Stats:
    """Stream every source through cleaning, filters and de-dup into the train/val sinks."""
    stats = Stats()
    seen = SeenHashes()
    total = sum(p.stat().st_size for s in sources for p in s.files)
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with progress(*columns, unit="bytes") as bars:
        task = bars.add_task("preparing", total=total)

        def advance(n: int) -> None:
            bars.advance(task, n)

        for src in sources:
            bars.update(task, description=f"preparing {src.label}")
            single = src.kind == "leipzig" or src.unit == "line"
            per_src = stats.sources[src.label]
            start = time.perf_counter()
            for path in src.files:
                per_src["bytes_in"] += path.stat().st_size
                for texts, tags in _read(src, path, advance, stats, cfg.tag_from_folder):
                    _process_batch(cfg, texts, tags, single, seen, sinks, fmt, stats, per_src)
            per_src["seconds"] += time.perf_counter() - start  # each format's own speed, in stats.json
    return stats


def read_documents(cfg: PrepareConfig, stats: Stats | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """(text, tags) of every document of `cfg.inputs`, read and cleaned exactly as `prepare` does, but
    neither de-duplicated nor split. Counts (drops, malformed lines) go to `stats`."""
    stats = stats if stats is not None else Stats()
    for src in resolve_inputs(cfg, Path(cfg.out_dir) / "raw"):
        single = src.kind == "leipzig" or src.unit == "line"
        per_src = stats.sources[src.label]
        for path in src.files:
            per_src["bytes_in"] += path.stat().st_size
            for texts, tags in _read(src, path, lambda n: None, stats, cfg.tag_from_folder):
                c = _clean_batch(cfg, texts, single, stats, per_src)
                per_src["documents_kept"] += len(c.texts)
                for text, i in zip(c.texts, c.where, strict=True):
                    yield text, (tags[i] if tags else {})


def prepare(cfg: PrepareConfig) -> tuple[Path, dict[str, Any]]:
    """Run the whole preparation; returns the dataset folder and its stats (also in stats.json)."""
    out_root = Path(cfg.out_dir)
    sources = resolve_inputs(cfg, out_root / "raw")
    name = cfg.name or default_name(cfg.inputs)
    out = out_root / name
    tagged = cfg.tag_from_folder or any(s.kind in TAGGED_KINDS for s in sources)
    fmt = "jsonl" if tagged else "text"
    ext = ".jsonl" if fmt == "jsonl" else ".txt"
    start = time.perf_counter()
    # Both splits go to temp files that replace the old ones only once everything succeeded.
    with atomic_open(out / f"train{ext}", "w", encoding="utf-8") as ftrain, atomic_open(
        out / f"val{ext}", "w", encoding="utf-8"
    ) as fval:
        stats = process(cfg, sources, {"train": ftrain, "val": fval}, fmt)
        if stats.docs["train"] == 0:
            dropped = ", ".join(f"{n} {r}" for r, n in stats.dropped.items()) or "none"
            raise UserError(
                f"the corpus is empty after cleaning ({stats.duplicates} duplicates, dropped: {dropped}); "
                "give more text or relax --min-chars / --max-bad-fraction."
            )
    seconds = time.perf_counter() - start
    for stale in ("train.txt", "val.txt", "train.jsonl", "val.jsonl"):
        if not stale.endswith(ext) and (out / stale).exists():
            (out / stale).unlink()
    bytes_in = sum(c["bytes_in"] for c in stats.sources.values())
    summary = {
        "format": fmt,
        "doc_separator": None if fmt == "jsonl" else DOC_SEP,
        "inputs": cfg.inputs or ["stdlib"],
        "documents": dict(stats.docs),
        "characters": dict(stats.chars),
        "bytes": dict(stats.bytes),
        "input_bytes": bytes_in,
        "duplicates_removed": stats.duplicates,
        "dropped": dict(stats.dropped),
        "undecodable_bytes": stats.undecodable_bytes,
        "malformed_lines": stats.malformed_lines,
        "malformed_examples": stats.malformed_examples,
        "sources": {k: dict(v) | {"seconds": round(v["seconds"], 3),
                                  "mb_per_s": round(v["bytes_in"] / 1e6 / max(v["seconds"], 1e-9), 2)}
                    for k, v in stats.sources.items()},
        "tags": {k: dict(v.most_common()) for k, v in stats.tags.items()},
        "val_fraction": cfg.val_fraction,
        "seconds": round(seconds, 3),
        "mb_per_s": round(bytes_in / 1e6 / max(seconds, 1e-9), 2),
    }
    for split in ("train", "val"):
        summary["documents"].setdefault(split, 0)
        summary["characters"].setdefault(split, 0)
        summary["bytes"].setdefault(split, 0)
    write_json(out / "stats.json", summary)
    return out, summary


def sample_prompt(dataset: str | Path, max_chars: int = 40) -> tuple[str, dict[str, str]]:
    """A prompt in the corpus's own language and style, for the pipeline's closing hint, and the tags of
    its document: the start of the first val line with two words or more, cut at a word within
    `max_chars` (or, in a script written without spaces, the first `max_chars` characters of a line)."""
    fallback: tuple[str, dict[str, str]] = ("", {})
    for text, tags in iter_documents(Path(dataset), "val"):
        for line in text.splitlines():
            words = line.split()
            if len(words) < 2 or len(words[0]) + 1 + len(words[1]) > max_chars:
                if line.strip() and not fallback[0]:
                    fallback = (line.strip()[:max_chars].strip(), tags)
                continue
            prompt = " ".join(words[:2])
            for word in words[2:]:
                if len(prompt) + 1 + len(word) > max_chars:
                    break
                prompt += " " + word
            return prompt, tags
    return fallback


def default_name(inputs: list[str]) -> str:
    if not inputs or inputs == ["stdlib"]:
        return "stdlib"
    first = inputs[0].rstrip("/").split("?")[0].split("/")[-1] or "corpus"
    for suffix in (".gz", ".tgz", ".tar", ".jsonl", ".ndjson", ".txt", ".csv", ".tsv", ".parquet"):
        first = first.removesuffix(suffix)
    name = re.sub(r"[^\w.-]+", "_", first).strip("._") or "corpus"
    return name if len(inputs) == 1 else f"{name}_plus{len(inputs) - 1}"


def stats_table(summary: dict[str, Any]) -> Table:
    t = Table(title="prepared corpus", show_lines=False)
    for col in ("source", "docs in", "kept", "dup", "dropped", "bytes in", "MB/s"):
        t.add_column(col, justify="left" if col == "source" else "right")
    for label, c in summary["sources"].items():
        t.add_row(label, f"{c.get('documents_in', 0):,}", f"{c.get('documents_kept', 0):,}",
                  f"{c.get('duplicates', 0):,}", f"{c.get('dropped', 0):,}", human_bytes(c.get("bytes_in", 0)),
                  f"{c.get('mb_per_s', 0):.1f}")
    t.add_section()
    for split in ("train", "val"):
        t.add_row(f"[bold]{split}[/]", "", f"{summary['documents'][split]:,}", "", "",
                  f"{summary['characters'][split]:,} chars / {human_bytes(summary['bytes'][split])}")
    drops = ", ".join(f"{r}={n}" for r, n in summary["dropped"].items()) or "none"
    t.caption = (
        f"duplicates removed {summary['duplicates_removed']:,} | dropped: {drops} | undecodable bytes "
        f"{summary['undecodable_bytes']:,} | malformed lines {summary['malformed_lines']:,} | "
        f"{summary['seconds']:.2f}s, {summary['mb_per_s']:.1f} MB/s"
    )
    return t


# --------------------------------------------------------------------------------------------------
# reading prepared documents back


def iter_documents(dataset: Path, split: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(text, tags) for each document of a prepared split, streamed."""
    jsonl, txt = dataset / f"{split}.jsonl", dataset / f"{split}.txt"
    if jsonl.exists():
        with open(jsonl, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                text = record.pop("text")
                yield text, record
    elif txt.exists():
        with open(txt, encoding="utf-8", newline="\n") as f:
            lines: list[str] = []
            for line in f:
                if line == DOC_SEP + "\n":
                    yield "".join(lines)[:-1], {}
                    lines = []
                else:
                    lines.append(line)
    else:
        raise UserError(f"{dataset} has no {split}.txt or {split}.jsonl; run 01_prepare_data.py first.")


# --------------------------------------------------------------------------------------------------
# downloads


def download(url: str, raw_dir: Path, retries: int = 5, timeout: float = 30.0) -> Path:
    """Fetch `url` into raw_dir with a progress bar; resumes a cut download; cached with its sha256."""
    base = url.split("?")[0].rstrip("/").split("/")[-1] or "download"
    dest = raw_dir / f"{hashlib.sha1(url.encode()).hexdigest()[:10]}-{base}"
    sidecar = dest.with_name(dest.name + ".sha256")
    if dest.exists() and sidecar.exists():
        if sidecar.read_text().split()[0] == sha256_file(dest):
            console.print(f"[dim]using cached download {dest}[/]")
            return dest
        console.print(f"[yellow]cached {dest} fails its checksum; downloading again[/]")
        dest.unlink()
    raw_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = ""
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "minigpt/0.1"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                if have and resp.status != 206:  # server ignored the range: start over
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as f, progress(
                    TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), unit="bytes",
                ) as bars:
                    task = bars.add_task(f"downloading {base}", total=total, completed=have)
                    while chunk := resp.read(1 << 16):
                        f.write(chunk)
                        bars.advance(task, len(chunk))
            if total is not None and part.stat().st_size < total:
                last_error = f"connection closed at {part.stat().st_size} of {total} bytes"
                continue
            digest = sha256_file(part)
            os.replace(part, dest)
            with atomic_open(sidecar, "w") as f:
                f.write(f"{digest}  {url}\n")
            return dest
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # our partial file is already whole, or stale: start over
                part.unlink()
                continue
            raise UserError(f"downloading {url} failed with HTTP {e.code} {e.reason}; check the URL.") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last_error = str(getattr(e, "reason", e))
        if attempt + 1 < retries:
            time.sleep(min(2**attempt * 0.25, 4))
    raise UserError(
        f"could not download {url} ({last_error}); check the address and network, then run again: "
        "the partial download resumes."
    )
