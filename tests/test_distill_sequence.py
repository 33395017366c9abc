"""Sequence-level distillation (distill.method=sequence): prompts, quality filter, packing, and
training against a real `nanochat serve` teacher (`ModelServer` on a loopback port).

    .venv/bin/pytest tests/test_distill_sequence.py -q -s     # -s prints the figures

The teacher is a MICRO model trained first on a narrow pattern (one-line functions whose body
follows from the docstring), so its greedy completions mostly pass the prompts' tests; the
students have their own, different tokenizer (vocab 1024 against the teacher's 512).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from nanochat_trainer.config import DistillConfig, TrainerConfig
from nanochat_trainer.data.synthetic import generate as synthetic_docs
from nanochat_trainer.distill.sequence import (
    Prompt,
    SequenceProducer,
    _Packer,
    check_completion,
    filter_completions,
    function_body,
    split_prompt,
)
from nanochat_trainer.distill.teacher import AsyncTeacher, TeacherError
from nanochat_trainer.eval.sandbox import Sandbox
from nanochat_trainer.train import train

from micro import MICRO, micro_cfg, read_log
from serving import Teacher, free_port, serve_app

OPS = [
    ("doubled", "x * 2", lambda x: x * 2),
    ("plus one", "x + 1", lambda x: x + 1),
    ("squared", "x * x", lambda x: x * x),
    ("negated", "-x", lambda x: -x),
]
NAMES = ["f", "g", "h", "calc", "transform", "apply", "step", "fn"]


def narrow_doc(r: random.Random) -> str:
    word, expr, fn = r.choice(OPS)
    name, a = r.choice(NAMES) + str(r.randint(0, 99)), r.randint(-9, 9)
    return f'def {name}(x):\n    """Return x {word}."""\n    return {expr}\n\n\nassert {name}({a}) == {fn(a)}\n'


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """(data file, teacher run dir): 2000 narrow documents, a MICRO teacher trained 150 steps on them."""
    root = tmp_path_factory.mktemp("narrow")
    r = random.Random(0)
    data = root / "narrow.jsonl"
    data.write_text("".join(json.dumps({"content": narrow_doc(r)}) + "\n" for _ in range(2000)))
    tdir = root / "teacher"
    train(micro_cfg(tdir, steps=150, batch_size=8, data={"source": "local", "path": str(data)}))
    return data, tdir


@pytest.fixture
def teacher(narrow):
    t = Teacher(narrow[1] / "final").start()
    yield t
    t.stop()


def _seq_cfg(run_dir: Path, url: str, data: Path, steps: int, **distill) -> TrainerConfig:
    # 8 in flight (windows of 16 prompts): the outage tests below stop the teacher mid-run, before
    # the producer has read far ahead.
    teacher = {"url": url + "/v1", "model": "teacher", "max_retries": 0, "timeout_s": 30, "concurrency": 8}
    teacher.update(distill.pop("teacher", {}))
    over = {k: distill.pop(k) for k in ("checkpoint",) if k in distill}
    return micro_cfg(
        run_dir,
        steps=steps,
        stage="distill",
        model={**MICRO["model"], "vocab_size": 1024},
        **over,
        data={"source": "local", "path": str(data)},
        optimizer={"lr": 0.02, "adam_lr": 0.01},
        distill={"method": "sequence", "max_new_tokens": 24, "teacher": teacher, **distill},
    )


# ---------------------------------------------------------------------- prompts and the filter
def test_split_prompt_on_synthetic_documents() -> None:
    for doc in synthetic_docs(0, 30):
        prompt, tests = split_prompt(doc)
        assert doc.startswith(prompt) and prompt.rstrip().endswith('"""') and tests.startswith("assert")
        body = function_body(doc[len(prompt) :])
        assert (prompt + body) in doc and check_completion(prompt, body) is None
    prompt, tests = split_prompt("import os\n\ndef g(a):  # note\n    return a\n\nassert g(1) == 1\nassert h(2)\n")
    assert prompt == "import os\n\ndef g(a):  # note" and tests == "assert g(1) == 1"
    assert split_prompt("x = 1\n") is None and split_prompt("def h(): return 1\n") is None
    assert split_prompt("def broken(:\n") is None


