"""Held-out documents for the validation loss: fixed token rows, checked against the training data.

    rows = heldout_rows(cfg, tokenizer, rank, world)     # LongTensor (n, seq_len + 1), this rank's share

The rows are the first `validation.tokens` tokens of the validation source, this rank's share
of its documents (every rank the same number of rows, so the loss is one collective pass),
packed as training packs them: documents end with end-of-text and run across rows. They are
built once per run, so the loss on them is comparable from one validation to the next, and
between runs with the same tokenizer.

Where the documents come from (`ValidationConfig`): `validation.data`, a source of its own
(`stdlib` by default: the standard library's modules, real code no generator wrote), or with
`validation.heldout` the training data's held-out repositories (`data.holdout_repos`: a share of
repositories, by a hash of their name, that training never reads; `sources.py`).

Before any step, the documents the rows use are compared with the first OVERLAP_SAMPLE
training documents of the same rank (exact text after whitespace normalisation; empty and
whitespace-only documents left out of both): a share above `validation.max_overlap` is a
`ConfigError` naming the validation source, because a loss on them would partly be a training
loss.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re

import torch

from ..config import TrainerConfig
from ..errors import ConfigError
from .loader import TextEncoder
from .sources import iter_indexed

OVERLAP_SAMPLE = 2000  # training documents per rank compared with the held-out ones


def heldout_rows(cfg: TrainerConfig, tokenizer: TextEncoder, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of seq_len + 1 held-out tokens (x = row[:-1], y = row[1:])."""
    v = cfg.validation
    assert v is not None, "heldout_rows needs a validation section"
    if v.heldout:
        source, field, held = cfg.data, "data", True
    else:
        # A source that holds repositories out validates on those: its training share is what a run
        # training on the same source would read.
        source, field, held = v.data, "validation.data", v.data.holdout_repos > 0
    width = cfg.resolved_seq_len + 1
    n_rows = max(1, math.ceil(v.tokens / (cfg.resolved_seq_len * world)))
    tokens: list[int] = []
    texts: list[str] = []
    # One pass: a finite source's documents are never counted twice.
    for _, text in iter_indexed(source, rank, world, field=field, heldout=held, repeat=False):
        texts.append(text)
        tokens += tokenizer.encode(text) + [tokenizer.eot_id]
        if len(tokens) >= n_rows * width:
            break
    else:
        raise ConfigError(
            "validation.tokens",
            v.tokens,
            f"is more than {field} holds: about {len(tokens) * world} tokens over {world} rank(s); lower "
            "it, or choose a larger source",
        )
    _check_overlap(cfg, texts, rank, world)
    return torch.tensor(tokens[: n_rows * width], dtype=torch.long).view(n_rows, width)


def _check_overlap(cfg: TrainerConfig, texts: list[str], rank: int, world: int) -> None:
    v = cfg.validation
    assert v is not None
    # Empty files (__init__.py in every package; decontaminated documents) are in both yet teach nothing.
    held = {_fingerprint(t) for t in texts if t.strip()}
    sample = itertools.islice(iter_indexed(cfg.data, rank, world), OVERLAP_SAMPLE)
    train = {_fingerprint(t) for _, t in sample if t.strip()}
    share = len(held & train) / max(1, len(held))
    if share > v.max_overlap:
        field, value = (
            ("data.holdout_repos", cfg.data.holdout_repos) if v.heldout else ("validation.data", v.data.source)
        )
        raise ConfigError(
            field,
            value,
            f"{share:.0%} of the held-out documents are also among the first {OVERLAP_SAMPLE} training "
            f"documents (validation.max_overlap={v.max_overlap:g}): a loss on them would partly be a "
            "training loss; validate on other data",
        )


_SPACE = re.compile(r"\s+")


def _fingerprint(text: str) -> bytes:
    return hashlib.blake2b(_SPACE.sub(" ", text).strip().encode(), digest_size=16).digest()
