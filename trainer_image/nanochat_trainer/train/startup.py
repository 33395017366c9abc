"""Start-up: everything a run builds before its first step.

    tokenizer = run_tokenizer(cfg, layout, env)       # trained or read once, shared by the ranks
    model, ep = build_model(cfg, env)                 # on the meta device, then this rank's part only
    initialise(model, cfg, resuming=False)            # random, checkpoint.init_from, or buffers only
    parent = load_parent(cfg, env, ep)                # ternary.distill_from_parent's frozen teacher
    feed = build_feed(cfg, layout, loader, tokenizer, env)

The model is built on the meta device and materialised on the run's device only once expert
parallelism has cut the experts down to this rank's slice: no rank ever holds all of an MoE's
experts (the dense part is whole until FSDP2 shards it, in `parallel.apply.wrap_model`).
"""

from __future__ import annotations

import shutil

import torch

from ..checkpoint import load_state_into, read_config, resolve_model_dir
from ..config import TrainerConfig
from ..contract import MODEL_CONFIG, TOKENIZER_FILE, RunLayout, is_hf_model_dir
from ..data.feed import BatchSource, LoaderFeed
from ..data.loader import TokenLoader
from ..distill.align import CrossTokenizerFeed
from ..distill.sequence import SequenceFeed
from ..distill.teacher import AsyncTeacher, url_problem
from ..distill.topk import TopkFeed
from ..errors import ConfigError
from ..models.gpt import GPT, architecture_differences
from ..models.hf_adapter import read_hf_state
from ..models.moe import held_expert_rows
from ..models.ternary import apply_ternary
from ..parallel.apply import shard_fsdp, uses_fsdp
from ..parallel.distributed import Env, barrier
from ..parallel.expert_parallel import ExpertParallel, setup_expert_parallel, shard_experts
from ..tokenizer import Tokenizer, build_tokenizer


def run_tokenizer(cfg: TrainerConfig, layout: RunLayout, env: Env) -> Tokenizer:
    """The run's tokenizer: rank 0 trains or reads it (and keeps it in the run directory) before
    the other ranks read that copy, so a trained tokenizer is trained once."""
    if env.is_main:
        inherit_tokenizer(cfg, layout)
        tokenizer = build_tokenizer(cfg, layout.root)
    barrier(env)
    if not env.is_main:
        tokenizer = build_tokenizer(cfg, layout.root)
    return tokenizer


def inherit_tokenizer(cfg: TrainerConfig, layout: RunLayout) -> None:
    """A bpe run started from a nanochat checkpoint (checkpoint.init_from) without tokenizer.path
    takes that checkpoint's tokenizer.json: its weights were trained with those ids (a bpe
    trained afresh on this run's data would differ whenever the data does)."""
    if not cfg.checkpoint.init_from or cfg.tokenizer.kind != "bpe" or cfg.tokenizer.path:
        return
    if layout.tokenizer.is_file() or is_hf_model_dir(cfg.checkpoint.init_from):
        return  # a Hugging Face dir's tokenizer is named by tokenizer.path
    try:
        model_dir = resolve_model_dir(cfg.checkpoint.init_from)
    except ValueError:
        return  # init_weights_from reports the bad path
    if (model_dir / TOKENIZER_FILE).is_file():
        layout.root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir / TOKENIZER_FILE, layout.tokenizer)


def build_model(cfg: TrainerConfig, env: Env) -> tuple[GPT, ExpertParallel | None]:
    """The model on this rank's device, with ternary layers for stage ternary and this rank's
    experts only under expert parallelism; its tensors are uninitialised (see `initialise`)."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    if cfg.stage == "ternary":
        apply_ternary(model, cfg.ternary)
    ep = setup_expert_parallel(model, cfg, env.world, env.rank)  # None unless expert_parallel > 1
    model.to_empty(device=env.device)
    return model, ep


def initialise(model: GPT, cfg: TrainerConfig, resuming: bool) -> None:
    """Random weights (the same whatever the layout), or checkpoint.init_from's; a resumed run sets
    only the buffers, its checkpoint's weights come once the optimizers exist."""
    if resuming:
        model.init_buffers()
    elif cfg.checkpoint.init_from:
        model.init_buffers()  # and the aux-free bias, which a Hugging Face checkpoint lacks
        init_weights_from(model, cfg.checkpoint.init_from)
    else:
        model.init_weights(cfg.seed)


