"""What to ask the teacher for: seeds over a taxonomy of Python topics, and the prompt text.

    from nanochat_trainer.datagen.seeds import build_prompt, prefill, seed_at, STOP
    s = seed_at(index=41, seed=0)              # Seed(kind="exercise", topic="graphs", concept=...)
    prompt = build_prompt(s, "qwen3")          # the exact text sent to /v1/completions
    stop = STOP[("qwen3", s.kind)]             # stop sequences for that request
    answer = prefill(s, "qwen3") + completion  # what answers.parse_answer reads

phi-1 ("Textbooks Are All You Need") got diversity from the prompts, not the sampler: each
request names a topic, one of its concepts, a difficulty, a style and a domain for the names
and data, so two requests rarely ask for the same thing. `seed_at` draws those from a hash of
(seed, index): any document of the stream is known in O(1), a resumed run asks for exactly the
prompts it asked for before, and over many indices every topic, difficulty, style and domain
comes up about equally often (topics uniformly, then a concept uniformly within its topic).

Templates: "chatml" is ChatML (Qwen2.5, Qwen3-*-Instruct-2507, most instruct models served by
vLLM's completions endpoint); "qwen3" is the hybrid-thinking Qwen3 with thinking off, exactly
what its chat template renders for `enable_thinking=False`: ChatML plus an empty think block
after the assistant header; "plain" is for base models (our own `nanochat serve`): the start
of a Python file (exercise) or of a textbook page (textbook) that the model continues. The
part of a plain prompt that belongs to the document ("def", the section heading) is
`prefill(seed, template)`: prepend it to the completion before parsing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["exercise", "textbook"]
Template = Literal["qwen3", "chatml", "plain"]
TEMPLATES: tuple[Template, ...] = ("qwen3", "chatml", "plain")

# One topic a line, "topic: concept; concept; ...", an indented line continuing the one above.
_TAXONOMY = """
strings: slicing and indexing; case conversion; str.join and str.split; palindromes; character counting;
    string padding and alignment; substring search; anagrams
lists: list slicing; in-place reversal; rotation; flattening nested lists; chunking into groups;
    removing duplicates while keeping order; merging two sorted lists; running totals
dictionaries: grouping values by key; inverting a mapping; merging dictionaries; default values with get;
    nested dictionaries; sorting by value; counting with a dictionary
sets: set intersection; set difference; symmetric difference; subset tests; unique elements; frozenset keys
tuples and unpacking: tuple unpacking; swapping values; returning several values; star unpacking;
    named fields with namedtuple; comparing tuples lexicographically
comprehensions: list comprehensions; conditional comprehensions; nested comprehensions; dictionary comprehensions;
    set comprehensions; generator expressions
recursion: base cases; recursive sums; recursion on nested lists; mutual recursion; memoization with a dictionary;
    recursive permutations; divide and conquer
sorting: sorting with a key function; stable sorting; sorting by several keys; insertion sort; merge sort;
    counting sort; partial sorting with heapq
searching: linear search; binary search; bisect module; searching a rotated array; finding the first match;
    two-pointer search; lower and upper bounds
number theory: greatest common divisor; least common multiple; prime testing; sieve of Eratosthenes;
    prime factorization; modular arithmetic; digit sums; perfect numbers
arithmetic: integer division and remainder; rounding; base conversion; fractions module; decimal precision;
    overflow-free averaging; powers and roots
dates and times: datetime arithmetic; leap years; day of the week; parsing date strings; timedelta durations;
    formatting dates; time zones with fixed offsets
parsing: parsing key=value pairs; tokenizing expressions; parsing CSV lines; parsing integers safely;
    balanced brackets; parsing version strings; parsing durations like 1h30m
text processing: word frequencies; line wrapping; title casing; removing punctuation; longest word;
    sentence splitting; run-length encoding; caesar cipher
regular expressions: re.findall; capture groups; named groups; re.sub with a function; validating formats;
    splitting with re.split; non-greedy matching
matrices: matrix transpose; matrix multiplication; spiral order; rotating a matrix; diagonal sums;
    neighbors in a grid; identity matrix
graphs: adjacency lists; breadth-first search; depth-first search; connected components; cycle detection;
    topological sort; shortest path in a grid; bipartite check
trees: binary tree as nested tuples; tree depth; tree traversal orders; binary search tree insert;
    lowest common ancestor; tree from parent array
dynamic programming: fibonacci with tabulation; climbing stairs; coin change; longest common subsequence; knapsack;
    edit distance; longest increasing subsequence; grid paths
greedy algorithms: interval scheduling; making change greedily; jump game; assigning tasks; minimum platforms;
    fractional knapsack
bit manipulation: counting set bits; power of two test; xor tricks; bit masks; shifting; gray code;
    single number with xor
geometry: distance between points; polygon area with the shoelace formula; point in rectangle; line intersection;
    triangle classification; manhattan distance; convex hull
iterators and generators: yield; itertools.islice; itertools.groupby; infinite generators; zip and enumerate;
    sliding windows; itertools.accumulate; pairwise
