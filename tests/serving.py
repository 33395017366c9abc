"""Serve our OpenAI-compatible server (or a test double) on a loopback port for a test
(`e2e/loopback.py` runs the servers; re-exported here).

url, stop = serve_app(app)                          # any aiohttp app, on a free port
seen = {"n": 0}; app = teacher_app(final_dir, seen)  # a checkpoint served, its completions counted
teacher = Teacher(final_dir).start(); teacher.stop(); teacher.start()   # same port again
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from e2e.loopback import completions_app, free_port, run_on, serve_app  # noqa: F401 (re-exported for the tests)
from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.serve import ModelServer


def teacher_app(final_dir: Path, seen: dict[str, int], max_logprobs: int = 20) -> web.Application:
    """`nanochat serve` of a checkpoint as model "teacher", counting completion requests in seen["n"];
    `max_logprobs` as vLLM's --max-logprobs (20 by default there too)."""
    model, tok, _ = load_model(final_dir)

    @web.middleware
    async def count(request, handler):
        if request.path == "/v1/completions":
            seen["n"] += 1
        return await handler(request)

    app = ModelServer(model, tok, model_name="teacher", max_logprobs=max_logprobs).app()
    app.middlewares.append(count)
    return app


class Teacher:
    """A served checkpoint on a fixed loopback port that can be stopped and started again on the
    same port (a teacher killed and restarted); `n` counts its completion requests."""

    def __init__(self, final_dir: Path):
        self.final_dir = final_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen = {"n": 0}
        self._stop: Callable[[], None] | None = None

    @property
    def n(self) -> int:
        return self.seen["n"]

    def start(self) -> Teacher:
        self._stop = run_on(teacher_app(self.final_dir, self.seen), self.port)
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None
