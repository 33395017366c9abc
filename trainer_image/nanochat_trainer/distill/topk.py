"""Top-k logprob distillation feeds (Hinton et al. 2015 on the teacher's top-k): batches with the
teacher's targets, fetched ahead of training.

    feed = TopkFeed(teacher, loader, cfg.distill, vocab_size, tokenizer)    # a data.feed.BatchSource
    feed.start(micro_batches=1000, saved=None)
    batch = feed.next()     # Batch(x, y, TopkTargets(ids (B,T,k), logprobs (B,T,k), mask (B,T))), or no targets

`TopkFeed` (distill.method topk_logprobs; the teacher shares the student's tokenizer) sends each
row of a micro-batch as token ids (echo, max_tokens=0, logprobs=k, return_tokens_as_token_ids),
so the answer aligns with the student's positions exactly: row i of the answer is the teacher's
top-k after tokens 0..i, the target of the student's logits at i. The last position (its next
token is not in the prompt) is masked. `align.CrossTokenizerFeed` (cross_tokenizer) is the same
feed with text prompts and aligned targets.

`depth` batches are pulled ahead from the (deterministic) loader in the calling thread and their
teacher requests submitted to an asyncio loop running in a background thread, so a step waits on
HTTP only when the teacher is slower than training. The loader state a checkpoint saves is that
before the oldest batch not yet trained on (`loader_state`).

A teacher that fails after the client's retries: with distill.continue_without_teacher the batch
has no targets (the LM loss alone; counted as teacher_skipped), else the run stops. A refusal the
same request would get again stops the run as a configuration error (`errors.ConfigError`, exit
2): a 401, 403 or 404 (bad key, unknown model) at once, and any other 4xx (vLLM's 400 for top_k
above its --max-logprobs, for a row longer than its max-model-len) when it answers every request
of a micro-batch, quoting the server's message.

A teacher found down (`TeacherUnavailable`: the client's whole retry schedule spent on one
micro-batch) opens a circuit breaker, as `SequenceProducer.down_since` does: the requests under
way are cancelled and later micro-batches train on the LM loss at once, without asking, while one
`AsyncTeacher.probe` request every PROBE_S seconds asks whether it is back; the first answer
closes the breaker and the queued micro-batches are asked again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from ..config import DistillConfig
from ..data.feed import Batch, TopkTargets
from ..data.loader import TokenLoader
from ..errors import ConfigError
from .cache import TopkEntry
from .teacher import FATAL_STATUS, AsyncTeacher, TeacherError, TeacherUnavailable

PREFETCH_DEPTH = 4  # micro-batches whose teacher answers are fetched ahead
PROBE_S = 2.0  # while the teacher is down, one probe request this often (read at run time: tests shorten it)


@dataclass
class _Pending:
    """A micro-batch read ahead: its loader state before it, and its teacher request (None: read
    while the teacher was down, not asked yet)."""

    x: torch.Tensor
    y: torch.Tensor
    state: dict[str, Any]
    fut: Future | None


class TopkFeed:
    """Batches with the teacher's top-k targets, for a teacher that shares the student's tokenizer."""

    has_teacher_targets = True

    def __init__(
        self,
        teacher: AsyncTeacher,
        loader: TokenLoader,
        dcfg: DistillConfig,
        vocab_size: int,
        tokenizer=None,
        depth: int = PREFETCH_DEPTH,
    ):
        """`tokenizer` (the shared one) maps text-keyed answers of servers that ignore
        return_tokens_as_token_ids; ids that share a text then fail that step."""
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.teacher, self.loader, self.dcfg, self.depth = teacher, loader, dcfg, depth
        self.k, self.vocab_size, self.tokenizer = dcfg.top_k, vocab_size, tokenizer
        self.limit: int | None = None
        self.pulled = 0
        self.skipped = 0  # batches trained on the LM loss alone: the teacher failed
        self.last_error: str | None = None
        self.down_since: float | None = None  # monotonic time the current outage began; None: it answers
        self.outages = 0
        self._probe: Future | None = None
        self._probe_after = 0.0
        self._vocab: dict | None = None
        self._queue: deque[_Pending] = deque()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-prefetch", daemon=True)

    # ------------------------------------------------------------------ BatchSource

    def start(self, micro_batches: int, saved: list[dict[str, Any]] | None) -> None:
        self.limit = micro_batches
        self._thread.start()

    def next(self) -> Batch:
        self._fill()
        if not self._queue:
            raise RuntimeError("the feed has served every micro-batch of the run")
        item = self._queue.popleft()
        self._fill()  # keep `depth` requests in flight while this batch trains
        return Batch(item.x, item.y, self._targets(item))

    def prefetch(self) -> None:
        pass  # `depth` batches are read and asked of the teacher ahead already

    def loader_state(self) -> dict[str, Any]:
        return self._queue[0].state if self._queue else self.loader.state_dict()

    def load_loader_state(self, state: dict[str, Any]) -> None:
        assert not self._queue, "resume before the first batch"
        self.loader.load_state_dict(state)

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "teacher": self.teacher.record(),
            "teacher_skipped": self.skipped,
            "teacher_outages": self.outages,
        }
        if self.last_error:
            rec["teacher_error"] = self.last_error
        return rec

    def close(self) -> None:
        for fut in [item.fut for item in self._queue] + [self._probe]:
            if fut is not None:
                fut.cancel()
        self._queue.clear()
        if not self._thread.is_alive():
            self._loop.close()
            return
        try:
            asyncio.run_coroutine_threadsafe(self.teacher.aclose(), self._loop).result(10)
        except Exception:  # closing a broken connection must not hide the run's own error
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # ------------------------------------------------------------------ fetching

    async def _fetch(self, rows: list[list[int]]) -> list[Any]:
        """Per row its entries, or the exception its request raised."""
        return list(await asyncio.gather(*(self.teacher.prompt_topk(r, self.k) for r in rows), return_exceptions=True))

    def _ask(self, x: torch.Tensor) -> Future:
        return asyncio.run_coroutine_threadsafe(self._fetch(x.tolist()), self._loop)

    def _fill(self) -> None:
        while len(self._queue) < self.depth and (self.limit is None or self.pulled < self.limit):
            self.pulled += 1
            state = self.loader.state_dict()
            x, y = self.loader.next_batch()
            self._queue.append(_Pending(x, y, state, None if self.down_since is not None else self._ask(x)))

    def _targets(self, item: _Pending) -> TopkTargets | None:
        """The batch's targets; None when it trains on the LM loss alone (the teacher failed or is
        down, and the run may go on without it)."""
        if item.fut is None and self._teacher_back():
            for pending in (item, *self._queue):
                pending.fut = pending.fut or self._ask(pending.x)
        try:
            if item.fut is None:
                assert self.down_since is not None
                raise TeacherUnavailable(
                    f"down for {time.monotonic() - self.down_since:.0f}s, not asked: {self.last_error}"
                )
            ids, lps, mask = self.result(item.fut, item.x)
        except TeacherError as exc:
            if isinstance(exc, TeacherUnavailable) and item.fut is not None:
                self._went_down()
            if not self.dcfg.continue_without_teacher:
                raise TeacherError(
                    f"distillation teacher {self.dcfg.teacher.url} failed and "
                    f"distill.continue_without_teacher is false: {exc}"
                ) from exc
            self.skipped += 1
            if item.fut is not None:  # a batch not asked adds nothing new to say
                self.last_error = str(exc)[:300]
            return None
        mask = mask & (item.y != -1)
        return self._checked(TopkTargets(ids, lps, mask))

    def _went_down(self) -> None:
        """Open the breaker: the requests queued behind this one would spend the same retries."""
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            self._probe_after = self.down_since + PROBE_S
        for pending in self._queue:
            if pending.fut is not None and not pending.fut.done():
                pending.fut.cancel()
                pending.fut = None

    def _teacher_back(self) -> bool:
        """While the breaker is open: whether a probe got an answer (closing it); starts the next
        probe when one is due."""
        probe = self._probe
        if probe is not None and probe.done():
            self._probe = None
            if not probe.cancelled() and probe.exception() is None and probe.result():
                self.down_since = None
                return True
        now = time.monotonic()
        if self._probe is None and now >= self._probe_after:
            self._probe = asyncio.run_coroutine_threadsafe(self.teacher.probe(), self._loop)
            self._probe_after = now + PROBE_S
        return False

    def _failures(self, answers: list[Any]) -> list[TeacherError]:
        """The micro-batch's failed requests. Raises what the batch cannot go on from: the teacher
        down (TeacherUnavailable), a refusal no request escapes (401/403/404), or one refusal
        (a 4xx) for every request: the config asks for what this teacher does not do."""
        errors: list[TeacherError] = []
        for a in answers:
            if isinstance(a, BaseException) and not isinstance(a, TeacherError):
                raise TeacherError(f"teacher request failed: {type(a).__name__}: {a}") from a
            if isinstance(a, TeacherError):
                errors.append(a)
        for e in errors:
            if isinstance(e, TeacherUnavailable):
                raise e
        for e in errors:
            if e.status in FATAL_STATUS:
                raise self._config_error("refuses requests (check distill.teacher.url, .model and the API key)", e)
        if errors and len(errors) == len(answers) and len({e.status for e in errors}) == 1 and errors[0].refused:
            raise self._config_error(f"refused every one of a micro-batch's {len(answers)} requests", errors[0])
        return errors

    def _config_error(self, what: str, exc: TeacherError) -> ConfigError:
        err = ConfigError("distill.teacher", self.dcfg.teacher.url, " ".join(f"{what}: {exc}".split()))
        err.__cause__ = exc
        return err

    def _checked(self, targets: TopkTargets) -> TopkTargets | None:
        """Targets the batch can distil on (every position has one here)."""
        return targets

    def result(self, fut: Future, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher targets for batch x; raises TeacherError when the teacher failed (after retries)."""
        answers = self._answers(fut)
        errors = self._failures(answers)
        if errors:
            raise errors[0]
        rows = []
        for row_ids, a in zip(x.tolist(), answers):
            vocab = None
            if any(isinstance(tok, str) for tok, _, _ in a):
                vocab = self._text_vocab()
                if any(vocab.get(tok, -1) not in (None, want) for (tok, _, _), want in zip(a, row_ids)):
                    raise TeacherError(
                        "teacher's echoed tokens differ from the prompt's ids: "
                        "distill.method=topk_logprobs needs a shared tokenizer"
                    )
            rows.append(topk_tensors(a, vocab, self.k))
        ids = torch.stack([r[0] for r in rows])
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise TeacherError(
                f"teacher token id {int(ids.max())} is outside the student's vocabulary "
                f"({self.vocab_size}): distill.method=topk_logprobs needs a shared tokenizer"
            )
        return (
            ids.to(x.device),
            torch.stack([r[1] for r in rows]).to(x.device),
            torch.stack([r[2] for r in rows]).to(x.device),
        )

    @staticmethod
    def _answers(fut: Future) -> Any:
        try:
            return fut.result()
        except Exception as exc:  # anything unexpected from the client is a teacher failure too
            raise TeacherError(f"teacher request failed: {type(exc).__name__}: {exc}") from exc

    def _text_vocab(self) -> dict:
        if self._vocab is None:
            if self.tokenizer is None:
                raise TeacherError("the teacher answered with token texts, not ids, and no tokenizer was given")
            self._vocab = token_id_map(self.tokenizer)
        return self._vocab


