"""The status machine (pure): Job + pods + previous status -> the run's new status.

    view = observe_job(job, pods, nodes=4)                       # what the cluster shows
    status = training_status(prev, view, progress, now=..., ...)  # what the run's status says

Phases: Pending (no Job yet, or suspended / queued), Starting (Job made, not every pod
running), Running, Succeeded, Failed. Succeeded and Failed are final: once a run has
reached one, later observations (the Job deleted, pods gone) do not move it.

Conditions follow the Kubernetes convention: lastTransitionTime changes only when a
condition's status changes. Types: Accepted, DependenciesReady (set by the reconciler),
Suspended, Running, Complete, Failed (set here), SpecChangeRefused (reconciler).
Everything here takes and returns plain dicts in the API's camelCase, as kopf hands
them over, so the tests can feed it any Job and pod state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from . import progress as prog
from .api import TERMINAL_PHASES
from .results import EvalResult

# Container waiting reasons worth surfacing: the pod will not start by itself soon.
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError", "CrashLoopBackOff", "RunContainerError")
MAX_MESSAGE = 1024  # conditions stay readable and status objects small


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: Optional[str]) -> Optional[datetime]:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------- conditions


def set_condition(conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str,
                  now: datetime) -> list[dict[str, Any]]:
    """A copy of `conditions` with one condition set; its transition time kept if status is unchanged."""
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    when = old.get("lastTransitionTime") if old and old.get("status") == status else None
    out.append({"type": type_, "status": status, "reason": reason, "message": message[:MAX_MESSAGE],
                "lastTransitionTime": when or rfc3339(now)})
    return out


def remove_condition(conditions: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [dict(c) for c in conditions if c.get("type") != type_]


def get_condition(status: dict[str, Any], type_: str) -> Optional[dict[str, Any]]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


# ---------------------------------------------------------------------------- observing a Job


@dataclass(frozen=True)
class JobView:
    """What a Job and its pods say, reduced to what the status needs."""

    phase: str  # Pending, Starting, Running, Succeeded, Failed
    reason: str
    message: str
    restarts: int = 0
    suspended: bool = False
    completion_time: Optional[str] = None
    pod0: Optional[dict[str, Any]] = None  # the running pod of completion index 0


def _job_condition(job: dict[str, Any], type_: str) -> Optional[dict[str, Any]]:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def _pod_index(pod: dict[str, Any]) -> Optional[str]:
    meta = pod.get("metadata") or {}
    return (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index") or \
        (meta.get("labels") or {}).get("batch.kubernetes.io/job-completion-index")


def _last_line(text: Optional[str]) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _failed_pod_detail(pods: list[dict[str, Any]]) -> str:
    """Exit code and last message of the most recent failed pod, for the Failed message."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    for pod in reversed(failed):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                detail = f"pod {pod['metadata'].get('name')} exited {term.get('exitCode')}"
                if term.get("reason"):
                    detail += f" ({term['reason']})"
                last = _last_line(term.get("message"))
                return f"{detail}: {last}" if last else detail
    return ""


def _stuck(pods: list[dict[str, Any]]) -> Optional[tuple[str, str]]:
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


def observe_job(job: Optional[dict[str, Any]], pods: list[dict[str, Any]], nodes: int) -> Optional[JobView]:
    """Reduce a Job and its pods to a JobView; None when there is no Job."""
    if job is None:
        return None
    st = job.get("status") or {}
    restarts = int(st.get("failed") or 0)
    done = _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet")
    if done:
        return JobView("Succeeded", "Completed", done.get("message") or "all pods succeeded", restarts,
                       completion_time=st.get("completionTime"))
    failed = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
    if failed:
        detail = _failed_pod_detail(pods)
        msg = failed.get("message") or "the Job failed"
        return JobView("Failed", failed.get("reason") or "JobFailed", f"{msg}; {detail}" if detail else msg,
                       restarts, completion_time=(failed.get("lastTransitionTime") or st.get("completionTime")))
    if (job.get("spec") or {}).get("suspend") or _job_condition(job, "Suspended"):
        return JobView("Pending", "Suspended", "the Job is suspended", restarts, suspended=True)

    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    succeeded_indexes = {_pod_index(p) for p in live if (p.get("status") or {}).get("phase") == "Succeeded"}
    pod0 = next((p for p in running if _pod_index(p) == "0"), None)
    up = len(running) + len(succeeded_indexes - {None})
    if up >= nodes:
        if running:
            return JobView("Running", "AllPodsRunning", f"{len(running)}/{nodes} pods running", restarts, pod0=pod0)
        # Every pod has exited 0 but the Job controller has not yet marked the Job Complete
        # (it first removes its tracking finalizers): still Running, never back to Starting.
        return JobView("Running", "PodsFinished", f"{nodes}/{nodes} pods succeeded; the Job is completing",
                       restarts)
    stuck = _stuck(live)
    if stuck:
        return JobView("Starting", stuck[0], stuck[1], restarts, pod0=pod0)
    if restarts and any((p.get("status") or {}).get("phase") == "Failed" for p in live):
        detail = _failed_pod_detail(live)
        return JobView("Starting", "Restarting", f"a pod failed ({detail}); the Job is replacing it", restarts,
                       pod0=pod0)
    return JobView("Starting", "PodsStarting", f"{len(running)}/{nodes} pods running", restarts, pod0=pod0)


# ---------------------------------------------------------------------------- new status


