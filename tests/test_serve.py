"""`nanochat serve` (OpenAI-compatible, aiohttp) and the completions client, end to end.

    .venv/bin/pytest tests/test_serve.py -q

The server runs in a thread on a free port; `eval --endpoint` against it must score the
same as `eval --checkpoint` on the same problems with greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

import nanochat_trainer.eval.client as client_mod
from nanochat_cli.eval import add_eval_args, run_eval_from_args
from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.eval.client import CompletionsClient, EndpointError, parse_completion
from nanochat_trainer.eval.generate import generate, prompt_logprobs
from nanochat_trainer.serve import MAX_CHOICES, MAX_LOGPROBS, ModelServer

from serving import serve_app

FIXTURE = Path(__file__).parent / "fixtures" / "vllm_completion.json"


@pytest.fixture(scope="module")
def server(ckpt):
    model, tok, _ = load_model(ckpt)
    url, stop = serve_app(ModelServer(model, tok, model_name="tiny").app())
    yield url, model, tok
    stop()


def test_models_health_metrics(server) -> None:
    url, _, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    metrics = httpx.get(url + "/metrics").text
    assert 'nanochat_trainer_serve_requests_total{code="200",route="completions"}' in metrics
    assert "nanochat_trainer_serve_generated_tokens_total" in metrics
    bad = httpx.post(url + "/v1/completions", json={"prompt": 3})
    assert bad.status_code == 400 and "prompt" in bad.json()["error"]["message"]


def test_completion_logprobs_and_shape(server) -> None:
    url, model, tok = server
    body = {"model": "tiny", "prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0, "logprobs": 3}
    data = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    choice = data["choices"][0]
    # With logprobs the answer is token-level, so the prompt is not healed (serve.py).
    assert choice["text"] == generate(model, tok, ["def add(a, b):\n"], max_new_tokens=8, heal=False)[0][0]
    plain = httpx.post(url + "/v1/completions", json={**body, "logprobs": None}, timeout=60).json()
    assert plain["choices"][0]["text"] == generate(model, tok, ["def add(a, b):\n"], max_new_tokens=8)[0][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["token_logprobs"]) == len(lp["tokens"])
    assert lp["text_offset"][0] == 0 and all(len(t) == 3 for t in lp["top_logprobs"])
    assert all(abs(max(t.values()) - lp_) < 1e-5 for t, lp_ in zip(lp["top_logprobs"], lp["token_logprobs"]))  # greedy
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    parsed = parse_completion(data)
    assert parsed.choices[0].logprobs.tokens == lp["tokens"]


def test_echo_prompt_logprobs(server) -> None:
    url, model, tok = server
    prompt = "def add(a, b):\n    return a + b\n"
    data = httpx.post(
        url + "/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}, timeout=60
    ).json()
    c = data["choices"][0]
    ids = tok.encode(prompt)
    want, _ = prompt_logprobs(model, ids, 2)
    assert c["text"] == prompt and c["logprobs"]["token_logprobs"][0] is None
    assert c["logprobs"]["top_logprobs"][0] is None and len(c["logprobs"]["tokens"]) == len(ids)
    assert c["logprobs"]["token_logprobs"][1:] == pytest.approx(want[1:], abs=1e-6)
    assert "".join(c["logprobs"]["tokens"]) == prompt and data["usage"]["completion_tokens"] == 0
    # Longer than the context: refused, not scored on its last tokens with shifted logprobs.
    long = "x = 1\n" * model.cfg.max_seq_len
    r = httpx.post(
        url + "/v1/completions", json={"prompt": long, "max_tokens": 0, "echo": True, "logprobs": 2}, timeout=60
    )
    assert r.status_code == 400 and "maximum context length is" in r.json()["error"]["message"]


def test_streaming_and_chat(server) -> None:
    url, _, _ = server
    body = {"prompt": "import os\n", "max_tokens": 10, "temperature": 0}
    full = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    text, done = "", False
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert done and text == full
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    chat = httpx.post(url + "/v1/chat/completions", json=hi, timeout=60).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    chunks = _events(url + "/v1/chat/completions", hi)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == chat["choices"][0]["message"]["content"]
    assert all("usage" not in c for c in chunks)
    # stream_options.include_usage: a last chunk with no choices carries the usage (null before).
    for route, req in [("/v1/completions", body), ("/v1/chat/completions", hi)]:
        want = httpx.post(url + route, json=req, timeout=60).json()["usage"]
        chunks = _events(url + route, {**req, "stream_options": {"include_usage": True}})
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == want
        assert all(c["usage"] is None for c in chunks[:-1])


def _events(url: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed answer, checking it ends in [DONE]."""
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def _fill(tok, ctx: int, room: int) -> str:
    """A text prompt of exactly ctx - room tokens."""
    ids = tok.encode("x = 1\n" * ctx)[: ctx - room]
    assert tok.encode(tok.decode(ids)) == ids
    return tok.decode(ids)


