"""Level-based reconciliation: read the world, decide, create what is missing, report.

One function per kind, called by the reconcile workers (`controller.py`) whenever a run or one
of its children changes and once per interval while it is live, so a missed event is repaired
on the next look:

    outcome = reconcile_training(cluster, obj, config, now=now_utc(), adopt=adopt)
    changes = status_patch(obj["status"], dump_status(outcome.status))

The status is worked on as the API's pydantic model (TrainingRunStatus, EvalRunStatus);
it becomes JSON only there, at the API's door. `cluster` is anything with the `Cluster` methods
(nanochat_operator.watched.WatchedCluster in the operator, an in-memory fake in the tests);
`adopt(objs, owner)` sets owner references (kopf.adopt), so deleting a run deletes what it made.

Errors: a spec that cannot run (invalid, infeasible, depends on a failed run, rejected
by the API server) becomes phase Failed with a condition: a permanent answer written
once, never retried. API hiccups raise (the worker retries after a delay).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from nanochat_trainer.config import TrainerConfig, format_validation_error
from nanochat_trainer.contract import (
    COMPLETION_INDEX_ANNOTATION,
    EVAL_KIND,
    RUN_LABEL,
    SPEC_ANNOTATION,
    TRAINING_KIND,
    ConditionType,
    EvalResult,
    Phase,
    parse_result,
)

from . import deps, render
from .api import Condition, EvalRunSpec, EvalRunStatus, EvalServing, TrainingRunSpec, TrainingRunStatus
from .checks import SERVE_GPU_MEMORY_UTILIZATION, eval_fit, feasibility
from .progress import Progress, parse_trainer_metrics
from .settings import OperatorConfig
from .status import (
    MAX_MESSAGE,
    JobView,
    eval_status,
    get_condition,
    is_final,
    live_pods,
    load_status,
    observe_job,
    parse_time,
    remove_condition,
    rfc3339,
    set_condition,
    summarise,
    terminated_message,
    training_status,
)


class AlreadyExists(Exception):
    """The object is there already (a retry, or made by a reconcile the watch had not yet shown): fine.
    `existing`: the object found, where the caller must check whose it is and nothing watches it (a
    PodGroup)."""

    def __init__(self, name: str, existing: dict[str, Any] | None = None) -> None:
        super().__init__(name)
        self.existing = existing


class Rejected(Exception):
    """The API server refused an object for good (invalid, forbidden by admission)."""


class NotOwned(Exception):
    """A child's name is held by an object that is not this run's (e.g. one still being
    garbage-collected after a run of the same name was deleted): wait, never touch it."""


class Cluster(Protocol):
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def list_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]: ...
    def create(self, obj: dict[str, Any]) -> object: ...
    def patch_job(self, namespace: str, name: str, spec: dict[str, Any]) -> None: ...
    def pod_create_failure(self, namespace: str, job_name: str) -> tuple[str, str] | None: ...
    def get_training_run(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def scrape(self, url: str) -> str | None: ...


Adopt = Callable[[list[dict[str, Any]], dict[str, Any]], None]
Event = tuple[str, str, str]  # (Normal|Warning, reason, message)
RunSpec = TrainingRunSpec | EvalRunSpec
S = TypeVar("S", TrainingRunStatus, EvalRunStatus)


@dataclass
class Outcome:
    status: TrainingRunStatus | EvalRunStatus  # the handler turns it into JSON (status.dump_status)
    events: list[Event] = field(default_factory=list)


# ---------------------------------------------------------------------------- helpers


def owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid for r in refs)


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` status into `new` (keys gone from new become null;
    kopf's bookkeeping is kopf's to write)."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    for key in old:
        if key not in new and key != "kopf":
            patch[key] = None
    return patch


def _fail(
    prev: S,
    now: datetime,
    generation: int | None,
    reason: str,
    message: str,
    condition: ConditionType = ConditionType.ACCEPTED,
) -> Outcome:
    status = prev.model_copy(deep=True)
    conds = set_condition(prev.conditions, condition, "False", reason, message, now)
    status.conditions = set_condition(conds, ConditionType.FAILED, "True", reason, message, now)
    status.phase = Phase.FAILED
    status.observed_generation = generation
    # Same answer on every reconcile: keep the first completionTime so nothing churns.
    status.completion_time = prev.completion_time or rfc3339(now)
    if isinstance(status, TrainingRunStatus):
        status.eta = None  # a failed run has no time left
    return Outcome(status, [("Warning", reason, message)])


def _create_all(
    cluster: Cluster, objs: list[dict[str, Any]], owner: dict[str, Any], adopt: Adopt, keep_pvc: bool = False
) -> None:
    """Create what is missing, owned by the run (so deleting it deletes them), except a PVC the
    run's storage.whenDeleted keeps: that one is only labelled with the run. What a create finds in
    place must be the run's own, or a PVC kept for runs of its name; anything else is waited for."""
    adopt([o for o in objs if not (keep_pvc and o["kind"] == "PersistentVolumeClaim")], owner)
    meta = owner["metadata"]
    for obj in objs:
        try:
            cluster.create(obj)
        except AlreadyExists as err:
            # Made by an earlier attempt of this run: fine. Left by a deleted run of the same name and
            # not yet garbage-collected: its ConfigMap would hand this run's pods the old config, its
            # PodGroup gang-schedule them by the old numbers, until removed under them: wait for it
            # to go. A kept PVC is meant to outlive its run: a run re-created under the name resumes
            # from its checkpoints (whatever its own whenDeleted says).
            found = err.existing
            kept = obj["kind"] == "PersistentVolumeClaim" and found is not None and _kept_for(found, meta["name"])
            if meta.get("uid") and not (kept or (found is not None and owned_by(found, meta["uid"]))):
                raise NotOwned(
                    f"{obj['kind']} {obj['metadata']['name']} exists but does not belong to this run (an older "
                    "run's, still being deleted?); waiting"
                ) from err


