"""Can this run actually run? Checks the API server's schema cannot make.

The schema and CEL rules refuse malformed manifests. These checks catch manifests that
are well-formed but hopeless on the resources asked for, so the run fails at once with
a condition saying why instead of crash-looping out of memory:

    problems = feasibility(spec, gpu_memory_gib=80)    # [] when it can run

The memory estimate is a floor, not a prediction: parameters x 16 bytes (bf16 weights
and gradients are 4 bytes, fp32 master weights 4, two fp32 Adam moments 8; Muon keeps
one moment but its AdamW half keeps two, so 16 is the round figure), spread over every
GPU when FSDP shards it, on each GPU when DDP replicates it (with expert parallelism
under DDP, each GPU holds the dense part and 1/expert_parallel of the routed experts).
Activations come on top, so a run that passes can still run out of memory; one that
fails cannot fit. Checkpoints are sharded (each rank writes its part); a replicated (DDP)
model's final/ is written whole from pod 0's host, which must hold its fp32 weights.

The parameter count is computed from the config (no torch in the operator image); it
matches nanochat_trainer.model.count_params within a few per cent (tested).

An EvalRun's model is loaded by `nanochat eval` whole, in fp32, on one GPU (or the pod's CPU).
One too large for that, with `resources.gpus` GPUs, is served in the eval pod by vLLM instead
(`eval_fit`): tensor parallelism over those GPUs, from the run's Hugging Face export, in bf16.
Each GPU then holds its share of the weights (2 bytes per parameter / gpus) and one
full-length sequence's KV cache (vLLM refuses to start without it), in at most
SERVE_WEIGHT_SHARE of its memory: vLLM takes SERVE_GPU_MEMORY_UTILIZATION of it, and keeps
the difference for activations, CUDA graphs and the KV cache that batches the samples.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from nanochat_trainer.config import FSDP_FROM_PARAMS, ModelConfig, TernaryConfig, TrainerConfig

from .api import RESOURCES_OF_THEIR_OWN, EvalRunSpec, PodTemplate, TrainingRunSpec, parse_quantity

BYTES_PER_PARAM = 16
# `nanochat eval` builds the model in fp32 on the host, then moves it whole to one device.
EVAL_BYTES_PER_PARAM = 4
FINAL_BYTES_PER_PARAM = 4  # a replicated model's final/: its fp32 weights, copied to rank 0's host
# An asynchronous step checkpoint's host copy of what a rank holds: fp32 weights and optimizer state
# (AdamW's two moments at most), not the gradients.
STAGED_BYTES_PER_PARAM = BYTES_PER_PARAM - 4
GIB = 2**30
# vLLM serving a model too large for one GPU (eval_fit): bf16 weights (`--dtype bfloat16`), the share
# of each GPU vLLM takes (`--gpu-memory-utilization`), and of that what the weights and one sequence's
# KV cache may fill: 15% of the GPU (12 GiB of 80) is left for activations, CUDA graphs and batching.
SERVE_BYTES_PER_PARAM = 2
SERVE_GPU_MEMORY_UTILIZATION = 0.9
SERVE_WEIGHT_SHARE = 0.75
MAX_TENSOR_PARALLEL = 16  # resources.gpus' limit: GPUs of one pod, so of one node


def estimate_params(m: ModelConfig) -> int:
    """Parameters of the Qwen3-style model a ModelConfig describes (all experts counted)."""
    d, hd = m.dim, m.resolved_head_dim
    embed = m.vocab_size * d
    head = 0 if m.tie_embeddings else m.vocab_size * d
    norms_per_layer = 2 * d

    def full_attention(gated: bool) -> int:
        q = d * m.n_heads * hd * (2 if gated else 1)  # gated attention adds a gate projection
        kv = 2 * d * m.n_kv_heads * hd
        o = m.n_heads * hd * d
        qk = 2 * hd if m.qk_norm else 0
        return q + kv + o + qk

    def linear_attention() -> int:
        h = m.hybrid
        assert h is not None
        key_dim = h.linear_num_key_heads * h.linear_key_head_dim
        value_dim = h.linear_num_value_heads * h.linear_value_head_dim
        nv = h.linear_num_value_heads
        proj = d * (2 * key_dim + 2 * value_dim + 2 * nv)  # q, k, v, z, b, a
        conv = (2 * key_dim + value_dim) * h.conv_kernel
        return proj + conv + 2 * nv + h.linear_value_head_dim + value_dim * d  # dt_bias, A_log, norm, out

    def mlp(layer: int) -> int:
        if m.moe is None or layer in m.moe.dense_layers:
            return 3 * d * m.resolved_ffn_dim
        e = m.moe
        routed = e.n_experts * 3 * d * e.expert_ffn_dim + d * e.n_experts
        shared = (3 * d * e.shared_expert_ffn_dim + d) if e.n_shared_experts else 0
        return routed + shared

    layers = 0
    for i in range(m.n_layers):
        if m.hybrid is not None:
            is_full = (i + 1) % m.hybrid.full_attention_interval == 0
            attn = full_attention(gated=True) if is_full else linear_attention()
        else:
            attn = full_attention(gated=False)
        layers += attn + mlp(i) + norms_per_layer
    return embed + head + layers + d  # final norm


def estimate_expert_params(m: ModelConfig) -> int:
    """The routed experts' share of estimate_params (what expert parallelism splits)."""
    if m.moe is None:
        return 0
    moe_layers = sum(1 for i in range(m.n_layers) if i not in m.moe.dense_layers)
    return moe_layers * m.moe.n_experts * 3 * m.dim * m.moe.expert_ffn_dim


