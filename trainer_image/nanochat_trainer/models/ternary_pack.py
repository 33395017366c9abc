"""Packed ternary weights: 5 trits per byte (1.6 bits/weight), safetensors export, packed inference.

A BitLinear's forward weight is codes * scale with codes in {-1, 0, +1}. The codes are
stored base 3, five per byte (3^5 = 243 <= 256): byte = sum_i (code_i + 1) * 3^i over
the flattened weight, zero-padded to a multiple of 5. Each layer also keeps its float32
scale. MoE's ternary experts (BitStackedLinear, a (E, out, in) weight with one scale per
expert) are packed the same way expert by expert: each expert's flattened (out, in)
matrix is padded to a multiple of 5 on its own, so an expert's codes are one row of
whole bytes. Everything else (embeddings, head, norms, router) keeps its dtype, or the
export's, except an MoE router's `expert_bias`, which stays float32 (as the scales do).

    from nanochat_trainer.models.ternary_pack import save_packed, load_packed_model, to_packed_inference

    info = save_packed(model, model_cfg.model_dump(), "model.ternary.safetensors")
    model = load_packed_model("model.ternary.safetensors", device="cuda")  # packed layers
    to_packed_inference(trained_model)   # or swap an in-memory ternary model in place

File layout (safetensors): for a ternary linear `NAME`, `NAME.weight_packed` (uint8,
1-D, ceil(out*in/5)) and `NAME.weight_scale` (float32, shape (1,)), plus `NAME.bias` when
it has one; for ternary experts `NAME`, `NAME.weight_packed` (uint8, (E, ceil(out*in/5)))
and `NAME.weight_scale` (float32, (E,)); every other tensor under its state_dict key.
Metadata key "nanochat_ternary" holds JSON: format version, encoding, model config,
per-module shapes and activation bits, and aliases for tied tensors (safetensors refuses
to store one tensor under two names). Format "nanochat-ternary-v1" has linear modules
only; "nanochat-ternary-v2" adds expert modules, whose entries carry "kind": "stacked"
and "n_experts" (an entry without "kind" is a linear). A file without experts is still
written as v1, so older readers load it; both versions load here. The keys equal the
packed modules' state_dict keys, so `load_packed(dequantize=False)` loads straight into
a model after `to_packed_inference`.

`PackedBitLinear` and `PackedStackedLinear` unpack with a 256-entry lookup table, on
every forward (weights stay 1.6 bits in memory) or once (cache_unpacked=True:
dense-sized memory, dense speed). There is no fused ternary matmul kernel here: compute
is a regular matmul (for experts, `moe.Experts.compute`'s loop or grouped mm).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from .gpt import GPT
from .moe import StackedLinear
from .ternary import BitLinear, BitStackedLinear, expert_scales, quantize_activation, ternary_codes, weight_scale

FORMAT_V1 = "nanochat-ternary-v1"  # linear modules only
FORMAT = "nanochat-ternary-v2"  # v1 plus MoE expert modules ("kind": "stacked")
READABLE_FORMATS = (FORMAT_V1, FORMAT)
# Stored float32 whatever the export's dtype: the aux-free router bias is added to float32 router
# probabilities and trained in steps of bias_update_rate (1e-3), finer than bf16 holds at its size
# (rounded, ~0.1% of tokens went to other experts). A file's dtypes are its own, so files that
# hold it in bf16 load as they are.
FLOAT32_SUFFIXES = (".expert_bias",)
ENCODING = "base3-5-per-byte"
META_KEY = "nanochat_ternary"
TRITS_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)


# --------------------------------------------------------------------------- packing


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack int values in {-1, 0, +1} (any shape, flattened) into uint8, five per byte.

    The result has ceil(numel / 5) bytes, each in [0, 242]. The shape is not stored:
    `unpack_ternary` needs numel (and the caller the shape).
    """
    flat = codes.reshape(-1)
    if flat.numel() and (flat.min() < -1 or flat.max() > 1):
        raise ValueError("pack_ternary takes values in {-1, 0, +1}")
    n = flat.numel()
    pad = (-n) % TRITS_PER_BYTE
    digits = flat.to(torch.int32) + 1
    if pad:
        digits = torch.cat([digits, digits.new_ones(pad)])  # pad with code 0 (digit 1)
    digits = digits.view(-1, TRITS_PER_BYTE)
    weights = torch.tensor(_POW3, dtype=torch.int32, device=digits.device)
    return (digits * weights).sum(dim=1).to(torch.uint8)


