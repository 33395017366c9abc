"""Expert parallelism with FSDP2 for the dense part, through torchrun on gloo, against DDP.

    .venv/bin/pytest tests/test_fsdp_expert_parallel.py -q

Both FSDP2 + EP layouts of `parallel.shard_fsdp` run the same global batch as plain DDP:
* 2 ranks, EP=2: no replicas, FSDP2 ignores the experts;
* 4 ranks, EP=2: two replicas of each expert slice, the experts an FSDP2 unit on them,
  with activation checkpointing.
The first writes a checkpoint the second resumes (another world size, another layout), so
checkpoints are layout-free. Also: a checkpoint whose optimizers differ from the run's
resumes the weights with fresh optimizer state, and says so.
"""

from __future__ import annotations

import pytest
import torch

from nanochat_trainer.config import ModelConfig
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.models.hf_adapter import export_hf
from nanochat_trainer.train import train

from micro import MICRO, losses, micro_cfg, perturb, read_log, torchrun, weights

pytestmark = pytest.mark.slow  # torchrun or spawned process groups: tens of seconds

MOE = {**MICRO["model"], "moe": {"n_experts": 8, "top_k": 2, "expert_ffn_dim": 64, "shared_expert_ffn_dim": 64}}


def test_fsdp_with_expert_parallel_matches_ddp_across_layouts(tmp_path):
    # A small clip, so that the gradient norm (every expert counted once, over the layouts) steers
    # each step: a wrong expert-gradient scale changes the norm, the clip factor and the losses.
    clip = {"grad_clip": 0.05}
    ddp = micro_cfg(tmp_path / "ddp", steps=6, batch_size=2, model=MOE, checkpoint={"every": 3}, optimizer=clip)
    fsdp_ep = micro_cfg(
        tmp_path / "ep",
        steps=3,
        batch_size=2,
        model=MOE,
        checkpoint={"every": 3},
        expert_parallel=2,
        parallel="fsdp",
        optimizer=clip,
    )
    torchrun(2, ddp, tmp_path)
    torchrun(2, fsdp_ep, tmp_path)  # steps 1-3 on 2 ranks: EP=2, FSDP2 over the dense weights
    # Steps 4-6 on 4 ranks of batch 1 (the same global batch): EP=2 x 2 replicas, experts FSDP2-sharded,
    # and every block recomputed in the backward pass (its all-to-alls and FSDP2 all-gathers too).
    torchrun(4, fsdp_ep.model_copy(update={"steps": 6, "batch_size": 1, "activation_checkpointing": True}), tmp_path)
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "ep")
    na, nb = (read_log(tmp_path / d) for d in ("ddp", "ep"))
    for step in range(1, 7):
        assert na[step]["grad_norm"] > 0.05  # the clip acted at every step
        assert nb[step]["grad_norm"] == pytest.approx(na[step]["grad_norm"], rel=1e-4), (step, na[step], nb[step])
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)
    ref = weights(tmp_path / "ddp" / "final")  # one safetensors file (DDP: rank 0 holds it all)
    got = weights(tmp_path / "ep" / "final")  # sharded: each rank wrote its part
    assert got.keys() == ref.keys()
    experts = [k for k in got if ".experts." in k]
    assert experts and all(got[k].shape == ref[k].shape and got[k].shape[0] == 8 for k in experts)
    # Muon orthogonalises in bf16: a rounding flip from another reduction order moves an update
    # element by up to ~lr/2 (test_expert_parallel measures this on torch's own Muon), while on
    # average the weights agree to ~1e-4.
    worst = max(float((got[k] - ref[k]).abs().max()) for k in got)
    mean = max(float((got[k] - ref[k]).abs().mean()) for k in got)
    assert worst < ddp.optimizer.lr and mean < 5e-4, (worst, mean)
    print(
        f"\nDDP losses {[round(a[s], 5) for s in a]}; FSDP2+EP {[round(b[s], 5) for s in b]}; "
        f"weights differ by at most {worst:.1e}, by {mean:.1e} on average in the worst tensor"
    )


def test_resume_with_other_optimizers_keeps_weights(tmp_path, capfd):
    run = tmp_path / "run"
    train(micro_cfg(run, steps=15, checkpoint={"every": 15}))
    record = train(micro_cfg(run, steps=17, checkpoint={"every": 17}, optimizer={"name": "adamw"}))
    err = capfd.readouterr().err
    assert "does not match this run's" in err and "fresh optimizer state" in err, err
    log = losses(run)
    assert record["step"] == 17 and {1, 15, 16, 17} <= set(log)
    # The weights were resumed: step 16 starts from step 15's model, not from a fresh
    # initialisation (whose loss is step 1's, ~ln(512) = 6.24).
    assert log[16] < log[1] - 0.5, log


def test_init_from_hugging_face_reads_each_ranks_experts(tmp_path):
    """A Qwen3-MoE checkpoint in Hugging Face format as checkpoint.init_from, on 2 ranks with EP=2
    (each reads only its 4 of the 8 experts) and in one process: the same first loss, which the
    initial weights alone decide (rank 1 reading rank 0's rows would change it)."""

    model_cfg = {**MICRO["model"], "moe": {"n_experts": 8, "top_k": 2, "expert_ffn_dim": 64, "n_shared_experts": 0}}
    mcfg = ModelConfig.model_validate(model_cfg)
    model = GPT(mcfg)
    model.init_weights(5)
    export_hf(perturb(model, 0.05), mcfg, str(tmp_path / "hf"), dtype=torch.float32)
    init = {"init_from": str(tmp_path / "hf"), "every": 2}
    train(micro_cfg(tmp_path / "one", steps=2, batch_size=4, model=model_cfg, checkpoint=init))
    torchrun(
        2,
        micro_cfg(tmp_path / "ep", steps=2, batch_size=2, model=model_cfg, checkpoint=init, expert_parallel=2),
        tmp_path,
    )
    train(micro_cfg(tmp_path / "fresh", steps=1, batch_size=4, model=model_cfg))
    a, b, fresh = losses(tmp_path / "one"), losses(tmp_path / "ep"), losses(tmp_path / "fresh")
    assert b[1] == pytest.approx(a[1], rel=1e-5), (a, b)
    assert abs(a[1] - fresh[1]) > 0.05, (a, fresh)  # the checkpoint's weights, not a fresh init


def test_ternary_student_and_its_parent_split_their_experts(tmp_path):
    """ternary.distill_from_parent on 2 ranks with EP=2 and FSDP2: student and frozen parent both
    hold half of each layer's experts; the first step's loss and KL to the parent equal one
    process's (they depend on the weights each rank loaded and on the exchanges only)."""

    train(micro_cfg(tmp_path / "parent", steps=3, batch_size=4, model=MOE))
    tern = {"distill_from_parent": True}
    init = {"init_from": str(tmp_path / "parent"), "every": 2}
    train(micro_cfg(tmp_path / "one", steps=2, batch_size=4, model=MOE, stage="ternary", ternary=tern, checkpoint=init))
    torchrun(
        2,
        micro_cfg(
            tmp_path / "ep",
            steps=2,
            batch_size=2,
            model=MOE,
            stage="ternary",
            ternary=tern,
            checkpoint=init,
            expert_parallel=2,
            parallel="fsdp",
        ),
        tmp_path,
    )
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "ep")
    assert a[1]["kd_loss"] > 0
    for key in ("loss", "kd_loss"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-5), (key, a[1], b[1])
