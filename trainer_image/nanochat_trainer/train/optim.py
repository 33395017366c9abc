"""Optimizers and the learning-rate schedule.

Muon takes the 2-D hidden matrices of the blocks (`BatchedMuon`: torch's Muon batched by shape
and split over the ranks, whether DDP replicates the matrices or FSDP2 shards their rows), and,
in a second `BatchedMuon`, the stacked 3-D expert weights (E, out, in) of MoE layers, each
expert's matrix orthogonalised on its own; AdamW (fused) takes everything else: embeddings, the
head, norms and gains, routers and gates, the DeltaNet convolution.

    opts = build_optimizers(model, cfg.optimizer)
    for step in ...: set_lr(opts, lr_multiplier(step, cfg.steps, cfg.schedule))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from ..config import OptimizerConfig, ScheduleConfig

# 2-D weights that are not hidden matrices in Muon's sense: a 1-row gate or a router
# is a set of vectors, not a transform, so orthogonalising it is meaningless.
ADAMW_NAMES = ("router", "shared_expert_gate", "embed_tokens", "lm_head")


def uses_muon(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and name.startswith("layers.") and not any(n in name for n in ADAMW_NAMES)


def uses_batched_muon(name: str, p: torch.Tensor) -> bool:
    """The stacked routed-expert weights (moe.StackedLinear): one hidden matrix per expert."""
    return p.ndim == 3 and name.startswith("layers.") and ".experts." in name


def _newton_schulz_batched(
    g: torch.Tensor, coeffs: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz (same coefficients and normalisation; torch's runs
    in bf16) on each (..., m, n) matrix of a batch independently."""
    x = g.to(dtype=dtype, copy=True)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    # Per-matrix Frobenius norm, as torch's Muon divides each 2-D matrix by its own.
    x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))  # x is a copy
    if x.device.type == "cpu":
        # oneDNN's 2-D GEMMs beat its batched ones here (nano-125M's stacks: ~30% in bf16 on AMX,
        # one thread): one matrix at a time, as torch's Muon. A GPU takes the batch in one launch.
        x = torch.stack([_quintic(m, coeffs, steps) for m in x.unbind(0)])
    else:
        x = _quintic(x, coeffs, steps)
    return x.mT if tall else x


def _quintic(x: torch.Tensor, coeffs: tuple[float, float, float], steps: int) -> torch.Tensor:
    """`steps` quintic iterations X <- aX + (bA + cA^2)X, A = XX^T, of a matrix or a batch of them."""
    a, b, c = coeffs
    addmm = torch.addmm if x.ndim == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        gram_update = addmm(gram, gram, gram, beta=b, alpha=c)
        x = addmm(x, gram_update, x, beta=a)
    return x


