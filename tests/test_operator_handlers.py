"""The operator's wiring without an API server: what kopf is asked to do (indexes and event
handlers, nothing that needs a finalizer), how events map to runs, and the reconcile worker's
writes, retries and schedule on an in-memory cluster read through `WatchedCluster`. The same
code against a real API server: every test in tests/e2e/."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import kopf
import pytest
from kopf._cogs.aiokits import aiotoggles as kopf_toggles  # kopf's own peering decision, below
from kopf._core.engines import peering as kopf_peering

from nanochat_operator import controller, handlers
from nanochat_operator.controller import CONFLICT_DELAY, ERROR_DELAYS, Controller
from nanochat_operator.metrics import METRICS, OperatorMetrics
from nanochat_operator.settings import OperatorConfig
from nanochat_operator.watched import WatchedCluster
from nanochat_operator.workqueue import WorkQueue

from operator_support import FakeCluster, adopt, tr

KEY = ("TrainingRun", "ml", "hdemo")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class World:
    """A fake API server, the indexes kopf would fill from it, and a controller over both."""

    def __init__(self, run: dict, interval: float = 15.0) -> None:
        self.api = FakeCluster()
        self.clock = Clock()
        self.run = run
        self.indices: dict[str, dict] = {"trainingruns": {}, "evalruns": {}, "jobs": {}, "pods": {}}
        self.queue: WorkQueue = WorkQueue(clock=self.clock)
        self.watched = WatchedCluster(self.api, self.indices, every=interval, clock=self.clock)
        config = OperatorConfig(interval=interval, max_workers=1)
        self.controller = Controller(self.watched, self.api, config, adopt, self.queue)  # type: ignore[arg-type]
        self.sync()

    def sync(self) -> None:
        """What the watches would have delivered by now: the run, its Jobs and its pods."""
        meta = self.run["metadata"]
        meta.setdefault("resourceVersion", "1")
        self.indices["trainingruns"] = {(meta["namespace"], meta["name"]): [self.run]}
        self.indices["jobs"] = {(k[1], k[2]): [o] for k, o in self.api.objects.items() if k[0] == "Job"}
        self.indices["pods"] = {("ml", job): pods for job, pods in self.api.pods.items()}

    def due(self, after: float) -> list:
        """Keys the queue hands out `after` seconds from now."""
        self.clock.t += after
        out = []
        while (k := self.queue.get(timeout=0)) is not None:
            out.append(k)
            self.queue.done(k)
        return out


def test_kopf_is_asked_for_indexes_and_event_handlers_only_so_runs_get_no_finalizer():
    reg = kopf.get_default_registry()
    assert {h.id for h in reg._indexing.get_all_handlers()} == {"trainingruns", "evalruns", "jobs", "pods"}
    assert {h.id for h in reg._watching.get_all_handlers()} == {
        "training-event",
        "eval-event",
        "job-event",
        "pod-event",
    }
    # Timers, daemons and mandatory deletion handlers are what make kopf add a finalizer.
    assert reg._spawning.get_all_handlers() == [] and reg._changing.get_all_handlers() == []


def test_peered_replicas_rank_by_start_so_one_runs_and_a_newcomer_stands_by():
    """kopf pauses every peer, itself too, while another live one has its priority: replicas left at
    the default 0 all stood by. kopf's own peering decides here, on the status two replicas wrote."""
    standalone = kopf.OperatorSettings()
    handlers.peering(standalone, OperatorConfig())
    assert standalone.peering.standalone is True
    replicas = {"replica-a": kopf.OperatorSettings(), "replica-b": kopf.OperatorSettings()}
    for settings in replicas.values():
        handlers.peering(settings, OperatorConfig(peering="nanochat"))
        time.sleep(0.002)
    now = datetime.now(UTC).isoformat()
    status = {me: {"priority": s.peering.priority, "lifetime": 60, "lastseen": now} for me, s in replicas.items()}
    event = {"type": "MODIFIED", "object": {"metadata": {"name": "nanochat"}, "status": status}}
    resource = kopf.Resource("kopf.dev", "v1", "clusterkopfpeerings", namespaced=False)

    async def paused(me: str) -> bool:
        toggle = kopf_toggles.Toggle(False)
        task = asyncio.create_task(
            kopf_peering.process_peering_event(
                raw_event=event,  # type: ignore[arg-type]
                namespace=None,
                resource=resource,
                identity=kopf_peering.Identity(me),
                settings=replicas[me],
                autoclean=False,
                conflicts_found=toggle,
                stream_pressure=asyncio.Event(),
            )
        )
        await asyncio.sleep(0.1)  # it decides, then sleeps until a peer would expire
        task.cancel()
        return toggle.is_on()

    # The one started first runs: a replica that starts later (a rollout) does not pause it.
    assert [me for me in replicas if not asyncio.run(paused(me))] == ["replica-a"]


def test_child_events_queue_their_run(monkeypatch):
    queue: WorkQueue = WorkQueue()
    monkeypatch.setattr(handlers, "QUEUE", queue)
    trainer = {"app.kubernetes.io/name": "nanochat-trainer", "batch.kubernetes.io/job-name": "demo-train"}
    pod_labels = {**trainer, "nanochat.io/training-run": "demo"}
    # kopf.adopt copies the run's own labels onto its Job: an EvalRun labelled as a training run.
    eval_job = {"app.kubernetes.io/name": "nanochat-eval", "nanochat.io/eval-run": "score"}
    eval_job["nanochat.io/training-run"] = "demo"
    asyncio.run(handlers.child_event(namespace="ml", labels=pod_labels))
    asyncio.run(handlers.child_event(namespace="ml", labels=eval_job))
    asyncio.run(handlers.child_event(namespace="ml", labels={"app": "not-ours"}))
    asyncio.run(handlers.training_event(type="MODIFIED", namespace="ml", name="demo"))  # coalesces
    assert [queue.get(timeout=0), queue.get(timeout=0), queue.get(timeout=0)] == [
        ("TrainingRun", "ml", "demo"),
        ("EvalRun", "ml", "score"),
        None,
    ]


def test_a_deleted_run_is_forgotten_by_the_worker_and_a_new_one_of_its_name_is_not(monkeypatch):
    w = World(tr("hdemo"))
    w.controller.process(KEY)
    assert KEY in METRICS.runs._phases  # counted in nanochat_runs
    monkeypatch.setattr(handlers, "QUEUE", w.queue)
    asyncio.run(handlers.training_event(type="DELETED", namespace="ml", name="hdemo"))
    # The old object's DELETED arrives after a new run of the name was indexed: nothing is forgotten.
    w.controller.process(w.queue.get(timeout=0))
    w.queue.done(KEY)
    assert w.due(15) == [KEY]
    w.indices["trainingruns"] = {}  # kopf's index drops a deleted object before its event is handled
    asyncio.run(handlers.training_event(type="DELETED", namespace="ml", name="hdemo"))
    w.controller.process(w.queue.get(timeout=0))
    w.queue.done(KEY)
    assert w.due(3600) == [] and KEY not in METRICS.runs._phases


def test_a_reconcile_writes_the_status_posts_its_events_and_looks_again_after_the_interval():
    w = World(tr("hdemo", status={"kopf": {"progress": {}}}))
    w.controller.process(KEY)
    plural, name, patch = w.api.statuses[-1]
    assert (plural, name) == ("trainingruns", "hdemo")
    assert patch["phase"] == "Starting" and patch["jobName"] == "hdemo-train" and "kopf" not in patch
    assert ("hdemo", "Normal", "Created") in w.api.events
    text = METRICS.exposition().decode()
    assert 'nanochat_runs{kind="TrainingRun",namespace="ml",phase="Starting"}' in text
    assert w.due(14.9) == [] and w.due(0.2) == [KEY]


def test_a_failure_is_posted_once_however_often_the_run_is_looked_at():
    w = World(tr("hdemo", trainer={"preset": "no-such-preset"}))
    w.controller.process(KEY)
    assert w.api.statuses[-1][2]["phase"] == "Failed"
    w.run["status"] = w.api.statuses[-1][2]  # the watch brings the written status back
    w.run["metadata"]["resourceVersion"] = "2"
    w.controller.process(KEY)
    w.controller.process(KEY)
    assert [e for e in w.api.events if e[1] == "Warning"] == [("hdemo", "Warning", "InvalidSpec")]


def test_a_job_created_but_not_yet_watched_is_not_created_twice():
    w = World(tr("hdemo"))
    w.controller.process(KEY)
    w.run["status"] = {"phase": "Starting"}  # the run's own update arrived; the Job's has not
    w.api.events.clear()
    w.controller.process(KEY)
    assert w.api.calls.count("create Job hdemo-train") == 1 and ("hdemo", "Normal", "Created") not in w.api.events


def test_a_status_computed_from_a_stale_copy_is_not_written_and_its_events_wait():
    w = World(tr("hdemo"))
    w.api.conflict = True
    w.controller.process(KEY)
    assert w.api.events == [] and w.due(CONFLICT_DELAY) == [KEY]


