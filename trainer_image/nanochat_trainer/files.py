"""Files written so that a crash leaves the old version or the new one, never a part of one.

write_atomic(path, data)   # a temporary sibling, flushed and fsynced, renamed over `path`
fsync_dir(folder)          # a rename in `folder` survives a power loss
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


def write_atomic(path: Path, data: bytes) -> None:
    """Replace the small file `path` with `data` in one step. Several ranks may write the same file
    (a tokenizer): none ever reads a half-written one; and a kill mid-write leaves the old file, not
    a truncated one a restart cannot parse (best.json). The temporary is `<name>.tmp-*`, removed
    when the write fails here; one a kill left is `checkpoint.clear_leftovers`' to remove."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared cache
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)
