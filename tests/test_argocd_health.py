"""The Argo CD health check the chart ships (helm/nanochat-operator/files/argocd/health.lua), run in
Lua 5.1 (Argo CD's gopher-lua dialect) on statuses the operator's own reconciler writes."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from lupa import lua51

from nanochat_operator.reconcile import reconcile_eval, reconcile_training
from nanochat_operator.settings import OperatorConfig
from nanochat_operator.status import dump_status

from operator_support import FakeCluster, adopt, succeeded_eval_pod, tr

SCRIPT = (Path(__file__).parent.parent / "helm/nanochat-operator/files/argocd/health.lua").read_text()
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) as Argo CD computes them: the script with the object as global `obj`."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(copy.deepcopy(obj), recursive=True)
    hs = lua.execute(SCRIPT)
    return hs["status"], hs["message"]


def reconciled(cluster: FakeCluster, obj: dict[str, Any], fn=reconcile_training) -> dict[str, Any]:
    """One reconcile, its status stored on the object as kopf would."""
    obj["status"] = dump_status(fn(cluster, obj, OperatorConfig(trainer_image="t"), now=NOW, adopt=adopt).status)
    return obj


def running(index: int) -> dict[str, Any]:
    annotations = {"batch.kubernetes.io/job-completion-index": str(index)}
    status = {"phase": "Running", "podIP": "10.0.0.1"}
    return {"metadata": {"name": f"p{index}", "annotations": annotations}, "status": status}


def test_a_run_goes_progressing_then_healthy():
    c = FakeCluster()
    run = tr()
    assert health(run) == ("Progressing", "waiting for the nanochat operator")
    status, message = health(reconciled(c, run))
    assert status == "Progressing" and message.startswith("Starting"), message
    c.pods["demo-train"] = [running(0)]
    c.metrics = "nanochat_trainer_step 40\nnanochat_trainer_total_steps 100\n"
    status, message = health(reconciled(c, run))
    assert status == "Progressing" and message.endswith("(step 40/100)"), message
    run["metadata"]["generation"] = 2  # an edit the operator has not seen yet
    assert health(run)[1] == "waiting for the nanochat operator to observe generation 2"
    c.set_job("demo-train", "Complete", pods=[])
    assert health(reconciled(c, run))[0] == "Healthy"


@pytest.mark.parametrize(
    "make,expected,needle",
    [
        (lambda c: tr(trainer={"preset": "tiny", "steps": 0}), "Degraded", "InvalidSpec"),
        (lambda c: tr(suspend=True), "Suspended", "Suspended"),
        (lambda c: tr(queueName="gpu"), "Progressing", "waiting for Kueue"),
    ],
)
def test_failed_suspended_and_queued_runs(make, expected, needle):
    c = FakeCluster()
    status, message = health(reconciled(c, make(c)))
    assert status == expected and needle in message, (status, message)


def test_a_failed_job_and_refused_pods_are_degraded():
    c = FakeCluster()
    run = reconciled(c, tr())
    c.create_failures["demo-train"] = ('violates PodSecurity "restricted:latest"', "2026-01-01T00:00:05Z")
    status, message = health(reconciled(c, run))
    assert status == "Degraded" and message.startswith("PodsRefused: "), message
    c.set_job("demo-train", "Failed", pods=[])
    assert health(reconciled(c, run))[0] == "Degraded"


def test_an_eval_run_is_healthy_once_scored():
    c = FakeCluster()
    c.runs["demo"] = tr(status={"phase": "Succeeded", "jobName": "demo-train"})
    ev = {
        "apiVersion": "nanochat.io/v1alpha1",
        "kind": "EvalRun",
        "metadata": {"name": "ev", "namespace": "ml", "uid": "uid-ev", "generation": 1},
        "spec": {"model": {"endpoint": {"url": "http://t:8000/v1", "model": "m"}}},
    }
    assert health(reconciled(c, ev, reconcile_eval))[0] == "Progressing"
    pod = succeeded_eval_pod('NANOCHAT_RESULT {"scores":{"1":0.25},"problems":164,"samples":1}')
    c.set_job("ev-eval", "Complete", pods=[pod])
    status, _ = health(reconciled(c, ev, reconcile_eval))
    assert status == "Healthy"
