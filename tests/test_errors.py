"""Every bad input a user can give gets one sentence, exit code 2 and no traceback (a row each)."""

from __future__ import annotations

import gzip
import http.server
import json
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_face, run_script, toy_documents
from test_prepare import make_leipzig

from minigpt.config import PrepareConfig, TokenizerConfig, TrainConfig
from minigpt.corpus import prepare
from minigpt.tokenizer import build
from minigpt.train import train
from minigpt.utils import sha256_file


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy corpus, its tokens, and a 5-step run to break in various ways."""
    tmp = tmp_path_factory.mktemp("errors")
    corpus = tmp / "toy.txt"
    corpus.write_text("\n\n".join(toy_documents(300)) + "\n", encoding="utf-8")
    data, _ = prepare(PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp / "data")))
    tokens = build(TokenizerConfig(data=str(data), vocab_size=300)).out
    train(TrainConfig(data=str(tokens), runs_dir=str(tmp / "runs"), name="run", batch_size=4, max_steps=5,
                      eval_every=5, eval_tokens=1024, device="cpu"),
          {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16})
    return tmp


@pytest.fixture(scope="module")
def server():
    """404 for unknown paths; /hang accepts the request and never answers."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/hang":
                threading.Event().wait(5)
                return
            self.send_error(404, "Not Found")

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def broken_run(world: Path, tmp: Path, damage: Callable[[Path], None]) -> str:
    run = tmp / "run"
    shutil.copytree(world / "runs" / "run", run)
    for tag in ("best", "last"):
        damage(run / tag)
    return str(run)


def reseal(folder: Path) -> None:
    """Rewrite the manifest so only the deliberate mismatch is left to find."""
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in folder.iterdir() if p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def flip_byte(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def other_tokenizer(world: Path) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        shutil.copyfile(world / "data" / "toy" / "char" / "tokenizer.json", folder / "tokenizer.json")
        reseal(folder)
    return damage


def fake_hash_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}" + b"\x00" * 64)
    reseal(folder)


