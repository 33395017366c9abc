"""Real code every trainer has: the Python standard library of the interpreter that runs it.

    files = stdlib_files()      # its non-test modules, sorted; ~600 files, ~11 MB (~3M GPT-2 tokens)

The data source `stdlib` (`data.source` or `validation.data.source`) reads these files as a
local folder is read. Its point is validation: code no generator wrote, written by people for
people, that no machine and no test needs to download. Left out: test suites (which would
teach asserts of a test runner, not library code), generated tables (`encodings`' codecs,
`pydoc_data`' topics) and whatever is installed into the interpreter (`site-packages`).
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

# Folders (at any depth) whose files are not library code written by hand.
EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
        "lib2to3",  # its grammar tables and fixers' tests
    }
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's non-test modules, sorted by path (the same list on every rank)."""
    root = stdlib_root()
    return tuple(
        sorted(
            p
            for p in root.rglob("*.py")
            if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and not p.name.startswith("test_")
        )
    )
