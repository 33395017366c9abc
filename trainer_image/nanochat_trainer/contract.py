"""The names the trainer, the operator and the `nanochat` command share: each defined once, here.

Torch-free (the operator image has no torch). Everything that crosses a process boundary
between the packages is spelt here:

* the API: group, version, kinds, phases and condition types of TrainingRun / EvalRun;
* labels and annotations the operator puts on what it creates, and the Kubernetes ones it reads;
* the run directory (`checkpoint.dir`): where checkpoints, the finished model, logs and eval
  results live (`RunLayout`);
* the trainer's Prometheus gauges, which the operator scrapes into a run's status;
* the eval result: the compact JSON an eval writes to its termination message and prints after
  `NANOCHAT_RESULT `, which the operator parses into the EvalRun's status;
* environment variables one side sets and the other reads.

    layout = RunLayout(Path("runs/demo"));  layout.final, layout.step(100), layout.log
    line = encode_result({"1": 0.12}, problems=164, samples=1)
    parse_result("NANOCHAT_RESULT " + line).scores  # {"pass@1": 0.12}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePath
from typing import Any, Generic, TypeVar

# ---------------------------------------------------------------------------- the API

GROUP = "nanochat.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
TRAINING_KIND, TRAINING_PLURAL = "TrainingRun", "trainingruns"
EVAL_KIND, EVAL_PLURAL = "EvalRun", "evalruns"


class Phase(StrEnum):
    """A run's phase (status.phase)."""

    PENDING = "Pending"  # accepted, waiting for a dependency, a queue or spec.suspend
    STARTING = "Starting"  # the Job exists, not every pod runs yet
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


PHASES = tuple(Phase)
TERMINAL_PHASES = (Phase.SUCCEEDED, Phase.FAILED)


class ConditionType(StrEnum):
    """Every condition type a run's status carries."""

    ACCEPTED = "Accepted"  # the spec is valid and fits its resources
    DEPENDENCIES_READY = "DependenciesReady"  # the runs it reads have Succeeded
    SUSPENDED = "Suspended"
    RUNNING = "Running"
    COMPLETE = "Complete"
    FAILED = "Failed"
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"  # a spec edit the live run does not apply
    TEACHER_AVAILABLE = "TeacherAvailable"  # distillation: the teacher answers
    RESULTS_RECORDED = "ResultsRecorded"  # EvalRun: scores were read from the eval pod
    # The summary that generic tools read (kstatus, so Flux; Argo CD's health check; kubectl wait):
    READY = "Ready"  # True once the run Succeeded
    RECONCILING = "Reconciling"  # True while the run is on its way (Pending, Starting, Running)
    STALLED = "Stalled"  # True when it cannot get there: Failed, pods refused, a spec edit not applied


# ---------------------------------------------------------------------------- labels, annotations

RUN_LABEL = f"{GROUP}/training-run"
EVAL_LABEL = f"{GROUP}/eval-run"
SPEC_ANNOTATION = f"{GROUP}/applied-spec"  # the spec a Job was made from (drift detection)
SPEC_HASH_ANNOTATION = f"{GROUP}/spec-hash"
# Set by the Job controller on the pods of an Indexed Job; torchrun's node rank comes from it.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def storage_claim_name(run_name: str) -> str:
    """The PVC the operator makes for a TrainingRun's `storage.size`."""
    return f"{run_name}-storage"


# ---------------------------------------------------------------------------- the run directory

# A model directory (a step checkpoint, or final/) holds these: the weights in one safetensors file
# (final/, best/, and step checkpoints of earlier versions), or sharded (step checkpoints): a
# torch.distributed.checkpoint directory, its index in SHARDED_INDEX beside each rank's files.
MODEL_WEIGHTS = "model.safetensors"
SHARDED_INDEX = ".metadata"
MODEL_CONFIG = "config.yaml"  # the TrainerConfig that made the weights
TOKENIZER_FILE = "tokenizer.json"
TRAIN_STATE = "train_state.pt"  # step checkpoints only: step, data position, RNG (and optimizers when whole)
HF_CONFIG = "config.json"  # a Hugging Face model directory has this instead of MODEL_CONFIG

_STEP_DIR = re.compile(r"^step_(\d{8})$")
P = TypeVar("P", bound=PurePath)


