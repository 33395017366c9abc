"""Expert parallelism (EP) for the MoE blocks of `models/moe.py`.

With `expert_parallel: ep` the world splits into groups of `ep` consecutive ranks (put
them inside one node). Each rank of a group holds a contiguous slice of n_experts/ep
experts of every MoE layer (rank r: experts [s*E/ep, (s+1)*E/ep) with s = r % ep); all
other weights (attention, router, shared expert, norms, embeddings) stay replicated and
are averaged by DDP as before. Ranks with the same s (one per group) hold the same slice;
they are the expert shard's data-parallel replicas.

Forward of one MoE layer on each rank of an EP group (`shard_experts` hands every
`models.moe.Experts` an `AllToAllDispatch`, which its forward calls):

    route locally, sort (token, slot) pairs by expert      (as without EP)
    all_to_all counts         every rank learns how many rows it gets per local expert
    all_to_all rows           rows go to the rank holding their expert (variable splits)
    regroup by local expert, run them (grouped mm or loop: moe.Experts.compute)
    all_to_all results back   the reverse exchange
    weight by the router and scatter-add into the tokens       (as without EP)

Both row exchanges are autograd-aware (`all_to_all`: its backward is the reverse
exchange), so a rank's expert weights receive the gradient of every token routed to
them from the whole EP group. gloo (CPU) supports `all_to_all_single` with uneven
splits in this torch, so the same code runs on gloo and NCCL.

Gradients. The dense gradients are averaged over the world (by DDP, or reduce-scattered
by FSDP2). An expert slice's local gradient is already the sum over its EP group's
micro-batches; it must be summed over the slice's replicas and divided by the world size,
giving the same average a single process would compute on the global batch. Under DDP the
experts are left out of DDP (`ddp_ignore_experts`) and `reduce_expert_grads` does that
reduction; under FSDP2 (`apply.shard_fsdp`) each MoE layer's experts are their own FSDP
unit sharded over the replicas (dim 0, so every expert matrix stays whole on one rank),
which averages them over the replicas, and `reduce_expert_grads` divides by ep; with no
replicas (ep == world) FSDP ignores them and `reduce_expert_grads` does it all. The
gradient norm counts every expert once (`clip_grad_norm_`).

    ep = setup_expert_parallel(model, cfg, world, rank)       # before DDP/FSDP and optimizers
    wrapped = apply.wrap_model(model, cfg, env, ep)
    ... loss.backward() ...
    reduce_expert_grads(model, ep); clip_grad_norm_(model, max_norm, ep); opt.step()

Checkpoints: step checkpoints see a rank's slice as its rows of the whole (E, ...) tensor
(`ExpertParallel.mesh`, `parallel/state.py`), so each rank writes its own experts and a run
resumes on another EP size. `gather_full_state` (collective) / `shard_full_state` (local) turn
the expert entries of model and optimizer state dicts into full (E, ...) tensors and back, for
final/ and for checkpoints written whole by earlier versions.

Every forward is collective: all ranks of an EP group must run the same number of MoE
forwards (no rank-0-only evaluation or generation with a sharded model).

Not covered: overlap of the exchanges with compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..config import TrainerConfig
from ..models.moe import Experts


@dataclass
class ExpertParallel:
    """The layout of one rank: its EP group and the replicas of its expert slice."""

    ep: int  # ranks that split the experts
    dp: int  # replicas of each expert slice (world // ep)
    world: int
    rank: int
    shard: int  # this rank's slice index, rank % ep
    ep_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup | None  # None when dp == 1
    fsdp: bool = False  # set by apply.shard_fsdp: dense weights (and experts when dp > 1) are FSDP2 shards
    _mesh: DeviceMesh | None = field(default=None, repr=False)

    def mesh(self) -> DeviceMesh:
        """The (ep, replica) device mesh of the whole world, made on first use (collective: every
        rank's first call must be the same one). Rank r holds slice r % ep of replica r // ep, so
        mesh[s, i] = i * ep + s: an (E, ...) expert tensor is cut into `ep` slices first and each
        slice then into its FSDP2 shards over the replicas, the order the layout cuts it in."""
        if self._mesh is None:
            ranks = torch.arange(self.world).reshape(self.dp, self.ep).T
            device = "cuda" if dist.get_backend(self.ep_group) == "nccl" else "cpu"
            self._mesh = DeviceMesh(device, ranks, mesh_dim_names=("ep", "replica"))
        return self._mesh


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        g = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(g, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return g, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Send x's rows in chunks of in_splits to the group's ranks; receive out_splits rows from each."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatch:
    """`models.moe.TokenDispatch` under EP: the sorted rows go to the ranks of `group` holding their
    experts, run there, and come back in x_sorted's order."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, experts: Experts, x_sorted: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
        """x_sorted: (S, dim) rows sorted by global expert id; counts: (E,) rows per global expert."""
        group = self.group
        ep = dist.get_world_size(group)
        n_local = experts.held
        # Experts are contiguous per rank, so sorting by expert also sorts by destination rank.
        send_counts = counts.reshape(ep, n_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)  # (src rank, local expert)
        in_splits = send_counts.sum(1).tolist()
        recv_counts_host = recv_counts.tolist()  # one host sync for both exchanges' sizes
        out_splits = [sum(row) for row in recv_counts_host]
        recv = all_to_all(x_sorted, out_splits, in_splits, group)
        # recv is grouped by source rank, then local expert: regroup by local expert.
        local_id = torch.arange(n_local, device=recv.device).repeat(ep)
        local_id = local_id.repeat_interleave(recv_counts.reshape(-1), output_size=recv.shape[0])
        perm = torch.argsort(local_id, stable=True)
        y = experts.compute(recv[perm], recv_counts.sum(0), impl)
        y = y[torch.argsort(perm)]
        return all_to_all(y, in_splits, out_splits, group)


def _moe_experts(model: nn.Module) -> Iterator[Experts]:
    for m in model.modules():
        if isinstance(m, Experts):
            yield m


def _sharded(experts: Experts) -> bool:
    return isinstance(experts.dispatch, AllToAllDispatch)


def _expert_weights(experts: nn.Module) -> list[nn.Parameter]:
    return [experts.gate_proj.weight, experts.up_proj.weight, experts.down_proj.weight]


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The live weights of the sharded experts (looked up through the modules, since FSDP2
    replaces Parameter objects when it shards them)."""
    return [p for experts in _moe_experts(model) if _sharded(experts) for p in _expert_weights(experts)]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP2 DTensor, else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _ep_slice(t: torch.Tensor) -> torch.Tensor:
    """The whole of this rank's expert slice: an FSDP2 DTensor is gathered over the replicas (collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def shard_experts(model: nn.Module, ep_group, shard: int | None = None) -> int:
    """Keep only this rank's slice of every MoE layer's experts, in place; returns the layers sharded.

    shard: the slice index (default: this rank's index in ep_group). Call before building
    optimizers and before DDP; the model must hold all experts (any device).
    """
    ep = dist.get_world_size(ep_group)
    if shard is None:
        shard = dist.get_rank(ep_group)
    n = 0
    for experts in _moe_experts(model):
        if _sharded(experts):
            raise ValueError("shard_experts: the experts are already sharded")
        e = experts.gate_proj.weight.shape[0]
        if e % ep:
            raise ValueError(f"expert_parallel={ep} does not divide model.moe.n_experts={e}")
        per = e // ep
        for p in _expert_weights(experts):
            p.data = p.data[shard * per : (shard + 1) * per].clone()
        experts.first_expert, experts.dispatch = shard * per, AllToAllDispatch(ep_group)
        n += 1
    return n


def setup_expert_parallel(model: nn.Module, cfg: TrainerConfig, world: int, rank: int) -> ExpertParallel | None:
    """Make the EP and replica groups and shard the experts, per `cfg.expert_parallel`.

    Every rank must call it (process groups are created collectively) after the process
    group is up, after weights are initialised / loaded in full, and before DDP and the
    optimizers are built. Returns None when expert_parallel is 1.
    """
    ep = cfg.expert_parallel
    if ep == 1:
        return None
    if cfg.model.moe is None:
        raise ValueError(f"expert_parallel={ep} needs an MoE model (model.moe)")
    if cfg.model.moe.n_experts % ep:
        raise ValueError(f"expert_parallel={ep} does not divide model.moe.n_experts={cfg.model.moe.n_experts}")
    if world % ep:
        raise ValueError(f"expert_parallel={ep} does not divide the world size {world} (ranks of the run)")
    if not dist.is_initialized():
        raise RuntimeError("setup_expert_parallel needs the process group (torchrun)")
    dp = world // ep
    ep_group = dp_group = None
    # new_group is collective: every rank creates every group, in the same order. A
    # separate group even when ep == world, so the exchanges never queue behind DDP's
    # all-reduces on the default group.
    for i in range(dp):
        g = dist.new_group(list(range(i * ep, (i + 1) * ep)))
        if rank // ep == i:
            ep_group = g
    if dp > 1:
        for s in range(ep):
            g = dist.new_group(list(range(s, world, ep)))
            if rank % ep == s:
                dp_group = g
    shard_experts(model, ep_group, rank % ep)
    return ExpertParallel(ep=ep, dp=dp, world=world, rank=rank, shard=rank % ep, ep_group=ep_group, dp_group=dp_group)


def ddp_ignore_experts(module: nn.Module) -> list[str]:
    """Tell DDP to leave the sharded expert weights alone; call on the module about to be wrapped.
    Returns their names (as `module` spells them, e.g. with a compile prefix)."""
    ids = {id(p) for p in expert_params(module)}
    names = [n for n, p in module.named_parameters() if id(p) in ids]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, ep: ExpertParallel) -> None:
    """After the last backward of a step: expert grads := sum over the slice's replicas / world.

    That is the world-mean gradient DDP gives the dense weights, for each expert. Experts that
    FSDP2 shards (DTensors) were already averaged over the replicas by FSDP: divided by ep here.
    """
    for p in expert_params(model):
        if isinstance(p, DTensor):
            if p.grad is not None:
                _local(p.grad).div_(ep.ep)
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if ep.dp_group is not None:
            dist.all_reduce(p.grad, group=ep.dp_group)
        p.grad.div_(ep.world)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, ep: ExpertParallel | None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole (unsharded) model, the same norm and clip
    factor on every rank. Under DDP the dense gradients are replicated (counted once) and the
    expert slices' squared norms are summed over the EP group; under FSDP2 every element of
    every gradient lives on exactly one rank, so the squared norms are summed over the world."""
    params = [p for p in model.parameters() if p.grad is not None]
    if ep is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    ids = {id(p) for p in expert_params(model)}
    device = _local(params[0].grad).device if params else torch.device("cpu")
    zero = torch.zeros((), device=device, dtype=torch.float32)
    dense_sq = sum((_local(p.grad).float().pow(2).sum() for p in params if id(p) not in ids), zero)
    expert_sq = sum((_local(p.grad).float().pow(2).sum() for p in params if id(p) in ids), zero.clone())
    if ep.fsdp:
        total_sq = dense_sq + expert_sq
        dist.all_reduce(total_sq)
    else:
        dist.all_reduce(expert_sq, group=ep.ep_group)
        total_sq = dense_sq + expert_sq
    total = total_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        _local(p.grad).mul_(coef.to(p.grad.dtype))
    return total


def _gather_rows(t: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(ep.ep)]
    dist.all_gather(parts, t.contiguous(), group=ep.ep_group)
    return torch.cat(parts)


def _expert_fqns(model: nn.Module) -> dict[str, torch.Size]:  # this rank's slice shapes (whole, not FSDP shards)
    ids = {id(p) for p in expert_params(model)}
    return {n: p.shape for n, p in model.named_parameters() if id(p) in ids}


def _dev_of(ep: ExpertParallel) -> torch.device:
    # NCCL gathers CUDA tensors only; gloo CPU ones.
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(ep.ep_group) == "nccl"
        else torch.device("cpu")
    )


@torch.no_grad()
def gather_full_state(
    model: nn.Module, opts: list[torch.optim.Optimizer], msd: dict, osds: list[dict] | None, ep: ExpertParallel | None
) -> None:
    """In place: the expert entries of a model state dict and of optimizer state dicts (keyed by
    parameter name, as torch.distributed.checkpoint.state_dict writes them) become full (E, ...)
    tensors. Collective over the EP group: every rank must call it, also the ranks whose dicts
    are empty (full_state_dict with cpu_offload fills rank 0's only); the slices come from the
    live parameters and optimizer states (FSDP2 shards gathered over the replicas first), not
    from the dicts. A no-op without EP."""
    if ep is None:
        return
    dev = _dev_of(ep)
    ids = {id(p) for p in expert_params(model)}
    for name, p in model.named_parameters():
        if id(p) not in ids:
            continue
        full = _gather_rows(_ep_slice(p.detach()).to(dev), ep)
        if name in msd:
            msd[name] = full.to(msd[name].device)
        for i, opt in enumerate(opts):
            state = opt.state.get(p, {})
            for key in sorted(state):
                val = state[key]
                if not (isinstance(val, torch.Tensor) and val.shape == p.shape):
                    continue  # e.g. AdamW's scalar step
                full = _gather_rows(_ep_slice(val.detach()).to(dev), ep)
                saved = osds[i].get("state", {}).get(name) if osds is not None and i < len(osds) else None
                if saved is not None and key in saved:
                    saved[key] = full.to(saved[key].device)


@torch.no_grad()
def shard_full_state(model: nn.Module, msd: dict, osds: list[dict] | None, ep: ExpertParallel | None) -> None:
    """In place: the inverse of gather_full_state, keeping this rank's slice (no communication)."""
    if ep is None:
        return
    for name, shape in _expert_fqns(model).items():
        per = shape[0]
        rows = slice(ep.shard * per, (ep.shard + 1) * per)
        if name in msd and msd[name].shape[0] == per * ep.ep:
            msd[name] = msd[name][rows].clone()
        for osd in osds or []:
            state = osd.get("state", {}).get(name)
            for key, val in (state or {}).items():
                if (
                    isinstance(val, torch.Tensor)
                    and val.ndim == len(shape)
                    and val.shape[0] == per * ep.ep
                    and val.shape[1:] == shape[1:]
                ):
                    state[key] = val[rows].clone()
