"""`minigpt eval`, `minigpt info`, tags in generation, and tables (CSV/TSV/Parquet) and folders as tagged input."""

from __future__ import annotations

import csv
import gzip
import json
import math
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import MODEL, ROOT, assert_user_error, metrics, run_cli, run_script, shared_corpus, train_cfg
from tokenizers import Tokenizer, decoders, models

from minigpt.checkpoint import load_run
from minigpt.config import EvalConfig, PrepareConfig, Sampling, TokenizerConfig
from minigpt.corpus import iter_documents, prepare
from minigpt.evaluate import encode_documents, eval_run
from minigpt.generate import generate
from minigpt.tokenizer import build
from minigpt.train import train
from minigpt.utils import UserError

LANGS = {"tt": "Әнием җырлый, һәр көн өйдә яңа җыр ишетелә. Татарстан Республикасы Идел буенда.",
         "en": "The quick brown fox jumps over the lazy dog, and it was the best of times."}


def tagged_rows(n: int) -> list[dict]:
    return [{"text": f"{LANGS[lang]} {i}", "lang": lang, "id": f"doc-{i}"} for i in range(n)
            for lang in (["tt", "en"][i % 2],)]


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A JSONL corpus tagged lang=tt/en, its tokens and a run trained on them."""
    tmp = tmp_path_factory.mktemp("tagged")
    source = tmp / "mix.jsonl"
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in tagged_rows(400)), encoding="utf-8")
    data, _ = prepare(PrepareConfig(inputs=[str(source)], out_dir=str(tmp / "data"), val_fraction=0.2))
    tokens = build(TokenizerConfig(data=str(data), vocab_size=300, max_tag_values=10)).out
    train(train_cfg(tokens, tmp / "runs", max_steps=60, eval_every=30, eval_tokens=10**6), MODEL)
    return {"source": source, "data": data, "tokens": tokens, "run": tmp / "runs" / "run"}


def eval_json(*args: str) -> dict:
    proc = run_cli("eval", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eval_on_the_val_shards_reproduces_training(tagged: dict[str, Path]) -> None:
    """Non-overlapping windows over the val split are the windows training scores (the whole split, each
    shard's tail included): the same bits per byte, and quick_test's agrees."""
    last_eval = [r for r in metrics(tagged["run"]) if "val_bpb" in r][-1]
    r = eval_json("--run", str(tagged["run"]), "--checkpoint", "last", "--stride", "32", "--device", "cpu",
                  str(tagged["tokens"]))
    assert r["input_kind"] == "shards" and r["stride"] == 32 and r["context"] == 32
    assert r["bpb"] == pytest.approx(last_eval["val_bpb"], abs=1e-4)
    assert r["loss"] == pytest.approx(last_eval["val_loss"], abs=1e-4)
    assert r["tokens"] == json.loads((tagged["tokens"] / "meta.json").read_text())["splits"]["val"]["tokens"] - 1
    proc = run_script("quick_test.py", "--run", str(tagged["run"]), "--checkpoint", "last", "--max-new-tokens", "4")
    assert f"val_bpb {last_eval['val_bpb']:.4f}" in proc.stdout, proc.stdout + proc.stderr


def test_eval_tokens_picks_the_windows_training_spreads_over_a_larger_split(tagged: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    train(train_cfg(tagged["tokens"], tmp_path, max_steps=10, eval_every=10, eval_tokens=256), MODEL)
    last_eval = [r for r in metrics(tmp_path / "run") if "val_bpb" in r][-1]
    r = eval_json("--run", str(tmp_path / "run"), "--checkpoint", "last", "--eval-tokens", "256", "--device", "cpu",
                  str(tagged["tokens"]))
    assert r["tokens"] == 256 and r["windows"] == 8 and r["bpb"] == pytest.approx(last_eval["val_bpb"], abs=1e-4)


def test_eval_of_text_per_document_and_per_tag(tagged: dict[str, Path], tmp_path: Path) -> None:
    per_doc = tmp_path / "docs.jsonl"
    r = eval_json("--run", str(tagged["run"]), "--device", "cpu", "--per-doc", str(per_doc), "--json",
                  str(tmp_path / "r.json"), str(tagged["source"]))
    assert json.loads((tmp_path / "r.json").read_text()) == r
    rows = [json.loads(ln) for ln in per_doc.read_text(encoding="utf-8").splitlines()]
    assert r["documents"] == len(rows) == 400 and r["input_kind"] == "text"
    assert sum(row["tokens"] for row in rows) == r["tokens"]  # every token of every document, scored once
    assert sum(row["bytes"] for row in rows) == r["bytes"] == sum(len(x["text"].encode()) for x in tagged_rows(400))
    assert r["chars"] == sum(len(x["text"]) for x in tagged_rows(400))
    nats = sum(row["bpb"] * row["bytes"] * math.log(2) for row in rows)
    assert nats / r["tokens"] == pytest.approx(r["loss"], rel=1e-5)
    assert r["bpc"] == pytest.approx(r["bpb"] * r["bytes"] / r["chars"], rel=1e-9)
    assert set(r["tags"]) == {"lang"} and set(r["tags"]["lang"]) == {"tt", "en"}  # id: no token, no table
    assert r["tags"]["lang"]["tt"]["documents"] == 200 and r["tags"]["lang"]["en"]["bpb"] > 0
    assert len(r["most_surprising"]) == 5 and r["most_surprising"][0]["bpb"] >= r["least_surprising"][0]["bpb"]
    assert rows[0]["tags"] == {"lang": "tt", "id": "doc-0"}
    # the prepared dataset's val split is the same text, cleaned the same way
    val = eval_json("--run", str(tagged["run"]), "--device", "cpu", str(tagged["data"]))
    assert val["documents"] == sum(1 for _ in iter_documents(tagged["data"], "val")) and val["input_kind"] == "dataset"


def test_a_smaller_stride_gives_more_context_and_no_higher_loss(toy_dataset: Path, tmp_path: Path) -> None:
    """Characters need context: with every target after the first window seeing at least half a context
    (the default) or more, the loss is below that of non-overlapping windows, whose first targets see
    almost nothing."""
    tokens = build(TokenizerConfig(data=str(toy_dataset), char=True, out=str(tmp_path / "char"))).out
    train(train_cfg(tokens, tmp_path / "runs", max_steps=200, eval_every=1000), MODEL)
    run = str(tmp_path / "runs" / "run")
    wide, half, narrow = (eval_json("--run", run, "--device", "cpu", *s, str(toy_dataset))
                          for s in (["--stride", "32"], [], ["--stride", "4"]))
    assert half["stride"] == 16 and narrow["windows"] > half["windows"] > wide["windows"]
    assert wide["tokens"] == narrow["tokens"] == half["tokens"]
    assert narrow["loss"] < wide["loss"] and half["loss"] < wide["loss"]


def test_eval_errors(tagged: dict[str, Path], tmp_path: Path) -> None:
    run = str(tagged["run"])
    assert_user_error(run_cli("eval", "--run", run, str(tmp_path / "nope.txt")), "does not exist")

    def refused(match: str, *inputs: Path, **options: object) -> None:
        with pytest.raises(UserError, match=match):
            eval_run(EvalConfig(run=run, device="cpu", **options), PrepareConfig(inputs=[str(i) for i in inputs]))

    (tmp_path / "empty.txt").write_text("")
    refused("is empty", tmp_path / "empty.txt")
    (tmp_path / "notext.jsonl").write_text('{"body": "hello"}\n{"body": "world"}\n')
    refused("no text to score .*2 malformed records: .* 'text' text field; see --text-column", tmp_path / "notext.jsonl")
    refused("give the text to score")
    refused("longer than the context", tagged["source"], stride=64)
    other = build(TokenizerConfig(data=str(tagged["data"]), char=True)).out
    refused("another tokenizer", other)
    refused("no document texts", tagged["tokens"], per_doc=str(tmp_path / "d.jsonl"))
    refused("token-shard folder", tagged["source"], eval_tokens=64)
    cut = tmp_path / "cut.csv.gz"
    whole = gzip.compress(("text,lang\n" + "".join(f"line {i * 7919 % 10007},en\n" for i in range(20000))).encode())
    cut.write_bytes(whole[: len(whole) // 2])
    refused("cannot be read to its end", cut)


def test_eval_prints_document_text_as_text(tagged: dict[str, Path], tmp_path: Path) -> None:
    """Brackets in a document (BBCode, markup) are shown as they are, never read as console markup."""
    forum = tmp_path / "forum.txt"
    forum.write_text("[/quote] I disagree [b]strongly[/b].\n[red]not red[/red] and [/] alone\n", encoding="utf-8")
    proc = run_cli("eval", "--run", str(tagged["run"]), str(forum))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[/quote] I disagree [b]strongly[/b]." in proc.stdout and "[red]not red[/red]" in proc.stdout


def test_a_tokenizer_that_cannot_encode_the_text_is_an_error() -> None:
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "<|endoftext|>": 2}, merges=[]))  # no byte fallback
    tok.decoder = decoders.Fuse()
    loaded = SimpleNamespace(tokenizer=tok, eot=2, bos=2, tags={})
    stream, docs = encode_documents(loaded, [("abba", {}), ("ba", {})])
    assert stream.tolist() == [2, 0, 1, 1, 0, 2, 1, 0, 2] and [(d.start, d.end) for d in docs] == [(1, 6), (6, 9)]
    with pytest.raises(UserError, match="cannot encode 1 of 2 documents"):
        encode_documents(loaded, [("abba", {}), ("abc", {})])


def test_tags_in_generation_and_info(tagged: dict[str, Path]) -> None:
    run = str(tagged["run"])
    loaded = load_run(run)
    tt, en = loaded.tags["<|lang=tt|>"], loaded.tags["<|lang=en|>"]
    ids, cut = loaded.prompt("The", {"lang": "tt"})
    assert ids[:2] == [loaded.eot, tt] and cut == 0 and ids[2:] == loaded.encode("The")
    ids, cut = loaded.prompt("word " * 100, {"lang": "en"})
    assert ids[:2] == [loaded.eot, en] and len(ids) == 31 and cut > 0  # room for one new token in 32
    proc = run_cli("generate", "--run", run, "--tag", "lang=tt", "--max-new-tokens", "30",
                      "--temperature", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with torch.no_grad():  # the same tokens as a document that starts with the tag
        expected = generate(loaded.model, [loaded.eot, tt], 30, Sampling(temperature=0), eot=loaded.eot)[0]
    assert proc.stdout.split("\n")[1] == loaded.decode(expected).split("\n")[0]
    assert_user_error(run_cli("generate", "--run", run, "--tag", "lang=fr"),
                      "knows no tag lang=fr", "lang=en, lang=tt")
    assert_user_error(run_cli("generate", "--run", run, "--tag", "lang"), "field=value")
    assert_user_error(run_cli("generate", "--run", run, "--tag", "lang=tt", "--tag", "lang=en"),
                      "gives lang twice")
    proc = run_cli("info", "--run", run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["tags"] == {"lang": {"en": 200, "tt": 200}}  # id has 400 values: no token, not a tag
    assert info["parameters"] == loaded.model.num_params() and info["step"] == 60 and info["val_bpb"] > 0
    assert info["memory"] == {"weights_bytes": 4 * info["parameters"], "train_bytes_per_weight": 16,
                              "train_bytes": 16 * info["parameters"]}  # an fp32 run
    assert {"model.safetensors", "config.json", "tokenizer.json", "manifest.json"} <= set(info["files"])
    assert "tt (200 docs)" in proc.stdout
    proc = run_script("quick_test.py", "--run", run, "--max-new-tokens", "8", "--temperature", "0.8")
    assert "tag lang=tt" in proc.stdout and "tag lang=en" in proc.stdout, proc.stdout


# -- tables and folders in --------------------------------------------------------------------------


def write_table(path: Path, rows: list[dict], delimiter: str) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("name", ["rows.csv", "rows.tsv", "rows.csv.gz", "rows.parquet"])
def test_tables_are_documents_with_tags(tmp_path: Path, name: str) -> None:
    rows = [{"id": i, "body": f"Line, with a comma and \"quotes\"\nand a newline {i}", "author": ["Tukay", "Гали"][i % 2]}
            for i in range(50)]
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        write_table(path, rows, "\t" if ".tsv" in name else ",")
    # fields with newlines and quotes: CSV's quoting (which a .tsv then needs --quoted-tsv to read)
    data, stats = prepare(PrepareConfig(inputs=[str(path)], out_dir=str(tmp_path / "data"), text_column="body",
                                        val_fraction=0.0, quoted_tsv=".tsv" in name))
    docs = list(iter_documents(data, "train"))
    assert stats["format"] == "jsonl" and len(docs) == 50
    assert docs[3] == (rows[3]["body"], {"id": "3", "author": "Гали"})
    assert stats["tags"]["author"] == {"Tukay": 25, "Гали": 25}
    with pytest.raises(UserError, match="no 'text' column"):
        prepare(PrepareConfig(inputs=[str(path)], out_dir=str(tmp_path / "d2")))


def test_plain_tsv_has_no_quoting(tmp_path: Path) -> None:
    """Common Voice and Tatoeba write TSV without quoting: a quote is text, and one that never closes
    swallows nothing. Every row in is a document out."""
    sentences = ['"Hello," she said.', 'He wrote "hi and left.', "Plain one.", 'Ends with a quote"', "Last 'row'."]
    path = tmp_path / "validated.tsv"
    path.write_text("sentence\tlocale\n" + "".join(f"{t}\ttt\n" for t in sentences), encoding="utf-8")
    data, stats = prepare(PrepareConfig(inputs=[str(path)], out_dir=str(tmp_path / "data"), text_column="sentence",
                                        val_fraction=0.0))
    assert [t for t, _ in iter_documents(data, "train")] == sentences and stats["malformed_lines"] == 0
    # quoted TSV, asked for: a quoted field may hold a tab and a newline
    path.write_text('sentence\tlocale\n"one\ttab"\ttt\n"two\nlines"\ttt\n""""\ttt\n', encoding="utf-8")
    data, stats = prepare(PrepareConfig(inputs=[str(path)], out_dir=str(tmp_path / "q"), text_column="sentence",
                                        val_fraction=0.0, quoted_tsv=True))
    assert [t for t, _ in iter_documents(data, "train")] == ["one\ttab", "two\nlines", '"']


def test_a_table_with_broken_rows_keeps_the_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes("\ufefftext,lang\nfirst row,en\nsecond row,en,extra\n\"third row\",tt\nfourth\n".encode())
    data, stats = prepare(PrepareConfig(inputs=[str(path)], out_dir=str(tmp_path / "data"), val_fraction=0.0))
    assert [t for t, _ in iter_documents(data, "train")] == ["first row", "third row"]  # Excel's BOM is no column
    assert stats["malformed_lines"] == 2 and stats["malformed_examples"] == ["t.csv:3", "t.csv:5"]


def test_parquet_without_pyarrow_names_the_extra(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    code = ("import runpy, sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None; "
            f"sys.argv = [sys.argv[1], {str(path)!r}, '--out-dir', {str(tmp_path / 'd')!r}]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "01_prepare_data.py")], capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert_user_error(proc, "needs pyarrow", "minigpt[parquet]")


def test_tag_from_folder(tmp_path: Path) -> None:
    books = tmp_path / "books"
    for author, n in (("Tukay", 3), ("Pushkin", 2)):
        (books / author).mkdir(parents=True)
        for i in range(n):
            (books / author / f"{i}.txt").write_text(f"A poem {i} by {author}.\n", encoding="utf-8")
    (books / "loose.txt").write_text("No author here.\n", encoding="utf-8")
    data, stats = prepare(PrepareConfig(inputs=[str(books)], out_dir=str(tmp_path / "data"), val_fraction=0.0,
                                        tag_from_folder="author"))
    docs = dict(iter_documents(data, "train"))
    assert docs["A poem 1 by Tukay."] == {"author": "Tukay"} and docs["No author here."] == {}
    assert stats["tags"] == {"author": {"Tukay": 3, "Pushkin": 2}}
    (books / "Tukay" / "own.jsonl").write_text(json.dumps({"text": "Signed.", "author": "Габдулла Тукай"}) + "\n")
    data, _ = prepare(PrepareConfig(inputs=[str(books)], out_dir=str(tmp_path / "d2"), val_fraction=0.0,
                                    tag_from_folder="author"))
    assert dict(iter_documents(data, "train"))["Signed."] == {"author": "Габдулла Тукай"}  # a record's own field wins
    with pytest.raises(UserError, match="would replace the text"):
        PrepareConfig(inputs=[str(books)], tag_from_folder="text")


def script_share(text: str) -> tuple[float, float]:
    """(Cyrillic, Latin) shares of the letters in `text`."""
    letters = [c for c in text if c.isalpha()]
    names = [unicodedata.name(c, "") for c in letters]
    n = max(len(letters), 1)
    return sum("CYRILLIC" in x for x in names) / n, sum("LATIN" in x for x in names) / n


@pytest.mark.slow
def test_a_language_tag_steers_the_samples(tmp_path: Path) -> None:
    """The small version of the tagged experiment in the README: Tatar sentences tagged lang=tt and
    Shakespeare tagged lang=en, a tiny model trained for about 40 s on 2 cores; 20 samples with each tag
    are at least 95% letters of that script, and eval scores each language apart."""
    tt = shared_corpus("tatar_cv.txt").read_text(encoding="utf-8").splitlines()[:3000]
    en = shared_corpus("tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")[:1200]
    mix = tmp_path / "mix.jsonl"
    mix.write_text("\n".join(json.dumps({"text": t, "lang": lang}, ensure_ascii=False)
                             for lang, texts in (("tt", tt), ("en", en)) for t in texts), encoding="utf-8")
    data, _ = prepare(PrepareConfig(inputs=[str(mix)], out_dir=str(tmp_path / "data")))
    tokens = build(TokenizerConfig(data=str(data), vocab_size=1024)).out
    train(train_cfg(tokens, tmp_path / "runs", batch_size=16, max_steps=300, lr=3e-3, warmup_steps=30, log_every=50,
                    eval_every=300, eval_tokens=8192), {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64})
    loaded = load_run(tmp_path / "runs" / "run")
    for lang, script in (("tt", 0), ("en", 1)):
        rows = generate(loaded.model, loaded.prompt("", {"lang": lang})[0], 60, Sampling(0.8, top_k=40), rows=20,
                        eot=loaded.eot, seed=1)
        share = script_share("".join(loaded.decode(r) for r in rows))[script]
        assert share >= 0.95, (lang, share)
    r = eval_json("--run", str(tmp_path / "runs" / "run"), "--device", "cpu", str(data))
    assert set(r["tags"]["lang"]) == {"tt", "en"} and all(g["bpb"] > 0 for g in r["tags"]["lang"].values())


def test_eval_encodes_documents_exactly_as_the_shards_hold_them(tagged: dict[str, Path]) -> None:
    """The val documents encoded by eval, after its leading <|endoftext|>, are the val shards token for
    token: the same tag tokens in the same order, the same text ids, the same separators."""
    loaded = load_run(tagged["run"])
    stream, docs = encode_documents(loaded, iter_documents(tagged["data"], "val"))
    meta = json.loads((tagged["tokens"] / "meta.json").read_text())
    shards = [np.fromfile(tagged["tokens"] / s["file"], dtype="<u2") for s in meta["splits"]["val"]["shards"]]
    assert stream[0] == loaded.eot and stream[1:].tolist() == np.concatenate(shards).tolist()
    assert len(docs) == meta["splits"]["val"]["documents"] and docs[-1].end == len(stream)
    assert all(stream[d.start] in loaded.tags.values() for d in docs)  # every document opens with its tag
