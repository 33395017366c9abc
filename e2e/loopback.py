"""An aiohttp app served on a loopback port from a daemon thread: test doubles and bench servers.

url, stop = serve_app(app)          # a free port; stop() shuts it down
stop = run_on(app, port)            # a given port (a server restarted where clients expect it)
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable

import httpx
from aiohttp import web


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def completions_app(completions: Callable[[web.Request], Awaitable[web.Response]]) -> web.Application:
    """A test double of an OpenAI-compatible server: POST /v1/completions answered by `completions`,
    GET /health answering ok as vLLM's does (the teacher client waits on it)."""
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", _health)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on(app: web.Application, port: int) -> Callable[[], None]:
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
    return f"http://127.0.0.1:{port}", run_on(app, port)
