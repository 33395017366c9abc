"""One rank's training state, and the optimizer step.

    trainer = Trainer(cfg, model, wrapped, opts, feed, env, ep=ep, parent=parent)
    trainer.resume(step_dir)          # collective: weights, optimizers, data, RNG, step
    record = trainer.step()           # one optimizer step over grad_accum micro-batches -> its log record
    state = trainer.save(tmp_dir)     # collective: every rank writes its shards; the train state (rank 0's complete)
    state = trainer.train_state()     # collective: the train state alone (its shards written asynchronously)

A step: the learning rate and the ternary ramp for this step; for each micro-batch of the feed
the loss (`losses.model_loss`, mixed with the KL to the teacher's top-k targets or to the frozen
parent when the run distils) and its backward; expert gradients reduced, the global gradient norm
clipped, the optimizers stepped; the MoE expert loads summed over the ranks (they move the
aux-free routing bias); the loss averaged over the ranks.
"""

from __future__ import annotations

import gc
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from ..checkpoint import is_sharded, read_checkpoint, read_config, read_train_state
from ..config import TrainerConfig
from ..data.feed import Batch, BatchSource
from ..data.loader import merge_states
from ..errors import ConfigError
from ..models.gpt import GPT, architecture_differences
from ..models.moe import load_summary, take_expert_loads, update_moe_biases
from ..models.ternary import ramp_value, set_ramp
from ..parallel.distributed import Env, gather_objects, sum_over_ranks
from ..parallel.expert_parallel import ExpertParallel, clip_grad_norm_, reduce_expert_grads
from ..parallel.state import load_full_state, load_sharded, save_sharded
from .losses import full_kl_loss, lm_loss, model_loss, topk_kl_loss
from .metrics import model_flops_per_token, peak_flops
from .optim import lr_multiplier, set_lr


