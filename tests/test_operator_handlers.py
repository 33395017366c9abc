"""The kopf wiring: registered handlers, the timer filter, and one handler call on a fake
cluster (kopf's Body and Patch objects, no API server)."""

from __future__ import annotations

import kopf
import pytest

from nanochat_operator import handlers
from nanochat_operator.metrics import METRICS

from operator_support import FakeCluster, adopt, tr


def test_handlers_registered_with_distinct_ids():
    reg = kopf.get_default_registry()
    changing = {h.id for h in reg._changing.get_all_handlers()}
    assert {
        "training-create",
        "training-update/spec",
        "training-resume",
        "eval-create",
        "eval-update/spec",
        "eval-resume",
    } <= changing
    timers = {h.id: h for h in reg._spawning.get_all_handlers()}
    assert set(timers) == {"training_tick", "eval_tick"}
    assert timers["training_tick"].interval == handlers.CONFIG.interval


@pytest.mark.parametrize(
    "phase,live", [(None, True), ("Pending", True), ("Running", True), ("Succeeded", False), ("Failed", False)]
)
def test_timer_runs_only_for_live_runs(phase, live):
    body = kopf.Body({"status": {"phase": phase} if phase else {}})
    assert handlers._live(status=body.status) is live


def test_handler_patches_status_posts_events_and_counts(monkeypatch):
    cluster = FakeCluster()
    monkeypatch.setattr(handlers, "_cluster", cluster)
    events = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: events.append((type, reason)))
    monkeypatch.setattr(kopf, "adopt", lambda objs, owner: adopt(objs, owner))
    body = kopf.Body(tr("hdemo", status={"kopf": {"progress": {}}}))
    patch = kopf.Patch()
    handlers.training_changed(body=body, patch=patch)
    assert patch["status"]["phase"] == "Starting" and patch["status"]["jobName"] == "hdemo-train"
    assert patch["status"]["runDir"] == "/data/runs/hdemo" and "kopf" not in patch["status"]
    assert ("Normal", "Created") in events
    text = METRICS.exposition().decode()
    assert 'nanochat_runs{kind="TrainingRun",namespace="ml",phase="Starting"}' in text
    assert 'nanochat_reconcile_total{kind="TrainingRun",result="ok"}' in text


def test_not_owned_job_is_a_temporary_error(monkeypatch):
    cluster = FakeCluster()
    cluster.objects[("Job", "ml", "hdemo-train")] = {
        "metadata": {"name": "hdemo-train", "ownerReferences": [{"uid": "someone-else"}]},
        "spec": {},
    }
    monkeypatch.setattr(handlers, "_cluster", cluster)
    with pytest.raises(kopf.TemporaryError) as err:
        handlers.training_tick(body=kopf.Body(tr("hdemo")), patch=kopf.Patch())
    assert err.value.delay == 30
