"""Sequence-level distillation (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"): the
student trains with the ordinary LM loss on prompts completed by the teacher.

    feed = SequenceFeed(teacher, cfg, loader, tokenizer, rank, world)   # a data.feed.BatchSource
    feed.start(micro_batches=1000, saved=None)   # saved: every rank's state_dict() from a checkpoint
    batch = feed.next()             # a micro-batch: distill.sequence_mix of its rows from teacher text
    feed.state_dict()               # this rank's prompt-stream position, for checkpoints
    feed.record(); feed.close()

Prompts (`split_prompt`): documents of `trainer.data` (the synthetic generator, or a dataset)
cut right after the first top-level function's docstring, or after its header when it has
none; the top-level asserts after it that call it are the prompt's tests. The synthetic
generator's documents are exactly that shape: def, docstring, body, asserts.

Completions: the teacher's `/v1/completions` (max_tokens = distill.max_new_tokens, temperature
= distill.sample_temperature with a per-prompt seed, stop at the next top-level statement),
cut at the first non-indented line (`function_body`): the end of the function. A completion
vLLM cut at max_tokens (finish_reason "length") is rejected as truncated unless such a line shows
that the function had ended before the cut (`function_ended`).

Quality filter (`filter_completions`): prompt + completion must parse (`ast.parse`), and when the
prompt has tests and distill.filter_tests is on, prompt + completion + tests must pass in the
process sandbox (eval/sandbox.py, distill.test_timeout_s). Accepted texts are tokenized, each
followed by eot, and packed into rows like the plain loader packs documents.

A background thread (its own asyncio loop) asks the teacher for a window of prompts at a time,
filters the answers and queues the accepted texts in prompt order, staying about four
micro-batches of tokens ahead, so training rarely waits on HTTP and the rows are the same on a
rerun (answers come from the teacher's disk cache; the look-ahead is counted in tokens, not
time, so a rerun asks for exactly the same prompts: zero requests). A micro-batch waits for
teacher rows up to distill.row_wait_s, then (with continue_without_teacher) takes plain rows
for the missing ones, counted as teacher_skipped: a teacher slower than training, or one whose
answers the filter mostly rejects, slows steps by at most that much. When the teacher is down
(`TeacherUnavailable` after the client's retries) the thread retries the same window with
backoff; meanwhile the trainer takes the missing rows from plain data when
distill.continue_without_teacher (counted as teacher_skipped), else waits up to
distill.wait_for_teacher_s and then fails with a clear error. 401/403/404 (bad key, unknown
model) stop the run: no later request would succeed.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..config import DistillConfig, TrainerConfig
from ..data.feed import Batch
from ..data.loader import TokenLoader
from ..data.sources import iter_indexed
from ..eval.sandbox import CheckTask, Sandbox
from .teacher import FATAL_STATUS, AsyncTeacher, TeacherError, TeacherUnavailable

# Where a function body is over: the next top-level statement. Sent as stop strings (to save
# teacher tokens) and enforced again by `function_body`, for servers that ignore `stop`.
STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nassert ", "\nprint(", "\n@"]
NO_PROMPT_LIMIT = 1000  # documents in a row without a usable function: the data cannot feed this method
STARVED_AFTER = 256  # answered prompts in a row that were all rejected: treated like a teacher outage


@dataclass(frozen=True)
class Prompt:
    index: int  # global document index in the data source
    text: str  # what the teacher completes
    tests: str  # literal asserts on the function, `assert f(1, [2]) == 3` ("" when none)


def split_prompt(doc: str) -> tuple[str, str] | None:
    """(prompt, tests) from a Python document, or None when it has no usable function.

    The prompt is the document up to the end of the first top-level function's docstring (or
    the colon of its header without one), so the teacher writes the body. It stops before the
    newline: a BPE merges the newline with the next line's indentation, and a prompt ending in
    a bare newline would end on a token the model has rarely seen there. Tests are the
    top-level asserts after the function of the form `assert f(<literals>) == <literal>`: the
    trusted checker runs them (sandbox.py), so nothing else of the document is executed there."""
    try:
        tree = ast.parse(doc)
    except (SyntaxError, ValueError):
        return None
    lines = doc.splitlines(keepends=True)
    for i, node in enumerate(tree.body):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if ast.get_docstring(node, clean=False) is not None:
            if len(body) < 2:
                continue  # nothing after the docstring to complete
            end_line, first = body[0].end_lineno, body[1]
        else:
            end_line, first = body[0].lineno - 1, body[0]
        if end_line is None or first.lineno <= end_line or end_line < node.lineno:
            continue  # a one-line def, or code on the docstring's last line
        last = lines[end_line - 1].rstrip("\r\n")
        if first is not body[0] and body[0].end_col_offset is not None:
            last = last.encode()[: body[0].end_col_offset].decode()  # up to the docstring's end (UTF-8 bytes)
        prompt = "".join(lines[: end_line - 1]) + last
        tests = [ast.get_source_segment(doc, s) or "" for s in tree.body[i + 1 :] if literal_assert(s, node.name)]
        return prompt, "\n".join(t for t in tests if t)
    return None


def literal_assert(stmt: ast.stmt, name: str) -> bool:
    """`assert name(<literals>) == <literal>`, `assert name(<literals>)` or `assert not name(...)`:
    a test that is plain data apart from the call."""
    if not isinstance(stmt, ast.Assert) or stmt.msg is not None:
        return False
    test, expected = stmt.test, []
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        test = test.operand
    if isinstance(test, ast.Compare):
        if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
            return False
        test, expected = test.left, test.comparators
    if not (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == name):
        return False
    if any(k.arg is None for k in test.keywords) or any(isinstance(a, ast.Starred) for a in test.args):
        return False
    try:
        for node in [*test.args, *(k.value for k in test.keywords), *expected]:
            ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _function_lines(completion: str) -> tuple[list[str], bool]:
    """The completion's lines up to the end of the function (the rest of the prompt's last line,
    then lines until the first non-empty one that is not indented), and whether that line came."""
    out = []
    for n, line in enumerate(completion.splitlines(keepends=True)):
        if n and line.strip() and not line[0].isspace():
            return out, True
        out.append(line)
    return out, False


def function_body(completion: str) -> str:
    """The completion up to the end of the function; trailing blank lines dropped and one
    newline added. "" when no code came back."""
    text = "".join(_function_lines(completion)[0]).rstrip()
    return text + "\n" if text.strip() else ""


def function_ended(completion: str) -> bool:
    """Whether a top-level line follows the function: a completion cut at max_tokens without one
    may have lost the function's end, and can still parse (a loop missing its `return`)."""
    return _function_lines(completion)[1]