def init_weights_from(model: GPT, source: str) -> None:
    """`checkpoint.init_from`: a nanochat model/run dir, or a Hugging Face Qwen3 dir. Under expert
    parallelism the model holds this rank's experts, and only their rows are read."""
    if not is_hf_model_dir(source):
        load_state_into(model, resolve_model_dir(source))
        return
    rows = set(held_expert_rows(model).values())  # one (first, count) for every MoE layer, or none
    sd, hf_cfg = read_hf_state(source, model.cfg.max_seq_len, next(iter(rows)) if rows else None)
    differ = architecture_differences(hf_cfg, model.cfg)
    if differ:
        raise ValueError(
            f"checkpoint.init_from={source!r}: its architecture differs from trainer.model ({'; '.join(differ[:4])})"
        )
    if model.cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # Hugging Face has no aux-free router bias: it keeps its zero init.
    if unexpected or any(not k.endswith("expert_bias") for k in missing):
        raise ValueError(f"checkpoint.init_from={source!r}: weights do not fit ({missing[:3]}, {unexpected[:3]})")


def load_parent(cfg: TrainerConfig, env: Env, ep: ExpertParallel | None) -> GPT:
    """`ternary.distill_from_parent`: a frozen copy of `checkpoint.init_from` (the full-precision
    parent), eval mode, no gradients, on the student's device. Loaded at every start, also on resume
    (the student then comes from its own checkpoint, the parent still from init_from). A parent
    that is itself a ternary run is evaluated as it was trained (BitLinear, ramp 1). Laid out as the
    student is: its experts split over the same expert-parallel groups (each rank reads only its
    rows) and sharded with FSDP2 when the student is (every rank runs its forward, so the
    exchanges and all-gathers match)."""
    source = cfg.checkpoint.init_from
    assert source, "train() checks that a parent is named"
    with torch.device("meta"):
        parent = GPT(cfg.model)
    parent_dir = None if is_hf_model_dir(source) else resolve_model_dir(source)
    if parent_dir is not None and (parent_dir / MODEL_CONFIG).is_file():
        pcfg = read_config(parent_dir)
        if pcfg.stage == "ternary" and pcfg.ternary is not None:
            apply_ternary(parent, pcfg.ternary, ramp=1.0)
    if ep is not None:
        shard_experts(parent, ep.ep_group, ep.shard)
    parent.to_empty(device=env.device)
    parent.init_buffers()  # and the aux-free bias, which a Hugging Face checkpoint lacks
    init_weights_from(parent, source)
    parent.requires_grad_(False)
    parent.eval()
    if uses_fsdp(cfg, env.world):
        shard_fsdp(parent, env.device, ep)
    return parent


def build_feed(
    cfg: TrainerConfig, layout: RunLayout, loader: TokenLoader, tokenizer: Tokenizer, env: Env
) -> BatchSource:
    """Where the run's micro-batches come from: the plain loader, or in front of it the feed of
    `distill.method` (stage distill, or stage ternary with a distill block)."""
    if cfg.distill is None or cfg.stage not in ("distill", "ternary"):
        return LoaderFeed(loader)
    problem = url_problem(cfg.distill.teacher.url)
    if problem:  # else every request fails as if the teacher were down, and the run trains without it
        raise ConfigError("distill.teacher.url", cfg.distill.teacher.url, problem)
    teacher = AsyncTeacher.from_config(cfg.distill.teacher, cache_dir=layout.teacher_cache)
    if cfg.distill.method == "topk_logprobs":
        return TopkFeed(teacher, loader, cfg.distill, cfg.model.vocab_size, tokenizer)
    if cfg.distill.method == "cross_tokenizer":
        return CrossTokenizerFeed(teacher, loader, cfg.distill, tokenizer)
    return SequenceFeed(teacher, cfg, loader, tokenizer, env.rank, env.world)
