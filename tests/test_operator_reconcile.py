"""The reconciler on an in-memory cluster: creation, dependency chaining, suspend, refusals.

FakeCluster stands in for the API server with the same methods as
nanochat_operator.kube.KubeCluster; the tests move Jobs and pods through their states by
hand the way the Job controller would."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client

from nanochat_operator import render
from nanochat_operator.kube import KubeCluster
from nanochat_operator.reconcile import (
    NotOwned,
    reconcile_eval,
    reconcile_training,
    status_patch,
)
from nanochat_operator.settings import OperatorConfig
from nanochat_operator.status import dump_status

from operator_support import FakeCluster, adopt, get_condition, succeeded_eval_pod, tr

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CFG = OperatorConfig(trainer_image="trainer:test")


def running_pod(index: int = 0, ip: str = "10.1.0.5") -> dict:
    return {
        "metadata": {"name": f"p{index}", "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
        "status": {"phase": "Running", "podIP": ip},
    }


def er(name: str = "ev", status: dict | None = None, **spec: Any) -> dict:
    body = {"model": {"trainingRun": "demo"}}
    body.update(spec)
    return {
        "apiVersion": "nanochat.io/v1alpha1",
        "kind": "EvalRun",
        "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}", "generation": 1},
        "spec": body,
        "status": status or {},
    }


def reconcile_patch(cluster: FakeCluster, obj: dict, now: datetime = NOW, fn=reconcile_training) -> dict:
    """One reconcile; the status patch kopf would apply (as handlers._run makes it)."""
    out = fn(cluster, obj, CFG, now=now, adopt=adopt)
    return status_patch(obj.get("status") or {}, dump_status(out.status))


def step(cluster: FakeCluster, obj: dict, now: datetime = NOW, fn=reconcile_training) -> dict:
    """One reconcile; the new status is written back to obj like kopf's status patch."""
    patch = reconcile_patch(cluster, obj, now, fn)
    merged = {**(obj.get("status") or {}), **patch}
    obj["status"] = {k: v for k, v in merged.items() if v is not None}
    return obj["status"]


def test_training_run_creates_children_and_follows_job():
    c = FakeCluster()
    run = tr()
    s = step(c, run)
    assert [x for x in c.calls if x.startswith("create")] == [
        "create ConfigMap demo-config",
        "create Service demo-train",
        "create Job demo-train",
    ]
    job = c.job("demo-train")
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "trainer:test"
    assert s["phase"] == "Starting" and s["jobName"] == "demo-train" and s["observedGeneration"] == 1
    assert get_condition(s, "Accepted")["status"] == "True"
    assert s["storageClaim"] == "runs" and s["runDir"] == "/data/runs/demo"
    assert s["totalSteps"] == 100 and "step" not in s  # the plan is known before the trainer says it

    c.pods["demo-train"] = [running_pod()]
    c.metrics = "nanochat_trainer_step 40\nnanochat_trainer_total_steps 100\nnanochat_trainer_loss 1.5\n"
    s = step(c, run)
    assert s["phase"] == "Running" and s["step"] == 40 and s["loss"] == 1.5
    assert "scrape http://10.1.0.5:9090/metrics" in c.calls
    c.metrics = None  # the trainer stops answering: keep the last values
    s = step(c, run, NOW + timedelta(seconds=30))
    assert s["step"] == 40

    c.set_job("demo-train", "Complete", pods=[])
    s = step(c, run)
    assert s["phase"] == "Succeeded" and s["finalCheckpoint"] == "/data/runs/demo/final"
    calls = len(c.calls)
    assert step(c, run)["phase"] == "Succeeded"  # final: no more reads
    assert len(c.calls) == calls


@pytest.mark.parametrize("ip", ["fd00:10:244:1::5", "10.1.0.5"])
def test_a_pod_ip_of_either_family_is_scraped_and_a_url_httpx_refuses_is_no_answer(ip):
    """On an IPv6 (or dual-stack, IPv6 first) cluster pod 0's IP is IPv6: unbracketed, httpx raised
    InvalidURL, which is no httpx.HTTPError, out of every reconcile of the Running run."""
    c = FakeCluster()
    run = tr()
    step(c, run)
    c.pods["demo-train"] = [running_pod(ip=ip)]
    c.metrics = "nanochat_trainer_step 40\n"
    assert step(c, run)["step"] == 40
    host = f"[{ip}]" if ":" in ip else ip
    assert c.calls[-1] == f"scrape http://{host}:9090/metrics"
    real = KubeCluster(client.ApiClient(), scrape_timeout=0.1)
    assert real.scrape("http://fd00:10:244:1::5:9090/metrics") is None


