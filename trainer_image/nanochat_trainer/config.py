"""The trainer's configuration: pydantic models, importable without torch.

These models are the single source of truth for a run's settings. The trainer reads
them from a YAML/JSON file (`python -m nanochat_trainer.train --config FILE`), and the
operator embeds `TrainerConfig` as `spec.trainer` of a TrainingRun, so the CRD schema
is generated from the same classes.

A `preset` fills in every field it names; fields the user writes win over the preset:

    TrainerConfig.model_validate({"preset": "tiny", "steps": 50})
"""

from __future__ import annotations

import copy
import os
from pathlib import PurePath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# GPT-2's 50,257 tokens padded to a multiple of 64: the head's and embedding's matmuls tile evenly
# on tensor cores (nanoGPT, nanochat). The rows past the tokenizer are never a target, and
# sampling never picks them (eval/generate.py reads only the tokenizer's ids).
GPT2_VOCAB_PADDED = 50304


class Strict(BaseModel):
    """Unknown fields are errors: a typo must never silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MoEConfig(Strict):
    """Mixture of experts in the feed-forward blocks (Qwen3-MoE style)."""

    n_experts: int = Field(8, ge=2, description="Routed experts per MoE layer.")
    top_k: int = Field(2, ge=1, description="Experts each token is routed to.")
    expert_ffn_dim: int = Field(256, ge=1, description="Hidden size of each routed expert.")
    n_shared_experts: int = Field(1, ge=0, le=1, description="Shared expert (always on, gated).")
    shared_expert_ffn_dim: int = Field(256, ge=1, description="Hidden size of the shared expert.")
    norm_topk_prob: bool = Field(True, description="Renormalise the top-k router weights to sum to 1.")
    balance: Literal["aux_loss", "aux_free"] = Field(
        "aux_loss", description="Load balancing: auxiliary loss, or the auxiliary-loss-free bias method."
    )
    aux_loss_weight: float = Field(0.001, ge=0, description="Weight of the load-balancing loss.")
    balance_scope: Literal["global", "micro_batch"] = Field(
        "global",
        description="Tokens the load-balancing loss balances over: global counts every rank's "
        "micro-batch (the expert loads are all-reduced; Qwen's global-batch balancing, which lets experts "
        "specialise per domain), micro_batch this rank's alone.",
    )
    z_loss_weight: float = Field(0.001, ge=0, description="Weight of the router z-loss.")
    bias_update_rate: float = Field(0.001, ge=0, description="Bias step of the aux-free method.")
    dense_layers: list[int] = Field(
        default_factory=list, description="Layer indices that keep a dense MLP instead of experts."
    )

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} is larger than n_experts={self.n_experts}")
        return self


class HybridConfig(Strict):
    """Qwen3-Next style hybrid stack: Gated DeltaNet layers with a full-attention layer every N."""

    full_attention_interval: int = Field(4, ge=1, description="Every N-th layer is full (gated) attention.")
    linear_num_key_heads: int = Field(2, ge=1, description="Gated DeltaNet key heads.")
    linear_num_value_heads: int = Field(4, ge=1, description="Gated DeltaNet value heads.")
    linear_key_head_dim: int = Field(32, ge=1, description="Gated DeltaNet key head size.")
    linear_value_head_dim: int = Field(32, ge=1, description="Gated DeltaNet value head size.")
    conv_kernel: int = Field(4, ge=1, description="Short causal convolution width.")
    chunk_size: int = Field(64, ge=1, description="Chunk length of the chunked training kernel.")
    partial_rotary_factor: float = Field(0.25, gt=0, le=1, description="Share of head dims rotated by RoPE.")

    @model_validator(mode="after")
    def _check(self) -> HybridConfig:
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                f"linear_num_key_heads={self.linear_num_key_heads}"
            )
        return self


class ModelConfig(Strict):
    """Architecture: a Qwen3-style decoder (GQA, RoPE, RMSNorm, SwiGLU, QK-norm)."""

    vocab_size: int = Field(GPT2_VOCAB_PADDED, ge=2, description="Embedding rows; at least the tokenizer's vocabulary.")
    dim: int = Field(768, ge=8, description="Model width.")
    n_layers: int = Field(12, ge=1, description="Transformer blocks.")
    n_heads: int = Field(12, ge=1, description="Query heads.")
    n_kv_heads: int = Field(4, ge=1, description="Key/value heads (GQA); must divide n_heads.")
    head_dim: int | None = Field(None, ge=1, description="Per-head size; default dim / n_heads.")
    ffn_mult: float = Field(2.667, gt=0, description="SwiGLU hidden size as a multiple of dim.")
    ffn_dim: int | None = Field(None, ge=1, description="Explicit SwiGLU hidden size (overrides ffn_mult).")
    max_seq_len: int = Field(2048, ge=8, description="Longest sequence (RoPE table and KV cache size).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")
    norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    qk_norm: bool = Field(True, description="RMSNorm on queries and keys per head (Qwen3).")
    tie_embeddings: bool = Field(False, description="Share the input embedding with the output head.")
    moe: MoEConfig | None = Field(None, description="Mixture-of-experts feed-forward; dense when absent.")
    hybrid: HybridConfig | None = Field(None, description="Gated DeltaNet / gated attention hybrid stack.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide dim={self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def resolved_ffn_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        # Round up to a multiple of 64 so matmuls stay tensor-core friendly.
        return -(-int(self.ffn_mult * self.dim) // 64) * 64


class TokenizerConfig(Strict):
    """GPT-2's BPE (tiktoken, or a tokenizer.json), or a byte-level BPE trained on the data."""

    kind: Literal["gpt2", "bpe"] = Field("gpt2", description="gpt2: GPT-2's BPE; bpe: trained byte-level BPE.")
    path: str | None = Field(
        None,
        description="tokenizer.json or tiktoken .tiktoken file; for bpe, where the trained one is kept "
        "(default: <checkpoint.dir>/tokenizer.json).",
    )
    train_docs: int = Field(2000, ge=1, description="Documents a bpe tokenizer is trained on when it is missing.")


