"""The generated CRDs: in sync with the models, structural, and valid CRD objects.

Regenerate with `nanochat crds` (or `python -m nanochat_operator.crds`, which also
refreshes the chart's copy) when this fails after a model change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from nanochat_operator import crds
from nanochat_trainer.contract import PHASES, ConditionType

from operator_support import pinned, schema_of, validator

ROOT = Path(__file__).resolve().parents[1]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("filename,kind", list(crds.FILES.items()))
def test_crds_on_disk_are_current(filename, kind):
    expected = crds.render_crd_yaml(kind)
    for folder in (ROOT / "crds", ROOT / crds.CHART_CRD_DIR):
        path = folder / filename
        assert path.exists(), f"{path} missing: run `python -m nanochat_operator.crds`"
        assert path.read_text() == expected, f"{path} is stale: run `python -m nanochat_operator.crds`"


def test_write_crds_writes_both_copies(tmp_path):
    written = crds.write_crds(str(tmp_path / "crds"), chart_dir=str(tmp_path / "chart"))
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p in written) == [
        "chart/evalrun.yaml",
        "chart/trainingrun.yaml",
        "crds/evalrun.yaml",
        "crds/trainingrun.yaml",
    ]
    for filename, kind in crds.FILES.items():
        for folder in ("crds", "chart"):
            assert (tmp_path / folder / filename).read_text() == crds.render_crd_yaml(kind)


@pytest.mark.parametrize("kind", ["TrainingRun", "EvalRun"])
def test_status_schema_names_every_phase_and_condition_type(kind):
    status = schema_of(kind)["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == list(PHASES)
    described = status["conditions"]["items"]["properties"]["type"]["description"]
    assert [t for t in ConditionType if t not in described] == []


@pytest.mark.parametrize("kind", ["TrainingRun", "EvalRun"])
def test_crd_is_a_valid_structural_crd(kind):
    crd = crds.crd(kind)
    kubernetes_validate.validate(crd, pinned("KUBERNETES_VALIDATE_VERSION"), strict=True)
    assert crd["spec"]["names"]["shortNames"] == [{"TrainingRun": "tr", "EvalRun": "er"}[kind]]
    assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}
    for path, node in walk(schema_of(kind)):
        assert "$ref" not in node and "allOf" not in node and "const" not in node and "title" not in node, path
        if "anyOf" in node:  # the only anyOf a structural schema may have
            assert node.get("x-kubernetes-int-or-string") and "type" not in node, path
        else:
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(node["exclusiveMinimum"], bool):
            pytest.fail(f"{path}: JSON-Schema-2020 exclusiveMinimum is not OpenAPI v3.0")


def test_no_defaults_inside_trainer_but_operator_fields_have_them():
    spec = schema_of("TrainingRun")["properties"]["spec"]
    for path, node in walk(spec["properties"]["trainer"], ".trainer"):
        assert "default" not in node, f"{path}: a default here would override the preset"
    res = spec["properties"]["resources"]
    assert res["default"] == {} and res["properties"]["nodes"]["default"] == 1
    assert spec["properties"]["backoffLimit"]["default"] == 3
    assert spec["properties"]["trainer"]["properties"]["preset"]["enum"]  # presets by name
    assert "trainer" in spec["required"]


def test_columns_and_cel_rules_present():
    tr = crds.crd("TrainingRun")["spec"]["versions"][0]
    assert [c["name"] for c in tr["additionalPrinterColumns"] if not c.get("priority")] == [
        "Phase",
        "Step",
        "Loss",
        "Val loss",
        "pass@1",
        "Tokens/s",
        "Age",
    ]
    er = crds.crd("EvalRun")["spec"]["versions"][0]
    assert [c["name"] for c in er["additionalPrinterColumns"] if not c.get("priority")] == ["Phase", "pass@1", "Age"]
    rules = [r["rule"] for _, n in walk(schema_of("TrainingRun")) for r in n.get("x-kubernetes-validations", [])]
    assert any("distill" in r for r in rules) and any("n_kv_heads" in r for r in rules)
    assert any("PET_" in r for r in rules) and any("metadata.name" in r for r in rules)


def test_schema_accepts_good_and_refuses_bad_fields():
    v = validator("TrainingRun")
    good = {
        "apiVersion": "nanochat.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "x"},
        "spec": {
            "trainer": {"preset": "tiny", "model": {"head_dim": None}},
            "resources": {"nodes": 2, "cpu": 4, "memory": "8Gi"},
        },
    }
    v.validate(good)
    for bad, field in [
        ({"trainer": {"preset": "nope"}}, "preset"),
        ({"trainer": {"steps": 0}}, "steps"),
        ({"trainer": {}, "resources": {"nodes": 0}}, "nodes"),
        ({"trainer": {}, "resources": {"memory": "lots"}}, "memory"),
        ({"trainer": {"stage": "finetune"}}, "stage"),
        ({"trainer": {"optimizer": {"lr": 0}}}, "lr"),
        ({}, "trainer"),
    ]:
        errors = list(v.iter_errors({**good, "spec": bad}))
        assert errors, bad
        assert any(field in (".".join(map(str, e.absolute_path)) + e.message) for e in errors), (bad, errors)
