"""The chart's alerts under promtool: each fires when something is wrong, and not otherwise.

The PrometheusRule is rendered with helm (test_helm.py's fixture and helpers) and its
spec.groups written as a rules file, which `promtool check rules` checks and `promtool test
rules` runs against the cases below: for each alert, series as the operator and Prometheus
produce them and the alerts expected at given times, with cases where it fires and cases
where it must not (a new run, an operator restart, a short blip, ...).

In a case, time runs in minutes from 0, which is also unix time 0 (a rule's time() is the
evaluation time), and every series has one sample a minute: `sampled(f, n)` writes f(t) for
t = 0..n minutes, None for no sample and "stale" where Prometheus marks a series gone (its
target went away, or the operator stopped exporting it).

promtool comes from e2e/tools.sh (built once with `go install` into a cache outside the repo,
pinned in e2e/versions.env); set PROMTOOL=/path/to/promtool to use another.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from test_helm import ROOT, by_kind, docs, helm, template  # noqa: F401 (helm: the fixture)

from operator_support import built_tool

NS = "nanochat"  # test_helm.template renders into this namespace
NO_PROGRESS_MINUTES = 30
DOWN_MINUTES = 5
VALUES = {
    "metrics": {"serviceMonitor": {"enabled": True}},
    "prometheusRule": {
        "enabled": True,
        "noProgressMinutes": NO_PROGRESS_MINUTES,
        "operatorDownMinutes": DOWN_MINUTES,
    },
}


@pytest.fixture(scope="module")
def promtool() -> str:
    return built_tool("promtool")


@pytest.fixture(scope="module")
def rendered(helm, tmp_path_factory) -> dict:  # noqa: F811 (helm: the fixture imported above)
    """The rendered PrometheusRule and the metrics Service its ServiceMonitor scrapes."""
    objs = docs(template(helm, VALUES, tmp_path_factory.mktemp("render")))
    (rule,) = by_kind(objs, "PrometheusRule")
    (svc,) = [s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith("-metrics")]
    (sm,) = by_kind(objs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert "jobLabel" not in sm["spec"]  # so prometheus-operator names the job after the Service
    return {"rule": rule, "job": svc["metadata"]["name"]}


@pytest.fixture(scope="module")
def rules_file(rendered, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "nanochat-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rendered["rule"]["spec"]["groups"]}, sort_keys=False))
    return path


Sample = float | str | None  # a value, "stale", or None for no sample


def promtool_run(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)


def sampled(f: Callable[[int], Sample], minutes: int) -> str:
    """promtool's values: f(t) for t = 0..minutes, one a minute; None is no sample."""
    return " ".join("_" if (v := f(t)) is None else str(v) for t in range(minutes + 1))


def series(name: str, labels: dict[str, str], values: str) -> dict:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def case(name: str, input_series: list[dict], checks: list[tuple[int, str, list[dict]]]) -> dict:
    """One promtool test group; checks are (minute, alert, expected firing alerts), [] for none."""
    return {
        "name": name,
        "interval": "1m",
        "input_series": input_series,
        "alert_rule_test": [
            {"eval_time": f"{m}m", "alertname": alert, "exp_alerts": alerts} for m, alert, alerts in checks
        ],
    }


def until(end: int, f: Callable[[int], Sample]) -> Callable[[int], Sample]:
    """f while t <= end, then the series goes stale (its target or the run's Running phase ended)."""
    return lambda t: f(t) if t <= end else ("stale" if t == end + 1 else None)


def since(start: int, f: Callable[[int], Sample]) -> Callable[[int], Sample]:
    """f from t = start on, no sample before."""
    return lambda t: f(t) if t >= start else None


# ---------------------------------------------------------------------------- NanochatTrainingNoProgress
#
# While a run is Running the operator exports its step and the unix time of its last progress
# (when the step last changed, or the run last started Running if later), both from its status.

RUN = {"namespace": "ml", "name": "a"}


def training(job: str, step: Callable[[int], Sample], progress: Callable[[int], Sample], n: int, pod: str = "op-1"):
    """A run's step and last-progress series as scraped from operator pod `pod`, minutes 0..n."""
    labels = {"job": job, **RUN, "pod": pod}
    return [
        series("nanochat_training_step", labels, sampled(step, n)),
        series("nanochat_training_last_progress_timestamp_seconds", labels, sampled(progress, n)),
    ]


def stuck(job: str, pod: str = "op-1") -> list[dict]:
    annotations = {
        "summary": f"TrainingRun ml/a made no progress for {NO_PROGRESS_MINUTES} minutes",
        "description": "Its step has not changed while Running: a hung collective, a stalled data source or a "
        "dead teacher.",
    }
    return [{"exp_labels": {"severity": "warning", "job": job, **RUN, "pod": pod}, "exp_annotations": annotations}]


