"""One GPU check: every CUDA path of the trainer run once, timed, in one table and one JSON file.

    make gpu-check                                        # device auto: CUDA when there is one
    .venv/bin/python bench/gpu_check.py --device cpu      # every section at tiny sizes
    .venv/bin/python bench/gpu_check.py --only moe-grouped_mm,moe-loop --json /tmp/moe.json

Sections, each through the project's own code (nothing here reimplements a model path):

  train-125M, train-125M-compile, train-1B, train-1B-compile
                   `Trainer.step` (Muon + AdamW, bf16 autocast on CUDA) on a `TensorFeed` batch, as
                   bench/train_throughput.py runs it, eager and under torch.compile: tokens/s, MFU
                   (train.metrics' FLOPs per token over the GPU's dense bf16 peak), peak memory
  train-1B-fp8     nano-1B compiled with `fp8: true` (models/fp8.py: float8 GEMMs in the hidden layers),
                   against train-1B-compile's bf16; on a GPU without FP8 tensor cores it trains bf16 and
                   reads "fallback"
  moe-grouped_mm, moe-loop
                   nano-125M with 64 routed experts top-8: training steps through torch._grouped_mm
                   and through the per-expert loop, and both paths' logits on one batch
  hybrid-parity    a random Qwen3-Next checkpoint in transformers and in our GPT (hf_adapter), bf16:
                   our chunked forward and our prefill + token-by-token (recurrent) decode against
                   transformers' logits (flash-linear-attention's kernels on CUDA when installed)
  hybrid-train     training steps of the qwen3-hybrid shape cut to 4 layers and 64 experts top-8
  ternary          a ternary MoE model packed (save_packed, load_packed_model): logits and greedy
                   tokens against the BitLinear model, packed generation tokens/s, file size
  generation       batched sampling (eval.generate) from nano-125M: tokens/s
  humaneval        a few HumanEval problems end to end: generate, run in the sandbox, pass@1; the
                   same problems' canonical solutions must all pass (the scorer itself works)
  serve            `nanochat serve` started on a saved checkpoint, asked for a completion over HTTP

On CUDA the sizes are the presets' (nano-125M at its 1024 tokens, nano-1B at 2048, 64 experts
top-8 at width 768, the qwen3-hybrid layer shapes at 4096 tokens) and each timed loop stops after
a few steps or its time budget, so the whole check takes under 8 minutes on one H100/H200 (over
`--time-limit` it fails). On CPU every section runs the same code at tiny widths: about a minute
on two idle cores (the first run also fills torch.compile's cache: up to a minute more). On CPU
only, a section may be skipped, with its reason in the table (train-1B-compile: a second CPU
compile of the same code path). The random weights make the figures speed and agreement, not
quality: HumanEval's pass@1 of a random model is about 0.

Status: ok; fallback (a documented slower path ran: no flash-linear-attention kernels, or the
MoE loop where grouped_mm does not apply; the models log it once, and the reason is in the table);
skipped (CPU only); FAIL (the section raised: its traceback on stderr). Any FAIL, or a CUDA run
over its time limit, exits 1. `--fail-section NAME` makes NAME raise at its start: a self-test of
that failure path (tests/test_gpu_check.py), not a way to skip anything.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn as nn
import transformers

from nanochat_trainer.checkpoint import save_weights
from nanochat_trainer.config import ModelConfig, TernaryConfig, TrainerConfig
from nanochat_trainer.data.feed import TensorFeed
from nanochat_trainer.data.synthetic import generate as synthetic_docs
from nanochat_trainer.eval.generate import generate, generate_tokens
from nanochat_trainer.eval.humaneval import STOP_SEQUENCES, evaluate_completions, load_problems
from nanochat_trainer.models import hybrid, layers
from nanochat_trainer.models.fp8 import Float8Linear, fp8_unsupported
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.models.hf_adapter import load_hf_checkpoint
from nanochat_trainer.models.hybrid import GatedDeltaNet
from nanochat_trainer.models.moe import MoE
from nanochat_trainer.models.ternary import apply_ternary
from nanochat_trainer.models.ternary_pack import load_packed_model, save_packed
from nanochat_trainer.parallel.apply import wrap_model
from nanochat_trainer.parallel.distributed import Env
from nanochat_trainer.tokenizer import train_bpe
from nanochat_trainer.train.metrics import model_flops_per_token, peak_flops
from nanochat_trainer.train.optim import build_optimizers
from nanochat_trainer.train.startup import build_model
from nanochat_trainer.train.trainer import Trainer

# ----------------------------------------------------------------------------- sizes

# CPU: every section at this width (vocabulary 512, 2 layers of 64), 64-token sequences.
TINY_MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "max_seq_len": 128}
TINY_RUN = {"seq_len": 64, "batch_size": 2}
# "A realistic expert count": Qwen3-MoE's 64 experts top-8 at nano width; 8 x 256 active hidden
# units per token is about nano-125M's dense 2304, so the two run comparable FLOPs.
MOE_CUDA = {"n_experts": 64, "top_k": 8, "expert_ffn_dim": 256, "n_shared_experts": 0}
MOE_CPU = {"n_experts": 8, "top_k": 2, "expert_ffn_dim": 64, "n_shared_experts": 0}
# qwen3-hybrid's layer shapes (dim 2048, 16/32 DeltaNet heads of 128, 16/2 attention heads of 256,
# experts of 512) in 4 layers (3 DeltaNet, 1 attention) with 64 experts top-8, on one GPU.
HYBRID_CUDA = {
    "model": {"n_layers": 4, "moe": {"n_experts": 64, "top_k": 8}},
    "parallel": "auto",
    "expert_parallel": 1,
}
HYBRID_CPU = {
    "model": {
        **TINY_MODEL,
        "head_dim": 16,
        "ffn_dim": 128,
        "moe": {"n_experts": 8, "top_k": 2, "expert_ffn_dim": 32, "shared_expert_ffn_dim": 32},
        "hybrid": {
            "full_attention_interval": 2,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "chunk_size": 32,
        },
    },
    **TINY_RUN,
    "dtype": "auto",
    "parallel": "auto",
    "expert_parallel": 1,
}
# A random Qwen3-Next for the parity check (transformers' Qwen3NextConfig). CUDA: head sizes as
# the real model's DeltaNet (128), 512 tokens (8 of FLA's 64-token chunks); CPU: tests/test_hybrid.py's.
QWEN3_NEXT_CUDA = {
    "vocab_size": 4096,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 256,
    "shared_expert_intermediate_size": 512,
    "mlp_only_layers": [1],
    "max_position_embeddings": 1024,
}
QWEN3_NEXT_CPU = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 80,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 24,
    "mlp_only_layers": [1],
    "max_position_embeddings": 64,
}
# Where a timed loop stops: after this many steps, or once it has run this long.
TIMED_STEPS = 10
TIMED_BUDGET_S = {"cuda": 10.0, "cpu": 3.0}
TIME_LIMIT_S = {"cuda": 480.0, "cpu": 0.0}  # 0: not enforced (a shared CPU's speed varies)


# ----------------------------------------------------------------------------- the run


@dataclass
class Outcome:
    """What a section reports: the configuration it ran, its figures, and a one-line summary."""

    config: str
    summary: str
    figures: dict[str, Any]
    status: str = "ok"  # ok | fallback | skipped (CPU only)
    note: str = ""


@dataclass
class Check:
    """The device, a scratch directory and what earlier sections left for later ones."""

    device: torch.device
    tmp: Path
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> its figures
    code_model: tuple[Any, TrainerConfig, GPT] | None = None  # (tokenizer, config, model) of humaneval/serve

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def pick(self, cpu: Any, cuda: Any) -> Any:
        return cuda if self.cuda else cpu

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class FallbackLog(logging.Handler):
    """Collects the warnings the models log when a CUDA path falls back (once per process each)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def timed(fn: Callable[[], Any], ck: Check, max_steps: int = TIMED_STEPS) -> tuple[int, float]:
    """(steps, seconds) of calling fn until max_steps or the device's time budget, at least once."""
    budget = TIMED_BUDGET_S[ck.device.type]
    ck.sync()
    t0 = time.perf_counter()
    steps = 0
    while steps < max_steps:
        fn()
        steps += 1
        if time.perf_counter() - t0 > budget:
            break
    ck.sync()
    return steps, time.perf_counter() - t0


