"""`minigpt import`: a local Hugging Face Llama-family folder as a minigpt run.

The folder's config.json is mapped onto a ModelConfig field by field; anything the model cannot represent
(biases, other rope types, sliding windows, other architectures, quantized weights) is refused in one
sentence that names the field. Tensors are read one safetensors shard at a time and renamed (q, k and v
join into the fused qkv, gate and up into the SwiGLU matrix), so the peak is about one model. The run
keeps the source's tokenizer.json and tokenizer_config.json; its document start is the source's BOS when
its tokenizer adds one, else its EOS, and its document end is the EOS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from .checkpoint import (
    find_checkpoint,
    has_checkpoint,
    load_model,
    model_tensors,
    quantization,
    save_checkpoint,
)
from .config import ImportConfig, ModelConfig
from .data import IMPORTED_FILES, document_tokens
from .model import GPT
from .utils import UserError, human_bytes, output_folder, read_json, sha256_file

ARCHITECTURES = ("LlamaForCausalLM",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_config_of(src: dict[str, Any], context: int) -> ModelConfig:
    """The ModelConfig of a transformers config.json, or a one-sentence refusal naming the field."""
    arch = (src.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES or src.get("model_type", "llama") != "llama":
        raise UserError(f"the source is a {arch} ({src.get('model_type')}) model; minigpt imports Llama-family "
                        "models (LlamaForCausalLM) only.")
    for field, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if src.get(field, ok) != ok:
            raise UserError(f"the source has {field}={src[field]!r}; minigpt's model has {field}={ok!r} only.")
    for field in ("sliding_window", "quantization_config"):
        if src.get(field) is not None:
            raise UserError(f"the source has {field} set; minigpt's model has no {field.replace('_', ' ')}.")
    width, heads = src["hidden_size"], src["num_attention_heads"]
    if src.get("head_dim") not in (None, width // heads):
        raise UserError(f"the source has head_dim={src['head_dim']}, not hidden_size / num_attention_heads; minigpt's "
                        "heads split the width.")
    rope = dict(src.get("rope_parameters") or src.get("rope_scaling") or {})  # transformers 5, then 4.x
    theta = rope.pop("rope_theta", None) or src.get("rope_theta", 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": "llama3"} | {k: rope[k] for k in keys}
    elif kind != "default":
        raise UserError(f"the source has rope_type={kind!r}; minigpt supports the default RoPE and llama3's only.")
    return ModelConfig(
        vocab_size=src["vocab_size"], block_size=min(context, src.get("max_position_embeddings") or context),
        n_layer=src["num_hidden_layers"], n_head=heads, n_kv_head=src.get("num_key_value_heads") or heads,
        n_embd=width, mlp="swiglu", mlp_size=src["intermediate_size"], dropout=0.0,
        tie_embeddings=bool(src.get("tie_word_embeddings", False)), rope_theta=float(theta),
        norm_eps=float(src.get("rms_norm_eps", 1e-6)), rope_scaling=scaling)


def shard_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "shard index").get("weight_map") or {}
        if not weight_map:
            raise UserError(f"{index} has no weight_map; the folder is incomplete.")
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    if any(folder.glob("*.bin")):
        raise UserError(f"{folder} holds PyTorch .bin weights only; save the model with safetensors first "
                        "(model.save_pretrained(folder, safe_serialization=True)).")
    raise UserError(f"{folder} has no model.safetensors or model.safetensors.index.json.")


def read_tensors(folder: Path, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The source's tensors under minigpt's names, in `dtype`, one shard at a time."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[int, dict[str, torch.Tensor]] = {}  # a layer's q/k/v and gate/up until all have come
    for path in shard_files(folder):
        try:
            handle = safe_open(str(path), framework="pt")
        except (OSError, SafetensorError) as e:
            raise UserError(f"{path} cannot be read ({e}); the folder is incomplete or damaged.") from None
        with handle as f:
            for name in f.keys():  # noqa: SIM118  (a safe_open handle is no dict)
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # derived from the config
                target = _target(name, cfg.n_layer)
                if target is None:
                    raise UserError(f"{path.name} holds a tensor minigpt's model has no place for ({name}).")
                tensor = f.get_tensor(name).to(dtype)
                if isinstance(target, tuple):
                    layer, piece = target
                    parts.setdefault(layer, {})[piece] = tensor
                    _join(out, parts, layer)
                else:
                    out[target] = tensor
    if parts:
        layer = next(iter(parts))
        missing = sorted({"q", "k", "v", "gate", "up"} - set(parts[layer]))
        raise UserError(f"the source's layer {layer} lacks its {', '.join(missing)} projection(s); the folder is incomplete.")
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # a tied source may still store the copy
    _check_shapes(out, cfg)
    return out


def _target(name: str, n_layer: int) -> str | tuple[int, str] | None:
    """minigpt's name for a transformers tensor (a (layer, piece) for those fused here), None if it has none."""
    top = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "norm_f.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    bits = name.split(".")
    if len(bits) not in (5, 6) or bits[:2] != ["model", "layers"] or not bits[2].isdigit() or int(bits[2]) >= n_layer:
        return None
    layer, module = int(bits[2]), ".".join(bits[3:])
    p = f"blocks.{layer}."
    simple = {"input_layernorm.weight": p + "norm1.weight", "post_attention_layernorm.weight": p + "norm2.weight",
              "self_attn.o_proj.weight": p + "attn.proj.weight", "mlp.down_proj.weight": p + "mlp.down.weight"}
    if module in simple:
        return simple[module]
    fused = {"self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
             "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up"}
    return (layer, fused[module]) if module in fused else None