class SourceConfig(Strict):
    """One source of documents."""

    source: Literal["synthetic", "huggingface", "local", "stdlib"] = Field(
        "synthetic",
        description="Data source; stdlib: the Python standard library's own modules (real code, offline); "
        "local: a folder, a .jsonl or .parquet file, or a generation run's dataset folder (its manifest.json).",
    )
    seed: int = Field(0, description="Seed of the synthetic generator and of shuffling.")
    dataset: str = Field("bigcode/the-stack", description="Hugging Face dataset (source=huggingface).")
    data_dir: str | None = Field("data/python", description="Subset folder of the dataset (The Stack: data/python).")
    split: str = Field("train", description="Dataset split.")
    text_field: str = Field("content", description="Column/key holding the text (HF dataset, JSONL, Parquet).")
    token_env: str = Field("HF_TOKEN", description="Environment variable holding the Hugging Face token.")
    path: str | None = Field(None, description="Local folder of source files, or a .jsonl / .parquet file.")
    glob: str = Field("**/*.py", description="Files taken from a local folder.")
    holdout_repos: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of repositories (by a hash of repo_field; for a local folder, its first-level "
        "folders) held out: training never reads their files; validation.heldout validates on them.",
    )
    repo_field: str = Field(
        "max_stars_repo_name", description="Column/key naming a document's repository (The Stack's default)."
    )

    @model_validator(mode="after")
    def _check_source(self) -> SourceConfig:
        if self.source == "local" and not self.path:
            raise ValueError("path is required when source='local'")
        return self


class WeightedSource(SourceConfig):
    """One source of a mixture and its share of the documents."""

    name: str = Field(..., min_length=1, max_length=63, description="Name in the log and the checkpoint.")
    weight: float = Field(
        ..., gt=0, description="Relative share of the documents drawn from this source (normalised over the mixture)."
    )


