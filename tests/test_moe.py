"""Mixture of experts: routing and dispatch, balancing, Qwen3-MoE parity with transformers.

.venv/bin/pytest tests/test_moe.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from nanochat_trainer.config import ModelConfig, MoEConfig, TrainerConfig
from nanochat_trainer.models.gpt import GPT, active_params
from nanochat_trainer.models.hf_adapter import export_hf, load_hf_checkpoint, read_hf_state
from nanochat_trainer.models.moe import (
    MoE,
    expert_load,
    load_imbalance,
    load_summary,
    take_expert_loads,
    update_moe_biases,
)
from nanochat_trainer.train import optim
from nanochat_trainer.train.losses import model_loss
from nanochat_trainer.train.optim import BatchedMuon, build_optimizers


def _moe(seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    cfg = MoEConfig(
        **{"n_experts": 6, "top_k": 2, "expert_ffn_dim": 24, "n_shared_experts": 1, "shared_expert_ffn_dim": 16, **kw}
    )
    return MoE(32, cfg)


def _dense_reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with the routing weights: no sorting, no dispatch."""
    flat = x.reshape(-1, m.dim)
    probs = m.router(flat).float().softmax(-1)
    scores = probs + (m.expert_bias if m.cfg.balance == "aux_free" else 0)
    idx = scores.topk(m.top_k, dim=-1).indices
    w = probs.gather(-1, idx)
    if m.cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    ex = m.experts
    for e in range(m.n_experts):
        y = F.linear(
            F.silu(F.linear(flat, ex.gate_proj.weight[e])) * F.linear(flat, ex.up_proj.weight[e]),
            ex.down_proj.weight[e],
        )
        coef = (w * (idx == e)).sum(-1, keepdim=True)  # 0 for tokens not routed to e
        out = out + coef * y
    if m.shared_expert is not None:
        out = out + torch.sigmoid(m.shared_expert_gate(flat)) * m.shared_expert(flat)
    return out.reshape(x.shape)


@pytest.mark.parametrize("kw", [{}, {"norm_topk_prob": False, "n_shared_experts": 0}, {"balance": "aux_free"}])
def test_dispatch_matches_dense_loop(kw):
    m = _moe(**kw).eval()
    if m.cfg.balance == "aux_free":
        m.expert_bias.copy_(torch.linspace(-0.3, 0.3, m.n_experts))  # must move selection only
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(m(x), _dense_reference(m, x), atol=1e-5, rtol=1e-5)
    assert int(m.last_expert_load.sum()) == 3 * 7 * m.top_k


def test_grouped_mm_path_matches_loop_forward_and_backward():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    m = _moe(seed=1).train()
    x = torch.randn(2, 9, 32)
    grad = torch.randn(2, 9, 32)
    results = []
    for impl in ("loop", "grouped_mm"):
        m.zero_grad()
        m.impl = impl
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, m.experts.down_proj.weight.grad.clone(), m.router.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _skewed(balance: str, **kw) -> tuple[MoE, torch.Tensor]:
    m = _moe(seed=2, n_shared_experts=0, balance=balance, **kw)
    torch.manual_seed(3)
    x = torch.randn(512, 32)
    x[:, 0] = 3.0  # a feature every token shares...
    with torch.no_grad():
        m.router.weight.normal_(0, 32**-0.5)
        m.router.weight[:2, 0] = 1.0  # ...that two of the six experts latch onto

    return m, x


def test_balancing_loss_moves_a_skewed_router_toward_balance():
    m, x = _skewed("aux_loss", aux_loss_weight=1.0, z_loss_weight=0.0)
    m.train()
    m(x)
    before = load_imbalance(m.last_expert_load)
    assert before > 2.5  # nearly all slots on 2 of 6 experts (max/mean 3.0 at worst)
    opt = torch.optim.AdamW(m.router.parameters(), lr=0.05)
    for _ in range(40):
        m(x)
        opt.zero_grad()
        m.last_aux_loss.backward()
        opt.step()
    m(x)
    after = load_imbalance(m.last_expert_load)
    assert after < 1.5, (before, after)


