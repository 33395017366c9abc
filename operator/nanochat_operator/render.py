"""Pure rendering: a run's spec in, Kubernetes manifests (dicts) out. No API calls.

A TrainingRun `demo` becomes:

    ConfigMap  demo-config   config.yaml = the resolved trainer config
    Service    demo-train    headless; gives pod i the DNS name demo-train-<i>.demo-train
    Job        demo-train    Indexed, completions = parallelism = nodes, pods run torchrun
    PVC        demo-storage  only when spec.storage.size asks the operator to make one

Pods run `torchrun -m nanochat_trainer.train --config /etc/nanochat/config.yaml` the
way Kubeflow Trainer v2 starts torch jobs: torchrun takes its arguments from PET_*
variables (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK from the Job completion
index, PET_MASTER_ADDR = pod 0 through the headless Service, PET_MASTER_PORT).

Storage layout: the PVC is mounted at /data and its `runs/` folder is the runs root, so
the run directory (`checkpoint.dir`, set by the operator whatever the manifest says) is
/data/runs/<run>; inside it, the contract's `RunLayout` places everything else (the
finished model /data/runs/<run>/final, an EvalRun `e`'s full results
/data/runs/<run>/eval/<e>.json). `nanochat run` renders with its own runs directory as
the runs root (`resolved_trainer_config(..., runs_root=...)`).

An EvalRun becomes a one-pod Job running `nanochat eval`, fenced by a NetworkPolicy. When its
model does not fit one GPU (`checks.eval_fit`), the pod serves it first, with `VllmServing`:

    init      sandbox   native sidecar: runs the completions' programs (every eval pod has it)
    init      export    `nanochat export <checkpoint> --hf <run>/hf` (idempotent), trainer image
    init      vllm      native sidecar: `vllm serve <run>/hf --tensor-parallel-size <gpus>` on
                        127.0.0.1 only, holding the GPUs; its startupProbe (GET /health from
                        inside) holds the eval container back until the model is loaded
    container eval      `nanochat eval --endpoint http://127.0.0.1:8000/v1 --model <run>`

Owner references are not set here: the handler adopts what it creates (kopf.adopt).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.contract import (
    COMPLETION_INDEX_ANNOTATION,
    DEFAULT_TERMINATION_LOG,
    EVAL_API_KEY_ENV,
    EVAL_LABEL,
    JOB_NAME_LABEL,
    QUEUE_LABEL,
    RUN_LABEL,
    SANDBOX_SOCKET_ENV,
    SPEC_ANNOTATION,
    SPEC_HASH_ANNOTATION,
    TERMINATION_LOG_ENV,
    RunLayout,
    compare_key_env,
    run_layout,
)
from nanochat_trainer.contract import endpoint_source as contract_endpoint_source

from . import api
from .api import EvalRunSpec, TrainingRunSpec

DATA_MOUNT = "/data"
SOURCE_MOUNT = "/source"  # a source run's PVC, when it is not this run's own
MODELS_MOUNT = "/models"  # PVCs of an EvalRun's compared runs, other than its main one
RUNS_DIR = "runs"  # the runs root inside every PVC, so a claim can hold other data beside it
RUNS_ROOT = PurePosixPath(DATA_MOUNT) / RUNS_DIR  # in the run's own pods
CONFIG_MOUNT = "/etc/nanochat"
CONFIG_FILE = "config.yaml"
RENDEZVOUS_PORT = 29500
TRAINER_CONTAINER = "trainer"
EVAL_CONTAINER = "eval"
GPU_RESOURCE = "nvidia.com/gpu"
# Pod Security "restricted" by default, so a run starts in a namespace that enforces it. The
# trainer image runs as UID 1000: it gets the PVC through its group, and the recursive chown of
# a large PVC is skipped when the root already matches. A run's spec.pod merges over these.
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# The eval pod runs model-written code (in the sandbox, eval/sandbox.py): it gets nothing it does
# not need, a read-only root and no API token besides.
EVAL_CONTAINER_SECURITY = {**CONTAINER_SECURITY, "readOnlyRootFilesystem": True}
# The container the completions run in (eval/sandbox_server.py): a user of its own, and nothing
# of the evaluator's: no volume, no Secret, no environment.
SANDBOX_CONTAINER = "sandbox"
SANDBOX_CONTAINER_SECURITY = {**EVAL_CONTAINER_SECURITY, "runAsUser": 65534, "runAsGroup": 65534}
# 4 programs at a time (nanochat eval --workers), 1 GiB of address space each (Sandbox memory_mb).
SANDBOX_RESOURCES = {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "5Gi"}}
# Unique per pod even where pods share a network namespace (the e2e node agent, hostNetwork).
SANDBOX_SOCKET = "@nanochat-sandbox-$(POD_UID)"
# An EvalRun's model too large for one GPU: exported, then served by vLLM in the pod (VllmServing).
EXPORT_CONTAINER = "export"
VLLM_CONTAINER = "vllm"
VLLM_PORT = 8000
VLLM_URL = f"http://127.0.0.1:{VLLM_PORT}/v1"  # loopback only: nothing outside the pod reaches it
# Loading tens of GiB of weights and capturing CUDA graphs: up to an hour before the eval starts.
VLLM_STARTUP_PROBE = {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 360}
# The eval container when vLLM holds the GPUs: an HTTP client and the sandbox's coordinator.
EVAL_CLIENT_RESOURCES = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}


# ---------------------------------------------------------------------------- names and paths


def job_name(run_name: str) -> str:
    return f"{run_name}-train"


def service_name(run_name: str) -> str:
    return job_name(run_name)  # one name: pod i is <job>-<i>.<svc>


def config_map_name(run_name: str) -> str:
    return f"{run_name}-config"


def eval_job_name(eval_name: str) -> str:
    return f"{eval_name}-eval"


def pod_layout(run_name: str, mount: str = DATA_MOUNT) -> RunLayout[PurePosixPath]:
    """A TrainingRun's run directory as a pod sees it: `runs/<run>` on the PVC mounted at `mount`."""
    return run_layout(PurePosixPath(mount) / RUNS_DIR, run_name)


