"""Hugging Face Qwen3 <-> our GPT: the same logits both ways, and clear rejections.

.venv/bin/pytest tests/test_hf_qwen3.py -q
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers  # noqa: E402  (a dev dependency: missing, the parity tests fail)
from safetensors.torch import load_file, save_file

from nanochat_trainer.config import ModelConfig  # noqa: E402
from nanochat_trainer.models.gpt import GPT  # noqa: E402
from nanochat_trainer.models.hf_adapter import (  # noqa: E402
    export_hf,
    load_hf_checkpoint,
    model_config_from_hf,
)

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    rope_theta=1000.0,
)


def _hf_qwen3(tie: bool, seed: int = 0) -> transformers.Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(**TINY, tie_word_embeddings=tie, attn_implementation="eager")
    model = transformers.Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        # HF initialises norms to exactly 1; perturb them so a dropped or misnamed norm shows.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ids(vocab: int = 128, b: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [False, True])
def test_hf_to_ours_same_logits(tmp_path, tie):
    hf = _hf_qwen3(tie)
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf_checkpoint(str(tmp_path))
    assert cfg.tie_embeddings is tie and cfg.rope_theta == 1000.0 and cfg.ffn_dim == 96 and cfg.head_dim == 16
    if tie:
        assert model.lm_head.weight is model.embed_tokens.weight
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model.eval()(ids)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_ours_to_hf_same_logits(tmp_path, tie):
    cfg = ModelConfig(
        vocab_size=128,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=96,
        max_seq_len=64,
        rope_theta=5000.0,
        tie_embeddings=tie,
    )
    model = GPT(cfg)
    model.init_weights(seed=3)
    with torch.no_grad():
        # init_weights zeroes output projections and the head; make every weight matter.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(model, cfg, str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["Qwen3ForCausalLM"] and written["model_type"] == "qwen3"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), atol=1e-5, rtol=1e-4)
    # And back again: a round trip through the adapter is exact.
    again, cfg2 = load_hf_checkpoint(str(tmp_path), max_seq_len=64)
    assert cfg2 == cfg.model_copy(update={"ffn_mult": cfg2.ffn_mult})
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_sharded_checkpoint_loads(tmp_path):
    hf = _hf_qwen3(False, seed=5)
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = load_hf_checkpoint(str(tmp_path))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)


def test_export_shards_and_transformers_reads_them(tmp_path):
    cfg = ModelConfig(
        vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, max_seq_len=64
    )
    model = GPT(cfg)
    model.init_weights(seed=1)
    export_hf(model, cfg, str(tmp_path), max_shard_bytes=40_000)
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_ids()).logits, model.eval()(_ids()), atol=1e-5, rtol=1e-4)


BASE = {
    "model_type": "qwen3",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


@pytest.mark.parametrize(
    "override, field",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True, "sliding_window": 128}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters.rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_unsupported_configs_are_rejected_by_name(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        model_config_from_hf({**BASE, **override})


def test_config_mapping_reads_both_rope_layouts():
    old = model_config_from_hf(
        {
            **BASE,
            "rope_theta": 1e6,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
            "sliding_window": 4096,
            "use_sliding_window": False,
        }
    )
    new = model_config_from_hf(
        {
            **BASE,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        }
    )
    assert old == new
    got = (old.rope_theta, old.norm_eps, old.max_seq_len, old.tie_embeddings, old.ffn_dim)
    assert got == (1e6, 1e-5, 512, True, 96)


def test_unknown_tensors_are_an_error(tmp_path):

    hf = _hf_qwen3(False)
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="q_proj.bias"):
        load_hf_checkpoint(str(tmp_path))
