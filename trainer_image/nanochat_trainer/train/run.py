"""A training run, for one process or many: start up, step, checkpoint, save the finished model.

    python -m nanochat_trainer.train --config run.yaml                 # one process
    torchrun --nproc-per-node 2 -m nanochat_trainer.train --config run.yaml

Under torchrun every rank reads the same config; ranks meet through env:// rendezvous (gloo on
CPU, NCCL on GPU). The model is wrapped in DDP, or FSDP2 from 0.9B parameters or when asked,
with expert parallelism on top for MoE models (`parallel/`). A run directory with checkpoints
resumes from the newest complete one: same weights, optimizer, schedule position, data position
and RNG, so the next losses are the ones an uninterrupted run would have had (on any world size
that divides the data lanes, and any parallel layout).

Step checkpoints are written while training goes on (`StepCheckpoints`): each rank's state is
copied to host memory at the step and written from a thread; rank 0 publishes the checkpoint (train
state added, renamed into place, older ones pruned) once every rank's write is complete, at the
latest before the next checkpoint, before final/ (written synchronously) and when the run ends. A
crash meanwhile leaves the previous checkpoint the newest.

Stages: "pretrain" trains on the data; "distill" learns from a teacher endpoint by
`distill.method` (`distill/`); "ternary" trains BitNet b1.58 layers (`models/ternary.py`)
started from checkpoint.init_from, optionally distilling from its frozen full-precision parent
(ternary.distill_from_parent) or from the teacher (a distill block). "generate" trains nothing:
it makes training data with the teacher (`datagen/`).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    begin_sharded,
    latest_checkpoint,
    prune_checkpoints,
    publish_sharded,
    save_weights,
    set_aside_earlier_run,
)
from ..config import TrainerConfig
from ..contract import RunLayout
from ..data.heldout import heldout_rows
from ..data.loader import TokenLoader
from ..data.sources import check_sources
from ..datagen.run import Generator
from ..errors import ConfigError
from ..export import export_ternary
from ..models.gpt import GPT
from ..models.ternary import fully_ternary
from ..parallel.apply import uses_fsdp, wrap_model
from ..parallel.distributed import Env, barrier, from_main, setup_distributed
from ..parallel.expert_parallel import ExpertParallel
from ..parallel.state import checkpoint_group, save_sharded, start_save_sharded
from ..tokenizer import Tokenizer
from .evaluation import InTrainingEval
from .metrics import TrainerMetrics
from .optim import build_optimizers
from .startup import build_feed, build_model, initialise, load_parent, run_tokenizer
from .trainer import Trainer

Progress = Callable[[dict[str, Any]], None]


def _set_aside_earlier_run(layout: RunLayout[Path], env: Env) -> None:
    """checkpoint.resume: false where a run trained before: rank 0 moves its results aside (kept),
    the others wait, so that the new run starts, prunes and later resumes on its own."""
    if env.is_main:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = set_aside_earlier_run(layout, stamp)
        if aside is not None:
            print(f"checkpoint.resume=false: the earlier run's checkpoints, models and logs are in {aside}", flush=True)
    barrier(env)


def train(cfg: TrainerConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the last step's record. Rank 0 writes all files."""
    if cfg.stage == "generate":
        return _generate(cfg)
    parent_kd = cfg.stage == "ternary" and cfg.ternary is not None and cfg.ternary.distill_from_parent
    if parent_kd and not cfg.checkpoint.init_from:
        raise ValueError(
            "ternary.distill_from_parent needs checkpoint.init_from (the parent's checkpoint; a "
            "TrainingRun gets it from init.fromTrainingRun)"
        )
    env = setup_distributed(cfg.device)
    layout = RunLayout(Path(cfg.checkpoint.dir))
    if not cfg.checkpoint.resume:
        _set_aside_earlier_run(layout, env)
    check_sources(cfg.data)  # an empty source fails here, naming it, not at the step that reaches it
    torch.manual_seed(cfg.seed)
    tokenizer = run_tokenizer(cfg, layout, env)

    model, ep = build_model(cfg, env)
    resume_from = latest_checkpoint(layout.root) if cfg.checkpoint.resume else None
    initialise(model, cfg, resuming=resume_from is not None)
    wrapped = wrap_model(model, cfg, env, ep)
    opts = build_optimizers(model, cfg.optimizer)
    loader = TokenLoader(cfg, tokenizer, env.rank, env.world, env.device)
    trainer = Trainer(
        cfg,
        model,
        wrapped,
        opts,
        build_feed(cfg, layout, loader, tokenizer, env),
        env,
        ep=ep,
        parent=load_parent(cfg, env, ep) if parent_kd else None,
    )
    if resume_from is not None:
        trainer.resume(resume_from)
    start = trainer.steps_done

    heldout = validation_rows(cfg, tokenizer, env)
    evals = InTrainingEval(cfg, tokenizer, env, layout) if cfg.evaluation is not None else None
    metrics = TrainerMetrics(layout, cfg.metrics.port, enabled=env.is_main)
    metrics.set(total_steps=cfg.total_steps, step=start, checkpoint_step=start if resume_from is not None else None)
    if evals is not None and evals.best is not None:  # a resumed run's best so far
        metrics.set(best_pass_at_1=evals.best["pass_at_1"], best_step=evals.best["step"])
    record: dict[str, Any] = {"step": start}
    skipped_before = 0  # teacher_skipped after the previous step: teacher_up says whether this step skipped
    asynchronous = cfg.checkpoint.saves_async(sharded=uses_fsdp(cfg, env.world) or ep is not None)
    checkpoints = StepCheckpoints(cfg, env, layout, tokenizer, metrics, asynchronous)  # collective
    try:
        while trainer.steps_done < cfg.steps:
            record = trainer.step()
            checkpoints.poll()
            done = record["step"]
            validate = heldout is not None and (done % cfg.validation.every == 0 or done == cfg.steps)
            if validate or (evals is not None and evals.due(done)):
                with fully_ternary(model):  # a ternary run is scored as it is saved and served, also mid-ramp
                    if validate:
                        record["val_loss"] = trainer.eval_loss(heldout)  # collective
                    if evals is not None and evals.due(done):
                        record.update(evals.run(model, ep, done))  # collective
            skipped_before = _publish(record, metrics, skipped_before)
            evaluated = "val_loss" in record or "evaluation" in record
            logged = done % cfg.metrics.log_every == 0 or done in (cfg.steps, start + 1) or evaluated
            if env.is_main and logged:
                metrics.log(record)
            if progress is not None and env.is_main:
                progress(record)
            if done % cfg.checkpoint.every == 0 or done == cfg.steps:
                checkpoints.start(done, trainer)  # collective
                loads = trainer.take_expert_loads()
                if loads and env.is_main:
                    _log_expert_load(layout, done, loads)
    except BaseException:
        checkpoints.finish_quietly()  # a checkpoint whose write completes is kept; the error is the run's
        raise
    else:
        checkpoints.finish()
    finally:
        trainer.close()

    wrote = start < cfg.steps or not layout.final.is_dir()
    if wrote:
        save_final(model, cfg, env, ep, layout, tokenizer)  # collective
    barrier(env)
    # After the last collective (packing 80B parameters outlasts a collective's timeout), and again on a
    # restart that finds final/ written but no packed file (rank 0 died while packing).
    if env.is_main and cfg.stage == "ternary" and (wrote or not layout.packed_ternary.is_file()):
        export_ternary(layout.final, layout.packed_ternary)
    metrics.write_termination_message()  # rank 0's last figures, for the pod's status
    return record


