"""Async client for a teacher behind an OpenAI-compatible `/v1/completions` (vLLM or `nanochat serve`).

    teacher = AsyncTeacher("http://teacher:8000/v1", "qwen", cache_dir="runs/x/teacher-cache")
    data = await teacher.complete("def f(", max_tokens=32)              # raw, validated JSON
    text, finish = await teacher.completion("def f(", 32, stop=["\ndef "])   # just the text
    top = await teacher.prompt_topk("def f(x):\n    return x\n", k=20)  # [(token, {tok: lp}|None, offset)]
    top = await teacher.prompt_topk([563, 269, 7], k=20)    # token-id prompt: exact alignment
    results = teacher.run_batch([teacher.prompt_topk(p, 20) for p in prompts])   # from sync code

- prompt_topk asks for vLLM's `return_tokens_as_token_ids`: tokens and top_logprobs keys come back
  as "token_id:N" and are parsed into ints, so ids that decode to the same text (lone UTF-8 bytes)
  stay distinct. A server that ignores the flag answers with text keys, which are kept as str.

- At most `concurrency` requests in flight (asyncio.Semaphore), and nothing below it caps them:
  sized for one vLLM server (the config's default, 256, for 8 GPUs). The requests go through an
  httpx client whose transport is aiohttp's connection pool (transport.py's `AiohttpTransport`,
  which says why not httpx's own): `concurrency` connections, all kept alive between bursts.
  A `transport` passed in (httpx.MockTransport in tests) replaces it.
- The URL must be http(s)://host[:port][/path] (`url_problem`): a malformed one is refused when
  the client is made, not retried as an outage.
- Retries with exponential backoff (honouring a numeric Retry-After) on 408, 429, 5xx, timeouts and
  connection errors, then raises `TeacherUnavailable` (the teacher is down: try again later);
  other 4xx (`TeacherError.status`, `.refused`; the message quotes the server's own) and bad bodies
  fail at once. Each wait is stretched by a random 0-50%, so hundreds of requests refused
  together do not all come back together. `probe()`: one request, no retries, no cache: does the
  teacher answer now (a caller that found it down asks this before sending real work again).
- Answers are cached on disk (`cache_dir`, cache.py's `AnswerCache`): a repeated run sends no
  completion requests. The key holds the teacher's identity, what GET /v1/models says of the
  served model (id, root, parent, max_model_len), asked here once; a server that says nothing
  there keys on URL + body alone, and while /v1/models cannot be reached the cache is not used.
  A fresh answer goes through the cache's encoding too (the request's `Codec`), so a replay from
  the cache is bit-identical to the first run.
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
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .cache import ANSWER, COMPLETION, TOPK, AnswerCache, Codec, TopkEntry
from .transport import AiohttpTransport

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}  # bad API key, unknown model: no later request can succeed
IDENTITY_RETRY_S = 5.0  # while /v1/models cannot be reached, ask it again at most this often
IDENTITY_FIELDS = ("id", "root", "parent", "max_model_len")  # not `created`: vLLM sets it per request

RATE_KEYS = ("requests_per_s", "prompt_tokens_per_s", "completion_tokens_per_s")

TOKEN_ID_PREFIX = "token_id:"


class TeacherError(RuntimeError):
    """The teacher failed, or answered something we cannot trust. `status`: the HTTP status of
    a refused request (400, 404, ...), None for bodies we could not use."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def refused(self) -> bool:
        """The server understood the request and said no (a 4xx that is not retried): sending the
        same request again gets the same answer."""
        return self.status is not None and 400 <= self.status < 500


