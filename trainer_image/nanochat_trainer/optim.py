"""Optimizers and the learning-rate schedule.

Muon (`torch.optim.Muon`) takes the 2-D hidden matrices of the blocks; AdamW takes
everything else: embeddings, the head, norms and gains, routers and gates, the
DeltaNet convolution, and the stacked 3-D expert weights (torch's Muon is 2-D only).

    opts = build_optimizers(model, cfg.optimizer)
    for step in ...: set_lr(opts, lr_multiplier(step, cfg.steps, cfg.schedule))
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import OptimizerConfig, ScheduleConfig

# 2-D weights that are not hidden matrices in Muon's sense: a 1-row gate or a router
# is a set of vectors, not a transform, so orthogonalising it is meaningless.
ADAMW_NAMES = ("router", "shared_expert_gate", "embed_tokens", "lm_head")


def uses_muon(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and name.startswith("layers.") and not any(n in name for n in ADAMW_NAMES)


def build_optimizers(model: nn.Module, cfg: OptimizerConfig) -> list[torch.optim.Optimizer]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if cfg.name == "muon" and uses_muon(n, p)]
    matrix_ids = {id(p) for p in matrices}
    rest = [p for _, p in named if id(p) not in matrix_ids]
    adam_groups = [{"params": rest, "lr": cfg.adam_lr}]
    if cfg.name == "adamw":
        # Plain AdamW everywhere: the hidden matrices keep their own (larger) rate.
        adam_groups = [{"params": [p for n, p in named if uses_muon(n, p)], "lr": cfg.lr},
                       {"params": [p for n, p in named if not uses_muon(n, p)], "lr": cfg.adam_lr}]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(
        [g for g in adam_groups if g["params"]], betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay, eps=1e-10, fused=False)]
    if matrices:
        # "original" scales the update by sqrt(max(1, rows/cols)), Keller Jordan's Muon, for which lr 0.02 is tuned.
        opts.append(torch.optim.Muon(matrices, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                     weight_decay=cfg.weight_decay, adjust_lr_fn="original"))
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
