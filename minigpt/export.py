"""`minigpt export`: a run as a Hugging Face transformers folder (Llama) or as ONNX, each loaded back
(transformers, onnxruntime) and checked to give the logits of the original before it is kept.

The architecture is a Llama in all but name: RoPE in the half-split convention (the one transformers'
`rotate_half` uses, so no permutation of the query/key rows), RMSNorm, SwiGLU, no biases, tied or untied
embeddings. The fused qkv matrix splits into q/k/v rows, the fused SwiGLU `up` into gate (first half)
and up (second half). A `--mlp gelu` model has no Llama equivalent and is refused. int8 runs export
their dequantised weights (q * scale), which is exactly what their reference matmul path computes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, processors

from .checkpoint import Loaded, load_run, quantization
from .config import ExportConfig
from .data import EOT, IMPORTED_FILES, parse_tag
from .int8 import Int8Embedding, Int8Linear, dequantize
from .model import GPT
from .utils import UMASK, UserError, console, fsync_dir, human_bytes, output_folder, write_json

EXTRA = "pip install 'minigpt[export]'"
TOLERANCE = 1e-3  # max |logit difference| of an export against the original (fp32; seen: 0 and ~1e-5)
MARKER = ".minigpt-export"  # in every export folder: --force replaces only folders that hold it


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """A Linear's or embedding's weight as fp32, int8 ones dequantised."""
    if isinstance(module, (Int8Linear, Int8Embedding)):
        return dequantize(module.weight, module.scale.float())
    return module.weight.detach().float()


def llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' LlamaForCausalLM names (fp32, contiguous, on the CPU)."""
    cfg = model.cfg
    if cfg.mlp != "swiglu":
        raise UserError(f"a --mlp {cfg.mlp} model has no Llama equivalent (Llama's MLP is SwiGLU); export needs a "
                        "run trained with --mlp swiglu.")
    C, KV, hidden = cfg.n_embd, cfg.kv_heads * cfg.head_dim, cfg.mlp_hidden
    out = {"model.embed_tokens.weight": _weight(model.wte), "model.norm.weight": model.norm_f.weight.detach().float()}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        qkv = _weight(block.attn.qkv).clone()  # rows: q (C), k and v (KV heads x head size each), head after head
        up = _weight(block.mlp.up).clone()  # rows: gate (hidden), up (hidden)
        out |= {
            p + "input_layernorm.weight": block.norm1.weight.detach().float(),
            p + "post_attention_layernorm.weight": block.norm2.weight.detach().float(),
            p + "self_attn.q_proj.weight": qkv[:C], p + "self_attn.k_proj.weight": qkv[C : C + KV],
            p + "self_attn.v_proj.weight": qkv[C + KV :], p + "self_attn.o_proj.weight": _weight(block.attn.proj),
            p + "mlp.gate_proj.weight": up[:hidden], p + "mlp.up_proj.weight": up[hidden:],
            p + "mlp.down_proj.weight": _weight(block.mlp.down),
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _weight(model.lm_head)
    return {k: v.cpu().contiguous().clone() for k, v in out.items()}  # no shared storage between tensors


def llama_config(loaded: Loaded) -> dict[str, Any]:
    cfg, eot = loaded.model.cfg, loaded.eot
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta} | (cfg.rope_scaling or {})
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope, "rope_theta": cfg.rope_theta,  # transformers 5 reads the first, 4.x the second
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": loaded.bos, "eos_token_id": eot, "pad_token_id": eot, "dtype": "float32",
        "torch_dtype": "float32",
    }


def write_tokenizer(loaded: Loaded, out: Path) -> None:
    """tokenizer.json (with <|endoftext|> put before a text, as a document start, when special tokens are
    added), tokenizer_config.json and special_tokens_map.json, for AutoTokenizer; an imported model's own files
    as they came."""
    if loaded.config["data"].get("kind") == "imported":  # imported, or trained on data its tokenizer encoded
        for path in loaded.folder.iterdir():
            if path.name in ("tokenizer.json", *IMPORTED_FILES):
                shutil.copyfile(path, out / path.name)
        return
    tok = Tokenizer.from_str(loaded.tokenizer.to_str())  # a copy: the run's own stays as it is
    # A model input starts at a document start: <|endoftext|>, like a BOS token. Text that looks like a
    # special token stays text, as in the shards.
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B",
                                                       special_tokens=[(EOT, loaded.eot)])
    tok.save(str(out / "tokenizer.json"))
    extra = sorted(loaded.tags)
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": loaded.model.cfg.block_size,
        "bos_token": EOT, "eos_token": EOT, "pad_token": EOT, "unk_token": None,
        "additional_special_tokens": extra, "split_special_tokens": True, "clean_up_tokenization_spaces": False,
    })
    write_json(out / "special_tokens_map.json", {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
                                                 "additional_special_tokens": extra})