# Strings, because manifests and the status hold strings.
def run_dir(run_name: str, mount: str = DATA_MOUNT) -> str:
    """The run directory (`checkpoint.dir`) of a TrainingRun inside its PVC's mount."""
    return str(pod_layout(run_name, mount).root)


def final_checkpoint_path(run_name: str, mount: str = DATA_MOUNT) -> str:
    """The finished model of a TrainingRun: what init.fromTrainingRun and EvalRuns load.
    Fixed by the name, since the operator sets every run's checkpoint.dir."""
    return str(pod_layout(run_name, mount).final)


def dataset_path(run_name: str, mount: str = DATA_MOUNT) -> str:
    """What a stage-generate TrainingRun makes: its dataset folder (manifest and Parquet shards)."""
    return str(pod_layout(run_name, mount).dataset)


def model_path(model: api.EvalModel, mount: str = DATA_MOUNT, packed: bool = False) -> str:
    """The checkpoint an EvalRun's model names: its TrainingRun's final or best one; `packed`: a
    ternary run's final model as its packed export (`checks.eval_fit` says which)."""
    assert model.training_run is not None
    return str(pod_layout(model.training_run, mount).evaluated(model.checkpoint, packed))


def hf_export_path(run_name: str, checkpoint: str = "final", mount: str = DATA_MOUNT) -> str:
    """A TrainingRun's Hugging Face export (`nanochat export --hf`), which vLLM serves."""
    return str(pod_layout(run_name, mount).hf(checkpoint))


def eval_results_path(run_name: str, eval_name: str, mount: str = DATA_MOUNT) -> str:
    """Where `nanochat eval --out` writes an EvalRun's full results, next to the model."""
    return str(pod_layout(run_name, mount).eval_results(eval_name))


def checkpoint_step_path(run_name: str, step: int, mount: str = DATA_MOUNT) -> str:
    return str(pod_layout(run_name, mount).step(step))


MANAGED_BY, MANAGER = "app.kubernetes.io/managed-by", "nanochat-operator"  # on all it makes; the watches select on it
NAME_LABEL, TRAINER_APP, EVAL_APP = "app.kubernetes.io/name", "nanochat-trainer", "nanochat-eval"


def training_labels(run_name: str) -> dict[str, str]:
    return {
        NAME_LABEL: TRAINER_APP,
        "app.kubernetes.io/instance": run_name,
        MANAGED_BY: MANAGER,
        RUN_LABEL: run_name,
    }


def eval_labels(eval_name: str) -> dict[str, str]:
    return {
        NAME_LABEL: EVAL_APP,
        "app.kubernetes.io/instance": eval_name,
        MANAGED_BY: MANAGER,
        EVAL_LABEL: eval_name,
    }


# ---------------------------------------------------------------------------- spec drift


def applied_spec(spec: TrainingRunSpec | EvalRunSpec) -> dict[str, Any]:
    """The part of a spec that shaped the Job: all of it except `suspend` (which may change)."""
    return spec.model_dump(mode="json", by_alias=True, exclude={"suspend"}, exclude_none=True)