def test_function_body_stops_at_the_next_top_level_line() -> None:
    assert function_body("\n    return x\n\n\nassert f(1) == 1\ndef g():\n") == "\n    return x\n"
    assert function_body("\nassert f(1)\n") == ""
    assert function_body("") == ""


def test_quality_filter() -> None:
    p = Prompt(0, 'def double(x):\n    """Return x doubled."""', "assert double(3) == 6\nassert double(-1) == -2")
    no_tests = Prompt(1, p.text, "")
    items = [
        (p, "\n    return x * 2\n"),  # right
        (p, "\n    return x + 2\n"),  # parses, fails its tests
        (p, "\n    return x *\n"),  # not Python
        (p, ""),  # nothing came back
        (p, "\n    while True: pass\n"),  # hangs: the sandbox's time limit
        (no_tests, "\n    return x + 2\n"),
    ]  # no tests: parsing is all that is checked
    reasons = filter_completions(items, Sandbox(timeout=2.0, workers=2))
    assert reasons == [None, "tests", "syntax", "empty", "tests", None]
    assert filter_completions(items[:2], None) == [None, None]  # distill.filter_tests off


def test_packer_resumes_inside_a_text() -> None:
    texts = [(i, list(range(100 * i, 100 * i + 7 + i))) for i in range(0, 20, 2)]  # indices 0, 2, 4 ...
    a = _Packer(seq_len=5)
    rows, states = [], []
    it = iter(texts)
    while len(rows) < 8:
        while not a.ready():
            a.add(*next(it))
        states.append(a.state_dict())
        rows.append(a.take())
    # Resume from the state before row 5: the producer restarts at that document.
    st = states[5]
    b = _Packer(seq_len=5, next_index=st["next"], skip=st["skip"])
    it = iter([t for t in texts if t[0] >= st["next"]])
    for want in rows[5:]:
        while not b.ready():
            b.add(*next(it))
        assert b.take() == want


# ---------------------------------------------------------------------- training against a served teacher
@pytest.mark.slow
def test_sequence_trains_and_cache_replays(narrow, teacher, tmp_path) -> None:
    data, _ = narrow
    steps = 10
    t0 = time.perf_counter()
    rec = train(_seq_cfg(tmp_path / "a", teacher.url, data, steps))
    log = read_log(tmp_path / "a")
    seq = rec["sequences"]
    print(
        f"\nsequence: loss {log[1]['loss']:.3f} -> {rec['loss']:.3f}, sequences {seq}, teacher {rec['teacher']}, "
        f"{time.perf_counter() - t0:.1f}s"
    )
    assert rec["loss"] < log[1]["loss"] - 1.0
    assert seq["teacher_rows"] == steps * MICRO["batch_size"] and seq["plain_rows"] == 0 and rec["teacher_skipped"] == 0
    assert seq["accepted"] > 0 and rec["teacher"]["errors"] == 0
    assert seq["accepted"] >= 3 * sum(seq["rejected"].values()), seq  # the narrow teacher is mostly right
    sent = teacher.n  # the producer may have asked a window past the last logged step
    assert 0 < rec["teacher"]["requests"] <= sent

    # A second run in a fresh directory sharing the cache: zero requests, the same rows and losses.
    cache = tmp_path / "a" / "teacher-cache"
    rec_b = train(_seq_cfg(tmp_path / "b", teacher.url, data, steps, teacher={"cache_dir": str(cache)}))
    log_b = read_log(tmp_path / "b")
    assert teacher.n == sent and rec_b["teacher"]["requests"] == 0 and rec_b["teacher"]["cache_hits"] > 0
    for s in range(1, steps + 1):
        assert log_b[s]["loss"] == pytest.approx(log[s]["loss"], rel=1e-5), s

    # Resume: 4 steps, then on to 10 from the checkpoint, gives the uninterrupted losses (same cache).
    c = {"cache_dir": str(cache)}
    train(_seq_cfg(tmp_path / "c", teacher.url, data, 4, teacher=c, checkpoint={"every": 4}))
    train(_seq_cfg(tmp_path / "c", teacher.url, data, steps, teacher=c, checkpoint={"every": 4}))
    log_c = read_log(tmp_path / "c")
    for s in range(5, steps + 1):
        assert log_c[s]["loss"] == pytest.approx(log[s]["loss"], rel=1e-5, abs=1e-6), s


