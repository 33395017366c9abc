"""Reading TrainingRun/EvalRun manifests without a cluster (`nanochat run --dry-run`).

    runs = load_manifests("examples/phase1-quick-demo.yaml")   # validated TrainingRun/EvalRun models
    print(dry_run("examples/phase1-quick-demo.yaml"))          # what the operator would do

Every document of a multi-document YAML file is validated with the same pydantic models
the CRDs come from. A bad document raises ManifestError (a ValueError) whose message is
one line naming the file, the document and the field:

    m.yaml: document 1 (TrainingRun demo): spec.trainer.model.dim=4: Input should be greater than or equal to 8
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nanochat_trainer.config import DataConfig, format_validation_error
from nanochat_trainer.contract import API_VERSION

from . import api, render
from .api import EvalRun, TrainingRun
from .checks import SERVE_GPU_MEMORY_UTILIZATION, EvalFit, estimate_params, eval_fit, feasibility
from .deps import no_best_checkpoint

ApiObject = TrainingRun | EvalRun


class ManifestError(ValueError):
    """A manifest the API server or the operator would refuse; the message is one line."""


def parse_documents(text: str, source: str = "<manifest>") -> list[ApiObject]:
    """Validate every non-empty YAML document in `text`."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise ManifestError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from err
    return validate_documents(docs, source)


def validate_documents(docs: list[Any], source: str = "<manifest>") -> list[ApiObject]:
    """Validate documents already read from YAML (`nanochat run` lays its --set overrides over
    them first)."""
    if not docs:
        raise ManifestError(f"{source}: no documents")
    out = [_validate_document(doc, i, source) for i, doc in enumerate(docs, 1)]
    names = [(o.kind, o.metadata.name) for o in out]
    dup = sorted({f"{k} {n}" for k, n in names if names.count((k, n)) > 1})
    if dup:
        raise ManifestError(f"{source}: {', '.join(dup)} appears more than once")
    return out


def _validate_document(doc: Any, index: int, source: str) -> ApiObject:
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: document {index} is not a mapping")
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc.get("metadata"), dict) else "?"
    where = f"{source}: document {index} ({kind} {name})"
    model = api.KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ManifestError(f"{where}: kind must be one of {', '.join(api.KINDS)}")
    if doc.get("apiVersion") != API_VERSION:
        raise ManifestError(f"{where}: apiVersion={doc.get('apiVersion')!r}: expected {API_VERSION}")
    try:
        return model.model_validate(doc)  # type: ignore[return-value]
    except ValidationError as err:
        raise ManifestError(f"{where}: {format_validation_error(err)}") from err


def load_manifests(path: str) -> list[ApiObject]:
    """Validated TrainingRun/EvalRun objects from a (multi-document) YAML file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ManifestError(f"{path}: {err.strerror or err}") from err
    return parse_documents(text, path)


def _describe_training(run: TrainingRun, in_file: set[str]) -> list[str]:
    s, t = run.spec, run.spec.trainer
    if t.generate is not None:
        g = t.generate
        return [
            f"TrainingRun {run.metadata.name}: stage generate, {g.rows:,} documents from {g.teacher.model} "
            f"at {g.teacher.url} ({g.teacher.concurrency} requests in flight, template {g.template})",
            f"  writes {render.dataset_path(run.metadata.name)}; Job {render.job_name(run.metadata.name)}",
        ]
    params = estimate_params(t.model)
    world = s.resources.nodes * render.procs_per_node(s)
    tokens_per_step = t.batch_size * t.grad_accum * t.resolved_seq_len * world
    lines = [
        f"TrainingRun {run.metadata.name}: preset {t.preset or '-'}, stage {t.stage}, ~{params / 1e6:,.1f}M parameters"
        + (f" ({t.model.moe.n_experts} experts, top-{t.model.moe.top_k})" if t.model.moe else ""),
        f"  steps {t.steps:,} x {tokens_per_step:,} tokens/step = {t.steps * tokens_per_step / 1e9:.2f}B tokens; "
        f"data {t.data.source}" + _data_detail(t.data),
        f"  {s.resources.nodes} node(s) x {s.resources.gpus_per_node} GPU(s): torchrun {world} process(es); "
        f"Job {render.job_name(run.metadata.name)}",
        "  storage: "
        + (
            f"PVC {s.storage.pvc_name(run.metadata.name)}, run dir {render.run_dir(run.metadata.name)}"
            if s.storage
            else "none (emptyDir: no resume)"
        ),
    ]
    if t.stage == "distill" and t.distill:
        lines.append(f"  distill from {t.distill.teacher.model} at {t.distill.teacher.url} ({t.distill.method})")
    if s.after:
        missing = [a for a in s.after if a not in in_file]
        lines.append(
            f"  starts once TrainingRun(s) {', '.join(s.after)} Succeeded"
            + (f" ({', '.join(missing)} not in this file)" if missing else "")
        )
    if s.init:
        src = s.init.from_training_run
        lines.append(
            f"  starts from TrainingRun {src}'s {render.final_checkpoint_path(src)} once it Succeeded"
            + ("" if src in in_file else " (not in this file)")
        )
    if s.suspend or s.queue_name:
        lines.append("  created suspended" + (f"; Kueue queue {s.queue_name}" if s.queue_name else ""))
    return lines


def _data_detail(data: DataConfig) -> str:
    if data.source == "huggingface":
        return f" ({data.dataset})"
    if data.source == "mixture":
        total = sum(m.weight for m in data.mixture)
        return " (" + ", ".join(f"{m.name} {m.weight / total:.0%}" for m in data.mixture) + " of documents)"
    return ""


def eval_fit_in_file(run: EvalRun, trainings: Mapping[str, TrainingRun], gpu_memory_gib: float = 80.0) -> EvalFit:
    """checks.eval_fit of an EvalRun, with the models of the TrainingRuns it loads that are in
    `trainings` (by name); one that is not there cannot be checked, and is not."""
    s = run.spec
    main = trainings.get(s.model.training_run or "")
    compare = {c.name: trainings[c.training_run].spec.trainer for c in s.compare if c.training_run in trainings}
    return eval_fit(s, main.spec.trainer if main else None, compare, gpu_memory_gib)


def missing_best(run: EvalRun, trainings: Mapping[str, TrainingRun]) -> str | None:
    """Why the EvalRun would fail for a `checkpoint: best` that a TrainingRun in `trainings` will
    never have (it runs without evaluation), as deps.py fails it once that run exists; None if none."""
    for m in (run.spec.model, *run.spec.compare):
        source = trainings.get(m.training_run or "")
        if m.checkpoint == "best" and source is not None and source.spec.trainer.evaluation is None:
            return no_best_checkpoint(source.metadata.name)
    return None


def vllm_serving(fit: EvalFit, image: str) -> render.VllmServing | None:
    """How the operator's eval pod serves the model, when it does (a model too large for one GPU)."""
    if fit.tensor_parallel is None or fit.max_model_len is None:
        return None
    return render.VllmServing(image, fit.tensor_parallel, fit.max_model_len, SERVE_GPU_MEMORY_UTILIZATION)


