"""The training loop on CPU: loss falls, resume is exact, 2-process DDP matches 1 process."""

from __future__ import annotations

import collections
import gc
import json
import shutil

import pytest
import torch
from prometheus_client import generate_latest
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat_operator.progress import Progress, parse_trainer_metrics
from nanochat_trainer.checkpoint import is_sharded, list_checkpoints
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.contract import RunLayout
from nanochat_trainer.data.feed import TensorFeed
from nanochat_trainer.errors import ConfigError
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.parallel.apply import compiles, wrap_model
from nanochat_trainer.parallel.distributed import Env
from nanochat_trainer.parallel.state import load_sharded
from nanochat_trainer.train import train
from nanochat_trainer.train.metrics import TrainerMetrics
from nanochat_trainer.train.optim import build_optimizers
from nanochat_trainer.train.trainer import Trainer

from micro import MICRO, MOE, losses, micro_cfg, read_log, torchrun, weights


def test_loss_falls(tmp_path):
    train(micro_cfg(tmp_path, steps=40))
    log = losses(tmp_path)
    assert log[40] < log[1] - 1.5, log
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_resume_matches_uninterrupted(tmp_path):
    full = tmp_path / "full"
    train(micro_cfg(full, steps=12, checkpoint={"every": 6}))
    part = tmp_path / "part"
    train(micro_cfg(part, steps=6, checkpoint={"every": 6}))
    # The "interrupted" run: same config but 12 steps, resuming from its step-6 checkpoint.
    train(micro_cfg(part, steps=12, checkpoint={"every": 6}))
    a, b = losses(full), losses(part)
    for step in range(7, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    # The full run's step-6 checkpoint was taken with step 7's batch read ahead (the feed prefetches
    # while the device works): resuming from it must train on that batch, not skip it.
    shutil.rmtree(full / "final")
    shutil.rmtree(full / "checkpoints" / "step_00000012")
    train(micro_cfg(full, steps=12, checkpoint={"every": 6}))
    again = losses(full)
    for step in range(7, 13):
        assert again[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, again)


def test_a_run_that_must_not_resume_sets_an_earlier_runs_results_aside(tmp_path):
    """checkpoint.resume: false where a run trained before: that run's checkpoints (higher steps,
    which would win every prune over the new ones and a later resume), final/ and log move to
    earlier-<stamp>/, kept; the new run's are its own."""
    train(micro_cfg(tmp_path, steps=8, checkpoint={"every": 2, "keep": 2}))
    train(micro_cfg(tmp_path, steps=4, checkpoint={"every": 2, "keep": 2, "resume": False}))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    assert sorted(read_log(tmp_path)) == [1, 2, 3, 4]  # the log's first record is the new run's step 1
    (aside,) = tmp_path.glob("earlier-*")
    assert [p.name for p in list_checkpoints(aside)] == ["step_00000006", "step_00000008"]
    assert sorted(read_log(aside))[-1] == 8 and (aside / "final").is_dir() and (tmp_path / "final").is_dir()
    # Each retry sets the last attempt aside (within one second too); the newest EARLIER_KEPT stay.
    for _ in range(2):
        train(micro_cfg(tmp_path, steps=2, checkpoint={"every": 2, "resume": False}))
    kept = list(tmp_path.glob("earlier-*"))
    assert len(kept) == 2 and aside not in kept, kept


def test_a_resumed_run_takes_its_hyperparameters_from_the_config(tmp_path):
    """A restart with another learning rate or weight decay trains with them (the checkpoint's
    groups hold the old ones), and keeps the checkpoint's moments."""
    sched = {"warmup_steps": 0, "decay": "constant"}
    train(micro_cfg(tmp_path, steps=4, schedule=sched, optimizer={"lr": 0.02, "adam_lr": 0.003, "weight_decay": 0.0}))
    cfg = micro_cfg(tmp_path, steps=8, schedule=sched, optimizer={"lr": 0.04, "adam_lr": 0.006, "weight_decay": 0.1})
    model = GPT(cfg.model)
    opts = build_optimizers(model, cfg.optimizer)
    load_sharded(model, opts, None, tmp_path / "checkpoints" / "step_00000004")
    built = build_optimizers(GPT(cfg.model), cfg.optimizer)
    for opt, fresh in zip(opts, built, strict=True):
        assert opt.state, type(opt).__name__  # the moments came back
        for group, want in zip(opt.param_groups, fresh.param_groups, strict=True):
            assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in want.items() if k != "params"}
    train(cfg)
    assert {step: r["lr"] for step, r in read_log(tmp_path).items()} == {
        s: 0.02 if s <= 4 else 0.04 for s in range(1, 9)
    }


@pytest.mark.slow
class _AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_a_step_waits_for_the_device_once():
    """A dense model's step reads its figures back in one transfer (on a GPU each .item(),
    float(tensor) or `if tensor` is a wait for the device: aten._local_scalar_dense), and
    after the first step the collector no longer walks the long-lived objects."""
    cfg = TrainerConfig.model_validate({**MICRO, "steps": 4})
    env = Env(0, 1, torch.device("cpu"))
    model = GPT(cfg.model)
    model.init_weights(0)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    opts = build_optimizers(model, cfg.optimizer)
    trainer = Trainer(cfg, model, wrap_model(model, cfg, env), opts, TensorFeed([(x, x)]), env)
    gc.unfreeze()
    first = trainer.step()
    assert gc.get_freeze_count() > 0
    gc.unfreeze()
    with _AtenCalls() as seen:
        record = trainer.step()
    assert seen.calls["aten._local_scalar_dense.default"] == 0, seen.calls
    assert record["loss"] < first["loss"] and record["grad_norm"] > 0


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(tmp_path):
    train(micro_cfg(tmp_path, steps=2, checkpoint={"every": 2}))
    padded = {**MICRO["model"], "vocab_size": MICRO["model"]["vocab_size"] + 64}
    with pytest.raises(ConfigError, match=r"checkpoint.dir=.*step_00000002 holds another model.*embed_tokens.weight"):
        train(micro_cfg(tmp_path, steps=4, model=padded, checkpoint={"every": 2}))


