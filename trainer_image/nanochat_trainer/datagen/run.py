"""stage generate: a teacher writes training data, kept only when it is good and new.

    generate(cfg)               # cfg.stage == "generate"; what `python -m nanochat_trainer.train` runs

Request i asks the teacher (`cfg.generate.teacher`, an OpenAI-compatible completions server)
for the document that `seeds.seed_at(i)` describes: an exercise (a function, its docstring and
literal asserts) or a textbook section, on a topic x concept x difficulty x style x domain.
Up to `teacher.concurrency` requests are in flight at once, continuously: a new one starts
as soon as any answer is back. Each answer is judged (`answers.parse_answer`; an exercise's
tests run in the sandbox), then, in index order so that every run decides alike, checked
against the documents kept so far (`dedup.Deduper`: exact and MinHash near-duplicates) and
against HumanEval (`data.decontam`). Rejections are counted by reason, never written.

Kept documents go to Parquet shards in <checkpoint.dir>/dataset (`data/shards.py`): a shard is
written when `shard_rows` are waiting or `commit_s` has passed, and the manifest that lists it
records, in the same atomic replace, the index every request below which is decided and the
counts. A killed run resumes there: requests from that index on are asked again (the
teacher's answers are cached on disk, so they cost nothing and come back the same), the
deduplicator is rebuilt from the listed shards, and nothing kept is lost or written twice.

Progress for the operator, on rank 0's /metrics: step = documents kept, total_steps = `rows`,
tokens_per_second = the teacher's completion tokens per second, checkpoint_step = documents
in listed shards, plus the generate_* and teacher_* gauges; log.jsonl has a record per shard.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainerConfig
from ..contract import RunLayout, TrainerGauge
from ..data.decontam import humaneval_decontaminator
from ..data.shards import Manifest, append_shard, iter_rows, read_manifest
from ..distill.teacher import AsyncTeacher, TeacherError, TeacherUnavailable
from ..errors import ConfigError
from ..eval.sandbox import Sandbox
from .answers import REJECT_REASONS, Candidate, parse_answer
from .dedup import Deduper
from .seeds import STOP, Seed, build_prompt, prefill, seed_at

log = logging.getLogger(__name__)

NOTHING_KEPT_LIMIT = 500  # requests decided without one kept before the run gives up


@dataclass
class Judged:
    """One request's outcome before the in-order checks: a candidate, or why it was rejected."""

    seed: Seed
    candidate: Candidate | None
    reason: str | None = None
    detail: str = ""


@dataclass
class Counts:
    """What the run has decided so far; saved in the manifest, so it survives a restart."""

    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Counts:
        counts = cls(accepted=state.get("accepted", 0))
        counts.rejected.update(state.get("rejected", {}))
        return counts

    def state(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "rejected": dict(self.rejected)}