@pytest.mark.slow
def test_teacher_killed_and_restarted(narrow, teacher, tmp_path) -> None:
    """continue_without_teacher (default): the teacher dies at step 2; once the buffered teacher
    sequences run out, rows come from plain data (counted); it comes back on the same port and
    teacher rows resume. The run finishes."""
    data, _ = narrow
    steps, seen = 16, {}

    def progress(rec: dict) -> None:
        if rec["step"] == 2:
            teacher.stop()
        elif "restarted" not in seen and rec["teacher_skipped"] > 0:
            seen["restarted"] = rec["sequences"]["teacher_rows"]
            n = teacher.n
            teacher.start()
            deadline = time.monotonic() + 20  # the producer retries with backoff: let it find the teacher
            while teacher.n == n and time.monotonic() < deadline:
                time.sleep(0.05)

    rec = train(_seq_cfg(tmp_path / "k", teacher.url, data, steps), progress)
    seq = rec["sequences"]
    print(f"\nteacher killed at step 2 and restarted: {rec['teacher_skipped']} rows from plain data, {seq}")
    assert "restarted" in seen and rec["teacher_skipped"] > 0 and seq["outages"] >= 1
    assert seq["teacher_rows"] > seen["restarted"]  # teacher rows again after the restart
    assert seq["teacher_rows"] + seq["plain_rows"] == steps * MICRO["batch_size"]
    assert (tmp_path / "k" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_strict_run_waits_for_the_teacher(narrow, teacher, tmp_path) -> None:
    """continue_without_teacher false: a teacher killed mid-run and restarted 2 s later makes the
    run wait, not fail, and every row is a teacher row; one that stays down fails the run after
    distill.wait_for_teacher_s with a clear error."""
    data, _ = narrow
    steps = 12

    timer = threading.Timer(2.0, teacher.start)

    def progress(rec: dict) -> None:
        if rec["step"] == 2:
            teacher.stop()
            timer.start()

    cfg = _seq_cfg(tmp_path / "w", teacher.url, data, steps, continue_without_teacher=False)
    rec = train(cfg, progress)
    timer.join()
    seq = rec["sequences"]
    print(f"\nstrict run, teacher down 2 s: waited {seq['wait_s']}s, {seq}")
    assert rec["teacher_skipped"] == 0 and seq["teacher_rows"] == steps * MICRO["batch_size"] and seq["outages"] >= 1
    teacher.stop()
    t0 = time.monotonic()
    with pytest.raises(TeacherError, match="has been down for more than distill.wait_for_teacher_s=1s"):
        train(_seq_cfg(tmp_path / "down", teacher.url, data, 3, continue_without_teacher=False, wait_for_teacher_s=1))
    assert time.monotonic() - t0 < 30


def test_teacher_down_at_start_trains_on_plain_data(narrow, tmp_path) -> None:
    data, _ = narrow
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rec = train(_seq_cfg(tmp_path / "p", url, data, 3))
    assert rec["teacher_skipped"] == 3 * MICRO["batch_size"] and rec["sequences"]["plain_rows"] == 12
    assert "ConnectError" in rec["teacher_error"] and rec["sequences"]["outages"] == 1


def _stub(handler) -> tuple[str, Callable[[], None]]:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes([web.post("/v1/completions", handler), web.get("/health", health)])
    return serve_app(app)


def test_unknown_model_fails_clearly(narrow, tmp_path) -> None:
    data, _ = narrow

    async def not_found(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "The model `teacher` does not exist."}}, status=404)

    url, stop = _stub(not_found)
    try:
        with pytest.raises(TeacherError, match="refuses requests .HTTP 404.*does not exist"):
            train(_seq_cfg(tmp_path / "m", url, data, 3))
    finally:
        stop()


