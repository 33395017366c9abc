"""Rank 0's progress: Prometheus gauges on /metrics and a JSON-lines log.

The operator scrapes these from pod 0 to fill a TrainingRun's status, so the names are
part of the contract (DESIGN.md): `nanochat_trainer_*`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, start_http_server

GAUGES = {
    "step": "Optimizer steps done.",
    "total_steps": "Optimizer steps the run will take.",
    "loss": "Training loss of the last step (mean over ranks).",
    "tokens_per_second": "Training throughput over all ranks.",
    "learning_rate": "Learning rate of the hidden matrices.",
    "grad_norm": "Global gradient norm before clipping.",
    "mfu": "Model FLOPs utilisation (0-1) where the device's peak is known.",
    "checkpoint_step": "Step of the newest complete checkpoint.",
    # MoE only: the step's routed slots per expert, over all ranks.
    "moe_load_imbalance": "Max over MoE layers of the step's max/mean routed tokens per expert (1 is balanced).",
    "moe_dead_experts": "Experts (over all MoE layers) that got no token in the step.",
    # Distillation only (the operator turns teacher_up into the TeacherAvailable condition).
    "teacher_up": "1 while the distillation teacher answers, 0 while it is down (the run trains without it).",
    "teacher_requests": "Requests sent to the teacher.",
    "teacher_cache_hits": "Teacher answers served from the on-disk cache.",
    "teacher_errors": "Teacher requests that failed after their retries.",
    "teacher_latency_seconds": "Mean latency of the teacher's answers.",
    "teacher_skipped": "Rows (sequence) or micro-batches (logprob methods) trained without the teacher.",
}

# Dense bf16 tensor-core peaks; MFU is only reported on devices listed here.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_token(n_params_non_embedding: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention (PaLM, appendix B)."""
    return 6 * n_params_non_embedding + 12 * n_layers * dim * seq_len


def model_flops_per_token(cfg, seq_len: int) -> float:
    """flops_per_token of a ModelConfig: N counts the weights a token goes through (for MoE the
    active ones, top_k of the routed experts, not all of them; the head's matmul but not the
    embedding lookup), and the attention term only the full-attention layers (a hybrid's
    Gated DeltaNet layers cost O(T) per token, inside 6N's order)."""
    from .moe import active_params

    n = active_params(cfg)["active_non_embedding"] + cfg.vocab_size * cfg.dim
    attn_layers = cfg.n_layers if cfg.hybrid is None else cfg.n_layers // cfg.hybrid.full_attention_interval
    return flops_per_token(n, attn_layers, cfg.dim, seq_len)


class TrainerMetrics:
    def __init__(self, run_dir: str, port: int, enabled: bool):
        self.enabled = enabled
        self.registry = CollectorRegistry()
        self.gauges = {k: Gauge(f"nanochat_trainer_{k}", doc, registry=self.registry) for k, doc in GAUGES.items()}
        self.log_path = Path(run_dir) / "log.jsonl"
        if enabled and port:
            start_http_server(port, registry=self.registry)

    def set(self, **values: float) -> None:
        for k, v in values.items():
            if v is not None:
                self.gauges[k].set(v)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")
