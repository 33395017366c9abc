"""The processes of a run: who this one is, and the few collectives the trainer calls directly.

    env = setup_distributed(cfg.device)       # torchrun's env, or one process
    env.rank, env.world, env.device, env.is_main
    loads = sum_over_ranks(loads, env)        # one all-reduce for a dict of same-shaped tensors

Under torchrun every rank reads the same config; ranks meet through env:// rendezvous (gloo on
CPU, NCCL on GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import MachineError


@dataclass(frozen=True)
class Env:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file and serves /metrics."""
        return self.rank == 0


def setup_distributed(device_kind: str) -> Env:
    """This process's Env; starts the process group when torchrun's environment is present."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_kind == "cuda":
        _check_cuda()
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return Env(rank, world, device)


def _check_cuda() -> None:
    """device: cuda on a machine where torch sees no GPU, said in one line: torch's own (at
    set_device) is a traceback about drivers. A machine's fault, not the config's (the operator
    refuses device cuda without GPUs): exit 1, retried."""
    if torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise MachineError(
        f"device='cuda': torch sees no GPU (torch {torch.__version__}, {build}: torch.cuda.is_available() is "
        "False); use auto or cpu, or run where a GPU is visible"
    )


def barrier(env: Env) -> None:
    if env.world > 1:
        dist.barrier()


def sum_over_ranks(values: dict[str, torch.Tensor], env: Env) -> dict[str, torch.Tensor]:
    """Each tensor summed over the ranks, in one all-reduce (they must share a shape)."""
    if env.world == 1 or not values:
        return values
    stacked = torch.stack(list(values.values()))
    dist.all_reduce(stacked)
    return dict(zip(values, stacked.unbind()))


def gather_objects(obj: Any, env: Env) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if env.world == 1:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any, env: Env) -> Any:
    """Rank 0's `obj`, on every rank."""
    if env.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
