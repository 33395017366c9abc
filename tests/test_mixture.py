"""Data mixtures, HumanEval decontamination of every source, and a generation run's dataset as a source.

A mixture is read sharded like one source (ranks disjoint, rows independent of the world size),
resumes exactly, counts the tokens each source gave, and refuses to resume under other weights.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from nanochat_trainer.config import DataConfig, TrainerConfig, ValidationConfig, format_validation_error
from nanochat_trainer.data.heldout import heldout_rows
from nanochat_trainer.data.loader import TokenLoader, merge_states
from nanochat_trainer.data.mixture import Mixture
from nanochat_trainer.data.shards import Manifest, append_shard, read_manifest
from nanochat_trainer.data.sources import check_sources, iter_indexed, mixture_of
from nanochat_trainer.data.synthetic import document
from nanochat_trainer.errors import ConfigError
from nanochat_trainer.eval.humaneval import load_problems
from nanochat_trainer.train.run import train

from micro import micro_cfg, read_log


class Bytes:
    """A byte tokenizer: a document's tokens are its bytes, shifted past the eot id 0."""

    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + b for b in text.encode()]


def mixture(*sources: dict, **data) -> DataConfig:
    return DataConfig.model_validate({"source": "mixture", "mixture": list(sources), **data})


def loader_cfg(data: DataConfig) -> TrainerConfig:
    return TrainerConfig.model_validate({"preset": "tiny", "data": data.model_dump(), "batch_size": 8, "seq_len": 64})


SYN_STD = mixture(
    {"name": "synthetic", "weight": 3, "source": "synthetic", "seed": 5},
    {"name": "stdlib", "weight": 1, "source": "stdlib"},
)


def test_the_interleaving_gives_each_source_its_share_and_numbers_its_documents_in_order():
    mix = Mixture([0.5, 0.3, 0.2], block=64)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for i in range(64_000 * 2):
        s, k = mix.locate(i)
        seen[s].append(k)
    assert {s: len(ks) / (64_000 * 2) for s, ks in seen.items()} == {0: 0.5, 1: 0.3, 2: 0.2}
    for ks in seen.values():
        assert ks == list(range(len(ks)))  # each source read front to back, nothing skipped
    for s in range(3):
        for start in (0, 1, 63, 64, 65, 12_345, 100_000):
            assert mix.taken(s, start) == sum(1 for i in range(start) if mix.locate(i)[0] == s)


def test_a_mixture_reads_each_source_as_it_would_alone():
    docs = dict(itertools.islice(iter_indexed(SYN_STD), 640))
    mix = mixture_of(SYN_STD)
    synthetic = [docs[i] for i in sorted(docs) if mix.locate(i)[0] == 0]
    assert synthetic == [document(5, k) for k in range(len(synthetic))]
    from_stdlib = [docs[i] for i in sorted(docs) if mix.locate(i)[0] == 1]
    stdlib = dict(itertools.islice(iter_indexed(DataConfig(source="stdlib", decontaminate=False)), len(from_stdlib)))
    assert len(from_stdlib) >= 64 and from_stdlib == [stdlib[k] for k in range(len(from_stdlib))]


