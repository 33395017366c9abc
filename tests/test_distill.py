"""Distillation: the async teacher client against a real `nanochat serve` app, and the top-k KL loss.

    .venv/bin/pytest tests/test_distill.py -q

The teacher is a `ModelServer` of a tiny checkpoint on a free port in a background thread (as in
test_serve.py); a middleware counts the HTTP requests it receives. Failure injection uses a small
aiohttp app (`FlakyServer503`) and httpx.MockTransport for malformed bodies.
"""

from __future__ import annotations

import json
import math
import string
import time
from typing import Any

import httpx
import pytest
import torch
from aiohttp import web

from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.config import DistillConfig, ModelConfig, TeacherConfig
from nanochat_trainer.contract import RunLayout
from nanochat_trainer.distill import topk
from nanochat_trainer.distill.align import CrossTokenizerFeed
from nanochat_trainer.distill.cache import TOPK_MAGIC, decode_topk
from nanochat_trainer.distill.teacher import AsyncTeacher, TeacherError, TeacherUnavailable
from nanochat_trainer.distill.topk import TopkFeed, token_id_map, topk_tensors
from nanochat_trainer.errors import ConfigError
from nanochat_trainer.eval.generate import generate, prompt_logprobs
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.serve import ModelServer
from nanochat_trainer.tokenizer import gpt2_tokenizer
from nanochat_trainer.train.losses import mixed_loss, topk_kl_loss
from nanochat_trainer.train.startup import build_feed

from micro import micro_cfg
from serving import completions_app, free_port, run_on, serve_app

PROMPTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "for i in range(10):\n    x = i\n"]


@pytest.fixture(scope="module")
def teacher_server(ckpt):
    model, tok, _ = load_model(ckpt)
    seen: dict = {"n": 0, "auth": []}

    @web.middleware
    async def count(request, handler):
        if request.path == "/v1/completions":
            seen["n"] += 1
            seen["auth"].append(request.headers.get("Authorization"))
        return await handler(request)

    # Every id ranked (test_ids_sharing_a_text_stay_distinct): above vLLM's default --max-logprobs.
    app = ModelServer(model, tok, model_name="tiny", max_logprobs=tok.n_vocab).app()
    app.middlewares.append(count)
    url, stop = serve_app(app)
    yield url, model, tok, seen
    stop()


def test_complete_against_real_server(teacher_server, monkeypatch) -> None:
    url, model, tok, seen = teacher_server
    monkeypatch.setenv("DISTILL_TEST_KEY", "sekrit")
    cfg = TeacherConfig(url=url + "/v1", model="tiny", api_key_env="DISTILL_TEST_KEY", concurrency=2)
    teacher = AsyncTeacher.from_config(cfg)
    data = teacher.run_batch([teacher.complete(p, max_tokens=6) for p in PROMPTS[:2]])
    want = generate(model, tok, PROMPTS[:2], max_new_tokens=6)
    assert [d["choices"][0]["text"] for d in data] == [w[0] for w in want]
    assert data[0]["model"] == "tiny" and seen["auth"][-1] == "Bearer sekrit"
    assert teacher.requests == 2 and teacher.cache_hits == 0 and teacher.errors == 0 and teacher.latency_s > 0


def test_completion_text_and_stop(teacher_server) -> None:
    url, model, tok, _ = teacher_server
    teacher = AsyncTeacher(url, "tiny")
    text, finish = teacher.run_batch([teacher.completion(PROMPTS[0], 8, stop=["\ndef "])])[0]
    assert text == generate(model, tok, [PROMPTS[0]], max_new_tokens=8, stop=["\ndef "])[0][0]
    assert finish in ("stop", "length")