class DataConfig(SourceConfig):
    """Where training text comes from: one source, or a weighted mixture of sources."""

    source: Literal["synthetic", "huggingface", "local", "stdlib", "mixture"] = Field(
        "synthetic",
        description="Data source; stdlib: the Python standard library's own modules (real code, offline); "
        "local: a folder, a .jsonl or .parquet file, or a generation run's dataset folder (its manifest.json); "
        "mixture: the weighted sources of data.mixture.",
    )
    mixture: list[WeightedSource] = Field(
        default_factory=list,
        description="source=mixture: the sources and their weights. Documents are drawn block by block in a fixed "
        "interleaving of the weights (shares of documents, not tokens); the tokens taken from each source are "
        "in log.jsonl (data_tokens) and the checkpoint, and a resumed run must keep the same mixture.",
    )
    decontaminate: bool = Field(
        True,
        description="Drop every document sharing a 13-gram with a HumanEval prompt or canonical solution "
        "(counted in log.jsonl as decontaminated).",
    )

    @model_validator(mode="after")
    def _check_mixture(self) -> DataConfig:
        if self.source == "mixture":
            if not self.mixture:
                raise ValueError("source='mixture' needs data.mixture: a list of sources with a name and a weight")
            names = [m.name for m in self.mixture]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"mixture names repeat: {', '.join(dup)}")
        elif self.mixture:
            raise ValueError(f"mixture is set but source={self.source!r}: set source='mixture'")
        return self

    def sources(self) -> list[WeightedSource]:
        """The weighted sources: the mixture's, or this one source under its own name with weight 1."""
        if self.source == "mixture":
            return list(self.mixture)
        fields = {k: getattr(self, k) for k in SourceConfig.model_fields}
        return [WeightedSource(name=self.source, weight=1.0, **fields)]


class EvaluationConfig(Strict):
    """pass@1 during training (greedy, in the sandbox), and the best checkpoint by it:
    log.jsonl's pass_at_1, the pass_at_1 gauges, status.passAt1 and bestPassAt1, <run>/best."""

    benchmark: Literal["humaneval", "synthetic"] = Field(
        "humaneval",
        description="humaneval: HumanEval's problems; synthetic: held-out problems of the synthetic generator "
        "(a seed training never reads; the tests are the documents' own asserts), for small models.",
    )
    every: int = Field(1000, ge=1, description="Steps between evaluations (the last step always evaluates).")
    problems: int | None = Field(
        None, ge=1, le=1000, description="Score the first N problems, a fixed subset; default 164 (all of HumanEval)."
    )
    max_new_tokens: int = Field(256, ge=1, le=4096, description="Completion length.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")
    timeout_s: float = Field(5.0, gt=0, description="Sandbox time limit per completion.")
    workers: int = Field(4, ge=1, description="Completions judged in parallel.")


class ValidationConfig(Strict):
    """Loss on held-out documents during training: log.jsonl's val_loss, the val_loss gauge,
    status.valLoss."""

    data: DataConfig = Field(
        default_factory=lambda: DataConfig(source="stdlib"),
        description="Where held-out documents come from: any data source; by default the standard library.",
    )
    heldout: bool = Field(
        False, description="Validate on the training data's held-out repositories (data.holdout_repos) instead."
    )
    every: int = Field(250, ge=1, description="Steps between validations (the last step always validates).")
    tokens: int = Field(2**18, ge=1, description="Held-out tokens per validation, over all ranks.")
    max_overlap: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Largest share of held-out documents that may also be among the first training "
        "documents (checked before the first step).",
    )


class OptimizerConfig(Strict):
    """Muon for 2-D hidden matrices, AdamW for embeddings, head and gains."""

    name: Literal["muon", "adamw"] = Field("muon", description="Optimizer of the hidden matrices.")
    lr: float = Field(0.02, gt=0, description="Learning rate of the hidden matrices (Muon, or AdamW if name=adamw).")
    adam_lr: float = Field(0.003, gt=0, description="AdamW learning rate for embeddings, head and gains.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    momentum: float = Field(0.95, ge=0, lt=1, description="Muon momentum (Nesterov).")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 turns it off.")


class ScheduleConfig(Strict):
    """Linear warmup, then cosine or warmup-stable-decay (WSD)."""

    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    decay: Literal["cosine", "wsd", "constant"] = Field("cosine", description="Shape after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of the peak.")
    wsd_decay_frac: float = Field(0.2, gt=0, le=1, description="WSD: share of steps spent decaying at the end.")


