"""Async client for a teacher behind an OpenAI-compatible `/v1/completions` (vLLM or `nanochat serve`).

    teacher = AsyncTeacher("http://teacher:8000/v1", "qwen", cache_dir="runs/x/teacher-cache")
    data = await teacher.complete("def f(", max_tokens=32)              # raw, validated JSON
    text, finish = await teacher.completion("def f(", 32, stop=["\ndef "])   # just the text
    top = await teacher.prompt_topk("def f(x):\n    return x\n", k=20)  # [(token, {tok: lp}|None, offset)]
    top = await teacher.prompt_topk([563, 269, 7], k=20)    # token-id prompt: exact alignment

- prompt_topk asks for vLLM's `return_tokens_as_token_ids`: tokens and top_logprobs keys come back
  as "token_id:N" and are parsed into ints, so ids that decode to the same text (lone UTF-8 bytes)
  stay distinct. A server that ignores the flag answers with text keys, which are kept as str.
    results = teacher.run_batch([teacher.prompt_topk(p, 20) for p in prompts])   # from sync code

- At most `concurrency` requests in flight (asyncio.Semaphore), and nothing below it caps them:
  sized for one vLLM server (the config's default, 256, for 8 GPUs). The requests go through an
  httpx client whose transport is aiohttp's connection pool (`AiohttpTransport`): `concurrency`
  connections, all kept alive between bursts (4 s idle at most, under uvicorn's 5 s), the host
  name resolved once and cached. httpx's own pool (httpcore) spends time quadratic in its
  connections on every request: at 256 connections ~11 ms of CPU per request (about 90 requests/s
  for the whole client, taken from the training process), against ~0.3 ms through aiohttp's.
  A `transport` passed in (httpx.MockTransport in tests) replaces it.
- Retries with exponential backoff (honouring a numeric Retry-After) on 429, 5xx, timeouts and
  connection errors, then raises `TeacherUnavailable` (the teacher is down: try again later);
  other 4xx (`TeacherError.status`) and bad bodies fail at once. Each wait is stretched by a
  random 0-50%, so hundreds of requests refused together do not all come back together.
- Answers are cached on disk, one JSON file per sha256 of the request (URL + body), written
  atomically (tmp + os.replace): a repeated run sends zero requests. Only validated answers are
  cached; an unreadable cache file counts as a miss and is rewritten.
- Counters as attributes: requests (HTTP attempts sent), cache_hits, errors (calls that raised),
  retries, latency_s (total seconds spent in HTTP attempts), in_flight (HTTP attempts under way now)
  and peak_in_flight, prompt_tokens and completion_tokens (summed from each answer's `usage`, which
  vLLM and `nanochat serve` send; an answer without `usage`, or with a non-integer count, adds
  nothing, so a server that omits it shows 0 tokens, not an estimate; cache hits add nothing).
- `rate()`: the achieved requests/s, prompt and completion tokens/s over the answers that arrived in
  the last `rate_window_s` seconds (30; cache hits excluded), divided by that window or by the time
  since the first request if shorter. O(1) amortised: call it every step. stats() and record()
  (log.jsonl's "teacher") carry all of these.
Anything malformed raises `TeacherError`: a distillation loss must never be silently wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import torch

RETRY_STATUS = {429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}  # bad API key, unknown model: no later request can succeed

RATE_KEYS = ("requests_per_s", "prompt_tokens_per_s", "completion_tokens_per_s")

TopkEntry = tuple[str | int, dict[str | int, float] | None, int]
TOKEN_ID_PREFIX = "token_id:"


class TeacherError(RuntimeError):
    """The teacher failed, or answered something we cannot trust. `status`: the HTTP status of
    a refused request (400, 404, ...), None for bodies we could not use."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TeacherUnavailable(TeacherError):
    """The teacher could not be reached or stayed overloaded (connection errors, timeouts, 429,
    5xx) through all retries: it is down for now, and the same request may succeed later."""


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