class Generator:
    """One generation run. `sandbox` and `teacher` default to the configured ones."""

    def __init__(
        self,
        cfg: TrainerConfig,
        metrics: Any | None = None,
        sandbox: Sandbox | None = None,
        teacher: AsyncTeacher | None = None,
    ):
        assert cfg.generate is not None, "stage generate needs a generate block"
        self.cfg, self.g = cfg, cfg.generate
        layout = RunLayout(Path(cfg.checkpoint.dir))
        self.folder = layout.dataset
        self.teacher = teacher or AsyncTeacher.from_config(self.g.teacher, cache_dir=layout.teacher_cache)
        self.sandbox = sandbox or Sandbox(timeout=self.g.test_timeout_s, workers=self.g.workers)
        self.metrics = metrics
        self.manifest: Manifest = read_manifest(self.folder)
        state = self.manifest.state
        self.counts = Counts.from_state(state)
        self.frontier = state.get("next_index", 0)  # every request below it is decided
        self.deduper = Deduper(threshold=self.g.near_duplicate)
        for n, row in enumerate(iter_rows(self.folder)):
            self.deduper.check_and_add(str(n), row["text"])
        self.decontam = humaneval_decontaminator()
        self.teacher_up: bool | None = None
        self.last_detail = ""
        self.buffer: list[dict[str, Any]] = []
        self.last_commit = time.monotonic()
        self.started = time.monotonic()
        self._pool = ThreadPoolExecutor(self.g.workers, thread_name_prefix="datagen-sandbox")

    # ------------------------------------------------------------------ one request

    async def _judge(self, index: int) -> Judged:
        seed = seed_at(index, self.g.seed, self.g.exercise_share)
        prompt = build_prompt(seed, self.g.template)
        down_since: float | None = None
        while True:
            try:
                text, finish = await self.teacher.completion(
                    prompt,
                    self.g.max_new_tokens,
                    temperature=self.g.temperature,
                    stop=list(STOP[(self.g.template, seed.kind)]),
                    seed=self.g.seed * 1_000_003 + index,
                )
                self.teacher_up = True
                break
            except TeacherUnavailable as e:
                self.teacher_up = False
                # Down (or overloaded past all retries): the request is not decided, so it is asked
                # again rather than counted; a teacher down for too long fails the run.
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.g.wait_for_teacher_s:
                    raise TeacherUnavailable(
                        f"generate.teacher at {self.teacher.url} did not answer for "
                        f"{self.g.wait_for_teacher_s:.0f} s (generate.wait_for_teacher_s): {e}"
                    ) from e
                await asyncio.sleep(5.0)
            except TeacherError as e:
                return Judged(seed, None, "teacher_error", str(e)[:200])
        judged = parse_answer(seed, prefill(seed, self.g.template) + text, finish)
        if not isinstance(judged, Candidate):
            return Judged(seed, None, judged.reason, judged.detail)
        if judged.check is not None:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, self.sandbox.check, judged.check)
            if not result.passed:
                return Judged(seed, None, "tests_failed", f"{result.status}: {result.error or ''}"[:200])
        return Judged(seed, judged)

    # ------------------------------------------------------------------ in index order

    def _decide(self, index: int, judged: Judged) -> None:
        """The checks against what was kept before it, in index order: the same on every run."""
        reason = judged.reason
        if judged.detail:
            self.last_detail = judged.detail
        if reason is None:
            text = judged.candidate.text
            if self.decontam.match(text) is not None:
                reason = "contaminated"
            else:  # last: the deduplicator holds exactly the kept documents, as a resumed run rebuilds it
                reason = self.deduper.check_and_add(str(index), text)
        if reason is not None:
            self.counts.rejected[reason] += 1
            return
        s = judged.seed
        self.buffer.append(
            {
                "text": judged.candidate.text,
                "kind": s.kind,
                "topic": s.topic,
                "concept": s.concept,
                "difficulty": s.difficulty,
                "style": s.style,
                "domain": s.domain,
                "index": index,
                "teacher": self.g.teacher.model,
            }
        )
        self.counts.accepted += 1

    def _commit(self) -> None:
        if self.buffer:
            state = {"next_index": self.frontier, **self.counts.state()}
            append_shard(self.folder, self.manifest, self.buffer, state)
            self._record()
        self.buffer, self.last_commit = [], time.monotonic()

    def _check_keeping(self) -> None:
        """A teacher whose answers are all rejected would be asked forever: stop and say why."""
        if self.counts.accepted == 0 and self.frontier >= NOTHING_KEPT_LIMIT:
            top = sorted(self.counts.rejected.items(), key=lambda kv: -kv[1])[:3]
            reasons = ", ".join(f"{k} {v}" for k, v in top if v)
            raise ConfigError(
                "generate.template",
                self.g.template,
                f"none of the first {self.frontier} answers of {self.g.teacher.model} was kept ({reasons}; "
                f"last: {self.last_detail!r}): check the template, the model and max_new_tokens",
            )

    @property
    def done(self) -> bool:
        return self.counts.accepted >= self.g.rows

    # ------------------------------------------------------------------ the loop

    async def _main(self) -> None:
        results: dict[int, Judged] = {}
        tasks: dict[asyncio.Task, int] = {}
        launch = self.frontier
        try:
            while not self.done:
                while len(tasks) < self.g.teacher.concurrency:
                    tasks[asyncio.create_task(self._judge(launch))] = launch
                    launch += 1
                finished, _ = await asyncio.wait(tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    results[tasks.pop(task)] = task.result()  # a teacher down for too long raises here
                while self.frontier in results and not self.done:
                    self._decide(self.frontier, results.pop(self.frontier))
                    self.frontier += 1
                    if len(self.buffer) >= self.g.shard_rows:
                        self._commit()
                self._check_keeping()
                if time.monotonic() - self.last_commit >= self.g.commit_s:
                    self._commit()
                self._gauges()
            self._commit()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.teacher.aclose()

    def run(self) -> Manifest:
        if self.done:
            log.info("generate: %d documents already kept in %s", self.counts.accepted, self.folder)
        else:
            try:
                asyncio.run(self._main())
            finally:
                self._pool.shutdown(wait=False, cancel_futures=True)
        self._gauges()
        return self.manifest

    # ------------------------------------------------------------------ progress

    def figures(self) -> dict[str, Any]:
        rate = self.teacher.rate()
        return {
            "step": self.counts.accepted,
            "accepted": self.counts.accepted,
            "rejected": {k: v for k, v in self.counts.rejected.items() if v},
            "decided": self.frontier,
            "in_flight": self.teacher.in_flight,
            "requests_per_s": round(rate["requests_per_s"], 2),
            "tokens_per_second": round(rate["completion_tokens_per_s"], 1),
            "teacher": self.teacher.record(),
        }

    def _gauges(self) -> None:
        if self.metrics is None:
            return
        f = self.figures()
        self.metrics.set(
            **{
                TrainerGauge.STEP: f["accepted"],
                TrainerGauge.TOTAL_STEPS: self.cfg.total_steps,
                TrainerGauge.TOKENS_PER_SECOND: f["tokens_per_second"],
                TrainerGauge.CHECKPOINT_STEP: self.manifest.rows,
                TrainerGauge.GENERATE_REJECTED: sum(self.counts.rejected.values()),
                TrainerGauge.TEACHER_IN_FLIGHT: f["in_flight"],
                TrainerGauge.TEACHER_REQUESTS_PER_SECOND: f["requests_per_s"],
                TrainerGauge.TEACHER_REQUESTS: self.teacher.requests,
                TrainerGauge.TEACHER_ERRORS: self.teacher.errors,
                TrainerGauge.TEACHER_UP: None if self.teacher_up is None else float(self.teacher_up),
            }
        )
        self.metrics.set_rejected(self.counts.rejected)

    def _record(self) -> None:
        if self.metrics is not None:
            self.metrics.log({**self.figures(), "shards": len(self.manifest.shards), "rows": self.manifest.rows})


def generate(cfg: TrainerConfig, metrics: Any | None = None) -> Manifest:
    """Run (or resume) the generation stage `cfg` describes; the manifest when it has its rows."""
    return Generator(cfg, metrics).run()