def peak_gib(ck: Check) -> float | None:
    return torch.cuda.max_memory_allocated(ck.device) / 2**30 if ck.cuda else None


def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def new_model(ck: Check, cfg: ModelConfig, seed: int = 0) -> GPT:
    """A GPT as training starts one: built on the meta device, materialised on ours, init_weights."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=ck.device)
    if cfg.tie_embeddings:  # to_empty gives each module a new Parameter: tie them again, as hf_adapter does
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights(seed)
    return model


@torch.no_grad()
def perturb(model: nn.Module, scale: float, seed: int = 1) -> nn.Module:
    """Seeded noise on every matrix: init_weights zeroes the output projections, which would make
    expert outputs (and so any comparison of two expert paths) trivially equal."""
    for i, p in enumerate(model.parameters()):
        if p.dim() >= 2:
            gen = torch.Generator(device=p.device).manual_seed(seed + i)
            p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * scale)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def need(ok: bool, what: str) -> None:
    """A section's check: raise (the section fails loudly) unless ok."""
    if not ok:
        raise AssertionError(what)


# ----------------------------------------------------------------------------- training


def train_config(ck: Check, spec: dict[str, Any], steps: int) -> TrainerConfig:
    return TrainerConfig.model_validate({**spec, "steps": steps, "device": ck.device.type})


