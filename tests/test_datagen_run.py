"""stage generate end to end: a real HTTP teacher (e2e/fake_teacher.py's FakeQwen3Teacher, the
stand-in for a Qwen3 vLLM server no machine here reaches), the real sandbox, real Parquet shards.

What is kept is only ever a good answer; every failure a teacher has is counted by its reason;
a run killed with SIGKILL mid-shard resumes to exactly the rows an uninterrupted run keeps.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from e2e.fake_teacher import FakeQwen3Teacher, fake_teacher_app
from nanochat_operator.api import TrainingRunStatus
from nanochat_operator.progress import parse_trainer_metrics
from nanochat_operator.status import observe_job, training_status
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.contract import RunLayout
from nanochat_trainer.data.shards import iter_rows, read_manifest
from nanochat_trainer.datagen.run import Generator
from nanochat_trainer.datagen.seeds import seed_at
from nanochat_trainer.distill.teacher import TeacherUnavailable
from nanochat_trainer.errors import ConfigError
from nanochat_trainer.train.metrics import TrainerMetrics

from serving import free_port, serve_app

ROWS = 60
COLUMNS = ["text", "kind", "index", "topic", "concept"]


def config(run_dir: Path, url: str, **generate) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "stage": "generate",
            "checkpoint": {"dir": str(run_dir)},
            "metrics": {"port": 0},
            "generate": {
                "teacher": {"url": url + "/v1", "model": "Qwen/Qwen3-30B-A3B-FP8", "concurrency": 32},
                "rows": ROWS,
                "shard_rows": 25,
                "workers": 2,
                **generate,
            },
        }
    )


@pytest.fixture(scope="module")
def teacher():
    fake = FakeQwen3Teacher(latency_ms=5)
    url, stop = serve_app(fake_teacher_app(fake))
    yield fake, url
    stop()


@pytest.fixture(scope="module")
def uninterrupted(teacher, tmp_path_factory):
    """One whole run: its generator and its rows."""
    run_dir = tmp_path_factory.mktemp("whole")
    gen = Generator(config(run_dir, teacher[1]))
    gen.run()
    return gen, list(iter_rows(RunLayout(run_dir).dataset, COLUMNS))


def test_only_good_answers_are_kept_and_every_failure_is_counted(uninterrupted):
    gen, rows = uninterrupted
    assert len(rows) == ROWS
    assert [r["index"] for r in rows] == sorted({r["index"] for r in rows})  # in order, none twice
    kinds = {
        k: {FakeQwen3Teacher.kind_of(r["index"]) for r in rows if r["kind"] == k} for k in ("exercise", "textbook")
    }
    assert kinds["exercise"] <= {"good", "duplicate"}
    for r in rows:  # the fake's "duplicate" repeats the code of request index - 6: new when that was a section
        if r["kind"] == "exercise" and FakeQwen3Teacher.kind_of(r["index"]) == "duplicate" and r["index"] >= 6:
            assert seed_at(r["index"] - 6, 0).kind == "textbook"
    # A textbook section's examples are not tests, nor its prose a copy of an exercise: the fake's
    # exercise failures pass as sections; none of the others does.
    assert kinds["textbook"] <= {"good", "tests_failed", "no_tests", "duplicate"}, kinds
    for r in rows:
        if r["kind"] == "exercise":
            ast.parse(r["text"])  # a kept exercise is a Python file
    rejected = gen.counts.rejected
    # Each failure of the fake lands on its reason ("malformed" prose has no code: off-topic).
    for reason in ("empty", "truncated", "tests_failed", "duplicate", "contaminated", "off_topic", "no_tests"):
        assert rejected[reason] > 0, (reason, rejected)
    decided = gen.frontier
    assert gen.counts.accepted + sum(rejected.values()) == decided
    manifest = read_manifest(gen.folder)
    assert [s["rows"] for s in manifest.shards] == [25, 25, 10]
    assert manifest.state["next_index"] == decided


def test_a_killed_run_resumes_without_duplicates_or_loss(teacher, uninterrupted, tmp_path):
    """SIGKILL once the first shard is listed, then run again: the same rows as an uninterrupted run."""
    cfg = config(tmp_path, teacher[1], commit_s=0.2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    dataset = RunLayout(tmp_path).dataset
    slow = FakeQwen3Teacher(latency_ms=150)  # slow enough to be killed half way
    url, stop = serve_app(fake_teacher_app(slow))
    try:
        path.write_text(path.read_text().replace(teacher[1], url))
        proc = subprocess.Popen([sys.executable, "-m", "nanochat_trainer.train", "--config", str(path)])
        deadline = time.monotonic() + 120
        while not read_manifest(dataset).shards and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kept_before = read_manifest(dataset).rows
        assert 0 < kept_before < ROWS, kept_before
        done = subprocess.run([sys.executable, "-m", "nanochat_trainer.train", "--config", str(path)], timeout=300)
        assert done.returncode == 0
    finally:
        stop()
    rows = list(iter_rows(dataset, COLUMNS))
    assert rows == uninterrupted[1]
    # and the same decisions: where it stopped, and every rejection counted once
    assert json.dumps(read_manifest(dataset).state) == json.dumps(read_manifest(uninterrupted[0].folder).state)
    # Answers to requests the killed run had asked came back from the on-disk cache.
    last = json.loads(RunLayout(tmp_path).log.read_text().splitlines()[-1])
    assert last["teacher"]["cache_hits"] > 0, last


def test_a_teacher_whose_answers_are_all_rejected_stops_the_run_with_the_reason(tmp_path):
    url, stop = serve_app(fake_teacher_app(FakeQwen3Teacher(only="empty")))
    try:
        with pytest.raises(ConfigError) as err:
            Generator(config(tmp_path, url, template="chatml")).run()
    finally:
        stop()
    assert err.value.field == "generate.template"
    assert re.search(r"none of the first 5\d\d answers .* was kept \(empty 5\d\d;", str(err.value)), err.value
    assert not read_manifest(RunLayout(tmp_path).dataset).shards  # nothing written


def test_a_teacher_that_stays_down_fails_the_run_naming_the_setting(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    cfg = config(tmp_path, url, wait_for_teacher_s=0)
    cfg.generate.teacher.max_retries = 0
    with pytest.raises(TeacherUnavailable, match="generate.wait_for_teacher_s"):
        Generator(cfg).run()


def test_the_operator_reads_a_generation_runs_progress_from_its_gauges(teacher, tmp_path):
    """The trainer's real /metrics body of a generation run becomes status.step/totalSteps and
    status.generation (rejections by reason, requests in flight, answers per second)."""
    metrics = TrainerMetrics(RunLayout(tmp_path), port=0, enabled=True)
    gen = Generator(config(tmp_path, teacher[1]), metrics)
    gen.run()
    progress = parse_trainer_metrics(generate_latest(metrics.registry).decode())
    running = observe_job({"status": {"active": 1}}, [{"status": {"phase": "Running", "podIP": "10.0.0.1"}}], 1)
    status = training_status(
        TrainingRunStatus(), running, progress, now=datetime.now(UTC), generation=1, job_name="gen-train"
    )
    assert (status.step, status.total_steps) == (ROWS, ROWS)
    rejected = {k: v for k, v in gen.counts.rejected.items() if v}
    assert status.generation.rejected == rejected and sum(rejected.values()) > 0
    assert status.generation.in_flight == 0 and status.generation.requests_per_second > 0
    assert status.tokens_per_second > 0  # the teacher's completion tokens per second
    teacher_available = next(c for c in status.conditions if c.type == "TeacherAvailable")
    assert (teacher_available.status, teacher_available.message) == ("True", "the teacher answers")
