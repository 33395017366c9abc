"""A dataset folder: Parquet shards and the manifest that says which of them are complete.

    <dataset>/manifest.json         {"version": 1, "shards": [{"file", "rows", "sha256"}], "state": {...}}
    <dataset>/shard-00000.parquet   rows: a `text` column and the writer's own columns

A shard is written to a temporary name and renamed, then the manifest is replaced atomically
(tmp + os.replace) to list it: a reader sees only shards the manifest lists, so a writer killed
mid-shard leaves nothing half-written behind, and `state` (the writer's position, saved in the
same replace) always agrees with the listed shards. `data.source: local` reads such a folder
(`iter_rows`); the generation stage (`datagen/`) writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
VERSION = 1
TEXT = "text"


@dataclass
class Manifest:
    shards: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)


def is_dataset(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest; an empty one when there is none yet."""
    path = folder / MANIFEST
    if not path.exists():
        return Manifest()
    data = json.loads(path.read_text())
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {data.get('version')} is not {VERSION}")
    return Manifest(shards=data["shards"], state=data.get("state", {}))


def append_shard(folder: Path, manifest: Manifest, rows: Sequence[dict[str, Any]], state: dict[str, Any]) -> None:
    """Write `rows` as the next shard and list it, with the writer's new `state`, in one step."""
    import pyarrow as pa  # noqa: PLC0415 (heavy; only runs that read or write dataset folders need it)
    import pyarrow.parquet as pq  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    name = f"shard-{len(manifest.shards):05d}.parquet"
    tmp = folder / f".{name}.tmp"
    pq.write_table(pa.Table.from_pylist(list(rows)), tmp, compression="zstd")
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, folder / name)
    manifest.shards.append({"file": name, "rows": len(rows), "sha256": digest})
    manifest.state = state
    write_manifest(folder, manifest)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": VERSION, "shards": manifest.shards, "state": manifest.state}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def iter_rows(folder: Path, columns: Sequence[str] = (TEXT,)) -> Iterator[dict[str, Any]]:
    """The rows of every listed shard, in order; files the manifest does not list are ignored."""
    import pyarrow.parquet as pq  # noqa: PLC0415 (heavy; only runs that read dataset folders need it)

    for shard in read_manifest(folder).shards:
        pf = pq.ParquetFile(folder / shard["file"])
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise KeyError(f"{folder / shard['file']} has no column {missing[0]!r} (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=list(columns), batch_size=1024):
            yield from batch.to_pylist()
