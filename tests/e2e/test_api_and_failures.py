"""The chart on a real API server: CRDs, RBAC, validation, and how failures propagate.

Runs here are played by kwok (e2e/kwok-stages.yaml), so they cost no CPU; the Job
controller, scheduler, operator and API server are real.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.cluster import KWOK_ANNOTATION, ControlPlane
from e2e.operator_local import ChartOperator, events_of, wait_phase

pytestmark = pytest.mark.usefixtures("kwok_nodes")

KWOK_PLACEMENT = {
    "gpusPerNode": 1,
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": KWOK_ANNOTATION, "operator": "Exists", "effect": "NoSchedule"}],
}


def training_run(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    body = {"trainer": {"preset": "nano-125M", "steps": 100}, "resources": dict(KWOK_PLACEMENT)}
    body.update(spec)
    return {
        "apiVersion": "nanochat.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def test_chart_installs_crds_and_the_operator_runs_with_its_rbac(
    control_plane: ControlPlane, operator: ChartOperator
) -> None:
    sa = operator.deployment()["spec"]["template"]["spec"]["serviceAccountName"]
    who = f"system:serviceaccount:{operator.namespace}:{sa}"
    can = lambda *a: control_plane.kubectl("auth", "can-i", *a, "--as", who, check=False).stdout.strip()  # noqa: E731
    assert can("create", "jobs.batch", "-n", "default") == "yes"
    assert can("patch", "trainingruns.nanochat.io/status", "-n", "default") == "yes"
    assert can("delete", "nodes") == "no"  # least privilege: nothing beyond what it needs


def test_bad_manifest_is_refused_by_the_api_server(
    control_plane: ControlPlane, operator: ChartOperator, namespace: str
) -> None:
    bad = training_run("bad-steps", namespace)
    bad["spec"]["trainer"]["steps"] = 0
    out = control_plane.apply(bad, check=False)
    assert out.returncode != 0 and "spec.trainer.steps" in out.stderr, out.stderr
    cel = training_run("bad-env", namespace, env=[{"name": "PET_NNODES", "value": "4"}])
    out = control_plane.apply(cel, check=False)
    assert out.returncode != 0 and "PET_" in out.stderr, out.stderr  # a CEL rule, evaluated by the API server
    assert control_plane.kubectl("get", "trainingruns", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_failed_source_fails_the_dependent_run_with_a_reason(
    control_plane: ControlPlane, operator: ChartOperator, volumes: Any, namespace: str
) -> None:
    # Exit code 2 is the trainer's "bad input" code: podFailurePolicy fails the Job at once.
    storage = {"size": "10Gi"}
    source = training_run("src", namespace, storage=storage, env=[{"name": "NANOCHAT_KWOK_EXIT_CODE", "value": "2"}])
    child = training_run("child", namespace, storage=storage, init={"fromTrainingRun": "src"})
    control_plane.apply([source, child])
    src = wait_phase(control_plane, "trainingrun", "src", {"Failed", "Succeeded"}, 120, namespace, operator)
    assert src["status"]["phase"] == "Failed"
    failed = next(c for c in src["status"]["conditions"] if c["type"] == "Failed")
    assert "exit code 2" in failed["message"] or "PodFailurePolicy" in failed["reason"], failed
    dep = wait_phase(control_plane, "trainingrun", "child", {"Failed", "Succeeded"}, 60, namespace, operator)
    assert dep["status"]["phase"] == "Failed"
    cond = next(c for c in dep["status"]["conditions"] if c["type"] == "Failed")
    assert "src" in cond["message"], cond
    assert control_plane.kubectl("get", "job", "child-train", "-n", namespace, check=False).returncode != 0
    reasons = [e["reason"] for e in events_of(control_plane, namespace, "child")]
    assert "Failed" in reasons or cond["reason"] in reasons, reasons
    # The operator's own metrics counted those reconciles and see both runs Failed in this namespace.
    samples = _samples(operator.metrics())
    assert samples[("nanochat_reconcile_total", (("kind", "TrainingRun"), ("result", "ok")))] >= 2
    assert samples[("nanochat_runs", (("kind", "TrainingRun"), ("namespace", namespace), ("phase", "Failed")))] == 2


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_kwok_run_goes_through_the_phases(control_plane: ControlPlane, operator: ChartOperator, namespace: str) -> None:
    control_plane.apply(training_run("ok", namespace))
    done = wait_phase(control_plane, "trainingrun", "ok", {"Succeeded", "Failed"}, 120, namespace, operator)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"])
    phases = [
        e["reason"]
        for e in events_of(control_plane, namespace, "ok")
        if e["reason"] in ("Pending", "Starting", "Running", "Succeeded")
    ]
    assert phases[-2:] == ["Running", "Succeeded"], phases