CASES = {
    "missing path": (lambda w, t: ("01_prepare_data.py", [str(t / "nope.txt")]), ["does not exist"]),
    "empty file": (lambda w, t: ("01_prepare_data.py", [str(_write(t / "e.txt", b""))]), ["is empty"]),
    "empty after cleaning": (lambda w, t: ("01_prepare_data.py", [str(_write(t / "c.txt", b"\x01\x02\n \n\x07"))]),
                             ["empty after cleaning"]),
    "binary file (PNG)": (lambda w, t: ("01_prepare_data.py", [str(_write(t / "i.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50))]),
                          ["binary file"]),
    "invalid UTF-8": (lambda w, t: ("01_prepare_data.py", [str(_write(t / "r.txt", "Привет, как дела? Всё хорошо.".encode("cp1251") * 30))]),
                      ["not utf-8", "iconv"]),
    "JSONL with only malformed lines": (lambda w, t: ("01_prepare_data.py", [str(_write(t / "m.jsonl", b"{bad\n[1,2]\n{\"x\": 1}\n"))]),
                                        ["empty after cleaning"]),
    "tar.gz without Leipzig sentences": (lambda w, t: ("01_prepare_data.py", [str(make_leipzig(t / "n.tar.gz", [], False))]),
                                         ["no leipzig"]),
    "not a tar archive": (lambda w, t: ("01_prepare_data.py", [str(_write(t / "x.tar.gz", gzip.compress(b"hello")))]),
                          ["not a readable tar archive"]),
    "URL 404": (lambda w, t: ("01_prepare_data.py", [f"{w['url']}/missing.txt"]), ["http 404"]),
    "URL timeout": (lambda w, t: ("01_prepare_data.py", [f"{w['url']}/hang", "--download-timeout", "0.5",
                                                         "--download-retries", "1"]), ["could not download", "resumes"]),
    "URL nobody listens on": (lambda w, t: ("01_prepare_data.py", [f"http://127.0.0.1:{_free_port()}/x.txt",
                                                                   "--download-retries", "1"]), ["could not download"]),
    "dataset missing": (lambda w, t: ("02_train_tokenizer.py", ["--data", str(t / "none")]), ["01_prepare_data.py"]),
    "vocab larger than the corpus": (lambda w, t: ("02_train_tokenizer.py", ["--data", str(w["root"] / "data" / "toy"),
                                                    "--vocab-size", "60000", "--out", str(t / "tok")]), ["or less"]),
    "unknown preset": (lambda w, t: ("03_train.py", ["--data", str(w["tokens"]), "--runs-dir", str(t), "--preset", "huge"]),
                       ["unknown preset"]),
    "run folder missing (resume)": (lambda w, t: ("03_train.py", ["--data", str(w["tokens"]), "--runs-dir", str(t),
                                                   "--name", "ghost", "--resume"]), ["does not exist"]),
    "run folder missing (generate)": (lambda w, t: ("minigpt", ["generate", "--run", str(t / "ghost")]), ["does not exist"]),
    "truncated checkpoint": (lambda w, t: ("minigpt", ["generate", "--run", broken_run(w["root"], t, truncate)]),
                             ["damaged", "truncated"]),
    "corrupted checkpoint (checksum)": (lambda w, t: ("minigpt", ["generate", "--run", broken_run(w["root"], t, flip_byte)]),
                                        ["damaged", "checksum"]),
    "bad safetensors header": (lambda w, t: ("minigpt", ["generate", "--run", broken_run(w["root"], t, fake_hash_header)]),
                               ["cannot be read"]),
    "checkpoint vocab != tokenizer": (lambda w, t: ("minigpt", ["generate", "--run",
                                                    broken_run(w["root"], t, other_tokenizer(w["root"]))]),
                                      ["does not belong"]),
    "negative --top-k": (lambda w, t: ("minigpt", ["generate", "--run", str(w["root"] / "runs" / "run"), "--top-k", "-1"]),
                         ["--top-k >= 0"]),
    "unknown recipe": (lambda w, t: ("03_train.py", ["--data", str(w["tokens"]), "--runs-dir", str(t), "--recipe", "tpu"]),
                       ["unknown --recipe"]),
    "unknown checkpoint": (lambda w, t: ("minigpt", ["generate", "--run", str(w["root"] / "runs" / "run"), "--checkpoint",
                                                     "first"]), ["best or last"]),
    "empty prompt": (lambda w, t: ("minigpt", ["generate", "--run", str(w["root"] / "runs" / "run"), "--prompt", "  "]),
                     ["prompt is empty"]),
    "--device cuda without a GPU": (lambda w, t: ("03_train.py", ["--data", str(w["tokens"]), "--runs-dir", str(t),
                                                   "--device", "cuda"]), ["no cuda gpu"]),
    "--device mps without MPS": (lambda w, t: ("minigpt", ["generate", "--device", "mps", "--run",
                                               str(w["root"] / "runs" / "run")]), ["mps is not available"]),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AS_A_USER = {"missing path", "run folder missing (generate)"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, world: Path, server: str, tmp_path: Path) -> None:
    if case == "--device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if case == "--device mps without MPS" and torch.backends.mps.is_available():
        pytest.skip("MPS is present")
    make, fragments = CASES[case]
    if not (world / "data" / "toy" / "char").exists():  # another tokenizer, for the vocab-mismatch row
        build(TokenizerConfig(data=str(world / "data" / "toy"), char=True))
    w = {"root": world, "tokens": world / "data" / "toy" / "bpe300", "url": server}
    script, args = make(w, tmp_path)
    if script == "01_prepare_data.py":
        args = [*args, "--out-dir", str(tmp_path / "out")]
    # two cases run as a user runs them; the rest in this process (the same command, seconds faster)
    proc = (run_script if case in AS_A_USER else run_face)(script, *args)
    assert_user_error(proc, *fragments)
    assert len((proc.stderr or proc.stdout).strip().splitlines()) <= 3  # one sentence, however the terminal wraps it
