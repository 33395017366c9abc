"""The status machine from every Job and pod state (pure functions, no cluster).

Statuses go in and come out as the API stores them (camelCase JSON, through load_status and
dump_status), so each step reads back what the previous one wrote, as on a real API server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from nanochat_operator import progress as prog
from nanochat_operator.api import EvalRunStatus, TrainingRunStatus
from nanochat_operator.metrics import OperatorMetrics
from nanochat_operator.status import (
    JobView,
    dump_status,
    eval_status,
    load_status,
    observe_job,
    set_condition,
    terminated_message,
    training_status,
)
from nanochat_trainer.contract import ConditionType, EvalResult, parse_result

from operator_support import get_condition

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def train(prev: dict, view: JobView | None, progress: prog.Progress | None, **kw) -> dict:
    """training_status on the JSON an API server holds: loaded, computed, dumped."""
    return dump_status(training_status(load_status(TrainingRunStatus, prev), view, progress, **kw))


def evaluate(prev: dict, view: JobView | None, result: EvalResult | None, **kw) -> dict:
    return dump_status(eval_status(load_status(EvalRunStatus, prev), view, result, **kw))


def job(*conditions: tuple[str, str], suspend: bool = False, failed: int = 0, **status) -> dict:
    conds = [
        {"type": t, "status": "True", "reason": r, "message": f"{t} {r}", "lastTransitionTime": "2026-01-01T11:00:00Z"}
        for t, r in conditions
    ]
    return {
        "metadata": {"name": "demo-train", "labels": {}},
        "spec": {"suspend": suspend},
        "status": {"conditions": conds, "failed": failed, **status},
    }


def pod(
    index: int,
    phase: str,
    *,
    waiting: str | None = None,
    unschedulable: bool = False,
    terminated: dict | None = None,
    ip: str = "10.0.0.1",
    deleting: bool = False,
) -> dict:
    st: dict = {"phase": phase, "podIP": ip}
    cs: dict = {"name": "trainer", "state": {}}
    if waiting:
        cs["state"] = {"waiting": {"reason": waiting, "message": f"{waiting}: details"}}
    if terminated:
        cs["state"] = {"terminated": terminated}
    st["containerStatuses"] = [cs]
    if unschedulable:
        st["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes: insufficient nvidia.com/gpu",
            }
        ]
    meta = {
        "name": f"demo-train-{index}-abcde",
        "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        "creationTimestamp": f"2026-01-01T11:0{index}:00Z",
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T11:59:00Z"
    return {"metadata": meta, "status": st}


# ---------------------------------------------------------------------------- observe_job

CASES = [
    # (job, pods, nodes) -> (phase, reason)
    (None, [], 1, None, None),
    (job(), [], 2, "Starting", "PodsStarting"),
    (job(), [pod(0, "Pending")], 2, "Starting", "PodsStarting"),
    (job(), [pod(0, "Running"), pod(1, "Pending")], 2, "Starting", "PodsStarting"),
    (job(), [pod(0, "Running"), pod(1, "Running")], 2, "Running", "AllPodsRunning"),
    (job(), [pod(0, "Running"), pod(1, "Succeeded")], 2, "Running", "AllPodsRunning"),
    # Pods done, Job not yet Complete (found on a real API server): Running, not back to Starting.
    (job(), [pod(0, "Succeeded"), pod(1, "Succeeded")], 2, "Running", "PodsFinished"),
    (job(), [pod(0, "Running"), pod(1, "Running", deleting=True)], 2, "Starting", "PodsStarting"),
    (job(), [pod(0, "Pending", unschedulable=True)], 1, "Starting", "Unschedulable"),
    (job(), [pod(0, "Pending", waiting="ImagePullBackOff")], 1, "Starting", "ImagePullBackOff"),
    (job(), [pod(0, "Pending", waiting="CreateContainerConfigError")], 1, "Starting", "CreateContainerConfigError"),
    (job(), [pod(0, "Pending", waiting="ContainerCreating")], 1, "Starting", "PodsStarting"),
    (
        job(failed=1),
        [pod(0, "Failed", terminated={"exitCode": 1, "message": "NCCL timeout"}), pod(0, "Pending")],
        1,
        "Starting",
        "Restarting",
    ),
    (job(suspend=True), [], 1, "Pending", "Suspended"),
    (job(("Suspended", "JobSuspended")), [], 1, "Pending", "Suspended"),
    (job(("Complete", "CompletionsReached")), [pod(0, "Succeeded")], 1, "Succeeded", "Completed"),
    (job(("SuccessCriteriaMet", "CompletionsReached")), [], 1, "Succeeded", "Completed"),
    (
        job(("Failed", "BackoffLimitExceeded"), failed=4),
        [pod(0, "Failed", terminated={"exitCode": 1})],
        1,
        "Failed",
        "BackoffLimitExceeded",
    ),
    (
        job(("Failed", "PodFailurePolicy")),
        [pod(0, "Failed", terminated={"exitCode": 2, "message": "error: bad"})],
        1,
        "Failed",
        "PodFailurePolicy",
    ),
    (job(("FailureTarget", "PodFailurePolicy")), [], 1, "Failed", "PodFailurePolicy"),
    (job(("Failed", "DeadlineExceeded")), [], 1, "Failed", "DeadlineExceeded"),
]


@pytest.mark.parametrize("j,pods,nodes,phase,reason", CASES)
def test_observe_job_every_state(j, pods, nodes, phase, reason):
    view = observe_job(j, pods, nodes)
    if j is None:
        assert view is None
        return
    assert (view.phase, view.reason) == (phase, reason)


def test_failed_message_names_exit_code_and_last_log_line():
    view = observe_job(
        job(("Failed", "PodFailurePolicy")),
        [pod(0, "Failed", terminated={"exitCode": 2, "reason": "Error", "message": "Traceback\nerror: steps=0 bad"})],
        1,
    )
    assert "exited 2 (Error): error: steps=0 bad" in view.message


def test_failed_message_names_the_init_container_that_failed():
    """An eval pod's export step failing (an init container) says so, with its last line; a sidecar
    stopped with the pod (exit 0 or none) is not the culprit."""
    failed = pod(0, "Failed")
    failed["status"]["containerStatuses"] = [{"name": "eval", "state": {"waiting": {"reason": "PodInitializing"}}}]
    failed["status"]["initContainerStatuses"] = [
        {"name": "sandbox", "state": {"running": {}}},
        {"name": "export", "state": {"terminated": {"exitCode": 2, "reason": "Error", "message": "error: bad --hf"}}},
    ]
    view = observe_job(job(("Failed", "PodFailurePolicy")), [failed], 1)
    assert "container export exited 2 (Error): error: bad --hf" in view.message, view.message


def test_restarts_and_pod0():
    view = observe_job(job(failed=3), [pod(1, "Running", ip="10.0.0.2"), pod(0, "Running", ip="10.0.0.9")], 2)
    assert view.restarts == 3
    assert view.pod0["status"]["podIP"] == "10.0.0.9"


# ---------------------------------------------------------------------------- training_status


def status_after(prev, j, pods, nodes=1, progress=None, now=NOW):
    return train(
        prev,
        observe_job(j, pods, nodes),
        progress,
        now=now,
        generation=3,
        job_name="demo-train",
        final_checkpoint="/data/runs/demo/final",
        checkpoint_path=lambda s: f"/data/runs/demo/checkpoints/step_{s:08d}",
    )


def test_lifecycle_pending_starting_running_succeeded():
    s = train({}, None, None, now=NOW, generation=1, job_name="demo-train")
    assert s["phase"] == "Pending" and s["observedGeneration"] == 1
    s = status_after(s, job(), [pod(0, "Pending")])
    assert s["phase"] == "Starting" and s["jobName"] == "demo-train"
    assert get_condition(s, "Running")["status"] == "False"
    s = status_after(
        s,
        job(),
        [pod(0, "Running")],
        progress=prog.Progress(step=100, total_steps=1000, loss=3.2, tokens_per_second=1234.56, checkpoint_step=0),
    )
    assert s["phase"] == "Running" and s["step"] == 100 and s["loss"] == 3.2 and s["tokensPerSecond"] == 1234.6
    assert s["startTime"] == "2026-01-01T12:00:00Z" and "latestCheckpoint" not in s
    running_since = get_condition(s, "Running")["lastTransitionTime"]
    later = NOW + timedelta(seconds=100)
    s = status_after(
        s,
        job(),
        [pod(0, "Running")],
        now=later,
        progress=prog.Progress(
            step=200,
            total_steps=1000,
            loss=3.0,
            val_loss=3.4567891,
            pass_at_1=0.12195,
            best_pass_at_1=0.15244,
            best_step=100,
            checkpoint_step=200,
        ),
    )
    assert s["eta"] == "13m20s"  # 800 steps left at 1 step/s
    assert s["valLoss"] == 3.456789  # a validation ran at this step; kept until the next one
    assert (s["passAt1"], s["bestPassAt1"], s["bestPassAt1Step"]) == (0.122, 0.1524, 100)
    assert s["latestCheckpoint"] == "/data/runs/demo/checkpoints/step_00000200" and s["latestCheckpointStep"] == 200
    # An unchanged condition status keeps its transition time.
    assert get_condition(s, "Running")["lastTransitionTime"] == running_since
    s = status_after(
        s, job(("Complete", "CompletionsReached"), completionTime="2026-01-01T13:00:00Z"), [pod(0, "Succeeded")]
    )
    assert s["phase"] == "Succeeded" and s["step"] == 1000 and s["eta"] is None
    assert s["finalCheckpoint"] == "/data/runs/demo/final" and s["completionTime"] == "2026-01-01T13:00:00Z"
    assert get_condition(s, "Complete")["status"] == "True"


def test_a_run_that_ends_between_two_scrapes_still_counts_to_its_planned_steps():
    """A short run (a small generate stage, say) can start and finish between two reconciles, so
    its gauges are never read: the spec's plan is the count it reached."""
    s = train({}, None, None, now=NOW, generation=1, job_name="demo-train", total_steps=40)
    assert s["phase"] == "Pending" and s["totalSteps"] == 40 and "step" not in s
    s = status_after(s, job(("Complete", "CompletionsReached")), [pod(0, "Succeeded")])
    assert s["phase"] == "Succeeded" and (s["step"], s["totalSteps"]) == (40, 40)


