"""HumanEval scoring: all 164 canonical solutions pass, wrong ones fail, the result contract.

.venv/bin/pytest tests/test_humaneval.py -q
"""

from __future__ import annotations

import io
import json

import pytest

from nanochat_cli.eval import parse_compare
from nanochat_trainer.contract import EvalResult, parse_result
from nanochat_trainer.eval.humaneval import evaluate_completions, load_problems, publish_result, summary_table


def test_canonical_solutions_all_pass() -> None:
    problems = load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    report = evaluate_completions(
        problems, {p["task_id"]: [p["canonical_solution"]] for p in problems}, ks=[1], workers=2, timeout=15.0
    )
    failed = [r["task_id"] for r in report["per_problem"] if r["correct"] != 1]
    assert failed == []
    assert report["pass_at_k"] == {"1": 1.0} and report["problems"] == 164 and report["samples"] == 1


def test_wrong_and_hostile_solutions_fail(tmp_path) -> None:
    problems = load_problems(3)
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("x")
    completions = {
        problems[0]["task_id"]: [problems[0]["canonical_solution"], "    return True\n"],
        problems[1]["task_id"]: ["    while True:\n        pass\n", problems[1]["canonical_solution"]],
        problems[2]["task_id"]: [f"    import os\n    os.remove({str(sentinel)!r})\n", "    return 1 / 0\n"],
    }
    report = evaluate_completions(problems, completions, ks=[1, 2], workers=2, timeout=3.0)
    rows = {r["task_id"]: r for r in report["per_problem"]}
    r0, r1, r2 = (rows[p["task_id"]] for p in problems)
    assert [s["status"] for s in r0["samples"]] == ["passed", "failed"]
    assert r0["samples"][1]["error"] == "AssertionError"
    assert [s["status"] for s in r1["samples"]] == ["timed out", "passed"] and r1["timed_out"] == 1
    assert [s["error"] for s in r2["samples"]] == ["TypeError", "ZeroDivisionError"]
    assert sentinel.read_text() == "x"
    # per problem (n=2): c = 1, 1, 0 -> pass@1 = (0.5 + 0.5 + 0) / 3, pass@2 = (1 + 1 + 0) / 3
    assert report["pass_at_k"]["1"] == pytest.approx(1 / 3) and report["pass_at_k"]["2"] == pytest.approx(2 / 3)
    buf = io.StringIO()
    summary_table(report, file=buf)
    assert "pass@1" in buf.getvalue() and "timed out: Timeout" in buf.getvalue()


def test_missing_completions_is_an_error() -> None:
    with pytest.raises(ValueError, match="HumanEval/0"):
        evaluate_completions(load_problems(1), {}, ks=[1])


def test_publish_result(tmp_path, monkeypatch) -> None:
    report = {
        "pass_at_k": {"1": 0.25, "10": 0.5},
        "problems": 4,
        "samples": 10,
        "per_problem": [],
        "sandbox": {"isolation": {"level": "namespaces"}},
    }
    log = tmp_path / "termination-log"
    monkeypatch.setenv("NANOCHAT_TERMINATION_LOG", str(log))
    out = io.StringIO()
    publish_result(report, out=out)
    expected = {"pass_at_k": {"1": 0.25, "10": 0.5}, "problems": 4, "samples": 10, "isolation": "namespaces"}
    assert json.loads(log.read_text()) == expected
    assert parse_result(log.read_text()) == EvalResult(
        {"pass@1": 0.25, "pass@10": 0.5}, problems=4, samples=10, isolation="namespaces"
    )
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("NANOCHAT_RESULT ") and json.loads(last.split(" ", 1)[1]) == expected
    monkeypatch.setenv("NANOCHAT_TERMINATION_LOG", str(tmp_path / "no" / "such" / "dir" / "log"))
    publish_result(report, out=io.StringIO())  # not writable: skipped silently, still prints


def test_compare_sources_are_parsed_with_clear_errors(tmp_path):

    (tmp_path / "ckpt").mkdir()
    assert parse_compare(f"parent={tmp_path / 'ckpt'}").checkpoint == str(tmp_path / "ckpt")
    teacher = parse_compare("teacher=http://t:8000/v1#Qwen/Qwen3-8B")
    assert (teacher.endpoint, teacher.model, teacher.api_key_env) == (
        "http://t:8000/v1",
        "Qwen/Qwen3-8B",
        "NANOCHAT_COMPARE_API_KEY_TEACHER",
    )
    for bad, needle in [
        ("parent", "NAME=PATH"),
        ("t=http://t:8000/v1", "URL#MODEL"),
        (f"p={tmp_path / 'missing'}", "does not exist"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_compare(bad)
