"""What import-linter (pyproject.toml) cannot state: the models know no processes.

import-linter forbids whole external packages only; the models need torch but must never reach
for torch.distributed (process groups, collectives, FSDP, DTensor): parallelism is applied to
them from `nanochat_trainer.parallel`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nanochat_trainer.models

MODELS = Path(nanochat_trainer.models.__file__).parent


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_models_import_nothing_distributed():
    found = {
        f"{path.name}: {name}"
        for path in sorted(MODELS.glob("*.py"))
        for name in _imported(path)
        if name == "torch.distributed" or name.startswith("torch.distributed.")
    }
    assert not found, found
    assert len(list(MODELS.glob("*.py"))) >= 7  # the scan saw the package