def test_terminal_is_sticky_even_when_job_disappears():
    s = status_after({}, job(("Failed", "BackoffLimitExceeded")), [])
    assert s["phase"] == "Failed" and get_condition(s, "Failed")["reason"] == "BackoffLimitExceeded"
    again = train(s, None, None, now=NOW, generation=4, job_name="demo-train")
    assert again["phase"] == "Failed" and again["observedGeneration"] == 4
    again = status_after(s, job(), [pod(0, "Running")])
    assert again["phase"] == "Failed"


def test_suspend_resume_keeps_progress():
    s = status_after({}, job(), [pod(0, "Running")], progress=prog.Progress(step=50, total_steps=100))
    s = status_after(s, job(suspend=True), [])
    assert s["phase"] == "Pending" and s["step"] == 50
    assert get_condition(s, "Suspended")["status"] == "True"
    s = status_after(s, job(), [pod(0, "Pending")])
    assert s["phase"] == "Starting" and get_condition(s, "Suspended")["status"] == "False"


def test_no_progress_keeps_old_values_and_eta_needs_two_points():
    s = status_after({}, job(), [pod(0, "Running")], progress=prog.Progress(step=10, total_steps=100))
    assert "eta" not in s
    s2 = status_after(s, job(), [pod(0, "Running")], progress=None)
    assert s2["step"] == 10


