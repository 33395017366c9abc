"""The TrainingRun and EvalRun API: pydantic models, the one source of the CRD schemas.

`TrainingRunSpec.trainer` is the trainer's own `TrainerConfig`, verbatim (snake_case
field names, presets applied by the trainer's validator). Everything else here is what
only a cluster needs, spelt camelCase as Kubernetes APIs are (pydantic aliases), so a
manifest reads naturally:

    spec = TrainingRunSpec.model_validate(manifest["spec"])      # camelCase in
    spec.resources.gpus_per_node                                  # snake_case in Python

Cross-field rules live twice on purpose: as pydantic validators (the operator, the CLI's
dry run and the tests) and as CEL rules on the CRD (the API server refuses a bad manifest
before the operator sees it). `nanochat_operator.crds` attaches the CEL rules; the tests
check both refuse the same examples.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.contract import (
    API_VERSION,
    EVAL_KIND,
    PHASES,
    TRAINING_KIND,
    ConditionType,
    Phase,
    storage_claim_name,
)

# Longest run name: the Job is `<name>-train`, its pods' hostnames `<name>-train-<index>`,
# and a hostname is a DNS label (63 characters). 50 leaves room for the suffix and 4-digit
# indexes, and also keeps `<name>-storage` a valid PVC name.
MAX_NAME_LENGTH = 50

# torchrun reads PET_* for its own arguments and sets these in every worker; a user value
# would either be overwritten or silently break rendezvous, so the API refuses them.
TORCHRUN_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "NODE_RANK",
)
RESERVED_ENV_PREFIX = "PET_"

# Kubernetes' resource.Quantity grammar (as controller-gen emits it for CRDs).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
# RFC 1123 label, as Kubernetes names of Services, ConfigMaps and runs are.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

Quantity = int | str
# The CRD schema of a quantity: int-or-string with the grammar, exactly as Kubernetes' own.
_QUANTITY_SCHEMA: dict[str, Any] = {"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}


def _check_quantity(value: Quantity | None, field: str) -> Quantity | None:
    if value is None or isinstance(value, int):
        return value
    if not _QUANTITY_RE.match(value):
        raise ValueError(f"{field}={value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    return value


def parse_quantity(value: Quantity) -> float:
    """A quantity in base units (bytes, cores): '16Gi' -> 17179869184.0, '500m' -> 0.5."""
    if isinstance(value, (int, float)):
        return float(value)
    m = re.match(r"^([+-]?[0-9.]+)([a-zA-Z]*)$", value)
    if not m:  # exponent forms such as 1e9
        return float(value)
    number, suffix = float(m.group(1)), m.group(2)
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    decimal = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    return number * (binary.get(suffix) or decimal[suffix])


def cel(rule: str, message: str) -> dict[str, str]:
    """One CEL validation rule for `x-kubernetes-validations`."""
    return {"rule": rule, "message": message}


class Api(BaseModel):
    """Operator-level models: camelCase on the wire, unknown fields refused."""

    # Aliases only: the wire format is camelCase, as the API server (CRD schema) sees it.
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, validate_by_name=False, validate_by_alias=True)


# ---------------------------------------------------------------------------- shared pieces


class Toleration(Api):
    """A pod toleration (the fields of core/v1 Toleration)."""

    key: str | None = Field(None, max_length=316, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, max_length=63, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect matched; empty matches all."
    )
    toleration_seconds: int | None = Field(None, description="NoExecute: how long the pod stays bound.")


class KeyRef(Api):
    """A key of a Secret or ConfigMap in the run's namespace."""

    name: str = Field(..., min_length=1, max_length=253, description="Secret or ConfigMap name.")
    key: str = Field(..., min_length=1, max_length=253, description="Key inside it.")
    optional: bool | None = Field(None, description="Start even when it is missing.")


class EnvSource(Api):
    """Where an environment variable's value comes from."""

    secret_key_ref: KeyRef | None = Field(None, description="A key of a Secret.")
    config_map_key_ref: KeyRef | None = Field(None, description="A key of a ConfigMap.")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.secretKeyRef) != has(self.configMapKeyRef)",
                    "set exactly one of secretKeyRef, configMapKeyRef",
                ),
            ]
        }
    )

    @model_validator(mode="after")
    def _one(self) -> EnvSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of secretKeyRef, configMapKeyRef")
        return self