def test_aux_free_bias_balances_without_gradients():
    m, x = _skewed("aux_free", bias_update_rate=0.005, z_loss_weight=0.0)
    m.train()
    router_before = m.router.weight.clone()
    m(x)
    before = load_imbalance(m.last_expert_load)
    recent = torch.zeros(m.n_experts)
    for step in range(80):
        m(x)
        update_moe_biases(m, take_expert_loads(m))
        if step >= 60:
            # Sign updates dither around balance step to step; judge the average load.
            recent += m.last_expert_load
    after = load_imbalance(recent)
    assert before > 2.5 and after < 1.25, (before, after)
    assert torch.equal(m.router.weight, router_before)  # only the bias moved
    assert float(m.last_aux_loss) == 0.0  # no balancing loss in this mode (z-loss off)
    # The bias chooses experts but never weighs them: weights are the plain router probabilities.
    _, probs, weights, idx = m.route(x)
    torch.testing.assert_close(weights, probs.gather(-1, idx) / probs.gather(-1, idx).sum(-1, keepdim=True))


def test_z_loss_and_aux_loss_values():
    m = _moe(seed=4, aux_loss_weight=0.5, z_loss_weight=0.25).train()
    x = torch.randn(40, 32)
    m(x)
    logits = m.router(x).float()
    probs = logits.softmax(-1)
    idx = probs.topk(2, -1).indices
    f = torch.bincount(idx.reshape(-1), minlength=6).float() / (40 * 2)
    expected = 0.5 * 6 * (f * probs.mean(0)).sum() + 0.25 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(m.last_aux_loss, expected)
    m.eval()
    m(x)
    assert m.last_aux_loss is None  # evaluation losses are pure cross-entropy


def test_model_loss_includes_aux_loss_in_training_only():
    cfg = TrainerConfig(preset="tiny-moe").model.model_copy(update={"n_layers": 2, "vocab_size": 64})
    model = GPT(cfg)
    model.init_weights(seed=0)
    idx = torch.randint(0, 64, (2, 16))
    model.train()
    loss = model_loss(model, model(idx), idx)
    aux = model.aux_loss()
    assert isinstance(aux, torch.Tensor) and float(aux.detach()) > 0
    ce = F.cross_entropy(model(idx).view(-1, 64), idx.view(-1))
    torch.testing.assert_close(loss, ce + model.aux_loss())
    assert set(expert_load(model)) == {"layers.0.mlp", "layers.1.mlp"}
    model.eval()
    torch.testing.assert_close(model_loss(model, model(idx), idx), ce)


def test_step_loads_count_every_forward_of_a_step_once():
    cfg = TrainerConfig(preset="tiny-moe").model.model_copy(update={"n_layers": 2, "vocab_size": 64})
    model = GPT(cfg)
    model.init_weights(seed=0)
    model.train()
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    seen = {name: torch.zeros(cfg.moe.n_experts) for name in ("layers.0.mlp", "layers.1.mlp")}
    for _ in range(2):  # two micro-batches
        model(idx)
        for name, load in expert_load(model).items():
            seen[name] += load
    loads = take_expert_loads(model)
    assert loads.keys() == seen.keys()
    for name, load in loads.items():
        assert torch.equal(load, seen[name]) and int(load.sum()) == 2 * 3 * 16 * cfg.moe.top_k
    assert all(int(v.sum()) == 0 for v in take_expert_loads(model).values())  # the counters restarted
    model.eval()
    model(idx)  # evaluation forwards are not training load
    assert all(int(v.sum()) == 0 for v in take_expert_loads(model).values())
    summary = load_summary({"a": torch.tensor([2.0, 2.0, 0.0, 4.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0])})
    assert summary == {"load_imbalance": 2.0, "dead_experts": 1, "layer_imbalance": [2.0, 1.0]}


def test_active_params_of_tiny_moe_by_hand():
    cfg = TrainerConfig(preset="tiny-moe").model
    counts = active_params(cfg)
    d, e, k, h = cfg.dim, 8, 2, 128
    routed = cfg.n_layers * 3 * d * h * e
    assert counts["total"] - counts["active"] == routed * (e - k) // e
    assert counts["embedding"] == 2 * cfg.vocab_size * d
    assert counts["total"] == sum(p.numel() for p in GPT(cfg).parameters())


# ----------------------------------------------------------------- Muon for stacked experts


