"""Mixture-of-experts feed-forward (Qwen3-MoE / Qwen3-Next style) and its bookkeeping.

`gpt.make_ffn` builds `MoE(cfg.dim, cfg.moe)` for every layer not in
`moe.dense_layers`. One MoE block is:

    router   logits = x @ W_r^T (E experts); p = softmax(logits) in float32
    select   top-k of p (plus a per-expert bias when balance='aux_free', selection only)
    weights  p of the chosen experts, renormalised to sum to 1 when norm_topk_prob
    experts  SwiGLU per expert, weights stacked as (E, out, in) parameters
    shared   optional always-on SwiGLU expert scaled by sigmoid(x @ w_g) (Qwen3-Next)

Dispatch is capacity-free: the (token, slot) pairs are sorted by expert, every expert
runs on its contiguous slice, and results are scattered back weighted. On CUDA with
bf16 the slices run as one `torch._grouped_mm`; elsewhere as a per-expert loop. Both read
the weights and inputs through StackedLinear's `effective_weight` / `effective_input` hooks,
which the ternary stage's BitStackedLinear and the packed PackedStackedLinear override.

Token dispatch is an object the experts are handed (`Experts.dispatch`): `LocalDispatch` runs
the rows on the experts this module holds, all of them; expert parallelism
(`parallel.expert_parallel.shard_experts`) keeps a contiguous slice of the experts in each
rank's module (`first_expert` onwards) and hands it an all-to-all dispatch that exchanges the
sorted rows with the ranks holding their experts around the same grouped-mm / loop kernel.

Balancing, per `MoEConfig.balance`:
* 'aux_loss' - Switch-style loss  E * sum_i f_i * P_i  (f_i: share of routed slots that
  went to expert i, P_i: mean router probability of i; 1.0 when perfectly balanced),
  with f_i over every rank's micro-batch of the micro-step (balance_scope 'global', Qiu et
  al. 2025's global-batch balancing: `reduce_loads`, a sum over the ranks that the parallel
  layer hands the block, sees E+1 numbers per layer) or this rank's alone,
  times aux_loss_weight, plus the router z-loss mean(logsumexp(logits)^2) times
  z_loss_weight. Stored in `last_aux_loss`; `GPT.aux_loss()` adds it to the loss.
* 'aux_free' - DeepSeek-V3's bias method: no balancing loss (z-loss still applies);
  after each optimizer step the trainer calls `update_moe_biases(model, loads)` with the
  step's loads over all ranks, which moves each expert's bias by bias_update_rate towards
  under-loaded experts.

Metrics: `last_expert_load` (routed slots per expert in the last forward, a LongTensor);
`take_expert_loads` (the slots counted since the last call, this process's) and `load_summary`
feed the trainer's `moe_load_imbalance` / `moe_dead_experts` gauges, log.jsonl and
`<run>/expert_load.jsonl`.

    logits = model(idx); loss.backward(); opt.step()
    loads = take_expert_loads(model)               # the trainer sums them over the ranks
    update_moe_biases(model, loads)

Optimizers: expert weights are 3-D, (E, out, in). Each [e] slice is one expert's
ordinary matrix, so Muon must orthogonalise per expert, treating the leading dim as a
batch (Newton-Schulz works batched on (..., m, n)); never flatten (E*out, in):
`optim.BatchedMuon` does this. AdamW needs nothing special. The router (E, dim) and
shared_expert_gate (1, dim) are small 2-D matrices: Muon handles them, but AdamW at the
adam_lr is the safer choice (Moonlight/Kimi keep routers on AdamW-like updates);
`expert_bias` is a buffer, never optimised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from ..config import MoEConfig
from .layers import Recompute, SwiGLU, warn_fallback


class StackedLinear(nn.Module):
    """E independent bias-free Linears in one (E, out, in) `weight`.

    The `.weight` suffix keeps GPT.init_weights' name rules working (fan-in init from
    the last two dims, zeros for `down_proj.weight`).
    """

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        nn.init.normal_(self.weight, std=in_features**-0.5)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (E, out, in) weight `Experts.compute` multiplies by, cast to `dtype` (the matmul's)
        when given. Here the weight itself; ternary.BitStackedLinear (QAT) and
        ternary_pack.PackedStackedLinear (packed inference) return their ternary weight."""
        return self.weight if dtype is None else self.weight.to(dtype)

    def effective_input(self, x: torch.Tensor) -> torch.Tensor:
        """The rows this module's matmul sees: x unchanged here; the ternary modules quantize per token."""
        return x

    def extra_repr(self) -> str:
        e, o, i = self.weight.shape
        return f"experts={e}, in_features={i}, out_features={o}"