ENV_RULE = (
    "!self.name.startsWith('"
    + RESERVED_ENV_PREFIX
    + "') && !(self.name in ["
    + ", ".join(f"'{n}'" for n in TORCHRUN_ENV)
    + "])"
)


class EnvVar(Api):
    """A user environment variable of the run's containers (tokens, proxies, NCCL knobs)."""

    name: str = Field(..., min_length=1, max_length=128, pattern=ENV_NAME_PATTERN, description="Variable name.")
    value: str | None = Field(None, max_length=32768, description="Literal value.")
    value_from: EnvSource | None = Field(None, description="Value from a Secret or ConfigMap key.")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    ENV_RULE,
                    f"{RESERVED_ENV_PREFIX}* and torchrun's variables ({', '.join(TORCHRUN_ENV)}) "
                    "are set by the operator and torchrun",
                ),
                cel("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both"),
            ]
        }
    )

    @model_validator(mode="after")
    def _check(self) -> EnvVar:
        if self.name.startswith(RESERVED_ENV_PREFIX) or self.name in TORCHRUN_ENV:
            raise ValueError(
                f"name={self.name!r} is reserved: {RESERVED_ENV_PREFIX}* and torchrun's variables "
                f"({', '.join(TORCHRUN_ENV)}) are set by the operator and torchrun"
            )
        if self.value is not None and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        return self


class PodResources(Api):
    """Per-pod CPU and memory, and where pods may run."""

    cpu: Quantity | None = Field(
        None, description="CPU request and limit per pod, e.g. 8 or 7500m.", json_schema_extra=_QUANTITY_SCHEMA
    )
    memory: Quantity | None = Field(
        None, description="Memory request and limit per pod, e.g. 64Gi.", json_schema_extra=_QUANTITY_SCHEMA
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations of the pods (e.g. for GPU taints)."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: Quantity | None, info: Any) -> Quantity | None:
        return _check_quantity(v, info.field_name)


class Resources(PodResources):
    """How many machines a run takes: `nodes` pods, each with `gpusPerNode` GPUs."""

    nodes: int = Field(1, ge=1, le=1024, description="Pods (torchrun nodes); the Job's completions and parallelism.")
    gpus_per_node: int = Field(
        0, ge=0, le=16, description="nvidia.com/gpu per pod; 0 trains on CPU (one process per pod)."
    )


class EvalResources(PodResources):
    """One evaluation pod."""

    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu of the eval pod; 0 runs on CPU.")


class Storage(Api):
    """A PersistentVolumeClaim for checkpoints and data, mounted at /data.

    `claimName` uses an existing claim (keep one per namespace for chained runs: the run
    that follows reads the previous run's checkpoint from it). Without `claimName`, `size`
    makes the operator create `<run>-storage`; `whenDeleted` says whether deleting the run
    (by hand, or a GitOps prune) keeps it (the default: a run re-created under the same name
    resumes from its checkpoints) or deletes it. Multi-node runs need a ReadWriteMany claim.
    """

    claim_name: str | None = Field(None, max_length=253, pattern=DNS_LABEL_PATTERN, description="Existing PVC to use.")
    size: Quantity | None = Field(
        None, description="Size of the PVC the operator creates (no claimName).", json_schema_extra=_QUANTITY_SCHEMA
    )
    storage_class: str | None = Field(None, max_length=253, description="StorageClass of the created PVC.")
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        "ReadWriteOnce", description="Access mode of the created PVC; multi-node runs need ReadWriteMany."
    )
    when_deleted: Literal["Retain", "Delete"] = Field(
        "Retain",
        description="The created PVC when the run is deleted: Retain keeps it and its checkpoints (unowned, "
        "labelled with the run), Delete deletes it with the run.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.claimName) != has(self.size)", "set exactly one of claimName, size"),
            ]
        }
    )

    @field_validator("size")
    @classmethod
    def _quantity(cls, v: Quantity | None) -> Quantity | None:
        return _check_quantity(v, "size")

    @model_validator(mode="after")
    def _one(self) -> Storage:
        if (self.claim_name is None) == (self.size is None):
            raise ValueError("set exactly one of claimName, size")
        return self

    def pvc_name(self, run_name: str) -> str:
        return self.claim_name or storage_claim_name(run_name)