@dataclass(frozen=True)
class RunLayout(Generic[P]):
    """The files of one run directory (the trainer's `checkpoint.dir`).

        <run>/tokenizer.json
        <run>/checkpoints/step_00000100/   the sharded weights and optimizers (.metadata, __<rank>_0.distcp),
                                           config.yaml, tokenizer.json, train_state.pt
        <run>/final/                       model.safetensors (DDP) or the sharded files (FSDP2, EP), config.yaml,
                                           tokenizer.json
        <run>/best/, best.json             the best in-training pass@1 so far: its weights, step and score
        <run>/model.ternary.safetensors    a ternary run's packed export
        <run>/hf/, hf-best/                `nanochat export --hf` of final/, best/: Hugging Face directories (vLLM)
        <run>/log.jsonl                    one JSON record per logged step
        <run>/expert_load.jsonl            MoE: routed tokens per expert, per checkpoint
        <run>/teacher-cache/               distillation: the teacher's answers
        <run>/eval/<evalrun>.json          an EvalRun's full results
        <run>/dataset/                     stage generate: manifest.json and shard-NNNNN.parquet

    `root` keeps its path type: a `Path` on the machine that trains, a `PurePosixPath` for
    paths inside a pod that the operator writes into manifests.
    """

    root: P

    @property
    def final(self) -> P:
        return self.root / "final"

    @property
    def best(self) -> P:
        """The weights with the best in-training HumanEval pass@1 so far (evaluation)."""
        return self.root / "best"

    @property
    def best_record(self) -> P:
        """best/'s step and pass@1, as JSON."""
        return self.root / "best.json"

    def hf(self, checkpoint: str = "final") -> P:
        """The Hugging Face export (`nanochat export SRC --hf`, for vLLM or transformers) of the run's
        final model, or of best/: one directory each, so evaluations of both never share one."""
        return self.root / ("hf" if checkpoint == "final" else f"hf-{checkpoint}")

    @property
    def dataset(self) -> P:
        """stage generate's output: Parquet shards and their manifest (data/shards.py)."""
        return self.root / "dataset"

    @property
    def checkpoints(self) -> P:
        return self.root / "checkpoints"

    def step(self, step: int) -> P:
        return self.checkpoints / f"step_{step:08d}"

    @staticmethod
    def step_of(path: PurePath) -> int | None:
        """The step of a step-checkpoint directory name; None for anything else."""
        m = _STEP_DIR.match(path.name)
        return int(m.group(1)) if m else None

    @property
    def tokenizer(self) -> P:
        return self.root / TOKENIZER_FILE

    @property
    def log(self) -> P:
        return self.root / "log.jsonl"

    @property
    def expert_load(self) -> P:
        return self.root / "expert_load.jsonl"

    @property
    def teacher_cache(self) -> P:
        return self.root / "teacher-cache"

    @property
    def packed_ternary(self) -> P:
        return self.root / "model.ternary.safetensors"

    def evaluated(self, checkpoint: str = "final", packed: bool = False) -> P:
        """What an EvalRun of this run loads: best/, or final/, or for a ternary run's final model
        (`packed`) its packed export."""
        if checkpoint == "best":
            return self.best
        return self.packed_ternary if packed else self.final

    def eval_results(self, eval_name: str) -> P:
        return self.root / "eval" / f"{eval_name}.json"


def run_layout(runs_root: P, run_name: str) -> RunLayout[P]:
    """Run `run_name`'s directory, `<runs_root>/<run_name>`: in a cluster the runs root is `runs/`
    on the run's PVC (/data/runs in its pods); `nanochat run` uses its --runs-dir."""
    return RunLayout(runs_root / run_name)


def is_hf_model_dir(path: str | PurePath) -> bool:
    """A Hugging Face model directory (config.json and no nanochat config.yaml)."""
    p = Path(path)
    return (p / HF_CONFIG).is_file() and not (p / MODEL_CONFIG).is_file()


# ---------------------------------------------------------------------------- trainer metrics

TRAINER_METRIC_PREFIX = "nanochat_trainer_"


