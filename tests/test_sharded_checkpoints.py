"""Sharded step checkpoints (torch.distributed.checkpoint): each rank writes its own shards while
training goes on, a checkpoint is published only once written, a run resumes on another world size,
a rank killed during the save leaves the previous checkpoint the one resumed from, and a sharded
checkpoint exports to a Hugging Face directory transformers loads.

    .venv/bin/pytest tests/test_sharded_checkpoints.py -q
"""

from __future__ import annotations

import os
import socket
import textwrap
import threading

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.checkpoint.filesystem import _FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_cli.main import main
from nanochat_trainer.checkpoint import (
    is_sharded,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    read_train_state,
)
from nanochat_trainer.contract import MODEL_WEIGHTS, SHARDED_INDEX, TRAIN_STATE, RunLayout
from nanochat_trainer.data.loader import merge_states
from nanochat_trainer.models.ternary_pack import read_packed_metadata, save_packed
from nanochat_trainer.parallel.state import _HostCopy, checkpoint_group
from nanochat_trainer.train import train
from nanochat_trainer.train.run import StepCheckpoints
from nanochat_trainer.train.trainer import Trainer

from micro import losses, micro_cfg, torchrun

CODE = "def add(a, b):\n    return a + b  # sum\n\nprint(add(2, 3))\n"


def test_a_sharded_checkpoint_exports_to_what_transformers_loads(tmp_path, capsys):
    run = tmp_path / "run"
    train(micro_cfg(run, steps=2, checkpoint={"every": 2}))
    step = RunLayout(run).step(2)
    assert is_sharded(step) and (step / TRAIN_STATE).is_file() and not (step / MODEL_WEIGHTS).exists()

    out = tmp_path / "hf"
    assert main(["export", str(step), "--hf", str(out), "--dtype", "float32"]) == 0
    ours, tok, _ = load_model(step)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode(CODE)
    assert hf_tok(CODE)["input_ids"] == ids and hf_tok.eos_token_id == tok.eot_id
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=1e-4)
    # final/ was saved whole from the same step: the sharded checkpoint holds the same weights.
    final, _, _ = load_model(RunLayout(run).final)
    with torch.no_grad():
        torch.testing.assert_close(final(x), ours(x), atol=0, rtol=0)

    # Asked again for the same source, it writes nothing; a newer source is exported again.
    capsys.readouterr()
    written = (out / "config.json").stat().st_mtime_ns
    assert main(["export", str(step), "--hf", str(out), "--dtype", "float32"]) == 0
    assert "up to date" in capsys.readouterr().out and (out / "config.json").stat().st_mtime_ns == written
    assert main(["export", str(run), "--hf", str(out), "--dtype", "float32"]) == 0
    assert "exported" in capsys.readouterr().out
    assert main(["export", str(run)]) == 2 and "--hf/--ternary" in capsys.readouterr().err  # nothing asked


def test_a_step_checkpoint_is_written_while_training_goes_on(tmp_path, monkeypatch):
    """Step 2's shards are written while steps 3 and 4 run: its writer waits for step 4 to start,
    which a save that blocked the training would never let happen. It is published only once
    written, with the train state of step 2, not of the step that published it. Publishing as soon
    as a write is done (poll) is off here: the next checkpoint's start publishes it at the latest."""
    run = tmp_path / "run"
    step_4, seen = threading.Event(), {}
    write_data, step = _FileSystemWriter.write_data, Trainer.step

    def slow_write_data(self, plan, planner):
        if ".tmp-" in str(self.path) and RunLayout(run).step(2).name in str(self.path):
            seen["overlapped"] = step_4.wait(timeout=30)
        return write_data(self, plan, planner)

    def observed_step(self):
        if self.steps_done == 2:  # the data position step 2's checkpoint must hold
            seen["loader at 2"] = merge_states([self.feed.loader_state()])
        if self.steps_done == 3:  # step 4 starts: step 2's write is still held
            seen["published before 4"] = list_checkpoints(run)
            step_4.set()
        return step(self)

    monkeypatch.setattr(_FileSystemWriter, "write_data", slow_write_data)
    monkeypatch.setattr(Trainer, "step", observed_step)
    monkeypatch.setattr(StepCheckpoints, "poll", lambda self: None)
    train(micro_cfg(run, steps=5, checkpoint={"every": 2, "async_save": True}))

    assert seen["overlapped"], "step 4 never started while step 2's shards were being written"
    assert seen["published before 4"] == [], "step 2 was published before its shards were written"
    layout = RunLayout(run)
    assert list_checkpoints(run) == [layout.step(2), layout.step(4), layout.step(5)]
    assert not list(layout.checkpoints.glob("*.tmp-*"))
    state = read_train_state(layout.step(2))
    assert state["step"] == 2 and state["loader"] == seen["loader at 2"]
    assert state["loader"] != read_train_state(layout.step(4))["loader"]


