"""Sampling from a GPT with its KV cache: greedy or temperature/top-p, stop sequences, batches.

    from nanochat_trainer.eval.generate import generate
    outs = generate(model, tok, ["def add(a, b):\n"], n=2, max_new_tokens=64, temperature=0.8,
                    top_p=0.95, stop=("\ndef",), seed=0)       # outs[prompt][sample] -> str

Prompts of a batch are left-padded and prefilled once (`pad_mask`); the cache is then
fanned out to `n` rows per prompt with `cache.reorder`, and finished rows are dropped the
same way. `generate_tokens` is the lower level (token ids, per-token logprobs and top
logprobs, finish reasons) that the server uses.

`generate` heals the prompt's last token (as Guidance's token healing does): it is taken
back and the first new token must begin with its text. Byte-level BPEs merge a newline with
the indentation after it ("\n   " is one token), so a prompt that ends in "\n", as every
HumanEval prompt does after its docstring, ends in a token that in training only ever
preceded a line at column 0: unhealed, a model jumps past the function body.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

STOP_WINDOW = 64  # tokens decoded per step to look for a stop string (longer than any stop string)


@dataclass
class Sample:
    """One generated continuation."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop sequence or end-of-text) or "length"
    logprobs: list[float] = field(default_factory=list)  # of each kept token
    top_logprobs: list[dict[int, float]] = field(default_factory=list)


