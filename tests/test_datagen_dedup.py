"""Exact and near-duplicate detection, and the diversity figures (datagen/dedup.py, diversity.py).

.venv/bin/pytest tests/test_datagen_dedup.py -q -s     # -s prints the figures
"""

from __future__ import annotations

import ast
import random
import sysconfig
import time
from pathlib import Path

import pytest

from nanochat_trainer.data.synthetic import document
from nanochat_trainer.datagen.dedup import Deduper, normalized_tokens
from nanochat_trainer.datagen.diversity import diversity, skeleton

BASE = '''def longest_streak(temperatures: list[float], limit: float) -> int:
    """Return the length of the longest run of days whose temperature stays above `limit`.

    A weather station logs one reading a day; a heat wave is a streak of readings over the limit.
    """
    best = current = 0
    for reading in temperatures:
        if reading > limit:
            current += 1
            best = max(best, current)
        else:
            current = 0
    return best


assert longest_streak([], 30.0) == 0
assert longest_streak([31.0, 32.5, 29.0, 33.0], 30.0) == 2
assert longest_streak([35.0, 36.0, 37.0], 30.0) == 3
'''

# The same program as another formatter (or the teacher, on another day) lays it out.
REFORMATTED = BASE.replace("best = current = 0", "best  =  current  =  0").replace(
    "assert longest_streak([31.0, 32.5, 29.0, 33.0], 30.0) == 2",
    "assert longest_streak(\n    [31.0, 32.5, 29.0, 33.0],\n    30.0,\n) == 2",
)
RENAMED = BASE.replace("current", "run_length")  # one variable, every occurrence

# Different exercises of the same topic (lists), as a teacher writes them.
SAME_TOPIC = [
    '''def rotate_playlist(songs: list[str], k: int) -> list[str]:
    """Move the last `k` songs of the playlist to its front."""
    if not songs:
        return []
    k %= len(songs)
    return songs[-k:] + songs[:-k]


assert rotate_playlist(["a", "b", "c"], 1) == ["c", "a", "b"]
assert rotate_playlist([], 3) == []
assert rotate_playlist(["x"], 5) == ["x"]
''',
    '''def chunk_orders(order_ids, size):
    """Split the order ids into batches of `size`; the last batch may be shorter."""
    return [order_ids[i : i + size] for i in range(0, len(order_ids), size)]


assert chunk_orders([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
assert chunk_orders([], 3) == []
assert chunk_orders([7], 1) == [[7]]
''',
    '''def running_balance(transactions):
    """Return the account balance after each transaction, starting from zero."""
    balance, out = 0, []
    for amount in transactions:
        balance += amount
        out.append(balance)
    return out


assert running_balance([10, -5, 20]) == [10, 5, 25]
assert running_balance([]) == []
assert running_balance([-1, -1]) == [-1, -2]
''',
    '''def dedupe_visitors(names: list[str]) -> list[str]:
    """Return the museum visitors' names without repeats, in order of first visit."""
    seen = set()
    unique = []
    for name in names:
        if name not in seen:
            seen.add(name)
            unique.append(name)
    return unique


assert dedupe_visitors(["ann", "bob", "ann"]) == ["ann", "bob"]
assert dedupe_visitors([]) == []
assert dedupe_visitors(["z", "z", "z"]) == ["z"]
''',
    BASE,
]


def test_exact_copy_and_whitespace_changes_are_duplicates() -> None:
    d = Deduper()
    assert d.check_and_add("base", BASE) is None
    assert d.check_and_add("copy", BASE) == "duplicate" and d.last_match == "base"
    assert d.check_and_add("spaces", BASE.replace("\n\n\n", "\n\n").replace("    ", "  ") + "\n\n") == "duplicate"
    assert len(d) == 1


def test_reformatted_and_renamed_copies_are_near_duplicates() -> None:
    d = Deduper()
    assert d.check_and_add("base", BASE) is None
    assert d.check_and_add("reformatted", REFORMATTED) == "near_duplicate" and d.last_match == "base"
    assert d.check_and_add("renamed", RENAMED) == "near_duplicate" and d.last_match == "base"
    assert normalized_tokens(RENAMED) == normalized_tokens(BASE)
    assert len(d) == 1


def test_distinct_exercises_of_one_topic_are_kept() -> None:
    d = Deduper()
    assert [d.check_and_add(str(i), t) for i, t in enumerate(SAME_TOPIC)] == [None] * len(SAME_TOPIC)
    # The same loop, another question and other tests: a different exercise, not a near duplicate.
    cold = BASE.split('"""')[0] + '"""Count the days of the longest cold spell below `limit`."""'
    cold += BASE.split('"""')[2].split("\n\n\n")[0].replace("reading > limit", "reading < limit")
    cold += "\n\n\nassert longest_streak([1.0, -2.0], 0.0) == 1\nassert longest_streak([5.0, 6.0], 0.0) == 0\n"
    ast.parse(cold)
    assert d.check_and_add("cold", cold) is None


def test_answers_are_deterministic_so_a_resume_rebuilds_the_same_state() -> None:
    docs = [document(3, i) for i in range(300)] + [BASE, RENAMED, REFORMATTED]
    first, second = Deduper(), Deduper()
    a = [first.check_and_add(str(i), t) for i, t in enumerate(docs)]
    kept = [t for t, r in zip(docs, a) if r is None]
    assert [second.check_and_add(str(i), t) for i, t in enumerate(kept)] == [None] * len(kept)  # re-added
    assert [second.check_and_add("again", t) for t in docs[-2:]] == a[-2:] == ["near_duplicate"] * 2
    assert (first.minhash(BASE).hashvalues == Deduper().minhash(BASE).hashvalues).all()


def test_throughput_is_above_100_documents_a_second() -> None:
    docs = [document(5, i) * 4 for i in range(400)]  # ~1.6 kB each: a teacher answer's size
    d = Deduper()
    start = time.perf_counter()
    for i, t in enumerate(docs):
        d.check_and_add(str(i), t)
    rate = len(docs) / (time.perf_counter() - start)
    print(f"\ndedup: {rate:.0f} docs/s of {sum(map(len, docs)) / len(docs):.0f} characters")
    assert rate > 100


def test_skeleton_forgets_names_constants_and_docstrings_only() -> None:
    a = ast.parse('def f(x):\n    """Doc."""\n    y = x + 1\n    return y\n')
    b = ast.parse("def grow(size):\n    total = size + 99\n    return total\n")
    c = ast.parse("def f(x):\n    y = x - 1\n    return y\n")
    assert skeleton(a) == skeleton(b) != skeleton(c)


def test_synthetic_data_is_less_diverse_than_the_standard_library() -> None:
    synthetic = diversity(document(0, i) for i in range(500))
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 500 < p.stat().st_size < 12_000)[:60]
    stdlib = diversity(p.read_text(errors="replace") for p in files)
    print(f"\nsynthetic: {synthetic}\nstdlib ({len(files)} files): {stdlib}")
    assert synthetic["documents"] == synthetic["with_code"] == 500
    assert synthetic["distinct_skeletons"] < 0.9 < stdlib["distinct_skeletons"]
    assert synthetic["distinct_identifiers"] / 500 < 1 < stdlib["distinct_identifiers"] / len(files)


def test_diversity_counts_repeats_and_markdown_code() -> None:
    markdown = "## Loops\n\nA loop repeats.\n\n```python\nfor i in range(3):\n    print(i)\n```\n"
    got = diversity([BASE, BASE, RENAMED, SAME_TOPIC[0], markdown, "Just prose, no code at all."])
    assert got["documents"] == 6 and got["with_code"] == 5
    assert got["distinct_skeletons"] == 3 / 5  # BASE thrice (renaming keeps the shape), one list exercise, the loop
    assert got["near_duplicate_rate"] == 2 / 6
    assert got["distinct_identifiers"] == len(
        {
            "longest_streak",
            "temperatures",
            "limit",
            "best",
            "current",
            "reading",
            "run_length",
            "rotate_playlist",
            "songs",
            "k",
            "i",
        }
    )


def _shingle_jaccard(a: str, b: str, k: int = 5) -> float:
    sets = []
    for text in (a, b):
        t = normalized_tokens(text)
        sets.append({" ".join(t[i : i + k]) for i in range(len(t) - k + 1)})
    return len(sets[0] & sets[1]) / len(sets[0] | sets[1])


def test_pairs_well_above_the_threshold_are_flagged_and_pairs_well_below_are_kept() -> None:
    # Random 200-word texts and copies with m scattered words changed: m = 1, 2 gives a Jaccard
    # similarity >= 0.9, m = 14, 16 one <= 0.65. Bands tuned to 0.8 as the verdict missed ~8% of the first.
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    d = Deduper(threshold=0.8)
    verdicts: dict[str, list[str | None]] = {"above": [], "below": []}
    for trial in range(160):
        base = [rng.choice(words) for _ in range(200)]
        copy = list(base)
        for _ in range((1, 2, 14, 16)[trial % 4]):
            copy[rng.randrange(200)] = rng.choice(words)
        a, b = " ".join(base), " ".join(copy)
        similarity = _shingle_jaccard(a, b)
        assert similarity >= 0.9 or similarity <= 0.65
        assert d.check_and_add(f"base{trial}", a) is None
        verdicts["above" if similarity >= 0.9 else "below"].append(d.check_and_add(f"copy{trial}", b))
    assert verdicts["above"] == ["near_duplicate"] * 80
    assert verdicts["below"] == [None] * 80


@pytest.mark.parametrize("threshold", [0.01, 0.5, 0.99, 1.0])
def test_every_threshold_the_config_accepts_works(threshold: float) -> None:
    d = Deduper(threshold=threshold)
    assert d.check_and_add("base", BASE) is None
    assert d.check_and_add("renamed", RENAMED) == "near_duplicate"  # the same tokens: similarity 1
    if threshold == 1.0:
        assert d.check_and_add("cold", BASE.replace("reading > limit", "reading < limit")) is None
