"""A teacher's answer to one seed: a candidate training document, or the reason it is rejected.

    from nanochat_trainer.datagen.answers import Candidate, Rejected, parse_answer
    got = parse_answer(seed, prefill(seed, template) + completion, finish_reason)
    if isinstance(got, Rejected):
        counts[got.reason] += 1             # one of REJECT_REASONS
    elif got.check is not None:             # an exercise: its tests still have to pass
        passed = sandbox.check(got.check).passed   # else the pipeline counts "tests_failed"

Rules, in this order (the first that applies decides):

- "empty": nothing but whitespace, or nothing once a leading <think>...</think> block is removed
  (an unclosed <think> is all thinking);
- "truncated": finish_reason "length" (the teacher hit max_tokens: the end is missing);
- exercise: the code is the first ```python (or ```py, or unlabelled) fence with a `def` in
  it (else the first), plus any later fence made only of asserts (answers that put their tests
  in a block of their own); without fences, the answer itself from its first `def`/`import`/
  `from`/`class`/`@` line, trailing prose cut off. No code at all: "off_topic" when the answer
  never mentions the concept (below), else "malformed". Code that does not parse, more than one
  top-level function, or a function without a docstring: "malformed"; code without a top-level
  function: "off_topic"; fewer than 3 asserts on that function that are plain data apart from
  the call -- `assert f(<literals>) == <literal>`, `assert f(...)`, `assert not f(...)`
  (distill.sequence's `literal_assert`), also found inside an `if __name__ == "__main__":`
  block: "no_tests";
- textbook: no ```python (or ```py) fence that parses: "off_topic"; under 20 words of prose
  outside the fences: "malformed"; never mentions the concept: "off_topic".

"Mentions the concept": one of the concept's key words -- its words of 3+ letters minus a few
stop words, compared by their first 4 letters (so "recursion" matches "recursive") -- occurs
in the answer, case-insensitively. It is a cheap guard against an answer about something else,
not a judgement of quality.

The document an exercise becomes is a clean .py file made of the code's own lines: the imports,
helper classes and constants, the function with its docstring, then the literal asserts, with
PEP 8 blank lines between groups. Everything else (prints, a main guard, a module docstring,
asserts that are not plain data) is left out, so every assert in the document is one the sandbox
runs. A textbook section is the answer's Markdown, think block and chat pleasantries ("Sure!
Here is...", "Let me know if...") removed.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from ..distill.sequence import literal_assert
from ..eval.sandbox import CheckTask
from .seeds import Kind, Seed

REJECT_REASONS: tuple[str, ...] = (
    # decided here
    "empty",
    "truncated",
    "malformed",
    "off_topic",
    "no_tests",
    # decided by the pipeline
    "tests_failed",
    "duplicate",
    "near_duplicate",
    "contaminated",
    "teacher_error",
)
MIN_TESTS = 3
MIN_PROSE_WORDS = 20
PYTHON_FENCES = ("python", "python3", "py", "")
STOP_WORDS = frozenset({"and", "the", "for", "with", "from", "into", "like", "using", "its", "two", "one"})

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.M | re.S)
_THINK = re.compile(r"^\s*<think>.*?(?:</think>|\Z)", re.S)
_CODE_START = re.compile(r"^(?:async def |def |import |from \S+ import |class |@)", re.M)
_OPENER = re.compile(r"^(?:sure|certainly|of course|absolutely|great|here is|here's|below is)\b", re.I)
_CLOSER = re.compile(r"^(?:let me know|i hope|hope this|feel free|would you like|if you'd like|if you want)\b", re.I)


@dataclass(frozen=True)
class Rejected:
    reason: str  # one of REJECT_REASONS
    detail: str  # what was wrong, for the log (short)


@dataclass(frozen=True)
class Candidate:
    text: str  # the training document
    kind: Kind
    check: CheckTask | None  # an exercise's sandbox task: the program without its asserts, the asserts as test
    function: str | None  # an exercise's function name


def parse_answer(seed: Seed, text: str, finish_reason: str | None) -> Candidate | Rejected:
    """The candidate document in a teacher's answer to `seed`, or why there is none (see the module doc)."""
    if not text.strip():
        return Rejected("empty", "no text")
    if finish_reason == "length":
        return Rejected("truncated", f"stopped at max_tokens after {len(text)} characters")
    answer = strip_think(text)
    if not answer.strip():
        return Rejected("empty", "only a think block")
    return _exercise(seed, answer) if seed.kind == "exercise" else _textbook(seed, answer)


def strip_think(text: str) -> str:
    """The answer without a leading <think>...</think> block (a stray leading </think> too)."""
    text = _THINK.sub("", text, count=1)
    return re.sub(r"^\s*</think>", "", text, count=1)


def python_blocks(text: str, labelled: bool = False) -> list[str]:
    """The contents of the ```python (```py, ```python3 and, unless `labelled`, unlabelled)
    fences, in order; an unclosed last fence runs to the end."""
    langs = PYTHON_FENCES[:-1] if labelled else PYTHON_FENCES
    return [m.group(2) for m in _FENCE.finditer(text) if m.group(1).lower() in langs]


def key_words(concept: str) -> tuple[str, ...]:
    """The stems (first 4 letters) of the concept's words that say what it is about."""
    words = re.findall(r"[a-z][a-z0-9]*", concept.lower())
    return tuple(dict.fromkeys(w[:4] for w in words if len(w) >= 3 and w not in STOP_WORDS))