class PodFailurePolicy(Api):
    """Which pod failures end the run at once and which are retried.

    Exit codes listed in `failOnExitCodes` mean a bug or a bad input that a retry cannot
    fix, so the Job fails without spending its backoffLimit. Defaults: 2 (argparse usage
    errors of torchrun and `nanochat`, and the trainer's config errors when it runs
    without torchrun), 126/127 (the image has no torchrun / not executable). Exit code 1
    stays retryable on purpose: torchrun exits 1 whenever any worker fails, including
    NCCL timeouts and lost peers, which a restart from the checkpoint fixes.
    Pod disruptions (preemption, node drain or loss: the DisruptionTarget condition) do not
    count against backoffLimit when `ignoreDisruptions` is on.
    """

    # A plain default (pydantic copies it per instance) so the CRD shows it too.
    fail_on_exit_codes: list[Annotated[int, Field(ge=1, le=255)]] = Field(
        [2, 126, 127], max_length=255, description="Container exit codes that fail the run at once."
    )
    ignore_disruptions: bool = Field(
        True, description="Pod disruptions (preemption, node loss) are retried without counting against backoffLimit."
    )

    @field_validator("fail_on_exit_codes")
    @classmethod
    def _codes(cls, v: list[int]) -> list[int]:
        return sorted(set(v))


class Init(Api):
    """Where a run's weights start from."""

    from_training_run: str = Field(
        ...,
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=DNS_LABEL_PATTERN,
        description="A TrainingRun in this namespace: this run waits until it "
        "Succeeded, then starts from its final checkpoint.",
    )


