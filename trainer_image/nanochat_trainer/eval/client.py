"""A small, synchronous client for OpenAI-compatible /v1/completions (vLLM, `nanochat serve`).

    from nanochat_trainer.eval.client import CompletionsClient
    client = CompletionsClient("http://teacher:8000", model="Qwen/Qwen3-8B", api_key_env="OPENAI_API_KEY")
    resp = client.complete("def add(a, b):\n", max_tokens=64, temperature=0.0, stop=["\ndef"])
    resp.choices[0].text

Retries 429, 5xx, timeouts and connection errors with exponential backoff (capped), then
raises `EndpointError` with what went wrong; every request has a timeout, so it never hangs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

RETRY_STATUS = {429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint failed, was unreachable, or returned something that is not a completion.
    `refused`: the HTTP status of an answer that refused the request itself (not retried)."""

    def __init__(self, message: str, refused: int | None = None):
        super().__init__(message)
        self.refused = refused


@dataclass
class Logprobs:
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: Logprobs | None = None
    stop_reason: Any = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass
class CompletionResponse:
    id: str
    model: str
    choices: list[Choice]
    usage: Usage = field(default_factory=Usage)
    created: int = 0


def parse_completion(data: Any) -> CompletionResponse:
    """Parse a /v1/completions body (vLLM / OpenAI shape); a wrong shape is an EndpointError."""
    try:
        choices = []
        for c in data["choices"]:
            lp = c.get("logprobs")
            logprobs = None
            if lp:
                logprobs = Logprobs(
                    list(lp.get("tokens") or []),
                    list(lp.get("token_logprobs") or []),
                    list(lp.get("top_logprobs") or []),
                    list(lp.get("text_offset") or []),
                )
            text = c["text"]
            if not isinstance(text, str):
                raise TypeError("choices[].text is not a string")
            choices.append(
                Choice(int(c.get("index", len(choices))), text, c.get("finish_reason"), logprobs, c.get("stop_reason"))
            )
        u = data.get("usage") or {}
        usage = Usage(
            int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0), int(u.get("total_tokens") or 0)
        )
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(
            str(data.get("id", "")), str(data.get("model", "")), choices, usage, int(data.get("created") or 0)
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EndpointError(f"not a completions response ({exc!r}): {str(data)[:200]}") from exc


class CompletionsClient:
    """POSTs to `<base_url>/v1/completions` (base_url may already end in /v1)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        transport: httpx.BaseTransport | None = None,
    ):
        base = base_url.rstrip("/")
        self.url = base + ("/completions" if base.endswith("/v1") else "/v1/completions")
        self.model = model
        self.max_retries = max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        headers = {}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), headers=headers, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CompletionsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def complete(
        self,
        prompt: str | Sequence[str],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        stop: Sequence[str] | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        seed: int | None = None,
        **extra: Any,
    ) -> CompletionResponse:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "n": n,
            "echo": echo,
            **extra,
        }
        if stop:
            body["stop"] = list(stop)
        if logprobs is not None:
            body["logprobs"] = logprobs
        if seed is not None:
            body["seed"] = seed
        return parse_completion(self._post(body))

    def _post(self, body: dict) -> Any:
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                r = self._http.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code >= 400:
                raise EndpointError(f"{self.url} answered HTTP {r.status_code}: {r.text[:300]}", refused=r.status_code)
            try:
                return r.json()
            except ValueError as exc:
                raise EndpointError(f"{self.url} returned non-JSON: {r.text[:200]!r}") from exc
        raise EndpointError(f"{self.url} failed after {self.max_retries + 1} attempts; last error: {last}")