class BatchedMuon(torch.optim.Optimizer):
    """Muon for matrices and stacks of matrices, orthogonalised in batches: the parameters of one
    shape go through one batched Newton-Schulz (nano-1B's 168 matrices are 4 batches), and under
    data parallelism each rank orthogonalises 1/world of every batch, the updates all-gathered.

    Per matrix it is exactly `torch.optim.Muon` (same defaults and parameter-group keys, so its
    checkpoints load): momentum buffer B = lerp(B, g, 1 - momentum), Nesterov update
    lerp(g, B, momentum), 5 quintic Newton-Schulz steps in `ns_dtype` (bf16 as torch's) after
    dividing by the matrix's Frobenius norm, decoupled weight decay, lr scaled by `adjust_lr_fn` of
    the matrix shape (m, n). A 3-D parameter (E, m, n) is E independent matrices (MoE experts).

    `split_over_ranks`: the parameters are replicated, with equal gradients, on every rank of the
    default process group (DDP), so the ranks can share the orthogonalisation: the momentum stays
    whole on every rank (checkpoints keep torch's layout), each rank runs Newton-Schulz on its
    contiguous 1/world of the batch and one all-gather hands every rank the whole update.

    FSDP2's parameters are DTensors sharded along dim 0. A stack's shard holds whole expert
    matrices: it is updated locally, with no communication. A matrix's shard is some of its rows,
    and Newton-Schulz needs the whole matrix: the momentum stays sharded (as torch's Muon keeps it,
    so checkpoints carry the same state), and the batch's Nesterov updates, in `ns_dtype`, go
    through `_RowShard.orthogonalise`: each rank receives 1/world of the matrices whole, in one
    all-to-all, and sends the results' rows back in another. torch's Muon on the DTensors instead
    runs every Newton-Schulz matmul as DTensor ops, a redistribution each, ~15 per matrix.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
        split_over_ranks: bool = False,
    ):
        if adjust_lr_fn not in (None, "original", "match_rms_adamw", "spectral_unclamped"):
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} is not supported")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults)
        # Not group keys: the groups are what a checkpoint stores; these are the machine's and the layout's.
        self.ns_dtype = ns_dtype
        self.split_over_ranks = split_over_ranks
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"BatchedMuon takes 2-D or 3-D parameters, not {tuple(p.shape)}")
                if split_over_ranks and isinstance(p, DTensor):
                    raise ValueError("split_over_ranks is for replicated parameters, not DTensors")
                _dim0_local(p)  # refuses a layout it cannot update
        # Per batch of parameters: the momentum buffers as one stacked tensor whose rows are the
        # state's buffers (views), so a step neither stacks nor scatters them. Rebuilt whenever
        # the state's buffers are other tensors (a fresh optimizer, load_state_dict).
        self._stacked: dict[tuple[int, ...], torch.Tensor] = {}

    @staticmethod
    def _adjust_lr(lr: float, fn: str | None, rows: int, cols: int) -> float:
        if fn is None or fn == "original":
            return lr * math.sqrt(max(1, rows / cols))
        if fn == "match_rms_adamw":
            return lr * 0.2 * math.sqrt(max(rows, cols))
        return lr * math.sqrt(rows / cols)  # spectral_unclamped

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            batches: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    batches.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for params in batches.values():
                self._step_batch(params, group)
        return loss

    def _step_batch(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """One Muon step of parameters of one shape: (K, *shape) stacks through every operation."""
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        rows, cols = params[0].shape[-2], params[0].shape[-1]
        local = [_dim0_local(p) for p in params]
        grads = torch.stack([_dim0_local(p.grad) for p in params])
        buf = self._momentum(params, grads)
        buf.lerp_(grads, 1 - mom)
        update = grads.lerp_(buf, mom) if group["nesterov"] else buf
        ns = functools.partial(
            _newton_schulz_batched,
            coeffs=group["ns_coefficients"],
            steps=group["ns_steps"],
            eps=group["eps"],
            dtype=self.ns_dtype,
        )
        rows_of = _RowShard.of(params[0])
        if rows_of is None:
            split = dist.group.WORLD if self.split_over_ranks and dist.is_initialized() else None
            matrices = update.reshape(-1, rows, cols)  # a 3-D parameter's experts are matrices of the batch
            ortho = self._orthogonalise(matrices, ns, split).reshape(update.shape)
        else:
            ortho = rows_of.orthogonalise(update.to(self.ns_dtype), rows, ns)
        # bf16 adds into fp32 as torch's
        torch._foreach_mul_(local, 1 - lr * wd)
        torch._foreach_add_(local, list(ortho.unbind(0)), alpha=-self._adjust_lr(lr, group["adjust_lr_fn"], rows, cols))

    def _orthogonalise(
        self, matrices: torch.Tensor, ns: Callable[[torch.Tensor], torch.Tensor], split: dist.ProcessGroup | None
    ) -> torch.Tensor:
        """`ns` of each matrix of the batch; with `split`, shared over that group's ranks, which all
        hold the same batch, and every rank gets every result."""
        world = dist.get_world_size(split) if split is not None else 1
        if world == 1:
            return ns(matrices)
        # Rank r orthogonalises matrices [r*per, (r+1)*per); the last ranks pad with zeros (the
        # Frobenius-norm clamp keeps a zero matrix zero) so every rank gathers equal pieces.
        n, per = matrices.size(0), -(-matrices.size(0) // world)
        mine = matrices[dist.get_rank(split) * per :][:per]
        piece = torch.zeros((per, *matrices.shape[1:]), dtype=self.ns_dtype, device=matrices.device)
        if len(mine):
            piece[: len(mine)] = ns(mine)
        gathered = torch.empty((per * world, *matrices.shape[1:]), dtype=self.ns_dtype, device=matrices.device)
        dist.all_gather_into_tensor(gathered, piece, group=split)
        return gathered[:n]

    def _momentum(self, params: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The batch's momentum buffers as one (K, *local shape) tensor that the state shares."""
        key = tuple(id(p) for p in params)
        stacked = self._stacked.get(key)
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        if stacked is not None and all(
            b is not None and _dim0_local(b).data_ptr() == row.data_ptr() for b, row in zip(bufs, stacked.unbind(0))
        ):
            return stacked
        stacked = torch.stack([torch.zeros_like(g) if b is None else _dim0_local(b) for b, g in zip(bufs, like)])
        for p, row in zip(params, stacked.unbind(0)):
            # A DTensor's buffer wraps the row, so checkpoints see the same sharded tensor as before.
            self.state[p]["momentum_buffer"] = _like_param(p, row)
        self._stacked[key] = stacked
        return stacked


