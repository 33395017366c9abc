"""Muon's step on FSDP2's row-sharded matrices: ours against torch's Muon on the same DTensors.

    python bench/muon_fsdp.py --preset nano-125M --ranks 2

torchrun starts --ranks CPU processes (gloo) holding the preset under FSDP2, every hidden matrix
a DTensor sharded by rows, with random gradients. Timed per optimizer step (the slowest rank,
median of --steps after one warm-up step, and the collectives a step calls, counted by torch's
CommDebugMode), on the same parameters:

* `BatchedMuon` (what `build_optimizers` builds): the matrices of one shape gathered whole in one
  all-gather, each rank orthogonalising 1/world of them, a second all-gather of the results;
* `torch.optim.Muon` (what FSDP2 runs used before): every matrix's Newton-Schulz as DTensor ops,
  each matmul redistributing its operands.

Both orthogonalise in the dtype `build_optimizers` picks on this CPU (bf16 where the CPU has
native bf16 matmuls, as torch's Muon always does). Also printed: how far the two updates of one
step from the same state lie apart, as a share of the learning rate (bf16 rounding, not a
different map). On 2 shared cores the ranks compete for the CPUs: the ratio is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.parallel.apply import wrap_model
from nanochat_trainer.parallel.distributed import barrier, setup_distributed
from nanochat_trainer.train.optim import BatchedMuon, build_optimizers
from nanochat_trainer.train.startup import build_model


def _random_grads(params: list[DTensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed * 1000 + dist.get_rank())
    for p in params:
        local = torch.randn(p.to_local().shape, generator=gen)
        p.grad = DTensor.from_local(
            local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )


def _timed_steps(opt: torch.optim.Optimizer, params: list[DTensor], steps: int) -> list[float]:
    times = []
    for step in range(steps + 1):
        _random_grads(params, step)
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return times[1:]  # the first builds the state


def worker(preset: str, steps: int) -> None:
    cfg = TrainerConfig.model_validate({"preset": preset, "parallel": "fsdp", "device": "cpu"})
    env = setup_distributed("cpu")
    model, ep = build_model(cfg, env)
    model.init_weights(cfg.seed)
    wrap_model(model, cfg, env, ep)
    ours = next(o for o in build_optimizers(model, cfg.optimizer) if isinstance(o, BatchedMuon))
    params = [p for g in ours.param_groups for p in g["params"]]
    assert all(isinstance(p, DTensor) and p.ndim == 2 for p in params)
    torchs = torch.optim.Muon(params, **ours.defaults)

    # One step of each from the same weights and zero momentum: how far apart the updates lie.
    start = [p.detach().to_local().clone() for p in params]
    updates = []
    for opt in (ours, torchs):
        _random_grads(params, 0)
        opt.step()
        updates.append([p.detach().to_local() - s for p, s in zip(params, start)])
        with torch.no_grad():
            for p, s in zip(params, start):
                p.to_local().copy_(s)
        opt.state.clear()
    apart = max((float((a - b).abs().max()) for a, b in zip(*updates) if a.numel()), default=0.0)

    figures = {name: _timed_steps(opt, params, steps) for name, opt in (("ours", ours), ("torch", torchs))}
    collectives = {}
    for name, opt in (("ours", ours), ("torch", torchs)):
        _random_grads(params, 0)
        with CommDebugMode() as comm:
            opt.step()
        collectives[name] = comm.get_total_counts()
    barrier(env)
    if env.is_main:
        shapes = sorted({tuple(p.shape) for p in params})
        print(
            json.dumps(
                {
                    "matrices": len(params),
                    "shapes": len(shapes),
                    "ns_dtype": str(ours.ns_dtype),
                    "apart_over_lr": apart / cfg.optimizer.lr,
                    "collectives": collectives,
                    **figures,
                }
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano-125M")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.preset, args.steps)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks), "--master-port"]
    cmd += [str(port), __file__, "--worker", "--preset", args.preset, "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{args.ranks} ranks failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    ours, torchs = statistics.median(r["ours"]), statistics.median(r["torch"])
    print(
        f"{args.preset} on {args.ranks} ranks (FSDP2, gloo, 1 thread each): {r['matrices']} matrices of "
        f"{r['shapes']} shapes, Newton-Schulz in {r['ns_dtype']}"
    )
    n = r["collectives"]
    print(f"  BatchedMuon        {ours * 1e3:9.0f} ms/step  {n['ours']:6d} collectives/step")
    ratio = f"({torchs / ours:.1f}x ours)"
    print(f"  torch.optim.Muon   {torchs * 1e3:9.0f} ms/step  {n['torch']:6d} collectives/step  {ratio}")
    print(f"  one step's updates differ by at most {r['apart_over_lr']:.2g} x lr")


if __name__ == "__main__":
    main()
