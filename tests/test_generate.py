"""Generation with the KV cache (batched, left-padded, sampled, stopped) and `nanochat eval --checkpoint`.

.venv/bin/pytest tests/test_generate.py -q
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from nanochat_cli.eval import add_eval_args, run_eval_from_args
from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.eval.generate import _truncate_at_stop, generate, generate_tokens, prompt_logprobs
from nanochat_trainer.eval.humaneval import STOP_SEQUENCES


@pytest.fixture(scope="module")
def loaded(ckpt):
    model, tok, _ = load_model(ckpt)
    return model, tok


def _naive_greedy(model, ids: list[int], steps: int, eot: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            t = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if t == eot:
                break
            out.append(t)
    return out


def test_batched_greedy_matches_uncached(loaded) -> None:
    model, tok = loaded
    prompts = ["def add(a, b):\n    return", "x = 1\n", "def very_long_function_name(values):\n    total = 0\n"]
    ids = [tok.encode(p) for p in prompts]
    res = generate_tokens(model, tok, ids, n=2, max_new_tokens=12, temperature=0.0)
    for p_ids, row in zip(ids, res):
        want = _naive_greedy(model, p_ids, 12, tok.eot_id)
        assert len(row) == 2 and row[0].token_ids == row[1].token_ids == want
        assert row[0].finish_reason == ("length" if len(want) == 12 else "stop")
        assert len(row[0].logprobs) == len(want) and all(lp <= 0 for lp in row[0].logprobs)
    # batch_size=1 (no padding) gives the same as a padded batch
    assert [s[0].token_ids for s in generate_tokens(model, tok, ids, max_new_tokens=12, batch_size=1)] == [
        r[0].token_ids for r in res
    ]


def test_a_prompt_that_fits_is_read_whole_whatever_the_budget(loaded) -> None:
    """A budget as long as the context leaves the new tokens the room the prompt does not take; it
    never cuts a prompt that fits (it had cut this one to its last token)."""
    model, tok = loaded
    ids = tok.encode("def very_long_function_name(values):\n    total = 0\n    for v in values:\n")
    ctx = model.cfg.max_seq_len
    [[sample]] = generate_tokens(model, tok, [ids], max_new_tokens=ctx)
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), -1)
    assert sample.logprobs[0] == pytest.approx(first[sample.token_ids[0]].item(), abs=1e-4)
    assert len(sample.token_ids) <= ctx - len(ids)


def test_sampling_seeded_and_top_p(loaded) -> None:
    model, tok = loaded
    kw = dict(n=4, max_new_tokens=10, temperature=1.0)
    a = generate(model, tok, ["def f(x):\n", "import os\n"], seed=3, **kw)
    b = generate(model, tok, ["def f(x):\n", "import os\n"], seed=3, **kw)
    c = generate(model, tok, ["def f(x):\n", "import os\n"], seed=4, **kw)
    assert a == b and a != c and len(a) == 2 and all(len(r) == 4 for r in a)
    assert len(set(a[0])) > 1  # the 4 samples differ
    greedy = generate(model, tok, ["def f(x):\n"], max_new_tokens=10)
    nucleus = generate(model, tok, ["def f(x):\n"], max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=9)
    assert nucleus == greedy


class _PaddedVocab(torch.nn.Module):
    """The model with 64 embedding rows past the tokenizer (a vocabulary padded to a multiple of
    64) whose logits beat every real token's."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)

    def forward(self, ids, **kwargs):
        logits = self.model(ids, **kwargs)
        return torch.cat([logits, logits.new_full((*logits.shape[:-1], 64), 1e4)], dim=-1)


def test_generation_never_picks_a_padding_row(loaded) -> None:
    model, tok = loaded
    ids = [tok.encode("def add(a, b):\n"), tok.encode("x = 1\n")]
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 5}):
        want = generate_tokens(model, tok, ids, n=2, max_new_tokens=8, top_logprobs=3, **kw)
        got = generate_tokens(_PaddedVocab(model), tok, ids, n=2, max_new_tokens=8, top_logprobs=3, **kw)
        assert got == want


def test_stop_sequences_cut(loaded) -> None:
    model, tok = loaded
    full = generate(model, tok, ["def g():\n"], max_new_tokens=40)[0][0]
    assert len(full) > 4
    stop = full[2:4]
    res = generate_tokens(model, tok, [tok.encode("def g():\n")], max_new_tokens=40, stop=[stop])[0][0]
    assert res.text == full[: full.find(stop)] and res.finish_reason == "stop"
    assert tok.decode(res.token_ids) == res.text or len(tok.decode(res.token_ids)) <= len(res.text)


