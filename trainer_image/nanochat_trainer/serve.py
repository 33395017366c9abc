"""An OpenAI-compatible server for one model (aiohttp): what `nanochat serve` runs.

    nanochat serve --checkpoint runs/demo/final --host 0.0.0.0 --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "def f(", "max_tokens": 16, "logprobs": 5}'

Routes: POST /v1/completions, POST /v1/chat/completions (both with `"stream": true` as
server-sent events, and `stream_options.include_usage` for a last chunk with the usage),
GET /v1/models, /health, /metrics (Prometheus).
`logprobs: k` (k <= 20, vLLM's default cap) returns vLLM's shape (tokens, token_logprobs,
top_logprobs, text_offset); `echo: true` prepends the prompt, and with `max_tokens: 0` returns
only the prompt's token logprobs (first token None), which distillation uses. As in vLLM, a
prompt whose tokens plus `max_tokens` exceed the model's context is refused (400), never cut;
`max_tokens` defaults to 16 for completions and to the rest of the context for chat (or when
null). Without a `seed` each request samples afresh. `prompt` may also be token ids
(a list of ints, or a list of such lists), and `return_tokens_as_token_ids: true` (vLLM's
flag) keys tokens and top_logprobs as "token_id:N" instead of decoded text. Every error is a
JSON body in OpenAI's shape ({"error": {"message", "type", "param", "code"}}). Requests are
serialized through one lock and run in a worker thread. Streaming sends the finished generation
as a series of small text events (it is not incremental while the model runs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from .eval.generate import Sample, generate_tokens, heal_prompts, prompt_logprobs, unheal

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs: a response grows as logprobs * choices * max_tokens
MAX_N = 64
MAX_CHOICES = 128  # prompts * n in one request: every choice is generated and answered at once
_ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nanochat_trainer_serve_requests", "Requests served", ["route", "code"], registry=self.registry
        )
        self.tokens = Counter("nanochat_trainer_serve_generated_tokens", "Tokens generated", registry=self.registry)
        self.latency = Histogram(
            "nanochat_trainer_serve_request_seconds", "Request latency", ["route"], registry=self.registry
        )


class RequestError(ValueError):
    """A request refused with 400; `param` names the field at fault (OpenAI's error.param)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(message: str, status: int = 400, param: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status=status
    )


