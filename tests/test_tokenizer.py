"""Tokenizers: trained byte-level BPE, GPT-2's BPE from local files, the vocabulary check.

    .venv/bin/pytest tests/test_tokenizer.py -q

No test touches the network: GPT-2-style files are built here, small, and GPT-2's real BPE
comes from tiktoken's cache (`make gpt2-bpe`) and is served from loopback where a download is tested.
The Hugging Face exports are loaded by transformers from the folder alone (local_files_only).
"""

from __future__ import annotations

import http.server
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer as HFTok
from transformers import AutoTokenizer

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


@pytest.fixture(scope="module")
def gpt2_bpe() -> bytes:
    """GPT-2's real BPE (r50k_base.tiktoken) from tiktoken's cache, where `make gpt2-bpe` puts it
    (from openai-whisper's source distribution on PyPI, checked by its sha256)."""
    path = tk.tiktoken_cache_dir() / tk.R50K_FILE
    if not path.is_file():
        pytest.fail(f"GPT-2's BPE is not at {path}: run `make gpt2-bpe` (make test does)")
    return path.read_bytes()


class _FileServer:
    """A real HTTP server on loopback answering every GET with `body`, counting requests."""

    def __init__(self, body: bytes):
        outer = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/encodings/r50k_base.tiktoken"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_gpt2_is_the_real_bpe(gpt2_bpe):
    tok = tk.gpt2_tokenizer()
    assert (tok.n_vocab, tok.eot_id) == (50257, 50256)
    assert tok.encode("hello world") == [31373, 995]  # GPT-2's own ids
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_gpt2_is_downloaded_once_into_the_runs_volume(tmp_path, monkeypatch, gpt2_bpe):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    server = _FileServer(gpt2_bpe)
    monkeypatch.setattr(tk, "R50K_URL", server.url)
    cfg = _cfg(tokenizer={"kind": "gpt2"}, model={"vocab_size": 50257})
    try:
        tok = build_tokenizer(cfg, tmp_path / "runs" / "first")
    finally:
        server.close()
    assert server.requests == 1 and tok.encode("hello world") == [31373, 995]
    cached = tmp_path / "runs" / ".cache" / "tiktoken" / tk.R50K_FILE  # tiktoken's name for it
    assert cached.read_bytes() == gpt2_bpe
    # A second run on the same volume needs no network (the server is gone).
    assert build_tokenizer(cfg, tmp_path / "runs" / "second").encode("hello world") == [31373, 995]


def test_gpt2_download_failures_say_what_to_do(tmp_path, monkeypatch, gpt2_bpe):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    cfg = _cfg(tokenizer={"kind": "gpt2"}, model={"vocab_size": 50257})
    server = _FileServer(gpt2_bpe[:-100] + b"tampered")
    monkeypatch.setattr(tk, "R50K_URL", server.url)
    try:
        with pytest.raises(ConfigError, match="sha256") as err:
            build_tokenizer(cfg, tmp_path / "runs" / "r")
    finally:
        server.close()
    assert err.value.field == "tokenizer.path" and not (tmp_path / "runs" / ".cache" / "tiktoken").exists()
    monkeypatch.setattr(tk, "R50K_URL", server.url)  # closed now: this machine cannot fetch it
    with pytest.raises(ConfigError, match="not available offline") as err:
        build_tokenizer(cfg, tmp_path / "runs" / "r")
    assert err.value.field == "tokenizer.path" and "make gpt2-bpe" in str(err.value)


def test_gpt2_from_whispers_source_distribution(tmp_path, monkeypatch, gpt2_bpe):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))

    def sdist(data: bytes) -> Path:
        path = tmp_path / f"openai_whisper-{len(data)}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo(f"openai_whisper-20250625/{tk.WHISPER_GPT2_MEMBER}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return path

    with pytest.raises(ConfigError, match="sha256"):
        tk.install_gpt2_from_sdist(sdist(gpt2_bpe + b"\n"))
    assert not (tmp_path / "cache" / tk.R50K_FILE).exists()
    assert tk.install_gpt2_from_sdist(sdist(gpt2_bpe)) == tmp_path / "cache" / tk.R50K_FILE
    assert tk.gpt2_tokenizer().encode("hello world") == [31373, 995]


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


# --------------------------------------------------------------------------- Hugging Face export

# What a code model meets: code, whitespace runs and tabs, CRLF, unicode and emoji (ZWJ and
# skin-tone sequences), numbers, long identifiers, contractions, " ." (which transformers'
# clean-up of tokenization spaces would change on decode), controls, NBSP, nothing at all.
HF_TEXTS = [
    TEXT,
    "hello world",
    "import os\n\n\nclass Foo(Base):\n    def __init__(self, x: int = 3) -> None:\n        self.x = x  # set\n",
    "if x:\n\tif y:\n\t\treturn {'a': [1, 2.5e-3, 0x1F]}\r\n",
    "a    b\t\t\tc  \n  \n   \n\n\nd   ",
    "   leading and trailing   ",
    "naïve café Straße 世界 こんにちは Привет ١٢٣ ℕ",
    "emoji 😀 👍🏽 👨‍👩‍👧 🎉🎉 \U0001f9ea",
    "12345678901234567890 3.14159 1,000,000 -42 007",
    "a_very_long_identifier_name_that_keeps_going_on_and_on_for_testing_purposes = AnotherVeryLongClassName()",
    "x .  's don't we'll THEY'RE I'M",
    "\x00\x01\x7f nbsp\u00a0here\u3000ideographic",
    "",
    generate(11, 1)[0],
]


def _assert_hf_export_matches(tok: tk.Tokenizer, out: Path) -> None:
    """`tok.save_hf(out)` loads with transformers from the folder alone (bare, and beside a Qwen3
    config.json as export_hf writes, whose model type must not pick another tokenizer class) and
    gives `encode`'s ids, `decode`'s texts and `eot_id`."""
    before = tok.save(out.parent / "plain-before")
    assert tok.save_hf(out, model_max_length=2048) == out
    files = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == files
    ids = [tok.encode(t) for t in HF_TEXTS]
    literal = f"a{EOT}b"
    for with_model_config in (False, True):
        if with_model_config:
            (out / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": tok.n_vocab}))
        hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        assert (hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (tok.eot_id,) * 3
        assert (hf.eos_token, len(hf), hf.model_max_length) == (EOT, tok.n_vocab, 2048)
        # tokenizer(text) is what vLLM calls: special tokens on, and still nothing is added.
        assert [hf(t)["input_ids"] for t in HF_TEXTS] == ids
        assert hf(HF_TEXTS)["input_ids"] == ids
        assert [hf.encode(t, add_special_tokens=False) for t in HF_TEXTS] == ids
        assert [hf.decode(i) for i in ids] == HF_TEXTS == [tok.decode(i) for i in ids]
        # A literal end-of-text stays text, as in encode (split_special_tokens in tokenizer_config.json);
        # asked not to split special tokens, transformers turns it into eot_id.
        assert hf(literal)["input_ids"] == tok.encode(literal) and tok.eot_id not in tok.encode(literal)
        assert tok.eot_id in hf(literal, split_special_tokens=False)["input_ids"]
        # eot_id is special: decoded as such, dropped when special tokens are skipped (vLLM's default).
        assert hf.decode([tok.eot_id]) == EOT
        assert hf.decode(tok.encode("x") + [tok.eot_id], skip_special_tokens=True) == "x"
    # tokenizer.json read alone (no tokenizer_config.json) marks eot_id special too, and maps the
    # literal to it: the difference the module's docstring states.
    raw = HFTok.from_file(str(out / "tokenizer.json"))
    assert raw.decode(tok.encode("x") + [tok.eot_id], skip_special_tokens=True) == "x"
    assert tok.eot_id in raw.encode(literal).ids
    # Our own loader reads the export too, with the same ids; `save` writes what it wrote before.
    assert load_tokenizer(out).encode_batch(HF_TEXTS) == ids
    assert tok.save(out.parent / "plain-after").read_bytes() == before.read_bytes()


def test_bpe_hf_export_matches_transformers(tmp_path):
    tok = train_bpe(generate(0, 300), 1024)  # room for merges of whole identifiers and keywords
    assert tok.eot_id == 0
    _assert_hf_export_matches(tok, tmp_path / "hf")


def test_gpt2_hf_export_matches_transformers(gpt2_bpe, tmp_path):
    tok = tk.gpt2_tokenizer()
    _assert_hf_export_matches(tok, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf("hello world")["input_ids"] == [31373, 995]  # GPT-2's own ids
    # GPT-2's merges, recovered from the ranks: every token of two or more bytes is made by some merge.
    spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    made = {"".join(m.split(" ")) if isinstance(m, str) else "".join(m) for m in spec["model"]["merges"]}
    assert len(made) == 50000 and spec["model"]["vocab"][EOT] == 50256


def test_tiktoken_hf_export_of_a_small_table(tmp_path):
    ranks = tiny_ranks()
    tok = TiktokenTokenizer(ranks)
    _assert_hf_export_matches(tok, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf("def xyz")["input_ids"] == [ranks[b"def"], ranks[b" x"], ranks[b"yz"]]
    # What has no faithful Hugging Face form is refused, not written.
    with pytest.raises(ValueError, match="pattern"):
        TiktokenTokenizer(ranks, pattern=r"\S+|\s+").save_hf(tmp_path / "other")
    with pytest.raises(ValueError, match="mergeable"):
        TiktokenTokenizer(ranks, eot_id=ranks[b"de"]).save_hf(tmp_path / "other")
    assert not (tmp_path / "other").exists()