def _truncate_at_stop(text: str, stop: Sequence[str], healed: str = "") -> tuple[str, bool]:
    """`text` up to the first stop string. `healed`: the prompt's own text that `text` begins with
    (token healing gives it back): a stop string starting there is not the completion's (a
    completion opening with a column-0 "#" after the prompt's "\n" is no "\n#")."""
    skip = len(healed) if healed and text.startswith(healed) else 0
    cut = min((i for i in (text.find(s, skip) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate_tokens(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    n: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    seed: int = 0,
    top_logprobs: int = 0,
    batch_size: int = 16,
    starts: Sequence[str] | None = None,
) -> list[list[Sample]]:
    """For each prompt (token ids), `n` samples. Greedy when temperature == 0 (then the n samples
    are identical). Stops at eot, at a stop string (cut off, not included), after max_new_tokens
    or at the end of the context; prompts longer than the context keep their last tokens. `starts`: per
    prompt, text the first new token must begin with ("" for none)."""
    if not prompts:
        return []
    if max_new_tokens < 0 or n < 1 or not 0 < top_p <= 1:
        raise ValueError("need max_new_tokens >= 0, n >= 1 and 0 < top_p <= 1")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out: list[list[Sample]] = []
    per_batch = max(1, batch_size // n) if n < batch_size else 1
    for b0 in range(0, len(prompts), per_batch):
        out.extend(
            _generate_batch(
                model,
                tokenizer,
                prompts[b0 : b0 + per_batch],
                n,
                max_new_tokens,
                temperature,
                top_p,
                stop,
                gen,
                top_logprobs,
                device,
                starts[b0 : b0 + per_batch] if starts else None,
            )
        )
    return out


def _allowed_first(tokenizer, starts: Sequence[str], vocab: int, device) -> torch.Tensor:
    """(len(starts), vocab) bool: the tokens whose text begins with each start ("": every one)."""
    texts = _token_texts(tokenizer, vocab)
    allowed = torch.ones(len(starts), vocab, dtype=torch.bool)
    for i, start in enumerate(starts):
        if start:
            allowed[i] = torch.tensor([t.startswith(start) for t in texts])
    return allowed.to(device)


_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_texts(tokenizer, vocab: int) -> list[str]:
    """Every token's text, once per tokenizer (50k decodes take a few tens of milliseconds);
    end-of-text and ids past the tokenizer's vocabulary match no start."""
    if tokenizer not in _TEXTS:
        n = min(vocab, tokenizer.n_vocab)
        _TEXTS[tokenizer] = [tokenizer.decode([t]) if t != tokenizer.eot_id else "\x00" for t in range(n)]
    texts = _TEXTS[tokenizer]
    return texts[:vocab] + ["\x00"] * (vocab - len(texts))


def _generate_batch(
    model, tokenizer, prompts, n, max_new_tokens, temperature, top_p, stop, gen, top_logprobs, device, starts
) -> list[list[Sample]]:
    max_ctx = model.cfg.max_seq_len
    # The prompt before the budget: one that fits is read whole and the new tokens get the room left
    # (cut to make room for max_new_tokens, a 512-token budget left a 256-token model 1 prompt token).
    prompts = [list(p)[-(max_ctx - 1) :] if p else [tokenizer.eot_id] for p in prompts]
    longest = max(len(p) for p in prompts)
    b = len(prompts)
    ids = torch.zeros(b, longest, dtype=torch.long, device=device)
    mask = torch.zeros(b, longest, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p) :] = True
    budget = min(max_new_tokens, max_ctx - longest)
    cache = model.new_cache(b, longest + max(budget, 0))
    # Only the tokenizer's ids: embedding rows past it (a vocabulary padded to a multiple of 64)
    # were never a target, and decode has no text for them.
    vocab = tokenizer.n_vocab
    logits = model(ids, cache=cache, pad_mask=mask)[:, -1, :vocab].float()
    fan = torch.arange(b, device=device).repeat_interleave(n)
    cache.reorder(fan)
    logits = logits[fan]
    if starts is not None and any(starts):  # else no constraint, and no vocabulary to decode
        allowed = _allowed_first(tokenizer, starts, logits.size(-1), device)[fan]
        logits = logits.masked_fill(~allowed, float("-inf"))
    rows = list(range(b * n))  # active row -> sample index
    toks: list[list[int]] = [[] for _ in rows]
    lps: list[list[float]] = [[] for _ in rows]
    tops: list[list[dict[int, float]]] = [[] for _ in rows]
    finish = ["length"] * (b * n)
    for step in range(max(budget, 0)):
        logp = F.log_softmax(logits, dim=-1)
        if temperature <= 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = F.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:
                sp, si = probs.sort(dim=-1, descending=True)
                drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix reaching top_p
                sp = sp.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter_(-1, si, sp)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        chosen = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
        if top_logprobs:
            tv, ti = logp.topk(top_logprobs, dim=-1)
            tv, ti = tv.tolist(), ti.tolist()
        nxt_list = nxt.tolist()
        alive: list[int] = []
        for j, s in enumerate(rows):
            t = nxt_list[j]
            if t == tokenizer.eot_id:
                finish[s] = "stop"
                continue
            toks[s].append(t)
            lps[s].append(chosen[j])
            if top_logprobs:
                tops[s].append(dict(zip(ti[j], tv[j])))
            healed = starts[s // n] if starts is not None and len(toks[s]) <= STOP_WINDOW else ""
            if stop and _truncate_at_stop(tokenizer.decode(toks[s][-STOP_WINDOW:]), stop, healed)[1]:
                finish[s] = "stop"
                continue
            alive.append(j)
        if not alive or step == budget - 1:
            break
        if len(alive) < len(rows):  # drop finished rows (copies the cache, so only when needed)
            index = torch.tensor(alive, dtype=torch.long, device=device)
            rows = [rows[j] for j in alive]
            cache.reorder(index)
            nxt = nxt[index]
        logits = model(nxt[:, None], cache=cache)[:, -1, :vocab].float()
    healed = [starts[s // n] if starts is not None else "" for s in range(b * n)]
    samples = [_finish(tokenizer, toks[s], lps[s], tops[s], finish[s], stop, healed[s]) for s in range(b * n)]
    return [samples[i * n : (i + 1) * n] for i in range(b)]


def _finish(tokenizer, toks, lps, tops, reason, stop, healed: str = "") -> Sample:
    text, hit = _truncate_at_stop(tokenizer.decode(toks), stop, healed)
    if hit:  # keep the tokens whose text lies before the stop string
        kept = 0
        while kept < len(toks) and len(tokenizer.decode(toks[: kept + 1])) <= len(text):
            kept += 1
        toks, lps, tops = toks[:kept], lps[:kept], tops[:kept]
    return Sample(toks, text, reason, lps, tops)


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    n: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    seed: int = 0,
    batch_size: int = 16,
    heal: bool = True,
) -> list[list[str]]:
    """Text in, text out: outs[i][j] is sample j of prompt i (stop strings cut off), with the
    prompt's last token healed (module docstring) unless `heal` is False, as a server that
    completes token ids (`nanochat serve`, vLLM) does."""
    ids = [tokenizer.encode(p) for p in prompts]
    healed = [""] * len(ids)
    if heal:
        ids, healed = heal_prompts(tokenizer, ids)
    res = generate_tokens(
        model,
        tokenizer,
        ids,
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=seed,
        batch_size=batch_size,
        starts=healed,
    )
    return [[unheal(s.text, h) for s in row] for h, row in zip(healed, res)]


def heal_prompts(tokenizer, prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[str]]:
    """Token healing (module docstring): each prompt without its last token, and that token's
    text, which the first new token must begin with (`generate_tokens(starts=...)`)."""
    starts = [tokenizer.decode(list(p[-1:])) if len(p) > 1 else "" for p in prompts]
    return [list(p[:-1]) if s else list(p) for p, s in zip(prompts, starts)], starts


def unheal(text: str, healed: str) -> str:
    """The completion after the prompt's own last token's text (given back by healing)."""
    return text[len(healed) :] if text.startswith(healed) else text


@torch.no_grad()
def prompt_logprobs(
    model, token_ids: Sequence[int], top: int = 0
) -> tuple[list[float | None], list[dict[int, float] | None]]:
    """Logprob of each prompt token given those before it (None for the first) and, with
    top > 0, the top-`top` alternatives at each position (what `echo=true` returns)."""
    ids = list(token_ids)[-model.cfg.max_seq_len :]
    if not ids:
        return [], []
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device))[0].float()
    logp = F.log_softmax(logits[:-1], dim=-1)
    target = torch.tensor(ids[1:], device=device)
    chosen = [None] + logp.gather(-1, target[:, None]).squeeze(-1).tolist()
    tops: list[dict[int, float] | None] = [None]
    if top:
        tv, ti = logp.topk(top, dim=-1)
        tops += [dict(zip(i, v)) for i, v in zip(ti.tolist(), tv.tolist())]
    else:
        tops += [{} for _ in ids[1:]]
    return chosen, tops