def test_a_finished_run_is_not_looked_at_again_until_it_changes():
    w = World(tr("hdemo"))
    w.controller.process(KEY)
    assert w.due(15) == [KEY]  # live: the resync
    w.api.set_job("hdemo-train", "Complete", pods=[])
    w.sync()
    w.run["metadata"]["resourceVersion"] = "2"
    w.controller.process(KEY)
    assert w.api.statuses[-1][2]["phase"] == "Succeeded"
    assert w.due(3600) == []


def test_a_job_of_someone_else_waits_and_a_bug_backs_off(monkeypatch, caplog):
    w = World(tr("hdemo"))
    w.api.objects[("Job", "ml", "hdemo-train")] = {
        "metadata": {"name": "hdemo-train", "ownerReferences": [{"uid": "someone-else"}]},
        "spec": {},
    }
    w.sync()
    w.controller.process(KEY)
    assert w.api.statuses == [] and w.due(29) == [] and w.due(1) == [KEY]

    def bug(*_a, **_k):
        raise KeyError("status")

    monkeypatch.setitem(__import__("nanochat_operator.controller").controller.RECONCILERS, "TrainingRun", bug)
    with caplog.at_level(logging.ERROR, logger="nanochat_operator.controller"):
        w.controller.process(KEY)
        w.controller.process(KEY)
    assert "KeyError" in caplog.text and f"(attempt 2); retrying in {ERROR_DELAYS[1]} s" in caplog.text
    assert w.due(ERROR_DELAYS[0] - 0.1) == [] and w.due(0.2) == [KEY]  # the earlier schedule stands


@pytest.mark.parametrize("port", [0, 9090])
def test_a_run_whose_trainer_serves_no_metrics_exports_no_progress_time(monkeypatch, port):
    """With spec.trainer.metrics.port: 0 its step is never read: a progress time would stay the run's
    start, and NanochatTrainingNoProgress fire on a healthy run once the window passed."""
    metrics = OperatorMetrics()
    monkeypatch.setattr(controller, "METRICS", metrics)
    w = World(tr("hdemo", trainer={"preset": "tiny", "metrics": {"port": port}}))
    w.controller.process(KEY)
    w.run["status"] = w.api.statuses[-1][2]
    w.run["metadata"]["resourceVersion"] = "2"
    index = {"batch.kubernetes.io/job-completion-index": "0"}
    pod0 = {"metadata": {"name": "p0", "annotations": index}, "status": {"phase": "Running", "podIP": "10.1.0.5"}}
    w.api.pods["hdemo-train"] = [pod0]
    w.sync()
    w.controller.process(KEY)
    assert w.api.statuses[-1][2]["phase"] == "Running"
    labels = {"namespace": "ml", "name": "hdemo"}
    progress = metrics.registry.get_sample_value("nanochat_training_last_progress_timestamp_seconds", labels)
    assert (progress is None) == (port == 0)


def test_reads_come_from_the_indexes_and_scrapes_are_bounded_per_interval():
    w = World(tr("hdemo"), interval=10)
    w.api.objects[("Job", "ml", "x-train")] = {"metadata": {"name": "x-train"}}
    w.api.pods["x-train"] = [{"metadata": {"name": "x-train-0"}}]
    assert w.watched.get_job("ml", "x-train") is None  # not watched yet: not there
    w.sync()
    assert w.watched.get_job("ml", "x-train")["metadata"]["name"] == "x-train"
    assert [p["metadata"]["name"] for p in w.watched.list_pods("ml", "x-train")] == ["x-train-0"]
    assert w.api.calls == []  # no API reads
    w.api.metrics = "nanochat_trainer_step 5"
    assert w.watched.scrape("http://10.0.0.1:9090/metrics") == "nanochat_trainer_step 5"
    w.api.metrics = "nanochat_trainer_step 6"
    w.clock.t = 9.9
    assert w.watched.scrape("http://10.0.0.1:9090/metrics") == "nanochat_trainer_step 5"
    w.clock.t = 10
    assert w.watched.scrape("http://10.0.0.1:9090/metrics") == "nanochat_trainer_step 6"
    assert w.api.calls.count("scrape http://10.0.0.1:9090/metrics") == 2


@pytest.mark.parametrize("grace_passed", [False, True])
def test_a_created_job_is_answered_from_memory_until_watched_or_a_minute_passed(grace_passed):
    w = World(tr("hdemo"))
    w.watched.create({"kind": "Job", "metadata": {"name": "j", "namespace": "ml"}})
    w.clock.t = 61 if grace_passed else 59
    assert (w.watched.get_job("ml", "j") is None) is grace_passed
