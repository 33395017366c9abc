"""HumanEval during training: pass@1 in the log and the gauges, the best checkpoint beside final,
and a sandbox failure that never stops the run.

    .venv/bin/pytest tests/test_in_training_eval.py -q

A micro model scores 0, so where a test needs passing completions it swaps the model's
completions for canned ones (the problems' canonical solutions): everything after generation,
the sandbox, the counting and the best checkpoint, is the real path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.data.synthetic import document
from nanochat_trainer.eval.humaneval import load_problems
from nanochat_trainer.eval.sandbox import Sandbox
from nanochat_trainer.files import write_atomic
from nanochat_trainer.train import evaluation, train

from micro import micro_cfg, read_log, torchrun

PROBLEMS = 4


def _cfg(run: Path, steps: int, every: int = 3):
    return micro_cfg(
        run, steps=steps, validation=None, evaluation={"every": every, "problems": PROBLEMS, "max_new_tokens": 16}
    )


def _canned(solved: set[int], monkeypatch) -> None:
    """The model's completions replaced: problem i gets its canonical solution if i is in `solved`."""
    problems = load_problems(PROBLEMS)
    right = {p["prompt"]: p["canonical_solution"] for i, p in enumerate(problems) if i in solved}

    def canned(model, tokenizer, prompts, **_):
        return [[right.get(p, "    return None\n")] for p in prompts]

    monkeypatch.setattr(evaluation, "generate", canned)


def test_a_real_model_is_scored_during_training(tmp_path: Path) -> None:
    train(_cfg(tmp_path / "run", steps=6))
    log = read_log(tmp_path / "run")
    scored = {step: r for step, r in log.items() if "evaluation" in r}
    assert sorted(scored) == [3, 6]
    for r in scored.values():
        assert r["evaluation"]["problems"] == PROBLEMS and r["evaluation"]["errors"] == 0
        assert r["pass_at_1"] == r["evaluation"]["passed"] / PROBLEMS
        assert r["evaluation"]["isolation"] in ("namespaces", "container/namespaces")
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["step"] == 3  # the first score is the best until a better one
    assert load_model(tmp_path / "run" / "best")[0].cfg.dim == 64