def token_id_map(tok) -> dict[str, int | None]:
    """Decoded text -> token id for a tokenizer the teacher shares; None where several ids
    decode to the same text (e.g. lone UTF-8 bytes), which cannot be told apart."""
    out: dict[str, int | None] = {}
    for i in range(tok.n_vocab):
        try:
            s = tok.decode([i])
        except Exception:  # special or unused ids
            continue
        out[s] = None if s in out else i
    return out


def topk_tensors(
    entries: list[TopkEntry], vocab: dict[str, int | None] | None, k: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position teacher targets for `topk_kl_loss`, aligned with the prompt's token ids.

    Row i holds the top-k that predicted token i+1 (i.e. for the student's logits at position i);
    returns ids (T, k) long, logprobs (T, k) float and mask (T,) bool, T = len(entries). The last
    row (nothing to predict) is masked. Int keys (token ids) are used as they are (`vocab` may
    be None when all are ints); unknown or ambiguous token texts raise TeacherError.
    """
    t = len(entries)
    ids = torch.zeros(t, k, dtype=torch.long)
    lps = torch.full((t, k), -torch.log(torch.tensor(float(k))).item())
    mask = torch.zeros(t, dtype=torch.bool)
    for i in range(t - 1):
        top = entries[i + 1][1]
        if top is None or len(top) < k:
            raise TeacherError(f"position {i + 1}: need {k} top logprobs")
        best = sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:k]
        for j, (text, lp) in enumerate(best):
            tid = text if isinstance(text, int) else (vocab or {}).get(text)
            if tid is None:
                raise TeacherError(
                    f"position {i + 1}: teacher token {text!r} is "
                    f"{'ambiguous' if text in (vocab or {}) else 'not'} in the student's vocabulary"
                )
            ids[i, j], lps[i, j] = tid, lp
        mask[i] = True
    return ids.to(device), lps.to(device), mask.to(device)