def training_memory_bytes(params: int) -> int:
    return params * BYTES_PER_PARAM


def pod_problems(pod: PodTemplate) -> list[str]:
    """spec.pod.extraResources naming a resource that has a field of its own."""
    return [
        f"pod.extraResources.{key}: set {field} instead"
        for key, field in RESOURCES_OF_THEIR_OWN.items()
        if key in pod.extra_resources
    ]


def feasibility(spec: TrainingRunSpec, gpu_memory_gib: float = 80.0) -> list[str]:
    """Reasons this run cannot run as asked; empty when it can."""
    problems: list[str] = pod_problems(spec.pod)
    cfg = spec.trainer
    res = spec.resources
    gpus = res.nodes * res.gpus_per_node
    if cfg.device == "cuda" and gpus == 0:
        problems.append("trainer.device=cuda but resources ask for no GPUs (gpusPerNode=0)")
    if cfg.device == "cpu" and gpus > 0 and cfg.stage != "generate":
        problems.append(
            f"trainer.device=cpu but resources ask for {gpus} GPUs (gpusPerNode={res.gpus_per_node}), which "
            "would sit idle: set gpusPerNode 0, or device auto"
        )
    if cfg.stage == "generate":  # no model: one process asks the teacher
        if res.nodes > 1 or res.gpus_per_node > 0:
            problems.append(
                f"stage generate runs as one process (resources.nodes={res.nodes}, gpusPerNode="
                f"{res.gpus_per_node}): ask for nodes 1 and gpusPerNode 0 (the teacher has the GPUs)"
            )
        return problems
    params = estimate_params(cfg.model)
    experts = estimate_expert_params(cfg.model)
    ep = cfg.expert_parallel
    world = res.nodes * max(res.gpus_per_node, 1)  # torchrun workers: one per GPU, one per CPU pod
    if world % ep:
        problems.append(
            f"trainer.expert_parallel={ep} does not divide the run's {world} workers "
            f"(resources.nodes={res.nodes} x gpusPerNode={res.gpus_per_node}): use a divisor of {world}"
        )
    shards = (cfg.parallel == "fsdp") or (cfg.parallel == "auto" and params >= FSDP_FROM_PARAMS)
    workers = gpus if gpus > 0 else res.nodes  # one process per GPU; CPU runs: one per pod
    # What one worker holds: an equal share under FSDP2 (with EP: experts split over the EP
    # group, FSDP2 over the rest, still 1/world each); the dense part plus 1/ep of the experts under DDP.
    held = params / workers if shards else params - experts + experts / ep
    need = training_memory_bytes(int(held))
    what = f"model of ~{params / 1e9:.2f}B parameters" + (
        f" ({experts / 1e9:.2f}B in routed experts, expert_parallel={ep})" if experts else ""
    )
    how = (
        "FSDP shards it"
        if shards
        else "DDP keeps the dense weights on every GPU" + (f" and 1/{ep} of the experts" if experts else "")
    )
    if gpus > 0:
        have = gpu_memory_gib * GIB
        if need > have:
            problems.append(
                f"{what} needs at least {need / GIB:.0f} GiB per GPU for weights, gradients and optimizer state "
                f"over {gpus} GPUs ({how}); one GPU has {gpu_memory_gib:g} GiB: ask for more GPUs"
                + ("" if shards else " or set trainer.parallel=fsdp")
            )
        # Sharded layouts (FSDP2, expert parallelism) write checkpoints and final/ from each rank's
        # part; a replicated model's final/ is copied whole to rank 0's host, and in-training
        # evaluation gathers even a sharded one there (train/evaluation.py).
        whole = params * FINAL_BYTES_PER_PARAM
        gathers = (not shards and ep == 1) or cfg.evaluation is not None
        if gathers and res.memory is not None and whole > parse_quantity(res.memory):
            why = "in-training evaluation gathers it" if cfg.evaluation is not None else "its final/ is written"
            problems.append(
                f"{what}: {why} whole on pod 0's host ({whole / GIB:.0f} GiB of fp32 weights); "
                f"resources.memory={res.memory} is not enough"
            )
    elif res.memory is not None:
        have = parse_quantity(res.memory)
        if need > have:
            problems.append(
                f"{what} needs at least {need / GIB:.1f} GiB per pod ({how}); "
                f"resources.memory={res.memory} per pod is not enough"
            )
    asynchronous = cfg.checkpoint.saves_async(sharded=(shards and world > 1) or ep > 1)
    per_pod = max(res.gpus_per_node, 1) * held * STAGED_BYTES_PER_PARAM
    if asynchronous and res.memory is not None and per_pod > parse_quantity(res.memory):
        problems.append(
            f"{what}: each step checkpoint is copied to host memory before it is written "
            f"(trainer.checkpoint.async_save), {per_pod / GIB:.1f} GiB per pod for its "
            f"{max(res.gpus_per_node, 1)} workers' weights and optimizer state; resources.memory={res.memory} "
            "is not enough: raise it or set trainer.checkpoint.async_save=false"
        )
    return problems


