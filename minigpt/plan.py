"""How many steps a run plans, and what a run on little text changes by itself.

When the steps a new run plans would read its train split more than SMALL_DATA_EPOCHS times, the model
would memorise the text long before the budget ends. `fit_to_data` then sizes the model to the text,
caps the budget in epochs, evaluates every epoch, stops at the best point (the trainer then goes back to
it and decays the learning rate there) and adds dropout. Each rule gives way to the option it sets when
that option is given, says what it did in one line, and `--no-fit-data` turns them all off. The
measurements behind the constants are in docs/LOG.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

import torch

from .compilation import CPU_EAGER_FLOPS
from .config import ModelConfig, TrainConfig, model_config
from .data import accumulation
from .model import flops_per_token, weight_count
from .utils import human_count, peak_flops

SMALL_DATA_EPOCHS = 4  # a run planned to read its train split more often than this is fitted to it
SMALL_DATA_DROPOUT = 0.1
EPOCH_BUDGET = 200  # epochs: a cap past the best point of every small corpus measured (patience ends the run first)
PATIENCE = 6  # evaluations (epochs, on small data) without a better val loss before going back to the best
TOKENS_PER_WEIGHT = 0.05  # a model shrinks (SHAPES) until the train split has at least this many tokens per weight
# smaller shapes a fitted run may take, largest first (never larger than the preset)
SHAPES = (
    dict(n_layer=4, n_head=4, n_embd=128),
    dict(n_layer=3, n_head=3, n_embd=96),
    dict(n_layer=2, n_head=2, n_embd=64),
)
SHAPE_OPTIONS = ("n_layer", "n_head", "n_embd", "n_kv_head", "mlp_size")  # any of them given: the shape is the user's


def epoch_steps(epochs: float, train_tokens: int, tokens_per_step: int) -> int:
    """The steps that read the train split `epochs` times (at least one)."""
    return max(1, math.ceil(epochs * train_tokens / tokens_per_step))


def planned_steps(cfg: TrainConfig, mcfg: ModelConfig, rows: int, device: torch.device, train_tokens: int,
                  world: int = 1) -> int:
    """The steps this run will likely take: --max-steps, or fewer where --max-epochs or --max-minutes ends it
    first, the latter estimated from the model's FLOPs at a typical rate (CPU_EAGER_FLOPS on CPU, 40% of a
    known GPU's peak)."""
    steps = cfg.max_steps
    if cfg.max_epochs:
        steps = min(steps, epoch_steps(cfg.max_epochs, train_tokens, rows * mcfg.block_size))
    # `rows` counts every process's: on GPUs each brings its own FLOPs (CPU processes share the cores)
    rate = CPU_EAGER_FLOPS if device.type == "cpu" else 0.4 * (peak_flops(device) or 0) * world
    if not (cfg.max_minutes and rate):
        return steps
    step_seconds = rows * mcfg.block_size * flops_per_token(mcfg) / rate
    return min(steps, int(cfg.max_minutes * 60 / step_seconds))


@dataclass
class Fitted:
    """A new run's settings after the small-data rules, and a line for each rule that fired."""

    cfg: TrainConfig
    overrides: dict[str, Any]  # the model options, with the rules' shape and dropout
    rules: list[str]