def test_malformed_answers_are_counted_skips(narrow, tmp_path) -> None:
    """A teacher answering junk: each prompt is a counted teacher error, never a training text;
    once every recent answer failed, rows come from plain data."""
    data, _ = narrow

    async def junk(request: web.Request) -> web.Response:
        return web.Response(text="<html>oops</html>", content_type="text/html")

    url, stop = _stub(junk)
    try:
        rec = train(_seq_cfg(tmp_path / "j", url, data, 2))
    finally:
        stop()
    seq = rec["sequences"]
    assert seq["accepted"] == 0 and seq["teacher_errors"] >= 256 and seq["plain_rows"] == 2 * MICRO["batch_size"]
    assert "non-JSON" in rec["teacher_error"]


def test_slow_rejected_teacher_costs_at_most_row_wait_per_micro_batch(narrow, tmp_path) -> None:
    """A teacher that answers, slowly, with text the filter rejects (it does not parse) never
    reaches the starved mark in a short run: each micro-batch waits distill.row_wait_s, then
    trains on plain rows, counted as skipped."""
    data, _ = narrow
    answers = 0

    async def slow_wrong(request: web.Request) -> web.Response:
        nonlocal answers
        await asyncio.sleep(0.2)
        answers += 1
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": "teacher",
                "choices": [{"index": 0, "text": "    return (((\n", "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
            }
        )

    url, stop = _stub(slow_wrong)
    try:
        rec = train(_seq_cfg(tmp_path / "s", url, data, 2, row_wait_s=1.0, filter_tests=False))
    finally:
        stop()
    seq = rec["sequences"]
    assert answers > 0 and seq["accepted"] == 0 and sum(seq["rejected"].values()) < 256  # not starved
    assert seq["plain_rows"] == 2 * MICRO["batch_size"] and rec["teacher_skipped"] == 2 * MICRO["batch_size"]
    # Two micro-batches, each waiting its second (and a little more for the poll and the last answer).
    assert seq["wait_s"] < 2 * (1.0 + 1.0), seq


class _CharTok:
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_completion_cut_at_max_tokens_is_rejected_unless_the_function_ended() -> None:
    """finish_reason "length": the text stops where the token budget did, and a body missing its
    end (here its `return`) still parses; it is kept only when a top-level line after it shows
    the function had ended."""
    cut = "\n    total = 0\n    for x in xs:\n        total += x\n"
    answers = {
        0: (cut, "length"),  # cut mid-function
        1: (cut + "    return total\n\nprint(positive_sum([1]))", "length"),  # ended, then cut
        2: (cut + "    return total\n", "stop"),  # a stop string ended it
    }

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        text, finish = answers[body["seed"]]
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return web.json_response({"choices": [choice]})

    url, stop = _stub(completions)
    dcfg = DistillConfig.model_validate(
        {"teacher": {"url": url + "/v1", "model": "teacher"}, "sample_temperature": 0.5, "filter_tests": False}
    )
    prompt = 'def positive_sum(xs):\n    """Sum of xs."""'
    producer = SequenceProducer(
        AsyncTeacher.from_config(dcfg.teacher),
        iter([Prompt(i, prompt, "") for i in range(3)]),
        dcfg,
        _CharTok(),
        window=3,
        ahead_tokens=10**9,
    )
    try:
        kept = [producer.take(timeout=10)[0] for _ in range(2)]
    finally:
        producer.finish()
        producer.close()
        stop()
    assert kept == [1, 2] and producer.counts["rejected_truncated"] == 1 and producer.counts["accepted"] == 2
