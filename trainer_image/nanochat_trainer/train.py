"""The training loop, for one process or many.

    python -m nanochat_trainer.train --config run.yaml                 # one process
    torchrun --nproc-per-node 2 -m nanochat_trainer.train --config run.yaml

Under torchrun every rank reads the same config; ranks meet through env://
rendezvous (gloo on CPU, NCCL on GPU). The model is wrapped in DDP, or FSDP2
(`fully_shard`, one shard per block) from 0.9B parameters or when asked, with expert
parallelism on top for MoE models (`parallel.py`). A run directory with checkpoints
resumes from the newest complete one: same weights, optimizer, schedule position, data
position and RNG, so the next losses are the ones an uninterrupted run would have had
(on any world size that divides the data lanes, and any parallel layout).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .checkpoint import (latest_checkpoint, load_state_into, read_weights, resolve_model_dir, save_checkpoint,
                         save_weights)
from .config import TrainerConfig, load_trainer_config
from .metrics import TrainerMetrics, model_flops_per_token, peak_flops
from .model import GPT
from .optim import build_optimizers, lr_multiplier, set_lr
from .parallel import (barrier, full_state, load_full_state, setup_distributed, shard_fsdp, unsharded, uses_fsdp,
                       wrap_model)


def _init_weights_from(model: GPT, source: str) -> None:
    """`checkpoint.init_from`: a nanochat model/run dir, or a Hugging Face Qwen3 dir. Under expert
    parallelism the model holds this rank's experts, and only their rows are read."""
    path = Path(source)
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        from .expert_parallel import expert_row_ranges
        from .hf_adapter import read_hf_state

        rows = set(expert_row_ranges(model).values())  # one (first, count) for every MoE layer, or none
        sd, hf_cfg = read_hf_state(str(path), model.cfg.max_seq_len, next(iter(rows)) if rows else None)
        differ = _architecture_differences(hf_cfg, model.cfg)
        if differ:
            raise ValueError(f"checkpoint.init_from={source!r}: its architecture differs from trainer.model "
                             f"({'; '.join(differ[:4])})")
        if model.cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # Hugging Face has no aux-free router bias: it keeps its zero init.
        if unexpected or any(not k.endswith("expert_bias") for k in missing):
            raise ValueError(f"checkpoint.init_from={source!r}: weights do not fit ({missing[:3]}, {unexpected[:3]})")
    else:
        load_state_into(model, resolve_model_dir(path))


def _architecture_differences(theirs, ours) -> list[str]:
    """What makes two ModelConfigs different models: parameter names and shapes, and the settings
    that change the function they compute. How a config spells a shape (head_dim unset or equal
    to dim / n_heads) and training settings (balancing, z-loss) do not count."""
    def shapes(cfg) -> dict[str, tuple]:
        with torch.device("meta"):
            return {n: tuple(t.shape) for n, t in GPT(cfg).state_dict().items()}

    def function(cfg) -> dict:
        out = cfg.model_dump(include={"rope_theta", "norm_eps", "qk_norm", "tie_embeddings"})
        if cfg.moe is not None:
            out["moe"] = cfg.moe.model_dump(include={"top_k", "norm_topk_prob", "dense_layers"})
        if cfg.hybrid is not None:
            out["hybrid"] = cfg.hybrid.model_dump(include={"full_attention_interval", "partial_rotary_factor"})
        return out

    a, b = shapes(theirs.model_copy(update={"max_seq_len": ours.max_seq_len})), shapes(ours)
    differ = [f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    fa, fb = function(theirs), function(ours)
    return differ + [f"{k}: {fa.get(k)} vs {fb.get(k)}" for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)]


