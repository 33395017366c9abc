"""FP8 matmuls for training (`fp8: true`): the three GEMMs of each hidden linear layer in float8,
one dynamic scale per tensor (the "tensorwise" recipe of torchao's Float8Linear and nanochat's).

    forward    y  = x @ W.T        x, W in e4m3 (3 mantissa bits: values)
    backward   dx = dy @ W         dy in e5m2 (5 exponent bits: gradients span a wider range)
               dW = dy.T @ x

Each operand is scaled so its largest magnitude lands on the format's largest value, cast with
saturation, and `torch._scaled_mm` multiplies the float8 tensors (H100's FP8 tensor cores: twice
bf16's peak) and undoes the scales. Weights and optimizer state stay in their own precision; only
the GEMM inputs are float8, so checkpoints are unchanged and a run may switch fp8 on or off.
Evaluation and generation (the module in eval mode) multiply in the usual precision.

    names = to_float8(model)     # before activation checkpointing, FSDP2 and compile
"""

from __future__ import annotations

import torch
import torch.nn as nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# An FP8 GEMM with a side under 128 is no faster than bf16 (nanochat's and torchao's cut), and
# FP8 tensor cores need every side a multiple of 16.
MIN_FEATURES, MULTIPLE = 128, 16
# The output layer and the MoE router stay in bf16 (torchtitan's default filter): the logits and
# the routing decisions are where float8's 3 mantissa bits would cost the most.
KEEP = ("lm_head", "router", "shared_expert_gate")


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` in float8 `dtype`, scaled so its largest magnitude is the format's largest value, with
    the inverse scale `_scaled_mm` multiplies back. The scale is divided in float64 (as torchao):
    compiled and eager runs then agree."""
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().double().clamp(min=1e-12)
    scale = (fmax / amax).float()
    # Row-major whatever x's strides (a gradient may come as a view): `_scaled_mm`'s first operand must be.
    q = (x.float() * scale).clamp(-fmax, fmax).to(dtype).contiguous()
    return q, scale.reciprocal()


def _column_major(x: torch.Tensor) -> torch.Tensor:
    """The same matrix with column-major strides: `_scaled_mm` wants its second operand so."""
    return x.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """y = x @ W.T for a 2-D x, its gradients by float8 GEMMs too. Fast accumulation in the
    forward only (torchao's default): the gradients accumulate in full precision."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, x_inv = quantize(x, E4M3)
        w8, w_inv = quantize(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.dtypes = x.dtype, weight.dtype
        # w8 is (out, in) row-major, so w8.t() is already column-major: no copy.
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dy8, dy_inv = quantize(dy, E5M2)
        dx = torch._scaled_mm(dy8, _column_major(w8), scale_a=dy_inv, scale_b=w_inv, out_dtype=dy.dtype)
        dw = torch._scaled_mm(
            dy8.t().contiguous(), _column_major(x8), scale_a=dy_inv, scale_b=x_inv, out_dtype=dy.dtype
        )
        return dx.to(x_dtype), dw.to(w_dtype), None


class Float8Linear(nn.Linear):
    """nn.Linear (no bias) whose training forward multiplies in float8; the same parameter, so
    state dicts, FSDP2 and the optimizers see nothing new. Under autocast the output has autocast's
    dtype, as nn.Linear's would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            y = _Float8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight, out_dtype)
        return y.view(*x.shape[:-1], y.size(-1))

    @classmethod
    def of(cls, linear: nn.Linear) -> Float8Linear:
        with torch.device("meta"):
            fp8 = cls(linear.in_features, linear.out_features, bias=False)
        fp8.weight = linear.weight
        return fp8.train(linear.training)


def converts(name: str, module: nn.Module) -> bool:
    """Whether `to_float8` swaps this module: a bias-free nn.Linear proper (not a ternary BitLinear),
    not one of KEEP, every side a multiple of 16 and at least 128."""
    return (
        type(module) is nn.Linear
        and module.bias is None
        and name.rsplit(".", 1)[-1] not in KEEP
        and min(module.in_features, module.out_features) >= MIN_FEATURES
        and module.in_features % MULTIPLE == 0
        and module.out_features % MULTIPLE == 0
    )


def to_float8(model: nn.Module) -> list[str]:
    """Swap every linear layer `converts` accepts for a Float8Linear sharing its weight, in place;
    returns their names."""
    names = [name for name, m in model.named_modules() if converts(name, m)]
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, Float8Linear.of(getattr(owner, attr)))
    return names


def fp8_unsupported(device: torch.device) -> str | None:
    """Why `device` cannot run float8 GEMMs (`_scaled_mm` raises there), or None."""
    if device.type != "cuda":
        return None  # torch's CPU kernel is exact but slow; the caller says so
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} (compute capability {capability[0]}.{capability[1]}) has no FP8 tensor cores (8.9+: L4, H100)"
    return None
