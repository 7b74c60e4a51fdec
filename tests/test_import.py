"""`minigpt import`: a Hugging Face Llama folder becomes a run that gives transformers' logits and tokens.

The sources are tiny random LlamaForCausalLM models built here with transformers, with a byte-level BPE
tokenizer trained here (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ENGLISH,
    MODEL,
    RUSSIAN,
    TATAR,
    assert_user_error,
    metrics,
    run_cli,
    run_script,
    toy_documents,
    train_cfg,
)
from tokenizers import Tokenizer

from minigpt.checkpoint import load_run
from minigpt.config import ImportConfig, Sampling, TokenizerConfig, TrainConfig
from minigpt.corpus import iter_documents
from minigpt.data import TokenData, eval_windows
from minigpt.evaluate import encode_documents
from minigpt.generate import generate
from minigpt.hf_import import import_folder, source_model
from minigpt.tokenizer import build
from minigpt.train import train
from minigpt.utils import sha256_file

transformers = pytest.importorskip("transformers", reason="the export extra is not installed (pip install 'minigpt[export]')")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE of 320 tokens with <s> (added before every text, as Llama's) and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(toy_documents(60), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return out


def llama(folder: Path, tokenizer_dir: Path, **kw) -> Path:
    """A random LlamaForCausalLM saved to `folder` with the test tokenizer (weights not at their init
    scale, so that a misplaced tensor shows in the logits)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id) | kw
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.5, 4.0))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


SOURCES = {
    "untied": {},
    "tied-gqa": {"tie_word_embeddings": True, "num_key_value_heads": 2},
    "llama3-rope": {"num_key_value_heads": 1, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE},
}


@pytest.mark.parametrize("kind", SOURCES)
def test_an_imported_model_gives_the_logits_and_tokens_of_transformers(tokenizer_dir: Path, tmp_path: Path,
                                                                        kind: str) -> None:
    from transformers import AutoModelForCausalLM

    src = llama(tmp_path / "src", tokenizer_dir, **SOURCES[kind])
    proc = run_cli("import", str(src), "--out", str(tmp_path / "run"), "--context", "96", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert report["parameters"] == sum(p.numel() for p in hf.parameters())  # a tied matrix once
    loaded = load_run(tmp_path / "run")
    cfg = loaded.model.cfg
    assert (cfg.n_kv_head, cfg.block_size, cfg.mlp_hidden) == (hf.config.num_key_value_heads, 96, 160)
    assert cfg.tie_embeddings == (kind == "tied-gqa") and (cfg.rope_scaling is not None) == (kind == "llama3-rope")
    assert loaded.bos == 0 and loaded.eot == 1  # <s> starts a document (the tokenizer adds it), </s> ends one
    # logits on real text, 96 positions: past original_max_position_embeddings, where llama3's scaling acts
    text = " ".join([ENGLISH, RUSSIAN, TATAR] * 4)
    ids = torch.tensor([[loaded.bos, *loaded.encode(text)][:96]])
    assert ids.shape[1] == 96
    with torch.no_grad():
        ours, theirs = loaded.model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4 * theirs.abs().max().item()
    # greedy tokens from the same document start, as `minigpt generate --temperature 0` makes them
    prompt, _ = loaded.prompt("Әнием")
    assert prompt[0] == 0
    new = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                      pad_token_id=1)[0, len(prompt):].tolist()
    assert new == generate(loaded.model, prompt, 24, Sampling(temperature=0))[0]
    # the source's files stay the run's: the same tokenizer ids, the same special tokens
    assert (tmp_path / "run" / "best" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (tmp_path / "run" / "best" / "tokenizer_config.json").exists()
    info = run_cli("info", "--run", str(tmp_path / "run"))
    assert info.returncode == 0 and str(src.resolve()) in " ".join(info.stdout.split()), info.stdout


def test_an_imported_model_scores_each_document_from_its_bos(tokenizer_dir: Path, tmp_path: Path) -> None:
    """eval's stream for an imported model: <s> before every document, never scored; </s> after, scored."""
    src = llama(tmp_path / "src", tokenizer_dir)
    config = json.loads((src / "config.json").read_text())
    del config["tie_word_embeddings"]  # transformers' default for Llama: untied
    (src / "config.json").write_text(json.dumps(config))
    import_folder(ImportConfig(source=str(src), out=str(tmp_path / "run")))
    loaded = load_run(tmp_path / "run")
    assert not loaded.model.cfg.tie_embeddings
    stream, docs = encode_documents(loaded, [("ab", {}), ("cd", {})])
    a, c = loaded.encode("ab"), loaded.encode("cd")
    assert stream.tolist() == [0, *a, 1, 0, *c, 1]
    assert [(d.start, d.end) for d in docs] == [(1, 2 + len(a)), (3 + len(a), 4 + len(a) + len(c))]
    # the totals are the documents' sums: the <s> between them is given, not scored
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (ENGLISH, TATAR, RUSSIAN)))
    proc = run_cli("eval", "--run", str(tmp_path / "run"), str(tmp_path / "docs.jsonl"))
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["documents"] == 3 and r["tokens"] == sum(d["tokens"] for d in r["most_surprising"]), r


