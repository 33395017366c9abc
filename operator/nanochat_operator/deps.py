"""Dependencies between runs (pure): may this run start, and from what?

A TrainingRun with `init.fromTrainingRun: a` and an EvalRun with `model.trainingRun: a`
wait for `a`:

    source missing          -> wait  (SourceNotFound: it may be created later, e.g. by
                                      the same `kubectl apply -f` a moment after)
    source not finished     -> wait  (SourceNotSucceeded, with its phase and step)
    source Failed           -> fail  (SourceFailed: it will never produce a checkpoint)
    source without storage  -> fail  (SourceHasNoStorage: its checkpoint died with its pod)
    source Succeeded        -> ready (its final checkpoint and the PVC holding it)
    ... without a best one  -> fail  (NoBestCheckpoint: an EvalRun asked for checkpoint: best)

Runs that wait for each other in a loop (a -> b -> a, through init.fromTrainingRun or `after`)
can never start: `find_chain` spots it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from nanochat_trainer.contract import Phase, storage_claim_name

from . import render
from .api import TrainingRunStatus
from .status import load_status


def no_best_checkpoint(source_name: str) -> str:
    """Why `checkpoint: best` of this TrainingRun cannot be: also the dry run's refusal."""
    return (
        f"TrainingRun {source_name} has no best checkpoint: it runs without spec.trainer.evaluation "
        "(score its final one, checkpoint: final)"
    )


@dataclass(frozen=True)
class Dependency:
    state: Literal["ready", "wait", "fail"]
    reason: str
    message: str
    source: str | None = None
    claim: str | None = None  # the source's PVC
    checkpoint: str | None = None  # its final model, under the PVC's /data mount
    spec: dict[str, Any] | None = None  # the source's raw spec, once it is ready


def source_claim(name: str, spec: dict[str, Any]) -> str | None:
    """The PVC of a TrainingRun from its raw spec (claimName, or the one the operator made)."""
    storage = spec.get("storage") or {}
    if storage.get("claimName"):
        return storage["claimName"]
    if storage.get("size") is not None:
        return storage_claim_name(name)
    return None


def resolve(source_name: str, source: dict[str, Any] | None, which: str = "final") -> Dependency:
    """Decide from the source TrainingRun object (None when it does not exist); `which`
    checkpoint is read from it: final, or best."""
    if source is None:
        return Dependency(
            "wait", "SourceNotFound", f"TrainingRun {source_name} does not exist (yet); waiting for it", source_name
        )
    # The source's spec is read raw (it may be invalid: a run that Failed on it); its status
    # is the operator's own, as the schema has it.
    status = load_status(TrainingRunStatus, source.get("status"))
    phase = status.phase or Phase.PENDING
    claim = status.storage_claim or source_claim(source_name, source.get("spec") or {})
    if phase == Phase.FAILED:
        return Dependency(
            "fail",
            "SourceFailed",
            f"TrainingRun {source_name} Failed, so it has no final checkpoint to start from",
            source_name,
        )
    if claim is None:
        return Dependency(
            "fail",
            "SourceHasNoStorage",
            f"TrainingRun {source_name} has no spec.storage: its "
            "checkpoints are not kept anywhere another pod can read",
            source_name,
        )
    if phase != Phase.SUCCEEDED:
        total = "?" if status.total_steps is None else status.total_steps
        where = f" (step {status.step}/{total})" if status.step is not None else ""
        return Dependency(
            "wait",
            "SourceNotSucceeded",
            f"waiting for TrainingRun {source_name} to succeed: it is {phase}{where}",
            source_name,
            claim,
        )
    # Read from the spec, not the status: the last step always evaluates, often after the last scrape.
    if which == "best" and not ((source.get("spec") or {}).get("trainer") or {}).get("evaluation"):
        return Dependency("fail", "NoBestCheckpoint", no_best_checkpoint(source_name), source_name)
    checkpoint = status.final_checkpoint or render.final_checkpoint_path(source_name)
    return Dependency(
        "ready",
        "SourceSucceeded",
        f"starting from TrainingRun {source_name}'s {checkpoint}",
        source_name,
        claim,
        checkpoint,
        source.get("spec") or {},
    )


def waits_for(run: dict[str, Any] | None) -> list[str]:
    """The TrainingRuns a TrainingRun waits for: its init.fromTrainingRun and its `after` runs."""
    spec = (run or {}).get("spec") or {}
    source = (spec.get("init") or {}).get("fromTrainingRun")
    return ([source] if source else []) + list(spec.get("after") or [])


def find_chain(run: str, target: str, waits: Callable[[str], list[str]], limit: int = 64) -> list[str] | None:
    """A chain `run -> ... -> target` of runs each waiting for the next (`waits(name)`: none for a
    run that does not exist), if there is one; at most `limit` runs are looked at. A run waiting
    for `run` closes a loop when `target` is itself."""
    path, seen = [run], {run}

    def visit(current: str) -> list[str] | None:
        if current == target:
            return list(path)
        for nxt in waits(current):
            if nxt in seen or len(seen) >= limit:
                continue
            seen.add(nxt)
            path.append(nxt)
            if (chain := visit(nxt)) is not None:
                return chain
            path.pop()
        return None

    return visit(run)
