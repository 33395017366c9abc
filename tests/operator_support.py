"""Helpers the operator tests share: an in-memory stand-in for the API server, manifests, the CRD
schemas as JSON Schema, and the tool versions pinned for the e2e tests."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from nanochat_operator import crds
from nanochat_operator.kube import Conflict
from nanochat_operator.reconcile import AlreadyExists, Rejected


class FakeCluster:
    """Stands in for the API server with the methods of nanochat_operator.kube.KubeCluster; tests move
    Jobs and pods through their states by hand the way the Job controller would."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.pods: dict[str, list[dict]] = {}
        self.runs: dict[str, dict] = {}
        self.metrics: str | None = None
        self.reject: str | None = None
        self.calls: list[str] = []
        self.create_failures: dict[str, tuple[str, str]] = {}  # job -> (FailedCreate message, time)
        self.statuses: list[tuple[str, str, dict]] = []  # (plural, name, merge patch) written
        self.events: list[tuple[str, str, str]] = []  # (run, type, reason) posted
        self.conflict = False  # patch_status finds the run changed

    def get_job(self, namespace: str, name: str) -> dict | None:
        self.calls.append(f"get_job {name}")
        j = self.objects.get(("Job", namespace, name))
        return copy.deepcopy(j) if j else None

    def list_pods(self, namespace: str, job_name: str) -> list[dict]:
        return copy.deepcopy(self.pods.get(job_name, []))

    def create(self, obj: dict) -> dict:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if self.reject and obj["kind"] == self.reject:
            raise Rejected(f"{obj['kind']} {obj['metadata']['name']}: spec.template: Invalid value")
        if key in self.objects:
            raise AlreadyExists(key[2], existing=copy.deepcopy(self.objects[key]))  # as kube.Kubernetes reads it
        self.calls.append(f"create {obj['kind']} {key[2]}")
        self.objects[key] = copy.deepcopy(obj)
        return copy.deepcopy(obj)

    def patch_status(self, plural: str, namespace: str, name: str, version: str, status: dict) -> bool:
        if self.conflict:
            raise Conflict(f"{plural} {namespace}/{name} changed since {version}")
        self.statuses.append((plural, name, status))
        return True

    def post_event(self, obj: dict, type: str, reason: str, message: str) -> None:
        self.events.append((obj["metadata"]["name"], type, reason))

    def patch_job(self, namespace: str, name: str, spec: dict) -> None:
        self.calls.append(f"patch {name} " + " ".join(f"{k}={v}" for k, v in sorted(spec.items())))
        self.objects[("Job", namespace, name)]["spec"].update(spec)

    def pod_create_failure(self, namespace: str, job_name: str) -> tuple[str, str] | None:
        self.calls.append(f"events {job_name}")
        return self.create_failures.get(job_name)

    def get_training_run(self, namespace: str, name: str) -> dict | None:
        r = self.runs.get(name)
        return copy.deepcopy(r) if r else None

    def scrape(self, url: str) -> str | None:
        self.calls.append(f"scrape {url}")
        return self.metrics

    # -- what the Job controller would do
    def job(self, name: str) -> dict:
        return self.objects[("Job", "ml", name)]

    def set_job(self, name: str, *conds: str, pods: list[dict] | None = None) -> None:
        self.job(name)["status"] = {"conditions": [{"type": c, "status": "True", "reason": c} for c in conds]}
        if pods is not None:
            self.pods[name] = pods


def adopt(objs: list[dict], owner: dict) -> None:
    for o in objs:
        o["metadata"]["ownerReferences"] = [
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def tr(name: str = "demo", generation: int = 1, status: dict | None = None, **spec: Any) -> dict:
    body = {"trainer": {"preset": "tiny", "steps": 100}, "storage": {"claimName": "runs"}}
    body.update(spec)
    return {
        "apiVersion": "nanochat.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}", "generation": generation},
        "spec": body,
        "status": status or {},
    }


def get_condition(status: dict, type_: str) -> dict | None:
    """A condition of a stored status, by type (spelt as the API shows it, so a test fails if it changes)."""
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def pinned(key: str) -> str:
    """A version from e2e/versions.env, the one place tool versions are pinned."""
    for line in (Path(__file__).resolve().parents[1] / "e2e" / "versions.env").read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip()
    raise KeyError(key)


def built_tool(name: str) -> str:
    """A tool e2e/tools.sh builds at its pinned version (helm, promtool), or $<NAME> when set; one
    already on PATH when it cannot be built. Fails, never skips: CI builds them, and a skipped
    chart or alert test proves nothing."""
    if os.environ.get(name.upper()):
        return os.environ[name.upper()]
    script = Path(__file__).resolve().parents[1] / "e2e" / "tools.sh"
    try:
        out = subprocess.run([str(script), name], capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.fail(f"cannot build {name} with e2e/tools.sh: {err}")
    if out.returncode != 0:
        if shutil.which(name):
            return name
        pytest.fail(f"cannot build {name} with e2e/tools.sh (it needs go): {out.stderr.strip()[-500:]}")
    return out.stdout.strip()


def succeeded_eval_pod(message: str, name: str = "ev-eval-x") -> dict:
    """An eval pod that exited 0 with `message` as its termination message (its result)."""
    terminated = {"exitCode": 0, "message": message}
    return {
        "metadata": {"name": name},
        "status": {"phase": "Succeeded", "containerStatuses": [{"name": "eval", "state": {"terminated": terminated}}]},
    }


def schema_of(kind: str) -> dict[str, Any]:
    return crds.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI v3.0 (as the API server reads it) -> JSON Schema, to validate objects here."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k.startswith("x-kubernetes-") or k == "nullable":
            continue
        if k in ("properties", "additionalProperties") and isinstance(v, dict):
            out[k] = (
                {p: openapi_to_jsonschema(s) for p, s in v.items()} if k == "properties" else openapi_to_jsonschema(v)
            )
        elif k == "exclusiveMinimum" and v is True:
            out["exclusiveMinimum"] = node["minimum"]
        elif k == "exclusiveMaximum" and v is True:
            out["exclusiveMaximum"] = node["maximum"]
        else:
            out[k] = openapi_to_jsonschema(v)
    if node.get("exclusiveMinimum") is True:
        out.pop("minimum", None)
    if node.get("exclusiveMaximum") is True:
        out.pop("maximum", None)
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


def validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(openapi_to_jsonschema(schema_of(kind)))