def spec_hash(spec: TrainingRunSpec | EvalRunSpec) -> str:
    text = json.dumps(applied_spec(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_drift(applied: dict[str, Any], spec: TrainingRunSpec | EvalRunSpec) -> list[str]:
    """Dotted paths where the current spec differs from the one the Job was made from. The Job's
    copy is read through this version's models first: a field added since the Job was made (by an
    operator upgrade) takes its default on both sides instead of reading as an edit. (A default
    changed since is still reported: the copy holds every value explicitly.)"""
    try:
        applied = applied_spec(type(spec).model_validate(applied))
    except ValidationError:
        pass  # a field this version no longer knows: compare the copy as it is
    return sorted(_diff(applied, applied_spec(spec), "spec"))


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{path}.{key}")
        return out
    return [] if a == b else [path]


# ---------------------------------------------------------------------------- TrainingRun


def resolved_trainer_config(
    run_name: str, spec: TrainingRunSpec, init_from: str | None = None, runs_root: PurePath = RUNS_ROOT
) -> TrainerConfig:
    """The trainer config the pods get: the spec's, with the operator's paths set. `runs_root`:
    where run directories live (a local directory for `nanochat run`)."""
    cfg = spec.trainer.model_copy(deep=True)
    cfg.checkpoint.dir = str(run_layout(runs_root, run_name).root)
    if init_from:
        cfg.checkpoint.init_from = init_from
    return cfg


def trainer_config_yaml(cfg: TrainerConfig) -> str:
    # The preset is already applied (every field is explicit), so drop its name: a later
    # trainer image that changed the preset must not shift a run that is resuming.
    data = cfg.model_dump(mode="json", exclude={"preset"})
    return yaml.safe_dump(data, sort_keys=False)


def procs_per_node(spec: TrainingRunSpec) -> int:
    """torchrun workers per pod: one per GPU, one on CPU."""
    return max(spec.resources.gpus_per_node, 1)


def render_config_map(
    run_name: str, namespace: str, spec: TrainingRunSpec, init_from: str | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name(run_name), "namespace": namespace, "labels": training_labels(run_name)},
        "data": {CONFIG_FILE: trainer_config_yaml(resolved_trainer_config(run_name, spec, init_from))},
    }


def render_service(run_name: str, namespace: str, spec: TrainingRunSpec) -> dict[str, Any]:
    ports = [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    if spec.trainer.metrics.port:
        ports.append(
            {
                "name": "metrics",
                "port": spec.trainer.metrics.port,
                "targetPort": spec.trainer.metrics.port,
                "protocol": "TCP",
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(run_name), "namespace": namespace, "labels": training_labels(run_name)},
        "spec": {
            "clusterIP": "None",
            # Rendezvous happens before any pod is Ready: DNS must resolve from the start.
            "publishNotReadyAddresses": True,
            "selector": {JOB_NAME_LABEL: job_name(run_name)},
            "ports": ports,
        },
    }


def render_pvc(run_name: str, namespace: str, storage: api.Storage) -> dict[str, Any] | None:
    """The PVC the operator makes for `storage.size`; None when the user names a claim."""
    if storage.claim_name or storage.size is None:
        return None
    pvc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": storage.pvc_name(run_name), "namespace": namespace, "labels": training_labels(run_name)},
        "spec": {"accessModes": [storage.access_mode], "resources": {"requests": {"storage": str(storage.size)}}},
    }
    if storage.storage_class:
        pvc["spec"]["storageClassName"] = storage.storage_class
    return pvc


def _env(user: list[api.EnvVar]) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in user]


def _container_resources(res: api.PodResources, gpus: int, extra: dict[str, api.Quantity]) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    if res.cpu is not None:
        limits["cpu"] = str(res.cpu)
    if res.memory is not None:
        limits["memory"] = str(res.memory)
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    limits.update({name: str(q) for name, q in extra.items()})  # extended resources: requests equal limits
    return {"requests": dict(limits), "limits": limits} if limits else {}