class TrainerGauge(StrEnum):
    """Rank 0's gauges on /metrics, each served as `nanochat_trainer_<name>`; the operator reads
    some of them into a TrainingRun's status."""

    STEP = "step"
    TOTAL_STEPS = "total_steps"
    LOSS = "loss"
    TOKENS_PER_SECOND = "tokens_per_second"
    LEARNING_RATE = "learning_rate"
    GRAD_NORM = "grad_norm"
    MFU = "mfu"
    CHECKPOINT_STEP = "checkpoint_step"
    MOE_LOAD_IMBALANCE = "moe_load_imbalance"
    MOE_DEAD_EXPERTS = "moe_dead_experts"
    TEACHER_UP = "teacher_up"
    TEACHER_REQUESTS = "teacher_requests"
    TEACHER_CACHE_HITS = "teacher_cache_hits"
    TEACHER_ERRORS = "teacher_errors"
    TEACHER_LATENCY_SECONDS = "teacher_latency_seconds"
    TEACHER_SKIPPED = "teacher_skipped"
    VAL_LOSS = "val_loss"
    PASS_AT_1 = "pass_at_1"
    BEST_PASS_AT_1 = "best_pass_at_1"
    BEST_STEP = "best_step"
    EVALUATION_ERRORS = "evaluation_errors"
    GENERATE_REJECTED = "generate_rejected"
    TEACHER_IN_FLIGHT = "teacher_in_flight"
    TEACHER_REQUESTS_PER_SECOND = "teacher_requests_per_second"

    @property
    def metric(self) -> str:
        """The Prometheus name."""
        return TRAINER_METRIC_PREFIX + self.value

    @property
    def help(self) -> str:
        return _GAUGE_HELP[self]


_GAUGE_HELP = {
    TrainerGauge.STEP: "Optimizer steps done.",
    TrainerGauge.TOTAL_STEPS: "Optimizer steps the run will take.",
    TrainerGauge.LOSS: "Training loss of the last step (mean over ranks).",
    TrainerGauge.TOKENS_PER_SECOND: "Training throughput over all ranks.",
    TrainerGauge.LEARNING_RATE: "Learning rate of the hidden matrices.",
    TrainerGauge.GRAD_NORM: "Global gradient norm before clipping.",
    TrainerGauge.MFU: "Model FLOPs utilisation (0-1) where the device's peak is known.",
    TrainerGauge.CHECKPOINT_STEP: "Step of the newest complete checkpoint.",
    TrainerGauge.MOE_LOAD_IMBALANCE: "Max over MoE layers of the step's max/mean routed tokens per expert "
    "(1 is balanced).",
    TrainerGauge.MOE_DEAD_EXPERTS: "Experts (over all MoE layers) that got no token in the step.",
    TrainerGauge.TEACHER_UP: "1 while the distillation teacher answers, 0 while it is down (the run trains "
    "without it).",
    TrainerGauge.TEACHER_REQUESTS: "Requests sent to the teacher.",
    TrainerGauge.TEACHER_CACHE_HITS: "Teacher answers served from the on-disk cache.",
    TrainerGauge.TEACHER_ERRORS: "Teacher requests that failed after their retries.",
    TrainerGauge.TEACHER_LATENCY_SECONDS: "Mean latency of the teacher's answers.",
    TrainerGauge.TEACHER_SKIPPED: "Rows (sequence) or micro-batches (logprob methods) trained without the teacher.",
    TrainerGauge.VAL_LOSS: "Loss on the held-out documents at the last validation (validation.every).",
    TrainerGauge.PASS_AT_1: "Greedy HumanEval pass@1 at the last in-training evaluation (evaluation.every).",
    TrainerGauge.BEST_PASS_AT_1: "The best in-training pass@1 so far: the checkpoint kept in <run>/best.",
    TrainerGauge.BEST_STEP: "The step of <run>/best.",
    TrainerGauge.EVALUATION_ERRORS: "In-training evaluations that failed (sandbox or generation); the run went on.",
    TrainerGauge.GENERATE_REJECTED: "stage generate: teacher answers rejected, all reasons (by reason: "
    "nanochat_trainer_generate_rejected_by_reason).",
    TrainerGauge.TEACHER_IN_FLIGHT: "Requests to the teacher under way now.",
    TrainerGauge.TEACHER_REQUESTS_PER_SECOND: "Teacher answers per second over the last half minute.",
}

# stage generate's rejections by reason (datagen/answers.py's REJECT_REASONS), label `reason`.
GENERATE_REJECTED_BY_REASON = TRAINER_METRIC_PREFIX + "generate_rejected_by_reason"


# ---------------------------------------------------------------------------- the eval result

RESULT_PREFIX = "NANOCHAT_RESULT "
# The file an eval writes its compact result to; the operator points it at the container's
# terminationMessagePath, whose content Kubernetes copies into the pod status.
TERMINATION_LOG_ENV = "NANOCHAT_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096  # Kubernetes' limit on a termination message


