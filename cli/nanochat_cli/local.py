"""`nanochat run MANIFEST`: run TrainingRun and EvalRun manifests on this machine, no cluster.

    nanochat run examples/phase1-quick-demo.yaml --set trainer.preset=tiny --set trainer.steps=40

The manifest is read as the operator reads it: the same API models validate every document
(`nanochat_operator.manifests`), and the same rendering makes each TrainingRun's trainer config and
each EvalRun's `nanochat eval` command (`nanochat_operator.render`), with `--runs-dir` standing in
for the runs directory of the PVC (/data/runs in a pod). So a run's directory is
`<runs-dir>/<metadata.name>`, and a run that is started again resumes.

Documents run in dependency order: the runs of a TrainingRun's `spec.after` before it (their
datasets, /data/runs/<run>/dataset in a pod, are read from `<runs-dir>/<run>/dataset`), a
TrainingRun's `spec.init.fromTrainingRun` starts from that run's final model, and an EvalRun on a
TrainingRun evaluates its final model. `--set` overrides apply to every TrainingRun's spec. The
operator-only parts of a spec (resources, storage, image, queue) do not apply here.

An EvalRun whose model the operator would serve with vLLM (it does not fit one GPU: see
`nanochat_operator.checks.eval_fit`) cannot run here: a run stops with one line saying so before
anything starts, and the dry run says what the cluster would do.
"""

from __future__ import annotations

import tempfile
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

import yaml

from nanochat_operator import render
from nanochat_operator.api import EvalRun, EvalRunSpec, TrainingRun
from nanochat_operator.checks import EvalFit
from nanochat_operator.manifests import ManifestError, eval_fit_in_file, missing_best, validate_documents
from nanochat_operator.manifests import dry_run as cluster_dry_run
from nanochat_trainer.config import TrainerConfig, deep_merge
from nanochat_trainer.contract import TRAINING_KIND, run_layout
from nanochat_trainer.errors import MachineError

from .progress import progress_bar

Run = TrainingRun | EvalRun


def merged_documents(path: str, overrides: dict[str, Any]) -> list[Any]:
    """The manifest's YAML documents with `overrides` laid over every TrainingRun's spec."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as err:
        raise ManifestError(f"{path}: {err}") from err
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == TRAINING_KIND:
            doc["spec"] = deep_merge(doc.get("spec") or {}, overrides)
    return docs


def read_manifest(path: str, overrides: dict[str, Any]) -> list[Run]:
    """The manifest's runs, validated by the operator's API models after `overrides` were laid over
    every TrainingRun's spec."""
    return validate_documents(merged_documents(path, overrides), path)


def dry_run_with(path: str, overrides: dict[str, Any]) -> str:
    """The cluster's dry run of the manifest as overridden: what would run is what is checked."""
    if not overrides:
        return cluster_dry_run(path)
    # The operator's dry run reads a file: give it the merged documents under the manifest's name,
    # and put the real path back in what it says.
    with tempfile.TemporaryDirectory(prefix="nanochat-dry-run-") as tmp:
        merged = Path(tmp) / Path(path).name
        merged.write_text(yaml.safe_dump_all(merged_documents(path, overrides), sort_keys=False))
        try:
            return cluster_dry_run(str(merged)).replace(str(merged), path)
        except ManifestError as err:
            raise ManifestError(str(err).replace(str(merged), path)) from None


def trainer_config(run: TrainingRun, runs_dir: Path) -> TrainerConfig:
    """The config the operator would give the run's pods, with this machine's runs directory; no
    metrics server (local runs print their progress)."""
    init_from = None
    if run.spec.init is not None:
        init_from = str(run_layout(runs_dir, run.spec.init.from_training_run).final)
    cfg = render.resolved_trainer_config(run.metadata.name, run.spec, init_from, runs_root=runs_dir)
    cfg.metrics.port = 0
    # Datasets of other runs, named by their path in the pod (/data/runs/<run>/dataset), are here.
    pod_runs = str(render.RUNS_ROOT) + "/"
    for source in [cfg.data, *cfg.data.mixture]:
        if source.path and source.path.startswith(pod_runs):
            source.path = str(runs_dir / source.path.removeprefix(pod_runs))
    return cfg


def eval_argv(run: EvalRun, runs_dir: Path, fit: EvalFit) -> list[str]:
    """`nanochat eval` arguments of an EvalRun: the operator's command, with local paths. Full
    results go where the operator puts them, beside the evaluated run (an endpoint's, which the
    operator keeps only in the status, to <runs-dir>/eval/<name>.json). `fit`: how it loads its
    models (a ternary run's final model is its packed export)."""
    spec: EvalRunSpec = run.spec
    name = run.metadata.name
    packed = fit.packed
    checkpoint: str | None = None
    if spec.model.training_run is not None:
        source = run_layout(runs_dir, spec.model.training_run)
        checkpoint = str(source.evaluated(spec.model.checkpoint, spec.model.training_run in packed))
        out = source.eval_results(name)
    else:
        out = runs_dir / "eval" / f"{name}.json"
    compare = {
        c.name: render.endpoint_source(c.endpoint)
        if c.endpoint is not None
        else str(run_layout(runs_dir, c.training_run).evaluated(c.checkpoint, c.training_run in packed))
        for c in spec.compare
    }
    return render.eval_command(name, spec, checkpoint, str(out), compare)[2:]  # past "nanochat eval"


