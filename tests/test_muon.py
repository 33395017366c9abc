"""Muon: `BatchedMuon` is torch's Muon per matrix, batched by shape, and split over the ranks
under DDP and under FSDP2; Newton-Schulz in fp32 where the CPU only emulates bf16.

.venv/bin/pytest tests/test_muon.py -q
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.models.gpt import GPT
from nanochat_trainer.train import optim
from nanochat_trainer.train.optim import BatchedMuon, _newton_schulz_batched, _quintic

from micro import spawn_ranks

KW = dict(lr=0.02, momentum=0.95, weight_decay=0.1, adjust_lr_fn="original")
# Three matrices of one shape, one of another (tall), one expert stack: three batches.
SHAPES = [(24, 40), (24, 40), (24, 40), (40, 24), (5, 16, 16)]


def _params(seed: int = 7, shapes=SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(step: int, shapes=SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) for s in shapes]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range, shapes=SHAPES, place=None) -> None:
    for step in steps:
        for p, g in zip(params, _grads(step, shapes)):
            p.grad = g if place is None else place(g)
        opt.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_equals_torch_muon_per_matrix(nesterov):
    """Parameters of mixed shapes, a (5, 16, 16) expert stack among them, in one optimizer: each
    matrix gets exactly torch.optim.Muon's update, and the state holds torch's momentum buffers."""
    ours = _params()
    batched = BatchedMuon(ours, **KW, nesterov=nesterov)
    ref = _params()
    # torch's Muon is 2-D only: the stack's experts are five parameters there.
    ref_flat = [p for p in ref[:-1]] + [torch.nn.Parameter(m.detach().clone()) for m in ref[-1]]
    per_matrix = torch.optim.Muon(ref_flat, **KW, nesterov=nesterov)
    for step in range(3):
        grads = _grads(step)
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        for p, g in zip(ref_flat, [*grads[:-1], *grads[-1]]):
            p.grad = g.clone()
        batched.step()
        per_matrix.step()
    want = [p.detach() for p in ref[:-1]] + [torch.stack([p.detach() for p in ref_flat[4:]])]
    for got, w, start in zip(ours, want, _params()):
        assert float((got - start).detach().abs().max()) > 1e-3  # it moved
        torch.testing.assert_close(got.detach(), w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        batched.state[ours[0]]["momentum_buffer"], per_matrix.state[ref_flat[0]]["momentum_buffer"]
    )
    torch.testing.assert_close(
        batched.state[ours[-1]]["momentum_buffer"],
        torch.stack([per_matrix.state[p]["momentum_buffer"] for p in ref_flat[4:]]),
    )


def test_the_batched_iteration_a_gpu_runs_equals_the_per_matrix_one_a_cpu_runs():
    """On a CPU the batch is iterated one matrix at a time (oneDNN's 2-D GEMMs are faster there);
    a GPU runs it as one batched GEMM per step: the same map."""
    x = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x /= torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    coeffs = (3.4445, -4.7750, 2.0315)
    batched = _quintic(x, coeffs, 5)
    assert float((batched - x).abs().max()) > 0.1  # it iterated
    torch.testing.assert_close(batched, torch.stack([_quintic(m, coeffs, 5) for m in x]), rtol=1e-12, atol=1e-12)


def test_batched_muon_resumes_from_a_state_dict_it_did_not_make():
    """The momentum of a batch lives in one stacked tensor that the state's buffers are rows of;
    after load_state_dict (a resume) the loaded buffers are the momentum, not the old stack."""
    params = _params()
    opt = BatchedMuon(params, **KW, ns_dtype=torch.float32)
    _run(opt, params, range(2))
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    _run(opt, params, range(2, 4))
    want = [p.detach().clone() for p in params]

    _run(opt, params, range(4, 6))  # the live stack moves on: a resume must not use it
    with torch.no_grad():
        for p, s in zip(params, saved_params):
            p.copy_(s)
    opt.load_state_dict(saved)
    _run(opt, params, range(2, 4))
    for got, w in zip(params, want):
        torch.testing.assert_close(got.detach(), w, atol=0, rtol=0)
    # The state's buffers are rows of the stack the step updates (no copy per step).
    stacked = opt._stacked[tuple(id(p) for p in params[:3])]
    assert all(opt.state[p]["momentum_buffer"].data_ptr() == row.data_ptr() for p, row in zip(params, stacked))


# ----------------------------------------------------------------- split over DDP ranks

WORLD = 2


def _join_counting_newton_schulz(rank: int, port: int, world: int) -> list[int]:
    """In a spawned worker: join the test's gloo group; the returned list fills with the number of
    matrices each Newton-Schulz call of this rank takes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sizes: list[int] = []
    ns = optim._newton_schulz_batched

    def counted(matrices, **kw):
        sizes.append(matrices.size(0))
        return ns(matrices, **kw)

    optim._newton_schulz_batched = counted
    return sizes


def _split_worker(rank: int, port: int, out: str) -> None:
    sizes = _join_counting_newton_schulz(rank, port, WORLD)
    params = _params()
    opt = BatchedMuon(params, **KW, ns_dtype=torch.float32, split_over_ranks=True)
    _run(opt, params, range(3))
    torch.save({"params": [p.detach() for p in params], "sizes": sizes}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_split_over_ranks_orthogonalises_a_share_each_and_equals_one_process(tmp_path):
    spawn_ranks(_split_worker, WORLD, tmp_path, timeout_s=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    one = _params()
    _run(BatchedMuon(one, **KW, ns_dtype=torch.float32), one, range(3))
    for r in ranks:
        for got, want in zip(r["params"], one):
            torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
    # Per step, batches of 3, 1 and 5 matrices: rank 0 takes 2, 1, 3; rank 1 the rest (none of the
    # lone tall matrix).
    assert ranks[0]["sizes"] == [2, 1, 3] * 3
    assert ranks[1]["sizes"] == [1, 2] * 3


# ----------------------------------------------------------------- FSDP2's row shards

FSDP_WORLD = 3
# Over 3 ranks: 24 rows are 8 per rank, 40 are 14, 14, 12, and a 2-row matrix leaves rank 2 none.
FSDP_SHAPES = [(24, 40)] * 5 + [(40, 24), (2, 16), (5, 16, 16)]


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    sizes = _join_counting_newton_schulz(rank, port, FSDP_WORLD)
    mesh = init_device_mesh("cpu", (FSDP_WORLD,))
    shard = functools.partial(distribute_tensor, device_mesh=mesh, placements=[Shard(0)])
    params = [torch.nn.Parameter(shard(p.detach())) for p in _params(shapes=FSDP_SHAPES)]
    opt = BatchedMuon(params, **KW, ns_dtype=torch.float32)
    _run(opt, params, range(3), FSDP_SHAPES, place=shard)
    buffers = [opt.state[p]["momentum_buffer"] for p in params]
    torch.save(
        {
            "params": [p.detach().full_tensor() for p in params],
            "buffers": [b.full_tensor() for b in buffers],
            "sharded": [isinstance(b, DTensor) and b.placements == p.placements for b, p in zip(buffers, params)],
            "sizes": sizes,
        },
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_row_shards_are_gathered_orthogonalised_in_shares_and_equal_one_process(tmp_path):
    spawn_ranks(_fsdp_worker, FSDP_WORLD, tmp_path, timeout_s=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(FSDP_WORLD)]
    one = _params(shapes=FSDP_SHAPES)
    ref = BatchedMuon(one, **KW, ns_dtype=torch.float32)
    _run(ref, one, range(3), FSDP_SHAPES)
    for r in ranks:
        for got, want, start in zip(r["params"], one, _params(shapes=FSDP_SHAPES)):
            assert float((got - start.detach()).abs().max()) > 1e-3  # it moved
            torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
        for got, p in zip(r["buffers"], one):
            torch.testing.assert_close(got, ref.state[p]["momentum_buffer"], atol=1e-6, rtol=1e-5)
        assert all(r["sharded"])  # the momentum stays sharded as the parameter: torch's Muon's state layout
    # Per step: the five wide matrices, whole two each on ranks 0 and 1 and one on rank 2; the tall
    # and the 2-row matrix on rank 0; then each rank's own experts of the stack (2, 2, 1), which
    # need no exchange.
    assert [r["sizes"] for r in ranks] == [[2, 1, 1, 2] * 3, [2, 2] * 3, [1, 1] * 3]


# ----------------------------------------------------------------- Newton-Schulz precision


def test_newton_schulz_in_fp32_is_torchs_bf16_map_without_the_rounding():
    """On the CPU, Muon orthogonalises in fp32 (bf16 matmuls are emulated there, ten times slower):
    the same map as torch.optim.Muon's bf16 Newton-Schulz, closer to the exact fp64 one."""
    from torch.optim._muon import _zeropower_via_newtonschulz  # noqa: PLC0415  torch's own, the reference

    g = torch.randn(48, 80, generator=torch.Generator().manual_seed(3))
    coeffs = (3.4445, -4.7750, 2.0315)
    exact = _newton_schulz_batched(g[None].double(), coeffs, 5, 1e-7, torch.float64)[0]
    ours = _newton_schulz_batched(g[None], coeffs, 5, 1e-7, torch.float32)[0].double()
    torchs = _zeropower_via_newtonschulz(g, coeffs, 5, 1e-7).double()
    assert float((ours - exact).abs().max()) < 1e-5 < float((torchs - exact).abs().max()) < 0.05


def test_muon_orthogonalises_in_fp32_only_where_the_cpu_emulates_bf16(monkeypatch):
    # With ATen and oneDNN held to AVX2, every x86 CPU emulates bf16 (363 ms against 7 ms for fp32
    # Newton-Schulz of a 256 x 1024 matrix on this machine's AMX CPU): the check must say so.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    probe = "from nanochat_trainer.train.optim import cpu_bf16_is_emulated as f; print(f())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    cpu, meta = [torch.zeros(2, 2)], [torch.zeros(2, 2, device="meta")]
    monkeypatch.setattr(optim, "cpu_bf16_is_emulated", lambda: True)
    assert optim.newton_schulz_dtype(cpu) == torch.float32 and optim.newton_schulz_dtype(meta) == torch.bfloat16
    model = GPT(TrainerConfig(preset="tiny").model)
    assert optim.build_optimizers(model, TrainerConfig(preset="tiny").optimizer)[1].ns_dtype == torch.float32
    monkeypatch.setattr(optim, "cpu_bf16_is_emulated", lambda: False)  # AVX512-BF16, AMX: bf16 as torch's
    assert optim.newton_schulz_dtype(cpu) == torch.bfloat16
    assert optim.build_optimizers(model, TrainerConfig(preset="tiny").optimizer)[1].ns_dtype == torch.bfloat16