def no_progress_cases(job: str) -> list[dict]:
    alert = "NanochatTrainingNoProgress"

    # Steps until 20; its pods are replaced (Starting: no series) and it is Running again from 31,
    # showing its old step until the first new one at 58 (loading the checkpoint took a while).
    def resumed_step(t: int) -> Sample:
        return until(20, lambda t: t)(t) if t <= 21 else since(31, lambda t: 20 if t < 58 else t - 38)(t)

    def resumed_progress(t: int) -> Sample:
        return until(20, lambda t: t * 60)(t) if t <= 21 else since(31, lambda t: 31 * 60 if t < 58 else t * 60)(t)

    def slow_step(t: int) -> int:  # a step every 12 minutes
        return t // 12

    def slow_progress(t: int) -> int:
        return t // 12 * 12 * 60

    return [
        # Running from 0 with step 0; its first step takes 25 minutes (compiling, loading data).
        case(
            "fresh run, slow first step",
            training(job, lambda t: 0 if t < 25 else 1, lambda t: 0 if t < 25 else 25 * 60, 40),
            [(10, alert, []), (29, alert, []), (40, alert, [])],
        ),
        # Never makes its first step: fires once the window has passed since it started Running.
        case(
            "fresh run that never steps",
            training(job, lambda t: 0, lambda t: 0, 40),
            [(30, alert, []), (31, alert, stuck(job))],
        ),
        # A step a minute until minute 10, then it hangs.
        case(
            "run stuck after progress",
            training(job, lambda t: min(t, 10), lambda t: min(t, 10) * 60, 60),
            [(40, alert, []), (41, alert, stuck(job)), (60, alert, stuck(job))],
        ),
        case(
            "run that progresses",
            training(job, lambda t: t, lambda t: t * 60, 90),
            [(45, alert, []), (90, alert, [])],
        ),
        # The operator restarts at 61: from 63 its new pod's series start anew, with the same
        # last-progress time (it comes from the run's status).
        case(
            "operator restarted: series start anew",
            training(job, until(60, slow_step), until(60, slow_progress), 90)
            + training(job, since(63, slow_step), since(63, slow_progress), 90, pod="op-2"),
            [(66, alert, []), (70, alert, []), (90, alert, [])],
        ),
        case(
            "pods replaced, slow to resume",
            training(job, resumed_step, resumed_progress, 70),
            [(55, alert, []), (60, alert, [])],
        ),
        # Suspended at 20: a run that is not Running has no series, so no alert however long.
        case(
            "suspended run",
            training(job, until(20, lambda t: t), until(20, lambda t: t * 60), 90),
            [(60, alert, []), (90, alert, [])],
        ),
    ]


# ---------------------------------------------------------------------------- NanochatRunFailed
#
# nanochat_runs{kind, phase, namespace}: how many runs are in each phase now, zeros included.


def runs(job: str, phase: str, values: str, pod: str = "op-1") -> dict:
    labels = {"job": job, "kind": "TrainingRun", "phase": phase, "namespace": "ml", "pod": pod}
    return series("nanochat_runs", labels, values)


def failed(job: str, count: int) -> list[dict]:
    labels = {"severity": "warning", "job": job, "kind": "TrainingRun", "phase": "Failed", "namespace": "ml"}
    annotations = {
        "summary": f"{count} TrainingRun(s) Failed in namespace ml",
        "description": "kubectl get tr,er -n ml; the run's conditions say why. Deleting the failed run clears the "
        "alert.",
    }
    return [{"exp_labels": {**labels, "pod": "op-1"}, "exp_annotations": annotations}]


def run_failed_cases(job: str) -> list[dict]:
    alert = "NanochatRunFailed"
    return [
        # Fails at 10 and stays Failed: the alert lasts until the run is deleted.
        case(
            "run fails and stays Failed",
            [runs(job, "Running", "1x9 0x50"), runs(job, "Failed", "0x9 1x50")],
            [(9, alert, []), (10, alert, failed(job, 1)), (60, alert, failed(job, 1))],
        ),
        case(
            "no failed runs",
            [runs(job, "Running", "3x60"), runs(job, "Succeeded", "0x30 1x29"), runs(job, "Failed", "0x60")],
            [(30, alert, []), (60, alert, [])],
        ),
        # The failed run is deleted at 20; another fails at 25 and so one is Failed again.
        case(
            "failed run deleted, another fails",
            [runs(job, "Failed", "1x19 0x5 1x35")],
            [(22, alert, []), (30, alert, failed(job, 1)), (60, alert, failed(job, 1))],
        ),
        # The operator restarts at 30; its new pod's series count the runs again as it re-reads them.
        case(
            "operator restarted, no failed run",
            [
                runs(job, "Running", sampled(until(30, lambda t: 2), 60)),
                runs(job, "Failed", sampled(until(30, lambda t: 0), 60)),
                runs(job, "Running", sampled(since(33, lambda t: 1 if t == 33 else 2), 60), pod="op-2"),
                runs(job, "Failed", sampled(since(33, lambda t: 0), 60), pod="op-2"),
            ],
            [(35, alert, []), (60, alert, [])],
        ),
    ]


# ---------------------------------------------------------------------------- NanochatReconcileErrors
#
# nanochat_reconcile_total{kind, result}: ok, retry (API errors, waits) or error (exceptions).


