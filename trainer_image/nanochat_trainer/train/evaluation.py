"""pass@1 while training (HumanEval, or held-out synthetic problems), and the best checkpoint by it.

    evals = InTrainingEval(cfg, tokenizer, env, layout)     # problems, sandbox, the best so far
    out = evals.run(model, ep, step)                        # collective: every rank calls it
    out   # {"pass_at_1": 0.12, "evaluation": {"passed": 20, "problems": 164, "seconds": 31.0, ...}}

Every `evaluation.every` steps (and at the last): greedy completions of the first
`evaluation.problems` problems (164 by default), judged by the sandbox `nanochat eval` uses
(`eval/sandbox.py`; in a pod, the pod's sandbox container). With `benchmark: humaneval` the
figure is the one an EvalRun of the same checkpoint reports with samplesPerProblem 1 and
temperature 0, up to the completion length (`evaluation.max_new_tokens`). With `benchmark:
synthetic` the problems are documents of the synthetic generator under a seed the training data
never uses (SYNTHETIC_SEED_OFFSET), cut after the function's docstring, and their tests are the
documents' own literal asserts (`distill/sequence.py`'s `split_prompt` and `check_task`, as the
distillation filter judges a teacher), kept only where no constant answer passes them all: a
benchmark a small model trained on synthetic code can move, where HumanEval stays at 0.

What it costs the ranks: a model every rank holds whole (one process, DDP) is not gathered;
each rank completes and judges its own share of the problems (problem i on rank i % world), and
only the counts are summed. A sharded model (FSDP, expert parallelism) is gathered on rank 0
(`parallel.state.unsharded`, collective), which completes every problem on its device while the
others wait at the closing barrier.

The best pass@1 so far is kept beside `final`: `<run>/best/` (weights, config, tokenizer: what an
EvalRun with `checkpoint: best` loads) and `<run>/best.json` (step and pass@1, written atomically),
read back on resume: one that does not parse is logged and the run goes on with no best. A
sandbox that fails (it cannot start a program at all) is logged and counted (`humaneval.errors`);
that evaluation then reports no pass@1 and the run goes on.
"""

from __future__ import annotations

import ast
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import clear_leftovers, save_weights
from ..config import TrainerConfig
from ..contract import RunLayout
from ..data.synthetic import document
from ..distill import sequence
from ..eval.generate import generate
from ..eval.humaneval import STOP_SEQUENCES, check_task, load_problems
from ..eval.sandbox import PASSED, CheckTask, Sandbox
from ..files import write_atomic
from ..models.gpt import GPT
from ..parallel.distributed import Env, barrier, sum_over_ranks
from ..parallel.expert_parallel import ExpertParallel
from ..parallel.state import unsharded
from ..tokenizer import Tokenizer

LOG = logging.getLogger(__name__)
SYNTHETIC_SEED_OFFSET = 1_000_003  # held-out synthetic problems: data.seed plus this
DEFAULT_PROBLEMS = 164


@dataclass(frozen=True)
class Problem:
    """A prompt to complete, and how a completion of it is judged."""

    prompt: str
    judge: Callable[[str], CheckTask]
    stop: tuple[str, ...]


def benchmark_problems(cfg: TrainerConfig) -> list[Problem]:
    """The fixed problems of `evaluation.benchmark`, the same on every rank and every evaluation."""
    e = cfg.evaluation
    assert e is not None
    n = e.problems or DEFAULT_PROBLEMS
    if e.benchmark == "humaneval":
        return [Problem(p["prompt"], partial(check_task, p), STOP_SEQUENCES) for p in load_problems(n)]
    out: list[Problem] = []
    seed = cfg.data.seed + SYNTHETIC_SEED_OFFSET
    for i in range(100 * n):  # nearly every generated document has a function with literal asserts
        split = sequence.split_prompt(document(seed, i))
        if split is not None and _no_constant_passes(split[1]):
            prompt = sequence.Prompt(i, *split)
            out.append(Problem(prompt.text, partial(_judge_synthetic, prompt), tuple(sequence.STOP)))
        if len(out) == n:
            return out
    raise ValueError(f"the synthetic generator gave fewer than {n} problems with tests")


def _no_constant_passes(tests: str) -> bool:
    """Whether the asserts want two different answers (two `== value`s, or both `assert f()` and
    `assert not f()`): then a function returning a constant cannot pass them all."""
    if not tests:
        return False
    equal, truth = set(), set()
    for stmt in ast.parse(tests).body:
        test = stmt.test  # type: ignore[attr-defined]  (split_prompt keeps literal asserts only)
        if isinstance(test, ast.Compare):
            equal.add(ast.dump(test.comparators[0]))
        else:
            truth.add(not isinstance(test, ast.UnaryOp))
    return len(equal) > 1 or len(truth) > 1


def _judge_synthetic(prompt: sequence.Prompt, completion: str) -> CheckTask:
    return sequence.check_task(prompt, sequence.function_body(completion))


def read_best(path: Path) -> dict[str, Any] | None:
    """best.json's step and pass@1, or None when there is none yet. A file that does not parse
    (left by a kill mid-write before it was written atomically) is logged and counts as none:
    failing on it would fail every restart, and the next evaluation writes it again."""
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        best = None
    if isinstance(best, dict) and isinstance(best.get("step"), int) and isinstance(best.get("pass_at_1"), float):
        return best
    LOG.warning("%s does not hold a best step and pass@1 (empty or cut short?); going on with no best", path)
    return None


class InTrainingEval:
    """The problems, the sandbox and the best pass@1 of one run (on every rank)."""

    def __init__(self, cfg: TrainerConfig, tokenizer: Tokenizer, env: Env, layout: RunLayout):
        e = cfg.evaluation
        assert e is not None, "InTrainingEval needs an evaluation section"
        self.cfg, self.tokenizer, self.env, self.layout = cfg, tokenizer, env, layout
        self.problems = benchmark_problems(cfg)
        self.sandbox = Sandbox(timeout=e.timeout_s, workers=e.workers)
        self.errors = 0
        if env.is_main:  # best/ and best.json as writes killed on the previous try left them
            clear_leftovers(layout.best, f"{layout.best.name}.tmp-*")
            clear_leftovers(layout.best_record, f"{layout.best_record.name}.tmp-*")
        self.best = read_best(layout.best_record)

    def due(self, step: int) -> bool:
        e = self.cfg.evaluation
        assert e is not None
        return step % e.every == 0 or step == self.cfg.steps

    def run(self, model: GPT, ep: ExpertParallel | None, step: int) -> dict[str, Any]:
        """Score the model at `step`; returns what the step's record gains. Collective."""
        env, t0 = self.env, time.perf_counter()
        whole = unsharded(model, self.cfg, env, ep)  # collective; `model` itself when replicated
        replicated = whole is model
        mine = self.problems[env.rank :: env.world] if replicated else (self.problems if env.is_main else [])
        passed, failed = 0, 0
        if mine:
            assert whole is not None
            try:
                passed = self._score(whole, mine)
            except Exception:  # the sandbox or generation broke: never the run
                LOG.exception("in-training HumanEval at step %d failed; training goes on", step)
                failed = 1
        counts = sum_over_ranks({"n": torch.tensor([passed, len(mine), failed], dtype=torch.float64)}, env)["n"]
        passed, n, failed = (int(x) for x in counts.tolist())
        self.errors += failed
        out: dict[str, Any] = {
            "evaluation": {
                "passed": passed,
                "problems": n,
                "seconds": round(time.perf_counter() - t0, 2),
                "errors": self.errors,
                "benchmark": self.cfg.evaluation.benchmark,
                "isolation": self.sandbox.isolation.name,
            }
        }
        if not failed:
            out["pass_at_1"] = passed / n
            if self.best is None or out["pass_at_1"] > self.best["pass_at_1"]:
                self._keep_best(whole, step, out["pass_at_1"])
        if self.best is not None:
            out["best_pass_at_1"], out["best_step"] = self.best["pass_at_1"], self.best["step"]
        barrier(env)
        return out

    def _score(self, model: GPT, problems: list[Problem]) -> int:
        e = self.cfg.evaluation
        assert e is not None
        home = next(model.parameters()).device  # the gathered copy of a sharded model is on the CPU
        was_training = model.training
        model.to(self.env.device).eval()
        try:
            outs = generate(
                model,
                self.tokenizer,
                [p.prompt for p in problems],
                max_new_tokens=e.max_new_tokens,
                stop=problems[0].stop,
                batch_size=e.batch_size,
            )
        finally:
            model.to(home).train(was_training)
        results = self.sandbox.check_many([p.judge(o[0]) for p, o in zip(problems, outs)])
        return sum(r.status == PASSED for r in results)

    def _keep_best(self, whole: GPT | None, step: int, pass_at_1: float) -> None:
        self.best = {"step": step, "pass_at_1": pass_at_1}
        if self.env.is_main:
            assert whole is not None
            save_weights(self.layout.best, whole, self.cfg, self.tokenizer)
            write_atomic(self.layout.best_record, (json.dumps(self.best) + "\n").encode())
