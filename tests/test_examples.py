"""The phase examples: accepted by the CRD schema, by the pydantic models and by the dry run.

phase3 uses preset qwen3-hybrid; if config.PRESETS lacks it, its tests fail for that reason."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from nanochat_operator import api, render
from nanochat_operator.checks import feasibility
from nanochat_operator.manifests import dry_run, eval_fit_in_file, load_manifests, vllm_serving

from operator_support import pinned, validator

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_the_three_phases_exist():
    assert [p.name for p in EXAMPLES] == ["phase1-quick-demo.yaml", "phase2-useful.yaml", "phase3-production.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_matches_crd_schema(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert "TrainingRun" in kinds and "EvalRun" in kinds
    for doc in docs:
        errors = list(validator(doc["kind"]).iter_errors(doc))
        assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_renders_and_dry_runs(path):
    objs = load_manifests(str(path))
    trainings = {o.metadata.name: o for o in objs if isinstance(o, api.TrainingRun)}
    for obj in objs:
        if isinstance(obj, api.TrainingRun):
            assert feasibility(obj.spec) == []
            render.render_training(obj.metadata.name, "ml", obj.spec, image="i")
            if obj.spec.init:
                assert obj.spec.init.from_training_run in trainings  # the chain is in the same file
        else:
            assert obj.spec.model.training_run in trainings
            fit = eval_fit_in_file(obj, trainings)  # the models it loads are in the same file: all checked
            assert fit.problems == []
            run, compared = obj.spec.model.training_run, {c.name: (c.training_run, "runs") for c in obj.spec.compare}
            job = render.render_eval_job(
                obj.metadata.name,
                "ml",
                obj.spec,
                image="i",
                source=(run, "runs"),
                compare_runs={n: r for n, r in compared.items() if r[0]},
                vllm=vllm_serving(fit, "v"),
            )
            kubernetes_validate.validate(job, pinned("KUBERNETES_VALIDATE_VERSION"), strict=True)
    summary = dry_run(str(path))
    assert summary.startswith(f"{path}: valid:")


def test_the_phases_follow_the_plan():
    p1 = {o.metadata.name: o for o in load_manifests(str(EXAMPLES[0]))}
    data, demo = p1["phase1-data"].spec, p1["phase1-demo"].spec
    assert data.trainer.stage == "generate" and "Qwen3" in data.trainer.generate.teacher.model
    assert demo.after == ["phase1-data"] and demo.trainer.model.dim == 768  # nano-125M applied
    assert demo.trainer.stage == "distill" and "Qwen3" in demo.trainer.distill.teacher.model
    assert {m.source for m in demo.trainer.data.mixture} == {"local", "huggingface", "synthetic"}
    p2 = {o.metadata.name: o for o in load_manifests(str(EXAMPLES[1]))}
    assert p2["phase2-1b"].spec.trainer.data.mixture[0].path == "/data/runs/phase2-data/dataset"
    assert p2["phase2-finetune"].spec.init.from_training_run == "phase2-1b"
    p3 = {o.metadata.name: o for o in load_manifests(str(EXAMPLES[2]))}
    tern = p3["phase3-ternary"].spec.trainer
    assert tern.stage == "ternary" and tern.model.hybrid is not None and tern.ternary.distill_from_parent
    assert tern.checkpoint.init_from.startswith("/data/hf/Qwen3-Next")
    assert tern.ternary.include == ["layers.*.mlp.experts.*"]  # selective: experts only
    assert [c.name for c in p3["phase3-ternary-humaneval"].spec.compare] == ["parent", "teacher"]
    # The 80B student is scored as it was trained for: its packed export (16 GiB), on one GPU.
    fit = eval_fit_in_file(p3["phase3-ternary-humaneval"], p3)
    assert fit.problems == [] and fit.tensor_parallel is None and fit.packed == {"phase3-ternary"}
    assert p3["phase3-ternary-humaneval"].spec.resources.gpus == 1
    assert "/data/runs/phase3-ternary/model.ternary.safetensors" in dry_run(str(EXAMPLES[2]))


_BUDGET = re.compile(r"^#\s+([a-z0-9-]+): ([\d.]+)B tokens \(([\d,]+) steps", re.M)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_header_states_the_tokens_each_training_run_takes(path):
    """Every TrainingRun that trains is in the header's budget, with the tokens and steps it really has."""
    stated = {name: (float(b), int(steps.replace(",", ""))) for name, b, steps in _BUDGET.findall(path.read_text())}
    runs = [
        o for o in load_manifests(str(path)) if isinstance(o, api.TrainingRun) and o.spec.trainer.stage != "generate"
    ]
    assert sorted(stated) == sorted(r.metadata.name for r in runs)
    for run in runs:
        t, world = run.spec.trainer, run.spec.resources.nodes * render.procs_per_node(run.spec)
        tokens = t.steps * t.batch_size * t.grad_accum * t.resolved_seq_len * world
        assert stated[run.metadata.name] == (round(tokens / 1e9, 2), t.steps), run.metadata.name
