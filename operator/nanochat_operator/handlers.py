"""kopf handlers: thin wiring from kopf's events and timers to nanochat_operator.reconcile.

Importing this module registers the handlers with kopf's default registry; __main__
does that after it has parsed the settings (the timer interval is fixed on registration).

Level-based: create/update/resume handlers and one timer per live run all call the same
reconcile, which re-reads the Job and pods and recomputes the whole status. A run in a
terminal phase has no timer (the `when` filter), so finished runs cost nothing; editing
the spec of a run that failed before it had a Job (invalid spec, failed source) re-runs
it through the update handler.

Handlers are sync functions: kopf runs them in its thread pool, whose size
(settings.execution.max_workers) bounds the API calls in flight however many runs exist.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from nanochat_trainer.contract import (
    EVAL_KIND,
    EVAL_PLURAL,
    GROUP,
    TERMINAL_PHASES,
    TRAINING_KIND,
    TRAINING_PLURAL,
    VERSION,
)

from .api import EvalRunStatus, TrainingRunStatus
from .kube import KubeCluster, load_api_client, temporary
from .metrics import METRICS, READY
from .reconcile import NotOwned, Outcome, reconcile_eval, reconcile_training, status_patch
from .settings import CONFIG
from .status import dump_status, now_utc

_cluster: KubeCluster | None = None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    global _cluster
    settings.execution.max_workers = CONFIG.max_workers
    # Keep kopf's bookkeeping in annotations, out of our structural status schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    # Watches time out server-side and reconnect, so a silently dead connection heals.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    # Unexpected errors (bugs) back off up to 10 minutes instead of spinning.
    settings.batching.error_delays = (5, 10, 30, 60, 120, 300, 600)
    # Only warnings become Kubernetes Events on their own; phase changes are posted explicitly.
    settings.posting.level = logging.WARNING
    if CONFIG.peering is None:
        settings.peering.standalone = True
    else:
        settings.peering.name = CONFIG.peering
        settings.peering.clusterwide = not CONFIG.namespaces
    _cluster = KubeCluster(load_api_client(CONFIG.max_workers), scrape_timeout=CONFIG.scrape_timeout)
    READY.set()
    logger.info("nanochat operator ready: %s", CONFIG)


@kopf.on.cleanup()
def stopping(**_: Any) -> None:
    READY.clear()


def _cluster_or_fail() -> KubeCluster:
    if _cluster is None:  # handlers only run after startup; this is a programming error
        raise kopf.TemporaryError("operator not started", delay=5)
    return _cluster


def _run(kind: str, fn: Callable[..., Outcome], body: kopf.Body, patch: kopf.Patch) -> None:
    obj = copy.deepcopy({k: body[k] for k in body})
    meta = obj["metadata"]
    started = time.monotonic()
    result = "error"
    try:
        outcome = fn(_cluster_or_fail(), obj, CONFIG, now=now_utc(), adopt=_adopt)
        result = "ok"
    except NotOwned as err:
        result = "retry"
        raise kopf.TemporaryError(str(err), delay=30) from err
    except kopf.TemporaryError:
        result = "retry"
        raise
    except (ApiException, Urllib3Error, OSError) as err:
        result = "retry"
        raise temporary(err) from err
    finally:
        METRICS.reconcile_total.labels(kind, result).inc()
        METRICS.reconcile_duration.labels(kind).observe(time.monotonic() - started)
    # The kopf boundary: the status model becomes the JSON merge patch kopf applies.
    changes = status_patch(obj.get("status") or {}, dump_status(outcome.status))
    if changes:
        patch.status.update(changes)
    for typ, reason, message in outcome.events:
        kopf.event(body, type=typ, reason=reason, message=message)
    _observe(meta["namespace"], meta["name"], outcome.status)


def _observe(namespace: str, name: str, status: TrainingRunStatus | EvalRunStatus) -> None:
    if isinstance(status, TrainingRunStatus):
        METRICS.observe_training(namespace, name, status)
    else:
        METRICS.observe_eval(namespace, name, status)


def _adopt(objs: list[dict[str, Any]], owner: dict[str, Any]) -> None:
    kopf.adopt(objs, owner=owner)  # type: ignore[arg-type]  # kopf accepts any body mapping


def _live(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL_PHASES


TR = (GROUP, VERSION, TRAINING_PLURAL)
ER = (GROUP, VERSION, EVAL_PLURAL)


# Explicit ids: kopf keys its progress records by handler id, and one function under
# three decorators would otherwise share one.
@kopf.on.create(*TR, id="training-create")
@kopf.on.update(*TR, field="spec", id="training-update")
@kopf.on.resume(*TR, id="training-resume")
def training_changed(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _run(TRAINING_KIND, reconcile_training, body, patch)


@kopf.timer(*TR, interval=CONFIG.interval, initial_delay=CONFIG.interval, when=_live)
def training_tick(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _run(TRAINING_KIND, reconcile_training, body, patch)


@kopf.on.create(*ER, id="eval-create")
@kopf.on.update(*ER, field="spec", id="eval-update")
@kopf.on.resume(*ER, id="eval-resume")
def eval_changed(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _run(EVAL_KIND, reconcile_eval, body, patch)


@kopf.timer(*ER, interval=CONFIG.interval, initial_delay=CONFIG.interval, when=_live)
def eval_tick(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _run(EVAL_KIND, reconcile_eval, body, patch)


# optional=True: no finalizer is added for these, so a deletion never waits on the operator.
@kopf.on.delete(*TR, optional=True)
def training_deleted(name: str, namespace: str, **_: Any) -> None:
    METRICS.forget(TRAINING_KIND, namespace, name)


@kopf.on.delete(*ER, optional=True)
def eval_deleted(name: str, namespace: str, **_: Any) -> None:
    METRICS.forget(EVAL_KIND, namespace, name)
