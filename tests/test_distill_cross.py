"""Cross-tokenizer distillation (distill.method=cross_tokenizer): alignment by character offsets,
vocabulary mapping, and training against a real `nanochat serve` teacher with its own tokenizer.

    .venv/bin/pytest tests/test_distill_cross.py -q -s     # -s prints the figures

The teacher's tokenizer is a byte-level BPE of 512 tokens trained without GPT-2's
pre-tokenisation regex (tokens like "def " and "):\\n    \"\"\"" span word boundaries) on other
documents; the student's is the tiny preset's BPE of 1024. About half the student's positions
share a boundary with the teacher's tokens, and about 70% of the teacher's token texts exist in
the student's vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from aiohttp import web
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.data.synthetic import generate as synthetic_docs
from nanochat_trainer.distill import topk
from nanochat_trainer.distill.align import align, row_pieces, segment_targets, student_ends, teacher_starts
from nanochat_trainer.errors import ConfigError
from nanochat_trainer.tokenizer import EOT, HFTokenizer
from nanochat_trainer.train import train
from nanochat_trainer.train.losses import topk_kl_loss

from micro import MICRO, micro_cfg, read_log
from serving import Teacher, serve_app


class FakeTok:
    """A tokenizer given by its token texts (id = position), for hand-written alignments."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)


# ---------------------------------------------------------------------- alignment on hand-written offsets
def test_align_def_f_two_ways() -> None:
    """ "def f(x):" as the student's ["def", " f", "(x", "):"] and the teacher's
    ["de", "f", " f", "(", "x", "):"] (text_offset 0, 2, 3, 5, 6, 7)."""
    student = FakeTok(["def", " f", "(x", "):"])
    text, ends = student_ends(student, [0, 1, 2, 3])
    assert text == "def f(x):" and ends == [3, 5, 7, 9]
    top = {"x": -1.0}
    entries = [("de", None, 0), ("f", top, 2), (" f", top, 3), ("(", top, 5), ("x", top, 6), ("):", top, 7)]
    starts = teacher_starts(entries, text)
    assert starts == {2: 1, 3: 2, 5: 3, 6: 4, 7: 5}
    # Student position p predicts the token starting where token p ends: "def|" -> teacher " f" (2),
    # "def f|" -> "(" (3), "def f(x|" -> "):" (5); the last position predicts past the text.
    assert align(ends, starts) == [2, 3, 5, None]
    # Coarser teacher tokens: only the shared boundaries align.
    coarse = [("def f", None, 0), ("(x):", top, 5)]
    assert align(ends, teacher_starts(coarse, text)) == [None, 1, None, None]


def test_teacher_tokens_that_do_not_spell_the_text() -> None:
    text = "é = 1"
    # Half-character tokens decode to U+FFFD and push a server's text_offset off by one each.
    entries = [("\ufffd", None, 0), ("\ufffd", {"a": -1.0}, 1), (" =", {"a": -1.0}, 2), (" 1", {"a": -1.0}, 4)]
    starts = teacher_starts(entries, text)
    assert starts == {3: 3}  # " =" is found again (its own start not trusted); " 1" at 3 tiles on from it
    student = FakeTok(["é", " =", " 1"])
    _, ends = student_ends(student, [0, 1, 2])
    assert align(ends, starts) == [None, 3, None]
    # A BOS token that is not in the text: the first real token picks the place up again.
    assert teacher_starts([("<s>", None, 0), ("def", {"a": -1.0}, 0), (" f", {"a": -1.0}, 3)], "def f") == {3: 2}
    # A token that is nowhere near: nothing after it is trusted.
    assert teacher_starts([("ab", None, 0), ("zz", {"a": -1.0}, 2), ("c", {"a": -1.0}, 4)], "abcdefghijklmnop") == {}


def test_student_ends_with_a_split_character(ckpt) -> None:

    _, tok, _ = load_model(ckpt)
    ids = tok.encode("x = 'é'\n")
    pieces = [tok.decode([i]) for i in ids]
    text, ends = student_ends(tok, ids)
    assert text == "x = 'é'\n" and ends[-1] == len(text)
    if "\ufffd" in "".join(pieces):  # é split over two byte tokens: the point between them is no boundary
        assert None in ends
    assert all(e is None or text[:e] == tok.decode(ids[: i + 1]) for i, e in enumerate(ends))


