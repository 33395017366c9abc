"""The Helm chart: lint, render with default and non-default values, validate the output.

helm comes from e2e/tools.sh (built once with `go install` into a cache outside the
repo, pinned in e2e/versions.env); set HELM=/path/to/helm to use another. Rendered core
objects are validated with kubernetes-validate (Kubernetes 1.31, strict). The
ServiceMonitor, PodMonitor and PrometheusRule are prometheus-operator CRD types that
kubernetes-validate has no schema for: they are checked structurally here instead.

The default render is compared with tests/snapshots/helm-default.yaml; after an
intended chart change, refresh it with NANOCHAT_UPDATE_SNAPSHOTS=1 pytest tests/test_helm.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from nanochat_operator.metrics import OperatorMetrics
from nanochat_operator.settings import DEFAULT_TRAINER_IMAGE, DEFAULT_VLLM_IMAGE
from nanochat_trainer.contract import GENERATE_REJECTED_BY_REASON, TrainerGauge

from operator_support import built_tool, pinned

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "nanochat-operator"
SNAPSHOT = ROOT / "tests" / "snapshots" / "helm-default.yaml"
K8S = pinned("KUBERNETES_VALIDATE_VERSION")
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # not in kubernetes-validate's schemas

ALL_ON = {
    "watchNamespaces": ["ml", "research"],
    "peering": {"enabled": True, "name": "nanochat"},
    "replicaCount": 2,
    "image": {"tag": "test", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "trainerImage": "registry.local/trainer:9",
    "vllmImage": "registry.local/vllm-openai:1",
    "operator": {"interval": 5, "maxWorkers": 4, "gpuMemoryGiB": 141, "logFormat": "plain", "extraArgs": ["--x"]},
    "serviceAccount": {"create": True, "name": "nano", "annotations": {"a": "b"}},
    "nodeSelector": {"pool": "system"},
    "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
    "podAnnotations": {"p": "q"},
    "podLabels": {"team": "ml"},
    "priorityClassName": "system-cluster-critical",
    "metrics": {
        "service": {"type": "ClusterIP", "annotations": {"prometheus.io/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
        "podMonitor": {"enabled": True, "labels": {"release": "kps"}},
    },
    "prometheusRule": {"enabled": True, "labels": {"release": "kps"}, "noProgressMinutes": 20},
    "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
}


@pytest.fixture(scope="module")
def helm() -> str:
    return built_tool("helm")


def run(helm: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def template(helm: str, values: dict | None, tmp_path: Path) -> str:
    args = ["template", "nanochat", str(CHART), "--namespace", "nanochat"]
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    return run(helm, *args).stdout


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def test_lint_default_and_all_on(helm, tmp_path):
    run(helm, "lint", "--strict", str(CHART))
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(ALL_ON))
    run(helm, "lint", "--strict", str(CHART), "-f", str(path))


def test_default_render_validates_and_matches_snapshot(helm, tmp_path):
    text = template(helm, None, tmp_path)
    objs = docs(text)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    for obj in objs:
        kubernetes_validate.validate(obj, K8S, strict=True)
    args = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    # The chart's default images are the operator's own defaults.
    assert f"--trainer-image={DEFAULT_TRAINER_IMAGE}" in args and f"--vllm-image={DEFAULT_VLLM_IMAGE}" in args
    if os.environ.get("NANOCHAT_UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.exists(), "no snapshot: run with NANOCHAT_UPDATE_SNAPSHOTS=1"
    assert text == SNAPSHOT.read_text(), "chart output changed: review, then NANOCHAT_UPDATE_SNAPSHOTS=1"


def test_all_on_render_validates(helm, tmp_path):
    objs = docs(template(helm, ALL_ON, tmp_path))
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue  # prometheus-operator CRD types: checked below, kubernetes-validate has no schema
        kubernetes_validate.validate(obj, K8S, strict=True)
    assert {o["kind"] for o in objs} >= CRD_KINDS | {"Role", "RoleBinding", "ConfigMap"}
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "research"]
    # Namespaced permissions only in the watched namespaces; the ClusterRole keeps kopf's needs.
    cluster_rules = by_kind(objs, "ClusterRole")[0]["rules"]
    assert not any("jobs" in r["resources"] for r in cluster_rules)
    assert any("clusterkopfpeerings" in r["resources"] for r in cluster_rules) is False  # namespaced peering
    assert any("kopfpeerings" in r["resources"] for r in roles[0]["rules"])
    dep = by_kind(objs, "Deployment")[0]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ml" in args and "--namespace=research" in args and "--peering=nanochat" in args
    assert "--trainer-image=registry.local/trainer:9" in args and "--log-format=plain" in args
    assert "--vllm-image=registry.local/vllm-openai:1" in args
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate" and dep["spec"]["replicas"] == 2
    pm = by_kind(objs, "PodMonitor")[0]
    # Only rank 0 serves metrics: pod 0 of each Indexed Job, not N-1 targets down per multi-node run.
    assert pm["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "nanochat-trainer",
        "batch.kubernetes.io/job-completion-index": "0",
    }
    assert pm["spec"]["namespaceSelector"]["matchNames"] == ["ml", "research"]
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    sm = by_kind(objs, "ServiceMonitor")[0]
    assert sm["metadata"]["labels"]["release"] == "kps" and sm["spec"]["endpoints"][0]["port"] == "metrics"
    # The operator's series carry each run's `namespace`: kept, not renamed to exported_namespace.
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    rules = by_kind(objs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {
        "NanochatRunFailed",
        "NanochatTrainingNoProgress",
        "NanochatReconcileErrors",
        "NanochatOperatorDown",
    }
    assert all(r["expr"].strip() for r in rules)
    assert "> 20 * 60" in next(r["expr"] for r in rules if r["alert"] == "NanochatTrainingNoProgress")
    dash_cm = by_kind(objs, "ConfigMap")[0]
    assert dash_cm["metadata"]["namespace"] == "monitoring"
    dash = json.loads(dash_cm["data"]["nanochat.json"])
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in (
        "nanochat_runs",
        "nanochat_training_loss",
        "nanochat_training_tokens_per_second",
        "nanochat_eval_pass_at_k",
        "nanochat_reconcile_duration_seconds_bucket",
    ):
        assert metric in exprs, metric


def test_crds_off_and_chart_crds_equal_generated(helm, tmp_path):
    assert not by_kind(docs(template(helm, {"crds": {"enabled": False}}, tmp_path)), "CustomResourceDefinition")
    rendered = {
        o["metadata"]["name"]: o for o in by_kind(docs(template(helm, None, tmp_path)), "CustomResourceDefinition")
    }
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert rendered[crd["metadata"]["name"]] == crd, f"chart CRD differs from {path}"
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_rbac_is_least_privilege(helm, tmp_path):
    rules = by_kind(docs(template(helm, None, tmp_path)), "ClusterRole")[0]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    expected = set()
    for res in ("trainingruns", "evalruns"):
        # Watched; patched only to drop the finalizer earlier versions added.
        expected |= {("nanochat.io", res, v) for v in ("list", "watch", "patch")}
        expected.add(("nanochat.io", f"{res}/status", "patch"))
        expected.add(("nanochat.io", f"{res}/finalizers", "update"))  # blockOwnerDeletion on the children
    expected |= {("batch", "jobs", v) for v in ("list", "watch", "create", "patch")}  # read from the watch
    expected |= {("", "pods", v) for v in ("list", "watch")}
    expected |= {("", r, "create") for r in ("configmaps", "services", "persistentvolumeclaims", "events")}
    expected.add(("networking.k8s.io", "networkpolicies", "create"))  # each eval pod's
    # get, for every kind it creates: whose the object a create finds in place is.
    created = [("batch", "jobs"), ("", "configmaps"), ("", "services"), ("", "persistentvolumeclaims")]
    expected |= {(g, r, "get") for g, r in [*created, ("networking.k8s.io", "networkpolicies")]}
    expected |= {
        (g, "podgroups", v) for g in ("scheduling.x-k8s.io", "scheduling.volcano.sh") for v in ("create", "get")
    }
    expected.add(("", "events", "list"))  # a Job's FailedCreate: why its pods are refused
    expected |= {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
    expected |= {("", "namespaces", v) for v in ("list", "watch")}
    assert granted == expected


def test_pod_security(helm, tmp_path):
    dep = by_kind(docs(template(helm, None, tmp_path)), "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = pod["containers"][0]["securityContext"]
    assert c == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    probes = pod["containers"][0]
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize(
    "values",
    [{"operator": {"logFormat": "xml"}}, {"replicaCount": "two"}, {"typo": 1}, {"watchNamespaces": ["Bad_NS"]}],
)
def test_values_schema_refuses_bad_values(helm, tmp_path, values):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    out = run(helm, "template", "x", str(CHART), "-f", str(path), ok=False)
    assert out.returncode != 0 and "schema" in out.stderr.lower()


FREE_FORM = {"resources", "labels", "annotations", "nodeSelector", "podAnnotations", "podLabels", "affinity"}


def test_every_value_is_documented():
    """Each key of values.yaml has a comment line right above it, except the contents of
    free-form maps (resources, labels, ...), which are Kubernetes' own fields."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = stripped.split(":", 1)[0]
        inside_free_form = any(k in FREE_FORM for _, k in stack)
        stack.append((indent, key))
        if not inside_free_form:
            assert i and lines[i - 1].strip().startswith("#"), f"values.yaml:{i + 1} {key!r} has no comment above it"


def test_the_dashboard_queries_only_metrics_that_exist():
    """Every nanochat_* series a panel plots is one the operator or a trainer exports: a renamed
    gauge would leave an empty panel and nothing else failing."""
    families = list(OperatorMetrics().registry.collect())
    exported = {m.metric for m in TrainerGauge} | {f.name + ("_total" if f.type == "counter" else "") for f in families}
    exported.add(GENERATE_REJECTED_BY_REASON)  # the trainer's one labelled gauge (stage generate)
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    queried = {
        name.removesuffix("_bucket")
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"nanochat_[a-z0-9_]+", target["expr"])
    }
    assert queried and queried <= exported, queried - exported
    assert {"nanochat_training_loss", "nanochat_training_val_loss", "nanochat_training_pass_at_1"} <= queried