class TokenDispatch(Protocol):
    """How an `Experts` module gets its rows computed: x_sorted (S, dim) rows grouped by expert,
    counts (E,) rows per expert of the whole layer -> (S, dim) outputs in x_sorted's order."""

    def __call__(self, experts: Experts, x_sorted: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor: ...


class LocalDispatch:
    """Every expert of the layer is in this module: run the rows here."""

    def __call__(self, experts: Experts, x_sorted: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
        return experts.compute(x_sorted, counts, impl)


class Experts(nn.Module):
    """The routed experts: SwiGLU each, weights stacked along dim 0.

    The module may hold a contiguous slice of its layer's `n_experts`, from `first_expert` on
    (expert parallelism cuts it so); `dispatch` then brings it the rows of its experts."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts = n_experts
        self.first_expert = 0
        self.gate_proj = StackedLinear(n_experts, dim, hidden)
        self.up_proj = StackedLinear(n_experts, dim, hidden)
        self.down_proj = StackedLinear(n_experts, hidden, dim)
        self.dispatch: TokenDispatch = LocalDispatch()

    @property
    def held(self) -> int:
        """How many experts this module holds."""
        return self.gate_proj.weight.shape[0]

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
        """x_sorted: (S, dim) rows grouped by expert, counts: (E,) rows per expert (all E
        experts of the layer, whichever this module holds)."""
        return self.dispatch(self, x_sorted, counts, impl)

    def compute(self, x_sorted: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
        """The experts this module holds on their rows: counts has one entry per local expert.

        Weights and inputs go through the projections' `effective_weight` / `effective_input`
        hooks (identity for StackedLinear, ternary for the BitNet modules), so plain,
        ternary-training and packed experts share this one code path.
        """
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        # _grouped_mm is not an autocast op: cast to the autocast dtype by hand. The loop
        # gets the same cast, so a packed module can dequantize straight into that dtype.
        dt = _compute_dtype(x_sorted)
        wg, wu, wd = gate.effective_weight(dt), up.effective_weight(dt), down.effective_weight(dt)
        xg, xu = gate.effective_input(x_sorted), up.effective_input(x_sorted)
        if impl == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)
            xg, xu = xg.to(dt), xu.to(dt)
            # _grouped_mm wants (E, in, out) on the right; transposed views are fine.
            h = F.silu(torch._grouped_mm(xg, wg.transpose(1, 2), offs=offs)) * torch._grouped_mm(
                xu, wu.transpose(1, 2), offs=offs
            )
            return torch._grouped_mm(down.effective_input(h), wd.transpose(1, 2), offs=offs)
        # One host sync for the split sizes; experts with no tokens cost nothing.
        sizes = counts.tolist()
        outs = []
        for e, (xge, xue) in enumerate(zip(torch.split(xg, sizes), torch.split(xu, sizes))):
            if xge.numel() == 0:
                continue
            h = F.silu(F.linear(xge, wg[e])) * F.linear(xue, wu[e])
            outs.append(F.linear(down.effective_input(h), wd[e]))
        if not outs:
            # No rows: still run one expert on the empty batch, so that the weights (and, under
            # expert parallelism, the all-to-all around this call) stay in the autograd graph.
            h = F.silu(F.linear(xg, wg[0])) * F.linear(xu, wu[0])
            return F.linear(down.effective_input(h), wd[0])
        return torch.cat(outs)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's when it is on for x's device."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _grouped_mm_ok(x: torch.Tensor, dim: int, hidden: int) -> bool:
    # The CUDA kernel wants bf16 and 16-byte aligned rows (multiples of 8 bf16 values).
    # Under autocast the residual stream (and so x) stays float32 while matmuls run in
    # bf16, so the autocast dtype decides, not x.dtype.
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and _compute_dtype(x) == torch.bfloat16
        and dim % 8 == 0
        and hidden % 8 == 0
    )


class MoE(nn.Module):
    """Routed experts plus an optional gated shared expert. forward(x: (B, T, dim)) -> (B, T, dim)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.router = nn.Linear(dim, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, dim, cfg.expert_ffn_dim)
        if cfg.n_shared_experts:
            self.shared_expert = SwiGLU(dim, cfg.shared_expert_ffn_dim)
            self.shared_expert_gate = nn.Linear(dim, 1, bias=False)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None
        # Aux-free balancing bias: persistent so a resumed run keeps its routing.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=True)
        # Routed slots per expert summed since the last step_expert_loads() (all micro-batches).
        self.register_buffer("_load_since_update", torch.zeros(cfg.n_experts), persistent=False)
        # balance_scope 'global': sums the slot counts over the ranks of the step (in place), handed
        # over by the parallel layer (parallel.apply.wrap_model); None (one process, evaluation,
        # serving): this process's counts alone.
        self.reduce_loads: Callable[[torch.Tensor], object] | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_load: torch.Tensor | None = None
        # 'auto': grouped_mm on CUDA/bf16, else the loop. Tests force either.
        self.impl: Literal["auto", "grouped_mm", "loop"] = "auto"

    @torch.no_grad()
    def reset_extra_parameters(self) -> None:
        """Zero balancing bias and load counters (GPT.init_weights: after meta + to_empty they hold garbage)."""
        self.expert_bias.zero_()
        self._load_since_update.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, dim) -> (logits (N, E), probs float32 (N, E), top-k weights (N, k), top-k ids (N, k))."""
        logits = self.router(x)
        probs = logits.float().softmax(dim=-1)
        if self.cfg.balance == "aux_free":
            # The bias steers which experts are chosen, never how much they weigh.
            _, idx = torch.topk(probs + self.expert_bias.float(), self.top_k, dim=-1)
            weights = probs.gather(-1, idx)
        else:
            weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        n = x.size(0)
        # Named ranges for the profiler (bench/train_throughput.py splits the MoE time by them).
        with record_function("moe/route"):
            logits, probs, weights, idx = self.route(x)
        with record_function("moe/dispatch"):
            # Capacity-free dispatch: order every (token, slot) pair by expert.
            flat_expert = idx.reshape(-1)
            order = torch.argsort(flat_expert, stable=True)
            token_of = order // self.top_k
            counts = torch.bincount(flat_expert, minlength=self.n_experts)
            x_sorted = x[token_of]
        impl = self.impl
        if impl == "auto":
            impl = "grouped_mm" if _grouped_mm_ok(x, self.dim, self.cfg.expert_ffn_dim) else "loop"
            if impl == "loop" and x.is_cuda:
                warn_fallback(
                    "MoE experts on CUDA run the per-expert loop, not torch._grouped_mm (which needs bf16 and "
                    f"sizes divisible by 8; here {_compute_dtype(x)}, dim {self.dim}, expert hidden "
                    f"{self.cfg.expert_ffn_dim}{'' if hasattr(torch, '_grouped_mm') else ', and no torch._grouped_mm'})"
                )
        with record_function("moe/experts"):  # under expert parallelism, with the all-to-alls
            y_sorted = self.experts(x_sorted, counts, impl)
        with record_function("moe/combine"):
            y_sorted = y_sorted * weights.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
            out = torch.zeros_like(x).index_add_(0, token_of, y_sorted.to(x.dtype))

        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

        load = counts.detach()
        self.last_expert_load = load
        if self.training:
            if not Recompute.active():  # activation checkpointing's re-run must not count twice
                self._load_since_update += load.to(self._load_since_update.dtype)
            self.last_aux_loss = self._aux_loss(logits, probs, load, n)
        else:
            self.last_aux_loss = None  # evaluation losses stay pure cross-entropy
        return out.reshape(shape)

    def _aux_loss(self, logits: torch.Tensor, probs: torch.Tensor, load: torch.Tensor, n: int) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        if self.cfg.balance == "aux_loss" and self.cfg.aux_loss_weight > 0:
            slots = torch.cat([load.float(), load.new_tensor([n * self.top_k], dtype=torch.float32)])
            if self.reduce_loads is not None:
                # Every rank runs the same MoE forwards, so a collective here lines up (also in
                # activation checkpointing's recompute, which must rebuild the same f).
                self.reduce_loads(slots)
            f = slots[:-1] / slots[-1]  # share of routed slots; no gradient (argmax)
            p = probs.mean(dim=0)  # differentiable mean probability
            total = total + self.cfg.aux_loss_weight * self.n_experts * (f * p).sum()
        if self.cfg.z_loss_weight > 0:
            total = total + self.cfg.z_loss_weight * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return total

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-free balancing step: bias += rate * sign(mean load - load), from the step's load
        over every rank (`step_expert_loads`), so every rank keeps the same bias. A no-op for
        balance='aux_loss'. Call after optimizer.step()."""
        if self.cfg.balance == "aux_free" and load.sum() > 0:
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load).to(self.expert_bias.dtype)