def test_two_process_ddp_matches_one_process(tmp_path):
    # Same global batch: 1 x 4 sequences against 2 ranks x 2 sequences.
    one = micro_cfg(tmp_path / "one", steps=6, batch_size=4)
    two = micro_cfg(tmp_path / "two", steps=6, batch_size=2)
    train(one)
    torchrun(2, two, tmp_path)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)


@pytest.mark.slow
def test_expert_parallel_training_matches_ddp_and_resumes(tmp_path):
    """tiny-moe shapes under torchrun: EP=2 (each rank holds 4 of the 8 experts) follows
    the same losses as plain DDP, checkpoints the full experts, and resumes."""
    moe = {"moe": {"n_experts": 8, "top_k": 2, "expert_ffn_dim": 64, "shared_expert_ffn_dim": 64}}
    model = {**MICRO["model"], **moe}
    ddp = micro_cfg(tmp_path / "ddp", steps=6, batch_size=2, model=model, checkpoint={"every": 3})
    ep = micro_cfg(tmp_path / "ep", steps=3, batch_size=2, model=model, checkpoint={"every": 3}, expert_parallel=2)
    torchrun(2, ddp, tmp_path)
    torchrun(2, ep, tmp_path)  # steps 1-3, checkpoint at 3
    torchrun(2, ep.model_copy(update={"steps": 6}), tmp_path)  # resumes at 3 with sharded experts
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "ep")
    for step in range(1, 7):
        # Muon's bf16 Newton-Schulz makes the two reduction orders drift slightly.
        assert b[step] == pytest.approx(a[step], rel=2e-3), (step, a, b)

    final = RunLayout(tmp_path / "ep").final
    assert is_sharded(final)  # each rank wrote its own experts
    experts = [v for k, v in weights(final).items() if "experts" in k and v.dim() == 3]
    assert experts and all(v.shape[0] == 8 for v in experts)  # all experts in the saved model
    # Expert load, counted over both ranks: each step's record summarises it and each checkpoint
    # appends the per-expert counts since the previous one. Split over ranks, the experts see the
    # tokens DDP's whole experts see: the same summary at step 1 (same weights, same rows), and
    # per-expert counts that differ only by the few tokens whose routing the drift above moved.
    ddp_log, ep_log = read_log(tmp_path / "ddp"), read_log(tmp_path / "ep")
    assert ep_log[1]["moe"] == ddp_log[1]["moe"], (ep_log[1]["moe"], ddp_log[1]["moe"])
    ddp_lines, ep_lines = (
        [json.loads(x) for x in (tmp_path / run / "expert_load.jsonl").read_text().splitlines()]
        for run in ("ddp", "ep")
    )
    assert [x["step"] for x in ep_lines] == [3, 6]
    for mine, theirs in zip(ep_lines, ddp_lines):
        assert sorted(mine["layers"]) == ["layers.0.mlp", "layers.1.mlp"]
        for name, counts in mine["layers"].items():
            # Every routed slot once: 2 ranks x 2 rows of 64 tokens, top-2, 3 steps.
            assert len(counts) == 8 and sum(counts) == 4 * 64 * 2 * 3, counts
            moved = sum(abs(a - b) for a, b in zip(counts, theirs["layers"][name]))
            assert moved <= 0.02 * sum(counts), (name, counts, theirs["layers"][name])


def test_gauges_are_unknown_until_set(tmp_path):
    """A trainer that has not stepped or validated yet tells the operator nothing (NaN), not
    zeros: a loss of 0, or teacher_up 0 in a run without a teacher, would be statuses."""
    metrics = TrainerMetrics(RunLayout(tmp_path), port=0, enabled=True)
    assert parse_trainer_metrics(generate_latest(metrics.registry).decode()) == Progress()
    metrics.set(step=3, loss=2.5, val_loss=2.75)
    seen = parse_trainer_metrics(generate_latest(metrics.registry).decode())
    assert (seen.step, seen.loss, seen.val_loss, seen.teacher_up) == (3, 2.5, 2.75, None)


def test_compile_unset_compiles_dense_models_on_cuda_only(tmp_path, capsys):
    cuda, cpu = Env(0, 1, torch.device("cuda", 0)), Env(0, 1, torch.device("cpu"))
    dense, moe = micro_cfg(tmp_path), micro_cfg(tmp_path, model={**MICRO["model"], "moe": MOE})
    assert compiles(dense, cuda) and not compiles(dense, cpu)
    assert not compiles(moe, cuda) and "runs eager" in capsys.readouterr().out
    assert compiles(moe.model_copy(update={"compile": True}), cpu)
    assert not compiles(dense.model_copy(update={"compile": False}), cuda)


def test_the_last_figures_are_left_in_the_termination_log(tmp_path, monkeypatch):
    """What the operator reads when a run ends between two scrapes: rank 0's last gauges, parsed as
    it parses /metrics, within Kubernetes' 4 KiB limit."""
    term = tmp_path / "termination-log"
    monkeypatch.setenv("NANOCHAT_TERMINATION_LOG", str(term))
    train(micro_cfg(tmp_path / "run", steps=3))
    text = term.read_text()
    assert len(text) <= 4096 and "# HELP" not in text
    last = parse_trainer_metrics(text)
    assert (last.step, last.total_steps) == (3, 3) and last.loss == pytest.approx(read_log(tmp_path / "run")[3]["loss"])
