"""Level-based reconciliation: read the world, decide, create what is missing, report.

One function per kind, called alike from kopf's create/update/resume handlers and from
its timer, so a missed event is repaired on the next tick:

    outcome = reconcile_training(cluster, obj, config, now=now_utc(), adopt=adopt)
    patch.status.update(status_patch(obj["status"], outcome.status))

`cluster` is anything with the `Cluster` methods (nanochat_operator.kube.KubeCluster for
a real API server, an in-memory fake in the tests); `adopt(objs, owner)` sets owner
references (kopf.adopt), so deleting a run deletes what it made.

Errors: a spec that cannot run (invalid, infeasible, depends on a failed run, rejected
by the API server) becomes phase Failed with a condition: a permanent answer written
once, never retried. API hiccups raise (kopf retries with backoff).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Optional, Protocol

from nanochat_trainer.config import format_validation_error
from pydantic import ValidationError

from . import deps, render
from .api import EvalRunSpec, TrainingRunSpec
from .checks import feasibility
from .progress import Progress, parse_trainer_metrics
from .results import parse_result, terminated_message
from .settings import OperatorConfig
from .status import (JobView, eval_status, get_condition, is_final, observe_job, remove_condition,
                     rfc3339, set_condition, training_status)


class AlreadyExists(Exception):
    """The object is there already (a retry, or a timer racing a handler): fine."""


class Rejected(Exception):
    """The API server refused an object for good (invalid, forbidden by admission)."""


class NotOwned(Exception):
    """A child's name is held by an object that is not this run's (e.g. one still being
    garbage-collected after a run of the same name was deleted): wait, never touch it."""


class Cluster(Protocol):
    def get_job(self, namespace: str, name: str) -> Optional[dict[str, Any]]: ...
    def list_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]: ...
    def create(self, obj: dict[str, Any]) -> None: ...
    def patch_job_suspend(self, namespace: str, name: str, suspend: bool) -> None: ...
    def get_training_run(self, namespace: str, name: str) -> Optional[dict[str, Any]]: ...
    def scrape(self, url: str) -> Optional[str]: ...


Adopt = Callable[[list[dict[str, Any]], dict[str, Any]], None]


@dataclass
class Outcome:
    status: dict[str, Any]
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)


# ---------------------------------------------------------------------------- helpers


def owned_by(obj: dict[str, Any], uid: Optional[str]) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid for r in refs)


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` status into `new` (keys gone from new become null)."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    for key in old:
        if key not in new and key != "kopf":
            patch[key] = None
    return patch


def _fail(prev: dict[str, Any], now: datetime, generation: Optional[int], reason: str, message: str,
          condition: str = "Accepted") -> Outcome:
    conds = set_condition(prev.get("conditions") or [], condition, "False", reason, message, now)
    conds = set_condition(conds, "Failed", "True", reason, message, now)
    status = {k: v for k, v in prev.items() if k != "kopf"}
    # Same answer on every reconcile: keep the first completionTime so nothing churns.
    status.update(phase="Failed", conditions=conds, observedGeneration=generation, eta=None,
                  completionTime=prev.get("completionTime") or rfc3339(now))
    return Outcome(status, [("Warning", reason, message)])


def _create_all(cluster: Cluster, objs: list[dict[str, Any]], owner: dict[str, Any], adopt: Adopt) -> None:
    adopt(objs, owner)
    for obj in objs:
        try:
            cluster.create(obj)
        except AlreadyExists:
            pass  # made by an earlier attempt; the Job is checked for ownership by the caller


def _check_owned(job: Optional[dict[str, Any]], uid: Optional[str], name: str) -> None:
    if job is not None and uid and not owned_by(job, uid):
        raise NotOwned(f"Job {name} exists but does not belong to this run (an older run's, still being "
                       "deleted?); waiting")


def _drift(job: dict[str, Any], spec: TrainingRunSpec | EvalRunSpec, prev_conds: list[dict[str, Any]],
           now: datetime) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """SpecChangeRefused while the spec differs from the one the Job was made from."""
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(render.SPEC_ANNOTATION)
    changed = render.spec_drift(json.loads(raw), spec) if raw else []
    if not changed:
        return remove_condition(prev_conds, "SpecChangeRefused"), []
    msg = (f"{', '.join(changed)} changed after the Job was created; not applied (only spec.suspend may change "
           f"once a run has started). Delete and re-create the run to apply it")
    already = any(c.get("type") == "SpecChangeRefused" and c.get("message") == msg[:1024] for c in prev_conds)
    conds = set_condition(prev_conds, "SpecChangeRefused", "True", "SpecImmutable", msg, now)
    return conds, [] if already else [("Warning", "SpecChangeRefused", msg)]


def _sync_suspend(cluster: Cluster, job: dict[str, Any], spec: TrainingRunSpec | EvalRunSpec, namespace: str,
                  name: str) -> dict[str, Any]:
    """Make the Job's suspend follow spec.suspend. With a Kueue queue the operator only ever
    suspends: unsuspending is Kueue's decision (admission)."""
    current = bool((job.get("spec") or {}).get("suspend"))
    want: Optional[bool] = spec.suspend
    if spec.queue_name and not spec.suspend:
        want = None
    if want is None or want == current:
        return job
    cluster.patch_job_suspend(namespace, name, want)
    return {**job, "spec": {**(job.get("spec") or {}), "suspend": want}}


