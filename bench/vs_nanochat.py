"""Training throughput of our trainer against karpathy/nanochat's, at equal shape on the same device.

    git clone https://github.com/karpathy/nanochat /tmp/nanochat
    .venv/bin/python bench/vs_nanochat.py --nanochat /tmp/nanochat                    # tiny, CPU or GPU
    .venv/bin/python bench/vs_nanochat.py --nanochat /tmp/nanochat --shape nano-125M  # on a GPU
    .venv/bin/python bench/vs_nanochat.py --nanochat /tmp/nanochat --shape custom \\
        --dim 512 --n-layers 8 --n-heads 4 --batch-size 8 --seq-len 1024 --json /tmp/vs.json

The target it measures: our tokens/s (and model FLOP/s) >= 1.1x nanochat's at equal shape on the
same GPU. nanochat is not vendored: it is imported from the checkout given by --nanochat (PATH is
put on sys.path; its package is PATH/nanochat) and none of its files is changed.

Each side runs in a subprocess of its own (this script with --side ours|nanochat), so that one
side's allocator, compile caches, threads and gc settings do not touch the other; --rounds runs
both sides that many times, the order alternating (ours first, then nanochat first, ...). Both
sides train on the same batch of random tokens (seed 0), take --warmup untimed steps (compiles
happen there), then:

  ms/step, tokens/s   the median of --steps whole training steps, each timed on its own
                      (synchronised at its end on CUDA): ours `Trainer.step()` (bf16 autocast on
                      CUDA, loss, backward, global grad-norm clip, Muon + AdamW, zero_grad,
                      loss.item()); nanochat the step of its scripts/base_train.py (model(x, y),
                      backward, set the groups' lr, MuonAdamW.step, zero_grad, loss.item()).
  fwd+bwd / optimizer the medians of --steps more steps of the same operations, split in two regions
                      timed apart (synchronised around each on CUDA): loss + backward; then (ours)
                      the clip and the optimizers' step and zero_grad, (nanochat) MuonAdamW.step and
                      zero_grad. Their sum may be a little over ms/step on CUDA (one more sync).
  model FLOP/s        tokens/s x each model's own FLOPs/token (6 x matmul weights + 12 x layers x
                      dim x seq, PaLM's count: our `train.metrics.model_flops_per_token`,
                      nanochat's `GPT.estimate_flops`), so a differently sized MLP does not bias it.
  peak memory         CUDA max_memory_allocated over the timed steps; on CPU the process's max RSS
                      (its whole life, compiles included).

The summary takes each side's best round (shared machines are noisy) and gives ours / nanochat;
on CPU the header gives the load average before and after, to judge how busy the machine was. On a
CPU shared with other work prefer --threads 1: with 2 OpenMP threads on 2 busy cores, step times of
the same side swung 4-10x between rounds (a thread waits at every parallel region for its
descheduled sibling); with 1 thread they stayed within ~10%.

Equal shape: the same vocab, dim, layers, query and key/value heads (so the same head_dim),
sequence length and batch. The two models are still different architectures:

  * MLP: nanochat relu^2 with 4 x dim hidden (2 matrices, 8 dim^2 weights); ours SwiGLU (3
    matrices). Our hidden size is set to 8/3 x dim rounded to a multiple of 64 (the ffn_mult
    printed), so the MLP weights and FLOPs per token match (exactly when dim is a multiple of 24).
  * nanochat also has value embeddings (ResFormer: an embedding table on every other layer, added
    to v through a small gate), per-layer residual and x0 scalars, a "smear" gate of the previous
    token and a "backout" of the middle layer's residual, a tanh logit softcap, norms without
    weights, QK-norm then a 1.2 scale; it pads the vocab to a multiple of 64 (its head and FLOPs
    count the padding). Value embeddings are lookups: parameters, almost no FLOPs.
  * Ours: Qwen3-style blocks, RMSNorm with weights (and on q and k per head), computed in fp32.
  * Head: untied on both sides here (our nano-125M preset ties it; the benchmark unties it).
  * Attention windows: nanochat's base_train defaults to "SSSL" sliding windows; we have full
    causal attention only, so the default here is --window-pattern L (full context on every layer,
    the shape we have). Without FA3 nanochat runs a sliding window through SDPA with an explicit
    mask (its own warning: "Your GPU utilization will be terrible").
  * Precision: on CUDA nanochat runs bf16 by casting weights inside its Linear (embeddings stored in
    bf16, no autocast) and sets float32 matmul precision "high" (as its compute_init does); ours
    bf16 autocast over fp32 weights. On CPU both run fp32.
  * Optimizer: nanochat's MuonAdamW: shape-stacked Muon with Polar Express (5 iterations), NorMuon
    variance reduction, row equilibration, cautious weight decay, and AdamW, each update a
    torch.compile'd fused kernel (compiled always, even without --compile); no grad clipping.
    Ours: `train.optim.build_optimizers` as a run builds it (Muon with 5 quintic Newton-Schulz steps
    for the hidden matrices, AdamW for the rest; the table names the classes), no torch.compile of
    the optimizer, and global grad-norm clipping at 1.0.
  * Compile: nanochat's base_train always compiles the model (dynamic=False); our trainer compiles
    on CUDA for dense models, never on CPU. --compile / --no-compile sets both sides; unset, both
    models are compiled on CUDA and neither on CPU.
  * nanochat's base_train freezes and disables the garbage collector after its first step; its
    side here does the same.
  * FP8 (--fp8, what nanochat's speedrun trains with on an H100): both sides multiply in float8
    with one scale per tensor, e4m3 values and e5m2 gradients. nanochat converts every linear layer
    with both sides a multiple of 16 and at least 128 (base_train's filter, repeated here), its
    output layer included; ours (`fp8: true`, models/fp8.py) the same cut but keeps the output
    layer in bf16. On CPU both run torch's reference float8 GEMM (~1000x slower than bf16: use a
    small custom shape there).

What nanochat needs on CPU: nothing is patched. Its compute dtype falls back to fp32 (no CUDA), its
attention to SDPA (FA3 is only tried on CUDA), and its optimizer's torch.compile'd kernels need a
C++ compiler for inductor (the first step compiles them: ~30 s on 2 cores, in warmup). On CUDA it
loads FA3 through the `kernels` package from the Hugging Face Hub; where that is not installed or
the Hub cannot be reached it falls back to SDPA, and the table says which attention it ran.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nanochat_trainer.config import ModelConfig, TrainerConfig
from nanochat_trainer.data.feed import TensorFeed
from nanochat_trainer.models.gpt import GPT, active_params, count_params
from nanochat_trainer.parallel.apply import wrap_model
from nanochat_trainer.parallel.distributed import Env
from nanochat_trainer.parallel.expert_parallel import clip_grad_norm_
from nanochat_trainer.train.losses import model_loss
from nanochat_trainer.train.metrics import model_flops_per_token
from nanochat_trainer.train.optim import build_optimizers
from nanochat_trainer.train.trainer import Trainer

# nanochat's scripts/base_train.py defaults, so its optimizer groups are the ones it trains with.
NANOCHAT_OPTIMIZER = {
    "unembedding_lr": 0.008,
    "embedding_lr": 0.3,
    "matrix_lr": 0.02,
    "weight_decay": 0.28,
    "scalar_lr": 0.5,
}
NAMED_SHAPES = ("tiny", "nano-125M", "nano-1B")


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    batch_size: int
    seq_len: int
    ffn_dim: int  # ours; nanochat's MLP is 4 x dim, fixed

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


def matched_ffn_dim(dim: int) -> int:
    """SwiGLU hidden size whose 3 x dim x hidden weights are nearest relu^2's 2 x dim x 4 dim,
    kept a multiple of 64 as our config keeps it."""
    return max(64, round(8 * dim / 3 / 64) * 64)


def resolve_shape(args: argparse.Namespace) -> Shape:
    """The shape from --shape (a preset of ours: its model, batch and sequence length), then the
    flags given. tiny is the preset's 16 x 256."""
    if args.shape == "custom":
        missing = [f for f in ("dim", "n_layers", "n_heads") if getattr(args, f) is None]
        if missing:
            sys.exit(f"--shape custom needs --{', --'.join(m.replace('_', '-') for m in missing)}")
        defaults = ModelConfig()  # our config's own default vocabulary
        base = {"vocab_size": defaults.vocab_size, "n_kv_heads": args.n_heads, "batch_size": 8, "seq_len": 1024}
    else:
        cfg = TrainerConfig.model_validate({"preset": args.shape})
        m = cfg.model
        base = {
            "vocab_size": m.vocab_size,
            "dim": m.dim,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "n_kv_heads": m.n_kv_heads,
            "batch_size": cfg.batch_size,
            "seq_len": cfg.resolved_seq_len,
        }
    flags = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "batch_size", "seq_len")
    fields = {**base, **{f: getattr(args, f) for f in flags if getattr(args, f) is not None}}
    return Shape(**fields, ffn_dim=args.ffn_dim or matched_ffn_dim(fields["dim"]))


