"""Hugging Face <-> nanochat weights: Qwen3, Qwen3-MoE and Qwen3-Next checkpoints.

Our `GPT` keeps Hugging Face's Qwen3 parameter names minus the `model.` prefix, so a
dense Qwen3 checkpoint maps one to one. Qwen3-MoE and Qwen3-Next need a few reshapes,
all done here and nowhere else:

* experts: HF stores one Linear per expert (`mlp.experts.{e}.gate_proj.weight`; some
  transformers 5 saves use the fused `mlp.experts.gate_up_proj` instead, also read);
  we stack them as `mlp.experts.{gate,up,down}_proj.weight` of shape (E, out, in).
  The router `mlp.gate.weight` is our `mlp.router.weight`.
* Qwen3-Next full attention: HF's `q_proj` emits, per head, the query then the output
  gate; we keep them as two matrices, `attn.q_proj` and `attn.g_proj`.
* Qwen3-Next Gated DeltaNet: HF fuses `in_proj_qkvz` and `in_proj_ba`, grouped per key
  head; we keep `attn.{q,k,v,z,b,a}_proj` separate (each its own matrix for Muon).
* Qwen3-Next's RMSNorms are zero-centred (scale = 1 + w); ours store the scale itself,
  so w is shifted by one on the way in and out. The gated norm inside DeltaNet is not
  zero-centred in HF either, and is copied as is.

Usage:

    from nanochat_trainer.models.hf_adapter import load_hf_checkpoint, export_hf
    model, cfg = load_hf_checkpoint("/path/to/Qwen3-0.6B")      # config.json + *.safetensors
    export_hf(model, cfg, "/tmp/out")   # config.json + model.safetensors transformers loads

Configurations this code cannot reproduce exactly (attention bias, sliding windows,
scaled RoPE, activations other than SiLU, ...) are rejected with a `ValueError` that
names the field, never approximated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import HybridConfig, ModelConfig, MoEConfig
from ..contract import HF_CONFIG
from .gpt import GPT
from .ternary import apply_ternary, set_ramp

ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
}


# --------------------------------------------------------------------------- config


def _rope_settings(hf: Mapping[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from either transformers 4 or 5 config layouts."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for where, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(f"{where}.rope_type={kind!r} is not supported (only plain RoPE, rope_type='default')")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return float(theta), float(partial)


def model_config_from_hf(hf: Mapping[str, Any], max_seq_len: int | None = None) -> ModelConfig:
    """Our `ModelConfig` from a Hugging Face config.json dict (qwen3, qwen3_moe, qwen3_next).

    `max_seq_len` caps the RoPE table (default: the checkpoint's max_position_embeddings).
    Raises ValueError naming the field for anything the model cannot reproduce exactly.
    """
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} is not supported; expected one of {sorted(ARCHITECTURES)}")
    if hf.get("attention_bias"):
        raise ValueError("attention_bias=True is not supported (our attention projections have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        raise ValueError("use_sliding_window=True (sliding_window attention) is not supported")
    if model_type == "qwen3_next" and hf.get("sliding_window"):
        raise ValueError(f"sliding_window={hf['sliding_window']} is not supported")
    theta, partial = _rope_settings(hf)

    n_layers = int(hf["num_hidden_layers"])
    n_heads = int(hf["num_attention_heads"])
    fields: dict[str, Any] = {
        "vocab_size": int(hf["vocab_size"]),
        "dim": int(hf["hidden_size"]),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads),
        "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
        "ffn_dim": int(hf["intermediate_size"]),
        "max_seq_len": int(max_seq_len or hf.get("max_position_embeddings", 2048)),
        "rope_theta": theta,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "qk_norm": True,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    if partial != 1.0 and model_type != "qwen3_next":
        raise ValueError(f"partial_rotary_factor={partial} is only supported for qwen3_next")

    if model_type in ("qwen3_moe", "qwen3_next"):
        n_experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)) or 0)
        if n_experts > 0:
            step = int(hf.get("decoder_sparse_step", 1) or 1)
            only_mlp = set(hf.get("mlp_only_layers") or [])
            dense = [i for i in range(n_layers) if i in only_mlp or (i + 1) % step != 0]
            shared = model_type == "qwen3_next"
            fields["moe"] = MoEConfig(
                n_experts=n_experts,
                top_k=int(hf["num_experts_per_tok"]),
                expert_ffn_dim=int(hf["moe_intermediate_size"]),
                n_shared_experts=1 if shared else 0,
                shared_expert_ffn_dim=int(hf.get("shared_expert_intermediate_size", 1) or 1) if shared else 1,
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                # Copied as is, though the losses differ in scale: HF's is top_k at balance and
                # averaged over layers; ours is 1 at balance and summed over layers (moe.py).
                aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)),
                dense_layers=dense,
            )

    if model_type == "qwen3_next":
        types = list(hf.get("layer_types") or [])
        interval = int(hf.get("full_attention_interval", 4))
        if types:
            if "full_attention" not in types:
                raise ValueError("layer_types has no full_attention layer; expected one every N layers")
            interval = types.index("full_attention") + 1
            expected = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
            if types != expected:
                raise ValueError(f"layer_types={types} is not a regular 'full attention every N layers' pattern")
        fields["hybrid"] = HybridConfig(
            full_attention_interval=interval,
            linear_num_key_heads=int(hf["linear_num_key_heads"]),
            linear_num_value_heads=int(hf["linear_num_value_heads"]),
            linear_key_head_dim=int(hf["linear_key_head_dim"]),
            linear_value_head_dim=int(hf["linear_value_head_dim"]),
            conv_kernel=int(hf.get("linear_conv_kernel_dim", 4)),
            partial_rotary_factor=partial,
        )
    return ModelConfig(**fields)


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json dict transformers needs for `cfg` (Qwen3, Qwen3-MoE or Qwen3-Next)."""
    if not cfg.qk_norm:
        raise ValueError("qk_norm=False cannot be exported: every Qwen3 variant normalises queries and keys")
    if cfg.hybrid is not None:
        model_type = "qwen3_next"
    elif cfg.moe is not None:
        model_type = "qwen3_moe"
    else:
        model_type = "qwen3"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.resolved_ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads this key
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": "float32",
    }
    if model_type == "qwen3":
        out.update(
            use_sliding_window=False,
            sliding_window=None,
            layer_types=["full_attention"] * cfg.n_layers,
            max_window_layers=cfg.n_layers,
        )
    if cfg.moe is not None:
        m = cfg.moe
        if model_type == "qwen3_moe" and m.n_shared_experts:
            raise ValueError(
                "moe.n_shared_experts=1 cannot be exported as Qwen3-MoE (it has no shared expert); "
                "set n_shared_experts=0, or use the hybrid (Qwen3-Next) layout"
            )
        if model_type == "qwen3_next" and not m.n_shared_experts:
            raise ValueError(
                "moe.n_shared_experts=0 cannot be exported as Qwen3-Next (its MoE blocks always have a shared expert)"
            )
        out.update(
            num_experts=m.n_experts,
            num_experts_per_tok=m.top_k,
            moe_intermediate_size=m.expert_ffn_dim,
            norm_topk_prob=m.norm_topk_prob,
            router_aux_loss_coef=m.aux_loss_weight,
            decoder_sparse_step=1,
            mlp_only_layers=sorted(m.dense_layers),
            output_router_logits=False,
        )
        if model_type == "qwen3_next":
            out["shared_expert_intermediate_size"] = m.shared_expert_ffn_dim
    elif model_type == "qwen3_next":
        out.update(
            num_experts=0,
            num_experts_per_tok=1,
            moe_intermediate_size=1,
            shared_expert_intermediate_size=1,
            mlp_only_layers=[],
            decoder_sparse_step=1,
        )
    if cfg.hybrid is not None:
        h = cfg.hybrid
        rope["partial_rotary_factor"] = h.partial_rotary_factor
        out.update(
            linear_num_key_heads=h.linear_num_key_heads,
            linear_num_value_heads=h.linear_num_value_heads,
            linear_key_head_dim=h.linear_key_head_dim,
            linear_value_head_dim=h.linear_value_head_dim,
            linear_conv_kernel_dim=h.conv_kernel,
            partial_rotary_factor=h.partial_rotary_factor,
            layer_types=[
                "full_attention" if (i + 1) % h.full_attention_interval == 0 else "linear_attention"
                for i in range(cfg.n_layers)
            ],
        )
    return out


