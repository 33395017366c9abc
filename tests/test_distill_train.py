"""stage "distill" (method topk_logprobs) in the training loop, against a real `ModelServer` teacher.

    .venv/bin/pytest tests/test_distill_train.py -q -s     # -s prints the figures

The teacher is a MICRO model trained first (it writes the tokenizer the students share), served
by `ModelServer` on a free port in a background thread; a middleware counts its requests.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from aiohttp import web

from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.distill.teacher import TeacherError
from nanochat_trainer.train import train

from micro import MICRO, distill_cfg, micro_cfg, read_log, torchrun
from serving import serve_app, teacher_app


def test_distill_loss_falls_and_cache_replays(narrow_teacher, tmp_path) -> None:
    url, tdir, seen = narrow_teacher
    steps = 20
    before = seen["n"]
    t0 = time.perf_counter()
    train(distill_cfg(tmp_path / "a", url, tdir, steps))
    t_first = time.perf_counter() - t0
    log = read_log(tmp_path / "a")
    last = log[steps]
    print(
        f"\ndistill: loss {log[1]['loss']:.3f} -> {last['loss']:.3f}, kd {log[1]['kd_loss']:.3f} -> "
        f"{last['kd_loss']:.3f}, teacher {last['teacher']}, {t_first:.1f}s"
    )
    assert last["loss"] < log[1]["loss"] - 1.0 and last["kd_loss"] < log[1]["kd_loss"] - 0.5, log
    assert last["teacher_skipped"] == 0 and last["teacher"]["errors"] == 0
    n_rows = steps * MICRO["batch_size"]
    # One request per row, none past the run's last batch (prefetch stops at the end).
    assert last["teacher"]["requests"] == n_rows and seen["n"] - before == n_rows
    cache = tmp_path / "a" / "teacher-cache"  # the default cache dir
    assert len(list(cache.rglob("*.bin"))) == n_rows

    # (b) A second identical run in a fresh dir, sharing the cache: zero requests, same losses.
    before = seen["n"]
    train(distill_cfg(tmp_path / "b", url, tdir, steps, teacher={"cache_dir": str(cache)}))
    log_b = read_log(tmp_path / "b")
    assert seen["n"] == before and log_b[steps]["teacher"]["requests"] == 0
    assert log_b[steps]["teacher"]["cache_hits"] == n_rows
    for s in range(1, steps + 1):
        assert log_b[s]["loss"] == pytest.approx(log[s]["loss"], rel=1e-5), s


def test_distill_resume_matches_uninterrupted(narrow_teacher, tmp_path) -> None:
    """Prefetching runs ahead of the loader: the checkpoint must hold the state of the next
    untrained batch, so a resumed run sees the same batches (and teacher answers)."""
    url, tdir, _ = narrow_teacher
    cache = {"cache_dir": str(tmp_path / "cache")}
    train(distill_cfg(tmp_path / "full", url, tdir, 8, teacher=cache, checkpoint={"every": 4}))
    train(distill_cfg(tmp_path / "part", url, tdir, 4, teacher=cache, checkpoint={"every": 4}))
    train(distill_cfg(tmp_path / "part", url, tdir, 8, teacher=cache, checkpoint={"every": 4}))
    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    for s in range(5, 9):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5, abs=1e-6), (s, a[s], b[s])


def test_teacher_down(narrow_teacher, tmp_path) -> None:
    _, tdir, _ = narrow_teacher
    seen = {"n": 0}
    url, stop = serve_app(teacher_app(tdir / "final", seen))
    stop()  # the teacher is gone before the run starts
    steps = 6
    rec = train(distill_cfg(tmp_path / "skip", url, tdir, steps))
    log = read_log(tmp_path / "skip")
    print(f"\nteacher down: skipped {rec['teacher_skipped']} micro-batches, teacher {rec['teacher']}")
    assert rec["teacher_skipped"] == steps and log[1]["teacher_skipped"] == 1
    # Found down on the first micro-batch: the later ones were not asked (the breaker), only probed.
    assert rec["teacher_outages"] == 1 and rec["kd_loss"] is None and "ConnectError" in rec["teacher_error"]
    assert MICRO["batch_size"] <= rec["teacher"]["errors"] < steps * MICRO["batch_size"]
    assert (tmp_path / "skip" / "final" / "model.safetensors").is_file()
    with pytest.raises(TeacherError, match="continue_without_teacher is false"):
        train(distill_cfg(tmp_path / "strict", url, tdir, steps, continue_without_teacher=False))


def test_teacher_stops_mid_run(narrow_teacher, tmp_path) -> None:
    """The teacher dies at step 3: already-fetched answers are used, later steps train on CE."""
    _, tdir, _ = narrow_teacher
    seen = {"n": 0}
    url, stop = serve_app(teacher_app(tdir / "final", seen))
    steps, stopped = 12, []

    def progress(rec: dict) -> None:
        if rec["step"] == 3 and not stopped:
            stop()
            stopped.append(True)

    cfg = distill_cfg(tmp_path / "mid", url, tdir, steps)
    try:
        rec = train(cfg, progress)
    finally:
        if not stopped:
            stop()
    log = read_log(tmp_path / "mid")
    skipped = [
        log[s]["teacher_skipped"] - log[s - 1]["teacher_skipped"] if s > 1 else log[1]["teacher_skipped"]
        for s in range(1, steps + 1)
    ]
    print(f"\nteacher stopped at step 3: skipped per step {skipped}")
    assert 0 < rec["teacher_skipped"] < steps and skipped[:3] == [0, 0, 0]
    first = skipped.index(1)
    assert all(skipped[first:]), skipped  # once down, every later step is CE only
    assert log[first + 1]["kd_loss"] is None and log[first]["kd_loss"] is not None


def _narrow_doc(r: random.Random) -> str:
    """An arithmetic progression in a list literal: a narrow, learnable pattern."""
    a, d = r.randint(0, 50), r.randint(1, 9)
    name = r.choice(["xs", "ys", "vals", "nums"])
    return f"{name} = [" + ", ".join(str(a + d * i) for i in range(12)) + "]\n"


def _eval_loss(final_dir: Path, texts: list[str]) -> float:
    model, tok, _ = load_model(final_dir)
    model.eval()
    total = n = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([(tok.encode(text) + [tok.eot_id])[:64]])
            logits = model(ids[:, :-1])
            total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    return total / n


@pytest.mark.slow
def test_teacher_on_narrow_pattern_speeds_up_student(tmp_path) -> None:
    """(d) A teacher trained on many progressions; two students with the same seed see only 40 of
    them for 150 steps, one with the teacher (alpha 0.5, top-32). Held-out loss on new progressions:
    the distilled student generalises the pattern sooner, the CE-only one memorises its 40 lists."""
    r = random.Random(0)
    many, few = tmp_path / "many.jsonl", tmp_path / "few.jsonl"
    many.write_text("".join(json.dumps({"content": _narrow_doc(r)}) + "\n" for _ in range(3000)))
    few.write_text("".join(json.dumps({"content": _narrow_doc(r)}) + "\n" for _ in range(40)))
    held_out = [_narrow_doc(random.Random(10_000 + i)) for i in range(64)]
    t0 = time.perf_counter()
    tdir = tmp_path / "teacher"
    train(micro_cfg(tdir, steps=300, data={"source": "local", "path": str(many)}))
    seen = {"n": 0}
    url, stop = serve_app(teacher_app(tdir / "final", seen, max_logprobs=32))  # top_k 32, below
    steps, data = 150, {"source": "local", "path": str(few)}
    try:
        train(
            micro_cfg(
                tmp_path / "base",
                steps=steps,
                data=data,
                tokenizer={"kind": "bpe", "path": str(tdir / "tokenizer.json")},
            )
        )
        train(distill_cfg(tmp_path / "kd", url, tdir, steps, data=data, top_k=32, alpha=0.5))
    finally:
        stop()
    teacher_l = _eval_loss(tdir / "final", held_out)
    base_l, kd_l = _eval_loss(tmp_path / "base" / "final", held_out), _eval_loss(tmp_path / "kd" / "final", held_out)
    print(
        f"\nheld-out loss (nats/token): teacher {teacher_l:.3f}, student CE-only {base_l:.3f}, "
        f"student distilled {kd_l:.3f} ({time.perf_counter() - t0:.1f}s)"
    )
    assert seen["n"] > 0 and kd_l < base_l - 0.25, (teacher_l, base_l, kd_l)


def test_text_keyed_teacher_still_works(narrow_teacher, tmp_path) -> None:
    """A server that ignores return_tokens_as_token_ids (older vLLM) answers with token texts:
    they are mapped through the shared tokenizer, and give the same losses as id keys."""
    url, tdir, _ = narrow_teacher
    seen_flags = []

    async def proxy(request: web.Request) -> web.Response:
        body = await request.json()
        seen_flags.append(body.pop("return_tokens_as_token_ids", None))
        async with httpx.AsyncClient() as client:
            r = await client.post(url + "/v1/completions", json=body, timeout=30)
        return web.json_response(r.json(), status=r.status_code)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes([web.post("/v1/completions", proxy), web.get("/health", health)])
    purl, stop = serve_app(app)
    steps = 5
    try:
        rec = train(distill_cfg(tmp_path / "text", purl, tdir, steps))
    finally:
        stop()
    train(distill_cfg(tmp_path / "ids", url, tdir, steps))
    a, b = read_log(tmp_path / "text"), read_log(tmp_path / "ids")
    assert seen_flags and all(f is True for f in seen_flags)
    assert rec["teacher_skipped"] == 0 and rec["teacher"]["errors"] == 0
    for s in range(1, steps + 1):
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-5), s


@pytest.mark.slow
def test_two_process_ddp_distill_matches_one_process(narrow_teacher, tmp_path) -> None:
    """Each rank prefetches its own rows' teacher answers: 2 ranks x 2 rows == 1 x 4 rows."""
    url, tdir, _ = narrow_teacher
    one = distill_cfg(tmp_path / "one", url, tdir, 4)
    two = distill_cfg(tmp_path / "two", url, tdir, 4).model_copy(update={"batch_size": 2})
    train(one)
    torchrun(2, two, tmp_path)
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for s in range(1, 5):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-4), (s, a[s], b[s])
        assert b[s]["teacher_skipped"] == 0 and b[s]["kd_loss"] is not None
