"""Documents (plain text) from the configured source, sharded by rank.

    from nanochat_trainer.data.sources import iter_documents, iter_indexed
    for text in iter_documents(cfg.data, rank, world): ...          # endless
    for index, text in iter_indexed(cfg.data, rank, world, start=n): ...

Every source is seen as one endless sequence of documents with global indices 0, 1,
2, ...; rank r of W gets the indices i with i % W == r, so ranks read disjoint shares
and the union over ranks does not depend on W. Finite sources repeat (the index keeps
counting through later passes).

- synthetic: `synthetic.document(seed, i)`; any index is reachable in O(1).
- local: `data.path` is a folder (files matching `data.glob`, in a seeded order that is
  reshuffled every pass; O(1) to reach any index), a `.jsonl` file (key
  `data.text_field` of each line) or a `.parquet` file (column `data.text_field`).
  JSONL and Parquet are read front to back, so reaching index n means reading n rows.
- huggingface: `datasets.load_dataset(data.dataset, data_dir=..., split=..., streaming=True)`
  with the token from `$data.token_env`, split across ranks with
  `datasets.distributed.split_dataset_by_node`. That splits by example (the layout
  above) unless the dataset's file count is a multiple of W, in which case each rank
  streams whole files: faster, but then what a rank sees depends on W. Reaching index n
  means streaming past the rank's first n / W examples.

Problems with the data itself (a missing path, no matching files, a missing text
column) raise `ConfigError` naming the config field.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from random import Random
from typing import Any

from ..config import DataConfig
from ..errors import ConfigError
from .synthetic import document


def iter_documents(data: DataConfig, rank: int = 0, world: int = 1) -> Iterator[str]:
    """Endless texts of this rank's share of the source, in index order."""
    for _, text in iter_indexed(data, rank, world):
        yield text


def iter_indexed(data: DataConfig, rank: int = 0, world: int = 1, start: int = 0) -> Iterator[tuple[int, str]]:
    """Endless (global index, text) for the indices i >= start with i % world == rank."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside world={world}")
    if data.source == "synthetic":
        first = start + (rank - start) % world
        return ((i, document(data.seed, i)) for i in itertools.count(first, world))
    if data.source == "huggingface":
        return _huggingface(data, rank, world, start)
    return _local(data, rank, world, start)


def _mine(items: Iterable[Any], rank: int, world: int, start: int) -> Iterator[tuple[int, Any]]:
    """Number an endless stream globally and keep this rank's indices from `start` on."""
    for i, item in enumerate(items):
        if i >= start and i % world == rank:
            yield i, item


def _repeat(field: str, value: Any, one_pass: Callable[[int], Iterable[Any]]) -> Iterator[Any]:
    """Chain passes of a finite source forever; an empty source is an error, not a hang."""
    for epoch in itertools.count():
        empty = True
        for item in one_pass(epoch):
            empty = False
            yield item
        if empty:
            raise ConfigError(field, value, "holds no documents")


# --------------------------------------------------------------------------- local


def _local(data: DataConfig, rank: int, world: int, start: int) -> Iterator[tuple[int, str]]:
    path = Path(data.path or "")
    if not data.path or not path.exists():
        raise ConfigError(
            "data.path", data.path, "does not exist (a folder of source files, a .jsonl or a .parquet file)"
        )
    if path.is_dir():
        return _folder(data, path, rank, world, start)
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".jsonl":
        return _mine(_repeat("data.path", data.path, lambda _: _jsonl_texts(data, path)), rank, world, start)
    if suffix == ".parquet":
        return _mine(_repeat("data.path", data.path, lambda _: _parquet_texts(data, path)), rank, world, start)
    raise ConfigError("data.path", data.path, "is neither a folder nor a .jsonl or .parquet file")


def _folder(data: DataConfig, path: Path, rank: int, world: int, start: int) -> Iterator[tuple[int, str]]:
    files = sorted(str(p) for p in path.glob(data.glob) if p.is_file())
    if not files:
        raise ConfigError("data.glob", data.glob, f"matches no files under data.path={data.path!r}")
    n = len(files)
    order: tuple[int, list[str]] = (-1, files)
    first = start + (rank - start) % world
    for i in itertools.count(first, world):
        epoch = i // n
        if order[0] != epoch:
            # A fresh seeded order each pass: files of one project sit together on disk.
            shuffled = list(files)
            Random(f"{data.seed}:{epoch}").shuffle(shuffled)
            order = (epoch, shuffled)
        yield i, Path(order[1][i % n]).read_text(encoding="utf-8", errors="replace")


def _text_of(data: DataConfig, row: dict, where: str) -> str:
    if not isinstance(row, dict) or data.text_field not in row:
        keys = sorted(row)[:10] if isinstance(row, dict) else type(row).__name__
        raise ConfigError("data.text_field", data.text_field, f"is not a key of {where} (found: {keys})")
    return str(row[data.text_field])


def _jsonl_texts(data: DataConfig, path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("data.path", data.path, f"line {number} is not JSON: {e}") from e
            yield _text_of(data, row, f"{path} line {number}")


def _parquet_texts(data: DataConfig, path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq  # noqa: PLC0415 (heavy; needed only for .parquet data)

    pf = pq.ParquetFile(path)
    if data.text_field not in pf.schema_arrow.names:
        raise ConfigError(
            "data.text_field", data.text_field, f"is not a column of {path} (columns: {pf.schema_arrow.names[:10]})"
        )
    for batch in pf.iter_batches(columns=[data.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield "" if text is None else str(text)


# --------------------------------------------------------------------------- Hugging Face


def _huggingface(data: DataConfig, rank: int, world: int, start: int) -> Iterator[tuple[int, str]]:
    import datasets  # noqa: PLC0415 (seconds to import; needed only for source huggingface)
    from datasets.distributed import split_dataset_by_node  # noqa: PLC0415

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
            "data.dataset",
            data.dataset,
            f"cannot be loaded (data_dir={data.data_dir!r}, split={data.split!r}; gated datasets "
            f"need a token in ${data.token_env}): {type(e).__name__}: {e}",
        ) from e
    if world > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)

    def one_pass(_epoch: int) -> Iterator[str]:
        for row in ds:
            yield _text_of(data, row, f"dataset {data.dataset!r}")

    # The split dataset is this rank's own stream; its j-th example stands for global
    # index rank + world * j, which is exact when datasets splits by example.
    skip = max(0, -(-(start - rank) // world))
    for j, text in enumerate(_repeat("data.dataset", data.dataset, one_pass)):
        if j >= skip:
            yield rank + world * j, text