def _kept_for(pvc: dict[str, Any], run: str) -> bool:
    """A PVC that storage.whenDeleted: Retain kept for runs named `run`: labelled so, owned by none."""
    meta = pvc.get("metadata") or {}
    return not meta.get("ownerReferences") and (meta.get("labels") or {}).get(RUN_LABEL) == run


def _check_owned(job: dict[str, Any] | None, uid: str | None, name: str) -> None:
    if job is not None and uid and not owned_by(job, uid):
        raise NotOwned(
            f"Job {name} exists but does not belong to this run (an older run's, still being deleted?); waiting"
        )


def _drift(
    job: dict[str, Any], spec: RunSpec, prev_conds: list[Condition], now: datetime
) -> tuple[list[Condition], list[Event]]:
    """SpecChangeRefused while the spec differs from the one the Job was made from."""
    refused = ConditionType.SPEC_CHANGE_REFUSED
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(SPEC_ANNOTATION)
    changed = render.spec_drift(json.loads(raw), spec) if raw else []
    if not changed:
        return remove_condition(prev_conds, refused), []
    msg = (
        f"{', '.join(changed)} changed after the Job was created; not applied (only spec.suspend may change "
        f"once a run has started). Delete and re-create the run to apply it"
    )
    already = any(c.type == refused and c.message == msg[:MAX_MESSAGE] for c in prev_conds)
    conds = set_condition(prev_conds, refused, "True", "SpecImmutable", msg, now)
    return conds, [] if already else [("Warning", refused.value, msg)]


def _sync_suspend(cluster: Cluster, job: dict[str, Any], spec: RunSpec, namespace: str, name: str) -> dict[str, Any]:
    """Make the Job's suspend follow spec.suspend. With a Kueue queue the operator only ever
    suspends: unsuspending is Kueue's decision (admission)."""
    current = bool((job.get("spec") or {}).get("suspend"))
    want: bool | None = spec.suspend
    if spec.queue_name and not spec.suspend:
        want = None
    if want is None or want == current:
        return job
    cluster.patch_job(namespace, name, {"suspend": want})
    return {**job, "spec": {**(job.get("spec") or {}), "suspend": want}}