def test_a_run_that_ends_between_two_scrapes_reports_what_its_trainer_left_in_the_pod_status():
    """A generate run of 40 rows can start and finish between two looks: its trainer's last gauges
    (its termination message, as Kubernetes copies it into the pod's status) are its final figures."""
    c = FakeCluster()
    teacher = {"url": "http://teacher:8000/v1", "model": "Qwen/Qwen3-30B-A3B-FP8"}
    run = tr(trainer={"preset": "tiny", "stage": "generate", "generate": {"rows": 40, "teacher": teacher}})
    assert step(c, run)["phase"] == "Starting", run["status"]
    env = {e["name"]: e.get("value") for e in c.job("demo-train")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NANOCHAT_TERMINATION_LOG"] == "/dev/termination-log"
    done = running_pod()
    done["status"] = {
        "phase": "Succeeded",
        "containerStatuses": [
            {
                "name": "trainer",
                "state": {
                    "terminated": {
                        "exitCode": 0,
                        "message": "nanochat_trainer_step 40.0\nnanochat_trainer_total_steps 40.0\n"
                        'nanochat_trainer_generate_rejected_by_reason{reason="no_code"} 3.0\n',
                    }
                },
            }
        ],
    }
    c.set_job("demo-train", "Complete", pods=[done])
    s = step(c, run)
    assert s["phase"] == "Succeeded" and s["step"] == 40 and s["generation"]["rejected"] == {"no_code": 3}


def test_patch_clears_eta_when_the_run_succeeds_and_never_writes_kopf():
    c = FakeCluster()
    run = tr()
    step(c, run)
    c.pods["demo-train"] = [running_pod()]
    c.metrics = "nanochat_trainer_step 10\nnanochat_trainer_total_steps 100\n"
    step(c, run)
    c.metrics = "nanochat_trainer_step 20\nnanochat_trainer_total_steps 100\n"
    assert step(c, run, NOW + timedelta(seconds=10))["eta"] == "1m20s"
    run["status"]["kopf"] = {"progress": {"training-create": {"success": True}}}
    c.set_job("demo-train", "Complete", pods=[])
    patch = reconcile_patch(c, run, NOW + timedelta(seconds=20))
    assert patch["phase"] == "Succeeded" and patch["step"] == 100
    assert "eta" in patch and patch["eta"] is None  # null in a merge patch removes the stale estimate
    assert "kopf" not in patch
    run["status"] = {k: v for k, v in {**run["status"], **patch}.items() if v is not None}
    assert "eta" not in run["status"] and "kopf" in run["status"]
    assert reconcile_patch(c, run, NOW + timedelta(seconds=30)) == {}  # final: nothing more to write


def test_reconcile_twice_creates_nothing_twice():
    c = FakeCluster()
    run = tr()
    step(c, run)
    step(c, run)
    assert sum(x.startswith("create") for x in c.calls) == 3


def test_job_of_another_owner_is_left_alone():
    c = FakeCluster()
    c.objects[("Job", "ml", "demo-train")] = {
        "metadata": {"name": "demo-train", "ownerReferences": [{"uid": "old-uid"}]},
        "spec": {},
    }
    with pytest.raises(NotOwned):
        step(c, tr())


@pytest.mark.parametrize(
    "kind,name,spec",
    [
        ("PodGroup", "demo-train", {"gang": {"scheduler": "coscheduling"}}),  # would gang-schedule by old numbers
        ("ConfigMap", "demo-config", {}),  # would hand the new run's pods the old config
        ("PersistentVolumeClaim", "demo-storage", {"storage": {"size": "1Gi", "whenDeleted": "Delete"}}),
    ],
)
def test_a_deleted_runs_children_not_yet_collected_are_waited_for_not_used(kind, name, spec):
    """A run re-created under the name of one just deleted finds the old run's children until the
    garbage collector removes them (under its pods): it waits for them to go; its own (a retry) are fine."""
    c = FakeCluster()
    old = {"metadata": {"name": name, "ownerReferences": [{"uid": "old-uid"}]}, "spec": {"minMember": 9}}
    c.objects[(kind, "ml", name)] = old
    with pytest.raises(NotOwned, match=f"{kind} {name} exists but does not belong to this run"):
        step(c, tr(**spec))
    assert ("Job", "ml", "demo-train") not in c.objects
    old["metadata"]["ownerReferences"] = [{"uid": "uid-demo"}]  # this run's own, from an earlier attempt
    assert step(c, tr(**spec))["phase"] == "Starting" and ("Job", "ml", "demo-train") in c.objects


@pytest.mark.parametrize("when_deleted", ["Retain", "Delete"])
def test_a_kept_claim_of_a_deleted_run_is_what_its_successor_resumes_from(when_deleted):
    """storage.whenDeleted: Retain keeps the PVC (labelled, not owned) past its run: a run
    re-created under the name mounts it, and resumes from its checkpoints, whatever its own
    whenDeleted says (nothing will ever collect that claim to wait for). Another run's is not its."""
    c = FakeCluster()
    kept = {"metadata": {"name": "demo-storage", "labels": {"nanochat.io/training-run": "demo"}}, "spec": {}}
    c.objects[("PersistentVolumeClaim", "ml", "demo-storage")] = kept
    assert step(c, tr(storage={"size": "1Gi", "whenDeleted": when_deleted}))["phase"] == "Starting"
    other = FakeCluster()
    another = {"metadata": {"name": "demo-storage", "labels": {"nanochat.io/training-run": "x"}}, "spec": {}}
    other.objects[("PersistentVolumeClaim", "ml", "demo-storage")] = another
    with pytest.raises(NotOwned, match="PersistentVolumeClaim demo-storage"):
        step(other, tr(storage={"size": "1Gi", "whenDeleted": when_deleted}))


def test_invalid_spec_fails_without_touching_cluster_and_recovers_when_fixed():
    c = FakeCluster()
    bad = tr(trainer={"preset": "tiny", "model": {"n_heads": 4, "n_kv_heads": 3}})
    s = step(c, bad)
    assert s["phase"] == "Failed"
    cond = get_condition(s, "Accepted")
    assert cond["reason"] == "InvalidSpec" and "spec.trainer" in cond["message"] and "n_kv_heads" in cond["message"]
    assert c.calls == []
    first = dict(s)
    assert step(c, bad) == first  # same answer, nothing churns
    fixed = tr(generation=2, status=s)
    s = step(c, fixed)
    assert s["phase"] == "Starting" and get_condition(s, "Failed") is None and "completionTime" not in s


@pytest.mark.parametrize(
    "spec,needle",
    [
        (
            {
                "trainer": {"preset": "nano-1B", "parallel": "ddp", "model": {"n_layers": 200}},
                "resources": {"nodes": 2, "gpusPerNode": 8},
            },
            "DDP",
        ),
        ({"trainer": {"preset": "qwen3-hybrid"}, "resources": {"nodes": 1, "gpusPerNode": 8}}, "more GPUs"),
        ({"trainer": {"preset": "nano-360M"}, "resources": {"memory": "1Gi"}}, "resources.memory"),
    ],
)
def test_infeasible_run_fails_with_reason(spec, needle):
    c = FakeCluster()
    s = step(c, tr(**spec))
    assert s["phase"] == "Failed"
    assert get_condition(s, "Accepted")["reason"] == "Infeasible" and needle in get_condition(s, "Accepted")["message"]
    assert not any(x.startswith("create") for x in c.calls)


def test_rejected_create_is_a_permanent_failure():
    c = FakeCluster()
    c.reject = "Job"
    s = step(c, tr())
    assert s["phase"] == "Failed" and get_condition(s, "Failed")["reason"] == "CreateRejected"


def test_dependency_chain_waits_then_starts_from_final_checkpoint():
    c = FakeCluster()
    nxt = tr("next", init={"fromTrainingRun": "demo"})
    s = step(c, nxt)
    assert s["phase"] == "Pending"
    assert get_condition(s, "DependenciesReady")["reason"] == "SourceNotFound"
    c.runs["demo"] = tr(status={"phase": "Running", "step": 5, "totalSteps": 100})
    s = step(c, nxt)
    dep = get_condition(s, "DependenciesReady")
    assert dep["reason"] == "SourceNotSucceeded" and "step 5/100" in dep["message"]
    assert ("Job", "ml", "next-train") not in c.objects
    c.runs["demo"]["status"] = {"phase": "Succeeded", "storageClaim": "runs"}
    s = step(c, nxt)
    assert s["phase"] == "Starting" and get_condition(s, "DependenciesReady")["status"] == "True"
    cm = c.objects[("ConfigMap", "ml", "next-config")]
    assert "init_from: /data/runs/demo/final" in cm["data"]["config.yaml"]


def test_dependency_on_failed_or_storageless_source_fails():
    c = FakeCluster()
    c.runs["demo"] = tr(status={"phase": "Failed"})
    s = step(c, tr("next", init={"fromTrainingRun": "demo"}))
    assert s["phase"] == "Failed" and get_condition(s, "DependenciesReady")["reason"] == "SourceFailed"
    c.runs["demo"] = tr(status={"phase": "Succeeded"})
    del c.runs["demo"]["spec"]["storage"]
    s = step(c, tr("next2", init={"fromTrainingRun": "demo"}))
    assert get_condition(s, "DependenciesReady")["reason"] == "SourceHasNoStorage"


def test_dependency_cycle_fails():
    c = FakeCluster()
    a = tr("a", init={"fromTrainingRun": "b"})
    c.runs["a"] = a
    c.runs["b"] = tr("b", init={"fromTrainingRun": "a"}, status={"phase": "Pending"})
    s = step(c, a)
    assert s["phase"] == "Failed"
    assert get_condition(s, "DependenciesReady")["message"].endswith("a -> b -> a")


def test_source_on_another_claim_is_mounted_read_only():
    c = FakeCluster()
    c.runs["demo"] = tr(status={"phase": "Succeeded"}, storage={"size": "10Gi"})
    step(c, tr("next", init={"fromTrainingRun": "demo"}))
    pod = c.job("next-train")["spec"]["template"]["spec"]
    assert {"name": "source", "persistentVolumeClaim": {"claimName": "demo-storage", "readOnly": True}} in pod[
        "volumes"
    ]


def test_suspend_and_resume_patch_the_job():
    c = FakeCluster()
    run = tr(suspend=True)
    s = step(c, run)
    assert c.job("demo-train")["spec"]["suspend"] is True
    assert s["phase"] == "Pending" and get_condition(s, "Suspended")["status"] == "True"
    run["spec"]["suspend"] = False
    run["metadata"]["generation"] = 2
    s = step(c, run)
    assert "patch demo-train suspend=False" in c.calls
    assert s["phase"] == "Starting" and get_condition(s, "SpecChangeRefused") is None
    run["spec"]["suspend"] = True
    step(c, run)
    assert c.job("demo-train")["spec"]["suspend"] is True


def test_kueue_queue_waits_for_admission_and_operator_never_unsuspends():
    c = FakeCluster()
    run = tr(queueName="gpu")
    s = step(c, run)
    assert s["phase"] == "Pending" and get_condition(s, "Suspended")["reason"] == "WaitingForQueue"
    step(c, run)
    assert not any(x.startswith("patch") for x in c.calls)
    c.job("demo-train")["spec"]["suspend"] = False  # Kueue admitted it
    c.pods["demo-train"] = [running_pod()]
    assert step(c, run)["phase"] == "Running"


def test_spec_change_while_running_is_refused_not_applied():
    c = FakeCluster()
    run = tr()
    step(c, run)
    job_before = copy.deepcopy(c.job("demo-train"))
    run["spec"]["trainer"]["steps"] = 5000
    run["spec"]["resources"] = {"nodes": 2}
    run["metadata"]["generation"] = 2
    s = step(c, run)
    cond = get_condition(s, "SpecChangeRefused")
    assert cond["status"] == "True" and "spec.resources.nodes, spec.trainer.steps" in cond["message"]
    assert c.job("demo-train") == job_before and s["observedGeneration"] == 2
    run["spec"]["trainer"]["steps"] = 100
    run["spec"]["resources"] = {}
    assert get_condition(step(c, run), "SpecChangeRefused") is None  # reverted: the refusal goes away


def test_a_field_added_by_an_operator_upgrade_is_not_a_spec_change():
    """A Job made by an older operator carries the spec without the fields added since (here
    trainer.fp8): this version reads that copy with its defaults, so a live run is not refused."""
    c = FakeCluster()
    run = tr()
    step(c, run)
    annotations = c.job("demo-train")["metadata"]["annotations"]
    older = json.loads(annotations[render.SPEC_ANNOTATION])
    del older["trainer"]["fp8"]
    annotations[render.SPEC_ANNOTATION] = json.dumps(older)
    assert get_condition(step(c, run), "SpecChangeRefused") is None
    run["spec"]["trainer"]["fp8"] = True  # an edit of that field is still one
    assert "spec.trainer.fp8" in get_condition(step(c, run), "SpecChangeRefused")["message"]


def test_eval_waits_runs_and_records_scores():
    c = FakeCluster()
    ev = er(samplesPerProblem=2, temperature=0.8, k=[1, 2])
    s = step(c, ev, fn=reconcile_eval)
    assert s["phase"] == "Pending" and get_condition(s, "DependenciesReady")["reason"] == "SourceNotFound"
    c.runs["demo"] = tr(status={"phase": "Succeeded", "storageClaim": "runs"})
    s = step(c, ev, fn=reconcile_eval)
    assert s["phase"] == "Starting" and s["checkpoint"] == "/data/runs/demo/final"
    assert s["resultsPath"] == "/data/runs/demo/eval/ev.json"
    cmd = c.job("ev-eval")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:4] == ["nanochat", "eval", "--checkpoint", "/data/runs/demo/final"]
    done = succeeded_eval_pod('{"pass_at_k": {"1": 0.3, "2": 0.4}, "problems": 164, "samples": 2}')
    c.set_job("ev-eval", "Complete", pods=[done])
    s = step(c, ev, fn=reconcile_eval)
    assert s["phase"] == "Succeeded" and s["passAt1"] == 0.3 and s["scores"] == {"pass@1": 0.3, "pass@2": 0.4}
    assert "sandboxIsolation" not in s  # an older trainer's result says nothing of it


