"""Presets, parameter counts, and bad input: one line naming the field, exit 2, nothing written."""

from __future__ import annotations

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
