"""Ternary packing: model memory against bf16, and greedy-generation speed from packed weights.

    .venv/bin/python bench/ternary_memory.py                        # tiny preset, auto device
    .venv/bin/python bench/ternary_memory.py --preset nano-125M --tokens 16
    .venv/bin/python bench/ternary_memory.py --preset nano-1B --no-gen   # memory only, on meta

Memory is counted on the meta device (no weights allocated) with the default
TernaryConfig: ternary layers at ceil(n/5) bytes + one fp32 scale (MoE experts: that per
expert), everything else bf16, tied tensors once. With generation on, the packed model is also built for real,
saved with save_packed and its file size printed.

Generation: batch `--batch`, prompt of `--prompt-len` random tokens, then `--tokens`
greedy steps with the KV cache (`logits = model(ids, cache=cache)`, feed the argmax),
for four variants of the same random weights: dense nn.Linear, BitLinear (unpacked QAT
modules, re-quantizing every step), PackedBitLinear unpacking on every forward, and
PackedBitLinear with the unpacked weight cached. Weights are random: the figures are
speed, not quality. bf16 on CUDA, float32 on CPU. Prints figures, asserts nothing
except that the packed variants produce the same tokens as BitLinear.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "trainer_image"))

from nanochat_trainer.config import PRESETS, ModelConfig, TernaryConfig, TrainerConfig  # noqa: E402
from nanochat_trainer.models.gpt import GPT  # noqa: E402
from nanochat_trainer.models.ternary import BitStackedLinear, TernaryLayer, apply_ternary  # noqa: E402
from nanochat_trainer.models.ternary_pack import save_packed, to_packed_inference  # noqa: E402


def unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def memory_figures(cfg: ModelConfig, tcfg: TernaryConfig) -> dict[str, float]:
    """Bytes of the bf16 model and of the packed one, from a meta-device model."""
    with torch.device("meta"):
        model = GPT(cfg)
    apply_ternary(model, tcfg)
    tern = {id(m.weight): m for m in model.modules() if isinstance(m, TernaryLayer)}
    bf16 = packed = n_tern = n_total = 0
    for _, p in unique_params(model):
        n = p.numel()
        n_total += n
        bf16 += 2 * n
        if id(p) in tern:
            n_tern += n
            # A stack of experts is packed expert by expert, each with its own fp32 scale.
            experts = p.shape[0] if isinstance(tern[id(p)], BitStackedLinear) else 1
            packed += experts * (math.ceil(n // experts / 5) + 4)
        else:
            packed += 2 * n
    return {
        "params": n_total,
        "ternary_params": n_tern,
        "bf16_bytes": bf16,
        "packed_bytes": packed,
        "ternary_bf16_bytes": 2 * n_tern,
        "ternary_packed_bytes": packed - 2 * (n_total - n_tern),
    }


def module_bytes(model: nn.Module) -> int:
    """Bytes of unique parameters and persistent buffers actually held by `model`."""
    total = sum(p.numel() * p.element_size() for _, p in unique_params(model))
    return total + sum(
        t.numel() * t.element_size()
        for k, t in model.state_dict().items()
        if k.endswith(("weight_packed", "weight_scale"))
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(model: GPT, prompt: torch.Tensor, tokens: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """(generated ids, tokens/s over the decode steps) of a KV-cached greedy loop."""
    cache = model.new_cache(prompt.size(0), prompt.size(1) + tokens + 1)
    logits = model(prompt, cache=cache)[:, -1]
    out = []
    sync(device)
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
        logits = model(tok, cache=cache)[:, -1]
    sync(device)
    dt = time.perf_counter() - t0
    return torch.cat(out, 1), prompt.size(0) * tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--tokens", type=int, default=64, help="greedy decode steps")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-gen", action="store_true", help="memory figures only (meta device)")
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = TrainerConfig.model_validate({"preset": args.preset}).model
    tcfg = TernaryConfig()
    mem = memory_figures(cfg, tcfg)
    mib = 2**20
    print(
        f"preset {args.preset}: {mem['params'] / 1e6:.2f}M params, {mem['ternary_params'] / 1e6:.2f}M ternary "
        f"({100 * mem['ternary_params'] / mem['params']:.1f}%; include={tcfg.include})"
    )
    print(f"  bf16 model            {mem['bf16_bytes'] / mib:9.2f} MiB")
    print(
        f"  packed model          {mem['packed_bytes'] / mib:9.2f} MiB  "
        f"({mem['bf16_bytes'] / mem['packed_bytes']:.2f}x smaller; non-ternary tensors stay bf16)"
    )
    print(
        f"  ternary layers: bf16 {mem['ternary_bf16_bytes'] / mib:.2f} MiB -> packed "
        f"{mem['ternary_packed_bytes'] / mib:.2f} MiB "
        f"({8 * mem['ternary_packed_bytes'] / mem['ternary_params']:.3f} bits/weight)"
    )
    if args.no_gen:
        return

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    dense = GPT(cfg)
    with torch.no_grad():  # random weights everywhere (init_weights zeroes some matrices)
        for _, p in dense.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    dense = dense.to(device=device, dtype=dtype).eval()
    bit = copy.deepcopy(dense)
    apply_ternary(bit, tcfg)
    packed = copy.deepcopy(bit)
    to_packed_inference(packed, cache_unpacked=False)
    cached = copy.deepcopy(bit)
    to_packed_inference(cached, cache_unpacked=True)

    with tempfile.TemporaryDirectory() as tmp:
        info = save_packed(
            bit, cfg.model_dump(), os.path.join(tmp, "m.safetensors"), dtype=torch.bfloat16, verbose=False
        )
    print(
        f"  save_packed file      {info['file_bytes'] / mib:9.2f} MiB  "
        f"({info['bits_per_ternary_weight']:.3f} bits/ternary weight, bf16 elsewhere)"
    )
    print(
        f"  held in memory ({dtype}): dense {module_bytes(dense) / mib:.2f} MiB, "
        f"packed {module_bytes(packed) / mib:.2f} MiB"
    )

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"generation on {name}, {dtype}, batch {args.batch}, prompt {args.prompt_len}, {args.tokens} tokens:")
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), device=device)
    results = {}
    for label, model in (
        ("dense nn.Linear", dense),
        ("BitLinear (unpacked)", bit),
        ("packed, unpack per step", packed),
        ("packed, cached unpack", cached),
    ):
        # Warm-up over the same lengths: CPU kernels are set up per shape, and the KV length
        # grows every step, so a short warm-up left the first variant 20x slow.
        greedy(model, prompt, args.tokens, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        toks, tps = greedy(model, prompt, args.tokens, device)
        peak = f", peak {torch.cuda.max_memory_allocated(device) / mib:.0f} MiB" if device.type == "cuda" else ""
        results[label] = toks
        print(f"  {label:26s} {tps:10.1f} tok/s{peak}")
    same = torch.equal(results["BitLinear (unpacked)"], results["packed, unpack per step"]) and torch.equal(
        results["BitLinear (unpacked)"], results["packed, cached unpack"]
    )
    print(f"  packed tokens == BitLinear tokens: {same}")


if __name__ == "__main__":
    main()