def test_an_eval_whose_job_completes_before_its_pod_is_seen_waits_for_the_scores():
    """Jobs and pods come on separate watches: a Job seen Complete while its pod still reads Running
    waits (up to RESULT_GRACE after the Job's completion) for the pod's termination message."""
    c = FakeCluster()
    c.runs["demo"] = tr(status={"phase": "Succeeded", "storageClaim": "runs"})
    ev = er()
    step(c, ev, fn=reconcile_eval)
    c.set_job("ev-eval", "Complete", pods=[{"metadata": {"name": "ev-eval-x"}, "status": {"phase": "Running"}}])
    c.job("ev-eval")["status"]["completionTime"] = "2026-01-01T00:00:00Z"  # NOW
    s = step(c, ev, now=NOW + timedelta(seconds=5), fn=reconcile_eval)
    assert s["phase"] == "Starting" and get_condition(s, "ResultsRecorded") is None
    c.pods["ev-eval"] = [succeeded_eval_pod('{"pass_at_k": {"1": 0.3}, "problems": 164, "samples": 1}')]
    s = step(c, ev, now=NOW + timedelta(seconds=6), fn=reconcile_eval)
    assert s["phase"] == "Succeeded" and s["passAt1"] == 0.3
    # A pod never seen to succeed (deleted meanwhile): after the grace, the end is recorded without scores.
    late = er("late")
    step(c, late, fn=reconcile_eval)
    c.set_job("late-eval", "Complete", pods=[])
    c.job("late-eval")["status"]["completionTime"] = "2026-01-01T00:00:00Z"
    s = step(c, late, now=NOW + timedelta(minutes=3), fn=reconcile_eval)
    assert s["phase"] == "Succeeded" and get_condition(s, "ResultsRecorded")["reason"] == "NoResult"