def _describe_eval(run: EvalRun, in_file: set[str], fit: EvalFit) -> list[str]:
    s = run.spec
    src = s.model.training_run or ""
    if s.model.endpoint:
        what = f"endpoint {s.model.endpoint.url} model {s.model.endpoint.model}"
    else:
        what = f"TrainingRun {src}'s {render.model_path(s.model, packed=src in fit.packed)} once it Succeeded" + (
            "" if src in in_file else " (not in this file)"
        )
    problems = f"first {s.max_problems}" if s.max_problems else "all 164"
    lines = [
        f"EvalRun {run.metadata.name}: {s.benchmark} on {what}",
        f"  {problems} problems x {s.samples_per_problem} sample(s), temperature {s.temperature}, "
        f"pass@{{{','.join(map(str, s.k))}}}; Job {render.eval_job_name(run.metadata.name)}",
    ]
    if fit.tensor_parallel:
        lines.append(
            f"  does not fit one GPU: exported to {render.hf_export_path(src, s.model.checkpoint)}, served by vLLM "
            f"with tensor parallelism {fit.tensor_parallel} in the eval pod, scored at {render.VLLM_URL}"
        )
    return lines


def dry_run(path: str, gpu_memory_gib: float = 80.0) -> str:
    """Validate a manifest file as the API server and the operator would, and describe the
    plan. Raises ManifestError (one line) on the first problem, including a run that the
    operator would fail at once (e.g. a model too large for the GPUs asked for)."""
    objs = load_manifests(path)
    trainings = {o.metadata.name: o for o in objs if isinstance(o, TrainingRun)}
    in_file = set(trainings)
    lines: list[str] = []
    for obj in objs:
        if isinstance(obj, TrainingRun):
            problems = feasibility(obj.spec, gpu_memory_gib)
            if problems:
                raise ManifestError(f"{path}: TrainingRun {obj.metadata.name}: {'; '.join(problems)}")
            if obj.spec.init and obj.spec.init.from_training_run == obj.metadata.name:
                raise ManifestError(
                    f"{path}: TrainingRun {obj.metadata.name}: spec.init.fromTrainingRun cannot name the run itself"
                )
            # Render too: what the operator would create must be buildable from this spec.
            render.render_training(
                obj.metadata.name,
                obj.metadata.namespace or "default",
                obj.spec,
                image=obj.spec.image or "trainer-image",
            )
            lines += _describe_training(obj, in_file)
        else:
            missing = missing_best(obj, trainings)
            if missing:
                raise ManifestError(f"{path}: EvalRun {obj.metadata.name}: {missing}")
            fit = eval_fit_in_file(obj, trainings, gpu_memory_gib)
            if fit.problems:
                raise ManifestError(f"{path}: EvalRun {obj.metadata.name}: {'; '.join(fit.problems)}")
            s = obj.spec
            runs = {c.name: (c.training_run, "claim") for c in s.compare if c.training_run}
            render.render_eval_job(
                obj.metadata.name,
                obj.metadata.namespace or "default",
                s,
                image=s.image or "trainer-image",
                source=(s.model.training_run, "claim") if s.model.training_run else None,
                compare_runs=runs,
                vllm=vllm_serving(fit, "vllm-image"),
                packed=fit.packed,
            )
            lines += _describe_eval(obj, in_file, fit)
    kinds: dict[str, int] = {}
    for obj in objs:
        kinds[obj.kind] = kinds.get(obj.kind, 0) + 1
    head = f"{path}: valid: " + ", ".join(f"{n} {k}" for k, n in kinds.items())
    return "\n".join([head] + lines)
