"""Ternary (BitNet b1.58) MoE experts: BitStackedLinear, packing of experts, and the ternary stage on
tiny MoE and hybrid models.

    .venv/bin/pytest tests/test_ternary_moe.py -q -s     # -s prints the packed sizes

Each expert slice of a stacked (E, out, in) weight is its own linear layer with its own scale;
the references here are BitLinear layers built from single slices.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch._dynamo.testing import CompileCounterWithBackend

from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.config import ModelConfig, MoEConfig, TernaryConfig, TrainerConfig
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.models.moe import MoE, StackedLinear
from nanochat_trainer.models.ternary import (
    BitLinear,
    BitStackedLinear,
    TernaryLayer,
    apply_ternary,
    expert_scales,
    quantize_expert_weight,
    quantize_weight,
    ramp_value,
    set_ramp,
    ternary_modules,
)
from nanochat_trainer.models.ternary_pack import (
    FORMAT,
    FORMAT_V1,
    META_KEY,
    PackedStackedLinear,
    load_packed,
    load_packed_model,
    read_packed_metadata,
    save_packed,
    to_packed_inference,
)
from nanochat_trainer.train import train

from micro import PRESET, micro_cfg, model_over, random_gpt, read_log

GROUPED = pytest.param(
    "grouped_mm",
    marks=pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch"),
)
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
pytestmark = pytest.mark.usefixtures("one_thread")


def _small_cfg(kind: str) -> ModelConfig:
    over = {**model_over(kind), "vocab_size": 96, "max_seq_len": 64}
    return TrainerConfig.model_validate({"preset": PRESET[kind], "model": over, "seq_len": 32}).model


def _moe_block(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    return MoE(32, MoEConfig(n_experts=5, top_k=2, expert_ffn_dim=24, n_shared_experts=1, shared_expert_ffn_dim=16))


def _ternary_block(m: MoE, ramp: float = 1.0) -> MoE:
    """Experts and shared expert ternary, router full precision (the stage's default split)."""
    apply_ternary(m, TernaryConfig(include=["*"], exclude=["*router*"]), ramp=ramp)
    return m


# --------------------------------------------------------------------------- per-expert quantizer


def test_expert_scale_is_each_slices_absmean():
    g = torch.Generator().manual_seed(0)
    # Experts of very different magnitudes: one scale across experts would round the small
    # ones to all zeros and clip the large one to +-1 everywhere.
    mags = torch.tensor([1e-3, 1e-2, 1.0, 30.0]).view(-1, 1, 1)
    w = torch.randn(4, 6, 10, generator=g) * mags
    w[1, 0, :3] = 0.0
    w_q, scale = quantize_expert_weight(w)
    assert scale.shape == (4,) and scale.dtype == torch.float32
    for e in range(4):
        assert scale[e].item() == pytest.approx(w[e].abs().mean().item(), rel=1e-6)
        codes = w_q[e] / scale[e]
        assert set(codes.unique().tolist()) == {-1.0, 0.0, 1.0}, e  # every expert uses all three levels
        torch.testing.assert_close(w_q[e], quantize_weight(w[e])[0], rtol=1e-6, atol=0)
    # An all-zero expert gets the eps scale and zero codes, not NaN, and leaves the others alone.
    w[2] = 0.0
    w_q2, scale2 = quantize_expert_weight(w)
    assert scale2[2].item() == pytest.approx(1e-5) and torch.equal(w_q2[2], torch.zeros(6, 10))
    assert torch.equal(w_q2[[0, 1, 3]], w_q[[0, 1, 3]])
    # bf16 latent: the scale is computed in float32 and W_q keeps the latent's dtype.
    w_q16, scale16 = quantize_expert_weight(w.bfloat16())
    assert w_q16.dtype == torch.bfloat16 and scale16.dtype == torch.float32


def test_expert_scales_do_not_depend_on_the_expert_split():
    """Under expert parallelism a rank holds a slice of the experts: its scales and W_eff must be
    those of the same experts in the whole layer, bit for bit."""
    full = BitStackedLinear.from_stacked(StackedLinear(6, 16, 8))
    shard = StackedLinear(2, 16, 8)
    with torch.no_grad():
        shard.weight.copy_(full.weight[2:4])
    shard = BitStackedLinear.from_stacked(shard)
    assert torch.equal(expert_scales(shard.weight), expert_scales(full.weight)[2:4])
    assert torch.equal(shard.effective_weight(), full.effective_weight()[2:4])


# --------------------------------------------------------------------------- BitStackedLinear in the block


def test_bitstacked_shares_the_parameter_and_keys():
    m = _moe_block()
    params = dict(m.named_parameters())
    keys = list(m.state_dict())
    _ternary_block(m)
    for p in EXPERT_PROJ:
        mod = getattr(m.experts, p)
        assert type(mod) is BitStackedLinear and mod.weight is params[f"experts.{p}.weight"]
    assert type(m.router) is nn.Linear
    assert list(m.state_dict()) == keys
    assert set(ternary_modules(m)) == {f"experts.{p}" for p in EXPERT_PROJ} | {
        f"shared_expert.{p}" for p in EXPERT_PROJ
    } | {"shared_expert_gate"}
    assert set_ramp(m, 0.5) == 7 and all(mod.ramp.item() == 0.5 for mod in ternary_modules(m).values())
    # GPT.init_weights' hook restores the ramp a meta-built module would hold as garbage.
    m.experts.up_proj.reset_extra_parameters()
    assert m.experts.up_proj.ramp.item() == 1.0
    # Applying again updates in place, no double wrapping.
    up = m.experts.up_proj
    apply_ternary(m, TernaryConfig(include=["*"], exclude=["*router*"], activation_bits=6), ramp=0.25)
    assert m.experts.up_proj is up and up.activation_bits == 6 and up.ramp.item() == 0.25


@pytest.mark.parametrize("impl", ["loop", GROUPED])
def test_ramp_zero_is_exactly_the_full_precision_block(impl):
    dense = _moe_block(seed=1).train()
    tern = _ternary_block(copy.deepcopy(dense), ramp=0.0)
    dense.impl = tern.impl = impl
    x = torch.randn(3, 7, 32)
    g = torch.randn(3, 7, 32)
    outs = []
    for m in (dense, tern):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * g).sum().backward()
        outs.append((y.detach(), xi.grad, m.experts.gate_proj.weight.grad, m.experts.down_proj.weight.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    tern.experts.gate_proj.set_ramp(1.0)
    with torch.no_grad():
        assert not torch.allclose(tern(x), dense(x), atol=1e-3)  # the quantizer does act at ramp 1


def _per_expert_reference(m: MoE, x: torch.Tensor, ramp: float) -> tuple[torch.Tensor, list[dict[str, BitLinear]]]:
    """The block with every expert run as three BitLinear built from its weight slices, on every
    token, combined with the routing weights: no stacking, no sorting, no dispatch."""
    flat = x.reshape(-1, m.dim)
    _, _, w, idx = m.route(flat)
    out = torch.zeros_like(flat)
    layers = []
    for e in range(m.n_experts):
        lin = {}
        for p in EXPERT_PROJ:
            wp = getattr(m.experts, p).weight
            bl = BitLinear(wp.shape[2], wp.shape[1], bias=False, ramp=ramp)
            with torch.no_grad():
                bl.weight.copy_(wp[e])
            lin[p] = bl
        y = lin["down_proj"](F.silu(lin["gate_proj"](flat)) * lin["up_proj"](flat))
        out = out + (w * (idx == e)).sum(-1, keepdim=True) * y  # 0 for tokens not routed to e
        layers.append(lin)
    out = out + torch.sigmoid(m.shared_expert_gate(flat)) * m.shared_expert(flat)
    return out.reshape(x.shape), layers


@pytest.mark.parametrize("impl", ["loop", GROUPED])
@pytest.mark.parametrize("ramp", [1.0, 0.4])
def test_ternary_block_equals_per_expert_bitlinear_forward_and_backward(impl, ramp):
    """Forward and the STE gradients: each slice of the latent 3-D weight gets exactly the
    gradient a BitLinear holding that expert alone gets."""
    m = _ternary_block(_moe_block(seed=2), ramp=ramp).train()
    m.impl = impl
    x = torch.randn(2, 9, 32)
    g = torch.randn(2, 9, 32)
    xi, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = m(xi)
    (y * g).sum().backward()
    grads = {p: getattr(m.experts, p).weight.grad.clone() for p in EXPERT_PROJ}
    m.zero_grad()
    ref, layers = _per_expert_reference(m, xr, ramp)
    (ref * g).sum().backward()

    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xi.grad, xr.grad, atol=1e-5, rtol=1e-5)
    routed = m.last_expert_load > 0
    assert routed.sum() >= 2
    for p in EXPERT_PROJ:
        assert grads[p].shape == getattr(m.experts, p).weight.shape
        for e in range(m.n_experts):
            torch.testing.assert_close(grads[p][e], layers[e][p].weight.grad, atol=1e-5, rtol=1e-5)
            # The STE reaches every routed expert's latent weight (unrouted ones get none).
            assert bool(grads[p][e].abs().sum() > 0) == bool(routed[e]), (p, e)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch")
def test_ramp_changes_do_not_recompile_the_experts():
    """lambda is a buffer in BitStackedLinear too: the compiled grouped-mm experts trace once
    for the whole ramp, and match eager at every step."""

    m = _ternary_block(_moe_block(seed=3), ramp=0.0)
    counter = CompileCounterWithBackend("aot_eager")  # traces dynamo + autograd, no C++ build
    compiled = torch.compile(m.experts, backend=counter)
    x, counts = torch.randn(10, 32), torch.tensor([3, 2, 0, 4, 1])
    for step in range(5):
        set_ramp(m, ramp_value(step, 4))
        y = compiled(x, counts, "grouped_mm")
        y.sum().backward()
        with torch.no_grad():
            assert torch.equal(y, m.experts(x, counts, "grouped_mm"))
    assert counter.frame_count == 1
    assert m.experts.up_proj.weight.grad is not None and m.experts.up_proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- selection on the presets


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-hybrid"])
def test_apply_ternary_selects_the_experts_of_the_presets(preset):
    cfg = TrainerConfig.model_validate({"preset": preset}).model
    model = GPT(cfg)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = apply_ternary(model, TernaryConfig())
    experts = {f"layers.{i}.mlp.experts.{p}" for i in range(cfg.n_layers) for p in EXPERT_PROJ}
    assert experts <= set(names)
    assert all(type(model.get_submodule(n)) is BitStackedLinear for n in experts)
    assert all(type(model.layers[i].mlp.router) is nn.Linear for i in range(cfg.n_layers))
    assert not any(isinstance(m, StackedLinear) and not isinstance(m, BitStackedLinear) for m in model.modules())
    assert set(ternary_modules(model)) == set(names)
    assert set_ramp(model, 1.0) == len(names)
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
    assert list(model.state_dict()) == keys
    # Nothing is reported as left in full precision: experts are ternary, and the default
    # exclude globs leave out the hybrid's depthwise convolutions (no ternary counterpart).
    messages = [str(w.message) for w in caught]
    assert not messages, messages


# --------------------------------------------------------------------------- packing

IMPLS = ["loop"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])


