"""`python -m nanochat_trainer.train --config run.yaml`, also what torchrun starts on every rank.

A configuration error prints one line and exits with status 2 (`errors.run_guarded`).
"""

from __future__ import annotations

import argparse
import sys

from ..config import load_trainer_config
from ..errors import run_guarded
from .run import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanochat_trainer.train", description="Train (or resume) a model.")
    parser.add_argument("--config", required=True, help="trainer config (YAML/JSON): a TrainerConfig")
    args = parser.parse_args(argv)
    return run_guarded(lambda: (train(load_trainer_config(args.config)), 0)[1])


if __name__ == "__main__":
    sys.exit(main())