class AsyncTeacher:
    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None = "TEACHER_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        cache_dir: str | os.PathLike | None = None,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        transport: httpx.AsyncBaseTransport | None = None,
        rate_window_s: float = 30.0,
    ):
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0 or rate_window_s <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout_s > 0, rate_window_s > 0")
        base = url.rstrip("/")
        self.url = base + ("/completions" if base.endswith("/v1") else "/v1/completions")
        self.model = model
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._headers: dict[str, str] = {}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = self.cache_hits = self.errors = self.retries = 0
        self.latency_s = 0.0
        self.in_flight = self.peak_in_flight = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.rate_window_s = rate_window_s
        # Answers of the last rate_window_s: (arrival time, prompt tokens, completion tokens), and their sums.
        self._window: deque[tuple[float, int, int]] = deque()
        self._window_sums = [0, 0]
        self._first_sent: float | None = None

    @classmethod
    def from_config(cls, cfg, cache_dir: str | os.PathLike | None = None, **kw: Any) -> AsyncTeacher:
        """From a `TeacherConfig`; `cache_dir` is the fallback when cfg.cache_dir is unset."""
        return cls(
            cfg.url,
            cfg.model,
            api_key_env=cfg.api_key_env,
            concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            cache_dir=cfg.cache_dir if cfg.cache_dir is not None else cache_dir,
            **kw,
        )

    def stats(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "errors": self.errors,
            "retries": self.retries,
            "latency_s": self.latency_s,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            **self.rate(),
        }

    def record(self) -> dict[str, float]:
        """The teacher's figures as a step record of log.jsonl holds them."""
        st = self.stats()
        return {**st, **{k: round(st[k], 3) for k in ("latency_s", *RATE_KEYS)}}

    def rate(self) -> dict[str, float]:
        """Achieved requests_per_s, prompt_tokens_per_s and completion_tokens_per_s: the answers
        (not cache hits, not failed attempts) that arrived in the last `rate_window_s` seconds,
        over that window, or over the time since the first request was sent when that is shorter.
        All 0 before the first answer, and back to 0 once the teacher has been idle a window."""
        now = time.monotonic()
        self._expire(now)
        span = min(self.rate_window_s, now - self._first_sent) if self._first_sent is not None else 0.0
        if span <= 0:
            return dict.fromkeys(RATE_KEYS, 0.0)
        return {
            "requests_per_s": len(self._window) / span,
            "prompt_tokens_per_s": self._window_sums[0] / span,
            "completion_tokens_per_s": self._window_sums[1] / span,
        }

    def _expire(self, now: float) -> None:
        w, sums = self._window, self._window_sums
        while w and w[0][0] <= now - self.rate_window_s:
            _, p, c = w.popleft()
            sums[0] -= p
            sums[1] -= c

    def _count_answer(self, data: dict) -> None:
        """Sum an answer's usage (absent or malformed: nothing) into the totals and the rate window."""
        usage = data.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        p, c = (usage.get(k) for k in ("prompt_tokens", "completion_tokens"))
        p = p if isinstance(p, int) and not isinstance(p, bool) and p >= 0 else 0
        c = c if isinstance(c, int) and not isinstance(c, bool) and c >= 0 else 0
        self.prompt_tokens += p
        self.completion_tokens += c
        now = time.monotonic()
        self._window.append((now, p, c))
        self._window_sums[0] += p
        self._window_sums[1] += c
        self._expire(now)

    # ------------------------------------------------------------------ lifecycle
    def _client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        # httpx connections and the semaphore belong to one event loop: make them per loop.
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
                headers=self._headers,
                transport=self._transport or AiohttpTransport(self.concurrency),
            )
            self._sem, self._loop = asyncio.Semaphore(self.concurrency), loop
        assert self._sem is not None
        return self._http, self._sem

    async def aclose(self) -> None:
        if self._http is not None:
            http, self._http, self._loop = self._http, None, None
            await http.aclose()

    async def __aenter__(self) -> AsyncTeacher:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def run_batch(self, coros: Iterable[Awaitable[Any]]) -> list[Any]:
        """Run coroutines of this teacher concurrently from sync code (new event loop, closed after)."""

        async def go() -> list[Any]:
            try:
                return list(await asyncio.gather(*coros))
            finally:
                await self.aclose()

        return asyncio.run(go())

    # ------------------------------------------------------------------ cache
    def _cache_path(self, body: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(
            json.dumps({"url": self.url, "body": body}, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    @staticmethod
    def _cache_read(path: Path | None) -> dict | None:
        if path is None or not path.is_file():
            return None
        try:
            return _validate(json.loads(path.read_text()))
        except (OSError, ValueError, TeacherError):
            return None  # torn or foreign file: a miss; the fresh answer overwrites it

    @staticmethod
    def _cache_write(path: Path | None, data: dict) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # ------------------------------------------------------------------ requests
    async def _post(self, body: dict, parse: Callable[[dict], Any] | None = None) -> Any:
        """Cached POST; `parse` checks and unpacks the answer before it is cached (a cached file
        that fails it is a miss)."""
        parse = parse or (lambda d: d)
        path = self._cache_path(body)
        cached = self._cache_read(path)
        if cached is not None:
            try:
                out = parse(cached)
                self.cache_hits += 1
                return out
            except TeacherError:
                pass
        try:
            data = await self._send(body)
            out = parse(data)
        except TeacherError:
            self.errors += 1
            raise
        self._cache_write(path, data)
        return out

    async def _send(self, body: dict) -> dict:
        http, sem = self._client()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            delay = 0.0
            async with sem:
                t0 = time.monotonic()
                if self._first_sent is None:
                    self._first_sent = t0
                self.requests += 1
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    r = await http.post(self.url, json=body)
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                    r = None
                finally:
                    self.in_flight -= 1
                    self.latency_s += time.monotonic() - t0
            if r is not None:
                if r.status_code in RETRY_STATUS:
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                    try:
                        delay = float(r.headers.get("retry-after", 0))
                    except ValueError:
                        delay = 0.0
                elif r.status_code >= 400:
                    raise TeacherError(
                        f"{self.url} answered HTTP {r.status_code}: {r.text[:300]}", status=r.status_code
                    )
                else:
                    try:
                        data = r.json()
                    except ValueError as exc:
                        raise TeacherError(f"{self.url} returned non-JSON: {r.text[:200]!r}") from exc
                    data = _validate(data)
                    self._count_answer(data)
                    return data
            if attempt < self.max_retries:
                wait = min(self.max_backoff, max(delay, self.backoff * 2**attempt))
                await asyncio.sleep(wait * (1 + 0.5 * random.random()))
        raise TeacherUnavailable(f"{self.url} failed after {self.max_retries + 1} attempts; last error: {last}")

    def _body(
        self,
        prompt: str | list[int],
        max_tokens: int,
        temperature: float,
        logprobs: int | None,
        echo: bool,
        **extra: Any,
    ) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "echo": bool(echo),
            **extra,
        }
        if logprobs is not None:
            body["logprobs"] = int(logprobs)
        return body

    async def complete(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float = 0.0,
        logprobs: int | None = None,
        echo: bool = False,
        **extra: Any,
    ) -> dict:
        """POST one completion; returns the parsed JSON (validated: a non-empty `choices` list)."""
        return await self._post(self._body(prompt, max_tokens, temperature, logprobs, echo, **extra))

    async def completion(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> tuple[str, str | None]:
        """The text the teacher appends to `prompt`, and its finish_reason. A seed is sent when
        sampling (temperature > 0), so the answer, and its cache key, are reproducible."""
        extra: dict[str, Any] = {}
        if stop:
            extra["stop"] = list(stop)
        if temperature > 0 and seed is not None:
            extra["seed"] = int(seed)
        body = self._body(prompt, max_tokens, temperature, None, False, **extra)
        return await self._post(body, lambda data: parse_completion(data, where=self.url))

    async def prompt_topk(
        self, prompt: str | list[int], k: int, token_ids: bool = True, strict: bool = True
    ) -> list[TopkEntry]:
        """The teacher's top-k next-token logprobs at every prompt position (echo, max_tokens=0).

        `prompt` is text, or a list of token ids (the teacher must share the tokenizer; the echoed
        ids must equal them). Entry i is (token, top, text_offset) for prompt token i in the
        teacher's tokenization; `top` is the distribution that predicted token i ({token: logprob},
        at least k entries; vLLM may add the actual token as a k+1-th), None for the first token.
        Tokens and keys are ints where the server honours `return_tokens_as_token_ids` (asked
        for unless token_ids=False), else decoded text. `strict=False` (text prompts, text tokens:
        cross-tokenizer use) accepts echoed tokens that do not spell the prompt exactly (a
        byte-level token holding half a UTF-8 character decodes to U+FFFD); the caller then
        checks each token against the prompt at its text_offset.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        if not isinstance(prompt, str):
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise ValueError("empty token-id prompt")
        extra = {"return_tokens_as_token_ids": True} if token_ids else {}
        body = self._body(prompt, max_tokens=0, temperature=0.0, logprobs=k, echo=True, **extra)
        return await self._post(body, lambda data: parse_prompt_topk(data, prompt, k, where=self.url, strict=strict))


def _validate(data: Any) -> dict:
    if not isinstance(data, dict):
        raise TeacherError(f"teacher answer is not a JSON object: {str(data)[:200]}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise TeacherError(f"teacher answer has no choices: {str(data)[:200]}")
    return data


def _token_key(t: Any) -> str | int:
    """ "token_id:N" -> N; other strings unchanged."""
    if not isinstance(t, str):
        raise TypeError(f"token {t!r} is not a string")
    if t.startswith(TOKEN_ID_PREFIX):
        try:
            n = int(t[len(TOKEN_ID_PREFIX) :])
        except ValueError:
            raise ValueError(f"bad token id key {t!r}") from None
        if n < 0:
            raise ValueError(f"bad token id key {t!r}")
        return n
    return t


def parse_completion(data: dict, where: str = "teacher") -> tuple[str, str | None]:
    """(text, finish_reason) of the first choice of a plain completion."""
    choice = data["choices"][0]
    text, finish = choice.get("text"), choice.get("finish_reason")
    if not isinstance(text, str) or not (finish is None or isinstance(finish, str)):
        raise TeacherError(f"{where}: completion without text: {str(choice)[:200]}")
    return text, finish


def parse_prompt_topk(
    data: dict, prompt: str | list[int], k: int, where: str = "teacher", strict: bool = True
) -> list[TopkEntry]:
    """Check and unpack an echo+logprobs answer (vLLM's shape) into per-token entries."""
    try:
        lp = data["choices"][0]["logprobs"]
        tokens, tops, offsets = lp["tokens"], lp["top_logprobs"], lp["text_offset"]
        if not (isinstance(tokens, list) and isinstance(tops, list) and isinstance(offsets, list)):
            raise TypeError("tokens, top_logprobs and text_offset must be lists")
        if not (len(tokens) == len(tops) == len(offsets)):
            raise ValueError(f"length mismatch: {len(tokens)} tokens, {len(tops)} top_logprobs, {len(offsets)} offsets")
        out: list[TopkEntry] = []
        for i, (tok, top, off) in enumerate(zip(tokens, tops, offsets)):
            if not isinstance(tok, str) or not isinstance(off, int):
                raise TypeError(f"position {i}: bad token {tok!r} or offset {off!r}")
            tok = _token_key(tok)
            if top is None and i == 0:
                out.append((tok, None, off))
                continue
            if not isinstance(top, dict):
                raise TypeError(f"position {i}: top_logprobs is {top!r}")
            # top_logprobs maps token *text* to logprob, so byte-level tokens that are not whole
            # UTF-8 characters all decode to U+FFFD and collapse into one key. Token-id answers
            # (strict) must have all k; a text answer (cross-tokenizer) may be short by exactly
            # such a collision, its lost mass going to the rest bucket; any other shortfall fails.
            collided = not strict and bool(top) and any("\ufffd" in str(key) for key in top)
            if len(top) < k and not collided:
                raise ValueError(f"position {i}: {len(top)} top logprobs, asked for {k}")
            clean = {}
            for t, v in top.items():
                v = float(v)
                if not v <= 0.0 + 1e-4:  # also rejects NaN
                    raise ValueError(f"position {i}: logprob {v} of {t!r} is not <= 0")
                clean[_token_key(t)] = v
            out.append((tok, clean, off))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise TeacherError(f"{where}: bad prompt logprobs ({exc})") from exc
    toks = [t for t, _, _ in out]
    if isinstance(prompt, list) and all(isinstance(t, str) for t in toks):
        # A server without return_tokens_as_token_ids: texts; the caller maps them (topk_tensors).
        if len(toks) != len(prompt):
            raise TeacherError(f"{where}: {len(toks)} echoed tokens for a {len(prompt)}-token prompt")
    elif isinstance(prompt, list):
        if toks != prompt:
            raise TeacherError(
                f"{where}: echoed tokens are not the prompt's token ids "
                "(does the server return token ids, and share the tokenizer?)"
            )
    elif all(isinstance(t, str) for t in toks):
        if strict and "".join(toks) != prompt:
            raise TeacherError(f"{where}: echoed tokens do not spell the prompt")
        if any(b < a for (_, _, a), (_, _, b) in zip(out, out[1:])):
            raise TeacherError(f"{where}: text_offset values decrease")
    elif not all(isinstance(t, int) for t in toks) or data["choices"][0].get("text", prompt) != prompt:
        raise TeacherError(f"{where}: echoed tokens do not spell the prompt")
    return out


def token_id_map(tok) -> dict[str, int | None]:
    """Decoded text -> token id for a tokenizer the teacher shares; None where several ids
    decode to the same text (e.g. lone UTF-8 bytes), which cannot be told apart."""
    out: dict[str, int | None] = {}
    for i in range(tok.n_vocab):
        try:
            s = tok.decode([i])
        except Exception:  # special or unused ids
            continue
        out[s] = None if s in out else i
    return out


def topk_tensors(
    entries: list[TopkEntry], vocab: dict[str, int | None] | None, k: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position teacher targets for `topk_kl_loss`, aligned with the prompt's token ids.

    Row i holds the top-k that predicted token i+1 (i.e. for the student's logits at position i);
    returns ids (T, k) long, logprobs (T, k) float and mask (T,) bool, T = len(entries). The last
    row (nothing to predict) is masked. Int keys (token ids) are used as they are (`vocab` may
    be None when all are ints); unknown or ambiguous token texts raise TeacherError.
    """
    t = len(entries)
    ids = torch.zeros(t, k, dtype=torch.long)
    lps = torch.full((t, k), -torch.log(torch.tensor(float(k))).item())
    mask = torch.zeros(t, dtype=torch.bool)
    for i in range(t - 1):
        top = entries[i + 1][1]
        if top is None or len(top) < k:
            raise TeacherError(f"position {i + 1}: need {k} top logprobs")
        best = sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:k]
        for j, (text, lp) in enumerate(best):
            tid = text if isinstance(text, int) else (vocab or {}).get(text)
            if tid is None:
                raise TeacherError(
                    f"position {i + 1}: teacher token {text!r} is "
                    f"{'ambiguous' if text in (vocab or {}) else 'not'} in the student's vocabulary"
                )
            ids[i, j], lps[i, j] = tid, lp
        mask[i] = True
    return ids.to(device), lps.to(device), mask.to(device)
