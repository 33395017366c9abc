"""kopf wiring: watches and indexes in, keys on the work queue out (`controller.py` drains it).

kopf watches the runs, and the Jobs and pods the operator made (selected on the server by the
managed-by label), and keeps each in an index (`watched.py` reads them). Every event on a run
or on one of its children puts the run's key on the queue; keys coalesce, so a burst of pod
events costs one reconcile. kopf starts no handler until every index holds its initial list,
so the first reconcile after a restart already sees every Job and pod.

Only indexes and event handlers are registered: no timers, no daemons, no mandatory deletion
handler. kopf therefore puts no finalizer on a run (and removes the one that earlier versions,
which used timers, left), so deleting a run or its namespace never waits on the operator.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import kopf

from nanochat_trainer.contract import (
    EVAL_KIND,
    EVAL_LABEL,
    EVAL_PLURAL,
    GROUP,
    JOB_NAME_LABEL,
    RUN_LABEL,
    TRAINING_KIND,
    TRAINING_PLURAL,
    VERSION,
)

from .controller import Controller, RunKey
from .kube import KubeCluster, load_api_client
from .metrics import READY
from .render import EVAL_APP, MANAGED_BY, MANAGER, NAME_LABEL, TRAINER_APP
from .settings import CONFIG, OperatorConfig
from .watched import JOB_INDEX, POD_INDEX, RUN_INDEX, WatchedCluster
from .workqueue import WorkQueue

QUEUE: WorkQueue[RunKey] = WorkQueue()
_controller: Controller | None = None
TR = (GROUP, VERSION, TRAINING_PLURAL)
ER = (GROUP, VERSION, EVAL_PLURAL)
JOBS = ("batch", "v1", "jobs")
PODS = ("v1", "pods")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **kwargs: Any) -> None:
    global _controller
    # Earlier versions' finalizer: kopf removes it from runs now that no handler needs one.
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    # Only the operator's children are watched, selected on the server: not every pod of the cluster.
    selector = f"{MANAGED_BY}={MANAGER}"
    settings.watching.label_selectors[JOBS] = selector
    settings.watching.label_selectors[PODS] = selector
    # Watches time out server-side and reconnect, so a silently dead connection heals.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.batching.error_delays = (5, 10, 30, 60, 120, 300, 600)
    # Only warnings become Kubernetes Events on their own; phase changes are posted explicitly.
    settings.posting.level = logging.WARNING
    peering(settings, CONFIG)
    api = KubeCluster(load_api_client(CONFIG.max_workers), scrape_timeout=CONFIG.scrape_timeout)
    # kopf hands every handler the indexes as keyword arguments, the same live objects throughout.
    indices = {i: kwargs[i] for i in (JOB_INDEX, POD_INDEX, *RUN_INDEX.values())}
    _controller = Controller(WatchedCluster(api, indices, every=CONFIG.interval), api, CONFIG, _adopt, QUEUE)
    _controller.start()
    READY.set()
    logger.info("nanochat operator ready: %s", CONFIG)


def peering(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Standalone, or one of several replicas of which one works and the others stand by."""
    if config.peering is None:
        settings.peering.standalone = True
        return
    settings.peering.name = config.peering
    settings.peering.clusterwide = not config.namespaces
    # kopf pauses a peer while a live one ranks higher, and every peer, itself too, while two rank
    # alike (the default 0 stopped all replicas). The earlier started ranks higher, so a replica that
    # starts (a rollout, a restart) stands by rather than pause the one at work; random breaks ties.
    started_ms = time.time_ns() // 1_000_000
    settings.peering.priority = -(started_ms * 1000 + random.SystemRandom().randrange(1000))


@kopf.on.cleanup()
def stopping(**_: Any) -> None:
    READY.clear()
    if _controller is not None:
        _controller.stop()


def _adopt(objs: list[dict[str, Any]], owner: dict[str, Any]) -> None:
    kopf.adopt(objs, owner=owner)  # type: ignore[arg-type]  # kopf accepts any body mapping


def _slim(body: kopf.Body) -> dict[str, Any]:
    """What an index keeps of an object: all of it but managedFields (a third of a pod's size)."""
    obj = {k: body[k] for k in body}
    obj["metadata"] = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    return obj


# ---------------------------------------------------------------------------- indexes (watched.py)


@kopf.index(*TR, id=RUN_INDEX[TRAINING_KIND])
@kopf.index(*ER, id=RUN_INDEX[EVAL_KIND])
@kopf.index(*JOBS, id=JOB_INDEX)
async def by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): _slim(body)}


@kopf.index(*PODS, id=POD_INDEX)
async def pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
    job = labels.get(JOB_NAME_LABEL)
    return {(namespace, job): _slim(body)} if job else None


# ---------------------------------------------------------------------------- events -> queue


def _owner(labels: kopf.Labels, namespace: str) -> RunKey | None:
    """The run a Job or pod belongs to. By the name label the operator sets (and that wins over any
    other): kopf.adopt copies a run's own labels onto its children, so an EvalRun labelled with the
    training-run label gives its Job both."""
    if labels.get(NAME_LABEL) == TRAINER_APP and RUN_LABEL in labels:
        return TRAINING_KIND, namespace, labels[RUN_LABEL]
    if labels.get(NAME_LABEL) == EVAL_APP and EVAL_LABEL in labels:
        return EVAL_KIND, namespace, labels[EVAL_LABEL]
    return None


# Every event, a deletion too: the worker finds a deleted run gone from the index and forgets it
# there, one reconcile of a key at a time, so a run re-created under the same name is not forgotten.
@kopf.on.event(*TR, id="training-event")
async def training_event(namespace: str, name: str, **_: Any) -> None:
    QUEUE.add((TRAINING_KIND, namespace, name))


@kopf.on.event(*ER, id="eval-event")
async def eval_event(namespace: str, name: str, **_: Any) -> None:
    QUEUE.add((EVAL_KIND, namespace, name))


@kopf.on.event(*JOBS, id="job-event")
@kopf.on.event(*PODS, id="pod-event")
async def child_event(namespace: str, labels: kopf.Labels, **_: Any) -> None:
    owner = _owner(labels, namespace)
    if owner is not None:
        QUEUE.add(owner)