def test_prompt_topk_aligned_to_tokenizer(teacher_server) -> None:
    url, model, tok, _ = teacher_server
    teacher = AsyncTeacher(url, "tiny")
    k = 5
    entries = teacher.run_batch([teacher.prompt_topk(PROMPTS[0], k)])[0]
    ids = tok.encode(PROMPTS[0])
    # return_tokens_as_token_ids: tokens and top-k keys come back as ids.
    assert [e[0] for e in entries] == ids
    assert entries[0][1] is None and all(len(e[1]) == k for e in entries[1:])
    assert [e[2] for e in entries] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    _, tops = prompt_logprobs(model, ids, k)
    for (_, top, _), want in zip(entries[1:], tops[1:]):
        assert top == pytest.approx(want, abs=1e-5)
    # Aligned tensors: row i holds what predicted token i+1; the actual next token is usually among them.
    t_ids, t_lps, mask = topk_tensors(entries, None, k)
    assert t_ids.shape == (len(ids), k) and mask.tolist() == [True] * (len(ids) - 1) + [False]
    for i in range(len(ids) - 1):
        row = dict(zip(t_ids[i].tolist(), t_lps[i].tolist()))
        assert row == pytest.approx(tops[i + 1], abs=1e-5)
    # A token-id prompt gives the same answer (text-keyed answers: test_good_mock_answer_parses).
    by_ids = teacher.run_batch([teacher.prompt_topk(ids, k)])[0]
    assert by_ids == entries


def test_ids_sharing_a_text_stay_distinct(teacher_server) -> None:
    """Lone UTF-8 byte tokens all decode to U+FFFD: keyed by text they merged and fewer than k came
    back; keyed by id all k survive."""
    url, model, tok, _ = teacher_server
    vocab = token_id_map(tok)
    shared = [i for i in range(tok.n_vocab) if vocab.get(tok.decode([i]), i) is None]
    assert len(shared) > 2
    k = tok.n_vocab  # every id ranked: the shared ones are certainly among them
    teacher = AsyncTeacher(url, "tiny")
    ids = tok.encode(PROMPTS[1])[:6]
    entries = teacher.run_batch([teacher.prompt_topk(ids, k)])[0]
    assert all(len(e[1]) == k for e in entries[1:]) and set(shared) <= set(entries[1][1])
    with pytest.raises(TeacherError, match="top logprobs, asked for"):
        teacher.run_batch([teacher.prompt_topk(ids, k, token_ids=False)])
    # Bad token-id prompts are a 400, not a crash.
    with pytest.raises(TeacherError, match="HTTP 400"):
        teacher.run_batch([teacher.prompt_topk([tok.n_vocab + 5], 2)])


def test_cache_second_run_sends_no_requests(teacher_server, tmp_path) -> None:
    url, _, _, seen = teacher_server
    first = AsyncTeacher(url, "tiny", cache_dir=tmp_path / "cache")
    before = seen["n"]
    a = first.run_batch([first.prompt_topk(p, 3) for p in PROMPTS])
    assert seen["n"] - before == 3 and first.requests == 3 and first.cache_hits == 0
    files = sorted((tmp_path / "cache").rglob("*"))
    assert len([f for f in files if f.is_file()]) == 3 and not any(".tmp-" in f.name for f in files)
    second = AsyncTeacher(url, "tiny", cache_dir=tmp_path / "cache")
    b = second.run_batch([second.prompt_topk(p, 3) for p in PROMPTS])
    assert seen["n"] - before == 3 and second.requests == 0 and second.cache_hits == 3 and a == b
    # A different request is a miss; a torn cache file is a miss that gets rewritten.
    second.run_batch([second.prompt_topk(PROMPTS[0], 2)])
    assert seen["n"] - before == 4
    victim = next(f for f in (tmp_path / "cache").rglob("*.bin"))
    victim.write_text('{"choices": [')
    third = AsyncTeacher(url, "tiny", cache_dir=tmp_path / "cache")
    third.run_batch([third.prompt_topk(p, 3) for p in PROMPTS] + [third.prompt_topk(PROMPTS[0], 2)])
    assert third.requests == 1 and third.cache_hits == 3 and seen["n"] - before == 5


