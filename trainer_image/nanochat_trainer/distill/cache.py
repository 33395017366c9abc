"""The teacher's answers on disk, so that a repeated run (a resume, a rerun with another student
or another seed) sends no request the teacher has answered before.

    cache = AnswerCache("runs/x/teacher-cache")
    path = cache.path(url, identity, body)   # <folder>/ab/ab12....bin
    entries = cache.read(path, TOPK)         # None: a miss (absent, torn or foreign)
    cache.write(path, TOPK.encode(entries))  # atomic; a failure is logged once, not raised

`AsyncTeacher` (teacher.py) asks the teacher for its identity and calls these around each request.

- One file per sha256 of (CACHE_VERSION, the completions URL, the teacher's identity, the request
  body). The identity (what GET /v1/models says of the served model: id, root, parent,
  max_model_len) is in the key because URL and served name do not pin the weights: a teacher
  redeployed with another checkpoint under the same URL and name must not replay the old one's
  answers (vLLM's `root` is the checkpoint's path). CACHE_VERSION changes with the formats below,
  so files of an older format are never looked at.
- What a file stores is what the caller gets, not the server's JSON, one `Codec` per kind of
  answer: ANSWER (complete()'s validated JSON), COMPLETION (completion()'s text and
  finish_reason) and TOPK (prompt_topk's entries: per position its token, offset and top-k as
  int32 ids + float32 logprobs, `encode_topk`; ~8 bytes a slot, ~170 bytes a token at k=20 where
  vLLM's JSON took ~840). The client returns the decoding of the fresh answer's encoding, so a
  replay from the cache is bit-identical to the first run.
- A file that is absent, torn or foreign (another format) reads as a miss, and the fresh answer
  overwrites it.
- Writes are atomic (`files.write_atomic`: a reader sees the old file or the new one, never part
  of one) but not durable (no fsync): an entry a power cut loses is only a miss, and an fsync per
  answer would slow a teacher answering hundreds of requests a second. A write that fails (a full
  volume, a file where a folder should be) is not an error either: it costs the next run its
  replay, not this run its answer, so it is logged once and the answer used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # in every cache key: files of an older format are never looked at

# One position of prompt_topk's answer: (token, {token: logprob} of the k best or None, text offset).
TopkEntry = tuple[str | int, dict[str | int, float] | None, int]


class AnswerCache:
    """The answer files under `folder`; `write` reports its first failure and swallows all."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._write_failed = False

    def path(self, url: str, identity: str, body: dict) -> Path:
        """Where the answer of `body`, sent to `url` and answered by the teacher `identity`, lives."""
        key = json.dumps(
            {"v": CACHE_VERSION, "url": url, "teacher": identity, "body": body},
            sort_keys=True,
            separators=(",", ":"),
        )
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.bin"

    def read(self, path: Path, codec: Codec) -> Any | None:
        """The answer stored at `path`, decoded; None when it is absent, torn or foreign."""
        try:
            return codec.decode(path.read_bytes())
        except (OSError, ValueError, TypeError, KeyError, IndexError, struct.error):
            return None

    def write(self, path: Path, blob: bytes) -> None:
        """Store `blob` at `path` atomically, without fsync; a failure is logged once, not raised."""
        try:
            write_atomic(path, blob, durable=False)
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                log.warning("teacher cache not written (%s: %s): answers are used but not kept", path, exc)


@dataclass(frozen=True)
class Codec:
    """How a parsed answer is stored in the cache. `encode` raises ValueError on an answer the
    format cannot hold; `decode` raises (ValueError, TypeError, ...) on a file it did not write."""

    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


def _decode_answer(blob: bytes) -> dict:
    """A stored complete() answer: a JSON object with a non-empty list of choice objects (the
    shape teacher._validate checks on the wire)."""
    data = json.loads(blob)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise ValueError("not a cached answer")
    return data


def _decode_completion(blob: bytes) -> tuple[str, str | None]:
    text, finish = json.loads(blob)
    if not isinstance(text, str) or not (finish is None or isinstance(finish, str)):
        raise ValueError("not a cached completion")
    return text, finish


TOPK_MAGIC = b"nanochat-topk-1\n"
_TOPK_HEAD = struct.Struct("<II")  # positions, bytes of the JSON string table


def encode_topk(entries: list[TopkEntry]) -> bytes:
    """prompt_topk's entries in ~8 bytes per top-k slot: per position the number of slots (-1:
    no distribution), the token and its offset (int32); then all slots' keys (int32) and logprobs
    (float32, the precision servers compute them in). A key >= 0 is a token id, -1 - i the i-th
    text of a JSON string table (servers that answer with token texts). ValueError for a token id
    an int32 cannot hold."""
    texts: dict[str, int] = {}

    def code(t: str | int) -> int:
        if isinstance(t, int):
            if not 0 <= t < 2**31:
                raise ValueError(f"token id {t} out of range")
            return t
        return -1 - texts.setdefault(t, len(texts))

    counts = [-1 if top is None else len(top) for _, top, _ in entries]
    tokens = [code(tok) for tok, _, _ in entries]
    keys = [code(t) for _, top, _ in entries for t in (top or {})]
    lps = [v for _, top, _ in entries for v in (top or {}).values()]
    table = json.dumps(list(texts)).encode()  # ASCII: any str, lone surrogates included
    arrays = (
        np.asarray(counts, np.int32),
        np.asarray(tokens, np.int32),
        np.asarray([off for _, _, off in entries], np.int32),
        np.asarray(keys, np.int32),
        np.asarray(lps, np.float32),
    )
    return TOPK_MAGIC + _TOPK_HEAD.pack(len(entries), len(table)) + table + b"".join(a.tobytes() for a in arrays)


def decode_topk(blob: bytes) -> list[TopkEntry]:
    """The inverse of encode_topk; ValueError for anything it did not write."""
    if not blob.startswith(TOPK_MAGIC):
        raise ValueError("not a top-k cache file")
    at = len(TOPK_MAGIC)
    n, table_len = _TOPK_HEAD.unpack_from(blob, at)
    at += _TOPK_HEAD.size
    texts = json.loads(blob[at : at + table_len])
    at += table_len
    counts, tokens, offsets = (np.frombuffer(blob, np.int32, n, at + 4 * n * i) for i in range(3))
    at += 12 * n
    slots = int(counts.clip(min=0).sum())
    keys = np.frombuffer(blob, np.int32, slots, at).tolist()
    lps = np.frombuffer(blob, np.float32, slots, at + 4 * slots).tolist()
    if at + 8 * slots != len(blob):
        raise ValueError("top-k cache file of the wrong length")

    def key(c: int) -> str | int:
        return c if c >= 0 else texts[-1 - c]

    out: list[TopkEntry] = []
    i = 0
    for count, tok, off in zip(counts.tolist(), tokens.tolist(), offsets.tolist()):
        top = None if count < 0 else {key(c): lp for c, lp in zip(keys[i : i + count], lps[i : i + count])}
        i += max(count, 0)
        out.append((key(tok), top, off))
    return out


ANSWER = Codec(lambda data: json.dumps(data).encode(), _decode_answer)
COMPLETION = Codec(lambda answer: json.dumps(list(answer)).encode(), _decode_completion)
TOPK = Codec(encode_topk, decode_topk)