class ModelServer:
    """Holds the model, tokenizer and lock; `app()` builds the aiohttp application."""

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str = "nanochat",
        max_tokens_limit: int = 2048,
        max_logprobs: int = MAX_LOGPROBS,
    ):
        self.model, self.tok, self.name = model, tokenizer, model_name
        self.max_tokens_limit = max_tokens_limit
        self.max_logprobs = max_logprobs
        self.lock = asyncio.Lock()
        self.metrics = _Metrics()
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 2**20, middlewares=[self._json_errors])
        app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics_route),
            ]
        )
        return app

    @web.middleware
    async def _json_errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """OpenAI clients parse every error body as JSON: aiohttp's own errors (404, 405, 413) and
        any failure a handler did not foresee answer in OpenAI's shape, never text/plain."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.text or exc.reason, exc.status)
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            self.metrics.requests.labels(_ROUTES.get(request.path, "other"), "500").inc()
            return _error(f"internal server error: {type(exc).__name__}: {exc}", 500)

    # ------------------------------------------------------------------ simple routes
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "nanochat",
                        "max_model_len": self.model.cfg.max_seq_len,
                    }
                ],
            }
        )

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------------ generation
    def _params(self, body: dict, prompt_lens: list[int], chat: bool) -> dict:
        """Sampling parameters, checked. `prompt_lens`: each prompt's tokens, whole: generation
        keeps a prompt's last max_seq_len - max_tokens tokens, so a longer one is refused here
        (vLLM's check and message) rather than answered from its tail."""
        ctx = self.model.cfg.max_seq_len
        key = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
        absent = "max_tokens" not in body and "max_completion_tokens" not in body
        max_tokens = _integer(body, key, 16 if absent and not chat else None, 0, self.max_tokens_limit)
        longest = max(prompt_lens)
        if max_tokens is None:  # chat's default (OpenAI's), and null (vLLM's): the rest of the context
            if longest >= ctx:
                raise RequestError(
                    f"This model's maximum context length is {ctx} tokens. However, you requested {longest} "
                    "tokens in the messages. Please reduce the length of the messages.",
                    "messages" if chat else "prompt",
                )
            max_tokens = min(ctx - longest, self.max_tokens_limit)
        elif longest + max_tokens > ctx:
            raise RequestError(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                key,
            )
        n = _integer(body, "n", 1, 1, MAX_N)
        assert n is not None
        if len(prompt_lens) * n > MAX_CHOICES:
            raise RequestError(f"{len(prompt_lens)} prompts * n={n} is over {MAX_CHOICES} choices per request", "n")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise RequestError(f"stop must be a string or a list of strings, got {stop!r}", "stop")
        seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
        return {
            "max_new_tokens": max_tokens,
            "n": n,
            "temperature": _number(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0"),
            "top_p": _number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            "stop": [s for s in stops if s],
            # Without a seed every request samples afresh, as OpenAI's and vLLM's do.
            "seed": secrets.randbits(63) if seed is None else seed,
        }

    def _logprobs(self, body: dict) -> int | None:
        if body.get("logprobs") is None or body.get("logprobs") is False:
            return None
        return _integer(body, "logprobs", None, 0, min(self.max_logprobs, self.tok.n_vocab))

    async def _encode(self, prompts: list) -> list[list[int]]:
        """Token ids of each prompt, in a worker thread outside the lock (a long text is not
        tokenized on the event loop, nor while the model waits)."""
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: [list(x) if isinstance(x, list) else self.tok.encode(x) for x in prompts]
        )

    async def _run(self, fn, *args, **kw):
        async with self.lock:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kw))

    def _refuse(self, route: str, exc: RequestError) -> web.Response:
        self.metrics.requests.labels(route, "400").inc()
        return _error(str(exc), 400, exc.param)

    def _logprobs_block(
        self,
        ids: list[int],
        lps: list[float | None],
        tops: list[dict[int, float] | None],
        start_offset: int,
        as_ids: bool = False,
    ) -> dict:
        """vLLM's logprobs shape. With `as_ids` (vLLM's `return_tokens_as_token_ids`) tokens and
        top_logprobs keys are "token_id:N", so ids that decode to the same text (lone UTF-8 bytes)
        stay distinct; text_offset still counts decoded characters."""
        key = (lambda t: f"token_id:{t}") if as_ids else (lambda t: self.tok.decode([t]))
        tokens, offsets, top_out = [], [], []
        offset = start_offset
        for i, t in enumerate(ids):
            s = self.tok.decode([t])
            tokens.append(key(t))
            offsets.append(offset)
            offset += len(s)
            top = tops[i] if i < len(tops) else None
            top_out.append(None if top is None else {key(k): v for k, v in top.items()})
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top_out, "text_offset": offsets}

    def _complete_sync(
        self, prompts: list, ids_list: list[list[int]], p: dict, logprobs: int | None, echo: bool, as_ids: bool = False
    ) -> tuple[list, dict]:
        """`prompts`: strings, or lists of token ids (OpenAI's pre-tokenized prompts); `ids_list`
        their tokens."""
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        # Text prompts without logprobs are healed as `nanochat eval --checkpoint` heals them, so
        # an endpoint scores like its checkpoint; token-level answers keep their plain semantics.
        # Token-id prompts are the caller's exact tokens: never healed.
        heal = logprobs is None and not echo
        healed_ids, starts = heal_prompts(self.tok, ids_list)
        starts = [s if heal and isinstance(x, str) else "" for x, s in zip(prompts, starts)]
        prompts = [self.tok.decode(x) if isinstance(x, list) else x for x in prompts]
        samples: list[list[Sample]] = [[Sample([], "", "length")] * p["n"] for _ in prompts]
        if p["max_new_tokens"] > 0:
            gen_ids = [h if s else i for i, h, s in zip(ids_list, healed_ids, starts)]
            samples = generate_tokens(self.model, self.tok, gen_ids, top_logprobs=logprobs or 0, starts=starts, **p)
        for pi, (prompt, ids) in enumerate(zip(prompts, ids_list)):
            usage["prompt_tokens"] += len(ids)
            echo_lp = prompt_logprobs(self.model, ids, logprobs or 0) if (echo and logprobs is not None) else None
            for s in samples[pi]:
                usage["completion_tokens"] += len(s.token_ids)
                text = (prompt if echo else "") + unheal(s.text, starts[pi])
                block = None
                if logprobs is not None:
                    gen = self._logprobs_block(
                        s.token_ids,
                        s.logprobs,
                        s.top_logprobs if logprobs else [{} for _ in s.token_ids],
                        len(prompt) if echo else 0,
                        as_ids,
                    )
                    if echo_lp is not None:
                        head = self._logprobs_block(ids, echo_lp[0], echo_lp[1], 0, as_ids)
                        gen = {k: head[k] + gen[k] for k in gen}
                    block = gen
                choices.append(
                    {
                        "index": len(choices),
                        "text": text,
                        "logprobs": block,
                        "finish_reason": s.finish_reason,
                        "stop_reason": None,
                    }
                )
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return choices, usage

    async def completions(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        try:
            body = await _json_body(request)
            prompts = _prompt_list(body.get("prompt"), self.tok.n_vocab)
            ids_list = await self._encode(prompts)
            p = self._params(body, [len(x) for x in ids_list], chat=False)
            lp = self._logprobs(body)
            echo = bool(body.get("echo", False))
            as_ids = bool(body.get("return_tokens_as_token_ids", False))
            include_usage = _include_usage(body)
        except RequestError as exc:
            return self._refuse("completions", exc)
        choices, usage = await self._run(self._complete_sync, prompts, ids_list, p, lp, echo, as_ids)
        self.metrics.tokens.inc(usage["completion_tokens"])
        self.metrics.requests.labels("completions", "200").inc()
        self.metrics.latency.labels("completions").observe(time.monotonic() - t0)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            return await self._stream(
                request,
                rid,
                "text_completion",
                [(c["index"], c["text"], c["finish_reason"]) for c in choices],
                chat=False,
                usage=usage if include_usage else None,
            )
        return web.json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.name,
                "choices": choices,
                "usage": usage,
            }
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        try:
            body = await _json_body(request)
            prompt = _chat_prompt(body.get("messages"))
            ids_list = await self._encode([prompt])
            p = self._params(body, [len(ids_list[0])], chat=True)
            include_usage = _include_usage(body)
        except RequestError as exc:
            return self._refuse("chat", exc)
        choices, usage = await self._run(self._complete_sync, [prompt], ids_list, p, None, False)
        self.metrics.tokens.inc(usage["completion_tokens"])
        self.metrics.requests.labels("chat", "200").inc()
        self.metrics.latency.labels("chat").observe(time.monotonic() - t0)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            return await self._stream(
                request,
                rid,
                "chat.completion.chunk",
                [(c["index"], c["text"], c["finish_reason"]) for c in choices],
                chat=True,
                usage=usage if include_usage else None,
            )
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.name,
                "usage": usage,
                "choices": [
                    {
                        "index": c["index"],
                        "message": {"role": "assistant", "content": c["text"]},
                        "finish_reason": c["finish_reason"],
                    }
                    for c in choices
                ],
            }
        )

    async def _stream(
        self, request: web.Request, rid: str, obj: str, items: list, chat: bool, usage: dict | None = None
    ) -> web.StreamResponse:
        """`usage` (stream_options.include_usage): as OpenAI, every chunk carries "usage": null
        and a last chunk with no choices carries the usage."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())

        async def send(choices: list[dict], last_usage: dict | None = None) -> None:
            chunk: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": self.name}
            chunk["choices"] = choices
            if usage is not None:
                chunk["usage"] = last_usage
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        for index, text, finish in items:
            if chat:  # a choice's first delta names the role, as OpenAI's and vLLM's do
                await send([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for i in range(0, len(text), 8):
                await send([choice(index, text[i : i + 8], None)])
            await send([choice(index, "", finish)])
        if usage is not None:
            await send([], usage)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError as exc:  # not JSON, or not UTF-8
        raise RequestError(f"request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    """body[key] as an int in [lo, hi] (an integral float such as 1500.0 too); `default` when absent or null."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(f"{key} must be an integer in [{lo}, {hi}], got {v!r}", key)
    return v


