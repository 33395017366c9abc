"""Expert parallelism on 2 gloo processes against one process on the same global batch.

    .venv/bin/pytest tests/test_expert_parallel.py -q

One spawn of 2 ranks (EP=2) runs every distributed check and saves what it saw; the tests
compare that with single-process runs here:
* an MoE block (8 experts, top-2, dim 32, shared expert): outputs, input gradients, each
  rank's expert-slice gradients against the matching slice, dense gradients summed over
  ranks, for the loop and the grouped-mm expert kernels;
* two optimizer steps (Muon + BatchedMuon + AdamW, gradient clipping) of a 2-layer
  tiny-moe model, wrapped and stepped by the trainer itself (DDP with the experts left out of
  DDP): losses, gradient norms, all weights, and the optimizer state gathered back to full size.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from nanochat_trainer.config import MoEConfig, TrainerConfig, format_validation_error
from nanochat_trainer.data.feed import TensorFeed
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.models.moe import MoE
from nanochat_trainer.parallel.apply import global_balancing, wrap_model
from nanochat_trainer.parallel.distributed import Env
from nanochat_trainer.parallel.expert_parallel import (
    gather_full_state,
    setup_expert_parallel,
    shard_experts,
    shard_full_state,
)
from nanochat_trainer.train.losses import model_loss
from nanochat_trainer.train.optim import BatchedMuon, build_optimizers
from nanochat_trainer.train.trainer import Trainer

from micro import perturb, spawn_ranks

pytestmark = pytest.mark.slow  # torchrun or spawned process groups: tens of seconds

WORLD = 2
IMPLS = ["loop"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])
ATOL = 1e-5


def _moe(scope: str = "micro_batch") -> MoE:
    """micro_batch balancing unless asked: the EP checks compare each rank with one process on
    that rank's rows, where a global balancing loss would need the other rank's loads."""
    torch.manual_seed(0)
    cfg = MoEConfig(
        n_experts=8,
        top_k=2,
        expert_ffn_dim=24,
        n_shared_experts=1,
        shared_expert_ffn_dim=16,
        aux_loss_weight=0.1,
        z_loss_weight=0.01,
        balance_scope=scope,
    )
    return MoE(32, cfg).train()


def _moe_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2 * WORLD, 5, 32, generator=gen), torch.randn(2 * WORLD, 5, 32, generator=gen)


CASES = IMPLS + ["starved"]  # starved: every token goes to rank 0's experts, rank 1's get no rows


def _case(m: MoE, case: str, x: torch.Tensor) -> torch.Tensor:
    m.impl = "loop" if case == "starved" else case
    if case == "starved":
        with torch.no_grad():
            m.router.weight[: m.n_experts // WORLD, 0] = 4.0
        x = x.clone()
        x[..., 0] = 4.0
    return x


def _moe_loss(m: MoE, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = m(x)
    return y, (y * g).sum() + m.last_aux_loss


def _train_cfg() -> TrainerConfig:
    cfg = TrainerConfig(preset="tiny-moe", expert_parallel=WORLD, parallel="ddp")
    model = cfg.model.model_copy(
        update={
            "n_layers": 2,
            "vocab_size": 64,
            "dim": 64,
            "n_heads": 4,
            "moe": cfg.model.moe.model_copy(
                update={"expert_ffn_dim": 32, "shared_expert_ffn_dim": 32, "balance_scope": "micro_batch"}
            ),
        }
    )
    # A small clip so the EP-aware norm decides the step; the peak learning rate from the first step,
    # as the one-process reference below steps.
    return cfg.model_copy(
        update={
            "model": model,
            "steps": 2,
            "optimizer": cfg.optimizer.model_copy(update={"grad_clip": 0.05}),
            "schedule": cfg.schedule.model_copy(update={"warmup_steps": 0, "decay": "constant"}),
        }
    )


def _batches(steps: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 64, (2 * WORLD, 17), generator=gen)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _init_model(cfg: TrainerConfig) -> GPT:
    model = GPT(cfg.model)
    model.init_weights(seed=0)
    return perturb(model, 0.02, seed=3)


# ----------------------------------------------------------------- the two ranks


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    res: dict = {}
    rows = slice(2 * rank, 2 * rank + 2)

    # 1. One MoE block.
    group = dist.new_group(list(range(WORLD)))
    x_all, g_all = _moe_inputs()
    for case in CASES:
        m = _moe()
        shard_experts(m, group)
        x = _case(m, case, x_all[rows]).requires_grad_()
        y, loss = _moe_loss(m, x, g_all[rows])
        loss.backward()
        res[case] = {
            "y": y.detach(),
            "x_grad": x.grad,
            "load": m.last_expert_load,
            "grads": {n: p.grad.clone() for n, p in m.named_parameters()},
        }

    # 2. Global-batch balancing (no EP): each rank's aux loss uses the loads of both ranks.
    for scope in ("global", "micro_batch"):
        m = _moe(scope)
        if scope == "global":
            global_balancing(m)  # as parallel.apply.wrap_model does
        m(x_all[rows])
        m.last_aux_loss.backward()
        res[f"aux_{scope}"] = {"aux": m.last_aux_loss.detach(), "router_grad": m.router.weight.grad.clone()}

    # 3. Training steps of a tiny-moe model: the trainer's own wrapping and step.
    cfg = _train_cfg()
    model = _init_model(cfg)
    env = Env(rank, WORLD, torch.device("cpu"))
    ep = setup_expert_parallel(model, cfg, WORLD, rank)
    wrapped = wrap_model(model, cfg, env, ep)
    ignored = sorted(wrapped.parameters_to_ignore)
    opts = build_optimizers(model, cfg.optimizer)
    trainer = Trainer(cfg, model, wrapped, opts, TensorFeed([(x[rows], y[rows]) for x, y in _batches()]), env, ep=ep)
    seen: dict = {}

    def catch_grads(*_) -> None:
        """The gradients the optimizers see (reduced and clipped), caught before the first one steps."""
        seen.setdefault("grads", {n: p.grad.clone() for n, p in model.named_parameters()})

    opts[0].register_step_pre_hook(catch_grads)
    losses, norms = [], []
    for step in range(cfg.steps):
        record = trainer.step()
        losses.append(record["loss"])
        norms.append(record["grad_norm"])
        if step == 0:
            after_one = {k: v.clone() for k, v in model.state_dict().items()}
    grads = seen["grads"]
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = {k: v.clone() for k, v in model.state_dict().items()}
    osds = [get_optimizer_state_dict(model, opt, options=options) for opt in opts]
    local_msd = {k: v.clone() for k, v in msd.items()}
    gather_full_state(model, opts, msd, osds, ep)  # rank 1's osds are empty (cpu_offload): still collective
    res["train"] = {
        "losses": losses,
        "norms": norms,
        "ignored": ignored,
        "msd": dict(msd),
        "local_msd": local_msd,
        "grads": grads,
        "after_one": after_one,
    }
    if rank == 0:
        res["train"]["osd_experts"] = {k: v["momentum_buffer"] for k, v in osds[-1]["state"].items()}
    shard_full_state(model, msd, osds, ep)
    res["train"]["reshard_ok"] = all(torch.equal(msd[k], local_msd[k]) for k in msd)
    torch.save(res, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ep")
    spawn_ranks(_worker, WORLD, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------- checks


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("impl", CASES)
def test_moe_block_forward_and_backward_match_one_process(ranks, impl):
    m = _moe()
    x_all, g_all = _moe_inputs()
    x_all = _case(m, impl, x_all)
    ref = []
    for r in range(WORLD):
        x = x_all[2 * r : 2 * r + 2].clone().requires_grad_()
        y, loss = _moe_loss(m, x, g_all[2 * r : 2 * r + 2])
        loss.backward()  # grads accumulate over the ranks' batches, as the EP ranks' sums should
        ref.append((y.detach(), x.grad, m.last_expert_load))
    per = m.n_experts // WORLD
    diffs = {}
    for r, res in enumerate(ranks):
        got = res[impl]
        y, x_grad, load = ref[r]
        torch.testing.assert_close(got["y"], y, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(got["x_grad"], x_grad, atol=ATOL, rtol=ATOL)
        assert torch.equal(got["load"], load)  # routing is local: all E experts counted
        diffs[f"y{r}"], diffs[f"x_grad{r}"] = _max_diff(got["y"], y), _max_diff(got["x_grad"], x_grad)
    for name, p in m.named_parameters():
        if name.startswith("experts."):
            for r, res in enumerate(ranks):
                mine = res[impl]["grads"][name]
                assert mine.shape[0] == per
                torch.testing.assert_close(mine, p.grad[r * per : (r + 1) * per], atol=ATOL, rtol=ATOL)
                diffs[name] = max(diffs.get(name, 0.0), _max_diff(mine, p.grad[r * per : (r + 1) * per]))
        else:
            summed = sum(res[impl]["grads"][name] for res in ranks)
            torch.testing.assert_close(summed, p.grad, atol=ATOL, rtol=ATOL)
            diffs[name] = _max_diff(summed, p.grad)
    if impl == "starved":
        assert int(ref[0][2][per:].sum()) == 0 and int(ref[1][2][per:].sum()) == 0
        assert float(ranks[1][impl]["grads"]["experts.down_proj.weight"].abs().max()) == 0.0
    print(f"\n{impl}: max abs diff EP vs 1 process: {max(diffs.values()):.2e}")


def test_global_batch_balancing_sees_every_ranks_loads(ranks):
    """balance_scope global: the ranks' aux losses average to one process's aux loss on the whole
    batch, and so do their router gradients; micro_batch (each rank's own loads) does not."""
    m = _moe("global")
    x_all, _ = _moe_inputs()
    m(x_all)
    m.last_aux_loss.backward()
    for scope, agrees in (("global", True), ("micro_batch", False)):
        aux = sum(res[f"aux_{scope}"]["aux"] for res in ranks) / WORLD
        grad = sum(res[f"aux_{scope}"]["router_grad"] for res in ranks) / WORLD
        close = torch.allclose(aux, m.last_aux_loss.detach(), atol=1e-6) and torch.allclose(
            grad, m.router.weight.grad, atol=1e-6
        )
        assert close == agrees, (scope, float(aux), float(m.last_aux_loss))


def _assert_weights(got: dict, want: dict, r: int, per: int, atol: float, mean_atol: float) -> float:
    """Full-size (gathered) or local expert slices; returns the largest difference."""
    worst = 0.0
    for k, v in want.items():
        mine = got[k]
        if mine.shape != v.shape:  # this rank's expert slice
            v = v[r * per : (r + 1) * per]
        d = (mine - v).abs()
        assert float(d.max()) <= atol and float(d.mean()) <= mean_atol, (k, float(d.max()), float(d.mean()))
        worst = max(worst, float(d.max()))
    return worst


def test_training_steps_match_one_process(ranks):
    cfg = _train_cfg()
    model = _init_model(cfg)
    opts = build_optimizers(model, cfg.optimizer)
    assert any(isinstance(o, BatchedMuon) for o in opts)
    losses, norms = [], []
    for step, (x, y) in enumerate(_batches()):
        total = 0.0
        for r in range(WORLD):  # the global batch, loss averaged over the ranks' halves as DDP does
            loss = model_loss(model, model(x[2 * r : 2 * r + 2]), y[2 * r : 2 * r + 2]) / WORLD
            loss.backward()
            total += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)))
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for opt in opts:
            opt.step()
        if step == 0:
            after_one = {k: v.clone() for k, v in model.state_dict().items()}
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        losses.append(total)
    assert norms[0] > cfg.optimizer.grad_clip  # the clip acted, so the EP-wide norm mattered
    per = cfg.model.moe.n_experts // WORLD
    figures = {"grad": 0.0, "step1": 0.0, "step2": 0.0}
    for r, res in enumerate(ranks):
        t = res["train"]
        assert t["reshard_ok"]
        assert len(t["ignored"]) == 3 * cfg.model.n_layers and all(".experts." in n for n in t["ignored"])
        torch.testing.assert_close(torch.tensor(t["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(t["norms"]), torch.tensor(norms), atol=1e-5, rtol=1e-5)
        # The gradients each optimizer sees (DDP-averaged dense, reduced expert slices, clipped).
        figures["grad"] = max(figures["grad"], _assert_weights(t["grads"], grads, r, per, 1e-6, 1e-7))
        # Weights: Muon orthogonalises in bf16, and one bf16 rounding flip in its input (the
        # gradients agree to 2e-7 relative) moves its output by up to ~1e-2 (measured on torch's
        # own Muon), so the weights after the steps agree to lr * 5e-2 at worst, much better on average.
        lr = cfg.optimizer.lr
        figures["step1"] = max(
            figures["step1"], _assert_weights(t["after_one"], after_one, r, per, lr * 0.05, lr * 2**-8)
        )
        # Two steps compound the flips (measured up to lr * 0.11 on one CPU, lr * 0.1 on another).
        figures["step2"] = max(
            figures["step2"], _assert_weights(t["msd"], model.state_dict(), r, per, lr * 0.25, lr * 2**-6)
        )
        for k in t["local_msd"]:
            if ".experts." in k:
                assert t["local_msd"][k].shape[0] == per and t["msd"][k].shape[0] == 2 * per
    # Strict: the sharded step from the ranks' own gradients equals one full step from the same gradients.
    ref = _init_model(cfg)
    ref_opts = build_optimizers(ref, cfg.optimizer)
    for n, p in ref.named_parameters():
        parts = [res["train"]["grads"][n] for res in ranks]
        p.grad = torch.cat(parts) if parts[0].shape != p.shape else parts[0].clone()
    for opt in ref_opts:
        opt.step()
    sharded_step = {}
    for r, res in enumerate(ranks):
        sharded_step[r] = _assert_weights(res["train"]["after_one"], ref.state_dict(), r, per, 1e-6, 1e-7)
    figures["sharded_step"] = max(sharded_step.values())
    bm = opts[-1]  # the experts' BatchedMuon (on the CPU the 2-D matrices have one of their own)
    assert isinstance(bm, BatchedMuon) and all(p.ndim == 3 for p in bm.state)
    names = {id(p): n for n, p in model.named_parameters()}
    saved = ranks[0]["train"]["osd_experts"]  # rank 0's checkpoint view: full-size momentum buffers
    assert len(saved) == len(bm.state) == 3 * cfg.model.n_layers
    for p, state in bm.state.items():
        torch.testing.assert_close(saved[names[id(p)]], state["momentum_buffer"], atol=1e-6, rtol=1e-5)
    print(f"\nlosses 1 process {losses}, EP {ranks[0]['train']['losses']}; max abs diff: {figures}")


def test_expert_parallel_setting_is_checked_by_name():
    for bad, msg in [
        ({"preset": "tiny-moe", "expert_parallel": 3}, "does not divide model.moe.n_experts=8"),
        ({"preset": "tiny", "expert_parallel": 2}, "needs an MoE model"),
        ({"preset": "tiny-moe", "expert_parallel": 0}, "greater than or equal to 1"),
    ]:
        with pytest.raises(ValidationError) as err:
            TrainerConfig.model_validate(bad)
        assert "expert_parallel" in format_validation_error(err.value) and msg in format_validation_error(err.value)
    cfg = TrainerConfig(preset="tiny-moe", expert_parallel=2)
    model = GPT(cfg.model.model_copy(update={"n_layers": 1, "vocab_size": 64}))
    assert setup_expert_parallel(model, cfg.model_copy(update={"expert_parallel": 1}), 1, 0) is None
    with pytest.raises(ValueError, match="expert_parallel=2 does not divide the world size 3"):
        setup_expert_parallel(model, cfg, 3, 0)
