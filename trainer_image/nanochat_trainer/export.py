"""Offline exports of a trained model: a Hugging Face directory, or the packed ternary file.

    nanochat export runs/r1 --hf runs/r1/hf                  # what vLLM and transformers load
    nanochat export runs/r1 --ternary runs/r1/model.ternary.safetensors

The source is a model directory or a run directory (final/, else its newest complete step
checkpoint), its weights whole or sharded (`checkpoint.py`). The Hugging Face export is read and
written a tensor at a time (`checkpoint.ModelTensors`, `hf_adapter.iter_hf_tensors`), holding one
output shard at most, so a model larger than the host's memory exports on one machine. It is
written into a temporary sibling and renamed into place, and records its source: asked again for
the same source it says so and writes nothing (an EvalRun's pod runs it before every serving).
What it replaces is only ever an earlier export: any other file or folder there (the run itself, a
place where the export would be taken for the run's model) is refused, naming --hf or --ternary.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ModelTensors, is_sharded, publish_dir, read_config, resolve_model_dir
from .contract import MODEL_WEIGHTS, SHARDED_INDEX, RunLayout
from .errors import ConfigError
from .models.gpt import GPT
from .models.hf_adapter import iter_hf_tensors, write_hf
from .models.ternary import apply_ternary
from .models.ternary_pack import read_packed_metadata, save_packed
from .tokenizer import load_tokenizer

SOURCE_RECORD = "nanochat_export.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_hf_dir(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16") -> bool:
    """Write the Hugging Face directory of `src`'s model into `out`: config.json, the weights
    (sharded at 5 GB), the tokenizer, generation_config.json. Returns False when `out` already
    holds this export (same source files, same dtype) and nothing was written."""
    model_dir = resolve_model_dir(src)
    cfg = read_config(model_dir)
    if cfg.stage == "ternary":
        raise ConfigError(
            "--hf",
            str(src),
            "a ternary model's Hugging Face export would hold its latent full-precision weights, not the "
            "ternary ones it was trained to use; export it with --ternary",
        )
    out = Path(out)
    _check_hf_target(Path(src), model_dir, out)
    source = _source_record(model_dir, dtype)
    if _recorded(out) == source:
        return False
    # A random suffix, not the pid: the exporter is pid 1 in every pod, and two pods may export at once.
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tokenizer = load_tokenizer(model_dir)
    with ModelTensors(model_dir) as tensors:
        write_hf(iter_hf_tensors(tensors, cfg.model), cfg.model, tmp, DTYPES[dtype])
    tokenizer.save_hf(tmp, model_max_length=cfg.model.max_seq_len)
    generation = {"eos_token_id": tokenizer.eot_id, "bos_token_id": tokenizer.eot_id, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (tmp / SOURCE_RECORD).write_text(json.dumps(source, indent=2))
    publish_dir(tmp, out)
    return True


def export_ternary(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """The packed ternary file (`models/ternary_pack.py`, bf16 beside the packed codes) of a
    ternary run's model, packed a tensor at a time: what it holds at most is the packed file's
    contents (16 GB for qwen3-hybrid) and one latent weight."""
    model_dir = resolve_model_dir(src)
    cfg = read_config(model_dir)
    if cfg.stage != "ternary" or cfg.ternary is None:
        raise ConfigError("--ternary", str(src), f"a ternary run's model is packed; this one is stage {cfg.stage!r}")
    with torch.device("meta"):  # which modules are ternary, and their shapes; no memory
        model = GPT(cfg.model)
    apply_ternary(model, cfg.ternary, ramp=1.0)
    _check_ternary_target(Path(out))
    with ModelTensors(model_dir) as weights:
        return save_packed(model, cfg.model.model_dump(mode="json"), out, dtype=torch.bfloat16, weights=weights)


def _check_hf_target(src: Path, model_dir: Path, out: Path) -> None:
    """Refuse an --hf directory whose replacement would lose data: publishing renames whatever is
    there aside and deletes it, so only an earlier export (or nothing) may be there."""
    target, model = out.resolve(), model_dir.resolve()
    for source in (src.resolve(), model):
        if target == source or target in source.parents:
            raise ConfigError("--hf", str(out), f"holds the model it exports ({source}); name a new directory")
    if model in target.parents:
        raise ConfigError("--hf", str(out), "inside the model directory, which training replaces whole")
    run = _run_of(model)
    if run is not None and _taken_for_checkpoint(RunLayout(run), target):
        # An export writes model.safetensors, so in these places it would be loaded as the run's model.
        raise ConfigError("--hf", str(out), f"a checkpoint's place in run {run}; export to {RunLayout(run).hf()}")
    if out.exists() and not out.is_dir():
        raise ConfigError("--hf", str(out), "is a file; an export is a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / SOURCE_RECORD).is_file():
        raise ConfigError("--hf", str(out), f"holds files but no earlier export ({SOURCE_RECORD}); it would be deleted")


def _run_of(model_dir: Path) -> Path | None:
    # final/, best/ or checkpoints/step_N of a run directory; None for a model directory elsewhere.
    if model_dir.parent.name == "checkpoints" and RunLayout.step_of(model_dir) is not None:
        return model_dir.parent.parent
    if model_dir.name in ("final", "best"):
        return model_dir.parent
    return None


def _taken_for_checkpoint(layout: RunLayout[Path], target: Path) -> bool:
    return target in (layout.final, layout.best) or layout.checkpoints == target or layout.checkpoints in target.parents


def _check_ternary_target(out: Path) -> None:
    """Refuse a --ternary path whose replacement would lose data: only an earlier packed file may be there."""
    if out.is_dir():
        raise ConfigError("--ternary", str(out), "is a directory; the packed export is one file")
    if not out.exists():
        return
    try:
        read_packed_metadata(out)
    except Exception as e:  # any unreadable file: not ours to replace
        raise ConfigError("--ternary", str(out), "exists and is not a packed ternary file; it would be replaced") from e


def _source_record(model_dir: Path, dtype: str) -> dict[str, Any]:
    # The weights' index file is replaced (renamed into place) whenever the model directory is rewritten.
    index = model_dir / (SHARDED_INDEX if is_sharded(model_dir) else MODEL_WEIGHTS)
    stat = index.stat()
    return {"source": str(model_dir.resolve()), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size, "dtype": dtype}


def _recorded(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return None
