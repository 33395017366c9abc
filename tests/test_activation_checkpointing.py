"""Activation checkpointing recomputes blocks in the backward pass and changes nothing else:
the same loss, the same gradients, and the MoE load counters count each forward once."""

from __future__ import annotations

import pytest
import torch

from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.models.moe import MoE
from nanochat_trainer.parallel.apply import apply_activation_checkpointing
from nanochat_trainer.train.losses import model_loss

from micro import perturb

SMALL = {"dim": 64, "n_layers": 2, "vocab_size": 128, "max_seq_len": 64}


def _model(preset: str) -> GPT:
    cfg = TrainerConfig.model_validate({"preset": preset}).model
    update = dict(SMALL)
    if cfg.moe is not None:  # aux_free, so the counters that feed the bias update are in play
        update["moe"] = cfg.moe.model_copy(
            update={"balance": "aux_free", "expert_ffn_dim": 32, "shared_expert_ffn_dim": 32}
        )
    if cfg.hybrid is not None:
        update["hybrid"] = cfg.hybrid.model_copy(update={"full_attention_interval": 2, "chunk_size": 16})
    torch.manual_seed(0)
    model = GPT(cfg.model_copy(update=update))
    model.init_weights(seed=0)
    return perturb(model, 0.02).train()


def _count_block_forwards(model: GPT) -> list[int]:
    """How many times each block's mixer runs: once per forward, once more per recompute."""
    calls = [0] * len(model.layers)
    for i, block in enumerate(model.layers):
        block.attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-hybrid"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(preset):
    ids = torch.randint(0, SMALL["vocab_size"], (2, 33), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    results = []
    for checkpointed in (False, True):
        model = _model(preset)
        if checkpointed:
            apply_activation_checkpointing(model)
        calls = _count_block_forwards(model)
        loss = model_loss(model, model(x), y)
        assert calls == [1] * len(model.layers)
        loss.backward()
        # The checkpointed blocks ran again inside the backward pass; the others did not.
        assert calls == [2 if checkpointed else 1] * len(model.layers)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        loads = [m._load_since_update.clone() for m in model.modules() if isinstance(m, MoE)]
        results.append((loss.detach(), grads, loads))
    (loss0, grads0, loads0), (loss1, grads1, loads1) = results
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) == sum(1 for _ in _model(preset).parameters())
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=1e-5, msg=name)
    for a, b in zip(loads0, loads1):
        assert torch.equal(a, b) and a.sum() > 0  # counted once, although each MoE forward ran twice
    if preset != "tiny":
        assert loads0 and model_has_aux_grad(grads1)


def test_checkpointing_keeps_parameter_names():
    """Optimizer groups, checkpoints and expert sharding go by parameter name: the wrapper must not
    rename anything."""
    model = _model("tiny-moe")
    names = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model)
    assert [n for n, _ in model.named_parameters()] == names


def model_has_aux_grad(grads: dict[str, torch.Tensor]) -> bool:
    """The routers get gradient (through the routing weights and the z-loss made inside the
    checkpointed block), not only the experts."""
    return all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("router.weight"))
