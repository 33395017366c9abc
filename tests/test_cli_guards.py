"""The command line's answers to bad input and busy machines: one line, exit 2 for the user's
configuration, exit 1 for the machine's; no traceback, no value silently swapped for a default."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web

import nanochat_cli.local as local
import nanochat_trainer.tokenizer
import nanochat_trainer.train
from nanochat_cli.eval import endpoint_exit_status
from nanochat_cli.local import run_manifest
from nanochat_cli.main import main
from nanochat_operator.manifests import ManifestError
from nanochat_trainer.contract import RunLayout
from nanochat_trainer.errors import ConfigError, run_guarded
from nanochat_trainer.eval.client import EndpointError
from nanochat_trainer.eval.humaneval import load_problems
from nanochat_trainer.train.metrics import TrainerMetrics

from serving import free_port, serve_app


def _one_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


@pytest.fixture
def listening() -> Iterator[int]:
    """A loopback port something already listens on (a second run, a local Prometheus)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s.getsockname()[1]


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """`nanochat train` with the trainer replaced: the configs it was given, nothing trained."""
    seen: list[Any] = []

    def fake_train(cfg, progress=None):
        seen.append(cfg)
        return {"step": cfg.steps, "loss": 1.0}

    monkeypatch.setattr(nanochat_trainer.train, "train", fake_train)
    return seen


# -- 2. metrics.port ------------------------------------------------------------------------------


def test_train_serves_no_metrics_unless_asked(trained: list[Any], tmp_path: Path) -> None:
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    assert trained[-1].metrics.port == 0  # not 9090, which a second local run would find taken
    assert main(["train", "--out", str(tmp_path / "b"), "--set", "metrics.port=9191"]) == 0
    assert trained[-1].metrics.port == 9191
    config = tmp_path / "run.yaml"
    config.write_text(f"preset: tiny\nmetrics: {{port: 9292, log_every: 3}}\ncheckpoint: {{dir: {tmp_path / 'c'}}}\n")
    assert main(["train", "--config", str(config)]) == 0
    assert (trained[-1].metrics.port, trained[-1].metrics.log_every) == (9292, 3)


def test_a_taken_metrics_port_is_one_line_exit_2(listening: int, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError) as e:
        TrainerMetrics(RunLayout(tmp_path), listening, enabled=True)
    assert e.value.field == "metrics.port"
    assert run_guarded(lambda: TrainerMetrics(RunLayout(tmp_path), listening, enabled=True) and 0) == 2
    _one_line(capsys, f"metrics.port={listening}", "in use")


# -- 3. the dry run checks the overridden manifest ---------------------------------------------------

TRAINING = """
apiVersion: nanochat.io/v1alpha1
kind: TrainingRun
metadata: {name: base}
spec:
  storage: {size: 1Gi}
  trainer: {preset: tiny, steps: 6}
"""


def test_dry_run_checks_the_manifest_with_its_overrides(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(TRAINING)
    assert run_manifest(str(manifest), dry_run=True, overrides={"trainer": {"steps": 7}}, runs_dir=str(tmp_path)) == 0
    assert "steps 7 x" in capsys.readouterr().out  # the cluster's plan, as overridden
    # An 8-way expert-parallel preset on one worker: valid alone, refused by the operator.
    with pytest.raises(ManifestError) as e:
        run_manifest(str(manifest), dry_run=True, overrides={"trainer": {"preset": "qwen3-hybrid"}})
    assert str(e.value).startswith(f"{manifest}: TrainingRun base: trainer.expert_parallel=8"), e.value


# -- 4. an endpoint's refusal is the user's configuration ---------------------------------------------


@pytest.mark.parametrize(
    ("refused", "status"),
    [(401, 2), (404, 2), (400, 2), (408, 1), (501, 1), (None, 1)],  # None: down, retried out, or a bad body
)
def test_endpoint_exit_status(refused: int | None, status: int) -> None:
    assert endpoint_exit_status(EndpointError("http://h/v1/completions ...", refused=refused)) == status


def test_eval_of_an_endpoint_that_refuses_the_key_exits_2(capsys) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "invalid api key"}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    url, stop = serve_app(app)
    try:
        assert main(["eval", "--endpoint", url + "/v1", "--model", "m", "--max-problems", "1"]) == 2
    finally:
        stop()
    _one_line(capsys, "HTTP 401")


