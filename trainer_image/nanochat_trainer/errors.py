"""Configuration errors, and how a command turns them into one line and exit status 2.

Torch-free, so every command can import it cheaply.

    raise ConfigError("data.path", path, "does not exist")   # "data.path='x': does not exist"
    raise MachineError("device: cuda, but torch sees no GPU")  # one line too, exit 1 (retried)
    sys.exit(run_guarded(lambda: main(args)))
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from .config import format_validation_error
from .contract import DEBUG_ENV

EXIT_CONFIG = 2
EXIT_MACHINE = 1


class ConfigError(ValueError):
    """A config value that validates on its own but cannot be used (a missing file, a
    vocabulary larger than the model's). `str(err)` reads `field=value: message`, the
    same shape as `config.format_validation_error`, so commands print it as is."""

    def __init__(self, field: str, value: Any, message: str):
        self.field = field
        self.value = value
        self.message = message
        super().__init__(f"{field}={value!r}: {message}")

    def __reduce__(self):
        # Keep the error picklable (it may cross a multiprocessing boundary).
        return (type(self), (self.field, self.value, self.message))


class MachineError(RuntimeError):
    """A machine that cannot do what a valid config asks (device: cuda where torch sees no GPU). One
    line too, but exit status 1, not 2: in a cluster it is the node's fault (its driver, its device
    plugin) and the Job retries it, maybe elsewhere, where exit 2 would fail the run for good."""


def run_guarded(fn: Callable[[], int]) -> int:
    """Run fn; a configuration error becomes one line on stderr and exit status 2, a machine that
    cannot run it one line and exit 1 (a traceback instead when $NANOCHAT_DEBUG is set)."""
    try:
        return fn()
    except MachineError as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_MACHINE
    except ValidationError as e:
        print(f"error: {format_validation_error(e)}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG
