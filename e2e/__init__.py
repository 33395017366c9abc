"""End-to-end harness: a control plane built from source (cluster.py), a test node agent
that runs pods as local processes (node_agent.py), and the operator run from its chart
(operator_local.py). Used by tests/e2e and bench/operator_scale.py."""
