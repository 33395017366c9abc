"""N TrainingRuns at once on kwok GPU nodes: how fast the operator carries them through.

Shared by tests/e2e/test_scale.py (N = 200, asserts) and bench/operator_scale.py (prints
figures for several N). Each run asks for one GPU on a kwok node; kwok's Stages play the
pods (e2e/kwok-stages.yaml), the Job controller, scheduler and operator are real.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from .cluster import KWOK_ANNOTATION, ControlPlane
from .operator_local import ChartOperator

GPUS_PER_KWOK_NODE = 8


@dataclass
class ScaleResult:
    runs: int
    to_all_running_s: float
    to_all_succeeded_s: float
    reconciles: float
    reconciles_per_s: float
    operator_peak_rss_mib: float
    phases: dict[str, int] = field(default_factory=dict)  # final phase -> count
    never_running: list[str] = field(default_factory=list)  # runs with no Running event: a skipped phase
    # The operator's API requests but watches (from the API server's audit log, when it keeps one),
    # by "verb resource".
    requests: dict[str, int] = field(default_factory=dict)

    @property
    def requests_per_run_minute(self) -> float:
        minutes = self.to_all_succeeded_s / 60
        return sum(self.requests.values()) / self.runs / minutes if self.requests else math.nan

    def line(self) -> str:
        return (
            f"N={self.runs:4d}  all Running {self.to_all_running_s:6.1f} s  all Succeeded "
            f"{self.to_all_succeeded_s:6.1f} s  reconciles/s {self.reconciles_per_s:5.1f}  "
            f"API requests/run/min {self.requests_per_run_minute:5.2f}  "
            f"operator peak RSS {self.operator_peak_rss_mib:6.1f} MiB  skipped Running {len(self.never_running)}"
        )


def kwok_run(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "nanochat.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "trainer": {"preset": "nano-125M", "steps": 1000},
            "resources": {
                "gpusPerNode": 1,
                "nodeSelector": {"type": "kwok"},
                "tolerations": [{"key": KWOK_ANNOTATION, "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
    }


def ensure_kwok_nodes(cp: ControlPlane, runs: int) -> None:
    have = len(cp.get("nodes", "-l", "type=kwok")["items"])
    need = math.ceil(runs / GPUS_PER_KWOK_NODE)
    if need > have:
        cp.add_kwok_nodes(need, gpus=GPUS_PER_KWOK_NODE)  # apply is idempotent for existing ones


def reconcile_count(op: ChartOperator) -> float:
    total = 0.0
    for family in text_string_to_metric_families(op.metrics()):
        if family.name == "nanochat_reconcile":  # a counter's family name drops _total
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def run_scale(cp: ControlPlane, op: ChartOperator, n: int, namespace: str, timeout: float = 900.0) -> ScaleResult:
    ensure_kwok_nodes(cp, n)
    cp.kubectl("create", "namespace", namespace)
    cp.wait_for(
        lambda: cp.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0,
        60,
        f"the default ServiceAccount in {namespace}",
    )
    names = [f"scale-{i:04d}" for i in range(n)]
    seen: dict[str, set[str]] = {name: set() for name in names}
    reconciles0 = reconcile_count(op)
    audit0 = cp.audit_log.stat().st_size if cp.audit else 0
    start = time.monotonic()
    # `create` posts each object once (apply reads each first): at 1,000 runs that halves the wait.
    cp.kubectl("create", "-f", "-", input=yaml.safe_dump_all([kwok_run(x, namespace) for x in names]), timeout=900)
    all_running = all_done = math.nan
    phases: dict[str, str] = {}
    while time.monotonic() - start < timeout:
        cp.check_alive()
        items = json.loads(cp.kubectl("get", "trainingruns", "-n", namespace, "-o", "json").stdout)["items"]
        for item in items:
            phase = (item.get("status") or {}).get("phase") or ""
            phases[item["metadata"]["name"]] = phase
            seen[item["metadata"]["name"]].add(phase)
        now = time.monotonic() - start
        if math.isnan(all_running) and all(seen[x] & {"Running", "Succeeded", "Failed"} for x in names):
            all_running = now
        if all(phases.get(x) in ("Succeeded", "Failed") for x in names):
            all_done = now
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    reconciles = reconcile_count(op) - reconciles0
    recorded = phase_events(cp, namespace)
    counts: dict[str, int] = {}
    for x in names:
        counts[phases.get(x, "")] = counts.get(phases.get(x, ""), 0) + 1
    return ScaleResult(
        runs=n,
        to_all_running_s=all_running,
        to_all_succeeded_s=all_done,
        reconciles=reconciles,
        reconciles_per_s=reconciles / elapsed,
        operator_peak_rss_mib=op.peak_rss_mib(),
        phases=counts,
        never_running=sorted(x for x in names if "Running" not in recorded.get(x, [])),
        requests=operator_requests(cp, audit0) if cp.audit else {},
    )


def phase_events(cp: ControlPlane, namespace: str) -> dict[str, list[str]]:
    """The reasons of the events on each TrainingRun: the operator posts one per phase it records."""
    out: dict[str, list[str]] = {}
    events = json.loads(cp.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    for e in sorted(events, key=lambda e: e.get("eventTime") or e.get("firstTimestamp") or ""):
        if e["involvedObject"]["kind"] == "TrainingRun":
            out.setdefault(e["involvedObject"]["name"], []).append(e["reason"])
    return out


def operator_requests(cp: ControlPlane, offset: int) -> dict[str, int]:
    """Requests the operator made since `offset` in the audit log, by verb and resource; the
    long-lived watches are not requests per run and are left out."""
    counts: dict[str, int] = {}
    with cp.audit_log.open("rb") as f:
        f.seek(offset)
        for line in f:
            entry = json.loads(line)
            if entry["verb"] == "watch":
                continue
            ref = entry.get("objectRef") or {}
            what = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            key = f"{entry['verb']} {what}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def delete_namespace(cp: ControlPlane, namespace: str) -> None:
    cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