functions: default arguments; keyword-only arguments; closures; higher-order functions; decorators;
    variable arguments with *args; lambda expressions
classes: dataclasses; properties; __eq__ and __hash__; inheritance; __repr__; class methods; operator overloading;
    __lt__ for sorting
exceptions: try and except; raising ValueError; custom exceptions; finally blocks; validating input;
    else clause of try; exception chaining
functional programming: map and filter; functools.reduce; functools.partial; pure functions; function composition;
    sorted with key and reverse; any and all
stacks and queues: stack with a list; queue with collections.deque; monotonic stack; evaluating postfix expressions;
    next greater element; min stack; circular buffer
linked structures: linked list as nested pairs; reversing a linked list; cycle detection in sequences;
    merging linked lists; doubly ended traversal
intervals: merging overlapping intervals; interval intersection; inserting an interval; total covered length;
    meeting rooms; free time between intervals
counting and hashing: collections.Counter; frequency of frequencies; two-sum with a dictionary;
    first unique character; majority element; hashing tuples as keys
simulation: game of life step; robot moves on a grid; bank account ledger; elevator simulation;
    queue at a ticket counter; dice game scoring; traffic light cycle
combinatorics: factorials; binomial coefficients; permutations; combinations with itertools; pascal's triangle;
    counting subsets; catalan numbers
heaps and priority queues: heapq.heappush; k largest elements; merging sorted streams; running median;
    task scheduling by priority; heapq.nsmallest
string algorithms: longest common prefix; string rotation check; longest palindromic substring; pattern matching;
    edit operations; string compression
statistics: mean median and mode; variance; moving average; percentiles; normalizing values; histogram buckets;
    correlation
sliding window: fixed-size window sums; longest substring without repeats; minimum window length;
    window maximum with deque; counting subarrays with a target sum
two pointers: pair with a target sum; removing elements in place; container with most water; three-sum;
    partitioning around a pivot; comparing strings with backspaces
"""


def _parse_taxonomy(table: str) -> dict[str, tuple[str, ...]]:
    joined = re.sub(r"\n[ \t]+", " ", table.strip())
    rows = (line.split(":", 1) for line in joined.splitlines())
    return {topic.strip(): tuple(c.strip() for c in concepts.split(";")) for topic, concepts in rows}


TOPICS: dict[str, tuple[str, ...]] = _parse_taxonomy(_TAXONOMY)
DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")
EXERCISE_STYLES: dict[str, str] = {
    "docstring with doctest examples": "the docstring states the task and shows two `>>>` examples",
    "short one-line specification": "the docstring is a single precise sentence",
    "story/word problem": "the docstring tells a short story about the domain that poses the problem",
    "edge-case heavy": "the docstring names the edge cases (empty input, ties, negatives) and the asserts test them",
    "formal specification": "the docstring lists Args, Returns and Raises like a reference manual",
    "constraints first": "the docstring states the input constraints, then the task",
}
TEXTBOOK_STYLES: dict[str, str] = {
    "tutorial": "a step-by-step tutorial that builds the idea up from a tiny example",
    "worked example": "one realistic worked example, explained line by line",
    "common pitfalls": "the mistakes beginners make with it, each with the wrong and the right code",
    "compare two approaches": "two ways to do it, compared for clarity and cost",
    "from first principles": "why it works, then how to use it",
    "exercise with solution": "a small exercise, then its solution with an explanation",
}
DOMAINS: tuple[str, ...] = (
    "inventory",
    "weather",
    "students",
    "library books",
    "recipes",
    "sports scores",
    "bank accounts",
    "train schedules",
    "music playlists",
    "online orders",
    "hospital patients",
    "chess games",
    "gardening",
    "space missions",
    "movie ratings",
    "employees",
    "parking lots",
    "social network",
    "warehouse robots",
    "board games",
    "elections",
    "astronomy",
    "traffic",
    "bakery",
    "museum exhibits",
    "fitness tracking",
    "hotel bookings",
    "stock prices",
    "file systems",
    "postal codes",
    "genetics",
    "chat messages",
)

SYSTEM = "You are an expert Python teacher who writes clear, correct teaching material for a programming textbook."
EXERCISE_RULES = """Answer with exactly one ```python code block containing, in this order:
1. the imports the solution needs, if any (standard library only);
2. ONE top-level function, with a docstring that states the task;
3. at least 3 test lines of the form `assert function_name(...) == ...` right after the function, whose arguments and \
expected values are literals (numbers, strings, lists, tuples, dicts, sets, True, False, None).
The function must return plain data. No print calls, no input(), no other top-level functions, no \
`if __name__ == "__main__":` block. Every assert must pass."""
TEXTBOOK_RULES = """Write a short textbook section (200 to 500 words) that teaches the concept: prose that \
explains it, and at least one complete ```python example that runs as is. Use Markdown, start with a `## ` heading, \
and do not talk to the reader about this request."""
# ChatML's end of turn and Qwen's end of text; vLLM usually stops at them by itself (skipping special tokens).
CHAT_STOP = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
STOP: dict[tuple[str, str], tuple[str, ...]] = {
    ("qwen3", "exercise"): CHAT_STOP,
    ("qwen3", "textbook"): CHAT_STOP,
    ("chatml", "exercise"): CHAT_STOP,
    ("chatml", "textbook"): CHAT_STOP,
    # A base model writing a Python file goes on to the next function or the next file: stop there
    # (not at "\nassert ": the asserts are part of the exercise).
    ("plain", "exercise"): ("\ndef ", "\nclass ", "\nif __name__", '\n"""', "\nprint(", "<|endoftext|>"),
    # ... and a textbook page to the next section (not at "\n# ": a comment in a code block).
    ("plain", "textbook"): ("\n## ", "\n---", "<|endoftext|>"),
}
QWEN3_NO_THINK = "<think>\n\n</think>\n\n"  # what Qwen3's template appends for enable_thinking=False


