"""Whole (unsharded) model and optimizer state, whatever the layout: what checkpoints hold.

    msd, osds = full_state(model, opts, ep)            # collective; rank 0's dicts are complete
    load_full_state(model, opts, msd, osds, ep)        # every rank keeps its part
    whole = unsharded(model, cfg, env, ep)             # the model final/ is written from (rank 0)

Checkpoint files are the same with and without DDP, FSDP2 or expert parallelism, so a run can
resume on another layout or world size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config import TrainerConfig
from ..models.gpt import GPT
from ..models.hf_adapter import model_from_state_dict
from .apply import uses_fsdp
from .distributed import Env
from .expert_parallel import ExpertParallel, gather_full_state, shard_full_state


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
        set_optimizer_state_dict(model, opt, osd, options=options)


def unsharded(model: GPT, cfg: TrainerConfig, env: Env, ep: ExpertParallel | None) -> GPT | None:
    """The model whose weights go to final/: `model` itself when it holds all its weights; under
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
