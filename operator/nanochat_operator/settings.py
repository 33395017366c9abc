"""The operator's own settings: command-line flags, with environment variables as defaults.

    python -m nanochat_operator --trainer-image ghcr.io/me/trainer:1 --namespace ml

Every flag has a NANOCHAT_* variable so the Helm chart can set either.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_TRAINER_IMAGE = "ghcr.io/nanochat/nanochat-trainer:0.1.0"
# Serves an EvalRun's model that does not fit one GPU (tensor parallelism, in the eval pod). Pinned:
# its `vllm serve` flags are what render.py writes.
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"


@dataclass
class OperatorConfig:
    trainer_image: str = DEFAULT_TRAINER_IMAGE  # for runs without spec.image
    vllm_image: str = DEFAULT_VLLM_IMAGE  # the server of an EvalRun's model too large for one GPU
    gpu_memory_gib: float = 80.0  # per GPU, for the feasibility check (H100/A100-80G)
    interval: float = 15.0  # seconds between looks at a live run besides its events: progress scrapes
    max_workers: int = 16  # reconcile worker threads: bounds concurrent API work
    metrics_port: int = 8000  # /metrics, /readyz
    liveness: str = "http://0.0.0.0:8080/healthz"  # kopf's probe endpoint
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    peering: str | None = None  # kopf peering name; None: standalone (one replica)
    scrape_timeout: float = 2.0  # seconds to wait for a trainer's /metrics
    log_format: str = "json"  # json or plain
    eval_runtime_class: str | None = None  # RuntimeClass of eval pods that set none (gVisor, Kata)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"NANOCHAT_{name}", default)


def parse_args(argv: Sequence[str] | None = None) -> OperatorConfig:
    d = OperatorConfig()
    p = argparse.ArgumentParser(prog="python -m nanochat_operator", description="Run the nanochat operator.")
    p.add_argument(
        "--trainer-image", default=_env("TRAINER_IMAGE", d.trainer_image), help="image of runs that set no spec.image"
    )
    p.add_argument(
        "--vllm-image",
        default=_env("VLLM_IMAGE", d.vllm_image),
        help="vLLM image (`vllm serve`) of eval pods whose model does not fit one GPU",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=float(_env("GPU_MEMORY_GIB", str(d.gpu_memory_gib))),
        help="memory of one GPU, for the feasibility check",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=float(_env("INTERVAL", str(d.interval))),
        help="seconds between reconciles of a live run",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        default=int(_env("MAX_WORKERS", str(d.max_workers))),
        help="handler threads (bounds concurrent API calls)",
    )
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", str(d.metrics_port))))
    p.add_argument("--liveness", default=_env("LIVENESS", d.liveness), help="kopf liveness endpoint URL")
    p.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="namespace to watch (repeat; default: all, or NANOCHAT_NAMESPACES=a,b)",
    )
    p.add_argument(
        "--peering",
        default=_env("PEERING", "") or None,
        help="kopf peering name for several replicas (default: standalone)",
    )
    p.add_argument("--scrape-timeout", type=float, default=float(_env("SCRAPE_TIMEOUT", str(d.scrape_timeout))))
    p.add_argument("--log-format", choices=["json", "plain"], default=_env("LOG_FORMAT", d.log_format))
    p.add_argument(
        "--eval-runtime-class",
        default=_env("EVAL_RUNTIME_CLASS", "") or None,
        help="RuntimeClass (e.g. gvisor, kata) of eval pods whose EvalRun names none",
    )
    a = p.parse_args(argv)
    namespaces = a.namespace if a.namespace else [n for n in _env("NAMESPACES", "").split(",") if n.strip()]
    if a.interval <= 0 or a.max_workers < 1:
        p.error("--interval must be > 0 and --max-workers >= 1")
    return OperatorConfig(
        trainer_image=a.trainer_image,
        vllm_image=a.vllm_image,
        gpu_memory_gib=a.gpu_memory_gib,
        interval=a.interval,
        max_workers=a.max_workers,
        metrics_port=a.metrics_port,
        liveness=a.liveness,
        namespaces=[n.strip() for n in namespaces],
        peering=a.peering,
        scrape_timeout=a.scrape_timeout,
        log_format=a.log_format,
        eval_runtime_class=a.eval_runtime_class,
    )


# The running operator's settings. __main__ fills it in before kopf starts the handlers.
CONFIG = OperatorConfig()
