"""Throughput of the eval pieces: sandbox problems/s (HumanEval canonical solutions, isolated and
not) with the cost of isolation per program, and generation tokens/s (KV cache, batched) on the
device it finds.

    .venv/bin/python bench/eval_throughput.py                     # all 164 problems, tiny model
    .venv/bin/python bench/eval_throughput.py --problems 40 --workers 8 --preset tiny --batch 32

Prints figures; it does not pass or fail. The model is randomly initialised (speed only)
and is stopped neither by end-of-text nor stop strings, so every row makes --new tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time

import torch

from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.contract import SANDBOX_SOCKET_ENV
from nanochat_trainer.eval.generate import generate_tokens
from nanochat_trainer.eval.humaneval import evaluate_completions, load_problems
from nanochat_trainer.eval.sandbox import Sandbox
from nanochat_trainer.eval.sandbox_server import serve
from nanochat_trainer.models.gpt import GPT


class _NoEot:
    """A stand-in tokenizer for speed runs: no token ends generation."""

    eot_id = -1
    n_vocab = sys.maxsize  # every row of the model's vocabulary may be sampled

    def decode(self, ids) -> str:  # only used for the (empty) stop check and the final text
        return ""


def _seconds(probs: list[dict], box: Sandbox) -> tuple[float, float]:
    """(wall seconds, pass@1) of the canonical solutions under `box`."""
    t0 = time.monotonic()
    report = evaluate_completions(probs, {p["task_id"]: [p["canonical_solution"]] for p in probs}, ks=[1], sandbox=box)
    return time.monotonic() - t0, report["pass_at_k"]["1"]


def bench_sandbox(problems: int, workers: int) -> None:
    """Problems per second through the eval pod's sandbox container (its server, here a thread of
    this process, over a socket), with namespaces, and without, `workers` in parallel; then, one
    at a time, the milliseconds each adds to a program."""
    probs = load_problems(problems)
    per_program = {}
    for level in ("container", "namespaces", "process"):
        with _isolation(level) as make:
            box = make(workers)
            dt, score = _seconds(probs, box)
            print(
                f"sandbox: {len(probs)} problems, {workers} workers, isolation {box.isolation.name}: "
                f"{dt:.2f} s, {len(probs) / dt:.1f} problems/s, pass@1={score:.3f}"
            )
            one, _ = _seconds(probs, make(1))
        per_program[box.isolation.name] = one / len(probs) * 1000
    base = per_program.get("process")
    for name, ms in per_program.items():
        print(
            f"sandbox: one at a time, {ms:.1f} ms per program, isolation {name}"
            + (f": {ms - base:+.1f} ms against no namespaces" if base is not None and name != "process" else "")
        )


@contextlib.contextmanager
def _isolation(level: str):
    """A maker of Sandboxes at `level`; for "container", with a sandbox server running."""
    if level != "container":
        yield lambda workers: Sandbox(timeout=15.0, workers=workers, isolation=level)
        return
    address = f"@nanochat-bench-sandbox-{os.getpid()}"
    ready, stop = threading.Event(), threading.Event()
    threading.Thread(target=serve, args=(address,), kwargs={"ready": ready, "stop": stop}, daemon=True).start()
    ready.wait(30)
    os.environ[SANDBOX_SOCKET_ENV] = address
    try:
        yield lambda workers: Sandbox(timeout=15.0, workers=workers, isolation="container")
    finally:
        del os.environ[SANDBOX_SOCKET_ENV]
        stop.set()


def bench_generation(preset: str, batch: int, prompt_len: int, new: int, device: str) -> None:
    cfg = TrainerConfig.model_validate({"preset": preset}).model
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = GPT(cfg)
    model.init_weights(0)
    model = model.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (prompt_len - i % 7,), generator=gen).tolist() for i in range(batch)]
    new = min(new, cfg.max_seq_len - prompt_len)
    generate_tokens(model, _NoEot(), prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.monotonic()
    out = generate_tokens(model, _NoEot(), prompts, max_new_tokens=new, temperature=0.8, top_p=0.95, batch_size=batch)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.monotonic() - t0
    toks = sum(len(s[0].token_ids) for s in out)
    print(
        f"generation: preset={preset} device={device} dtype={str(dtype).split('.')[-1]} batch={batch} "
        f"prompt~{prompt_len} new={new}: {toks} tokens in {dt:.2f} s = {toks / dt:.0f} tokens/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=164)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    bench_sandbox(args.problems, args.workers)
    bench_generation(args.preset, args.batch, args.prompt_len, args.new, args.device)


if __name__ == "__main__":
    main()
