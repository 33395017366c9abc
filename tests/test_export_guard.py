"""`nanochat export` never replaces what is not an earlier export: publishing renames the target
aside and deletes it, so a mistyped --hf or --ternary would otherwise delete a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from nanochat_cli.main import main
from nanochat_trainer.checkpoint import read_config
from nanochat_trainer.config import TrainerConfig
from nanochat_trainer.errors import ConfigError
from nanochat_trainer.export import SOURCE_RECORD, export_hf_dir, export_ternary


@pytest.fixture
def run(ckpt: Path, tmp_path: Path) -> Path:
    """A run directory whose final/ is the shared tiny model, plus a file that must survive."""
    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "final")
    (run / "log.jsonl").write_text('{"step": 1}\n')
    return run


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(flag: str, src: Path, out: Path, export=export_hf_dir) -> str:
    with pytest.raises(ConfigError) as e:
        export(src, out)
    assert e.value.field == flag
    return str(e.value)


@pytest.mark.parametrize("out", ["", "final"], ids=["the-run", "its-final"])
def test_hf_refuses_the_source_or_a_folder_holding_it(run: Path, out: str) -> None:
    before = _files(run)
    _refused("--hf", run, run / out if out else run)
    _refused("--hf", run / "final", run)  # contains SRC
    assert _files(run) == before


def test_hf_refuses_a_file(run: Path, tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert "is a file" in _refused("--hf", run, target)
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]  # nothing renamed aside


def test_hf_refuses_a_folder_that_is_no_export(run: Path, tmp_path: Path) -> None:
    target = tmp_path / "mywork"
    target.mkdir()
    (target / "thesis.tex").write_text("keep me")
    assert SOURCE_RECORD in _refused("--hf", run, target)
    assert (target / "thesis.tex").read_text() == "keep me"


@pytest.mark.parametrize("out", ["final/hf", "checkpoints/step_00000009", "best"])
def test_hf_refuses_where_it_would_be_taken_for_the_model(run: Path, out: str) -> None:
    _refused("--hf", run, run / out)
    assert not (run / out).exists()


def test_hf_re_exports_over_an_earlier_export(run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_hf_dir(run, empty)  # an empty folder holds nothing to lose
    assert export_hf_dir(run, run / "hf")
    assert not export_hf_dir(run, run / "hf")  # up to date
    assert export_hf_dir(run, run / "hf", dtype="float32")
    assert (run / "log.jsonl").exists() and (run / "final" / "model.safetensors").exists()


def test_cli_refusal_is_one_line_exit_2(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run), "--hf", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --hf="), err
    assert (run / "log.jsonl").exists()


@pytest.fixture
def ternary_run(run: Path) -> Path:
    """The same weights relabelled stage ternary: what export_ternary packs."""
    cfg = read_config(run / "final").model_dump(mode="json")
    cfg.update(stage="ternary", ternary={})
    (run / "final" / "config.yaml").write_text(
        yaml.safe_dump(TrainerConfig.model_validate(cfg).model_dump(mode="json"))
    )
    return run


def test_ternary_refuses_a_folder_or_a_foreign_file(ternary_run: Path) -> None:
    weights = ternary_run / "final" / "model.safetensors"
    before = weights.read_bytes()
    assert "not a packed ternary file" in _refused("--ternary", ternary_run, weights, export_ternary)
    assert weights.read_bytes() == before
    _refused("--ternary", ternary_run, ternary_run / "final", export_ternary)


def test_ternary_replaces_an_earlier_packed_file(ternary_run: Path) -> None:
    packed = ternary_run / "model.ternary.safetensors"
    export_ternary(ternary_run, packed)
    packed.write_bytes(packed.read_bytes())  # a new mtime, same contents: still a packed file
    assert export_ternary(ternary_run, packed)["path"] == str(packed)