class CheckpointConfig(Strict):
    """Atomic checkpoints; a restarted run resumes from the newest complete one."""

    dir: str = Field("runs/default", description="Run directory: checkpoints, logs, tokenizer.")
    every: int = Field(1000, ge=1, description="Steps between checkpoints (the last step always saves).")
    keep: int = Field(3, ge=1, description="Newest checkpoints kept.")
    resume: bool = Field(
        True,
        description="Resume from the newest checkpoint in dir when there is one. false: start over; an "
        "earlier run's checkpoints, final and best models and logs in dir move to dir/earlier-<UTC time>/ "
        "(the newest two such folders are kept).",
    )
    async_save: bool | None = Field(
        None,
        description=(
            "Write step checkpoints while training goes on: each rank's weights and optimizer state "
            "are copied to host memory first. Unset: when the model is sharded (FSDP2 or expert "
            "parallel), where a save is long and a rank's copy is its share; under DDP every rank "
            "would copy the whole replicated state to write 1/world of it."
        ),
    )
    init_from: str | None = Field(
        None, description="Start from these weights: a nanochat checkpoint dir, or a Hugging Face Qwen3 dir."
    )

    def saves_async(self, sharded: bool) -> bool:
        """async_save, or when unset whether the model is sharded (FSDP2 or expert parallel): the
        one rule the trainer follows and the operator sizes pods by."""
        return self.async_save if self.async_save is not None else sharded


class MetricsConfig(Strict):
    """Rank 0's Prometheus endpoint and JSON-lines log."""

    port: int = Field(9090, ge=0, le=65535, description="Prometheus /metrics port on rank 0; 0 turns it off.")
    log_every: int = Field(10, ge=1, description="Steps between log lines.")


class TeacherConfig(Strict):
    """An OpenAI-compatible completions endpoint (vLLM, or `nanochat serve`)."""

    url: str = Field(..., description="Base URL, e.g. http://teacher:8000/v1.")
    model: str = Field(..., description="Model name the endpoint serves.")
    api_key_env: str = Field("TEACHER_API_KEY", description="Environment variable holding the API key.")
    concurrency: int = Field(
        256, ge=1, description="Requests in flight at most (256 keeps one 8-GPU vLLM server busy)."
    )
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(5, ge=0, description="Retries on 429, 5xx and connection errors.")
    cache_dir: str | None = Field(None, description="On-disk answer cache (default: <checkpoint.dir>/teacher-cache).")


class DistillConfig(Strict):
    """Knowledge distillation from a teacher endpoint."""

    teacher: TeacherConfig
    method: Literal["sequence", "topk_logprobs", "cross_tokenizer"] = Field(
        "sequence",
        description="sequence: train on teacher completions of prompts (any tokenizer); "
        "topk_logprobs: top-k logprob KL (teacher shares the student's tokenizer); cross_tokenizer: "
        "top-k KL at positions where both tokenizations share a character boundary.",
    )
    top_k: int = Field(20, ge=1, description="Teacher logprobs per position (topk_logprobs, cross_tokenizer).")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the distillation loss against the LM loss.")
    temperature: float = Field(1.0, gt=0, description="Softening temperature of the KL.")
    max_new_tokens: int = Field(128, ge=1, description="Teacher completion length (sequence-level).")
    sample_temperature: float = Field(
        0.0, ge=0, description="Sampling temperature of teacher completions (sequence); 0 is greedy."
    )
    sequence_mix: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of each micro-batch's rows taken from teacher sequences (sequence); the rest is plain data.",
    )
    filter_tests: bool = Field(
        True,
        description="Sequence-level quality filter: run a prompt's tests in the sandbox and drop "
        "completions that fail them (completions must parse as Python either way).",
    )
    test_timeout_s: float = Field(5.0, gt=0, description="Sandbox time limit per completion's tests.")
    wait_for_teacher_s: float = Field(
        600.0,
        ge=0,
        description="Sequence-level: how long a step waits for a teacher that is down before the "
        "run fails (only when continue_without_teacher is false).",
    )
    row_wait_s: float = Field(
        60.0,
        ge=0,
        description="Sequence-level, with continue_without_teacher: how long a micro-batch waits "
        "for accepted teacher rows from a teacher that answers (slowly, or mostly rejected by the filter) "
        "before plain data fills the missing rows (counted as teacher_skipped).",
    )
    min_aligned_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Cross-tokenizer: a micro-batch with fewer aligned positions trains on "
        "the LM loss alone (counted).",
    )
    continue_without_teacher: bool = Field(
        True, description="While the teacher is down, keep training on cached or plain data."
    )