class TeacherUnavailable(TeacherError):
    """The teacher could not be reached or stayed overloaded (connection errors, timeouts, 429,
    5xx) through all retries: it is down for now, and the same request may succeed later."""


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
        problem = url_problem(url)
        if problem:
            raise ValueError(f"teacher url {url!r}: {problem}")
        base = url.rstrip("/")
        api = base if base.endswith("/v1") else base + "/v1"
        self.url, self.models_url = api + "/completions", api + "/models"
        self.model = model
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache = AnswerCache(self.cache_dir) if self.cache_dir is not None else None
        self._headers: dict[str, str] = {}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._identity_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._identity: str | None = None  # the served model's identity; None until /v1/models answers
        self._identity_after = 0.0  # monotonic time before which /v1/models is not asked again
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
            self._identity_lock = asyncio.Lock()
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
    async def _cache_path(self, body: dict) -> Path | None:
        """Where this request's answer is cached; None without a cache, or while the teacher's
        identity is unknown (an answer filed under no identity could be another teacher's)."""
        if self._cache is None:
            return None
        identity = await self._teacher_identity()
        if identity is None:
            return None
        return self._cache.path(self.url, identity, body)

    async def _teacher_identity(self) -> str | None:
        """The served model's identity (IDENTITY_FIELDS of its /v1/models entry, as JSON), asked
        once; "" where the server gives none (no such route, or the model not listed); None while
        it cannot be asked (down: asked again after IDENTITY_RETRY_S)."""
        if self._identity is not None:
            return self._identity
        http, _ = self._client()
        assert self._identity_lock is not None
        async with self._identity_lock:
            if self._identity is None and time.monotonic() >= self._identity_after:
                try:
                    r = await http.get(self.models_url)
                except httpx.HTTPError:  # down: the cache waits until it can be asked
                    self._identity_after = time.monotonic() + IDENTITY_RETRY_S
                except Exception as exc:  # a transport that knows no such route (a test double): none
                    log.warning("GET %s failed (%s): teacher cache keyed on URL + body", self.models_url, exc)
                    self._identity = ""
                else:
                    if r.status_code in RETRY_STATUS or r.status_code >= 500:
                        self._identity_after = time.monotonic() + IDENTITY_RETRY_S
                    else:
                        self._identity = _model_identity(r, self.model)
        return self._identity

    # ------------------------------------------------------------------ requests
    async def _post(self, body: dict, parse: Callable[[dict], Any], codec: Codec) -> Any:
        """Cached POST: `parse` checks and unpacks the answer, `codec` stores what it returns. A
        cached file that does not decode is a miss."""
        path = await self._cache_path(body)
        if path is not None and self._cache is not None:
            cached = self._cache.read(path, codec)
            if cached is not None:
                self.cache_hits += 1
                return cached
            # absent, torn or foreign (an older format): a miss; the fresh answer overwrites it
        try:
            answer = parse(await self._send(body))
            try:
                blob = codec.encode(answer)
            except ValueError as exc:  # an answer the cache's format cannot hold (a token id past int32)
                raise TeacherError(str(exc)) from exc
        except TeacherError:
            self.errors += 1
            raise
        if path is not None and self._cache is not None:
            self._cache.write(path, blob)  # a failure is logged once: the answer is still used
        return codec.decode(blob)  # what a replay from the cache will return, exactly

    async def probe(self) -> bool:
        """One short request, no retries, no cache: True when the teacher answers (anything but
        a timeout, a connection error, 408, 429 or 5xx)."""
        http, sem = self._client()
        async with sem:
            self.requests += 1
            try:
                r = await http.post(self.url, json=self._body("\n", 1, 0.0, None, False))
            except httpx.HTTPError:
                return False
        return r.status_code not in RETRY_STATUS and r.status_code < 500

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
                except httpx.UnsupportedProtocol as exc:
                    raise TeacherError(f"{self.url}: not a URL the client can use: {exc}") from exc
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
                        f"{self.url} answered HTTP {r.status_code}: {server_message(r)}", status=r.status_code
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
        return await self._post(self._body(prompt, max_tokens, temperature, logprobs, echo, **extra), _validate, ANSWER)

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
        return await self._post(body, lambda data: parse_completion(data, where=self.url), COMPLETION)

    async def prompt_topk(
        self, prompt: str | list[int], k: int, token_ids: bool = True, strict: bool = True
    ) -> list[TopkEntry]:
        """The teacher's top-k next-token logprobs at every prompt position (echo, max_tokens=0).

        `prompt` is text, or a list of token ids (the teacher must share the tokenizer; the echoed
        ids must equal them). Entry i is (token, top, text_offset) for prompt token i in the
        teacher's tokenization; `top` is the distribution that predicted token i ({token: logprob},
        the k most likely: vLLM's k+1-th, the actual token, is dropped), None for the first token.
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
        return await self._post(
            body, lambda data: parse_prompt_topk(data, prompt, k, where=self.url, strict=strict), TOPK
        )


def _validate(data: Any) -> dict:
    if not isinstance(data, dict):
        raise TeacherError(f"teacher answer is not a JSON object: {str(data)[:200]}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise TeacherError(f"teacher answer has no choices: {str(data)[:200]}")
    return data


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a teacher's base URL (http(s)://host[:port][/path]), or None."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "needs http:// or https:// and a host, e.g. http://teacher:8000/v1"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has port 0"
    return None


def server_message(r: httpx.Response) -> str:
    """What an error answer says: vLLM's {"message": ...}, OpenAI's {"error": {"message": ...}},
    else the start of the body."""
    try:
        data = r.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        msg = data.get("message") or (err.get("message") if isinstance(err, dict) else err)
        if isinstance(msg, str) and msg:
            return msg[:500]
    return r.text[:300]


def _model_identity(r: httpx.Response, model: str) -> str:
    """IDENTITY_FIELDS of `model`'s entry in a /v1/models answer, as JSON; "" when there is none."""
    try:
        data = r.json() if r.status_code == 200 else None
    except ValueError:
        data = None
    entries = data.get("data") if isinstance(data, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("id") == model:
            return json.dumps({f: entry.get(f) for f in IDENTITY_FIELDS}, sort_keys=True)
    return ""


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
            if len(clean) > k:  # vLLM adds the actual token: training uses the k best, the cache keeps them
                clean = dict(sorted(clean.items(), key=lambda kv: kv[1], reverse=True)[:k])
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
