"""A work queue of run keys, in the manner of client-go's: what the watch handlers fill and the
reconcile workers drain.

- A key waiting in the queue is there once, however many events named it (they coalesce).
- A key being processed is never handed to a second worker; added meanwhile, it is marked
  dirty and comes back once `done` is called, so no change is missed.
- `add_after` schedules a key for later (the periodic resync of a live run, a retry's delay);
  an earlier schedule of the same key wins.

Thread-safe: kopf's event loop adds, worker threads get and finish.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: deque[K] = deque()
        self._queued: set[K] = set()  # in _ready
        self._processing: set[K] = set()
        self._dirty: set[K] = set()  # added while processing: re-queued by done()
        self._later: list[tuple[float, int, K]] = []  # heap of (due, tiebreak, key)
        self._due: dict[K, float] = {}  # the live schedule of each key in _later
        self._seq = itertools.count()
        self._closed = False

    def add(self, key: K) -> None:
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: K, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            due = self._clock() + delay
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._later, (due, next(self._seq), key))
            self._cond.notify()

    def forget(self, key: K) -> None:
        """Drop a key's pending schedule (its object is gone). One already queued still runs once."""
        with self._cond:
            self._due.pop(key, None)

    def get(self, timeout: float | None = None) -> K | None:
        """The next key to process, or None when closed or the timeout passed. The caller must
        call `done(key)` when finished with it."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                self._promote_due()
                if self._ready:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                wait = self._next_due()
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def done(self, key: K) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add_locked(key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        """Keys ready or scheduled (not those being processed)."""
        with self._cond:
            return len(self._queued | set(self._due))

    def _add_locked(self, key: K) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)
            self._cond.notify()

    def _promote_due(self) -> None:
        now = self._clock()
        while self._later and self._later[0][0] <= now:
            due, _, key = heapq.heappop(self._later)
            if self._due.get(key) == due:  # else superseded by an earlier schedule, or forgotten
                del self._due[key]
                self._add_locked(key)

    def _next_due(self) -> float | None:
        while self._later and self._due.get(self._later[0][2]) != self._later[0][0]:
            heapq.heappop(self._later)  # stale entries
        return max(self._later[0][0] - self._clock(), 0.0) if self._later else None