# ---------------------------------------------------------------------------- one side, in its subprocess


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_batch(shape: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same tokens on both sides: inputs and next-token targets of one random sequence set."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len + 1), generator=gen)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def measure(
    step: Callable[[], None],
    fwd_bwd: Callable[[], None],
    optimize: Callable[[], None],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Warmup, then whole steps, then the same steps split in two regions; each step timed on its
    own (both trainers synchronise every step anyway: loss.item()) and the median kept, which a
    busy shared machine's stalls move less than a mean."""
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    whole, fb, opt = [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        whole.append(time.perf_counter() - t0)
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        fwd_bwd()
        sync(device)
        t1 = time.perf_counter()
        optimize()
        sync(device)
        fb.append(t1 - t0)
        opt.append(time.perf_counter() - t1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {
        "step_s": statistics.median(whole),
        "fwd_bwd_s": statistics.median(fb),
        "optim_s": statistics.median(opt),
        "peak_gib": peak,
        "step_times_s": whole,
    }


def run_ours(args: argparse.Namespace, shape: Shape, device: torch.device, compile_: bool) -> dict[str, Any]:
    """Our model and Trainer as a run builds them (apply.py's order), at the shape; the optimizer and
    schedule settings of the named preset (they do not change the cost of a step)."""
    spec: dict[str, Any] = {"preset": args.shape} if args.shape in NAMED_SHAPES else {}
    spec |= {
        "model": {
            "vocab_size": shape.vocab_size,
            "dim": shape.dim,
            "n_layers": shape.n_layers,
            "n_heads": shape.n_heads,
            "n_kv_heads": shape.n_kv_heads,
            "ffn_dim": shape.ffn_dim,
            "max_seq_len": shape.seq_len,
            "tie_embeddings": False,  # nanochat's head is untied
        },
        "batch_size": shape.batch_size,
        "seq_len": shape.seq_len,
        "steps": args.warmup + 2 * args.steps + 10,  # the LR schedule's horizon: past the last step
        "compile": compile_,
        "fp8": args.fp8,
    }
    cfg = TrainerConfig.model_validate(spec)
    env = Env(0, 1, device)
    with torch.device("meta"):
        model = GPT(cfg.model)
    model.to_empty(device=device)
    model.init_weights(cfg.seed)
    wrapped = wrap_model(model, cfg, env)
    opts = build_optimizers(model, cfg.optimizer)
    x, y = random_batch(shape, device)
    trainer = Trainer(cfg, model, wrapped, opts, TensorFeed([(x, y)]), env)
    # Trainer's own rule for dtype "auto": bf16 autocast on CUDA, fp32 on CPU.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def fwd_bwd() -> None:
        with autocast:
            loss = model_loss(model, wrapped(x), y)
        loss.backward()

    def optimize() -> None:
        clip_grad_norm_(model, cfg.optimizer.grad_clip, None)
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)

    times = measure(trainer.step, fwd_bwd, optimize, args, device)
    counts = count_params(cfg.model)
    return {
        **times,
        "params": counts["total"],
        "matmul_params": active_params(cfg.model)["active_non_embedding"] + shape.vocab_size * shape.dim,
        "flops_per_token": model_flops_per_token(cfg.model, shape.seq_len),
        "mlp": f"SwiGLU {shape.ffn_dim} (ffn_mult {shape.ffn_dim / shape.dim:.3f})",
        "attention": "SDPA, full causal",
        "optimizer": " + ".join(type(o).__name__ for o in opts),
        "dtype": ("bfloat16 autocast" if device.type == "cuda" else "float32") + with_fp8(model),
    }


def run_nanochat(args: argparse.Namespace, shape: Shape, device: torch.device, compile_: bool) -> dict[str, Any]:
    """nanochat's model and optimizer built and stepped as its scripts/base_train.py does."""
    sys.path.insert(0, str(Path(args.nanochat).resolve()))
    # Imported here, from the checkout given, and only in nanochat's subprocess.
    from nanochat import flash_attention  # noqa: PLC0415
    from nanochat.common import COMPUTE_DTYPE  # noqa: PLC0415
    from nanochat.gpt import GPT as NanoGPT  # noqa: PLC0415
    from nanochat.gpt import GPTConfig  # noqa: PLC0415

    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # nanochat's compute_init
    torch.manual_seed(42)
    config = GPTConfig(
        sequence_len=shape.seq_len,
        vocab_size=shape.vocab_size,
        n_layer=shape.n_layers,
        n_head=shape.n_heads,
        n_kv_head=shape.n_kv_heads,
        n_embd=shape.dim,
        window_pattern=args.window_pattern,
    )
    with torch.device("meta"):
        raw = NanoGPT(config)
    raw.to_empty(device=device)
    raw.init_weights()
    if args.fp8:  # base_train converts before compiling, with this filter
        from nanochat.fp8 import convert_to_float8_training  # noqa: PLC0415

        def fp8_module_filter(mod: torch.nn.Module, fqn: str) -> bool:
            sides = (mod.in_features, mod.out_features)
            return isinstance(mod, torch.nn.Linear) and all(n % 16 == 0 for n in sides) and min(sides) >= 128

        convert_to_float8_training(raw, module_filter_fn=fp8_module_filter)
    model = torch.compile(raw, dynamic=False) if compile_ else raw
    opt = raw.setup_optimizer(**NANOCHAT_OPTIMIZER)
    x, y = random_batch(shape, device)
    first = True

    def step() -> None:
        nonlocal first
        loss = model(x, y)
        loss.backward()
        for group in opt.param_groups:  # base_train sets the scheduled lr (and Muon's momentum, wd) each step
            group["lr"] = group["initial_lr"]
        opt.step()
        model.zero_grad(set_to_none=True)
        loss.item()
        if first:  # base_train: "nuclear intervention" on the garbage collector after the first step
            gc.collect()
            gc.freeze()
            gc.disable()
            first = False

    def fwd_bwd() -> None:
        model(x, y).backward()

    def optimize() -> None:
        opt.step()
        model.zero_grad(set_to_none=True)

    times = measure(step, fwd_bwd, optimize, args, device)
    windows = "full causal" if set(args.window_pattern.upper()) == {"L"} else f"windows {args.window_pattern}"
    return {
        **times,
        "params": raw.num_scaling_params()["total"],
        "matmul_params": raw.num_matmul_params(),
        "flops_per_token": raw.estimate_flops(),
        "mlp": f"relu^2 {4 * shape.dim}",
        "attention": f"{'FA3' if flash_attention.USE_FA3 else 'SDPA (no FA3)'}, {windows}",
        "optimizer": type(opt).__name__,
        "dtype": str(COMPUTE_DTYPE).removeprefix("torch.") + with_fp8(raw),
    }


def with_fp8(model: torch.nn.Module) -> str:
    """ ", fp8 in N linear layers" when some multiply in float8 (both sides name the class Float8Linear)."""
    n = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    return f", fp8 in {n} linear layers" if n else ""


def run_side(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or (2 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    compile_ = args.compile if args.compile is not None else device.type == "cuda"
    shape = resolve_shape(args)
    result = (run_ours if args.side == "ours" else run_nanochat)(args, shape, device, compile_)
    tokens_per_s = shape.tokens / result["step_s"]
    result |= {
        "side": args.side,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "compiled": compile_,
        "tokens_per_s": tokens_per_s,
        "model_flops_per_s": tokens_per_s * result["flops_per_token"],
        "mem_kind": "CUDA max allocated" if device.type == "cuda" else "process max RSS",
    }
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- the parent: both sides, the table


def spawn(side: str, result: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--result", str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{side} side failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return json.loads(result.read_text())


def si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def nanochat_commit(path: str) -> str:
    """The checkout's commit; a copy made by bench/gpu_prepare.sh has no .git, and names it in COMMIT."""
    recorded = Path(path) / "COMMIT"
    if recorded.is_file():
        return recorded.read_text().strip()
    if not (Path(path) / ".git").exists():  # git would answer for a repository around the copy
        return "unknown commit"
    out = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown commit"


def report(
    args: argparse.Namespace, shape: Shape, runs: list[dict[str, Any]], load: tuple[float, float]
) -> dict[str, Any]:
    best = {s: max((r for r in runs if r["side"] == s), key=lambda r: r["tokens_per_s"]) for s in ("ours", "nanochat")}
    o, n = best["ours"], best["nanochat"]
    compiled = "compiled" if o["compiled"] else "eager"
    print(
        f"vs nanochat ({nanochat_commit(args.nanochat)}): shape {args.shape}, vocab {shape.vocab_size}, "
        f"dim {shape.dim}, {shape.n_layers} layers, {shape.n_heads}/{shape.n_kv_heads} heads, batch "
        f"{shape.batch_size} x {shape.seq_len}; {o['device']} ({o['threads']} threads), models {compiled}; "
        f"median of {args.steps} timed steps after {args.warmup} warmup, {args.rounds} rounds"
        + (f"; load average {load[0]:.1f} before, {load[1]:.1f} after" if o["device"] == "cpu" else "")
        + "\n"
    )
    rows = [
        ("MLP", "mlp", str),
        ("attention", "attention", str),
        ("optimizer", "optimizer", str),
        ("compute dtype", "dtype", str),
        ("params (total)", "params", si),
        ("matmul params (N)", "matmul_params", si),
        ("FLOPs/token (6N + attn)", "flops_per_token", si),
    ]
    print(f"{'':26}{'ours':34}nanochat")
    for label, key, fmt in rows:
        print(f"{label:26}{fmt(o[key]):34}{fmt(n[key])}")
    print(f"FLOPs/token ours/nanochat {o['flops_per_token'] / n['flops_per_token']:.3f}\n")

    print(
        f"{'round':7}{'side':10}{'ms/step':>10}{'fwd+bwd ms':>12}{'optim ms':>10}{'tokens/s':>11}"
        f"{'model FLOP/s':>14}{'peak GiB':>10}"
    )
    for r in runs:
        print(
            f"{r['round']:<7}{r['side']:10}{r['step_s'] * 1e3:10.1f}{r['fwd_bwd_s'] * 1e3:12.1f}"
            f"{r['optim_s'] * 1e3:10.1f}{r['tokens_per_s']:11,.0f}{si(r['model_flops_per_s']):>14}{r['peak_gib']:10.2f}"
        )
    ratio = {
        "tokens_per_s": o["tokens_per_s"] / n["tokens_per_s"],
        "model_flops_per_s": o["model_flops_per_s"] / n["model_flops_per_s"],
        "fwd_bwd_time": o["fwd_bwd_s"] / n["fwd_bwd_s"],
        "optim_time": o["optim_s"] / n["optim_s"],
    }
    met = "met" if ratio["tokens_per_s"] >= 1.1 and ratio["model_flops_per_s"] >= 1.1 else "not met"
    print(
        f"\nbest round of each side, ours / nanochat: tokens/s {ratio['tokens_per_s']:.2f}x, "
        f"model FLOP/s {ratio['model_flops_per_s']:.2f}x (target >= 1.1x: {met}); "
        f"time in fwd+bwd {ratio['fwd_bwd_time']:.2f}x, in the optimizer {ratio['optim_time']:.2f}x "
        f"(peak memory: {o['mem_kind']})"
    )
    return {
        "shape": asdict(shape),
        "nanochat_commit": nanochat_commit(args.nanochat),
        "load_average": load,
        "runs": runs,
        "ratio": ratio,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanochat", required=True, help="a checkout of github.com/karpathy/nanochat")
    ap.add_argument("--shape", choices=[*NAMED_SHAPES, "custom"], default="tiny")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--n-layers", type=int)
    ap.add_argument("--n-heads", type=int)
    ap.add_argument("--n-kv-heads", type=int)
    ap.add_argument("--ffn-dim", type=int, help="our SwiGLU hidden size (default: matched to relu^2's 4 x dim)")
    ap.add_argument("--window-pattern", default="L", help="nanochat's sliding windows (base_train's default: SSSL)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, order alternating")
    ap.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="compile both models (default: on CUDA only)"
    )
    ap.add_argument("--fp8", action="store_true", help="float8 matmuls on both sides (nanochat's speedrun: --fp8)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads on each side (default: 2 on CPU)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--side", choices=["ours", "nanochat"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        sys.exit("--warmup and --steps must be at least 1 (compiles happen in the warmup)")
    if args.side:
        run_side(args)
        return

    shape = resolve_shape(args)
    load_before = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for side in ("ours", "nanochat") if i % 2 == 0 else ("nanochat", "ours"):
                runs.append({"round": i + 1, **spawn(side, Path(tmp) / f"{side}{i}.json")})
    figures = report(args, shape, runs, (load_before, os.getloadavg()[0]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