def reconciles(job: str, result: str, values: str) -> dict:
    return series("nanochat_reconcile_total", {"job": job, "kind": "TrainingRun", "result": result}, values)


def reconcile_errors(share: str) -> list[dict]:
    annotations = {
        "summary": "The nanochat operator keeps failing to reconcile TrainingRuns",
        "description": f"{share} of reconciles failed over 10 minutes. Check the operator's logs (API errors, RBAC).",
    }
    return [{"exp_labels": {"severity": "warning", "kind": "TrainingRun"}, "exp_annotations": annotations}]


def reconcile_errors_cases(job: str) -> list[dict]:
    alert = "NanochatReconcileErrors"
    return [
        # One run whose every reconcile fails: 4 a minute at the default 15 s interval.
        case(
            "one run failing on every tick",
            [reconciles(job, "ok", "0x40"), reconciles(job, "retry", "0+4x40")],
            [(10, alert, []), (30, alert, reconcile_errors("100%"))],
        ),
        # A large fleet (400 reconciles a minute) with 2% of them retried: API noise, not an outage.
        case(
            "large fleet, a few retries",
            [reconciles(job, "ok", "0+400x40"), reconciles(job, "retry", "0+8x40")],
            [(30, alert, []), (40, alert, [])],
        ),
        # Three minutes of failures (say the API server restarting), then all well again.
        case(
            "a short burst",
            [reconciles(job, "ok", "0+4x60"), reconciles(job, "retry", "0x10 4 8 12 12x47")],
            [(20, alert, []), (26, alert, []), (40, alert, [])],
        ),
        # No live run, so no reconciles at all (0/0).
        case("idle", [reconciles(job, "ok", "5x40"), reconciles(job, "error", "2x40")], [(30, alert, [])]),
    ]


# ---------------------------------------------------------------------------- NanochatOperatorDown
#
# up{job, namespace, pod}: the target labels prometheus-operator gives the chart's ServiceMonitor.


def up(job: str, values: str, namespace: str = NS, pod: str = "op-1") -> dict:
    return series("up", {"job": job, "namespace": namespace, "pod": pod}, values)


DOWN = [
    {
        "exp_labels": {"severity": "critical", "namespace": NS},
        "exp_annotations": {
            "summary": f"The nanochat operator in namespace {NS} is down",
            "description": "No run is reconciled while it is down: runs keep training, but status and dependents "
            "stall.",
        },
    }
]


def operator_down_cases(job: str) -> list[dict]:
    alert = "NanochatOperatorDown"
    gone_at_10 = sampled(until(9, lambda t: 1), 30)
    return [
        case("operator up", [up(job, "1x30")], [(30, alert, [])]),
        case("scrapes fail from 10", [up(job, "1x9 0x21")], [(14, alert, []), (16, alert, DOWN)]),
        case(
            "target gone at 10 (no ready pod behind the Service)",
            [up(job, gone_at_10)],
            [(14, alert, []), (16, alert, DOWN)],
        ),
        # A rollout: the old pod's target goes at 10, the new one is up from 12.
        case(
            "operator restarted within minutes",
            [up(job, gone_at_10), up(job, sampled(since(12, lambda t: 1), 30), pod="op-2")],
            [(12, alert, []), (20, alert, [])],
        ),
        # A release of the same name in another namespace (so the same job label) stays up.
        case(
            "the same release in another namespace is up, this one is gone",
            [up(job, gone_at_10), up(job, "1x30", namespace="other")],
            [(16, alert, DOWN)],
        ),
        # Other targets (the trainers' PodMonitor) are up: they are not the operator.
        case("only other targets up", [up("ml/nanochat-trainer", "1x30", namespace="ml")], [(30, alert, DOWN)]),
    ]


CASES = {
    "NanochatTrainingNoProgress": no_progress_cases,
    "NanochatRunFailed": run_failed_cases,
    "NanochatReconcileErrors": reconcile_errors_cases,
    "NanochatOperatorDown": operator_down_cases,
}


def test_rules_pass_promtool_check(promtool, rules_file):
    out = promtool_run(promtool, "check", "rules", str(rules_file))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_cases_where_it_fires_and_where_it_does_not(rendered):
    alerts = {r["alert"] for g in rendered["rule"]["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == set(CASES)
    for alert, cases in CASES.items():
        checks = [t for c in cases(rendered["job"]) for t in c["alert_rule_test"]]
        assert all(t["alertname"] == alert for t in checks), alert
        assert any(t["exp_alerts"] for t in checks), f"{alert}: no case where it fires"
        assert any(not t["exp_alerts"] for t in checks), f"{alert}: no case where it must not fire"


@pytest.mark.parametrize("alert", sorted(CASES))
def test_alert_fires_when_wrong_and_not_otherwise(promtool, rendered, rules_file, tmp_path, alert):
    tests = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": CASES[alert](rendered["job"]),
    }
    path = tmp_path / f"{alert}.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False, width=1000))
    out = promtool_run(promtool, "test", "rules", str(path))
    assert out.returncode == 0, f"promtool test rules {path}:\n{out.stdout}{out.stderr}"