def test_eval_of_failed_run_fails_and_endpoint_eval_needs_no_run():
    c = FakeCluster()
    c.runs["demo"] = tr(status={"phase": "Failed"})
    s = step(c, er(), fn=reconcile_eval)
    assert s["phase"] == "Failed" and get_condition(s, "DependenciesReady")["reason"] == "SourceFailed"
    assert "eta" not in s  # a training run's field only
    s = step(c, er("ep", model={"endpoint": {"url": "http://teacher:8000/v1", "model": "q"}}), fn=reconcile_eval)
    assert s["phase"] == "Starting" and ("Job", "ml", "ep-eval") in c.objects
    policy = c.objects[("NetworkPolicy", "ml", "ep-eval")]  # made with the Job, owned by the run
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-ep"
    assert policy["spec"]["egress"][1] == {"ports": [{"protocol": "TCP", "port": 8000}]}


def test_status_patch_nulls_removed_keys_and_keeps_kopf():
    assert status_patch({"a": 1, "b": 2, "kopf": {}}, {"a": 1, "c": 3}) == {"c": 3, "b": None}


def test_render_names_fit_dns_labels():
    name = "x" * 50  # the longest name the CRD allows
    assert len(f"{render.job_name(name)}-9999") <= 63


def test_comparison_eval_waits_for_every_compared_run_and_records_side_by_side():
    """A ternary student against its full-precision parent (another PVC) and the teacher."""
    c = FakeCluster()
    teacher = {
        "url": "http://teacher:8000/v1",
        "model": "Qwen/Qwen3-8B",
        "apiKeySecret": {"name": "teacher", "key": "api-key"},
    }
    ev = er(
        model={"trainingRun": "tern"},
        compare=[{"name": "parent", "trainingRun": "base"}, {"name": "teacher", "endpoint": teacher}],
    )
    c.runs["tern"] = tr("tern", status={"phase": "Succeeded", "storageClaim": "runs"})
    c.runs["base"] = tr("base", status={"phase": "Running", "step": 5, "storageClaim": "old-runs"})
    s = step(c, ev, fn=reconcile_eval)
    cond = get_condition(s, "DependenciesReady")
    assert s["phase"] == "Pending" and cond["reason"] == "SourceNotSucceeded" and "base" in cond["message"]
    assert ("Job", "ml", "ev-eval") not in c.objects
    c.runs["base"]["status"]["phase"] = "Succeeded"
    s = step(c, ev, fn=reconcile_eval)
    pod = c.job("ev-eval")["spec"]["template"]["spec"]
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--name") + 1] == "tern"
    compares = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--compare"]
    assert compares == ["parent=/models/old-runs/runs/base/final", "teacher=http://teacher:8000/v1#Qwen/Qwen3-8B"]
    assert {"name": "model-1", "persistentVolumeClaim": {"claimName": "old-runs", "readOnly": True}} in pod["volumes"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NANOCHAT_COMPARE_API_KEY_TEACHER"]["valueFrom"]["secretKeyRef"] == {"name": "teacher", "key": "api-key"}
    msg = (
        '{"pass_at_k": {"1": 0.1}, "problems": 20, "samples": 1, '
        '"compare": {"parent": {"1": 0.15}, "teacher": {"1": 0.6}}}'
    )
    done = {
        "metadata": {"name": "ev-eval-x"},
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [{"name": "eval", "state": {"terminated": {"exitCode": 0, "message": msg}}}],
        },
    }
    c.set_job("ev-eval", "Complete", pods=[done])
    s = step(c, ev, fn=reconcile_eval)
    assert s["passAt1"] == 0.1 and s["comparison"] == {"parent": {"pass@1": 0.15}, "teacher": {"pass@1": 0.6}}
    assert "teacher: pass@1=0.6000" in get_condition(s, "ResultsRecorded")["message"]