# -- 5. a device or port this machine cannot give ---------------------------------------------------


def test_cuda_without_a_gpu_is_one_line_exit_1(ckpt: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "cuda", "--max-problems", "1"]) == 1
    _one_line(capsys, "device='cuda': torch sees no GPU")
    assert main(["serve", "--checkpoint", str(ckpt), "--device", "cuda", "--port", "0"]) == 1
    _one_line(capsys, "device='cuda'")
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "gpu0", "--max-problems", "1"]) == 2
    _one_line(capsys, "--device='gpu0'")


@pytest.mark.parametrize("port", ["65536", "-1"])
def test_serve_port_out_of_range_is_exit_2(ckpt: Path, port: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--checkpoint", str(ckpt), "--port", port])
    assert e.value.code == 2
    assert "argument --port" in capsys.readouterr().err


def test_serve_on_a_taken_port_is_one_line_exit_2(ckpt: Path, listening: int, monkeypatch, capsys) -> None:
    loaded: list[str] = []
    monkeypatch.setattr("nanochat_cli.eval.load_model", lambda path, device: loaded.append(path))
    assert main(["serve", "--checkpoint", str(ckpt), "--port", str(listening)]) == 2
    _one_line(capsys, f"--port={listening}", "in use")
    assert not loaded  # said before the model loads, not minutes after


# -- 6. 0 is refused, not read as "the default" ------------------------------------------------------


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_train_steps_0_is_refused(trained: list[Any], tmp_path: Path, steps: str, capsys) -> None:
    assert main(["train", "--steps", steps, "--out", str(tmp_path)]) == 2
    _one_line(capsys, f"steps={steps}")
    assert not trained


@pytest.mark.parametrize("size", ["0", "-3", "100"])
def test_tokenizer_vocab_size_0_is_refused(tmp_path: Path, size: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(nanochat_trainer.tokenizer, "train_tokenizer_cli", lambda *a: pytest.fail(f"trained: {a}"))
    config = tmp_path / "run.yaml"
    config.write_text("preset: tiny\n")
    assert main(["tokenizer", "train", "--config", str(config), "--out", str(tmp_path), "--vocab-size", size]) == 2
    _one_line(capsys, f"--vocab-size={size}")


@pytest.mark.parametrize(
    "flag", ["--max-problems", "--samples", "--max-new-tokens", "--batch-size", "--workers", "--timeout"]
)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_counts_of_0_are_refused(flag: str, value: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(tmp_path), flag, value])
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_load_problems_takes_no_0_or_negative() -> None:
    assert len(load_problems(2)) == 2 and len(load_problems(None)) == 164
    for n in (0, -3):
        with pytest.raises(ValueError, match=f"max_problems={n}"):
            load_problems(n)


# -- 7. a local stage generate run ------------------------------------------------------------------


def test_generate_has_no_dead_bar_and_a_down_teacher_is_one_line_exit_1(
    tmp_path: Path, trained: list[Any], monkeypatch, capsys
) -> None:
    bars: list[int] = []
    monkeypatch.setattr(local, "progress_bar", lambda total: bars.append(total))
    training = tmp_path / "m.yaml"
    training.write_text(TRAINING)
    assert run_manifest(str(training), runs_dir=str(tmp_path)) == 0
    assert bars == [6] and trained[0].steps == 6  # a training run's bar counts its steps
    monkeypatch.undo()  # the real trainer: a teacher that never answers
    bars.clear()
    monkeypatch.setattr(local, "progress_bar", lambda total: bars.append(total))
    manifest = tmp_path / "gen.yaml"
    manifest.write_text(
        textwrap.dedent(f"""
        apiVersion: nanochat.io/v1alpha1
        kind: TrainingRun
        metadata: {{name: g1}}
        spec:
          trainer:
            stage: generate
            generate:
              teacher: {{url: "http://127.0.0.1:{free_port()}/v1", model: m, max_retries: 0}}
              rows: 10
              wait_for_teacher_s: 0.5
          resources: {{nodes: 1, gpusPerNode: 0}}
          storage: {{size: 1Gi}}
        """)
    )
    assert main(["run", str(manifest), "--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: TrainingRun g1: the teacher is unavailable:"), err
    assert bars == []  # stage generate feeds no bar: one would sit at 0 of 1000