def test_status_json_is_exactly_what_was_read_or_set():
    """The stored JSON: no field the code did not touch (kopf's bookkeeping included), and
    None where a value must be cleared (the merge patch removes it)."""
    running = observe_job(job(), [pod(0, "Running")], 1)
    s = train({"kopf": {"progress": {}}}, None, None, now=NOW, generation=1, job_name="demo-train")
    assert s == {"phase": "Pending", "observedGeneration": 1}
    s = train(
        s, running, prog.Progress(step=10, total_steps=100, loss=2.0), now=NOW, generation=1, job_name="demo-train"
    )
    conds = [
        {
            "type": "Suspended",
            "status": "False",
            "reason": "NotSuspended",
            "message": "",
            "lastTransitionTime": "2026-01-01T12:00:00Z",
        },
        {
            "type": "Running",
            "status": "True",
            "reason": "AllPodsRunning",
            "message": "1/1 pods running",
            "lastTransitionTime": "2026-01-01T12:00:00Z",
        },
    ]
    assert s == {
        "phase": "Running",
        "observedGeneration": 1,
        "jobName": "demo-train",
        "restarts": 0,
        "startTime": "2026-01-01T12:00:00Z",
        "conditions": conds,
        "totalSteps": 100,
        "loss": 2.0,
        "step": 10,
        "lastProgressTime": "2026-01-01T12:00:00Z",
    }
    s = train(
        s,
        running,
        prog.Progress(step=20, total_steps=100),
        now=NOW + timedelta(seconds=10),
        generation=1,
        job_name="demo-train",
    )
    assert s["step"] == 20 and s["eta"] == "1m20s" and s["lastProgressTime"] == "2026-01-01T12:00:10Z"
    done = observe_job(job(("Complete", "CompletionsReached"), completionTime="2026-01-01T13:00:00Z"), [], 1)
    s = train(s, done, None, now=NOW + timedelta(seconds=20), generation=1, job_name="demo-train")
    assert s == {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "jobName": "demo-train",
        "restarts": 0,
        "startTime": "2026-01-01T12:00:00Z",
        "conditions": [
            conds[0],
            {
                "type": "Running",
                "status": "False",
                "reason": "Completed",
                "message": "Complete CompletionsReached",
                "lastTransitionTime": "2026-01-01T12:00:20Z",
            },
            {
                "type": "Complete",
                "status": "True",
                "reason": "Completed",
                "message": "Complete CompletionsReached",
                "lastTransitionTime": "2026-01-01T12:00:20Z",
            },
        ],
        "totalSteps": 100,
        "loss": 2.0,
        "step": 100,
        "lastProgressTime": "2026-01-01T12:00:10Z",
        "eta": None,
        "completionTime": "2026-01-01T13:00:00Z",
    }


