"""Ternary stage: BitNet b1.58 quantizers, BitLinear/STE, selection, packing, packed inference, QAT.

    .venv/bin/pytest tests/test_ternary.py -q -s      # -s prints the measured recovery ratio

Runs on CPU in well under a minute; the QAT test trains a 2-layer model for 200 steps.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch._dynamo.testing import CompileCounterWithBackend

from nanochat_trainer.config import ModelConfig, TernaryConfig, TrainerConfig
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.models.ternary import (
    BitLinear,
    apply_ternary,
    quantize_activation,
    quantize_weight,
    ramp_value,
    select_ternary,
    set_ramp,
    ternary_modules,
)
from nanochat_trainer.models.ternary_pack import (
    PackedBitLinear,
    load_packed,
    load_packed_model,
    pack_ternary,
    pack_ternary_state_dict,
    read_packed_metadata,
    save_packed,
    to_packed_inference,
    unpack_ternary,
)
from nanochat_trainer.train.losses import model_loss

from micro import random_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_cfg(**over) -> ModelConfig:
    return TrainerConfig.model_validate({"preset": "tiny", "model": over}).model


# --------------------------------------------------------------------------- quantizers


def test_weight_quant_worked_example():
    w = torch.tensor([[0.40, -0.05, 1.20], [-0.80, 0.00, 0.25]])
    # mean|W| = (0.40 + 0.05 + 1.20 + 0.80 + 0 + 0.25) / 6 = 2.70 / 6 = 0.45
    # W / 0.45 = [[0.889, -0.111, 2.667], [-1.778, 0, 0.556]]
    # round -> [[1, 0, 3], [-2, 0, 1]] ; clip to [-1, 1] -> [[1, 0, 1], [-1, 0, 1]]
    w_q, scale = quantize_weight(w)
    assert scale.item() == pytest.approx(0.45, abs=1e-7)
    expected = torch.tensor([[1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]]) * 0.45
    torch.testing.assert_close(w_q, expected, rtol=0, atol=1e-7)
    # Outputs lie exactly in {-1, 0, +1} * scale.
    assert set((w_q / scale).unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(w_q.abs().unique(), torch.stack([torch.tensor(0.0), scale]))


def test_weight_quant_random_matches_formula_and_eps():
    w = torch.randn(37, 53) * 0.02
    w_q, scale = quantize_weight(w)
    s = w.abs().mean()
    assert scale.item() == pytest.approx(s.item(), rel=1e-6)
    torch.testing.assert_close(w_q, torch.clamp(torch.round(w / s), -1, 1) * s)
    codes = w_q / scale
    assert torch.equal(codes, codes.round()) and codes.abs().max() == 1
    # An all-zero matrix: scale clamps to eps instead of dividing by zero.
    z_q, z_scale = quantize_weight(torch.zeros(4, 4))
    assert z_scale.item() == pytest.approx(1e-5) and torch.equal(z_q, torch.zeros(4, 4))


def test_activation_quant_worked_example():
    x = torch.tensor([[0.30, -1.00, 0.25, 0.10], [2.00, 0.01, -0.50, 1.10]])
    # token 0: absmax 1.0, s = 127 -> [38.1, -127, 31.75, 12.7] -> [38, -127, 32, 13] / 127
    # token 1: absmax 2.0, s = 63.5 -> [127, 0.635, -31.75, 69.85] -> [127, 1, -32, 70] / 63.5
    expected = torch.tensor([[38, -127, 32, 13], [127, 1, -32, 70]], dtype=torch.float32)
    expected = expected / torch.tensor([[127.0], [63.5]])
    torch.testing.assert_close(quantize_activation(x, 8), expected, rtol=0, atol=1e-7)
    # 4 bits: qmax 7, token 0: [2.1, -7, 1.75, 0.7] -> [2, -7, 2, 1] / 7
    torch.testing.assert_close(quantize_activation(x[:1], 4), torch.tensor([[2.0, -7, 2, 1]]) / 7, rtol=0, atol=1e-7)
    # Per token: each row's absmax survives exactly, and an all-zero token stays zero.
    assert quantize_activation(torch.zeros(2, 3), 8).eq(0).all()


def test_activation_quant_random_matches_formula():
    x = torch.randn(3, 5, 64)
    s = 127 / x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(quantize_activation(x, 8), (x * s).round().clamp(-128, 127) / s)
    levels = quantize_activation(x, 8) * s
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- BitLinear and STE


def test_ste_gradients_reach_latent_weight():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, bias=True)
    x = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(4, 8)
    (layer(x) * g).sum().backward()

    # Reference: the same forward with W_q and q(x) as leaves; the STE must hand their
    # gradients to the latent weight and to x unchanged.
    w_q, _ = quantize_weight(layer.weight)
    w_leaf = w_q.clone().requires_grad_(True)
    x_leaf = quantize_activation(x.detach(), 8).requires_grad_(True)
    (torch.nn.functional.linear(x_leaf, w_leaf, layer.bias.detach()) * g).sum().backward()

    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.weight.grad, w_leaf.grad)
    torch.testing.assert_close(x.grad, x_leaf.grad)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_ramp_mixes_full_precision_and_ternary():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, bias=False)
    x = torch.randn(4, 16)
    dense = torch.nn.functional.linear(x, layer.weight)
    w_q, _ = quantize_weight(layer.weight)
    x_q = quantize_activation(x, 8)
    with torch.no_grad():
        layer.set_ramp(0.0)
        assert torch.equal(layer(x), dense)  # lambda 0 is exactly nn.Linear
        layer.set_ramp(1.0)
        torch.testing.assert_close(layer(x), x_q @ w_q.T)
        layer.set_ramp(0.25)
        w_mix, x_mix = 0.75 * layer.weight + 0.25 * w_q, 0.75 * x + 0.25 * x_q
        torch.testing.assert_close(layer(x), x_mix @ w_mix.T)
    assert [ramp_value(s, 10) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert ramp_value(0, 0) == 1.0
    with pytest.raises(ValueError):
        set_ramp(nn.Sequential(layer), 1.5)


def test_ramp_changes_do_not_recompile():
    """lambda is a buffer, so torch.compile traces once for the whole ramp (a Python float
    attribute would be specialised and recompile at every step)."""

    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    apply_ternary(net, TernaryConfig(include=["*"], exclude=[], ramp_steps=4))
    counter = CompileCounterWithBackend("aot_eager")  # traces dynamo + autograd, no C++ build
    compiled = torch.compile(net, backend=counter)
    x = torch.randn(3, 16)
    for step in range(5):
        set_ramp(net, ramp_value(step, 4))
        y = compiled(x)
        y.sum().backward()
        with torch.no_grad():
            assert torch.equal(y, net(x))
    assert counter.frame_count == 1
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- selection


def test_default_selection_is_exactly_the_block_projections():
    cfg = tiny_cfg()
    model = GPT(cfg)
    before = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    opt = torch.optim.AdamW(model.parameters())  # built before the swap, on purpose

    names = apply_ternary(model, TernaryConfig())

    expected = {
        f"layers.{i}.{'attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}"
        for i in range(cfg.n_layers)
        for p in PROJ
    }
    assert set(names) == expected and len(names) == 7 * cfg.n_layers
    bit = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert bit == expected
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    # Same Parameter objects under the same names: checkpoints and the optimizer line up.
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert list(model.state_dict()) == keys
    opt_ids = {id(p) for group in opt.param_groups for p in group["params"]}
    assert opt_ids == {id(p) for p in model.parameters()}


def test_include_exclude_and_errors():
    model = GPT(tiny_cfg())
    cfg = TernaryConfig(
        include=["layers.0.*", "layers.2.mlp.*"], exclude=["*down_proj", "*norm*"], activation_bits=6, ramp_steps=100
    )
    names = apply_ternary(model, cfg)
    assert names == select_ternary(model, cfg)
    assert set(names) == {
        "layers.0.attn.q_proj",
        "layers.0.attn.k_proj",
        "layers.0.attn.v_proj",
        "layers.0.attn.o_proj",
        "layers.0.mlp.gate_proj",
        "layers.0.mlp.up_proj",
        "layers.2.mlp.gate_proj",
        "layers.2.mlp.up_proj",
    }
    bit = ternary_modules(model)
    assert set(bit) == set(names)
    assert all(m.activation_bits == 6 and m.ramp == 0.0 for m in bit.values())  # ramp_steps > 0 starts at 0
    assert type(model.layers[0].mlp.down_proj) is nn.Linear
    # GPT.init_weights (e.g. after meta init + to_empty) restores lambda through the
    # reset_extra_parameters hook instead of leaving uninitialised buffer memory.
    set_ramp(model, 0.5)
    model.init_weights(0)
    assert all(m.ramp.item() == 0.0 for m in bit.values())
    assert type(model.layers[1].attn.q_proj) is nn.Linear
    # Applying again keeps the modules (no double wrapping) and updates settings.
    q = model.layers[0].attn.q_proj
    apply_ternary(model, TernaryConfig(include=["layers.0.*"], activation_bits=8))
    assert model.layers[0].attn.q_proj is q and q.activation_bits == 8 and q.ramp == 1.0
    # The head can be chosen explicitly when excluded patterns allow it.
    assert apply_ternary(GPT(tiny_cfg()), TernaryConfig(include=["lm_head"], exclude=[])) == ["lm_head"]
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        apply_ternary(GPT(tiny_cfg()), TernaryConfig(include=["layers.*.attention.*"]))
    # Selected matrices that BitLinear cannot wrap are reported, not silently left dense.
    net = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 3))
    with pytest.warns(UserWarning, match=r"not nn.Linear and stay full precision: \['1'\]"):
        assert apply_ternary(net, TernaryConfig(include=["*"], exclude=[])) == ["0"]
    with pytest.raises(ValueError, match="selects no nn.Linear"):  # everything matched is excluded
        apply_ternary(GPT(tiny_cfg()), TernaryConfig(include=["*embed*", "lm_head"]))


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 7, 11, 24, 25, 1000, 4099, 91 * 13])
def test_pack_unpack_lossless(n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(-1, 2, (n,), generator=g, dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 5)
    assert int(packed.max()) <= 242
    assert torch.equal(unpack_ternary(packed, n), codes)


def test_pack_covers_every_five_trit_combination():
    combos = torch.tensor(list(itertools.product((-1, 0, 1), repeat=5)), dtype=torch.int8)  # 243 x 5
    packed = pack_ternary(combos)
    assert packed.numel() == 243 and packed.unique().numel() == 243  # a bijection onto 0..242
    assert torch.equal(unpack_ternary(packed, combos.numel()).view(243, 5), combos)
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([2, 0, 0]))


def test_save_load_packed_roundtrip(tmp_path):
    cfg = tiny_cfg(tie_embeddings=True)  # tied: safetensors needs the alias handling
    model = random_gpt(cfg)
    apply_ternary(model, TernaryConfig())
    info = save_packed(model, cfg.model_dump(), tmp_path / "m.safetensors")
    n_tern = sum(m.weight.numel() for m in ternary_modules(model).values())
    assert info["ternary_params"] == n_tern
    # ceil(n / 5) bytes per layer plus one fp32 scale: 1.6 bits per weight and a little.
    expected_bytes = sum(-(-m.weight.numel() // 5) + 4 for m in ternary_modules(model).values())
    assert info["ternary_bytes"] == expected_bytes
    assert info["bits_per_ternary_weight"] == pytest.approx(8 * expected_bytes / n_tern)
    assert 1.6 < info["bits_per_ternary_weight"] < 1.602
    assert info["file_bytes"] >= info["tensor_bytes"]
    header = read_packed_metadata(tmp_path / "m.safetensors")
    assert header["aliases"] == {"lm_head.weight": "embed_tokens.weight"}
    assert header["model_config"] == cfg.model_dump()

    sd = load_packed(tmp_path / "m.safetensors", dequantize=True)
    assert set(sd) == set(model.state_dict())
    for name, m in ternary_modules(model).items():
        w_q, _ = quantize_weight(m.weight)
        assert torch.equal(sd[f"{name}.weight"], w_q)
    assert torch.equal(sd["embed_tokens.weight"], model.embed_tokens.weight)
    assert sd["lm_head.weight"] is sd["embed_tokens.weight"]

    packed_sd = load_packed(tmp_path / "m.safetensors", dequantize=False)
    tensors, _ = pack_ternary_state_dict(model)
    assert all(torch.equal(packed_sd[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="not a nanochat ternary"):
        save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
        load_packed(tmp_path / "plain.safetensors")


# --------------------------------------------------------------------------- packed inference


def test_packed_model_logits_equal_unpacked(tmp_path):
    cfg = tiny_cfg()
    model = random_gpt(cfg).eval()
    apply_ternary(model, TernaryConfig())
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx)
        dense_like = copy.deepcopy(model)
        set_ramp(dense_like, 0.0)
        assert not torch.allclose(dense_like(idx), ref, atol=1e-3)  # the quantization does something

        for cache_unpacked in (False, True):
            packed = copy.deepcopy(model)
            names = to_packed_inference(packed, cache_unpacked=cache_unpacked)
            assert len(names) == 28 and all(isinstance(packed.get_submodule(n), PackedBitLinear) for n in names)
            assert not any(isinstance(m, BitLinear) for m in packed.modules())
            assert torch.equal(packed(idx), ref)
            assert torch.equal(packed(idx), ref)  # second call: from the cache when enabled

        save_packed(model, cfg.model_dump(), tmp_path / "m.safetensors", verbose=False)
        loaded = load_packed_model(tmp_path / "m.safetensors")
        assert torch.equal(loaded(idx), ref)

        # Greedy generation with the KV cache gives the same tokens and logits.
        def generate(m: GPT, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
            cache = m.new_cache(idx.size(0), 64)
            logits = m(idx, cache=cache)[:, -1]
            out, all_logits = [], []
            for _ in range(n):
                tok = logits.argmax(-1, keepdim=True)
                out.append(tok)
                logits = m(tok, cache=cache)[:, -1]
                all_logits.append(logits)
            return torch.cat(out, 1), torch.stack(all_logits)

        toks_ref, logits_ref = generate(model)
        toks_p, logits_p = generate(loaded)
        assert torch.equal(toks_ref, toks_p) and torch.equal(logits_ref, logits_p)


def test_packed_bitlinear_matches_bitlinear_with_bias_under_bf16():
    torch.manual_seed(0)
    layer = BitLinear(40, 13, bias=True)  # 520 weights: a multiple of 5, no padding
    odd = BitLinear(41, 13, bias=True)  # 533 weights: the last byte is padded
    for lin in (layer, odd):
        x = torch.randn(3, 7, lin.in_features)
        packed = PackedBitLinear.from_bitlinear(lin)
        with torch.no_grad():
            assert torch.equal(packed(x), lin(x))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                a, b = packed(x), lin(x)
            assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
        assert torch.equal(packed.codes().float() * packed.weight_scale, quantize_weight(lin.weight)[0])


# --------------------------------------------------------------------------- QAT recovers a trained model


def test_ternary_finetune_recovers_dense_loss():
    """Train a dense model on a copy task, switch to ternary, fine-tune; most loss comes back.

    Task: 8 random tokens repeated to length 32; only the copyable positions count, so the
    model needs attention (induction) as well as the MLPs, all of which become ternary.
    Measured (CPU, torch 2.15, 1 thread): L_init 4.159, L_dense 0.016, right after the hard
    switch to ternary 2.617 (ratio 0.37), after 100 ternary steps with a 30-step ramp 0.001
    (ratio 1.004; the extra steps keep learning). Other seeds of the same script gave 1.01-1.09.
    """
    V, T, P = 64, 32, 8
    cfg = ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, ffn_dim=128)
    gen = torch.Generator().manual_seed(0)

    def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.randint(0, V, (n, P), generator=g)
        s = r.repeat(1, T // P + 1)[:, : T + 1]
        y = s[:, 1:].clone()
        y[:, : P - 1] = -1  # the first block is random: nothing to learn there
        return s[:, :-1], y

    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(0)
    eval_batch = batch(64, torch.Generator().manual_seed(123))

    def loss_on(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model_loss(model, model(x), y)

    def eval_loss() -> float:
        with torch.no_grad():
            return loss_on(*eval_batch).item()

    loss_init = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        loss = loss_on(*batch(16, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss_dense = eval_loss()

    tcfg = TernaryConfig(ramp_steps=30)
    apply_ternary(model, tcfg)
    assert eval_loss() == pytest.approx(loss_dense, abs=1e-6)  # ramp 0: still the dense model
    set_ramp(model, 1.0)
    loss_switch = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(100):
        set_ramp(model, ramp_value(step, tcfg.ramp_steps))
        loss = loss_on(*batch(16, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    set_ramp(model, 1.0)
    loss_ternary = eval_loss()

    ratio_switch = (loss_init - loss_switch) / (loss_init - loss_dense)
    ratio = (loss_init - loss_ternary) / (loss_init - loss_dense)
    print(
        f"\nternary QAT: init {loss_init:.3f} dense {loss_dense:.3f} switched {loss_switch:.3f} "
        f"ternary-ft {loss_ternary:.3f}; recovery ratio {ratio:.3f} (at switch {ratio_switch:.3f})"
    )
    assert loss_dense < 1.0  # the dense model learnt the task, else the ratio means nothing
    assert ratio >= 0.9
    assert ratio - ratio_switch >= 0.2  # the fine-tuning, not the switch, brings the loss back
