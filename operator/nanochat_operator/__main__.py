"""Run the operator: `python -m nanochat_operator [--namespace NS ...] [--trainer-image IMG]`.

Starts the metrics/readiness server (:8000), then kopf with its liveness probe
(:8080/healthz), JSON logs, and the handlers of nanochat_operator.handlers. One replica
(standalone) unless --peering names a kopf peering object (kopf's peering CRDs must then
be installed).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

import kopf

from . import settings
from .metrics import serve


def main(argv: Sequence[str] | None = None) -> int:
    config = settings.parse_args(argv)
    # The handlers read settings.CONFIG at start-up.
    settings.CONFIG.__dict__.update(config.__dict__)
    kopf.configure(
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.PLAIN, verbose=False
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per trainer scrape otherwise
    # kopf logs every handler success per object at INFO: with hundreds of runs and their pods
    # that is tens of lines a second. Phase changes are Events; keep warnings here.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    importlib.import_module("nanochat_operator.handlers")
    serve(config.metrics_port)
    kopf.run(
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness,
        standalone=config.peering is None,
        peering_name=config.peering,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
