"""The model: a Qwen3-style decoder-only transformer.

GQA attention with RoPE (rotate-half convention, as Qwen3) and per-head QK RMSNorm,
SwiGLU feed-forward, pre-norm RMSNorm blocks, untied or tied head. The layout and
parameter names follow Hugging Face's Qwen3 so `hf_adapter.py` maps weights one to
one. DDP/FSDP/compile are applied from outside, in `parallel.py`; the only process
groups the model sees are the ones it is handed: its MoE blocks' balancing group
(`parallel.wrap_model`) and expert-parallel group (`expert_parallel.py`).

    from nanochat_trainer.config import TrainerConfig
    cfg = TrainerConfig(preset="tiny").model
    model = GPT(cfg); logits = model(idx)            # (B, T, vocab)
    loss = model(idx, targets)                       # scalar, MoE aux losses included
"""

from __future__ import annotations

import math
import threading
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


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

    def __init__(self, batch: int, max_len: int, n_layers: int, n_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
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
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, pad_mask: torch.Tensor) -> None:
        t = pad_mask.size(1)
        self.valid[:, self.length:self.length + t] = pad_mask
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
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=True
        )
        return y.transpose(1, 2).reshape(b, t, -1)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_mixer(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The token mixer of one block: attention, or linear attention in a hybrid stack."""
    if cfg.hybrid is not None:
        from .hybrid import make_hybrid_mixer

        return make_hybrid_mixer(cfg, layer_idx)
    return Attention(cfg, layer_idx)


def make_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The feed-forward of one block: SwiGLU, or a mixture of experts."""
    if cfg.moe is not None and layer_idx not in cfg.moe.dense_layers:
        from .moe import MoE

        return MoE(cfg.dim, cfg.moe)
    return SwiGLU(cfg.dim, cfg.resolved_ffn_dim)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = make_mixer(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = make_ffn(cfg, layer_idx)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


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


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Training setting (TrainerConfig.activation_checkpointing), not architecture: set by the trainer.
        self.activation_checkpointing = False
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = self.rope_buffers()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def rope_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rope_cos, rope_sin) for this config (partial rotary for the hybrid's attention)."""
        cfg = self.cfg
        rotary = cfg.resolved_head_dim
        if cfg.hybrid is not None:
            rotary = int(rotary * cfg.hybrid.partial_rotary_factor)
        return rope_tables(cfg.resolved_head_dim, cfg.max_seq_len, cfg.rope_theta, rotary)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """nanochat-style init: fan-in scaled matrices, zeroed output projections; norms, gains and
        buffers (RoPE tables, MoE and ternary state) reset, so a model built on the meta device
        and materialised with `to_empty` is initialised completely.

        The same weights whatever the expert-parallel layout: a rank holding a slice of a layer's
        experts draws the whole (E, out, in) tensor from the shared generator and keeps its rows
        (the generator then stands where it stands in one process)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rows = {id(w): (m.n_experts, m.ep_offset) for m in self.modules() if getattr(m, "ep_group", None) is not None
                for w in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)}
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms and gains: their modules' reset_extra_parameters, below
            full, offset = rows.get(id(p), (p.shape[0], 0))
            shape = (full,) + tuple(p.shape[1:])
            if name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight")) or (
                name == "lm_head.weight" and not self.cfg.tie_embeddings
            ):
                p.zero_()
                continue
            if name == "embed_tokens.weight":
                value = torch.randn(shape, generator=gen)
            else:
                fan_out, fan_in = p.shape[-2], p.shape[-1]
                std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
                value = torch.randn(shape, generator=gen) * std
            p.copy_(value[offset:offset + p.shape[0]])
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Everything init_weights sets but the random matrices: RoPE tables, norms and gains,
        the modules' own state (reset_extra_parameters). Enough for a model materialised with
        `to_empty` whose weights a checkpoint is about to replace."""
        cos, sin = self.rope_buffers()
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for m in self.modules():
            if hasattr(m, "reset_extra_parameters"):
                m.reset_extra_parameters()

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        cfg = self.cfg
        p = self.embed_tokens.weight
        return KVCache(batch, max_len or cfg.max_seq_len, cfg.n_layers, cfg.n_kv_heads,
                       cfg.resolved_head_dim, p.device, p.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, pad_mask: torch.Tensor | None = None):
        """idx: (B, T) token ids. With targets, returns the mean loss (ignore index -1).

        pad_mask (B, T), True for real tokens, marks left padding when generating a
        batch of prompts of different lengths; it needs a cache.
        """
        b, t = idx.shape
        attn_mask = None
        if cache is None:
            if t > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {t} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:t].expand(b, t, -1), self.rope_sin[:t].expand(b, t, -1)
        else:
            if pad_mask is None:
                pad_mask = torch.ones(b, t, dtype=torch.bool, device=idx.device)
            # Each row's positions count only its real tokens, so left padding shifts nothing.
            pos = cache.pos[:, None] + (pad_mask.cumsum(1) - 1).clamp(min=0)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
            start = cache.length
            keys_valid = torch.cat([cache.valid[:, :start], pad_mask], dim=1)  # (B, S)
            causal = torch.ones(t, start + t, dtype=torch.bool, device=idx.device).tril(diagonal=start)
            attn_mask = causal[None] & keys_valid[:, None, :]
            # A padded query row would attend to nothing (NaN); let it see itself.
            diag = torch.arange(t, device=idx.device)[:, None] + start == torch.arange(start + t, device=idx.device)
            attn_mask = attn_mask | diag[None]
            attn_mask = attn_mask[:, None]  # (B, 1, T, S)
        x = self.embed_tokens(idx)
        checkpointed = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointed:
                # Non-reentrant: works under FSDP2 (its hooks see the recompute as part of the
                # backward) and lets tensors made inside the block, such as the MoE aux loss, carry gradient.
                x = checkpoint(layer, x, cos, sin, None, attn_mask, use_reentrant=False,
                               context_fn=lambda: (nullcontext(), Recompute()))
            else:
                x = layer(x, cos, sin, cache, attn_mask)
        if cache is not None:
            cache.advance(pad_mask)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return loss + self.aux_loss()

    def aux_loss(self) -> torch.Tensor | float:
        """Sum of the auxiliary losses (MoE balancing, z-loss) of the last forward."""
        total = 0.0
        for m in self.modules():
            if m is not self and hasattr(m, "last_aux_loss") and m.last_aux_loss is not None:
                total = total + m.last_aux_loss
        return total


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part, built on the meta device (no memory is spent)."""
    with torch.device("meta"):
        model = GPT(cfg)
    parts = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("embed_tokens"):
            parts["embedding"] += p.numel()
        elif name.startswith("lm_head"):
            parts["lm_head"] += p.numel()
        elif ".attn." in name and "norm" not in name:
            parts["attention"] += p.numel()
        elif ".mlp." in name:
            parts["mlp"] += p.numel()
        else:
            parts["norms"] += p.numel()
    parts["total"] = sum(parts.values())
    return parts