class FlakyServer503:
    """Answers 503 `failures` times, then a valid completion."""

    def __init__(self, failures: int):
        self.failures, self.hits = failures, 0

    async def completions(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.hits <= self.failures:
            return web.json_response({"error": "overloaded"}, status=503)
        return web.json_response({"choices": [{"index": 0, "text": "ok", "logprobs": None}]})

    def app(self) -> web.Application:
        return completions_app(self.completions)


def test_retries_on_503_then_gives_up() -> None:
    flaky = FlakyServer503(2)
    url, stop = serve_app(flaky.app())
    try:
        teacher = AsyncTeacher(url, "m", max_retries=3, backoff=0.01)
        data = teacher.run_batch([teacher.complete("x", max_tokens=1)])[0]
        assert data["choices"][0]["text"] == "ok"
        assert flaky.hits == 3 and teacher.requests == 3 and teacher.retries == 2 and teacher.errors == 0
        flaky.hits, flaky.failures = 0, 10
        stubborn = AsyncTeacher(url, "m", max_retries=1, backoff=0.01)
        with pytest.raises(TeacherError, match="after 2 attempts.*503"):
            stubborn.run_batch([stubborn.complete("x", max_tokens=1)])
        assert flaky.hits == 2 and stubborn.errors == 1 and stubborn.retries == 1
    finally:
        stop()
    # Nothing listening any more: connection errors are retried, then a TeacherError.
    down = AsyncTeacher(url, "m", max_retries=2, backoff=0.01)
    with pytest.raises(TeacherUnavailable, match="ConnectError"):  # down for now: worth asking again later
        down.run_batch([down.complete("x", max_tokens=1)])
    assert down.requests == 3 and down.errors == 1


def _mock(body, status: int = 200):
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if isinstance(body, (bytes, str)):
            return httpx.Response(status, content=body)
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler), calls


GOOD_ECHO = {
    "choices": [
        {
            "text": "ab",
            "logprobs": {
                "tokens": ["a", "b"],
                "text_offset": [0, 1],
                "token_logprobs": [None, -0.5],
                "top_logprobs": [None, {"b": -0.5, "c": -1.5}],
            },
        }
    ]
}


@pytest.mark.parametrize(
    "body,status,match",
    [
        (b"not json {", 200, "non-JSON"),
        ({"id": "x"}, 200, "no choices"),
        ({"choices": []}, 200, "no choices"),
        ({"choices": [{"text": "ab"}]}, 200, "bad prompt logprobs"),
        (
            {
                "choices": [
                    {
                        "text": "ab",
                        "logprobs": {"tokens": ["a", "b"], "text_offset": [0, 1], "top_logprobs": [None, {"b": -0.5}]},
                    }
                ]
            },
            200,
            "1 top logprobs, asked for 2",
        ),
        (
            {
                "choices": [
                    {
                        "text": "ab",
                        "logprobs": {
                            "tokens": ["a", "b"],
                            "text_offset": [0],
                            "top_logprobs": [None, {"b": -0.5, "c": -1}],
                        },
                    }
                ]
            },
            200,
            "length mismatch",
        ),
        (
            {
                "choices": [
                    {
                        "text": "ab",
                        "logprobs": {
                            "tokens": ["a", "x"],
                            "text_offset": [0, 1],
                            "top_logprobs": [None, {"b": -0.5, "c": -1}],
                        },
                    }
                ]
            },
            200,
            "spell the prompt",
        ),
        (
            {
                "choices": [
                    {
                        "text": "ab",
                        "logprobs": {
                            "tokens": ["token_id:1", "token_id:x"],
                            "text_offset": [0, 1],
                            "top_logprobs": [None, {"b": -0.5, "c": -1}],
                        },
                    }
                ]
            },
            200,
            "bad token id",
        ),
        ({"error": "bad request"}, 400, "HTTP 400"),
    ],
)
def test_malformed_answers_raise(body, status, match, tmp_path) -> None:
    transport, calls = _mock(body, status)
    teacher = AsyncTeacher("http://t/v1", "m", transport=transport, backoff=0.01, cache_dir=tmp_path)
    with pytest.raises(TeacherError, match=match) as err:
        teacher.run_batch([teacher.prompt_topk("ab", 2)])
    assert not isinstance(err.value, TeacherUnavailable) and err.value.status == (status if status >= 400 else None)
    posts = [c for c in calls if c.method == "POST"]  # the cache also asks GET /v1/models once
    assert len(posts) == 1 and teacher.errors == 1 and not list(tmp_path.rglob("*.bin"))  # not retried, not cached