def _apply_pod_template(template: dict[str, Any], container: dict[str, Any], tpl: api.PodTemplate) -> None:
    """A run's spec.pod on its pod template and main container. The operator's own labels win
    (the API refuses its reserved prefixes anyway); security contexts merge key by key."""
    meta, pod = template["metadata"], template["spec"]
    meta["labels"] = {**tpl.labels, **meta["labels"]}
    if tpl.annotations:
        meta["annotations"] = {**tpl.annotations, **(meta.get("annotations") or {})}
    if tpl.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in tpl.image_pull_secrets]
    if tpl.priority_class_name:
        pod["priorityClassName"] = tpl.priority_class_name
    if tpl.scheduler_name:
        pod["schedulerName"] = tpl.scheduler_name
    pod["securityContext"] = {**pod["securityContext"], **tpl.security_context}
    container["securityContext"] = {**container["securityContext"], **tpl.container_security_context}
    if tpl.affinity:
        pod["affinity"] = tpl.affinity
    if tpl.topology_spread_constraints:
        pod["topologySpreadConstraints"] = list(tpl.topology_spread_constraints)
    pod["volumes"] += [v.model_dump(mode="json") for v in tpl.volumes]
    container["volumeMounts"] = container["volumeMounts"] + [
        m.model_dump(mode="json", by_alias=True) for m in tpl.volume_mounts
    ]


def _job_spec(spec: api.RunCommon, pod_template: dict[str, Any], completions: int, *containers: str) -> dict[str, Any]:
    """The Job spec around a pod template, from the fields both kinds share. `containers`: those
    whose exit codes spec.podFailurePolicy reads (the main one, and an eval pod's export step).
    backoffLimit counts pods, and a failure of a run on N nodes fails N of them at once."""
    job_spec: dict[str, Any] = {
        "completions": completions,
        "parallelism": completions,
        "backoffLimit": spec.backoff_limit * completions,
        "suspend": _job_suspend(spec),
        "template": pod_template,
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    policy = _failure_policy(spec.pod_failure_policy, *containers)
    if policy:
        job_spec["podFailurePolicy"] = policy
    return job_spec


def _placement(pod: dict[str, Any], res: api.PodResources) -> None:
    if res.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in res.tolerations]
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)


def _failure_policy(policy: api.PodFailurePolicy, *containers: str) -> dict[str, Any] | None:
    rules: list[dict[str, Any]] = []
    if policy.fail_on_exit_codes:
        rules += [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": container,
                    "operator": "In",
                    "values": sorted(set(policy.fail_on_exit_codes)),
                },
            }
            for container in containers
        ]
    if policy.ignore_disruptions:
        rules.append({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]})
    return {"rules": rules} if rules else None


def _job_suspend(spec: api.RunCommon) -> bool:
    # With a Kueue queue the Job starts suspended and Kueue unsuspends it on admission.
    return spec.suspend or spec.queue_name is not None


def _job_metadata(name: str, namespace: str, labels: dict[str, str], spec: api.RunCommon) -> dict[str, Any]:
    job_labels = dict(labels)
    if spec.queue_name:
        job_labels[QUEUE_LABEL] = spec.queue_name
    applied = json.dumps(applied_spec(spec), sort_keys=True, separators=(",", ":"))
    return {
        "name": name,
        "namespace": namespace,
        "labels": job_labels,
        "annotations": {SPEC_HASH_ANNOTATION: spec_hash(spec), SPEC_ANNOTATION: applied},
    }


def render_training_job(
    run_name: str, namespace: str, spec: TrainingRunSpec, *, image: str, source_claim: str | None = None
) -> dict[str, Any]:
    """The Indexed Job. `source_claim`: the PVC of an init.fromTrainingRun source when it is
    not this run's own; it is mounted read-only at /source."""
    nodes = spec.resources.nodes
    gpus = spec.resources.gpus_per_node
    name = job_name(run_name)
    labels = training_labels(run_name)
    env: list[dict[str, Any]] = [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(procs_per_node(spec))},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
        {"name": "PET_MASTER_ADDR", "value": f"{name}-0.{service_name(run_name)}"},
        {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # Rank 0 leaves its last gauges there (the pod's status), for a run that ends between two scrapes.
        {"name": TERMINATION_LOG_ENV, "value": DEFAULT_TERMINATION_LOG},
    ] + _env(spec.env)
    ports = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    if spec.trainer.metrics.port:
        ports.append({"name": "metrics", "containerPort": spec.trainer.metrics.port, "protocol": "TCP"})
    mounts = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "data", "mountPath": DATA_MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if spec.storage is not None:
        data_volume: dict[str, Any] = {
            "name": "data",
            "persistentVolumeClaim": {"claimName": spec.storage.pvc_name(run_name)},
        }
    else:
        data_volume = {"name": "data", "emptyDir": {}}
    volumes = [
        {"name": "config", "configMap": {"name": config_map_name(run_name)}},
        data_volume,
        # NCCL and dataloader workers share memory through /dev/shm; the container default is 64Mi.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if source_claim:
        mounts.append({"name": "source", "mountPath": SOURCE_MOUNT, "readOnly": True})
        volumes.append({"name": "source", "persistentVolumeClaim": {"claimName": source_claim, "readOnly": True}})

    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": image,
        "command": ["torchrun", "-m", "nanochat_trainer.train", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"],
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
        "terminationMessagePath": DEFAULT_TERMINATION_LOG,
        # A crash's last log lines end up in the pod status, where the operator reads them.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": dict(CONTAINER_SECURITY),
    }
    resources = _container_resources(spec.resources, gpus, spec.pod.extra_resources)
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job replaces failed pods
        "subdomain": service_name(run_name),
        "enableServiceLinks": False,
        "securityContext": dict(POD_SECURITY),
        "containers": [container],
        "volumes": volumes,
    }
    if runs_programs(spec.trainer):
        # Model-written programs (in-training HumanEval, tests of teacher-made exercises) run in a
        # sandbox container of their own, as an EvalRun's do, never beside the run's secrets and volumes.
        _add_sandbox(pod, container, image)
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    _placement(pod, spec.resources)
    template = {"metadata": {"labels": dict(labels)}, "spec": pod}
    _apply_pod_template(template, container, spec.pod)
    if spec.gang is not None:
        _join_pod_group(template, spec.gang, name)
    job_spec = {"completionMode": "Indexed", **_job_spec(spec, template, nodes, TRAINER_CONTAINER)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _job_metadata(name, namespace, labels, spec),
        "spec": job_spec,
    }


