"""HumanEval pass@1 while training, and the best checkpoint by it.

    evals = InTrainingEval(cfg, tokenizer, env, layout)     # problems, sandbox, the best so far
    out = evals.run(model, ep, step)                        # collective: every rank calls it
    out   # {"pass_at_1": 0.12, "humaneval": {"passed": 20, "problems": 164, "seconds": 31.0, ...}}

Every `evaluation.every` steps (and at the last): greedy completions of the first
`evaluation.problems` HumanEval problems (all 164 by default), judged by the sandbox `nanochat
eval` uses (`eval/sandbox.py`; in a pod, the pod's sandbox container), so the figure is the one an
EvalRun of the same checkpoint reports with samplesPerProblem 1 and temperature 0, up to the
completion length (`evaluation.max_new_tokens`).

What it costs the ranks: a model every rank holds whole (one process, DDP) is not gathered;
each rank completes and judges its own share of the problems (problem i on rank i % world), and
only the counts are summed. A sharded model (FSDP, expert parallelism) is gathered on rank 0
(`parallel.state.unsharded`, collective), which completes every problem on its device while the
others wait at the closing barrier.

The best pass@1 so far is kept beside `final`: `<run>/best/` (weights, config, tokenizer: what an
EvalRun with `checkpoint: best` loads) and `<run>/best.json` (step and pass@1), read back on
resume. A sandbox that fails (it cannot start a program at all) is logged and counted
(`humaneval.errors`); that evaluation then reports no pass@1 and the run goes on.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from ..checkpoint import save_weights
from ..config import TrainerConfig
from ..contract import RunLayout
from ..eval.generate import generate
from ..eval.humaneval import STOP_SEQUENCES, check_task, load_problems
from ..eval.sandbox import PASSED, Sandbox
from ..models.gpt import GPT
from ..parallel.distributed import Env, barrier, sum_over_ranks
from ..parallel.expert_parallel import ExpertParallel
from ..parallel.state import unsharded
from ..tokenizer import Tokenizer

LOG = logging.getLogger(__name__)


class InTrainingEval:
    """The problems, the sandbox and the best pass@1 of one run (on every rank)."""

    def __init__(self, cfg: TrainerConfig, tokenizer: Tokenizer, env: Env, layout: RunLayout):
        e = cfg.evaluation
        assert e is not None, "InTrainingEval needs an evaluation section"
        self.cfg, self.tokenizer, self.env, self.layout = cfg, tokenizer, env, layout
        self.problems = load_problems(e.problems)
        self.sandbox = Sandbox(timeout=e.timeout_s, workers=e.workers)
        self.errors = 0
        self.best: dict[str, Any] | None = None
        if layout.best_record.is_file():
            self.best = json.loads(layout.best_record.read_text())

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
            "humaneval": {
                "passed": passed,
                "problems": n,
                "seconds": round(time.perf_counter() - t0, 2),
                "errors": self.errors,
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

    def _score(self, model: GPT, problems: list[dict]) -> int:
        e = self.cfg.evaluation
        assert e is not None
        home = next(model.parameters()).device  # the gathered copy of a sharded model is on the CPU
        was_training = model.training
        model.to(self.env.device).eval()
        try:
            outs = generate(
                model,
                self.tokenizer,
                [p["prompt"] for p in problems],
                max_new_tokens=e.max_new_tokens,
                stop=STOP_SEQUENCES,
                batch_size=e.batch_size,
            )
        finally:
            model.to(home).train(was_training)
        results = self.sandbox.check_many([check_task(p, o[0]) for p, o in zip(problems, outs)])
        return sum(r.status == PASSED for r in results)

    def _keep_best(self, whole: GPT | None, step: int, pass_at_1: float) -> None:
        self.best = {"step": step, "pass_at_1": pass_at_1}
        if self.env.is_main:
            assert whole is not None
            save_weights(self.layout.best, whole, self.cfg, self.tokenizer)
            self.layout.best_record.write_text(json.dumps(self.best) + "\n")
