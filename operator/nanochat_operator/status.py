"""The status machine (pure): Job + pods + previous status -> the run's new status.

    prev = load_status(TrainingRunStatus, obj["status"])          # what kopf hands over
    view = observe_job(job, pods, nodes=4)                       # what the cluster shows
    status = training_status(prev, view, progress, now=..., ...)  # what the run's status says
    patch = status_patch(obj["status"], dump_status(status))     # (reconcile) what kopf writes

Phases: Pending (no Job yet, or suspended / queued), Starting (Job made, not every pod
running), Running, Succeeded, Failed. Succeeded and Failed are final: once a run has
reached one, later observations (the Job deleted, pods gone) do not move it.

Conditions follow the Kubernetes convention: lastTransitionTime changes only when a
condition's status changes. Their types are the contract's ConditionType: Suspended,
Running, Complete, Failed, TeacherAvailable and ResultsRecorded are set here, Accepted,
DependenciesReady and SpecChangeRefused by the reconciler.

The status is the API's own pydantic model (TrainingRunStatus / EvalRunStatus), so the
code cannot write a field the CRD schema lacks. Jobs and pods stay plain camelCase dicts,
as the API server sends them, so the tests can feed it any Job and pod state. Every
function returns a new status and leaves the one it was given alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from nanochat_trainer.contract import (
    COMPLETION_INDEX_ANNOTATION,
    TERMINAL_PHASES,
    ConditionType,
    EvalResult,
    Phase,
    score_key,
)

from . import progress as prog
from .api import Condition, ConditionStatus, EvalRunStatus, GenerationStatus, RunStatusCommon, TrainingRunStatus

# Container waiting reasons worth surfacing: the pod will not start by itself soon.
STUCK_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
)
MAX_MESSAGE = 1024  # conditions stay readable and status objects small

S = TypeVar("S", bound=RunStatusCommon)


def now_utc() -> datetime:
    return datetime.now(UTC)


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------- the JSON boundary


def load_status(model: type[S], raw: Mapping[str, Any] | None) -> S:
    """A run's status as kopf hands it over, as the model. kopf's own bookkeeping is left
    out: the operator never writes it back."""
    return model.model_validate({k: v for k, v in (raw or {}).items() if k != "kopf"})


def dump_status(status: RunStatusCommon) -> dict[str, Any]:
    """The status as the API stores it (camelCase JSON). Only the fields that were loaded or
    set: a field set to None stays, as a JSON merge patch's way to clear it, and one never
    touched (kopf's bookkeeping, an EvalRun's scores before it has any) is not written."""
    return status.model_dump(mode="json", by_alias=True, exclude_unset=True)


# ---------------------------------------------------------------------------- conditions


def set_condition(
    conditions: list[Condition], type_: ConditionType, status: ConditionStatus, reason: str, message: str, now: datetime
) -> list[Condition]:
    """A copy of `conditions` with one condition set; its transition time kept if status is unchanged."""
    old = _find(conditions, type_)
    when = old.last_transition_time if old is not None and old.status == status else None
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:MAX_MESSAGE],
        last_transition_time=when or rfc3339(now),
    )
    return remove_condition(conditions, type_) + [new]


def remove_condition(conditions: list[Condition], type_: ConditionType) -> list[Condition]:
    return [c.model_copy() for c in conditions if c.type != type_]


def get_condition(status: RunStatusCommon, type_: ConditionType) -> Condition | None:
    return _find(status.conditions, type_)


def _find(conditions: list[Condition], type_: ConditionType) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


# ---------------------------------------------------------------------------- observing a Job


@dataclass(frozen=True)
class JobView:
    """What a Job and its pods say, reduced to what the status needs."""

    phase: Phase
    reason: str
    message: str
    restarts: int = 0
    suspended: bool = False
    completion_time: str | None = None
    pod0: dict[str, Any] | None = None  # the running pod of completion index 0


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def _pod_index(pod: dict[str, Any]) -> str | None:
    meta = pod.get("metadata") or {}
    return (meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION) or (meta.get("labels") or {}).get(
        COMPLETION_INDEX_ANNOTATION
    )


def _last_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _failed_pod_detail(pods: list[dict[str, Any]]) -> str:
    """Exit code and last message of the most recent failed pod, for the Failed message: of its
    containers, or else of the init container that failed (e.g. an eval pod's export step)."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    for pod in reversed(failed):
        st = pod.get("status") or {}
        inits = [(cs, f" container {cs.get('name')}") for cs in st.get("initContainerStatuses") or []]
        for cs, which in [(cs, "") for cs in st.get("containerStatuses") or []] + inits:
            term = (cs.get("state") or {}).get("terminated")
            if term and (not which or term.get("exitCode")):
                detail = f"pod {pod['metadata'].get('name')}{which} exited {term.get('exitCode')}"
                if term.get("reason"):
                    detail += f" ({term['reason']})"
                last = _last_line(term.get("message"))
                return f"{detail}: {last}" if last else detail
    return ""


def _stuck(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """A reason pods are not starting (unschedulable, image pull, bad config)."""
    for pod in pods:
        st = pod.get("status") or {}
        if st.get("phase") not in (None, "Pending", "Running"):
            continue
        name = (pod.get("metadata") or {}).get("name", "?")
        for cs in (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_REASONS:
                return waiting["reason"], f"pod {name}: {waiting.get('message') or waiting['reason']}"
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return "Unschedulable", f"pod {name}: {c.get('message') or 'no node fits'}"
    return None


def live_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods not being deleted."""
    return [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]


def _refused(create_failure: tuple[str, str] | None, live: list[dict[str, Any]]) -> str | None:
    """The Job controller's FailedCreate message, unless a pod was made after it (the cause is gone)."""
    if create_failure is None:
        return None
    message, when = create_failure
    newest_pod = max(((p.get("metadata") or {}).get("creationTimestamp") or "" for p in live), default="")
    return message if when >= newest_pod else None


def observe_job(
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    nodes: int,
    create_failure: tuple[str, str] | None = None,
) -> JobView | None:
    """Reduce a Job and its pods to a JobView; None when there is no Job. `create_failure`:
    (message, time) of the Job's newest FailedCreate event, read only while pods are missing."""
    if job is None:
        return None
    st = job.get("status") or {}
    restarts = int(st.get("failed") or 0)
    done = _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet")
    if done:
        return JobView(
            Phase.SUCCEEDED,
            "Completed",
            done.get("message") or "all pods succeeded",
            restarts,
            completion_time=st.get("completionTime"),
        )
    failed = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
    if failed:
        detail = _failed_pod_detail(pods)
        msg = failed.get("message") or "the Job failed"
        return JobView(
            Phase.FAILED,
            failed.get("reason") or "JobFailed",
            f"{msg}; {detail}" if detail else msg,
            restarts,
            completion_time=(failed.get("lastTransitionTime") or st.get("completionTime")),
        )
    if (job.get("spec") or {}).get("suspend") or _job_condition(job, "Suspended"):
        return JobView(Phase.PENDING, "Suspended", "the Job is suspended", restarts, suspended=True)

    live = live_pods(pods)
    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    succeeded_indexes = {_pod_index(p) for p in live if (p.get("status") or {}).get("phase") == "Succeeded"}
    pod0 = next((p for p in running if _pod_index(p) == "0"), None)
    up = len(running) + len(succeeded_indexes - {None})
    if up >= nodes:
        if running:
            return JobView(Phase.RUNNING, "AllPodsRunning", f"{len(running)}/{nodes} pods running", restarts, pod0=pod0)
        # Every pod has exited 0 but the Job controller has not yet marked the Job Complete
        # (it first removes its tracking finalizers): still Running, never back to Starting.
        return JobView(
            Phase.RUNNING, "PodsFinished", f"{nodes}/{nodes} pods succeeded; the Job is completing", restarts
        )
    refused = _refused(create_failure, live)
    if refused:
        return JobView(Phase.STARTING, "PodsRefused", f"the Job cannot create its pods: {refused}", restarts, pod0=pod0)
    stuck = _stuck(live)
    if stuck:
        return JobView(Phase.STARTING, stuck[0], stuck[1], restarts, pod0=pod0)
    if restarts and any((p.get("status") or {}).get("phase") == "Failed" for p in live):
        detail = _failed_pod_detail(live)
        return JobView(
            Phase.STARTING, "Restarting", f"a pod failed ({detail}); the Job is replacing it", restarts, pod0=pod0
        )
    return JobView(Phase.STARTING, "PodsStarting", f"{len(running)}/{nodes} pods running", restarts, pod0=pod0)


def terminated_message(pod: dict[str, Any], container: str) -> str | None:
    """The termination message of `container` in a pod (as the API returns it).

    An eval pod's result reaches the operator this way, since the operator cannot read the
    PVC: Kubernetes copies the file at the container's terminationMessagePath into the pod
    status, or the log tail when that is empty and the container failed (FallbackToLogsOnError).
    """
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == container:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term:
                return term.get("message")
    return None


# ---------------------------------------------------------------------------- the summary


def summarise(status: S, now: datetime) -> S:
    """Ready/Reconciling/Stalled from the phase and the other conditions, as kstatus (Flux),
    Argo CD's health check (helm/nanochat-operator/files/argocd/health.lua) and `kubectl wait
    --for=condition=Ready` read them. Called last on every status the reconciler returns."""
    new = status.model_copy(deep=True)
    conds = new.conditions
    failed = _find(conds, ConditionType.FAILED)
    refused = _find(conds, ConditionType.SPEC_CHANGE_REFUSED)
    running = _find(conds, ConditionType.RUNNING)
    progressing = _progressing(new, new.phase.value if new.phase else "Pending")
    if new.phase == Phase.SUCCEEDED:
        complete = _find(conds, ConditionType.COMPLETE)
        conds = set_condition(
            conds, ConditionType.READY, "True", "Succeeded", complete.message if complete else "the run succeeded", now
        )
        stalled: tuple[str, str] | None = None
    else:
        if new.phase == Phase.FAILED and failed is not None:
            stalled = (failed.reason, failed.message)
        elif running is not None and running.reason == "PodsRefused":
            stalled = (running.reason, running.message)
        elif refused is not None and refused.status == "True":
            stalled = (refused.reason, refused.message)
        else:
            stalled = None
        why = stalled or progressing
        conds = set_condition(conds, ConditionType.READY, "False", why[0], why[1], now)
    if new.phase in TERMINAL_PHASES:
        conds = remove_condition(conds, ConditionType.RECONCILING)
    else:
        conds = set_condition(conds, ConditionType.RECONCILING, "True", progressing[0], progressing[1], now)
    if stalled is None:
        conds = remove_condition(conds, ConditionType.STALLED)
    else:
        conds = set_condition(conds, ConditionType.STALLED, "True", stalled[0], stalled[1], now)
    new.conditions = conds
    return new


def _progressing(status: RunStatusCommon, phase: str) -> tuple[str, str]:
    """(reason, message) of a run on its way: the phase, said with what it waits for."""
    deps = _find(status.conditions, ConditionType.DEPENDENCIES_READY)
    if deps is not None and deps.status == "False":
        return phase, deps.message
    suspended = _find(status.conditions, ConditionType.SUSPENDED)
    if suspended is not None and suspended.status == "True":
        return phase, suspended.message
    running = _find(status.conditions, ConditionType.RUNNING)
    if running is not None and running.message:
        return phase, running.message
    return phase, f"the run is {phase}"


# ---------------------------------------------------------------------------- new status
#
# The public functions copy the previous status once; the `_apply_*` helpers fill in that copy.


def is_final(prev: RunStatusCommon) -> bool:
    """A terminal phase that nothing moves any more (one with a Job behind it)."""
    return prev.phase in TERMINAL_PHASES and bool(prev.job_name)


def _bool(value: bool) -> ConditionStatus:
    return "True" if value else "False"


def _apply_view(new: RunStatusCommon, view: JobView, now: datetime, job_name: str) -> None:
    """Phase, Suspended/Running/Complete/Failed conditions, times and restarts from a JobView."""
    new.phase = view.phase
    new.job_name = job_name
    new.restarts = view.restarts
    conds = set_condition(
        new.conditions,
        ConditionType.SUSPENDED,
        _bool(view.suspended),
        view.reason if view.suspended else "NotSuspended",
        view.message if view.suspended else "",
        now,
    )
    running = view.phase == Phase.RUNNING
    conds = set_condition(conds, ConditionType.RUNNING, _bool(running), view.reason, view.message, now)
    if running and not new.start_time:
        new.start_time = rfc3339(now)
    if view.phase == Phase.SUCCEEDED:
        conds = set_condition(conds, ConditionType.COMPLETE, "True", view.reason, view.message, now)
    if view.phase == Phase.FAILED:
        conds = set_condition(conds, ConditionType.FAILED, "True", view.reason, view.message, now)
    if view.phase in TERMINAL_PHASES:
        new.completion_time = view.completion_time or rfc3339(now)
    new.conditions = conds


def _from_job(prev: S, view: JobView | None, now: datetime, generation: int | None, job_name: str) -> S:
    """What either kind's status takes from its Job: a copy of `prev` updated from `view`.
    A final status only records the generation; without a Job (yet) the run is Pending."""
    new = prev.model_copy(deep=True)
    new.observed_generation = generation
    if is_final(prev):
        return new
    if view is None:
        new.phase = Phase.PENDING
    else:
        _apply_view(new, view, now, job_name)
    return new


def training_status(
    prev: TrainingRunStatus,
    view: JobView | None,
    progress: prog.Progress | None,
    *,
    now: datetime,
    generation: int | None,
    job_name: str,
    total_steps: int | None = None,
    final_checkpoint: str | None = None,
    checkpoint_path: Callable[[int], str] | None = None,
) -> TrainingRunStatus:
    """The TrainingRun status after observing its Job (view) and trainer metrics (progress).

    `total_steps` is what the spec plans (the trainer's gauge, once scraped, says the same): known
    up front, a run that ends between two scrapes still reports `step == totalSteps`.
    `checkpoint_path(step) -> str` names a step checkpoint; `final_checkpoint` is set on the
    status when the run Succeeded.
    """
    new = _from_job(prev, view, now, generation, job_name)
    if is_final(prev):
        return new
    if new.total_steps is None and total_steps is not None:
        new.total_steps = total_steps
    if view is None:
        return new
    if progress is not None:
        _apply_progress(new, prev, progress, view, now, checkpoint_path)
    if view.phase == Phase.SUCCEEDED:
        if new.total_steps is not None:
            new.step = new.total_steps
        new.eta = None  # None, not absent: the merge patch clears the last estimate
        if final_checkpoint:
            new.final_checkpoint = final_checkpoint
    elif view.phase == Phase.FAILED:
        new.eta = None
    return new


def _apply_progress(
    new: TrainingRunStatus,
    prev: TrainingRunStatus,
    progress: prog.Progress,
    view: JobView,
    now: datetime,
    checkpoint_path: Callable[[int], str] | None,
) -> None:
    """Step, loss, throughput, ETA, newest checkpoint and teacher condition from the trainer's gauges.
    A gauge the trainer does not report (yet) keeps the last value."""
    if progress.total_steps is not None:
        new.total_steps = progress.total_steps
    if progress.loss is not None:
        new.loss = round(progress.loss, 6)
    if progress.val_loss is not None:
        new.val_loss = round(progress.val_loss, 6)
    if progress.pass_at_1 is not None:
        new.pass_at_1 = round(progress.pass_at_1, 4)
    if progress.best_pass_at_1 is not None and progress.best_step is not None:
        new.best_pass_at_1, new.best_pass_at_1_step = round(progress.best_pass_at_1, 4), progress.best_step
    if progress.tokens_per_second is not None:
        new.tokens_per_second = round(progress.tokens_per_second, 1)
    if progress.checkpoint_step is not None and progress.checkpoint_step > 0 and checkpoint_path:
        new.latest_checkpoint_step = progress.checkpoint_step
        new.latest_checkpoint = checkpoint_path(progress.checkpoint_step)
    if progress.teacher_up is not None and view.phase == Phase.RUNNING:
        new.conditions = _teacher_condition(new.conditions, progress, now)
    if progress.rejected is not None:
        rate = progress.teacher_requests_per_second
        new.generation = GenerationStatus(
            rejected={k: v for k, v in progress.rejected.items() if v},
            in_flight=progress.teacher_in_flight,
            requests_per_second=None if rate is None else round(rate, 2),
        )
    if progress.step is not None and progress.step != prev.step:
        _apply_step(new, prev, progress.step, now)


def _apply_step(new: TrainingRunStatus, prev: TrainingRunStatus, step: int, now: datetime) -> None:
    """A new step: the ETA from the pace since the previous one (kept when it cannot be told)."""
    if new.total_steps:
        left = prog.eta(step, new.total_steps, prev.step, parse_time(prev.last_progress_time), now)
        if left is not None:
            new.eta = prog.format_duration(left.total_seconds())
    new.step = step
    new.last_progress_time = rfc3339(now)


def _teacher_condition(conds: list[Condition], progress: prog.Progress, now: datetime) -> list[Condition]:
    """TeacherAvailable: a distillation or generation run whose teacher is down stays Running and
    says so."""
    skipped = progress.teacher_skipped or 0
    generating = progress.rejected is not None  # only stage generate serves rejections by reason
    if progress.teacher_up:
        answering = (
            "the teacher answers"
            if generating
            else f"the distillation teacher answers ({skipped} trained without it so far)"
        )
        return set_condition(conds, ConditionType.TEACHER_AVAILABLE, "True", "TeacherAnswering", answering, now)
    if generating:
        down = (
            "the teacher is not answering: the generation run asks again until generate.wait_for_teacher_s "
            "has passed, then fails"
        )
    else:
        down = (
            "the distillation teacher is not answering: training goes on without it where "
            f"distill.continue_without_teacher allows, else waits ({skipped} trained without it so far)"
        )
    return set_condition(conds, ConditionType.TEACHER_AVAILABLE, "False", "TeacherUnreachable", down, now)


def eval_status(
    prev: EvalRunStatus,
    view: JobView | None,
    result: EvalResult | None,
    *,
    now: datetime,
    generation: int | None,
    job_name: str,
) -> EvalRunStatus:
    """The EvalRun status after observing its Job and, when it finished, its result."""
    new = _from_job(prev, view, now, generation, job_name)
    if not is_final(prev) and view is not None and view.phase == Phase.SUCCEEDED:
        _apply_result(new, result, now)
    return new


def _apply_result(new: EvalRunStatus, result: EvalResult | None, now: datetime) -> None:
    """Scores and the ResultsRecorded condition of an eval whose pod succeeded."""
    if result is None or not result.scores:
        new.conditions = set_condition(
            new.conditions,
            ConditionType.RESULTS_RECORDED,
            "False",
            "NoResult",
            "the eval pod succeeded but left no result in its termination message",
            now,
        )
        return
    new.scores = dict(result.scores)
    new.pass_at_1 = result.scores.get(score_key(1))
    new.problems = result.problems
    new.samples_per_problem = result.samples
    new.sandbox_isolation = result.isolation
    message = _format_scores(result.scores)
    if result.compare:
        new.comparison = {n: dict(v) for n, v in result.compare.items()}
        message += "; " + "; ".join(f"{n}: {_format_scores(sc)}" for n, sc in result.compare.items())
    new.conditions = set_condition(new.conditions, ConditionType.RESULTS_RECORDED, "True", "Scored", message, now)


def _format_scores(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in scores.items())
