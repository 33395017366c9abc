"""`nanochat run MANIFEST`: a TrainingRun, a chained TrainingRun and an EvalRun, no cluster."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from nanochat_cli.local import run_manifest
from nanochat_cli.main import main
from nanochat_operator.manifests import ManifestError
from nanochat_operator.manifests import dry_run as cluster_dry_run
from nanochat_trainer.checkpoint import load_model
from nanochat_trainer.serve import ModelServer

from serving import serve_app

MANIFEST = """
apiVersion: nanochat.io/v1alpha1
kind: EvalRun
metadata: {name: base-eval}
spec:
  model: {trainingRun: base}
  k: [1]
  maxProblems: 2
---
apiVersion: nanochat.io/v1alpha1
kind: TrainingRun
metadata: {name: finetune}
spec:
  init: {fromTrainingRun: base}
  storage: {size: 1Gi}  # the cluster's PVC; locally, the runs directory
  trainer: {preset: tiny, steps: 4}
---
apiVersion: nanochat.io/v1alpha1
kind: TrainingRun
metadata: {name: base}
spec:
  storage: {size: 1Gi}
  trainer: {preset: tiny, steps: 6}
"""


def test_runs_in_dependency_order(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST)
    runs = tmp_path / "runs"
    over = {"trainer": {"batch_size": 2, "tokenizer": {"train_docs": 200}}}
    assert run_manifest(str(path), overrides=over, runs_dir=str(runs)) == 0
    plan = capsys.readouterr().out.splitlines()
    order = [line.split(":")[0] for line in plan[:3]]
    assert order[0] == "TrainingRun base" and set(order[1:]) == {"TrainingRun finetune", "EvalRun base-eval"}
    assert (runs / "finetune" / "final" / "model.safetensors").is_file()
    # Full results where the operator writes them: beside the evaluated run.
    results = json.loads((runs / "base" / "eval" / "base-eval.json").read_text())
    assert results["pass_at_k"]["1"] == 0.0 and results["problems"] == 2


def test_bad_field_is_named_before_anything_runs(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST.replace("steps: 6", "steps: 0"))
    with pytest.raises(ValueError, match=r"\(TrainingRun base\): spec.trainer.steps=0"):
        run_manifest(str(path), runs_dir=str(tmp_path / "runs"))  # refused before anything runs
    assert [p.name for p in tmp_path.iterdir()] == ["m.yaml"]


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_eval_of_a_best_checkpoint_that_will_never_be_is_refused_before_anything_runs(tmp_path, dry_run):
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST.replace("model: {trainingRun: base}", "model: {trainingRun: base, checkpoint: best}"))
    assert "checkpoint: best" in path.read_text()
    refused = r"EvalRun base-eval: TrainingRun base has no best checkpoint"
    with pytest.raises(ValueError, match=refused):
        run_manifest(str(path), dry_run=dry_run, runs_dir=str(tmp_path / "runs"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.yaml"]
    with pytest.raises(ManifestError, match=refused):  # the operator's own dry run, which the CLI's prints
        cluster_dry_run(str(path))


@pytest.mark.parametrize("example", sorted(str(p) for p in (Path(__file__).parent.parent / "examples").glob("*.yaml")))
def test_examples_pass_the_dry_run(example, tmp_path, capsys):
    assert run_manifest(example, dry_run=True, runs_dir=str(tmp_path)) == 0
    assert "valid:" in capsys.readouterr().out


COMPARISON = """
apiVersion: nanochat.io/v1alpha1
kind: TrainingRun
metadata: {name: parent}
spec:
  storage: {size: 1Gi}
  trainer: {preset: tiny, steps: 6}
---
apiVersion: nanochat.io/v1alpha1
kind: TrainingRun
metadata: {name: tern}
spec:
  init: {fromTrainingRun: parent}
  storage: {size: 1Gi}
  trainer: {preset: tiny, stage: ternary, steps: 4}