def _set_impl(models, impl: str) -> None:
    for model in models:
        for block in model.modules():
            if isinstance(block, MoE):
                block.impl = impl


@pytest.mark.parametrize("kind", ["moe", "hybrid"])
def test_packed_moe_logits_equal_training_mode(kind, tmp_path):
    cfg = _small_cfg(kind)
    model = random_gpt(cfg).eval()
    apply_ternary(model, TernaryConfig())
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx)
        for cache_unpacked in (False, True):
            packed = copy.deepcopy(model)
            names = to_packed_inference(packed, cache_unpacked=cache_unpacked)
            assert set(names) == set(ternary_modules(model))
            assert not any(isinstance(m, TernaryLayer) for m in packed.modules())
            assert all(
                isinstance(packed.layers[i].mlp.experts.gate_proj, PackedStackedLinear) for i in range(cfg.n_layers)
            )
            for impl in IMPLS:
                _set_impl((model, packed), impl)
                assert torch.equal(packed(idx), model(idx)), (cache_unpacked, impl)
                # Under autocast the dequantized experts go straight to bf16 (the grouped-mm
                # path is then the one CUDA takes): still the same bits.
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    a, b = packed(idx), model(idx)
                assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), (cache_unpacked, impl)
            _set_impl((model, packed), "auto")
            assert torch.equal(packed(idx), ref)
            assert torch.equal(packed(idx), ref)  # second call: from the cache when enabled

        info = save_packed(model, cfg.model_dump(), tmp_path / "m.safetensors", verbose=False)
        loaded = load_packed_model(tmp_path / "m.safetensors")
        assert torch.equal(loaded(idx), ref)

        # Cached greedy decoding (the hybrid's recurrent-state path) gives the same logits too.
        def decode(m: GPT, n: int = 4) -> torch.Tensor:
            cache = m.new_cache(idx.size(0), 48)
            logits = [m(idx, cache=cache)[:, -1]]
            for _ in range(n):
                logits.append(m(logits[-1].argmax(-1, keepdim=True), cache=cache)[:, -1])
            return torch.stack(logits)

        assert torch.equal(decode(loaded), decode(model))

    header = read_packed_metadata(tmp_path / "m.safetensors")
    assert header["format"] == FORMAT
    gate = header["modules"]["layers.0.mlp.experts.gate_proj"]
    assert gate == {
        "kind": "stacked",
        "n_experts": 4,
        "in_features": 64,
        "out_features": 32,
        "activation_bits": 8,
        "bias": False,
    }
    raw = load_packed(tmp_path / "m.safetensors", dequantize=False)
    assert raw["layers.0.mlp.experts.gate_proj.weight_packed"].shape == (4, math.ceil(64 * 32 / 5))
    assert raw["layers.0.mlp.experts.down_proj.weight_scale"].shape == (4,)
    assert raw["layers.0.mlp.experts.down_proj.weight_scale"].dtype == torch.float32
    n_tern = sum(m.weight.numel() for m in ternary_modules(model).values())
    assert info["ternary_params"] == n_tern
    deq = load_packed(tmp_path / "m.safetensors", dequantize=True)
    assert set(deq) == set(model.state_dict())
    for i in range(cfg.n_layers):
        for p in EXPERT_PROJ:
            w = getattr(model.layers[i].mlp.experts, p).weight
            assert torch.equal(deq[f"layers.{i}.mlp.experts.{p}.weight"], quantize_expert_weight(w)[0])


