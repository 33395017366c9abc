"""Qwen3-Next hybrid token mixers: Gated DeltaNet layers and gated full attention.

`gpt.make_mixer` calls `make_hybrid_mixer(cfg, layer_idx)` when `cfg.hybrid` is set:
layer i is gated full attention when (i + 1) % full_attention_interval == 0 (Qwen3-Next:
layers 3, 7, 11, ... with interval 4) and Gated DeltaNet otherwise. Both keep
`layers.Attention`'s signature, forward(x, cos, sin, cache, attn_mask).

Gated DeltaNet (Yang et al. 2024), as in Qwen3-Next, per value head h:

    q, k, v = silu(causal_depthwise_conv(x W_q | x W_k | x W_v))   (width conv_kernel)
    q, k    = l2norm(q), l2norm(k); q *= 1/sqrt(d_k)                (k heads shared by
    beta    = sigmoid(x W_b)                                         nv/nk value heads)
    g       = -exp(A_log) * softplus(x W_a + dt_bias)               (log decay, <= 0)
    S_t     = exp(g_t) S_{t-1} + k_t [beta_t (v_t - exp(g_t) S_{t-1}^T k_t)]^T
    o_t     = S_t^T q_t;   y = out_proj(rmsnorm(o) * w * silu(x W_z))

Three kernels compute the rule: `chunk_gated_delta_rule` (training and prefill: WY /
UT transform inside chunks, a scan across them), `recurrent_gated_delta_rule` (token
by token; generation), and flash-linear-attention's Triton kernels when the `fla`
package is installed and the tensors are on CUDA (on CUDA without them, the PyTorch
kernels run and a warning says so, once per process). Generation keeps each linear layer's
(conv_state, recurrent_state) in `cache.state[layer_idx]`; `KVCache.reorder` handles
the tuple. Full-attention layers use the KV cache as usual (the cache allocates K/V for
every layer; linear layers leave theirs unused).

    from nanochat_trainer.config import TrainerConfig
    cfg = TrainerConfig(preset="tiny-hybrid").model
    model = GPT(cfg)                                  # mixers come from here
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .layers import Attention, KVCache, warn_fallback

try:  # Triton kernels for CUDA; optional.
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as _fla_recurrent

    _fla_missing = ""
except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
    _fla_chunk = _fla_recurrent = None
    _fla_missing = f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------ the delta rule


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
    """(B, T, H, D) inputs -> float32 (B, H, T, D) with q, k L2-normed, q scaled, k heads repeated."""
    nk, nv = q.size(2), v.size(2)
    if nk != nv:  # each key head serves nv // nk consecutive value heads
        q = q.repeat_interleave(nv // nk, dim=2)
        k = k.repeat_interleave(nv // nk, dim=2)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    # rsqrt(sum + eps), as FLA and transformers compute it, so numerics line up.
    q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6) / math.sqrt(q.size(-1))
    k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    return q, k, v, g.transpose(1, 2).float(), beta.transpose(1, 2).float()


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule.

    q, k: (B, T, Hk, Dk); v: (B, T, Hv, Dv); g, beta: (B, T, Hv); state (B, Hv, Dk, Dv).
    Returns o (B, T, Hv, Dv) in v's dtype and the final state (float32).
    """
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    s = q.new_zeros(b, h, dk, v.size(-1)) if initial_state is None else initial_state.float()
    out = []
    for i in range(t):
        s = s * g[:, :, i].exp()[..., None, None]
        kv_mem = torch.einsum("bhkv,bhk->bhv", s, k[:, :, i])
        delta = (v[:, :, i] - kv_mem) * beta[:, :, i, None]
        s = s + k[:, :, i, :, None] * delta[:, :, None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", s, q[:, :, i]))
    o = torch.stack(out, dim=2) if out else v.new_zeros(v.shape)
    return o.transpose(1, 2).to(dtype), s


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule: same arguments and results as `recurrent_gated_delta_rule`.

    Inside a chunk, with gamma_i the cumulative log decay from the chunk start, the
    per-token corrections U (rows u_i = beta_i (v_i - decayed S_{i-1}^T k_i)) solve a
    unit lower-triangular system (I + A) U = beta V - beta e^gamma K S_0 with
    A_ij = beta_i e^(gamma_i - gamma_j) k_i.k_j (j < i). Outputs and the next state
    then follow from matmuls; only the chunk-to-chunk scan is sequential.
    """
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    dv = v.size(-1)
    c = chunk_size
    pad = (c - t % c) % c
    if pad:  # padded steps have beta = 0 and g = 0: they change nothing
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (t + pad) // c
    q, k, v = (x.reshape(b, h, n, c, -1) for x in (q, k, v))
    g, beta = g.reshape(b, h, n, c), beta.reshape(b, h, n, c)

    gamma = g.cumsum(-1)  # (b, h, n, c)
    # decay[i, j] = exp(gamma_i - gamma_j) for j <= i; the upper triangle is masked
    # before exp so large positive differences cannot overflow.
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(upper, float("-inf")).exp()
    k_beta = k * beta[..., None]
    a = (k_beta @ k.transpose(-1, -2)) * decay  # its diagonal is ignored (unitriangular)
    u_base = torch.linalg.solve_triangular(a, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(a, k_beta * gamma.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay  # intra-chunk, diagonal included
    q_dec = q * gamma.exp()[..., None]  # reads of the chunk's initial state
    k_dec = k * (gamma[..., -1:] - gamma).exp()[..., None]  # writes, decayed to the chunk end
    chunk_decay = gamma[..., -1].exp()[..., None, None]  # (b, h, n, 1, 1)

    s = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state.float()
    out = []
    for i in range(n):
        u = u_base[:, :, i] - w[:, :, i] @ s
        out.append(q_dec[:, :, i] @ s + attn[:, :, i] @ u)
        s = s * chunk_decay[:, :, i] + k_dec[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(out, dim=2).reshape(b, h, n * c, dv)[:, :, :t]
    return o.transpose(1, 2).to(dtype), s


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick a kernel: FLA on CUDA when installed, else chunked (T > 1) or recurrent (T == 1)."""
    t = q.size(1)
    if _fla_chunk is not None and q.is_cuda:
        nk, nv = q.size(2), v.size(2)
        if nk != nv:
            q, k = q.repeat_interleave(nv // nk, dim=2), k.repeat_interleave(nv // nk, dim=2)
        fn = _fla_recurrent if t == 1 else _fla_chunk
        o, s = fn(
            q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=True, use_qk_l2norm_in_kernel=True
        )
        return o, s
    if q.is_cuda:
        warn_fallback(
            "Gated DeltaNet on CUDA without flash-linear-attention's kernels (fla not importable: "
            f"{_fla_missing}): using the PyTorch chunked and recurrent kernels, much slower"
        )
    if t == 1:
        return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state)
    return chunk_gated_delta_rule(q, k, v, g, beta, chunk_size, initial_state)


# ------------------------------------------------------------------ modules


class GatedRMSNorm(nn.Module):
    """rmsnorm(x) * weight * silu(gate), per value head (Qwen3-Next's RMSNormGated)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @torch.no_grad()
    def reset_extra_parameters(self) -> None:
        """Ones again (see RMSNorm.reset_extra_parameters)."""
        self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype) * self.weight
        return (y.float() * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's linear-attention mixer. forward(x, cos, sin, cache, attn_mask) -> (B, T, dim).

    cos/sin are ignored (no positions: the causal conv and the recurrence order tokens).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        h = cfg.hybrid
        assert h is not None
        self.layer_idx = layer_idx
        self.nk, self.nv = h.linear_num_key_heads, h.linear_num_value_heads
        self.dk, self.dv = h.linear_key_head_dim, h.linear_value_head_dim
        self.chunk_size = h.chunk_size
        self.kernel = h.conv_kernel
        key_dim, value_dim = self.nk * self.dk, self.nv * self.dv
        self.q_proj = nn.Linear(cfg.dim, key_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, key_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, value_dim, bias=False)
        self.z_proj = nn.Linear(cfg.dim, value_dim, bias=False)  # output gate
        self.b_proj = nn.Linear(cfg.dim, self.nv, bias=False)  # beta (write strength)
        self.a_proj = nn.Linear(cfg.dim, self.nv, bias=False)  # decay input
        self.conv_dim = 2 * key_dim + value_dim
        # Depthwise causal conv over the concatenated [q | k | v] channels (HF layout).
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.nv))
        self.A_log = nn.Parameter(torch.empty(self.nv))
        self.norm = GatedRMSNorm(self.dv, cfg.norm_eps)
        self.out_proj = nn.Linear(value_dim, cfg.dim, bias=False)
        self.reset_extra_parameters()

    @torch.no_grad()
    def reset_extra_parameters(self) -> None:
        """Mamba-2 / FLA init: A ~ U(1, 16), dt ~ logU(1e-3, 1e-1), dt_bias = softplus^-1(dt).

        Seeded by the layer index so GPT.init_weights stays deterministic.
        """
        if self.A_log.is_meta:
            return
        gen = torch.Generator(device="cpu").manual_seed(10_000 + self.layer_idx)
        a = torch.empty(self.nv, device="cpu").uniform_(1.0, 16.0, generator=gen)
        lo, hi = math.log(1e-3), math.log(0.1)
        dt = torch.exp(torch.rand(self.nv, generator=gen, device="cpu") * (hi - lo) + lo)
        self.A_log.copy_(a.log())
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _conv(self, mixed: torch.Tensor, conv_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """mixed: (B, C, T). Causal depthwise conv continuing from conv_state (B, C, K-1)."""
        k = self.kernel
        if conv_state is None:
            conv_state = mixed.new_zeros(mixed.size(0), mixed.size(1), k - 1)
        full = torch.cat([conv_state.to(mixed.dtype), mixed], dim=-1)
        out = F.conv1d(full, self.conv1d.weight.to(mixed.dtype), groups=self.conv_dim)
        return F.silu(out), full[..., full.size(-1) - (k - 1) :]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if cache is not None and attn_mask is not None:
            # The model's (B, 1, T, S) mask: its last query row sees exactly the real new
            # tokens. Zeroed left padding leaves conv and recurrent states at zero.
            x = x * attn_mask[:, 0, -1, -t:].unsqueeze(-1).to(x.dtype)
        state = cache.state.get(self.layer_idx) if cache is not None else None
        conv_state, rec_state = state if state is not None else (None, None)

        mixed = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1).transpose(1, 2)
        mixed, conv_state = self._conv(mixed, conv_state)
        q, k, v = mixed.transpose(1, 2).split([self.nk * self.dk, self.nk * self.dk, self.nv * self.dv], dim=-1)
        q, k = q.reshape(b, t, self.nk, self.dk), k.reshape(b, t, self.nk, self.dk)
        v = v.reshape(b, t, self.nv, self.dv)
        beta = torch.sigmoid(self.b_proj(x))
        # float32: exp(A_log) * softplus(.) must not overflow in bf16.
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())

        o, rec_state = gated_delta_rule(q, k, v, g, beta, rec_state, self.chunk_size)
        if cache is not None:
            cache.state[self.layer_idx] = (conv_state.detach(), rec_state.detach())
        z = self.z_proj(x).reshape(b, t, self.nv, self.dv)
        o = self.norm(o.to(x.dtype), z)
        return self.out_proj(o.reshape(b, t, -1))


class GatedAttention(Attention):
    """Full attention with Qwen3-Next's sigmoid output gate: o_proj(attn(x) * sigmoid(x W_g))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.g_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.o_proj(self.attend(x, cos, sin, cache, attn_mask) * torch.sigmoid(self.g_proj(x)))


def is_full_attention(cfg: ModelConfig, layer_idx: int) -> bool:
    """Qwen3-Next's layer pattern: every full_attention_interval-th layer (1-based) is full attention."""
    assert cfg.hybrid is not None
    return (layer_idx + 1) % cfg.hybrid.full_attention_interval == 0


def make_hybrid_mixer(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The token mixer of layer `layer_idx` in a hybrid stack."""
    if is_full_attention(cfg, layer_idx):
        return GatedAttention(cfg, layer_idx)
    return GatedDeltaNet(cfg, layer_idx)
