"""A model built on the meta device, materialised with `to_empty` and initialised equals one
built eagerly: every parameter and buffer. The trainer builds models that way, so no rank ever
holds the whole of a model it shards. And the logits it starts from are of unit scale."""

from __future__ import annotations

import pytest
import torch

from nanochat_trainer.checkpoint import read_weights, save_weights
from nanochat_trainer.config import TernaryConfig, TrainerConfig
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.models.moe import Experts, held_expert_rows
from nanochat_trainer.models.ternary import apply_ternary
from nanochat_trainer.tokenizer import train_bpe


@pytest.mark.parametrize(
    "preset, ternary",
    [("tiny", False), ("tiny-moe", False), ("tiny-hybrid", False), ("tiny-hybrid", True), ("tiny-tied", False)],
)
def test_meta_built_model_initialises_like_an_eager_one(preset, ternary):
    # tiny-tied: tiny with nano-125M's tied head, which must stay one matrix through to_empty.
    tied = preset == "tiny-tied"
    cfg = TrainerConfig.model_validate({"preset": "tiny" if tied else preset}).model
    cfg = cfg.model_copy(update={"tie_embeddings": True}) if tied else cfg
    eager = GPT(cfg)
    with torch.device("meta"):
        lazy = GPT(cfg)
    if ternary:
        apply_ternary(eager, TernaryConfig(ramp_steps=10))
        apply_ternary(lazy, TernaryConfig(ramp_steps=10))
    eager.init_weights(7)
    lazy.to_empty(device="cpu")
    with torch.no_grad():  # garbage, loudly: nothing may survive from to_empty
        for t in list(lazy.parameters()) + list(lazy.buffers()):
            t.fill_(float("nan")) if t.is_floating_point() else t.fill_(3)
    lazy.init_weights(7)
    a = dict(eager.named_parameters()) | dict(eager.named_buffers())
    b = dict(lazy.named_parameters()) | dict(lazy.named_buffers())
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (lazy.lm_head.weight is lazy.embed_tokens.weight) == cfg.tie_embeddings


def test_expert_slices_initialise_and_load_as_rows_of_the_whole(tmp_path):
    """A model holding experts [4, 8) of 8 (as rank 1 of EP=2 does) gets exactly those rows of the
    one-process init, and reads exactly those rows of a saved checkpoint, nothing else."""

    cfg = TrainerConfig.model_validate({"preset": "tiny-moe"})
    whole = GPT(cfg.model)
    whole.init_weights(3)
    with torch.device("meta"):
        part = GPT(cfg.model)
    for experts in (m for m in part.modules() if isinstance(m, Experts)):
        experts.first_expert = 4  # what shard_experts sets, without a process group
        for proj in (experts.gate_proj, experts.up_proj, experts.down_proj):
            proj.weight.data = proj.weight.data[4:8]
    part.to_empty(device="cpu")
    part.init_weights(3)
    ranges = held_expert_rows(part)
    assert len(ranges) == 3 * cfg.model.n_layers and set(ranges.values()) == {(4, 4)}
    full = whole.state_dict()
    for k, v in part.state_dict().items():
        assert torch.equal(v, full[k][4:8] if k in ranges else full[k]), k
    save_weights(tmp_path, whole, cfg, train_bpe(["def f():\n    return 1\n"] * 20, 300))
    loaded = read_weights(part, tmp_path)
    for k, v in part.state_dict().items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("tied", [False, True])
def test_initial_logits_are_of_unit_scale(tied):
    """Tied embeddings are also the head: unit rows would make every logit ~ dim (nano-125M's
    first loss was 769, against ln V = 10.8 untied)."""
    cfg = TrainerConfig.model_validate({"preset": "nano-125M", "model": {"n_layers": 2, "tie_embeddings": tied}})
    model = GPT(cfg.model)
    model.init_weights(0)
    tokens = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        logits = model(tokens).float()
    others = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, tokens.unsqueeze(-1), False)
    assert logits[others].std() < 1.5  # untied: the zeroed head gives 0
    if tied:
        assert 0.5 < logits[others].std()
