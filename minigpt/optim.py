"""Optimisation: the learning-rate schedule, the rate `--lr 0` picks, and the optimizers (AdamW, and Muon
for the blocks' matrices), stepped, saved and restored as one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, TrainConfig
from .model import GPT
from .utils import UserError


def lr_at(step: int, cfg: TrainConfig, time_used: float = 0.0) -> float:
    """Linear warmup (step 0 already learns, at lr / warmup_steps), then to min_lr_ratio * lr at max_steps:
    `wsd` holds the peak and decays linearly over the last --cooldown share of the run; `cosine` decays
    all the way.

    With a time budget, progress is whichever is further along, steps or time (`time_used` is the
    share of --max-minutes spent), so the decay completes when time runs out first.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    progress = max(progress, min(1.0, time_used))
    if cfg.schedule == "wsd":
        share = 1.0 - max(0.0, progress - (1 - cfg.cooldown)) / cfg.cooldown  # 1 while stable, 0 at the end
    else:
        share = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * share)


def decay_lr(step: int, start: int, steps: int, peak: float, cfg: TrainConfig) -> float:
    """After going back to the best point at step `start`: linear from `peak` towards min_lr_ratio * lr, which
    the step after the last of `steps` would reach (so that even one step is below the peak)."""
    share = max(0.0, 1.0 - (step - start + 1) / (steps + 1))
    end = cfg.min_lr_ratio * cfg.lr
    return end + (peak - end) * share


# --lr 0: 2e-3 at 128 wide (it beat 1e-3 at equal time on both held-out sets; docs/LOG.md), shrinking as
# 1/sqrt(width) to the 1e-3 that a 512-wide model trains at
AUTO_LR, AUTO_LR_WIDTH = 2e-3, 128


def auto_lr(mcfg: ModelConfig) -> float:
    return AUTO_LR * min(1.0, math.sqrt(AUTO_LR_WIDTH / mcfg.n_embd))


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: the steepest slope at 0 that still settles


def orthogonalise(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of g = U S V^T, by Newton-Schulz iterations: every singular value pushed towards 1 (into
    roughly [0.7, 1.2], which trains as well as exactly 1). bfloat16 on CUDA, float32 elsewhere."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: X X^T is then the smaller product
        x = x.T
    x = x / (x.norm() + eps)  # singular values at most 1, where the iteration converges
    for _ in range(steps):
        xx = x @ x.T
        x = a * x + (b * xx + c * xx @ xx) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, orthogonalised (`orthogonalise`), decoupled weight decay,
    and the step scaled by 0.2 sqrt(max(rows, cols)) so that its RMS matches an AdamW step's (Moonshot's
    rule: one learning rate serves both optimizers).

    `torch.optim.Muon` computes the same in bfloat16 only, which a CPU without bf16 matmuls runs far
    slower than this float32 one (docs/LOG.md), so training runs this one.
    """

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.1, momentum: float = 0.95,
                 ns_steps: int = 5) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                update = orthogonalise(p.grad.add(buf, alpha=mu), group["ns_steps"])  # Nesterov: g + mu B
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class Optimizers:
    """Every weight's update. `adamw`: AdamW, with weight decay on matrices (and the embedding), never on
    norms. `muon`: `Muon` for the 2-D weights inside the blocks, beside AdamW for the embedding, the
    output head and the norm gains.

    One schedule drives every group: `set_lr` gives each group its peak rate times the schedule's share.
    Stepped, zeroed, saved and restored as one; `optimizer.pt` holds AdamW's state as before, or both
    states under "adamw" and "muon".
    """

    def __init__(self, model: GPT, cfg: TrainConfig, device: torch.device) -> None:
        self.kind, self.lr = cfg.optimizer, cfg.lr
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        hidden = [p for n, p in named if cfg.optimizer == "muon" and n.startswith("blocks.") and p.dim() == 2]
        taken = {id(p) for p in hidden}
        rest = [p for _, p in named if id(p) not in taken]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        # fused: one kernel for every tensor (on CPU too since torch 2.4, where it skips the per-tensor loop)
        fused = device.type in ("cuda", "cpu") or None
        self.adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
        self.all: list[torch.optim.Optimizer] = [self.adamw]
        self.peaks = [cfg.lr, cfg.lr]
        if hidden:
            muon_lr = cfg.muon_lr or cfg.lr
            self.muon = Muon(hidden, lr=muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
            self.all.append(self.muon)
            self.peaks.append(muon_lr)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.all for g in o.param_groups]

    def set_lr(self, lr: float) -> None:
        """`lr` is the schedule's rate for --lr; every group gets the same share of its own peak."""
        share = lr / self.lr if self.lr else 0.0
        for group, peak in zip(self.param_groups, self.peaks, strict=True):
            group["lr"] = peak * share

    def zero_grad(self) -> None:
        for o in self.all:
            o.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        if len(self.all) == 1:
            return self.adamw.state_dict()
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        saved = "muon" if set(state) == {"adamw", "muon"} else "adamw"
        if saved != self.kind:
            raise UserError(f"{source} was trained with --optimizer {saved}; resume it with --optimizer {saved}.")
        # a state keeps its own settings (betas, weight decay, momentum, kernel flags: saved on another device
        # perhaps): this run's, which a resume may have changed, go back in
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        if saved == "adamw":
            self.adamw.load_state_dict(state)
        else:
            self.adamw.load_state_dict(state["adamw"])
            self.muon.load_state_dict(state["muon"])
        for group, ours in zip(self.param_groups, settings, strict=True):
            group.update(ours)
