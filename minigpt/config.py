"""Every setting, declared once: a dataclass per concern, with its default, type and one line of help.

Dataclasses and data only (no CLI glue: `minigpt/cli.py` builds the options from these classes). An
option that several commands share (device, seed, run, checkpoint, runs dir, eval tokens) is declared
once below as a field maker; a group of options that travels together (`Sampling`) is its own class.
Presets and recipes are data. The resolved values are printed at start and written beside the
artifacts as JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .utils import UserError


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **meta: Any) -> Any:
    """A dataclass field with its CLI help; meta may say `argument=True` or give `aliases`."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


# --------------------------------------------------------------------------------------------------
# options several commands share, declared once


def device_opt() -> Any:
    return opt("auto", help="auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu.")


def seed_opt() -> Any:
    return opt(1337, help="Random seed (weights, batches and dropout when training; the draws when sampling).")


def run_opt() -> Any:
    return opt("", help="Run folder, or a run's name under --runs-dir (default: the most recent run there).")


def checkpoint_opt() -> Any:
    return opt("best", help="best or last (best falls back to last only when the run has no best).")


def runs_dir_opt() -> Any:
    return opt("runs", help="Folder that holds the runs.")


def eval_tokens_opt() -> Any:
    return opt(262_144, help="Val tokens scored, in windows spread over the whole split (the whole split if it "
                             "is smaller); in training, at the end (during it, a fixed subset).")


CHECKPOINTS = ("best", "last")


# --------------------------------------------------------------------------------------------------
# 01_prepare_data.py


@dataclass
class PrepareConfig:
    inputs: list[str] = opt(
        factory=list,
        help="Text files (.txt, .txt.gz), folders, JSONL (.jsonl, .jsonl.gz), CSV/TSV (.csv, .tsv, .gz too), "
        "Parquet, Leipzig .tar.gz archives, http(s) URLs, or 'stdlib' (the default: this Python's standard "
        "library sources).",
        argument=True,
    )
    name: str = opt("", help="Dataset name: output goes to <out-dir>/<name>/ (default: from the first input).")
    out_dir: str = opt("data", help="Folder that holds the datasets and the download cache (raw/).")
    glob: str = opt("", help="Inside folders, only files whose name matches this pattern (e.g. '*.txt').")
    doc_unit: str = opt(
        "auto",
        help="What one document is in a text file: file, paragraph, line, or auto (a whole file inside "
        "folders; per line or paragraph for a single big file).",
    )
    val_fraction: float = opt(0.05, help="Share of documents put in val, chosen by a hash of their text.")
    min_chars: int = opt(1, help="Drop documents shorter than this many characters after cleaning.")
    max_chars: int = opt(5_000_000, help="Drop documents longer than this many characters after cleaning.")
    max_bad_fraction: float = opt(
        0.1, help="Drop documents whose undecodable bytes exceed this share of their characters."
    )
    dedup: bool = opt(True, help="Drop exact duplicate documents.")
    text_column: str = opt("text", help="JSONL, CSV/TSV and Parquet: the field or column that holds the text "
                                        "(the other short ones become tags).")
    quoted_tsv: bool = opt(False, help="TSV fields may be quoted with \" as in CSV (holding tabs or newlines); "
                                       "plain TSV, the default, has no quoting: a \" is text.")
    tag_from_folder: str = opt("", help="Tag each file of a folder with its first-level subfolder's name under "
                                        "this field (e.g. author: books/Tukay/*.txt -> author=Tukay).")
    download_timeout: float = opt(30.0, help="Seconds without data before a download attempt is abandoned.")
    download_retries: int = opt(5, help="Download attempts (each resumes where the last one stopped).")

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}.")
        if self.doc_unit not in ("auto", "file", "paragraph", "line"):
            raise UserError(f"--doc-unit must be auto, file, paragraph or line, got {self.doc_unit!r}.")
        if self.min_chars < 1 or self.max_chars < self.min_chars:
            raise UserError("--min-chars must be at least 1 and no larger than --max-chars.")
        if not self.text_column or not self.tag_from_folder.replace("_", "").isalnum() and self.tag_from_folder:
            raise UserError("--text-column must be given and --tag-from-folder must be a plain name (letters, digits, _).")
        if self.tag_from_folder in ("text", self.text_column):
            raise UserError(f"--tag-from-folder {self.tag_from_folder} would replace the text; name the tag field otherwise.")