def train_figures(ck: Check, cfg: TrainerConfig, setup: Callable[[GPT], None] | None = None) -> dict[str, Any]:
    """Trainer steps on one random batch: the first two untimed (allocation, compile), then timed."""
    torch.manual_seed(0)
    env = Env(0, 1, ck.device)
    model, _ = build_model(cfg, env)  # train.startup's: on the meta device, then on ours
    model.init_weights(cfg.seed)
    if setup is not None:
        setup(model)
    b, t = cfg.batch_size, cfg.resolved_seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (b, t + 1), device=ck.device)
    feed = TensorFeed([(tokens[:, :-1], tokens[:, 1:])])
    trainer = Trainer(cfg, model, wrap_model(model, cfg, env), build_optimizers(model, cfg.optimizer), feed, env)
    t0 = time.perf_counter()
    for _ in range(2):
        trainer.step()
    ck.sync()
    first_s = time.perf_counter() - t0
    if ck.cuda:
        torch.cuda.reset_peak_memory_stats(ck.device)
    losses: list[float] = []
    steps, dt = timed(lambda: losses.append(trainer.step()["loss"]), ck)
    need(all(math.isfinite(x) for x in losses), f"loss not finite: {losses}")
    tps = b * t * steps / dt
    peak = peak_flops(ck.device)
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": b,
        "seq_len": t,
        "dtype": "bf16 autocast" if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and ck.cuda) else "float32",
        "warmup_s": first_s,
        "steps": steps,
        "step_ms": dt / steps * 1000,
        "tokens_per_s": tps,
        "mfu": tps * model_flops_per_token(cfg.model, t) / peak if peak else None,
        "peak_mem_gib": peak_gib(ck),
        "loss": losses[-1],
        "fp8_layers": sum(isinstance(m, Float8Linear) for m in model.modules()),
    }


def train_summary(f: dict[str, Any]) -> str:
    return (
        f"{f['tokens_per_s']:,.0f} tok/s, MFU {fmt(f['mfu'], '.1%')}, peak {fmt(f['peak_mem_gib'], '.1f', ' GiB')}, "
        f"{f['step_ms']:.0f} ms/step"
    )


def dense_section(preset: str, compiled: bool) -> Callable[[Check], Outcome]:
    def run(ck: Check) -> Outcome:
        spec: dict[str, Any] = {"preset": preset, "compile": compiled}
        if not ck.cuda:
            spec.update(model=TINY_MODEL, **TINY_RUN)
        cfg = train_config(ck, spec, steps=2 + TIMED_STEPS + 1)
        f = train_figures(ck, cfg)
        summary = train_summary(f)
        eager = ck.figures.get(f"train-{preset.removeprefix('nano-')}")
        if compiled:
            f["compile_s"] = f["warmup_s"]
            summary += f", first steps {f['warmup_s']:.0f} s"
            if eager:
                f["speedup_vs_eager"] = f["tokens_per_s"] / eager["tokens_per_s"]
                summary += f", {f['speedup_vs_eager']:.2f}x eager"
        width = "" if ck.cuda else " at tiny width"
        mode = ", torch.compile" if compiled else ""
        return Outcome(f"{preset}{width}, {f['batch']}x{f['seq_len']}, {f['dtype']}{mode}", summary, f)

    return run


def section_train_fp8(ck: Check) -> Outcome:
    """nano-1B compiled with `fp8: true` against train-1B-compile's bf16. On CPU: eager, at width 128
    (narrower layers stay bf16) and 2 x 32 tokens, torch's reference float8 GEMM being ~1000x
    slower than bf16 there; apply_fp8 logs that, so the section reads "fallback"."""
    spec: dict[str, Any] = {"preset": "nano-1B", "compile": ck.cuda, "fp8": True}
    if not ck.cuda:
        spec.update(model={**TINY_MODEL, "dim": 128, "ffn_dim": 256}, seq_len=32, batch_size=2)
    cfg = train_config(ck, spec, steps=2 + TIMED_STEPS + 1)
    f = train_figures(ck, cfg)
    need(f["fp8_layers"] > 0 or fp8_unsupported(ck.device) is not None, "no linear layer was converted to float8")
    summary = f"{train_summary(f)}, {f['fp8_layers']} fp8 layers"
    bf16 = ck.figures.get("train-1B-compile")
    if bf16:
        f["speedup_vs_bf16"] = f["tokens_per_s"] / bf16["tokens_per_s"]
        summary += f", {f['speedup_vs_bf16']:.2f}x bf16"
    width = "" if ck.cuda else " at width 128, eager"
    return Outcome(f"nano-1B{width}, {f['batch']}x{f['seq_len']}, fp8 matmuls", summary, f)


