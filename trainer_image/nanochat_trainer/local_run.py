"""`nanochat run MANIFEST`: run TrainingRun and EvalRun manifests on this machine, no cluster.

    nanochat run examples/phase1-quick-demo.yaml --set trainer.preset=tiny --set trainer.steps=40

Documents run in dependency order: a TrainingRun's `spec.init.fromTrainingRun` starts
from that run's final model, and an EvalRun on a TrainingRun evaluates its final model.
Each run keeps its directory in `<runs-dir>/<metadata.name>` (checkpoint.dir), so a run
that is started again resumes. `--set` overrides apply to every TrainingRun's spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import TrainerConfig, deep_merge

API_GROUP = "nanochat.io/"


def read_manifest(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for i, doc in enumerate(docs):
        kind = doc.get("kind")
        if not str(doc.get("apiVersion", "")).startswith(API_GROUP) or kind not in ("TrainingRun", "EvalRun"):
            raise ValueError(f"{path}[{i}].kind={kind!r}: expected a nanochat.io TrainingRun or EvalRun")
        if not doc.get("metadata", {}).get("name"):
            raise ValueError(f"{path}[{i}].metadata.name: missing")
    return docs


def trainer_config(doc: dict, overrides: dict, runs_dir: Path) -> TrainerConfig:
    """The TrainerConfig a TrainingRun asks for, with its run directory and init source resolved."""
    name = doc["metadata"]["name"]
    spec = deep_merge(doc.get("spec", {}), overrides)
    trainer = deep_merge(spec.get("trainer", {}), {"checkpoint": {"dir": str(runs_dir / name)},
                                                   "metrics": {"port": 0}})
    source = spec.get("init", {}).get("fromTrainingRun")
    if source:
        trainer["checkpoint"]["init_from"] = str(runs_dir / source / "final")
    from pydantic import ValidationError

    try:
        return TrainerConfig.model_validate(trainer)
    except ValidationError as e:
        from .config import format_validation_error

        raise ValueError(f"TrainingRun {name}: {format_validation_error(e, 'spec.trainer.')}") from None


def eval_argv(doc: dict, runs_dir: Path) -> list[str]:
    spec, name = doc.get("spec", {}), doc["metadata"]["name"]
    model = spec.get("model", {})
    if model.get("trainingRun"):
        argv = ["--checkpoint", str(runs_dir / model["trainingRun"] / "final")]
    elif model.get("endpoint"):
        ep = model["endpoint"]
        argv = ["--endpoint", ep["url"], "--model", ep["model"]]
    else:
        raise ValueError(f"EvalRun {name}: spec.model needs trainingRun or endpoint")
    argv += ["--samples", str(spec.get("samplesPerProblem", 1)),
             "--temperature", str(spec.get("temperature", 0.0)),
             "--k", ",".join(str(k) for k in spec.get("k", [1])),
             "--max-new-tokens", str(spec.get("maxNewTokens", 384)),
             "--out", str(runs_dir / name / "results.json")]
    if spec.get("maxProblems"):
        argv += ["--max-problems", str(spec["maxProblems"])]
    if spec.get("compare"):
        argv += ["--name", model.get("trainingRun") or "endpoint"]
        for c in spec["compare"]:
            where = (str(runs_dir / c["trainingRun"] / "final") if c.get("trainingRun")
                     else f"{c['endpoint']['url']}#{c['endpoint']['model']}")
            argv += ["--compare", f"{c['name']}={where}"]
    return argv


def _order(docs: list[dict]) -> list[dict]:
    """TrainingRuns before what depends on them; EvalRuns after the runs they read."""
    def deps(doc):
        spec = doc.get("spec", {})
        compared = {c.get("trainingRun") for c in spec.get("compare") or []}
        return ({spec.get("init", {}).get("fromTrainingRun"), spec.get("model", {}).get("trainingRun")}
                | compared) - {None}

    names = {d["metadata"]["name"] for d in docs}
    done: set[str] = set()
    ordered: list[dict] = []
    pending = list(docs)
    while pending:
        ready = [d for d in pending if deps(d) <= done | (deps(d) - names)]
        if not ready:
            raise ValueError("manifest has a dependency cycle: " + ", ".join(d["metadata"]["name"] for d in pending))
        for d in ready:
            ordered.append(d)
            done.add(d["metadata"]["name"])
            pending.remove(d)
    return ordered


def run_manifest(path: str, dry_run: bool = False, overrides: dict | None = None, runs_dir: str = "runs") -> int:
    root = Path(runs_dir)
    if dry_run:
        # A dry run checks the file as the cluster would (schema, storage, GPU fit) too.
        from nanochat_operator.manifests import dry_run as cluster_dry_run

        print(cluster_dry_run(path))
    docs = _order(read_manifest(path))
    plans = []
    for doc in docs:
        if doc["kind"] == "TrainingRun":
            cfg = trainer_config(doc, overrides or {}, root)
            plans.append((doc, cfg))
            print(f"TrainingRun {doc['metadata']['name']}: stage {cfg.stage}, preset {cfg.preset}, "
                  f"{cfg.steps} steps -> {cfg.checkpoint.dir}")
        else:
            argv = eval_argv(doc, root)
            plans.append((doc, argv))
            print(f"EvalRun {doc['metadata']['name']}: nanochat eval {' '.join(argv)}")
    if dry_run:
        return 0
    from .cli import _progress_bar, build_parser
    from .train import train

    for doc, plan in plans:
        if doc["kind"] == "TrainingRun":
            train(plan, progress=_progress_bar(plan.steps))
        else:
            args = build_parser().parse_args(["eval", *plan])
            code = args.func(args)
            if code:
                return code
    return 0