# ---------------------------------------------------------------------------- gang scheduling

COSCHEDULING_LABEL = "scheduling.x-k8s.io/pod-group"  # scheduler-plugins' coscheduling
VOLCANO_ANNOTATION = "scheduling.k8s.io/group-name"  # Volcano
POD_GROUP_API = {"coscheduling": "scheduling.x-k8s.io/v1alpha1", "volcano": "scheduling.volcano.sh/v1beta1"}


def _join_pod_group(template: dict[str, Any], gang: api.Gang, group: str) -> None:
    """Mark the pods as members of the PodGroup the way their scheduler reads it."""
    if gang.scheduler == "coscheduling":
        template["metadata"]["labels"][COSCHEDULING_LABEL] = group
    else:
        template["metadata"].setdefault("annotations", {})[VOLCANO_ANNOTATION] = group
        template["spec"].setdefault("schedulerName", "volcano")


def render_pod_group(run_name: str, namespace: str, spec: TrainingRunSpec, gang: api.Gang) -> dict[str, Any]:
    """The PodGroup of a run with spec.gang: every node's pod, and their GPUs, placed together.
    Named after the Job, whose pods are its members."""
    nodes, gpus = spec.resources.nodes, spec.resources.gpus_per_node
    group: dict[str, Any] = {"minMember": nodes}
    if gpus:
        group["minResources"] = {GPU_RESOURCE: str(nodes * gpus)}
    if gang.scheduler == "coscheduling":
        group["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
    else:
        if gang.queue:
            group["queue"] = gang.queue
        if spec.pod.priority_class_name:
            group["priorityClassName"] = spec.pod.priority_class_name
    return {
        "apiVersion": POD_GROUP_API[gang.scheduler],
        "kind": "PodGroup",
        "metadata": {"name": job_name(run_name), "namespace": namespace, "labels": training_labels(run_name)},
        "spec": group,
    }


def init_source(source_name: str, source_claim: str, own_claim: str | None) -> tuple[str, str | None]:
    """(checkpoint.init_from path, extra claim to mount) for a run starting from `source_name`."""
    if source_claim == own_claim:
        return final_checkpoint_path(source_name), None
    return final_checkpoint_path(source_name, SOURCE_MOUNT), source_claim


def render_training(
    run_name: str, namespace: str, spec: TrainingRunSpec, *, image: str, source: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """Everything a TrainingRun needs, in creation order (PVC, ConfigMap, Service, PodGroup, Job).
    `source`: (source run name, its PVC) for init.fromTrainingRun."""
    init_from, extra_claim = None, None
    if source is not None:
        own = spec.storage.pvc_name(run_name) if spec.storage else None
        init_from, extra_claim = init_source(source[0], source[1], own)
    out = []
    if spec.storage is not None:
        pvc = render_pvc(run_name, namespace, spec.storage)
        if pvc:
            out.append(pvc)
    out.append(render_config_map(run_name, namespace, spec, init_from))
    out.append(render_service(run_name, namespace, spec))
    if spec.gang is not None:  # before the Job: its pods name the group
        out.append(render_pod_group(run_name, namespace, spec, spec.gang))
    out.append(render_training_job(run_name, namespace, spec, image=image, source_claim=extra_claim))
    return out


# ---------------------------------------------------------------------------- EvalRun


def eval_command(
    eval_name: str,
    spec: EvalRunSpec,
    checkpoint: str | None = None,
    out: str | None = None,
    compare: dict[str, str] | None = None,
    served: api.Endpoint | None = None,
) -> list[str]:
    """`nanochat eval ...` for a checkpoint on the PVC, or for an endpoint. `compare`: the
    --compare source (checkpoint path or URL#MODEL) of each spec.compare entry, by name.
    `served`: where the pod serves spec.model's TrainingRun (vLLM), scored as an endpoint is."""
    cmd = ["nanochat", "eval"]
    endpoint = spec.model.endpoint or served
    if endpoint is not None:
        cmd += [
            "--endpoint",
            endpoint.url,
            "--model",
            endpoint.model,
            "--api-key-env",
            EVAL_API_KEY_ENV,
        ]
    else:
        if checkpoint is None:
            raise ValueError("an EvalRun of a TrainingRun needs the checkpoint path")
        cmd += ["--checkpoint", checkpoint]
    cmd += [
        "--samples",
        str(spec.samples_per_problem),
        "--temperature",
        str(spec.temperature),
        "--k",
        ",".join(str(k) for k in sorted(set(spec.k))),
        "--max-new-tokens",
        str(spec.max_new_tokens),
    ]
    if spec.max_problems is not None:
        cmd += ["--max-problems", str(spec.max_problems)]
    if out:
        cmd += ["--out", out]
    if spec.compare:
        cmd += ["--name", main_label(spec)]
        for c in spec.compare:
            cmd += ["--compare", f"{c.name}={(compare or {})[c.name]}"]
    return cmd


def main_label(spec: EvalRunSpec) -> str:
    """The evaluated model's name beside its spec.compare models."""
    return spec.model.training_run or "endpoint"


def endpoint_source(endpoint: api.Endpoint) -> str:
    """An endpoint as `nanochat eval --compare NAME=SOURCE` takes it: URL#MODEL."""
    return contract_endpoint_source(endpoint.url, endpoint.model)


def _compare_sources(
    spec: EvalRunSpec,
    main_claim: str | None,
    runs: dict[str, tuple[str, str]],
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    env: list[dict[str, Any]],
    packed: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """--compare sources; mounts each compared run's PVC (read-only, once) unless it is the main one."""
    out: dict[str, str] = {}
    mounted: dict[str, str] = {}
    for c in spec.compare:
        if c.endpoint is not None:
            out[c.name] = endpoint_source(c.endpoint)
            if c.endpoint.api_key_secret is not None:
                ref = {"name": c.endpoint.api_key_secret.name, "key": c.endpoint.api_key_secret.key}
                env.append({"name": compare_key_env(c.name), "valueFrom": {"secretKeyRef": ref}})
            continue
        run, claim = runs[c.name]
        if claim == main_claim:
            out[c.name] = model_path(c, packed=run in packed)
            continue
        if claim not in mounted:
            mounted[claim] = f"{MODELS_MOUNT}/{claim}"
            vol = f"model-{len(mounted)}"
            mounts.append({"name": vol, "mountPath": mounted[claim], "readOnly": True})
            volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        out[c.name] = model_path(c, mounted[claim], packed=run in packed)
    return out


@dataclass(frozen=True)
class VllmServing:
    """spec.model's TrainingRun served in the eval pod by vLLM (the reconciler decides, from
    checks.eval_fit): `tensor_parallel` GPUs, sequences of `max_model_len` tokens at most."""

    image: str
    tensor_parallel: int
    max_model_len: int
    gpu_memory_utilization: float


def served_endpoint(spec: EvalRunSpec) -> api.Endpoint:
    """Where the eval container scores a model the pod serves: vLLM on loopback, under the run's name."""
    assert spec.model.training_run is not None
    return api.Endpoint(url=VLLM_URL, model=spec.model.training_run)


def render_eval_job(
    eval_name: str,
    namespace: str,
    spec: EvalRunSpec,
    *,
    image: str,
    source: tuple[str, str] | None = None,
    compare_runs: dict[str, tuple[str, str]] | None = None,
    runtime_class: str | None = None,
    vllm: VllmServing | None = None,
    packed: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The one-pod eval Job. `source`: (TrainingRun name, its PVC) when evaluating a run;
    `compare_runs`: (TrainingRun name, its PVC) of each spec.compare entry naming a run;
    `runtime_class`: the operator's default RuntimeClass for eval pods; `vllm`: serve the run's
    model in the pod (it does not fit one GPU) and score it there (see the module doc); `packed`:
    the TrainingRuns whose final model is loaded as its packed ternary export (`checks.eval_fit`)."""
    name = eval_job_name(eval_name)
    labels = eval_labels(eval_name)
    env: list[dict[str, Any]] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": TERMINATION_LOG_ENV, "value": DEFAULT_TERMINATION_LOG},
        # The root filesystem is read-only: any cache a library keeps under $HOME goes to /tmp.
        {"name": "HOME", "value": "/tmp"},
    ]
    mounts: list[dict[str, Any]] = [{"name": "scratch", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "scratch", "emptyDir": {}}]
    checkpoint = out = None
    if spec.model.endpoint is not None:
        secret = spec.model.endpoint.api_key_secret
        if secret is not None:
            env.append(
                {"name": EVAL_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}
            )
    else:
        if source is None:
            raise ValueError("an EvalRun of a TrainingRun needs the source run and its PVC")
        checkpoint = model_path(spec.model, packed=source[0] in packed)
        out = eval_results_path(source[0], eval_name)
        mounts.append({"name": "data", "mountPath": DATA_MOUNT})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": source[1]}})
    compare = _compare_sources(spec, source[1] if source else None, compare_runs or {}, mounts, volumes, env, packed)
    env += _env(spec.env)
    served = served_endpoint(spec) if vllm is not None else None
    container: dict[str, Any] = {
        "name": EVAL_CONTAINER,
        "image": image,
        "command": eval_command(eval_name, spec, None if served else checkpoint, out, compare, served),
        "env": env,
        "volumeMounts": mounts,
        # The eval writes its compact JSON result here; the operator reads it from
        # status.containerStatuses[].state.terminated.message (nanochat_operator.status.terminated_message).
        "terminationMessagePath": DEFAULT_TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": dict(EVAL_CONTAINER_SECURITY),
    }
    resources = _container_resources(spec.resources, spec.resources.gpus, spec.pod.extra_resources)
    if vllm is not None:
        resources = EVAL_CLIENT_RESOURCES  # the GPUs, CPU and memory asked for are vLLM's
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "securityContext": dict(POD_SECURITY),
        "containers": [container],
        "volumes": volumes,
    }
    _add_sandbox(pod, container, image)
    if vllm is not None:
        assert source is not None and checkpoint is not None
        _add_vllm(pod, spec, vllm, image, checkpoint, hf_export_path(source[0], spec.model.checkpoint))
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name  # the user asked for an identity: its token too
    else:
        pod["automountServiceAccountToken"] = False
    if runtime_class or spec.runtime_class_name:
        pod["runtimeClassName"] = spec.runtime_class_name or runtime_class
    _placement(pod, spec.resources)
    template = {"metadata": {"labels": dict(labels)}, "spec": pod}
    _apply_pod_template(template, container, spec.pod)
    for server in (c for c in pod["initContainers"] if c["name"] == VLLM_CONTAINER):
        # The container with the GPUs gets the platform's device settings too (e.g. IPC_LOCK for RDMA).
        server["securityContext"] = {**server["securityContext"], **spec.pod.container_security_context}
    # A bad export (exit code 2: e.g. a model it cannot write) is as final as a bad eval.
    job_spec = _job_spec(spec, template, 1, EVAL_CONTAINER, *([EXPORT_CONTAINER] if vllm else []))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _job_metadata(name, namespace, labels, spec),
        "spec": job_spec,
    }


def _add_vllm(
    pod: dict[str, Any], spec: EvalRunSpec, vllm: VllmServing, image: str, checkpoint: str, hf_dir: str
) -> None:
    """The export step and the vLLM sidecar of an eval pod whose model does not fit one GPU (after
    the sandbox, so the init containers run: sandbox, export, vllm; then the eval container)."""
    scratch = {"name": "scratch", "mountPath": "/tmp"}
    export = {
        "name": EXPORT_CONTAINER,
        "image": image,
        # Idempotent: an export of the same checkpoint already there is kept (a retried pod, a second eval).
        "command": ["nanochat", "export", checkpoint, "--hf", hf_dir],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"}],
        "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT}, scratch],
        "terminationMessagePath": DEFAULT_TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": dict(EVAL_CONTAINER_SECURITY),
    }
    resources = _container_resources(spec.resources, 0, {})
    if resources:
        export["resources"] = resources
    health = f"http://127.0.0.1:{VLLM_PORT}/health"
    server = {
        "name": VLLM_CONTAINER,
        "image": vllm.image,
        "restartPolicy": "Always",  # a native sidecar: stopped once the eval container ends
        "command": ["vllm", "serve"],
        "args": [
            hf_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(VLLM_PORT),
            "--served-model-name",
            served_endpoint(spec).model,
            "--tensor-parallel-size",
            str(vllm.tensor_parallel),
            "--max-model-len",
            str(vllm.max_model_len),
            "--dtype",
            "bfloat16",
            "--gpu-memory-utilization",
            f"{vllm.gpu_memory_utilization:g}",
            # Sample as the request says (nanochat eval's temperature and top_p), not with the defaults
            # of the export's generation_config.json.
            "--generation-config",
            "vllm",
        ],
        "env": [
            # Non-root, no passwd entry: torch's caches ask getpass for a user name, which reads $USER first.
            {"name": "HOME", "value": "/tmp"},
            {"name": "USER", "value": "vllm"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "DO_NOT_TRACK", "value": "1"},
        ],
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "vllm-scratch", "mountPath": "/tmp"},
        ],
        # Listening on loopback alone, it is probed from inside: the eval starts once the model is loaded.
        "startupProbe": {
            "exec": {
                "command": ["python3", "-c", f"import urllib.request; urllib.request.urlopen({health!r}, timeout=4)"]
            },
            **VLLM_STARTUP_PROBE,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": dict(CONTAINER_SECURITY),
        "resources": _container_resources(spec.resources, vllm.tensor_parallel, spec.pod.extra_resources),
    }
    pod["initContainers"] += [export, server]
    pod["volumes"] += [
        # Tensor parallelism's workers share memory through /dev/shm; the container default is 64Mi.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "vllm-scratch", "emptyDir": {}},
    ]


def runs_programs(trainer: TrainerConfig) -> bool:
    """Whether the trainer runs code a model wrote: in-training evaluation, the tests of
    stage generate's exercises, sequence-level distillation's test filter."""
    d = trainer.distill
    sequence_tests = d is not None and d.method == "sequence" and d.filter_tests
    return trainer.evaluation is not None or trainer.stage == "generate" or sequence_tests


def _add_sandbox(pod: dict[str, Any], container: dict[str, Any], image: str) -> None:
    """Give a pod whose `container` runs model-written code the sandbox container: the sidecar,
    its scratch volume, and the sidecar's address in `container`'s environment."""
    container["env"] = [*_sandbox_env(), *container["env"]]
    pod["initContainers"] = [_sandbox_container(image)]
    pod["volumes"].append({"name": "sandbox-scratch", "emptyDir": {"sizeLimit": "1Gi"}})


def _sandbox_container(image: str) -> dict[str, Any]:
    """The sandbox of an eval pod, or of a training pod that scores HumanEval while it trains: a
    native sidecar (an init container that keeps running, stopped when the main container ends)
    serving isolated program runs on SANDBOX_SOCKET. Its own PID namespace and uid; it shares
    only the pod's network namespace with the evaluator."""
    return {
        "name": SANDBOX_CONTAINER,
        "image": image,
        "restartPolicy": "Always",
        "command": ["nanochat", "sandbox-serve"],
        "workingDir": "/tmp",
        "env": [*_sandbox_env(), {"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
        "volumeMounts": [{"name": "sandbox-scratch", "mountPath": "/tmp"}],
        "securityContext": dict(SANDBOX_CONTAINER_SECURITY),
        "resources": SANDBOX_RESOURCES,
    }


def _sandbox_env() -> list[dict[str, Any]]:
    return [
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": SANDBOX_SOCKET_ENV, "value": SANDBOX_SOCKET},
    ]


def render_eval_network_policy(eval_name: str, namespace: str, spec: EvalRunSpec) -> dict[str, Any]:
    """The eval pod's network: nothing in; out, only DNS and the ports of the endpoints it scores
    (none when it scores checkpoints, which it reads from its volumes). A NetworkPolicy cannot
    name a host, so a port is open to any address: the completions themselves never have a
    network (the sandbox's namespace), this keeps the evaluator to what it must reach."""
    endpoints = [m.endpoint for m in [spec.model, *spec.compare] if m.endpoint is not None]
    ports = sorted({_port_of(e.url) for e in endpoints})
    egress: list[dict[str, Any]] = []
    if ports:
        egress = [
            {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
            {"ports": [{"protocol": "TCP", "port": p} for p in ports]},
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": eval_job_name(eval_name), "namespace": namespace, "labels": eval_labels(eval_name)},
        "spec": {
            "podSelector": {"matchLabels": {EVAL_LABEL: eval_name}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }


def _port_of(url: str) -> int:
    parsed = urlsplit(url)
    return parsed.port or (443 if parsed.scheme == "https" else 80)