def needs_cluster(run: EvalRun, fit: EvalFit) -> str | None:
    """Why `run` cannot run on this machine: the operator would serve its model with vLLM over
    several GPUs (it does not fit one: `fit`), which `nanochat run` does not do; None when it can."""
    if fit.tensor_parallel is None:
        return None
    return (
        f"EvalRun {run.metadata.name} needs a cluster with GPUs: {fit.reason}; the operator serves it with vLLM "
        f"over {fit.tensor_parallel} GPU(s) (tensor parallelism), which nanochat run does not: apply it to a cluster"
    )


def train_locally(name: str, cfg: TrainerConfig) -> dict[str, Any]:
    """Train one TrainingRun here, its progress on a bar; a teacher still down after the client's
    retries is one line and exit 1 (its pod would be retried), not a traceback."""
    from nanochat_trainer.distill.teacher import TeacherUnavailable  # noqa: PLC0415 (the trainer extra)
    from nanochat_trainer.train import train  # noqa: PLC0415 (torch: the trainer extra)

    # stage generate reports no steps to a bar (it counts documents in its log): a bar would sit at 0.
    progress = progress_bar(cfg.total_steps) if cfg.generate is None else None
    try:
        record = train(cfg, progress=progress)
    except TeacherUnavailable as err:
        raise MachineError(f"TrainingRun {name}: the teacher is unavailable: {err}") from None
    if cfg.generate is not None:
        print(f"TrainingRun {name}: kept {record['step']} of {cfg.total_steps} documents -> {cfg.checkpoint.dir}")
    return record


def dependency_order(runs: list[Run]) -> list[Run]:
    """TrainingRuns before what depends on them; EvalRuns after the runs they read."""

    def needs(run: Run) -> set[str]:
        if isinstance(run, TrainingRun):
            return set(run.spec.after) | ({run.spec.init.from_training_run} if run.spec.init else set())
        return {m.training_run for m in [run.spec.model, *run.spec.compare] if m.training_run}

    names = {r.metadata.name for r in runs if isinstance(r, TrainingRun)}
    done: set[str] = set()
    ordered: list[Run] = []
    pending = list(runs)
    while pending:
        ready = [r for r in pending if needs(r) & names <= done]
        if not ready:
            raise ValueError("manifest has a dependency cycle: " + ", ".join(r.metadata.name for r in pending))
        for r in ready:
            ordered.append(r)
            done.add(r.metadata.name)
            pending.remove(r)
    return ordered


def run_manifest(
    path: str, dry_run: bool = False, overrides: dict[str, Any] | None = None, runs_dir: str = "runs"
) -> int:
    """Run every document of a manifest in dependency order; 0 when all succeeded. With `dry_run`,
    check the file as the cluster would (schema, storage, GPU fit) and print the plan only."""
    root = Path(runs_dir)
    if dry_run:
        print(dry_run_with(path, overrides or {}))
    plans: list[tuple[Run, Any]] = []
    runs = dependency_order(read_manifest(path, overrides or {}))
    trainings = {r.metadata.name: r for r in runs if isinstance(r, TrainingRun)}
    for run in runs:
        if isinstance(run, TrainingRun):
            cfg = trainer_config(run, root)
            plans.append((run, cfg))
            work = f"{cfg.generate.rows} documents" if cfg.generate else f"preset {cfg.preset}, {cfg.steps} steps"
            print(f"TrainingRun {run.metadata.name}: stage {cfg.stage}, {work} -> {cfg.checkpoint.dir}")
            continue
        missing = missing_best(run, trainings)
        if missing:  # before anything trains, not after its source did
            raise ManifestError(f"{path}: EvalRun {run.metadata.name}: {missing}")
        fit = eval_fit_in_file(run, trainings)
        served = needs_cluster(run, fit)
        if served and not dry_run:
            raise ManifestError(f"{path}: {served}")
        if served:
            print(served)
            continue
        argv = eval_argv(run, root, fit)
        plans.append((run, argv))
        print(f"EvalRun {run.metadata.name}: nanochat eval {' '.join(argv)}")
    if dry_run:
        return 0
    # torch (the trainer extra) is needed from here on only: a dry run works without it.
    from .eval import add_eval_args, run_eval_from_args  # noqa: PLC0415 (torch, too)

    for run, plan in plans:
        if isinstance(run, TrainingRun):
            train_locally(run.metadata.name, plan)
            continue
        parser = ArgumentParser(prog="nanochat eval")
        add_eval_args(parser)
        code = run_eval_from_args(parser.parse_args(plan))
        if code:
            return code
    return 0
