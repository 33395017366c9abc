"""The model: a Qwen3-style decoder-only transformer, dense, MoE or hybrid.

Pre-norm blocks of a token mixer (GQA attention, or a Qwen3-Next hybrid's Gated DeltaNet /
gated attention) and a feed-forward (SwiGLU, or a mixture of experts), then a final norm and
an untied or tied head. The layout and parameter names follow Hugging Face's Qwen3, so
`hf_adapter.py` maps weights one to one. The model knows no parallelism and no training:
DDP, FSDP2, expert parallelism, activation checkpointing and compile are applied from outside
(`nanochat_trainer.parallel`), and the training losses live in `nanochat_trainer.train.losses`.

    from nanochat_trainer.config import TrainerConfig
    cfg = TrainerConfig(preset="tiny").model
    model = GPT(cfg); model.init_weights(seed=0)
    logits = model(idx)                              # (B, T, vocab)
    model.aux_loss()                                 # MoE balancing and z-loss of that forward
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ..config import ModelConfig
from .hybrid import make_hybrid_mixer
from .layers import Attention, KVCache, RMSNorm, SwiGLU, rope_tables
from .moe import Experts, MoE, StackedLinear


def make_mixer(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The token mixer of one block: attention, or linear attention in a hybrid stack."""
    if cfg.hybrid is not None:
        return make_hybrid_mixer(cfg, layer_idx)
    return Attention(cfg, layer_idx)


def make_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The feed-forward of one block: SwiGLU, or a mixture of experts."""
    if cfg.moe is not None and layer_idx not in cfg.moe.dense_layers:
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


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._tie()
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

    def _tie(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def finish_assigned(self, device: torch.device | str) -> None:
        """After `load_state_dict(..., assign=True)` into a model built on the meta device: the head
        tied again (assign replaced the shared Parameter), the RoPE tables (in no state dict)
        rebuilt, and every other buffer no state dict holds (running counters) zeroed."""
        self._tie()
        cos, sin = self.rope_buffers()
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        for mod in self.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.is_meta:
                    mod._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> GPT:
        """nn.Module.to_empty, keeping a tied head tied: it makes every module's parameters anew,
        so a head shared with the embedding would become a second, separately trained matrix."""
        super().to_empty(device=device, recurse=recurse)
        self._tie()
        return self

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """nanochat-style init: fan-in scaled matrices, zeroed output projections; norms, gains and
        buffers (RoPE tables, MoE and ternary state) reset, so a model built on the meta device
        and materialised with `to_empty` is initialised completely.

        The same weights whatever experts the model holds: an `Experts` module holding a slice of
        its layer's experts (expert parallelism) draws the whole (E, out, in) tensor from the shared
        generator and keeps its rows (the generator then stands where it stands in one process)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rows = {
            id(w): (m.n_experts, m.first_expert)
            for m in self.modules()
            if isinstance(m, Experts)
            for w in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
        }
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
                # Untied, nanochat's unit embeddings (the zeroed head starts at loss ln V). Tied, the
                # rows are also the head's: unit rows made every logit ~ dim at init (nano-125M's
                # first loss 769); 1/sqrt(dim) gives unit-variance logits of a normed hidden state.
                # Tiny on synthetic Python, 200 steps: loss 0.70 (0.02 and 1/dim: 0.71) against 0.83.
                std = self.cfg.dim**-0.5 if self.cfg.tie_embeddings else 1.0
                value = torch.randn(shape, generator=gen) * std
            else:
                fan_out, fan_in = p.shape[-2], p.shape[-1]
                std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
                value = torch.randn(shape, generator=gen) * std
            p.copy_(value[offset : offset + p.shape[0]])
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
        return KVCache(
            batch, max_len or cfg.max_seq_len, cfg.n_layers, cfg.n_kv_heads, cfg.resolved_head_dim, p.device, p.dtype
        )

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, pad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab).

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
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attn_mask)
        if cache is not None:
            cache.advance(pad_mask)
        return self.lm_head(self.norm(x))

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


def active_params(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token active parameter counts, built on the meta device (no memory).

    active: every parameter a token touches - all dense weights, the router, the shared
    expert, and top_k/n_experts of the routed experts; the embedding and the head
    count in full. active_non_embedding leaves out the input embedding and the head
    (the convention behind names such as "80B-A3B").
    """
    with torch.device("meta"):
        model = GPT(cfg)
    total = active = embedding = 0
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for _, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            total += n
            if isinstance(mod, StackedLinear):
                # The experts' stacked weights: a token uses top_k of n_experts slices.
                e = p.shape[0]
                active += n * min(cfg.moe.top_k if cfg.moe else e, e) // e
            else:
                active += n
            if mod_name in ("embed_tokens", "lm_head"):
                embedding += n
    return {
        "total": total,
        "active": active,
        "embedding": embedding,
        "active_non_embedding": active - embedding,
        "total_non_embedding": total - embedding,
    }


def architecture_differences(theirs: ModelConfig, ours: ModelConfig) -> list[str]:
    """What makes two ModelConfigs different models: parameter names and shapes, and the settings
    that change the function they compute. How a config spells a shape (head_dim unset or equal
    to dim / n_heads) and training settings (balancing, z-loss) do not count."""

    def shapes(cfg: ModelConfig) -> dict[str, tuple]:
        with torch.device("meta"):
            return {n: tuple(t.shape) for n, t in GPT(cfg).state_dict().items()}

    def function(cfg: ModelConfig) -> dict[str, Any]:
        out = cfg.model_dump(include={"rope_theta", "norm_eps", "qk_norm", "tie_embeddings"})
        if cfg.moe is not None:
            out["moe"] = cfg.moe.model_dump(include={"top_k", "norm_topk_prob", "dense_layers"})
        if cfg.hybrid is not None:
            out["hybrid"] = cfg.hybrid.model_dump(include={"full_attention_interval", "partial_rotary_factor"})
        return out

    a, b = shapes(theirs.model_copy(update={"max_seq_len": ours.max_seq_len})), shapes(ours)
    differ = [f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    fa, fb = function(theirs), function(ours)
    return differ + [
        f"{k}: {fa.get(k)} vs {fb.get(k)}" for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)
    ]
