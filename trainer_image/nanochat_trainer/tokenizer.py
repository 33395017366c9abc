"""Tokenizers: GPT-2's BPE (tiktoken or a tokenizer.json) or a byte-level BPE trained on the data.

    from nanochat_trainer.tokenizer import build_tokenizer, load_tokenizer, train_bpe
    tok = build_tokenizer(cfg, run_dir)      # what training uses; checks cfg.model.vocab_size
    ids = tok.encode("def f(): ...");  text = tok.decode(ids);  tok.eot_id;  tok.n_vocab
    tok.save(run_dir)                        # writes run_dir/tokenizer.json (and what it refers to)
    tok = load_tokenizer(run_dir)            # reads back what save wrote
    tok.save_hf(hf_dir, model_max_length=n)  # Hugging Face files: transformers and vLLM load them

Kinds (`TokenizerConfig.kind`):

- gpt2: GPT-2's BPE. `tokenizer.path` may name a Hugging Face `tokenizer.json` or a
  tiktoken `.tiktoken` file; without a path, `r50k_base.tiktoken` (GPT-2's vocabulary),
  checked by its sha256, from tiktoken's cache (`$TIKTOKEN_CACHE_DIR`, `$DATA_GYM_CACHE_DIR`
  or `<tmp>/data-gym-cache`: the trainer image has it there, and `make gpt2-bpe` puts it there
  from openai-whisper's source distribution), else from the cache on the run's volume
  (`<runs>/.cache/tiktoken`), else downloaded the way tiktoken does into that cache. Only a
  machine that cannot download it gets the `ConfigError` saying so.
- bpe: byte-level BPE trained with `tokenizers` on the first `tokenizer.train_docs`
  documents of the data, with `<|endoftext|>` as its special token. It is trained
  once and kept in `tokenizer.path` (default `<run_dir>/tokenizer.json`), so a resumed
  run reuses it.

A text that literally contains "<|endoftext|>" is encoded as ordinary text: only the
loader inserts `eot_id`, between documents.

`save` writes a Hugging Face tokenizer.json for tokenizers backed by `tokenizers`; for
tiktoken ones it writes `tokenizer.tiktoken` plus a small tokenizer.json that points at it
(`{"nanochat_tokenizer": "tiktoken", ...}`), which only `load_tokenizer` understands.

`save_hf` writes what `transformers.AutoTokenizer.from_pretrained(dir)` (and so vLLM) loads
and what gives the ids of `encode`: tokenizer.json (for tiktoken ones, a `tokenizers` BPE
whose vocabulary and merges come from the ranks, with GPT-2's byte-level pre-tokenizer and
decoder, as in GPT-2's own Hugging Face files), tokenizer_config.json and
special_tokens_map.json (end-of-text is also bos and unk, nothing is added around a text:
GPT-2's Hugging Face defaults). Its tokenizer.json replaces one that `save` wrote in the same
folder (for tiktoken ones, the pointer file), so export into a folder of its own (`RunLayout.hf()`);
`load_tokenizer` reads an export too and gets the same ids.

The literal "<|endoftext|>": tokenizer.json marks it special, as every Hugging Face GPT-2
does, so skipping special tokens on decode drops it. tokenizer_config.json sets
`split_special_tokens: true`, so transformers encodes a literal "<|endoftext|>" as text, like
`encode`. A reader of tokenizer.json alone (`tokenizers.Tokenizer.from_file`, a server
that ignores tokenizer_config.json) or a caller passing `split_special_tokens=False` gets
`eot_id` for it instead.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTok

from .config import TrainerConfig, load_trainer_config
from .contract import TOKENIZER_FILE
from .data.sources import iter_documents
from .errors import ConfigError
from .files import write_atomic

EOT = "<|endoftext|>"
# Other spellings of end-of-text, for tokenizer.json files made elsewhere.
_EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
R50K_FILE = hashlib.sha1(R50K_URL.encode()).hexdigest()  # its name in tiktoken's cache
WHISPER_GPT2_MEMBER = "whisper/assets/gpt2.tiktoken"
DOWNLOAD_TIMEOUT_S = 30
_MARKER = "nanochat_tokenizer"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"

PathLike = str | os.PathLike


class Tokenizer:
    """The interface every part of the trainer uses."""

    n_vocab: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, directory: PathLike) -> Path:
        """Write `directory/tokenizer.json` (a path ending in .json is used as is); return it."""
        raise NotImplementedError

    def hf_backend(self) -> HFTok:
        """This tokenizer as a `tokenizers.Tokenizer` that gives the same ids (not to be modified)."""
        raise NotImplementedError

    def save_hf(self, out_dir: PathLike, *, model_max_length: int | None = None) -> Path:
        """Write the Hugging Face tokenizer files into `out_dir` (see the module's docstring); return it.

        `model_max_length`: the model's context length (transformers' own default, an
        enormous number, when None).
        """
        backend = self.hf_backend()
        eot = backend.id_to_token(self.eot_id)
        if eot is None or backend.token_to_id(eot) != self.eot_id:
            raise ValueError(f"end-of-text id {self.eot_id} is not a token of the Hugging Face tokenizer")
        # GPT-2's Hugging Face defaults: end-of-text is bos, eos and unk, and nothing is added
        # around a text (tokenizer.json has no template that would; add_bos_token and
        # add_eos_token say so to the classes that read them), so tokenizer(text), which is
        # what vLLM calls, gives `encode`'s ids.
        special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
        config: dict[str, object] = {
            # This class runs tokenizer.json as written, in transformers 4 and 5. Without a class
            # here transformers takes config.json's model type's (Qwen2Tokenizer for qwen3: another
            # pre-tokenizer, other ids); transformers 5 rebuilds a GPT2Tokenizer from the vocab and
            # merges alone, with its own pre-tokenizer.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            # True (the default of older transformers; 5 ignores it for BPE) turns "x ." into
            # "x." on decode.
            "clean_up_tokenization_spaces": False,
            # A literal "<|endoftext|>" in a text stays text, as in `encode`.
            "split_special_tokens": True,
            "added_tokens_decoder": {
                str(self.eot_id): {
                    "content": eot,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
            },
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        folder = Path(out_dir)
        write_atomic(folder / TOKENIZER_FILE, backend.to_str().encode())
        write_atomic(folder / HF_CONFIG_FILE, json.dumps(config, indent=2).encode())
        write_atomic(folder / HF_SPECIAL_TOKENS_FILE, json.dumps(special, indent=2).encode())
        return folder


def _target(directory: PathLike) -> Path:
    path = Path(directory)
    if path.suffix != ".json":
        path = path / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (a trained BPE, or any tokenizer.json)."""

    def __init__(self, tok, source: str = "<memory>"):
        self._tok = tok
        # Literal "<|endoftext|>" in the data must stay text, never become a separator.
        self._tok.encode_special_tokens = True
        ids = [tok.token_to_id(t) for t in _EOT_CANDIDATES]
        found = [i for i in ids if i is not None]
        if not found:
            raise ConfigError(
                "tokenizer.path", source, f"has no end-of-text token (looked for {list(_EOT_CANDIDATES)})"
            )
        self.eot_id = found[0]
        self.n_vocab = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: PathLike) -> Path:
        path = _target(directory)
        write_atomic(path, self._tok.to_str().encode())
        return path

    def hf_backend(self) -> HFTok:
        return self._tok


class TiktokenTokenizer(Tokenizer):
    """GPT-2-style BPE run by tiktoken from a table of mergeable ranks."""

    def __init__(
        self, ranks: dict[bytes, int], name: str = "gpt2", pattern: str = GPT2_PATTERN, eot_id: int | None = None
    ):
        self._ranks = ranks
        self._name, self._pattern = name, pattern
        self.eot_id = len(ranks) if eot_id is None else eot_id
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: self.eot_id})
        self.n_vocab = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def save(self, directory: PathLike) -> Path:
        path = _target(directory)
        ranks_file = path.with_suffix(".tiktoken")
        write_atomic(ranks_file, dump_tiktoken(self._ranks))
        meta = {
            _MARKER: "tiktoken",
            "name": self._name,
            "pattern": self._pattern,
            "ranks_file": ranks_file.name,
            "eot_id": self.eot_id,
        }
        write_atomic(path, json.dumps(meta, indent=1).encode())
        return path

    def hf_backend(self) -> HFTok:
        if self._pattern != GPT2_PATTERN:
            # ByteLevel's built-in regex is GPT-2's; another pattern would need its own check.
            raise ValueError(f"no Hugging Face pre-tokenizer known to match the pattern {self._pattern!r}")
        return tiktoken_to_hf(self._ranks, self.eot_id)


# --------------------------------------------------------------------------- Hugging Face


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the one `tokenizers`' ByteLevel uses: printable
    Latin-1 bytes stand for themselves, the others for characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update((b, chr(256 + n)) for n, b in enumerate(extra))
    return chars


