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
has no targets (the LM loss alone; counted as teacher_skipped), else the run stops; a 401, 403 or
404 (bad key, unknown model) always stops it, since no later request would succeed.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any

import torch

from ..config import DistillConfig
from ..data.feed import Batch, TopkTargets
from ..data.loader import TokenLoader
from .teacher import FATAL_STATUS, AsyncTeacher, TeacherError, token_id_map, topk_tensors

PREFETCH_DEPTH = 4  # micro-batches whose teacher answers are fetched ahead


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
        self._vocab: dict | None = None
        self._queue: deque = deque()
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
        x, y, _, fut = self._queue.popleft()
        self._fill()  # keep `depth` requests in flight while this batch trains
        return Batch(x, y, self._targets(fut, x, y))

    def prefetch(self) -> None:
        pass  # `depth` batches are read and asked of the teacher ahead already

    def loader_state(self) -> dict[str, Any]:
        return self._queue[0][2] if self._queue else self.loader.state_dict()

    def load_loader_state(self, state: dict[str, Any]) -> None:
        assert not self._queue, "resume before the first batch"
        self.loader.load_state_dict(state)

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"teacher": self.teacher.record(), "teacher_skipped": self.skipped}
        if self.last_error:
            rec["teacher_error"] = self.last_error
        return rec

    def close(self) -> None:
        for *_, fut in self._queue:
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

    async def _fetch(self, rows: list[list[int]]) -> Any:
        return list(await asyncio.gather(*(self.teacher.prompt_topk(r, self.k) for r in rows)))

    def _fill(self) -> None:
        while len(self._queue) < self.depth and (self.limit is None or self.pulled < self.limit):
            self.pulled += 1
            state = self.loader.state_dict()
            x, y = self.loader.next_batch()
            fut = asyncio.run_coroutine_threadsafe(self._fetch(x.tolist()), self._loop)
            self._queue.append((x, y, state, fut))

    def _targets(self, fut: Future, x: torch.Tensor, y: torch.Tensor) -> TopkTargets | None:
        """The batch's targets; None when it trains on the LM loss alone (the teacher failed and
        the run may go on without it)."""
        try:
            ids, lps, mask = self.result(fut, x)
        except TeacherError as exc:
            url = self.dcfg.teacher.url
            if exc.status in FATAL_STATUS:
                raise TeacherError(
                    f"distillation teacher {url} refuses requests (HTTP {exc.status}): check "
                    f"distill.teacher.url, .model and the API key: {exc}",
                    status=exc.status,
                ) from exc
            if not self.dcfg.continue_without_teacher:
                raise TeacherError(
                    f"distillation teacher {url} failed and distill.continue_without_teacher is false: {exc}"
                ) from exc
            self.skipped += 1
            self.last_error = str(exc)[:300]
            return None
        mask = mask & (y != -1)
        return self._checked(TopkTargets(ids, lps, mask))

    def _checked(self, targets: TopkTargets) -> TopkTargets | None:
        """Targets the batch can distil on (every position has one here)."""
        return targets

    def result(self, fut: Future, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher targets for batch x; raises TeacherError when the teacher failed (after retries)."""
        try:
            answers = fut.result()
        except TeacherError:
            raise
        except Exception as exc:  # anything unexpected from the client is a teacher failure too
            raise TeacherError(f"teacher request failed: {type(exc).__name__}: {exc}") from exc
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

    def _text_vocab(self) -> dict:
        if self._vocab is None:
            if self.tokenizer is None:
                raise TeacherError("the teacher answered with token texts, not ids, and no tokenizer was given")
            self._vocab = token_id_map(self.tokenizer)
        return self._vocab
