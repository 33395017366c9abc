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


def template(
    helm: str, values: dict | None, tmp_path: Path, release: str = "nanochat", namespace: str = "nanochat"
) -> str:
    args = ["template", release, str(CHART), "--namespace", namespace]
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
    [
        {"operator": {"logFormat": "xml"}},
        {"replicaCount": "two"},
        {"typo": 1},
        {"watchNamespaces": ["Bad_NS"]},
        {"metrics": {"serviceMonitor": {"interval": "1.5m"}}},  # no Prometheus duration
        {"metrics": {"podMonitor": {"interval": "30"}}},
    ],
)
def test_values_schema_refuses_bad_values(helm, tmp_path, values):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    out = run(helm, "template", "x", str(CHART), "-f", str(path), ok=False)
    assert out.returncode != 0 and "schema" in out.stderr.lower()


def refused(helm: str, values: dict, tmp_path: Path) -> str:
    """helm's message refusing the values."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    out = run(helm, "template", "x", str(CHART), "-f", str(path), ok=False)
    assert out.returncode != 0
    return out.stderr


def test_more_than_one_replica_is_refused_without_peering(helm, tmp_path):
    """Without peering each replica is a standalone kopf operator: two would reconcile every run twice."""
    assert "needs peering.enabled" in refused(helm, {"replicaCount": 2}, tmp_path)
    objs = docs(template(helm, {"replicaCount": 2, "peering": {"enabled": True}}, tmp_path))
    dep = by_kind(objs, "Deployment")[0]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert dep["spec"]["replicas"] == 2 and "--peering=nanochat" in args


def test_releases_of_one_name_in_two_namespaces_share_no_object(helm, tmp_path):
    """Cluster-scoped objects, and Roles in a watched namespace, are outside the release namespace: named
    after the release alone, a second release of the name took over (or failed on) the first one's."""
    values = {"watchNamespaces": ["ml"]}
    names = []
    for ns in ("team-a", "team-b"):
        objs = docs(template(helm, values, tmp_path, namespace=ns))
        outside = {(o["kind"], o["metadata"]["name"]) for o in objs if o["metadata"].get("namespace") in (None, "ml")}
        outside -= {(o["kind"], o["metadata"]["name"]) for o in by_kind(objs, "CustomResourceDefinition")}
        assert {k for k, _ in outside} == {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
        for binding in by_kind(objs, "ClusterRoleBinding") + by_kind(objs, "RoleBinding"):
            kind = binding["roleRef"]["kind"]
            assert binding["roleRef"]["name"] in {o["metadata"]["name"] for o in by_kind(objs, kind)}
        names.append(outside)
    assert not names[0] & names[1]


def test_a_long_release_name_gives_names_the_api_server_takes(helm, tmp_path):
    """Service names are DNS labels (63 characters): the metrics Service was the 63-character full name
    plus "-metrics". NanochatOperatorDown finds the operator by that name (its targets' job label)."""
    release = "research-cluster-training-operator-production"
    assert len(release) == 45
    values = {"metrics": {"serviceMonitor": {"enabled": True}}, "prometheusRule": {"enabled": True}}
    objs = docs(template(helm, values, tmp_path, release=release))
    for obj in objs:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, K8S, strict=True)
    for svc in by_kind(objs, "Service"):
        assert len(svc["metadata"]["name"]) <= 63, svc["metadata"]["name"]
    (svc,) = [s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith("-metrics")]
    rules = by_kind(objs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"]
    down = next(r["expr"] for r in rules if r["alert"] == "NanochatOperatorDown")
    assert f'job="{svc["metadata"]["name"]}"' in down
    (sm,) = by_kind(objs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_the_operator_image_can_be_pinned_by_digest(helm, tmp_path):
    objs = docs(template(helm, {"image": {"tag": "1.2", "digest": DIGEST}}, tmp_path))
    image = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/nanochat/nanochat-operator@{DIGEST}"
    # As a tag it rendered repository:sha256:..., a reference no runtime pulls; the schema says where it goes.
    assert "/image/tag" in refused(helm, {"image": {"tag": DIGEST}}, tmp_path)
    assert "/image/digest" in refused(helm, {"image": {"digest": "sha256:0123"}}, tmp_path)


def test_scrape_intervals_are_prometheus_durations(helm, tmp_path):
    """Any duration prometheus-operator takes: "<n><unit>" alone refused 1m30s and 1d. Quoted, so "0"
    stays the string the CRD wants."""
    for interval in ("30s", "1m30s", "1d", "1h30m", "500ms", "2w", "0"):
        monitor = {"enabled": True, "interval": interval}
        objs = docs(template(helm, {"metrics": {"serviceMonitor": monitor, "podMonitor": monitor}}, tmp_path))
        assert by_kind(objs, "ServiceMonitor")[0]["spec"]["endpoints"][0]["interval"] == interval
        assert by_kind(objs, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0]["interval"] == interval


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
