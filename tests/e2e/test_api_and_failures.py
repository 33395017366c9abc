"""The chart on a real API server: CRDs, RBAC, validation, and how failures propagate.

Runs here are played by kwok (e2e/kwok-stages.yaml), so they cost no CPU; the Job
controller, scheduler, operator and API server are real.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kubernetes import config
from prometheus_client.parser import text_string_to_metric_families

from e2e.cluster import KWOK_ANNOTATION, ControlPlane
from e2e.operator_local import ChartOperator, events_of, wait_phase
from nanochat_operator.kube import KubeCluster
from nanochat_operator.reconcile import AlreadyExists

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
    # What a create finds in place is read back (whose it is): every kind it creates is readable.
    for kind in ("jobs.batch", "configmaps", "services", "persistentvolumeclaims", "networkpolicies.networking.k8s.io"):
        assert can("get", kind, "-n", "default") == "yes", kind


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
    gpus = training_run("bad-gpus", namespace, pod={"extraResources": {"nvidia.com/gpu": "8", "rdma/ib": "1"}})
    out = control_plane.apply(gpus, check=False)
    assert out.returncode != 0 and "set nvidia.com/gpu as resources.gpusPerNode" in out.stderr, out.stderr
    greedy = {
        "apiVersion": "nanochat.io/v1alpha1",
        "kind": "EvalRun",
        "metadata": {"name": "greedy-k10", "namespace": namespace},
        "spec": {"model": {"trainingRun": "x"}, "samplesPerProblem": 10, "k": [1, 10]},
    }
    out = control_plane.apply(greedy, check=False)
    assert out.returncode != 0 and "greedy completions are identical" in out.stderr, out.stderr
    assert control_plane.kubectl("get", "trainingruns", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_creating_what_exists_says_whose_it_is(control_plane: ControlPlane, namespace: str) -> None:
    """The operator's client reads back what a create found in place (409), so a run can tell its own
    (an earlier attempt) from a deleted run's not yet collected."""
    api = KubeCluster(config.new_client_from_config(config_file=str(control_plane.kubeconfig)))
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "taken", "namespace": namespace}}
    made = api.create(cm)
    with pytest.raises(AlreadyExists) as found:
        api.create(cm)
    assert found.value.existing is not None and found.value.existing["metadata"]["uid"] == made["metadata"]["uid"]


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


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def test_pods_refused_by_pod_security_are_reported_on_the_run(
    control_plane: ControlPlane, operator: ChartOperator, namespace: str
) -> None:
    """The namespace enforces Pod Security "restricted": the operator's own pods pass (every other test
    runs under it); a run whose spec.pod adds a capability is refused by admission, and the run says so
    instead of sitting in Starting with "0/1 pods running"."""
    control_plane.apply(
        training_run("caps", namespace, pod={"containerSecurityContext": {"capabilities": {"add": ["NET_ADMIN"]}}})
    )

    def stalled() -> dict[str, Any] | None:
        obj = control_plane.get("trainingrun", "caps", "-n", namespace)
        cond = _condition(obj, "Stalled")
        return obj if cond and cond["reason"] == "PodsRefused" else None

    obj = control_plane.wait_for(stalled, 90, "the run Stalled with PodsRefused")
    running = _condition(obj, "Running")
    assert obj["status"]["phase"] == "Starting" and running["reason"] == "PodsRefused"
    assert 'violates PodSecurity "restricted' in running["message"] and "NET_ADMIN" in running["message"], running
    assert "PodsRefused" in [e["reason"] for e in events_of(control_plane, namespace, "caps")]


