"""Presets, parameter counts, and bad input: one line naming the field, exit 2, nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.data.synthetic import generate
from nanochat_trainer.models.gpt import count_params
from nanochat_trainer.tokenizer import train_bpe


@pytest.mark.parametrize(
    "preset,low,high",
    [("tiny", 0.5e6, 2e6), ("nano-125M", 115e6, 130e6), ("nano-360M", 350e6, 380e6), ("nano-1B", 0.95e9, 1.05e9)],
)
def test_preset_parameter_counts(preset, low, high):
    total = count_params(TrainerConfig.model_validate({"preset": preset}).model)["total"]
    assert low <= total <= high, total


def test_nano_360m_is_the_shape_asked_for():
    cfg = TrainerConfig.model_validate({"preset": "nano-360M"})
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_mult, m.vocab_size, m.max_seq_len) == (
        1024,
        24,
        16,
        4,
        2.667,
        50304,
        2048,
    )
    assert (cfg.batch_size, cfg.optimizer.lr, cfg.steps, cfg.schedule.warmup_steps) == (4, 0.02, 50000, 2000)


def test_user_fields_win_over_preset():
    cfg = TrainerConfig.model_validate({"preset": "tiny", "steps": 7, "model": {"n_layers": 1}})
    assert cfg.steps == 7 and cfg.model.n_layers == 1 and cfg.model.dim == 128


def nanochat(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanochat_cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_params_command(tmp_path):
    out = nanochat("params", "nano-1B", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "total" in out.stdout and "992,373,760" in out.stdout


BAD = [
    ({"preset": "tiny", "modle": {}}, "modle: unknown field"),
    ({"preset": "tiny", "model": {"dim": 130, "n_heads": 4}}, "n_heads=4 does not divide dim=130"),
    ({"preset": "tiny", "model": {"n_heads": 4, "n_kv_heads": 3}}, "n_kv_heads=3 does not divide n_heads=4"),
    ({"preset": "tiny", "data": {"source": "local", "path": "/nonexistent/code"}}, "data.path='/nonexistent/code'"),
    ({"preset": "tiny", "model": {"vocab_size": 300}, "tokenizer": {"path": "TOK"}}, "model.vocab_size=300"),
]


@pytest.mark.parametrize("config,expected", BAD)
def test_bad_config_is_one_line_exit_2(tmp_path, config, expected):

    if config.get("tokenizer", {}).get("path") == "TOK":
        train_bpe(generate(0, 200), 512).save(tmp_path / "tok")
        config["tokenizer"]["path"] = str(tmp_path / "tok" / "tokenizer.json")
    run_dir = tmp_path / "run"
    config = {**config, "checkpoint": {"dir": str(run_dir)}, "metrics": {"port": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = nanochat("train", "--config", str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert not (run_dir / "checkpoints").exists()


def _config(tmp: Path, text: str) -> Path:
    (tmp / "c.yaml").write_text(text)
    return tmp / "c.yaml"


def _run_under_a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("")
    return _config(tmp, yaml.safe_dump({"preset": "tiny", "checkpoint": {"dir": str(tmp / "file" / "run")}}))


# What the trainer cannot use although it validates, or cannot even read:
# (make the config, env, stderr's line, exit status).
UNUSABLE = {
    "yaml": (
        lambda tmp: _config(tmp, "steps: 10\nmodel: {dim: 64\n"),
        {},
        r"^error: --config='.*c\.yaml': not valid YAML: expected ',' or '}', but got .* at line 3, column 1$",
        2,
    ),
    "config is a folder": (lambda tmp: tmp, {}, r"^error: --config='.*': is a directory, not a YAML or JSON file$", 2),
    "checkpoint.dir under a file": (
        _run_under_a_file,
        {},
        r"^error: checkpoint.dir='.*/file/run': .*/file is a file, not a directory$",
        2,
    ),
    # The node's fault, not the config's (the operator refuses device cuda without GPUs): retried.
    "cuda without a GPU": (
        lambda tmp: _config(tmp, yaml.safe_dump({"preset": "tiny", "device": "cuda"})),
        {"CUDA_VISIBLE_DEVICES": ""},
        r"^error: device='cuda': torch sees no GPU \(torch .*torch.cuda.is_available\(\) is False\)",
        1,
    ),
}


@pytest.mark.parametrize("case", UNUSABLE)
def test_unusable_input_is_one_line_at_the_trainers_entry(tmp_path, case):
    """What a pod runs (`python -m nanochat_trainer.train`): one line naming the file or field; exit
    2 for the config's fault, which the Job's failOnExitCodes fails for good, 1 for the machine's,
    which it retries (a traceback would be retried too, unread)."""
    make, env, expected, code = UNUSABLE[case]
    config = make(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "nanochat_trainer.train", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert out.returncode == code, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), out.stderr