# What the operator mounts and names itself; a pod template may not reuse these.
RESERVED_VOLUMES = ("config", "data", "dshm", "source", "scratch", "sandbox-scratch", "vllm-scratch")
RESERVED_VOLUME_PREFIX = "model-"  # an EvalRun's compared runs' PVCs: model-1, model-2, ...
RESERVED_MOUNT_PATHS = ("/data", "/etc/nanochat", "/dev/shm", "/source", "/models", "/tmp")
# Labels and annotations under these prefixes are the operator's, the Job controller's, Kueue's
# and the gang schedulers' (pod-group membership: spec.gang).
RESERVED_KEY_PREFIXES = (
    "nanochat.io/",
    "batch.kubernetes.io/",
    "kueue.x-k8s.io/",
    "scheduling.x-k8s.io/",
    "scheduling.k8s.io/",
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# Kubernetes' own types, passed through as they are: the API server checks them when the Job
# is created (a mistake fails the run with its message, which names the field).
KubeObject = dict[str, Any]


class KubeVolume(BaseModel):
    """A core/v1 Volume: its name is checked here (and seen by CEL), the rest passed through."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN, description="Volume name.")


class KubeVolumeMount(BaseModel):
    """A core/v1 VolumeMount: name and mountPath checked here, the rest passed through."""

    model_config = ConfigDict(extra="allow", alias_generator=to_camel, validate_by_name=False, validate_by_alias=True)

    name: str = Field(..., min_length=1, max_length=63, description="The volume's name.")
    mount_path: str = Field(..., min_length=1, max_length=4096, description="Where it appears in the container.")


def _quoted(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _reserved_key_rule(field: str) -> dict[str, str]:
    prefixes = " || ".join(f"k.startsWith('{p}')" for p in RESERVED_KEY_PREFIXES)
    return cel(
        f"!has(self.{field}) || self.{field}.all(k, !({prefixes}))",
        f"{field}: keys under {', '.join(RESERVED_KEY_PREFIXES)} are the operator's",
    )


# Resources with fields of their own, which size the run (its world size, the feasibility check):
# in extraResources they would override those fields on the container behind the checks' back.
# Refused at admission (CEL) and before a Job is made (checks.pod_problems), not by the model: a
# run made before the rule (by an older operator) must still be followed to its end.
RESOURCES_OF_THEIR_OWN = {
    "cpu": "resources.cpu",
    "memory": "resources.memory",
    "nvidia.com/gpu": "resources.gpusPerNode",
}


class PodTemplate(Api):
    """What a platform sets on every pod of a run, on top of what the operator renders (as
    Kubeflow Trainer's pod template overrides): metadata, identity, placement, security and
    devices. The defaults already pass Pod Security "restricted"; `securityContext` and
    `containerSecurityContext` are merged over them key by key."""

    labels: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]] = Field(
        default_factory=dict, max_length=64, description="Extra pod labels (e.g. for a cost allocation or a mesh)."
    )
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=64, description="Extra pod annotations (e.g. a CNI's secondary networks)."
    )
    image_pull_secrets: list[Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_LABEL_PATTERN)]] = Field(
        default_factory=list, max_length=16, description="Secrets with registry credentials, by name."
    )
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the pods.")
    scheduler_name: str | None = Field(
        None, max_length=253, description="Scheduler of the pods (e.g. a gang scheduler's); default: the cluster's."
    )
    security_context: KubeObject = Field(
        default_factory=dict,
        description="core/v1 PodSecurityContext merged over the operator's (runAsNonRoot, runAsUser 1000, fsGroup "
        "1000, seccomp RuntimeDefault).",
    )
    container_security_context: KubeObject = Field(
        default_factory=dict,
        description="core/v1 SecurityContext of the main container, merged over the operator's (no privilege "
        "escalation, every capability dropped).",
    )
    affinity: KubeObject | None = Field(None, description="core/v1 Affinity of the pods.")
    topology_spread_constraints: list[KubeObject] = Field(
        default_factory=list, max_length=16, description="core/v1 TopologySpreadConstraints of the pods."
    )
    extra_resources: dict[str, Annotated[Quantity, Field(json_schema_extra=_QUANTITY_SCHEMA)]] = Field(
        default_factory=dict,
        max_length=16,
        description="More extended resources per pod, requested and limited alike, e.g. rdma/ib: 1, "
        "vpc.amazonaws.com/efa: 4, nvidia.com/mig-3g.40gb: 1.",
    )
    volumes: list[KubeVolume] = Field(default_factory=list, max_length=16, description="More core/v1 Volumes.")
    volume_mounts: list[KubeVolumeMount] = Field(
        default_factory=list, max_length=16, description="core/v1 VolumeMounts of the main container."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _reserved_key_rule("labels"),
                _reserved_key_rule("annotations"),
                cel(
                    f"!has(self.volumes) || self.volumes.all(v, !(v.name in {_quoted(RESERVED_VOLUMES)}) && "
                    f"!v.name.startsWith('{RESERVED_VOLUME_PREFIX}'))",
                    f"volumes: {', '.join(RESERVED_VOLUMES)} and {RESERVED_VOLUME_PREFIX}* are the operator's",
                ),
                cel(
                    "!has(self.extraResources) || "
                    f"!self.extraResources.exists(k, k in {_quoted(tuple(RESOURCES_OF_THEIR_OWN))})",
                    "extraResources: " + ", ".join(f"set {k} as {f}" for k, f in RESOURCES_OF_THEIR_OWN.items()),
                ),
                cel(
                    "!has(self.volumeMounts) || "
                    f"self.volumeMounts.all(m, !(m.mountPath in {_quoted(RESERVED_MOUNT_PATHS)}))",
                    f"volumeMounts: {', '.join(RESERVED_MOUNT_PATHS)} are the operator's",
                ),
            ]
        }
    )

    @field_validator("extra_resources")
    @classmethod
    def _quantities(cls, v: dict[str, Quantity]) -> dict[str, Quantity]:
        for key, value in v.items():
            _check_quantity(value, f"extraResources.{key}")
        return v

    @model_validator(mode="after")
    def _check(self) -> PodTemplate:
        for field in ("labels", "annotations"):
            taken = [k for k in getattr(self, field) if k.startswith(RESERVED_KEY_PREFIXES)]
            if taken:
                raise ValueError(f"{field}: {', '.join(taken)} are the operator's ({', '.join(RESERVED_KEY_PREFIXES)})")
        clash = [
            v.name for v in self.volumes if v.name in RESERVED_VOLUMES or v.name.startswith(RESERVED_VOLUME_PREFIX)
        ]
        if clash:
            raise ValueError(
                f"volumes: {', '.join(clash)}: {', '.join(RESERVED_VOLUMES)} and {RESERVED_VOLUME_PREFIX}* are the "
                "operator's"
            )
        taken_paths = [m.mount_path for m in self.volume_mounts if m.mount_path in RESERVED_MOUNT_PATHS]
        if taken_paths:
            raise ValueError(
                f"volumeMounts: {', '.join(taken_paths)}: {', '.join(RESERVED_MOUNT_PATHS)} are the operator's"
            )
        return self


# ---------------------------------------------------------------------------- TrainingRun


class RunCommon(Api):
    """Fields both kinds share: image, scheduling, env and retries."""

    image: str | None = Field(
        None, max_length=512, description="Trainer image; default: the operator's --trainer-image."
    )
    suspend: bool = Field(
        False,
        description="Create the Job suspended, or suspend it (pods stop; a training "
        "run resumes from its newest checkpoint when unsuspended).",
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="Kueue LocalQueue; the Job is created suspended and Kueue admits it.",
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="Extra environment variables.")
    backoff_limit: int = Field(
        3,
        ge=0,
        le=100,
        description="Failures retried before the run fails. On several nodes, one rank's failure ends every "
        "node's pod (each torchrun exits when a peer does), so the Job allows this many times nodes pod failures.",
    )
    pod_failure_policy: PodFailurePolicy = Field(
        default_factory=PodFailurePolicy, description="Failures that end the run at once."
    )
    service_account_name: str | None = Field(None, max_length=253, description="ServiceAccount of the pods.")
    pod: PodTemplate = Field(
        default_factory=PodTemplate, description="Labels, security, placement and devices of every pod of the run."
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="Wall-clock limit of the Job from its start: past it the pods are stopped and the run Fails "
        "(DeadlineExceeded). Time suspended or queued does not count.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Delete the Job and its pods this long after the run finished (the run, its status and its "
        "checkpoints stay). Set by the operator once it has recorded the outcome.",
    )

    @field_validator("env")
    @classmethod
    def _unique_env(cls, v: list[EnvVar]) -> list[EnvVar]:
        names = [e.name for e in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"env names repeat: {', '.join(dup)}")
        return v


class Gang(Api):
    """All of a multi-node run's pods placed at once or none, through a gang scheduler's PodGroup
    (Kubeflow Trainer's podGroupPolicy, the same two schedulers). Without it, a run that gets
    some of its nodes holds their GPUs while waiting for the rest; Kueue (`queueName`) admits a
    whole Job at once and needs none of this.

    - `coscheduling`: scheduler-plugins' PodGroup (scheduling.x-k8s.io/v1alpha1); pods carry the
      `scheduling.x-k8s.io/pod-group` label. Set `pod.schedulerName` if the plugin runs as a second
      scheduler.
    - `volcano`: Volcano's PodGroup (scheduling.volcano.sh/v1beta1); pods carry the
      `scheduling.k8s.io/group-name` annotation and schedulerName `volcano` unless `pod.schedulerName` says.
    """

    scheduler: Literal["coscheduling", "volcano"] = Field(..., description="Which gang scheduler's PodGroup to make.")
    schedule_timeout_seconds: int = Field(
        300, ge=1, le=86400, description="coscheduling: how long placed pods wait for the rest of the group."
    )
    queue: str | None = Field(
        None, max_length=63, pattern=DNS_LABEL_PATTERN, description="volcano: the Volcano queue (default: its default)."
    )


class TrainingRunSpec(RunCommon):
    """What to train (`trainer`, the trainer config verbatim) and on what."""

    trainer: TrainerConfig = Field(
        ...,
        description="The trainer config (nanochat_trainer.config.TrainerConfig), "
        "snake_case as the trainer reads it; `preset` fills what is not written.",
    )
    resources: Resources = Field(default_factory=Resources, description="Pods, GPUs, CPU, memory, placement.")
    storage: Storage | None = Field(
        None,
        description="PVC for checkpoints and data; without it the run "
        "writes to an emptyDir (lost with the pod; no resume, no dependents).",
    )
    init: Init | None = Field(None, description="Start from another run's final checkpoint.")
    gang: Gang | None = Field(None, description="Place all pods at once or none, with a gang scheduler's PodGroup.")
    after: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=DNS_LABEL_PATTERN)]] = Field(
        default_factory=list,
        max_length=16,
        description="TrainingRuns in this namespace that must Succeed before this one starts: the stage generate "
        "runs whose datasets trainer.data reads (/data/runs/<run>/dataset). They keep their run directories on "
        "the same PVC (storage.claimName).",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.init) || has(self.storage)",
                    "init.fromTrainingRun reads the source's checkpoint from a PVC: set storage",
                ),
                cel(
                    "!has(self.after) || size(self.after) == 0 || (has(self.storage) && has(self.storage.claimName))",
                    "after: the runs read each other's files from one PVC: set storage.claimName",
                ),
                cel(
                    "!has(self.trainer.device) || self.trainer.device != 'cuda' || self.resources.gpusPerNode > 0",
                    "trainer.device cuda needs resources.gpusPerNode > 0",
                ),
            ]
        }
    )

    @model_validator(mode="after")
    def _check(self) -> TrainingRunSpec:
        if self.init is not None and self.storage is None:
            raise ValueError("init.fromTrainingRun reads the source's checkpoint from a PVC: set storage")
        if self.after and (self.storage is None or self.storage.claim_name is None):
            raise ValueError("after: the runs read each other's files from one PVC: set storage.claimName")
        if self.trainer.device == "cuda" and self.resources.gpus_per_node == 0:
            raise ValueError("trainer.device cuda needs resources.gpusPerNode > 0")
        if (
            self.trainer.ternary is not None
            and self.trainer.ternary.distill_from_parent
            and self.init is None
            and not self.trainer.checkpoint.init_from
        ):
            raise ValueError("trainer.ternary.distill_from_parent needs a parent: set init.fromTrainingRun")
        return self


# ---------------------------------------------------------------------------- EvalRun


class SecretRef(Api):
    """A key of a Secret in the EvalRun's namespace."""

    name: str = Field(..., min_length=1, max_length=253, description="Secret name.")
    key: str = Field(..., min_length=1, max_length=253, description="Key holding the API key.")


class Endpoint(Api):
    """An OpenAI-compatible completions server (vLLM, `nanochat serve`, the teacher)."""

    url: str = Field(
        ..., min_length=1, max_length=2048, pattern=r"^https?://", description="Base URL, e.g. http://teacher:8000/v1."
    )
    model: str = Field(..., min_length=1, max_length=512, description="Model name the endpoint serves.")
    api_key_secret: SecretRef | None = Field(None, description="Secret key holding the API key.")


class EvalModel(Api):
    """What is evaluated: a TrainingRun's final (or best) checkpoint, or an endpoint."""

    training_run: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=DNS_LABEL_PATTERN,
        description="A TrainingRun in this namespace; the eval waits until it Succeeded.",
    )
    endpoint: Endpoint | None = Field(None, description="An OpenAI-compatible endpoint.")
    checkpoint: Literal["final", "best"] = Field(
        "final",
        description="With trainingRun: its final model, or best, the one with the best in-training pass@1 "
        "(a run with spec.trainer.evaluation).",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.trainingRun) != has(self.endpoint)", "set exactly one of trainingRun, endpoint"),
                cel(
                    "!has(self.endpoint) || !has(self.checkpoint) || self.checkpoint == 'final'",
                    "checkpoint: best is a TrainingRun's; an endpoint has none",
                ),
            ]
        }
    )

    @model_validator(mode="after")
    def _one(self) -> EvalModel:
        if (self.training_run is None) == (self.endpoint is None):
            raise ValueError("set exactly one of trainingRun, endpoint")
        if self.endpoint is not None and self.checkpoint != "final":
            raise ValueError("checkpoint: best is a TrainingRun's; an endpoint has none")
        return self


