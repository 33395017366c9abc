"""Teacher answers -> candidate documents or rejections (datagen/answers.py).

    .venv/bin/pytest tests/test_datagen_answers.py -q

The answers are written by hand in the shapes Qwen3-Instruct returns through vLLM's
/v1/completions for the prompts of datagen/seeds.py: a fenced block alone, prose around the
block, a think block (the chatml template on a hybrid-thinking Qwen3), tests in a block of
their own, a main guard, a bare continuation from the plain template; then the broken ones.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator

import pytest

from nanochat_trainer.datagen.answers import (
    REJECT_REASONS,
    Candidate,
    Rejected,
    key_words,
    mentions,
    parse_answer,
    strip_think,
)
from nanochat_trainer.datagen.seeds import TOPICS, Seed
from nanochat_trainer.eval.sandbox import Sandbox

EXERCISE = Seed(0, "exercise", "dictionaries", "grouping values by key", "medium", "story/word problem", "inventory")
TEXTBOOK = Seed(1, "textbook", "recursion", "memoization with a dictionary", "easy", "worked example", "bakery")

FENCED = '''```python
from collections import defaultdict


def group_items_by_category(items: list[tuple[str, str]]) -> dict[str, list[str]]:
    """A warehouse clerk scans items as (name, category) pairs during the morning shift.

    Group the item names by category, keeping the order in which they were scanned.
    Categories with no items do not appear in the result.
    """
    groups = defaultdict(list)
    for name, category in items:
        groups[category].append(name)
    return dict(groups)


assert group_items_by_category([]) == {}
assert group_items_by_category([("bolt", "hardware"), ("glue", "misc")]) == {"hardware": ["bolt"], "misc": ["glue"]}
assert group_items_by_category([("nut", "hardware"), ("bolt", "hardware")]) == {"hardware": ["nut", "bolt"]}
```'''

PROSE_AROUND = """Here's a medium-difficulty Python exercise set in an inventory context:

```python
def restock_report(stock: dict, threshold: int) -> list:
    \"\"\"Return the names of the products whose quantity is below `threshold`, sorted.

    >>> restock_report({"apples": 3, "pears": 10}, 5)
    ['apples']
    >>> restock_report({}, 1)
    []
    \"\"\"
    return sorted(name for name, qty in stock.items() if qty < threshold)

assert restock_report({"apples": 3, "pears": 10}, 5) == ["apples"]
assert restock_report({}, 1) == []
assert restock_report({"a": 0, "b": 0}, threshold=1) == ["a", "b"]
```

### Explanation
- The function iterates over the `stock` dictionary with `.items()`.
- A generator expression keeps the products below the threshold, and `sorted` orders them.

Let me know if you'd like a harder variant!"""

THINKING = """<think>
Okay, the user wants an exercise about grouping values by key in an inventory domain. Let me write a function
that groups quantities by warehouse. Something like:

```python
def total_by_warehouse(records):
    totals = {}
    ...
```

Then I need at least three asserts with literal values, and a docstring.
</think>

```python
def total_by_warehouse(records):
    \"\"\"Sum the quantities of (warehouse, quantity) records per warehouse.\"\"\"
    totals = {}
    for warehouse, quantity in records:
        totals[warehouse] = totals.get(warehouse, 0) + quantity
    return totals


assert total_by_warehouse([]) == {}
assert total_by_warehouse([("north", 2), ("north", 3)]) == {"north": 5}
assert total_by_warehouse([("a", 1), ("b", 2)]) == {"a": 1, "b": 2}
```"""

SEPARATE_TESTS = """```python
import math


def crates_needed(items: int, per_crate: int) -> int:
    \"\"\"How many crates hold `items` items when each crate holds `per_crate`.\"\"\"
    return math.ceil(items / per_crate)
```

### Test cases

```python
assert crates_needed(10, 3) == 4
assert crates_needed(9, 3) == 3
assert crates_needed(0, 5) == 0
```"""

MAIN_GUARD = '''```python
def count_low_stock(levels, limit=5):
    """Count the products whose level is under `limit`."""
    return sum(1 for level in levels.values() if level < limit)


if __name__ == "__main__":
    print(count_low_stock({"a": 1}))
    assert count_low_stock({"a": 1, "b": 9}) == 1
    assert count_low_stock({}) == 0
    assert count_low_stock({"a": 4}, limit=4) == 0
    print("All tests passed!")
```'''

# The plain template's completion, after the prompt's "def" (seeds.prefill).
PLAIN = '''def restock(levels, minimum):
    """Return the products below `minimum`, in alphabetical order."""
    return sorted(p for p, n in levels.items() if n < minimum)


assert restock({"tea": 1, "jam": 7}, 3) == ["tea"]
assert restock({}, 3) == []
assert restock({"b": 0, "a": 0}, 1) == ["a", "b"]
'''

NO_DOCSTRING = THINKING.replace('    """Sum the quantities of (warehouse, quantity) records per warehouse."""\n', "")
WRONG_ASSERT = FENCED.replace('== {"hardware": ["nut", "bolt"]}', '== {"hardware": ["bolt", "nut"]}')

