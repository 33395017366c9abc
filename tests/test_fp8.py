"""FP8 training matmuls (models/fp8.py) on torch's CPU float8 kernel: the GEMMs multiply exactly
the quantized operands, only the hidden layers convert, and a run with fp8 trains like one without."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from nanochat_trainer.config import ModelConfig
from nanochat_trainer.models.fp8 import E4M3, E5M2, Float8Linear, converts, quantize, to_float8
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.parallel.apply import apply_fp8
from nanochat_trainer.parallel.distributed import Env
from nanochat_trainer.train import train

from micro import MICRO, MOE, losses, micro_cfg, perturb, torchrun

# Wide enough that every hidden layer qualifies (>= 128, multiples of 16), except the GQA k/v
# projections (2 heads x 32 = 64 features).
WIDE = {**MICRO["model"], "dim": 128, "ffn_dim": 256}


def dequantized(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q, inv = quantize(x, dtype)
    return q.double() * inv.double()


def test_a_float8_linear_multiplies_exactly_the_quantized_operands():
    torch.manual_seed(0)
    x = torch.randn(64, 128, requires_grad=True)
    layer = Float8Linear(128, 256, bias=False)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    xq, wq, dyq = dequantized(x.detach(), E4M3), dequantized(layer.weight.detach(), E4M3), dequantized(dy, E5M2)
    torch.testing.assert_close(y.double(), xq @ wq.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), dyq @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), dyq.T @ xq, rtol=1e-5, atol=1e-5)
    # ... which is float8's rounding away from the fp32 product, not the product itself.
    exact = x.detach() @ layer.weight.detach().T
    rel = ((y.detach() - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.1, rel


def test_quantize_puts_the_largest_magnitude_on_the_formats_largest_value():
    x = torch.tensor([[-3e-4, 1e-5, 2e-4], [5e-5, 0.0, -1e-6]])
    for dtype in (E4M3, E5M2):
        q, inv = quantize(x, dtype)
        assert q.dtype == dtype and q.float().abs().max().item() == torch.finfo(dtype).max
        assert torch.isfinite(q.float()).all()
        torch.testing.assert_close(q.float() * inv, x, rtol=0.13, atol=0.0)  # e5m2: 2 mantissa bits


def wide_model(moe: bool = False) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({**WIDE, "moe": {**MOE, "shared_expert_ffn_dim": 128}} if moe else WIDE)
    model = GPT(cfg)
    model.init_weights(0)
    return perturb(model, 0.02)


def test_only_hidden_layers_convert_and_evaluation_stays_exact():
    model = wide_model(moe=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 512, (2, 32))
    model.eval()
    reference = model(tokens)

    names = to_float8(model)

    assert sorted({n.split(".", 2)[2] for n in names}) == [
        "attn.o_proj",
        "attn.q_proj",
        "mlp.shared_expert.down_proj",
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
    ]
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in names)
    square = nn.Linear(128, 128, bias=False)  # a router over 128 experts: wide enough, still kept
    assert not converts("layers.0.mlp.router", square) and converts("layers.0.mlp.up_proj", square)
    assert model.state_dict().keys() == before.keys()  # checkpoints see the same tensors
    assert torch.equal(model(tokens), reference)  # eval mode: the usual precision, bit for bit
    model.train()
    trained = model(tokens)
    rel = ((trained - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.05, rel


def test_a_gpu_without_fp8_tensor_cores_trains_in_bf16_and_says_so(tmp_path, monkeypatch, caplog):
    """No machine here has an A100: its device query is the boundary faked."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB (fake)")
    cfg = micro_cfg(tmp_path, model=WIDE, fp8=True)
    model = wide_model()
    with caplog.at_level(logging.WARNING):
        assert apply_fp8(model, cfg, Env(0, 1, torch.device("cuda", 0))) == []
    assert "fp8: true ignored" in caplog.text and "compute capability 8.0" in caplog.text
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    assert apply_fp8(model, cfg, Env(0, 1, torch.device("cpu")))  # the CPU kernel is exact, only slow


def test_fp8_needs_16_tokens_per_micro_batch_multiple(tmp_path):
    with pytest.raises(ValueError, match="fp8 needs batch_size x seq_len a multiple of 16"):
        micro_cfg(tmp_path, fp8=True, batch_size=3, seq_len=50)
    assert micro_cfg(tmp_path, fp8=True, batch_size=3, seq_len=48).fp8


def test_a_run_with_fp8_trains_like_one_without(tmp_path):
    common = {"model": {**WIDE, "n_layers": 1}, "steps": 12, "batch_size": 2}
    train(micro_cfg(tmp_path / "bf", **common))
    train(micro_cfg(tmp_path / "fp8", **common, fp8=True))
    plain, fp8 = losses(tmp_path / "bf"), losses(tmp_path / "fp8")
    assert fp8[12] < fp8[1] - 0.5, fp8
    for step in plain:
        assert fp8[step] == pytest.approx(plain[step], rel=5e-3), (step, plain, fp8)
    assert any(fp8[s] != plain[s] for s in plain)  # the float8 path ran


@pytest.mark.slow
def test_fp8_under_fsdp2_trains_like_bf16(tmp_path):
    """The swap comes before fully_shard: FSDP2 then gathers the weights Float8Linear reads."""
    common = {"model": {**WIDE, "n_layers": 1}, "steps": 6, "batch_size": 2, "parallel": "fsdp"}
    torchrun(2, micro_cfg(tmp_path / "bf", **common), tmp_path)
    torchrun(2, micro_cfg(tmp_path / "fp8", **common, fp8=True), tmp_path)
    plain, fp8 = losses(tmp_path / "bf"), losses(tmp_path / "fp8")
    assert fp8[6] < fp8[1] - 0.2, fp8
    for step in plain:
        assert fp8[step] == pytest.approx(plain[step], rel=5e-3), (step, plain, fp8)
    assert any(fp8[s] != plain[s] for s in plain)