def _join(out: dict[str, torch.Tensor], parts: dict[int, dict[str, torch.Tensor]], layer: int) -> None:
    """The fused matrices of `layer` once their pieces are all read: qkv (q, k, v rows) and up (gate, up)."""
    got = parts[layer]
    p = f"blocks.{layer}."
    if {"q", "k", "v"} <= got.keys():
        out[p + "attn.qkv.weight"] = torch.cat((got.pop("q"), got.pop("k"), got.pop("v")))
    if {"gate", "up"} <= got.keys():
        out[p + "mlp.up.weight"] = torch.cat((got.pop("gate"), got.pop("up")))
    if not got:
        del parts[layer]


def _check_shapes(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(cfg).state_dict().items()
                    if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise UserError(f"the source lacks {len(missing)} tensor(s) the model needs ({missing[0]}...); the folder "
                        "is incomplete.")
    for k, shape in expected.items():
        if tensors[k].shape != shape:
            raise UserError(f"the source's tensor for {k} is {tuple(tensors[k].shape)}, but its config.json "
                            f"says {tuple(shape)}; the folder does not match its config.")


def earlier_import(folder: Path) -> bool:
    """Whether `folder` holds a run this command imported (only those may --force replace, never a trained run)."""
    with contextlib.suppress(UserError, OSError):
        return has_checkpoint(folder, "best") and "source" in read_json(folder / "best" / "config.json", "config")
    return False


def checked_source(folder: Path, context: int) -> tuple[dict[str, Any], ModelConfig, Tokenizer]:
    """A Hugging Face folder's config.json, the ModelConfig it maps to and its tokenizer, or one sentence
    saying what is missing or unsupported."""
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json; give a local Hugging Face model folder.")
    if not (folder / "tokenizer.json").exists():
        raise UserError(f"{folder} has no tokenizer.json (a fast tokenizer); save one with "
                        "AutoTokenizer.from_pretrained(...).save_pretrained(folder).")
    src = read_json(folder / "config.json", "model config")
    try:
        mcfg = model_config_of(src, context)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder}/config.json lacks a field the model needs, or has a wrong value ({e!r}); is it "
                        "a transformers Llama config?") from None
    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises its own kinds
        raise UserError(f"{folder}/tokenizer.json cannot be read ({str(e).splitlines()[0]}).") from None
    if tok.get_vocab_size() != mcfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.get_vocab_size():,} tokens but the model's vocab_size is "
                        f"{mcfg.vocab_size:,}; minigpt needs them equal (the embedding rows are the tokens).")
    return src, mcfg, tok


