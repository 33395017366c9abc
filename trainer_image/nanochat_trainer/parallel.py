"""Data parallelism for the trainer: DDP or FSDP2, with or without expert parallelism.

    rank, world, device = setup_distributed(cfg.device)                  # torchrun's env, or one process
    with torch.device("meta"): model = GPT(cfg.model)                    # nothing allocated yet
    ep = expert_parallel.setup_expert_parallel(model, cfg, world, rank)   # None unless expert_parallel > 1
    model.to_empty(device=device); model.init_weights(cfg.seed)         # this rank's experts only
    wrapped = wrap_model(model, cfg, device, world, ep)                  # forward/backward through this
    opts = build_optimizers(model, cfg.optimizer)                        # on the (now sharded) model
    msd, osds = full_state(model, opts, ep)                              # unsharded, for checkpoints

FSDP2 (`fully_shard`, one unit per block plus the root) is used from 0.9B parameters or with
`parallel: fsdp`; DDP otherwise. Under expert parallelism the dense weights follow the same
rule, while the experts, already split over the EP group, are handled apart:

* DDP + EP: DDP ignores the expert weights; `expert_parallel.reduce_expert_grads` reduces them.
* FSDP2 + EP with replicas (world = ep x dp, dp > 1): each MoE layer's `Experts` is an FSDP
  unit of its own on the replica mesh (ranks s, s+ep, ...), sharded along the expert dim.
  FSDP2 averages its gradients over the replicas and reduce_expert_grads divides by ep,
  giving the sum over the replicas divided by the world size, as expert_parallel requires
  (FSDP2's own divide factor would do it in one go, but needs PREMUL_SUM, which gloo lacks).
  The block's unit (on the whole world) skips those weights, as FSDP2 does for nested units.
* FSDP2 + EP without replicas (ep == world): every rank holds different experts, there is
  nothing to shard them over; FSDP2 ignores them (`ignored_params`) and reduce_expert_grads
  divides their gradient by the world size.

Per-expert Muon (`optim.BatchedMuon`) stays exact under FSDP2: a dim-0 shard of a (E, out,
in) stack holds whole expert matrices.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import FSDP_FROM_PARAMS, TrainerConfig
from .model import GPT, count_params


def setup_distributed(device_kind: str) -> tuple[int, int, torch.device]:
    """(rank, world, device); starts the process group when torchrun's env is present."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def uses_fsdp(cfg: TrainerConfig, world: int) -> bool:
    n_params = count_params(cfg.model)["total"]
    return world > 1 and (cfg.parallel == "fsdp" or (cfg.parallel == "auto" and n_params >= FSDP_FROM_PARAMS))


def shard_fsdp(model: GPT, device: torch.device, ep=None) -> None:
    """fully_shard each block, then the root, in place. `ep`: the expert-parallel layout of
    `model` (None for a model whose experts are whole, e.g. a frozen parent)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .expert_parallel import expert_params
    from .moe import Experts

    world_mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored: set[nn.Parameter] | None = None
    replicas = None
    if ep is not None and ep.dp == 1:
        ignored = set(expert_params(model))
    elif ep is not None:
        replicas = DeviceMesh.from_group(ep.dp_group, device.type)
    for block in model.layers:
        if replicas is not None:
            for experts in (m for m in block.modules() if isinstance(m, Experts)):
                fully_shard(experts, mesh=replicas)
        fully_shard(block, mesh=world_mesh, ignored_params=ignored)
    fully_shard(model, mesh=world_mesh, ignored_params=ignored)
    if ep is not None:
        ep.fsdp = True


def wrap_model(model: GPT, cfg: TrainerConfig, device: torch.device, world: int, ep=None) -> nn.Module:
    """Parallelism and compilation, applied in torchtitan's order: shard, then compile.
    `ep`: the expert-parallel layout; see the module docstring for how experts are reduced."""
    model.activation_checkpointing = cfg.activation_checkpointing
    if world > 1 and cfg.model.moe is not None and cfg.model.moe.balance_scope == "global":
        from .moe import MoE

        for m in model.modules():
            if isinstance(m, MoE):
                m.balance_group = dist.group.WORLD
    use_fsdp = uses_fsdp(cfg, world)
    if use_fsdp:
        shard_fsdp(model, device, ep)
    if cfg.compile:
        model = torch.compile(model)
    if world > 1 and not use_fsdp:
        from torch.nn.parallel import DistributedDataParallel

        if ep is not None:
            from .expert_parallel import ddp_ignore_experts

            ddp_ignore_experts(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def full_state(model: nn.Module, opts, ep=None) -> tuple[dict, list[dict]]:
    """Unsharded model and optimizer state on CPU (plain, DDP and FSDP2 modules, EP experts
    gathered to all E). Collective: every rank calls it; under FSDP2 only rank 0's dicts are filled."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from .expert_parallel import gather_full_state

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    osds = [get_optimizer_state_dict(model, opt, options=options) for opt in opts]
    gather_full_state(model, opts, msd, osds, ep)
    return msd, osds


def load_full_state(model: nn.Module, opts, msd: dict, osds: list[dict] | None, ep=None) -> None:
    """The inverse of full_state, on every rank (each reads the whole checkpoint and keeps its part).
    `osds` None loads the weights only."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from .expert_parallel import shard_full_state

    shard_full_state(model, msd, osds, ep)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, msd, options=options)
    for opt, osd in zip(opts, osds or []):
        set_optimizer_state_dict(model, opt, osd, options=options)


def unsharded(model: GPT, cfg: TrainerConfig, world: int, ep, is_main: bool) -> GPT | None:
    """The model whose weights go to final/: `model` itself when it holds all its weights; under
    FSDP2 (DTensor shards, which safetensors cannot write) or EP (a slice of the experts) a CPU
    model on rank 0 (None elsewhere) whose parameters are the gathered full state's tensors
    themselves, not a copy. Collective."""
    if ep is None and not uses_fsdp(cfg, world):
        return model
    msd, _ = full_state(model, [], ep)
    if not is_main:
        return None
    from .hf_adapter import model_from_state_dict

    whole = model_from_state_dict(msd, cfg.model, ternary=cfg.ternary if cfg.stage == "ternary" else None)
    return whole.eval()
