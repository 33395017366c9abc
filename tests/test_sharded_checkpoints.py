"""Sharded step checkpoints (torch.distributed.checkpoint): each rank writes its own shards, a run
resumes on another world size, a rank killed during the save leaves the previous checkpoint the
one resumed from, and a sharded checkpoint exports to a Hugging Face directory transformers loads.

    .venv/bin/pytest tests/test_sharded_checkpoints.py -q
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_cli.main import main
from nanochat_trainer.checkpoint import is_sharded, latest_checkpoint, list_checkpoints, load_model
from nanochat_trainer.contract import MODEL_WEIGHTS, TRAIN_STATE, RunLayout
from nanochat_trainer.models.ternary_pack import read_packed_metadata, save_packed
from nanochat_trainer.train import train

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
# it to write its shards of the second checkpoint, after rank 0 has written its own.
DIE_IN_SECOND_SAVE = textwrap.dedent(
    """
    import os, runpy, sys
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    write_data, saves = _FileSystemWriter.write_data, []

    def dying_write_data(self, plan, planner):
        saves.append(1)
        if os.environ["RANK"] == "1" and len(saves) == 2:
            os._exit(9)
        return write_data(self, plan, planner)

    _FileSystemWriter.write_data = dying_write_data
    sys.argv[0] = "nanochat_trainer.train"
    runpy.run_module("nanochat_trainer.train", run_name="__main__")
    """
)


@pytest.mark.slow  # torchrun: three runs of tens of seconds
def test_a_rank_killed_during_the_save_leaves_the_previous_checkpoint(tmp_path):
    ref = micro_cfg(tmp_path / "ref", steps=4, batch_size=2, checkpoint={"every": 2})
    torchrun(2, ref, tmp_path)
    run = tmp_path / "run"
    cfg = micro_cfg(run, steps=4, batch_size=2, checkpoint={"every": 2})
    script = tmp_path / "die_in_second_save.py"
    script.write_text(DIE_IN_SECOND_SAVE)
    assert torchrun(2, cfg, tmp_path, script=script, check=False) != 0

    layout = RunLayout(run)
    partial = list(layout.checkpoints.glob("step_00000004.tmp-*"))
    assert len(partial) == 1 and list(partial[0].glob("*.distcp")), "rank 0's shards of step 4 were written"
    assert list_checkpoints(run) == [layout.step(2)] and latest_checkpoint(run) == layout.step(2)
    assert not layout.final.exists()

    torchrun(2, cfg, tmp_path)  # resumes from step 2, not from the half-written step 4
    assert list_checkpoints(run)[-1] == layout.step(4) and not list(layout.checkpoints.glob("*.tmp-*"))
    a, b = losses(tmp_path / "ref"), losses(run)
    for step in range(1, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)
