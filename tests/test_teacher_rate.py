"""The teacher client keeps `concurrency` requests in flight and reports what it achieved.

    .venv/bin/pytest tests/test_teacher_rate.py -q

`FakeSlowVLLM` stands in for a production vLLM server (unreachable from a test): a real HTTP server
on loopback that answers OpenAI-completions JSON with `usage` after a fixed sleep and records how
many requests it held at once and over how many connections. The last test counts the usage of
a real `nanochat serve` of a tiny checkpoint.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from nanochat_trainer.distill.teacher import AsyncTeacher, TeacherUnavailable

from serving import completions_app, serve_app, teacher_app

SLEEP_S = 0.25


class FakeSlowVLLM:
    """Answers each completion after `sleep_s`: `max_tokens` completion tokens, one prompt token per
    character; `usage` left out for prompts starting with "nousage"; the first `refuse` get a 503.
    Records the most requests it held at once (`peak`) and the client ports they came from (`peers`)."""

    def __init__(self, sleep_s: float = SLEEP_S):
        self.sleep_s = sleep_s
        self.now = self.peak = self.hits = 0
        self.refuse = 0  # answer this many requests 503 first (after the sleep), as an overloaded server does
        self.peers: set = set()

    async def completions(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.now += 1
        self.peak = max(self.peak, self.now)
        self.peers.add(request.transport.get_extra_info("peername"))
        try:
            body = await request.json()
            await asyncio.sleep(self.sleep_s)
        finally:
            self.now -= 1
        if self.refuse > 0:
            self.refuse -= 1
            return web.json_response({"error": "overloaded"}, status=503)
        n = int(body["max_tokens"])
        answer = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": body["model"],
            "choices": [{"index": 0, "text": "x" * n, "logprobs": None, "finish_reason": "length"}],
        }
        if not body["prompt"].startswith("nousage"):
            answer["usage"] = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": 0}
        return web.json_response(answer)

    def app(self) -> web.Application:
        return completions_app(self.completions)


@pytest.fixture
def fake():
    server = FakeSlowVLLM()
    url, stop = serve_app(server.app())
    yield url, server
    stop()


def test_64_in_flight_usage_summed_and_rate(fake, tmp_path) -> None:
    url, server = fake
    teacher = AsyncTeacher(url + "/v1", "big", concurrency=64, cache_dir=tmp_path / "cache")
    n = 200
    prompts = [f"p{i:04d}" for i in range(n)]  # 5 prompt tokens each
    lens = [1 + i % 7 for i in range(n)]

    async def two_bursts() -> list[dict]:
        # As the distillation feeds ask: a burst, a wait for all of it, the next burst on the same client.
        calls = [teacher.complete(p, max_tokens=k) for p, k in zip(prompts, lens)]
        try:
            return [*await asyncio.gather(*calls[: n // 2]), *await asyncio.gather(*calls[n // 2 :])]
        finally:
            await teacher.aclose()

    t0 = time.monotonic()
    out = asyncio.run(two_bursts())
    wall = time.monotonic() - t0
    rate = teacher.rate()
    assert [o["choices"][0]["text"] for o in out] == ["x" * k for k in lens]

    # Everything the semaphore lets through reaches the server at once, over 64 reused connections.
    assert server.hits == n and server.peak >= 60, server.peak
    assert teacher.peak_in_flight == server.peak and teacher.in_flight == 0
    assert len(server.peers) == 64, len(server.peers)  # all kept alive through the gap, not reopened
    assert teacher.completion_tokens == sum(lens) and teacher.prompt_tokens == 5 * n

    # The achieved rate is the known one: n answers over the batch's wall time, at most 64 per sleep.
    assert 0.8 * n / wall <= rate["requests_per_s"] <= 1.1 * n / wall <= 64 / SLEEP_S * 1.1, (rate, wall)
    assert rate["completion_tokens_per_s"] == pytest.approx(rate["requests_per_s"] * sum(lens) / n, rel=1e-6)
    assert rate["prompt_tokens_per_s"] == pytest.approx(rate["requests_per_s"] * 5, rel=1e-6)
    st, rec = teacher.stats(), teacher.record()
    assert st["peak_in_flight"] == server.peak and st["completion_tokens"] == sum(lens) and st["in_flight"] == 0
    assert rec["requests"] == n and rec["requests_per_s"] == round(rec["requests_per_s"], 3) > 0

    # Cache hits count in neither tokens nor rate; an answer without usage adds no tokens.
    again = AsyncTeacher(url + "/v1", "big", concurrency=64, cache_dir=tmp_path / "cache")
    again.run_batch([again.complete(p, max_tokens=k) for p, k in zip(prompts, lens)])
    assert again.cache_hits == n and again.completion_tokens == 0
    assert again.rate() == {"requests_per_s": 0.0, "prompt_tokens_per_s": 0.0, "completion_tokens_per_s": 0.0}
    again.run_batch([again.complete("nousage", max_tokens=3)])
    assert again.requests == 1 and again.completion_tokens == again.prompt_tokens == 0
    assert again.rate()["requests_per_s"] > 0 and again.rate()["completion_tokens_per_s"] == 0


def test_rate_window_slides(fake) -> None:
    url, server = fake
    server.sleep_s = 0.05
    teacher = AsyncTeacher(url, "big", concurrency=4, rate_window_s=0.5)
    assert teacher.rate()["requests_per_s"] == 0.0
    teacher.run_batch([teacher.complete(f"q{i}", max_tokens=2) for i in range(8)])
    assert teacher.rate()["requests_per_s"] > 0 and teacher.rate()["completion_tokens_per_s"] > 0
    time.sleep(0.6)  # a window with no answers: nothing achieved now, the totals stay
    assert teacher.rate()["requests_per_s"] == 0.0 and teacher.completion_tokens == 16
    assert teacher.peak_in_flight == server.peak == 4


def test_usage_counted_from_nanochat_serve(ckpt) -> None:
    seen = {"n": 0}
    url, stop = serve_app(teacher_app(ckpt, seen))
    try:
        teacher = AsyncTeacher(url + "/v1", "teacher", concurrency=4)
        prompts = ["def add(a, b):\n", "import os\n", "x = 1\n"]
        out = teacher.run_batch([teacher.complete(p, max_tokens=5, temperature=0.0) for p in prompts])
        usage = [o["usage"] for o in out]
        assert seen["n"] == 3 and all(u["completion_tokens"] > 0 for u in usage)
        assert teacher.completion_tokens == sum(u["completion_tokens"] for u in usage)
        assert teacher.prompt_tokens == sum(u["prompt_tokens"] for u in usage) > 0
        assert teacher.peak_in_flight == 3 and teacher.rate()["completion_tokens_per_s"] > 0
        # Prompt logprobs (top-k distillation) generate nothing: their work is prompt tokens.
        before = teacher.prompt_tokens
        teacher.run_batch([teacher.prompt_topk(prompts[0], 3)])
        assert teacher.prompt_tokens > before and teacher.completion_tokens == sum(
            u["completion_tokens"] for u in usage
        )
    finally:
        stop()


def test_256_in_flight_retried_together(fake) -> None:
    """At the default concurrency a whole wave refused at once (503) backs off outside the semaphore
    and comes back: every call succeeds, each refusal is one retry. And the client stays cheap:
    httpx's own pool spent ~11 ms of CPU per request at 256 connections (7 s here, not 1)."""
    url, server = fake
    # 0.4 s per answer: time for all 256 to reach the server's loop before the first leave, even on a busy machine.
    server.sleep_s, server.refuse = 0.4, 100
    teacher = AsyncTeacher(url, "big", concurrency=256, backoff=0.05)
    t0, cpu0 = time.monotonic(), time.process_time()
    out = teacher.run_batch([teacher.complete(f"r{i}", max_tokens=1) for i in range(300)])
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0  # the fake server's CPU included
    assert len(out) == 300 and teacher.errors == 0 and teacher.retries == 100 and teacher.requests == 400
    assert teacher.peak_in_flight == 256 and server.peak >= 240 and teacher.completion_tokens == 300, server.peak
    assert cpu / teacher.requests < 0.004 and wall < 4, (cpu, wall)


def test_timeout_is_a_retried_read_timeout(fake) -> None:
    """The per-request timeout holds through the aiohttp transport, as httpx's ReadTimeout."""
    url, server = fake
    server.sleep_s = 1.0
    teacher = AsyncTeacher(url, "big", timeout_s=0.2, max_retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailable, match="after 2 attempts.*ReadTimeout"):
        teacher.run_batch([teacher.complete("slow", max_tokens=1)])
    assert time.monotonic() - t0 < 0.9 and teacher.requests == 2 and teacher.in_flight == 0