def _dim0_local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor sharded along dim 0 only (else t): in-place updates of it
    update the DTensor. A stack's shard may be replicated too; a matrix's is FSDP2's, on one mesh
    dimension."""
    if not isinstance(t, DTensor):
        return t
    stack = t.ndim == 3 and all(pl.is_replicate() or pl == Shard(0) for pl in t.placements)
    rows = t.ndim == 2 and tuple(t.placements) == (Shard(0),)
    if not (stack or rows):
        raise ValueError(
            f"BatchedMuon: a sharded parameter must be a (E, out, in) stack sharded along dim 0 or a "
            f"matrix sharded by rows on one mesh dimension, not shape {tuple(t.shape)} with {t.placements}"
        )
    return t.to_local()


@dataclass(frozen=True)
class _RowShard:
    """Where a row-sharded matrix's local rows sit: torch.chunk's split, FSDP2's (ceil(rows/world)
    rows per rank, so the last ranks may hold fewer or none)."""

    group: dist.ProcessGroup
    world: int
    rank: int
    chunk: int
    size: int

    @classmethod
    def of(cls, p: torch.Tensor) -> _RowShard | None:
        if not (isinstance(p, DTensor) and p.ndim == 2):
            return None
        mesh = p.device_mesh
        world, rank, rows = mesh.size(), mesh.get_local_rank(), p.shape[0]
        chunk = -(-rows // world)
        start = min(rows, rank * chunk)
        size = min(rows, start + chunk) - start
        if p.to_local().shape[0] != size:
            raise ValueError(f"BatchedMuon: rank {rank} holds {p.to_local().shape[0]} of {rows} rows, not {size}")
        return cls(mesh.get_group(), world, rank, chunk, size)

    def orthogonalise(self, local: torch.Tensor, rows: int, ns: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`ns` of a batch of K row-sharded matrices, from and to this rank's (K, size, cols) rows.
        Matrix i belongs to rank i // per (per = ceil(K / world)): one all-to-all sends each owner
        every rank's rows of its matrices, the owner orthogonalises them whole, and a second
        all-to-all sends each rank its rows of the results. A rank moves twice its own rows and
        holds 1/world of the batch whole, where gathering the batch on every rank would move and
        hold it all."""
        k, cols = local.size(0), local.size(-1)
        world, chunk, per = self.world, self.chunk, -(-k // self.world)
        send = local.new_zeros((world * per, chunk, cols))
        send[:k, : self.size] = local
        got = torch.empty_like(send)
        dist.all_to_all_single(got, send, group=self.group)  # got[j]: rank j's rows of my matrices
        whole = got.view(world, per, chunk, cols).transpose(0, 1).reshape(per, world * chunk, cols)
        ortho = torch.zeros_like(whole)
        n_mine = max(0, min(per, k - self.rank * per))
        if n_mine:
            ortho[:n_mine, :rows] = ns(whole[:n_mine, :rows])
        back = torch.empty_like(send)
        dist.all_to_all_single(back, ortho.view(per, world, chunk, cols).transpose(0, 1).contiguous(), group=self.group)
        return back[:k, : self.size]


def _like_param(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` as the state of `p`: itself, or for a DTensor parameter a DTensor over it laid out as p."""
    if not isinstance(p, DTensor):
        return local
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def newton_schulz_dtype(params: list[torch.Tensor]) -> torch.dtype:
    """bf16, as torch's Muon and nanochat's (tensor cores, AMX); fp32 when every matrix is on a CPU
    that only emulates bf16 matmuls (no AVX512-BF16/AMX): there Newton-Schulz of a 256 x 1024
    matrix took 363 ms in bf16 and 7 ms in fp32 (on an AMX CPU: 3.3 ms and 5.7 ms)."""
    on_cpu = bool(params) and all(p.device.type == "cpu" for p in params)
    return torch.float32 if on_cpu and cpu_bf16_is_emulated() else torch.bfloat16


@functools.cache
def cpu_bf16_is_emulated() -> bool:
    """Whether this CPU lacks native bf16 matmuls (AVX512-BF16 or AMX), or torch is held below
    AVX512 (ATEN_CPU_CAPABILITY): then bf16 runs ~50x slower than fp32 instead of ~0.6x. Read from
    the hardware, not timed, so every rank of a run decides alike on the same machines."""
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return not (native and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def build_optimizers(model: nn.Module, cfg: OptimizerConfig) -> list[torch.optim.Optimizer]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if cfg.name == "muon" and uses_muon(n, p)]
    stacks = [p for n, p in named if cfg.name == "muon" and uses_batched_muon(n, p)]
    matrix_ids = {id(p) for p in matrices + stacks}
    rest = [p for _, p in named if id(p) not in matrix_ids]
    adam_groups = [{"params": rest, "lr": cfg.adam_lr}]
    if cfg.name == "adamw":
        # Plain AdamW everywhere: the hidden matrices (experts' too) keep their own (larger) rate.
        hidden = {id(p) for n, p in named if uses_muon(n, p) or uses_batched_muon(n, p)}
        adam_groups = [
            {"params": [p for _, p in named if id(p) in hidden], "lr": cfg.lr},
            {"params": [p for _, p in named if id(p) not in hidden], "lr": cfg.adam_lr},
        ]
    adam_params = [p for g in adam_groups for p in g["params"]]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(
            [g for g in adam_groups if g["params"]],
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
            eps=1e-10,
            # One kernel for every parameter (CPU and CUDA); FSDP2's DTensors take torch's default.
            fused=not any(isinstance(p, DTensor) for p in adam_params),
        )
    ]
    # "original" scales the update by sqrt(max(1, rows/cols)), Keller Jordan's Muon, for which lr 0.02 is tuned.
    muon = {
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "nesterov": True,
        "weight_decay": cfg.weight_decay,
        "adjust_lr_fn": "original",
    }
    ns_dtype = newton_schulz_dtype(matrices + stacks)
    if matrices:
        # Plain tensors in a process group are DDP's replicas: the ranks share the orthogonalisation.
        # FSDP2's row shards (DTensors) always share it, over their mesh.
        fsdp = any(isinstance(p, DTensor) for p in matrices)
        split = dist.is_initialized() and dist.get_world_size() > 1 and not fsdp
        opts.append(BatchedMuon(matrices, **muon, ns_dtype=ns_dtype, split_over_ranks=split))
    if stacks:
        # Expert weights: the same Muon per expert matrix (lr scaled by that matrix's shape). Not split:
        # under expert parallelism each rank holds other experts.
        opts.append(BatchedMuon(stacks, **muon, ns_dtype=ns_dtype))
    for opt in opts:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return opts


def lr_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Linear warmup to 1, then cosine / WSD / constant down to min_lr_ratio at `total`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.decay == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = total - int(cfg.wsd_decay_frac * total)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, total - decay_start)
    return 1.0 - (1 - floor) * min(1.0, progress)


def set_lr(opts: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
