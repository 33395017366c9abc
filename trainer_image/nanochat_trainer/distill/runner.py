"""Top-k logprob distillation inside the training loop (shared tokenizer).

    pf = TeacherPrefetcher(teacher, loader, k=20, depth=4)
    x, y, state, fut = pf.next()          # the batch, the loader state before it, teacher future
    ids, lps, mask = pf.result(fut, x)    # (B,T,k), (B,T,k), (B,T) on the batch's device

Each row of a micro-batch is sent to the teacher as token ids (echo, max_tokens=0, logprobs=k,
return_tokens_as_token_ids), so the answer aligns with the student's positions exactly: row i
of the answer is the teacher's top-k after tokens 0..i, the target of the student's logits at i.
The last position (its next token is not in the prompt) is masked.

The prefetcher pulls `depth` batches ahead from the (deterministic) loader in the calling
thread and submits their teacher requests to an asyncio loop running in a background thread,
so a step waits on HTTP only when the teacher is slower than training. The loader state saved
in checkpoints must be that before the oldest batch not yet trained on: `resume_state()`.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Optional

import torch

from .teacher import AsyncTeacher, TeacherError, token_id_map, topk_tensors


class TeacherPrefetcher:
    def __init__(self, teacher: AsyncTeacher, loader, k: int, vocab_size: int, depth: int = 4,
                 limit: Optional[int] = None, tokenizer=None):
        """`limit`: micro-batches the run will train on; nothing past them is pulled or requested.
        `tokenizer` (the shared one) maps text-keyed answers of servers that ignore
        return_tokens_as_token_ids; ids that share a text then fail that step."""
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.teacher, self.loader, self.k, self.depth = teacher, loader, k, depth
        self.vocab_size, self.limit, self.pulled = vocab_size, limit, 0
        self.tokenizer, self._vocab = tokenizer, None
        self._queue: deque = deque()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-prefetch", daemon=True)
        self._thread.start()

    async def _fetch(self, rows: list[list[int]]) -> list:
        return list(await asyncio.gather(*(self.teacher.prompt_topk(r, self.k) for r in rows)))

    def _fill(self) -> None:
        while len(self._queue) < self.depth and (self.limit is None or self.pulled < self.limit):
            self.pulled += 1
            state = self.loader.state_dict()
            x, y = self.loader.next_batch()
            fut = asyncio.run_coroutine_threadsafe(self._fetch(x.tolist()), self._loop)
            self._queue.append((x, y, state, fut))

    def next(self) -> tuple[torch.Tensor, torch.Tensor, dict, Future]:
        self._fill()
        if not self._queue:
            raise RuntimeError("prefetcher limit reached")
        item = self._queue.popleft()
        self._fill()  # keep `depth` requests in flight while this batch trains
        return item

    def resume_state(self) -> Optional[dict[str, Any]]:
        """Loader state to checkpoint: before the oldest prefetched batch (None: nothing prefetched)."""
        return self._queue[0][2] if self._queue else None

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
                    raise TeacherError("teacher's echoed tokens differ from the prompt's ids: "
                                       "distill.method=topk_logprobs needs a shared tokenizer")
            rows.append(topk_tensors(a, vocab, self.k))
        ids = torch.stack([r[0] for r in rows])
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise TeacherError(f"teacher token id {int(ids.max())} is outside the student's vocabulary "
                               f"({self.vocab_size}): distill.method=topk_logprobs needs a shared tokenizer")
        return (ids.to(x.device), torch.stack([r[1] for r in rows]).to(x.device),
                torch.stack([r[2] for r in rows]).to(x.device))

    def _text_vocab(self) -> dict:
        if self._vocab is None:
            if self.tokenizer is None:
                raise TeacherError("the teacher answered with token texts, not ids, and no tokenizer was given")
            self._vocab = token_id_map(self.tokenizer)
        return self._vocab

    def close(self) -> None:
        for *_, fut in self._queue:
            fut.cancel()
        self._queue.clear()
        try:
            asyncio.run_coroutine_threadsafe(self.teacher.aclose(), self._loop).result(10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
