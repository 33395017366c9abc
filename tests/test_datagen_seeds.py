"""Seeds and prompts of the generate stage (datagen/seeds.py).

.venv/bin/pytest tests/test_datagen_seeds.py -q
"""

from __future__ import annotations

import ast
from collections import Counter

import pytest

from nanochat_trainer.datagen.seeds import (
    DIFFICULTIES,
    DOMAINS,
    EXERCISE_RULES,
    EXERCISE_STYLES,
    QWEN3_NO_THINK,
    STOP,
    TEMPLATES,
    TEXTBOOK_RULES,
    TEXTBOOK_STYLES,
    TOPICS,
    Seed,
    build_prompt,
    combinations,
    prefill,
    seed_at,
)

N = 10_000


def test_taxonomy_shape() -> None:
    assert 30 <= len(TOPICS) <= 40
    for topic, concepts in TOPICS.items():
        assert 5 <= len(concepts) <= 10, topic
        assert len(set(concepts)) == len(concepts) and all(c and c == c.strip() for c in concepts), topic
    assert len(DIFFICULTIES) == 3 and len(EXERCISE_STYLES) >= 4 and len(TEXTBOOK_STYLES) >= 4 and len(DOMAINS) >= 20
    pairs = sum(len(c) for c in TOPICS.values())
    assert combinations() == pairs * 3 * len(DOMAINS) * (len(EXERCISE_STYLES) + len(TEXTBOOK_STYLES)) > 100_000


def test_seeds_are_deterministic_and_depend_on_seed_and_index() -> None:
    a = [seed_at(i, seed=7) for i in range(200)]
    assert a == [seed_at(i, seed=7) for i in range(200)]
    assert [s.index for s in a] == list(range(200))
    assert sum(x != y for x, y in zip(a, [seed_at(i, seed=8) for i in range(200)])) > 190
    assert len({(s.kind, s.topic, s.concept, s.difficulty, s.style, s.domain) for s in a}) == 200
    assert seed_at(123_456_789_012, seed=7) == seed_at(123_456_789_012, seed=7)  # any index, O(1)


def test_seeds_spread_evenly_over_the_taxonomy() -> None:
    seeds = [seed_at(i, seed=0) for i in range(N)]
    kinds = Counter(s.kind for s in seeds)
    assert abs(kinds["exercise"] / N - 0.8) < 0.02
    for field, values in [("topic", TOPICS), ("difficulty", DIFFICULTIES), ("domain", DOMAINS)]:
        counts = Counter(getattr(s, field) for s in seeds)
        mean = N / len(values)
        assert set(counts) == set(values), field
        assert all(abs(c - mean) < 0.3 * mean for c in counts.values()), (field, counts.most_common())
    for kind, styles in [("exercise", EXERCISE_STYLES), ("textbook", TEXTBOOK_STYLES)]:
        counts = Counter(s.style for s in seeds if s.kind == kind)
        mean = kinds[kind] / len(styles)
        assert set(counts) == set(styles) and all(abs(c - mean) < 0.3 * mean for c in counts.values()), kind
    for topic, concepts in TOPICS.items():  # concepts: evenly within their topic
        counts = Counter(s.concept for s in seeds if s.topic == topic)
        assert set(counts) == set(concepts), topic
        assert max(counts.values()) < 3 * min(counts.values()), (topic, counts)


@pytest.mark.parametrize("share, kinds", [(0.0, {"textbook"}), (1.0, {"exercise"})])
def test_exercise_share(share: float, kinds: set[str]) -> None:
    assert {seed_at(i, seed=0, exercise_share=share).kind for i in range(500)} == kinds


EX = Seed(3, "exercise", "graphs", "breadth-first search", "hard", "edge-case heavy", "train schedules")
TB = Seed(4, "textbook", "sorting", "merge sort", "easy", "common pitfalls", "library books")


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("seed", [EX, TB], ids=["exercise", "textbook"])
def test_every_prompt_names_the_concept_and_the_task(seed: Seed, template: str) -> None:
    prompt = build_prompt(seed, template)  # type: ignore[arg-type]
    for word in (seed.concept, seed.topic, seed.difficulty, seed.domain):
        assert word.lower() in prompt.lower(), (word, template)
    assert (EXERCISE_STYLES if seed.kind == "exercise" else TEXTBOOK_STYLES)[seed.style] in prompt
    assert prompt.endswith(prefill(seed, template))  # type: ignore[arg-type]
    assert STOP[(template, seed.kind)]
    if template == "plain":
        return
    assert (EXERCISE_RULES if seed.kind == "exercise" else TEXTBOOK_RULES) in prompt
    assert prompt.startswith("<|im_start|>system\n") and prompt.count("<|im_start|>") == 3
    assert prompt.count("<|im_end|>") == 2 and "<|im_start|>user\n" in prompt
    head = prompt.removesuffix(QWEN3_NO_THINK) if template == "qwen3" else prompt
    assert head.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert (template == "qwen3") == prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_exercise_rules_ask_for_what_the_parser_keeps() -> None:
    for needle in ("```python", "ONE top-level function", "docstring", "at least 3", "assert ", "literals", "input()"):
        assert needle in EXERCISE_RULES, needle
    assert "```python" in TEXTBOOK_RULES and "## " in TEXTBOOK_RULES


def test_plain_prompts_are_files_a_base_model_continues() -> None:
    ex = build_prompt(EX, "plain")
    assert prefill(EX, "plain") == "def" and ex.endswith('"""\n\n\ndef')
    completed = ex + " shortest_hops(graph, start):\n    return 0\n\n\nassert shortest_hops({}, 1) == 0\n"
    module = ast.parse(completed)  # a module docstring stating the task, then the function
    assert isinstance(module.body[0], ast.Expr) and "breadth-first search" in ast.get_docstring(module)  # type: ignore[operator]
    tb = build_prompt(TB, "plain")
    assert prefill(TB, "plain") == "## Merge sort" and tb.endswith("\n\n## Merge sort")
    assert "\n## " in STOP[("plain", "textbook")] and "\n# " not in STOP[("plain", "textbook")]  # code comments
    assert "\ndef " in STOP[("plain", "exercise")] and "\nassert " not in STOP[("plain", "exercise")]  # the tests


def test_unknown_template() -> None:
    with pytest.raises(ValueError, match="unknown prompt template"):
        build_prompt(EX, "llama")  # type: ignore[arg-type]
