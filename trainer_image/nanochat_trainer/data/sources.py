"""Documents (plain text) from the configured source, sharded by rank.

    from nanochat_trainer.data.sources import iter_documents, iter_indexed
    for text in iter_documents(cfg.data, rank, world): ...          # endless
    for index, text in iter_indexed(cfg.data, rank, world, start=n): ...
    iter_indexed(cfg.data, heldout=True, repeat=False)              # the held-out share, once

Every source is seen as one endless sequence of documents with global indices 0, 1,
2, ...; rank r of W gets the indices i with i % W == r, so ranks read disjoint shares
and the union over ranks does not depend on W. Finite sources repeat (the index keeps
counting through later passes) unless `repeat=False`.

- synthetic: `synthetic.document(seed, i)`; any index is reachable in O(1).
- local: `data.path` is a generation run's dataset folder (`shards.py`: its manifest lists
  Parquet shards; the documents are their `text` column), a folder (files matching
  `data.glob`, in a seeded order that is reshuffled every pass; O(1) to reach any index),
  a `.jsonl` file (key
  `data.text_field` of each line) or a `.parquet` file (column `data.text_field`).
  JSONL and Parquet are read front to back, so reaching index n means reading n rows.
  When `data.glob` matches `.jsonl` or `.parquet` files (The Stack's `data/python/*.parquet`),
  their rows are the documents, not the files: the files are read one after the other, in a
  seeded order reshuffled every pass, as one long file.
- stdlib: the Python standard library's modules (`stdlib.py`), read as a local folder.
- huggingface: `datasets.load_dataset(data.dataset, data_dir=..., split=..., streaming=True)`
  with the token from `$data.token_env`, split across ranks with
  `datasets.distributed.split_dataset_by_node`. That splits by example (the layout
  above) unless the dataset's file count is a multiple of W, in which case each rank
  streams whole files: faster, but then what a rank sees depends on W. Reaching index n
  means streaming past the rank's first n / W examples. A finite dataset lines up across
  world sizes in its first pass only: each rank's split restarts at every pass, so its j-th
  example stays index rank + W * j, which is example (rank + W * j) mod length, as one process
  numbers it, only when the length is a multiple of W. Matching them would need every rank to
  stream every example.

A mixture (`data.source: mixture`) interleaves its sources block by block (`mixture.py`); each
source is read as above, sharded by rank, from where the mixture left it.

Every document is checked against HumanEval (`decontam.py`, `data.decontaminate`, on by default):
one that shares a 13-gram with a problem's prompt or solution keeps its index but comes back
empty, so indices, sharding and resuming do not change.

Held-out repositories (`data.holdout_repos` > 0): a document belongs to a repository (the
`data.repo_field` of a JSONL, Parquet or dataset row, as The Stack's `max_stars_repo_name`;
the first folder under `data.path` of a local folder of plain files), and the repositories
whose name hashes below `holdout_repos` are held out: training never reads a file of theirs,
`heldout=True` reads only those. Split before numbering, so indices and resuming work as
without it.

Texts are `str` that any tokenizer accepts: a null text is an empty document, and a lone
surrogate (JSON may hold "\\udce9") becomes U+FFFD, as undecodable bytes of a local file do.

Problems with the data itself (a missing path, no matching files, a missing text
column, a text that is not a string) raise `ConfigError` naming the config field (`field`:
"data", or where this DataConfig sits, "validation.data").
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from random import Random
from typing import Any

from ..config import DataConfig, SourceConfig
from ..errors import ConfigError
from .decontam import humaneval_decontaminator
from .mixture import LANES, Mixture
from .shards import TEXT, is_dataset, iter_rows, read_manifest
from .stdlib import stdlib_files, stdlib_root
from .synthetic import document

ROW_SUFFIXES = (".jsonl", ".parquet")  # files whose rows, not their bytes, are documents
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def iter_documents(data: SourceConfig, rank: int = 0, world: int = 1) -> Iterator[str]:
    """Endless texts of this rank's share of the source, in index order."""
    for _, text in iter_indexed(data, rank, world):
        yield text