def test_build_optimizers_routes_experts_to_batched_muon_and_tiny_moe_learns(monkeypatch):
    monkeypatch.setattr(optim, "cpu_bf16_is_emulated", lambda: True)  # the same on every CPU

    hybrid = GPT(TrainerConfig(preset="tiny-hybrid").model)
    opts = build_optimizers(hybrid, TrainerConfig(preset="tiny-hybrid").optimizer)
    owner = {id(p): o for o in opts for g in o.param_groups for p in g["params"]}
    matrices, stacks = opts[1], opts[2]  # both BatchedMuon, orthogonalising in fp32
    assert [o.ns_dtype for o in (matrices, stacks)] == [torch.float32] * 2
    for name, p in hybrid.named_parameters():
        if ".experts." in name:
            want = stacks  # (E, out, in): one Muon matrix per expert
        elif p.ndim == 2 and name.startswith("layers.") and "router" not in name and "expert_gate" not in name:
            want = matrices
        else:
            want = opts[0]  # AdamW: embeddings, head, gains, routers, gates, the DeltaNet conv (3-D, not experts)
        assert owner[id(p)] is want, name
    assert owner[id(hybrid.layers[0].attn.conv1d.weight)] is opts[0]
    # optimizer.name adamw: one AdamW, the hidden matrices (experts' stacks too) at lr, the rest at adam_lr.
    ocfg = TrainerConfig(preset="tiny-hybrid", optimizer={"name": "adamw"}).optimizer
    (adamw,) = build_optimizers(hybrid, ocfg)
    lr_of = {id(p): g["lr"] for g in adamw.param_groups for p in g["params"]}
    for name, p in hybrid.named_parameters():
        hidden = owner[id(p)] is not opts[0]
        assert lr_of[id(p)] == (ocfg.lr if hidden else ocfg.adam_lr), name

    cfg = TrainerConfig(preset="tiny-moe")
    mcfg = cfg.model.model_copy(update={"n_layers": 2, "vocab_size": 64})
    model = GPT(mcfg)
    model.init_weights(seed=0)
    opts = build_optimizers(model, cfg.optimizer)
    assert isinstance(opts[-1], BatchedMuon) and len(opts[-1].param_groups[0]["params"]) == 3 * 2
    batch = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
    x, y = batch[:, :-1], batch[:, 1:]
    losses = []
    for _ in range(12):  # 4.17 -> 0.52 in 12 steps (memorising one batch)
        loss = model_loss(model, model(x), y)
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "down_proj" in n)


# ----------------------------------------------------------------- Qwen3-MoE parity


def _hf_qwen3_moe(**kw):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        max_position_embeddings=64,
        attn_implementation="eager",
        **kw,
    )
    model = transformers.Qwen3MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "mlp.gate" in name:
                p.normal_(0, 0.5)  # HF zero-inits the router; ties would make top-k arbitrary
    return model


@pytest.mark.parametrize("kw", [{"norm_topk_prob": False}, {"norm_topk_prob": True, "decoder_sparse_step": 2}])
def test_qwen3_moe_checkpoint_gives_transformers_logits(tmp_path, kw):

    hf = _hf_qwen3_moe(**kw)
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf_checkpoint(str(tmp_path))
    assert cfg.moe is not None and cfg.moe.n_shared_experts == 0
    assert cfg.moe.dense_layers == ([0, 2] if kw.get("decoder_sparse_step") == 2 else [])
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)


def test_hf_experts_read_as_one_ranks_rows(tmp_path):
    """Under expert parallelism a rank reads only its experts of a Hugging Face checkpoint: the same
    tensors as the whole read, cut to those rows, everything else unchanged."""

    _hf_qwen3_moe().save_pretrained(tmp_path)
    whole, cfg = read_hf_state(str(tmp_path))
    part, _ = read_hf_state(str(tmp_path), experts=(2, 2))
    assert part.keys() == whole.keys()
    experts = [k for k in whole if ".experts." in k]
    assert len(experts) == 3 * 3 and all(whole[k].shape[0] == 6 for k in experts)
    for k in whole:
        torch.testing.assert_close(part[k], whole[k][2:4] if k in experts else whole[k], atol=0, rtol=0)


def test_our_moe_exports_to_transformers(tmp_path):

    cfg = ModelConfig(
        vocab_size=128,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=80,
        max_seq_len=64,
        moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32, n_shared_experts=0, dense_layers=[1]),
    )
    model = GPT(cfg)
    model.init_weights(seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(model, cfg, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), atol=1e-5, rtol=1e-4)
    # Shapes Hugging Face cannot express are refused, by field name.
    with pytest.raises(ValueError, match="n_shared_experts"):
        export_hf(
            model,
            cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"n_shared_experts": 1})}),
            str(tmp_path / "x"),
        )
