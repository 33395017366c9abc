"""Model directories and atomic checkpoints, and loading a trained model back.

The run directory's layout (`checkpoint.dir`: step checkpoints, final/, logs) is
`contract.RunLayout`, which the operator reads too. A checkpoint is written into a temporary
sibling directory, every file fsynced, and then renamed into place, so a directory named
`step_*` is always complete: a crash mid-write leaves only a `.tmp-*` directory that the next
save removes.

    model, tokenizer, cfg = load_model("runs/demo")        # newest of final/ or step_*
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from .config import TrainerConfig
from .contract import MODEL_CONFIG, MODEL_WEIGHTS, TRAIN_STATE, RunLayout
from .models.gpt import GPT
from .models.moe import held_expert_rows
from .models.ternary import apply_ternary
from .models.ternary_pack import load_packed_model, read_packed_metadata
from .tokenizer import Tokenizer, load_tokenizer


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a fully written temporary directory into place, replacing an older one."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def _write_weights(out: Path, model_sd: dict[str, torch.Tensor], cfg: TrainerConfig, tokenizer) -> None:
    # safetensors refuses shared storage (tied embeddings): store each tensor once, contiguous.
    seen: dict[int, str] = {}
    tensors = {}
    for name, t in model_sd.items():
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen and t.shape == model_sd[seen[key]].shape:
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(out / MODEL_WEIGHTS))
    (out / MODEL_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tokenizer.save(out)


def save_weights(out_dir: str | os.PathLike, model: torch.nn.Module, cfg: TrainerConfig, tokenizer) -> Path:
    """Write a self-contained model directory (weights, config, tokenizer) atomically."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_weights(tmp, model.state_dict(), cfg, tokenizer)
    _publish(tmp, out)
    return out


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_sd: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    cfg: TrainerConfig,
    tokenizer: Tokenizer,
    keep: int,
) -> Path:
    """Write checkpoint `step` (weights + optimizer/schedule/data/RNG state) and prune old ones."""
    layout = RunLayout(Path(run_dir))
    layout.checkpoints.mkdir(parents=True, exist_ok=True)
    for stale in layout.checkpoints.glob("*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = layout.step(step)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    _write_weights(tmp, model_sd, cfg, tokenizer)
    torch.save(train_state, tmp / TRAIN_STATE)
    _publish(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    ckpts = RunLayout(Path(run_dir)).checkpoints
    if not ckpts.is_dir():
        return []
    steps = {p: RunLayout.step_of(p) for p in ckpts.iterdir() if p.is_dir()}
    return sorted((p for p, step in steps.items() if step is not None), key=lambda p: steps[p])


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory from a model dir itself, or a run dir (final/, else newest step)."""
    p = Path(path)
    if (p / MODEL_WEIGHTS).is_file():
        return p
    final = RunLayout(p).final
    if (final / MODEL_WEIGHTS).is_file():
        return final
    newest = latest_checkpoint(p)
    if newest is not None:
        return newest
    raise ValueError(f"checkpoint={str(path)!r}: no model.safetensors there, nor final/ or checkpoints/step_*")


def read_weights(model: torch.nn.Module, model_dir: Path) -> dict[str, torch.Tensor]:
    """model_dir/model.safetensors as a state dict for `model`. Each expert weight that expert
    parallelism split is read as this rank's rows alone (safetensors slices the file), so no
    rank loads all of an MoE's experts."""
    rows = held_expert_rows(model)
    sd = {}
    with safe_open(str(model_dir / MODEL_WEIGHTS), framework="pt") as f:
        for k in f.keys():
            if k in rows:
                first, n = rows[k]
                sd[k] = f.get_slice(k)[first : first + n]
            else:
                sd[k] = f.get_tensor(k)
    return sd


def read_checkpoint(model: torch.nn.Module, step_dir: Path) -> dict[str, Any]:
    """A step checkpoint for `model` to resume from (`train.trainer.Trainer.load_state_dict`): its
    train state, memory-mapped so each rank reads only the parts it keeps, and "model", the weights
    (this rank's expert rows only)."""
    state = torch.load(step_dir / TRAIN_STATE, map_location="cpu", weights_only=False, mmap=True)
    return {**state, "model": read_weights(model, step_dir)}


def load_state_into(model: GPT, model_dir: Path) -> None:
    """Load weights into a built model; a different architecture is a clear error."""
    sd = read_weights(model, model_dir)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not _is_tied_alias(model, k)]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (
            (missing and f"missing {missing[:3]}")
            or (unexpected and f"unexpected {unexpected[:3]}")
            or f"shape mismatch on {wrong[:3]}"
        )
        raise ValueError(f"checkpoint={str(model_dir)!r}: weights do not fit this architecture ({detail})")
    model.load_state_dict(sd, strict=False)


def _is_tied_alias(model: GPT, key: str) -> bool:
    return key == "lm_head.weight" and model.cfg.tie_embeddings


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Any, TrainerConfig]:
    """(model in eval mode, tokenizer, trainer config) from a model or run directory, or a packed ternary file."""
    if Path(path).is_file():
        return _load_packed(Path(path), device)
    model_dir = resolve_model_dir(path)
    cfg = read_config(model_dir)
    model = GPT(cfg.model)
    if cfg.stage == "ternary" and cfg.ternary is not None:
        apply_ternary(model, cfg.ternary, ramp=1.0)
    load_state_into(model, model_dir)
    tokenizer = load_tokenizer(model_dir)
    return model.to(device).eval(), tokenizer, cfg


def _load_packed(path: Path, device: str | torch.device) -> tuple[GPT, Any, TrainerConfig]:
    """A ternary run's packed export (<run>/model.ternary.safetensors), served from packed weights."""
    try:
        header = read_packed_metadata(path)
    except Exception as e:  # not a safetensors file, or not one of ours
        raise ValueError(f"checkpoint={str(path)!r}: not a packed ternary model ({e})") from None
    final = RunLayout(path.parent).final
    if (final / MODEL_CONFIG).is_file():
        cfg = read_config(final)
    else:
        cfg = TrainerConfig.model_validate({"stage": "ternary", "model": header["model_config"]})
    model = load_packed_model(path, device=device, cache_unpacked=True)
    return model, load_tokenizer(path.parent), cfg


def read_config(model_dir: Path) -> TrainerConfig:
    """The TrainerConfig that made a model directory's weights."""
    return TrainerConfig.model_validate(yaml.safe_load((model_dir / MODEL_CONFIG).read_text()))
