"""stage "distill" (method topk_logprobs) with MoE and hybrid students, against a real served teacher.

    .venv/bin/pytest tests/test_moe_distill.py -q -s     # -s prints the figures

The teacher is conftest.py's `narrow_teacher`: a MICRO dense model trained first and served by
`ModelServer` on a free port, its requests counted. The students are micro tiny-moe and
tiny-hybrid models (test_ternary_moe.py's shapes) sharing its tokenizer and vocabulary.
"""

from __future__ import annotations

import math

import pytest

from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.models.moe import MoE
from nanochat_trainer.train import train

from micro import MICRO, PRESET, distill_cfg, model_over, read_log

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["moe", "hybrid"])
def test_moe_student_distills_from_a_served_teacher(kind, narrow_teacher, tmp_path) -> None:
    url, tdir, seen = narrow_teacher
    steps = 4
    # alpha 1, pure distillation: the step's loss is the KL plus the balancing losses, which must
    # keep their own weights (mixed in, they would vanish at this alpha and the router go unbalanced).
    base = distill_cfg(tmp_path / kind, url, tdir, steps, alpha=1.0)
    # The shared helper builds a MICRO dense student: swap in the MoE / hybrid model, same vocabulary.
    cfg = TrainerConfig.model_validate(
        {**base.model_dump(mode="json"), "preset": PRESET[kind], "model": model_over(kind)}
    )
    assert cfg.model.moe is not None and cfg.model.vocab_size == MICRO["model"]["vocab_size"]
    assert (cfg.model.hybrid is not None) == (kind == "hybrid")
    before = seen["n"]
    rec = train(cfg)
    log = read_log(tmp_path / kind)
    print(
        f"\n{kind} student: loss {log[1]['loss']:.3f} -> {rec['loss']:.3f}, kd {log[1]['kd_loss']:.3f} -> "
        f"{rec['kd_loss']:.3f}, teacher {rec['teacher']}"
    )
    assert sorted(log) == list(range(1, steps + 1))
    for s in log:
        assert math.isfinite(log[s]["loss"]), log[s]
        assert log[s]["kd_loss"] is not None and math.isfinite(log[s]["kd_loss"]) and log[s]["kd_loss"] >= 0, log[s]
        assert log[s]["loss"] - log[s]["kd_loss"] > 1e-4, log[s]  # the MoE auxiliary losses, unscaled
    assert rec["teacher"]["requests"] == steps * MICRO["batch_size"] and rec["teacher"]["errors"] == 0
    assert rec["teacher_skipped"] == 0
    assert seen["n"] - before > 0  # the served teacher itself saw the requests
    student, _, scfg = load_model(tmp_path / kind / "final")
    assert scfg.stage == "distill"
    assert sum(isinstance(m, MoE) for m in student.modules()) == scfg.model.n_layers