class GenerateConfig(Strict):
    """stage generate: teacher-made training data, the phi-1 way. Textbook sections and exercises with
    tests, asked of the teacher with prompts seeded by topic x concept x difficulty x style; kept only
    when they parse, an exercise's tests pass in the sandbox, they are no (near-)duplicate of a kept
    one and share no 13-gram with HumanEval. Written as Parquet shards with a manifest in
    <checkpoint.dir>/dataset, which `data.source: local` reads; a restarted run resumes there."""

    teacher: TeacherConfig
    template: Literal["qwen3", "chatml", "plain"] = Field(
        "qwen3",
        description="How a request is worded: qwen3 (ChatML, thinking off), chatml (any ChatML instruct model), "
        "plain (a base model continues a Python file).",
    )
    rows: int = Field(..., ge=1, description="Accepted documents to produce; the run ends when it has them.")
    exercise_share: float = Field(
        0.8, ge=0, le=1, description="Share of requests asking for exercises (else textbook sections)."
    )
    max_new_tokens: int = Field(1024, ge=16, le=16384, description="Longest answer; a longer one is truncated.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (seeded per request, so reproducible).")
    seed: int = Field(0, description="Seed of the topic x concept x difficulty x style draws.")
    shard_rows: int = Field(5000, ge=1, description="Accepted documents per Parquet shard.")
    commit_s: float = Field(
        60.0, gt=0, description="Longest time accepted documents wait in memory before a shard is written."
    )
    near_duplicate: float = Field(
        0.8, gt=0, le=1, description="MinHash Jaccard similarity from which a document is a near-duplicate."
    )
    test_timeout_s: float = Field(5.0, gt=0, description="Sandbox time limit per exercise's tests.")
    workers: int = Field(8, ge=1, description="Exercises tested in the sandbox at once.")
    wait_for_teacher_s: float = Field(
        600.0, ge=0, description="How long the run waits for a teacher that is down before it fails."
    )


class TernaryConfig(Strict):
    """BitNet b1.58 quantization-aware training of chosen layers."""

    include: list[str] = Field(
        default_factory=lambda: ["layers.*.attn.*", "layers.*.mlp.*"],
        description="Glob patterns of module names made ternary.",
    )
    exclude: list[str] = Field(
        default_factory=lambda: ["*embed*", "*lm_head*", "*norm*", "*router*", "*conv1d*"],
        description="Glob patterns never made ternary (wins over include).",
    )
    ramp_steps: int = Field(
        0,
        ge=0,
        description="Mix full-precision into ternary weights over the first N steps. Checkpoints load and serve "
        "fully ternary, and validation and in-training HumanEval score them so, mid-ramp too: a ramp longer "
        "than the run ends it short of the model it is scored as.",
    )
    activation_bits: int = Field(8, ge=2, le=16, description="Per-token absmax activation quantization bits.")
    distill_from_parent: bool = Field(
        False,
        description="Self-distillation from the full-precision parent (checkpoint.init_from, which "
        "init.fromTrainingRun sets): a frozen copy of it is loaded and the loss is (1 - parent_alpha) * CE + "
        "parent_alpha * KL(parent || student) on the full vocabulary. Not with a distill block.",
    )
    parent_alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KL to the parent against the LM loss.")
    parent_temperature: float = Field(1.0, gt=0, description="Softening temperature of the KL to the parent.")


# parallel=auto shards with FSDP2 from here ("1B" presets and up); the operator's feasibility check
# uses the same figure, from its own parameter estimate.
FSDP_FROM_PARAMS = 900_000_000