def test_packed_size_of_tiny_moe_and_old_files_still_load(tmp_path):
    """The tiny-moe preset packed against its bf16 weights; a dense export stays format v1 and
    loads (as do files written before experts were packed); unknown versions are refused."""
    cfg = TrainerConfig.model_validate({"preset": "tiny-moe"}).model
    model = random_gpt(cfg).eval()
    apply_ternary(model, TernaryConfig())
    info = save_packed(model, cfg.model_dump(), tmp_path / "moe.safetensors", dtype=torch.bfloat16, verbose=False)
    bf16_bytes = 2 * sum(p.numel() for p in model.parameters())
    stacked = [m for m in ternary_modules(model).values() if isinstance(m, BitStackedLinear)]
    expert_w = sum(m.weight.numel() for m in stacked)
    # Each expert is padded to whole bytes on its own and has a 4-byte scale.
    expert_bytes = sum(e * (math.ceil(o * i / 5) + 4) for e, o, i in (m.weight.shape for m in stacked))
    print(
        f"\ntiny-moe: {info['file_bytes'] / 2**20:.3f} MiB packed vs {bf16_bytes / 2**20:.3f} MiB bf16 "
        f"({bf16_bytes / info['file_bytes']:.1f}x); experts {expert_w:,} weights in {expert_bytes:,} bytes "
        f"({8 * expert_bytes / expert_w:.3f} bits/weight); all ternary {info['bits_per_ternary_weight']:.3f} "
        f"bits/weight, overall {info['bits_per_weight_overall']:.2f}"
    )
    assert expert_w > 0.5 * info["ternary_params"]  # the experts are most of the ternary weights
    assert 1.6 < info["bits_per_ternary_weight"] < 1.62
    assert info["file_bytes"] < 0.4 * bf16_bytes

    dense_cfg = TrainerConfig.model_validate({"preset": "tiny", "model": {"n_layers": 2}}).model
    dense = random_gpt(dense_cfg).eval()
    apply_ternary(dense, TernaryConfig())
    save_packed(dense, dense_cfg.model_dump(), tmp_path / "dense.safetensors", verbose=False)
    header = read_packed_metadata(tmp_path / "dense.safetensors")
    assert header["format"] == FORMAT_V1 and all("kind" not in m for m in header["modules"].values())
    idx = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_packed_model(tmp_path / "dense.safetensors")(idx), dense(idx))

    with safe_open(str(tmp_path / "dense.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(
        tensors,
        tmp_path / "future.safetensors",
        metadata={META_KEY: json.dumps({**header, "format": "nanochat-ternary-v9"})},
    )
    with pytest.raises(ValueError, match="unsupported format"):
        read_packed_metadata(tmp_path / "future.safetensors")


def test_bf16_export_keeps_the_aux_free_router_bias_float32(tmp_path):
    """The router bias moves in steps of 1e-3: rounded to bf16 it would send tokens to other
    experts. A bf16 export keeps it float32 and still serves in bf16 (RoPE tables too); a file
    written before, with the bias in bf16, loads as it is."""
    cfg = _small_cfg("moe")
    cfg = cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"balance": "aux_free"})})
    model = random_gpt(cfg).eval()
    apply_ternary(model, TernaryConfig())
    biases = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, MoE):
                m.expert_bias.copy_(0.001 * torch.randint(-3000, 3000, m.expert_bias.shape).float())
                biases[f"{name}.expert_bias"] = m.expert_bias.clone()
    assert biases and all(not torch.equal(b.bfloat16().float(), b) for b in biases.values())
    path = tmp_path / "m.safetensors"
    save_packed(model, cfg.model_dump(), path, dtype=torch.bfloat16, verbose=False)
    raw = load_packed(path, dequantize=False)
    assert all(torch.equal(raw[k], b) for k, b in biases.items())
    assert raw["embed_tokens.weight"].dtype == torch.bfloat16
    loaded = load_packed_model(path)
    assert all(torch.equal(loaded.get_buffer(k), b) for k, b in biases.items())
    assert loaded.rope_cos.dtype == torch.bfloat16
    idx = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(loaded(idx).float()).all()

    with safe_open(str(path), framework="pt") as f:
        old = {k: f.get_tensor(k).bfloat16() if k in biases else f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save_file(old, tmp_path / "old.safetensors", metadata=meta)
    loaded_old = load_packed_model(tmp_path / "old.safetensors")
    assert all(torch.equal(loaded_old.get_buffer(k), b.bfloat16()) for k, b in biases.items())
    with torch.no_grad():
        assert torch.isfinite(loaded_old(idx).float()).all()


# --------------------------------------------------------------------------- the ternary stage end to end


def _bf16_rounded_reference(final_dir: Path) -> GPT:
    """final/ as BitLinear/BitStackedLinear (ramp 1), with every tensor the packed export stores
    in bf16 (all but the ternary latent weights) rounded to bf16: the packed model's values."""
    model, _, _ = load_model(final_dir)
    latent = {id(m.weight) for m in ternary_modules(model).values()}
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() and id(t) not in latent:
                t.copy_(t.bfloat16().float())
    return model


@pytest.mark.parametrize("kind", ["moe", "hybrid"])
def test_ternary_stage_with_parent_kd_on_moe(kind, tmp_path):
    """A ~10-step pretrain of a micro MoE / hybrid model, then a ternary run from it distilling from
    its frozen parent: losses finite, KL to the parent logged, and the packed export gives the
    logits of final/ under BitLinear/BitStackedLinear."""
    preset, over = PRESET[kind], model_over(kind)
    parent = tmp_path / "parent"
    train(micro_cfg(parent, preset=preset, model=over, steps=10))
    child = tmp_path / "ternary"
    steps = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = train(
            micro_cfg(
                child,
                preset=preset,
                model=over,
                steps=steps,
                stage="ternary",
                ternary={"distill_from_parent": True, "ramp_steps": 2},
                checkpoint={"init_from": str(parent / "final")},
            )
        )
    assert not any("experts" in str(w.message) for w in caught)
    log = read_log(child)
    assert sorted(log) == list(range(1, steps + 1))
    for s in log:
        assert math.isfinite(log[s]["loss"]) and log[s]["kd_loss"] is not None and math.isfinite(log[s]["kd_loss"])
    assert rec["step"] == steps
    # Step 1 runs at ramp 0: the student is then exactly its parent (init_from, dense-equal
    # experts), so the KL is 0; by the last step (ramp 1) the quantization shows.
    assert log[1]["kd_loss"] == pytest.approx(0.0, abs=1e-6) and log[steps]["kd_loss"] > 1e-5, log

    final_model, tok, _ = load_model(child / "final")
    tern = ternary_modules(final_model)
    assert {f"layers.{i}.mlp.experts.{p}" for i in range(2) for p in EXPERT_PROJ} <= set(tern)
    packed_path = child / "model.ternary.safetensors"
    header = read_packed_metadata(packed_path)
    assert header["format"] == FORMAT
    assert sum(m.get("kind") == "stacked" for m in header["modules"].values()) == 6

    packed, _, pcfg = load_model(packed_path)
    assert pcfg.stage == "ternary"
    assert isinstance(packed.layers[1].mlp.experts.down_proj, PackedStackedLinear)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        # The export stores non-ternary tensors in bf16: run both in float32 with those values.
        got = packed.float()(ids)
        want = _bf16_rounded_reference(child / "final")(ids)
        assert torch.equal(got, want)
        # And the export as served (bf16) is close to final/ as trained.
        served = load_model(packed_path)[0](ids).float()
        full = final_model(ids)
    assert (served - full).abs().max() < 0.05 * full.abs().max()
