"""Training throughput: tokens/s, step time, peak memory and MFU on the device found.

    python bench/train_throughput.py --preset tiny --steps 20 [--batch-size 8] [--seq-len 256]

Runs the trainer's own steps (`train.trainer.Trainer.step`: Muon + AdamW, gradient clipping,
bf16 autocast on GPU) on one batch of random tokens; the first `--warmup` steps are not timed.
For MoE presets it also prints the share of one step spent in the MoE forward's routing,
dispatch, experts and combine (profiler ranges).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.data.feed import TensorFeed
from nanochat_trainer.models.gpt import GPT, count_params
from nanochat_trainer.parallel.apply import wrap_model
from nanochat_trainer.parallel.distributed import Env
from nanochat_trainer.train.metrics import model_flops_per_token, peak_flops
from nanochat_trainer.train.optim import build_optimizers
from nanochat_trainer.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    spec = {"preset": args.preset, "steps": args.warmup + args.steps + 1, "compile": args.compile}
    if args.batch_size:
        spec["batch_size"] = args.batch_size
    if args.seq_len:
        spec["seq_len"] = args.seq_len
    cfg = TrainerConfig.model_validate(spec)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = Env(0, 1, device)
    model = GPT(cfg.model)
    model.init_weights(0)
    model.to(device)
    b, t = cfg.batch_size, cfg.resolved_seq_len
    x = torch.randint(0, cfg.model.vocab_size, (b, t), device=device)
    trainer = Trainer(
        cfg, model, wrap_model(model, cfg, env), build_optimizers(model, cfg.optimizer), TensorFeed([(x, x)]), env
    )
    step = trainer.step

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    counts = count_params(cfg.model)
    tps = b * t / dt
    peak = peak_flops(device)
    mfu = tps * model_flops_per_token(cfg.model, t) / peak if peak else None
    mem = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    print(
        f"device        {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"preset        {args.preset}: {counts['total'] / 1e6:.1f}M params, batch {b} x {t}")
    print(f"step time     {dt * 1000:.1f} ms")
    print(f"tokens/s      {tps:,.0f}")
    print(f"peak memory   {mem:.2f} GiB ({'GPU allocated' if device.type == 'cuda' else 'process max RSS'})")
    print(f"MFU           {f'{mfu:.1%}' if mfu is not None else 'n/a (peak FLOPs of this device unknown)'}")
    if cfg.model.moe is not None:
        moe_split(step, device)


def moe_split(step, device: torch.device) -> None:
    """Share of one step spent in the MoE forward's stages (the `moe/*` profiler ranges of
    moe.MoE.forward): routing, dispatch (sort, count, gather), experts, combine (weight,
    scatter-add). Backward ops are not attributed to stages; they are in the step's total."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    # CPU: a range's inclusive CPU time; CUDA: the kernel time launched inside it.
    spent = {
        e.key.removeprefix("moe/"): (e.device_time_total if device.type == "cuda" else e.cpu_time_total)
        for e in prof.key_averages()
        if e.key.startswith("moe/")
    }
    parts = ", ".join(f"{k} {spent.get(k, 0) / wall_us:.1%}" for k in ("route", "dispatch", "experts", "combine"))
    print(
        f"MoE forward   {parts} of the step (routing + dispatch + combine: "
        f"{(spent.get('route', 0) + spent.get('dispatch', 0) + spent.get('combine', 0)) / wall_us:.1%})"
    )


if __name__ == "__main__":
    main()
