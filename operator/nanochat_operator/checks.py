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
fails cannot fit. Pod 0's host memory must also hold a checkpoint, which rank 0 gathers
whole (8 bytes per parameter at least: the fp32 weight and one optimizer moment).

The parameter count is computed from the config (no torch in the operator image); it
matches nanochat_trainer.model.count_params within a few per cent (tested).
"""

from __future__ import annotations

from nanochat_trainer.config import FSDP_FROM_PARAMS, ModelConfig

from .api import EvalRunSpec, TrainingRunSpec, parse_quantity

BYTES_PER_PARAM = 16
# `nanochat eval` builds the model in fp32 on the host, then moves it whole to one device.
EVAL_BYTES_PER_PARAM = 4
CHECKPOINT_BYTES_PER_PARAM = 8  # fp32 weight + one fp32 moment (Muon); AdamW parameters keep two
GIB = 2**30


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


def feasibility(spec: TrainingRunSpec, gpu_memory_gib: float = 80.0) -> list[str]:
    """Reasons this run cannot run as asked; empty when it can."""
    problems: list[str] = []
    cfg = spec.trainer
    res = spec.resources
    gpus = res.nodes * res.gpus_per_node
    if cfg.device == "cuda" and gpus == 0:
        problems.append("trainer.device=cuda but resources ask for no GPUs (gpusPerNode=0)")
    if cfg.stage == "generate":  # no model: one process asks the teacher
        if res.nodes > 1 or res.gpus_per_node > 1:
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
        # Checkpoints are gathered whole on rank 0's host: fp32 weights plus at least one fp32
        # optimizer moment per parameter must fit in pod 0's memory.
        gathered = params * CHECKPOINT_BYTES_PER_PARAM
        if res.memory is not None and gathered > parse_quantity(res.memory):
            problems.append(
                f"{what}: a checkpoint gathers at least {gathered / GIB:.0f} GiB (weights and "
                f"optimizer state) in pod 0; resources.memory={res.memory} is not enough"
            )
    elif res.memory is not None:
        have = parse_quantity(res.memory)
        if need > have:
            problems.append(
                f"{what} needs at least {need / GIB:.1f} GiB per pod ({how}); "
                f"resources.memory={res.memory} per pod is not enough"
            )
    return problems


def eval_feasibility(spec: EvalRunSpec, models: dict[str, ModelConfig], gpu_memory_gib: float = 80.0) -> list[str]:
    """Reasons an EvalRun cannot load the checkpoints it scores; empty when it can. `models`: the
    model config of each TrainingRun it loads, by its label (the main model, or a compare name).
    Each is loaded in turn, whole, in fp32: into pod memory first, then onto one GPU."""
    problems: list[str] = []
    res = spec.resources
    for label, model in models.items():
        params = estimate_params(model)
        need = params * EVAL_BYTES_PER_PARAM
        what = f"{label}: a model of ~{params / 1e9:.2f}B parameters needs {need / GIB:.0f} GiB in fp32"
        if res.gpus > 0 and need > gpu_memory_gib * GIB:
            problems.append(
                f"{what} on one GPU (nanochat eval does not shard a model; one GPU has {gpu_memory_gib:g} GiB): "
                "score it through an endpoint that serves it sharded (e.g. vLLM with tensor parallelism)"
            )
        elif res.memory is not None and need > parse_quantity(res.memory):
            problems.append(f"{what} in the eval pod; resources.memory={res.memory} is not enough")
    return problems
