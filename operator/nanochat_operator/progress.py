"""Reading the trainer's progress from its Prometheus text exposition (pure).

Contract with the trainer (nanochat_trainer/metrics.py): rank 0 serves `/metrics` on
`trainer.metrics.port` with the gauges

    nanochat_trainer_step               optimizer steps done
    nanochat_trainer_total_steps        steps the run takes
    nanochat_trainer_loss               loss of the last step
    nanochat_trainer_tokens_per_second  throughput over all ranks
    nanochat_trainer_checkpoint_step    step of the newest complete checkpoint
    nanochat_trainer_teacher_up         distillation: 1 while the teacher answers, 0 while down
    nanochat_trainer_teacher_skipped    distillation: rows or batches trained without it

The operator GETs http://<pod 0 IP>:<port>/metrics on each reconcile of a Running run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "nanochat_trainer_"


@dataclass(frozen=True)
class Progress:
    step: Optional[int] = None
    total_steps: Optional[int] = None
    loss: Optional[float] = None
    tokens_per_second: Optional[float] = None
    checkpoint_step: Optional[int] = None
    teacher_up: Optional[bool] = None  # distillation runs only
    teacher_skipped: Optional[int] = None


def parse_trainer_metrics(text: str) -> Progress:
    """Progress from a /metrics body; missing or NaN gauges are None. Bad text raises ValueError."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(PREFIX) and not sample.labels:
                values[sample.name[len(PREFIX):]] = sample.value

    def num(key: str) -> Optional[float]:
        v = values.get(key)
        return None if v is None or math.isnan(v) or math.isinf(v) else float(v)

    def integer(key: str) -> Optional[int]:
        v = num(key)
        return None if v is None else int(v)

    up = num("teacher_up")
    return Progress(step=integer("step"), total_steps=integer("total_steps"), loss=num("loss"),
                    tokens_per_second=num("tokens_per_second"), checkpoint_step=integer("checkpoint_step"),
                    teacher_up=None if up is None else up == 1,
                    teacher_skipped=integer("teacher_skipped"))


def format_duration(seconds: float) -> str:
    """2h13m, 4m05s, 3d4h: short and readable in `kubectl get`."""
    s = max(int(round(seconds)), 0)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def eta(step: int, total: int, prev_step: Optional[int], prev_time: Optional[datetime],
        now: datetime) -> Optional[timedelta]:
    """Time left at the pace between the previous observation and now; None if unknown."""
    if prev_step is None or prev_time is None or step <= prev_step:
        return None
    elapsed = (now - prev_time).total_seconds()
    if elapsed <= 0:
        return None
    rate = (step - prev_step) / elapsed
    return timedelta(seconds=max(total - step, 0) / rate)