def _number(body: dict, key: str, default: float, ok: Callable[[float], bool], want: str) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
        raise RequestError(f"{key} must be {want}, got {v!r}", key)
    return float(v)


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    return bool(opts.get("include_usage", False))


def _chat_prompt(msgs: Any) -> str:
    """No chat template in a base code model: the turns are joined as plain text, each but an
    assistant's (which the model continues) ending its line. Content is a string or OpenAI's
    list of text parts."""
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise RequestError("messages must be a non-empty list of objects", "messages")
    out = []
    for m in msgs:
        c = m.get("content") or ""
        if isinstance(c, list) and all(isinstance(x, dict) and isinstance(x.get("text"), str) for x in c):
            c = "".join(x["text"] for x in c)
        if not isinstance(c, str):
            raise RequestError("message content must be a string or a list of text parts", "messages")
        out.append(c if m.get("role") == "assistant" else f"{c}\n")
    return "".join(out)


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _prompt_list(prompt: Any, n_vocab: int) -> list:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        return [prompt]
    if _is_ids(prompt):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) or _is_ids(x) for x in prompt):
        prompts = prompt
    else:
        raise RequestError(
            "prompt must be a string, a list of strings, a list of token ids or a list of those", "prompt"
        )
    for x in prompts:
        if isinstance(x, list) and not all(0 <= t < n_vocab for t in x):
            raise RequestError(f"prompt token ids must be in [0, {n_vocab})", "prompt")
    return prompts


def run_server(
    model,
    tokenizer,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "nanochat",
    max_logprobs: int = MAX_LOGPROBS,
) -> None:
    """Serve until interrupted. The listen backlog (aiohttp's default 128) is 1024: a distillation
    client opens its hundreds of connections at once, and each one past a full accept queue
    waits a second for its SYN to be sent again."""
    server = ModelServer(model, tokenizer, model_name, max_logprobs=max_logprobs)
    web.run_app(server.app(), host=host, port=port, print=None, backlog=1024)
