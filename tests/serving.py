"""Serve our OpenAI-compatible server (or a test double) on a loopback port for a test.

url, stop = serve_app(app)                          # any aiohttp app, on a free port
seen = {"n": 0}; app = teacher_app(final_dir, seen)  # a checkpoint served, its completions counted
teacher = Teacher(final_dir).start(); teacher.stop(); teacher.start()   # same port again
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from aiohttp import web

from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.serve import ModelServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(app: web.Application, port: int) -> Callable[[], None]:
    """Serve `app` on 127.0.0.1:port in a daemon thread until the returned stop() is called."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    up = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        up.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert up.wait(10), "the server did not start"
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(url + "/health")
            break
        except httpx.TransportError:
            time.sleep(0.05)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)

    return stop


def serve_app(app: web.Application) -> tuple[str, Callable[[], None]]:
    """Start `app` on a free port in a daemon thread; returns (url, stop)."""
    port = free_port()
    return f"http://127.0.0.1:{port}", _run(app, port)


def teacher_app(final_dir: Path, seen: dict[str, int]) -> web.Application:
    """`nanochat serve` of a checkpoint as model "teacher", counting completion requests in seen["n"]."""
    model, tok, _ = load_model(final_dir)

    @web.middleware
    async def count(request, handler):
        if request.path == "/v1/completions":
            seen["n"] += 1
        return await handler(request)

    app = ModelServer(model, tok, model_name="teacher").app()
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
        self._stop = _run(teacher_app(self.final_dir, self.seen), self.port)
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None