def test_vocabulary_mapping_and_loss_with_empty_slots() -> None:
    """Teacher texts without a student token are empty slots: their mass joins the rest bucket."""
    vocab = {"a": 0, "b": 1, "c": 2, "d": None}  # "d": two student ids share the text, ambiguous
    text = "ab"
    entries = [("a", None, 0), ("b", {"b": math.log(0.5), "zz": math.log(0.3), "c": math.log(0.1)}, 1)]
    ids, lps, mask = segment_targets(entries, text, [1, 2], vocab, k=3)
    assert mask.tolist() == [True, False]
    assert ids[0].tolist()[0::2] == [1, 2] and torch.isinf(lps[0, 1])
    assert lps[0, 0].item() == pytest.approx(math.log(0.5))
    # None of the top-k maps: the position is not used.
    ids2, lps2, mask2 = segment_targets([("a", None, 0), ("b", {"zz": -0.1, "d": -3.0}, 1)], text, [1, 2], vocab, 2)
    assert mask2.tolist() == [False, False]
    # KL over {b, c, rest} against the student's {b, c, everything else}.
    logits = torch.tensor([[[0.3, 1.0, -0.5, 0.2], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    loss = topk_kl_loss(logits, ids[None], lps[None], mask[None], 1.0)
    q = torch.softmax(logits[0, 0].detach(), -1).tolist()
    t, s = [0.5, 0.1, 0.4], [q[1], q[2], 1 - q[1] - q[2]]
    # float32 log-softmax against a float64 reference: a KL of 3e-3 agrees to ~1e-5 relative.
    assert loss.item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(t, s)), rel=1e-4)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 1].abs().sum() == 0
    # Every slot empty at a masked-in position: finite, rest-only.
    empty = torch.full((1, 2, 3), -float("inf"))
    l2 = topk_kl_loss(logits, ids[None], empty, torch.tensor([[True, False]]), 1.0)
    l2.backward()
    assert torch.isfinite(l2) and torch.isfinite(logits.grad).all()


def test_row_pieces() -> None:
    assert row_pieces([5, 6, 0, 7, 8, 9, 0, 4], eot=0) == [(0, 2), (3, 6)]
    assert row_pieces([0, 0, 1], eot=0) == []


