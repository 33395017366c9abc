"""The bench scripts still run and print their figures (at toy sizes; the figures are not checked,
bench/ is where they are measured)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


@pytest.mark.parametrize(
    "script, args, expect",
    [
        (
            "train_throughput.py",
            ["--preset", "tiny-moe", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "32"],
            ["tokens/s", "MoE forward   route"],
        ),
        (
            "ternary_memory.py",
            ["--preset", "tiny-hybrid", "--tokens", "2", "--threads", "1"],
            ["packed model", "packed tokens == BitLinear tokens: True"],
        ),
        ("ternary_memory.py", ["--preset", "qwen3-hybrid", "--no-gen"], ["79674.39M params"]),
        ("checkpoint_io.py", ["--preset", "tiny", "--ranks", "2"], ["sharded save", "gathered load", "MiB in all"]),
        (
            "eval_throughput.py",
            ["--problems", "4", "--workers", "2", "--batch", "2", "--new", "4", "--prompt-len", "8"],
            ["problems/s, pass@1=1.000", "tokens/s"],
        ),
        (
            "teacher_throughput.py",
            ["--levels", "1,8", "--requests", "8", "--max-tokens", "4"],
            ["in flight requests/s", "requests per level, max_tokens 4"],
        ),
        (
            "datagen_throughput.py",
            ["--levels", "4,16", "--rows", "20", "--tokens-per-s", "2000", "--latency-ms", "5"],
            ["not a real teacher's quality", "the same documents kept at every level: True"],
        ),
        (
            "data_ladder.py",
            ["--steps", "4", "--every", "2", "--batch-size", "4", "--val-tokens", "2048", "--teacher-rows", "30"],
            ["held-out documents against", ": 0 shared", "(c) + teacher", "not the value of a real teacher's data"],
        ),
    ],
)
def test_bench_script_runs(script, args, expect):
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for line in expect:
        assert line in out.stdout, out.stdout