def skip_on_cpu(section: Callable[[Check], Outcome], reason: str) -> Callable[[Check], Outcome]:
    """CPU only: the section is skipped with its reason; on CUDA it always runs."""

    def run(ck: Check) -> Outcome:
        if ck.cuda:
            return section(ck)
        return Outcome("-", "", {}, status="skipped", note=f"on CPU: {reason}")

    return run


def moe_spec(ck: Check) -> dict[str, Any]:
    if ck.cuda:
        return {"preset": "nano-125M", "model": {"moe": MOE_CUDA}, "batch_size": 8}
    return {"preset": "nano-125M", "model": {**TINY_MODEL, "moe": MOE_CPU}, **TINY_RUN}


def set_impl(model: nn.Module, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, MoE):
            m.impl = impl


@torch.no_grad()
def moe_logits(model: GPT, x: torch.Tensor, impl: str, bf16: bool) -> torch.Tensor:
    set_impl(model, impl)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(x).float()


def moe_impl_diff(ck: Check, cfg: TrainerConfig) -> dict[str, float]:
    """The same weights and batch through grouped_mm and through the loop: their logits' max
    difference and its tolerance. On CUDA (bf16) the tolerance is 3x the loop's own bf16 error
    (against the loop in float32) plus one bf16 rounding step of the logits' scale, so grouped_mm
    may round differently but no worse; on CPU both run float32 and must agree to 1e-4."""
    model = perturb(new_model(ck, cfg.model), 0.02).eval()
    # Enough tokens that every expert gets some (8 slots each over 64 experts: ~128 rows each).
    x = torch.randint(0, cfg.model.vocab_size, ck.pick((2, 64), (4, 256)), device=ck.device)
    grouped, loop = moe_logits(model, x, "grouped_mm", ck.cuda), moe_logits(model, x, "loop", ck.cuda)
    scale = loop.abs().max().item()
    f = {"logits_max_diff_vs_loop": max_diff(grouped, loop), "logit_scale": scale}
    if ck.cuda:
        f["loop_bf16_err"] = max_diff(loop, moe_logits(model, x, "loop", bf16=False))
        f["tolerance"] = 3 * f["loop_bf16_err"] + scale * 2**-8
    else:
        f["tolerance"] = 1e-4 * max(scale, 1.0)
    return f


def moe_section(impl: str) -> Callable[[Check], Outcome]:
    def run(ck: Check) -> Outcome:
        moe = ck.pick(MOE_CPU, MOE_CUDA)
        cfg = train_config(ck, moe_spec(ck), steps=2 + TIMED_STEPS + 1)
        f = train_figures(ck, cfg, setup=lambda m: set_impl(m, impl))
        summary = train_summary(f)
        if impl == "grouped_mm":
            f.update(moe_impl_diff(ck, cfg))
            need(
                f["logits_max_diff_vs_loop"] <= f["tolerance"],
                f"grouped_mm and loop logits differ by {f['logits_max_diff_vs_loop']:.3g} > {f['tolerance']:.3g}",
            )
            summary += f", logits vs loop {f['logits_max_diff_vs_loop']:.1e}"
        other = ck.figures.get("moe-grouped_mm")
        if impl == "loop" and other:
            f["grouped_mm_speedup"] = other["tokens_per_s"] / f["tokens_per_s"]
            summary += f", grouped_mm {f['grouped_mm_speedup']:.2f}x faster"
        config = f"{moe['n_experts']} experts top-{moe['top_k']} x {moe['expert_ffn_dim']}, {f['batch']}x{f['seq_len']}"
        return Outcome(config, summary, f)

    return run


# ----------------------------------------------------------------------------- the hybrid


def fla_note(ck: Check) -> tuple[str, str]:
    """(status, note) of a hybrid section: CUDA without flash-linear-attention is the documented fallback."""
    if not ck.cuda:
        return "ok", "PyTorch kernels (CPU)"
    if hybrid._fla_chunk is None:
        return "fallback", f"no flash-linear-attention kernels ({hybrid._fla_missing}): PyTorch kernels ran"
    return "ok", "flash-linear-attention kernels"


def random_qwen3_next(ck: Check) -> transformers.PreTrainedModel:
    """A random transformers Qwen3-Next (float32, on the device), built as tests/test_hybrid.py does."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3NextConfig(**ck.pick(QWEN3_NEXT_CPU, QWEN3_NEXT_CUDA), attn_implementation="eager")
    model = transformers.Qwen3NextForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # (1 + w) norms start at w = 0: make w matter
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)  # a zero router would tie every expert
    return model


@torch.no_grad()
def decode_logits(model: GPT, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill (the chunked kernel) then one token at a time (the recurrent kernel)."""
    cache = model.new_cache(ids.size(0), ids.size(1))
    steps = [model(ids[:, :prefill], cache=cache)]
    for i in range(prefill, ids.size(1)):
        steps.append(model(ids[:, i : i + 1], cache=cache))
    return torch.cat(steps, 1)