SNIPPETS = {
    "hf": [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)",
        "out = model.generate(**tok(prompt, return_tensors='pt'), max_new_tokens=40)",
        "print(tok.decode(out[0], skip_special_tokens=True))",
    ],
    "onnx": [
        "import numpy as np, onnxruntime",
        "from tokenizers import Tokenizer",
        "tok = Tokenizer.from_file(f'{folder}/tokenizer.json')",
        "session = onnxruntime.InferenceSession(f'{folder}/model.onnx')",
        "ids = np.array([tok.encode(prompt).ids])  # <|endoftext|> first, then the prompt",
        "logits = session.run(['logits'], {'input_ids': ids})[0]  # (1, tokens, vocab), up to the context",
    ],
}


def model_card(loaded: Loaded, fmt: str, note: str) -> str:
    c, data, train = loaded.model.cfg, loaded.config.get("data", {}), loaded.config.get("train", {})
    tags = ", ".join("=".join(parse_tag(t)) for t in sorted(loaded.tags)) or "none"
    best = loaded.config.get("val_bpb")
    mlp = f"SwiGLU {c.mlp_hidden}" if c.mlp == "swiglu" else f"GELU {c.mlp_hidden}"
    title = "Hugging Face transformers, LlamaForCausalLM" if fmt == "hf" else "ONNX: input_ids -> logits"
    return "\n".join([
        f"# {loaded.folder.parent.name} ({title})", "",
        (f"A Llama-family model imported into minigpt from {loaded.config['source']['folder']}."
         if loaded.config.get("source") else f"A decoder-only GPT trained with minigpt from {train['init_from']}."
         if train.get("init_from") else "A small decoder-only GPT trained from scratch with minigpt."), "",
        "| | |", "| --- | --- |",
        f"| data | {Path(str(data.get('dataset'))).name} ({data.get('kind')} tokenizer, vocab {c.vocab_size:,}) |",
        f"| shape | {c.n_layer} layers x {c.n_embd} wide, {c.n_head} heads ({c.kv_heads} key/value), context "
        f"{c.block_size}, {mlp}, "
        f"{'tied' if c.tie_embeddings else 'untied'} embeddings, {loaded.model.num_params():,} parameters |",
        f"| training | step {loaded.config.get('step')} of {train.get('max_steps')}, preset {train.get('preset')} |",
        f"| val bits per byte | {f'{best:.4f}' if best is not None else '-'} |",
        f"| tags | {tags} |",
        f"| weights | float32{note} |", "",
        "Every document starts after `<|endoftext|>`; the tokenizer puts it in front of a text when special",
        "tokens are added (the default). Tags are tokens placed right after it, in field order:",
        "`tok.convert_tokens_to_ids('<|lang=tt|>')`. Text that looks like a special token is encoded as text.",
        "`<|endoftext|>` is also the end and the padding token: a fine-tuning collator that masks padding out",
        "of the labels would mask every document end too.", "",
        "```python", "folder, prompt = '.', 'Once upon a time'", *SNIPPETS[fmt], "```", "",
    ])


def _source_note(loaded: Loaded) -> str:
    scheme = quantization(loaded.config)
    return {"int8": ", dequantised from the run's int8 weights (q x scale)", "bf16": ", widened from the run's bf16",
            "fp16": ", widened from the run's fp16"}.get(scheme, "")


def _check(name: str, got: np.ndarray, expected: np.ndarray) -> float:
    diff = float(np.abs(got - expected).max())
    if not diff <= TOLERANCE:
        raise UserError(f"the {name} export gives logits up to {diff:.3g} away from the run's (more than "
                        f"{TOLERANCE:g}); nothing was written; please report it.")
    return diff