def test_a_bf16_import_is_half_the_size_and_close(tokenizer_dir: Path, tmp_path: Path) -> None:
    src = llama(tmp_path / "src", tokenizer_dir)
    for dtype in ("fp32", "bf16"):
        import_folder(ImportConfig(source=str(src), out=str(tmp_path / dtype), dtype=dtype))
    sizes = {d: (tmp_path / d / "best" / "model.safetensors").stat().st_size for d in ("fp32", "bf16")}
    proc = run_cli("quantize", "--run", str(tmp_path / "bf16"), "--to", "int8", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # a bf16 import is no quantized copy
    assert sizes["bf16"] < 0.51 * sizes["fp32"]
    full, half = load_run(tmp_path / "fp32"), load_run(tmp_path / "bf16")
    ids = torch.tensor([[0, *full.encode(ENGLISH)]])
    with torch.no_grad():
        a, b = full.model(ids).logits, half.model(ids).logits.float()
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()


def test_a_sharded_source_imports_as_one(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    src = llama(tmp_path / "src", tokenizer_dir)
    LlamaForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((src / name).read_bytes())
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    for name in ("one", "sharded"):
        import_folder(ImportConfig(source=str(src if name == "one" else tmp_path / "sharded"), out=str(tmp_path / f"r{name}")))
    a, b = load_run(tmp_path / "rone").model.state_dict(), load_run(tmp_path / "rsharded").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("change", "fragment"), [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 64}, "sliding_window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     "rope_type='yarn'"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "Qwen2ForCausalLM"),
    ({"head_dim": 32}, "head_dim"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_what_the_model_cannot_be_is_refused_naming_the_field(tokenizer_dir: Path, tmp_path: Path, change: dict,
                                                              fragment: str) -> None:
    src = llama(tmp_path / "src", tokenizer_dir)
    config = json.loads((src / "config.json").read_text()) | change
    (src / "config.json").write_text(json.dumps(config))
    assert_user_error(run_cli("import", str(src), "--out", str(tmp_path / "run")), fragment)
    assert not (tmp_path / "run").exists()


def test_bad_folders_are_one_sentence(tokenizer_dir: Path, tokens: Path, tmp_path: Path) -> None:
    assert_user_error(run_cli("import", str(tmp_path / "none"), "--out", str(tmp_path / "r")), "no config.json")
    src = llama(tmp_path / "src", tokenizer_dir)
    import_folder(ImportConfig(source=str(src), out=str(tmp_path / "r")))
    assert_user_error(run_cli("import", str(src), "--out", str(tmp_path / "r")), "--force")  # never over a run
    assert run_cli("import", str(src), "--out", str(tmp_path / "r"), "--force").returncode == 0
    train(train_cfg(tokens, tmp_path, name="trained", max_steps=2), MODEL)  # --force never replaces a trained run
    assert_user_error(run_cli("import", str(src), "--out", str(tmp_path / "trained"), "--force"), "not an earlier")
    assert (tmp_path / "trained" / "last").is_dir()
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    assert_user_error(run_cli("import", str(src), "--out", str(tmp_path / "r3")), "hidden_size")
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").rename(src / "weights.bin")
    assert_user_error(run_cli("import", str(src), "--out", str(tmp_path / "r2")), "safetensors")


def test_import_then_export_gives_back_the_same_tensors_and_tokenizer_files(tokenizer_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    src = llama(tmp_path / "src", tokenizer_dir, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE)
    import_folder(ImportConfig(source=str(src), out=str(tmp_path / "run")))
    proc = run_cli("export", "--run", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (src / name).exists():
            assert (tmp_path / "hf" / name).read_bytes() == (src / name).read_bytes(), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["num_key_value_heads"]) == (0, 1, 2)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("ab")["input_ids"][0] == 0  # <s> added, as the source's


def test_an_imported_model_quantizes_and_keeps_its_tokenizer_files(tokenizer_dir: Path, tmp_path: Path) -> None:
    src = llama(tmp_path / "src", tokenizer_dir, num_key_value_heads=2)
    import_folder(ImportConfig(source=str(src), out=str(tmp_path / "run")))
    proc = run_cli("quantize", "--run", str(tmp_path / "run"), "--to", "int8", "--out", str(tmp_path / "q"),
                   "--new-tokens", "4")
    assert proc.returncode == 0 and "no val split" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "q" / "best" / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    q = load_run(tmp_path / "q")
    assert q.bos == 0 and q.model.cfg.n_kv_head == 2
    assert len(generate(q.model, q.prompt("ab")[0], 8, Sampling(temperature=0))[0]) == 8


# --------------------------------------------------------------------------------------------------
# data encoded with a given tokenizer, and a run started from a model


def test_data_encoded_with_a_models_tokenizer_opens_each_document_with_its_bos(tokenizer_dir: Path, toy_dataset: Path,
                                                                               tmp_path: Path) -> None:
    src = llama(tmp_path / "src", tokenizer_dir)
    out = build(TokenizerConfig(data=str(toy_dataset), tokenizer=str(src), out=str(tmp_path / "tok"))).out
    data = TokenData(out)
    assert (data.meta["bos_id"], data.meta["eot_id"], data.meta["kind"]) == (0, 1, "imported")
    assert data.meta["tokenizer_sha256"] == sha256_file(src / "tokenizer.json") and data.meta["roundtrip"]["failures"] == 0
    arr = data.val.arrays[0]
    ends = np.flatnonzero(arr == 1)
    assert arr[0] == 0 and (arr[ends[:-1] + 1] == 0).all()  # <s> opens every document, </s> ends it
    first = [d for d, _ in iter_documents(toy_dataset, "val")][0]
    assert arr[1 : ends[0]].tolist() == Tokenizer.from_file(str(src / "tokenizer.json")).encode(
        first, add_special_tokens=False).ids


def test_a_vocab_past_uint16_gets_uint32_shards(tokenizer_dir: Path, toy_dataset: Path, tmp_path: Path) -> None:
    """Llama 3 has 128k tokens: the shards widen, and the ids above 65,535 survive."""
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(66_000)] + ["Әнием"])  # "Әнием" gets an id past 65,535
    (tmp_path / "big").mkdir()
    tok.save(str(tmp_path / "big" / "tokenizer.json"))
    (tmp_path / "big" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    data = TokenData(build(TokenizerConfig(data=str(toy_dataset), tokenizer=str(tmp_path / "big"),
                                           out=str(tmp_path / "tok"))).out)
    big = tok.token_to_id("Әнием")
    assert data.meta["dtype"] == "uint32" and big > 65_535
    assert any((a == big).any() for a in data.train.arrays)


def test_a_run_starts_from_an_imported_model_and_learns(tokenizer_dir: Path, toy_dataset: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = llama(tmp_path / "src", tokenizer_dir, num_key_value_heads=2, tie_word_embeddings=True)
    out = build(TokenizerConfig(data=str(toy_dataset), tokenizer=str(src), out=str(tmp_path / "tok"))).out
    base = dict(max_steps=30, eval_every=15, lr=1e-3, init_from=str(src), preset="tiny")
    cfg = TrainConfig(**({k: v for k, v in train_cfg(out, tmp_path).__dict__.items()} | base))
    summary = train(cfg, {"block_size": 64})
    evals = [r for r in metrics(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]  # the source's own figure first
    # step 0 is the source itself: transformers' loss on the same windows
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    data = TokenData(out)
    windows = eval_windows(data.val, 64, 2048)
    x = torch.tensor(np.stack([data.val.arrays[w.source][w.offset : w.offset + 65] for w in windows]).astype(np.int64))
    with torch.no_grad():
        logits = hf(x[:, :-1]).logits
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    scored = x[:, 1:].flatten() != 0  # the <s> that opens a document is given, never scored
    assert (~scored).any() and evals[0]["val_loss"] == pytest.approx(nats[scored].mean().item(), rel=1e-5)
    assert summary["best_val_loss"] < evals[0]["val_loss"] - 0.5  # training on the text gains
    loaded = load_run(tmp_path / "run")
    assert (loaded.model.cfg.n_kv_head, loaded.model.cfg.n_embd, loaded.bos) == (2, 64, 0)
    # exported, it carries the source's tokenizer files as they came (its <s>, its special tokens)
    assert run_cli("export", "--run", str(tmp_path / "run"), str(tmp_path / "hf")).returncode == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (src / name).exists():
            assert (tmp_path / "hf" / name).read_bytes() == (src / name).read_bytes(), name
    # a folder read directly keeps the context `minigpt import` keeps
    long = llama(tmp_path / "long", tokenizer_dir, max_position_embeddings=4096)
    assert source_model(str(long), {})[0].block_size == 2048


def test_init_from_refuses_another_tokenizer_and_a_new_shape(tokenizer_dir: Path, tokens: Path, toy_dataset: Path,
                                                             tmp_path: Path) -> None:
    src = llama(tmp_path / "src", tokenizer_dir)
    proc = run_script("03_train.py", "--data", str(tokens), "--init-from", str(src), "--runs-dir", str(tmp_path),
                      "--max-steps", "2", "--device", "cpu")
    assert_user_error(proc, "another tokenizer", "--tokenizer")
    out = build(TokenizerConfig(data=str(toy_dataset), tokenizer=str(src), out=str(tmp_path / "tok"))).out
    for flag in (["--n-layer", "3"], ["--preset", "small"], ["--block-size", "4096"]):
        proc = run_script("03_train.py", "--data", str(out), "--init-from", str(src), "--runs-dir", str(tmp_path),
                          "--max-steps", "2", "--device", "cpu", *flag)
        assert_user_error(proc, "--init-from" if flag[0] != "--block-size" else "longer than")


def test_continue_pretraining_a_run_on_new_text(tokens: Path, toy_dataset: Path, tmp_path: Path) -> None:
    """--init-from one's own run, on text encoded with its tokenizer: step 0 scores as the run does."""
    train(train_cfg(tokens, tmp_path, name="first", max_steps=30), MODEL)
    out = build(TokenizerConfig(data=str(toy_dataset), tokenizer=str(tmp_path / "first"), out=str(tmp_path / "again"))).out
    assert TokenData(out).meta["tokenizer_sha256"] == TokenData(tokens).meta["tokenizer_sha256"]
    train(train_cfg(out, tmp_path, name="second", max_steps=10, init_from=str(tmp_path / "first" / "best")),
          {"block_size": 32})  # a run's checkpoint folder, or the run
    first = [r for r in metrics(tmp_path / "first") if "val_loss" in r]
    second = [r for r in metrics(tmp_path / "second") if "val_loss" in r]
    best_first = min(r["val_loss"] for r in first)
    assert second[0]["step"] == 0 and second[0]["val_loss"] == pytest.approx(best_first, rel=1e-5)