def test_lenient_text_answers_for_cross_tokenizer() -> None:
    """strict=False: echoed tokens that do not spell the prompt (U+FFFD halves) are kept for the
    aligner to judge; fewer than k logprobs fail unless byte tokens collapsed into one U+FFFD key."""
    body = {
        "choices": [
            {
                "text": "\u00e9b",
                "logprobs": {
                    "tokens": ["\ufffd", "\ufffd", "b"],
                    "text_offset": [0, 1, 2],
                    "top_logprobs": [None, {"x": -0.1, "y": -2.0}, {"b": -0.5, "c": -1.5}],
                },
            }
        ]
    }
    transport, _ = _mock(body)
    teacher = AsyncTeacher("http://t/v1", "m", transport=transport)
    entries = teacher.run_batch([teacher.prompt_topk("\u00e9b", 2, token_ids=False, strict=False)])[0]
    assert [e[0] for e in entries] == ["\ufffd", "\ufffd", "b"]
    with pytest.raises(TeacherError, match="spell the prompt"):
        teacher.run_batch([teacher.prompt_topk("\u00e9b", 2, token_ids=False)])
    with pytest.raises(TeacherError, match="asked for 3"):  # short, and not by a collision
        teacher.run_batch([teacher.prompt_topk("\u00e9b", 3, token_ids=False, strict=False)])
    lp = body["choices"][0]["logprobs"]
    collided = {
        "choices": [
            {
                **body["choices"][0],
                "logprobs": {**lp, "top_logprobs": [None, {"\ufffd": -0.1, "y": -2.0}, {"b": -0.5, "\ufffd": -1.5}]},
            }
        ]
    }
    transport, _ = _mock(collided)
    teacher = AsyncTeacher("http://t/v1", "m", transport=transport)
    entries = teacher.run_batch([teacher.prompt_topk("\u00e9b", 3, token_ids=False, strict=False)])[0]
    assert entries[2][1] == {"b": -0.5, "\ufffd": -1.5}  # U+FFFD byte tokens share one key


def test_good_mock_answer_parses() -> None:
    transport, calls = _mock(GOOD_ECHO)
    teacher = AsyncTeacher("http://t/v1", "m", transport=transport)
    assert teacher.run_batch([teacher.prompt_topk("ab", 2)])[0] == [("a", None, 0), ("b", {"b": -0.5, "c": -1.5}, 1)]
    assert str(calls[0].url) == "http://t/v1/completions"
    sent = __import__("json").loads(calls[0].content)
    assert sent["echo"] is True and sent["max_tokens"] == 0 and sent["logprobs"] == 2
    assert sent["return_tokens_as_token_ids"] is True
    with pytest.raises(TeacherError, match="not in the student's vocabulary"):
        topk_tensors(teacher.run_batch([teacher.prompt_topk("ab", 2)])[0], {"b": 1}, 2)