def _follow_job(
    cluster: Cluster, job: dict[str, Any], spec: RunSpec, base: S, namespace: str, name: str, now: datetime
) -> tuple[dict[str, Any], list[dict[str, Any]], list[Event]]:
    """An existing Job: refuse spec drift (a condition on `base`), follow spec.suspend, read its pods."""
    base.conditions, events = _drift(job, spec, base.conditions, now)
    job = _sync_suspend(cluster, job, spec, namespace, name)
    return job, cluster.list_pods(namespace, name), events


def _observe(
    cluster: Cluster, job: dict[str, Any], pods: list[dict[str, Any]], nodes: int, spec: RunSpec, namespace: str
) -> JobView | None:
    """The Job's view. While pods are missing from a live, unsuspended Job, the Job controller's
    FailedCreate event says why (Pod Security, quota, a webhook): the only place it does."""
    view = observe_job(job, pods, nodes)
    if view is not None and view.phase == Phase.STARTING and len(live_pods(pods)) < nodes:
        failure = cluster.pod_create_failure(namespace, job["metadata"]["name"])
        if failure is not None:
            view = observe_job(job, pods, nodes, failure)
    return _queue_view(view, spec)


def _expire_job(cluster: Cluster, obj: dict[str, Any], job_name: str) -> None:
    """A finished run's Job may go: spec.ttlSecondsAfterFinished is set on it by a reconcile that
    reads the final status back from the API server, never by the one that computes it. Were it set
    before that status is written and the write then refused (a conflict), the Job controller could
    delete the Job under a run still recorded as Running, and the next reconcile would run it again."""
    meta = obj["metadata"]
    ttl = (obj.get("spec") or {}).get("ttlSecondsAfterFinished")
    job = cluster.get_job(meta["namespace"], job_name) if ttl is not None else None
    if job is None or not owned_by(job, meta.get("uid")):
        return
    if (job.get("spec") or {}).get("ttlSecondsAfterFinished") != ttl:
        cluster.patch_job(meta["namespace"], job_name, {"ttlSecondsAfterFinished": ttl})


def _queue_view(view: JobView | None, spec: RunSpec) -> JobView | None:
    if view is not None and view.suspended and spec.queue_name and not spec.suspend:
        return dataclasses.replace(
            view, reason="WaitingForQueue", message=f"waiting for Kueue to admit the Job (queue {spec.queue_name})"
        )
    return view


def _phase_events(prev: S, new: S, kind: str) -> list[Event]:
    events: list[Event] = []
    if prev.phase != new.phase:
        phase = new.phase
        failed = get_condition(new, ConditionType.FAILED)
        reason = failed.reason if failed is not None else ""
        typ = "Warning" if phase == Phase.FAILED else "Normal"
        message = f"{kind} is {phase}" + (f": {reason}" if reason and phase == Phase.FAILED else "")
        events.append((typ, phase.value if phase else "Unknown", message))
    running, was = get_condition(new, ConditionType.RUNNING), get_condition(prev, ConditionType.RUNNING)
    if running is not None and running.reason == "PodsRefused" and (was is None or was.reason != "PodsRefused"):
        events.append(("Warning", "PodsRefused", running.message))
    return events


ACCEPTED_MESSAGE = "the spec is valid and fits its resources"


def _accepted(prev: S, now: datetime, message: str = ACCEPTED_MESSAGE) -> S:
    """The status of a spec that passed validation. A run that Failed before it had a Job
    (invalid spec, failed source) starts over when its spec is fixed: drop that failure."""
    status = prev.model_copy(deep=True)
    conds = prev.conditions
    if not prev.job_name:
        conds = remove_condition(remove_condition(conds, ConditionType.FAILED), ConditionType.DEPENDENCIES_READY)
    status.conditions = set_condition(conds, ConditionType.ACCEPTED, "True", "Valid", message, now)
    return status