def _staging_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        stacked = torch.arange(60.0).reshape(3, 4, 5)  # momentum buffers stacked, a DTensor over a row
        row = DTensor.from_local(stacked[1], mesh, (Shard(0),), run_check=False, shape=(4, 5), stride=(5, 1))
        weight = torch.ones(2, 2)
        want = {"row": stacked[1].clone(), "weight": weight.clone()}
        state = {"row": row, "weight": weight, "tied": weight.view(2, 2)}
        written = dcp.async_save(state, checkpoint_id=out, process_group=checkpoint_group(), async_stager=_HostCopy())
        stacked.zero_(), weight.zero_()  # the training goes on as soon as the save returns
        written.result()
        back = {"row": torch.zeros(4, 5), "weight": torch.zeros(2, 2), "tied": torch.zeros(2, 2)}
        dcp.load(back, checkpoint_id=out)
        assert torch.equal(back["row"], want["row"]) and torch.equal(back["weight"], want["weight"]), back
        assert torch.equal(back["tied"], want["weight"])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a spawned process: a few seconds
def test_an_async_save_holds_the_state_of_its_call(tmp_path):
    """What an async save writes is the state when it was called, whatever the training does
    meanwhile; a DTensor over a row of a stacked tensor (an expert's momentum) included, on which
    DCP's own stager fails in torch 2.15."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_staging_worker, args=(port, str(tmp_path / "ckpt")), nprocs=1, start_method="spawn")


def test_packing_a_tensor_at_a_time_equals_packing_the_model(tmp_path):
    """The ternary export reads final/ a tensor at a time into a meta-device model's layout: the
    same file as packing the loaded model whole."""
    run = tmp_path / "t"
    train(micro_cfg(run, steps=2, stage="ternary"))  # its packed export comes from final/, a tensor at a time
    model, _, cfg = load_model(RunLayout(run).final)
    save_packed(model, cfg.model.model_dump(mode="json"), tmp_path / "whole.safetensors", torch.bfloat16)
    assert main(["export", str(run), "--ternary", str(tmp_path / "cli.safetensors")]) == 0
    want = load_file(tmp_path / "whole.safetensors")
    for path in (RunLayout(run).packed_ternary, tmp_path / "cli.safetensors"):
        got = load_file(path)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), path
        assert read_packed_metadata(path) == read_packed_metadata(tmp_path / "whole.safetensors")
    # Rank 0 died while packing: the restart finds final/ written, the packed file missing, and packs it.
    RunLayout(run).packed_ternary.unlink()
    train(micro_cfg(run, steps=2, stage="ternary"))
    assert load_file(RunLayout(run).packed_ternary).keys() == want.keys()


@pytest.mark.slow  # torchrun: three runs of tens of seconds
def test_a_sharded_checkpoint_resumes_on_other_world_sizes(tmp_path):
    """4 ranks (FSDP2) write steps 1-2, 2 ranks (FSDP2) resume to 4, one process to 6: the losses
    of one uninterrupted process (the same global batch of 4 throughout)."""
    # Every leg under torchrun, one thread per process: the reference's reductions then run as the
    # resumed legs' do (an in-process run uses every core and rounds differently).
    ref = micro_cfg(tmp_path / "ref", steps=6, checkpoint={"every": 2})
    torchrun(1, ref, tmp_path)
    run = tmp_path / "run"
    torchrun(4, micro_cfg(run, steps=2, batch_size=1, parallel="fsdp", checkpoint={"every": 2}), tmp_path)
    shards = sorted(RunLayout(run).step(2).glob("*.distcp"))
    sizes = [p.stat().st_size for p in shards]
    # Every rank wrote its own part, and none of them the whole: FSDP2 gives each a quarter.
    assert len(shards) == 4 and max(sizes) < 0.5 * sum(sizes), sizes
    torchrun(2, micro_cfg(run, steps=4, batch_size=2, parallel="fsdp", checkpoint={"every": 2}), tmp_path)
    torchrun(1, micro_cfg(run, steps=6, checkpoint={"every": 2}), tmp_path)
    a, b = losses(tmp_path / "ref"), losses(run)
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)


# A test's wrapper around the trainer: rank 1 dies (as from SIGKILL: no cleanup) when DCP asks
# it to write its shards of the step 4 checkpoint, once its training has gone on to step 5 (the
# write is asynchronous), after touching the file $OVERLAPPED says; rank 0 writes its own shards.
DIE_IN_SECOND_SAVE = textwrap.dedent(
    """
    import os, runpy, sys, threading
    from pathlib import Path
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter
    from nanochat_trainer.train.trainer import Trainer

    write_data, step, step_5 = _FileSystemWriter.write_data, Trainer.step, threading.Event()

    def observed_step(self):
        if self.steps_done == 4:
            step_5.set()
        return step(self)

    def dying_write_data(self, plan, planner):
        if os.environ["RANK"] == "1" and "step_00000004.tmp-" in str(self.path):
            if step_5.wait(timeout=20):  # a synchronous save holds the training: no step 5 comes
                Path(os.environ["OVERLAPPED"]).touch()
            os._exit(9)
        return write_data(self, plan, planner)

    Trainer.step = observed_step
    _FileSystemWriter.write_data = dying_write_data
    sys.argv[0] = "nanochat_trainer.train"
    runpy.run_module("nanochat_trainer.train", run_name="__main__")
    """
)


@pytest.mark.slow  # torchrun: three runs of tens of seconds
def test_a_rank_killed_during_the_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Rank 1 dies while its shards of step 4 are pending and training is at step 5: step 2 stays
    the newest checkpoint, and the run resumed from it has the losses of an uninterrupted one."""
    ref = micro_cfg(tmp_path / "ref", steps=6, batch_size=2, checkpoint={"every": 2})
    torchrun(2, ref, tmp_path)
    run = tmp_path / "run"
    cfg = micro_cfg(run, steps=6, batch_size=2, checkpoint={"every": 2, "async_save": True})  # DDP: sync unless asked
    script = tmp_path / "die_in_second_save.py"
    script.write_text(DIE_IN_SECOND_SAVE)
    monkeypatch.setenv("OVERLAPPED", str(tmp_path / "overlapped"))
    assert torchrun(2, cfg, tmp_path, script=script, check=False) != 0
    assert (tmp_path / "overlapped").exists(), "step 5 did not start while step 4's shards were pending"

    layout = RunLayout(run)
    partial = list(layout.checkpoints.glob("step_00000004.tmp-*"))
    assert len(partial) == 1 and list(partial[0].glob("*.distcp")), "rank 0's shards of step 4 were written"
    assert not (partial[0] / SHARDED_INDEX).exists() and not (partial[0] / TRAIN_STATE).exists()
    assert list_checkpoints(run) == [layout.step(2)] and latest_checkpoint(run) == layout.step(2)
    assert not layout.final.exists()

    torchrun(2, cfg, tmp_path)  # resumes from step 2, not from the half-written step 4
    assert list_checkpoints(run) == [layout.step(s) for s in (2, 4, 6)]
    assert not list(layout.checkpoints.glob("*.tmp-*"))
    a, b = losses(tmp_path / "ref"), losses(run)
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)
