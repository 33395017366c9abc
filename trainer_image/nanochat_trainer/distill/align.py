"""Cross-tokenizer distillation: the teacher's vocabulary is not the student's (Qwen3 vs GPT-2).

    feed = CrossTokenizerFeed(teacher, loader, cfg.distill, tokenizer=student_tok)   # a data.feed.BatchSource
    feed.start(micro_batches=1000, saved=None)
    batch = feed.next()     # batch.teacher: topk_kl_loss targets in the student's vocabulary, or None

What is implemented: token alignment by character offsets and vocabulary mapping by exact
string match, the exact-match special case of the minimum-edit-distance (MinED) alignment of
FuseLLM (Wan et al. 2024, "Knowledge Fusion of Large Language Models"), restricted to positions
where the two tokenizations share a boundary.

1. Each row of the micro-batch is cut at eot into documents; each piece is decoded to text and
   sent to the teacher as a text prompt (echo, max_tokens=0, logprobs=k, token texts): the
   teacher tokenizes it its own way and returns, per teacher token, its text, its character
   offset (`text_offset`) and the top-k next-token logprobs that predicted it.
2. `student_ends`: the character offset after each student token. `teacher_starts`: the
   offset at which each teacher token starts, kept only where the token texts tile the prompt.
3. Student position p (its logits predict token p+1, which starts at character c = end of
   token p) is aligned when a teacher token also starts at c: both models then predict the
   text from c on, given the same text before it.
4. At an aligned position the teacher's top-k token texts are mapped to the student token
   with the same text (`token_id_map`); texts with no (or no unambiguous) student token become
   empty slots, whose probability joins the rest bucket of `topk_kl_loss`. A position none of
   whose top-k maps is not used.

The next-token events of two tokenizers are not the same events (the teacher's " return" vs a
student that would write " ret" + "urn"), so the mapped KL is an approximation, as in MinED;
the LM loss (1 - alpha) still trains every position. Positions that do not align, pieces the
teacher refused (a 400: too long for its context) and micro-batches with fewer than
distill.min_aligned_fraction aligned positions (trained on the LM loss alone) are counted,
never guessed. A micro-batch left under that fraction because pieces failed is the teacher's
failure (teacher_skipped, the TeacherAvailable signal; the run stops without
continue_without_teacher); one refusal for every piece stops the run as `TopkFeed` does.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import torch

from ..config import DistillConfig
from ..data.feed import TopkTargets
from ..data.loader import TokenLoader
from .cache import TopkEntry
from .teacher import AsyncTeacher, TeacherError
from .topk import PREFETCH_DEPTH, TopkFeed, token_id_map


def student_ends(tokenizer, ids: Sequence[int]) -> tuple[str, list[int | None]]:
    """(text, ends): the decoded text and, per token, the character offset right after it;
    None where that point falls inside a character (a byte-level token holding part of one)."""
    ids = list(ids)
    text = tokenizer.decode(ids)
    pieces = [tokenizer.decode([t]) for t in ids]
    if "".join(pieces) == text:  # the usual case (ASCII code): one decode per token
        return text, list(itertools.accumulate(len(p) for p in pieces))
    ends: list[int | None] = []
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1])
        ends.append(len(prefix) if text.startswith(prefix) else None)
    return text, ends


def teacher_starts(entries: list[TopkEntry], text: str) -> dict[int, int]:
    """{character offset: teacher position j} for teacher tokens j >= 1 (with a top-k) that
    start there.

    The teacher's token texts are tiled over `text` from the start; a token that does not spell
    the text where it stands (half a UTF-8 character decodes to U+FFFD; a BOS token) loses the
    place, and the next token that is found within a few characters picks it up again (its own
    start not trusted, the following ones are). `text_offset` is not relied on: servers compute
    it from decoded token lengths, which drift after such tokens."""
    starts: dict[int, int] = {}
    pos, synced, lost = 0, True, 0
    for j, (tok, top, _offset) in enumerate(entries):
        ok = isinstance(tok, str) and bool(tok)
        if synced and ok and text.startswith(tok, pos):
            if j >= 1 and top is not None:
                starts.setdefault(pos, j)
            pos += len(tok)
            continue
        if not synced and ok:
            found = text.find(tok, pos, pos + 4 * lost + len(tok))  # a character is at most 4 bytes
            if found >= 0:
                pos, synced, lost = found + len(tok), True, 0
                continue
        synced, lost = False, lost + 1
    return starts


def align(ends: Sequence[int | None], starts: dict[int, int]) -> list[int | None]:
    """Per student position p: the teacher position whose top-k predicts the same text as the
    student's logits at p (a teacher token starting where student token p ends), or None.
    The last position predicts past the text and is never aligned."""
    return [starts.get(c) if c is not None and p < len(ends) - 1 else None for p, c in enumerate(ends)]


def segment_targets(
    entries: list[TopkEntry], text: str, ends: Sequence[int | None], vocab: dict[str, int | None], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets for the student's positions of one piece: ids (n, k), logprobs (n, k) with -inf
    in empty slots, mask (n,). Row p is the mapped teacher top-k at p's aligned position."""
    n = len(ends)
    ids = torch.zeros(n, k, dtype=torch.long)
    lps = torch.full((n, k), -float("inf"))
    mask = torch.zeros(n, dtype=torch.bool)
    for p, j in enumerate(align(ends, teacher_starts(entries, text))):
        if j is None:
            continue
        top = entries[j][1] or {}
        best = sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:k]
        for slot, (tok, lp) in enumerate(best):
            sid = vocab.get(tok) if isinstance(tok, str) else None
            if sid is not None:
                ids[p, slot], lps[p, slot] = sid, lp
        mask[p] = bool(torch.isfinite(lps[p]).any())
    return ids, lps, mask