def test_prompt_logprobs(loaded) -> None:
    model, tok = loaded
    ids = tok.encode("def add(a, b):\n    return a + b\n")
    lps, tops = prompt_logprobs(model, ids, top=3)
    assert lps[0] is None and tops[0] is None and len(lps) == len(ids)
    logits = model(torch.tensor([ids]))[0]
    ref = torch.log_softmax(logits[:-1].float(), -1)[torch.arange(len(ids) - 1), ids[1:]]
    assert torch.allclose(torch.tensor(lps[1:]), ref, atol=1e-5)
    assert all(len(t) == 3 and max(t.values()) >= lp - 1e-6 for t, lp in zip(tops[1:], lps[1:]))


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_eval_args(p)
    return p.parse_args(list(argv))


def test_eval_checkpoint_cli(ckpt, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("NANOCHAT_TERMINATION_LOG", str(tmp_path / "term"))
    out = tmp_path / "results.json"
    rc = run_eval_from_args(
        _args(
            "--checkpoint",
            str(ckpt.parent),
            "--max-problems",
            "3",
            "--samples",
            "2",
            "--temperature",
            "0.8",
            "--k",
            "1,2",
            "--max-new-tokens",
            "24",
            "--workers",
            "2",
            "--out",
            str(out),
        )
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["problems"] == 3 and report["samples"] == 2 and set(report["pass_at_k"]) == {"1", "2"}
    assert all(
        len(r["samples"]) == 2 and r["samples"][0]["status"] in ("passed", "failed", "timed out")
        for r in report["per_problem"]
    )
    stdout = capsys.readouterr().out.strip().splitlines()
    assert stdout[-1].startswith("NANOCHAT_RESULT ")
    assert json.loads(stdout[-1].split(" ", 1)[1]) == json.loads((tmp_path / "term").read_text())


def test_eval_cli_errors(tmp_path, capsys) -> None:
    assert run_eval_from_args(_args("--checkpoint", str(tmp_path / "nope"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    assert run_eval_from_args(_args("--checkpoint", str(tmp_path), "--k", "5")) == 2
    capsys.readouterr()
    assert run_eval_from_args(_args("--checkpoint", str(tmp_path), "--samples", "10", "--k", "1,10")) == 2
    assert "--samples 10 with --temperature 0: greedy completions are identical" in capsys.readouterr().err
    assert run_eval_from_args(_args("--checkpoint", str(tmp_path))) == 2  # exists but holds no model
    assert "no model weights there (model.safetensors, or a sharded checkpoint's .metadata)" in capsys.readouterr().err


def test_eval_results_default_beside_the_checkpoint(ckpt, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NANOCHAT_TERMINATION_LOG", str(tmp_path / "term"))
    assert run_eval_from_args(_args("--checkpoint", str(ckpt), "--max-problems", "1", "--max-new-tokens", "8")) == 0
    assert json.loads((ckpt / "humaneval.json").read_text())["problems"] == 1


def test_generate_heals_the_prompts_last_token(loaded) -> None:
    """A prompt ending in "\\n" (every HumanEval prompt) ends in a token that training text only
    has before column-0 lines: generate() takes it back and makes the first new token restore
    it, so the completion continues the prompt's text exactly."""
    model, tok = loaded
    prompt = 'def double(x):\n    """Return x times two."""\n'
    ids = tok.encode(prompt)
    assert tok.decode(ids[-1:]) == "\n" and tok.decode(tok.encode(prompt + "    return")[-3:-1]) != "\n"
    (raw,) = generate_tokens(model, tok, [ids[:-1]], max_new_tokens=8, starts=["\n"])
    assert tok.decode(raw[0].token_ids[:1]).startswith("\n")  # the constraint held
    ((completion,),) = generate(model, tok, [prompt], max_new_tokens=8)
    assert prompt + completion == tok.decode(ids[:-1] + raw[0].token_ids)
    # Unconstrained, this random model's first token is not a newline: the test can tell.
    (free,) = generate_tokens(model, tok, [ids[:-1]], max_new_tokens=1)
    assert not tok.decode(free[0].token_ids[:1]).startswith("\n")
    # The "\n" given back is the prompt's, not the completion's: a stop string is looked for after it
    # (a column-0 "# comment" first line is no "\n#"), so a stop of "\n" does not end it at once.
    (stopped,) = generate_tokens(model, tok, [ids[:-1]], max_new_tokens=8, starts=["\n"], stop=["\n"])
    assert stopped[0].text.startswith("\n") and stopped[0].finish_reason == "length", stopped[0]
    comment_first = "\n# dedupe\n    return x\n"
    assert _truncate_at_stop(comment_first, STOP_SEQUENCES, "\n") == (comment_first, False)
    assert _truncate_at_stop(comment_first, STOP_SEQUENCES) == ("", True)