def load_ours(ck: Check, path: Path, dtype: torch.dtype) -> GPT:
    """Our GPT from the transformers checkpoint (hf_adapter), in eval mode."""
    model = load_hf_checkpoint(str(path), dtype=dtype, device=ck.device)[0].eval()
    if not ck.cuda:
        for m in model.modules():
            if isinstance(m, GatedDeltaNet):
                m.chunk_size = 8  # several chunks in 40 tokens (transformers uses 64)
    return model


def section_hybrid_parity(ck: Check) -> Outcome:
    hf = random_qwen3_next(ck)
    path = ck.tmp / "qwen3-next"
    hf.save_pretrained(path)
    hf.to(ck.device)
    b, t = ck.pick((2, 40), (2, 512))
    prefill = t - ck.pick(20, 64)
    ids = torch.randint(0, hf.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(1)).to(ck.device)
    with torch.no_grad():
        ref32 = hf(ids).logits.float()
        ref16 = hf.to(torch.bfloat16)(ids).logits.float()
    f: dict[str, Any] = {"batch": b, "seq_len": t, "prefill": prefill, "logit_scale": ref32.abs().max().item()}
    # bf16 tolerance: 3x transformers' own bf16 error (its bf16 logits against its float32 ones),
    # plus one bf16 rounding step of the logits' scale.
    f["hf_bf16_err"] = max_diff(ref16, ref32)
    f["tolerance"] = 3 * f["hf_bf16_err"] + f["logit_scale"] * 2**-8
    ours = load_ours(ck, path, torch.bfloat16)
    with torch.no_grad():
        f["chunked_max_diff"] = max_diff(ours(ids), ref16)
    f["recurrent_max_diff"] = max_diff(decode_logits(ours, ids, prefill), ref16)
    for key in ("chunked_max_diff", "recurrent_max_diff"):
        need(f[key] <= f["tolerance"], f"{key} {f[key]:.3g} > bf16 tolerance {f['tolerance']:.3g}")
    summary = f"bf16 vs transformers: chunked {f['chunked_max_diff']:.1e}, recurrent {f['recurrent_max_diff']:.1e}"
    if not ck.cuda:  # float32 on CPU: the exact check tests/test_hybrid.py makes
        with torch.no_grad():
            f["fp32_max_diff"] = max_diff(load_ours(ck, path, torch.float32)(ids), ref32)
        need(f["fp32_max_diff"] <= 1e-4, f"float32 logits differ by {f['fp32_max_diff']:.3g} > 1e-4")
        summary += f", fp32 {f['fp32_max_diff']:.1e}"
    summary += f" (tol {f['tolerance']:.1e})"
    status, note = fla_note(ck)
    cfg = hf.config
    config = (
        f"Qwen3-Next {cfg.num_hidden_layers}L d{cfg.hidden_size}, {cfg.num_experts} experts, "
        f"{b}x{t}, decode {t - prefill}"
    )
    return Outcome(config, summary, f, status, note)


def section_hybrid_train(ck: Check) -> Outcome:
    spec = {"preset": "qwen3-hybrid", **ck.pick(HYBRID_CPU, HYBRID_CUDA)}
    cfg = train_config(ck, spec, steps=2 + TIMED_STEPS + 1)
    f = train_figures(ck, cfg)
    status, note = fla_note(ck)
    m = cfg.model
    config = (
        f"qwen3-hybrid {m.n_layers}L d{m.dim}, {m.moe.n_experts} experts top-{m.moe.top_k}, {f['batch']}x{f['seq_len']}"
    )
    return Outcome(config, train_summary(f), f, status, note)


# ----------------------------------------------------------------------------- inference


class NoStop:
    """A stand-in tokenizer for speed runs (as bench/eval_throughput.py's): no token ends a row."""

    eot_id = -1
    n_vocab = sys.maxsize  # every row of the model's vocabulary may be sampled

    def decode(self, ids: Sequence[int]) -> str:
        return ""


