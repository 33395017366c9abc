"""Model directories and atomic checkpoints, and loading a trained model back.

The run directory's layout (`checkpoint.dir`: step checkpoints, final/, logs) is
`contract.RunLayout`, which the operator reads too. A checkpoint is written into a temporary
sibling directory, every file fsynced, and then renamed into place, so a directory named
`step_*` is always complete: a crash mid-write leaves only a `.tmp-*` directory that the next
save removes.

    tmp = begin_sharded(layout.step(step))                 # rank 0; every rank then writes its shards
    publish_sharded(tmp, cfg, tok, train_state)            # rank 0, once all ranks are done
    model, tokenizer, cfg = load_model("runs/demo")        # newest of final/ or step_*

A model directory holds its weights whole (`model.safetensors`: best/, final/ of a replicated
model) or sharded (step checkpoints, final/ of an FSDP2 or expert parallel model: the
torch.distributed.checkpoint files each rank wrote, `parallel/state.py`); every reader here
takes both.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from .config import TrainerConfig
from .contract import MODEL_CONFIG, MODEL_WEIGHTS, SHARDED_INDEX, TRAIN_STATE, RunLayout
from .files import fsync_dir
from .models.gpt import GPT
from .models.moe import held_expert_rows
from .models.ternary import apply_ternary
from .models.ternary_pack import load_packed_model, module_weights, read_packed_metadata
from .tokenizer import Tokenizer, load_tokenizer


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(path)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a fully written temporary directory into place, replacing an older one."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.with_name(final.name + f".old-{secrets.token_hex(4)}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_dir(final.parent)


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


def clear_leftovers(target: Path, temporaries: str) -> None:
    """Before a publish of `target` by its only writer (the run's rank 0): remove what killed ones
    left, the temporaries (`temporaries`, a glob in target's folder) and replaced copies
    (`.old-*`). A publish killed between its two renames left no `target`: its replaced copy, a
    complete model (and the one best.json still names), goes back first: the one set aside last
    (a rename stamps its ctime)."""
    olds = sorted(target.parent.glob(f"{target.name}.old-*"), key=lambda p: p.stat().st_ctime)
    if olds and not target.exists():
        olds.pop().rename(target)
    for stale in [*olds, *target.parent.glob(temporaries)]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def save_weights(out_dir: str | os.PathLike, model: torch.nn.Module, cfg: TrainerConfig, tokenizer) -> Path:
    """Write a self-contained model directory (weights, config, tokenizer) atomically."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(out, f"{out.name}.tmp-*")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir()
    _write_weights(tmp, model.state_dict(), cfg, tokenizer)
    publish_dir(tmp, out)
    return out


def begin_sharded(target: Path) -> Path:
    """The empty temporary sibling of model directory `target` (a step checkpoint, final/) that
    every rank writes its shards into. Rank 0 makes it, after removing what an interrupted save
    of the same kind left (any step's, for a step checkpoint)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(target, "*.tmp-*" if RunLayout.step_of(target) is not None else f"{target.name}.tmp-*")
    # A random suffix, not the pid: the ranks that write into it are other processes, maybe on other nodes.
    tmp = target.with_name(f"{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    return tmp


def publish_sharded(
    tmp: Path, cfg: TrainerConfig, tokenizer: Tokenizer, train_state: dict[str, Any] | None = None
) -> Path:
    """Complete `tmp` (every rank's shards written) with the config, the tokenizer and, for a step
    checkpoint, the train state, and rename it into place. Rank 0, once every rank is done."""
    if not is_sharded(tmp):
        raise RuntimeError(f"{tmp}: no {SHARDED_INDEX}, the shards are incomplete; not publishing it")
    (tmp / MODEL_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tokenizer.save(tmp)
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    target = tmp.with_name(tmp.name.split(".tmp-")[0])
    publish_dir(tmp, target)
    return target


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Remove all but the newest `keep` step checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# Set-aside earlier runs kept in a run directory: every retry of a run that must not resume sets
# its previous attempt aside, and a preempted run is retried without end; older ones are removed.
EARLIER_KEPT = 2


def set_aside_earlier_run(layout: RunLayout[Path], stamp: str) -> Path | None:
    """For a run that must not resume (checkpoint.resume: false) in a directory an earlier run
    trained in: move that run's checkpoints, best and final models and logs into
    `<run>/earlier-<stamp>/` (the newest EARLIER_KEPT such folders are kept). Left in place, its
    checkpoints (higher steps) would win every prune over the new run's, and be what a later
    resume picks; its best.json would be the score to beat; its log would run on into the new
    one. The tokenizer and the teacher's cache stay: inputs, not results. Returns where they went
    (None: nothing there)."""
    earlier = [layout.checkpoints, layout.best, layout.best_record, layout.final, layout.packed_ternary]
    earlier += [layout.log, layout.expert_load]
    present = [p for p in earlier if p.exists()]
    if not present:
        return None
    aside = layout.root / f"earlier-{stamp}"
    n = 1
    while aside.exists():  # two starts within the stamp's second
        n += 1
        aside = layout.root / f"earlier-{stamp}-{n}"
    aside.mkdir()
    for path in present:
        os.replace(path, aside / path.name)
    for old in sorted(layout.root.glob("earlier-*"), key=lambda p: p.stat().st_ctime)[:-EARLIER_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(layout.root)
    return aside


def is_sharded(model_dir: Path) -> bool:
    """Whether a model directory holds its weights as torch.distributed.checkpoint shards."""
    return (model_dir / SHARDED_INDEX).is_file()


def read_train_state(step_dir: Path) -> dict[str, Any]:
    """A step checkpoint's train state (memory-mapped: a whole checkpoint's optimizers may be large)."""
    return torch.load(step_dir / TRAIN_STATE, map_location="cpu", weights_only=False, mmap=True)


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
    if (p / MODEL_WEIGHTS).is_file() or is_sharded(p):
        return p
    final = RunLayout(p).final
    if (final / MODEL_WEIGHTS).is_file() or is_sharded(final):
        return final
    newest = latest_checkpoint(p)
    if newest is not None:
        return newest
    raise ValueError(
        f"checkpoint={str(path)!r}: no model weights there ({MODEL_WEIGHTS}, or a sharded checkpoint's "
        f"{SHARDED_INDEX}), nor final/ or checkpoints/step_*"
    )


def read_weights(model: torch.nn.Module, model_dir: Path) -> dict[str, torch.Tensor]:
    """A model directory's weights as a state dict for `model`. Each expert weight that expert
    parallelism split is kept as this rank's rows alone, so no rank keeps all of an MoE's experts
    (a whole file is sliced by safetensors; a sharded one is read a tensor at a time and cut)."""
    rows = held_expert_rows(model)
    sd = {}
    with ModelTensors(model_dir) as tensors:
        for k in tensors:
            if k in rows:
                first, n = rows[k]
                sd[k] = tensors.rows(k, first, n)
            else:
                sd[k] = tensors[k]
    return sd


def read_checkpoint(model: torch.nn.Module, step_dir: Path) -> dict[str, Any]:
    """A whole (earlier versions') step checkpoint for `model` to resume from
    (`train.trainer.Trainer.resume`): its train state and "model", the weights (this rank's
    expert rows only)."""
    return {**read_train_state(step_dir), "model": read_weights(model, step_dir)}


class _IndexOnce(dcp.FileSystemReader):
    """A reader that reads DCP's index once: every per-tensor load would read it again, and a step
    checkpoint's index lists every optimizer entry too."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if not hasattr(self, "_index"):
            self._index = super().read_metadata(*args, **kwargs)
        return self._index


class ModelTensors(Mapping[str, torch.Tensor]):
    """A model directory's weights by name, each read when asked for, one at a time (a model
    larger than memory is read tensor by tensor): a safetensors file or sharded DCP files.

        with ModelTensors(model_dir) as tensors:
            for name in tensors: ... tensors[name] ...
    """

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        self._file = None
        if is_sharded(model_dir):
            self._reader = _IndexOnce(str(model_dir))
            meta = self._reader.read_metadata().state_dict_metadata
            # Model tensors are stored as "model.<name>"; optimizer states beside them are not weights.
            self._shapes = {
                k.removeprefix("model."): (m.size, m.properties.dtype)
                for k, m in meta.items()
                if k.startswith("model.") and hasattr(m, "size")
            }
        else:
            self._file = safe_open(str(model_dir / MODEL_WEIGHTS), framework="pt")
            self._shapes = {k: None for k in self._file.keys()}

    def __enter__(self) -> ModelTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file = None

    def __len__(self) -> int:
        return len(self._shapes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        if self._file is not None:
            return self._file.get_tensor(name)
        size, dtype = self._shapes[name]
        t = torch.empty(size, dtype=dtype)
        # no_dist: one process reads on its own, also inside a torchrun job (init_from, the parent).
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: it does
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": {name: t}}, storage_reader=self._reader, no_dist=True)
        return t

    def rows(self, name: str, first: int, n: int) -> torch.Tensor:
        """Rows [first, first + n) of a tensor (an expert slice); a safetensors file reads only those."""
        if self._file is not None:
            return self._file.get_slice(name)[first : first + n]
        return self[name][first : first + n].clone()


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
    model = load_packed_model(path, device=device, cache_unpacked=_unpack_once(header, torch.device(device)))
    return model, load_tokenizer(path.parent), cfg


def _unpack_once(header: dict[str, Any], device: torch.device) -> bool:
    """Keep each packed layer's weights unpacked after its first forward (fast generation) unless
    that would take more than a quarter of the device's memory (the GPU's, or the host's): then
    they are unpacked per forward, and the 1.6-bit codes stay the only copy (qwen3-hybrid: 16 GB
    packed, 160 GB unpacked)."""
    n = sum(module_weights(m) for m in header["modules"].values())
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return n * 2 <= memory // 4


def read_config(model_dir: Path) -> TrainerConfig:
    """The TrainerConfig that made a model directory's weights."""
    return TrainerConfig.model_validate(yaml.safe_load((model_dir / MODEL_CONFIG).read_text()))
