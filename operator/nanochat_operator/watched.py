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
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

from nanochat_trainer.contract import TRAINING_KIND

from .kube import KubeCluster

Key = tuple[str, str]  # (namespace, name)
JOB_INDEX, POD_INDEX = "jobs", "pods"  # kopf index ids (handlers.py)
RUN_INDEX = {TRAINING_KIND: "trainingruns", "EvalRun": "evalruns"}
T = TypeVar("T")
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
        self._answers: dict[Hashable, tuple[float, Any]] = {}  # bounded calls: key -> (when asked, answer)
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
        return self._at_most_every(("scrape", url), lambda: self.api.scrape(url))

    def pod_create_failure(self, namespace: str, job_name: str) -> tuple[str, str] | None:
        return self._at_most_every(
            ("refused", namespace, job_name), lambda: self.api.pod_create_failure(namespace, job_name)
        )

    def _at_most_every(self, key: Hashable, fetch: Callable[[], T]) -> T:
        """fetch()'s answer, asked at most once per `every` seconds for `key`; in between, the last
        answer. Answers no one asked for in four intervals (finished runs') are dropped."""
        now = self.clock()
        with self._lock:
            last = self._answers.get(key)
        if last is not None and now - last[0] < self.every:
            return last[1]
        answer = fetch()
        with self._lock:
            self._answers[key] = (now, answer)
            if now - self._pruned > 4 * self.every:
                self._answers = {k: v for k, v in self._answers.items() if now - v[0] < 4 * self.every}
                self._pruned = now
        return answer

    def forget(self, namespace: str, job_name: str) -> None:
        """Drop what is remembered for a Job (its run is gone)."""
        with self._lock:
            self._answers.pop(("refused", namespace, job_name), None)
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