@dataclass(frozen=True)
class Seed:
    index: int
    kind: Kind
    topic: str
    concept: str
    difficulty: str
    style: str
    domain: str


_TOPIC_NAMES = tuple(TOPICS)


def seed_at(index: int, seed: int, exercise_share: float = 0.8) -> Seed:
    """Document `index` of stream `seed`: each field from its own 8 bytes of one blake2b digest."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=48).digest()
    u = [int.from_bytes(digest[i : i + 8], "little") for i in range(0, 48, 8)]
    kind: Kind = "exercise" if u[0] / 2**64 < exercise_share else "textbook"
    topic = _TOPIC_NAMES[u[1] % len(_TOPIC_NAMES)]
    concepts = TOPICS[topic]
    styles = tuple(EXERCISE_STYLES if kind == "exercise" else TEXTBOOK_STYLES)
    return Seed(
        index=index,
        kind=kind,
        topic=topic,
        concept=concepts[u[2] % len(concepts)],
        difficulty=DIFFICULTIES[u[3] % len(DIFFICULTIES)],
        style=styles[u[4] % len(styles)],
        domain=DOMAINS[u[5] % len(DOMAINS)],
    )


def combinations() -> int:
    """How many distinct seeds exist (the index aside): exercises plus textbook sections."""
    pairs = sum(len(c) for c in TOPICS.values())
    return pairs * len(DIFFICULTIES) * len(DOMAINS) * (len(EXERCISE_STYLES) + len(TEXTBOOK_STYLES))


def build_prompt(seed: Seed, template: Template) -> str:
    """The exact text sent to `/v1/completions` for this seed."""
    if template == "plain":
        return _plain_prompt(seed)
    user = _exercise_request(seed) if seed.kind == "exercise" else _textbook_request(seed)
    chat = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if template == "qwen3":
        return chat + QWEN3_NO_THINK
    if template == "chatml":
        return chat
    raise ValueError(f"unknown prompt template {template!r}: one of {', '.join(TEMPLATES)}")


def prefill(seed: Seed, template: Template) -> str:
    """The end of the prompt that belongs to the document: prepend it to the completion."""
    if template != "plain":
        return ""
    # No trailing space or newline: the model's next token carries it, as in the text it learned from.
    return "def" if seed.kind == "exercise" else f"## {_title(seed.concept)}"


def _exercise_request(seed: Seed) -> str:
    return (
        f"Write a Python exercise ({seed.difficulty}) about {seed.topic}, focused on {seed.concept}. "
        f"Set it in the domain of {seed.domain}: choose the function name, the variable names and the test data "
        f"from that domain.\nStyle of the task statement ({seed.style}): {EXERCISE_STYLES[seed.style]}.\n\n"
        + EXERCISE_RULES
    )


def _textbook_request(seed: Seed) -> str:
    return (
        f"Write a section of a Python textbook about {seed.topic}: {seed.concept}. Level: {seed.difficulty}. "
        f"Draw the examples from the domain of {seed.domain}.\nForm ({seed.style}): {TEXTBOOK_STYLES[seed.style]}.\n\n"
        + TEXTBOOK_RULES
    )


def _plain_prompt(seed: Seed) -> str:
    """A base model follows no instructions, but it continues a file whose opening states what
    comes next: a module docstring for an exercise, a textbook page's header for a section."""
    if seed.kind == "exercise":
        return (
            f'"""Exercise ({seed.difficulty}): {seed.topic} -- {seed.concept}.\n\n'
            f"One function about {seed.domain}, with a docstring: {EXERCISE_STYLES[seed.style]}.\n"
            'Then at least three asserts that check it on literal values.\n"""\n\n\n' + prefill(seed, "plain")
        )
    return (
        f"# Python for everyone, chapter: {_title(seed.topic)}\n\n"
        f"In this section ({seed.concept}): {TEXTBOOK_STYLES[seed.style]}. Level: {seed.difficulty}; "
        f"examples about {seed.domain}, in runnable ```python blocks.\n\n" + prefill(seed, "plain")
    )


def _title(concept: str) -> str:
    return concept[:1].upper() + concept[1:]