class TrainerConfig(Strict):
    """Everything one training run needs. `spec.trainer` of a TrainingRun."""

    preset: str | None = Field(None, description="Start from a named preset; fields set here override it.")
    stage: Literal["pretrain", "distill", "ternary", "generate"] = Field(
        "pretrain", description="Training stage; generate makes training data with a teacher (no model is trained)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    evaluation: EvaluationConfig | None = Field(
        None, description="HumanEval pass@1 during training and the best checkpoint by it; off by default."
    )
    validation: ValidationConfig | None = Field(
        None, description="Held-out loss during training; the presets validate on the standard library."
    )
    distill: DistillConfig | None = Field(
        None,
        description="Teacher and method; required by stage distill, optional with stage ternary (the "
        "ternary student then distils from the teacher).",
    )
    ternary: TernaryConfig | None = Field(None, description="Ternary layers; stage ternary uses defaults if absent.")
    generate: GenerateConfig | None = Field(None, description="stage generate: the teacher and what to make of it.")
    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seq_len: int | None = Field(None, ge=8, description="Training sequence length (default model.max_seq_len).")
    seed: int = Field(1337, description="Seed of weights and sampling.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field("auto", description="auto: bf16 autocast on GPU.")
    compile: bool | None = Field(
        None,
        description="torch.compile the model. Unset: compiled on CUDA for dense models (MoE and hybrid models "
        "run eager until the GPU check has shown them compiled), never on CPU.",
    )
    fp8: bool = Field(
        False,
        description="FP8 matmuls in training: the hidden linear layers' GEMMs in float8 (e4m3 values, e5m2 "
        "gradients, one scale per tensor), the output layer and router in bf16; evaluation stays bf16. Needs "
        "FP8 tensor cores (compute capability 8.9+: L4, H100); elsewhere the run keeps its dtype and says so.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Keep only each block's input in the forward pass and recompute the block in the "
        "backward: about a third more compute for activations of one block instead of all.",
    )
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="auto: FSDP2 from 1B parameters, else DDP; with expert_parallel, for the dense weights."
    )
    expert_parallel: int = Field(
        1,
        ge=1,
        description="Expert parallelism: ranks that split each MoE layer's experts (consecutive "
        "ranks, keep them in one node); must divide model.moe.n_experts and the world size. 1: off.",
    )

    @property
    def total_steps(self) -> int:
        """What the run counts to on its `step` gauge: optimizer steps, or documents kept for stage generate."""
        return self.generate.rows if self.generate is not None else self.steps

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("preset"):
            return data
        name = data["preset"]
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is not one of {sorted(PRESETS)}")
        return deep_merge(PRESETS[name], data)

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        e = self.evaluation
        if e is not None and e.benchmark == "humaneval" and e.problems is not None and e.problems > 164:
            raise ValueError(f"evaluation.problems={e.problems}: HumanEval has 164 problems")
        if self.stage == "distill" and self.distill is None:
            raise ValueError("stage='distill' needs a distill block (teacher and method)")
        if (self.stage == "generate") != (self.generate is not None):
            raise ValueError(
                "stage='generate' needs a generate block (teacher, rows)"
                if self.generate is None
                else f"a generate block needs stage='generate' (stage is {self.stage!r})"
            )
        if self.stage == "ternary" and self.ternary is None:
            self.ternary = TernaryConfig()
        if self.ternary is not None and self.ternary.distill_from_parent:
            # checkpoint.init_from is checked when training starts: the operator fills it in from
            # init.fromTrainingRun after this spec has been validated.
            if self.stage != "ternary":
                raise ValueError(f"ternary.distill_from_parent needs stage='ternary' (stage is {self.stage!r})")
            if self.distill is not None:
                raise ValueError(
                    "ternary.distill_from_parent and a distill block are exclusive (one teacher at "
                    "a time): drop the distill block, or set ternary.distill_from_parent=false"
                )
        if self.seq_len is not None and self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.fp8 and (self.batch_size * self.resolved_seq_len) % 16:
            # The weight gradient's GEMM runs over the micro-batch's tokens: FP8 tensor cores need 16 | it.
            raise ValueError(
                f"fp8 needs batch_size x seq_len a multiple of 16 (batch_size={self.batch_size}, "
                f"seq_len={self.resolved_seq_len})"
            )
        return self

    @model_validator(mode="after")
    def _check_expert_parallel(self) -> TrainerConfig:
        ep = self.expert_parallel
        if ep > 1 and self.model.moe is None:
            raise ValueError(f"expert_parallel={ep} needs an MoE model (model.moe)")
        if ep > 1 and self.model.moe.n_experts % ep:
            raise ValueError(f"expert_parallel={ep} does not divide model.moe.n_experts={self.model.moe.n_experts}")
        return self

    @property
    def resolved_seq_len(self) -> int:
        return self.seq_len or self.model.max_seq_len


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` laid over it, recursing into dicts."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Presets: partial TrainerConfig dicts. Parameter counts are checked by tests/test_presets.py.
PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: runs the whole pipeline on CPU in minutes.
    "tiny": {
        "model": {
            "vocab_size": 1024,
            "dim": 128,
            "n_layers": 4,
            "n_heads": 4,
            "n_kv_heads": 2,
            "max_seq_len": 256,
            "tie_embeddings": False,
        },
        "tokenizer": {"kind": "bpe", "train_docs": 2000},
        "optimizer": {"lr": 0.02, "adam_lr": 0.006},
        "schedule": {"warmup_steps": 20, "decay": "cosine"},
        "checkpoint": {"every": 100},
        "validation": {"data": {"source": "stdlib"}, "every": 50, "tokens": 16384},
        "steps": 300,
        "batch_size": 16,
        "seq_len": 256,
    },
    # GPT-2-small shaped with GQA and tied embeddings (~121M).
    "nano-125M": {
        "model": {
            "vocab_size": GPT2_VOCAB_PADDED,
            "dim": 768,
            "n_layers": 12,
            "n_heads": 12,
            "n_kv_heads": 4,
            "ffn_mult": 3.0,
            "max_seq_len": 1024,
            "tie_embeddings": True,
        },
        "optimizer": {"lr": 0.02, "adam_lr": 0.003},
        "schedule": {"warmup_steps": 500},
        "validation": {"data": {"source": "stdlib"}, "every": 500, "tokens": 524288},
        "steps": 10000,
        "batch_size": 16,
    },
    # The shape first asked for as "1B": dim 1024, 24 layers, 16/4 heads. It is ~0.37B.
    "nano-360M": {
        "model": {
            "vocab_size": GPT2_VOCAB_PADDED,
            "dim": 1024,
            "n_layers": 24,
            "n_heads": 16,
            "n_kv_heads": 4,
            "ffn_mult": 2.667,
            "max_seq_len": 2048,
        },
        "optimizer": {"lr": 0.02},
        "schedule": {"warmup_steps": 2000},
        "validation": {"data": {"source": "stdlib"}, "every": 1000, "tokens": 1048576},
        "steps": 50000,
        "batch_size": 4,
    },
    # The same recipe widened to dim 1792 (head_dim 112): ~0.99B.
    "nano-1B": {
        "model": {
            "vocab_size": GPT2_VOCAB_PADDED,
            "dim": 1792,
            "n_layers": 24,
            "n_heads": 16,
            "n_kv_heads": 4,
            "ffn_mult": 2.667,
            "max_seq_len": 2048,
        },
        "optimizer": {"lr": 0.02},
        "schedule": {"warmup_steps": 2000},
        "validation": {"data": {"source": "stdlib"}, "every": 1000, "tokens": 1048576},
        "steps": 50000,
        "batch_size": 4,
    },
    # "tiny" with 8 routed experts (top-2) and a gated shared expert in every layer: the
    # MoE path end to end on CPU.
    "tiny-moe": {
        "model": {
            "vocab_size": 1024,
            "dim": 128,
            "n_layers": 4,
            "n_heads": 4,
            "n_kv_heads": 2,
            "max_seq_len": 256,
            "tie_embeddings": False,
            "moe": {
                "n_experts": 8,
                "top_k": 2,
                "expert_ffn_dim": 128,
                "n_shared_experts": 1,
                "shared_expert_ffn_dim": 128,
            },
        },
        "tokenizer": {"kind": "bpe", "train_docs": 2000},
        "optimizer": {"lr": 0.02, "adam_lr": 0.006},
        "schedule": {"warmup_steps": 20, "decay": "cosine"},
        "checkpoint": {"every": 100},
        "validation": {"data": {"source": "stdlib"}, "every": 50, "tokens": 16384},
        "steps": 300,
        "batch_size": 16,
        "seq_len": 256,
    },
    # A miniature Qwen3-Next: 3 Gated DeltaNet layers then 1 gated full-attention layer,
    # MoE everywhere, partial RoPE. Trains on CPU.
    "tiny-hybrid": {
        "model": {
            "vocab_size": 1024,
            "dim": 128,
            "n_layers": 4,
            "n_heads": 4,
            "n_kv_heads": 2,
            "head_dim": 32,
            "max_seq_len": 256,
            "tie_embeddings": False,
            "moe": {
                "n_experts": 8,
                "top_k": 2,
                "expert_ffn_dim": 128,
                "n_shared_experts": 1,
                "shared_expert_ffn_dim": 128,
            },
            "hybrid": {
                "full_attention_interval": 4,
                "linear_num_key_heads": 2,
                "linear_num_value_heads": 4,
                "linear_key_head_dim": 32,
                "linear_value_head_dim": 32,
                "conv_kernel": 4,
                "chunk_size": 64,
                "partial_rotary_factor": 0.25,
            },
        },
        "tokenizer": {"kind": "bpe", "train_docs": 2000},
        "optimizer": {"lr": 0.02, "adam_lr": 0.006},
        "schedule": {"warmup_steps": 20, "decay": "cosine"},
        "checkpoint": {"every": 100},
        "validation": {"data": {"source": "stdlib"}, "every": 50, "tokens": 16384},
        "steps": 300,
        "batch_size": 16,
        "seq_len": 256,
    },
    # Qwen3-Next-80B-A3B's shape (transformers' Qwen3NextConfig defaults plus the published
    # rope_theta 1e7 and intermediate_size 5120): 48 layers at dim 2048, 3 Gated DeltaNet
    # (16 QK / 32 V heads of 128) per gated full-attention layer (16 Q / 2 KV heads of 256,
    # RoPE on a quarter of each head), 512 experts of 512 top-10 plus a 512 shared expert
    # in every layer. ~79.7B parameters, ~3.3B active per token without embeddings.
    # Trained at 4096 tokens (the released model's 262144 context is RoPE-table size only).
    "qwen3-hybrid": {
        "model": {
            "vocab_size": 151936,
            "dim": 2048,
            "n_layers": 48,
            "n_heads": 16,
            "n_kv_heads": 2,
            "head_dim": 256,
            "ffn_dim": 5120,
            "max_seq_len": 4096,
            "rope_theta": 10000000.0,
            "norm_eps": 1e-6,
            "tie_embeddings": False,
            "moe": {
                "n_experts": 512,
                "top_k": 10,
                "expert_ffn_dim": 512,
                "n_shared_experts": 1,
                "shared_expert_ffn_dim": 512,
                "norm_topk_prob": True,
                "aux_loss_weight": 0.001,
            },
            "hybrid": {
                "full_attention_interval": 4,
                "linear_num_key_heads": 16,
                "linear_num_value_heads": 32,
                "linear_key_head_dim": 128,
                "linear_value_head_dim": 128,
                "conv_kernel": 4,
                "chunk_size": 64,
                "partial_rotary_factor": 0.25,
            },
        },
        "tokenizer": {"kind": "gpt2"},
        "optimizer": {"lr": 0.02, "adam_lr": 0.002},
        "schedule": {"warmup_steps": 2000, "decay": "wsd"},
        "checkpoint": {"every": 500},
        "validation": {"data": {"source": "stdlib"}, "every": 1000, "tokens": 1048576},
        "steps": 100000,
        "batch_size": 1,
        "seq_len": 4096,
        "dtype": "bfloat16",
        # EP=8 inside a node, FSDP2 for the rest, blocks recomputed: the README's plan for 4 nodes of 8 x 80 GB.
        "parallel": "fsdp",
        "expert_parallel": 8,
        "activation_checkpointing": True,
    },
}


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: `field.path=value: message`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        where = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "config")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown field")
        elif loc and e["type"] != "missing" and not isinstance(e.get("input"), dict):
            lines.append(f"{where}={e.get('input')!r}: {msg}")
        else:
            lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def load_trainer_config(path: str) -> TrainerConfig:
    """Read a YAML or JSON trainer config file. A directory, a file that does not parse, or a
    checkpoint.dir under a regular file is a ValueError in `errors.ConfigError`'s one-line shape
    (`field=value: message`; this layer sits below errors), which commands exit 2 on."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except IsADirectoryError:
        raise ValueError(f"--config={path!r}: is a directory, not a YAML or JSON file") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config={path!r}: not valid YAML: {_yaml_problem(e)}") from None
    cfg = TrainerConfig.model_validate(data)
    blocker = _file_in_the_way(cfg.checkpoint.dir)
    if blocker is not None:
        # Found here, before rank 0 writes the tokenizer there and fails with a bare NotADirectoryError.
        raise ValueError(f"checkpoint.dir={cfg.checkpoint.dir!r}: {blocker} is a file, not a directory")
    return cfg


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's complaint and where, on one line (its own message spans several)."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return " ".join(str(e).split())
    return f"{getattr(e, 'problem', None) or 'cannot parse'} at line {mark.line + 1}, column {mark.column + 1}"


def _file_in_the_way(path: str) -> str | None:
    """The nearest existing one of `path` and its parents when it is not a directory, else None."""
    for p in (path, *(str(a) for a in PurePath(path).parents)):
        if os.path.exists(p):  # False on any error: a path that cannot be checked is left to its use
            return None if os.path.isdir(p) else p
    return None
