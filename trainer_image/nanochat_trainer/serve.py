"""An OpenAI-compatible server for one model (aiohttp): what `nanochat serve` runs.

    nanochat serve --checkpoint runs/demo/final --host 0.0.0.0 --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "def f(", "max_tokens": 16, "logprobs": 5}'

Routes: POST /v1/completions, POST /v1/chat/completions (both with `"stream": true` as
server-sent events), GET /v1/models, /health, /metrics (Prometheus).
`logprobs: k` returns vLLM's shape (tokens, token_logprobs, top_logprobs, text_offset);
`echo: true` prepends the prompt, and with `max_tokens: 0` returns only the prompt's
token logprobs (first token None), which distillation uses; such a prompt longer than the
model's context is refused (400) rather than scored in part. `prompt` may also be token ids
(a list of ints, or a list of such lists), and `return_tokens_as_token_ids: true` (vLLM's
flag) keys tokens and top_logprobs as "token_id:N" instead of decoded text. Requests are serialized
through one lock and run in a worker thread. Streaming sends the finished generation as
a series of small text events (it is not incremental while the model runs).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from .eval.generate import Sample, generate_tokens, heal_prompts, prompt_logprobs, unheal


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


def _bad(msg: str, status: int = 400) -> web.Response:
    return web.json_response(
        {"error": {"message": msg, "type": "invalid_request_error", "code": status}}, status=status
    )


class ModelServer:
    """Holds the model, tokenizer and lock; `app()` builds the aiohttp application."""

    def __init__(self, model, tokenizer, model_name: str = "nanochat", max_tokens_limit: int = 2048):
        self.model, self.tok, self.name = model, tokenizer, model_name
        self.max_tokens_limit = max_tokens_limit
        self.lock = asyncio.Lock()
        self.metrics = _Metrics()
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 2**20)
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
    def _params(self, body: dict) -> dict:
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if max_tokens is None:
            max_tokens = 256
        n = int(body.get("n", 1))
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        top_p = float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0)
        if not 0 <= int(max_tokens) <= self.max_tokens_limit or not 1 <= n <= 64 or not 0 < top_p <= 1:
            raise ValueError(f"need 0 <= max_tokens <= {self.max_tokens_limit}, 1 <= n <= 64, 0 < top_p <= 1")
        return {
            "max_new_tokens": int(max_tokens),
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "stop": [s for s in stop if s],
            "seed": int(body.get("seed") or 0),
        }

    async def _run(self, fn, *args, **kw):
        async with self.lock:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kw))

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
        self, prompts: list, p: dict, logprobs: int | None, echo: bool, as_ids: bool = False
    ) -> tuple[list, dict]:
        """`prompts`: strings, or lists of token ids (OpenAI's pre-tokenized prompts)."""
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        ids_list = [list(x) if isinstance(x, list) else self.tok.encode(x) for x in prompts]
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
            body = await request.json()
            prompt = body.get("prompt")
            prompts = _prompt_list(prompt, self.tok.n_vocab, self.model.cfg.max_seq_len)
            p = self._params(body)
            lp = body.get("logprobs")
            lp = None if lp is None or lp is False else int(lp)
            echo = bool(body.get("echo", False))
            as_ids = bool(body.get("return_tokens_as_token_ids", False))
            if echo and lp is not None:
                # Prompt logprobs are computed in one forward pass: a longer prompt would come back
                # with its logprobs shifted against its tokens, so refuse it (as vLLM does).
                for x in prompts:
                    n = len(x) if isinstance(x, list) else len(self.tok.encode(x))
                    if n > self.model.cfg.max_seq_len:
                        raise ValueError(
                            f"prompt of {n} tokens exceeds the model's context of "
                            f"{self.model.cfg.max_seq_len} tokens (echo with logprobs)"
                        )
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            self.metrics.requests.labels("completions", "400").inc()
            return _bad(str(exc))
        choices, usage = await self._run(self._complete_sync, prompts, p, lp, echo, as_ids)
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
            body = await request.json()
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise ValueError("messages must be a non-empty list")
            # No chat template in a base code model: the turns are joined as plain text.
            prompt = "".join(
                f"{m.get('content', '')}\n" if m.get("role") != "assistant" else m.get("content", "") for m in msgs
            )
            p = self._params(body)
        except (ValueError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            self.metrics.requests.labels("chat", "400").inc()
            return _bad(str(exc))
        choices, usage = await self._run(self._complete_sync, [prompt], p, None, False)
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

    async def _stream(self, request: web.Request, rid: str, obj: str, items: list, chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())

        async def send(index: int, text: str, finish: str | None) -> None:
            choice: dict[str, Any] = {"index": index, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text} if text or finish is None else {}
            else:
                choice["text"], choice["logprobs"] = text, None
            chunk = {"id": rid, "object": obj, "created": created, "model": self.name, "choices": [choice]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        for index, text, finish in items:
            pieces = [text[i : i + 8] for i in range(0, len(text), 8)]
            for piece in pieces:
                await send(index, piece, None)
            await send(index, "", finish)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _prompt_list(prompt: Any, n_vocab: int, max_len: int) -> list:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        return [prompt]
    if _is_ids(prompt):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) or _is_ids(x) for x in prompt):
        prompts = prompt
    else:
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of those")
    for x in prompts:
        if isinstance(x, list):
            if not all(0 <= t < n_vocab for t in x):
                raise ValueError(f"prompt token ids must be in [0, {n_vocab})")
            if len(x) > max_len:
                raise ValueError(f"prompt of {len(x)} tokens exceeds the model's {max_len}")
    return prompts


def run_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, model_name: str = "nanochat") -> None:
    """Serve until interrupted. The listen backlog (aiohttp's default 128) is 1024: a distillation
    client opens its hundreds of connections at once, and each one past a full accept queue
    waits a second for its SYN to be sent again."""
    web.run_app(ModelServer(model, tokenizer, model_name).app(), host=host, port=port, print=None, backlog=1024)
