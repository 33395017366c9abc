"""200 TrainingRuns applied at once on kwok GPU nodes all reach Running, then Succeeded."""

from __future__ import annotations

from typing import Any

from e2e.cluster import ControlPlane
from e2e.operator_local import ChartOperator
from e2e.scale import delete_namespace, run_scale


def test_200_runs_at_once(
    control_plane: ControlPlane, operator: ChartOperator, kwok_nodes: None, record_property: Any
) -> None:
    result = run_scale(control_plane, operator, 200, namespace="scale-200", timeout=600)
    print(result.line())
    record_property("scale_200", result.line())
    assert result.phases == {"Succeeded": 200}, result
    assert result.never_running == [], result.never_running[:10]
    delete_namespace(control_plane, "scale-200")