@pytest.mark.parametrize("world", [2, 4])  # sizes dividing the 64 lanes, as for the loader
def test_ranks_read_disjoint_shares_whose_union_is_the_one_process_stream(world):
    whole = dict(itertools.islice(iter_indexed(SYN_STD, start=100), 600))
    union = {}
    for rank in range(world):
        union.update(itertools.islice(iter_indexed(SYN_STD, rank, world, start=100), 600 // world))
    assert union == {i: whole[i] for i in union}
    assert len(union) == 600


def test_the_loader_over_a_mixture_resumes_exactly_on_another_world_size_and_counts_tokens():
    cfg = loader_cfg(SYN_STD)
    one = TokenLoader(cfg, Bytes(), 0, 1)
    rows = [one.next_batch()[0] for _ in range(120)]  # each lane reaches its second document
    halves = [TokenLoader(cfg, Bytes(), r, 2) for r in range(2)]
    for b in range(60):
        x0, x1 = (h.next_batch(4)[0] for h in halves)
        assert torch.equal(rows[b][0::2], x0) and torch.equal(rows[b][1::2], x1)
    state = merge_states([h.state_dict() for h in halves])
    assert sum(state["source_tokens"].values()) == 60 * 8 * 65  # every token of every row, once
    resumed = TokenLoader(cfg, Bytes(), 0, 1)
    resumed.load_state_dict(state)
    for b in range(60, 120):
        assert torch.equal(resumed.next_batch()[0], rows[b])
    assert dict(zip(resumed.sources, resumed.source_tokens)) == dict(zip(one.sources, one.source_tokens))
    assert all(one.source_tokens)  # both sources gave tokens


def test_resuming_under_other_weights_is_refused_naming_the_field():
    cfg = loader_cfg(SYN_STD)
    first = TokenLoader(cfg, Bytes(), 0, 1)
    first.next_batch()
    other = SYN_STD.model_copy(deep=True)
    other.mixture[1].weight = 2
    with pytest.raises(ConfigError) as err:
        TokenLoader(loader_cfg(other), Bytes(), 0, 1).load_state_dict(first.state_dict())
    assert err.value.field == "data.mixture" and "stdlib: 1" in str(err.value)


def test_bad_mixtures_are_refused_before_any_step(tmp_path):
    with pytest.raises(ValidationError) as err:
        mixture({"name": "a", "weight": -1}, {"name": "b", "weight": 1})
    assert "data.mixture.0.weight=-1: Input should be greater than 0" in format_validation_error(err.value, "data.")
    with pytest.raises(ValidationError, match="mixture names repeat: a"):
        mixture({"name": "a", "weight": 1}, {"name": "a", "weight": 1, "source": "stdlib"})
    with pytest.raises(ValidationError, match="needs data.mixture"):
        DataConfig(source="mixture")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not python")
    empty = mixture({"name": "a", "weight": 1}, {"name": "b", "weight": 1, "source": "local", "path": str(tmp_path)})
    with pytest.raises(ConfigError) as err:
        check_sources(empty)
    assert err.value.field.startswith("data.mixture.1")


def test_documents_that_overlap_humaneval_are_dropped_from_every_source(tmp_path):
    problem = load_problems()[3]
    leaked = "import os\n\n" + problem["prompt"] + problem["canonical_solution"] + "\n\nprint('done')\n"
    folder = tmp_path / "repo"
    folder.mkdir()
    for n in range(6):
        (folder / f"m{n}.py").write_text(leaked if n == 2 else document(0, n))
    data = DataConfig(source="local", path=str(folder))
    dropped: list[tuple[int, str]] = []
    texts = [t for _, t in itertools.islice(iter_indexed(data, on_drop=lambda i, task: dropped.append((i, task))), 6)]
    assert texts.count("") == 1 and leaked not in texts
    assert [task for _, task in dropped] == [problem["task_id"]]
    kept = [
        t
        for _, t in itertools.islice(iter_indexed(DataConfig(source="local", path=str(folder), decontaminate=False)), 6)
    ]
    assert leaked in kept  # decontaminate: false reads it as it is
    loader = TokenLoader(loader_cfg(data), Bytes(), 0, 1)
    for _ in range(4):
        loader.next_batch()
    assert loader.decontaminated >= 1 and loader.state_dict()["decontaminated"] == loader.decontaminated


def test_a_generation_runs_dataset_is_a_source(tmp_path):
    folder = tmp_path / "dataset"
    manifest = Manifest()
    rows = [{"text": document(9, i), "topic": "lists" if i % 2 else "dates"} for i in range(10)]
    append_shard(folder, manifest, rows[:6], {"next_index": 6})
    append_shard(folder, manifest, rows[6:], {"next_index": 10})
    (folder / "shard-00002.parquet").write_text("a shard a killed writer never listed")
    assert read_manifest(folder).rows == 10
    data = DataConfig(source="local", path=str(folder))
    assert [t for _, t in itertools.islice(iter_indexed(data), 10)] == [r["text"] for r in rows]
    held = DataConfig(source="local", path=str(folder), holdout_repos=0.5, repo_field="topic")
    train = {t for _, t in itertools.islice(iter_indexed(held, repeat=False), 10)}
    heldout = {t for _, t in iter_indexed(held, heldout=True, repeat=False)}
    assert train.isdisjoint(heldout) and train | heldout == {r["text"] for r in rows}
    assert Counter(len(s) for s in (train, heldout)) == Counter([5, 5])  # one topic each side


def test_a_run_on_a_mixture_logs_and_checkpoints_the_tokens_of_each_source(tmp_path):
    folder = tmp_path / "made" / "dataset"
    append_shard(folder, Manifest(), [{"text": document(7, i)} for i in range(50)], {"next_index": 50})
    data = {
        "source": "mixture",
        "mixture": [
            {"name": "synthetic", "weight": 1, "source": "synthetic"},
            {"name": "teacher-made", "weight": 1, "source": "local", "path": str(folder)},
        ],
    }
    run = tmp_path / "run"
    # Documents 0-63 (the first of each of the 64 lanes) are one block of one source: batches of 64
    # rows reach the next block within the run.
    train(micro_cfg(run, data=data, steps=6, batch_size=64, checkpoint={"every": 3}, validation=None))
    log = read_log(run)
    tokens = log[6]["data_tokens"]
    assert set(tokens) == {"synthetic", "teacher-made"} and all(tokens.values())
    assert sum(tokens.values()) == 6 * 64 * 65 and log[3]["data_tokens"] != tokens
    train(micro_cfg(run, data=data, steps=9, batch_size=64, checkpoint={"every": 3}, validation=None))
    assert sum(read_log(run)[9]["data_tokens"].values()) == 9 * 64 * 65  # counted on from the checkpoint
    other = micro_cfg(run, data={**data, "mixture": [data["mixture"][0]]}, steps=12, batch_size=64, validation=None)
    with pytest.raises(ConfigError, match="differs from the checkpoint's mixture"):
        train(other)


def _repos(tmp_path, n: int = 20):
    """A folder of n repositories (first-level folders), one module each."""
    for r in range(n):
        (tmp_path / f"repo{r}").mkdir()
        (tmp_path / f"repo{r}" / "m.py").write_text(document(4, r))
    return {"name": "repos", "weight": 1, "source": "local", "path": str(tmp_path), "holdout_repos": 0.3}


def test_a_mixture_validates_on_the_held_out_repositories_of_the_sources_that_hold_some_out(tmp_path):
    data = mixture({"name": "synthetic", "weight": 1, "source": "synthetic"}, _repos(tmp_path))
    held = [t for _, t in iter_indexed(data, heldout=True, repeat=False)]
    trained = {t for _, t in itertools.islice(iter_indexed(data), 400)}
    mine = {document(4, r) for r in range(20)}
    assert held and set(held) <= mine and set(held).isdisjoint(trained)
    assert (mine & trained) | set(held) == mine  # every repository is on one side
    with pytest.raises(ConfigError, match="holds no repositories out"):
        next(iter_indexed(mixture({"name": "s", "weight": 1}), heldout=True, repeat=False))


def test_validation_data_that_holds_repositories_out_validates_on_those(tmp_path):
    repos = _repos(tmp_path)
    cfg = loader_cfg(DataConfig(source="synthetic"))
    cfg.validation = ValidationConfig(
        data=DataConfig.model_validate({k: v for k, v in repos.items() if k not in ("name", "weight")}), tokens=64
    )
    rows = heldout_rows(cfg, Bytes(), 0, 1)
    held = [t for _, t in iter_indexed(cfg.validation.data, heldout=True, repeat=False)]
    assert bytes(b - 1 for b in rows.flatten().tolist() if b).decode().startswith(held[0][:40])
