"""Exact and near-duplicate detection over the documents kept so far (MinHash LSH, datasketch).

    from nanochat_trainer.datagen.dedup import Deduper
    dedup = Deduper(threshold=0.8)
    dedup.check_and_add("doc-1", text)     # None: new, and remembered
    dedup.check_and_add("doc-2", text)     # "duplicate"
    dedup.check_and_add("doc-3", renamed)  # "near_duplicate"; dedup.last_match == "doc-1"

Exact: the sha256 of the text with its whitespace runs made single spaces. Near: a Jaccard
similarity of at least `threshold`, estimated by MinHash, of the sets of `shingle`-token runs of
the normalised tokens:

- tokens are words, numbers and single punctuation characters, lower-cased, so reformatting
  (spaces, line breaks, indentation) changes nothing;
- the names the code defines (functions, parameters, assigned variables, classes; found with
  `ast` in the document, or in its ```python blocks) all become "v", everywhere in the text,
  so a copy with a variable renamed is the same token stream. (Not v0, v1, ... by first
  appearance: one name mentioned earlier, in a docstring, would renumber all the others.)
  Other words (prose, docstrings, library names) stay as they are.

LSH (`datasketch.MinHashLSH`) only proposes candidates: its bands (`bands`) make a pair at the
threshold a candidate with probability RECALL, so they also propose many pairs below it, and each
candidate is confirmed by the MinHash estimate against its stored signature (num_perm * 4 bytes
a document). datasketch's own bands for the threshold, taken as the verdict, missed more than
half the pairs at it, and it finds none above 0.98. The estimate's own noise remains: a pair
within a few hundredths of the threshold goes either way.
Deterministic: a fixed MinHash seed, and answers that depend only on the texts added before,
in order, so a resumed run that re-adds its kept documents in order is in the same state. Keys
are the caller's labels for `last_match`; they need not be unique.
"""

from __future__ import annotations

import ast
import hashlib
import re

import numpy as np
from datasketch import MinHash, MinHashLSH

SEED = 1  # MinHash permutations: fixed, so every run (and every resume) hashes alike
RECALL = 0.995  # chance that the LSH proposes a pair whose Jaccard similarity is exactly the threshold
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?|[^\w\s]")
PYTHON_FENCE = re.compile(r"^[ \t]*```[ \t]*(?:python3?|py)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.M | re.S)


class Deduper:
    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5):
        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        self._lsh = MinHashLSH(num_perm=num_perm, params=bands(threshold, num_perm))
        self._empty = MinHash(num_perm=num_perm, seed=SEED)  # copied per document: permutations made once
        self._signatures = bytearray()  # document n's MinHash: num_perm uint32 from n * num_perm * 4 on
        self._exact: dict[bytes, int] = {}
        self._keys: list[str] = []
        self.last_match: str | None = None  # the key of the document the last duplicate matched

    def __len__(self) -> int:
        return len(self._keys)

    def check_and_add(self, key: str, text: str) -> str | None:
        """ "duplicate", "near_duplicate", or None after remembering the text under `key`."""
        digest = hashlib.sha256(" ".join(text.split()).encode()).digest()
        if digest in self._exact:
            self.last_match = self._keys[self._exact[digest]]
            return "duplicate"
        minhash = self.minhash(text)
        signature = minhash.hashvalues.astype(np.uint32)
        hits = [n for n in self._lsh.query(minhash) if self._similarity(n, signature) >= self.threshold]
        if hits:
            self.last_match = self._keys[min(hits)]  # the earliest, whatever order the buckets keep
            return "near_duplicate"
        self.last_match = None
        n = len(self._keys)
        self._keys.append(key)
        self._exact[digest] = n
        self._lsh.insert(n, minhash, check_duplication=False)
        self._signatures += signature.tobytes()
        return None

    def _similarity(self, n: int, signature: np.ndarray) -> float:
        """The MinHash estimate of the Jaccard similarity of document n and `signature`."""
        stored = np.frombuffer(self._signatures, np.uint32, self.num_perm, n * self.num_perm * 4)
        return np.count_nonzero(stored == signature) / self.num_perm

    def minhash(self, text: str) -> MinHash:
        tokens = normalized_tokens(text)
        k = min(self.shingle, len(tokens)) or 1
        shingles = {" ".join(tokens[i : i + k]).encode() for i in range(max(1, len(tokens) - k + 1))}
        m = self._empty.copy()
        m.update_batch(shingles)
        return m


def bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) of the LSH index: the most rows per band (the fewest candidates to
    confirm) with which a pair at `threshold` is a candidate with probability RECALL, or one row per
    band (every permutation a band) where none reaches it."""
    for rows in range(num_perm // 2, 0, -1):
        if 1 - (1 - threshold**rows) ** (num_perm // rows) >= RECALL:
            return num_perm // rows, rows
    return num_perm, 1


def normalized_tokens(text: str) -> list[str]:
    """Lower-cased word, number and punctuation tokens, the code's own names all "v"."""
    names = defined_names(text)
    return ["v" if token in names else token.lower() for token in _TOKEN.findall(text)]


def defined_names(text: str) -> set[str]:
    """The names a Python text (or a Markdown text's ```python blocks) defines: functions,
    classes, parameters, assigned and loop variables. Empty when nothing parses."""
    tree = _tree(text)
    trees = [tree] if tree is not None else [t for t in map(_tree, PYTHON_FENCE.findall(text)) if t is not None]
    return set().union(*map(defined_in, trees))


def defined_in(tree: ast.AST) -> set[str]:
    """The names a syntax tree defines (see `defined_names`)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _tree(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError):
        return None