def save_final(
    model: GPT, cfg: TrainerConfig, env: Env, ep: ExpertParallel | None, layout: RunLayout, tokenizer: Tokenizer
) -> None:
    """final/: one safetensors file from rank 0 when every rank holds the whole model; under FSDP2
    or expert parallelism each rank writes its shards, so no rank gathers the model. Collective."""
    if ep is None and not uses_fsdp(cfg, env.world):
        if env.is_main:
            save_weights(layout.final, model, cfg, tokenizer)
    else:
        tmp = _begin_sharded(layout.final, env)
        save_sharded(model, [], ep, tmp)
        if env.is_main:
            publish_sharded(tmp, cfg, tokenizer)


def _begin_sharded(target: Path, env: Env) -> Path:
    """The temporary directory every rank writes its part of `target` into, made by rank 0 (which
    publishes it whole or not at all). Collective."""
    return from_main(begin_sharded(target) if env.is_main else None, env)


@dataclass
class _Pending:
    """A step checkpoint being written: its temporary directory, this rank's write, and the train
    state captured at its step (complete on rank 0)."""

    step: int
    tmp: Path
    write: Future
    train_state: dict[str, Any]


class StepCheckpoints:
    """Step checkpoints, each published (rank 0: the train state added, renamed into place, the
    oldest pruned) once every rank has written its part; `asynchronous`: written while training
    goes on, one at a time, from each rank's copy of its state in host memory.

        checkpoints = StepCheckpoints(cfg, env, layout, tokenizer, metrics, asynchronous)   # collective
        checkpoints.start(step, trainer)     # collective: staged (or written); the previous one published first
        checkpoints.poll()                   # after each step: publish the pending one if written
        checkpoints.finish()                 # wait for the pending one and publish it
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        env: Env,
        layout: RunLayout,
        tokenizer: Tokenizer,
        metrics: TrainerMetrics,
        asynchronous: bool,
    ):
        self.cfg, self.env, self.layout, self.tokenizer, self.metrics = cfg, env, layout, tokenizer, metrics
        self.asynchronous = asynchronous
        self.group = checkpoint_group() if asynchronous else None
        self.pending: _Pending | None = None

    def start(self, step: int, trainer: Trainer) -> None:
        """Stage the trainer's state at `step` and start writing it into a new temporary directory
        (or write it, and publish it, when not asynchronous). The previous checkpoint is finished
        first: begin_sharded removes every unpublished step directory, and the writes' group carries
        one save's collectives at a time. Collective."""
        self.finish()
        tmp = _begin_sharded(self.layout.step(step), self.env)
        if not self.asynchronous:
            written: Future = Future()
            train_state = trainer.save(tmp)
            written.set_result(None)
        else:
            written = start_save_sharded(trainer.model, trainer.opts, trainer.ep, tmp, self.group)
            # A copy: nothing the training does until the publication may change what this step saved.
            train_state = copy.deepcopy(trainer.train_state())
        self.pending = _Pending(step, tmp, written, train_state)
        if not self.asynchronous:
            self.finish()

    def poll(self) -> None:
        """Publish the pending checkpoint if its write is complete (no waiting; not collective)."""
        if self.pending is not None and self.pending.write.done():
            self.finish()

    def finish(self) -> None:
        """Wait for the pending checkpoint's write and publish it. Its future completes on every rank
        only after DCP gathered all ranks' write results and rank 0 wrote `.metadata` (a rank's failure
        raises here on every rank, and nothing is published). Not collective."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        pending.write.result()
        if self.env.is_main:
            publish_sharded(pending.tmp, self.cfg, self.tokenizer, pending.train_state)
            prune_checkpoints(self.layout.root, self.cfg.checkpoint.keep)
        self.metrics.set(checkpoint_step=pending.step)

    def finish_quietly(self) -> None:
        """finish() while the run fails: the pending write completes if every rank's writer is
        alive (a failed rank's peers raise), and its failure is reported, not raised over the run's."""
        try:
            self.finish()
        except Exception as e:
            print(f"step checkpoint not published: {e}", file=sys.stderr, flush=True)


def _generate(cfg: TrainerConfig) -> dict[str, Any]:
    """stage generate (`datagen/`): one process asks the teacher, whatever torchrun started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(
            "resources", f"{world} processes", "stage generate runs as one process: nodes 1, gpusPerNode 0 or 1"
        )
    metrics = TrainerMetrics(RunLayout(Path(cfg.checkpoint.dir)), cfg.metrics.port, enabled=True)
    generator = Generator(cfg, metrics)
    generator.run()
    metrics.write_termination_message()
    return generator.figures()


def validation_rows(cfg: TrainerConfig, tokenizer: Tokenizer, env: Env) -> torch.Tensor | None:
    """This rank's held-out rows, checked not to be training data (None: no validation)."""
    if cfg.validation is None:
        return None
    return heldout_rows(cfg, tokenizer, env.rank, env.world)


def _publish(record: dict[str, Any], metrics: TrainerMetrics, skipped_before: int) -> int:
    """The step's gauges; returns teacher_skipped so far (the next step's `skipped_before`)."""
    metrics.set(
        step=record["step"],
        loss=record["loss"],
        tokens_per_second=record["tokens_per_second"],
        learning_rate=record["lr"],
        grad_norm=record["grad_norm"],
        mfu=record["mfu"],
        val_loss=record.get("val_loss"),
        pass_at_1=record.get("pass_at_1"),
        best_pass_at_1=record.get("best_pass_at_1"),
        best_step=record.get("best_step"),
    )
    if "evaluation" in record:
        metrics.set(evaluation_errors=record["evaluation"]["errors"])
    if "moe" in record:
        metrics.set(moe_load_imbalance=record["moe"]["load_imbalance"], moe_dead_experts=record["moe"]["dead_experts"])
    if "teacher" not in record:
        return skipped_before
    t, skipped = record["teacher"], record["teacher_skipped"]
    metrics.set(
        teacher_up=0 if skipped > skipped_before else 1,
        teacher_requests=t["requests"],
        teacher_cache_hits=t["cache_hits"],
        teacher_errors=t["errors"],
        teacher_latency_seconds=t["latency_s"],
        teacher_in_flight=t["in_flight"],
        teacher_requests_per_second=t["requests_per_s"],
        teacher_skipped=skipped,
    )
    return skipped


def _log_expert_load(layout: RunLayout, step: int, loads: dict[str, torch.Tensor]) -> None:
    """Append the routed tokens per expert of every MoE layer since the previous checkpoint to
    <run>/expert_load.jsonl (per checkpoint, not per step: at 48 layers x 512 experts a line is
    ~150 KB)."""
    line = {"step": step, "layers": {name: [int(x) for x in load.tolist()] for name, load in loads.items()}}
    with open(layout.expert_load, "a") as f:
        f.write(json.dumps(line) + "\n")
