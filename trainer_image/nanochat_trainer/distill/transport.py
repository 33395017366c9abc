"""The teacher client's connection pool: an httpx transport over aiohttp's.

    http = httpx.AsyncClient(transport=AiohttpTransport(limit=256))

`AsyncTeacher` (teacher.py) sends through httpx, and through this transport unless a test passes
its own. Its `limit` connections are all kept alive between bursts (4 s idle at most, under
uvicorn's 5 s), the host name resolved once and cached. httpx's own pool (httpcore) spends time
quadratic in its connections on every request: at 256 connections ~11 ms of CPU per request
(about 90 requests/s for the whole client, taken from the training process), against ~0.3 ms
through aiohttp's.
"""

from __future__ import annotations

import aiohttp
import httpx


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport over one aiohttp ClientSession (made on first use, in the running loop):
    at most `limit` connections, kept alive `keepalive_s` when idle. Honours the connect and read
    timeouts httpx passes with each request; aiohttp's errors become httpx's (ConnectError,
    ConnectTimeout, ReadTimeout, RemoteProtocolError, ReadError), so callers see httpx only."""

    def __init__(self, limit: int, keepalive_s: float = 4.0):
        self.limit, self.keepalive_s = limit, keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.limit, limit_per_host=0, keepalive_timeout=self.keepalive_s)
            # httpx sets the headers (Accept-Encoding, cookies) and decodes the body itself. trust_env:
            # HTTP(S)_PROXY and NO_PROXY apply as they did to httpx's own transport.
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), trust_env=True
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        t = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.get("connect"), sock_read=t.get("read"))
        body = await request.aread()
        try:
            async with self._get_session().request(
                request.method,
                str(request.url),
                headers=list(request.headers.multi_items()),
                data=body,
                timeout=timeout,
                allow_redirects=False,
            ) as r:
                content = await r.read()
                headers = [(k, v) for k, v in r.raw_headers if k.lower() != b"transfer-encoding"]
                return httpx.Response(r.status, headers=headers, content=content, request=request)
        except aiohttp.InvalidURL as exc:  # a ClientError, but no retry can fix it
            raise httpx.UnsupportedProtocol(f"{type(exc).__name__}: {exc}", request=request) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise httpx.RemoteProtocolError(str(exc) or "server disconnected", request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
