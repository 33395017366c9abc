"""The phase examples: accepted by the CRD schema, by the pydantic models and by the dry run.

phase3 uses preset qwen3-hybrid; if config.PRESETS lacks it, its tests fail for that reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nanochat_operator import api, render
from nanochat_operator.checks import feasibility
from nanochat_operator.manifests import dry_run, load_manifests

from operator_support import validator

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
    names = {o.metadata.name for o in objs if isinstance(o, api.TrainingRun)}
    for obj in objs:
        if isinstance(obj, api.TrainingRun):
            assert feasibility(obj.spec) == []
            render.render_training(obj.metadata.name, "ml", obj.spec, image="i")
            if obj.spec.init:
                assert obj.spec.init.from_training_run in names  # the chain is in the same file
        else:
            assert obj.spec.model.training_run in names
    summary = dry_run(str(path))
    assert summary.startswith(f"{path}: valid:")


def test_example_specifics():
    p1 = load_manifests(str(EXAMPLES[0]))
    assert p1[0].spec.trainer.stage == "distill" and p1[0].spec.trainer.distill.method == "sequence"
    assert p1[0].spec.trainer.data.source == "synthetic" and p1[0].spec.trainer.steps == 10000
    assert p1[0].spec.trainer.model.dim == 768  # nano-125M applied
    p2 = load_manifests(str(EXAMPLES[1]))
    assert p2[0].spec.trainer.data.source == "huggingface" and p2[0].spec.trainer.steps == 50000
    p3 = load_manifests(str(EXAMPLES[2]))
    pre, tern = p3[0], p3[1]
    assert pre.spec.trainer.steps == 100000 and pre.spec.trainer.model.moe is not None
    assert tern.spec.trainer.stage == "ternary" and tern.spec.init.from_training_run == pre.metadata.name