def iter_indexed(
    data: SourceConfig,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
    *,
    field: str = "data",
    heldout: bool = False,
    repeat: bool = True,
    on_drop: Callable[[int, str], None] | None = None,
) -> Iterator[tuple[int, str]]:
    """(global index, text) for the indices i >= start with i % world == rank: of the training
    share, or with `heldout` of the held-out repositories; endless unless `repeat` is False
    (then one pass of a finite source). A document that overlaps HumanEval (`data.decontaminate`)
    keeps its index with an empty text, and `on_drop(index, task_id)` is told."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside world={world}")
    if isinstance(data, DataConfig) and data.source == "mixture" and heldout:
        docs = _mixture_heldout(data, rank, world, field, repeat)
    elif isinstance(data, DataConfig) and data.source == "mixture":
        docs = _mixture(data, rank, world, start, field, heldout, repeat)
    else:
        docs = _single(data, rank, world, start, field, heldout, repeat)
    if isinstance(data, DataConfig) and data.decontaminate:
        return _decontaminated(docs, on_drop)
    return docs


def check_sources(data: DataConfig, field: str = "data") -> None:
    """Before the first step: every source of `data` yields a document (ConfigError naming the
    source otherwise), rather than a run that fails or hangs when it first reaches it."""
    for n, src in enumerate(data.sources()):
        where = f"{field}.mixture.{n}" if data.source == "mixture" else field
        if next(_single(src, 0, 1, 0, where, False, repeat=False), None) is None:
            raise ConfigError(where, src.name, "holds no documents")


def _single(
    data: SourceConfig, rank: int, world: int, start: int, field: str, heldout: bool, repeat: bool
) -> Iterator[tuple[int, str]]:
    src = _Source(data, field, heldout, repeat)
    if data.holdout_repos and data.source in ("synthetic", "stdlib"):
        raise ConfigError(
            f"{field}.holdout_repos",
            data.holdout_repos,
            f"needs documents that belong to repositories (source local or huggingface), not source {data.source}",
        )
    if heldout and not data.holdout_repos:
        raise ConfigError(f"{field}.holdout_repos", 0, "is 0: no repository is held out to validate on")
    if data.source == "synthetic":
        first = start + (rank - start) % world
        return ((i, document(data.seed, i)) for i in itertools.count(first, world))
    if data.source == "stdlib":
        return src.folder(stdlib_root(), list(stdlib_files()), rank, world, start)
    if data.source == "huggingface":
        return src.huggingface(rank, world, start)
    return src.local(rank, world, start)


def _mixture(
    data: DataConfig, rank: int, world: int, start: int, field: str, heldout: bool, repeat: bool
) -> Iterator[tuple[int, str]]:
    """The mixture's documents (mixture.py's layout): each source read sharded on its own, from
    where the mixture's index `start` leaves it."""
    sources = data.sources()
    mix = mixture_of(data, world)
    # Opened here, not inside the generator: a source's configuration errors surface at once.
    readers = [
        _single(src, rank, world, mix.taken(n, start), f"{field}.mixture.{n}", heldout, repeat)
        for n, src in enumerate(sources)
    ]

    def merged() -> Iterator[tuple[int, str]]:
        for i in itertools.count(start + (rank - start) % world, world):
            s, k = mix.locate(i)
            got = next(readers[s], None)
            if got is None:
                return  # one pass (repeat=False) of a finite source ended
            if got[0] != k:
                raise RuntimeError(f"mixture source {sources[s].name!r} gave document {got[0]}, expected {k}")
            yield i, got[1]

    return merged()


def _mixture_heldout(data: DataConfig, rank: int, world: int, field: str, repeat: bool) -> Iterator[tuple[int, str]]:
    """The held-out repositories of the mixture's sources that hold some out, one source after the
    other (validation reads them once; the mixture's interleaving is for training)."""
    held = [(n, src) for n, src in enumerate(data.mixture) if src.holdout_repos > 0]
    if not held:
        raise ConfigError(
            f"{field}.mixture",
            [s.name for s in data.mixture],
            "holds no repositories out: set holdout_repos on a source",
        )
    readers = [_single(src, rank, world, 0, f"{field}.mixture.{n}", True, repeat) for n, src in held]
    return itertools.chain.from_iterable(readers)


def _decontaminated(
    docs: Iterator[tuple[int, str]], on_drop: Callable[[int, str], None] | None
) -> Iterator[tuple[int, str]]:
    check = humaneval_decontaminator()
    for i, text in docs:
        task = check.match(text)
        if task is not None:
            if on_drop is not None:
                on_drop(i, task)
            text = ""
        yield i, text


def mixture_of(data: DataConfig, world: int = 1) -> Mixture:
    """Which source each document index comes from (a single source is a mixture of one)."""
    return Mixture([s.weight for s in data.sources()], block=math.lcm(LANES, world))