# ---------------------------------------------------------------------- losses
def test_topk_kl_hand_computed() -> None:
    logits = torch.tensor([[[1.0, 2.0, 0.0, -1.0]]])
    ids = torch.tensor([[[1, 0]]])
    t_p = [0.6, 0.3]
    lps = torch.log(torch.tensor([[t_p]]))
    mask = torch.ones(1, 1, dtype=torch.bool)
    z = [math.exp(x) for x in (1.0, 2.0, 0.0, -1.0)]
    q = [x / sum(z) for x in z]
    s = [q[1], q[0], 1 - q[1] - q[0]]
    t = [0.6, 0.3, 0.1]
    want = sum(a * math.log(a / b) for a, b in zip(t, s))
    assert topk_kl_loss(logits, ids, lps, mask, 1.0).item() == pytest.approx(want, rel=1e-5)
    # T = 2: both (k+1)-way distributions softened alike, as softmax(log p / T); scaled by T^2.
    st = [math.sqrt(a) for a in s]
    st = [a / sum(st) for a in st]
    tt = [math.sqrt(a) for a in t]
    tt = [a / sum(tt) for a in tt]
    want2 = 4 * sum(a * math.log(a / b) for a, b in zip(tt, st))
    assert topk_kl_loss(logits, ids, lps, mask, 2.0).item() == pytest.approx(want2, rel=1e-5)
    assert mixed_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(2.5)


def test_topk_kl_zero_when_equal_and_grad_flows() -> None:
    torch.manual_seed(0)
    b, t, v = 2, 3, 7
    teacher_logits = torch.randn(b, t, v)
    t_lp = torch.log_softmax(teacher_logits, -1)
    ids = torch.arange(v).expand(b, t, v).clone()
    perm = torch.randperm(v)  # order of the k entries must not matter
    mask = torch.ones(b, t, dtype=torch.bool)
    same = teacher_logits.clone().requires_grad_(True)
    loss = topk_kl_loss(same, ids[..., perm], t_lp[..., perm], mask, 1.0)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert same.grad.abs().max().item() < 1e-5
    student = torch.randn(b, t, v, requires_grad=True)
    k = 3
    top_v, top_i = t_lp.topk(k, -1)
    mask[1, 2] = False
    loss = topk_kl_loss(student, top_i, top_v, mask, 1.0)
    assert loss.item() > 0
    loss.backward()
    g = student.grad
    assert torch.isfinite(g).all() and g[0].abs().sum() > 0 and g[1, 2].abs().sum() == 0
    # Junk at masked positions (padding) changes nothing and leaks no NaN.
    top_v2, top_i2 = top_v.clone(), top_i.clone()
    top_v2[1, 2], top_i2[1, 2] = -float("inf"), 10**6
    s2 = student.detach().clone().requires_grad_(True)
    loss2 = topk_kl_loss(s2, top_i2, top_v2, mask, 1.0)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6) and torch.isfinite(s2.grad).all()
    assert topk_kl_loss(student, top_i, top_v, torch.zeros(b, t, dtype=torch.bool), 2.0).item() == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_topk_kl_zero_for_the_teacher_itself_at_any_temperature(temperature: float) -> None:
    """A student equal to the teacher is at the minimum at every T: its rest bucket must be the
    same event as the teacher's (summed at T = 1, then softened), or training would move the
    rest mass into the top-k. Also with an empty slot (cross-tokenizer)."""
    torch.manual_seed(0)
    v, k = 500, 8
    z = torch.randn(2, 3, v) * 2.0
    z[..., :4] += torch.tensor([9.0, 8.0, 7.5, 6.0])  # a peaked head, a long tail: rest mass matters
    top = torch.log_softmax(z, -1).topk(k, -1)
    lps = top.values.clone()
    lps[1, 2, 3] = -float("inf")  # an empty slot: its mass joins the rest bucket on both sides
    mask = torch.ones(2, 3, dtype=torch.bool)
    student = z.clone().requires_grad_(True)
    loss = topk_kl_loss(student, top.indices, lps, mask, temperature)
    loss.backward()
    assert abs(loss.item()) < 1e-5 and student.grad.abs().max().item() < 1e-5


