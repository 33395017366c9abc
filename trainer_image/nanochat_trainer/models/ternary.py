"""Ternary stage: BitNet b1.58 quantization-aware training of chosen linear layers and MoE experts.

BitNet b1.58 (Ma et al., 2024) trains linear layers whose forward pass uses weights in
{-1, 0, +1} times one per-tensor scale, and activations quantized to 8 bits per token,
while the optimizer keeps updating full-precision latent weights through a
straight-through estimator (STE). This module holds the training side; packing to
1.6 bits per weight and the packed inference path are in `ternary_pack.py`.

    from nanochat_trainer.config import TernaryConfig
    from nanochat_trainer.models.ternary import apply_ternary, ramp_value, set_ramp

    names = apply_ternary(model, TernaryConfig())   # before DDP/FSDP/compile
    for step in range(steps):
        set_ramp(model, ramp_value(step, cfg.ternary.ramp_steps))
        loss = model(x, y); loss.backward(); opt.step()

`apply_ternary` swaps matching modules in place: `nn.Linear` for `BitLinear`, and MoE's
routed-expert `moe.StackedLinear` (a (E, out, in) weight, one matrix per expert) for
`BitStackedLinear`, whose scale is per expert: mean |W_e| over that expert's (out, in)
matrix, since each slice is an independent linear layer (and under expert parallelism a
rank holds only some of the slices, so a scale across experts would depend on the
sharding). Both keep the very same `weight`/`bias` Parameter objects, so a dense
checkpoint loads unchanged, an optimizer built before the swap still points at the right
tensors, and state_dict keys do not move. The ramp is a non-persistent buffer, not
checkpoint state: the training loop sets it from the step, also after a resume.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TernaryConfig
from .moe import StackedLinear

WEIGHT_EPS = 1e-5  # BitNet's clamp on mean(|W|): an all-zero matrix must not divide by zero
ACT_EPS = 1e-5  # clamp on a token's absmax: an all-zero token quantizes to zeros, not NaN


def weight_scale(w: torch.Tensor, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """BitNet b1.58's per-tensor scale: mean(|W|), clamped below by eps. 0-dim float32."""
    # Computed in float32 so a bf16 latent weight gets the same scale as its fp32 copy.
    return w.detach().float().abs().mean().clamp(min=eps)


