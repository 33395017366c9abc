"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch

from nanochat_trainer.checkpoint import save_weights
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.data.synthetic import generate as synthetic_docs
from nanochat_trainer.model import GPT
from nanochat_trainer.tokenizer import train_bpe


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved tiny model with small random (nonzero) weights: model.safetensors, config, tokenizer."""
    cfg = TrainerConfig.model_validate({"preset": "tiny"})
    tok = train_bpe(synthetic_docs(0, 300), 1024)
    model = GPT(cfg.model)
    model.init_weights(0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return save_weights(tmp_path_factory.mktemp("ckpt") / "final", model, cfg, tok)