def test_status_functions_leave_their_input_alone():
    prev = load_status(
        TrainingRunStatus,
        {"phase": "Running", "jobName": "demo-train", "step": 5, "conditions": [{"type": "Running", "status": "True"}]},
    )
    before = prev.model_dump()
    done = observe_job(job(("Complete", "CompletionsReached")), [], 1)
    training_status(prev, done, prog.Progress(step=9, total_steps=9), now=NOW, generation=2, job_name="demo-train")
    eval_prev = load_status(EvalRunStatus, {"phase": "Running", "jobName": "e"})
    eval_before = eval_prev.model_dump()
    eval_status(eval_prev, done, EvalResult({"pass@1": 0.5}), now=NOW, generation=2, job_name="e")
    assert prev.model_dump() == before and eval_prev.model_dump() == eval_before


def test_status_model_refuses_what_the_schema_refuses():
    status = TrainingRunStatus()
    with pytest.raises(ValidationError):
        status.phase = "Runing"
    with pytest.raises(ValidationError):
        load_status(TrainingRunStatus, {"phase": "Running", "notInTheSchema": 1})


def test_set_condition_transition_time():
    c = set_condition([], ConditionType.RUNNING, "True", "A", "m", NOW)
    c2 = set_condition(c, ConditionType.RUNNING, "True", "B", "m2", NOW + timedelta(hours=1))
    assert c2[0].last_transition_time == c[0].last_transition_time and c2[0].reason == "B"
    c3 = set_condition(c2, ConditionType.RUNNING, "False", "C", "", NOW + timedelta(hours=2))
    assert c3[0].last_transition_time == "2026-01-01T14:00:00Z"
    assert c2[0].reason == "B" and c[0].reason == "A"  # the lists given are left alone


