"""Teacher throughput: what the distillation client (`AsyncTeacher`) achieves against a completions
server at several levels of requests in flight: requests/s, completion tokens/s, the peak in flight
and p50/p95 latency per level.

    .venv/bin/python bench/teacher_throughput.py                        # a tiny `nanochat serve`, local
    .venv/bin/python bench/teacher_throughput.py --levels 8,64,256 --requests 1024 --max-tokens 32
    .venv/bin/python bench/teacher_throughput.py --url http://teacher:8000/v1 --model qwen --json

Without --url it saves a randomly initialised model of --preset (tiny) with a small trained BPE,
starts `nanochat serve` on it in a subprocess on a loopback port, and stops it at the end. Every
level sends --requests distinct short prompts (greedy, --max-tokens each, no cache) through a fresh
client with `concurrency` = the level. Tokens are the servers' `usage`. `nanochat serve` runs one
request at a time (a lock), so against it the rate stays flat and latency grows with the level; a
vLLM server batches what is in flight. Prints figures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from nanochat_trainer.checkpoint import save_weights
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.data.synthetic import generate as synthetic_docs
from nanochat_trainer.distill.teacher import AsyncTeacher
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.tokenizer import train_bpe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(preset: str, out: Path) -> Path:
    """A randomly initialised `preset` model (noised so greedy completions differ) and a BPE tokenizer."""
    cfg = TrainerConfig.model_validate({"preset": preset})
    tok = train_bpe(synthetic_docs(0, 300), cfg.model.vocab_size)
    model = GPT(cfg.model)
    model.init_weights(0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return save_weights(out / "final", model, cfg, tok)


@contextlib.contextmanager
def _nanochat_serve(preset: str):
    """`nanochat serve` of a fresh `preset` checkpoint on a loopback port: yields (url, model name)."""
    with tempfile.TemporaryDirectory(prefix="teacher-bench-") as tmp:
        final = _checkpoint(preset, Path(tmp))
        port = _free_port()
        cmd = [sys.executable, "-m", "nanochat_cli", "serve", "--checkpoint", str(final), "--port", str(port)]
        proc = subprocess.Popen([*cmd, "--model-name", preset, "--device", "cpu"], stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"nanochat serve exited with {proc.returncode}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("nanochat serve did not come up in 120 s")
                time.sleep(0.2)
            yield url + "/v1", preset
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else 0.0


async def _level(url: str, model: str, in_flight: int, n: int, max_tokens: int, tag: str, timeout_s: float) -> dict:
    teacher = AsyncTeacher(url, model, concurrency=in_flight, timeout_s=timeout_s, max_retries=0)
    latencies: list[float] = []
    slots = asyncio.Semaphore(in_flight)  # as the client's own: a call starts when a slot is free

    async def one(i: int) -> None:
        async with slots:
            t0 = time.monotonic()  # latency: sent to answered (the server's queue included)
            await teacher.complete(f"# {tag} {i}\ndef f{i}(x):\n", max_tokens=max_tokens, temperature=0.0)
            latencies.append(time.monotonic() - t0)

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        wall = time.monotonic() - t0
        rate = teacher.rate()
        await teacher.aclose()
    return {
        "in_flight": in_flight,
        "requests": n,
        "wall_s": wall,
        "requests_per_s": n / wall,
        "completion_tokens_per_s": teacher.completion_tokens / wall,
        "prompt_tokens_per_s": teacher.prompt_tokens / wall,
        "rate_requests_per_s": rate["requests_per_s"],  # the client's own sliding-window figure
        "completion_tokens": teacher.completion_tokens,
        "peak_in_flight": teacher.peak_in_flight,
        "p50_s": _pct(latencies, 0.5),
        "p95_s": _pct(latencies, 0.95),
    }


def run(url: str, model: str, levels: list[int], requests: int, max_tokens: int, timeout_s: float) -> list[dict]:
    async def go() -> list[dict]:
        await _level(url, model, 2, 4, max_tokens, "warm-up", timeout_s)
        tag = f"{os.getpid()}-{time.time_ns()}"  # fresh prompts: no server-side prefix cache reuse across runs
        return [await _level(url, model, k, requests, max_tokens, f"{tag}-{k}", timeout_s) for k in levels]

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an OpenAI-compatible server (e.g. vLLM, http://host:8000/v1); default: start one")
    ap.add_argument("--model", help="the model name the --url server serves")
    ap.add_argument("--preset", default="tiny", help="model preset of the local nanochat serve")
    ap.add_argument("--levels", default="8,64,256", help="requests in flight, comma-separated")
    ap.add_argument("--requests", type=int, default=384, help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per request (a queue of 256 on one CPU is slow)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if args.url and not args.model:
        ap.error("--url needs --model")
    with contextlib.ExitStack() as stack:
        if args.url:
            url, model, where = args.url, args.model, args.url
        else:
            url, model = stack.enter_context(_nanochat_serve(args.preset))
            where = f"nanochat serve ({args.preset}, cpu, {torch.get_num_threads()} threads) at {url}"
        rows = run(url, model, levels, args.requests, args.max_tokens, args.timeout_s)
    if args.json:
        print(json.dumps({"server": where, "model": model, "max_tokens": args.max_tokens, "levels": rows}, indent=1))
        return
    print(f"teacher: {where}, model {model!r}, {args.requests} requests per level, max_tokens {args.max_tokens}")
    head = (
        f"{'in flight':>9} {'requests/s':>10} {'rate()':>8} {'compl tok/s':>11} {'peak':>5} {'p50 s':>7} {'p95 s':>7}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['in_flight']:>9} {r['requests_per_s']:>10.1f} {r['rate_requests_per_s']:>8.1f} "
            f"{r['completion_tokens_per_s']:>11.0f} {r['peak_in_flight']:>5} {r['p50_s']:>7.2f} {r['p95_s']:>7.2f}"
        )


if __name__ == "__main__":
    main()