def _dependency(
    cluster: Cluster, namespace: str, name: str, source_name: str, follow_chain: bool, checkpoint: str = "final"
) -> deps.Dependency:
    """`follow_chain`: `name` is a TrainingRun, whose waits (init and `after`) may loop back to it."""
    source = cluster.get_training_run(namespace, source_name)
    dep = deps.resolve(source_name, source, checkpoint)
    if dep.state == "wait" and follow_chain and source is not None:
        cache = {source_name: source}

        def waits(run: str) -> list[str]:
            if run not in cache:
                cache[run] = cluster.get_training_run(namespace, run)
            return deps.waits_for(cache[run])

        chain = deps.find_chain(source_name, name, waits)  # back to this run, which waits for the source
        if chain is not None:
            message = "the runs waited for (init.fromTrainingRun, after) form a loop: " + " -> ".join([name, *chain])
            return deps.Dependency("fail", "DependencyCycle", message, source_name)
    return dep


def _gate_on_dependency(
    cluster: Cluster,
    namespace: str,
    name: str,
    source_name: str,
    follow_chain: bool,
    base: S,
    prev: S,
    now: datetime,
    generation: int | None,
    job_name: str,
    status_fn: Callable[..., S],
    kind: str,
    checkpoint: str = "final",
) -> Outcome | tuple[str, str, dict[str, Any]]:
    """Wait for, or fail on, the run this one reads; when it is ready, its (name, claim, raw spec).

    Sets the DependenciesReady condition on `base` either way.
    """
    dep = _dependency(cluster, namespace, name, source_name, follow_chain=follow_chain, checkpoint=checkpoint)
    if dep.state == "fail":
        return _fail(base, now, generation, dep.reason, dep.message, condition=ConditionType.DEPENDENCIES_READY)
    ready = dep.state != "wait"
    base.conditions = set_condition(
        base.conditions, ConditionType.DEPENDENCIES_READY, "True" if ready else "False", dep.reason, dep.message, now
    )
    if not ready:
        base.completion_time = None  # cleared: a run that waits has not completed
        new = status_fn(base, None, None, now=now, generation=generation, job_name=job_name)
        return Outcome(new, _phase_events(prev, new, kind))
    assert dep.claim is not None and dep.spec is not None
    return dep.source or "", dep.claim, dep.spec


# ---------------------------------------------------------------------------- TrainingRun


def _finished_training(prev: TrainingRunStatus, generation: int | None, now: datetime) -> Outcome:
    """A finished run stays as it is; a spec edit after the end is refused, with a condition."""
    if generation is None or prev.observed_generation in (None, generation):
        return Outcome(prev)
    msg = "the run already finished; spec changes are not applied. Create a new run instead"
    new = prev.model_copy(deep=True)
    new.conditions = set_condition(prev.conditions, ConditionType.SPEC_CHANGE_REFUSED, "True", "RunFinished", msg, now)
    new.observed_generation = generation
    return Outcome(new, [("Warning", ConditionType.SPEC_CHANGE_REFUSED.value, msg)])


def _scrape_progress(cluster: Cluster, view: JobView | None, port: int | None) -> Progress | None:
    """The trainer's progress from pod 0's /metrics; None while it does not answer, or answers nonsense."""
    if view is None or view.pod0 is None or not port:
        return None
    ip = (view.pod0.get("status") or {}).get("podIP")
    host = f"[{ip}]" if ip and ":" in ip else ip  # an IPv6 pod IP is bracketed in a URL (RFC 3986)
    text = cluster.scrape(f"http://{host}:{port}/metrics") if ip else None
    if not text:
        return None
    try:
        return parse_trainer_metrics(text)
    except ValueError:
        return None


def _final_progress(pods: list[dict[str, Any]]) -> Progress | None:
    """The last figures pod 0's trainer left in its termination message when it succeeded
    (`TrainerMetrics.write_termination_message`): a run that ended between two scrapes."""
    for pod in pods:
        index = ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
        if index == "0" and (pod.get("status") or {}).get("phase") == "Succeeded":
            text = terminated_message(pod, render.TRAINER_CONTAINER)
            try:
                return parse_trainer_metrics(text) if text else None
            except ValueError:
                return None
    return None