# ---------------------------------------------------------------------------- eval


def test_eval_result_from_termination_message():
    message = '{"pass_at_k": {"1": 0.25, "10": 0.5}, "problems": 164, "samples": 10}'
    p = pod(0, "Succeeded", terminated={"exitCode": 0, "message": message})
    p["status"]["containerStatuses"][0]["name"] = "eval"
    result = parse_result(terminated_message(p, "eval"))
    assert result == EvalResult({"pass@1": 0.25, "pass@10": 0.5}, 164, 10)
    s = evaluate(
        {},
        observe_job(job(("Complete", "CompletionsReached")), [p], 1),
        result,
        now=NOW,
        generation=1,
        job_name="ev-eval",
    )
    assert s["phase"] == "Succeeded" and s["passAt1"] == 0.25 and s["scores"] == {"pass@1": 0.25, "pass@10": 0.5}
    assert get_condition(s, "ResultsRecorded")["status"] == "True"


def test_terminated_message_of_the_named_container_current_or_last():
    last = {
        "status": {
            "containerStatuses": [
                {"name": "sidecar", "state": {"terminated": {"message": "not this one"}}},
                {"name": "eval", "state": {"running": {}}, "lastState": {"terminated": {"message": "earlier"}}},
            ]
        }
    }
    assert terminated_message(last, "eval") == "earlier"
    assert terminated_message(last, "trainer") is None and terminated_message({}, "eval") is None


def test_eval_result_from_log_fallback_and_missing():
    logs = 'generating...\nNANOCHAT_RESULT {"pass_at_k": {"1": 0.1}, "problems": 5, "samples": 1}\n'
    assert parse_result(logs).scores == {"pass@1": 0.1}
    assert parse_result("Traceback: boom") is None and parse_result(None) is None
    s = evaluate({}, observe_job(job(("Complete", "x")), [], 1), None, now=NOW, generation=1, job_name="e")
    assert s["phase"] == "Succeeded" and get_condition(s, "ResultsRecorded")["reason"] == "NoResult"


def test_parse_trainer_metrics_and_duration():
    text = (
        "# HELP nanochat_trainer_step Optimizer steps done.\n# TYPE nanochat_trainer_step gauge\n"
        "nanochat_trainer_step 120.0\nnanochat_trainer_total_steps 10000.0\nnanochat_trainer_loss 2.5\n"
        "nanochat_trainer_tokens_per_second 50000.0\nnanochat_trainer_checkpoint_step NaN\n"
        'python_gc_objects_collected_total{generation="0"} 5.0\nnanochat_trainer_val_loss 2.75\n'
    )
    p = prog.parse_trainer_metrics(text)
    want = prog.Progress(step=120, total_steps=10000, loss=2.5, val_loss=2.75, tokens_per_second=50000.0)
    assert p == want
    assert prog.parse_trainer_metrics("") == prog.Progress()
    odd = 'nanochat_trainer_generate_rejected_by_reason{reason="a"} +Inf\nnanochat_trainer_loss -Inf\n'
    assert prog.parse_trainer_metrics(odd) == prog.Progress()  # no number, not an error
    assert [prog.format_duration(s) for s in (5, 65, 3725, 90000)] == ["5s", "1m05s", "1h02m", "1d1h"]