def test_student_learns_teacher_topk_from_server(teacher_server) -> None:
    url, _, tok, _ = teacher_server
    k = 8
    teacher = AsyncTeacher(url, "tiny", concurrency=2)
    entries = teacher.run_batch([teacher.prompt_topk(p, k) for p in PROMPTS[:2]])
    vocab = token_id_map(tok)
    rows = [topk_tensors(e, vocab, k) for e in entries]
    t = min(r[0].shape[0] for r in rows)
    ids = torch.stack([r[0][:t] for r in rows])
    lps = torch.stack([r[1][:t] for r in rows])
    mask = torch.stack([r[2][:t] for r in rows])
    mask[:, -1] = False
    x = torch.stack([torch.tensor(tok.encode(p)[:t]) for p in PROMPTS[:2]])
    torch.manual_seed(0)
    student = GPT(ModelConfig(vocab_size=1024, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64))
    student.init_weights(3)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = topk_kl_loss(student(x), ids, lps, mask, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = topk_kl_loss(student(x), ids, lps, mask, 1.0).item()
    assert final < 0.5 * losses[0], (losses[0], final)


# ---------------------------------------------------------------------- vLLM's wire format
class FakeVLLM:
    """What vLLM answers the feeds, on a loopback port: echo + logprobs prompts (token ids:
    "token_id:N" keys with the actual token added as a k+1-th; text: one token per character),
    prompt_logprobs repeated as vLLM does, /v1/models with the checkpoint's `root`, and vLLM's
    400 for logprobs above --max-logprobs or a prompt above --max-model-len (here in characters
    or ids)."""

    def __init__(self, root: str = "/models/a", lp: float = -0.5, max_logprobs: int = 20, max_model_len: int = 10**6):
        self.root, self.lp, self.max_logprobs, self.max_model_len = root, lp, max_logprobs, max_model_len
        self.posts = 0

    @staticmethod
    def _error(message: str) -> web.Response:
        body = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}
        return web.json_response(body, status=400)

    def _top(self, prompt: str | list[int], i: int, k: int) -> dict[str, float]:
        if isinstance(prompt, list):
            top = {f"token_id:{(prompt[i] + j) % 512}": self.lp - j for j in range(1, k + 1)}
            return {**top, f"token_id:{prompt[i]}": self.lp}
        return {**{c: self.lp - j for j, c in enumerate(string.ascii_letters[:k], 1)}, prompt[i]: self.lp}

    async def completions(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        prompt, k = body["prompt"], body.get("logprobs")
        if k is None:  # the feeds' probe
            return web.json_response({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})
        if k > self.max_logprobs:
            return self._error(f"Requested prompt logprobs of {k}, which is greater than max allowed: 20")
        if len(prompt) > self.max_model_len:
            return self._error(f"This model's maximum context length is {self.max_model_len} tokens.")
        n = len(prompt)
        tokens = [f"token_id:{t}" for t in prompt] if isinstance(prompt, list) else list(prompt)
        tops = [None] + [self._top(prompt, i, k) for i in range(1, n)]
        choice = {
            "index": 0,
            "text": "",
            "logprobs": {
                "text_offset": list(range(n)),
                "token_logprobs": [None] + [self.lp] * (n - 1),
                "tokens": tokens,
                "top_logprobs": tops,
            },
            "finish_reason": "length",
            "prompt_logprobs": tops,
        }
        return web.json_response({"choices": [choice], "usage": {"prompt_tokens": n, "completion_tokens": 0}})

    async def models(self, request: web.Request) -> web.Response:
        entry = {"id": "qwen", "object": "model", "created": int(time.time()), "root": self.root, "max_model_len": 4096}
        return web.json_response({"object": "list", "data": [entry]})

    def app(self) -> web.Application:
        app = completions_app(self.completions)
        app.router.add_get("/v1/models", self.models)
        return app


class Rows:
    """A TokenLoader stand-in: the same rows every micro-batch."""

    def __init__(self, rows: list[list[int]]):
        self.rows, self.i = torch.tensor(rows), 0

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["i"]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.i += 1
        return self.rows[:, :-1], self.rows[:, 1:]


def _dcfg(url: str, method: str = "topk_logprobs", **distill: Any) -> DistillConfig:
    teacher = {"url": url, "model": "qwen", "max_retries": 3, **distill.pop("teacher", {})}
    return DistillConfig.model_validate({"teacher": teacher, "method": method, **distill})


def _rows(vocab: int = 512) -> list[list[int]]:
    return [[(7 * r + 3 * i) % vocab for i in range(17)] for r in range(2)]


@pytest.mark.parametrize("method", ["topk_logprobs", "cross_tokenizer"])
def test_a_refusal_of_the_whole_micro_batch_stops_the_run(method: str) -> None:
    """distill.top_k above vLLM's --max-logprobs: every request gets the same 400. Not retried,
    and not an outage to train through: the run stops with the server's own words."""
    fake = FakeVLLM(max_logprobs=20)
    url, stop = serve_app(fake.app())
    dcfg = _dcfg(url + "/v1", method, top_k=32)
    tok = gpt2_tokenizer() if method == "cross_tokenizer" else None
    if tok is None:
        feed = TopkFeed(AsyncTeacher.from_config(dcfg.teacher), Rows(_rows()), dcfg, 512)
    else:
        rows = [tok.encode("def f(x):\n    return x + 1\n" * 2)[:17]] * 2
        feed = CrossTokenizerFeed(AsyncTeacher.from_config(dcfg.teacher), Rows(rows), dcfg, tok)
    feed.start(micro_batches=3, saved=None)
    try:
        with pytest.raises(ConfigError, match="distill.teacher=.*greater than max allowed: 20$"):
            feed.next()
    finally:
        feed.close()
        stop()
    assert feed.teacher.retries == 0 and 2 <= fake.posts <= 2 * 3  # each row (piece) asked once: a 400 is not retried


def test_piece_errors_are_teacher_skips() -> None:
    """Cross-tokenizer: pieces the teacher refused (too long for its context) leave the micro-batch
    too few aligned positions: that is the teacher failing (teacher_skipped, the TeacherAvailable
    signal), not the alignment."""
    tok = gpt2_tokenizer()
    short, long = tok.encode("x = 1"), tok.encode("def f(x):\n    return x + 1\n" * 3)
    row = (short + [tok.eot_id] + long)[:40]
    fake = FakeVLLM(max_model_len=len(tok.decode(short)))
    url, stop = serve_app(fake.app())
    dcfg = _dcfg(url + "/v1", "cross_tokenizer", top_k=8, min_aligned_fraction=0.5)
    feed = CrossTokenizerFeed(AsyncTeacher.from_config(dcfg.teacher), Rows([row, row]), dcfg, tok)
    feed.start(micro_batches=2, saved=None)
    try:
        batches = [feed.next() for _ in range(2)]
    finally:
        feed.close()
        stop()
    rec = feed.record()
    assert all(b.teacher is None for b in batches) and rec["teacher_skipped"] == 2
    assert rec["alignment"]["piece_errors"] == 4 and rec["alignment"]["unaligned_skipped"] == 0
    assert "maximum context length" in rec["teacher_error"]


def test_a_malformed_teacher_url_is_a_config_error(tmp_path) -> None:
    """Not an outage retried for the whole run: the start fails naming the field."""
    for url in ("teacher:8000/v1", "htp://teacher:8000/v1", "http://:8000/v1"):
        cfg = micro_cfg(
            tmp_path, stage="distill", distill={"method": "topk_logprobs", "teacher": {"url": url, "model": "m"}}
        )
        with pytest.raises(ConfigError, match="^distill.teacher.url="):
            build_feed(cfg, RunLayout(tmp_path), None, None, None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="teacher url"):
            AsyncTeacher(url, "m")


def test_teacher_down_skips_at_once_then_resumes(monkeypatch) -> None:
    """The first micro-batch spends the client's retries; the ones after it do not ask at all
    (without the breaker each waited the whole schedule), and a probe finds the teacher back."""
    monkeypatch.setattr(topk, "PROBE_S", 0.2)
    port = free_port()
    dcfg = _dcfg(f"http://127.0.0.1:{port}/v1", top_k=4)
    teacher = AsyncTeacher.from_config(dcfg.teacher, backoff=0.2)  # 4 attempts: ~1.4-2.1 s
    feed = TopkFeed(teacher, Rows(_rows()), dcfg, 512)
    feed.start(micro_batches=100, saved=None)
    stop = None
    try:
        t0 = time.monotonic()
        assert feed.next().teacher is None
        first = time.monotonic() - t0
        t0 = time.monotonic()
        assert all(feed.next().teacher is None for _ in range(10))
        rest = time.monotonic() - t0
        assert first > 1.0 and rest < 0.5, (first, rest)
        stop = run_on(FakeVLLM().app(), port)
        deadline = time.monotonic() + 10
        while feed.next().teacher is None:
            assert time.monotonic() < deadline, "the teacher came back, the feed did not use it"
            time.sleep(0.05)
        rec = feed.record()
        assert rec["teacher_outages"] == 1 and feed.down_since is None and "ConnectError" in rec["teacher_error"]
    finally:
        feed.close()
        if stop is not None:
            stop()


# ---------------------------------------------------------------------- the cache
def test_cache_rows_are_compact_and_keyed_by_the_teacher(tmp_path) -> None:
    """A 2048-token top-20 row costs ~170 bytes a token (vLLM's JSON: ~840), replays exactly, and
    a teacher redeployed with another checkpoint under the same URL and name is a miss; a cache
    file of an older format is a miss that gets rewritten."""
    prompt = [(i * 37) % 512 for i in range(2048)]
    old = FakeVLLM(root="/models/a", lp=-0.5)
    url, stop = serve_app(old.app())
    try:
        first = AsyncTeacher(url, "qwen", cache_dir=tmp_path)
        a = first.run_batch([first.prompt_topk(prompt, 20)])[0]
        (path,) = tmp_path.rglob("*.bin")
        assert path.stat().st_size / len(prompt) < 200 and decode_topk(path.read_bytes()) == a
        assert all(len(top) == 20 for _, top, _ in a[1:])  # vLLM's k+1-th, the actual token, is not kept
        again = AsyncTeacher(url, "qwen", cache_dir=tmp_path)
        assert again.run_batch([again.prompt_topk(prompt, 20)])[0] == a and old.posts == 1 and again.cache_hits == 1
        old.root, old.lp = "/models/b", -2.0  # redeployed: same URL, same served name
        swapped = AsyncTeacher(url, "qwen", cache_dir=tmp_path)
        b = swapped.run_batch([swapped.prompt_topk(prompt, 20)])[0]
        assert old.posts == 2 and swapped.cache_hits == 0 and b[1][1][prompt[1]] == -2.0
        for f in tmp_path.rglob("*.bin"):  # an older client's file where this one looks
            f.write_text(json.dumps({"choices": [{"text": "", "logprobs": None}]}))
        fresh = AsyncTeacher(url, "qwen", cache_dir=tmp_path)
        assert fresh.run_batch([fresh.prompt_topk(prompt, 20)])[0] == b and fresh.requests == 1
        rewritten = [f for f in tmp_path.rglob("*.bin") if f.read_bytes().startswith(TOPK_MAGIC)]
        assert len(rewritten) == 1 and decode_topk(rewritten[0].read_bytes()) == b
    finally:
        stop()


def test_a_cache_that_cannot_be_written_keeps_the_answer(tmp_path) -> None:
    """A full volume (here a file where the cache directory should be) costs the rerun its replay,
    not this run its teacher."""
    fake = FakeVLLM()
    url, stop = serve_app(fake.app())
    blocked = tmp_path / "cache"
    blocked.write_text("")
    try:
        teacher = AsyncTeacher(url, "qwen", cache_dir=blocked)
        out = teacher.run_batch([teacher.prompt_topk([1, 2, 3], 4), teacher.prompt_topk([4, 5, 6], 4)])
    finally:
        stop()
    assert [e[0] for e in out[0]] == [1, 2, 3] and teacher.errors == 0 and fake.posts == 2