@dataclass(frozen=True)
class EvalFit:
    """How an EvalRun's models are loaded. `problems`: why it cannot run (empty when it can).
    `tensor_parallel`: set when the main model does not fit one GPU and vLLM serves it over that
    many GPUs (its `max_model_len` tokens at most; `reason` says why it does not fit one GPU)."""

    problems: list[str] = field(default_factory=list)
    tensor_parallel: int | None = None
    max_model_len: int | None = None
    reason: str = ""
    packed: frozenset[str] = frozenset()  # TrainingRuns whose packed ternary export is loaded, not final/


def kv_cache_bytes(m: ModelConfig, tokens: int, tensor_parallel: int = 1) -> int:
    """One sequence's cache in bf16 on each of `tensor_parallel` GPUs: keys and values of the full
    attention layers (KV heads split over the GPUs, replicated past their count) and, for the hybrid
    stack, the Gated DeltaNet layers' recurrent and convolution state."""
    full_layers = m.n_layers
    state = 0
    if m.hybrid is not None:
        h = m.hybrid
        full_layers = m.n_layers // h.full_attention_interval
        key_dim = h.linear_num_key_heads * h.linear_key_head_dim
        value_dim = h.linear_num_value_heads * h.linear_value_head_dim
        per_layer = h.linear_num_value_heads * h.linear_key_head_dim * h.linear_value_head_dim
        per_layer += (2 * key_dim + value_dim) * (h.conv_kernel - 1)
        state = (m.n_layers - full_layers) * per_layer * 2 // min(tensor_parallel, h.linear_num_key_heads)
    kv = full_layers * 2 * m.n_kv_heads * m.resolved_head_dim * 2 * tokens
    return kv // min(tensor_parallel, m.n_kv_heads) + state