def _summarised(outcome: Outcome, now: datetime) -> Outcome:
    return Outcome(summarise(outcome.status, now), outcome.events)


def reconcile_training(
    cluster: Cluster, obj: dict[str, Any], config: OperatorConfig, *, now: datetime, adopt: Adopt
) -> Outcome:
    return _summarised(_reconcile_training(cluster, obj, config, now=now, adopt=adopt), now)


def reconcile_eval(
    cluster: Cluster, obj: dict[str, Any], config: OperatorConfig, *, now: datetime, adopt: Adopt
) -> Outcome:
    return _summarised(_reconcile_eval(cluster, obj, config, now=now, adopt=adopt), now)


def _reconcile_training(
    cluster: Cluster, obj: dict[str, Any], config: OperatorConfig, *, now: datetime, adopt: Adopt
) -> Outcome:
    meta = obj["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta.get("uid")
    generation = meta.get("generation")
    prev = load_status(TrainingRunStatus, obj.get("status"))
    jname = render.job_name(name)
    if is_final(prev):
        if prev.job_name:
            _expire_job(cluster, obj, prev.job_name)
        return _finished_training(prev, generation, now)

    try:
        spec = TrainingRunSpec.model_validate(obj.get("spec") or {})
    except ValidationError as err:
        return _fail(prev, now, generation, "InvalidSpec", format_validation_error(err, "spec."))
    job = cluster.get_job(namespace, jname)
    _check_owned(job, uid, jname)
    # Feasibility decides whether the Job may be made. Once it runs, the answer is its pods': an
    # operator restarted with another --gpu-memory-gib, or an upgrade's stricter check, must not
    # fail a live run whose Job would go on holding its GPUs unwatched.
    problems = feasibility(spec, config.gpu_memory_gib) if job is None else []
    if problems:
        return _fail(prev, now, generation, "Infeasible", "; ".join(problems))
    base = _accepted(prev, now)
    base.storage_claim = spec.storage.pvc_name(name) if spec.storage else None
    base.run_dir = render.run_dir(name)
    events: list[Event] = []

    if job is None:

        def gate(source_name: str, follow_chain: bool) -> Outcome | tuple[str, str, dict[str, Any]]:
            return _gate_on_dependency(
                cluster, namespace, name, source_name, follow_chain, base, prev, now, generation, jname,
                training_status, TRAINING_KIND,
            )  # fmt: skip

        for before in spec.after:  # datasets this run reads: made by runs on the same PVC
            ready = gate(before, True)
            if isinstance(ready, Outcome):
                return ready
            if ready[1] != base.storage_claim:
                return _fail(
                    base,
                    now,
                    generation,
                    "DifferentStorage",
                    f"after: TrainingRun {before} keeps its run directory on PVC {ready[1]}, this run mounts "
                    f"{base.storage_claim}: give both the same storage.claimName",
                    condition=ConditionType.DEPENDENCIES_READY,
                )
        source = None
        if spec.init is not None:
            ready = gate(spec.init.from_training_run, True)
            if isinstance(ready, Outcome):
                return ready
            source = ready[:2]
        objs = render.render_training(name, namespace, spec, image=spec.image or config.trainer_image, source=source)
        base.completion_time = None  # a run that (re)starts has not completed
        try:
            _create_all(
                cluster, objs, obj, adopt, keep_pvc=spec.storage is not None and spec.storage.when_deleted == "Retain"
            )
        except Rejected as err:
            return _fail(base, now, generation, "CreateRejected", str(err))
        job = cluster.get_job(namespace, jname) or objs[-1]
        _check_owned(job, uid, jname)
        events.append(
            (
                "Normal",
                "Created",
                f"created Job {jname} ({spec.resources.nodes} node(s) x {render.procs_per_node(spec)} process(es))",
            )
        )
        pods: list[dict[str, Any]] = []
    else:
        job, pods, drift_events = _follow_job(cluster, job, spec, base, namespace, jname, now)
        events += drift_events

    view = _observe(cluster, job, pods, spec.resources.nodes, spec, namespace)
    progress = _scrape_progress(cluster, view, spec.trainer.metrics.port) or _final_progress(pods)
    generating = spec.trainer.stage == "generate"  # its output is a dataset, its steps documents kept
    output_path = render.dataset_path if generating else render.final_checkpoint_path
    new = training_status(
        base,
        view,
        progress,
        now=now,
        generation=generation,
        job_name=jname,
        total_steps=spec.trainer.total_steps,
        final_checkpoint=(output_path(name) if spec.storage else None),
        checkpoint_path=(lambda _rows: output_path(name))
        if generating
        else lambda step: render.checkpoint_step_path(name, step),
    )
    return Outcome(new, events + _phase_events(prev, new, TRAINING_KIND))


# ---------------------------------------------------------------------------- EvalRun


def _eval_result(view: JobView | None, pods: list[dict[str, Any]]) -> EvalResult | None:
    """The scores a succeeded eval pod left in its termination message."""
    if view is None or view.phase != Phase.SUCCEEDED:
        return None
    for pod in pods:
        if (pod.get("status") or {}).get("phase") == "Succeeded":
            result = parse_result(terminated_message(pod, render.EVAL_CONTAINER))
            if result is not None:
                return result
    return None


# How long an EvalRun whose Job is Complete waits to see its pod Succeeded, the scores in its
# termination message: Jobs and pods come on separate watches, and the pod's last update can trail.
RESULT_GRACE = timedelta(minutes=2)


def _result_on_its_way(view: JobView | None, pods: list[dict[str, Any]], now: datetime) -> bool:
    """The Job is Complete, its pod not yet seen Succeeded, and not for long: recording the end now
    would record it without the scores, for good (a finished run is not looked at again)."""
    if view is None or view.phase != Phase.SUCCEEDED:
        return False
    if any((pod.get("status") or {}).get("phase") == "Succeeded" for pod in pods):
        return False
    done = parse_time(view.completion_time)
    return done is not None and now - done < RESULT_GRACE


def _trainer_config(raw: dict[str, Any] | None) -> TrainerConfig | None:
    """The trainer config of a TrainingRun an EvalRun loads (it has Succeeded)."""
    if raw is None:
        return None
    try:
        return TrainingRunSpec.model_validate(raw).trainer
    except ValidationError:
        return None  # a run that Succeeded had a valid spec; nothing to check against otherwise


def serving_message(serving: EvalServing) -> str:
    """What the status and events say of a model the eval pod serves."""
    return (
        f"served by vLLM with tensor parallelism {serving.tensor_parallel_size} from {serving.model_dir}, "
        f"scored at {serving.url}" + (f" ({serving.reason})" if serving.reason else "")
    )


def _accepted_message(serving: EvalServing | None) -> str:
    return ACCEPTED_MESSAGE + (f"; the model is {serving_message(serving)}" if serving else "")


def _reconcile_eval(
    cluster: Cluster, obj: dict[str, Any], config: OperatorConfig, *, now: datetime, adopt: Adopt
) -> Outcome:
    meta = obj["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta.get("uid")
    generation = meta.get("generation")
    prev = load_status(EvalRunStatus, obj.get("status"))
    jname = render.eval_job_name(name)
    if is_final(prev):
        if prev.job_name:
            _expire_job(cluster, obj, prev.job_name)
        if generation is None:
            return Outcome(prev)
        final = prev.model_copy(deep=True)
        final.observed_generation = generation
        return Outcome(final)

    try:
        spec = EvalRunSpec.model_validate(obj.get("spec") or {})
    except ValidationError as err:
        return _fail(prev, now, generation, "InvalidSpec", format_validation_error(err, "spec."))
    base = _accepted(prev, now, _accepted_message(prev.serving))
    events: list[Event] = []

    job = cluster.get_job(namespace, jname)
    _check_owned(job, uid, jname)
    if job is None:
        source = None
        main_spec: dict[str, Any] | None = None  # the raw spec of the TrainingRun evaluated
        compare_specs: dict[str, dict[str, Any]] = {}  # and of each compared one, by name
        if spec.model.training_run is not None:
            gate = _gate_on_dependency(
                cluster,
                namespace,
                name,
                spec.model.training_run,
                False,
                base,
                prev,
                now,
                generation,
                jname,
                eval_status,
                EVAL_KIND,
                checkpoint=spec.model.checkpoint,
            )
            if isinstance(gate, Outcome):
                return gate
            source = gate[:2]
            main_spec = gate[2]
            base.checkpoint = render.model_path(spec.model)
            base.results_path = render.eval_results_path(source[0], name)
        compare_runs: dict[str, tuple[str, str]] = {}
        for c in spec.compare:  # every compared run must have Succeeded too
            if c.training_run is None:
                continue
            gate = _gate_on_dependency(
                cluster,
                namespace,
                name,
                c.training_run,
                False,
                base,
                prev,
                now,
                generation,
                jname,
                eval_status,
                EVAL_KIND,
                checkpoint=c.checkpoint,
            )
            if isinstance(gate, Outcome):
                return gate
            compare_runs[c.name] = gate[:2]
            compare_specs[c.name] = gate[2]
        compare_runs_cfg = {n: c for n, raw in compare_specs.items() if (c := _trainer_config(raw)) is not None}
        fit = eval_fit(spec, _trainer_config(main_spec), compare_runs_cfg, config.gpu_memory_gib)
        if fit.problems:
            return _fail(base, now, generation, "Infeasible", "; ".join(fit.problems))
        if source is not None:
            base.checkpoint = render.model_path(spec.model, packed=spec.model.training_run in fit.packed)
        vllm = None
        if fit.tensor_parallel is not None and source is not None:
            assert fit.max_model_len is not None
            vllm = render.VllmServing(
                config.vllm_image, fit.tensor_parallel, fit.max_model_len, SERVE_GPU_MEMORY_UTILIZATION
            )
            base.serving = EvalServing(
                server="vllm",
                tensor_parallel_size=fit.tensor_parallel,
                model_dir=render.hf_export_path(source[0], spec.model.checkpoint),
                url=render.VLLM_URL,
                reason=fit.reason,
            )
        elif base.serving is not None:
            base.serving = None  # a spec fixed from one that needed serving
        base.conditions = set_condition(
            base.conditions, ConditionType.ACCEPTED, "True", "Valid", _accepted_message(base.serving), now
        )
        job_obj = render.render_eval_job(
            name,
            namespace,
            spec,
            image=spec.image or config.trainer_image,
            source=source,
            compare_runs=compare_runs,
            runtime_class=config.eval_runtime_class,
            vllm=vllm,
            packed=fit.packed,
        )
        base.completion_time = None  # a run that (re)starts has not completed
        try:
            _create_all(cluster, [render.render_eval_network_policy(name, namespace, spec), job_obj], obj, adopt)
        except Rejected as err:
            return _fail(base, now, generation, "CreateRejected", str(err))
        job = cluster.get_job(namespace, jname) or job_obj
        _check_owned(job, uid, jname)
        served = f": the model is {serving_message(base.serving)}" if base.serving else ""
        events.append(("Normal", "Created", f"created Job {jname}{served}"))
        pods: list[dict[str, Any]] = []
    else:
        job, pods, drift_events = _follow_job(cluster, job, spec, base, namespace, jname, now)
        events += drift_events

    view = _observe(cluster, job, pods, 1, spec, namespace)
    if _result_on_its_way(view, pods, now):
        return Outcome(base, events)  # the pod's event brings the scores (else the next look, or the grace's end)
    new = eval_status(base, view, _eval_result(view, pods), now=now, generation=generation, job_name=jname)
    return Outcome(new, events + _phase_events(prev, new, EVAL_KIND))