def test_a_live_runs_spec_is_immutable_and_a_deleted_run_keeps_its_storage(
    control_plane: ControlPlane, operator: ChartOperator, volumes: Any, namespace: str
) -> None:
    """GitOps: an edit the run cannot apply is refused by the API server (so `kubectl apply` and Argo CD
    fail loudly), spec.suspend still works, Ready says when it is done, and a prune keeps the PVC."""
    run = training_run("keep", namespace, storage={"size": "1Gi"}, suspend=True)
    control_plane.apply(run)
    wait_phase(control_plane, "trainingrun", "keep", {"Pending"}, 60, namespace, operator)
    edited = training_run("keep", namespace, storage={"size": "1Gi"}, suspend=True)
    edited["spec"]["trainer"]["steps"] = 200
    out = control_plane.apply(edited, check=False)
    assert out.returncode != 0 and "spec.trainer cannot change once the run exists" in out.stderr, out.stderr
    control_plane.kubectl(
        "patch", "trainingrun", "keep", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    control_plane.kubectl("wait", "trainingrun/keep", "-n", namespace, "--for=condition=Ready", "--timeout=120s")
    assert control_plane.get("trainingrun", "keep", "-n", namespace)["status"]["phase"] == "Succeeded"

    control_plane.kubectl("delete", "trainingrun", "keep", "-n", namespace, "--wait=true", "--timeout=60s")
    control_plane.wait_for(
        lambda: control_plane.kubectl("get", "job", "keep-train", "-n", namespace, check=False).returncode != 0,
        60,
        "the run's Job garbage-collected",
    )
    pvc = control_plane.get("pvc", "keep-storage", "-n", namespace)
    assert pvc["metadata"]["labels"]["nanochat.io/training-run"] == "keep" and not pvc["metadata"].get(
        "ownerReferences"
    )


def test_runs_carry_no_finalizer_so_they_delete_without_the_operator(
    control_plane: ControlPlane, operator: ChartOperator, namespace: str
) -> None:
    """The operator watches and needs no say in a deletion: a live run has no finalizer, the one that
    timer-driven versions left is taken off, and with the operator gone a run still deletes."""
    cp = control_plane
    legacy = training_run("legacy", namespace, suspend=True)
    legacy["metadata"]["finalizers"] = ["nanochat.io/kopf-finalizer"]
    cp.apply([training_run("plain", namespace), legacy])
    wait_phase(cp, "trainingrun", "plain", {"Running", "Succeeded"}, 120, namespace, operator)
    assert not cp.get("trainingrun", "plain", "-n", namespace)["metadata"].get("finalizers")
    cp.wait_for(
        lambda: not cp.get("trainingrun", "legacy", "-n", namespace)["metadata"].get("finalizers"),
        60,
        "the earlier versions' finalizer removed",
    )
    operator.stop()
    try:
        cp.kubectl("delete", "trainingrun", "plain", "legacy", "-n", namespace, "--wait=true", "--timeout=30s")
    finally:
        operator.start()


def pod_group_crd_standin() -> dict[str, Any]:
    """scheduler-plugins' PodGroup CRD as far as the operator uses it. A stand-in: the real manifest
    (kubernetes-sigs/scheduler-plugins) is not on any registry this machine reaches."""
    prop = {"type": "object", "properties": {}}
    spec = {
        "type": "object",
        "required": ["minMember"],
        "properties": {
            "minMember": {"type": "integer", "format": "int32"},
            "minResources": {"type": "object", "additionalProperties": {"x-kubernetes-int-or-string": True}},
            "scheduleTimeoutSeconds": {"type": "integer", "format": "int32"},
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "podgroups.scheduling.x-k8s.io"},
        "spec": {
            "group": "scheduling.x-k8s.io",
            "names": {"kind": "PodGroup", "plural": "podgroups", "singular": "podgroup", "listKind": "PodGroupList"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": spec, "status": prop}}},
                }
            ],
        },
    }


def test_gang_runs_get_a_pod_group_and_a_missing_scheduler_is_named(
    control_plane: ControlPlane, operator: ChartOperator, namespace: str
) -> None:
    """spec.gang: the PodGroup is made (through the chart's RBAC, owned by the run) before the Job,
    whose pods carry its label; asking for a gang scheduler the cluster lacks fails the run naming it."""
    cp = control_plane
    cp.apply(pod_group_crd_standin())
    cp.kubectl("wait", "crd/podgroups.scheduling.x-k8s.io", "--for=condition=Established", "--timeout=60s")
    two_nodes = {**KWOK_PLACEMENT, "nodes": 2}
    cp.apply(
        [
            training_run("gang", namespace, resources=two_nodes, gang={"scheduler": "coscheduling"}),
            training_run("nogang", namespace, gang={"scheduler": "volcano"}),
        ]
    )
    wait_phase(cp, "trainingrun", "gang", {"Running", "Succeeded"}, 120, namespace, operator)
    group = cp.get("podgroups.scheduling.x-k8s.io", "gang-train", "-n", namespace)
    assert group["spec"]["minMember"] == 2 and group["metadata"]["ownerReferences"][0]["name"] == "gang"
    pods = cp.get("pods", "-n", namespace, "-l", "scheduling.x-k8s.io/pod-group=gang-train")["items"]
    assert len(pods) == 2
    failed = wait_phase(cp, "trainingrun", "nogang", {"Failed"}, 60, namespace, operator)
    message = _condition(failed, "Failed")["message"]
    assert "does not serve scheduling.volcano.sh/v1beta1" in message, message

    # A PodGroup of the same name that is not the run's (a deleted run's, not yet collected): the run waits
    # for it to go (the operator reads it through the chart's RBAC), then makes its own.
    stray = {
        "apiVersion": "scheduling.x-k8s.io/v1alpha1",
        "kind": "PodGroup",
        "metadata": {"name": "late-train", "namespace": namespace},
        "spec": {"minMember": 9},
    }
    cp.apply([stray, training_run("late", namespace, resources=two_nodes, gang={"scheduler": "coscheduling"})])
    time.sleep(5)
    assert not cp.get("jobs", "-n", namespace, "-l", "app.kubernetes.io/instance=late")["items"]
    assert "PodGroup late-train exists but does not belong to this run" in operator.log_path.read_text()
    cp.kubectl("delete", "podgroups.scheduling.x-k8s.io", "late-train", "-n", namespace)
    wait_phase(cp, "trainingrun", "late", {"Running", "Succeeded"}, 120, namespace, operator)
    group = cp.get("podgroups.scheduling.x-k8s.io", "late-train", "-n", namespace)
    assert group["spec"]["minMember"] == 2 and group["metadata"]["ownerReferences"][0]["name"] == "late"
