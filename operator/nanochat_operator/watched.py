"""The `Cluster` the reconcile workers use: reads from what kopf's watches saw, writes to the API.

kopf keeps one watch per kind (runs, and the Jobs and pods the operator made, selected on the
server by the managed-by label) and indexes each object as it arrives (`handlers.py`). A
reconcile then reads the Job, its pods and a dependency's status from memory: no GET or LIST
per reconcile, however many runs there are.

Two things the watches cannot give are bounded instead: a trainer's /metrics is scraped at most
once per `every` seconds per URL (a burst of pod events does not multiply scrapes), and the
events saying why a Job's pods were refused are listed at most as often.

A Job this process just created may reach the index a moment after the reconcile that created
it ends; until it does, `get_job` answers with the object the API server returned, so the next
reconcile does not create it again and post a second "Created".
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from nanochat_trainer.contract import TRAINING_KIND

from .kube import KubeCluster

Key = tuple[str, str]  # (namespace, name)
JOB_INDEX, POD_INDEX = "jobs", "pods"  # kopf index ids (handlers.py)
RUN_INDEX = {TRAINING_KIND: "trainingruns", "EvalRun": "evalruns"}
CREATED_GRACE_S = 60.0  # how long a created Job is answered from memory before the watch shows it


def _first(index: Mapping[Any, Any] | None, key: Any) -> dict[str, Any] | None:
    store = index.get(key) if index is not None else None
    # list() of a dict's values runs without releasing the GIL: a safe snapshot while
    # kopf's event loop updates the index (CPython with its GIL; not free-threaded builds).
    items = list(store) if store is not None else []
    return copy.deepcopy(items[0]) if items else None


class WatchedCluster:
    def __init__(
        self,
        api: KubeCluster,
        indices: Mapping[str, Mapping[Any, Any]],
        every: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.indices = indices
        self.every = every
        self.clock = clock
        self._lock = threading.Lock()
        self._created: dict[Key, tuple[float, dict[str, Any]]] = {}
        self._scraped: dict[str, tuple[float, str | None]] = {}
        self._refusals: dict[Key, tuple[float, tuple[str, str] | None]] = {}
        self._pruned = clock()

    # ------------------------------------------------------------------ reads, from the watches

    def run(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return _first(self.indices.get(RUN_INDEX[kind]), (namespace, name))

    def get_training_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.run(TRAINING_KIND, namespace, name)

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        job = _first(self.indices.get(JOB_INDEX), (namespace, name))
        with self._lock:
            made = self._created.get((namespace, name))
            if job is not None or (made and self.clock() - made[0] > CREATED_GRACE_S):
                self._created.pop((namespace, name), None)
                return job
        return copy.deepcopy(made[1]) if made else None

    def list_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        store = self.indices.get(POD_INDEX, {}).get((namespace, job_name))
        return copy.deepcopy(list(store)) if store is not None else []

    # ------------------------------------------------------------------ bounded calls

    def scrape(self, url: str) -> str | None:
        """The trainer's /metrics, read at most once per `every` seconds; between reads, the last answer."""
        now = self.clock()
        with self._lock:
            last = self._scraped.get(url)
        if last is not None and now - last[0] < self.every:
            return last[1]
        text = self.api.scrape(url)
        with self._lock:
            self._scraped[url] = (now, text)
            if now - self._pruned > 4 * self.every:  # finished runs are not asked again
                self._scraped = {u: v for u, v in self._scraped.items() if now - v[0] < 4 * self.every}
                self._refusals = {j: v for j, v in self._refusals.items() if now - v[0] < 4 * self.every}
                self._pruned = now
        return text

    def pod_create_failure(self, namespace: str, job_name: str) -> tuple[str, str] | None:
        now = self.clock()
        with self._lock:
            last = self._refusals.get((namespace, job_name))
        if last is not None and now - last[0] < self.every:
            return last[1]
        failure = self.api.pod_create_failure(namespace, job_name)
        with self._lock:
            self._refusals[(namespace, job_name)] = (now, failure)
        return failure

    def forget(self, namespace: str, job_name: str) -> None:
        """Drop what is remembered for a Job (its run is gone)."""
        with self._lock:
            self._refusals.pop((namespace, job_name), None)
            self._created.pop((namespace, job_name), None)

    # ------------------------------------------------------------------ writes, to the API

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        made = self.api.create(obj)
        if obj["kind"] == "Job":
            meta = obj["metadata"]
            with self._lock:
                self._created[(meta["namespace"], meta["name"])] = (self.clock(), made)
        return made

    def patch_job(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.api.patch_job(namespace, name, spec)