def tensor_parallel_problem(m: ModelConfig, tp: int) -> str | None:
    """Why vLLM cannot split this model over `tp` GPUs (the sizes it cuts must divide); None when it can."""
    sizes = {"n_heads": m.n_heads}
    if m.moe is None or m.moe.dense_layers:
        sizes["ffn_dim"] = m.resolved_ffn_dim
    if m.moe is not None:
        sizes["moe.expert_ffn_dim"] = m.moe.expert_ffn_dim
        if m.moe.n_shared_experts:
            sizes["moe.shared_expert_ffn_dim"] = m.moe.shared_expert_ffn_dim
    if m.hybrid is not None:
        sizes["hybrid.linear_num_key_heads"] = m.hybrid.linear_num_key_heads
        sizes["hybrid.linear_num_value_heads"] = m.hybrid.linear_num_value_heads
    bad = [f"{k}={v}" for k, v in sizes.items() if v % tp]
    problems = [f"{', '.join(bad)} must be divisible by {tp}"] if bad else []
    if m.n_kv_heads % tp and tp % m.n_kv_heads:  # KV heads are split, or each replicated on tp/n GPUs
        problems.append(f"n_kv_heads={m.n_kv_heads} must divide {tp} or be divisible by it")
    return "; ".join(problems) or None


def serving_bytes_per_gpu(m: ModelConfig, params: int, tp: int) -> int:
    """What each of `tp` GPUs holds when vLLM serves the model: its share of the bf16 weights and one
    full-length sequence's cache."""
    return params * SERVE_BYTES_PER_PARAM // tp + kv_cache_bytes(m, m.max_seq_len, tp)