@dataclass(frozen=True)
class EvalResult:
    """What an eval reports to the operator: pass@k by k, and the compared models' scores."""

    scores: dict[str, float] = field(default_factory=dict)  # {"pass@1": 0.13, ...}
    problems: int | None = None
    samples: int | None = None
    compare: dict[str, dict[str, float]] = field(default_factory=dict)  # {"parent": {"pass@1": 0.2}}
    isolation: str | None = None  # the sandbox's level (eval/isolation.py): "namespaces", or weaker


def encode_result(
    pass_at_k: Mapping[str, float],
    problems: int,
    samples: int,
    compare: Mapping[str, Mapping[str, float]] | None = None,
    isolation: str | None = None,
) -> str:
    """The compact JSON line: {"pass_at_k": {"1": 0.13}, "problems": 164, "samples": 1[, "compare": ...]
    [, "isolation": "namespaces"]}."""
    out: dict[str, Any] = {"pass_at_k": dict(pass_at_k), "problems": problems, "samples": samples}
    if isolation:
        out["isolation"] = isolation
    if compare:
        out["compare"] = {name: dict(scores) for name, scores in compare.items()}
    return json.dumps(out, sort_keys=True)


def parse_result(message: str | None) -> EvalResult | None:
    """The result in a termination message: the JSON alone, or the last `NANOCHAT_RESULT` line of a
    log tail (terminationMessagePolicy FallbackToLogsOnError). None when there is none."""
    if not message:
        return None
    candidates = [message.strip()]
    candidates += [
        line[len(RESULT_PREFIX) :] for line in reversed(message.splitlines()) if line.startswith(RESULT_PREFIX)
    ]
    for text in candidates:
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("pass_at_k"), dict):
            problems, samples, isolation = data.get("problems"), data.get("samples"), data.get("isolation")
            compare = data.get("compare") if isinstance(data.get("compare"), dict) else {}
            return EvalResult(
                scores=_scores(data["pass_at_k"]),
                problems=problems if isinstance(problems, int) else None,
                samples=samples if isinstance(samples, int) else None,
                compare={str(n): _scores(v) for n, v in compare.items() if isinstance(v, dict)},
                isolation=isolation if isinstance(isolation, str) else None,
            )
    return None


def score_key(k: int) -> str:
    """The key of pass@k in a status's scores: "pass@1"."""
    return f"pass@{k}"


def score_k(key: str) -> int:
    """The k of a scores key: "pass@10" -> 10."""
    return int(key.removeprefix("pass@"))


def _scores(pass_at_k: Mapping[str, Any]) -> dict[str, float]:
    scores = {}
    for k, v in pass_at_k.items():
        try:
            scores[score_key(int(k))] = float(v)
        except (TypeError, ValueError):
            continue
    return dict(sorted(scores.items(), key=lambda kv: score_k(kv[0])))


def endpoint_source(url: str, model: str) -> str:
    """A served model as `nanochat eval --compare NAME=SOURCE` takes it: URL#MODEL."""
    return f"{url}#{model}"


def split_endpoint_source(source: str) -> tuple[str, str] | None:
    """(url, model) of a URL#MODEL source; None when `source` is not an http(s) URL (a checkpoint
    path). Raises ValueError for a URL without its model."""
    if not source.startswith(("http://", "https://")):
        return None
    url, sep, model = source.partition("#")
    if not sep or not model:
        raise ValueError("an endpoint needs its model, as URL#MODEL")
    return url, model


# ---------------------------------------------------------------------------- environment variables

# The API key of the endpoint an EvalRun scores (from spec.model.endpoint.apiKeySecret).
EVAL_API_KEY_ENV = "NANOCHAT_EVAL_API_KEY"
_COMPARE_KEY_PREFIX = "NANOCHAT_COMPARE_API_KEY_"
# Any value: a configuration error raises with its traceback instead of one line.
DEBUG_ENV = "NANOCHAT_DEBUG"
# The eval pod's sandbox container: the address its server listens on (`@name`, an abstract Unix
# socket), set by the operator on both of the pod's containers.
SANDBOX_SOCKET_ENV = "NANOCHAT_SANDBOX_SOCKET"


def compare_key_env(name: str) -> str:
    """Where `nanochat eval` reads the API key of the compared endpoint `name` (spec.compare)."""
    return _COMPARE_KEY_PREFIX + name.upper().replace("-", "_")