class CompareModel(EvalModel):
    """Another model scored beside `model`: same problems, samples, temperature and seed."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=32,
        pattern=DNS_LABEL_PATTERN,
        description="Its label in the comparison, e.g. parent or teacher.",
    )


# Greedy decoding gives every sample of a problem the same completion: pass@k of identical samples
# is pass@1 whatever k says.
GREEDY_SAMPLES = (
    "{n} with temperature 0: greedy completions are identical, so pass@k for k > 1 would be pass@1; "
    "set temperature (Codex's pass@k sampled at 0.2 to 0.8)"
)


class EvalRunSpec(RunCommon):
    """An evaluation: one pod running `nanochat eval`, scores written to the status."""

    model: EvalModel = Field(..., description="A TrainingRun's checkpoint or an endpoint.")
    benchmark: Literal["humaneval"] = Field("humaneval", description="Benchmark.")
    samples_per_problem: int = Field(1, ge=1, le=200, description="Completions per problem (n of pass@k).")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    k: list[int] = Field(
        [1], min_length=1, max_length=16, description="k values of pass@k; each at most samplesPerProblem."
    )
    max_problems: int | None = Field(None, ge=1, le=164, description="Only the first N problems (quick runs).")
    max_new_tokens: int = Field(
        512,
        ge=1,
        le=8192,
        description="Completion length. HumanEval's canonical solutions take up to 513 GPT-2 tokens (3 over 384, "
        "1 over 512): a shorter limit caps the score.",
    )
    resources: EvalResources = Field(default_factory=EvalResources, description="GPUs, CPU, memory, placement.")
    backoff_limit: int = Field(1, ge=0, le=100, description="Pod failures retried before the eval fails.")
    runtime_class_name: str | None = Field(
        None,
        max_length=253,
        pattern=DNS_LABEL_PATTERN,
        description="RuntimeClass of the eval pod, e.g. gvisor or kata: a sandboxed kernel around the completions "
        "as well; default: the operator's --eval-runtime-class.",
    )
    compare: list[CompareModel] = Field(
        default_factory=list,
        max_length=4,
        description="Other models scored on the same problems and printed side by side, e.g. a ternary student "
        "(model) against its full-precision parent and the teacher; the eval waits for each TrainingRun.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.k.all(x, x >= 1 && x <= self.samplesPerProblem)",
                    "each k must be between 1 and samplesPerProblem",
                ),
                cel(
                    "self.samplesPerProblem == 1 || self.temperature > 0.0",
                    GREEDY_SAMPLES.format(n="samplesPerProblem > 1"),
                ),
            ]
        }
    )

    @model_validator(mode="after")
    def _check(self) -> EvalRunSpec:
        bad = [x for x in self.k if x < 1 or x > self.samples_per_problem]
        if bad:
            raise ValueError(f"k={bad} must each be between 1 and samplesPerProblem={self.samples_per_problem}")
        if self.samples_per_problem > 1 and self.temperature == 0:
            raise ValueError(GREEDY_SAMPLES.format(n=f"samplesPerProblem={self.samples_per_problem}"))
        names = [c.name for c in self.compare]
        if len(set(names)) != len(names):
            raise ValueError(f"compare: names must be unique, got {names}")
        return self


# ---------------------------------------------------------------------------- status


def _listed(values: tuple[str, ...]) -> str:
    """'A, B or C.': a schema description naming every allowed value."""
    return f"{', '.join(values[:-1])} or {values[-1]}."


ConditionStatus = Literal["True", "False", "Unknown"]


class StatusModel(Api):
    """Status models: the operator builds them in Python, so they also take field names;
    assignments are validated, so the code cannot write what the schema refuses."""

    model_config = ConfigDict(validate_by_name=True, validate_assignment=True)


class Condition(StatusModel):
    """A condition, as in every Kubernetes API."""

    # A plain string, not the enum: a status written by another operator version still loads.
    type: str = Field(..., description=_listed(tuple(ConditionType)))
    status: ConditionStatus = Field(..., description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="What happened, for people.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")


class RunStatusCommon(StatusModel):
    phase: Phase | None = Field(None, description=_listed(PHASES))
    conditions: list[Condition] = Field(default_factory=list, description="Conditions with reasons.")
    observed_generation: int | None = Field(None, description="metadata.generation this status reflects.")
    job_name: str | None = Field(None, description="The Job running the pods.")
    restarts: int | None = Field(None, description="Pods that failed and were replaced.")
    start_time: str | None = Field(None, description="When the pods first all ran.")
    completion_time: str | None = Field(None, description="When the run Succeeded or Failed.")
    kopf: dict[str, Any] | None = Field(None, description="The operator framework's own bookkeeping.")


class GenerationStatus(StatusModel):
    """stage generate: what the teacher's answers came to (status.step counts the documents kept)."""

    rejected: dict[str, int] = Field(
        default_factory=dict, description='Answers rejected, by reason, e.g. {"tests_failed": 12, "near_duplicate": 3}.'
    )
    in_flight: int | None = Field(None, description="Requests to the teacher under way.")
    requests_per_second: float | None = Field(None, description="Teacher answers per second, lately.")


