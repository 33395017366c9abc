"""Rank 0's progress: Prometheus gauges on /metrics and a JSON-lines log, and the FLOPs behind MFU.

The operator scrapes the gauges from pod 0 to fill a TrainingRun's status; their names are in
`contract.TrainerGauge`.

    metrics = TrainerMetrics(layout, port=9090, enabled=env.is_main)
    metrics.set(step=10, loss=2.3); metrics.log(record)
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from ..config import ModelConfig
from ..contract import (
    GENERATE_REJECTED_BY_REASON,
    MAX_TERMINATION_MESSAGE,
    TERMINATION_LOG_ENV,
    RunLayout,
    TrainerGauge,
)
from ..errors import ConfigError, MachineError
from ..models.gpt import active_params

# Dense bf16 tensor-core peaks; MFU is only reported on devices listed here.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_token(n_params_non_embedding: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention (PaLM, appendix B)."""
    return 6 * n_params_non_embedding + 12 * n_layers * dim * seq_len


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """flops_per_token of a ModelConfig: N counts the weights a token goes through (for MoE the
    active ones, top_k of the routed experts, not all of them; the head's matmul but not the
    embedding lookup), and the attention term only the full-attention layers (a hybrid's
    Gated DeltaNet layers cost O(T) per token, inside 6N's order)."""
    n = active_params(cfg)["active_non_embedding"] + cfg.vocab_size * cfg.dim
    attn_layers = cfg.n_layers if cfg.hybrid is None else cfg.n_layers // cfg.hybrid.full_attention_interval
    return flops_per_token(n, attn_layers, cfg.dim, seq_len)


def _serve_metrics(port: int, registry: CollectorRegistry) -> None:
    try:
        start_http_server(port, registry=registry)
    except OSError as e:
        # A port taken (a second local run, a local Prometheus) or privileged is the config's to change;
        # anything else is the machine's (exit 1, retried).
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            raise ConfigError(
                "metrics.port", port, f"cannot serve the metrics there: {e.strerror}; 0 turns them off"
            ) from e
        raise MachineError(f"metrics.port={port}: cannot serve the metrics: {e}") from e


class TrainerMetrics:
    """The gauges (served on `port` by rank 0 when `enabled`) and log.jsonl (written by rank 0)."""

    def __init__(self, layout: RunLayout, port: int, enabled: bool):
        self.enabled = enabled
        self.registry = CollectorRegistry()
        self.gauges = {g: Gauge(g.metric, g.help, registry=self.registry) for g in TrainerGauge}
        for gauge in self.gauges.values():
            # NaN until set: "not known (yet)" to the operator, where 0 would be a value (a loss
            # of 0, a teacher down in a run without one).
            gauge.set(math.nan)
        self.rejected = Gauge(
            GENERATE_REJECTED_BY_REASON,
            "stage generate: teacher answers rejected, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.log_path = layout.log
        if enabled and port:
            _serve_metrics(port, self.registry)

    def set(self, **values: float | None) -> None:
        """Gauges by name (`TrainerGauge` values); None leaves a gauge as it is."""
        for k, v in values.items():
            if v is not None:
                self.gauges[TrainerGauge(k)].set(v)

    def set_rejected(self, by_reason: dict[str, int]) -> None:
        for reason, n in by_reason.items():
            self.rejected.labels(reason=reason).set(n)

    def write_termination_message(self) -> None:
        """The gauges' last values, in the exposition format, into the container's termination log
        ($NANOCHAT_TERMINATION_LOG, which the operator sets), where Kubernetes copies them into the pod's
        status: a run that ends between two of the operator's scrapes still reports its final figures.
        Only samples with a value, without HELP/TYPE lines: the message is limited to 4 KiB."""
        path = os.environ.get(TERMINATION_LOG_ENV)
        if not (self.enabled and path):
            return
        lines = []
        for family in self.registry.collect():
            for s in family.samples:
                if math.isnan(s.value):
                    continue
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                lines.append(f"{s.name}{{{labels}}} {s.value!r}" if labels else f"{s.name} {s.value!r}")
        text = "\n".join(lines) + "\n"
        if len(text) > MAX_TERMINATION_MESSAGE:  # whole lines only: a cut sample would not parse
            text = text[: text.rfind("\n", 0, MAX_TERMINATION_MESSAGE) + 1]
        with open(path, "w") as f:
            f.write(text)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")


def evaluation_line(record: dict[str, Any]) -> str:
    """A step that validated or scored pass@1, in one line (the demo, `nanochat run`)."""
    parts = [f"step {record['step']}", f"loss {record['loss']:.3f}"]
    if "val_loss" in record:
        parts.append(f"validation loss {record['val_loss']:.3f}")
    if "evaluation" in record:
        h = record["evaluation"]
        score = f"{record['pass_at_1']:.3f}" if "pass_at_1" in record else "failed (see the log)"
        name = {"humaneval": "HumanEval", "synthetic": "held-out synthetic"}[h["benchmark"]]
        parts.append(f"{name} pass@1 {score} ({h['passed']}/{h['problems']}, {h['seconds']:.0f} s)")
        if "best_pass_at_1" in record:
            parts.append(f"best {record['best_pass_at_1']:.3f} at step {record['best_step']}")
    return "  ".join(parts)
