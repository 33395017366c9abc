"""Reading the trainer's progress from its Prometheus text exposition (pure).

Rank 0 of a run serves `/metrics` on `trainer.metrics.port` with the gauges the contract
names (`nanochat_trainer.contract.TrainerGauge`); the operator GETs
http://<pod 0 IP>:<port>/metrics on each reconcile of a Running run and keeps the few a
TrainingRun's status shows: step, total steps, loss, validation loss, pass@1 and the best one,
throughput, the newest checkpoint's
step, and for distillation whether the teacher answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families

from nanochat_trainer.contract import GENERATE_REJECTED_BY_REASON, TrainerGauge

_GAUGES = {gauge.metric: gauge for gauge in TrainerGauge}


@dataclass(frozen=True)
class Progress:
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    val_loss: float | None = None  # runs with a validation section, from the first validation on
    pass_at_1: float | None = None  # runs with an evaluation section, from the first evaluation on
    best_pass_at_1: float | None = None
    best_step: int | None = None
    tokens_per_second: float | None = None
    checkpoint_step: int | None = None
    teacher_up: bool | None = None  # distillation runs only
    teacher_skipped: int | None = None
    # stage generate only
    rejected: dict[str, int] | None = None
    teacher_in_flight: int | None = None
    teacher_requests_per_second: float | None = None


def _gauge_values(text: str) -> tuple[dict[TrainerGauge, float], dict[str, int]]:
    """The trainer's unlabelled gauges in a /metrics body (the process collectors' are ignored),
    and stage generate's rejections by reason."""
    values: dict[TrainerGauge, float] = {}
    rejected: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            gauge = _GAUGES.get(sample.name)
            if gauge is not None and not sample.labels:
                values[gauge] = sample.value
            elif sample.name == GENERATE_REJECTED_BY_REASON and "reason" in sample.labels:
                if math.isfinite(sample.value):  # int() of +Inf raises
                    rejected[sample.labels["reason"]] = int(sample.value)
    return values, rejected


def _number(values: dict[TrainerGauge, float], gauge: TrainerGauge) -> float | None:
    # The trainer serves NaN for what it does not know yet (no checkpoint, no loss).
    v = values.get(gauge)
    return None if v is None or math.isnan(v) or math.isinf(v) else float(v)


def _integer(values: dict[TrainerGauge, float], gauge: TrainerGauge) -> int | None:
    v = _number(values, gauge)
    return None if v is None else int(v)


def parse_trainer_metrics(text: str) -> Progress:
    """Progress from a /metrics body; missing or NaN gauges are None. Bad text raises ValueError."""
    values, rejected = _gauge_values(text)
    up = _number(values, TrainerGauge.TEACHER_UP)
    return Progress(
        step=_integer(values, TrainerGauge.STEP),
        total_steps=_integer(values, TrainerGauge.TOTAL_STEPS),
        loss=_number(values, TrainerGauge.LOSS),
        val_loss=_number(values, TrainerGauge.VAL_LOSS),
        pass_at_1=_number(values, TrainerGauge.PASS_AT_1),
        best_pass_at_1=_number(values, TrainerGauge.BEST_PASS_AT_1),
        best_step=_integer(values, TrainerGauge.BEST_STEP),
        tokens_per_second=_number(values, TrainerGauge.TOKENS_PER_SECOND),
        checkpoint_step=_integer(values, TrainerGauge.CHECKPOINT_STEP),
        teacher_up=None if up is None else up == 1,
        teacher_skipped=_integer(values, TrainerGauge.TEACHER_SKIPPED),
        rejected=rejected or None,
        teacher_in_flight=_integer(values, TrainerGauge.TEACHER_IN_FLIGHT),
        teacher_requests_per_second=_number(values, TrainerGauge.TEACHER_REQUESTS_PER_SECOND),
    )


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


def eta(step: int, total: int, prev_step: int | None, prev_time: datetime | None, now: datetime) -> timedelta | None:
    """Time left at the pace between the previous observation and now; None if unknown."""
    if prev_step is None or prev_time is None or step <= prev_step:
        return None
    elapsed = (now - prev_time).total_seconds()
    if elapsed <= 0:
        return None
    rate = (step - prev_step) / elapsed
    return timedelta(seconds=max(total - step, 0) / rate)
