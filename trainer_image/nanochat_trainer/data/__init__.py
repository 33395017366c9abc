"""Training data: where documents come from and how they become token batches.

    from nanochat_trainer.data.sources import iter_documents   # text documents of a DataConfig
    from nanochat_trainer.data.synthetic import generate        # seeded synthetic Python snippets
    from nanochat_trainer.data.loader import TokenLoader        # packed (x, y) batches, resumable

This package module stays free of torch and of heavy imports so the CLI can import
`ConfigError` cheaply and turn it into a one-line error (exit code 2).
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value that validates on its own but cannot be used (a missing file, a
    vocabulary larger than the model's). `str(err)` reads `field=value: message`, the
    same shape as `config.format_validation_error`, so the CLI prints it as is."""

    def __init__(self, field: str, value: Any, message: str):
        self.field = field
        self.value = value
        self.message = message
        super().__init__(f"{field}={value!r}: {message}")

    def __reduce__(self):
        # Keep the error picklable (it may cross a multiprocessing boundary).
        return (type(self), (self.field, self.value, self.message))


__all__ = ["ConfigError"]