def _queue_view(view: Optional[JobView], spec: TrainingRunSpec | EvalRunSpec) -> Optional[JobView]:
    if view is not None and view.suspended and spec.queue_name and not spec.suspend:
        return dataclasses.replace(view, reason="WaitingForQueue",
                                   message=f"waiting for Kueue to admit the Job (queue {spec.queue_name})")
    return view


def _phase_events(prev: dict[str, Any], new: dict[str, Any], kind: str) -> list[tuple[str, str, str]]:
    if prev.get("phase") == new.get("phase"):
        return []
    phase = new.get("phase")
    reason = next((c.get("reason") for c in new.get("conditions") or [] if c.get("type") == "Failed"), "")
    typ = "Warning" if phase == "Failed" else "Normal"
    return [(typ, phase or "Unknown", f"{kind} is {phase}" + (f": {reason}" if reason and phase == "Failed" else ""))]


def _accepted(prev: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The status of a spec that passed validation. A run that Failed before it had a Job
    (invalid spec, failed source) starts over when its spec is fixed: drop that failure."""
    status = dict(prev)
    conds = prev.get("conditions") or []
    if not prev.get("jobName"):
        conds = remove_condition(remove_condition(conds, "Failed"), "DependenciesReady")
    status["conditions"] = set_condition(conds, "Accepted", "True", "Valid",
                                         "the spec is valid and fits its resources", now)
    return status


def _dependency(cluster: Cluster, namespace: str, name: str, source_name: str,
                follow_chain: bool) -> deps.Dependency:
    source = cluster.get_training_run(namespace, source_name)
    dep = deps.resolve(source_name, source)
    if dep.state == "wait" and follow_chain and source is not None:
        cache = {source_name: source}

        def source_of(run: str) -> Optional[str]:
            obj = cache.get(run) if run in cache else cluster.get_training_run(namespace, run)
            cache[run] = obj
            if obj is None:
                return None
            return ((obj.get("spec") or {}).get("init") or {}).get("fromTrainingRun")

        cycle = deps.find_cycle(name, source_of)
        if cycle and cycle[0] == name:
            return deps.Dependency("fail", "DependencyCycle",
                                   "init.fromTrainingRun forms a loop: " + " -> ".join(cycle), source_name)
    return dep


# ---------------------------------------------------------------------------- TrainingRun


def _gate_on_dependency(cluster: Cluster, namespace: str, name: str, source_name: str, follow_chain: bool,
                        base: dict[str, Any], prev: dict[str, Any], now: datetime, generation: Optional[int],
                        job_name: str, status_fn: Callable[..., dict[str, Any]],
                        kind: str) -> Outcome | tuple[str, str]:
    """Wait for, or fail on, the run this one reads; when it is ready, its (name, claim).

    Sets the DependenciesReady condition on `base` either way.
    """
    dep = _dependency(cluster, namespace, name, source_name, follow_chain=follow_chain)
    if dep.state == "fail":
        return _fail(base, now, generation, dep.reason, dep.message, condition="DependenciesReady")
    ready = dep.state != "wait"
    base["conditions"] = set_condition(base["conditions"], "DependenciesReady", "True" if ready else "False",
                                       dep.reason, dep.message, now)
    if not ready:
        base.pop("completionTime", None)
        new = status_fn(base, None, None, now=now, generation=generation, job_name=job_name)
        return Outcome(new, _phase_events(prev, new, kind))
    assert dep.claim is not None
    return dep.source or "", dep.claim


def reconcile_training(cluster: Cluster, obj: dict[str, Any], config: OperatorConfig, *, now: datetime,
                       adopt: Adopt) -> Outcome:
    meta = obj["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta.get("uid")
    generation = meta.get("generation")
    prev = {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"}
    jname = render.job_name(name)

    if is_final(prev):
        if generation is not None and prev.get("observedGeneration") not in (None, generation):
            msg = "the run already finished; spec changes are not applied. Create a new run instead"
            conds = set_condition(prev.get("conditions") or [], "SpecChangeRefused", "True", "RunFinished", msg, now)
            return Outcome({**prev, "conditions": conds, "observedGeneration": generation},
                           [("Warning", "SpecChangeRefused", msg)])
        return Outcome(prev)

    try:
        spec = TrainingRunSpec.model_validate(obj.get("spec") or {})
    except ValidationError as err:
        return _fail(prev, now, generation, "InvalidSpec", format_validation_error(err, "spec."))
    problems = feasibility(spec, config.gpu_memory_gib)
    if problems:
        return _fail(prev, now, generation, "Infeasible", "; ".join(problems))
    claim = spec.storage.pvc_name(name) if spec.storage else None
    base = {**_accepted(prev, now), "storageClaim": claim, "runDir": render.run_dir(name)}
    events: list[tuple[str, str, str]] = []

    job = cluster.get_job(namespace, jname)
    _check_owned(job, uid, jname)
    progress: Optional[Progress] = None
    if job is None:
        source = None
        if spec.init is not None:
            gate = _gate_on_dependency(cluster, namespace, name, spec.init.from_training_run, True, base, prev,
                                       now, generation, jname, training_status, "TrainingRun")
            if isinstance(gate, Outcome):
                return gate
            source = gate
        objs = render.render_training(name, namespace, spec, image=spec.image or config.trainer_image, source=source)
        base.pop("completionTime", None)
        try:
            _create_all(cluster, objs, obj, adopt)
        except Rejected as err:
            return _fail(base, now, generation, "CreateRejected", str(err))
        job = cluster.get_job(namespace, jname) or objs[-1]
        _check_owned(job, uid, jname)
        events.append(("Normal", "Created", f"created Job {jname} ({spec.resources.nodes} node(s) x "
                                            f"{render.procs_per_node(spec)} process(es))"))
        pods: list[dict[str, Any]] = []
    else:
        base["conditions"], drift_events = _drift(job, spec, base["conditions"], now)
        events += drift_events
        job = _sync_suspend(cluster, job, spec, namespace, jname)
        pods = cluster.list_pods(namespace, jname)

    view = _queue_view(observe_job(job, pods, spec.resources.nodes), spec)
    port = spec.trainer.metrics.port
    if view is not None and view.pod0 is not None and port:
        ip = (view.pod0.get("status") or {}).get("podIP")
        if ip:
            text = cluster.scrape(f"http://{ip}:{port}/metrics")
            if text:
                try:
                    progress = parse_trainer_metrics(text)
                except ValueError:
                    progress = None
    new = training_status(base, view, progress, now=now, generation=generation, job_name=jname,
                          final_checkpoint=render.final_checkpoint_path(name) if spec.storage else None,
                          checkpoint_path=lambda step: render.checkpoint_step_path(name, step))
    return Outcome(new, events + _phase_events(prev, new, "TrainingRun"))


# ---------------------------------------------------------------------------- EvalRun


def reconcile_eval(cluster: Cluster, obj: dict[str, Any], config: OperatorConfig, *, now: datetime,
                   adopt: Adopt) -> Outcome:
    meta = obj["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta.get("uid")
    generation = meta.get("generation")
    prev = {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"}
    jname = render.eval_job_name(name)
    if is_final(prev):
        return Outcome({**prev, "observedGeneration": generation} if generation is not None else prev)

    try:
        spec = EvalRunSpec.model_validate(obj.get("spec") or {})
    except ValidationError as err:
        return _fail(prev, now, generation, "InvalidSpec", format_validation_error(err, "spec."))
    base = _accepted(prev, now)
    events: list[tuple[str, str, str]] = []

    job = cluster.get_job(namespace, jname)
    _check_owned(job, uid, jname)
    if job is None:
        source = None
        if spec.model.training_run is not None:
            gate = _gate_on_dependency(cluster, namespace, name, spec.model.training_run, False, base, prev,
                                       now, generation, jname, eval_status, "EvalRun")
            if isinstance(gate, Outcome):
                return gate
            source = gate
            base["checkpoint"] = render.final_checkpoint_path(source[0])
            base["resultsPath"] = render.eval_results_path(source[0], name)
        compare_runs: dict[str, tuple[str, str]] = {}
        for c in spec.compare:  # every compared run must have Succeeded too
            if c.training_run is None:
                continue
            gate = _gate_on_dependency(cluster, namespace, name, c.training_run, False, base, prev,
                                       now, generation, jname, eval_status, "EvalRun")
            if isinstance(gate, Outcome):
                return gate
            compare_runs[c.name] = gate
        job_obj = render.render_eval_job(name, namespace, spec, image=spec.image or config.trainer_image,
                                         source=source, compare_runs=compare_runs)
        base.pop("completionTime", None)
        try:
            _create_all(cluster, [job_obj], obj, adopt)
        except Rejected as err:
            return _fail(base, now, generation, "CreateRejected", str(err))
        job = cluster.get_job(namespace, jname) or job_obj
        _check_owned(job, uid, jname)
        events.append(("Normal", "Created", f"created Job {jname}"))
        pods: list[dict[str, Any]] = []
    else:
        base["conditions"], drift_events = _drift(job, spec, base["conditions"], now)
        events += drift_events
        job = _sync_suspend(cluster, job, spec, namespace, jname)
        pods = cluster.list_pods(namespace, jname)

    view = _queue_view(observe_job(job, pods, 1), spec)
    result = None
    if view is not None and view.phase == "Succeeded":
        for pod in pods:
            if (pod.get("status") or {}).get("phase") == "Succeeded":
                result = parse_result(terminated_message(pod, render.EVAL_CONTAINER))
                if result is not None:
                    break
    new = eval_status(base, view, result, now=now, generation=generation, job_name=jname)
    return Outcome(new, events + _phase_events(prev, new, "EvalRun"))


def has_condition(status: dict[str, Any], type_: str, value: str = "True") -> bool:
    cond = get_condition(status, type_)
    return cond is not None and cond.get("status") == value