def import_folder(cfg: ImportConfig) -> dict[str, Any]:
    """Write the run; returns what `minigpt import` reports."""
    t0 = time.perf_counter()
    folder = Path(cfg.source)
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json; give a local Hugging Face model folder.")
    out = output_folder(cfg.out, folder, cfg.force, earlier_import, "imported run")
    src, mcfg, tok = checked_source(folder, cfg.context)
    bos, eos = document_tokens(folder, tok)
    tensors = read_tensors(folder, mcfg, DTYPES[cfg.dtype])
    params = sum(t.numel() for t in tensors.values())
    config: dict[str, Any] = {
        "model": dataclasses.asdict(mcfg), "step": None,
        "data": {"kind": "imported", "vocab_size": mcfg.vocab_size, "eot_id": eos, "bos_id": bos, "tags": {},
                 "tokenizer_sha256": sha256_file(folder / "tokenizer.json"), "dataset": None},
        "source": {"folder": str(folder.resolve()), "architecture": src["architectures"][0],
                   "context": src.get("max_position_embeddings"), "dtype": cfg.dtype},
    }
    if out.exists():
        shutil.rmtree(out)  # an earlier import, and --force (output_folder refused anything else)
    with torch.device("meta"):
        shell = GPT(mcfg)  # names only: the tensors are written as read
    kept = [folder / name for name in IMPORTED_FILES if (folder / name).exists()]  # for export, and its chat template
    save_checkpoint(out, "best", shell, config, folder / "tokenizer.json", tensors=tensors, extra_files=kept)
    size = sum(p.stat().st_size for p in (out / "best").iterdir())
    return {"out": str(out), "source": str(folder), "parameters": params, "layers": mcfg.n_layer,
            "width": mcfg.n_embd, "heads": mcfg.n_head, "kv_heads": mcfg.kv_heads, "context": mcfg.block_size,
            "vocab_size": mcfg.vocab_size, "bos_id": bos, "eos_id": eos, "dtype": cfg.dtype, "size": human_bytes(size),
            "seconds": round(time.perf_counter() - t0, 2), "tied": mcfg.tie_embeddings,
            "rope": (mcfg.rope_scaling or {}).get("rope_type", "default"), "memory_note": _memory_note(params, cfg.dtype)}


def _memory_note(params: int, dtype: str) -> str:
    """What the import holds: the converted weights, plus one source shard and one layer's pieces at a time."""
    per = 4 if dtype == "fp32" else 2
    return f"{human_bytes(params * per)} of weights held ({per} bytes x {params:,}), plus one source shard at a time"



# --------------------------------------------------------------------------------------------------
# 03_train.py --init-from: the model a new run starts from

INIT_OPTIONS = ("dropout", "block_size")
DEFAULT_CONTEXT = 2048  # tokens a model read from a folder keeps, as `minigpt import` does  # the model options a run started from a model may still set


def source_model(source: str, overrides: dict[str, Any]) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """The model a run starts from: a run's best checkpoint (else its last) or a Hugging Face Llama folder;
    its config (with the shorter context `overrides` may give), its tensors in fp32, and the sha256 of the
    tokenizer its data must have been encoded with."""
    shape = sorted(k for k, v in overrides.items() if v is not None and k not in INIT_OPTIONS)
    if shape:
        raise UserError(f"--init-from keeps the model it starts from; leave out --{shape[0].replace('_', '-')} "
                        f"(only --{' and --'.join(o.replace('_', '-') for o in INIT_OPTIONS)} may change).")
    path = Path(source)
    if (path / "config.json").exists() and not (path / "manifest.json").exists():  # a Hugging Face folder
        _, cfg, _ = checked_source(path, DEFAULT_CONTEXT)
        tensors, sha = read_tensors(path, cfg, torch.float32), sha256_file(path / "tokenizer.json")
    else:  # a run, or one of its checkpoint folders
        folder = path if (path / "manifest.json").exists() else find_checkpoint(
            path, "best" if has_checkpoint(path, "best") else "last")
        model, config = load_model(folder)
        if quantization(config) == "int8":
            raise UserError(f"{source} is an int8 copy; start from the run it was quantized from.")
        cfg, tensors, sha = model.cfg, model_tensors(model.float()), config["data"]["tokenizer_sha256"]
    context = overrides.get("block_size") or cfg.block_size
    if context > cfg.block_size:
        raise UserError(f"--block-size {context} is longer than the {cfg.block_size} tokens {source} was built for; "
                        f"give {cfg.block_size} or less.")
    return dataclasses.replace(cfg, block_size=context, dropout=0.0), tensors, sha


def start_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> GPT:
    """A model of `cfg` (the source's shape, this run's dropout and context) holding the source's weights."""
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # a tied head is wte
    return model
