"""The project's own exception classes, in a module that imports nothing heavy (no torch,
no yaml), so any module can raise or catch them without pulling in the data or config code.

`mmalign.data.preference.DataError` and `mmalign.config.ConfigError` are these same
classes (re-exported), so `except` and `pytest.raises` match whichever path is imported.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad preference data; the message names the file and row."""


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class CacheError(DataError):
    """The latent cache (`mmalign cache`) is missing, incomplete, or does not match the data or
    the config."""


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, emptied); the message names the file."""


class NonFiniteLossError(RuntimeError):
    """The loss, the gradients or the weights became NaN or inf; training stopped before the
    optimizer step (or the checkpoint) that would have kept them, so the last good checkpoint is
    left untouched. The message names the step."""