def check_completion(prompt: str, body: str) -> str | None:
    """Why prompt + body is rejected before tests ("empty", "syntax"), or None."""
    if not body.strip():
        return "empty"
    try:
        ast.parse(prompt + body)
    except (SyntaxError, ValueError):
        return "syntax"
    return None


def check_task(prompt: Prompt, body: str) -> CheckTask:
    """How a completion is judged: prompt + body run isolated, the prompt's literal asserts run in
    the trusted checker, calling the function across the boundary."""
    called = sorted(
        {
            n.func.id
            for n in ast.walk(ast.parse(prompt.tests))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
    )
    return CheckTask(program=f"{prompt.text}{body}\n", test=prompt.tests, proxied=tuple(called))


def filter_completions(items: list[tuple[Prompt, str]], sandbox: Sandbox | None = None) -> list[str | None]:
    """For each (prompt, body): None if accepted, else the reason ("empty", "syntax", "tests").
    Tests run only when a sandbox is given and the prompt has tests."""
    reasons = [check_completion(p.text, body) for p, body in items]
    todo = [j for j, (p, _) in enumerate(items) if reasons[j] is None and p.tests and sandbox is not None]
    if todo and sandbox is not None:
        results = sandbox.check_many([check_task(*items[j]) for j in todo])
        for j, res in zip(todo, results):
            if not res.passed:
                reasons[j] = "tests"
    return reasons


def iter_prompts(data, rank: int, world: int, start: int = 0) -> Iterator[Prompt]:
    """Endless prompts of this rank's documents i >= start (see data.sources.iter_indexed)."""
    misses = 0
    for index, doc in iter_indexed(data, rank, world, start):
        split = split_prompt(doc)
        if split is None:
            misses += 1
            if misses >= NO_PROMPT_LIMIT:
                raise ValueError(
                    f"distill.method=sequence: {misses} documents in a row of data.source="
                    f"{data.source!r} have no top-level function to complete"
                )
            continue
        misses = 0
        yield Prompt(index, *split)


class SequenceProducer:
    """Background thread: prompts -> teacher completions -> filter -> queue of (index, tokens).

    It asks for the next window of prompts only while fewer than `ahead_tokens` accepted tokens
    wait in the queue, and `finish()` makes it top the queue up to that mark and stop. Where it
    stops then depends only on what was trained on, not on timing, so a rerun from the cache
    asks for exactly the prompts the first run asked for: zero requests."""

    def __init__(
        self,
        teacher: AsyncTeacher,
        prompts: Iterator[Prompt],
        dcfg: DistillConfig,
        tokenizer,
        sandbox: Sandbox | None = None,
        window: int = 16,
        ahead_tokens: int = 8192,
    ):
        self.teacher, self.prompts, self.dcfg, self.sandbox = teacher, prompts, dcfg, sandbox
        self.tok, self.window, self.ahead_tokens = tokenizer, window, ahead_tokens
        self.queue: queue.Queue = queue.Queue()
        self.counts: Counter = Counter()
        self.down_since: float | None = None  # monotonic time the current outage began
        self.last_error: str | None = None
        self.fatal: BaseException | None = None
        self.reject_streak = 0
        self.finishing = False
        self._ahead, self._lock = 0, threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._main())
        self._thread = threading.Thread(target=self._run, name="teacher-sequences", daemon=True)
        self._thread.start()

    @property
    def starved(self) -> bool:
        return self.reject_streak >= STARVED_AFTER

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def take(self, timeout: float) -> tuple[int, list[int]]:
        """The next accepted (document index, tokens + eot); raises queue.Empty after `timeout`."""
        index, tokens = self.queue.get(timeout=timeout)
        with self._lock:
            self._ahead -= len(tokens)
        return index, tokens

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # handed to the trainer, which raises it
            self.fatal = exc
        finally:
            try:
                self._loop.run_until_complete(self.teacher.aclose())
            finally:
                self._loop.close()

    async def _main(self) -> None:
        while True:
            while self._ahead >= self.ahead_tokens or (self.finishing and self.starved):
                if self.finishing:
                    return  # topped up (or the teacher's answers are all rejected: no end to topping up)
                await asyncio.sleep(0.02)
            window = list(itertools.islice(self.prompts, self.window))
            answers = await self._ask(window)
            if answers is None:
                return  # finishing while the teacher is down: nothing more to wait for
            bodies: list[tuple[Prompt, str]] = []
            for p, a in zip(window, answers):
                if isinstance(a, TeacherError):
                    self.counts["teacher_errors"] += 1  # e.g. a 400 for a prompt too long: skip it
                    self.last_error = str(a)[:300]
                    self.reject_streak += 1
                elif a[1] == "length" and not function_ended(a[0]):
                    self.counts["rejected_truncated"] += 1
                    self.reject_streak += 1
                else:
                    bodies.append((p, function_body(a[0])))
            sandbox = self.sandbox if self.dcfg.filter_tests else None
            reasons = await self._loop.run_in_executor(None, filter_completions, bodies, sandbox)
            for (p, body), why in zip(bodies, reasons):
                if why is not None:
                    self.counts[f"rejected_{why}"] += 1
                    self.reject_streak += 1
                    continue
                self.counts["accepted"] += 1
                self.reject_streak = 0
                tokens = self.tok.encode(p.text + body) + [self.tok.eot_id]
                with self._lock:
                    self._ahead += len(tokens)
                self.queue.put((p.index, tokens))

    async def _ask(self, window: list[Prompt]) -> list[Any] | None:
        """Answers (text, finish) or TeacherError per prompt; while the teacher is down, the same
        window again after a backoff (answers that did come back are in the cache by then)."""
        d = self.dcfg
        delay = max(0.05, self.teacher.backoff)
        while True:
            answers = await asyncio.gather(
                *(
                    self.teacher.completion(p.text, d.max_new_tokens, d.sample_temperature, stop=STOP, seed=p.index)
                    for p in window
                ),
                return_exceptions=True,
            )
            for a in answers:
                if isinstance(a, BaseException) and not isinstance(a, TeacherError):
                    raise a
                if isinstance(a, TeacherError) and a.status in FATAL_STATUS:
                    raise TeacherError(
                        f"the teacher refuses requests (HTTP {a.status}): check "
                        f"distill.teacher.url, .model and the API key: {a}",
                        status=a.status,
                    )
            down = [a for a in answers if isinstance(a, TeacherUnavailable)]
            if not down:
                self.down_since = None
                return answers
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.counts["outages"] += 1
            self.last_error = str(down[0])[:300]
            if self.finishing:
                return None
            await asyncio.sleep(delay)
            delay = min(self.teacher.max_backoff, delay * 2)

    def finish(self) -> None:
        """No more texts will be taken: top the queue up to the mark, then stop."""
        self.finishing = True

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the thread; after finish(), first give it up to wait_s to get there by itself."""
        if self.finishing and self.down_since is None:
            self._thread.join(wait_s)
        try:
            self._loop.call_soon_threadsafe(self._task.cancel)
        except RuntimeError:
            pass  # the loop is already closed: the thread has ended
        self._thread.join(30)


class _Packer:
    """Accepted texts -> rows of seq_len + 1 tokens, with a resumable position: the document the
    unread tokens start in and how many of its tokens were already used."""

    def __init__(self, seq_len: int, next_index: int = 0, skip: int = 0):
        self.need = seq_len + 1
        self.buf: list[int] = []
        self.docs: deque = deque()  # [index, tokens of it still in buf, tokens of it already used]
        self.next_index, self.resume = next_index, (next_index, skip)

    def add(self, index: int, tokens: list[int]) -> None:
        used = 0
        if self.resume is not None:
            if index == self.resume[0]:
                used = min(self.resume[1], len(tokens))
            self.resume = None
        self.buf.extend(tokens[used:])
        self.docs.append([index, len(tokens) - used, used])
        self.next_index = index + 1

    def ready(self) -> bool:
        return len(self.buf) >= self.need

    def take(self) -> list[int]:
        row, left = self.buf[: self.need], self.need
        del self.buf[: self.need]
        while left:
            doc = self.docs[0]
            n = min(left, doc[1])
            doc[1] -= n
            doc[2] += n
            left -= n
            if doc[1] == 0:
                self.docs.popleft()
        return row

    def state_dict(self) -> dict[str, int]:
        if self.docs:
            return {"next": self.docs[0][0], "skip": self.docs[0][2]}
        return {"next": self.next_index, "skip": 0}


class SequenceFeed:
    """Micro-batches for distill.method=sequence: round(sequence_mix * batch_size) rows of packed
    teacher sequences first, the rest (and any teacher rows missing while the teacher is down,
    with continue_without_teacher) from the plain loader."""

    has_teacher_targets = False  # teacher text trains with the LM loss

    def __init__(
        self,
        teacher: AsyncTeacher,
        cfg: TrainerConfig,
        loader: TokenLoader,
        tokenizer,
        rank: int = 0,
        world: int = 1,
        sandbox: Sandbox | None = None,
    ):
        assert cfg.distill is not None
        self.teacher, self.cfg, self.dcfg = teacher, cfg, cfg.distill
        self.loader, self.tokenizer, self.rank, self.world = loader, tokenizer, rank, world
        if sandbox is None and self.dcfg.filter_tests:
            sandbox = Sandbox(timeout=self.dcfg.test_timeout_s, workers=2)
        self.sandbox = sandbox
        self.n_teacher = round(self.dcfg.sequence_mix * cfg.batch_size)
        self.limit: int | None = None
        self.served = 0
        self.packer: _Packer | None = None
        self.producer: SequenceProducer | None = None
        self.teacher_rows = self.plain_rows = self.skipped_rows = 0
        self.wait_s = 0.0

    # ------------------------------------------------------------------ BatchSource

    def start(self, micro_batches: int, saved: list[dict[str, Any]] | None) -> None:
        """After the last of `micro_batches` the producer tops up its look-ahead and stops (see
        SequenceProducer)."""
        state = self.rank_state(saved, self.rank, self.world) or {"next": 0, "skip": 0}
        self.limit = micro_batches
        self.packer = _Packer(self.cfg.resolved_seq_len, state["next"], state["skip"])
        # Look ahead about 4 micro-batches of teacher rows, so training rarely waits on HTTP.
        ahead = 4 * max(1, self.n_teacher) * (self.cfg.resolved_seq_len + 1)
        prompts = iter_prompts(self.cfg.data, self.rank, self.world, state["next"])
        self.producer = SequenceProducer(
            self.teacher,
            prompts,
            self.dcfg,
            self.tokenizer,
            self.sandbox,
            window=max(4, 2 * self.teacher.concurrency),
            ahead_tokens=ahead,
        )
        if micro_batches <= 0:
            self.producer.finish()

    @staticmethod
    def rank_state(states: list[dict] | None, rank: int, world: int) -> dict | None:
        """This rank's saved state from the checkpoint's per-rank list. Another world size reads
        documents in another order: start every rank after the furthest any rank had got."""
        if not states:
            return None
        if len(states) == world:
            return states[rank]
        return {"next": max(s["next"] for s in states) + 1, "skip": 0}

    def next(self) -> Batch:
        rows = []
        while len(rows) < self.n_teacher:
            row = self._teacher_row()
            if row is None:
                break
            rows.append(row)
        self.teacher_rows += len(rows)
        self.skipped_rows += self.n_teacher - len(rows)
        parts = []
        if rows:
            t = torch.tensor(rows, dtype=torch.long, device=self.loader.device)
            parts.append((t[:, :-1], t[:, 1:]))
        n_plain = self.cfg.batch_size - len(rows)
        if n_plain:
            self.plain_rows += n_plain
            parts.append(self.loader.next_batch(n_plain))
        self.served += 1
        if self.limit is not None and self.served >= self.limit:
            self._producer().finish()
        return Batch(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def prefetch(self) -> None:
        pass  # the producer's threads keep teacher rows ahead; the plain rows are read on demand

    def loader_state(self) -> dict[str, Any]:
        return self.loader.state_dict()  # the plain loader is never read ahead: its own state is exact

    def load_loader_state(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def state_dict(self) -> dict[str, Any] | None:
        assert self.packer is not None, "start() first"
        return self.packer.state_dict()

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "teacher": self.teacher.record(),
            # rows of plain data where teacher rows were due
            "teacher_skipped": self.skipped_rows,
            "sequences": self.stats(),
        }
        if self.producer is not None and self.producer.last_error:
            rec["teacher_error"] = self.producer.last_error
        return rec

    def close(self) -> None:
        if self.producer is None:
            return
        # After the run's last micro-batch the producer finishes its look-ahead (so the cache
        # holds what a rerun will ask for); a run that stopped early does not wait for it.
        self.producer.close(wait_s=max(30.0, self.teacher.timeout_s) if self.producer.finishing else 0.0)

    # ------------------------------------------------------------------ rows

    def _producer(self) -> SequenceProducer:
        assert self.producer is not None, "start() first"
        return self.producer

    def _teacher_row(self) -> list[int] | None:
        assert self.packer is not None, "start() first"
        while not self.packer.ready():
            item = self._get()
            if item is None:
                return None
            self.packer.add(*item)
        return self.packer.take()

    def _get(self) -> tuple[int, list[int]] | None:
        """The next accepted text; None when there is none and the config allows plain data
        instead: the teacher is down, every recent answer was rejected, or this micro-batch has
        waited distill.row_wait_s for a teacher that answers too slowly or is mostly rejected
        (the texts it does accept still come, in later micro-batches)."""
        p, t0 = self._producer(), time.monotonic()
        try:
            while True:
                try:
                    return p.take(timeout=0.05)
                except queue.Empty:
                    if not p.alive and p.queue.empty():
                        if p.fatal is not None:
                            raise TeacherError(f"sequence-level distillation stopped: {p.fatal}") from p.fatal
                        raise TeacherError("the teacher-sequence producer has stopped") from None
                waited = time.monotonic() - t0
                if (
                    p.down_since is None
                    and not p.starved
                    and (waited < self.dcfg.row_wait_s or not self.dcfg.continue_without_teacher)
                ):
                    continue  # the teacher is working on it: wait, so reruns see the same rows
                if self.dcfg.continue_without_teacher:
                    return None
                if p.starved:
                    raise TeacherError(
                        f"the last {p.reject_streak} teacher completions were all rejected "
                        f"by the quality filter ({dict(p.counts)}) and "
                        "distill.continue_without_teacher is false"
                    )
                if time.monotonic() - (p.down_since or 0.0) > self.dcfg.wait_for_teacher_s:
                    raise TeacherError(
                        f"distillation teacher {self.dcfg.teacher.url} has been down for more than "
                        f"distill.wait_for_teacher_s={self.dcfg.wait_for_teacher_s:g}s and "
                        f"distill.continue_without_teacher is false: {p.last_error}"
                    )
        finally:
            self.wait_s += time.monotonic() - t0

    def stats(self) -> dict[str, Any]:
        c = self._producer().counts
        return {
            "accepted": c["accepted"],
            "rejected": {k[len("rejected_") :]: v for k, v in c.items() if k.startswith("rejected_")},
            "teacher_errors": c["teacher_errors"],
            "outages": c["outages"],
            "teacher_rows": self.teacher_rows,
            "plain_rows": self.plain_rows,
            "wait_s": round(self.wait_s, 3),
        }
