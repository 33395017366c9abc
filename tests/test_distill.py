"""Distillation: the async teacher client against a real `nanochat serve` app, and the top-k KL loss.

    .venv/bin/pytest tests/test_distill.py -q

The teacher is a `ModelServer` of a tiny checkpoint on a free port in a background thread (as in
test_serve.py); a middleware counts the HTTP requests it receives. Failure injection uses a small
aiohttp app (`FlakyServer503`) and httpx.MockTransport for malformed bodies.
"""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from aiohttp import web

from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.config import ModelConfig, TeacherConfig
from nanochat_trainer.distill.teacher import AsyncTeacher, TeacherError, TeacherUnavailable, token_id_map, topk_tensors
from nanochat_trainer.eval.generate import generate, prompt_logprobs
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.serve import ModelServer
from nanochat_trainer.train.losses import mixed_loss, topk_kl_loss

from serving import completions_app, serve_app

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
    assert len([f for f in files if f.is_file()]) == 3 and not any(f.name.startswith(".tmp") for f in files)
    second = AsyncTeacher(url, "tiny", cache_dir=tmp_path / "cache")
    b = second.run_batch([second.prompt_topk(p, 3) for p in PROMPTS])
    assert seen["n"] - before == 3 and second.requests == 0 and second.cache_hits == 3 and a == b
    # A different request is a miss; a torn cache file is a miss that gets rewritten.
    second.run_batch([second.prompt_topk(PROMPTS[0], 2)])
    assert seen["n"] - before == 4
    victim = next(f for f in (tmp_path / "cache").rglob("*.json"))
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
    assert len(calls) == 1 and teacher.errors == 1 and not list(tmp_path.rglob("*.json"))  # not retried, not cached


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
    # T = 2: both (k+1)-way distributions softened, the teacher's as softmax(log p / T); scaled by T^2.
    zt = [math.exp(x / 2) for x in (1.0, 2.0, 0.0, -1.0)]
    qt = [x / sum(zt) for x in zt]
    st = [qt[1], qt[0], 1 - qt[1] - qt[0]]
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
