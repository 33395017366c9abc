"""Checkpoint save and load: sharded (each rank its part) against a whole one gathered on rank 0.

    python bench/checkpoint_io.py --preset nano-125M --ranks 2,4

For each world size, torchrun starts that many CPU processes (gloo) holding the preset under
FSDP2 with its optimizers' state (Muon and AdamW, created by one zero-gradient step). Timed, with
the peak host memory each rank adds during the operation (its resident set sampled every 2 ms):

* sharded save / load: `parallel.state.save_sharded` / `load_sharded`, what final/ does (step
  checkpoints did, before they were asynchronous);
* async save: `parallel.state.start_save_sharded`, what step checkpoints do: "blocked" is how long
  the training loop waits (the state copied to host memory, the write started), "written" the time
  until every rank's shards and the index are written (the rank waiting meanwhile, not training);
  the memory figure, over both, is the host copy DCP stages the state into, plus the writer's;
* gathered save / load: the whole state gathered on rank 0 (`parallel.state.full_state`) and
  written there with torch.save (what checkpoints did before), then read back by every rank
  (memory-mapped) and cut to its part (`load_full_state`).

The files go to --dir (default: a temporary directory). On 2 cores the ranks share the CPUs, so
the times are this machine's, not a GPU node's; the memory figures are what scales. The workers
run with malloc's mmap threshold fixed at 128 KiB: every tensor's memory goes back to the system
when freed, so each operation's peak is its own, not hidden by memory an earlier one left cached.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.models.gpt import count_params
from nanochat_trainer.parallel.apply import wrap_model
from nanochat_trainer.parallel.distributed import barrier, gather_objects, setup_distributed
from nanochat_trainer.parallel.state import (
    checkpoint_group,
    full_state,
    load_full_state,
    load_sharded,
    save_sharded,
    start_save_sharded,
)
from nanochat_trainer.train.optim import build_optimizers
from nanochat_trainer.train.startup import build_model


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], None]) -> tuple[float, float]:
    """(seconds, peak resident bytes added) of fn(), sampled from a thread every 2 ms."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    return seconds, max(peak[0], _rss()) - base


def worker(preset: str, out: Path) -> None:
    cfg = TrainerConfig.model_validate({"preset": preset, "parallel": "fsdp", "device": "cpu"})
    env = setup_distributed("cpu")
    model, ep = build_model(cfg, env)
    model.init_weights(cfg.seed)
    wrap_model(model, cfg, env, ep)
    opts = build_optimizers(model, cfg.optimizer)
    for p in model.parameters():  # one zero-gradient step: every optimizer state exists, as mid-run
        p.grad = torch.zeros_like(p)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)
    sharded, whole = out / "sharded", out / "whole.pt"
    group = checkpoint_group()  # collective: the async writes' gloo group, as a run makes it
    figures: dict[str, tuple[float, float]] = {}
    blocked = [0.0]

    def async_save() -> None:
        start = time.perf_counter()
        written = start_save_sharded(model, opts, ep, out / "async", group)
        blocked[0] = time.perf_counter() - start
        written.result()

    def gathered_save() -> None:
        msd, osds = full_state(model, opts, ep)
        if env.is_main:
            torch.save({"model": msd, "optimizers": osds}, whole)

    def gathered_load() -> None:
        state = torch.load(whole, map_location="cpu", weights_only=False, mmap=True)
        load_full_state(model, opts, dict(state["model"]), state["optimizers"], ep)

    for name, fn in [
        ("sharded save", lambda: save_sharded(model, opts, ep, sharded)),
        ("async save", async_save),
        ("sharded load", lambda: load_sharded(model, opts, ep, sharded)),
        ("gathered save", gathered_save),
        ("gathered load", gathered_load),
    ]:
        barrier(env)
        figures[name] = measure(fn)
        barrier(env)
    figures["async blocked"] = (blocked[0], figures["async save"][1])
    everyone = gather_objects(figures, env)
    if env.is_main:
        files = sum(p.stat().st_size for p in sharded.iterdir())
        print(json.dumps({"world": env.world, "ranks": everyone, "sharded_bytes": files}))


# (figure, row label): the slowest rank's seconds; an async save's memory is over blocked and written.
ROWS = [
    ("sharded save", "sharded save"),
    ("async blocked", "async save, blocked"),
    ("async save", "async save, written"),
    ("sharded load", "sharded load"),
    ("gathered save", "gathered save"),
    ("gathered load", "gathered load"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano-125M")
    ap.add_argument("--ranks", default="2,4", help="world sizes, comma-separated")
    ap.add_argument("--dir", help="where the checkpoints are written (default: a temporary directory)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.preset, Path(args.dir))
        return

    cfg = TrainerConfig.model_validate({"preset": args.preset})
    n = count_params(cfg.model)["total"]
    print(f"{args.preset}: {n / 1e6:.1f}M parameters; fp32 weights {n * 4 / 2**20:,.0f} MiB, plus optimizer state")
    print(f"{'ranks':>5}  {'operation':<21} {'seconds':>8}  {'peak MiB added, per rank':<40}")
    for world in [int(w) for w in args.ranks.split(",")]:
        root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-")) / f"world{world}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port"]
        cmd += [str(port), __file__, "--worker", "--preset", args.preset, "--dir", str(root)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            sys.exit(f"{world} ranks failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for op, label in ROWS:
            per_rank = [r[op] for r in result["ranks"]]
            seconds = max(s for s, _ in per_rank)
            mib = ", ".join(f"{b / 2**20:,.0f}" for _, b in per_rank)
            print(f"{world:>5}  {label:<21} {seconds:>8.2f}  {mib}")
        print(f"{world:>5}  {'sharded files':<21} {result['sharded_bytes'] / 2**20:>8,.0f} MiB in all")
        if not args.dir:
            shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
