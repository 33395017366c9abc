"""Reusable layers of the Qwen3-style models: norms, rotary embeddings, attention, SwiGLU, the KV cache.

GQA attention with RoPE (rotate-half convention, as Qwen3) and per-head QK RMSNorm, SwiGLU
feed-forward, float32 RMSNorm. Parameter names follow Hugging Face's Qwen3 (`hf_adapter.py`
maps weights one to one). Nothing here knows about parallelism or training.

    attn = Attention(cfg, layer_idx=0)
    y = attn(x, cos, sin)                       # (B, T, dim), causal
    cache = KVCache(batch, max_len, n_layers, n_kv_heads, head_dim, device, dtype)
"""

from __future__ import annotations

import functools
import logging
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig

log = logging.getLogger("nanochat_trainer.models")


@functools.cache
def warn_fallback(message: str) -> None:
    """A faster path not taken (a CUDA kernel missing) is never silent, and said once per process,
    not once per layer and step."""
    log.warning(message)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @torch.no_grad()
    def reset_extra_parameters(self) -> None:
        """Ones again (GPT.init_weights calls it: a model built on meta holds garbage after to_empty)."""
        self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like Qwen3 does, so bf16 runs match its numerics.
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, rotary_dim: int | None = None):
    """cos/sin of shape (max_len, rotary_dim), halves repeated (rotate-half layout)."""
    rotary_dim = rotary_dim or head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (B, T, R) with R <= D. Rotates the first R dims."""
    rot = cos.size(-1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class KVCache:
    """Preallocated keys/values for generation, with left-padding support.

    `valid` marks which cached positions are real tokens (False for left padding);
    `pos` is each row's next RoPE position. Layers call `update`; the model calls
    `advance` once all layers have written the new tokens.
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        self.state: dict[int, object] = {}  # per-layer recurrent state (linear-attention layers)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (B, n_kv, T, D). Returns all keys/values so far, (B, n_kv, length+T, D)."""
        t = k.size(2)
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, pad_mask: torch.Tensor) -> None:
        t = pad_mask.size(1)
        self.valid[:, self.length : self.length + t] = pad_mask
        self.pos += pad_mask.sum(dim=1)
        self.length += t

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (drop finished sequences, or fan one prompt out to n samples)."""
        self.k, self.v = self.k[:, index], self.v[:, index]
        self.valid, self.pos = self.valid[index], self.pos[index]
        for key, value in list(self.state.items()):
            self.state[key] = tuple(s[index] for s in value) if isinstance(value, tuple) else value[index]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = hd = cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, cfg.dim, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, cache: KVCache | None = None, attn_mask=None):
        return self.o_proj(self.attend(x, cos, sin, cache, attn_mask))

    def attend(self, x, cos, sin, cache: KVCache | None = None, attn_mask=None) -> torch.Tensor:
        """Attention output before the output projection, (B, T, n_heads * head_dim)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=True)
        return y.transpose(1, 2).reshape(b, t, -1)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Recompute:
    """Active while activation checkpointing re-runs a block's forward inside the backward pass:
    a module whose forward has effects beyond its output (the MoE load counters) skips them then,
    so they count each forward once. A per-thread depth, so nested or concurrent re-runs hold."""

    _depth = threading.local()

    @classmethod
    def active(cls) -> bool:
        return getattr(cls._depth, "n", 0) > 0

    def __enter__(self) -> None:
        Recompute._depth.n = getattr(Recompute._depth, "n", 0) + 1

    def __exit__(self, *exc) -> None:
        Recompute._depth.n -= 1