def fit_to_data(cfg: TrainConfig, overrides: dict[str, Any], given: Set[str] | None, train_tokens: int,
                vocab_size: int, device: torch.device, world: int = 1, start: ModelConfig | None = None) -> Fitted:
    """The rules for a run that would read its train split many times (see the module's docstring).
    `given`: the options the command line gave (None, from Python: those that differ from the defaults);
    a model option is given when `overrides` holds a value for it. `start`: the model of --init-from, whose
    shape stays."""
    if given is None:
        given = {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != f.default}
    mcfg = start or model_config(cfg.preset, vocab_size, overrides)
    rows, _ = accumulation(cfg, mcfg.block_size, world)
    train_tokens = max(train_tokens, 1)
    steps = planned_steps(cfg, mcfg, rows, device, train_tokens, world)
    epochs = steps * rows * mcfg.block_size / train_tokens
    if not cfg.fit_data or epochs <= SMALL_DATA_EPOCHS:
        return Fitted(cfg, overrides, [])
    about = "" if steps == cfg.max_steps else "about "
    rules = [f"small data: {about}{steps:,} steps would read the {train_tokens:,} train tokens {epochs:.0f} times; "
             "the run is fitted to them (--no-fit-data to keep every setting as given)"]
    overrides = dict(overrides)
    if start is None and "preset" not in given and all(overrides.get(k) is None for k in SHAPE_OPTIONS):
        shape = fitted_shape(mcfg, train_tokens)
        if shape is not None:
            before = weight_count(mcfg)
            overrides |= shape
            mcfg = model_config(cfg.preset, vocab_size, overrides)
            rules.append(f"model {mcfg.n_layer} layers x {mcfg.n_embd} wide, {human_count(weight_count(mcfg))} weights "
                         f"(the {cfg.preset} preset has {human_count(before)}): at least {TOKENS_PER_WEIGHT:g} train "
                         "tokens per weight, where one fits (--preset or --n-layer/--n-head/--n-embd to choose)")
            steps = planned_steps(cfg, mcfg, rows, device, train_tokens, world)  # a smaller model steps faster
            epochs = steps * rows * mcfg.block_size / train_tokens
    tokens_per_step = rows * mcfg.block_size
    if "max_epochs" not in given and not cfg.max_epochs and epochs > EPOCH_BUDGET:
        cfg = dataclasses.replace(cfg, max_epochs=float(EPOCH_BUDGET))
        rules.append(f"budget {EPOCH_BUDGET} epochs ({epoch_steps(EPOCH_BUDGET, train_tokens, tokens_per_step):,} "
                     "steps): past the best point of every small corpus measured (--max-epochs N to choose)")
    per_epoch = epoch_steps(1, train_tokens, tokens_per_step)
    if "eval_every" not in given and per_epoch < cfg.eval_every:
        # samples and last/ keep their cadence: at every epoch's evaluation they would cost more than the steps
        kept = {k: cfg.eval_every for k in ("sample_every", "save_every") if k not in given and not getattr(cfg, k)}
        every = "every step" if per_epoch == 1 else f"every {per_epoch:,} steps"
        rules.append(f"evaluate {every}: once an epoch, so that the best point is seen"
                     f"{f'; samples and last/ stay every {cfg.eval_every:,}' if kept else ''} (--eval-every N to choose)")
        cfg = dataclasses.replace(cfg, eval_every=per_epoch, **kept)
    if "patience" not in given and not cfg.patience:
        cfg = dataclasses.replace(cfg, patience=PATIENCE)
        then = ("the run stops" if world > 1 else
                "the run goes back to its best point and decays the learning rate there")
        rules.append(f"patience {PATIENCE} evaluations: when val loss has not improved for that long, {then} "
                     "(--patience 0 to train on)")
    if overrides.get("dropout") is None and not mcfg.dropout:
        overrides["dropout"] = SMALL_DATA_DROPOUT
        rules.append(f"dropout {SMALL_DATA_DROPOUT}: it delays the memorising (--dropout 0 to train without it)")
    return Fitted(cfg, overrides, rules)


def fitted_shape(mcfg: ModelConfig, train_tokens: int) -> dict[str, int] | None:
    """The largest of SHAPES smaller than `mcfg` with at least TOKENS_PER_WEIGHT train tokens per weight (the
    smallest when none has); None when `mcfg` itself has them, or no shape is smaller."""
    weights = weight_count(mcfg)
    if train_tokens >= TOKENS_PER_WEIGHT * weights:
        return None
    smaller = [s for s in SHAPES if weight_count(dataclasses.replace(mcfg, **s)) < weights]
    if not smaller:
        return None
    fits = [s for s in smaller if train_tokens >= TOKENS_PER_WEIGHT * weight_count(dataclasses.replace(mcfg, **s))]
    return dict(fits[0] if fits else smaller[-1])
