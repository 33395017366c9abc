"""Model and optimizer state whatever the layout: sharded for checkpoints and final/, whole to evaluate.

    save_sharded(model, opts, ep, step_dir)            # collective: each rank writes its own shards
    group = checkpoint_group()                         # collective, once: the async writes' own gloo group
    written = start_save_sharded(model, opts, ep, step_dir, group)   # staged; written in a thread (a Future)
    load_sharded(model, opts, ep, step_dir)            # collective: each rank reads what it holds
    whole = unsharded(model, cfg, env, ep)             # the whole model on rank 0 (in-training evaluation)
    msd, osds = full_state(model, opts, ep)            # collective; rank 0's dicts are complete
    load_full_state(model, opts, msd, osds, ep)        # checkpoints of earlier versions (whole files)

Step checkpoints are `torch.distributed.checkpoint` (DCP) directories: every tensor is stored
under its name in the whole model with its global shape, each rank writing the pieces it holds
(a replicated tensor is written once, DCP spreading them over the ranks), so no rank gathers the
model and a run resumes on another world size or layout (DDP, FSDP2, expert parallelism), DCP
cutting each stored tensor to what the reading rank holds. FSDP2's shards are DTensors already;
an expert parallel rank's slice of the experts is presented as a DTensor on the (ep, replica)
mesh (`ExpertParallel.mesh`), which says where its rows go.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..config import TrainerConfig
from ..models.gpt import GPT
from ..models.hf_adapter import model_from_state_dict
from .apply import uses_fsdp
from .distributed import Env
from .expert_parallel import ExpertParallel, expert_params, gather_full_state, shard_full_state

# Optimizer state keyed "state.<param>.<key>" and "param_groups.<param>.<key>": stored per
# parameter, so it reshards like the weights and does not depend on how groups are numbered.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
# The group keys the run's config sets (optim.build_optimizers): a resumed run takes them from its
# config, so a changed learning rate or weight decay applies; the checkpoint gives the moments.
_CONFIG_KEYS = ("lr", "initial_lr", "weight_decay", "betas", "momentum", "eps")
_ONE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"


def checkpoint_group() -> dist.ProcessGroup | None:
    """A gloo group of every rank for the asynchronous writes' collectives, apart from the training
    loop's (NCCL on GPU, or gloo in use by the main thread); None in one process. Collective: every
    rank calls it once, in the same order among its other new_group calls."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def save_sharded(model: nn.Module, opts: list[torch.optim.Optimizer], ep: ExpertParallel | None, path: Path) -> None:
    """Write this rank's shards of the model and optimizer state into the DCP directory `path`
    (shared by all ranks; DCP fsyncs every file). Collective."""
    state, _ = _sharded_state(model, opts, ep)
    with _one_process_ok():
        dcp.save(state, checkpoint_id=path, no_dist=not dist.is_initialized())


def start_save_sharded(
    model: nn.Module,
    opts: list[torch.optim.Optimizer],
    ep: ExpertParallel | None,
    path: Path,
    group: dist.ProcessGroup | None,
) -> Future:
    """`save_sharded` asynchronously: returns once this rank's state is copied to host memory (the
    training may go on changing it), the write going on in a thread whose collectives use `group`
    (`checkpoint_group`). The future's result is DCP's metadata, set on every rank once all of them
    have written their shards and rank 0 the `.metadata` (DCP gathers every rank's write results
    first). Collective, over `group`, from the thread."""
    state, _ = _sharded_state(model, opts, ep)
    if group is None:
        # The writing thread's dcp.save warns that one process is one process; the filter is the
        # process's (catch_warnings here would not cover that thread), limited to that message.
        warnings.filterwarnings("ignore", message=_ONE_PROCESS)
    # Staged before async_save returns; a thread writes from that copy, mostly in file I/O, which
    # releases the GIL. A process executor (spawned, with a process group of its own, the staged
    # state pickled to it through a pipe) would copy the state once more, and start a process per save.
    return dcp.async_save(
        state, checkpoint_id=path, process_group=group, no_dist=group is None, async_stager=_HostCopy()
    )


class _HostCopy(AsyncStager):
    """Stages a state dict synchronously as a host copy of each of its tensors (of a DTensor: its
    local shard, under the same placements). Not DCP's DefaultStager: it copies whole storages and,
    in torch 2.15, fails on a DTensor over a view with a storage offset (its data_ptr() is then the
    offset, not 0, so the stager reads a storage the wrapper does not have): the expert parallel
    view of a momentum buffer that is a row of a stacked one."""

    _synchronize_after_execute = False  # stage() returns the copy: nothing left to wait for

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return _host_copy(state_dict, {})

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _host_copy(obj: Any, copied: dict[tuple, torch.Tensor]) -> Any:
    """`obj` with every tensor copied to host memory, each view once: tied weights (two tensors of
    one storage in the model's state dict) are copied once, and stay tied in the copy."""
    if isinstance(obj, dict):
        return {k: _host_copy(v, copied) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_host_copy(v, copied) for v in obj)
    if not isinstance(obj, torch.Tensor):
        return copy.deepcopy(obj)
    local = obj.to_local() if isinstance(obj, DTensor) else obj
    key = (
        local.device,
        local.dtype,
        local.untyped_storage().data_ptr(),
        local.storage_offset(),
        local.shape,
        local.stride(),
    )
    if key not in copied:
        copied[key] = local.detach().to("cpu", copy=True)
    if not isinstance(obj, DTensor):
        return copied[key]
    return DTensor.from_local(
        copied[key], obj.device_mesh, obj.placements, run_check=False, shape=obj.shape, stride=obj.stride()
    )


