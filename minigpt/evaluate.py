"""Scoring held-out tokens: the one evaluator behind training's val figures, quick_test.py and quantize.

Loss is nats per scored token; bits per byte divides the same nats (in bits) by the bytes of source text
behind exactly the tokens scored (`TokenData.token_bytes`), so it compares fairly across vocabularies
and languages, and it does not drift when only part of a split is scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import TokenData
from .utils import Dist, autocast


@dataclass
class Score:
    loss: float  # nats per scored token
    bpb: float  # bits per byte of the text behind the scored tokens
    tokens: int
    bytes: int

    @staticmethod
    def of(nats: float, tokens: int, nbytes: int) -> Score:
        bpb = nats / math.log(2) / nbytes if nbytes else float("nan")
        return Score(nats / max(tokens, 1), bpb, tokens, nbytes)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: TokenData, windows: list[tuple[int, int]], block_size: int, batch_size: int,
    device: torch.device, dtype: torch.dtype, d: Dist | None = None,
) -> Score:
    """Score the val `windows` (each `block_size + 1` tokens: every token after the first is a target).

    Under torchrun every process scores the same number of windows (the last ones padded with a
    window that counts zero), so all of them run the same forward passes and meet at one all_reduce.
    The model's train/eval mode is restored afterwards.
    """
    d = d or Dist()
    was_training = model.training
    model.eval()
    per_rank = -(-len(windows) // d.world)
    total = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    mine = list(range(d.rank, per_rank * d.world, d.world))
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        real = np.array([j < len(windows) for j in chunk])
        rows = np.stack([data.val.arrays[s][o : o + block_size + 1] for s, o in
                         (windows[j] if j < len(windows) else windows[0] for j in chunk)]).astype(np.int64)
        batch = torch.from_numpy(rows).to(device)
        with autocast(device, dtype):
            logits = model(batch[:, :-1]).logits
        nats = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].reshape(-1), reduction="none")
        counted = torch.from_numpy(real).to(device)
        total[0] += torch.where(counted, nats.view(len(chunk), -1).double().sum(dim=1), 0.0).sum()
        total[1] += float(real.sum() * block_size)
        total[2] += float(data.token_bytes[rows[real, 1:]].sum())
    if d.world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    nats, tokens, nbytes = total.tolist()
    return Score.of(nats, int(tokens), int(nbytes))


def unigram_baseline(data: TokenData, windows: list[tuple[int, int]], block_size: int) -> Score:
    """A unigram model of the train tokens (add-one smoothed) scored on the same val targets: the floor a
    trained model must beat."""
    counts = np.zeros(data.vocab_size, dtype=np.float64)
    for arr in data.train.arrays:
        counts += np.bincount(arr, minlength=data.vocab_size)
    logp = np.log((counts + 1) / (counts.sum() + data.vocab_size))  # unseen tokens keep some mass
    targets = np.concatenate([data.val.arrays[s][o + 1 : o + block_size + 1] for s, o in windows]).astype(np.int64)
    return Score.of(float(-logp[targets].sum()), int(targets.size), int(data.token_bytes[targets].sum()))
