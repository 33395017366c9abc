"""The ternary stage end to end: a dense run, then a ternary run started from it, then eval of the packed file."""

from __future__ import annotations

import json

import pytest
import torch

from nanochat_cli.main import main
from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.data.heldout import heldout_rows
from nanochat_trainer.models.ternary import ternary_modules
from nanochat_trainer.train import train
from nanochat_trainer.train.losses import lm_loss

from micro import losses, micro_cfg, read_log


def test_ternary_stage_from_dense_parent(tmp_path):
    parent = tmp_path / "dense"
    train(micro_cfg(parent, steps=30))
    child = tmp_path / "ternary"
    train(
        micro_cfg(
            child, steps=10, stage="ternary", ternary={"ramp_steps": 5}, checkpoint={"init_from": str(parent / "final")}
        )
    )
    first = losses(child)[1]
    assert first < losses(tmp_path / "dense")[1] - 1.0, "the ternary run did not start from the parent's weights"
    packed = child / "model.ternary.safetensors"
    assert packed.is_file()
    model, tok, cfg = load_model(packed)
    assert cfg.stage == "ternary" and tok.n_vocab <= cfg.model.vocab_size
    dense_view, _, _ = load_model(child / "final")
    assert ternary_modules(dense_view), "final/ of a ternary run loads as BitLinear layers"

    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        packed_logits, full_logits = model(ids).float(), dense_view(ids)
    # The export keeps non-ternary tensors in bf16, so agreement is to bf16 precision.
    assert (packed_logits - full_logits).abs().max() < 0.05 * full_logits.abs().max()
    assert torch.equal(packed_logits.argmax(-1), full_logits.argmax(-1))
    assert json.loads((child / "log.jsonl").read_text().splitlines()[-1])["step"] == 10


def test_eval_runs_from_the_packed_file(tmp_path, monkeypatch):

    run = tmp_path / "t"
    train(micro_cfg(run, steps=3, stage="ternary"))
    monkeypatch.setenv("NANOCHAT_TERMINATION_LOG", str(tmp_path / "term"))
    packed = run / "model.ternary.safetensors"
    assert main(["eval", "--checkpoint", str(packed), "--max-problems", "1", "--max-new-tokens", "8"]) == 0
    assert json.loads((run / "humaneval.json").read_text())["problems"] == 1


def test_validation_mid_ramp_scores_the_model_as_saved(tmp_path):
    """A ternary run's validation loss is the one of the weights its checkpoints load and serve
    (lambda 1), also while the ramp still mixes in full precision; the training loss is not."""
    parent = tmp_path / "dense"
    train(micro_cfg(parent, steps=20))
    child = tmp_path / "ternary"
    cfg = micro_cfg(
        child,
        steps=2,
        stage="ternary",
        ternary={"ramp_steps": 100},  # lambda 0.01 at the last step
        validation={"every": 1, "tokens": 2048},
        checkpoint={"init_from": str(parent / "final")},
    )
    train(cfg)
    saved, tok, _ = load_model(child / "final")
    assert ternary_modules(saved) and all(float(m.ramp) == 1.0 for m in ternary_modules(saved).values())
    rows = heldout_rows(cfg, tok, 0, 1)
    with torch.no_grad():
        want = lm_loss(saved(rows[:, :-1]), rows[:, 1:]).item()
    assert read_log(child)[2]["val_loss"] == pytest.approx(want, rel=1e-4)