# --------------------------------------------------------------------------- weights


def _is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    return cfg.moe is not None and i not in cfg.moe.dense_layers


def _is_linear_layer(cfg: ModelConfig, i: int) -> bool:
    return cfg.hybrid is not None and (i + 1) % cfg.hybrid.full_attention_interval != 0


def hf_to_ours(
    hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig, experts: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Rename and reshape a Hugging Face state dict into our GPT's parameter names.

    Keys we do not know raise (a silently dropped weight is a wrong model), except
    Qwen3-Next's multi-token-prediction head (`mtp.*`), which the GPT does not have.
    `experts` (first, count): only those routed experts of every MoE layer, as a rank under
    expert parallelism holds them; with a lazy `hf_sd` (read_hf_state) the others are never read.
    """
    src = {k for k in hf_sd if not k.startswith("mtp.")}
    used: set[str] = set()
    next_ = cfg.hybrid is not None
    # Qwen3-Next norms compute x_hat * (1 + w); ours compute x_hat * w.
    shift = 1.0 if next_ else 0.0

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise KeyError(f"checkpoint lacks {key}")
        used.add(key)
        return hf_sd[key]

    out: dict[str, torch.Tensor] = {
        "embed_tokens.weight": take("model.embed_tokens.weight"),
        "norm.weight": take("model.norm.weight").float() + shift,
    }
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
        used.add("lm_head.weight")  # some tied checkpoints still carry a copy
    else:
        out["lm_head.weight"] = take("lm_head.weight")

    hd = cfg.resolved_head_dim
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        out[o + "input_layernorm.weight"] = take(p + "input_layernorm.weight").float() + shift
        out[o + "post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight").float() + shift
        if _is_linear_layer(cfg, i):
            h = cfg.hybrid
            assert h is not None
            nk, nv = h.linear_num_key_heads, h.linear_num_value_heads
            dk, dv = h.linear_key_head_dim, h.linear_value_head_dim
            r = nv // nk
            a = p + "linear_attn."
            qkvz = take(a + "in_proj_qkvz.weight").reshape(nk, 2 * dk + 2 * r * dv, cfg.dim)
            q, k, v, z = torch.split(qkvz, [dk, dk, r * dv, r * dv], dim=1)
            ba = take(a + "in_proj_ba.weight").reshape(nk, 2 * r, cfg.dim)
            b, a_ = torch.split(ba, [r, r], dim=1)
            for name, w in (("q", q), ("k", k), ("v", v), ("z", z), ("b", b), ("a", a_)):
                out[o + f"attn.{name}_proj.weight"] = w.reshape(-1, cfg.dim)
            for name in ("conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight"):
                out[o + "attn." + name] = take(a + name)
        else:
            a = p + "self_attn."
            q = take(a + "q_proj.weight")
            if next_:
                # Per head: [query (hd rows), gate (hd rows)].
                q, g = q.reshape(cfg.n_heads, 2 * hd, cfg.dim).split([hd, hd], dim=1)
                q, g = q.reshape(-1, cfg.dim), g.reshape(-1, cfg.dim)
                out[o + "attn.g_proj.weight"] = g
            out[o + "attn.q_proj.weight"] = q
            for name in ("k_proj", "v_proj", "o_proj"):
                out[o + f"attn.{name}.weight"] = take(a + f"{name}.weight")
            for name in ("q_norm", "k_norm"):
                out[o + f"attn.{name}.weight"] = take(a + f"{name}.weight").float() + shift
        m = p + "mlp."
        if _is_moe_layer(cfg, i):
            moe = cfg.moe
            assert moe is not None
            out[o + "mlp.router.weight"] = take(m + "gate.weight")
            first, count = experts or (0, moe.n_experts)
            if m + "experts.gate_up_proj" in src:  # transformers 5 fused layout
                gate, up = take(m + "experts.gate_up_proj")[first : first + count].chunk(2, dim=1)
                down = take(m + "experts.down_proj")[first : first + count]
            else:
                used.update(
                    f"{m}experts.{e}.{w}.weight"
                    for e in range(moe.n_experts)
                    for w in ("gate_proj", "up_proj", "down_proj")
                )  # known, even when not read
                e_range = range(first, first + count)
                gate = torch.stack([take(f"{m}experts.{e}.gate_proj.weight") for e in e_range])
                up = torch.stack([take(f"{m}experts.{e}.up_proj.weight") for e in e_range])
                down = torch.stack([take(f"{m}experts.{e}.down_proj.weight") for e in e_range])
            out[o + "mlp.experts.gate_proj.weight"] = gate
            out[o + "mlp.experts.up_proj.weight"] = up
            out[o + "mlp.experts.down_proj.weight"] = down
            if moe.n_shared_experts:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    out[o + f"mlp.shared_expert.{name}.weight"] = take(m + f"shared_expert.{name}.weight")
                out[o + "mlp.shared_expert_gate.weight"] = take(m + "shared_expert_gate.weight")
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[o + f"mlp.{name}.weight"] = take(m + f"{name}.weight")
    unknown = sorted(set(src) - used)
    if unknown:
        raise ValueError(f"checkpoint has {len(unknown)} tensors this config does not use, e.g. {unknown[:5]}")
    return out


def ours_to_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_ours`: our state dict in Hugging Face's on-disk names and layout."""
    return dict(iter_hf_tensors(sd, cfg))


def iter_hf_tensors(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """`ours_to_hf` one tensor at a time, layer by layer, reading `sd` only as it goes: with a
    mapping that reads each tensor when asked (`checkpoint.ModelTensors`) a model larger than
    memory is converted a layer at a time."""
    next_ = cfg.hybrid is not None
    shift = 1.0 if next_ else 0.0
    if cfg.moe is not None and cfg.moe.balance == "aux_free":
        for k in [k for k in sd if k.endswith("mlp.expert_bias")]:
            v = sd[k]
            if bool(v.abs().max() > 0):
                raise ValueError(
                    f"{k} is nonzero (moe.balance='aux_free'): Hugging Face Qwen3 routers have no "
                    "selection bias, so the exported model would route differently"
                )

    def norm(key: str) -> torch.Tensor:
        w = sd[key]
        return (w.float() - shift).to(w.dtype)

    yield "model.embed_tokens.weight", sd["embed_tokens.weight"]
    yield "model.norm.weight", norm("norm.weight")
    if not cfg.tie_embeddings:
        yield "lm_head.weight", sd["lm_head.weight"]
    hd = cfg.resolved_head_dim
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        yield p + "input_layernorm.weight", norm(o + "input_layernorm.weight")
        yield p + "post_attention_layernorm.weight", norm(o + "post_attention_layernorm.weight")
        if _is_linear_layer(cfg, i):
            h = cfg.hybrid
            assert h is not None
            nk, r = h.linear_num_key_heads, h.linear_num_value_heads // h.linear_num_key_heads
            a = p + "linear_attn."
            part = {n: sd[o + f"attn.{n}_proj.weight"].reshape(nk, -1, cfg.dim) for n in "qkvzba"}
            yield a + "in_proj_qkvz.weight", torch.cat([part[n] for n in "qkvz"], dim=1).reshape(-1, cfg.dim)
            ba = torch.cat([part["b"], part["a"]], dim=1).reshape(-1, cfg.dim)
            assert ba.shape[0] == 2 * nk * r
            yield a + "in_proj_ba.weight", ba
            for name in ("conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight"):
                yield a + name, sd[o + "attn." + name]
        else:
            a = p + "self_attn."
            q = sd[o + "attn.q_proj.weight"]
            if next_:
                g = sd[o + "attn.g_proj.weight"]
                q = torch.cat([q.reshape(cfg.n_heads, hd, cfg.dim), g.reshape(cfg.n_heads, hd, cfg.dim)], dim=1)
                q = q.reshape(-1, cfg.dim)
            yield a + "q_proj.weight", q
            for name in ("k_proj", "v_proj", "o_proj"):
                yield a + f"{name}.weight", sd[o + f"attn.{name}.weight"]
            for name in ("q_norm", "k_norm"):
                yield a + f"{name}.weight", norm(o + f"attn.{name}.weight")
        m = p + "mlp."
        if _is_moe_layer(cfg, i):
            assert cfg.moe is not None
            yield m + "gate.weight", sd[o + "mlp.router.weight"]
            # Per-expert Linears: the layout published checkpoints use, which every
            # transformers version reads (5.x fuses them itself on load).
            for name in ("gate_proj", "up_proj", "down_proj"):
                stacked = sd[o + f"mlp.experts.{name}.weight"]
                for e in range(cfg.moe.n_experts):
                    yield f"{m}experts.{e}.{name}.weight", stacked[e]
            if cfg.moe.n_shared_experts:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    yield m + f"shared_expert.{name}.weight", sd[o + f"mlp.shared_expert.{name}.weight"]
                yield m + "shared_expert_gate.weight", sd[o + "mlp.shared_expert_gate.weight"]
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                yield m + f"{name}.weight", sd[o + f"mlp.{name}.weight"]


# --------------------------------------------------------------------------- files


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return [os.path.join(path, f) for f in files]


class _LazyTensors(Mapping):
    """The tensors of safetensors files by name, each read when it is asked for (memory-mapped
    files: nothing is loaded whole)."""

    def __init__(self, files: list[str]):
        self._file: dict[str, str] = {}
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                self._file.update(dict.fromkeys(f.keys(), file))

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(self._file[key], framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)


def read_hf_state(
    path: str, max_seq_len: int | None = None, experts: tuple[int, int] | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(state dict in our names, model config) of a Hugging Face Qwen3 / Qwen3-MoE / Qwen3-Next
    directory: config.json and the safetensors (one file, or shards with an index), each tensor
    read as it is converted. `experts`: see hf_to_ours."""
    with open(os.path.join(path, HF_CONFIG)) as f:
        hf_cfg = json.load(f)
    cfg = model_config_from_hf(hf_cfg, max_seq_len=max_seq_len)
    return hf_to_ours(_LazyTensors(_safetensors_files(path)), cfg, experts), cfg


def load_hf_checkpoint(
    path: str, dtype: torch.dtype = torch.float32, max_seq_len: int | None = None, device: str | torch.device = "cpu"
) -> tuple[GPT, ModelConfig]:
    """Build our GPT from a Hugging Face Qwen3 / Qwen3-MoE / Qwen3-Next directory.

    The model is built on the meta device and the checkpoint's tensors are assigned to it,
    so memory holds one copy of the weights, not two.
    """
    sd, cfg = read_hf_state(path, max_seq_len)
    return model_from_state_dict(sd, cfg, dtype=dtype, device=device), cfg


def model_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    ternary=None,
) -> GPT:
    """A GPT holding `sd` (our names), built without a throwaway random initialisation: the
    tensors of `sd` become its parameters (no copy when they already have that dtype and
    device). `ternary`: a TernaryConfig, for a ternary run's weights (BitLinear, ramp 1)."""
    with torch.device("meta"):
        model = GPT(cfg)
    if ternary is not None:
        apply_ternary(model, ternary, ramp=1.0)
    full = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    # Persistent buffers Hugging Face does not know (the aux-free router bias) start at zero.
    for name, buf in model.state_dict().items():
        if name not in full:
            full[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    if cfg.tie_embeddings:
        full["lm_head.weight"] = full["embed_tokens.weight"]
    model.load_state_dict(full, strict=True, assign=True)
    model.finish_assigned(device)
    if ternary is not None:
        set_ramp(model, 1.0)  # the ramp buffers were zeroed with the other non-persistent ones
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover[:5]}")
    return model


def export_hf(
    model: GPT, cfg: ModelConfig, out_dir: str, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3
) -> None:
    """Write `out_dir/config.json` and safetensors that `AutoModelForCausalLM.from_pretrained` loads.

    Shards (with model.safetensors.index.json) when the weights exceed `max_shard_bytes`.
    `dtype` casts the weights (default: as they are).
    """
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    write_hf(iter_hf_tensors(sd, cfg), cfg, out_dir, dtype, max_shard_bytes)


def write_hf(
    tensors: Iterable[tuple[str, torch.Tensor]],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """config.json and the weights of Hugging Face names `tensors` (`iter_hf_tensors`) into `out_dir`,
    holding at most one shard in memory: shards of up to `max_shard_bytes` are written as they
    fill, then named model-NNNNN-of-NNNNN.safetensors beside model.safetensors.index.json (one
    shard: model.safetensors). `dtype` casts the weights (default: as they are)."""
    hf_cfg = hf_config_from_model(cfg)  # first: a model Hugging Face has no layout for fails before any writing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    first_dtype: torch.dtype | None = None

    def flush() -> None:
        nonlocal shard, size
        if shard:
            save_file(shard, str(out / f"part-{len(parts):05d}.safetensors"), metadata={"format": "pt"})
            parts.append(sorted(shard))
            shard, size = {}, 0

    for name, t in tensors:
        # safetensors refuses shared or strided storage: each tensor gets its own contiguous copy.
        t = (t.detach().to(dtype) if dtype else t.detach()).to("cpu").contiguous().clone()
        first_dtype = first_dtype or t.dtype
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    hf_cfg["dtype"] = str(first_dtype).removeprefix("torch.")
    (out / HF_CONFIG).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    if len(parts) == 1:
        os.replace(out / "part-00000.safetensors", out / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for n, names in enumerate(parts):
        final = f"model-{n + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(out / f"part-{n:05d}.safetensors", out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
