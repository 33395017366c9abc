"""Qwen3-Next hybrid stack: Gated DeltaNet kernels, cached generation, transformers parity,
training, and the qwen3-hybrid preset's parameter counts.

    .venv/bin/pytest tests/test_hybrid.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from nanochat_trainer.config import ModelConfig, TrainerConfig
from nanochat_trainer.models.gpt import GPT, active_params
from nanochat_trainer.models.hf_adapter import export_hf, load_hf_checkpoint
from nanochat_trainer.models.hybrid import (
    GatedAttention,
    GatedDeltaNet,
    chunk_gated_delta_rule,
    recurrent_gated_delta_rule,
)
from nanochat_trainer.train.losses import model_loss


def _naive_reference(q, k, v, g, beta, s0):
    """The rule as written in the paper, one batch row, head and step at a time, in float64:
    S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,  o_t = S_t q_t  (S is d_v x d_k)."""
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    out = torch.zeros(b, t, hv, dv, dtype=torch.float64)
    final = torch.zeros(b, hv, dk, dv, dtype=torch.float64)
    for bi in range(b):
        for h in range(hv):
            kh = h // (hv // hk)
            s = s0[bi, h].double().T.clone()  # (dv, dk)
            for i in range(t):
                qi = F.normalize(q[bi, i, kh].double(), dim=0) / dk**0.5
                ki = F.normalize(k[bi, i, kh].double(), dim=0)
                a, bt = torch.exp(g[bi, i, h].double()), beta[bi, i, h].double()
                s = a * s @ (torch.eye(dk, dtype=torch.float64) - bt * torch.outer(ki, ki)) + bt * torch.outer(
                    v[bi, i, h].double(), ki
                )
                out[bi, i, h] = s @ qi
            final[bi, h] = s.T
    return out, final


def _rule_inputs(b=2, t=21, hk=2, hv=4, dk=8, dv=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, t, hk, dk, generator=gen), torch.randn(b, t, hk, dk, generator=gen)
    v = torch.randn(b, t, hv, dv, generator=gen)
    g = -F.softplus(torch.randn(b, t, hv, generator=gen)) * 0.5
    beta = torch.rand(b, t, hv, generator=gen)
    s0 = torch.randn(b, hv, dk, dv, generator=gen) * 0.3
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
def test_chunked_and_recurrent_match_the_naive_rule(chunk):
    q, k, v, g, beta, s0 = _rule_inputs()
    ref_o, ref_s = _naive_reference(q, k, v, g, beta, s0)
    rec_o, rec_s = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    chk_o, chk_s = chunk_gated_delta_rule(q, k, v, g, beta, chunk, s0)
    for o, s in ((rec_o, rec_s), (chk_o, chk_s)):
        torch.testing.assert_close(o.double(), ref_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.double(), ref_s, atol=1e-5, rtol=1e-5)


def test_chunked_state_carries_across_calls():
    q, k, v, g, beta, _ = _rule_inputs(t=30, seed=1)
    whole, s_whole = chunk_gated_delta_rule(q, k, v, g, beta, 8)
    first, s1 = chunk_gated_delta_rule(q[:, :13], k[:, :13], v[:, :13], g[:, :13], beta[:, :13], 8)
    second, s2 = chunk_gated_delta_rule(q[:, 13:], k[:, 13:], v[:, 13:], g[:, 13:], beta[:, 13:], 8, s1)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s_whole, atol=1e-5, rtol=1e-5)


def _tiny_hybrid(**over) -> ModelConfig:
    cfg = TrainerConfig(preset="tiny-hybrid").model
    return cfg.model_copy(update={"vocab_size": 96, "max_seq_len": 64, **over})


def test_layer_pattern_and_names():
    model = GPT(_tiny_hybrid(n_layers=8))
    kinds = [type(layer.attn) for layer in model.layers]
    assert kinds == [GatedDeltaNet] * 3 + [GatedAttention] + [GatedDeltaNet] * 3 + [GatedAttention]
    names = {n for n, _ in model.named_parameters()}
    assert {
        "layers.0.attn.conv1d.weight",
        "layers.0.attn.A_log",
        "layers.3.attn.g_proj.weight",
        "layers.3.mlp.experts.gate_proj.weight",
        "layers.3.mlp.shared_expert_gate.weight",
    } <= names


@torch.no_grad()
def test_cached_generation_matches_full_forward():
    cfg = _tiny_hybrid()
    model = GPT(cfg).eval()
    model.init_weights(seed=0)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)  # init zeroes out_proj/o_proj: make them count
    for m in model.modules():
        if isinstance(m, GatedDeltaNet):
            m.chunk_size = 4  # prefill then spans several chunks
    ids = torch.randint(0, 96, (2, 14), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    cache = model.new_cache(2, 32)
    steps = [model(ids[:, :9], cache=cache)]
    for i in range(9, 14):
        steps.append(model(ids[:, i : i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)

    # Left padding: a short prompt padded on the left gives the logits it gives alone.
    cache = model.new_cache(2, 32)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, :4] = False
    padded = ids[:, :9].clone()
    padded[1, :4] = 0
    out = model(padded, cache=cache, pad_mask=pad)
    nxt = model(ids[:, 9:10], cache=cache)
    alone = model(ids[1:2, 4:10])
    torch.testing.assert_close(out[1, 4:], alone[0, :5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nxt[1, 0], alone[0, 5], atol=1e-4, rtol=1e-4)
    # reorder keeps the recurrent states aligned with their rows.
    cache.reorder(torch.tensor([1]))
    torch.testing.assert_close(
        model(ids[1:2, 10:11], cache=cache)[0, 0], model(ids[1:2, 4:11])[0, -1], atol=1e-4, rtol=1e-4
    )


def test_tiny_hybrid_moe_loss_falls():
    torch.manual_seed(0)
    cfg = _tiny_hybrid()
    model = GPT(cfg)
    model.init_weights(seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(1))
    x, y = batch[:, :-1], batch[:, 1:]
    losses = []
    for _ in range(30):
        loss = model_loss(model, model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_qwen3_hybrid_preset_counts():
    cfg = TrainerConfig(preset="qwen3-hybrid").model
    counts = active_params(cfg)
    # Closed form, independent of the modules: Qwen3-Next-80B-A3B.
    d, v, layers = 2048, 151936, 48
    full = 16 * 256 * d * 2 + 2 * (2 * 256 * d) + 16 * 256 * d + 2 * 256  # q, gate, k, v, o, q/k norms
    lin = (
        (2 * 16 * 128 + 2 * 32 * 128 + 2 * 32) * d + (2 * 16 * 128 + 32 * 128) * 4 + 32 * 128 * d + 2 * 32 + 128
    )  # q k v z b a, conv, out, A_log dt_bias, gated norm
    routed = 512 * 3 * d * 512
    moe = routed + 3 * d * 512 + d + 512 * d  # routed, shared, shared gate, router
    total = 2 * v * d + d + layers * (2 * d + moe) + 12 * full + 36 * lin
    assert counts["total"] == total
    assert counts["total"] - counts["active"] == layers * routed * (512 - 10) // 512
    assert 79e9 < counts["total"] < 81e9  # "80B"
    assert 3.0e9 < counts["active_non_embedding"] < 3.5e9  # "A3B"


# ----------------------------------------------------------------- Qwen3-Next parity


def _hf_qwen3_next():
    torch.manual_seed(0)
    cfg = transformers.Qwen3NextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=24,
        mlp_only_layers=[1],
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = transformers.Qwen3NextForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # (1 + w) norms start at w = 0: make w matter
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)  # zero-initialised router would tie every expert
    return model


def test_qwen3_next_checkpoint_gives_transformers_logits(tmp_path):

    hf = _hf_qwen3_next()
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf_checkpoint(str(tmp_path))
    assert cfg.hybrid is not None and cfg.hybrid.full_attention_interval == 4
    assert cfg.moe is not None and cfg.moe.dense_layers == [1] and cfg.moe.n_shared_experts == 1
    for m in model.modules():
        if isinstance(m, GatedDeltaNet):
            m.chunk_size = 8  # several chunks per sequence (transformers uses 64)
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("with_moe", [True, False])
def test_our_hybrid_exports_to_transformers(tmp_path, with_moe):

    cfg = _tiny_hybrid(dim=64, head_dim=16, vocab_size=128, ffn_dim=96)
    if not with_moe:
        cfg = cfg.model_copy(update={"moe": None})  # Qwen3-Next with num_experts=0: dense SwiGLU
    model = GPT(cfg)
    model.init_weights(seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(model, cfg, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert type(hf).__name__ == "Qwen3NextForCausalLM"
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), atol=1e-5, rtol=1e-4)
    again, _ = load_hf_checkpoint(str(tmp_path), max_seq_len=cfg.max_seq_len)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.allclose(p1, p2, atol=1e-6), n1
