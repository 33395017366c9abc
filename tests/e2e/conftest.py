"""Fixtures of the end-to-end tests: one real control plane for the whole session.

The control plane's binaries are built by e2e/tools.sh on first use (see the README for
how long that takes) and cached outside the repo; later sessions start in seconds.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import fake_vllm
from e2e.cluster import ControlPlane
from e2e.node_agent import TestNodeAgent
from e2e.operator_local import ChartOperator
from e2e.scale import ensure_kwok_nodes

AGENT_NODE = "e2e-agent"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    cp.start()
    yield cp
    cp.stop()


@pytest.fixture(scope="session")
def operator(control_plane: ControlPlane) -> Iterator[ChartOperator]:
    # A short interval: the tests wait on phase changes that the timer picks up.
    op = ChartOperator(control_plane, values={"operator": {"interval": 2}, "vllmImage": fake_vllm.IMAGE})
    op.install().start()
    yield op
    op.stop()


@pytest.fixture(scope="session")
def kwok_nodes(control_plane: ControlPlane) -> None:
    """Fake 8-GPU nodes for runs played by kwok (enough for the 200-run scale test)."""
    ensure_kwok_nodes(control_plane, 200)


@pytest.fixture(scope="session")
def node_agent(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestNodeAgent]:
    """The one node whose pods really run, as processes of this machine."""

    venv_bin = str(Path(sys.executable).parent)
    home = tmp_path_factory.mktemp("agent-home")
    env = {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        # Two trainer pods share this machine's cores: one thread each keeps them from thrashing.
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    agent = TestNodeAgent(
        str(control_plane.kubeconfig),
        AGENT_NODE,
        tmp_path_factory.mktemp("agent"),
        # Two GPUs advertised (none used): an eval pod serving its model over them can be placed here,
        # its vLLM sidecar run as e2e/fake_vllm.py (vLLM needs GPUs; see test_eval_vllm.py).
        capacity={"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "2"},
        extra_env=env,
        stand_ins={fake_vllm.IMAGE: fake_vllm.STAND_IN},
    )
    agent.start()
    control_plane.wait_for(lambda: _node_ready(control_plane, AGENT_NODE), 60, "the agent node Ready")
    yield agent
    agent.stop()


def _node_ready(cp: ControlPlane, name: str) -> bool:
    node = cp.get("node", name)
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))


@pytest.fixture(scope="session")
def volumes(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hostPath PersistentVolumes for the PVCs the operator makes (no provisioner here):
    the PV controller binds each claim to one, and the agent mounts its path."""
    root = tmp_path_factory.mktemp("pvs")
    control_plane.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"e2e-pv-{i}"},
                "spec": {
                    "capacity": {"storage": "100Gi"},
                    "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": str(root / f"pv-{i}")},
                },
            }
            for i in range(12)
        ]
    )
    return root


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace that enforces Pod Security "restricted", as platform teams set theirs:
    every pod a test's runs make is admitted (or refused) under it."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.apply(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}},
        }
    )
    control_plane.wait_for(
        lambda: control_plane.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        60,
        f"the default ServiceAccount in {name}",
    )
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