class Trainer:
    """The model (and what forward/backward go through), its optimizers, the batch source and the
    position of one rank of a run."""

    def __init__(
        self,
        cfg: TrainerConfig,
        model: GPT,
        wrapped: nn.Module,
        opts: list[torch.optim.Optimizer],
        feed: BatchSource,
        env: Env,
        ep: ExpertParallel | None = None,
        parent: GPT | None = None,
    ):
        self.cfg, self.model, self.wrapped, self.opts, self.feed = cfg, model, wrapped, opts, feed
        self.env, self.ep, self.parent = env, ep, parent
        self.steps_done = 0
        self._feed_saved: list[dict[str, Any]] | None = None  # the feed's checkpointed positions
        self._feed_started = False
        # The step record has a kd_loss when some micro-batch may distil on logits.
        self._distils = parent is not None or feed.has_teacher_targets
        self._loads_since_checkpoint: dict[str, torch.Tensor] = {}
        use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and env.device.type == "cuda")
        self._autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        seq_len = cfg.resolved_seq_len
        self.tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum * env.world
        self._flops_per_token = model_flops_per_token(cfg.model, seq_len)
        self._peak = peak_flops(env.device)

    # ------------------------------------------------------------------ the step

    def step(self) -> dict[str, Any]:
        """One optimizer step; returns its record (log.jsonl, progress, gauges)."""
        cfg, model, env = self.cfg, self.model, self.env
        if not self._feed_started:
            self.feed.start((cfg.steps - self.steps_done) * cfg.grad_accum, self._feed_saved)
            self._feed_started = True
        t0 = time.perf_counter()
        set_lr(self.opts, lr_multiplier(self.steps_done, cfg.steps, cfg.schedule))
        if cfg.stage == "ternary":
            set_ramp(model, ramp_value(self.steps_done, cfg.ternary.ramp_steps))
        self.wrapped.train()
        loss_sum = torch.zeros((), device=env.device)
        kd = torch.zeros(2, device=env.device)  # the KL losses of the step's micro-batches, and how many
        for micro in range(cfg.grad_accum):
            batch = self.feed.next()
            last = micro == cfg.grad_accum - 1
            # DDP all-reduces gradients on the last micro-batch only.
            sync = self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") and not last else nullcontext()
            with sync, self._autocast:
                loss = self._loss(batch, kd) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
            if not last or self.steps_done + 1 < cfg.steps:
                self.feed.prefetch()  # while the device works through the backward (and the step)
        if self.ep is not None:
            reduce_expert_grads(model, self.ep)  # DDP averaged the dense weights only
        grad_norm = clip_grad_norm_(
            model, cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else float("inf"), self.ep
        )
        for opt in self.opts:
            opt.step()
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loads = sum_over_ranks(take_expert_loads(model), env)  # collective: the step's loads over all ranks
        update_moe_biases(model, loads)
        for name, load in loads.items():
            self._loads_since_checkpoint[name] = self._loads_since_checkpoint.get(name, 0) + load
        figures = self._step_figures(loss_sum, kd, grad_norm)  # the step's one wait for the device
        self.steps_done += 1
        if self.steps_done == 1 or self.steps_done % 1000 == 0:
            # What exists now (the model, its optimizer state, the data machinery) lives all run:
            # out of the collector's view, a collection walks only what steps allocate.
            gc.collect()
            gc.freeze()
        dt = time.perf_counter() - t0
        tps = self.tokens_per_step / dt
        record: dict[str, Any] = {
            "step": self.steps_done,
            "loss": figures["loss"],
            "lr": self.opts[-1].param_groups[0]["lr"],
            "grad_norm": figures["grad_norm"],
            "tokens_per_second": tps,
            "step_time": dt,
            "mfu": (tps * self._flops_per_token / (self._peak * env.world)) if self._peak else None,
        }
        if loads and env.is_main:  # the summary reads the loads back to the host: only where it is logged
            record["moe"] = load_summary(loads)
        if self._distils:
            record["kd_loss"] = figures["kd"] / figures["kd_count"] if figures["kd_count"] else None
        record.update(self.feed.record())
        if "data_tokens" in figures:
            record["data_tokens"], record["decontaminated"] = figures["data_tokens"], figures["decontaminated"]
        return record

    def _step_figures(self, loss_sum: torch.Tensor, kd: torch.Tensor, grad_norm: torch.Tensor) -> dict[str, Any]:
        """The step's loss (mean over the ranks), KL sum and count, gradient norm, and the tokens
        trained on from each data source and documents dropped for overlapping HumanEval (over all
        ranks and the whole run), in one all-reduce and one read back: the host waits for the
        device once per step (MoE layers' load summary aside), not once per figure. Collective."""
        env = self.env
        parts = [(loss_sum.double() / env.world).view(1), kd.double()]
        try:
            data = self.feed.loader_state()
            names = list(data["source_tokens"])
            parts.append(torch.tensor([*data["source_tokens"].values(), data["decontaminated"]], dtype=torch.float64))
        except NotImplementedError:  # a TensorFeed: batches of the caller's own
            names = None
        summed = sum_over_ranks({"step": torch.cat([t.to(env.device, non_blocking=True) for t in parts])}, env)["step"]
        if isinstance(grad_norm, DTensor):  # FSDP2: torch's clip returns the (replicated) norm as a DTensor
            grad_norm = grad_norm.full_tensor()
        values = torch.cat([summed, grad_norm.detach().double().view(1)]).tolist()
        figures: dict[str, Any] = {"loss": values[0], "kd": values[1], "kd_count": values[2], "grad_norm": values[-1]}
        if names is not None:
            counts = values[3:-1]
            figures["data_tokens"] = {n: int(c) for n, c in zip(names, counts)}
            figures["decontaminated"] = int(counts[-1])
        return figures

    def _loss(self, batch: Batch, kd: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss: model_loss, its cross-entropy mixed with the full-vocabulary KL to the
        frozen parent (ternary.distill_from_parent) or the top-k KL to the teacher's targets (logprob methods).
        Adds each KL and a count of 1 to `kd`."""
        if self.parent is not None:
            with torch.no_grad():
                parent_logits = self.parent(batch.x)
            logits = self.wrapped(batch.x)
            ternary = self.cfg.ternary
            kl = full_kl_loss(logits, parent_logits, batch.y != -1, ternary.parent_temperature)
            kd += torch.stack([kl.detach().float(), kl.new_ones((), dtype=torch.float32)])
            return model_loss(self.model, logits, batch.y, kl, ternary.parent_alpha)
        logits = self.wrapped(batch.x)
        t = batch.teacher
        if t is None:
            return model_loss(self.model, logits, batch.y)
        distill = self.cfg.distill
        kl = topk_kl_loss(logits, t.ids, t.logprobs, t.mask, distill.temperature)
        kd += torch.stack([kl.detach().float(), kl.new_ones((), dtype=torch.float32)])
        return model_loss(self.model, logits, batch.y, kl, distill.alpha)

    @torch.no_grad()
    def eval_loss(self, rows: torch.Tensor) -> float:
        """Mean next-token cross-entropy on `rows` (this rank's held-out rows, seq_len + 1 tokens
        each), over every rank's tokens. Collective: every rank calls it with as many rows. The
        model's routing and expert loads do not move (eval mode)."""
        self.wrapped.eval()
        total = torch.zeros(2, device=self.env.device, dtype=torch.float64)
        try:
            for i in range(0, len(rows), self.cfg.batch_size):
                batch = rows[i : i + self.cfg.batch_size].to(self.env.device)
                with self._autocast:
                    logits = self.wrapped(batch[:, :-1])
                total[0] += lm_loss(logits, batch[:, 1:]).double() * batch[:, 1:].numel()
                total[1] += batch[:, 1:].numel()
        finally:
            self.wrapped.train()
        total = sum_over_ranks({"val": total}, self.env)["val"]
        return (total[0] / total[1]).item()

    def take_expert_loads(self) -> dict[str, torch.Tensor]:
        """Routed tokens per expert of every MoE layer, over all ranks, since the last call."""
        loads, self._loads_since_checkpoint = self._loads_since_checkpoint, {}
        return loads

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: Path) -> dict[str, Any]:
        """Write this rank's shards of the weights and optimizers into the checkpoint directory
        `path` (`parallel.state.save_sharded`) and return the train state. Collective; rank 0's train
        state is the complete one (`checkpoint.publish_sharded` writes it)."""
        save_sharded(self.model, self.opts, self.ep, path)
        return self.train_state()

    def train_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the shards: step, the optimizers' parameter groups, the
        data position of every rank merged, RNG, and the distillation feed's position per rank.
        Collective; complete on rank 0."""
        env = self.env
        state: dict[str, Any] = {
            "step": self.steps_done,
            "optimizer_groups": _group_names(self.model, self.opts),
            "loader": merge_states(gather_objects(self.feed.loader_state(), env)),
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None,
            },
        }
        feed_state = self.feed.state_dict()
        if feed_state is not None:
            state["distill"] = gather_objects(feed_state, env)
        return state

    def resume(self, step_dir: Path) -> None:
        """Continue from a step checkpoint, sharded or (written by an earlier version) whole: each
        rank reads the weights and optimizer states it holds. Collective; call before the first step."""
        assert not self._feed_started, "resume() comes before the first step()"
        differ = architecture_differences(read_config(step_dir).model, self.cfg.model)
        if differ:
            # A preset whose shape changed between trainer versions (GPT-2's vocabulary padded to
            # 50,304 rows): the run must say which field to pin, not fail inside the loader.
            raise ConfigError(
                "checkpoint.dir",
                str(step_dir.parent.parent),
                f"{step_dir.name} holds another model than trainer.model ({'; '.join(differ[:4])}); "
                "set trainer.model to the shape it was written with to resume it, or use a new directory",
            )
        if not is_sharded(step_dir):
            self._resume_whole(read_checkpoint(self.model, step_dir), step_dir)
            return
        state = read_train_state(step_dir)
        same = _same_groups(self.model, self.opts, state["optimizer_groups"], step_dir)
        load_sharded(self.model, self.opts if same else [], self.ep, step_dir)
        self._resume_position(state)

    def _resume_whole(self, state: dict[str, Any], where: Path) -> None:
        msd = dict(state["model"])
        if self.cfg.model.tie_embeddings:
            msd["lm_head.weight"] = msd["embed_tokens.weight"]
        saved = state["optimizers"]
        groups = [[sorted(g.get("params", [])) for g in osd.get("param_groups", [])] for osd in saved]
        same = _same_groups(self.model, self.opts, groups, where)
        load_full_state(self.model, self.opts, msd, saved if same else None, self.ep)
        self._resume_position(state)

    def _resume_position(self, state: dict[str, Any]) -> None:
        self.feed.load_loader_state(state["loader"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.env.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.env.device)
        self.steps_done = state["step"]
        self._feed_saved = state.get("distill")

    def close(self) -> None:
        self.feed.close()


def _group_names(model: GPT, opts: list[torch.optim.Optimizer]) -> list[list[list[str]]]:
    """Per optimizer, per parameter group, the names of its parameters (sorted)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups] for opt in opts]


def _same_groups(model: GPT, opts: list[torch.optim.Optimizer], saved: list[list[list[str]]], where: Path) -> bool:
    """Whether a checkpoint's optimizer states were written for the optimizers this run builds. When
    not (a trainer version that grouped the parameters differently, or a changed optimizer.name)
    the run resumes the weights, schedule and data position with fresh optimizer state, and says
    so, rather than failing on every restart. Per parameter group: a group's learning rate comes
    from the config, not the checkpoint, so a parameter that moved to another group would resume at
    another rate with the old moments."""
    if _group_names(model, opts) == saved:
        return True
    print(
        f"warning: {where}: its optimizer state ({len(saved)} optimizers) does not match this run's "
        f"({len(opts)}: {', '.join(type(o).__name__ for o in opts)}); resuming the weights with fresh "
        "optimizer state",
        file=sys.stderr,
        flush=True,
    )
    return False