def eval_fit(
    spec: EvalRunSpec,
    run: TrainerConfig | None,
    compare: dict[str, TrainerConfig],
    gpu_memory_gib: float = 80.0,
) -> EvalFit:
    """How an EvalRun loads the checkpoints it scores, or why it cannot. `run`: the trainer config
    of the TrainingRun it evaluates (None for an endpoint); `compare`: those of its compared
    TrainingRuns, by name. `nanochat eval` loads each in turn, whole: in fp32, or a ternary run's
    final model as its packed export (what the ternary stage makes it for), into pod memory and
    then onto one GPU. The main model, when it does not fit one GPU, is served by vLLM over
    `resources.gpus` GPUs if they hold it (not a packed ternary model, whose 8-bit activations and
    ternary weights vLLM does not reproduce); a compared model is not (score it through an endpoint)."""
    res = spec.resources
    gpu = gpu_memory_gib * GIB
    problems: list[str] = pod_problems(spec.pod)
    fit = EvalFit()
    packed: set[str] = set()
    if run is not None:
        assert spec.model.training_run is not None
        name = f"TrainingRun {spec.model.training_run}"
        need, what, ternary = _loaded(name, run, spec.model.checkpoint)
        if ternary:
            packed.add(spec.model.training_run)
        if res.gpus > 0 and need > gpu and run.stage == "ternary":
            problems.append(
                f"{what}, more than one GPU's {gpu_memory_gib:g} GiB: vLLM serves neither ternary weights nor "
                "8-bit activations"
                + ("" if ternary else "; score its final model (packed) instead of checkpoint: best")
            )
        elif res.gpus > 0 and need > gpu:
            reason = f"{what}, more than one GPU's {gpu_memory_gib:g} GiB (nanochat eval does not shard a model)"
            params = estimate_params(run.model)
            problem = _serving_problem(run.model, params, res.gpus, gpu_memory_gib) or _export_problem(run.model)
            if problem:
                problems.append(f"{reason}; {problem}")
            else:
                fit = EvalFit(tensor_parallel=res.gpus, max_model_len=run.model.max_seq_len, reason=reason)
        elif res.memory is not None and need > parse_quantity(res.memory):
            problems.append(f"{what} in the eval pod; resources.memory={res.memory} is not enough")
    for c in spec.compare:
        if c.name not in compare:
            continue
        need, what, ternary = _loaded(c.name, compare[c.name], c.checkpoint)
        if ternary and c.training_run:
            packed.add(c.training_run)
        if fit.tensor_parallel:
            problems.append(
                f"compare {c.name}: nanochat eval would load this TrainingRun beside vLLM, which holds all "
                f"{res.gpus} GPUs for spec.model: score it through compare[].endpoint or in an EvalRun of its own"
            )
        elif res.gpus > 0 and need > gpu:
            problems.append(
                f"{what} on one GPU (nanochat eval does not shard a model; one GPU has {gpu_memory_gib:g} GiB): "
                "score it through an endpoint that serves it sharded (e.g. vLLM with tensor parallelism)"
            )
        elif res.memory is not None and need > parse_quantity(res.memory):
            problems.append(f"{what} in the eval pod; resources.memory={res.memory} is not enough")
    return EvalFit(problems, fit.tensor_parallel, fit.max_model_len, fit.reason, frozenset(packed))


def _export_problem(m: ModelConfig) -> str | None:
    """Why the Hugging Face export vLLM serves would not be this model; None when it is."""
    if m.moe is not None and m.moe.balance == "aux_free":
        return (
            "moe.balance=aux_free: its routers carry a selection bias Hugging Face's Qwen3 MoE has no place for, "
            "so vLLM would route differently; score it through spec.model.endpoint"
        )
    return None


def _loaded(label: str, run: TrainerConfig, checkpoint: str | None) -> tuple[int, str, bool]:
    """(bytes `nanochat eval` holds on its device for a run's model, how to say so, whether that is
    the packed ternary export): a ternary run's final model is packed, its best/ and every other
    run's model load in fp32."""
    params = estimate_params(run.model)
    if run.stage == "ternary" and (checkpoint or "final") == "final":
        need = packed_eval_bytes(run.model, run.ternary or TernaryConfig())
        return (
            need,
            f"{label}: its packed ternary export of ~{params / 1e9:.2f}B parameters needs {need / GIB:.0f} GiB",
            True,
        )
    need = params * EVAL_BYTES_PER_PARAM
    return need, f"{label}: a model of ~{params / 1e9:.2f}B parameters needs {need / GIB:.0f} GiB in fp32", False


