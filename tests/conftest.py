"""Fixtures shared by several test files (helpers live in micro.py and serving.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nanochat_trainer.checkpoint import save_weights
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.data.synthetic import generate as synthetic_docs
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.tokenizer import train_bpe
from nanochat_trainer.train import train

from micro import micro_cfg, perturb
from serving import serve_app, teacher_app


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model with small random (nonzero) weights: model.safetensors, config, tokenizer."""
    cfg = TrainerConfig.model_validate({"preset": "tiny"})
    tok = train_bpe(synthetic_docs(0, 300), 1024)
    model = GPT(cfg.model)
    model.init_weights(0)
    perturb(model, 0.05)
    return save_weights(tmp_path_factory.mktemp("ckpt") / "final", model, cfg, tok)


@pytest.fixture(scope="module")
def narrow_teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, int]]]:
    """(url, the teacher's run dir, its completion-request counter): a MICRO model trained 60 steps
    on the synthetic data, served; students share its tokenizer."""
    tdir = tmp_path_factory.mktemp("teacher")
    train(micro_cfg(tdir, steps=60))
    seen = {"n": 0}
    url, stop = serve_app(teacher_app(tdir / "final", seen))
    yield url, tdir, seen
    stop()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    QAT numbers are the same on every box, and on a shared CPU two threads contending with another
    process spin and run small ops far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