# --------------------------------------------------------------------------------------------------
# 02_train_tokenizer.py


@dataclass
class TokenizerConfig:
    data: str = opt("data/stdlib", help="A dataset folder written by 01_prepare_data.py.")
    vocab_size: int = opt(0, help="BPE vocabulary size, special tokens included (0: sized to the corpus, "
                                  "512 to 8192).")
    char: bool = opt(False, help="Character-level tokenizer instead of BPE (unseen characters fall back to bytes).")
    tokenizer: str = opt("", help="Encode with this run's tokenizer, or a Hugging Face model folder's, instead of "
                                  "training one (to train from that run or model with 03_train.py --init-from).")
    out: str = opt("", help="Output folder (default: <data>/bpe<vocab-size> or <data>/char).")
    min_frequency: int = opt(2, help="BPE merges need a pair seen at least this often.")
    max_train_chars: int = opt(
        300_000_000, help="Train BPE on at most this many characters of train text (encoding uses all)."
    )
    max_tag_values: int = opt(256, help="Most distinct values per tag field that get their own special token.")
    shard_tokens: int = opt(100_000_000, help="Tokens per shard file (bounded files for large corpora).")
    check_docs: int = opt(10_000, help="Val documents whose shard tokens must decode back to exactly the document.")

    def __post_init__(self) -> None:
        if not self.char and self.vocab_size and not 256 + 1 < self.vocab_size:
            raise UserError(f"--vocab-size must exceed 257 (256 bytes + <|endoftext|>), or be 0 (sized to the "
                            f"corpus), got {self.vocab_size}.")
        if self.shard_tokens < 1024:
            raise UserError("--shard-tokens must be at least 1024.")
        if self.tokenizer and (self.char or self.vocab_size):
            raise UserError("--tokenizer encodes with a given tokenizer: leave out --char and --vocab-size.")


# --------------------------------------------------------------------------------------------------
# the model (minigpt/model.py)


@dataclass
class ModelConfig:
    vocab_size: int = opt(8192, help="Vocabulary size (set from the tokenizer).")
    block_size: int = opt(256, help="Context length in tokens.")
    n_layer: int = opt(6, help="Transformer blocks.")
    n_head: int = opt(8, help="Attention heads per block.")
    n_kv_head: int = opt(0, help="Key/value heads, shared by groups of query heads (grouped-query attention; 0: as "
                                 "many as --n-head).")
    n_embd: int = opt(512, help="Model width (embedding dimension).")
    mlp: str = opt("swiglu", help="MLP kind: swiglu or gelu.")
    mlp_size: int = opt(0, help="MLP hidden width (0: 8/3 of --n-embd rounded up to 64 for swiglu, 4x for gelu).")
    dropout: float = opt(0.0, help="Dropout on embeddings, attention and residual branches.")
    tie_embeddings: bool = opt(True, help="Share the token embedding with the output head.")
    rope_theta: float = opt(10000.0, help="RoPE base.")
    norm_eps: float = opt(1e-5, help="RMSNorm epsilon.")
    # Llama 3's long-context RoPE frequencies ({"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}): set by an imported model, never a flag
    rope_scaling: dict[str, Any] | None = opt(None, help="RoPE frequency scaling (an imported model's).", cli=False)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise UserError(f"n_embd {self.n_embd} must split into {self.n_head} heads of even size.")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise UserError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head} (0: as many as n_head).")
        if self.rope_scaling is not None:
            keys = {"rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if self.rope_scaling.get("rope_type") != "llama3" or set(self.rope_scaling) != keys:
                raise UserError(f"rope_scaling must be Llama 3's ({', '.join(sorted(keys))}), got {self.rope_scaling}.")
        if self.mlp not in ("swiglu", "gelu"):
            raise UserError(f"mlp must be swiglu or gelu, got {self.mlp!r}.")
        if self.block_size < 2:
            raise UserError(f"block_size must be at least 2, got {self.block_size}.")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_size:
            return self.mlp_size
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)  # 8/3 d keeps SwiGLU at the cost of a 4 d GELU MLP