def expert_scales(w: torch.Tensor, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """Per-expert scales of a stacked (E, out, in) weight: mean(|W_e|) of each slice, clamped. (E,) float32."""
    return w.detach().float().abs().mean(dim=(-2, -1)).clamp(min=eps)


def ternary_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """clip(round(W / scale), -1, 1) as int8 values in {-1, 0, +1} (no gradient).

    `scale` broadcasts against W: 0-dim for one matrix, (E, 1, 1) for stacked experts.
    """
    return (w.detach().float() / scale).round().clamp(-1, 1).to(torch.int8)


def quantize_weight(w: torch.Tensor, eps: float = WEIGHT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q, scale) with W_q = clip(round(W / scale), -1, 1) * scale, in W's dtype.

    W_q is detached: the gradient path to the latent weight is the STE in `BitLinear`.
    """
    scale = weight_scale(w, eps)
    q = ternary_codes(w, scale)
    return (q.float() * scale).to(w.dtype), scale


def quantize_expert_weight(w: torch.Tensor, eps: float = WEIGHT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_weight` for a stacked (E, out, in) weight: one scale per expert; scale is (E,).

    W_q[e] equals quantize_weight(W[e])[0] (up to the float32 summation order of the mean).
    """
    scale = expert_scales(w, eps)
    s = scale.view(-1, 1, 1)
    return (ternary_codes(w, s).float() * s).to(w.dtype), scale


def quantize_activation(x: torch.Tensor, bits: int = 8, eps: float = ACT_EPS) -> torch.Tensor:
    """Per-token absmax quantization to `bits`, returned dequantized in x's dtype.

    Each token (last dim) is scaled by (2^(bits-1) - 1) / max|x|, rounded, clipped to
    [-2^(bits-1), 2^(bits-1) - 1] and scaled back (BitNet's `activation_quant`).
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.detach().float()  # float32 so rounding does not depend on the autocast dtype
    s = qmax / xf.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    return ((xf * s).round().clamp(-qmax - 1, qmax) / s).to(x.dtype)


def straight_through(latent: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward: exactly `value`; backward: the gradient goes to `latent` unchanged.

    Same gradient as the textbook `latent + (value - latent).detach()`, but written as
    `value + (latent - latent.detach())`: that difference is exactly 0.0, so the forward
    value is bit-identical to `value` and the packed inference path (which never sees
    the latent weight) reproduces training-mode logits exactly.
    """
    return value.detach() + (latent - latent.detach())


class TernaryLayer:
    """Mixin shared by BitLinear and BitStackedLinear: the ramp lambda, the activation
    quantizer and the lerp/STE mix. `isinstance(m, TernaryLayer)` finds both kinds."""

    activation_bits: int
    _ramp_init: float
    ramp: torch.Tensor

    def _init_ramp(self, activation_bits: int, ramp: float, device: torch.device | str | None) -> None:
        self.activation_bits = activation_bits
        self._ramp_init = float(ramp)
        # lambda is a 0-dim buffer, not a Python float: torch.compile would specialise on
        # a float and recompile at every ramp step. Non-persistent, so state_dict keys stay
        # those of the wrapped module; the loop sets it from the step (also after a resume).
        self.register_buffer("ramp", torch.tensor(float(ramp), device=device), persistent=False)

    def set_ramp(self, value: float) -> None:
        """Set lambda in place (compiled graphs read the same buffer)."""
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"ramp={value} is outside [0, 1]")
        with torch.no_grad():
            self.ramp.fill_(float(value))

    def reset_extra_parameters(self) -> None:
        """Called by GPT.init_weights: after meta init + to_empty the buffer holds garbage."""
        self.set_ramp(self._ramp_init)

    def _mix(self, latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """(1 - lambda) latent + lambda quantized in the forward, identity gradient to latent."""
        # No Python branch on lambda (that would read the buffer back to the host and
        # break compiled graphs). torch.lerp is exact at both ends: lambda = 0 gives the
        # latent, lambda = 1 the quantized tensor bit for bit, so the ramp's end matches
        # packed inference.
        target = torch.lerp(latent.detach(), quantized, self.ramp.to(quantized.dtype))
        return straight_through(latent, target)

    def effective_input(self, x: torch.Tensor) -> torch.Tensor:
        """x_eff of the forward pass (with the STE path to x). Per token, so it does not
        matter whether x holds one expert's rows or the rows of all experts."""
        return self._mix(x, quantize_activation(x, self.activation_bits))


class BitLinear(TernaryLayer, nn.Linear):
    """nn.Linear whose forward uses ternary weights and k-bit activations (BitNet b1.58).

    ramp (lambda in [0, 1]) mixes full precision into the quantized tensors:
    W_eff = (1 - lambda) W + lambda W_q and x_eff = (1 - lambda) x + lambda q(x). The
    gradient to W and x is the identity (STE through W_q and q(x)), so lambda changes
    the forward only. lambda = 0 is exactly nn.Linear; lambda = 1 is BitNet.

    No SubLN inside the layer (the BitNet paper adds an RMSNorm before each BitLinear):
    our blocks already normalise the inputs of q/k/v and gate/up, and an extra norm would
    add parameters a dense checkpoint does not have.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        activation_bits: int = 8,
        ramp: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_ramp(activation_bits, ramp, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_bits: int = 8, ramp: float = 1.0) -> BitLinear:
        """A BitLinear that shares `linear`'s weight and bias Parameters (no copy)."""
        # Built on meta so no throwaway weight is allocated or initialised, then the
        # original Parameters are attached: same objects, same storage, same ids.
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            activation_bits=activation_bits,
            ramp=ramp,
            device="meta",
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.ramp = torch.tensor(float(ramp), device=linear.weight.device)
        new.train(linear.training)
        return new

    def effective_weight(self) -> torch.Tensor:
        """W_eff of the forward pass (with the STE path to the latent weight)."""
        w_q, _ = quantize_weight(self.weight)
        return self._mix(self.weight, w_q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.effective_input(x), self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation_bits={self.activation_bits}, ramp={self.ramp.item():.3g}"


class BitStackedLinear(TernaryLayer, StackedLinear):
    """MoE experts' StackedLinear with BitLinear's forward applied to every expert slice.

    W_eff[e] = (1 - lambda) W[e] + lambda W_q[e], with W_q[e] ternary times mean |W[e]|:
    one scale per expert, never across experts (under expert parallelism `weight` holds
    only this rank's experts, and the scales must not depend on the split). Inputs are
    quantized per token (row), so quantizing the rows of all experts at once is the same
    as quantizing each expert's rows. `moe.Experts.compute` reads both through the
    `effective_weight` / `effective_input` hooks, in its loop and grouped-mm paths alike.
    """

    def __init__(
        self,
        n: int,
        in_features: int,
        out_features: int,
        *,
        activation_bits: int = 8,
        ramp: float = 1.0,
        device: torch.device | str | None = None,
    ):
        # StackedLinear allocates and initialises its weight; on meta (from_stacked) that costs nothing.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            super().__init__(n, in_features, out_features)
        self._init_ramp(activation_bits, ramp, device)

    @classmethod
    def from_stacked(cls, stacked: StackedLinear, activation_bits: int = 8, ramp: float = 1.0) -> BitStackedLinear:
        """A BitStackedLinear that shares `stacked`'s weight Parameter (no copy)."""
        e, o, i = stacked.weight.shape
        new = cls(e, i, o, activation_bits=activation_bits, ramp=ramp, device="meta")
        new.weight = stacked.weight
        new.ramp = torch.tensor(float(ramp), device=stacked.weight.device)
        new.train(stacked.training)
        return new

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(E, out, in) W_eff (with the STE path to the latent weight), cast to `dtype` when given."""
        w_q, _ = quantize_expert_weight(self.weight)
        w = self._mix(self.weight, w_q)
        return w if dtype is None else w.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation_bits={self.activation_bits}, ramp={self.ramp.item():.3g}"


_WRAPPABLE = (nn.Linear, StackedLinear)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_ternary(model: nn.Module, cfg: TernaryConfig) -> list[str]:
    """Names of the nn.Linear and moe.StackedLinear modules `cfg` selects: match an include
    glob, no exclude glob.

    Globs use fnmatch, where `*` also crosses dots ("layers.*.mlp.*" matches
    "layers.3.mlp.experts.up_proj" and "layers.3.mlp.shared_expert.up_proj"). Other
    modules (embeddings, norms, convolutions, packed layers) are never selected.
    """
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, _WRAPPABLE) and _matches(name, cfg.include) and not _matches(name, cfg.exclude)
    ]


def apply_ternary(model: nn.Module, cfg: TernaryConfig, ramp: float | None = None) -> list[str]:
    """Replace the selected modules of `model` in place: nn.Linear by BitLinear, MoE's
    StackedLinear experts by BitStackedLinear.

    Returns the replaced module names. Parameters are shared, not copied (see
    `BitLinear.from_linear`). Modules already ternary are updated, not re-wrapped, so
    calling this twice is harmless. `ramp` defaults to 0 when cfg.ramp_steps > 0 (the
    first step is full precision) and to 1 otherwise. Call it before DDP/FSDP/compile:
    those wrap modules and would keep pointing at the old ones.

    Raises ValueError when the globs select no nn.Linear (or StackedLinear) at all: a
    typo in a pattern must not silently train a dense model in the ternary stage.
    """
    names = select_ternary(model, cfg)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, _WRAPPABLE)]
        raise ValueError(
            f"ternary include={cfg.include} exclude={cfg.exclude} selects no nn.Linear (or moe.StackedLinear) "
            f"module; linear modules are e.g. {linears[:6]}"
        )
    # Matrices the globs reach but no ternary module can wrap (e.g. the Gated DeltaNet's
    # depthwise convolution) stay full precision: say so rather than leave the user
    # believing the whole block is ternary.
    skipped = [
        n
        for n, m in model.named_modules()
        if not isinstance(m, _WRAPPABLE)
        and _matches(n, cfg.include)
        and not _matches(n, cfg.exclude)
        and any(p.dim() >= 2 for p in m.parameters(recurse=False))
    ]
    if skipped:
        warnings.warn(
            f"ternary: {len(skipped)} selected modules are not nn.Linear and stay full precision: {skipped[:8]}",
            stacklevel=2,
        )
    if ramp is None:
        ramp = 0.0 if cfg.ramp_steps > 0 else 1.0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, TernaryLayer):
            module.activation_bits, module._ramp_init = cfg.activation_bits, float(ramp)
            module.set_ramp(ramp)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, StackedLinear):
            new: nn.Module = BitStackedLinear.from_stacked(module, cfg.activation_bits, ramp)
        else:
            new = BitLinear.from_linear(module, cfg.activation_bits, ramp)
        setattr(parent, child, new)
    return names


def set_ramp(model: nn.Module, value: float) -> int:
    """Set lambda on every BitLinear and BitStackedLinear of `model`; returns how many were set."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"ramp={value} is outside [0, 1]")
    count = 0
    for m in model.modules():
        if isinstance(m, TernaryLayer):
            m.set_ramp(value)
            count += 1
    return count


@contextlib.contextmanager
def fully_ternary(model: nn.Module) -> Iterator[None]:
    """`model` at lambda 1 inside the block, whatever step the ramp is at: the weights as its
    checkpoints load (`checkpoint.load_model`) and as the packed export serves them. Scores taken
    mid-ramp at the ramp's lambda would describe a model no one gets: a nearly full-precision one
    would win best/ and then serve fully ternary. The ramp is put back after."""
    layers = [m for m in model.modules() if isinstance(m, TernaryLayer)]
    before = [m.ramp.clone() for m in layers]  # on the device: no read back to the host
    for m in layers:
        m.set_ramp(1.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for m, ramp in zip(layers, before):
                m.ramp.copy_(ramp)


def ramp_value(step: int, ramp_steps: int) -> float:
    """lambda after `step` optimizer steps of the ternary stage: linear 0 -> 1 over ramp_steps.

    ramp_steps = 0 means fully ternary from the first step (training from scratch, or a
    hard switch). Step counts the stage's own steps, so resume sets the same lambda.
    """
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / ramp_steps))


def ternary_modules(model: nn.Module) -> dict[str, BitLinear | BitStackedLinear]:
    """The ternary modules (BitLinear and BitStackedLinear) of `model` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TernaryLayer)}
