"""The one exception type automodel.ckpt raises for a bad checkpoint, path or argument."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint, path or argument is not what was expected; the message says what and how to fix it.

    It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working. The CLI
    prints its message on one line and exits non-zero.
    """