def is_heldout(repo: str, share: float) -> bool:
    """Whether repository `repo` is held out at `share`: a hash of its name, so every rank, run
    and resume agrees, and a repository's files all go the same way."""
    bucket = int.from_bytes(hashlib.blake2b(repo.encode(), digest_size=8).digest(), "big") / 2**64
    return bucket < share


def _mine(items: Iterable[Any], rank: int, world: int, start: int) -> Iterator[tuple[int, Any]]:
    """Number a stream globally and keep this rank's indices from `start` on."""
    for i, item in enumerate(items):
        if i >= start and i % world == rank:
            yield i, item


class _Source:
    """One DataConfig read for one purpose: its field name for errors, which share of the
    repositories it reads, and whether it repeats."""

    def __init__(self, data: SourceConfig, field: str, heldout: bool, repeat: bool):
        self.data, self.field, self.heldout, self.repeat = data, field, heldout, repeat

    def keeps(self, repo: str) -> bool:
        return not self.data.holdout_repos or is_heldout(repo, self.data.holdout_repos) == self.heldout

    def passes(self, value: Any, one_pass: Callable[[int], Iterable[Any]], field: str = "path") -> Iterator[Any]:
        """Passes of a finite source (forever when repeating); an empty one is an error, not a hang."""
        for epoch in itertools.count() if self.repeat else (0,):
            empty = True
            for item in one_pass(epoch):
                empty = False
                yield item
            if empty:
                raise ConfigError(f"{self.field}.{field}", value, self._empty())

    def _empty(self) -> str:
        if self.data.holdout_repos:
            share = "held-out" if self.heldout else "training"
            return f"holds no documents of {share} repositories (holdout_repos={self.data.holdout_repos:g})"
        return "holds no documents"

    # ----------------------------------------------------------------------- local

    def local(self, rank: int, world: int, start: int) -> Iterator[tuple[int, str]]:
        data = self.data
        path = Path(data.path or "")
        if not data.path or not path.exists():
            raise ConfigError(
                f"{self.field}.path",
                data.path,
                "does not exist (a folder of source files, a .jsonl or a .parquet file)",
            )
        if is_dataset(path):
            return self.dataset(path, rank, world, start)
        if not path.is_dir():
            if path.suffix.lower() not in ROW_SUFFIXES:
                raise ConfigError(f"{self.field}.path", data.path, "is neither a folder nor a .jsonl or .parquet file")
            return self.row_files([path], rank, world, start)
        files = sorted(p for p in path.glob(data.glob) if p.is_file())
        if not files:
            raise ConfigError(
                f"{self.field}.glob",
                data.glob,
                f"matches no files under {self.field}.path={data.path!r} (for .parquet or .jsonl files of "
                "rows, match those: e.g. '**/*.parquet')",
            )
        row_files = [p for p in files if p.suffix.lower() in ROW_SUFFIXES]
        if not row_files:
            return self.folder(path, files, rank, world, start)
        if len(row_files) < len(files):
            raise ConfigError(
                f"{self.field}.glob",
                data.glob,
                f"matches both .jsonl/.parquet files (whose rows are documents) and other files under "
                f"{self.field}.path={data.path!r}: match one kind",
            )
        return self.row_files(row_files, rank, world, start)

    def row_files(self, paths: list[Path], rank: int, world: int, start: int) -> Iterator[tuple[int, str]]:
        """The rows of JSONL and Parquet files, read front to back as one file; the files in a
        seeded order, reshuffled every pass, as a folder's."""

        def one_pass(epoch: int) -> Iterator[str]:
            order = list(paths)
            Random(f"{self.data.seed}:{epoch}").shuffle(order)
            for path in order:
                rows = self._jsonl_rows if path.suffix.lower() == ".jsonl" else self._parquet_rows
                for row, where in rows(path):
                    if self.keeps(self._repo_of(row, where)):
                        yield self._text_of(row, where)

        return _mine(self.passes(self.data.path, one_pass), rank, world, start)

    def dataset(self, path: Path, rank: int, world: int, start: int) -> Iterator[tuple[int, str]]:
        """A generation run's dataset folder (shards.py): the `text` of each row of its listed
        shards, in order; a repository is `data.repo_field` (e.g. `topic`) when holding out."""
        columns = [TEXT] + ([self.data.repo_field] if self.data.holdout_repos else [])
        if not read_manifest(path).shards:
            raise ConfigError(
                f"{self.field}.path", self.data.path, "is a dataset folder whose manifest lists no shards yet"
            )

        def one_pass(_epoch: int) -> Iterator[str]:
            try:
                for row in iter_rows(path, columns):
                    if self.keeps(str(row.get(self.data.repo_field, ""))):
                        yield row[TEXT] or ""
            except KeyError as e:
                raise ConfigError(f"{self.field}.repo_field", self.data.repo_field, str(e)) from e

        return _mine(self.passes(self.data.path, one_pass), rank, world, start)

    def folder(self, root: Path, paths: list[Path], rank: int, world: int, start: int) -> Iterator[tuple[int, str]]:
        """Files in a seeded order, reshuffled every pass; a repository is a first-level folder."""
        files = [str(p) for p in paths if self.keeps(p.relative_to(root).parts[0])]
        if not files:
            raise ConfigError(f"{self.field}.path", self.data.path or self.data.source, self._empty())
        n = len(files)
        order: tuple[int, list[str]] = (-1, files)
        first = start + (rank - start) % world
        for i in itertools.count(first, world):
            epoch = i // n
            if epoch and not self.repeat:
                return
            if order[0] != epoch:
                # A fresh seeded order each pass: files of one project sit together on disk.
                shuffled = list(files)
                Random(f"{self.data.seed}:{epoch}").shuffle(shuffled)
                order = (epoch, shuffled)
            yield i, Path(order[1][i % n]).read_text(encoding="utf-8", errors="replace")

    def _text_of(self, row: dict, where: str) -> str:
        text = self._key(row, self.data.text_field, "text_field", where)
        if text is None:
            return ""
        if not isinstance(text, str):
            raise ConfigError(
                f"{self.field}.text_field",
                self.data.text_field,
                f"holds a {type(text).__name__}, not text, in {where}",
            )
        # Tokenizers refuse lone surrogates (TypeError in a trained BPE), which JSON can carry.
        return _SURROGATE.sub("\ufffd", text)

    def _repo_of(self, row: dict, where: str) -> str:
        return str(self._key(row, self.data.repo_field, "repo_field", where)) if self.data.holdout_repos else ""

    def _key(self, row: dict, key: str, setting: str, where: str) -> Any:
        if not isinstance(row, dict) or key not in row:
            keys = sorted(row)[:10] if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{self.field}.{setting}", key, f"is not a key of {where} (found: {keys})")
        return row[key]

    def _jsonl_rows(self, path: Path) -> Iterator[tuple[Any, str]]:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(
                        f"{self.field}.path", self.data.path, f"{path} line {number} is not JSON: {e}"
                    ) from e
                yield row, f"{path} line {number}"

    def _parquet_rows(self, path: Path) -> Iterator[tuple[dict, str]]:
        import pyarrow.parquet as pq  # noqa: PLC0415 (heavy; needed only for .parquet data)

        pf = pq.ParquetFile(path)
        columns = [self.data.text_field] + ([self.data.repo_field] if self.data.holdout_repos else [])
        for column, setting in zip(columns, ("text_field", "repo_field")):
            if column not in pf.schema_arrow.names:
                raise ConfigError(
                    f"{self.field}.{setting}",
                    column,
                    f"is not a column of {path} (columns: {pf.schema_arrow.names[:10]})",
                )
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            for row in batch.to_pylist():
                yield row, str(path)

    # ----------------------------------------------------------------------- Hugging Face

    def huggingface(self, rank: int, world: int, start: int) -> Iterator[tuple[int, str]]:
        import datasets  # noqa: PLC0415 (seconds to import; needed only for source huggingface)
        from datasets.distributed import split_dataset_by_node  # noqa: PLC0415

        data = self.data
        try:
            ds = datasets.load_dataset(
                data.dataset,
                data_dir=data.data_dir,
                split=data.split,
                streaming=True,
                token=os.environ.get(data.token_env) or None,
            )
        except Exception as e:  # hub, auth and file errors alike: say which setting to look at
            raise ConfigError(
                f"{self.field}.dataset",
                data.dataset,
                f"cannot be loaded (data_dir={data.data_dir!r}, split={data.split!r}; gated datasets "
                f"need a token in ${data.token_env}): {type(e).__name__}: {e}",
            ) from e
        if world > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        where = f"dataset {data.dataset!r}"

        def one_pass(_epoch: int) -> Iterator[str]:
            for row in ds:
                if self.keeps(self._repo_of(row, where)):
                    yield self._text_of(row, where)

        # The split dataset is this rank's own stream; its j-th example stands for global
        # index rank + world * j, which is exact when datasets splits by example.
        skip = max(0, -(-(start - rank) // world))
        for j, text in enumerate(self.passes(data.dataset, one_pass, field="dataset")):
            if j >= skip:
                yield rank + world * j, text