# Presets are data. Parameter counts below are for an 8192-token vocab, tied embeddings.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),  # ~1.9M: minutes on 2 CPU cores
    "small": dict(n_layer=6, n_head=5, n_embd=320, block_size=256),  # ~10M
    "medium": dict(n_layer=6, n_head=8, n_embd=512, block_size=256),  # ~23M: the Tatar reference model
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M with GPT-2's 50257 vocab
}
PRESET_NAMES = ", ".join(PRESETS)


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {PRESET_NAMES}.")


def model_config(preset: str, vocab_size: int, overrides: dict[str, Any]) -> ModelConfig:
    check_preset(preset)
    return ModelConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None},
                          "vocab_size": vocab_size})


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}.")


# --------------------------------------------------------------------------------------------------
# 03_train.py


@dataclass
class TrainConfig:
    data: str = opt("data/stdlib", help="Token shards: a folder with meta.json, or a dataset folder holding one.")
    name: str = opt("", help="Run name: checkpoints go to <runs-dir>/<name>/ (default: dataset + preset).")
    runs_dir: str = runs_dir_opt()
    recipe: str = opt("", help="Settings sized for a machine: cpu (about 8 minutes on 2 cores) or gpu; the "
                               "options given on the command line win over the recipe's (in Python: with_recipe).")
    preset: str = opt("tiny", help=f"Model shape: {PRESET_NAMES} (model options override it).")
    resume: bool = opt(False, help="Continue the run from its last checkpoint.")
    init_from: str = opt("", help="Start from this run's weights (its best checkpoint) or a Hugging Face Llama folder's, "
                                  "with a fresh optimizer and schedule; the data must be encoded with its tokenizer "
                                  "(02_train_tokenizer.py --tokenizer).")
    device: str = device_opt()
    dtype: str = opt("auto", help="auto (bf16 where supported, else fp16 with a scaler on CUDA, fp32 on CPU), bf16, fp16, fp32.")
    compile: bool = opt(True, help="torch.compile the training step: on CUDA; on CPU where it pays, a run planned for "
                                   "3 minutes or more (30 s once its shape compiled here) whose output head is under "
                                   "a third of the work.")
    compile_mode: str = opt(
        "default", help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs."
    )
    seed: int = seed_opt()
    batch_size: int = opt(32, help="Sequences per micro-batch (per process).")
    total_batch_tokens: int = opt(0, help="Tokens per optimizer step across processes and accumulation (0: one micro-batch per process).")
    max_steps: int = opt(2000, help="Optimizer steps.")
    max_minutes: float = opt(
        0.0, help="Time budget: the LR decays by time as well as steps, then the run stops, evaluates and saves (0: none)."
    )
    max_epochs: float = opt(0.0, help="Step budget in passes over the train split: --max-steps becomes at most this "
                                      "many epochs' worth (0: none).")
    optimizer: str = opt("adamw", help="adamw, or muon: Muon (Newton-Schulz orthogonalised momentum) for the 2-D "
                                       "weights inside the blocks, AdamW for the embedding, the head and the norms.")
    lr: float = opt(0.0, help="Peak learning rate (0: sized to the model's width, 2e-3 x sqrt(128 / n_embd) and "
                              "at most 2e-3: 2e-3 for tiny, 1e-3 for medium).")
    muon_lr: float = opt(0.0, help="Muon's peak learning rate, RMS-matched to AdamW's (0: the same as --lr).")
    muon_momentum: float = opt(0.95, help="Muon's momentum (Nesterov).")
    schedule: str = opt("wsd", help="After warmup: wsd (the peak held, then a linear decay over the last --cooldown "
                                    "share of the run) or cosine (a decay all the way).")
    cooldown: float = opt(0.3, help="wsd: the share of the run (steps or --max-minutes) spent decaying.")
    min_lr_ratio: float = opt(0.0, help="Final learning rate as a share of the peak (0: the decay ends at zero).")
    warmup_steps: int = opt(100, help="Linear warmup steps (step 0 already gets lr / warmup-steps).")
    weight_decay: float = opt(0.1, help="Weight decay, on matrices only (AdamW's and Muon's).")
    beta1: float = opt(0.9, help="AdamW beta1.")
    beta2: float = opt(0.95, help="AdamW beta2.")
    grad_clip: float = opt(1.0, help="Clip the gradient norm to this (0: off).")
    grad_checkpoint: bool = opt(False, help="Recompute activations in the backward pass to save memory.")
    log_every: int = opt(10, help="Steps between log lines.")
    eval_every: int = opt(200, help="Steps between evaluations on val (loss and bits per byte).")
    eval_tokens: int = eval_tokens_opt()
    sample_every: int = opt(0, help="Steps between printed samples (0: at each evaluation).")
    save_every: int = opt(0, help="Steps between checkpoints (0: at each evaluation).")
    patience: int = opt(0, help="Stop after this many evaluations without a better val loss, going back to the best "
                                "point to decay the learning rate there when it had not decayed (0: never).")
    fit_data: bool = opt(True, help="A run that would read its train split more than 4 times is fitted to it: a model "
                                    "and an epoch budget sized to the text, an evaluation every epoch, patience, "
                                    "dropout (each rule says so; an option given wins over its rule).")
    max_bad_steps: int = opt(5, help="Stop when this many updates in a row have a non-finite loss or gradient.")

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"--dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}.")
        check_compile_mode(self.compile_mode)
        check_preset(self.preset)
        if self.recipe and self.recipe not in RECIPES:
            raise UserError(f"unknown --recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}.")
        for name in ("batch_size", "max_steps", "log_every", "eval_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1.")
        if min(self.warmup_steps, self.max_minutes, self.max_epochs, self.lr, self.muon_lr) < 0:
            raise UserError("--warmup-steps, --max-minutes, --max-epochs, --lr and --muon-lr must not be negative.")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown --schedule {self.schedule!r}; choose {' or '.join(SCHEDULES)}.")
        if not 0 < self.cooldown <= 1:
            raise UserError(f"--cooldown must be in (0, 1], got {self.cooldown}.")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown --optimizer {self.optimizer!r}; choose {' or '.join(OPTIMIZERS)}.")
        if not 0 <= self.muon_momentum < 1:
            raise UserError(f"--muon-momentum must be in [0, 1), got {self.muon_momentum}.")


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("wsd", "cosine")