def tiktoken_to_hf(ranks: dict[bytes, int], eot_id: int) -> HFTok:
    """A `tokenizers` BPE that gives tiktoken's ids for GPT-2-pattern rank tables.

    tiktoken merges, in a piece, the adjacent pair whose concatenation has the lowest rank, and
    takes a piece that is a token whole. So every split of a token into two tokens is a merge,
    ordered by the rank of the token it makes (transformers' TikTokenConverter does the same),
    and `ignore_merges` takes whole tokens first.
    """
    if eot_id in ranks.values():
        raise ValueError(f"end-of-text id {eot_id} is also the id of a mergeable token")
    to_char = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT] = eot_id  # GPT-2's vocab.json has it too; add_special_tokens below reuses the id
    merges = sorted(
        (rank, ranks[token[:cut]], ranks[token[cut:]], text(token[:cut]), text(token[cut:]))
        for token, rank in ranks.items()
        for cut in range(1, len(token))
        if token[:cut] in ranks and token[cut:] in ranks
    )
    tok = HFTok(models.BPE(vocab, [(left, right) for *_, left, right in merges], ignore_merges=True))
    # ByteLevel's regex is GPT-2's pattern (GPT2_PATTERN) in the regex engine `tokenizers` uses.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tok


# --------------------------------------------------------------------------- files


def dump_tiktoken(ranks: dict[bytes, int]) -> bytes:
    """The .tiktoken format: `base64(token) rank` per line, by rank."""
    return b"".join(
        base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])
    )


def parse_tiktoken(data: bytes, source: str = "<bytes>") -> dict[bytes, int]:
    # Parsed here rather than with tiktoken.load, which copies local files into its cache.
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ConfigError("tokenizer.path", source, f"line {number} is not `base64token rank`") from e
    if not ranks:
        raise ConfigError("tokenizer.path", source, "is an empty .tiktoken file")
    return ranks


def load_tokenizer(path: PathLike, field: str = "tokenizer.path") -> Tokenizer:
    """A tokenizer from a directory (its tokenizer.json), a tokenizer.json or a .tiktoken file."""
    file = Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if not file.is_file():
        raise ConfigError(
            field,
            str(path),
            "does not exist (expected a tokenizer.json, a .tiktoken file, or a folder holding tokenizer.json)",
        )
    if file.suffix == ".tiktoken":
        return TiktokenTokenizer(parse_tiktoken(file.read_bytes(), str(file)))
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(field, str(path), f"is not a JSON tokenizer file: {e}") from e
    if isinstance(meta, dict) and meta.get(_MARKER) == "tiktoken":
        ranks_file = file.parent / meta["ranks_file"]
        if not ranks_file.is_file():
            raise ConfigError(field, str(path), f"refers to {ranks_file}, which is missing")
        return TiktokenTokenizer(
            parse_tiktoken(ranks_file.read_bytes(), str(ranks_file)), meta["name"], meta["pattern"], meta["eot_id"]
        )
    try:
        tok = HFTok.from_str(json.dumps(meta))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ConfigError(field, str(path), f"is not a Hugging Face tokenizer.json: {e}") from e
    return HFTokenizer(tok, str(file))


def tiktoken_cache_dir() -> Path:
    """Where tiktoken itself caches downloads, in its order of preference."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def gpt2_tokenizer(download_to: Path | None = None) -> Tokenizer:
    """GPT-2's BPE from tiktoken's cache or `download_to`, else downloaded from R50K_URL into
    `download_to` (none: never downloads); always checked by its sha256."""
    url = R50K_URL
    dirs = [tiktoken_cache_dir()] + ([download_to] if download_to not in (None, tiktoken_cache_dir()) else [])
    for folder in dirs:
        cached = folder / R50K_FILE
        if cached.is_file() and _is_r50k(data := cached.read_bytes()):
            return TiktokenTokenizer(parse_tiktoken(data, str(cached)), "gpt2")
    where = ", ".join(str(d) for d in dirs)
    if download_to is None:
        raise ConfigError("tokenizer.path", None, f"GPT-2's BPE is not in tiktoken's cache ({where})")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except OSError as e:  # URLError, timeouts, refused connections: this machine cannot fetch it
        raise ConfigError(
            "tokenizer.path",
            None,
            f"GPT-2's BPE is not available offline (looked in {where}) and downloading {url} failed ({e}). "
            "Set tokenizer.path to a GPT-2 tokenizer.json or r50k_base.tiktoken file, or put r50k_base.tiktoken "
            f"in tiktoken's cache as {R50K_FILE} (`make gpt2-bpe` does)",
        ) from e
    if not _is_r50k(data):
        raise ConfigError("tokenizer.path", None, f"{url} sent a file that is not GPT-2's BPE (sha256 mismatch)")
    write_atomic(download_to / R50K_FILE, data)
    return TiktokenTokenizer(parse_tiktoken(data, url), "gpt2")


def _is_r50k(data: bytes) -> bool:
    """Whether `data` is GPT-2's BPE, byte for byte (by its sha256)."""
    return hashlib.sha256(data).hexdigest() == R50K_SHA256


