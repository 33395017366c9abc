"""Helpers the training tests share: a smaller-than-tiny config (several full runs fit in a test),
its MoE and hybrid variants, reading a run's log, and running a config under torchrun."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from nanochat_trainer.checkpoint import ModelTensors
from nanochat_trainer.config import ModelConfig, TrainerConfig
from nanochat_trainer.models.gpt import GPT

MICRO = {
    "preset": "tiny",
    "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "max_seq_len": 128},
    "tokenizer": {"train_docs": 300},
    "seq_len": 64,
    "batch_size": 4,
    "schedule": {"warmup_steps": 5},
    "metrics": {"port": 0, "log_every": 1},
}


def micro_cfg(run_dir: Path, **over) -> TrainerConfig:
    """MICRO with `over` merged on top and the run directory set."""
    data = {**MICRO, **over}
    data["checkpoint"] = {"dir": str(run_dir), **over.get("checkpoint", {})}
    return TrainerConfig.model_validate(data)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """A model directory's weights by name, whole or sharded (final/ of an FSDP2 or EP run)."""
    with ModelTensors(model_dir) as tensors:
        return dict(tensors)


def read_log(run_dir: Path) -> dict[int, dict]:
    """log.jsonl by step."""
    return {r["step"]: r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}


def losses(run_dir: Path) -> dict[int, float]:
    """The loss of every logged step."""
    return {step: r["loss"] for step, r in read_log(run_dir).items()}


def torchrun(nproc: int, cfg: TrainerConfig, tmp: Path, script: Path | None = None, check: bool = True) -> int:
    """Train `cfg` under torchrun with `nproc` CPU processes (one thread each), as a pod does;
    `script` instead of the trainer's module: a test's wrapper around it. Returns the exit status."""
    path = tmp / f"cfg{nproc}-{Path(cfg.checkpoint.dir).name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    entry = [str(script)] if script is not None else ["-m", "nanochat_trainer.train"]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(_free_port()),
            *entry,
            "--config",
            str(path),
        ],
        check=check,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    ).returncode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable[..., None], nprocs: int, out: Path, timeout_s: float = 150) -> None:
    """Run `worker(rank, port, str(out))` in `nprocs` spawned processes (a test's own process
    group on a free port) and wait; a worker's exception fails the test with its traceback, and
    workers still running after `timeout_s` (a collective hung?) are killed."""
    ctx = mp.start_processes(worker, args=(_free_port(), str(out)), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):  # raises with the worker's traceback if one failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{nprocs} spawned workers did not finish in {timeout_s:.0f} s (a collective hung?)")


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """Add seeded noise of `scale` to every matrix: the zero-initialised output projections stop
    being zero, so a test's model is not degenerate (every greedy completion alike)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def distill_cfg(run_dir: Path, url: str, tdir: Path, steps: int, **distill) -> TrainerConfig:
    """MICRO, stage distill by top-k logprobs from the teacher at `url`, sharing the tokenizer of
    the teacher's run `tdir`; `distill` overrides the distill block (and checkpoint, data, seed)."""
    teacher = {"url": url + "/v1", "model": "teacher", "max_retries": 0, "timeout_s": 30, **distill.pop("teacher", {})}
    over = {k: distill.pop(k) for k in ("checkpoint", "data", "seed") if k in distill}
    return micro_cfg(
        run_dir,
        steps=steps,
        stage="distill",
        tokenizer={"kind": "bpe", "path": str(tdir / "tokenizer.json")},
        **over,
        distill={"method": "topk_logprobs", "top_k": 8, "alpha": 0.5, "teacher": teacher, **distill},
    )


# MoE and hybrid students at MICRO size: 4 experts; the hybrid adds one Gated DeltaNet layer.
MOE = {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32, "n_shared_experts": 1, "shared_expert_ffn_dim": 32}
# full_attention_interval 2: the two layers are one Gated DeltaNet and one gated full attention.
HYBRID = {
    "full_attention_interval": 2,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "conv_kernel": 4,
    "chunk_size": 32,
    "partial_rotary_factor": 0.25,
}
PRESET = {"moe": "tiny-moe", "hybrid": "tiny-hybrid"}


def model_over(kind: str) -> dict:
    """MICRO's model (dim 64, 2 layers, vocab 512) with 4 experts, plus the hybrid stack for 'hybrid'."""
    model = {**MICRO["model"], "moe": MOE}
    if kind == "hybrid":
        model.update(head_dim=16, hybrid=HYBRID)
    return model


def random_gpt(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A GPT with every matrix random (init_weights zeroes o/down/head, which would make
    ternary scales degenerate and logits trivially equal)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model
