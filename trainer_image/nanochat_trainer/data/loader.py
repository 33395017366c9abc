"""Packed token batches for training, resumable from a checkpoint.

    from nanochat_trainer.data.loader import TokenLoader, merge_states
    loader = TokenLoader(cfg, tokenizer, rank, world, device)
    x, y = loader.next_batch()                 # LongTensors (batch_size, seq_len); y is x shifted by one
    state = loader.state_dict()                # small: two ints per lane plus a row count
    loader.load_state_dict(state)              # the next batches are exactly those that would have come

Packing: documents are tokenized, each followed by `tokenizer.eot_id`, concatenated
and cut into rows of seq_len + 1 tokens (x = row[:-1], y = row[1:]); a document may
run across rows and rows hold several documents, so no token is padding.

One global stream of rows, whatever the world size. Documents go round-robin to
`lanes` independent packers (document i to lane i % lanes; `lanes` is 64, or
lcm(64, world)); global row g is the next row of lane g % lanes. Rank r of W takes
global rows r, r + W, r + 2W, ...: its micro-batch b holds rows r + W*(b*B + j), so
step b's batches over all ranks are exactly global rows [b*B*W, (b+1)*B*W). Because W
divides `lanes`, rank r only ever uses lanes l with l % W == r and so only reads
documents i with i % W == r: ranks read disjoint shares, and 1 process with batch
2B sees the same rows at every step as 2 processes with batch B (for every W that
divides 64; for Hugging Face data only when `datasets` splits by example, see
sources.py).

State: per lane, the document its unread tokens start in and how many of that
document's tokens were already used. Resuming re-tokenizes that one document per
lane; reaching it is O(1) for synthetic data and local folders and a skip through
the stream for JSONL, Parquet and Hugging Face data. `merge_states` combines the
states of all ranks into one, which any world size dividing `lanes` can load.

Lanes consume whole documents; a lane stuck in a very long document lets the
documents queued for it pile up in memory until it gets to them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..config import DataConfig, TrainerConfig
from ..errors import ConfigError
from .mixture import LANES
from .sources import iter_indexed, mixture_of

STATE_VERSION = 1


class TextEncoder(Protocol):
    """What the data layer needs of a tokenizer (`tokenizer.Tokenizer` is one)."""

    eot_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class _Lane:
    doc: int = 0  # lane-local number of the document holding the first unread token
    offset: int = 0  # tokens of that document (with its eot) already emitted
    next_doc: int = 0  # lane-local number of the next document to tokenize
    buf: list[int] = field(default_factory=list)
    pos: int = 0  # first unread token in buf
    # [unread tokens, source, dropped for overlapping HumanEval] of each document in buf
    left: deque = field(default_factory=deque)


class _Dispatcher:
    """Reads this rank's documents once, in order, and queues each for its lane, with whether
    decontamination dropped it."""

    def __init__(self, data: DataConfig, rank: int, world: int, lanes: int, first_needed: dict[int, int]):
        self._dropped: set[int] = set()  # told by iter_indexed just before it yields the document
        self._docs = iter_indexed(
            data, rank, world, start=min(first_needed.values()), on_drop=lambda i, _task: self._dropped.add(i)
        )
        self._lanes = lanes
        self._floor = first_needed  # documents below a lane's floor were used before a resume
        self._queues: dict[int, deque] = {lane: deque() for lane in first_needed}

    def get(self, lane: int, index: int) -> tuple[str, bool]:
        queue = self._queues[lane]
        while not queue:
            i, text = next(self._docs)
            dropped = i in self._dropped
            self._dropped.discard(i)
            owner = i % self._lanes
            if i >= self._floor[owner]:
                self._queues[owner].append((i, text, dropped))
        i, text, dropped = queue.popleft()
        if i != index:
            raise RuntimeError(f"lane {lane} expected document {index}, got {i}: inconsistent loader state")
        return text, dropped


class TokenLoader:
    """Batches of packed rows for one rank; see the module docstring for the layout."""

    def __init__(
        self,
        cfg: TrainerConfig,
        tokenizer: TextEncoder,
        rank: int = 0,
        world: int = 1,
        device: str | torch.device = "cpu",
        lanes: int | None = None,
    ):
        self.lanes = lanes or math.lcm(LANES, world)
        if self.lanes % world:
            raise ValueError(f"lanes={self.lanes} is not a multiple of world={world}")
        self.data = cfg.data
        sources = cfg.data.sources()
        self.sources = [s.name for s in sources]
        self._weights = [[s.name, s.weight] for s in sources]  # what a checkpoint's mixture must equal
        self.mixture = mixture_of(cfg.data, world)
        # Tokens of each source that went into this rank's rows, and documents dropped for overlapping
        # HumanEval; after a resume rank 0 carries the totals of every rank before it.
        self.source_tokens = [0] * len(self.sources)
        self.decontaminated = 0
        self.tokenizer = tokenizer
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.batch_size = cfg.batch_size
        self.seq_len = cfg.resolved_seq_len
        self.rows = 0  # rows this rank has produced
        self._lanes = {lane: _Lane() for lane in range(rank, self.lanes, world)}
        self._dispatcher: _Dispatcher | None = None

    # ------------------------------------------------------------------ batches

    def next_batch(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `n` rows (default batch_size); n calls of next_batch(1) give the same rows
        as one next_batch(n), so a caller may take part of a batch from elsewhere (sequence-level
        distillation fills the rest of its micro-batches from here)."""
        rows = []
        for _ in range(self.batch_size if n is None else n):
            g = self.rank + self.world * self.rows
            rows.append(self._row(g % self.lanes))
            self.rows += 1
        batch = torch.tensor(rows, dtype=torch.long)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def _row(self, lane_id: int) -> list[int]:
        lane, need = self._lanes[lane_id], self.seq_len + 1
        while len(lane.buf) - lane.pos < need:
            index = lane_id + self.lanes * lane.next_doc
            text, dropped = self._documents().get(lane_id, index)
            tokens = self.tokenizer.encode(text) + [self.tokenizer.eot_id]
            if lane.next_doc == lane.doc:
                tokens = tokens[lane.offset :]  # resuming inside this document
            lane.buf.extend(tokens)
            lane.left.append([len(tokens), self.mixture.locate(index)[0], dropped])
            lane.next_doc += 1
        row = lane.buf[lane.pos : lane.pos + need]
        lane.pos += need
        if lane.pos * 2 > len(lane.buf):  # drop used tokens without copying on every row
            del lane.buf[: lane.pos]
            lane.pos = 0
        used = need
        while used:
            left, source, dropped = lane.left[0]
            take = min(left, used)
            self.source_tokens[source] += take
            used -= take
            if take == left:
                # Counted as it leaves, as lane.doc moves past it: read-ahead and resumes count nothing twice.
                self.decontaminated += dropped
                lane.left.popleft()
                lane.doc, lane.offset = lane.doc + 1, 0
            else:
                lane.left[0][0] -= take
                lane.offset += take
        return row

    def _documents(self) -> _Dispatcher:
        if self._dispatcher is None:
            first = {lane_id: lane_id + self.lanes * lane.doc for lane_id, lane in self._lanes.items()}
            self._dispatcher = _Dispatcher(self.data, self.rank, self.world, self.lanes, first)
        return self._dispatcher

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "lanes": self.lanes,
            "global_rows": self.rows * self.world,
            "source": self.data.source,
            "mixture": self._weights,
            "source_tokens": dict(zip(self.sources, self.source_tokens)),
            "decontaminated": self.decontaminated,
            "lane_state": {str(i): [lane.doc, lane.offset] for i, lane in self._lanes.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if state["lanes"] != self.lanes:
            raise ValueError(
                f"loader state has {state['lanes']} lanes, this loader {self.lanes}: "
                "the world sizes do not share a lane layout"
            )
        if state["source"] != self.data.source:
            raise ValueError(f"loader state is for data.source={state['source']!r}, not {self.data.source!r}")
        saved = state.get("mixture", [[state["source"], 1.0]])  # older checkpoints: one source
        if saved != self._weights:
            raise ConfigError(
                "data.mixture",
                [f"{name}: {weight:g}" for name, weight in self._weights],
                f"differs from the checkpoint's mixture {[f'{n}: {w:g}' for n, w in saved]}: a resumed run keeps "
                "its mixture (start a new run from this one's weights, checkpoint.init_from, to change it)",
            )
        if state["global_rows"] % self.world:
            raise ValueError(f"{state['global_rows']} rows consumed cannot be split over world={self.world}")
        lanes = {}
        for i in self._lanes:
            if str(i) not in state["lane_state"]:
                raise ValueError(f"loader state lacks lane {i}: save merge_states() of all ranks to change world size")
            doc, offset = state["lane_state"][str(i)]
            lanes[i] = _Lane(doc=doc, offset=offset, next_doc=doc)
        self._lanes = lanes
        self.rows = state["global_rows"] // self.world
        # The totals so far stay with rank 0, so that summing over ranks counts each token once.
        totals = state.get("source_tokens", {})
        self.source_tokens = [totals.get(name, 0) if self.rank == 0 else 0 for name in self.sources]
        self.decontaminated = state.get("decontaminated", 0) if self.rank == 0 else 0
        self._dispatcher = None


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state from every rank's `state_dict()` (e.g. gathered with all_gather_object)."""
    first = states[0]
    for s in states[1:]:
        if (s["lanes"], s["global_rows"], s["version"]) != (first["lanes"], first["global_rows"], first["version"]):
            raise ValueError("loader states of different layouts or positions cannot be merged")
    merged = dict(first)
    merged["lane_state"] = {k: v for s in states for k, v in s["lane_state"].items()}
    merged["source_tokens"] = {
        name: sum(s.get("source_tokens", {}).get(name, 0) for s in states) for name in first.get("source_tokens", {})
    }
    merged["decontaminated"] = sum(s.get("decontaminated", 0) for s in states)
    return merged
