"""02_train_tokenizer.py and minigpt.tokenizer: round trips, shards, meta, tags, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ENGLISH, RUSSIAN, TATAR, assert_user_error, run_script, shared_corpus

from minigpt.cli import Streamer
from minigpt.config import PrepareConfig, TokenizerConfig
from minigpt.corpus import DOC_SEP, iter_documents, prepare, sample_prompt
from minigpt.data import EOT, load_tokenizer
from minigpt.tokenizer import SPLIT_PATTERN, auto_vocab_size, build
from minigpt.utils import UserError

HARD = [
    ENGLISH, RUSSIAN, TATAR,
    "Эмодзи 😀👩‍👩‍👧 и флаг 🇹🇷; CJK 漢字かな; combining é; math ∑∫√; tab\there",
    "stray bytes decoded as \ufffd stay \ufffd; NUL-free; <|endoftext|> typed by a person",
    "    def f(x):\n        return x ** 2  # code keeps indentation\n",
    "һәм җәй өчен үзәк, ә ө ү җ ң һ Ә Ө Ү Җ Ң Һ",
]


@pytest.fixture(scope="module")
def dataset(toy_dataset: Path) -> Path:
    return toy_dataset


@pytest.fixture(scope="module")
def bpe(dataset: Path) -> Path:
    return build(TokenizerConfig(data=str(dataset), vocab_size=400, shard_tokens=2048)).out


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_roundtrip_any_text(dataset: Path, bpe: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    out = bpe if kind == "bpe" else build(TokenizerConfig(data=str(dataset), char=True)).out
    tok = load_tokenizer(out / "tokenizer.json")
    tok.encode_special_tokens = True
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    for text in HARD:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert decode(ids) == text
        assert tok.token_to_id(EOT) not in ids  # typed special tokens are text, not separators
        streamer = Streamer(SimpleNamespace(eot=-1, decode=decode))  # `minigpt generate`, token by token
        capsys.readouterr()
        for i in ids:
            streamer(i)
        streamer.flush()
        assert capsys.readouterr().out == text
    assert tok.get_vocab_size() < 65536


def test_letters_of_every_script_stay_words() -> None:
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    words = [w for w, _ in split.pre_tokenize_str("Әнием җырлый һәм көлә, mother sings")]
    assert words == ["Әнием", " җырлый", " һәм", " көлә", ",", " mother", " sings"]


def test_shards_meta_and_memmap_agree(dataset: Path, bpe: Path) -> None:
    meta = json.loads((bpe / "meta.json").read_text())
    tok = load_tokenizer(bpe / "tokenizer.json")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400 == tok.get_vocab_size()
    assert meta["tokenizer_sha256"] and meta["roundtrip"]["failures"] == 0
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert len(info["shards"]) == -(-info["tokens"] // 2048) > (1 if split == "train" else 0)
        arrays = []
        for shard in info["shards"]:
            path = bpe / shard["file"]
            assert path.stat().st_size == 2 * shard["tokens"]
            arrays.append(np.memmap(path, dtype=np.dtype("<u2"), mode="r"))
        tokens = np.concatenate(arrays)
        assert tokens.size == info["tokens"] and tokens.max() < meta["vocab_size"]
        assert int((tokens == meta["eot_id"]).sum()) == info["documents"]
        docs = [t for t, _ in iter_documents(dataset, split)]
        assert info["bytes"] == sum(len(d.encode()) for d in docs)
        decoded = tok.decode(tokens.tolist(), skip_special_tokens=False)
        assert decoded == "".join(d + EOT for d in docs)  # the shards hold exactly the documents
        assert meta["bytes_per_token"][split] == round(info["bytes"] / info["tokens"], 4)


def test_tags_become_special_tokens_before_each_document(tmp_path: Path) -> None:
    path = tmp_path / "tagged.jsonl"
    rows = [{"text": f"Сүз {i} " * 5 + f"word {i}", "lang": ["tt", "ru"][i % 2], "id": f"doc-{i}"} for i in range(120)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    data, _ = prepare(PrepareConfig(inputs=[str(path)], out_dir=str(tmp_path / "data")))
    out = build(TokenizerConfig(data=str(data), vocab_size=300, max_tag_values=10)).out
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["tags"]) == {"<|lang=ru|>", "<|lang=tt|>"}  # 'id' has 120 values: not a tag
    tokens = np.fromfile(out / meta["splits"]["train"]["shards"][0]["file"], dtype="<u2")
    starts = np.concatenate([[0], np.flatnonzero(tokens == meta["eot_id"])[:-1] + 1])
    assert set(tokens[starts].tolist()) == set(meta["tags"].values())


def test_vocab_too_large_for_the_corpus(tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_text("\n".join(f"ab ba {i}" for i in range(50)), encoding="utf-8")
    data, _ = prepare(PrepareConfig(inputs=[str(path)], out_dir=str(tmp_path / "data")))
    with pytest.raises(UserError, match="only supports"):
        build(TokenizerConfig(data=str(data), vocab_size=5000))
    proc = run_script("02_train_tokenizer.py", "--data", str(data), "--vocab-size", "5000")
    assert_user_error(proc, "--vocab-size", "or less")
    assert not list(data.glob("*/*.bin")) and not list(data.glob("*/.*.tmp"))  # nothing half-written


def test_vocab_size_0_is_sized_to_the_corpus(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    assert [auto_vocab_size(n) for n in (0, 131_071, 131_072, 400_000, 1_000_000, 12_000_000)] == [
        512, 512, 1024, 2048, 4096, 8192]  # at least 128 bytes of train text per entry, 512 to 8192
    train_bytes = json.loads((dataset / "stats.json").read_text())["bytes"]["train"]
    out = build(TokenizerConfig(data=str(dataset), vocab_size=0)).out
    assert out.name == f"bpe{auto_vocab_size(train_bytes)}" and "sized to the corpus" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == auto_vocab_size(train_bytes)


def test_the_closing_hint_prompts_with_the_corpus_own_words(dataset: Path, tmp_path: Path) -> None:
    first = next(iter_documents(dataset, "val"))[0]
    prompt, tags = sample_prompt(dataset)
    assert len(prompt.split()) >= 2 and len(prompt) <= 40 and " ".join(first.split()).startswith(prompt)
    assert tags == {}

    def val(text: str, name: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "val.txt").write_text(text + "\n" + DOC_SEP + "\n", encoding="utf-8")
        return tmp_path / name

    code = val('"""\n    ast\n\n    The `ast` module helps Python applications to process trees', "code")
    assert sample_prompt(code)[0] == "The `ast` module helps Python"  # a line with words, cut at a word
    url = val("https://example.com/a/very/long/path/that/goes/on?x=1 foo bar", "url")
    assert sample_prompt(url)[0] == "https://example.com/a/very/long/path/tha"  # never past 40 characters
    assert sample_prompt(val("今日は良い天気ですね。散歩に行きましょう。", "ja"))[0] == "今日は良い天気ですね。散歩に行きましょう。"
    (tmp_path / "tagged").mkdir()
    (tmp_path / "tagged" / "val.jsonl").write_text('{"text": "Әнием җырлый, һәр көн", "lang": "tt"}\n', encoding="utf-8")
    assert sample_prompt(tmp_path / "tagged") == ("Әнием җырлый, һәр көн", {"lang": "tt"})


def test_a_corpus_too_small_for_the_auto_vocab_gets_what_it_supports(tmp_path: Path, capsys) -> None:
    (tmp_path / "small.txt").write_text("\n\n".join(f"{ENGLISH} {i}" for i in range(40)), encoding="utf-8")
    data, _ = prepare(PrepareConfig(inputs=[str(tmp_path / "small.txt")], out_dir=str(tmp_path / "data")))
    result = build(TokenizerConfig(data=str(data)))
    assert result.out.name == "bpe512" and 257 < result.meta["vocab_size"] < 512
    assert "the corpus supports" in capsys.readouterr().out
    with pytest.raises(UserError, match="the corpus only supports"):  # asked for: still an error
        build(TokenizerConfig(data=str(data), vocab_size=512))


def test_vocab_size_must_hold_the_bytes() -> None:
    assert_user_error(run_script("02_train_tokenizer.py", "--vocab-size", "100"), "--vocab-size")


@pytest.mark.parametrize("name", ["tatar_cv.txt", "tinyshakespeare.txt"])
def test_real_corpora_roundtrip_every_val_document(tmp_path: Path, name: str) -> None:
    corpus = shared_corpus(name)
    data, _ = prepare(PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp_path / "data")))
    for char in (False, True):
        meta = build(TokenizerConfig(data=str(data), vocab_size=2048, char=char)).meta
        rt = meta["roundtrip"]
        assert rt["failures"] == 0 and rt["checked"] == meta["splits"]["val"]["documents"] > 300
        assert meta["bytes_per_token"]["val"] > (2.5 if not char else 0.9)


@pytest.mark.parametrize("char", [False, True])
def test_the_round_trip_check_reads_the_shards_as_written(tmp_path: Path, monkeypatch, char: bool) -> None:
    """Documents that type special tokens keep them as text in the shards, and the check decodes the val
    shards themselves; shards that do not hold the documents fail it and nothing is written."""
    import minigpt.tokenizer as tokenizer

    path = tmp_path / "typed.jsonl"
    rows = [{"text": f"line {i} says <|endoftext|> and <|lang=tt|> in text", "lang": ["tt", "en"][i % 2]}
            for i in range(200)]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    data, _ = prepare(PrepareConfig(inputs=[str(path)], out_dir=str(tmp_path / "data"), val_fraction=0.2))
    out = build(TokenizerConfig(data=str(data), vocab_size=280, char=char, out=str(tmp_path / "ok"))).out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["roundtrip"] == {"checked": meta["splits"]["val"]["documents"], "failures": 0, "first_failure": None}
    tokens = np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in meta["splits"]["val"]["shards"]])
    assert int((tokens == meta["eot_id"]).sum()) == meta["splits"]["val"]["documents"]  # one per document, no more

    encode = tokenizer.encode_split

    def special_tokens_parsed(tok, *args, **kw):  # what the shards would hold with the wrong setting
        tok.encode_special_tokens = False
        return encode(tok, *args, **kw)

    monkeypatch.setattr(tokenizer, "encode_split", special_tokens_parsed)
    with pytest.raises(UserError, match="do not decode back"):
        build(TokenizerConfig(data=str(data), vocab_size=280, char=char, out=str(tmp_path / "bad")))
    assert not list((tmp_path / "bad").glob("*.bin")) and not (tmp_path / "bad" / "meta.json").exists()
    monkeypatch.setattr(tokenizer, "encode_split", encode)
    read_back = tokenizer._shard_documents
    monkeypatch.setattr(tokenizer, "_shard_documents", lambda *a: list(read_back(*a))[:-1])  # one lost
    with pytest.raises(UserError, match="do not decode back to 1 of"):
        build(TokenizerConfig(data=str(data), vocab_size=280, char=char, out=str(tmp_path / "short")))