def mentions(text: str, concept: str) -> bool:
    low = text.lower()
    return any(stem in low for stem in key_words(concept))


def _exercise(seed: Seed, answer: str) -> Candidate | Rejected:
    code = _exercise_code(answer)
    if code is None:
        if not mentions(answer, seed.concept):
            return Rejected("off_topic", f"no code, and no word of {seed.concept!r}")
        return Rejected("malformed", "no python code")
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as exc:
        return Rejected("malformed", f"does not parse: {exc}"[:200])
    functions = [s for s in tree.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not functions:
        return Rejected("off_topic", "no top-level function")
    if len(functions) > 1:
        return Rejected("malformed", f"{len(functions)} top-level functions: {', '.join(f.name for f in functions)}")
    fn = functions[0]
    if ast.get_docstring(fn) is None:
        return Rejected("malformed", f"{fn.name}() has no docstring")
    program = [s for s in tree.body if _belongs_to_program(s, fn)]
    tests = [s for s in _top_level_asserts(tree) if literal_assert(s, fn.name)]
    if len(tests) < MIN_TESTS:
        return Rejected("no_tests", f"{len(tests)} literal asserts on {fn.name}(), {MIN_TESTS} needed")
    program_text, test_text = _render(code, program), _render(code, tests)
    called = sorted(
        {n.func.id for n in ast.walk(ast.parse(test_text)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    )
    return Candidate(
        text=f"{program_text}\n\n\n{test_text}\n",
        kind="exercise",
        check=CheckTask(program=program_text + "\n", test=test_text, proxied=tuple(called)),
        function=fn.name,
    )


def _exercise_code(answer: str) -> str | None:
    """The code of an exercise answer (see the module doc), or None when there is none."""
    blocks = python_blocks(answer)
    if blocks:
        first = next((i for i, b in enumerate(blocks) if re.search(r"^(?:async )?def ", b, re.M)), 0)
        return "\n".join([blocks[first], *(b for b in blocks[first + 1 :] if _only_asserts(b))])
    start = _CODE_START.search(answer)
    if start is None:
        return None
    lines = answer[start.start() :].splitlines()
    for end in range(len(lines), 0, -1):  # cut prose after the code, a line at a time
        code = "\n".join(lines[:end])
        if _parses(code):
            return code
    return None


def _only_asserts(code: str) -> bool:
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError):
        return False
    return bool(body) and all(isinstance(s, ast.Assert) for s in body)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _belongs_to_program(stmt: ast.stmt, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """What the function needs: imports, helper classes, constants (assignments that do not call it)."""
    if stmt is fn or isinstance(stmt, (ast.Import, ast.ImportFrom, ast.ClassDef)):
        return True
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        return not any(isinstance(n, ast.Name) and n.id == fn.name for n in ast.walk(stmt))
    return False


def _top_level_asserts(tree: ast.Module) -> list[ast.stmt]:
    """Top-level statements, with the body of an `if __name__ == "__main__":` block in its place."""
    out: list[ast.stmt] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "__name__" in ast.unparse(stmt.test):
            out.extend(stmt.body)
        else:
            out.append(stmt)
    return out


def _render(code: str, stmts: list[ast.stmt]) -> str:
    """The statements' own lines (a definition from its first decorator), imports and asserts
    one per line, two blank lines around definitions."""
    lines = code.splitlines()
    out: list[str] = []
    previous: ast.stmt | None = None
    for stmt in stmts:
        start = min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", []))])
        text = "\n".join(lines[start - 1 : stmt.end_lineno])
        indent = len(text) - len(text.lstrip())
        text = "\n".join(line[indent:] for line in text.splitlines()).rstrip()  # asserts hoisted from a main guard
        if previous is not None:
            out.append("\n" if type(stmt) is type(previous) and not _is_definition(stmt) else "\n\n\n")
        out.append(text)
        previous = stmt
    return "".join(out)


def _is_definition(stmt: ast.stmt) -> bool:
    return isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))


def _textbook(seed: Seed, answer: str) -> Candidate | Rejected:
    text = _without_pleasantries(answer.strip())
    if not any(_parses(b) for b in python_blocks(text, labelled=True)):
        return Rejected("off_topic", "no python example that parses")
    prose = _FENCE.sub(" ", text)
    if len(prose.split()) < MIN_PROSE_WORDS:
        return Rejected("malformed", f"{len(prose.split())} words of prose, {MIN_PROSE_WORDS} needed")
    if not mentions(text, seed.concept):
        return Rejected("off_topic", f"no word of {seed.concept!r}")
    return Candidate(text=text + "\n", kind="textbook", check=None, function=None)


def _without_pleasantries(text: str) -> str:
    """Drop a first paragraph that answers the request ("Sure! Here is ...") and a last one that
    offers more ("Let me know if ..."): they talk to the requester, not the reader. Cut, not
    re-joined, so the blank lines inside code stay as they were."""
    breaks = list(re.finditer(r"\n[ \t]*\n", text))
    if breaks and _OPENER.match(text) and "```" not in text[: breaks[0].start()]:
        text = text[breaks[0].end() :].lstrip()
        breaks = list(re.finditer(r"\n[ \t]*\n", text))
    if breaks and _CLOSER.match(text[breaks[-1].end() :].lstrip()) and "```" not in text[breaks[-1].end() :]:
        text = text[: breaks[-1].start()]
    return text.strip()