def export_hf(loaded: Loaded, out: Path) -> dict[str, Any]:
    """The folder, then loaded back with transformers and compared with the run on a context of tokens."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        raise UserError(f"a transformers export is loaded back with transformers to check it; install it with "
                        f"{EXTRA}.") from None
    note = _source_note(loaded)
    tensors = llama_tensors(loaded.model)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", llama_config(loaded))
    if not (loaded.folder / "generation_config.json").exists():  # an imported model's own is copied with its tokenizer
        write_json(out / "generation_config.json", {
            "bos_token_id": loaded.bos, "eos_token_id": loaded.eot, "pad_token_id": loaded.eot,
            "do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 1.0})  # minigpt generate's defaults
    write_tokenizer(loaded, out)
    (out / "README.md").write_text(model_card(loaded, "hf", note), encoding="utf-8")
    model, x = float_model(loaded.model), _probe(loaded.model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        diff = _check("transformers", hf(x).logits.numpy(), model(x).logits.numpy())
    return {"format": "hf", "architecture": "LlamaForCausalLM", "tensors": len(tensors),
            "dequantised": quantization(loaded.config) == "int8", "max_abs_diff": diff}


def _probe(model: GPT) -> torch.Tensor:
    """Token ids to compare an export on: two rows of a whole context."""
    return torch.randint(0, model.cfg.vocab_size, (2, model.cfg.block_size), generator=torch.Generator().manual_seed(0))


def float_model(model: GPT) -> GPT:
    """The model with float32 weights (an int8 model's dequantised), in eval mode."""
    if not any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules()):
        return model.float().eval()
    plain = GPT(model.cfg)
    tensors = {"wte.weight": _weight(model.wte), "norm_f.weight": model.norm_f.weight.detach().float()}
    for i, block in enumerate(model.blocks):
        for name in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down"):
            parent, attr = name.split(".")
            tensors[f"blocks.{i}.{name}.weight"] = _weight(getattr(getattr(block, parent), attr))
        tensors[f"blocks.{i}.norm1.weight"] = block.norm1.weight.detach().float()
        tensors[f"blocks.{i}.norm2.weight"] = block.norm2.weight.detach().float()
    if not model.cfg.tie_embeddings:
        tensors["lm_head.weight"] = _weight(model.lm_head)
    plain.load_state_dict(tensors, strict=False)
    return plain.eval()


class _Logits(torch.nn.Module):
    """token ids (batch, sequence) -> logits (batch, sequence, vocab): the graph ONNX gets."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def export_onnx(loaded: Loaded, out: Path) -> dict[str, Any]:
    """`model.onnx` with dynamic batch and sequence axes (sequence up to the context), checked with
    onnx.checker and run once in onnxruntime against PyTorch."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        raise UserError(f"ONNX export needs onnx, onnxscript and onnxruntime; install them with {EXTRA}.") from None
    model = float_model(loaded.model)
    T = model.cfg.block_size
    example = torch.randint(0, model.cfg.vocab_size, (2, min(T, 16)))
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1, max=T)
    path = out / "model.onnx"
    exporter_log = logging.getLogger("torch.onnx")
    level, exporter_log.level = exporter_log.level, logging.ERROR  # it talks about torchvision and its own steps
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(_Logits(model).eval(), (example,), str(path), input_names=["input_ids"],
                              output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}}, dynamo=True,
                              external_data=False, verbose=False)
    finally:
        exporter_log.setLevel(level)
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for check in (_probe(model), _probe(model)[:1, : max(T // 3, 1)]):  # a whole context, and a shorter one
        with torch.no_grad():
            expected = model(check).logits.numpy()
        diff = max(diff, _check("ONNX", session.run(["logits"], {"input_ids": check.numpy()})[0], expected))
    write_tokenizer(loaded, out)
    (out / "README.md").write_text(model_card(loaded, "onnx", _source_note(loaded)), encoding="utf-8")
    return {"format": "onnx", "max_abs_diff": diff, "opset": onnx.load(str(path)).opset_import[0].version}


def export_run(cfg: ExportConfig) -> dict[str, Any]:
    """Write the run's checkpoint as `cfg.format` into `cfg.out`, checked, then swapped into place with two
    renames (an earlier export becomes `.OUT.old` until the new one has the name), so a crash leaves one
    whole export there, or its fallback."""
    loaded = load_run(cfg.run, cfg.checkpoint, "cpu", cfg.runs_dir, cast=False)
    out = output_folder(cfg.out, loaded.folder.parent, cfg.force, lambda p: (p / MARKER).exists(), "export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = out.with_name(f".{out.name}.old")
    start = time.perf_counter()
    try:
        with console.status(f"exporting to {cfg.format} and checking it..."):
            report = export_hf(loaded, tmp) if cfg.format == "hf" else export_onnx(loaded, tmp)
        (tmp / MARKER).write_text(json.dumps({"run": str(loaded.folder), "format": cfg.format}) + "\n")
        for path in tmp.iterdir():  # on disk before the folder takes its name
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes 0700
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name != MARKER}
    return report | {"run": str(loaded.folder), "out": str(cfg.out), "seconds": time.perf_counter() - start,
                     "files": files, "size": human_bytes(sum(files.values()))}