TEXTBOOK_ANSWER = """Sure! Here's a textbook section on memoization with a dictionary:

## Memoization with a Dictionary

A recursive function often solves the same subproblem many times. Counting the ways a baker can
stack layers of height 1 or 2 into a cake of height `n` is a classic example: the naive recursion
recomputes the same heights again and again. **Memoization** stores each answer in a dictionary the
first time it is computed, so every later call is a lookup.

```python
def ways_to_stack(n, memo=None):
    if memo is None:
        memo = {}
    if n <= 1:
        return 1
    if n not in memo:
        memo[n] = ways_to_stack(n - 1, memo) + ways_to_stack(n - 2, memo)
    return memo[n]


print(ways_to_stack(30))  # 1346269, instantly
```

The dictionary `memo` maps a height to its number of stackings. Without it, `ways_to_stack(30)`
makes over a million calls; with it, about sixty.

Let me know if you'd like an exercise to practice this!"""


def _accepted(seed: Seed, text: str) -> Candidate:
    got = parse_answer(seed, text, "stop")
    assert isinstance(got, Candidate), got
    return got


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    yield Sandbox(timeout=3.0, memory_mb=512, workers=2)


@pytest.mark.parametrize(
    "answer, function",
    [
        (FENCED, "group_items_by_category"),
        (PROSE_AROUND, "restock_report"),
        (THINKING, "total_by_warehouse"),
        (SEPARATE_TESTS, "crates_needed"),
        (MAIN_GUARD, "count_low_stock"),
        (PLAIN, "restock"),
    ],
    ids=["fenced", "prose-around", "thinking", "separate-tests", "main-guard", "plain"],
)
def test_realistic_exercise_answers_become_clean_python_files(answer: str, function: str) -> None:
    got = _accepted(EXERCISE, answer)
    assert got.kind == "exercise" and got.function == function
    tree = ast.parse(got.text)
    assert got.text.endswith("\n") and "```" not in got.text and "<think>" not in got.text
    assert "print(" not in got.text and "__main__" not in got.text and "Explanation" not in got.text
    kinds = [type(s).__name__ for s in tree.body]
    asserts = kinds.index("Assert")
    assert kinds.count("FunctionDef") == 1 and set(kinds[asserts:]) == {"Assert"} and len(kinds) - asserts >= 3
    assert ast.get_docstring(next(s for s in tree.body if isinstance(s, ast.FunctionDef))) is not None
    # The sandbox task: the program without its asserts, the asserts as the test, the function proxied.
    assert got.check is not None and got.check.proxied == (function,)
    assert "assert" not in got.check.program and got.check.test.count("assert ") == len(kinds) - asserts
    assert got.text == f"{got.check.program.rstrip()}\n\n\n{got.check.test}\n"


def test_document_layout() -> None:
    got = _accepted(EXERCISE, SEPARATE_TESTS)
    assert got.text == (
        "import math\n\n\n"
        "def crates_needed(items: int, per_crate: int) -> int:\n"
        '    """How many crates hold `items` items when each crate holds `per_crate`."""\n'
        "    return math.ceil(items / per_crate)\n\n\n"
        "assert crates_needed(10, 3) == 4\nassert crates_needed(9, 3) == 3\nassert crates_needed(0, 5) == 0\n"
    )
    hoisted = _accepted(EXERCISE, MAIN_GUARD).text
    assert hoisted.endswith(  # hoisted out of the guard, dedented; the prints left out
        '\n\n\nassert count_low_stock({"a": 1, "b": 9}) == 1\n'
        'assert count_low_stock({}) == 0\nassert count_low_stock({"a": 4}, limit=4) == 0\n'
    )


def test_accepted_exercises_pass_in_the_sandbox_and_a_wrong_assert_fails(box: Sandbox) -> None:
    good = [_accepted(EXERCISE, a) for a in (FENCED, PROSE_AROUND, THINKING, SEPARATE_TESTS, MAIN_GUARD, PLAIN)]
    wrong = _accepted(EXERCISE, WRONG_ASSERT)  # parses and has its tests: only the sandbox can tell
    tasks = [c.check for c in [*good, wrong]]
    assert all(t is not None for t in tasks)
    results = box.check_many([t for t in tasks if t is not None])
    assert [r.passed for r in results] == [True] * len(good) + [False], [r.detail for r in results]
    assert results[-1].error == "AssertionError"