def random_weights(model: nn.Module) -> nn.Module:
    """Every matrix random, as bench/ternary_memory.py's: ternary scales of zeroed matrices are degenerate."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model


def ternary_config(ck: Check) -> ModelConfig:
    """nano-125M (tiny on CPU) with experts in the odd layers: both packed module kinds, the
    linear (PackedBitLinear) and the stacked experts (PackedStackedLinear)."""
    base = TrainerConfig.model_validate({"preset": "nano-125M", **({} if ck.cuda else {"model": TINY_MODEL})}).model
    moe = ck.pick(
        {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 64, "n_shared_experts": 0},
        {"n_experts": 16, "top_k": 4, "expert_ffn_dim": 512, "n_shared_experts": 0},
    )
    return ModelConfig.model_validate(
        {**base.model_dump(), "moe": {**moe, "dense_layers": list(range(0, base.n_layers, 2))}}
    )


def section_ternary(ck: Check) -> Outcome:
    cfg = ternary_config(ck)
    dtype = ck.pick(torch.float32, torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(ck.device):
        bit = random_weights(GPT(cfg)).to(dtype).eval()
    apply_ternary(bit, TernaryConfig())
    info = save_packed(bit, cfg.model_dump(), ck.tmp / "model.ternary.safetensors", dtype=dtype, verbose=False)
    packed = load_packed_model(ck.tmp / "model.ternary.safetensors", device=ck.device)
    b, prompt_len, new = ck.pick((2, 16, 8), (8, 64, 64))
    prompts = torch.randint(0, cfg.vocab_size, (b, prompt_len), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        x = torch.tensor(prompts, device=ck.device)
        bit_logits, packed_logits = bit(x), packed(x)
    f: dict[str, Any] = {
        "file_mib": info["file_bytes"] / 2**20,
        "bits_per_ternary_weight": info["bits_per_ternary_weight"],
    }
    f["logits_max_diff"] = max_diff(packed_logits, bit_logits)
    f["tolerance"] = ck.pick(1e-4, 1e-2) * max(bit_logits.abs().max().item(), 1.0)
    need(f["logits_max_diff"] <= f["tolerance"], f"packed logits differ by {f['logits_max_diff']:.3g}")
    want = generate_tokens(bit, NoStop(), prompts, max_new_tokens=new, batch_size=b)
    got: list = []

    def decode() -> None:
        got.append(generate_tokens(packed, NoStop(), prompts, max_new_tokens=new, batch_size=b))

    steps, dt = timed(decode, ck, 3)
    same = [x[0].token_ids == y[0].token_ids for x, y in zip(want, got[-1])]
    f["greedy_rows_equal"] = sum(same) / len(same)
    f["packed_tokens_per_s"] = b * new * steps / dt
    summary = (
        f"logits vs BitLinear {f['logits_max_diff']:.1e}, greedy rows equal {f['greedy_rows_equal']:.0%}, "
        f"{f['packed_tokens_per_s']:,.0f} tok/s packed, {f['bits_per_ternary_weight']:.2f} bits/weight"
    )
    return Outcome(f"{cfg.n_layers}L d{cfg.dim}, {str(dtype)[6:]}, batch {b}, {new} new", summary, f)


def section_generation(ck: Check) -> Outcome:
    spec: dict[str, Any] = {"preset": "nano-125M"}
    if not ck.cuda:
        spec["model"] = TINY_MODEL
    cfg = TrainerConfig.model_validate(spec).model
    dtype = ck.pick(torch.float32, torch.bfloat16)
    model = perturb(new_model(ck, cfg), 0.02).to(dtype).eval()
    b, prompt_len, new = ck.pick((4, 32, 16), (32, 64, 128))
    gen = torch.Generator().manual_seed(0)
    # Prompts of different lengths: the left-padded batch path.
    prompts = [torch.randint(0, cfg.vocab_size, (prompt_len - i % 7,), generator=gen).tolist() for i in range(b)]
    generate_tokens(model, NoStop(), prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up
    out: list = []

    def sample() -> None:
        out.append(
            generate_tokens(model, NoStop(), prompts, max_new_tokens=new, temperature=0.8, top_p=0.95, batch_size=b)
        )

    steps, dt = timed(sample, ck, 3)
    tokens = sum(len(s[0].token_ids) for s in out[-1])
    need(tokens == b * new, f"{tokens} tokens generated, expected {b * new}")
    f = {"batch": b, "new_tokens": new, "tokens_per_s": tokens * steps / dt, "seconds_per_batch": dt / steps}
    width = "" if ck.cuda else " at tiny width"
    config = f"nano-125M{width}, {str(dtype)[6:]}, batch {b}, {new} new, top-p 0.95"
    return Outcome(config, f"{f['tokens_per_s']:,.0f} tok/s, {f['seconds_per_batch']:.2f} s/batch", f)


def code_model(ck: Check) -> tuple[Any, TrainerConfig, GPT]:
    """A tokenizer trained on synthetic code and a random model over it (nano-125M, tiny on CPU),
    built once for the humaneval and serve sections."""
    if ck.code_model is None:
        vocab = ck.pick(1024, 4096)
        tok = train_bpe(synthetic_docs(0, ck.pick(300, 2000)), vocab)
        over: dict[str, Any] = {"vocab_size": tok.n_vocab}
        spec: dict[str, Any] = {"preset": "nano-125M", "model": over if ck.cuda else {**TINY_MODEL, **over}}
        cfg = TrainerConfig.model_validate({**spec, "tokenizer": {"kind": "bpe"}})
        ck.code_model = (tok, cfg, perturb(new_model(ck, cfg.model), 0.05).eval())
    return ck.code_model


def section_humaneval(ck: Check) -> Outcome:
    tok, cfg, model = code_model(ck)
    problems = load_problems(ck.pick(4, 8))
    new = ck.pick(16, 64)
    t0 = time.perf_counter()
    # float32, as `nanochat eval --checkpoint` loads a model (checkpoint.load_model).
    texts = generate(model, tok, [p["prompt"] for p in problems], max_new_tokens=new, stop=STOP_SEQUENCES)
    gen_s = time.perf_counter() - t0
    workers = min(8, os.cpu_count() or 2)
    report = evaluate_completions(problems, {p["task_id"]: row for p, row in zip(problems, texts)}, workers=workers)
    canonical = evaluate_completions(
        problems, {p["task_id"]: [p["canonical_solution"]] for p in problems}, workers=workers
    )
    f = {
        "problems": report["problems"],
        "scored": sum(r["n"] for r in report["per_problem"]),
        "pass_at_1": report["pass_at_k"]["1"],
        "canonical_pass_at_1": canonical["pass_at_k"]["1"],
        "isolation": report["sandbox"]["isolation"]["level"],
        "generate_s": gen_s,
        "sandbox_s": report["sandbox"]["seconds"],
    }
    need(f["scored"] == len(problems), f"{f['scored']} of {len(problems)} completions scored")
    need(f["canonical_pass_at_1"] == 1.0, f"canonical solutions pass@1 = {f['canonical_pass_at_1']}, not 1.0")
    summary = (
        f"{f['problems']} problems scored, pass@1 {f['pass_at_1']:.2f} (random weights), canonical "
        f"{f['canonical_pass_at_1']:.2f}, sandbox {f['isolation']}"
    )
    return Outcome(f"{cfg.model.n_layers}L d{cfg.model.dim}, vocab {tok.n_vocab}, {new} new", summary, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until GET /health answers; raises when the server exits or never answers."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"nanochat serve exited with {proc.returncode} before answering")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"nanochat serve did not answer /health within {timeout_s:.0f} s")


# A header that fits every model's context: the server refuses, as vLLM does, a prompt plus
# max_tokens over it (HumanEval/0 is 172 tokens, over the CPU check's 128).
SERVE_PROMPT = 'def fibonacci(n: int) -> int:\n    """The n-th Fibonacci number."""\n'


def ask_server(url: str, prompt: str) -> dict[str, Any]:
    """One greedy completion over HTTP, checked for the OpenAI shape; its figures."""
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0}, timeout=120)
    latency = time.perf_counter() - t0
    need(r.status_code == 200, f"POST /v1/completions: {r.status_code} {r.text[:300]}")
    body = r.json()
    choice = body["choices"][0]
    need(body["object"] == "text_completion" and isinstance(choice["text"], str), f"not a completion: {body}")
    need(choice["finish_reason"] in ("stop", "length"), f"finish_reason {choice['finish_reason']!r}")
    models = httpx.get(url + "/v1/models", timeout=10).json()
    need(models["data"][0]["id"] == "gpu-check", f"/v1/models: {models}")
    return {
        "answered": True,
        "latency_s": latency,
        "completion_tokens": body["usage"]["completion_tokens"],
        "finish_reason": choice["finish_reason"],
    }


def section_serve(ck: Check) -> Outcome:
    tok, cfg, model = code_model(ck)
    final = save_weights(ck.tmp / "run" / "final", model, cfg, tok)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "nanochat_cli", "serve", "--checkpoint", str(final), "--port", str(port)]
    cmd += ["--device", ck.device.type, "--model-name", "gpu-check"]
    log_path = ck.tmp / "serve.log"
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT) as proc:
        try:
            start_s = wait_healthy(url, proc, 180)
            f = {"start_s": start_s, **ask_server(url, SERVE_PROMPT)}
        except Exception as exc:
            raise RuntimeError(f"{exc}; the server's output:\n{log_path.read_text()[-3000:]}") from exc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary = (
        f"answered in {f['latency_s']:.2f} s ({f['completion_tokens']} tokens, {f['finish_reason']}), "
        f"up in {f['start_s']:.1f} s"
    )
    return Outcome(f"nanochat serve --device {ck.device.type}, POST /v1/completions", summary, f)


# ----------------------------------------------------------------------------- sections

SECTIONS: dict[str, Callable[[Check], Outcome]] = {
    "train-125M": dense_section("nano-125M", compiled=False),
    "train-125M-compile": dense_section("nano-125M", compiled=True),
    "train-1B": dense_section("nano-1B", compiled=False),
    "train-1B-compile": skip_on_cpu(
        dense_section("nano-1B", compiled=True),
        "train-125M-compile ran the same compiled path; a second cold CPU compile costs 30-60 s of the 2 minutes",
    ),
    "train-1B-fp8": section_train_fp8,
    "moe-grouped_mm": moe_section("grouped_mm"),
    "moe-loop": moe_section("loop"),
    "hybrid-parity": section_hybrid_parity,
    "hybrid-train": section_hybrid_train,
    "ternary": section_ternary,
    "generation": section_generation,
    "humaneval": section_humaneval,
    "serve": section_serve,
}


def run_section(name: str, ck: Check, fallbacks: FallbackLog, fail: str | None) -> dict[str, Any]:
    """One section: its JSON entry. An exception is a FAIL with the traceback on stderr."""
    logged = len(fallbacks.messages)
    if ck.cuda:
        torch.cuda.reset_peak_memory_stats(ck.device)
    t0 = time.perf_counter()
    try:
        if name == fail:
            raise RuntimeError(f"injected failure (--fail-section {name}): a self-test of the failure path")
        out = SECTIONS[name](ck)
        entry: dict[str, Any] = {"status": out.status, "config": out.config, "summary": out.summary}
        entry.update(note=out.note, figures=out.figures)
        ck.figures[name] = out.figures
    except Exception as exc:  # noqa: BLE001 - every failure is reported, then the next section runs
        print(f"\ngpu_check: section {name} FAILED:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        entry = {"status": "FAIL", "config": "", "summary": "", "note": "", "figures": {}}
        entry["error"] = f"{type(exc).__name__}: {exc}"
    entry["seconds"] = time.perf_counter() - t0
    entry["fallbacks"] = fallbacks.messages[logged:]
    if entry["fallbacks"] and entry["status"] == "ok":  # a model said it took the slower path
        entry.update(status="fallback", note="; ".join(entry["fallbacks"]))
    try:
        cleanup(ck)
    except Exception as exc:  # noqa: BLE001 - a device left broken fails this section, loudly
        print(f"\ngpu_check: cleaning up after {name} FAILED:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        entry.update(status="FAIL", error=f"cleanup: {type(exc).__name__}: {exc}")
    return entry


def cleanup(ck: Check) -> None:
    """Free what a section held, so the next one's peak memory is its own."""
    if ck.cuda:
        torch._dynamo.reset()
    gc.collect()
    if ck.cuda:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- output


