"""The ternary stage end to end: a dense run, then a ternary run started from it, then eval of the packed file."""

from __future__ import annotations

import json

import torch

from nanochat_cli.main import main
from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.models.ternary import ternary_modules
from nanochat_trainer.train import train

from micro import losses, micro_cfg


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
