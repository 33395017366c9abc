"""Tokenizers: trained byte-level BPE, GPT-2's BPE from local files, the vocabulary check.

    .venv/bin/pytest tests/test_tokenizer.py -q

No test touches the network: GPT-2-style files are built here, small.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import yaml

from nanochat_trainer import tokenizer as tk
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.data.synthetic import generate
from nanochat_trainer.errors import ConfigError
from nanochat_trainer.tokenizer import (
    EOT,
    HFTokenizer,
    TiktokenTokenizer,
    build_tokenizer,
    dump_tiktoken,
    load_tokenizer,
    train_bpe,
    train_tokenizer_cli,
)

TEXT = "def naïve(x):\n    return x * 2  # 世界 \t tab\n\n"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(generate(0, 300), 400)


def _cfg(**over):
    base = {"preset": "tiny", "tokenizer": {"kind": "bpe", "train_docs": 200}, "model": {"vocab_size": 512}}
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value}
    return TrainerConfig.model_validate(base)


def tiny_ranks() -> dict[bytes, int]:
    """A GPT-2-shaped rank table: every byte, then a few merges."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"de", b"def", b" x", b"yz", b"xyz"):
        ranks[token] = len(ranks)
    return ranks


def test_bpe_round_trip_and_end_of_text(bpe, tmp_path):
    assert 257 <= bpe.n_vocab <= 400
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT
    code = generate(9, 1)[0]
    assert len(bpe.encode(code)) < 0.7 * len(code.encode())  # merges learnt on code compress code
    assert bpe.decode([bpe.eot_id]) == EOT
    # A literal end-of-text in the data stays text; only the loader inserts eot_id.
    literal = bpe.encode(f"a{EOT}b")
    assert bpe.eot_id not in literal and bpe.decode(literal) == f"a{EOT}b"
    path = bpe.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    again = load_tokenizer(tmp_path)
    assert isinstance(again, HFTokenizer)
    assert (again.n_vocab, again.eot_id, again.encode(TEXT)) == (bpe.n_vocab, bpe.eot_id, ids)
    assert again.encode_batch([TEXT, "x"]) == [ids, bpe.encode("x")]


def test_bpe_needs_room_for_bytes():
    with pytest.raises(ConfigError, match="257"):
        train_bpe(["x"], 200)


def test_build_tokenizer_trains_once_and_reuses(tmp_path, monkeypatch):
    cfg = _cfg()
    tok = build_tokenizer(cfg, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and tok.n_vocab <= 512

    def no_training(*a, **k):
        raise AssertionError("a saved tokenizer must be reused, not retrained")

    monkeypatch.setattr(tk, "train_bpe", no_training)
    again = build_tokenizer(cfg, tmp_path)
    assert again.encode(TEXT) == tok.encode(TEXT)


def test_vocab_larger_than_model_is_a_config_error(tmp_path):
    build_tokenizer(_cfg(), tmp_path)  # 512 tokens, kept in tmp_path
    with pytest.raises(ConfigError) as err:
        build_tokenizer(_cfg(model={"vocab_size": 300}), tmp_path)
    assert err.value.field == "model.vocab_size"
    n_vocab = load_tokenizer(tmp_path).n_vocab
    assert "300" in str(err.value) and str(n_vocab) in str(err.value)


def test_gpt2_from_a_tiktoken_file(tmp_path):
    ranks = tiny_ranks()
    (tmp_path / "gpt2.tiktoken").write_bytes(dump_tiktoken(ranks))
    cfg = _cfg(tokenizer={"kind": "gpt2", "path": str(tmp_path / "gpt2.tiktoken")})
    run = tmp_path / "run"
    tok = build_tokenizer(cfg, run)
    assert isinstance(tok, TiktokenTokenizer)
    assert (tok.n_vocab, tok.eot_id) == (len(ranks) + 1, len(ranks))
    # GPT-2's pre-tokenizer splits "def", " x", "yz" before the merges apply.
    assert tok.encode("def xyz") == [ranks[b"def"], ranks[b" x"], ranks[b"yz"]]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eot_id not in tok.encode(f"x{EOT}")
    # The run dir keeps a copy that loads without the original file.
    (tmp_path / "gpt2.tiktoken").unlink()
    again = load_tokenizer(run)
    assert isinstance(again, TiktokenTokenizer) and again.encode(TEXT) == tok.encode(TEXT)
    assert (run / "tokenizer.tiktoken").is_file()


def test_gpt2_from_a_hf_tokenizer_json(bpe, tmp_path):
    path = bpe.save(tmp_path / "gpt2-tokenizer.json")
    cfg = _cfg(tokenizer={"kind": "gpt2", "path": str(path)})
    tok = build_tokenizer(cfg, tmp_path / "run")
    assert isinstance(tok, HFTokenizer) and tok.encode(TEXT) == bpe.encode(TEXT)


def test_gpt2_from_tiktoken_cache(tmp_path, monkeypatch):
    data = dump_tiktoken(tiny_ranks())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _cfg(tokenizer={"kind": "gpt2"}, model={"vocab_size": 50257})
    with pytest.raises(ConfigError) as err:
        build_tokenizer(cfg, tmp_path / "run")
    assert err.value.field == "tokenizer.path" and "tiktoken" in str(err.value)
    # The file tiktoken caches for r50k_base (GPT-2's BPE), keyed by the sha1 of its URL.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / hashlib.sha1(tk.R50K_URL.encode()).hexdigest()).write_bytes(data)
    with pytest.raises(ConfigError):  # a file that fails the checksum is not trusted
        build_tokenizer(cfg, tmp_path / "run")
    monkeypatch.setattr(tk, "R50K_SHA256", hashlib.sha256(data).hexdigest())
    tok = build_tokenizer(cfg, tmp_path / "run")
    assert tok.n_vocab == len(tiny_ranks()) + 1
    assert (tmp_path / "run" / "tokenizer.json").is_file()


def test_bad_tokenizer_paths(tmp_path, bpe):
    with pytest.raises(ConfigError, match="tokenizer.path"):
        load_tokenizer(tmp_path / "absent.json")
    # A tokenizer.json without an end-of-text token cannot separate documents.
    spec = json.loads((bpe.save(tmp_path)).read_text())
    spec["added_tokens"] = []
    spec["model"]["vocab"].pop(EOT)
    (tmp_path / "no-eot.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="end-of-text"):
        load_tokenizer(tmp_path / "no-eot.json")


def test_train_tokenizer_cli(tmp_path):
    config = tmp_path / "trainer.yaml"
    config.write_text(yaml.safe_dump({"preset": "tiny", "tokenizer": {"kind": "bpe", "train_docs": 100}}))
    tok = train_tokenizer_cli(str(config), tmp_path / "out", vocab_size=300)
    assert tok.n_vocab <= 300
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")
    assert load_tokenizer(tmp_path / "out").encode(TEXT) == tok.encode(TEXT)
