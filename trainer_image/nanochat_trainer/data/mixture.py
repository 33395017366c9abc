"""Which source each document of a mixture comes from: a fixed interleaving, O(1) per index.

    mix = Mixture([0.5, 0.3, 0.2], block=64)
    mix.locate(1000)          # (source, index within that source)
    mix.taken(s, start)       # documents of source s among the mixture's first `start`

The mixture's documents go in blocks of `block` consecutive indices, every block from one
source; a cycle of CYCLE blocks holds each source's share of the weights (largest remainder,
at least one block each), interleaved by smooth weighted round-robin so that no source waits
long. Document i of block b is document `k = n * block + i % block` of its source, where n
counts the source's blocks before b. With `block` a multiple of the world size, k and i agree
modulo it: rank r's documents of the mixture are exactly rank r's documents of each source, so
every source is read sharded as it would be alone (`sources.iter_indexed`), and the mapping does
not depend on the world size when it divides the block (the loader's lanes, 64).

Weights are shares of documents, not of tokens: the tokens each source gave are counted by the
loader (`data_tokens` in log.jsonl and the checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

CYCLE = 1000
# The loader's lanes (loader.py) and the mixture's block: documents i and i + LANES go to the same lane.
LANES = 64


def apportion(weights: Sequence[float], slots: int) -> list[int]:
    """`slots` split in proportion to `weights` (largest remainder), each at least 1."""
    if len(weights) > slots:
        raise ValueError(f"{len(weights)} sources do not fit in {slots} slots")
    total = sum(weights)
    exact = [w / total * (slots - len(weights)) for w in weights]
    counts = [1 + int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda s: (int(exact[s]) - exact[s], s))
    for s in by_remainder[: slots - sum(counts)]:
        counts[s] += 1
    return counts


def interleave(counts: Sequence[int]) -> list[int]:
    """Smooth weighted round-robin: source s appears counts[s] times, spread out evenly."""
    total, current, order = sum(counts), [0] * len(counts), []
    for _ in range(total):
        for s, c in enumerate(counts):
            current[s] += c
        best = max(range(len(counts)), key=lambda s: (current[s], -s))
        current[best] -= total
        order.append(best)
    return order


class Mixture:
    def __init__(self, weights: Sequence[float], block: int):
        if not weights or any(w <= 0 for w in weights):
            raise ValueError(f"weights must be positive: {list(weights)}")
        self.block = block
        self.counts = apportion(weights, CYCLE)
        self.order = interleave(self.counts)
        # before[s][j]: blocks of source s among the first j blocks of a cycle
        self.before = [[0] * (CYCLE + 1) for _ in weights]
        for j, s in enumerate(self.order):
            for t in range(len(weights)):
                self.before[t][j + 1] = self.before[t][j] + (t == s)

    def _blocks_before(self, s: int, b: int) -> int:
        cycles, j = divmod(b, CYCLE)
        return cycles * self.counts[s] + self.before[s][j]

    def locate(self, i: int) -> tuple[int, int]:
        b, offset = divmod(i, self.block)
        s = self.order[b % CYCLE]
        return s, self._blocks_before(s, b) * self.block + offset

    def taken(self, s: int, start: int) -> int:
        """How many of source s's documents have a mixture index below `start`."""
        b, offset = divmod(start, self.block)
        return self._blocks_before(s, b) * self.block + (offset if self.order[b % CYCLE] == s else 0)