def _inherit_tokenizer(cfg: TrainerConfig, run_dir: Path) -> None:
    """A bpe run started from a nanochat checkpoint (checkpoint.init_from) without tokenizer.path
    takes that checkpoint's tokenizer.json: its weights were trained with those ids (a bpe
    trained afresh on this run's data would differ whenever the data does)."""
    if not cfg.checkpoint.init_from or cfg.tokenizer.kind != "bpe" or cfg.tokenizer.path:
        return
    if (run_dir / "tokenizer.json").is_file():
        return
    src = Path(cfg.checkpoint.init_from)
    if (src / "config.json").is_file() and not (src / "config.yaml").is_file():
        return  # a Hugging Face dir: its tokenizer is named by tokenizer.path
    try:
        model_dir = resolve_model_dir(src)
    except ValueError:
        return  # _init_weights_from reports the bad path
    if (model_dir / "tokenizer.json").is_file():
        import shutil

        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir / "tokenizer.json", run_dir / "tokenizer.json")


def _matching_optimizer_states(model: GPT, opts, saved: list[dict], where: Path) -> list[dict] | None:
    """The checkpoint's optimizer states, or None when they were written for other optimizers
    than this run builds (a trainer version that grouped the parameters differently, or a changed
    optimizer.name): the run then resumes the weights, schedule and data position with fresh
    optimizer state, and says so, rather than failing on every restart."""
    names = {id(p): n for n, p in model.named_parameters()}
    # Per parameter group: a group's learning rate comes from the config, not the checkpoint, so a
    # parameter that moved to another group would resume at another rate with the old moments.
    want = [[sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups] for opt in opts]
    have = [[sorted(g.get("params", [])) for g in osd.get("param_groups", [])] for osd in saved]
    if want == have:
        return saved
    print(f"warning: {where}: its optimizer state ({len(saved)} optimizers) does not match this run's "
          f"({len(opts)}: {', '.join(type(o).__name__ for o in opts)}); resuming the weights with fresh "
          "optimizer state", file=sys.stderr, flush=True)
    return None


def _load_parent(cfg: TrainerConfig, device: torch.device, world: int, ep=None) -> GPT:
    """`ternary.distill_from_parent`: a frozen copy of `checkpoint.init_from` (the full-precision
    parent), eval mode, no gradients, on the student's device. Loaded at every start, also on resume
    (the student then comes from its own checkpoint, the parent still from init_from). A parent
    that is itself a ternary run is evaluated as it was trained (BitLinear, ramp 1). Laid out as the
    student is: its experts split over the same expert-parallel groups (each rank reads only its
    rows) and sharded with FSDP2 when the student is (every rank runs its forward, so the
    exchanges and all-gathers match)."""
    source = cfg.checkpoint.init_from  # train() has checked that it is set
    with torch.device("meta"):
        parent = GPT(cfg.model)
    path = Path(source)
    if not ((path / "config.json").is_file() and not (path / "config.yaml").is_file()):  # not a HF dir
        import yaml

        cfg_file = resolve_model_dir(path) / "config.yaml"
        if cfg_file.is_file():
            pcfg = TrainerConfig.model_validate(yaml.safe_load(cfg_file.read_text()))
            if pcfg.stage == "ternary" and pcfg.ternary is not None:
                from .ternary import apply_ternary

                apply_ternary(parent, pcfg.ternary, ramp=1.0)
    if ep is not None:
        from .expert_parallel import shard_experts

        shard_experts(parent, ep.ep_group, ep.shard)
    parent.to_empty(device=device)
    parent.init_buffers()  # and the aux-free bias, which a Hugging Face checkpoint lacks
    _init_weights_from(parent, source)
    parent.requires_grad_(False)
    parent.eval()
    if uses_fsdp(cfg, world):
        shard_fsdp(parent, device, ep)
    return parent


PREFETCH_DEPTH = 4  # micro-batches whose teacher answers are fetched ahead


