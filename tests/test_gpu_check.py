"""bench/gpu_check.py on CPU: every section runs at tiny size with plausible figures, a failing
section fails the run loudly, and the models log a CUDA fallback once (no GPU needed: a tensor
that says it is on CUDA takes the CUDA branch).

    .venv/bin/pytest tests/test_gpu_check.py -q
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat_trainer.config import MoEConfig
from nanochat_trainer.models import hybrid, layers, moe

SCRIPT = Path(__file__).parent.parent / "bench" / "gpu_check.py"
# What the issue asks the check to cover, in the order the table prints it.
SECTIONS = [
    "train-125M",
    "train-125M-compile",
    "train-1B",
    "train-1B-compile",
    "train-1B-fp8",
    "moe-grouped_mm",
    "moe-loop",
    "hybrid-parity",
    "hybrid-train",
    "ternary",
    "generation",
    "humaneval",
    "serve",
]
TRAIN = ["train-125M", "train-125M-compile", "train-1B", "train-1B-fp8", "moe-grouped_mm", "moe-loop", "hybrid-train"]


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert out.exists(), proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_run_covers_every_section_with_plausible_figures(tmp_path):
    proc, report = run_check(tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert report["ok"] and report["device"] == "cpu" and report["torch"] == torch.__version__
    s = report["sections"]
    assert list(s) == SECTIONS
    # On CPU one section may be skipped, and says why; fp8 runs torch's slow reference kernel, and
    # says so; nothing else is either.
    assert s["train-1B-compile"]["status"] == "skipped" and "on CPU" in s["train-1B-compile"]["note"]
    assert "reference float8 GEMM" in s["train-1B-fp8"]["note"]
    assert {n: e["status"] for n, e in s.items()} == {
        n: {"train-1B-compile": "skipped", "train-1B-fp8": "fallback"}.get(n, "ok") for n in SECTIONS
    }
    for name in TRAIN:
        f = s[name]["figures"]
        assert f["tokens_per_s"] > 0 and f["steps"] >= 1 and math.isfinite(f["loss"]), name
        assert f["mfu"] is None and f["peak_mem_gib"] is None, name  # no peak FLOPs or CUDA memory on CPU
    assert s["train-125M-compile"]["figures"]["speedup_vs_eager"] > 0
    assert s["train-1B-fp8"]["figures"]["fp8_layers"] == 10  # q, o, gate, up, down of 2 layers; k, v too narrow
    m = s["moe-grouped_mm"]["figures"]
    assert m["logits_max_diff_vs_loop"] <= m["tolerance"] <= 1e-4 * max(m["logit_scale"], 1.0)  # float32 on CPU
    assert s["moe-loop"]["figures"]["grouped_mm_speedup"] > 0
    h = s["hybrid-parity"]["figures"]
    assert h["chunked_max_diff"] <= h["tolerance"] and h["recurrent_max_diff"] <= h["tolerance"]
    assert 0 < h["tolerance"] < 0.1 * h["logit_scale"] and h["fp32_max_diff"] <= 1e-4
    t = s["ternary"]["figures"]
    assert t["logits_max_diff"] <= t["tolerance"] and t["greedy_rows_equal"] == 1.0 and t["packed_tokens_per_s"] > 0
    assert 1.6 <= t["bits_per_ternary_weight"] < 1.7
    assert s["generation"]["figures"]["tokens_per_s"] > 0
    he = s["humaneval"]["figures"]
    assert he["problems"] == he["scored"] == 4 and he["canonical_pass_at_1"] == 1.0 and 0 <= he["pass_at_1"] <= 1
    sv = s["serve"]["figures"]
    assert sv["answered"] and sv["finish_reason"] in ("stop", "length") and sv["latency_s"] > 0
    # One table on stdout, every section in it.
    assert all(name in proc.stdout for name in SECTIONS) and "total" in proc.stdout


def test_a_failing_section_fails_the_run_and_the_rest_still_report(tmp_path):
    proc, report = run_check(tmp_path, "--only", "train-1B,ternary", "--fail-section", "train-1B")
    assert proc.returncode == 1
    s = report["sections"]
    assert not report["ok"] and list(s) == ["train-1B", "ternary"]
    assert s["train-1B"]["status"] == "FAIL" and "injected failure" in s["train-1B"]["error"]
    assert s["ternary"]["status"] == "ok"  # the sections after a failure still run
    assert "Traceback" in proc.stderr and "section train-1B FAILED" in proc.stderr
    assert "FAIL" in proc.stdout and "ternary" in proc.stdout  # the table prints what ran


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: the models take their CUDA branch, and compute on CPU."""

    @property
    def is_cuda(self) -> bool:
        return True


def _rule_inputs(cuda: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 2, 8, generator=gen), torch.randn(1, 6, 2, 8, generator=gen)
    v, g, beta = torch.randn(1, 6, 2, 8, generator=gen), -torch.rand(1, 6, 2, generator=gen), torch.rand(1, 6, 2)
    if cuda:
        q, k, v = (t.as_subclass(FakeCuda) for t in (q, k, v))
    return q, k, v, g, beta


def _fallbacks(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def test_gated_deltanet_on_cuda_without_fla_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(hybrid, "_fla_chunk", None)  # whatever is installed: the kernels are missing
    layers.warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING):
        hybrid.gated_delta_rule(*_rule_inputs(cuda=False), None, 4)
        assert _fallbacks(caplog, layers.log.name) == []  # CPU is not a fallback
        for t in (6, 1):  # chunked, then recurrent: one warning for the process
            q, k, v, g, beta = _rule_inputs(cuda=True)
            hybrid.gated_delta_rule(q[:, :t], k[:, :t], v[:, :t], g[:, :t], beta[:, :t], None, 4)
    (message,) = _fallbacks(caplog, layers.log.name)
    assert "flash-linear-attention" in message and "PyTorch" in message


def test_moe_loop_on_cuda_is_logged_once(caplog):
    layers.warn_fallback.cache_clear()
    block = moe.MoE(16, MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=8, n_shared_experts=0))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING):
        block(x)
        assert _fallbacks(caplog, layers.log.name) == []  # the loop is the CPU path, not a fallback
        for _ in range(3):  # float32 on "CUDA": grouped_mm needs bf16, so the loop runs, said once
            block(x.as_subclass(FakeCuda))
    (message,) = _fallbacks(caplog, layers.log.name)
    assert "per-expert loop" in message and "torch.float32" in message