# ---------------------------------------------------------------------- training against a served teacher
def _noregex_bpe(docs: list[str], vocab_size: int) -> HFTokenizer:

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return HFTokenizer(tok)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A MICRO teacher (vocab 512, its own tokenizer, context 128) trained 60 steps."""
    root = tmp_path_factory.mktemp("cross")
    tok_path = _noregex_bpe(synthetic_docs(7, 300), 512).save(root / "teacher-tokenizer")
    train(micro_cfg(root / "teacher", steps=60, tokenizer={"kind": "bpe", "path": str(tok_path)}))
    return root / "teacher"


@pytest.fixture
def teacher(teacher_dir):
    t = Teacher(teacher_dir / "final").start()
    yield t
    t.stop()


def _cross_cfg(run_dir: Path, url: str, steps: int, **distill) -> TrainerConfig:
    teacher = {"url": url + "/v1", "model": "teacher", "max_retries": 0, "timeout_s": 30, **distill.pop("teacher", {})}
    return micro_cfg(
        run_dir,
        steps=steps,
        stage="distill",
        model={**MICRO["model"], "vocab_size": 1024},
        distill={"method": "cross_tokenizer", "top_k": 8, "alpha": 0.5, "teacher": teacher, **distill},
    )


def test_cross_tokenizer_trains_and_cache_replays(teacher, tmp_path) -> None:
    steps = 20
    rec = train(_cross_cfg(tmp_path / "a", teacher.url, steps))
    log = read_log(tmp_path / "a")
    al = rec["alignment"]
    print(
        f"\ncross_tokenizer: loss {log[1]['loss']:.3f} -> {rec['loss']:.3f}, kd {log[1]['kd_loss']:.3f} -> "
        f"{rec['kd_loss']:.3f}, alignment {al}, teacher {rec['teacher']}"
    )
    assert rec["loss"] < log[1]["loss"] - 0.5 and rec["kd_loss"] < 0.6 * log[1]["kd_loss"]
    assert 0.2 < al["aligned_fraction"] < 0.9 and al["piece_errors"] == 0 and al["unaligned_skipped"] == 0
    assert rec["teacher_skipped"] == 0 and rec["teacher"]["errors"] == 0
    assert rec["teacher"]["requests"] == al["pieces"] == teacher.n  # one request per document piece, none extra

    sent = teacher.n
    cache = tmp_path / "a" / "teacher-cache"
    rec_b = train(_cross_cfg(tmp_path / "b", teacher.url, steps, teacher={"cache_dir": str(cache)}))
    log_b = read_log(tmp_path / "b")
    assert teacher.n == sent and rec_b["teacher"]["requests"] == 0 and rec_b["teacher"]["cache_hits"] == al["pieces"]
    for s in range(1, steps + 1):
        assert log_b[s]["loss"] == pytest.approx(log[s]["loss"], rel=1e-5), s


def test_cross_teacher_killed_and_restarted(teacher, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(topk, "PROBE_S", 0.05)  # micro steps are quicker than the production probe interval
    steps, seen = 16, {}

    def progress(rec: dict) -> None:
        if rec["step"] == 3:
            teacher.stop()
        elif rec["step"] > 3 and "restarted" not in seen and rec["teacher_skipped"] > 0:
            seen["restarted"] = rec["step"]
            teacher.start()

    rec = train(_cross_cfg(tmp_path / "k", teacher.url, steps), progress)
    log = read_log(tmp_path / "k")
    print(
        f"\ncross_tokenizer, teacher killed at step 3, back at step {seen.get('restarted')}: "
        f"{rec['teacher_skipped']} micro-batches on the LM loss alone"
    )
    assert "restarted" in seen and 0 < rec["teacher_skipped"] < steps
    assert log[steps]["kd_loss"] is not None  # distilling again after the restart
    assert (tmp_path / "k" / "final" / "model.safetensors").is_file()


def test_short_logprobs_are_counted_not_trained_on(tmp_path) -> None:
    """A teacher that returns fewer than k logprobs: each piece is a counted error, the
    micro-batch trains on the LM loss alone (no alignment), and the run goes on."""

    async def short(request: web.Request) -> web.Response:
        body = await request.json()
        text = body["prompt"]
        return web.json_response(
            {
                "choices": [
                    {
                        "text": text,
                        "logprobs": {
                            "tokens": list(text),
                            "text_offset": list(range(len(text))),
                            "token_logprobs": [None] + [-1.0] * (len(text) - 1),
                            "top_logprobs": [None] + [{text[i]: -1.0} for i in range(1, len(text))],
                        },
                    }
                ]
            }
        )

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes([web.post("/v1/completions", short), web.get("/health", health)])
    url, stop = serve_app(app)
    try:
        rec = train(_cross_cfg(tmp_path / "s", url, 2))
    finally:
        stop()
    al = rec["alignment"]
    assert al["piece_errors"] == al["pieces"] > 0 and al["aligned_fraction"] == 0.0
    # The teacher's failure, not the alignment's: skipped batches the TeacherAvailable signal sees.
    assert rec["teacher_skipped"] == 2 and al["unaligned_skipped"] == 0 and rec["kd_loss"] is None

    async def not_found(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "The model `teacher` does not exist."}}, status=404)

    app = web.Application()
    app.add_routes([web.post("/v1/completions", not_found), web.get("/health", health)])
    url, stop = serve_app(app)
    try:
        with pytest.raises(ConfigError, match="refuses requests.*HTTP 404: The model `teacher` does not exist"):
            train(_cross_cfg(tmp_path / "m", url, 2))
    finally:
        stop()