def install_gpt2_from_sdist(sdist: PathLike) -> Path:
    """Put GPT-2's BPE into tiktoken's cache from openai-whisper's source distribution (its
    `whisper/assets/gpt2.tiktoken` is r50k_base byte for byte), checked by its sha256."""
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/" + WHISPER_GPT2_MEMBER)), None)
        if member is None:
            raise ConfigError("--from-sdist", str(sdist), f"holds no {WHISPER_GPT2_MEMBER}")
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    if not _is_r50k(data):
        raise ConfigError("--from-sdist", str(sdist), f"its {WHISPER_GPT2_MEMBER} is not GPT-2's BPE (sha256 mismatch)")
    target = tiktoken_cache_dir() / R50K_FILE
    write_atomic(target, data)
    return target


# --------------------------------------------------------------------------- training


def train_bpe(texts: Iterable[str], vocab_size: int, field: str = "model.vocab_size") -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (256 bytes, merges, `<|endoftext|>`)."""
    if vocab_size < 257:
        raise ConfigError(field, vocab_size, "a byte-level BPE needs at least 257 tokens (256 bytes + end-of-text)")
    tok = HFTok(models.BPE())
    # GPT-2's pre-tokenisation (ByteLevel with its regex): any text round-trips exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, "<trained>")


def _training_texts(cfg: TrainerConfig) -> Iterable[str]:
    return itertools.islice(iter_documents(cfg.data, 0, 1), cfg.tokenizer.train_docs)


def check_vocab(tok: Tokenizer, cfg: TrainerConfig, where: str) -> None:
    if tok.n_vocab > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"is smaller than the tokenizer's {tok.n_vocab} tokens ({where}); "
            f"set model.vocab_size to at least {tok.n_vocab}",
        )


def build_tokenizer(cfg: TrainerConfig, run_dir: PathLike) -> Tokenizer:
    """The run's tokenizer, checked against `model.vocab_size` and kept in run_dir/tokenizer.json.

    bpe: loads `tokenizer.path` (default run_dir/tokenizer.json) or trains and saves it
    there. gpt2: `tokenizer.path`, else the copy in run_dir, else tiktoken's cache.
    With several ranks, call it on rank 0 first and let the others follow after a
    barrier, so the tokenizer is trained once.
    """
    saved = Path(run_dir) / TOKENIZER_FILE
    t = cfg.tokenizer
    if t.kind == "bpe":
        keep = _target(t.path) if t.path else saved
        if keep.is_file():
            tok, where = load_tokenizer(keep), str(keep)
        else:
            tok, where = train_bpe(_training_texts(cfg), cfg.model.vocab_size), "trained"
            check_vocab(tok, cfg, where)
            tok.save(keep)
    elif t.path:
        tok, where = load_tokenizer(t.path), t.path
    elif saved.is_file():
        tok, where = load_tokenizer(saved, field="checkpoint.dir"), str(saved)
    else:
        tok, where = gpt2_tokenizer(download_to=Path(run_dir).parent / ".cache" / "tiktoken"), "GPT-2's BPE"
    check_vocab(tok, cfg, where)
    if not saved.is_file():
        tok.save(saved)  # checkpoints in run_dir then always carry their tokenizer
    return tok


def train_tokenizer_cli(
    config: PathLike | TrainerConfig, out_dir: PathLike, vocab_size: int | None = None
) -> Tokenizer:
    """`nanochat tokenizer train`: train a bpe on the config's data, save out_dir/tokenizer.json."""
    cfg = config if isinstance(config, TrainerConfig) else load_trainer_config(str(config))
    size = vocab_size or cfg.model.vocab_size
    tok = train_bpe(_training_texts(cfg), size, field="vocab_size" if vocab_size else "model.vocab_size")
    tok.save(out_dir)
    return tok