# What `bash run_pipeline.sh` trains, by machine: 03_train.py --recipe NAME fills in every option the
# command line leaves out from here.
RECIPES: dict[str, dict[str, Any]] = {
    # about 8 minutes on a 2-core CPU, training capped at 6.5
    "cpu": dict(preset="tiny", batch_size=16, lr=2e-3, warmup_steps=50, max_steps=2000, eval_every=300, max_minutes=6.5),
    "gpu": dict(preset="medium", batch_size=64, lr=1e-3, warmup_steps=200, max_steps=3000, eval_every=500),
}


RECIPE_OPTIONS = sorted({k for recipe in RECIPES.values() for k in recipe})


def with_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig's options where those the command line left out (None) come from the recipe named in
    values["recipe"], else from the defaults."""
    recipe = values.get("recipe") or ""
    if recipe and recipe not in RECIPES:
        raise UserError(f"unknown --recipe {recipe!r}; choose one of {', '.join(RECIPES)}.")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    chosen = RECIPES.get(recipe, {})
    return {k: chosen.get(k, defaults[k]) if v is None and k in RECIPE_OPTIONS else v for k, v in values.items()}


# --------------------------------------------------------------------------------------------------
# generation


GREEDY_BELOW = 1e-5  # a temperature under this is greedy: the scaled logits would overflow float32 (1e-40: NaN)


@dataclass
class Sampling:
    """How the next token is drawn from the logits (for `minigpt generate`, samples and the server)."""

    temperature: float = opt(0.8, help=f"Sampling temperature (0, or anything below {GREEDY_BELOW:g}: greedy).")
    top_k: int = opt(0, help="Keep only the k most likely tokens (0: off).")
    top_p: float = opt(1.0, help="Keep the smallest set of tokens whose probability reaches p (1: off).")
    repetition_penalty: float = opt(1.0, help="Divide the logits of tokens already present by this (1: off).")

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise UserError("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1 and --repetition-penalty > 0.")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class GenerateConfig:
    prompt: list[str] = opt(factory=list, help="Prompt text; repeat the option for several prompts (generated in one batch).")
    tag: list[str] = opt(factory=list, help="Condition on a tag, field=value (repeat for several fields); "
                                           "minigpt info lists the run's tags.")
    run: str = run_opt()
    checkpoint: str = checkpoint_opt()
    runs_dir: str = runs_dir_opt()
    max_new_tokens: int = opt(200, help="Tokens to generate per sample.")
    num_samples: int = opt(1, help="Samples per prompt.")
    seed: int = seed_opt()
    device: str = device_opt()
    stream: bool = opt(True, help="Print tokens as they come (one prompt, one sample).")
    cuda_graph: bool = opt(True, help="On CUDA, replay each decode step from a CUDA graph (the fast mode).")
    compile: bool = opt(False, help="torch.compile the decode step first: faster per token, slower to start.")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise UserError("--max-new-tokens and --num-samples must be at least 1.")


@dataclass
class QuickTestConfig:
    run: str = run_opt()
    checkpoint: str = checkpoint_opt()
    runs_dir: str = runs_dir_opt()
    data: str = opt("", help="Token shards to evaluate on (default: the ones the run was trained on).")
    prompt: list[str] = opt(factory=list, help="Prompts (default: the start of a few val documents).")
    temperature: list[float] = opt(factory=lambda: [0.5, 0.8, 1.0], help="Sampling temperatures to show.")
    max_new_tokens: int = opt(80, help="Tokens per sample.")
    sentences: int = opt(6, help="Val sentences scored for perplexity.")
    tag_values: int = opt(4, help="Samples for at most this many values of each tag field.")
    eval_tokens: int = eval_tokens_opt()
    device: str = device_opt()
    seed: int = seed_opt()

    def __post_init__(self) -> None:
        for t in self.temperature:
            Sampling(temperature=t)
        if self.eval_tokens < 1 or self.max_new_tokens < 1:
            raise UserError("--eval-tokens and --max-new-tokens must be at least 1.")


# --------------------------------------------------------------------------------------------------
# minigpt eval and minigpt info


@dataclass
class EvalConfig:
    run: str = run_opt()
    checkpoint: str = checkpoint_opt()
    runs_dir: str = runs_dir_opt()
    device: str = device_opt()
    stride: int = opt(0, help="Tokens between window starts (0: half the context, so every token after the first "
                              "window has at least half a context before it); the context gives non-overlapping windows.")
    batch_size: int = opt(16, help="Windows per forward pass.")
    split: str = opt("val", help="For a prepared dataset folder or token shards: the split to score (train or val).")
    eval_tokens: int = opt(0, help="Token shards only: score the windows training scores with this --eval-tokens "
                                   "(whole windows spread over the split; 0: every token, in sliding windows).")
    per_doc: str = opt("", help="Write one JSON line per document (text head, tokens, bits per byte, perplexity, "
                                "tags) to this file.")
    json: str = opt("", help="Also write the JSON result to this file.")

    def __post_init__(self) -> None:
        if self.stride < 0 or self.batch_size < 1 or self.eval_tokens < 0:
            raise UserError("--stride and --eval-tokens must not be negative and --batch-size must be at least 1.")
        if self.split not in ("train", "val"):
            raise UserError(f"--split must be train or val, got {self.split!r}.")


@dataclass
class InfoConfig:
    run: str = run_opt()
    checkpoint: str = checkpoint_opt()
    runs_dir: str = runs_dir_opt()
    json: str = opt("", help="Also write the JSON result to this file.")


@dataclass
class ImportConfig:
    source: str = opt("", help="A local Hugging Face model folder (config.json, safetensors weights, tokenizer.json).",
                      argument=True)
    out: str = opt("", help="The run folder to write, e.g. runs/smollm2 (it must not exist, or be empty, unless --force).")
    dtype: str = opt("fp32", help="fp32 or bf16 (half the file; loaded as fp32, run in bf16 where the device has it).")
    context: int = opt(2048, help="The context to keep, in tokens (at most the source's max_position_embeddings; "
                                  "03_train.py --init-from FOLDER keeps 2048 too).")
    force: bool = opt(False, help="Replace an earlier import in --out.")
    json: str = opt("", help="Also write the JSON result to this file.")

    def __post_init__(self) -> None:
        if not self.source:
            raise UserError("give the model folder to import: minigpt import FOLDER --out runs/NAME.")
        if not self.out:
            raise UserError("give the run folder to write: --out runs/NAME.")
        if self.dtype not in ("fp32", "bf16"):
            raise UserError(f"unknown --dtype {self.dtype!r}; choose fp32 or bf16.")
        if self.context < 2:
            raise UserError(f"--context must be at least 2, got {self.context}.")


@dataclass
class ExportConfig:
    out: str = opt("", help="The folder to write (it must not exist, or be empty, unless --force).", argument=True)
    run: str = run_opt()
    checkpoint: str = checkpoint_opt()
    runs_dir: str = runs_dir_opt()
    format: str = opt("hf", help="hf (a Hugging Face transformers folder, LlamaForCausalLM) or onnx (token ids -> logits).")
    force: bool = opt(False, help="Replace the folder if it exists.")
    json: str = opt("", help="Also write the JSON result to this file.")

    def __post_init__(self) -> None:
        if self.format not in ("hf", "onnx"):
            raise UserError(f"unknown --format {self.format!r}; choose hf or onnx.")
        if not self.out:
            raise UserError("give the folder to export to: minigpt export --run R OUT.")


@dataclass
class ServeConfig:
    run: str = run_opt()
    checkpoint: str = checkpoint_opt()
    runs_dir: str = runs_dir_opt()
    device: str = device_opt()
    host: str = opt("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; set --api-key then).")
    port: int = opt(8000, help="Port to listen on.")
    max_batch: int = opt(8, help="Sequences decoded together (slots); a request joins at the next step.")
    max_queue: int = opt(64, help="Sequences that may wait for a slot; beyond that requests get 429.")
    max_tokens: int = opt(1024, help="The most tokens a request may ask for, per choice.")
    max_body: int = opt(1_000_000, help="The largest request body in bytes (413 above it).")
    api_key: str = opt("", help="Require 'Authorization: Bearer KEY' (default: $MINIGPT_API_KEY; unset: no key).")
    allowed_hosts: list[str] = opt(factory=list, help="A Host name the server answers to besides any IP address and "
                                   "the names its address implies (localhost, --host; with 0.0.0.0 this machine's "
                                   "names too); repeat for several; '*' for any. Other names get 400: a web page "
                                   "cannot drive the server through DNS rebinding.")
    model_name: str = opt("", help="The model name clients send (default: the run folder's name).")
    shutdown_timeout: float = opt(10.0, help="On SIGTERM or Ctrl-C, seconds running requests get to finish "
                                             "before they end with finish_reason 'abort'.")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be 1-65535, got {self.port}.")
        if min(self.max_batch, self.max_queue, self.max_tokens, self.max_body) < 1 or self.shutdown_timeout < 0:
            raise UserError("--max-batch, --max-queue, --max-tokens and --max-body must be at least 1, "
                            "and --shutdown-timeout at least 0.")


# --------------------------------------------------------------------------------------------------
# minigpt bench


@dataclass
class BenchConfig:
    device: str = device_opt()
    preset: str = opt("tiny", help=f"Model shape for random weights: {PRESET_NAMES} (model options override it).")
    run: str = opt("", help="Benchmark a trained run (a folder, or a name under --runs-dir) instead of random weights.")
    runs_dir: str = runs_dir_opt()
    data: str = opt("", help="Token shards for the data figures (default: the run's, else data/stdlib if present).")
    dtype: str = opt("auto", help="auto (bf16 on GPUs that have it, fp32 on CPU), bf16, fp16 or fp32.")
    batch_size: int = opt(16, help="Training micro-batch (sequences).")
    steps: int = opt(10, help="Timed training steps (after 3 warm-up steps).")
    compile: bool = opt(True, help="Also time the torch.compile'd training step (on CPU it takes ~40 s to compile) "
                                   "and, on CUDA, decode step.")
    compile_mode: str = opt("default", help="torch.compile mode for the compiled training figures (as in 03_train.py).")
    prompt_tokens: int = opt(128, help="Prompt length for the prefill figure.")
    new_tokens: int = opt(64, help="Tokens decoded per generation figure.")
    json: str = opt("", help="Also write the JSON result to this file.")
    profile: str = opt("", help="Folder for torch.profiler traces (Chrome/Perfetto JSON) and top-operator tables "
                               "of training steps and of decoding (default: no profiling).")
    seed: int = seed_opt()
    serve: str = opt("", help="Measure a running minigpt serve at this URL instead: --clients streamed requests of "
                              "--new-tokens, one at a time then all at once (key: $MINIGPT_API_KEY).")
    clients: int = opt(32, help="Concurrent clients for --serve.")

    def __post_init__(self) -> None:
        check_compile_mode(self.compile_mode)
        if self.clients < 1:
            raise UserError("--clients must be at least 1.")
        check_preset(self.preset)
        if self.steps < 1 or self.new_tokens < 2 or self.prompt_tokens < 1 or self.batch_size < 1:
            raise UserError("--steps, --batch-size and --prompt-tokens must be at least 1, --new-tokens at least 2.")


# --------------------------------------------------------------------------------------------------
# minigpt quantize


@dataclass
class QuantizeConfig:
    run: str = run_opt()
    runs_dir: str = runs_dir_opt()
    to: str = opt("int8", help="int8 (weight-only, per output channel), bf16 or fp16.")
    out: str = opt("", help="Output run folder (default: <run>-<to>); never the run itself or a folder holding "
                            "anything but an earlier quantize output.")
    force: bool = opt(False, help="Replace OUT when it holds an earlier quantize output.")
    checkpoint: str = checkpoint_opt()
    device: str = device_opt()
    eval_tokens: int = eval_tokens_opt()
    new_tokens: int = opt(64, help="Tokens decoded for the before/after speed.")

    def __post_init__(self) -> None:
        if self.to not in ("int8", "bf16", "fp16"):
            raise UserError(f"unknown --to {self.to!r}; choose int8, bf16 or fp16.")
        if self.eval_tokens < 1 or self.new_tokens < 2:
            raise UserError("--eval-tokens must be at least 1 and --new-tokens at least 2.")


def as_dict(*cfgs: Any) -> dict[str, Any]:
    return {type(c).__name__: dataclasses.asdict(c) for c in cfgs}
