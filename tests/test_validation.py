"""Validation during training: held-out sources (the standard library, held-out repositories),
the rows, the overlap check, and the loss a run logs.

    .venv/bin/pytest tests/test_validation.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanochat_trainer.config import DataConfig, TrainerConfig
from nanochat_trainer.data.heldout import heldout_rows
from nanochat_trainer.data.sources import is_heldout, iter_indexed
from nanochat_trainer.data.stdlib import stdlib_files, stdlib_root
from nanochat_trainer.errors import ConfigError
from nanochat_trainer.tokenizer import train_bpe
from nanochat_trainer.train import train

from micro import micro_cfg, read_log


@pytest.fixture(scope="module")
def tok():
    return train_bpe((f"def f{i}(x):\n    return x + {i}\n" for i in range(200)), 300)


def test_stdlib_source_is_the_standard_librarys_own_code() -> None:
    files = stdlib_files()
    names = {p.relative_to(stdlib_root()).as_posix() for p in files}
    assert {"os.py", "json/decoder.py", "asyncio/tasks.py"} <= names
    assert not [n for n in names if "/test/" in f"/{n}" or n.split("/")[-1].startswith("test_")]
    assert not [n for n in names if n.startswith(("encodings/", "site-packages/"))]
    assert 400 < len(files) and sum(p.stat().st_size for p in files) > 5e6  # ~3M GPT-2 tokens
    docs = list(iter_indexed(DataConfig(source="stdlib"), repeat=False))
    assert len(docs) == len(files) and len({t for _, t in docs}) > 0.95 * len(files)  # one pass, no repeats


def _repo_jsonl(path: Path, repos: int = 40, files: int = 3) -> Path:
    with open(path, "w") as f:
        for r in range(repos):
            for i in range(files):
                f.write(json.dumps({"content": f"# repo {r} file {i}\nx = {r * 10 + i}\n", "repo": f"org/r{r}"}) + "\n")
    return path


def test_held_out_repositories_are_never_trained_on(tmp_path: Path) -> None:
    data = DataConfig(source="local", path=str(_repo_jsonl(tmp_path / "d.jsonl")), holdout_repos=0.3, repo_field="repo")
    train_docs = [t for _, t in iter_indexed(data, repeat=False)]
    held_docs = [t for _, t in iter_indexed(data, heldout=True, repeat=False)]
    repo = lambda t: int(t.split()[2])  # noqa: E731
    train_repos, held_repos = {repo(t) for t in train_docs}, {repo(t) for t in held_docs}
    assert not train_repos & held_repos and train_repos | held_repos == set(range(40))
    assert held_repos == {r for r in range(40) if is_heldout(f"org/r{r}", 0.3)} and 4 <= len(held_repos) <= 20
    assert len(held_docs) == 3 * len(held_repos)  # whole repositories go one way
    # Ranks share out the training share only, and the endless stream never reaches a held-out file.
    two = [t for rank in (0, 1) for _, t in iter_indexed(data, rank, 2, repeat=False)]
    assert sorted(two) == sorted(train_docs)
    endless = iter_indexed(data)
    assert not {repo(next(endless)[1]) for _ in range(300)} & held_repos


def test_held_out_folders_of_a_local_tree(tmp_path: Path) -> None:
    for r in range(12):
        (tmp_path / f"proj{r}").mkdir()
        (tmp_path / f"proj{r}" / "m.py").write_text(f"R = {r}\n")
    data = DataConfig(source="local", path=str(tmp_path), holdout_repos=0.5)
    held = {t for _, t in iter_indexed(data, heldout=True, repeat=False)}
    assert held == {f"R = {r}\n" for r in range(12) if is_heldout(f"proj{r}", 0.5)} and held
    assert not held & {t for _, t in iter_indexed(data, repeat=False)}


def test_bad_validation_sources_name_their_field(tmp_path: Path, tok) -> None:
    def rows(**validation) -> None:
        cfg = micro_cfg(tmp_path / "run", validation=validation)
        heldout_rows(cfg, tok, 0, 1)

    with pytest.raises(ConfigError) as e:
        rows(data={"source": "local", "path": str(tmp_path / "absent")})
    assert e.value.field == "validation.data.path"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        rows(data={"source": "local", "path": str(tmp_path / "empty")})
    assert e.value.field == "validation.data.glob"
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.py").write_text("x = 1\n")
    with pytest.raises(ConfigError) as e:
        rows(data={"source": "local", "path": str(tmp_path / "small")}, tokens=10_000)
    assert e.value.field == "validation.tokens"
    with pytest.raises(ConfigError) as e:
        rows(heldout=True)  # the training data (synthetic) has no held-out repositories
    assert e.value.field == "data.holdout_repos"
    # The training data itself, as validation: every document overlaps.
    with pytest.raises(ConfigError) as e:
        rows(data={"source": "synthetic", "seed": 0}, tokens=2048)
    assert e.value.field == "validation.data" and "training documents" in str(e.value)
    # Another seed of the generator shares no document with this one's first 2000.
    assert heldout_rows(micro_cfg(tmp_path / "r", validation={"data": {"seed": 7}, "tokens": 2048}), tok, 0, 1).numel()


def test_rows_are_the_sources_first_tokens_split_over_ranks(tmp_path: Path, tok) -> None:
    cfg = micro_cfg(tmp_path / "run", validation={"tokens": 1000})
    one = heldout_rows(cfg, tok, 0, 1)
    assert one.shape == (16, 65)  # ceil(1000 / 64) rows of seq_len + 1
    r0, r1 = heldout_rows(cfg, tok, 0, 2), heldout_rows(cfg, tok, 1, 2)
    assert r0.shape == r1.shape == (8, 65) and not r0.equal(r1)  # disjoint documents, as many rows
    first = next(iter_indexed(DataConfig(source="stdlib")))[1]  # the seeded shuffle's first module
    assert one.flatten()[:20].tolist() == (tok.encode(first) + [tok.eot_id])[:20]


def test_a_run_validates_on_the_standard_library_and_the_loss_falls(tmp_path: Path) -> None:
    cfg = micro_cfg(tmp_path / "run", steps=12, validation={"every": 4, "tokens": 4096})
    train(cfg)
    log = read_log(tmp_path / "run")
    val = {step: r["val_loss"] for step, r in log.items() if "val_loss" in r}
    assert sorted(val) == [4, 8, 12]
    assert val[12] < val[4] - 0.1, val


def test_bad_validation_fails_before_the_first_step(tmp_path: Path) -> None:
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.py").write_text("x = 1\n")
    small = {"source": "local", "path": str(tmp_path / "small")}
    cfg = micro_cfg(tmp_path / "run", steps=2, validation={"data": small, "tokens": 10_000})
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert e.value.field == "validation.tokens"
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_presets_validate_on_real_code() -> None:
    for preset in ("tiny", "nano-125M", "nano-1B", "qwen3-hybrid"):
        v = TrainerConfig(preset=preset).validation
        assert v is not None and v.data.source == "stdlib" and not v.heldout, preset
