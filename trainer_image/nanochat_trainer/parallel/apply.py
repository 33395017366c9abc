"""Parallelism applied to a built model, in one documented order (torchtitan's):

    env = setup_distributed(cfg.device)                                  # distributed.py
    with torch.device("meta"): model = GPT(cfg.model)                    # nothing allocated yet
    ep = setup_expert_parallel(model, cfg, env.world, env.rank)          # experts cut to this rank's slice
    model.to_empty(device=env.device); model.init_weights(cfg.seed)      # this rank's experts only
    wrapped = wrap_model(model, cfg, env, ep)                            # forward/backward through this
    opts = build_optimizers(model, cfg.optimizer)                        # on the (now sharded) model

`wrap_model` then does, in this order:

0. FP8 matmuls (`fp8: true`): the hidden linear layers become `models.fp8.Float8Linear`, sharing
   their weights, before anything wraps them (where the device has no FP8 tensor cores the run
   trains in bf16 and says so);
1. global-batch load balancing: every MoE block sums its expert loads over the ranks
   (`moe.balance_scope: global`);
2. activation checkpointing (`activation_checkpointing: true`): each block's forward is recomputed
   in the backward pass (torch's composable, non-reentrant `checkpoint`, which keeps parameter
   names); the recompute runs inside `models.layers.Recompute`, so the MoE load counters count
   each forward once;
3. FSDP2 (`fully_shard`, one unit per block plus the root) from 0.9B parameters or with
   `parallel: fsdp`; under expert parallelism the experts, already split over the EP group, are
   handled apart:
   * FSDP2 + EP with replicas (world = ep x dp, dp > 1): each MoE layer's `Experts` is an FSDP
     unit of its own on the replica mesh (ranks s, s+ep, ...), sharded along the expert dim.
     FSDP2 averages its gradients over the replicas and `reduce_expert_grads` divides by ep,
     giving the sum over the replicas divided by the world size, as expert parallelism requires
     (FSDP2's own divide factor would do it in one go, but needs PREMUL_SUM, which gloo lacks).
     The block's unit (on the whole world) skips those weights, as FSDP2 does for nested units.
   * FSDP2 + EP without replicas (ep == world): every rank holds different experts, there is
     nothing to shard them over; FSDP2 ignores them and `reduce_expert_grads` divides their
     gradient by the world size.
4. `torch.compile` (`compiles`: `compile: true`, or unset on CUDA for a dense model);
5. DDP otherwise (world > 1): the expert weights are left out of DDP and reduced by
   `reduce_expert_grads`.

Muon (`train.optim.BatchedMuon`) stays exact under FSDP2: a dim-0 shard of a (E, out, in) stack
holds whole expert matrices, and a hidden matrix's row shards are gathered whole to be
orthogonalised.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..config import FSDP_FROM_PARAMS, TrainerConfig
from ..models.fp8 import fp8_unsupported, to_float8
from ..models.gpt import GPT, count_params
from ..models.layers import Recompute, warn_fallback
from ..models.moe import Experts, MoE
from .distributed import Env
from .expert_parallel import ExpertParallel, ddp_ignore_experts, expert_params


def compiles(cfg: TrainerConfig, env: Env) -> bool:
    """Whether the model is compiled: `compile` when set; unset, on CUDA for a dense model. nanochat
    always compiles; our MoE (data-dependent expert splits) and hybrid (FLA's Triton kernels)
    forwards have not yet been compiled on a GPU (`make gpu-check` compiles the dense presets), so
    they stay eager there unless asked, and the run says so."""
    if cfg.compile is not None:
        return cfg.compile
    dense = cfg.model.moe is None and cfg.model.hybrid is None
    if env.device.type == "cuda" and not dense and env.is_main:
        print("compile unset: an MoE or hybrid model runs eager (set compile: true to compile it)", flush=True)
    return env.device.type == "cuda" and dense


def apply_fp8(model: GPT, cfg: TrainerConfig, env: Env) -> list[str]:
    """With `fp8: true`, the linear layers of `model` that multiply in float8 from now on (swapped in
    place); none where the device cannot, with a warning naming why."""
    if not cfg.fp8:
        return []
    reason = fp8_unsupported(env.device)
    if reason is not None:
        warn_fallback(f"fp8: true ignored, the matmuls keep the run's dtype: {reason}")
        return []
    if env.device.type == "cpu":
        warn_fallback("fp8 on a CPU: torch's reference float8 GEMM is exact but ~1000x slower than bf16")
    names = to_float8(model)
    if env.is_main:
        print(f"fp8: {len(names)} linear layers multiply in float8 (output layer and routers stay bf16)", flush=True)
    return names


def uses_fsdp(cfg: TrainerConfig, world: int) -> bool:
    n_params = count_params(cfg.model)["total"]
    return world > 1 and (cfg.parallel == "fsdp" or (cfg.parallel == "auto" and n_params >= FSDP_FROM_PARAMS))


def global_balancing(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Every MoE block of `model` (or `model` itself) balances its experts over the loads of all
    ranks of `group` (default: the world), summed in one all-reduce per block and micro-step."""
    reduce = functools.partial(dist.all_reduce, group=group or dist.group.WORLD)
    for m in model.modules():
        if isinstance(m, MoE):
            m.reduce_loads = reduce


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block in the backward pass: activations of one block instead of all, for
    about a third more compute. Non-reentrant, so it works under FSDP2 (its hooks see the
    recompute as part of the backward) and tensors made inside a block, such as the MoE aux
    loss, carry gradient."""
    for block in model.layers:
        checkpoint(block, context_fn=lambda: (nullcontext(), Recompute()))


def shard_fsdp(model: GPT, device: torch.device, ep: ExpertParallel | None = None) -> None:
    """fully_shard each block, then the root, in place. `ep`: the expert-parallel layout of
    `model` (None for a model whose experts are whole, e.g. a frozen parent)."""
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


def wrap_model(model: GPT, cfg: TrainerConfig, env: Env, ep: ExpertParallel | None = None) -> nn.Module:
    """FP8, balancing, activation checkpointing, FSDP2, compile and DDP, in the module docstring's
    order; returns what forward and backward go through (`model` itself changes in place)."""
    apply_fp8(model, cfg, env)
    if env.world > 1 and cfg.model.moe is not None and cfg.model.moe.balance_scope == "global":
        global_balancing(model)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    use_fsdp = uses_fsdp(cfg, env.world)
    if use_fsdp:
        shard_fsdp(model, env.device, ep)
    wrapped: nn.Module = torch.compile(model) if compiles(cfg, env) else model
    if env.world > 1 and not use_fsdp:
        if ep is not None:
            ddp_ignore_experts(wrapped)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)
    return wrapped