_LUT_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 5) table: row b holds the five codes of byte b (rows 243.. never occur)."""
    key = (torch.device(device), dtype)
    if key not in _LUT_CACHE:
        b = torch.arange(256, dtype=torch.int32)
        digits = torch.stack([(b // p) % 3 for p in _POW3], dim=1) - 1
        _LUT_CACHE[key] = digits.to(device=device, dtype=dtype)
    return _LUT_CACHE[key]


def pack_ternary_rows(codes: torch.Tensor) -> torch.Tensor:
    """Pack (R, L) codes row by row: (R, ceil(L / 5)) uint8, each row zero-padded on its own.

    Used for stacked experts (one row per expert), so an expert is a whole number of bytes.
    """
    rows, n = codes.shape
    pad = (-n) % TRITS_PER_BYTE
    if pad:
        codes = torch.cat([codes, codes.new_zeros(rows, pad)], dim=1)
    return pack_ternary(codes).view(rows, -1)


def unpack_ternary(packed: torch.Tensor, numel: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of `pack_ternary`: the first `numel` codes, 1-D, as `dtype`."""
    if packed.numel() * TRITS_PER_BYTE < numel:
        raise ValueError(f"{packed.numel()} packed bytes hold fewer than {numel} values")
    # A table lookup (one gather) instead of five divmods: this runs on every forward
    # of an on-the-fly PackedBitLinear, so it should be one memory pass.
    return _lut(packed.device, dtype).index_select(0, packed.to(torch.int32)).view(-1)[:numel]


# --------------------------------------------------------------------------- inference module


