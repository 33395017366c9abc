"""Files written so that a crash leaves the old version or the new one, never a part of one.

write_atomic(path, data)                 # a temporary sibling, flushed and fsynced, renamed over `path`
write_atomic(path, data, durable=False)  # the same, no fsync: a cache, where a power cut costs a miss
fsync_dir(folder)                        # a rename in `folder` survives a power loss
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace the small file `path` with `data` in one step. Several ranks may write the same file
    (a tokenizer): none ever reads a half-written one; and a kill mid-write leaves the old file, not
    a truncated one a restart cannot parse (best.json). The temporary is `<name>.tmp-*`, removed
    when the write fails here; one a kill left is `checkpoint.clear_leftovers`' to remove.

    `durable=False` skips the fsyncs (of the file and of its folder): still atomic against a kill,
    but a power loss may lose the write. For files that are only a cache (the teacher's answers,
    hundreds a second, where an fsync each would cost more than the miss it saves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared cache
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
