"""A decoder-only GPT in one file, with its KV cache.

Departures from GPT-2, each a common modern choice:
- rotary position embeddings (RoPE) on queries and keys instead of a learned position table;
- RMSNorm instead of LayerNorm, applied before each sub-layer (pre-norm) and once at the end;
- SwiGLU MLP (hidden 8/3 d, rounded to 64) by default; GELU (hidden 4 d) as an option;
- no biases in linear layers;
- attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels where present);
- token embedding and output head tied by default (`tie_embeddings`);
- residual projections initialised with std 0.02 / sqrt(2 * n_layer), as in GPT-2's paper.

`KVCache` is a preallocated (static) cache for generation. Each row (sequence) fills its own slots
from 0, so slot = position for RoPE, and rows may be at different positions: `GPT.prefill` encodes
tokens into the cache, and `GPT.decode` adds one token per row, each row at its own position held in
a tensor, with fixed shapes and no host sync, so that step can be captured in a CUDA graph. The plain
path without a cache is the reference both are tested against.

int8 weight-only layers that stand in for the Linear layers and the embedding are in `int8.py`.
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
    """Keys and values of every layer for `rows` sequences of up to `max_len` positions, allocated once."""

    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, rows, cfg.kv_heads, max_len, cfg.head_dim)  # key/value heads only: GQA's saving
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # slots filled by `GPT.prefill` / `GPT.forward` (the same for every row of this cache)
        self.slots = torch.arange(max_len, device=device)

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache of their own: the same storage (writes land here), empty (pos 0)."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.max_len, view.pos, view.slots = self.max_len, 0, self.slots
        return view


def rotary_tables(cfg: ModelConfig, length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if cfg.rope_scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, cfg.rope_scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()  # (length, head_dim / 2)


def llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3's long-context RoPE: wavelengths longer than the original context / low_freq_factor are slowed
    by `factor`, those shorter than it / high_freq_factor kept, and the band between blended smoothly."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    return torch.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), blended, out)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # rows: the queries (n_head heads), then the keys and the values (n_kv heads each)
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
        write: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`cos`/`sin` broadcast against (B, T, 2, H, D/2): per position, or per row when decoding."""
        B, T, C = x.shape
        if self.n_kv == self.n_head:
            qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
            qk = apply_rotary(qkv[:, :, :2], cos, sin)  # queries and keys rotated in one pass
            q, k = qk.transpose(1, 3).unbind(dim=2)  # (B, H, T, D) each
            v = qkv[:, :, 2].transpose(1, 2)
        else:  # grouped-query attention: fewer key/value heads than query heads
            qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv, self.head_dim)
            q, k, v = qkv.split((self.n_head, self.n_kv, self.n_kv), dim=2)
            q = apply_rotary(q, cos[:, :, 0], sin[:, :, 0]).transpose(1, 2)  # (B, H, T, D)
            k = apply_rotary(k, cos[:, :, 0], sin[:, :, 0]).transpose(1, 2)  # (B, H_kv, T, D)
            v = v.transpose(1, 2)
        if cache is None:  # training and the plain reference
            k, v = self._shared(k), self._shared(v)
            return self.proj(self._out(F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)))
        if write is not None:  # GPT.decode: one token per row, each at its own slot, fixed shapes
            cache.k[layer].scatter_(2, write, k)
            cache.v[layer].scatter_(2, write, v)
            if self.n_kv != self.n_head:  # a group's queries as the rows of one KV head: no copy of the cache
                y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.head_dim), cache.k[layer],
                                                   cache.v[layer], attn_mask=mask)
                return self.proj(self._out(y.reshape(B, self.n_head, 1, self.head_dim)))
            return self.proj(self._out(F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=mask)))
        start = cache.pos  # GPT.prefill: T new tokens for every row, after the `start` cached ones
        cache.k[layer, :, :, start : start + T] = k
        cache.v[layer, :, :, start : start + T] = v
        k, v = self._shared(cache.k[layer, :, :, : start + T]), self._shared(cache.v[layer, :, :, : start + T])
        if start == 0:  # an empty cache: plain causal attention over the new tokens (the fast kernels)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # causal among the new tokens, a full view of the past
            visible = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.proj(self._out(y))

    def _shared(self, kv: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, T, D) keys or values as (B, H, T, D): each serves its group of query heads."""
        return kv if self.n_kv == self.n_head else kv.repeat_interleave(self.n_head // self.n_kv, dim=1)

    @staticmethod
    def _out(y: torch.Tensor) -> torch.Tensor:
        B, H, T, D = y.shape
        return y.transpose(1, 2).reshape(B, T, H * D)


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
        write: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, cache, layer, write, mask))
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
        # Derived from the config, never saved or trained: under DDP they are not broadcast either.
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

    def _trunk(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """The blocks over `idx` (after `cache.pos` cached positions, with a cache), before the final norm."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.block_size}")
        cos, sin = self.cos[start : start + T, None, None], self.sin[start : start + T, None, None]
        x = self.drop(self.wte(idx))
        for i, block in enumerate(self.blocks):
            if self.grad_checkpoint and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos += T
        return x

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None, last_only: bool = False
    ) -> Output:
        """Logits for every position (and the mean loss against `targets`); `last_only` keeps the last
        position alone, which is all a next-token prediction needs and spares the output head."""
        x = self._trunk(idx, cache)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return Output(logits, None)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return Output(logits, loss)

    def prefill(self, idx: torch.Tensor, cache: KVCache, last: torch.Tensor | None = None) -> torch.Tensor | None:
        """Encode `idx` (one row per cache row) into the cache after its `pos` slots. With `last` (rows,),
        returns the logits (rows, vocab) at each row's position `last`: rows may be right-padded."""
        x = self._trunk(idx, cache)
        if last is None:
            return None
        return self.lm_head(self.norm_f(x[torch.arange(x.size(0), device=x.device), last]))

    def decode(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (rows, vocab) after one new token per row: `tok` (rows,) goes into slot `pos` (rows,) of
        its row, and attends to that row's slots up to and including `pos`.

        Every shape is fixed and nothing is read back to the host, so the step can be captured in a CUDA
        graph and replayed for each token. The cache must hold exactly the rows of `tok`, and every
        `pos` must be below `cache.max_len`.
        """
        x = self.wte(tok[:, None])  # (rows, 1, C)
        # each row's angles, cast once here rather than in every layer: the step's kernel count is its cost
        cos = self.cos.index_select(0, pos).to(x.dtype)[:, None, None, None]
        sin = self.sin.index_select(0, pos).to(x.dtype)[:, None, None, None]
        write = pos.view(-1, 1, 1, 1).expand(-1, self.cfg.kv_heads, 1, self.cfg.head_dim)
        # additive mask, built once for all layers: 0 up to each row's `pos`, -inf after it
        hidden = cache.slots[None, :] > pos[:, None]
        mask = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device).masked_fill(hidden, float("-inf"))[:, None, None]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, write, mask)
        return self.lm_head(self.norm_f(x))[:, 0]

    def num_params(self) -> int:
        """Weights, a tied matrix once; int8 models keep their matrices as buffers named `weight`."""
        buffers = sum(b.numel() for n, b in self.named_buffers() if n.endswith(".weight"))
        return sum(p.numel() for p in self.parameters()) + buffers

    def flops_per_token(self) -> float:
        return flops_per_token(self.cfg)


def weight_count(c: ModelConfig) -> int:
    """The weights of a model of this shape, from the shape alone (`GPT.num_params` without building it)."""
    per_block = attention_weights(c) + (3 if c.mlp == "swiglu" else 2) * c.n_embd * c.mlp_hidden + 2 * c.n_embd
    return c.n_layer * per_block + c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2) + c.n_embd


def attention_weights(c: ModelConfig) -> int:
    """One block's attention matrices: queries and output n_embd x n_embd each, keys and values per KV head."""
    return 2 * c.n_embd * c.n_embd + 2 * c.n_embd * c.kv_heads * c.head_dim


def flops_per_token(c: ModelConfig) -> float:
    """Training FLOPs per token: 6 x the weights used in matmuls + attention scores (PaLM, appendix B).

    From the shape alone: the blocks' Linear layers and the output head (a matmul whether tied or
    not, counted once); the embedding lookup is free.
    """
    per_block = attention_weights(c) + (3 if c.mlp == "swiglu" else 2) * c.n_embd * c.mlp_hidden
    matmul = c.n_layer * per_block + c.vocab_size * c.n_embd
    return 6 * matmul + 12 * c.n_layer * c.n_embd * c.block_size


def activation_dtype(model: GPT) -> torch.dtype:
    """The dtype of the model's activations (and so of its KV cache): an int8 embedding says its own."""
    return getattr(model.wte, "out_dtype", None) or model.wte.weight.dtype