@pytest.mark.parametrize(
    "answer, finish, reason",
    [
        ("", "stop", "empty"),
        ("  \n\n ", "stop", "empty"),
        ("<think>\n\n</think>\n\n", "stop", "empty"),
        ("<think>\nThe user wants an exercise on grouping. Let me think about", "stop", "empty"),  # never closed
        (FENCED[: len(FENCED) // 2], "length", "truncated"),
        ("<think>\nOkay, so I need to write", "length", "truncated"),
        (FENCED.replace("    return dict(groups)", "    return dict(groups"), "stop", "malformed"),
        (FENCED.replace("\n\n\nassert", "\n\n\ndef helper():\n    return 1\n\n\nassert", 1), "stop", "malformed"),
        (NO_DOCSTRING, "stop", "malformed"),
        (
            "Grouping values by key is best done with a dictionary of lists; use setdefault or defaultdict.",
            "stop",
            "malformed",
        ),
        ("I'm sorry, but I can't help with that request.", "stop", "off_topic"),
        ("Paris is the capital of France. It is known for the Eiffel Tower and its museums.", "stop", "off_topic"),
        ("```python\nstock = {'a': 1}\nfor k, v in stock.items():\n    print(k, v)\n```", "stop", "off_topic"),
        (FENCED.split("\n\n\nassert")[0] + "\n```", "stop", "no_tests"),
        (PLAIN.rsplit("assert", 1)[0], "stop", "no_tests"),
        (PLAIN.replace("assert restock({}, 3) == []", "x = {}\nassert restock(x, 3) == []"), "stop", "no_tests"),
        (PLAIN.replace("assert restock(", "assert sorted(restock(").replace(" == ", ") == "), "stop", "no_tests"),
    ],
    ids=[
        "nothing",
        "whitespace",
        "empty-think",
        "unclosed-think",
        "max-tokens",
        "max-tokens-thinking",
        "syntax-error",
        "two-functions",
        "no-docstring",
        "prose-on-topic",
        "refusal",
        "prose-elsewhere",
        "script-no-function",
        "no-asserts",
        "two-asserts",
        "variable-argument",
        "wrapped-call",
    ],
)
def test_broken_exercise_answers_are_rejected_with_their_reason(answer: str, finish: str, reason: str) -> None:
    got = parse_answer(EXERCISE, answer, finish)
    assert isinstance(got, Rejected) and got.reason == reason, got
    assert got.reason in REJECT_REASONS[:5] and got.detail


def test_textbook_answer_keeps_prose_and_code_without_chat_pleasantries() -> None:
    got = _accepted(TEXTBOOK, TEXTBOOK_ANSWER)
    assert got.kind == "textbook" and got.check is None and got.function is None
    assert got.text.startswith("## Memoization with a Dictionary\n\nA recursive function")
    assert got.text.endswith("with it, about sixty.\n")
    assert "```python\ndef ways_to_stack(n, memo=None):\n" in got.text
    assert "\n\n\nprint(ways_to_stack(30))" in got.text  # blank lines inside code untouched
    thinking = _accepted(TEXTBOOK, "<think>\nLet me plan the section.\n</think>\n\n" + TEXTBOOK_ANSWER)
    assert thinking.text == got.text


@pytest.mark.parametrize(
    "answer, reason",
    [
        (TEXTBOOK_ANSWER.split("```python")[0], "off_topic"),  # no example
        (TEXTBOOK_ANSWER.replace("```python", "```text"), "off_topic"),  # no python example
        (TEXTBOOK_ANSWER.replace("memo[n] = ways", "memo[n] = = ways"), "off_topic"),  # the example does not parse
        ("```python\nmemo = {}\nprint(memo)\n```", "malformed"),  # code, no prose
        (
            "## Bread\n\nSourdough needs a starter, flour, water and salt. Mix, rest the dough, fold it a few "
            "times, shape it and bake it hot in a covered pot until the crust is dark brown.\n\n"
            "```python\nbake_minutes = 45\n```\n",
            "off_topic",
        ),  # about something else
    ],
    ids=["no-code", "not-python", "does-not-parse", "no-prose", "other-subject"],
)
def test_broken_textbook_answers_are_rejected(answer: str, reason: str) -> None:
    got = parse_answer(TEXTBOOK, answer, "stop")
    assert isinstance(got, Rejected) and got.reason == reason, got


def test_concept_key_words() -> None:
    assert key_words("memoization with a dictionary") == ("memo", "dict")
    assert key_words("sieve of Eratosthenes") == ("siev", "erat")
    assert mentions("sorted(xs)", "sorting with a key function")
    assert mentions("A recursive helper...", "recursion on nested lists")
    assert not mentions("Bake the bread for 45 minutes.", "binary search")
    for topic, concepts in TOPICS.items():  # every concept can be recognised
        for concept in concepts:
            assert key_words(concept), (topic, concept)


def test_strip_think() -> None:
    assert strip_think("<think>\nplan\n</think>\n\nanswer") == "\n\nanswer"
    assert strip_think("</think>\n\nanswer") == "\n\nanswer"
    assert strip_think("no think <think>x</think>") == "no think <think>x</think>"


def test_the_seed_kind_decides_the_rules() -> None:
    as_textbook = dataclasses.replace(EXERCISE, kind="textbook", concept="generator expressions")
    got = parse_answer(as_textbook, PROSE_AROUND, "stop")  # prose plus a python example: a section
    assert isinstance(got, Candidate) and got.kind == "textbook"