def row_pieces(row: Sequence[int], eot: int) -> list[tuple[int, int]]:
    """(start, end) of the runs of a row between eot tokens, at least two tokens long."""
    out, start = [], 0
    for i, t in enumerate(list(row) + [eot]):
        if t == eot:
            if i - start >= 2:
                out.append((start, i))
            start = i + 1
    return out


class CrossTokenizerFeed(TopkFeed):
    """`TopkFeed` for a teacher with its own tokenizer: text prompts, aligned targets."""

    def __init__(
        self, teacher: AsyncTeacher, loader: TokenLoader, dcfg: DistillConfig, tokenizer, depth: int = PREFETCH_DEPTH
    ):
        super().__init__(teacher, loader, dcfg, tokenizer.n_vocab, tokenizer=tokenizer, depth=depth)
        self._student_vocab = token_id_map(tokenizer)
        self.positions = self.aligned = self.pieces = self.piece_errors = 0
        self.unaligned_skipped = 0  # batches with too few aligned positions: the LM loss alone
        self.last_piece_error: str | None = None

    async def _fetch(self, rows: list[list[int]]) -> tuple[list, list]:
        plans, coros = [], []
        for r, row in enumerate(rows):
            for s, e in row_pieces(row, self.tokenizer.eot_id):
                text, ends = student_ends(self.tokenizer, row[s:e])
                if text:
                    plans.append((r, s, text, ends))
                    coros.append(self.teacher.prompt_topk(text, self.k, token_ids=False, strict=False))
        return plans, list(await asyncio.gather(*coros, return_exceptions=True))

    def result(self, fut, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets for batch x. Raises as `TopkFeed._failures` does; a piece the teacher could not
        answer (a 400, a malformed answer, fewer than k logprobs) is counted in piece_errors and
        left unaligned, and raises its TeacherError when that leaves the batch too few positions."""
        plans, answers = self._answers(fut)
        errors = self._failures(answers)
        b, t = x.shape
        ids = torch.zeros(b, t, self.k, dtype=torch.long)
        lps = torch.full((b, t, self.k), -float("inf"))
        mask = torch.zeros(b, t, dtype=torch.bool)
        for (r, s, text, ends), a in zip(plans, answers):
            self.pieces += 1
            if isinstance(a, TeacherError):
                self.piece_errors += 1
                self.last_piece_error = str(a)[:300]
                continue
            p_ids, p_lps, p_mask = segment_targets(a, text, ends, self._student_vocab, self.k)
            n = len(ends)
            ids[r, s : s + n], lps[r, s : s + n], mask[r, s : s + n] = p_ids, p_lps, p_mask
        self.positions += b * t
        self.aligned += int(mask.sum())
        if errors and mask.float().mean().item() < self.dcfg.min_aligned_fraction:
            raise errors[-1]
        return ids.to(x.device), lps.to(x.device), mask.to(x.device)

    def _checked(self, targets: TopkTargets) -> TopkTargets | None:
        if targets.mask.float().mean().item() < self.dcfg.min_aligned_fraction:
            self.unaligned_skipped += 1  # too few positions to distil on: the LM loss alone
            return None
        return targets

    def record(self) -> dict[str, Any]:
        alignment = {
            "aligned_fraction": round(self.aligned / self.positions, 4) if self.positions else None,
            "pieces": self.pieces,
            "piece_errors": self.piece_errors,
        }
        if self.last_piece_error:
            alignment["last_piece_error"] = self.last_piece_error  # a count alone does not say what to fix
        alignment["unaligned_skipped"] = self.unaligned_skipped
        return {**super().record(), "alignment": alignment}
