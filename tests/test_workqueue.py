"""The reconcile work queue: keys coalesce, a key is never worked on twice at once, a change
during work is not lost, schedules keep the earliest."""

from __future__ import annotations

import threading

from nanochat_operator.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def drain(q: WorkQueue[str]) -> list[str]:
    out = []
    while (k := q.get(timeout=0)) is not None:
        out.append(k)
        q.done(k)
    return out


def test_keys_added_many_times_are_handed_out_once_in_order():
    q: WorkQueue[str] = WorkQueue()
    for k in ["a", "b", "a", "c", "b", "a"]:
        q.add(k)
    assert len(q) == 3
    assert drain(q) == ["a", "b", "c"]


def test_a_key_added_while_worked_on_comes_back_after_done_and_not_before():
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.add("a")  # a pod changed while "a" was being reconciled
    q.add("a")
    assert q.get(timeout=0) is None  # not to a second worker meanwhile
    q.done("a")
    assert q.get(timeout=0) == "a"
    q.done("a")
    assert q.get(timeout=0) is None


def test_add_after_waits_and_the_earliest_schedule_wins():
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("a", 15)
    q.add_after("a", 30)  # later: the 15 s schedule stands
    q.add_after("b", 20)
    q.add_after("b", 5)  # earlier: replaces the 20 s one
    assert q.get(timeout=0) is None
    clock.t = 5
    assert drain(q) == ["b"]
    clock.t = 15
    assert drain(q) == ["a"]
    clock.t = 100
    assert drain(q) == []  # the superseded schedules do not fire


def test_forget_drops_a_schedule():
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("gone", 1)
    q.forget("gone")
    clock.t = 2
    assert drain(q) == [] and len(q) == 0


def test_a_waiting_worker_wakes_for_an_add_and_for_close():
    q: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    t.start()
    q.add("x")
    t.join(5)
    assert got == ["x"]
    t = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    t.start()
    q.close()
    t.join(5)
    assert got == ["x", None] and not t.is_alive()