def test_the_best_checkpoint_follows_pass_at_1(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    _canned({0, 2}, monkeypatch)
    train(_cfg(run, steps=3))
    assert read_log(run)[3]["pass_at_1"] == 0.5
    first = (run / "best" / "model.safetensors").read_bytes()
    _canned({0, 1, 2}, monkeypatch)  # better at step 6: best moves there, with step 6's weights
    train(_cfg(run, steps=6))
    assert json.loads((run / "best.json").read_text()) == {"step": 6, "pass_at_1": 0.75}
    assert (run / "best" / "model.safetensors").read_bytes() == (run / "final" / "model.safetensors").read_bytes()
    assert (run / "best" / "model.safetensors").read_bytes() != first
    _canned({1}, monkeypatch)  # worse after a resume: the best stays, and the log says so
    train(_cfg(run, steps=9))
    log = read_log(run)
    assert log[9]["pass_at_1"] == 0.25 and (log[9]["best_pass_at_1"], log[9]["best_step"]) == (0.75, 6)
    assert json.loads((run / "best.json").read_text())["step"] == 6


def test_a_best_publish_killed_between_its_renames_is_undone_on_restart(tmp_path: Path, monkeypatch) -> None:
    """publish_dir moves the old best/ aside, then the new one in: a kill between the two leaves no
    best/. The restart puts the old one back (the one best.json still names) and removes the
    temporaries, even before a better score publishes again."""
    run = tmp_path / "run"
    _canned({0, 2}, monkeypatch)
    train(_cfg(run, steps=3))
    weights = (run / "best" / "model.safetensors").read_bytes()
    (run / "best").rename(run / "best.old-1a2b3c4d")
    (run / "best.tmp-4242").mkdir()  # the new one, complete or not: never read
    (run / "best.json.tmp-99aa").write_text('{"step": 6')  # and a best.json write cut short
    _canned({1}, monkeypatch)  # worse: nothing publishes best/ in this leg
    train(_cfg(run, steps=6))
    assert (run / "best" / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("best")) == ["best", "best.json"]


@pytest.mark.parametrize("left", ["", '{"step": 3, "pass_'])
def test_a_best_json_cut_short_is_no_best_and_the_run_resumes(tmp_path: Path, monkeypatch, caplog, left: str) -> None:
    """What a kill mid-write left (an empty or truncated best.json) is logged and counts as no
    best: the restart trains on, and its next score is the best."""
    run = tmp_path / "run"
    _canned({0, 1, 2}, monkeypatch)
    train(_cfg(run, steps=3))
    (run / "best.json").write_text(left)
    _canned({1}, monkeypatch)  # worse than step 3's, but the only best there is
    train(_cfg(run, steps=6))
    assert read_log(run)[6]["pass_at_1"] == 0.25
    assert json.loads((run / "best.json").read_text()) == {"step": 6, "pass_at_1": 0.25}
    assert f"{run / 'best.json'} does not hold a best step" in caplog.text
    assert [p.name for p in run.iterdir() if ".tmp-" in p.name] == []


def test_best_json_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    """A write that dies before the rename (here: at the fsync) leaves the previous best.json."""
    path = tmp_path / "best.json"
    write_atomic(path, b'{"step": 3, "pass_at_1": 0.5}\n')

    def dies(fd: int) -> None:
        raise OSError("killed")

    monkeypatch.setattr(os, "fsync", dies)
    with pytest.raises(OSError, match="killed"):
        write_atomic(path, b'{"step": 6, "pass_at_1": 0.75}\n')
    assert evaluation.read_best(path) == {"step": 3, "pass_at_1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]


def test_a_broken_sandbox_is_counted_and_the_run_goes_on(tmp_path: Path, monkeypatch) -> None:
    def broken(self, tasks):
        raise OSError("bwrap: cannot start")

    monkeypatch.setattr(evaluation.Sandbox, "check_many", broken)
    train(_cfg(tmp_path / "run", steps=6))
    log = read_log(tmp_path / "run")
    assert [log[s]["evaluation"]["errors"] for s in (3, 6)] == [1, 2]
    assert "pass_at_1" not in log[3] and not (tmp_path / "run" / "best").exists()
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.parametrize("field", ["problems", "every"])
def test_bad_evaluation_settings_name_their_field(tmp_path: Path, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        micro_cfg(tmp_path, evaluation={field: 0 if field == "every" else 200})


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ranks_share_the_problems_or_rank_0_scores_the_gathered_model(tmp_path: Path, parallel: str) -> None:
    """DDP: each rank judges its share and the counts are summed; FSDP: rank 0 gathers the whole
    model and judges them all. Either way the log counts every problem once, and the best
    checkpoint is the whole model."""
    cfg = _cfg(tmp_path / "run", steps=3).model_copy(update={"parallel": parallel})
    torchrun(2, cfg, tmp_path)
    r = read_log(tmp_path / "run")[3]
    assert r["evaluation"]["problems"] == PROBLEMS and r["evaluation"]["errors"] == 0, r
    assert load_model(tmp_path / "run" / "best")[0].cfg.dim == 64


def test_synthetic_problems_are_held_out_and_judged_by_their_own_asserts(tmp_path: Path) -> None:
    cfg = micro_cfg(tmp_path, evaluation={"benchmark": "synthetic", "problems": 6})
    problems = evaluation.benchmark_problems(cfg)
    seed = cfg.data.seed + evaluation.SYNTHETIC_SEED_OFFSET
    docs = [document(seed, i) for i in range(40)]
    # Each problem is a held-out document cut after its docstring; its own body passes, a wrong one fails.
    right = [next(d[len(p.prompt) :] for d in docs if d.startswith(p.prompt)) for p in problems]
    box = Sandbox(timeout=5.0, workers=2)
    assert all(r.passed for r in box.check_many([p.judge(c) for p, c in zip(problems, right)]))
    for constant in ("None", "True", "0", "1", "''"):  # no constant answer passes any of them
        wrong = [p.judge(f"\n    return {constant}\n") for p in problems]
        assert not any(r.passed for r in box.check_many(wrong)), constant
    training = {document(cfg.data.seed, i) for i in range(2000)}
    assert not training & set(docs)  # none of them is a training document