def test_comparison_names_must_be_unique():
    c = FakeCluster()
    ev = er(compare=[{"name": "a", "trainingRun": "x"}, {"name": "a", "trainingRun": "y"}])
    s = step(c, ev, fn=reconcile_eval)
    assert s["phase"] == "Failed" and "names must be unique" in get_condition(s, "Failed")["message"]


def test_an_eval_of_the_best_checkpoint_needs_one():
    """checkpoint: best scores <run>/best, which only a run with in-training evaluation has."""
    c = FakeCluster()
    c.runs["demo"] = tr(status={"phase": "Succeeded", "storageClaim": "runs"})
    ev = er(model={"trainingRun": "demo", "checkpoint": "best"})
    s = step(c, ev, fn=reconcile_eval)
    assert s["phase"] == "Failed" and get_condition(s, "DependenciesReady")["reason"] == "NoBestCheckpoint"
    c.runs["demo"]["spec"]["trainer"]["evaluation"] = {"every": 500}
    s = step(c, er("ev2", model={"trainingRun": "demo", "checkpoint": "best"}), fn=reconcile_eval)
    assert s["checkpoint"] == "/data/runs/demo/best"
    command = c.objects[("Job", "ml", "ev2-eval")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--checkpoint") + 1] == "/data/runs/demo/best"


def test_after_waits_for_the_runs_that_make_its_data_on_the_same_claim():
    c = FakeCluster()
    shared = {"claimName": "runs"}
    train = tr("train", after=["data"], storage=shared)
    s = step(c, train)
    assert s["phase"] == "Pending" and get_condition(s, "DependenciesReady")["reason"] == "SourceNotFound"
    c.runs["data"] = tr("data", storage=shared, status={"phase": "Running", "step": 40, "totalSteps": 100})
    s = step(c, train)
    assert get_condition(s, "DependenciesReady")["reason"] == "SourceNotSucceeded"
    assert ("Job", "ml", "train-train") not in c.objects
    c.runs["data"]["status"] = {"phase": "Succeeded", "storageClaim": "runs"}
    s = step(c, train)
    assert s["phase"] == "Starting" and ("Job", "ml", "train-train") in c.objects
    c.runs["other"] = tr("other", storage={"size": "1Gi"}, status={"phase": "Succeeded"})
    s = step(c, tr("train2", after=["other"], storage=shared))
    assert s["phase"] == "Failed" and get_condition(s, "DependenciesReady")["reason"] == "DifferentStorage"


@pytest.mark.parametrize(
    "links,loop",
    [
        ({"a": {"after": ["b"]}, "b": {"after": ["a"]}}, "a -> b -> a"),
        (
            {"a": {"init": {"fromTrainingRun": "b"}}, "b": {"after": ["c"]}, "c": {"init": {"fromTrainingRun": "a"}}},
            "a -> b -> c -> a",
        ),
        ({"a": {"after": ["a"]}}, "a -> a"),  # CEL refuses only an init naming the run itself
    ],
)
def test_runs_that_wait_for_each_other_in_a_loop_fail_naming_it(links, loop):
    c = FakeCluster()
    for name, spec in links.items():
        c.runs[name] = tr(name, **spec)
    # A run waiting for a run in a loop, not in it itself, waits: that run fails on its own reconcile.
    assert step(c, tr("d", after=["a"]))["phase"] == "Pending"
    s = step(c, c.runs["a"])
    failed = get_condition(s, "DependenciesReady")
    assert s["phase"] == "Failed" and failed["reason"] == "DependencyCycle", s
    assert failed["message"].endswith(": " + loop), failed["message"]


def summary(s: dict) -> dict[str, tuple[str, str]]:
    """Ready/Reconciling/Stalled of a stored status as {type: (status, reason)}."""
    return {
        c["type"]: (c["status"], c["reason"])
        for c in s.get("conditions") or []
        if c["type"] in ("Ready", "Reconciling", "Stalled")
    }


def test_ready_reconciling_stalled_follow_the_run_as_kstatus_reads_them():
    """On the way: Reconciling; done: Ready; failed or refused: Stalled (kstatus: InProgress,
    Current, Failed). Each reason is the phase or the cause."""
    c = FakeCluster()
    c.runs["src"] = tr("src", status={"phase": "Running", "jobName": "src-train"})
    waiting = tr(init={"fromTrainingRun": "src"})
    s = step(c, waiting)
    assert summary(s) == {"Ready": ("False", "Pending"), "Reconciling": ("True", "Pending")}
    assert "src" in get_condition(s, "Reconciling")["message"]  # what it waits for

    run = tr()
    assert summary(step(c, run)) == {"Ready": ("False", "Starting"), "Reconciling": ("True", "Starting")}
    c.pods["demo-train"] = [running_pod()]
    assert summary(step(c, run)) == {"Ready": ("False", "Running"), "Reconciling": ("True", "Running")}
    run["spec"]["trainer"]["steps"] = 5000  # an edit the live run does not apply
    run["metadata"]["generation"] = 2
    s = step(c, run)
    assert summary(s)["Stalled"] == ("True", "SpecImmutable") and summary(s)["Reconciling"][0] == "True"
    run["spec"]["trainer"]["steps"] = 100
    assert "Stalled" not in summary(step(c, run))
    c.set_job("demo-train", "Complete", pods=[])
    assert summary(step(c, run)) == {"Ready": ("True", "Succeeded")}

    bad = tr("bad", trainer={"preset": "tiny", "steps": 0})
    assert summary(step(c, bad)) == {"Ready": ("False", "InvalidSpec"), "Stalled": ("True", "InvalidSpec")}


def test_pods_the_cluster_refuses_are_reported_with_the_reason():
    """Pod Security (or a quota, a webhook) refuses the Job's pods: the Job controller says so only
    in a FailedCreate event; the run says it in its Running and Stalled conditions and an event."""
    c = FakeCluster()
    run = tr(resources={"nodes": 2})
    step(c, run)
    refusal = 'pods "demo-train-0-x" is forbidden: violates PodSecurity "restricted:latest": privileged'
    c.create_failures["demo-train"] = (refusal, "2026-01-01T00:00:05Z")
    out = reconcile_training(c, run, CFG, now=NOW, adopt=adopt)
    s = dump_status(out.status)
    running = get_condition(s, "Running")
    assert s["phase"] == "Starting" and running["reason"] == "PodsRefused" and refusal in running["message"]
    assert summary(s)["Stalled"] == ("True", "PodsRefused")
    assert ("Warning", "PodsRefused", running["message"]) in out.events
    step(c, run)
    assert not any(e[1] == "PodsRefused" for e in reconcile_training(c, run, CFG, now=NOW, adopt=adopt).events)

    # Fixed (the namespace relabelled): a pod made after the refusal; the old event no longer counts.
    pod = running_pod()
    pod["metadata"]["creationTimestamp"] = "2026-01-01T00:01:00Z"
    c.pods["demo-train"] = [pod]
    s = step(c, run)
    assert get_condition(s, "Running")["reason"] == "PodsStarting" and "Stalled" not in summary(s)
    c.pods["demo-train"] = [running_pod(0), running_pod(1)]
    calls = len(c.calls)
    step(c, run)
    assert not any(x.startswith("events") for x in c.calls[calls:])  # every pod there: no event reads


def test_a_live_run_is_not_failed_by_a_stricter_feasibility_check(monkeypatch):
    """Feasibility gates the Job's creation. An operator restarted with less --gpu-memory-gib (or an
    upgrade with a stricter check) leaves a running run running, and its end is still recorded."""
    c = FakeCluster()
    run = tr(trainer={"preset": "nano-1B"}, resources={"gpusPerNode": 8})
    step(c, run)
    c.pods["demo-train"] = [running_pod()]
    assert step(c, run)["phase"] == "Running"
    # A rule this version added (extraResources may not carry cpu), on a run an older one started.
    run["spec"]["pod"] = {"extraResources": {"cpu": "4"}}
    assert step(c, run)["phase"] == "Running"
    monkeypatch.setattr(sys.modules[__name__], "CFG", dataclasses.replace(CFG, gpu_memory_gib=1.0))
    assert step(c, tr("other", trainer={"preset": "nano-1B"}, resources={"gpusPerNode": 8}))["phase"] == "Failed"
    assert step(c, run)["phase"] == "Running"
    c.set_job("demo-train", "Complete", pods=[])
    assert step(c, run)["phase"] == "Succeeded"


def test_ttl_is_set_on_the_job_once_the_outcome_is_recorded():
    c = FakeCluster()
    run = tr(ttlSecondsAfterFinished=300)
    step(c, run)
    c.pods["demo-train"] = [running_pod()]
    step(c, run)
    assert "ttlSecondsAfterFinished" not in c.job("demo-train")["spec"]
    c.set_job("demo-train", "Complete", pods=[])
    assert step(c, run)["phase"] == "Succeeded"
    # Not by the reconcile that computed Succeeded: its status write may yet be refused (a conflict),
    # and a Job deleted under a run recorded as Running would be made again.
    assert "ttlSecondsAfterFinished" not in c.job("demo-train")["spec"]
    step(c, run)  # the next one reads the outcome back from the API server
    assert c.job("demo-train")["spec"]["ttlSecondsAfterFinished"] == 300
    step(c, run)
    assert sum(x.startswith("patch demo-train ttl") for x in c.calls) == 1


@pytest.mark.parametrize("when_deleted,owned", [("Retain", False), ("Delete", True)])
def test_operator_made_storage_outlives_the_run_unless_asked(when_deleted, owned):
    """A prune (or kubectl delete) of a run keeps the PVC it made, and so its checkpoints, unless
    storage.whenDeleted is Delete: only owned objects are garbage-collected with their owner."""
    c = FakeCluster()
    step(c, tr(storage={"size": "10Gi", "whenDeleted": when_deleted}))
    pvc = c.objects[("PersistentVolumeClaim", "ml", "demo-storage")]
    assert bool(pvc["metadata"].get("ownerReferences")) is owned
    assert pvc["metadata"]["labels"]["nanochat.io/training-run"] == "demo"
    assert c.job("demo-train")["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"


@pytest.mark.parametrize(
    "preset,resources,needle",
    [
        # 80B: 297 GiB in fp32, too much for one GPU; 74 GiB per GPU in bf16 over 2, too much for vLLM too
        ("qwen3-hybrid", {"gpus": 2}, "needs 74.3 GiB per GPU (148 GiB of weights in all"),
        ("nano-1B", {"memory": "2Gi"}, "resources.memory=2Gi is not enough"),
    ],
)
def test_an_eval_that_cannot_load_its_model_fails_before_its_pod(preset, resources, needle):
    """nanochat eval loads each checkpoint whole in fp32 on one device, and vLLM serves one too large
    for that over resources.gpus GPUs: an EvalRun whose model fits neither is refused with the memory
    it needs, before any pod starts."""
    c = FakeCluster()
    c.runs["demo"] = tr(trainer={"preset": preset}, status={"phase": "Succeeded", "jobName": "demo-train"})
    s = step(c, er(resources=resources), fn=reconcile_eval)
    failed = get_condition(s, "Failed")
    assert s["phase"] == "Failed" and failed["reason"] == "Infeasible" and needle in failed["message"], failed
    assert not any(x.startswith("create") for x in c.calls)
    c.runs["demo"] = tr(trainer={"preset": "nano-125M"}, status={"phase": "Succeeded", "jobName": "demo-train"})
    assert step(c, er("ok", resources=resources), fn=reconcile_eval)["phase"] == "Starting"


def test_a_compared_run_too_large_to_load_fails_the_eval_naming_it():
    c = FakeCluster()
    for run, preset in (("demo", "nano-125M"), ("big", "qwen3-hybrid")):
        c.runs[run] = tr(run, trainer={"preset": preset}, status={"phase": "Succeeded", "jobName": f"{run}-train"})
    s = step(c, er(resources={"gpus": 1}, compare=[{"name": "parent", "trainingRun": "big"}]), fn=reconcile_eval)
    failed = get_condition(s, "Failed")
    assert failed["reason"] == "Infeasible" and failed["message"].startswith("parent: a model of ~"), failed


def test_an_eval_whose_model_fits_one_gpu_loads_it_in_nanochat_eval_as_before():
    c = FakeCluster()
    c.runs["demo"] = tr(trainer={"preset": "nano-1B"}, status={"phase": "Succeeded", "jobName": "demo-train"})
    out = reconcile_eval(c, er(resources={"gpus": 8}), CFG, now=NOW, adopt=adopt)
    s = dump_status(out.status)
    pod = c.job("ev-eval")["spec"]["template"]["spec"]
    assert [i["name"] for i in pod["initContainers"]] == ["sandbox"]
    assert pod["containers"][0]["command"][:4] == ["nanochat", "eval", "--checkpoint", "/data/runs/demo/final"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "serving" not in s and get_condition(s, "Accepted")["message"] == "the spec is valid and fits its resources"
    assert ("Normal", "Created", "created Job ev-eval") in out.events


def test_a_served_best_checkpoint_is_exported_apart_from_final():
    """Evaluations of final/ and best/ of one run may run at once: each has its own export directory."""
    c = FakeCluster()
    c.runs["demo"] = tr(
        trainer={"preset": "qwen3-hybrid", "evaluation": {"every": 100}},
        status={"phase": "Succeeded", "jobName": "demo-train", "bestPassAt1": 0.3, "bestPassAt1Step": 500},
    )
    ev = er(resources={"gpus": 8}, model={"trainingRun": "demo", "checkpoint": "best"})
    out = reconcile_eval(c, ev, OperatorConfig(trainer_image="t", vllm_image="v"), now=NOW, adopt=adopt)
    _, export, vllm = c.job("ev-eval")["spec"]["template"]["spec"]["initContainers"]
    assert export["command"] == ["nanochat", "export", "/data/runs/demo/best", "--hf", "/data/runs/demo/hf-best"]
    assert "/data/runs/demo/hf-best" in vllm["args"] and dump_status(out.status)["serving"]["modelDir"].endswith(
        "hf-best"
    )


def test_an_eval_of_a_ternary_run_loads_its_packed_export_on_one_gpu():
    """Phase 3's student (qwen3-hybrid with ternary experts): 297 GiB in fp32, 16 GiB packed: the eval
    loads the packed export (the ternary model as trained: 8-bit activations too) on one GPU, and
    compares it with its parent's final/ in the same pod."""
    c = FakeCluster()
    student = {"preset": "qwen3-hybrid", "stage": "ternary", "ternary": {"include": ["layers.*.mlp.experts.*"]}}
    c.runs["demo"] = tr(trainer=student, status={"phase": "Succeeded", "jobName": "demo-train"})
    c.runs["base"] = tr(trainer={"preset": "nano-125M"}, status={"phase": "Succeeded", "jobName": "base-train"})
    ev = er(resources={"gpus": 8}, compare=[{"name": "parent", "trainingRun": "base"}])
    out = reconcile_eval(c, ev, CFG, now=NOW, adopt=adopt)
    s = dump_status(out.status)
    pod = c.job("ev-eval")["spec"]["template"]["spec"]
    assert [i["name"] for i in pod["initContainers"]] == ["sandbox"]  # no export, no vLLM
    command = pod["containers"][0]["command"]
    assert command[:4] == ["nanochat", "eval", "--checkpoint", "/data/runs/demo/model.ternary.safetensors"]
    assert command[command.index("--compare") + 1] == "parent=/data/runs/base/final"
    assert s["checkpoint"] == "/data/runs/demo/model.ternary.safetensors" and "serving" not in s


def test_an_eval_of_a_model_too_large_for_one_gpu_is_served_by_vllm_and_says_so():
    """qwen3-hybrid (~80B) does not fit one 80 GiB GPU in fp32; over 8 GPUs in bf16 it does: the pod
    exports it and serves it with vLLM (tensor parallelism 8), and the status and events say so."""
    c = FakeCluster()
    c.runs["demo"] = tr(trainer={"preset": "qwen3-hybrid"}, status={"phase": "Succeeded", "jobName": "demo-train"})
    cfg = OperatorConfig(trainer_image="trainer:test", vllm_image="vllm:test")
    ev = er(resources={"gpus": 8})
    out = reconcile_eval(c, ev, cfg, now=NOW, adopt=adopt)
    s = dump_status(out.status)
    pod = c.job("ev-eval")["spec"]["template"]["spec"]
    sandbox, export, vllm = pod["initContainers"]
    assert vllm["image"] == "vllm:test" and "--tensor-parallel-size" in vllm["args"]
    assert vllm["args"][vllm["args"].index("--tensor-parallel-size") + 1] == "8"
    assert vllm["args"][vllm["args"].index("--max-model-len") + 1] == "4096"  # the model's max_seq_len
    assert export["command"] == ["nanochat", "export", "/data/runs/demo/final", "--hf", "/data/runs/demo/hf"]
    assert s["serving"] == {
        "server": "vllm",
        "tensorParallelSize": 8,
        "modelDir": "/data/runs/demo/hf",
        "url": "http://127.0.0.1:8000/v1",
        "reason": "TrainingRun demo: a model of ~79.67B parameters needs 297 GiB in fp32, more than one GPU's "
        "80 GiB (nanochat eval does not shard a model)",
    }
    said = "served by vLLM with tensor parallelism 8 from /data/runs/demo/hf, scored at http://127.0.0.1:8000/v1"
    assert said in get_condition(s, "Accepted")["message"]
    (created,) = [e for e in out.events if e[1] == "Created"]
    assert created[0] == "Normal" and said in created[2]
    assert s["checkpoint"] == "/data/runs/demo/final" and s["resultsPath"] == "/data/runs/demo/eval/ev.json"
    # Later looks at the run keep saying it (the Job is there; nothing is decided again).
    ev["status"] = {k: v for k, v in status_patch({}, s).items() if v is not None}
    c.set_job("ev-eval", pods=[running_pod()])
    again = step(c, ev, fn=reconcile_eval)
    assert again["serving"] == s["serving"] and said in get_condition(again, "Accepted")["message"]


def test_a_served_model_leaves_no_gpu_to_a_compared_training_run():
    c = FakeCluster()
    for run, preset in (("demo", "qwen3-hybrid"), ("small", "nano-125M")):
        c.runs[run] = tr(run, trainer={"preset": preset}, status={"phase": "Succeeded", "jobName": f"{run}-train"})
    compare = [
        {"name": "base", "trainingRun": "small"},
        {"name": "api", "endpoint": {"url": "http://t/v1", "model": "m"}},
    ]
    s = step(c, er(resources={"gpus": 8}, compare=compare), fn=reconcile_eval)
    failed = get_condition(s, "Failed")
    assert failed["reason"] == "Infeasible" and failed["message"].startswith(
        "compare base: nanochat eval would load"
    ), failed
    assert not any(x.startswith("create") for x in c.calls)
    # Compared endpoints are fine: the eval container scores them beside the served model.
    s = step(c, er("ep", resources={"gpus": 8}, compare=compare[1:]), fn=reconcile_eval)
    assert s["phase"] == "Starting" and s["serving"]["tensorParallelSize"] == 8
    cmd = c.job("ep-eval")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--compare") + 1] == "api=http://t/v1#m"