def _distill_setup(cfg: TrainerConfig, run_dir: Path, loader, tokenizer, limit: int, rank: int, world: int,
                   device: torch.device, state: dict | None):
    """The micro-batch source of stage distill: a prefetcher (topk_logprobs, cross_tokenizer) or
    the sequence-level feed. `state`: the checkpoint's train_state (for the feed's position)."""
    from .distill import AsyncTeacher

    teacher = AsyncTeacher.from_config(cfg.distill.teacher, cache_dir=run_dir / "teacher-cache")
    method = cfg.distill.method
    if method == "topk_logprobs":
        from .distill.runner import TeacherPrefetcher

        return TeacherPrefetcher(teacher, loader, cfg.distill.top_k, cfg.model.vocab_size,
                                 depth=PREFETCH_DEPTH, limit=limit, tokenizer=tokenizer)
    if method == "cross_tokenizer":
        from .distill.align import CrossTokenizerPrefetcher

        return CrossTokenizerPrefetcher(teacher, loader, cfg.distill.top_k, tokenizer, depth=PREFETCH_DEPTH,
                                        limit=limit)
    from .distill.sequence import SequenceFeed

    saved = SequenceFeed.rank_state((state or {}).get("distill"), rank, world)
    return SequenceFeed(teacher, cfg, loader, tokenizer, rank, world, device, state=saved, limit=limit)


def train(cfg: TrainerConfig, progress: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) training; returns the last step's record. Rank 0 writes all files.

    stage "ternary": BitLinear layers (ternary.py), started from checkpoint.init_from. With
    ternary.distill_from_parent a frozen copy of that parent is loaded too (also on resume) and the
    loss is mixed_loss(CE, full-vocabulary KL(parent || student), ternary.parent_alpha); with a
    distill block instead, the student distils from the teacher exactly as in stage distill.

    stage "distill": method topk_logprobs (shared tokenizer) and cross_tokenizer: loss =
    mixed_loss(CE, top-k KL to the teacher, alpha), the teacher's answers for the next micro-batches
    prefetched in a background thread; a micro-batch whose teacher request failed (after retries)
    trains on CE alone when distill.continue_without_teacher (counted as teacher_skipped), else
    the run stops. Method sequence: CE on micro-batches whose rows are (in part) teacher
    completions, produced in a background thread (distill/sequence.py).
    """
    parent_kd = cfg.stage == "ternary" and cfg.ternary is not None and cfg.ternary.distill_from_parent
    if parent_kd and not cfg.checkpoint.init_from:
        raise ValueError("ternary.distill_from_parent needs checkpoint.init_from (the parent's checkpoint; a "
                         "TrainingRun gets it from init.fromTrainingRun)")
    rank, world, device = setup_distributed(cfg.device)
    run_dir = Path(cfg.checkpoint.dir)
    is_main = rank == 0
    torch.manual_seed(cfg.seed)

    from .tokenizer import build_tokenizer

    if is_main:
        _inherit_tokenizer(cfg, run_dir)
        tokenizer = build_tokenizer(cfg, run_dir)
    barrier(world)
    if not is_main:
        tokenizer = build_tokenizer(cfg, run_dir)

    # Built on the meta device and materialised on `device` only once expert parallelism has cut
    # the experts down to this rank's slice: no rank ever holds all of an MoE's experts (the
    # dense part is whole until FSDP2 shards it, in wrap_model).
    with torch.device("meta"):
        model = GPT(cfg.model)
    if cfg.stage == "ternary":
        from .ternary import apply_ternary

        apply_ternary(model, cfg.ternary)
    from .expert_parallel import setup_expert_parallel

    ep = setup_expert_parallel(model, cfg, world, rank)  # None unless expert_parallel > 1
    model.to_empty(device=device)
    resume_from = latest_checkpoint(run_dir) if cfg.checkpoint.resume else None
    if resume_from is not None:
        model.init_buffers()  # the checkpoint's weights are loaded below, once the optimizers exist
    elif cfg.checkpoint.init_from:
        model.init_buffers()
        _init_weights_from(model, cfg.checkpoint.init_from)
    else:
        model.init_weights(cfg.seed)  # the same weights whatever the layout
    wrapped = wrap_model(model, cfg, device, world, ep)
    opts = build_optimizers(model, cfg.optimizer)

    from .data.loader import TokenLoader

    loader = TokenLoader(cfg, tokenizer, rank, world, device)
    start, state = 0, None
    if resume_from is not None:
        # mmap: each rank reads the parts it keeps, not the whole optimizer state.
        state = torch.load(resume_from / "train_state.pt", map_location="cpu", weights_only=False, mmap=True)
        msd = read_weights(model, resume_from)  # this rank's expert rows only
        if cfg.model.tie_embeddings:
            msd["lm_head.weight"] = msd["embed_tokens.weight"]
        load_full_state(model, opts, msd, _matching_optimizer_states(model, opts, state["optimizers"], resume_from),
                        ep)
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        start = state["step"]

    metrics = TrainerMetrics(str(run_dir), cfg.metrics.port, enabled=is_main)
    seq_len = cfg.resolved_seq_len
    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum * world
    flops_tok = model_flops_per_token(cfg.model, seq_len)
    peak = peak_flops(device)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    metrics.set(total_steps=cfg.steps, step=start)
    if resume_from is not None:
        metrics.set(checkpoint_step=start)
    ramp = None
    if cfg.stage == "ternary":
        from .ternary import ramp_value, set_ramp

        ramp = lambda s: set_ramp(model, ramp_value(s, cfg.ternary.ramp_steps))  # noqa: E731

    prefetch = parent = None
    if parent_kd:
        parent = _load_parent(cfg, device, world, ep)
    if cfg.distill is not None and cfg.stage in ("distill", "ternary"):
        prefetch = _distill_setup(cfg, run_dir, loader, tokenizer, max(0, cfg.steps - start) * cfg.grad_accum,
                                  rank, world, device, state)
    try:
        record = _loop(cfg, start, wrapped, model, opts, loader, tokenizer, world, is_main, device, autocast,
                       metrics, progress, ramp, run_dir, tokens_per_step, flops_tok, peak, prefetch, ep, parent)
    finally:
        if prefetch is not None:
            prefetch.close()
    whole = unsharded(model, cfg, world, ep, is_main)  # collective under FSDP or EP: every rank enters
    if is_main and (start < cfg.steps or not (run_dir / "final").is_dir()):
        save_weights(run_dir / "final", whole, cfg, tokenizer)
        if cfg.stage == "ternary":
            from .ternary_pack import save_packed

            save_packed(whole, cfg.model.model_dump(mode="json"), run_dir / "model.ternary.safetensors",
                        dtype=torch.bfloat16)
    barrier(world)
    return record


def _parent_loss(cfg, wrapped, model, parent, x, y, stats: dict) -> torch.Tensor:
    """ternary.distill_from_parent: mixed_loss(CE, full-vocabulary KL(parent || student), parent_alpha)."""
    import torch.nn.functional as F

    from .distill.losses import full_kl_loss, mixed_loss

    with torch.no_grad():
        p_logits = parent(x)
    logits = wrapped(x)
    ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1) + model.aux_loss()
    kd = full_kl_loss(logits, p_logits, y != -1, cfg.ternary.parent_temperature)
    stats["kd_sum"] += kd.detach()
    stats["kd_n"] += 1
    return mixed_loss(ce, kd, cfg.ternary.parent_alpha)


def _micro_loss(cfg, wrapped, model, x, y, prefetch, fut, stats: dict, parent=None) -> torch.Tensor:
    """The micro-batch's loss: CE, or for topk_logprobs / cross_tokenizer mixed_loss(CE, top-k KL)
    (CE only on a skipped micro-batch), or with a parent (ternary.distill_from_parent)
    mixed_loss(CE, full KL to the parent). Sequence-level rows are trained on with CE: fut is None."""
    if parent is not None:
        return _parent_loss(cfg, wrapped, model, parent, x, y, stats)
    if prefetch is None or fut is None:
        return wrapped(x, y)
    import torch.nn.functional as F

    from .distill import TeacherError, mixed_loss, topk_kl_loss
    from .distill.teacher import FATAL_STATUS

    try:
        t_ids, t_lps, mask = prefetch.result(fut, x)
    except TeacherError as exc:
        if exc.status in FATAL_STATUS:
            raise TeacherError(f"distillation teacher {cfg.distill.teacher.url} refuses requests (HTTP "
                               f"{exc.status}): check distill.teacher.url, .model and the API key: {exc}",
                               status=exc.status) from exc
        if not cfg.distill.continue_without_teacher:
            raise TeacherError(f"distillation teacher {cfg.distill.teacher.url} failed and "
                               f"distill.continue_without_teacher is false: {exc}") from exc
        stats["teacher_skipped"] += 1
        stats["last_teacher_error"] = str(exc)[:300]
        return wrapped(x, y)
    mask = mask & (y != -1)
    if cfg.distill.method == "cross_tokenizer" and mask.float().mean().item() < cfg.distill.min_aligned_fraction:
        stats["unaligned_skipped"] += 1  # too few positions to distil on: the LM loss alone
        return wrapped(x, y)
    logits = wrapped(x)
    ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1) + model.aux_loss()
    kd = topk_kl_loss(logits, t_ids, t_lps, mask, cfg.distill.temperature)
    stats["kd_sum"] += kd.detach()
    stats["kd_n"] += 1
    return mixed_loss(ce, kd, cfg.distill.alpha)


def _distill_record(cfg, prefetch, stats: dict) -> dict:
    """Teacher figures for the step record (log.jsonl)."""
    t = prefetch.teacher.stats()
    rec: dict = {"teacher": {k: t[k] for k in ("requests", "cache_hits", "errors", "retries")}}
    rec["teacher"]["latency_s"] = round(t["latency_s"], 3)
    if cfg.distill.method == "sequence":
        seq = prefetch.stats()
        rec["teacher_skipped"] = prefetch.skipped_rows  # rows of plain data where teacher rows were due
        rec["sequences"] = seq
        if prefetch.producer.last_error:
            rec["teacher_error"] = prefetch.producer.last_error
        return rec
    rec["kd_loss"] = (stats["kd_sum"] / stats["kd_n"]).item() if stats["kd_n"] else None
    rec["teacher_skipped"] = stats["teacher_skipped"]
    if cfg.distill.method == "cross_tokenizer":
        rec["alignment"] = {**prefetch.stats(), "unaligned_skipped": stats["unaligned_skipped"]}
    if stats["last_teacher_error"]:
        rec["teacher_error"] = stats["last_teacher_error"]
    return rec


def _loop(cfg, start, wrapped, model, opts, loader, tokenizer, world, is_main, device, autocast, metrics, progress,
          ramp, run_dir, tokens_per_step, flops_tok, peak, prefetch, ep=None, parent=None) -> dict:
    from .data.loader import merge_states
    from .expert_parallel import clip_grad_norm_, reduce_expert_grads
    from .moe import load_summary, step_expert_loads, update_moe_biases

    stats: dict = {"teacher_skipped": 0, "unaligned_skipped": 0, "last_teacher_error": None}
    since_checkpoint: dict = {}  # per-expert loads summed since the last checkpoint (expert_load.jsonl)
    record: dict = {"step": start}
    skipped_before = 0  # teacher_skipped after the previous step: teacher_up says whether this step skipped
    wrapped.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        set_lr(opts, lr_multiplier(step, cfg.steps, cfg.schedule))
        if ramp is not None:
            ramp(step)
        loss_sum = torch.zeros((), device=device)
        stats["kd_sum"], stats["kd_n"] = torch.zeros((), device=device), 0
        for micro in range(cfg.grad_accum):
            if prefetch is not None:
                x, y, _, fut = prefetch.next()
            else:
                (x, y), fut = loader.next_batch(), None
            last = micro == cfg.grad_accum - 1
            sync = wrapped.no_sync() if (hasattr(wrapped, "no_sync") and not last) else nullcontext()
            with sync, autocast:
                loss = _micro_loss(cfg, wrapped, model, x, y, prefetch, fut, stats, parent) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        if ep is not None:
            reduce_expert_grads(model, ep)  # DDP averaged the dense weights only
        grad_norm = clip_grad_norm_(model, cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else float("inf"), ep)
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loads = step_expert_loads(model)  # collective: the step's loads over all ranks
        update_moe_biases(model, loads)
        for name, load in loads.items():
            since_checkpoint[name] = since_checkpoint.get(name, 0) + load
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            if parent is not None or prefetch is not None:  # kd_loss: the mean over every rank's micro-batches
                kd = torch.stack([stats["kd_sum"].float(), torch.tensor(float(stats["kd_n"]), device=device)])
                dist.all_reduce(kd)
                stats["kd_sum"], stats["kd_n"] = kd[0], int(kd[1].item())
        done = step + 1
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt
        record = {"step": done, "loss": loss_sum.item(), "lr": opts[-1].param_groups[0]["lr"],
                  "grad_norm": float(grad_norm), "tokens_per_second": tps, "step_time": dt,
                  "mfu": (tps * flops_tok / (peak * world)) if peak else None}
        if loads and is_main:  # the summary reads the loads back to the host: only where it is logged
            record["moe"] = load_summary(loads)
            metrics.set(moe_load_imbalance=record["moe"]["load_imbalance"],
                        moe_dead_experts=record["moe"]["dead_experts"])
        if parent is not None:
            record["kd_loss"] = (stats["kd_sum"] / stats["kd_n"]).item() if stats["kd_n"] else None
        if prefetch is not None:
            record.update(_distill_record(cfg, prefetch, stats))
            t = record["teacher"]
            skipped_now, skipped_before = record["teacher_skipped"] > skipped_before, record["teacher_skipped"]
            metrics.set(teacher_up=0 if skipped_now else 1,
                        teacher_requests=t["requests"], teacher_cache_hits=t["cache_hits"],
                        teacher_errors=t["errors"], teacher_latency_seconds=t["latency_s"],
                        teacher_skipped=record["teacher_skipped"])
        metrics.set(step=done, loss=record["loss"], tokens_per_second=tps, learning_rate=record["lr"],
                    grad_norm=record["grad_norm"], mfu=record["mfu"])
        if is_main and (done % cfg.metrics.log_every == 0 or done == cfg.steps or step == start):
            metrics.log(record)
        if progress is not None and is_main:
            progress(record)
        if done % cfg.checkpoint.every == 0 or done == cfg.steps:
            lstate = prefetch.resume_state() if prefetch is not None else None
            dstate = prefetch.state_dict() if hasattr(prefetch, "state_dict") else None
            _checkpoint(cfg, run_dir, done, model, opts, loader, tokenizer, world, is_main, device, merge_states,
                        lstate, dstate, ep)
            metrics.set(checkpoint_step=done)
            if since_checkpoint and is_main:
                _log_expert_load(run_dir, done, since_checkpoint)
            since_checkpoint = {}
    return record


def _log_expert_load(run_dir: Path, step: int, loads: dict) -> None:
    """Append the routed tokens per expert of every MoE layer since the previous checkpoint to
    <run>/expert_load.jsonl (per checkpoint, not per step: at 48 layers x 512 experts a line is
    ~150 KB)."""
    import json

    line = {"step": step, "layers": {name: [int(x) for x in load.tolist()] for name, load in loads.items()}}
    with open(run_dir / "expert_load.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def _checkpoint(cfg, run_dir, step, model, opts, loader, tokenizer, world, is_main, device, merge_states,
                loader_state=None, distill_state=None, ep=None) -> None:
    """`loader_state`: this rank's loader state to save when batches were prefetched past it;
    `distill_state`: this rank's position in the teacher-sequence stream (method sequence)."""
    msd, osds = full_state(model, opts, ep)  # collective: every rank, even those given empty dicts
    mine = loader_state if loader_state is not None else loader.state_dict()
    loader_states, distill_states = [None] * world, [None] * world
    if world > 1:
        dist.all_gather_object(loader_states, mine)
        if distill_state is not None:
            dist.all_gather_object(distill_states, distill_state)
    else:
        loader_states, distill_states = [mine], [distill_state]
    if is_main:
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        state = {"step": step, "optimizers": osds, "loader": merge_states(loader_states), "rng": rng}
        if distill_state is not None:
            state["distill"] = distill_states
        save_checkpoint(run_dir, step, msd, state, cfg, tokenizer, cfg.checkpoint.keep)
    barrier(world)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanochat_trainer.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="trainer config (YAML/JSON): a TrainerConfig")
    args = parser.parse_args(argv)
    from .cli import run_guarded

    return run_guarded(lambda: (train(load_trainer_config(args.config)), 0)[1])


if __name__ == "__main__":
    sys.exit(main())
