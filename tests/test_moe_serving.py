"""MoE and hybrid models through evaluation and serving: HumanEval on a checkpoint, the same
problems through `nanochat serve` (cached generation: KV cache and DeltaNet recurrent state),
and a ternary MoE served from its packed file.

    .venv/bin/pytest tests/test_moe_serving.py -q
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from nanochat_cli.eval import add_eval_args, run_eval_from_args
from nanochat_trainer.checkpoint import load_model, save_weights
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.data.synthetic import generate as synthetic_docs
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.models.ternary import apply_ternary, ternary_modules
from nanochat_trainer.models.ternary_pack import save_packed
from nanochat_trainer.serve import ModelServer
from nanochat_trainer.tokenizer import train_bpe

from micro import perturb
from serving import serve_app

COMMON = ["--max-problems", "3", "--max-new-tokens", "12", "--workers", "2", "--temperature", "0"]


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_eval_args(p)
    return p.parse_args(list(argv))


def _small(preset: str, **extra) -> TrainerConfig:
    cfg = TrainerConfig.model_validate({"preset": preset, **extra})
    update: dict = {"dim": 64, "n_layers": 2, "head_dim": 16}
    update["moe"] = cfg.model.moe.model_copy(update={"expert_ffn_dim": 32, "shared_expert_ffn_dim": 32})
    if cfg.model.hybrid is not None:  # one Gated DeltaNet layer, one gated attention layer
        update["hybrid"] = cfg.model.hybrid.model_copy(
            update={"full_attention_interval": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16}
        )
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=update)})


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(synthetic_docs(0, 300), 1024)


def _checkpoint(cfg: TrainerConfig, tokenizer, where: Path, ternary: bool = False) -> Path:
    """Small random (nonzero) weights, so greedy completions differ from problem to problem."""
    model = GPT(cfg.model)
    model.init_weights(0)
    perturb(model, 0.05)
    if ternary:
        apply_ternary(model, cfg.ternary, ramp=1.0)
        assert any(".experts." in n for n in ternary_modules(model))
        save_packed(model, cfg.model.model_dump(mode="json"), where / "model.ternary.safetensors", verbose=False)
    final = save_weights(where / "final", model.eval(), cfg, tokenizer)
    (where / "tokenizer.json").write_bytes((final / "tokenizer.json").read_bytes())  # as a run dir holds it
    return final


def _eval(tmp_path: Path, name: str, *source: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert run_eval_from_args(_args(*source, "--out", str(out), *COMMON)) == 0
    return json.loads(out.read_text())


def _completions(result: dict) -> list[str]:
    return [r["samples"][0]["completion"] for r in result["per_problem"]]


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-hybrid"])
def test_served_moe_scores_like_its_checkpoint(preset, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TERMINATION_LOG", str(tmp_path / "term"))
    ckpt = _checkpoint(_small(preset), tokenizer, tmp_path)
    local = _eval(tmp_path, "local", "--checkpoint", str(ckpt))
    model, tok, _ = load_model(ckpt)
    url, stop = serve_app(ModelServer(model, tok, model_name=preset).app())
    try:
        served = _eval(tmp_path, "served", "--endpoint", url, "--model", preset)
    finally:
        stop()
    assert len(local["per_problem"]) == 3 and local["pass_at_k"] == served["pass_at_k"]
    assert _completions(local) == _completions(served)
    assert len(set(_completions(local))) > 1  # the model is not degenerate: the comparison means something


def test_packed_ternary_moe_scores_like_its_training_weights(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TERMINATION_LOG", str(tmp_path / "term"))
    ckpt = _checkpoint(_small("tiny-hybrid", stage="ternary"), tokenizer, tmp_path, ternary=True)
    trained = _eval(tmp_path, "trained", "--checkpoint", str(ckpt))
    packed = _eval(tmp_path, "packed", "--checkpoint", str(tmp_path / "model.ternary.safetensors"))
    assert trained["pass_at_k"] == packed["pass_at_k"]
    # The packed file keeps non-ternary tensors in their dtype here (fp32), so greedy decoding agrees.
    assert _completions(trained) == _completions(packed)