def table(sections: dict[str, dict[str, Any]], total_s: float, limit_s: float, device_name: str) -> str:
    rows = [("section", "config", "figures", "status", "s")]
    for name, e in sections.items():
        status = f"{e['status']} ({e['note']})" if e["status"] in ("fallback", "skipped") else e["status"]
        figures = e["error"].splitlines()[0][:160] if "error" in e else e["summary"]  # all of it in the JSON
        rows.append((name, e["config"], figures, status, f"{e['seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"gpu_check on {device_name}, torch {torch.__version__}"]
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[4]:>6}  {r[3]}")
    over = bool(limit_s) and total_s > limit_s
    limit = f" (limit {limit_s:.0f} s{': OVER' if over else ''})" if limit_s else " (no limit on CPU)"
    lines.append(f"total {total_s:.1f} s{limit}")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    ap.add_argument(
        "--json", default="gpu_check.json", help="where every figure is written (default: ./gpu_check.json)"
    )
    ap.add_argument("--only", help=f"comma-separated sections to run (default: all): {', '.join(SECTIONS)}")
    ap.add_argument(
        "--time-limit", type=float, help="fail when the run takes longer (s; default 480 on CUDA, off on CPU)"
    )
    ap.add_argument(
        "--fail-section", choices=list(SECTIONS), help="make this section raise: a self-test of the failure path"
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    args.sections = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown sections {unknown}; sections are {list(SECTIONS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    limit_s = TIME_LIMIT_S[device.type] if args.time_limit is None else args.time_limit
    # The models' fallback warnings go to stderr and into the report.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    fallbacks = FallbackLog()
    layers.log.addHandler(fallbacks)  # where models.layers.warn_fallback says a faster path was not taken
    t0 = time.perf_counter()
    sections: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ck = Check(device, Path(tmp))
        for name in args.sections:
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            sections[name] = run_section(name, ck, fallbacks, args.fail_section)
    total_s = time.perf_counter() - t0
    over = bool(limit_s) and total_s > limit_s
    ok = not over and all(e["status"] != "FAIL" for e in sections.values())
    report = {
        "ok": ok,
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "flash_linear_attention": hybrid._fla_chunk is not None,
        "python": platform.python_version(),
        "total_s": total_s,
        "time_limit_s": limit_s or None,
        "over_time_limit": over,
        "fallbacks": fallbacks.messages,
        "sections": sections,
    }
    print(table(sections, total_s, limit_s, report["device_name"]))
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"figures: {args.json}")
    if not ok:
        failed = [n for n, e in sections.items() if e["status"] == "FAIL"]
        print(f"gpu_check: FAILED: {', '.join(failed + (['time limit'] if over else []))}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