def _apply_view(prev: dict[str, Any], view: JobView, now: datetime, job_name: str) -> dict[str, Any]:
    """Phase, Suspended/Running/Complete/Failed conditions, times and restarts from a JobView."""
    new = dict(prev)
    conds = list(prev.get("conditions") or [])
    new["phase"] = view.phase
    new["jobName"] = job_name
    new["restarts"] = view.restarts
    conds = set_condition(conds, "Suspended", "True" if view.suspended else "False",
                          view.reason if view.suspended else "NotSuspended",
                          view.message if view.suspended else "", now)
    running = view.phase == "Running"
    conds = set_condition(conds, "Running", "True" if running else "False", view.reason, view.message, now)
    if running and not new.get("startTime"):
        new["startTime"] = rfc3339(now)
    if view.phase == "Succeeded":
        conds = set_condition(conds, "Complete", "True", view.reason, view.message, now)
    if view.phase == "Failed":
        conds = set_condition(conds, "Failed", "True", view.reason, view.message, now)
    if view.phase in TERMINAL_PHASES:
        new["completionTime"] = view.completion_time or rfc3339(now)
    new["conditions"] = conds
    return new


def is_final(prev: dict[str, Any]) -> bool:
    """A terminal phase that nothing moves any more (one with a Job behind it)."""
    return prev.get("phase") in TERMINAL_PHASES and bool(prev.get("jobName"))


def training_status(prev: dict[str, Any], view: Optional[JobView], progress: Optional[prog.Progress], *,
                    now: datetime, generation: Optional[int], job_name: str,
                    final_checkpoint: Optional[str] = None,
                    checkpoint_path: Optional[Any] = None) -> dict[str, Any]:
    """The TrainingRun status after observing its Job (view) and trainer metrics (progress).

    `checkpoint_path(step) -> str` names a step checkpoint; `final_checkpoint` is set on the
    status when the run Succeeded.
    """
    prev = {k: v for k, v in prev.items() if k != "kopf"}
    if is_final(prev):
        return {**prev, "observedGeneration": generation}
    if view is None:
        new = dict(prev, phase="Pending")
        new["observedGeneration"] = generation
        return new
    new = _apply_view(prev, view, now, job_name)
    new["observedGeneration"] = generation
    if progress is not None:
        if progress.total_steps is not None:
            new["totalSteps"] = progress.total_steps
        if progress.loss is not None:
            new["loss"] = round(progress.loss, 6)
        if progress.tokens_per_second is not None:
            new["tokensPerSecond"] = round(progress.tokens_per_second, 1)
        if progress.checkpoint_step is not None and progress.checkpoint_step > 0 and checkpoint_path:
            new["latestCheckpointStep"] = progress.checkpoint_step
            new["latestCheckpoint"] = checkpoint_path(progress.checkpoint_step)
        if progress.teacher_up is not None and view.phase == "Running":
            new["conditions"] = _teacher_condition(new.get("conditions") or [], progress, now)
        if progress.step is not None:
            prev_step = prev.get("step")
            if prev_step is None or progress.step != prev_step:
                left = None
                if new.get("totalSteps"):
                    left = prog.eta(progress.step, new["totalSteps"], prev_step,
                                    parse_time(prev.get("lastProgressTime")), now)
                if left is not None:
                    new["eta"] = prog.format_duration(left.total_seconds())
                new["step"] = progress.step
                new["lastProgressTime"] = rfc3339(now)
    if view.phase == "Succeeded":
        if new.get("totalSteps") is not None:
            new["step"] = new["totalSteps"]
        new["eta"] = None
        if final_checkpoint:
            new["finalCheckpoint"] = final_checkpoint
    elif view.phase == "Failed":
        new["eta"] = None
    return new


def _teacher_condition(conds: list[dict[str, Any]], progress: prog.Progress, now: datetime) -> list[dict[str, Any]]:
    """TeacherAvailable: a distillation run whose teacher is down stays Running and says so."""
    skipped = progress.teacher_skipped or 0
    if progress.teacher_up:
        return set_condition(conds, "TeacherAvailable", "True", "TeacherAnswering",
                             f"the distillation teacher answers ({skipped} trained without it so far)", now)
    return set_condition(conds, "TeacherAvailable", "False", "TeacherUnreachable",
                         f"the distillation teacher is not answering: training goes on without it where "
                         f"distill.continue_without_teacher allows, else waits ({skipped} trained without it "
                         f"so far)", now)


def eval_status(prev: dict[str, Any], view: Optional[JobView], result: Optional[EvalResult], *,
                now: datetime, generation: Optional[int], job_name: str) -> dict[str, Any]:
    """The EvalRun status after observing its Job and, when it finished, its result."""
    prev = {k: v for k, v in prev.items() if k != "kopf"}
    if is_final(prev):
        return {**prev, "observedGeneration": generation}
    if view is None:
        return dict(prev, phase="Pending", observedGeneration=generation)
    new = _apply_view(prev, view, now, job_name)
    new["observedGeneration"] = generation
    if view.phase == "Succeeded":
        if result is not None and result.scores:
            new["scores"] = dict(result.scores)
            new["passAt1"] = result.scores.get("pass@1")
            new["problems"] = result.problems
            new["samplesPerProblem"] = result.samples
            message = ", ".join(f"{k}={v:.4f}" for k, v in result.scores.items())
            if result.compare:
                new["comparison"] = {n: dict(v) for n, v in result.compare.items()}
                message += "; " + "; ".join(f"{n}: " + ", ".join(f"{k}={v:.4f}" for k, v in sc.items())
                                            for n, sc in result.compare.items())
            new["conditions"] = set_condition(new["conditions"], "ResultsRecorded", "True", "Scored", message, now)
        else:
            new["conditions"] = set_condition(
                new["conditions"], "ResultsRecorded", "False", "NoResult",
                "the eval pod succeeded but left no result in its termination message", now)
    return new
