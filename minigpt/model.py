"""A decoder-only GPT in one file.

Departures from GPT-2, each a common modern choice:
- rotary position embeddings (RoPE) on queries and keys instead of a learned position table;
- RMSNorm instead of LayerNorm, applied before each sub-layer (pre-norm) and once at the end;
- SwiGLU MLP (hidden 8/3 d, rounded to 64) by default; GELU (hidden 4 d) as an option;
- no biases in linear layers;
- attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels where present);
- token embedding and output head tied by default (`tie_embeddings`);
- residual projections initialised with std 0.02 / sqrt(2 * n_layer), as in GPT-2's paper.

`KVCache` is a preallocated (static) cache for generation: `GPT.forward` with a cache fills it from a
prompt (at position `cache.pos`), and `GPT.decode` adds one token per row at a position held in a tensor,
with fixed shapes and no host sync, so that step can be captured in a CUDA graph. The plain path without
a cache is the reference both are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, allocated once."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far by `GPT.forward` (the same for every row of the batch)
        self.max_len = max_len
        self.positions = torch.arange(max_len, device=device)
        # Rows of different prompts are left-padded to one length: `first` is each row's first real slot,
        # and attention never looks before it. RoPE sees only position differences, so a row shifted
        # right by its padding attends exactly as it would alone. `padded` (on the host) says whether
        # any row has padding, so that unpadded prompts keep the mask-free causal kernel.
        self.first = torch.zeros(batch, dtype=torch.long, device=device)
        self.padded = False

    def set_first(self, first: list[int]) -> None:
        """Each row's first real slot (0 for a row without padding), in place: a captured step reads it."""
        self.first.copy_(torch.tensor(first, dtype=torch.long))
        self.padded = any(first)

    def prefill_mask(self, T: int) -> torch.Tensor:
        """(rows, 1, T, pos + T) bool: causal, and blind to each row's padding, except that a padding slot
        sees itself (a query with nothing to see would give NaNs, which would leak through the cache)."""
        q = self.positions[self.pos : self.pos + T, None]
        k = self.positions[None, : self.pos + T]
        real = k >= self.first[:, None, None]
        return ((k <= q) & (real | (k == q)))[:, None]


def rotary_tables(cfg: ModelConfig, length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim = cfg.n_embd // cfg.n_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()  # (length, head_dim / 2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
        at: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
        # queries and keys rotated in one pass (half the kernels of rotating each); cos/sin: (T, 1, 1, D/2)
        qk = apply_rotary(qkv[:, :, :2], cos[:, None, None], sin[:, None, None])
        q, k = qk.transpose(1, 3).unbind(dim=2)  # (B, H, T, D) each
        v = qkv[:, :, 2].transpose(1, 2)
        if at is not None and cache is not None:  # GPT.decode: one token at position `at`, fixed shapes
            cache.k[layer].index_copy_(2, at, k)
            cache.v[layer].index_copy_(2, at, v)
            y = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=mask)
        elif cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            start = cache.pos
            cache.k[layer, :B, :, start : start + T] = k
            cache.v[layer, :B, :, start : start + T] = v
            k, v = cache.k[layer, :B, :, : start + T], cache.v[layer, :B, :, : start + T]
            if mask is not None:  # left-padded rows (`KVCache.prefill_mask`)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif start == 0:  # an empty cache: plain causal attention over the new tokens (the fast kernels)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif T == 1:  # one new token sees everything cached: no mask needed
                y = F.scaled_dot_product_attention(q, k, v)
            else:  # a chunk of new tokens: causal among themselves, full view of the past
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.mlp_hidden
        self.up = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)  # one matmul for both halves
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
        at: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, cache, layer, at, mask))
        return x + self.drop(self.mlp(self.norm2(x)))


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one matrix for reading and writing tokens: fewer parameters, no loss in quality
            self.lm_head.weight = self.wte.weight
        cos, sin = rotary_tables(cfg, cfg.block_size)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.grad_checkpoint = False
        self.init_weights()

    def init_weights(self) -> None:
        """All initialisation in one place: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # RMSNorm gains
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None, last_only: bool = False
    ) -> Output:
        """Logits for every position (and the loss against `targets`); `last_only` keeps the last position
        alone, which is all a prompt needs and spares the output head most of its work."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.block_size}")
        cos, sin = self.cos[start : start + T], self.sin[start : start + T]
        mask = cache.prefill_mask(T) if cache is not None and cache.padded else None
        x = self.drop(self.wte(idx))
        for i, block in enumerate(self.blocks):
            if self.grad_checkpoint and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, mask=mask)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]
        x = self.norm_f(x)
        if targets is None:
            return Output(self.lm_head(x), None)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return Output(logits, loss)

    def decode(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (rows, vocab) after one new token per row, `tok` (rows,), at position `pos` (a 0-d tensor).

        Every shape is fixed and nothing is read back to the host, so the step can be captured in a CUDA
        graph and replayed for each token: the token's keys and values go into the cache at `pos`, and
        attention reads the whole cache with the positions after `pos`, and each row's left padding
        (`cache.first`), masked out. The cache must hold exactly the rows of `tok`, and `pos` must be
        below `cache.max_len`.
        """
        at = pos.view(1)
        x = self.wte(tok[:, None])
        # cast once here rather than in every layer: the step's kernel count is its cost
        cos, sin = self.cos.index_select(0, at).to(x.dtype), self.sin.index_select(0, at).to(x.dtype)
        # additive mask, built once for all layers: 0 where visible, -inf after `pos` and before each
        # row's first real slot (left padding)
        hidden = (cache.positions > pos) | (cache.positions < cache.first[:, None])
        mask = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device).masked_fill(hidden, float("-inf"))
        mask = mask[:, None, None]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, at, mask)
        return self.lm_head(self.norm_f(x))[:, 0]

    def num_params(self) -> int:
        """Weights, a tied matrix once; int8 models keep their matrices as buffers named `weight`."""
        buffers = sum(b.numel() for n, b in self.named_buffers() if n.endswith(".weight"))
        return sum(p.numel() for p in self.parameters()) + buffers

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 x the weights used in matmuls + attention scores (PaLM, appendix B).

        The embedding lookup is free; the output head is a matmul whether tied or not.
        """
        cfg = self.cfg
        matmul = self.num_params() - self.wte.weight.numel() + cfg.vocab_size * cfg.n_embd
        matmul -= sum(p.numel() for p in self.parameters() if p.dim() == 1)
        return 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