class PackedBitLinear(nn.Module):
    """Inference-only BitLinear (ramp = 1) that holds packed codes and a scale.

    Buffers: `weight_packed` (uint8, ceil(out*in/5)) and `weight_scale` (float32, (1,)),
    optional `bias`. Its forward equals `BitLinear.forward` at ramp 1 bit for bit:
    same activation quantizer, and codes * scale is exact in any float dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        activation_bits: int = 8,
        cache_unpacked: bool = False,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_bits = activation_bits
        self.cache_unpacked = cache_unpacked
        n = in_features * out_features
        self.register_buffer("weight_packed", torch.zeros(-(-n // TRITS_PER_BYTE), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype or torch.float32, device=device))
        else:
            self.bias = None
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, cache_unpacked: bool = False) -> PackedBitLinear:
        """Pack a BitLinear's current latent weight (as its ramp-1 forward would quantize it)."""
        w = layer.weight.detach()
        scale = weight_scale(w)
        new = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            activation_bits=layer.activation_bits,
            cache_unpacked=cache_unpacked,
            device=w.device,
            bias_dtype=None if layer.bias is None else layer.bias.dtype,
        )
        new.weight_packed.copy_(pack_ternary(ternary_codes(w, scale)))
        new.weight_scale.fill_(scale.item())
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
        return new

    def codes(self) -> torch.Tensor:
        """The (out, in) int8 codes in {-1, 0, +1}."""
        n = self.in_features * self.out_features
        return unpack_ternary(self.weight_packed, n).view(self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized (out, in) weight codes * scale in `dtype`, from cache when enabled."""
        key = (
            dtype,
            self.weight_packed.device,
            self.weight_packed.data_ptr(),
            self.weight_packed._version,
            self.weight_scale._version,
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        n = self.in_features * self.out_features
        # Scale the 256-row table instead of the whole matrix: one small multiply, and
        # +-scale and 0 are the exact values BitLinear computes as codes * scale.
        # The scale is rounded to `dtype` first, as autocast rounds BitLinear's fp32 W_q.
        lut = _lut(self.weight_packed.device, torch.float32) * self.weight_scale.float()
        w = lut.to(dtype).index_select(0, self.weight_packed.to(torch.int32)).view(-1)[:n]
        w = w.view(self.out_features, self.in_features)
        if self.cache_unpacked:
            self._cache = (key, w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x_q = quantize_activation(x, self.activation_bits)
        return F.linear(x_q, self.dequantized_weight(dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activation_bits={self.activation_bits}, cache_unpacked={self.cache_unpacked}"
        )


class PackedStackedLinear(nn.Module):
    """Inference-only BitStackedLinear (ramp = 1): MoE experts as packed codes and per-expert scales.

    Buffers: `weight_packed` (uint8, (E, ceil(out*in/5)), one row per expert) and
    `weight_scale` (float32, (E,)). No weight Parameter: `moe.Experts.compute` reads it
    through the same `effective_weight` / `effective_input` hooks as StackedLinear, and
    its output equals BitStackedLinear's at ramp 1 bit for bit.
    """

    def __init__(
        self,
        n: int,
        in_features: int,
        out_features: int,
        *,
        activation_bits: int = 8,
        cache_unpacked: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n, in_features, out_features
        self.activation_bits = activation_bits
        self.cache_unpacked = cache_unpacked
        per_expert = -(-(in_features * out_features) // TRITS_PER_BYTE)
        self.register_buffer("weight_packed", torch.zeros(n, per_expert, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(n, dtype=torch.float32, device=device))
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_bitstacked(cls, layer: BitStackedLinear, cache_unpacked: bool = False) -> PackedStackedLinear:
        """Pack a BitStackedLinear's current latent weight (as its ramp-1 forward would quantize it)."""
        w = layer.weight.detach()
        e, o, i = w.shape
        scale = expert_scales(w)
        new = cls(e, i, o, activation_bits=layer.activation_bits, cache_unpacked=cache_unpacked, device=w.device)
        new.weight_packed.copy_(pack_ternary_rows(ternary_codes(w, scale.view(-1, 1, 1)).view(e, o * i)))
        new.weight_scale.copy_(scale)
        return new

    def _unpacked(self, dtype: torch.dtype) -> torch.Tensor:
        """(E, out, in) codes in `dtype` (exact: -1, 0, +1)."""
        e, per_expert = self.weight_packed.shape
        n = self.in_features * self.out_features
        flat = unpack_ternary(self.weight_packed.reshape(-1), e * per_expert * TRITS_PER_BYTE, dtype)
        return flat.view(e, per_expert * TRITS_PER_BYTE)[:, :n].reshape(e, self.out_features, self.in_features)

    def codes(self) -> torch.Tensor:
        """The (E, out, in) int8 codes in {-1, 0, +1}."""
        return self._unpacked(torch.int8)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized (E, out, in) weight codes * scale[e] in `dtype` (default float32),
        from cache when enabled."""
        dtype = dtype or torch.float32
        key = (
            dtype,
            self.weight_packed.device,
            self.weight_packed.data_ptr(),
            self.weight_packed._version,
            self.weight_scale._version,
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        # Codes are exact in any float dtype, and so is code * scale once the scale is
        # rounded to dtype: the same +-scale and 0 that BitStackedLinear's float32 W_q
        # becomes when cast to dtype (round to nearest even is symmetric in the sign).
        w = self._unpacked(dtype) * self.weight_scale.to(dtype).view(-1, 1, 1)
        if self.cache_unpacked:
            self._cache = (key, w)
        return w

    def effective_input(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token activation quantization, as BitStackedLinear at ramp 1."""
        return quantize_activation(x, self.activation_bits)

    def extra_repr(self) -> str:
        return (
            f"experts={self.n_experts}, in_features={self.in_features}, out_features={self.out_features}, "
            f"activation_bits={self.activation_bits}, cache_unpacked={self.cache_unpacked}"
        )


def to_packed_inference(model: nn.Module, cache_unpacked: bool = False) -> list[str]:
    """Swap every BitLinear of `model` for a PackedBitLinear and every BitStackedLinear for a
    PackedStackedLinear, in place; returns the names.

    The latent full-precision weights are dropped (they are what training needs, not
    inference), so do this on a copy if training continues.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (BitLinear, BitStackedLinear))]
    if not names:
        raise ValueError("model has no BitLinear or BitStackedLinear module: call apply_ternary first")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if isinstance(old, BitStackedLinear):
            new: nn.Module = PackedStackedLinear.from_bitstacked(old, cache_unpacked)
        else:
            new = PackedBitLinear.from_bitlinear(old, cache_unpacked)
        setattr(parent, child, new)
    return names


# --------------------------------------------------------------------------- export / import


def _packed_modules(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (BitLinear, PackedBitLinear, BitStackedLinear, PackedStackedLinear)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def module_weights(m: dict[str, Any]) -> int:
    """Ternary weights of one module entry of the header (v1 entries are linear)."""
    return m.get("n_experts", 1) * m["in_features"] * m["out_features"]


def pack_ternary_state_dict(
    model: nn.Module, dtype: torch.dtype | None = None, weights: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of `model` with every ternary module (BitLinear, BitStackedLinear, or
    their packed counterparts) packed.

    tensors: safetensors-ready (contiguous, CPU, one name per storage). `dtype` casts
    the non-ternary floating tensors (e.g. bf16 for serving); None keeps them; scales
    and the router's expert_bias stay float32. meta: {"modules": {name: {in_features, out_features, activation_bits,
    bias}, plus "kind": "stacked" and n_experts for experts}, "aliases": {dropped_key:
    kept_key}} for tied tensors.

    `weights`: the tensors by state-dict name, instead of the model's own; `model` then only
    says which modules are ternary (it may be on the meta device), and with a mapping that reads
    each tensor when asked (`checkpoint.ModelTensors`) one layer's weight is in memory at a time.
    """
    modules = _packed_modules(model)
    out: dict[str, torch.Tensor] = {}
    meta_modules: dict[str, dict[str, Any]] = {}
    for name, m in modules.items():
        with _holding(m, name, weights):
            if isinstance(m, BitLinear):
                m = PackedBitLinear.from_bitlinear(m)
            elif isinstance(m, BitStackedLinear):
                m = PackedStackedLinear.from_bitstacked(m)
        out[f"{name}.weight_packed"] = m.weight_packed
        out[f"{name}.weight_scale"] = m.weight_scale
        if isinstance(m, PackedStackedLinear):
            meta_modules[name] = {
                "kind": "stacked",
                "n_experts": m.n_experts,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "activation_bits": m.activation_bits,
                "bias": False,
            }
            continue
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach()
        meta_modules[name] = {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "activation_bits": m.activation_bits,
            "bias": m.bias is not None,
        }
    owned = {f"{n}.{suffix}" for n in modules for suffix in ("weight", "bias", "weight_packed", "weight_scale")}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key in owned:
            continue
        # Tied parameters (lm_head.weight is embed_tokens.weight) appear twice here, as one object.
        if id(t) in seen:
            aliases[key] = seen[id(t)]
            continue
        seen[id(t)] = key
        t = (weights[key] if weights is not None else t).detach()
        if dtype is not None and t.is_floating_point():
            t = t.float() if key.endswith(FLOAT32_SUFFIXES) else t.to(dtype)
        out[key] = t
    tensors = {k: v.detach().cpu().contiguous() for k, v in out.items()}
    return tensors, {"modules": meta_modules, "aliases": aliases}


@contextmanager
def _holding(module: nn.Module, name: str, weights: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """`module` with its weight (and bias) from `weights` while packing it, its own again after."""
    if weights is None or isinstance(module, (PackedBitLinear, PackedStackedLinear)):
        yield
        return
    own = {k: getattr(module, k) for k in ("weight", "bias") if getattr(module, k, None) is not None}
    for k in own:
        setattr(module, k, nn.Parameter(weights[f"{name}.{k}"], requires_grad=False))
    try:
        yield
    finally:
        for k, v in own.items():
            setattr(module, k, v)


def packed_stats(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, float]:
    """Sizes of a packed state dict: ternary weights, their bytes, bits per weight."""
    n_tern = sum(module_weights(m) for m in meta["modules"].values())
    tern_keys = {f"{n}.{s}" for n in meta["modules"] for s in ("weight_packed", "weight_scale")}
    tern_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k in tern_keys)
    other = {k: t for k, t in tensors.items() if k not in tern_keys}
    other_params = sum(t.numel() for t in other.values())
    other_bytes = sum(t.numel() * t.element_size() for t in other.values())
    return {
        "ternary_params": n_tern,
        "ternary_bytes": tern_bytes,
        "bits_per_ternary_weight": 8 * tern_bytes / max(n_tern, 1),
        "other_params": other_params,
        "other_bytes": other_bytes,
        "tensor_bytes": tern_bytes + other_bytes,
        "bits_per_weight_overall": 8 * (tern_bytes + other_bytes) / max(n_tern + other_params, 1),
    }


def save_packed(
    model: nn.Module,
    model_cfg_dict: dict[str, Any],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    verbose: bool = True,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write `model` packed to a safetensors file (atomically); returns and prints its sizes.

    model_cfg_dict is `ModelConfig.model_dump()`, so `load_packed_model` can rebuild the
    model without the training config. dtype, weights: see `pack_ternary_state_dict`.
    """
    tensors, meta = pack_ternary_state_dict(model, dtype, weights)
    # v1 when there are no experts, so readers that predate v2 still load dense exports.
    stacked = any(m.get("kind") == "stacked" for m in meta["modules"].values())
    header = {"format": FORMAT if stacked else FORMAT_V1, "encoding": ENCODING, "model_config": model_cfg_dict, **meta}
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata={META_KEY: json.dumps(header)})
    os.replace(tmp, path)  # a reader never sees a half-written file
    info: dict[str, Any] = {"path": path, "file_bytes": os.path.getsize(path), **packed_stats(tensors, meta)}
    if verbose:
        print(
            f"saved {path}: {info['file_bytes'] / 2**20:.2f} MiB, {info['ternary_params']:,} ternary weights at "
            f"{info['bits_per_ternary_weight']:.3f} bits, {info['other_params']:,} other params; "
            f"{info['bits_per_weight_overall']:.2f} bits/weight overall"
        )
    return info


def read_packed_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a packed file (format, model_config, modules, aliases)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a nanochat ternary file (no {META_KEY!r} metadata)")
    header = json.loads(raw)
    if header.get("format") not in READABLE_FORMATS or header.get("encoding") != ENCODING:
        raise ValueError(f"{path}: unsupported format {header.get('format')!r}/{header.get('encoding')!r}")
    return header


def load_packed(
    path: str | os.PathLike,
    dequantize: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """State dict from a packed file, tied aliases restored.

    dequantize=False: packed keys as stored, for a model after `to_packed_inference`.
    dequantize=True: `NAME.weight` = codes * scale in `dtype` instead ((E, out, in) with
    per-expert scales for experts), for a plain dense GPT (runs without activation
    quantization, so its logits are close, not equal).
    Do not load dequantized weights into a BitLinear model: mean(|codes * scale|) is not
    scale (zeros lower the mean), so it would re-quantize with a different scale.
    """
    header = read_packed_metadata(path)
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if dequantize:
        for name, m in header["modules"].items():
            n = m["in_features"] * m["out_features"]
            packed, scale = sd.pop(f"{name}.weight_packed"), sd.pop(f"{name}.weight_scale").float()
            if m.get("kind") == "stacked":
                e = m["n_experts"]
                codes = unpack_ternary(packed.reshape(-1), packed.numel() * TRITS_PER_BYTE, torch.float32)
                codes = codes.view(e, -1)[:, :n]
                w = (codes * scale.view(-1, 1)).view(e, m["out_features"], m["in_features"])
            else:
                codes = unpack_ternary(packed, n, torch.float32)
                w = (codes * scale).view(m["out_features"], m["in_features"])
            sd[f"{name}.weight"] = w.to(dtype)
    for alias, key in header["aliases"].items():
        sd[alias] = sd[key]
    return sd


def load_packed_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", cache_unpacked: bool = False
) -> nn.Module:
    """Rebuild the GPT of a packed file with packed layers (PackedBitLinear, and
    PackedStackedLinear for MoE experts), ready for generation."""
    header = read_packed_metadata(path)
    cfg = ModelConfig.model_validate(header["model_config"])
    # Built on the meta device: the file's tensors become the model's (assign), so the dense model
    # (320 GB for qwen3-hybrid in fp32) is never allocated.
    with torch.device("meta"):
        model = GPT(cfg)
    for name, m in header["modules"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if m.get("kind") == "stacked":
            if not isinstance(old, StackedLinear):
                raise ValueError(
                    f"{path}: {name} holds stacked experts in the file but is {type(old).__name__} in the model"
                )
            setattr(
                parent,
                child,
                PackedStackedLinear(
                    m["n_experts"],
                    m["in_features"],
                    m["out_features"],
                    activation_bits=m["activation_bits"],
                    cache_unpacked=cache_unpacked,
                    device="meta",
                ),
            )
            continue
        setattr(
            parent,
            child,
            PackedBitLinear(
                m["in_features"],
                m["out_features"],
                bias=m["bias"],
                activation_bits=m["activation_bits"],
                cache_unpacked=cache_unpacked,
                device="meta",
                bias_dtype=None if old.bias is None else old.bias.dtype,
            ),
        )
    sd = load_packed(path, dequantize=False, device=device)
    model.load_state_dict(sd, strict=True, assign=True)  # each tensor in the file's dtype (bf16; scales fp32)
    model.finish_assigned(device)
    # Non-ternary tensors may be stored in bf16: the buffers no file holds (RoPE tables) follow, so
    # nothing upcasts.
    kept = (".weight_scale", *FLOAT32_SUFFIXES)
    float_dtypes = {t.dtype for k, t in sd.items() if t.is_floating_point() and not k.endswith(kept)}
    if len(float_dtypes) == 1:
        dtype = float_dtypes.pop()
        for mod in model.modules():
            for name in mod._non_persistent_buffers_set:
                buf = mod._buffers.get(name)
                if buf is not None and buf.is_floating_point():
                    mod._buffers[name] = buf.to(dtype)
    return model.eval()