---
apiVersion: nanochat.io/v1alpha1
kind: EvalRun
metadata: {name: tern-vs-parent}
spec:
  model: {trainingRun: tern}
  compare:
    - {name: parent, trainingRun: parent}
  k: [1]
  maxProblems: 2
  maxNewTokens: 16
"""


def test_ternary_student_is_scored_beside_its_parent(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(COMPARISON)
    runs = tmp_path / "runs"
    over = {"trainer": {"batch_size": 2, "tokenizer": {"train_docs": 200}}}
    assert run_manifest(str(path), overrides=over, runs_dir=str(runs)) == 0
    results = json.loads((runs / "tern" / "eval" / "tern-vs-parent.json").read_text())
    rows = {r["name"]: r for r in results["comparison"]}
    assert list(rows) == ["tern", "parent"] and rows["parent"]["source"].endswith("parent/final")
    assert all(set(r["pass_at_k"]) == {"1"} for r in rows.values())
    table = capsys.readouterr().err
    assert "parent" in table and "pass@1" in table


def test_distillation_manifest_runs_locally_against_a_served_teacher(tmp_path, ckpt):
    """`nanochat run` of a distill TrainingRun: the teacher is a real OpenAI-compatible server."""

    model, tok, _ = load_model(ckpt)
    url, stop = serve_app(ModelServer(model, tok, model_name="teacher").app())
    try:
        manifest = tmp_path / "m.yaml"
        manifest.write_text(f"""
apiVersion: nanochat.io/v1alpha1
kind: TrainingRun
metadata: {{name: student}}
spec:
  trainer:
    preset: tiny
    stage: distill
    steps: 3
    distill:
      method: cross_tokenizer
      top_k: 8
      teacher: {{url: "{url}/v1", model: teacher}}
""")
        runs = tmp_path / "runs"
        # Rows shorter than the teacher's context: longer pieces are refused by it (and counted).
        over = {"trainer": {"batch_size": 2, "seq_len": 64, "tokenizer": {"train_docs": 200}}}
        assert run_manifest(str(manifest), overrides=over, runs_dir=str(runs)) == 0
    finally:
        stop()
    last = json.loads((runs / "student" / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["teacher"]["requests"] > 0 and last["teacher"]["errors"] == 0, last
    assert last["alignment"]["aligned_fraction"] > 0.2 and last["kd_loss"] is not None


def test_an_eval_the_cluster_would_serve_with_vllm_stops_a_local_run_in_one_line(tmp_path, capsys):
    """An EvalRun of an 80B model trained in full precision: the operator serves it with vLLM over 8
    GPUs; here there is no vLLM, so `nanochat run` says so in one line (exit 2) before anything runs,
    and the dry run says what the cluster would do."""
    manifest = tmp_path / "big.yaml"
    manifest.write_text(
        textwrap.dedent(
            """
            apiVersion: nanochat.io/v1alpha1
            kind: TrainingRun
            metadata: {name: big}
            spec:
              trainer: {preset: qwen3-hybrid, steps: 10}
              resources: {nodes: 4, gpusPerNode: 8}
            ---
            apiVersion: nanochat.io/v1alpha1
            kind: EvalRun
            metadata: {name: big-humaneval}
            spec:
              model: {trainingRun: big}
              resources: {gpus: 8}
            """
        )
    )
    runs = tmp_path / "runs"
    assert main(["run", str(manifest), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert "EvalRun big-humaneval needs a cluster with GPUs" in err and "vLLM over 8 GPU(s)" in err
    assert not runs.exists()  # nothing ran
    assert run_manifest(str(manifest), dry_run=True, runs_dir=str(runs)) == 0
    out = capsys.readouterr().out
    assert "served by vLLM with tensor parallelism 8 in the eval pod" in out  # the cluster's plan
    assert "EvalRun big-humaneval needs a cluster with GPUs" in out  # and this machine's