def load_sharded(model: nn.Module, opts: list[torch.optim.Optimizer], ep: ExpertParallel | None, path: Path) -> None:
    """Read from the DCP directory `path` what this rank holds of the model and of `opts`' state,
    whatever layout wrote it. `opts` empty reads the weights alone. Collective."""
    state, unwrap = _sharded_state(model, opts, ep)
    with _one_process_ok():  # in place: into the parameters and optimizer states themselves
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    unwrap()
    set_model_state_dict(model, state["model"])
    for i, opt in enumerate(opts):
        _load_optimizer(model, opt, state["optimizers"][str(i)], _FLAT)


@contextmanager
def _one_process_ok() -> Iterator[None]:
    """DCP warns on every call outside a process group; one process is a layout like any other."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS)
        yield


def _sharded_state(
    model: nn.Module, opts: list[torch.optim.Optimizer], ep: ExpertParallel | None
) -> tuple[dict[str, Any], Callable[[], None]]:
    """{"model": ..., "optimizers": {"0": ..., ...}}: this rank's tensors, named and shaped as in
    the whole model, and a function that puts the tensors the layout holds back in place of the
    expert views made for DCP. The optimizers' states are created (a zero step) when still empty."""
    msd = get_model_state_dict(model)
    osds = {str(i): get_optimizer_state_dict(model, opt, options=_FLAT) for i, opt in enumerate(opts)}
    state = {"model": msd, "optimizers": osds}
    if ep is None:
        return state, lambda: None
    mesh = ep.mesh()
    names = {id(p) for p in expert_params(model)}
    experts = {n: p.shape for n, p in model.named_parameters() if id(p) in names}
    held: list[tuple[dict[str, Any], str, torch.Tensor]] = []

    def wrap(d: dict[str, Any], key: str, slice_shape: torch.Size) -> None:
        t = d[key]
        if isinstance(t, torch.Tensor) and t.shape == slice_shape:
            held.append((d, key, t))
            d[key] = _whole_experts(t, ep, mesh)

    for name, shape in experts.items():
        wrap(msd, name, shape)
        for osd in osds.values():
            for key in [k for k in osd if k.startswith(f"state.{name}.")]:
                wrap(osd, key, shape)

    def unwrap() -> None:
        for d, key, t in held:
            d[key] = t

    return state, unwrap


def _whole_experts(t: torch.Tensor, ep: ExpertParallel, mesh) -> DTensor:
    """An expert parallel rank's (E/ep, ...) slice, or its FSDP2 shard over the replicas, as a view
    of the whole (E, ...) tensor: rows cut over the mesh's "ep" dimension, then over "replica"
    (FSDP2's Shard(0)) or repeated on every replica."""
    if isinstance(t, DTensor):
        local, placements = t.to_local(), (Shard(0), Shard(0))
    else:
        local, placements = t, (Shard(0), Replicate())
    shape = torch.Size((t.shape[0] * ep.ep, *t.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


def full_state(
    model: nn.Module, opts: list[torch.optim.Optimizer], ep: ExpertParallel | None = None
) -> tuple[dict, list[dict]]:
    """Unsharded model and optimizer state on CPU (plain, DDP and FSDP2 modules, EP experts
    gathered to all E). Collective: every rank calls it; under FSDP2 only rank 0's dicts are filled."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    osds = [get_optimizer_state_dict(model, opt, options=options) for opt in opts]
    gather_full_state(model, opts, msd, osds, ep)
    return msd, osds


def load_full_state(
    model: nn.Module,
    opts: list[torch.optim.Optimizer],
    msd: dict,
    osds: list[dict] | None,
    ep: ExpertParallel | None = None,
) -> None:
    """The inverse of full_state, on every rank (each reads the whole checkpoint and keeps its part).
    `osds` None loads the weights only."""
    shard_full_state(model, msd, osds, ep)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, msd, options=options)
    for opt, osd in zip(opts, osds or []):
        _load_optimizer(model, opt, osd, options)


def _load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, osd: dict, options: StateDictOptions) -> None:
    """Load a checkpoint's optimizer state into `opt`, keeping its groups' `_CONFIG_KEYS` as built:
    torch's loader takes them from the checkpoint, and the schedule scales `initial_lr`."""
    built = [{k: g[k] for k in _CONFIG_KEYS if k in g} for g in opt.param_groups]
    set_optimizer_state_dict(model, opt, osd, options=options)
    for group, keys in zip(opt.param_groups, built, strict=True):
        group.update(keys)


def unsharded(model: GPT, cfg: TrainerConfig, env: Env, ep: ExpertParallel | None) -> GPT | None:
    """The whole model, for in-training evaluation and best/: `model` itself when it holds all its weights; under
    FSDP2 (DTensor shards, which safetensors cannot write) or EP (a slice of the experts) a CPU
    model on rank 0 (None elsewhere) whose parameters are the gathered full state's tensors
    themselves, not a copy. Collective."""
    if ep is None and not uses_fsdp(cfg, env.world):
        return model
    msd, _ = full_state(model, [], ep)
    if not env.is_main:
        return None
    whole = model_from_state_dict(msd, cfg.model, ternary=cfg.ternary if cfg.stage == "ternary" else None)
    return whole.eval()