class TrainingRunStatus(RunStatusCommon):
    step: int | None = Field(None, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps the run takes.")
    loss: float | None = Field(None, description="Training loss of the last step.")
    val_loss: float | None = Field(
        None, description="Loss on held-out documents at the last validation (spec.trainer.validation)."
    )
    pass_at_1: float | None = Field(
        None, alias="passAt1", description="Greedy HumanEval pass@1 at the last evaluation (spec.trainer.evaluation)."
    )
    best_pass_at_1: float | None = Field(
        None, alias="bestPassAt1", description="The best pass@1 so far: the run's best checkpoint (<run>/best)."
    )
    best_pass_at_1_step: int | None = Field(None, alias="bestPassAt1Step", description="The step of bestPassAt1.")
    tokens_per_second: float | None = Field(None, description="Throughput over all ranks.")
    eta: str | None = Field(None, description="Time left at the current pace, e.g. 2h13m.")
    last_progress_time: str | None = Field(None, description="When step last increased.")
    latest_checkpoint: str | None = Field(None, description="Path of the newest complete checkpoint.")
    latest_checkpoint_step: int | None = Field(None, description="Its step.")
    final_checkpoint: str | None = Field(None, description="The finished model (set when Succeeded).")
    storage_claim: str | None = Field(None, description="The PVC holding the run directory.")
    run_dir: str | None = Field(None, description="The run directory inside the PVC's mount.")
    generation: GenerationStatus | None = Field(None, description="stage generate: rejections and the teacher's pace.")


class EvalServing(StatusModel):
    """How the eval pod serves a model that does not fit one GPU: vLLM, beside `nanochat eval`."""

    server: Literal["vllm"] = Field("vllm", description="The server: vllm.")
    tensor_parallel_size: int = Field(..., ge=1, description="GPUs the model is split over (resources.gpus).")
    model_dir: str = Field(..., description="The Hugging Face export it serves (`nanochat export --hf`), on the PVC.")
    url: str = Field(..., description="Where nanochat eval scores it, inside the pod.")
    reason: str = Field("", description="Why it is served: what the model needs against one GPU.")


class EvalRunStatus(RunStatusCommon):
    scores: dict[str, float] = Field(default_factory=dict, description='pass@k by k, e.g. {"pass@1": 0.12}.')
    pass_at_1: float | None = Field(None, alias="passAt1", description="pass@1 (for kubectl get).")
    problems: int | None = Field(None, description="Problems evaluated.")
    samples_per_problem: int | None = Field(None, description="Completions per problem.")
    checkpoint: str | None = Field(None, description="Checkpoint evaluated.")
    results_path: str | None = Field(None, description="Full results JSON on the PVC.")
    comparison: dict[str, dict[str, float]] = Field(
        default_factory=dict, description='pass@k of each spec.compare model by name, e.g. {"parent": {"pass@1": 0.2}}.'
    )
    serving: EvalServing | None = Field(
        None,
        description="Set when spec.model does not fit one GPU: vLLM serves its Hugging Face export over "
        "resources.gpus GPUs with tensor parallelism in the eval pod, and nanochat eval scores it there.",
    )
    sandbox_isolation: str | None = Field(
        None,
        description="How the completions were isolated: container/<level> (the eval pod's sandbox container, "
        "which isolates each program by <level>), namespaces (bubblewrap), or a weaker level the runtime "
        "forced (network-namespace, process).",
    )


# ---------------------------------------------------------------------------- whole objects


class ObjectMeta(BaseModel):
    """The part of metadata this project reads; the rest is passed through."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(..., min_length=1, max_length=MAX_NAME_LENGTH, pattern=DNS_LABEL_PATTERN)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class TrainingRun(BaseModel):
    """A whole TrainingRun object (what a manifest holds)."""

    model_config = ConfigDict(extra="forbid")

    api_version: Literal[API_VERSION] = Field(alias="apiVersion")
    kind: Literal[TRAINING_KIND]
    metadata: ObjectMeta
    spec: TrainingRunSpec
    status: dict[str, Any] | None = None


class EvalRun(BaseModel):
    """A whole EvalRun object."""

    model_config = ConfigDict(extra="forbid")

    api_version: Literal[API_VERSION] = Field(alias="apiVersion")
    kind: Literal[EVAL_KIND]
    metadata: ObjectMeta
    spec: EvalRunSpec
    status: dict[str, Any] | None = None


KINDS: dict[str, type[BaseModel]] = {TRAINING_KIND: TrainingRun, EVAL_KIND: EvalRun}