@torch.no_grad()
def take_expert_loads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Routed slots per expert of every MoE layer, summed over the training forwards since the
    last call (a step's micro-batches), keyed by module name; the counters restart. This
    process's counts: the trainer sums them over the ranks."""
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    loads = {name: m._load_since_update.clone() for name, m in moes.items()}
    for m in moes.values():
        m._load_since_update.zero_()
    return loads


def held_expert_rows(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{state-dict key: (first row, rows)} of every stacked expert weight whose module holds a
    slice of its layer's experts (expert parallelism): the rows of the full (E, out, in) tensor
    it holds. Empty when every module holds all its experts."""
    out = {}
    for name, experts in model.named_modules():
        if isinstance(experts, Experts) and experts.held != experts.n_experts:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{name}.{proj}.weight"] = (experts.first_expert, experts.held)
    return out


def update_moe_biases(model: nn.Module, loads: dict[str, torch.Tensor]) -> None:
    """`update_bias` on every MoE block with its layer's step load (from step_expert_loads)."""
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            m.update_bias(loads[name])


def load_summary(loads: dict[str, torch.Tensor]) -> dict:
    """What the step record and the gauges say about expert load: the worst layer's max/mean
    (1.0 is perfect balance), experts that got no token, and each layer's max/mean."""
    per_layer = [load_imbalance(v) for v in loads.values()]
    return {
        "load_imbalance": max(per_layer),
        "dead_experts": int(sum(int((v == 0).sum()) for v in loads.values())),
        "layer_imbalance": [round(x, 3) for x in per_layer],
    }


def expert_load(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-layer routed-slot counts of the last forward, keyed by module name (for metrics)."""
    return {
        name: m.last_expert_load
        for name, m in model.named_modules()
        if isinstance(m, MoE) and m.last_expert_load is not None
    }


def load_imbalance(load: torch.Tensor) -> float:
    """max/mean of an expert-load vector: 1.0 is perfect balance, n_experts/top_k is total collapse."""
    load = load.float()
    return float(load.max() / load.mean().clamp_min(1e-9))
