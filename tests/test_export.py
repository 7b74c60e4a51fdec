"""`minigpt export`: the transformers folder and the ONNX file give the original's logits, tokens and ids."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ENGLISH, TATAR, assert_user_error, run_cli, train_cfg

from minigpt.checkpoint import load_run
from minigpt.config import ExportConfig, PrepareConfig, Sampling, TokenizerConfig
from minigpt.corpus import iter_documents, prepare
from minigpt.data import TokenData, eval_windows
from minigpt.export import export_run
from minigpt.generate import generate
from minigpt.int8 import int8_matmul
from minigpt.tokenizer import build
from minigpt.train import train
from minigpt.utils import UserError

transformers = pytest.importorskip("transformers", reason="the export extra is not installed (pip install 'minigpt[export]')")
SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64}


@pytest.fixture(scope="module")
def runs(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tied toy run, an untied one on tagged text with a rotary base and norm epsilon of its own (a
    converter that drops either would still match the defaults), and one with grouped-query attention (4
    query heads, 2 key/value heads) and Llama 3's RoPE scaling."""
    tmp = tmp_path_factory.mktemp("export")
    train(train_cfg(tokens, tmp, name="tied", max_steps=20, eval_every=20), SHAPE)
    source = tmp / "tagged.jsonl"
    source.write_text("\n".join(json.dumps({"text": f"{t} {i}", "lang": lang}, ensure_ascii=False)
                                 for i, (t, lang) in enumerate([(ENGLISH, "en"), (TATAR, "tt")] * 150)), encoding="utf-8")
    data, _ = prepare(PrepareConfig(inputs=[str(source)], out_dir=str(tmp / "data"), val_fraction=0.2))
    tagged = build(TokenizerConfig(data=str(data), vocab_size=300)).out
    train(train_cfg(tagged, tmp, name="untied", max_steps=20, eval_every=20),
          SHAPE | {"tie_embeddings": False, "rope_theta": 500.0, "norm_eps": 1e-3})
    train(train_cfg(tokens, tmp, name="gqa", max_steps=20, eval_every=20), SHAPE | {"n_head": 4, "n_kv_head": 2,
          "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 16}})
    return {"tied": tmp / "tied", "untied": tmp / "untied", "gqa": tmp / "gqa",
            "tokens": {"tied": tokens, "untied": tagged, "gqa": tokens}, "tmp": tmp}


def export(run: Path, out: Path, *extra: str) -> dict:
    proc = run_cli("export", "--run", str(run), str(out), *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def real_text_batch(tokens: Path, rows: int = 4) -> torch.Tensor:
    data = TokenData(tokens)
    windows = eval_windows(data.val, 63, 63 * rows)
    return torch.tensor(np.stack([data.val.arrays[w.source][w.offset : w.offset + 64] for w in windows]).astype(np.int64))


@pytest.mark.parametrize("kind", ["tied", "untied", "gqa"])
def test_transformers_loads_the_folder_and_agrees(runs: dict[str, Path], kind: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs["tmp"] / f"hf-{kind}"
    report = export(runs[kind], out)
    assert report["architecture"] == "LlamaForCausalLM" and not report["dequantised"] and report["max_abs_diff"] < 1e-4
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md"} <= set(report["files"])
    loaded = load_run(runs[kind])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == (kind != "untied")
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads) == ((4, 2) if kind == "gqa" else (2, 2))
    rope = getattr(hf.config, "rope_parameters", None) or hf.config.rope_scaling or {}  # transformers 5, 4.x
    assert (rope.get("rope_type") == "llama3") == (kind == "gqa")
    x = real_text_batch(runs["tokens"][kind])
    with torch.no_grad():
        ours, theirs = loaded.model(x).logits, hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # greedy: the tokens `minigpt generate --temperature 0` prints, from the same document start
    proc = run_cli("generate", "--run", str(runs[kind]), "--prompt", "Әнием", "--temperature", "0",
                      "--max-new-tokens", "32")
    assert proc.returncode == 0, proc.stderr
    prompt = [loaded.eot, *loaded.encode("Әнием")]
    new = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=loaded.eot)[0, len(prompt):]
    new = new.tolist()[: new.tolist().index(loaded.eot)] if loaded.eot in new.tolist() else new.tolist()
    assert new == generate(loaded.model, prompt, 32, Sampling(temperature=0), eot=loaded.eot)[0]
    assert proc.stdout.split("\n")[1] == ("Әнием" + loaded.decode(new)).split("\n")[0]
    # the tokenizer: the same ids on every val document, <|endoftext|> first when special tokens are added
    tok = AutoTokenizer.from_pretrained(out)
    for text, _ in iter_documents(Path(TokenData(runs["tokens"][kind]).meta["dataset"]), "val"):
        assert tok(text, add_special_tokens=False)["input_ids"] == loaded.encode(text)
    assert {t: tok.convert_tokens_to_ids(t) for t in loaded.tags} == loaded.tags  # the tag tokens, same ids
    assert len(loaded.tags) == (2 if kind == "untied" else 0)
    typed = "a document that types <|endoftext|> as text"
    assert tok(typed)["input_ids"] == [loaded.eot, *loaded.encode(typed)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tied", "gqa"])
def test_onnx_runs_in_onnxruntime_with_the_same_logits(runs: dict[str, Path], kind: str) -> None:
    import onnx
    import onnxruntime

    out = runs["tmp"] / f"onnx-{kind}"
    report = export(runs[kind], out, "--format", "onnx")
    assert report["max_abs_diff"] < 1e-4
    onnx.checker.check_model(str(out / "model.onnx"))
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    loaded = load_run(runs[kind])
    toy = runs["tokens"][kind]
    for x in (real_text_batch(toy, rows=3), real_text_batch(toy, rows=1)[:, :17]):  # dynamic axes
        with torch.no_grad():
            expected = loaded.model(x).logits.numpy()
        got = session.run(["logits"], {"input_ids": x.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4


@pytest.mark.slow
def test_an_int8_run_exports_its_dequantised_weights(runs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    q = runs["tmp"] / "untied-int8"
    proc = run_cli("quantize", "--run", str(runs["untied"]), "--out", str(q), "--device", "cpu",
                      "--eval-tokens", "512", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    out = runs["tmp"] / "hf-int8"
    assert export(q, out)["dequantised"]
    assert "float32, dequantised from the run's int8 weights" in (out / "README.md").read_text()
    loaded = load_run(q)
    int8_matmul(loaded.model, torch.device("cuda"))  # the dequant reference path (no GPU needed to pick it)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = real_text_batch(runs["tokens"]["untied"])
    with torch.no_grad():
        assert (loaded.model(x).logits - hf(x).logits).abs().max().item() < 1e-4


def test_export_errors(runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train(train_cfg(runs["tokens"]["tied"], tmp_path, name="gelu", max_steps=2, eval_every=2), SHAPE | {"mlp": "gelu"})
    assert_user_error(run_cli("export", "--run", str(tmp_path / "gelu"), str(tmp_path / "g")),
                      "--mlp gelu", "no llama equivalent")
    run = runs["tied"]

    def refused(match: str, out: Path, **options: object) -> None:
        with pytest.raises(UserError, match=match):
            export_run(ExportConfig(out=str(out), run=str(run), **options))

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    refused("not empty.*--force", tmp_path / "busy")
    refused("not an earlier minigpt export", tmp_path / "busy", force=True)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    for target, match in ((run, "the run"), (run / "best" / "hf", "the run"), (run.parent, "the run"),
                          (run / "metrics.jsonl", "is a file")):
        refused(match, target, force=True)
    assert (run / "best" / "model.safetensors").exists() and not (run / "best" / "hf").exists()
    with pytest.raises(UserError, match="unknown --format"):
        ExportConfig(out=str(tmp_path / "x"), format="gguf")
    again = tmp_path / "again"  # --force replaces an earlier export, whole
    export_run(ExportConfig(out=str(again), run=str(run)))
    (again / "model.safetensors").write_bytes(b"stale")
    export_run(ExportConfig(out=str(again), run=str(run), force=True))
    assert (again / "model.safetensors").stat().st_size > 100 and not list(tmp_path.glob(".again.*"))
    for missing, fmt in (("transformers", "hf"), ("onnxscript", "onnx")):
        monkeypatch.setitem(sys.modules, missing, None)  # as if the extra were not installed
        refused(r"minigpt\[export\]", tmp_path / f"y-{fmt}", format=fmt)
        monkeypatch.delitem(sys.modules, missing)
