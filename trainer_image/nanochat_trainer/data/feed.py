"""Where the trainer's micro-batches come from: one protocol for the plain loader and the
distillation feeds in front of it.

    feed = LoaderFeed(loader)                    # or a distill feed (distill/topk.py, align.py, sequence.py)
    feed.start(micro_batches=steps_left * grad_accum, saved=None)
    batch = feed.next()                          # Batch(x, y, teacher=None or top-k targets)
    feed.prefetch()                              # read the next one now, while the device computes
    feed.loader_state(); feed.state_dict()       # what a checkpoint keeps of this rank's position
    feed.load_loader_state(state)                # resume (before start)
    feed.record()                                # figures for the step's log.jsonl record
    feed.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .loader import TokenLoader


@dataclass(frozen=True)
class TopkTargets:
    """A teacher's top-k next-token distribution at every position of a batch."""

    ids: torch.Tensor  # (B, T, k) student token ids
    logprobs: torch.Tensor  # (B, T, k); -inf marks an empty slot
    mask: torch.Tensor  # (B, T) bool: positions the KL is taken at


@dataclass(frozen=True)
class Batch:
    """One micro-batch: inputs, next-token targets, and the teacher's targets when a logprob
    distillation feed has them (None: train on the LM loss alone)."""

    x: torch.Tensor
    y: torch.Tensor
    teacher: TopkTargets | None = None


class BatchSource(Protocol):
    """A micro-batch stream the trainer draws from, resumable from a checkpoint."""

    # True when batches carry teacher targets (the logprob distillation methods): the step
    # record then has a kd_loss.
    has_teacher_targets: bool

    def start(self, micro_batches: int, saved: list[dict[str, Any]] | None) -> None:
        """Begin serving: at most `micro_batches` more (the rest of the run; nothing past them is
        read or requested); `saved`: every rank's `state_dict()` from the checkpoint, or None."""

    def next(self) -> Batch: ...

    def prefetch(self) -> None:
        """Make the next micro-batch now: the trainer calls it after a backward, while the device
        still works through the queued kernels, so the host's tokenizing and packing overlap them
        (a feed that reads ahead on its own threads does nothing). The checkpointed position
        stays before the prefetched batch."""

    def loader_state(self) -> dict[str, Any]:
        """This rank's plain-loader state to checkpoint: before the oldest batch not yet trained on."""

    def load_loader_state(self, state: dict[str, Any]) -> None:
        """Resume the plain loader from a checkpoint's (merged) loader state; before `start`."""

    def state_dict(self) -> dict[str, Any] | None:
        """This rank's own position beyond the loader's (None when the feed has none)."""

    def record(self) -> dict[str, Any]:
        """Figures for the step's log.jsonl record (teacher requests, skips, alignment)."""

    def close(self) -> None: ...


class LoaderFeed:
    """The plain data: the loader's batches, as they come."""

    has_teacher_targets = False

    def __init__(self, loader: TokenLoader):
        self.loader = loader
        self._ahead: tuple[Batch, dict[str, Any]] | None = None  # a prefetched batch, the state before it

    def start(self, micro_batches: int, saved: list[dict[str, Any]] | None) -> None:
        pass  # the loader reads on demand, at most one batch ahead of training

    def next(self) -> Batch:
        if self._ahead is not None:
            batch, self._ahead = self._ahead[0], None
            return batch
        x, y = self.loader.next_batch()
        return Batch(x, y)

    def prefetch(self) -> None:
        if self._ahead is None:
            before = self.loader.state_dict()
            self._ahead = (Batch(*self.loader.next_batch()), before)

    def loader_state(self) -> dict[str, Any]:
        return self._ahead[1] if self._ahead is not None else self.loader.state_dict()

    def load_loader_state(self, state: dict[str, Any]) -> None:
        assert self._ahead is None, "resume before the first batch"
        self.loader.load_state_dict(state)

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def record(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class TensorFeed:
    """Given (x, y) batches, served in turn and cycled: benchmarks, and tests that drive the trainer
    on batches of their own. There is no data position to checkpoint."""

    has_teacher_targets = False

    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.batches, self.served = list(batches), 0

    def start(self, micro_batches: int, saved: list[dict[str, Any]] | None) -> None:
        pass

    def next(self) -> Batch:
        x, y = self.batches[self.served % len(self.batches)]
        self.served += 1
        return Batch(x, y)

    def prefetch(self) -> None:
        pass  # the batches are made already

    def loader_state(self) -> dict[str, Any]:
        raise NotImplementedError("a TensorFeed has no data position to checkpoint")

    def load_loader_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("a TensorFeed has no data position to resume")

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def record(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass
