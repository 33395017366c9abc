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
from nanochat_trainer.serve import ModelServer

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
    assert r.status_code == 400 and "exceeds the model's context" in r.json()["error"]["message"]


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
    chat = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0},
        timeout=60,
    ).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    pieces = []
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "stream": True},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    assert "".join(pieces) == chat["choices"][0]["message"]["content"]


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
