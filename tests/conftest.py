"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest

from nanochat_trainer.checkpoint import save_weights
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.data.synthetic import generate as synthetic_docs
from nanochat_trainer.model import GPT
from nanochat_trainer.tokenizer import train_bpe

from micro import perturb


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved tiny model with small random (nonzero) weights: model.safetensors, config, tokenizer."""
    cfg = TrainerConfig.model_validate({"preset": "tiny"})
    tok = train_bpe(synthetic_docs(0, 300), 1024)
    model = GPT(cfg.model)
    model.init_weights(0)
    perturb(model, 0.05)
    return save_weights(tmp_path_factory.mktemp("ckpt") / "final", model, cfg, tok)