def test_prompt_plus_max_tokens_over_context_is_refused(server) -> None:
    """vLLM's rule: prompt tokens + max_tokens over the context is a 400 naming both, for text and
    token-id prompts and for chat; generation would otherwise keep only the prompt's tail."""
    url, model, tok = server
    ctx = model.cfg.max_seq_len
    prompt = _fill(tok, ctx, 8)
    p = ctx - 8
    ok = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == p
    want = f"maximum context length is {ctx} tokens. However, you requested {p + 9} tokens ({p} in the messages, 9"
    for route, body in [
        ("/v1/completions", {"prompt": prompt}),
        ("/v1/completions", {"prompt": tok.encode(prompt)}),
        ("/v1/completions", {"prompt": ["x", tok.encode(prompt)]}),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": prompt}]}),
    ]:
        r = httpx.post(url + route, json={**body, "max_tokens": 9}, timeout=60)
        assert r.status_code == 400 and want in r.json()["error"]["message"], (route, r.text)
        assert r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(url + "/v1/completions", json={"prompt": "x = 1\n" * ctx, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


def test_sampling_without_seed_differs_with_seed_repeats(server) -> None:
    url, _, _ = server
    body = {"prompt": "def f(", "max_tokens": 12, "temperature": 1.0}

    def text(**kw) -> str:
        return httpx.post(url + "/v1/completions", json={**body, **kw}, timeout=60).json()["choices"][0]["text"]

    assert text() != text()
    assert text(seed=7) == text(seed=7)


def test_bad_requests_are_json_400s_naming_the_field(server) -> None:
    url, _, tok = server
    cases = [
        ("/v1/completions", [1, 2], None),
        ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
        ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": 100000}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1, "n": "2"}, "n"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1, "n": 0}, "n"),
        ("/v1/completions", {"prompt": ["x"] * (MAX_CHOICES // 64 + 1), "max_tokens": 1, "n": 64}, "n"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1, "temperature": -0.5}, "temperature"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1, "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1, "top_p": 1.5}, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1, "seed": "a"}, "seed"),
        ("/v1/completions", {"prompt": [[1, tok.n_vocab]], "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": 1}, "stream_options"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
        ("/v1/chat/completions", {"messages": ["hi"]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [None]}, "stop"),
    ]
    for route, body, param in cases:
        r = httpx.post(url + route, json=body, timeout=60)
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), (body, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error", body
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    body = {"prompt": "x", "max_tokens": 1, "logprobs": MAX_LOGPROBS, "return_tokens_as_token_ids": True}
    top = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert len(top.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == MAX_LOGPROBS
    # OpenAI's content parts: the text parts are the message.
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    a, b = (
        httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": c}], "max_tokens": 1})
        for c in (parts, "hi")
    )
    assert a.status_code == 200 and a.json()["usage"] == b.json()["usage"]


def test_unexpected_failures_and_unknown_routes_answer_json(ckpt) -> None:
    model, tok, _ = load_model(ckpt)
    srv = ModelServer(model, tok)

    def boom(*args, **kw):
        raise RuntimeError("kaput")

    srv._complete_sync = boom  # type: ignore[method-assign]
    url, stop = serve_app(srv.app())
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)
        assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["type"] == "server_error" and "kaput" in r.json()["error"]["message"]
        assert 'code="500",route="completions"' in httpx.get(url + "/metrics").text
        r = httpx.get(url + "/v1/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == 404
    finally:
        stop()


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(server) -> None:
    """OpenAI's chat default, not completions' 16 tokens; max_tokens null does the same (vLLM)."""
    url, model, tok = server
    ctx = model.cfg.max_seq_len
    prompt = _fill(tok, ctx - 1, 40)  # with chat's newline: ctx - 40 tokens
    for route, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}),
        ("/v1/completions", {"prompt": prompt + "\n", "max_tokens": None}),
    ]:
        data = httpx.post(url + route, json={**body, "temperature": 0}, timeout=60).json()
        usage, finish = data["usage"], data["choices"][0]["finish_reason"]
        assert usage["prompt_tokens"] == ctx - 40 and usage["completion_tokens"] > 16, (route, usage)
        assert finish == "stop" or usage["total_tokens"] == ctx, (route, usage, finish)
    short = httpx.post(url + "/v1/completions", json={"prompt": "x", "temperature": 0}, timeout=60).json()
    assert short["usage"]["completion_tokens"] <= 16  # completions keep OpenAI's default of 16
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x = 1\n" * ctx}]})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_eval_args(p)
    return p.parse_args(list(argv))


def test_endpoint_eval_matches_checkpoint_eval(server, ckpt, tmp_path, monkeypatch) -> None:
    url, _, _ = server
    monkeypatch.setenv("NANOCHAT_TERMINATION_LOG", str(tmp_path / "term"))
    common = ["--max-problems", "3", "--max-new-tokens", "16", "--workers", "2", "--temperature", "0"]
    assert run_eval_from_args(_args("--checkpoint", str(ckpt), "--out", str(tmp_path / "a.json"), *common)) == 0
    assert (
        run_eval_from_args(_args("--endpoint", url, "--model", "tiny", "--out", str(tmp_path / "b.json"), *common)) == 0
    )
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["pass_at_k"] == b["pass_at_k"]
    assert [r["samples"][0]["completion"] for r in a["per_problem"]] == [
        r["samples"][0]["completion"] for r in b["per_problem"]
    ]
    assert [r["samples"][0]["status"] for r in a["per_problem"]] == [
        r["samples"][0]["status"] for r in b["per_problem"]
    ]


def test_parse_vllm_fixture() -> None:
    r = parse_completion(json.loads(FIXTURE.read_text()))
    assert r.id.startswith("cmpl-") and r.model == "Qwen/Qwen2.5-Coder-7B" and len(r.choices) == 2
    c0, c1 = r.choices
    assert c0.text == "    return a + b\n" and c0.finish_reason == "stop" and c0.stop_reason == "\ndef"
    assert c0.logprobs.tokens[1] == " return" and "".join(c0.logprobs.tokens) == c0.text
    assert c0.logprobs.text_offset == [sum(map(len, c0.logprobs.tokens[:i])) for i in range(6)]
    assert c0.logprobs.top_logprobs[0]["\t"] == -4.51 and c1.logprobs is None and c1.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (42, 17, 59)


def test_client_retries_then_succeeds(monkeypatch) -> None:
    monkeypatch.setenv("TEST_KEY", "sekret")
    calls: list[httpx.Request] = []
    body = json.loads(FIXTURE.read_text())

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) < 4:
            return httpx.Response(503 if len(calls) == 2 else 429, text="busy")
        return httpx.Response(200, json=body)

    with CompletionsClient(
        "http://x/v1", "m", api_key_env="TEST_KEY", backoff=0.01, transport=httpx.MockTransport(handler)
    ) as client:
        r = client.complete("def f():", max_tokens=4, stop=["\ndef"], logprobs=1)
    assert len(calls) == 4 and r.choices[0].text == body["choices"][0]["text"]
    assert str(calls[-1].url) == "http://x/v1/completions" and calls[-1].headers["authorization"] == "Bearer sekret"
    sent = json.loads(calls[-1].content)
    assert sent["model"] == "m" and sent["stop"] == ["\ndef"] and sent["logprobs"] == 1


def test_client_errors_clearly() -> None:
    garbage = httpx.MockTransport(lambda req: httpx.Response(200, text="<html>oops</html>"))
    with pytest.raises(EndpointError, match="non-JSON"):
        CompletionsClient("http://x", "m", transport=garbage).complete("p")
    wrong = httpx.MockTransport(lambda req: httpx.Response(200, json={"choices": [{"no_text": 1}]}))
    with pytest.raises(EndpointError, match="not a completions response"):
        CompletionsClient("http://x", "m", transport=wrong).complete("p")
    always = httpx.MockTransport(lambda req: httpx.Response(503, text="down"))
    with pytest.raises(EndpointError, match="after 3 attempts.*503"):
        CompletionsClient("http://x", "m", max_retries=2, backoff=0.01, transport=always).complete("p")
    with pytest.raises(EndpointError, match="HTTP 401"):
        CompletionsClient(
            "http://x", "m", transport=httpx.MockTransport(lambda req: httpx.Response(401, text="no key"))
        ).complete("p")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match="ConnectError"):
        CompletionsClient(f"http://127.0.0.1:{port}", "m", max_retries=2, backoff=0.01, timeout=2).complete("p")
    assert time.monotonic() - t0 < 10


def test_eval_endpoint_down_exits_1(tmp_path, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    orig = client_mod.CompletionsClient.__init__

    def fast(self, *a, **kw):  # keep the test quick: tiny backoff
        kw.update(max_retries=1, backoff=0.01)
        orig(self, *a, **kw)

    client_mod.CompletionsClient.__init__ = fast
    try:
        rc = run_eval_from_args(_args("--endpoint", f"http://127.0.0.1:{port}", "--model", "m", "--max-problems", "1"))
    finally:
        client_mod.CompletionsClient.__init__ = orig
    assert rc == 1 and "endpoint error" in capsys.readouterr().err