def test_teacher_down_keeps_the_run_running_with_a_condition_saying_so():
    text = (
        "nanochat_trainer_step 40\nnanochat_trainer_total_steps 100\n"
        "nanochat_trainer_teacher_up 0\nnanochat_trainer_teacher_skipped 7\n"
    )
    p = prog.parse_trainer_metrics(text)
    assert p.teacher_up is False and p.teacher_skipped == 7
    running = observe_job(job(active=1), [pod(0, "Running")], 1)
    st = train({}, running, p, now=NOW, generation=1, job_name="demo-train")
    assert st["phase"] == "Running"
    cond = get_condition(st, "TeacherAvailable")
    assert cond["status"] == "False" and cond["reason"] == "TeacherUnreachable" and "7 trained" in cond["message"]
    back = prog.parse_trainer_metrics(text.replace("teacher_up 0", "teacher_up 1"))
    st = train(st, running, back, now=NOW, generation=1, job_name="demo-train")
    assert get_condition(st, "TeacherAvailable")["status"] == "True"
    plain = train(
        {},
        running,
        prog.parse_trainer_metrics("nanochat_trainer_step 3\n"),
        now=NOW,
        generation=1,
        job_name="demo-train",
    )
    assert get_condition(plain, "TeacherAvailable") is None  # not a distillation run


def test_last_progress_gauge_counts_from_the_last_start_of_running():
    """nanochat_training_last_progress_timestamp_seconds, which the chart's NanochatTrainingNoProgress
    alert reads: while Running, when the step last changed or the run last started Running, whichever
    is later; no series otherwise. It comes from the status alone, so a restarted operator (a fresh
    OperatorMetrics here, as on every call) exports the same time."""

    def gauge(s: dict) -> float | None:
        metrics = OperatorMetrics()
        metrics.observe_training("ml", "demo", load_status(TrainingRunStatus, s))
        name = "nanochat_training_last_progress_timestamp_seconds"
        return metrics.registry.get_sample_value(name, {"namespace": "ml", "name": "demo"})

    def at(minutes: int) -> datetime:
        return NOW + timedelta(minutes=minutes)

    s = status_after({}, job(), [pod(0, "Pending")], now=at(0))
    assert s["phase"] == "Starting" and gauge(s) is None
    s = status_after(s, job(), [pod(0, "Running")], now=at(1))
    assert gauge(s) == at(1).timestamp()  # a fresh run, no step yet: counted from its start
    s = status_after(s, job(), [pod(0, "Running")], progress=prog.Progress(step=10, total_steps=100), now=at(5))
    assert gauge(s) == at(5).timestamp()
    s = status_after(s, job(), [pod(0, "Running")], progress=prog.Progress(step=10, total_steps=100), now=at(30))
    assert gauge(s) == at(5).timestamp()  # the same step: no progress since minute 5
    # Its pod is replaced: Starting (no series), then Running again from minute 33 with its old
    # step, before the trainer has loaded its checkpoint: counted from then, not from minute 5.
    s = status_after(s, job(), [pod(0, "Pending")], now=at(31))
    assert s["phase"] == "Starting" and gauge(s) is None
    s = status_after(s, job(), [pod(0, "Running")], now=at(33))
    assert s["step"] == 10 and s["startTime"] == at(1).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert gauge(s) == at(33).timestamp()
    s = status_after(s, job(), [pod(0, "Running")], progress=prog.Progress(step=11, total_steps=100), now=at(40))
    assert gauge(s) == at(40).timestamp()
    s = status_after(s, job(("Complete", "CompletionsReached")), [pod(0, "Succeeded")], now=at(50))
    assert s["phase"] == "Succeeded" and gauge(s) is None
    # A status with no Running condition (written by an older operator) falls back to startTime.
    old = {"phase": "Running", "startTime": "2026-01-01T12:01:00Z"}
    assert gauge(old) == at(1).timestamp()
    metrics = OperatorMetrics()
    metrics.observe_training("ml", "demo", load_status(TrainingRunStatus, old))
    metrics.forget("TrainingRun", "ml", "demo")
    assert "nanochat_training_last_progress_timestamp_seconds{" not in metrics.exposition().decode()