def linear_modules(m: ModelConfig) -> dict[str, int]:
    """The model's linear modules (nn.Linear, and the MoE's stacked experts) by the trainer's names,
    with their weights' sizes: what `ternary.include` and `exclude` choose among
    (`models/ternary.py`'s select_ternary; tested to agree)."""
    d, hd = m.dim, m.resolved_head_dim
    out = {"lm_head": m.vocab_size * d}
    for i in range(m.n_layers):
        a, p = f"layers.{i}.attn.", f"layers.{i}.mlp."
        h = m.hybrid
        if h is not None and (i + 1) % h.full_attention_interval:  # a Gated DeltaNet layer
            key, value, nv = (
                h.linear_num_key_heads * h.linear_key_head_dim,
                h.linear_num_value_heads * h.linear_value_head_dim,
                h.linear_num_value_heads,
            )
            sizes = {"q_proj": key, "k_proj": key, "v_proj": value, "z_proj": value, "b_proj": nv, "a_proj": nv}
            out |= {a + n: d * k for n, k in sizes.items()} | {a + "out_proj": value * d}
        else:
            q, kv = d * m.n_heads * hd, d * m.n_kv_heads * hd
            out |= {a + "q_proj": q, a + "k_proj": kv, a + "v_proj": kv, a + "o_proj": q}
            if h is not None:
                out[a + "g_proj"] = q  # Qwen3-Next's gated attention
        if m.moe is None or i in m.moe.dense_layers:
            f = d * m.resolved_ffn_dim
            out |= {p + "gate_proj": f, p + "up_proj": f, p + "down_proj": f}
            continue
        e = m.moe
        stacked = e.n_experts * d * e.expert_ffn_dim
        out |= {p + "router": d * e.n_experts} | {
            p + f"experts.{n}": stacked for n in ("gate_proj", "up_proj", "down_proj")
        }
        if e.n_shared_experts:
            shared = d * e.shared_expert_ffn_dim
            out |= {p + f"shared_expert.{n}": shared for n in ("gate_proj", "up_proj", "down_proj")}
            out[p + "shared_expert_gate"] = d
    return out


def ternary_modules(m: ModelConfig, t: TernaryConfig) -> dict[str, int]:
    """The linear modules `t` makes ternary, with their sizes (fnmatch globs, as the trainer)."""

    def matches(name: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return {n: k for n, k in linear_modules(m).items() if matches(n, t.include) and not matches(n, t.exclude)}


def packed_eval_bytes(m: ModelConfig, t: TernaryConfig) -> int:
    """What a packed ternary model takes on the device `nanochat eval` runs it on: ternary weights at
    1.6 bits (5 per byte), every other tensor in bf16, three of the largest ternary modules unpacked
    to bf16 for a forward (an MoE's gate, up and down experts together; the packed layers unpack per
    call when the dense weights would not fit), and one full-length sequence's KV cache."""
    ternary = ternary_modules(m, t)
    n_ternary = sum(ternary.values())
    return (
        n_ternary // 5
        + (estimate_params(m) - n_ternary) * SERVE_BYTES_PER_PARAM
        + 3 * max(ternary.values(), default=0) * SERVE_BYTES_PER_PARAM
        + kv_cache_bytes(m, m.max_seq_len)
    )


def _serving_problem(m: ModelConfig, params: int, gpus: int, gpu_memory_gib: float) -> str | None:
    """Why vLLM cannot serve the model over `gpus` GPUs, with the memory it needs and the GPU count
    that would do; None when it can."""
    room = SERVE_WEIGHT_SHARE * gpu_memory_gib * GIB

    def fits(tp: int) -> bool:
        return serving_bytes_per_gpu(m, params, tp) <= room and tensor_parallel_problem(m, tp) is None

    if fits(gpus):
        return None
    enough = next((tp for tp in range(1, MAX_TENSOR_PARALLEL + 1) if fits(tp)), None)
    ask = (
        f"ask for resources.gpus={enough}"
        if enough
        else f"no {MAX_TENSOR_PARALLEL} GPUs of one node hold it: score it through spec.model.endpoint, a "
        "server that spans nodes"
    )
    split = tensor_parallel_problem(m, gpus)
    if split and serving_bytes_per_gpu(m, params, gpus) <= room:
        return f"vLLM cannot split it over {gpus} GPUs ({split}): {ask}"
    per_gpu = serving_bytes_per_gpu(m, params, gpus)
    return (
        f"served by vLLM in bf16 with tensor parallelism over {gpus} GPU(s) it needs {per_gpu / GIB:.1f} GiB per "
        f"GPU ({params * SERVE_BYTES_PER_PARAM / GIB:.0f} GiB of weights in all, plus one sequence's KV cache), "
        f"more than the {room / GIB:.0f} GiB of a {gpu_memory_gib:g} GiB GPU they may take (the rest is for "
        f"activations and batching): {ask}"
    )
