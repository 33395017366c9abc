"""A smaller-than-tiny trainer config shared by the training tests: several full runs fit in a test."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanochat_trainer.config import TrainerConfig

MICRO = {"preset": "tiny", "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512,
                                     "max_seq_len": 128},
         "tokenizer": {"train_docs": 300}, "seq_len": 64, "batch_size": 4,
         "schedule": {"warmup_steps": 5}, "metrics": {"port": 0, "log_every": 1}}


def micro_cfg(run_dir: Path, **over) -> TrainerConfig:
    """MICRO with `over` merged on top and the run directory set."""
    data = {**MICRO, **over}
    data["checkpoint"] = {"dir": str(run_dir), **over.get("checkpoint", {})}
    return TrainerConfig.model_validate(data)


def read_log(run_dir: Path) -> dict[int, dict]:
    """log.jsonl by step."""
    return {r["step"]: r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """Add seeded noise of `scale` to every matrix: the zero-initialised output projections stop
    being zero, so a test's model is not degenerate (every greedy completion alike)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model
