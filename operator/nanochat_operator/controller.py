"""The reconcile workers: take a run's key from the queue, reconcile it from watched state, write
the status back, and schedule the next look.

A run is reconciled when it or one of its children changes (the watch handlers in `handlers.py`
add its key) and, while it is live, once per `interval` besides: the resync that reads the
trainer's progress, which no watch reports. Finished runs are not rescheduled, so they cost
nothing until they change.

The status is written with the run's resourceVersion as a precondition: a status computed from
a copy the watch has not yet refreshed is refused (409) and the run is simply looked at again,
instead of writing old news or posting an event twice. Events are posted only once the status
that goes with them is written.

Errors: `kopf.TemporaryError` (API hiccups, RBAC, throttling; raised by `kube.py`) and a Job that
belongs to someone else are retried after their delay; anything else is a bug, logged with its
traceback and retried with a growing delay so it cannot spin.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from nanochat_trainer.contract import EVAL_KIND, EVAL_PLURAL, TERMINAL_PHASES, TRAINING_KIND, TRAINING_PLURAL

from . import render
from .api import EvalRunStatus, TrainingRunStatus
from .kube import Conflict, KubeCluster, temporary
from .metrics import METRICS
from .reconcile import Adopt, NotOwned, Outcome, reconcile_eval, reconcile_training, status_patch
from .settings import OperatorConfig
from .status import dump_status, now_utc
from .watched import WatchedCluster
from .workqueue import WorkQueue

log = logging.getLogger("nanochat_operator.controller")

RunKey = tuple[str, str, str]  # (kind, namespace, name)
Reconcile = Callable[..., Outcome]
RECONCILERS: dict[str, Reconcile] = {TRAINING_KIND: reconcile_training, EVAL_KIND: reconcile_eval}
PLURALS = {TRAINING_KIND: TRAINING_PLURAL, EVAL_KIND: EVAL_PLURAL}
JOB_NAMES = {TRAINING_KIND: render.job_name, EVAL_KIND: render.eval_job_name}
ERROR_DELAYS = (5, 10, 30, 60, 120, 300, 600)  # seconds, for errors that are bugs
CONFLICT_DELAY = 1.0  # a stale copy: the watch brings the fresh one within moments


class Controller:
    def __init__(
        self, cluster: WatchedCluster, api: KubeCluster, config: OperatorConfig, adopt: Adopt, queue: WorkQueue[RunKey]
    ) -> None:
        self.cluster, self.api, self.config, self.adopt, self.queue = cluster, api, config, adopt, queue
        self._failures: dict[RunKey, int] = {}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.config.max_workers):
            t = threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self.queue.close()
        deadline = time.monotonic() + 10  # for all of them: a reconcile in flight finishes or is abandoned
        for t in self._threads:
            t.join(timeout=max(deadline - time.monotonic(), 0))

    def gone(self, key: RunKey) -> None:
        """The run was deleted: forget its schedule, its series and what was remembered for its Job."""
        kind, namespace, name = key
        self.queue.forget(key)
        self._failures.pop(key, None)
        self.cluster.forget(namespace, JOB_NAMES[kind](name))
        METRICS.forget(kind, namespace, name)

    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                self.process(key)
            finally:
                self.queue.done(key)

    def process(self, key: RunKey) -> None:
        """One reconcile of one run; schedules the next one itself."""
        kind, namespace, name = key
        obj = self.cluster.run(kind, namespace, name)
        if obj is None:  # deleted (the index dropped it before its event queued the key)
            self.gone(key)
            return
        started = time.monotonic()
        result = "error"
        try:
            outcome = RECONCILERS[kind](self.cluster, obj, self.config, now=now_utc(), adopt=self.adopt)
            self._write(kind, obj, outcome)
            result = "ok"
        except Conflict:
            result = "retry"
            self.queue.add_after(key, CONFLICT_DELAY)
            return
        except (NotOwned, kopf.TemporaryError, ApiException, Urllib3Error, OSError) as err:
            result = "retry"
            wait = _as_temporary(err)
            log.warning("%s %s/%s: %s; retrying in %g s", kind, namespace, name, wait, wait.delay or 15)
            self.queue.add_after(key, wait.delay or 15)
            return
        except Exception:
            n = self._failures[key] = self._failures.get(key, 0) + 1
            delay = ERROR_DELAYS[min(n, len(ERROR_DELAYS)) - 1]
            log.exception("reconciling %s %s/%s failed (attempt %d); retrying in %d s", kind, namespace, name, n, delay)
            self.queue.add_after(key, delay)
            return
        finally:
            METRICS.reconcile_total.labels(kind, result).inc()
            METRICS.reconcile_duration.labels(kind).observe(time.monotonic() - started)
        self._failures.pop(key, None)
        if outcome.status.phase not in TERMINAL_PHASES:
            self.queue.add_after(key, self.config.interval)

    def _write(self, kind: str, obj: dict[str, Any], outcome: Outcome) -> None:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        changes = status_patch(obj.get("status") or {}, dump_status(outcome.status))
        # Every event goes with a status change (a phase, a condition): with none, its events were
        # posted when that status was written, e.g. a failure the run keeps answering the same.
        if changes:
            if not self.api.patch_status(PLURALS[kind], ns, name, meta["resourceVersion"], changes):
                return  # deleted meanwhile: its DELETED event brings the key back to forget it
            for typ, reason, message in outcome.events:
                try:
                    self.api.post_event(obj, typ, reason, message)
                except Exception as err:  # noqa: BLE001  the status says it too; never lose the rest for it
                    log.warning("event %s on %s/%s not posted: %s", reason, ns, name, err)
        _observe(ns, name, outcome.status, obj.get("spec") or {})


def _as_temporary(err: Exception) -> kopf.TemporaryError:
    """The wait before looking again: kube.py's sorting of API errors; a Job that belongs to someone
    else (an older run's, still being deleted) gets 30 s."""
    if isinstance(err, kopf.TemporaryError):
        return err
    if isinstance(err, NotOwned):
        return kopf.TemporaryError(str(err), delay=30)
    return temporary(err)


def _observe(namespace: str, name: str, status: TrainingRunStatus | EvalRunStatus, spec: dict[str, Any]) -> None:
    if isinstance(status, TrainingRunStatus):
        port = ((spec.get("trainer") or {}).get("metrics") or {}).get("port")  # 0: the trainer serves none
        METRICS.observe_training(namespace, name, status, steps_read=port != 0)
    else:
        METRICS.observe_eval(namespace, name, status)
