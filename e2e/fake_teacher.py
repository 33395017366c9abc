"""FakeQwen3Teacher: a stand-in for the production teacher (a Qwen3 FP8 model behind vLLM's
OpenAI-compatible server), which no machine here can reach. It is a real HTTP server that
answers `/v1/completions` with vLLM's JSON (choices, finish_reason, usage), so the client, the
generation stage and its bench run against the wire format they meet in production; the
*content* of its answers is fake: exercises and textbook sections assembled from the repo's
synthetic generator, and, for a fixed share of the requests, the failures a real teacher has.

    python -m e2e.fake_teacher --port 8000 [--tokens-per-s 60] [--latency-ms 50]
    app = fake_teacher_app(FakeQwen3Teacher())        # an aiohttp app, for tests/serving.serve_app
    with serving(FakeQwen3Teacher()) as url: ...       # served on loopback while the block runs

What a request gets depends only on its `seed` (stage generate sends one per request), so a
test knows what to expect: `FakeQwen3Teacher.kind_of(seed)` names it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import time
from collections.abc import Iterator

from aiohttp import web

from e2e.loopback import completions_app, serve_app
from nanochat_trainer.data.synthetic import document
from nanochat_trainer.eval.humaneval import load_problems

# Its documents come from the synthetic generator at a seed of their own, so a mixture of
# synthetic data (seed 0 by default) and the fake's output does not hold the same programs twice.
SEED = 7919
# One request in CYCLE of each failure; the rest are good answers.
CYCLE = 20
FAILURES = {
    1: "malformed",  # prose, no code
    2: "empty",
    3: "truncated",  # cut at max_tokens
    4: "tests_failed",  # an assert that does not hold
    5: "duplicate",  # the answer given to seed - 6, again
    6: "contaminated",  # HumanEval/0 with three asserts of its own
    7: "no_tests",
    8: "off_topic",  # a textbook page about something else
}
_EXERCISE = re.compile(r"Python exercise about (?P<topic>[^,]+), focused on (?P<concept>[^.]+)\.")
_TEXTBOOK = re.compile(r"Python textbook about (?P<topic>[^:]+): (?P<concept>[^.]+)\.")


class FakeQwen3Teacher:
    """Answers after `latency_ms` plus one completion token per 1/`tokens_per_s` seconds (a decode
    rate per request, as a batched server has); records requests and the most held at once.
    `only`: every answer of that kind (a teacher that always fails the same way)."""

    def __init__(self, tokens_per_s: float = 0.0, latency_ms: float = 0.0, only: str | None = None):
        self.tokens_per_s, self.latency_ms, self.only = tokens_per_s, latency_ms, only
        self.requests = self.now = self.peak = 0

    @staticmethod
    def kind_of(seed: int) -> str:
        return FAILURES.get(seed % CYCLE, "good")

    def answer(self, prompt: str, seed: int, max_tokens: int) -> tuple[str, str]:
        """(text, finish_reason) for a ChatML prompt of datagen/seeds.py."""
        kind = self.only or self.kind_of(seed)
        ask = _EXERCISE.search(prompt) or _TEXTBOOK.search(prompt)
        concept = ask["concept"] if ask else "python"
        exercise = _EXERCISE.search(prompt) is not None
        doc = document(SEED, seed if kind != "duplicate" else seed - 6)  # seed - 6 got a good answer
        if kind == "malformed":
            return "I would write a loop over the items and return the total, but it depends on the data.", "stop"
        if kind == "empty":
            return "", "stop"
        if kind == "truncated":
            return "```python\n" + doc[: len(doc) // 2], "length"
        if kind == "tests_failed":
            doc = _break_first_assert(doc)
        if kind == "contaminated":
            p = load_problems()[0]
            name = p["entry_point"]
            tests = "\n".join(f"assert {name}([1.0, {x}], 0.5) == {x < 1.5}" for x in (1.2, 2.0, 3.0))
            doc = p["prompt"] + p["canonical_solution"] + "\n\n" + tests + "\n"
        if kind == "no_tests":
            doc = "\n".join(line for line in doc.splitlines() if not line.startswith("assert")) + "\n"
        if kind == "off_topic":
            return "## Cooking rice\n\nRinse the rice, add water, and simmer for twenty minutes. " * 3, "stop"
        if exercise:
            text = f"Here is an exercise on {concept}.\n\n```python\n{doc}```\n\nThe asserts check the examples."
        else:
            text = (
                f"## {concept.capitalize()}\n\nThis section is about {concept}. Read the function below and "
                f"notice how each step of {concept} is written, then run the checks at the end of it.\n\n"
                f"```python\n{doc}```\n\nEach assert states one fact about {concept}."
            )
        return text, "stop"

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            text, finish = self.answer(str(body["prompt"]), int(body.get("seed") or 0), int(body["max_tokens"]))
            tokens = max(1, len(text) // 4)  # a fake's token count: GPT-2-like 4 characters per token
            delay = self.latency_ms / 1000 + (tokens / self.tokens_per_s if self.tokens_per_s else 0.0)
            if delay:
                await asyncio.sleep(delay)
        finally:
            self.now -= 1
        return web.json_response(
            {
                "id": f"cmpl-{self.requests}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": len(str(body["prompt"])) // 4,
                    "total_tokens": len(str(body["prompt"])) // 4 + tokens,
                    "completion_tokens": tokens,
                    "prompt_tokens_details": None,
                },
                "service_tier": None,
                "system_fingerprint": None,
                "kv_transfer_params": None,
            }
        )


def _break_first_assert(doc: str) -> str:
    """The document with its first assert made false (the function stays as it was)."""
    lines = doc.splitlines(keepends=True)
    for n, line in enumerate(lines):
        if line.startswith("assert "):
            if " == " in line:
                lines[n] = line.rsplit(" == ", 1)[0] + ' == "never"\n'
            elif line.startswith("assert not "):
                lines[n] = "assert " + line.removeprefix("assert not ")
            else:
                lines[n] = "assert not " + line.removeprefix("assert ")
            break
    return "".join(lines)


@contextlib.contextmanager
def serving(teacher: FakeQwen3Teacher) -> Iterator[str]:
    """`teacher` on a free loopback port, in a daemon thread, while the block runs: its URL."""
    url, stop = serve_app(fake_teacher_app(teacher))
    try:
        yield url
    finally:
        stop()


def fake_teacher_app(teacher: FakeQwen3Teacher) -> web.Application:
    return completions_app(teacher.completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="decode rate per request (0: instant)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    web.run_app(fake_teacher_app(FakeQwen3Teacher(args.tokens_per_s, args.latency_ms)), port=args.port)


if __name__ == "__main__":
    main()
